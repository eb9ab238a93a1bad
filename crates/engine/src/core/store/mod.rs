//! The PostgreSQL store: the only source of truth.
//!
//! # Design notes
//! - Every write a worker makes while advancing a run is fenced by the run's lease epoch: the
//!   statement only takes effect if `runs.lease_epoch` still equals the epoch the worker claimed.
//!   A claim increments the epoch, so a worker that lost its lease writes nothing.
//! - The hot path (claim, record a step, finish a plain run) is one statement each; step records
//!   of many runs share commits (the group-commit writer, at the end of this file).
//!   Rarer paths (signals, children, concurrency admission) use a transaction that first locks
//!   the run row and checks the epoch.
//! - All times are PostgreSQL's `now()`, so workers with skewed clocks agree on what is due.

pub(crate) mod alerts;
pub(crate) mod schedules;
pub(crate) mod tokens;
pub(crate) mod views;
pub(crate) mod webhooks;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::core::error::{StoreError, StoreResult};
use crate::core::model::{
    AttemptError, ConcurrencyPolicy, RunFilter, RunId, RunStatus, RunView, StartRun, Started, StepKind, StepStatus,
    StepView, UnknownVariant,
};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// The PostgreSQL channel on which cancellations are announced (payload: the run id), so that a
/// worker running the run's step stops it at once.
pub(crate) const CANCEL_CHANNEL: &str = "dayshift_cancel";

/// A worker's right to advance one run, fenced by `epoch`.
#[derive(Debug, Clone)]
pub struct Lease {
    /// The run.
    pub run_id: RunId,
    /// Who holds it (worker name).
    pub owner: String,
    /// The fencing epoch taken by the claim.
    pub epoch: i64,
    /// How long the lease lasts unless renewed; every journal write renews it.
    pub ttl: Duration,
}

impl Lease {
    fn ttl_secs(&self) -> f64 {
        self.ttl.as_secs_f64()
    }
}

/// A run a worker has just claimed.
#[derive(Debug, Clone)]
pub(crate) struct ClaimedRun {
    pub(crate) workflow: String,
    pub(crate) input: Value,
    pub(crate) cancel_requested: bool,
    pub(crate) cancel_reason: Option<String>,
    pub(crate) has_parent: bool,
    pub(crate) has_concurrency_key: bool,
    /// No worker claimed it before, so its journal is empty.
    pub(crate) first_claim: bool,
    pub(crate) now: DateTime<Utc>,
    /// The run's trace (W3C traceparent), if traced.
    pub(crate) trace_context: Option<String>,
    /// What started the run (`api:token:alice`, `schedule:nightly`, ...).
    pub(crate) started_by: String,
    /// The version of the workflow the run was started on.
    pub(crate) workflow_version: u32,
}

/// Why a claim did not succeed.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ClaimMiss {
    /// Not due before this time: wake it up then.
    NotYet(DateTime<Utc>),
    /// Another worker holds a live lease, or the run waits for an outside event, or it is over.
    NotRunnable,
}

/// One journal entry as the runtime replays it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct JournalEntry {
    pub(crate) seq: i32,
    pub(crate) name: String,
    pub(crate) kind: String,
    pub(crate) status: String,
    pub(crate) attempts: i32,
    pub(crate) output: Option<Value>,
    pub(crate) sensitive: bool,
    pub(crate) error: Option<String>,
    pub(crate) error_kind: Option<String>,
    pub(crate) wake_at: Option<DateTime<Utc>>,
    pub(crate) child_run_id: Option<Uuid>,
}

impl JournalEntry {
    pub(crate) fn kind(&self) -> StepKind {
        self.kind.parse().unwrap_or(StepKind::Step)
    }
    pub(crate) fn status(&self) -> StepStatus {
        self.status.parse().unwrap_or(StepStatus::Running)
    }
}

/// What a worker records about a journal entry.
#[derive(Debug, Clone)]
pub(crate) struct StepRecord<'a> {
    pub(crate) seq: i32,
    pub(crate) name: &'a str,
    pub(crate) kind: StepKind,
    pub(crate) status: StepStatus,
    pub(crate) attempts: i32,
    pub(crate) output: Option<&'a Value>,
    pub(crate) sensitive: bool,
    pub(crate) error: Option<(&'a str, &'a str)>,
    /// Sets `wake_at` to now() plus this.
    pub(crate) wake_in: Option<Duration>,
    /// An event for the run's history, written in the same statement.
    pub(crate) event: Option<&'a str>,
    /// How long the attempt ran, for a step journaled only when it ends (its start time).
    pub(crate) ran_for: Option<Duration>,
}

/// How a run ends.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    pub(crate) status: RunStatus,
    pub(crate) output: Option<Value>,
    pub(crate) error: Option<String>,
}

/// The statement that ends a run whose lease is `$1`, `$2`.
const FINISH: &str = "update runs set status = $3, output = $4, error = $5, finished_at = now(), \
       updated_at = now(), lease_owner = null, lease_expires_at = null, wake_at = null \
     where id = $1 and lease_epoch = $2 \
     returning parent_run_id, concurrency_key, concurrency_limit";

/// The statement that journals a step, after its lease check `lease` (see [`PgStore::record`]).
///
/// A step's start is the earlier of the in-flight marker's (stamped when the marker was
/// committed, `MARKER_DELAY` and a commit after the step began) and the record's own (its
/// commit time less how long the attempt ran), so a step's duration is how long it ran.
macro_rules! record_sql {
    ($lease:literal) => {
        concat!(
            $lease,
            "step as ( \
               insert into steps (run_id, seq, name, kind, status, attempts, output, sensitive, error, error_kind, \
                                  wake_at, finished_at, started_at) \
               select $1, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
                      now() + $12 * interval '1 millisecond', case when $14 then now() end, \
                      now() - coalesce($16, 0) * interval '1 millisecond' from lease \
               on conflict (run_id, seq) do update set status = excluded.status, attempts = excluded.attempts, \
                 output = excluded.output, sensitive = excluded.sensitive, \
                 error = coalesce(excluded.error, steps.error), \
                 error_kind = coalesce(excluded.error_kind, steps.error_kind), wake_at = excluded.wake_at, \
                 finished_at = excluded.finished_at, updated_at = now(), \
                 started_at = least(steps.started_at, excluded.started_at) \
               returning wake_at), \
             event as ( \
               insert into run_events (run_id, kind, seq, step, attempt, detail) \
               select $1, $15, $3, $4, $7, jsonb_build_object('status', $6::text, 'error', $10::text) from lease \
               where $15 is not null) \
             select (select wake_at from step) as wake_at, exists (select 1 from lease) as held"
        )
    };
}

/// [`PgStore::record`] renewing the lease.
const RECORD_RENEWING: &str = record_sql!(
    "with lease as ( \
       update runs set lease_expires_at = now() + make_interval(secs => $13), updated_at = now() \
       where id = $1 and lease_epoch = $2 returning id), "
);

/// [`PgStore::record`] checking the lease with a lock, writing nothing to the run's row ($13 is
/// bound either way; here it only keeps the parameter list the same).
const RECORD: &str = record_sql!(
    "with lease as ( \
       select id from runs where id = $1 and lease_epoch = $2 and $13::float8 is not null for share), "
);

/// An audit entry written in the commit of the change it records; its target is the run
/// created (see [`PgStore::create_run_audited`]).
#[derive(Debug, Clone)]
pub(crate) struct AuditEntry {
    pub(crate) actor: String,
    pub(crate) role: Option<String>,
    pub(crate) action: String,
    pub(crate) detail: Value,
}

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The group-commit writer of step records ([`Journal`]), started with the first record.
    journal: std::sync::Arc<std::sync::OnceLock<Journal>>,
}

#[derive(sqlx::FromRow)]
struct RunRow {
    id: Uuid,
    workflow: String,
    workflow_version: i32,
    status: String,
    input: Value,
    output: Option<Value>,
    error: Option<String>,
    started_by: String,
    idempotency_key: Option<String>,
    concurrency_key: Option<String>,
    parent_run_id: Option<Uuid>,
    cancel_requested: bool,
    wake_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl RunRow {
    fn into_view(self) -> StoreResult<RunView> {
        Ok(RunView {
            id: RunId(self.id),
            workflow: self.workflow,
            workflow_version: self.workflow_version,
            status: self
                .status
                .parse()
                .map_err(|e: UnknownVariant| StoreError::Corrupt(e.0))?,
            input: self.input,
            output: self.output,
            error: self.error,
            started_by: self.started_by,
            idempotency_key: self.idempotency_key,
            concurrency_key: self.concurrency_key,
            parent_run_id: self.parent_run_id.map(RunId),
            cancel_requested: self.cancel_requested,
            wake_at: self.wake_at,
            created_at: self.created_at,
            started_at: self.started_at,
            finished_at: self.finished_at,
            steps: Vec::new(),
        })
    }
}

const RUN_COLUMNS: &str = "id, workflow, workflow_version, status, input, output, error, started_by, \
     idempotency_key, concurrency_key, parent_run_id, cancel_requested, wake_at, created_at, started_at, finished_at";

const ACTIVE: &str = "('pending', 'running', 'waiting')";

impl PgStore {
    /// A store on an existing pool.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            journal: Default::default(),
        }
    }

    /// Connects a pool of at most `max_connections` to `url`.
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        let options: PgConnectOptions = url.parse()?;
        let options = options.application_name("dayshift");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self::new(pool))
    }

    /// The pool, for workflows that keep their own tables in the dayshift database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations that are not applied yet.
    pub async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Whether PostgreSQL answers.
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("select 1").execute(&self.pool).await?;
        Ok(())
    }

    // ---------------------------------------------------------------- starting runs

    /// Creates a run, honouring its idempotency key and concurrency key.
    ///
    /// Returns what the caller sees and the runs that are now due (to enqueue after commit).
    /// `audit`, if given, is written in the same commit when a run is created (its target is
    /// the new run).
    pub(crate) async fn create_run(
        &self,
        req: &StartRun,
        version: u32,
        parent: Option<(RunId, i32)>,
        audit: Option<&AuditEntry>,
    ) -> StoreResult<(Started, Vec<RunId>)> {
        let id = RunId::new();
        let started_by = req.started_by.clone().unwrap_or_else(|| "api".to_string());
        if req.idempotency_key.is_none() && req.concurrency.is_none() {
            // The common case in one statement, its audit entry included, sharing a commit with
            // the other writes of this process ([`Journal`]).
            let create = Create {
                id,
                req: req.clone(),
                version,
                parent,
                audit: audit.cloned(),
            };
            self.writer().create(create).await?;
            let started = Started {
                id,
                status: RunStatus::Pending,
                created: true,
                note: None,
            };
            crate::core::metrics::metrics().run_started(&req.workflow, &started_by);
            return Ok((started, vec![id]));
        }
        let mut tx = self.pool.begin().await?;
        let (started, due) = create_run_in(&mut tx, id, req, version, parent).await?;
        if let Some(a) = audit.filter(|_| started.created) {
            sqlx::query("insert into audit_log (actor, role, action, target, detail) values ($1, $2, $3, $4, $5)")
                .bind(&a.actor)
                .bind(&a.role)
                .bind(&a.action)
                .bind(started.id.to_string())
                .bind(&a.detail)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if started.created {
            crate::core::metrics::metrics().run_started(&req.workflow, &started_by);
        }
        Ok((started, due))
    }

    // ---------------------------------------------------------------- leases

    /// Takes the lease on a run if it is due and nobody holds it.
    ///
    /// # Guarantees
    /// At most one live lease per run; every claim increments the fencing epoch.
    pub(crate) async fn claim(
        &self,
        run_id: RunId,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Result<(Lease, ClaimedRun), ClaimMiss>> {
        // Claims of many runs share a commit with the journal's writes ([`Journal`]).
        if let Some(claimed) = self.writer().claim(run_id, owner, ttl).await? {
            return Ok(Ok(claimed));
        }
        let row = sqlx::query(AssertSqlSafe(format!(
            "select wake_at, now() as now from runs where id = $1 and status in {ACTIVE} and admitted \
             and (lease_expires_at is null or lease_expires_at < now())"
        )))
        .bind(run_id.0)
        .fetch_optional(&self.pool)
        .await?;
        Ok(Err(match row {
            Some(row) => match row.get::<Option<DateTime<Utc>>, _>("wake_at") {
                Some(at) if at > row.get::<DateTime<Utc>, _>("now") => ClaimMiss::NotYet(at),
                _ => ClaimMiss::NotRunnable,
            },
            None => ClaimMiss::NotRunnable,
        }))
    }

    /// The common start ([`PgStore::create_run`]: no idempotency or concurrency key) at once, on
    /// `db` (the pool, or a batch's transaction).
    async fn create_now<'e>(db: impl sqlx::PgExecutor<'e>, c: &Create) -> StoreResult<()> {
        // Its `run_created` event is the run's row itself ([`PgStore::events`]).
        const INSERT: &str = "insert into runs (id, workflow, workflow_version, input, started_by, \
             parent_run_id, parent_seq, wake_at, trace_context) values ($1, $2, $3, $4, $5, $6, $7, now(), $8)";
        let audited;
        let sql = match c.audit {
            None => INSERT,
            Some(_) => {
                audited = format!(
                    "with run as ({INSERT} returning id) insert into audit_log (actor, role, action, target, detail) \
                     select $9, $10, $11, id::text, $12 from run"
                );
                &audited
            }
        };
        let req = &c.req;
        let mut query = sqlx::query(AssertSqlSafe(sql))
            .bind(c.id.0)
            .bind(&req.workflow)
            .bind(c.version as i32)
            .bind(&req.input)
            .bind(req.started_by.as_deref().unwrap_or("api"))
            .bind(c.parent.map(|p| p.0.0))
            .bind(c.parent.map(|p| p.1))
            .bind(&req.trace_context);
        if let Some(a) = &c.audit {
            query = query.bind(&a.actor).bind(&a.role).bind(&a.action).bind(&a.detail);
        }
        query.execute(db).await?;
        Ok(())
    }

    /// The claim's update at once, on `db` (the pool, or a batch's transaction): the lease and
    /// the run, or nothing if the run cannot be claimed now.
    async fn claim_now<'e>(
        &self,
        db: impl sqlx::PgExecutor<'e>,
        run_id: RunId,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<(Lease, ClaimedRun)>> {
        // `before` is the row as it was: a lease owner still set means the worker holding the
        // run stopped renewing (a clean pass clears it).
        let row = sqlx::query(AssertSqlSafe(format!(
            "update runs r set lease_owner = $2, lease_epoch = r.lease_epoch + 1, \
               lease_expires_at = now() + make_interval(secs => $3), wakeup_pending = false, \
               status = 'running', started_at = coalesce(r.started_at, now()), updated_at = now() \
             from (select id, lease_owner from runs where id = $1 for update) before \
             where r.id = $1 and before.id = r.id and r.status in {ACTIVE} and r.admitted and r.wake_at <= now() \
               and (r.lease_expires_at is null or r.lease_expires_at < now()) \
             returning r.lease_epoch, r.workflow, r.input, r.cancel_requested, r.cancel_reason, \
               r.parent_run_id is not null as has_parent, r.concurrency_key is not null as has_key, \
               r.started_at = now() as first_claim, now() as now, before.lease_owner is not null as recovered, \
               r.trace_context, r.started_by, r.workflow_version"
        )))
        .bind(run_id.0)
        .bind(owner)
        .bind(ttl.as_secs_f64())
        .fetch_optional(db)
        .await?;
        Ok(row.map(|row| claimed_run(&row, run_id, owner, ttl)))
    }

    /// Runs due now that no worker holds, and how long the oldest of them has waited (seconds).
    pub(crate) async fn queue_depth(&self) -> StoreResult<(i64, f64)> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "select count(*) as depth, \
               coalesce(extract(epoch from now() - min(wake_at)), 0)::float8 as lag \
             from runs where status in {ACTIVE} and admitted and wake_at <= now() \
               and (lease_expires_at is null or lease_expires_at < now())"
        )))
        .fetch_one(&self.pool)
        .await?;
        Ok((row.get("depth"), row.get("lag")))
    }

    /// Extends the lease. Returns whether cancellation was requested meanwhile.
    pub(crate) async fn renew(&self, lease: &Lease) -> StoreResult<bool> {
        sqlx::query_scalar(
            "update runs set lease_expires_at = now() + make_interval(secs => $3) \
             where id = $1 and lease_epoch = $2 returning cancel_requested",
        )
        .bind(lease.run_id.0)
        .bind(lease.epoch)
        .bind(lease.ttl_secs())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::LeaseLost(lease.run_id))
    }

    /// Gives the lease up; the run is next due at `wake_at` (never, if `None`, until an outside
    /// event). If an outside event arrived while the lease was held, the run is due now instead.
    ///
    /// Returns when the run is next due.
    pub(crate) async fn release(
        &self,
        lease: &Lease,
        wake_at: Option<DateTime<Utc>>,
        status: RunStatus,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        sqlx::query_scalar(
            "update runs set lease_owner = null, lease_expires_at = null, updated_at = now(), status = $4, \
               wake_at = case when wakeup_pending then now() else $3 end, wakeup_pending = false \
             where id = $1 and lease_epoch = $2 returning wake_at",
        )
        .bind(lease.run_id.0)
        .bind(lease.epoch)
        .bind(wake_at)
        .bind(status.as_str())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::LeaseLost(lease.run_id))
    }

    // ---------------------------------------------------------------- the journal

    /// The run's journal, in call order.
    pub(crate) async fn journal(&self, run_id: RunId) -> StoreResult<Vec<JournalEntry>> {
        Ok(sqlx::query_as(
            "select seq, name, kind, status, attempts, output, sensitive, error, error_kind, wake_at, child_run_id \
             from steps where run_id = $1 order by seq",
        )
        .bind(run_id.0)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Marks an attempt as started, so that the API shows it in flight and a worker that dies
    /// mid-step still counts the attempt.
    ///
    /// This marker is committed without waiting for the WAL flush (`synchronous_commit = off`):
    /// losing it in a PostgreSQL crash costs only the marker, never a result.
    pub(crate) async fn step_started(
        &self,
        lease: &Lease,
        seq: i32,
        name: &str,
        kind: StepKind,
        attempt: i32,
    ) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("set local synchronous_commit = off")
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query(
            "with lease as ( \
               update runs set lease_expires_at = now() + make_interval(secs => $6) \
               where id = $1 and lease_epoch = $2 returning id) \
             insert into steps (run_id, seq, name, kind, status, attempts) \
             select $1, $3, $4, $5, 'running', $7 from lease \
             on conflict (run_id, seq) do update set status = 'running', attempts = excluded.attempts, \
               wake_at = null, updated_at = now() \
             returning 1",
        )
        .bind(lease.run_id.0)
        .bind(lease.epoch)
        .bind(seq)
        .bind(name)
        .bind(kind.as_str())
        .bind(lease.ttl_secs())
        .bind(attempt)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        done.map(|_| ()).ok_or(StoreError::LeaseLost(lease.run_id))
    }

    /// Journals a step's state, fenced by the lease, in one statement (the hot path); with
    /// `renew`, the same statement renews the lease.
    ///
    /// # Fencing without a write
    /// Without `renew`, the lease is checked by locking the run's row `for share`, which
    /// conflicts with a claim's update: a claim by another worker that committed first makes
    /// the check see the new epoch and write nothing, and a claim that comes later waits for
    /// this statement to commit (the new holder then reads this entry with the journal). The
    /// run's row gets no new version, so a step costs one tuple written, not two.
    ///
    /// Returns the entry's `wake_at`.
    ///
    /// Records of many runs share a commit ([`Journal`]); this answers once its own committed.
    pub(crate) async fn record(
        &self,
        lease: &Lease,
        r: &StepRecord<'_>,
        renew: bool,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        self.writer().record(lease, r, renew).await
    }

    /// The store's group-commit writer, started on first use. (The writer's own store has no
    /// writer: it writes with the `…_now` functions.)
    fn writer(&self) -> &Journal {
        self.journal
            .get_or_init(|| Journal::start(PgStore::new(self.pool.clone())))
    }

    /// [`PgStore::record`] at once, on `db` (the pool, or a batch's transaction).
    pub(crate) async fn record_now<'e>(
        &self,
        db: impl sqlx::PgExecutor<'e>,
        lease: &Lease,
        r: &StepRecord<'_>,
        renew: bool,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        let terminal = matches!(
            r.status,
            StepStatus::Succeeded | StepStatus::Failed | StepStatus::Cancelled
        );
        let (error, error_kind) = match r.error {
            Some((kind, msg)) => (Some(msg), Some(kind)),
            None => (None, None),
        };
        let sql = if renew { RECORD_RENEWING } else { RECORD };
        let row = sqlx::query(sql)
            .bind(lease.run_id.0)
            .bind(lease.epoch)
            .bind(r.seq)
            .bind(r.name)
            .bind(r.kind.as_str())
            .bind(r.status.as_str())
            .bind(r.attempts)
            .bind(if r.sensitive { None } else { r.output })
            .bind(r.sensitive)
            .bind(error)
            .bind(error_kind)
            .bind(r.wake_in.map(|d| d.as_millis() as f64))
            .bind(lease.ttl_secs())
            .bind(terminal)
            .bind(r.event)
            .bind(r.ran_for.map(|d| d.as_secs_f64() * 1000.0))
            .fetch_one(db)
            .await?;
        if !row.get::<bool, _>("held") {
            return Err(StoreError::LeaseLost(lease.run_id));
        }
        Ok(row.get("wake_at"))
    }

    /// Completes a signal wait with the oldest buffered signal of that name, if there is one.
    ///
    /// Returns the signal's payload and who sent it. With `deadline_passed` and no signal, completes the wait
    /// with no payload (the wait timed out).
    pub(crate) async fn take_signal(
        &self,
        lease: &Lease,
        seq: i32,
        name: &str,
        deadline_passed: bool,
    ) -> StoreResult<Option<Option<(Value, String)>>> {
        let mut tx = self.pool.begin().await?;
        lock_leased(&mut tx, lease).await?;
        let signal = sqlx::query(
            "update signals set consumed_seq = $2 where id = ( \
               select id from signals where run_id = $1 and name = $3 and consumed_seq is null order by id limit 1) \
             returning payload, sent_by",
        )
        .bind(lease.run_id.0)
        .bind(seq)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let received: Option<(Value, String)> = signal.map(|r| (r.get("payload"), r.get("sent_by")));
        if received.is_none() && !deadline_passed {
            tx.rollback().await?;
            return Ok(None);
        }
        let (payload, sent_by) = match &received {
            Some((payload, by)) => (Some(payload), Some(by)),
            None => (None, None),
        };
        // Who sent it is journaled with it: an approval counts as its authenticated sender.
        let output = json!({ "payload": payload, "timed_out": payload.is_none(), "sent_by": sent_by });
        sqlx::query(
            "update steps set status = 'succeeded', output = $3, finished_at = now(), updated_at = now(), attempts = 1 \
             where run_id = $1 and seq = $2",
        )
        .bind(lease.run_id.0)
        .bind(seq)
        .bind(&output)
        .execute(&mut *tx)
        .await?;
        insert_event(
            &mut tx,
            lease.run_id,
            if payload.is_some() {
                "signal_received"
            } else {
                "signal_timed_out"
            },
            json!({ "name": name, "seq": seq }),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(received))
    }

    /// Creates a child run and journals the `child` entry that points to it, atomically.
    pub(crate) async fn start_child(
        &self,
        lease: &Lease,
        seq: i32,
        name: &str,
        req: &StartRun,
        version: u32,
    ) -> StoreResult<RunId> {
        // Fenced like every write of a pass: a worker that lost its lease creates no child.
        // The child and the entry that points to it commit together.
        let mut tx = self.pool.begin().await?;
        lock_leased(&mut tx, lease).await?;
        let (started, _) = create_run_in(&mut tx, RunId::new(), req, version, Some((lease.run_id, seq))).await?;
        sqlx::query(
            "insert into steps (run_id, seq, name, kind, status, attempts, child_run_id) \
             values ($1, $2, $3, 'child', 'waiting', 1, $4)",
        )
        .bind(lease.run_id.0)
        .bind(seq)
        .bind(name)
        .bind(started.id.0)
        .execute(&mut *tx)
        .await?;
        let orphans = sqlx::query(AssertSqlSafe(format!(
            "update runs set cancel_requested = true, cancel_reason = 'orphaned child', wake_at = now(), \
               wakeup_pending = true \
             where parent_run_id = $1 and parent_seq = $2 and id <> $3 and status in {ACTIVE} returning id"
        )))
        .bind(lease.run_id.0)
        .bind(seq)
        .bind(started.id.0)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        crate::core::metrics::metrics().run_started(&req.workflow, req.started_by.as_deref().unwrap_or("api"));
        if !orphans.is_empty() {
            tracing::warn!(run_id = %lease.run_id, seq, count = orphans.len(), "Cancelled orphaned child runs.");
        }
        Ok(started.id)
    }

    /// Why the run was cancelled.
    pub(crate) async fn cancel_reason(&self, id: RunId) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar("select cancel_reason from runs where id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .flatten())
    }

    /// The status, output and error of a run (for a parent waiting on its child).
    pub(crate) async fn run_outcome(&self, id: RunId) -> StoreResult<(RunStatus, Option<Value>, Option<String>)> {
        let row = sqlx::query("select status, output, error from runs where id = $1")
            .bind(id.0)
            .fetch_one(&self.pool)
            .await?;
        Ok((
            row.get::<String, _>("status")
                .parse()
                .map_err(|e: UnknownVariant| StoreError::Corrupt(e.0))?,
            row.get("output"),
            row.get("error"),
        ))
    }

    /// Ends the run. Returns the runs that are now due: the parent waiting on it, and the next
    /// run admitted under its concurrency key.
    pub(crate) async fn finish(
        &self,
        lease: &Lease,
        outcome: &Outcome,
        has_parent: bool,
        has_concurrency_key: bool,
    ) -> StoreResult<Vec<RunId>> {
        let detail = json!({ "status": outcome.status, "error": outcome.error });
        if !has_parent && !has_concurrency_key {
            // The common case in one statement, sharing a commit with other runs' writes
            // ([`Journal`]); its `run_finished` event is the run's row itself
            // ([`PgStore::events`]).
            self.writer().finish(lease, outcome).await?;
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(FINISH)
            .bind(lease.run_id.0)
            .bind(lease.epoch)
            .bind(outcome.status.as_str())
            .bind(&outcome.output)
            .bind(&outcome.error)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::LeaseLost(lease.run_id))?;
        insert_event(&mut tx, lease.run_id, "run_finished", detail).await?;
        let mut due = Vec::new();
        if let Some(parent) = row.get::<Option<Uuid>, _>("parent_run_id") {
            due.extend(wake(&mut tx, RunId(parent)).await?);
        }
        if let Some(key) = row.get::<Option<String>, _>("concurrency_key") {
            let limit: Option<i32> = row.get("concurrency_limit");
            due.extend(admit(&mut tx, &key, limit.unwrap_or(1)).await?);
        }
        tx.commit().await?;
        Ok(due)
    }

    /// The common finish at once, on `db` (the pool, or a batch's transaction).
    async fn finish_now<'e>(db: impl sqlx::PgExecutor<'e>, lease: &Lease, outcome: &Outcome) -> StoreResult<()> {
        sqlx::query(FINISH)
            .bind(lease.run_id.0)
            .bind(lease.epoch)
            .bind(outcome.status.as_str())
            .bind(&outcome.output)
            .bind(&outcome.error)
            .fetch_optional(db)
            .await?
            .map(|_| ())
            .ok_or(StoreError::LeaseLost(lease.run_id))
    }

    /// For each value of input field `field` among the succeeded runs of `workflow`, when the
    /// last of them finished.
    pub(crate) async fn last_successes(
        &self,
        workflow: &str,
        field: &str,
    ) -> StoreResult<Vec<(String, DateTime<Utc>)>> {
        let rows = sqlx::query_as(
            "select input->>$2, max(finished_at) from runs \
             where workflow = $1 and status = 'succeeded' and input->>$2 is not null group by 1 order by 1",
        )
        .bind(workflow)
        .bind(field)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    // ---------------------------------------------------------------- outside events

    /// Requests cancellation of a run and its active children.
    ///
    /// Returns `None` if the run does not exist, else its status after the request and the runs
    /// that are now due.
    pub(crate) async fn cancel(
        &self,
        id: RunId,
        reason: &str,
        by: &str,
    ) -> StoreResult<Option<(RunStatus, Vec<RunId>)>> {
        let mut tx = self.pool.begin().await?;
        let Some(status) = sqlx::query_scalar::<_, String>("select status from runs where id = $1 for update")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let due = request_cancel(&mut tx, id, reason, by).await?;
        let status = sqlx::query_scalar::<_, String>("select status from runs where id = $1")
            .bind(id.0)
            .fetch_one(&mut *tx)
            .await
            .unwrap_or(status);
        tx.commit().await?;
        Ok(Some((
            status.parse().map_err(|e: UnknownVariant| StoreError::Corrupt(e.0))?,
            due,
        )))
    }

    /// Buffers a signal for the run and wakes it. `Err(status)` if the run is over.
    pub(crate) async fn signal(
        &self,
        id: RunId,
        name: &str,
        payload: &Value,
        by: &str,
    ) -> StoreResult<Option<Result<Vec<RunId>, RunStatus>>> {
        let mut tx = self.pool.begin().await?;
        let Some(status) = sqlx::query_scalar::<_, String>("select status from runs where id = $1 for update")
            .bind(id.0)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(None);
        };
        let status: RunStatus = status.parse().map_err(|e: UnknownVariant| StoreError::Corrupt(e.0))?;
        if status.is_terminal() {
            return Ok(Some(Err(status)));
        }
        sqlx::query("insert into signals (run_id, name, payload, sent_by) values ($1, $2, $3, $4)")
            .bind(id.0)
            .bind(name)
            .bind(payload)
            .bind(by)
            .execute(&mut *tx)
            .await?;
        insert_event(&mut tx, id, "signal_sent", json!({ "name": name, "by": by })).await?;
        let due = wake(&mut tx, id).await?;
        tx.commit().await?;
        Ok(Some(Ok(due)))
    }

    /// Sends signal `name` with its payload to each of these runs that has not ended, in one
    /// statement (a storm's resolutions): how many were sent, and the runs now due.
    pub(crate) async fn signal_many(
        &self,
        signals: &[(RunId, Value)],
        name: &str,
        by: &str,
    ) -> StoreResult<(usize, Vec<RunId>)> {
        if signals.is_empty() {
            return Ok((0, Vec::new()));
        }
        let ids: Vec<Uuid> = signals.iter().map(|(id, _)| id.0).collect();
        let payloads: Vec<&Value> = signals.iter().map(|(_, p)| p).collect();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "with active as ( \
               select id from runs where id = any($1) and status in {ACTIVE} order by id for update), \
             sent as ( \
               insert into signals (run_id, name, payload, sent_by) \
               select t.run_id, $3, t.payload, $4 from unnest($1::uuid[], $2::jsonb[]) as t(run_id, payload) \
               where t.run_id in (select id from active) returning run_id), \
             noted as ( \
               insert into run_events (run_id, kind, detail) \
               select run_id, 'signal_sent', jsonb_build_object('name', $3::text, 'by', $4::text) from sent) \
             update runs r set wake_at = now(), wakeup_pending = true, updated_at = now() \
             where r.id in (select id from active) returning r.id, r.admitted"
        )))
        .bind(&ids)
        .bind(&payloads)
        .bind(name)
        .bind(by)
        .fetch_all(&self.pool)
        .await?;
        let sent = rows.len();
        let due = rows
            .into_iter()
            .filter(|r| r.get::<bool, _>("admitted"))
            .map(|r| RunId(r.get("id")))
            .collect();
        Ok((sent, due))
    }

    /// Runs that have been due for longer than `grace` and are not held by a live lease: what
    /// the sweeper re-enqueues. The grace leaves alone runs whose wake-up is simply still in
    /// the queue, so a backlog does not turn into duplicate jobs.
    pub(crate) async fn due_runs(&self, grace: Duration, limit: i64) -> StoreResult<Vec<RunId>> {
        let ids: Vec<Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
            "select id from runs where status in {ACTIVE} and admitted \
             and wake_at <= now() - make_interval(secs => $2) \
             and (lease_expires_at is null or lease_expires_at < now()) order by wake_at limit $1"
        )))
        .bind(limit)
        .bind(grace.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.into_iter().map(RunId).collect())
    }

    // ---------------------------------------------------------------- reads for the API

    /// One run with its steps.
    pub async fn get_run(&self, id: RunId) -> StoreResult<Option<RunView>> {
        // Two statements on two connections at once: a waiting reader's answer costs one
        // round trip of latency.
        let run = sqlx::query_as::<_, RunRow>(AssertSqlSafe(format!("select {RUN_COLUMNS} from runs where id = $1")))
            .bind(id.0)
            .fetch_optional(&self.pool);
        let (row, steps) = tokio::try_join!(async { run.await.map_err(StoreError::from) }, self.steps(id))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut view = row.into_view()?;
        view.steps = steps;
        Ok(Some(view))
    }

    /// The steps of run `id`, each with its failed attempts, in one statement.
    async fn steps(&self, id: RunId) -> StoreResult<Vec<StepView>> {
        let rows = sqlx::query(
            "with failed as ( \
               select seq, json_agg(json_build_object('attempt', coalesce(attempt, 0), 'at', at, \
                                                      'error', coalesce(detail->>'error', '')) order by id) as errors \
               from run_events where run_id = $1 and kind = 'step_attempt_failed' group by seq) \
             select s.seq, s.name, s.kind, s.status, s.attempts, s.sensitive, s.output, s.error, s.child_run_id, \
               s.wake_at, s.started_at, s.finished_at, \
               (extract(epoch from (s.finished_at - s.started_at)) * 1000)::bigint as ms, failed.errors \
             from steps s left join failed on failed.seq = s.seq where s.run_id = $1 order by s.seq",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        let corrupt = |e: UnknownVariant| StoreError::Corrupt(e.0);
        let mut steps = Vec::with_capacity(rows.len());
        for r in rows {
            let errors: Option<sqlx::types::Json<Vec<AttemptError>>> = r.get("errors");
            steps.push(StepView {
                seq: r.get("seq"),
                name: r.get("name"),
                kind: r.get::<String, _>("kind").parse().map_err(corrupt)?,
                status: r.get::<String, _>("status").parse().map_err(corrupt)?,
                attempts: r.get("attempts"),
                sensitive: r.get("sensitive"),
                output: r.get("output"),
                last_error: r.get("error"),
                errors: errors.map(|e| e.0).unwrap_or_default(),
                child_run_id: r.get::<Option<Uuid>, _>("child_run_id").map(RunId),
                wake_at: r.get("wake_at"),
                started_at: r.get("started_at"),
                finished_at: r.get("finished_at"),
                duration_ms: r.get("ms"),
            });
        }
        Ok(steps)
    }

    /// Runs, newest first.
    pub async fn list_runs(&self, filter: &RunFilter) -> StoreResult<Vec<RunView>> {
        let rows = sqlx::query_as::<_, RunRow>(AssertSqlSafe(format!(
            "select {RUN_COLUMNS} from runs where ($1::text is null or status = $1) \
             and ($2::text is null or workflow = $2) \
             and ($4::text is null or started_by = $4 or started_by like $4 || ':%') \
             and ($5::timestamptz is null or created_at >= $5) \
             and ($6::timestamptz is null or created_at < $6) \
             and ($7::uuid is null or (created_at, id) < (select created_at, id from runs where id = $7)) \
             order by created_at desc, id desc limit $3"
        )))
        .bind(filter.status.map(|s| s.as_str()))
        .bind(&filter.workflow)
        .bind(filter.limit.unwrap_or(50).clamp(1, 1000) as i64)
        .bind(&filter.trigger)
        .bind(filter.since)
        .bind(filter.until)
        .bind(filter.before.map(|b| b.0))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(RunRow::into_view).collect()
    }

    /// The run's history, oldest first.
    ///
    /// A run's start and end are its row's `created_at` and `finished_at`: the common paths
    /// write no `run_created`/`run_finished` event (a tuple each per run), and this reads them
    /// from the row, unless a path that has more to say (a note, a key) stored them.
    pub async fn events(&self, id: RunId) -> StoreResult<Vec<Value>> {
        let rows = sqlx::query(
            "with stored as (select * from run_events where run_id = $1), \
             history as ( \
               select 0 as part, 0::bigint as id, created_at as at, 'run_created' as kind, null::int as seq, \
                      null::text as step, null::int as attempt, \
                      jsonb_build_object('started_by', started_by, 'workflow', workflow) as detail \
               from runs where id = $1 and not exists (select 1 from stored where kind = 'run_created') \
               union all \
               select 1, id, at, kind, seq, step, attempt, detail from stored \
               union all \
               select 2, 0, finished_at, 'run_finished', null, null, null, \
                      jsonb_build_object('status', status, 'error', error) \
               from runs where id = $1 and finished_at is not null \
                 and not exists (select 1 from stored where kind = 'run_finished')) \
             select jsonb_build_object('at', at, 'kind', kind, 'seq', seq, 'step', step, 'attempt', attempt, \
               'detail', detail) as e from history order by part, id",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|r| r.get("e")).collect())
    }
}

/// Locks the run row and checks that the lease is still ours.
/// Creates a run in `tx`, honouring its idempotency key and concurrency key; what the caller
/// sees and the runs that are due once `tx` commits.
pub(crate) async fn create_run_in(
    tx: &mut Transaction<'_, Postgres>,
    id: RunId,
    req: &StartRun,
    version: u32,
    parent: Option<(RunId, i32)>,
) -> StoreResult<(Started, Vec<RunId>)> {
    let started_by = req.started_by.clone().unwrap_or_else(|| "api".to_string());

    if let Some(key) = &req.idempotency_key {
        // Serialises starts with one key: the second waits for the first to commit, then
        // finds its run below (two replicas firing one tick, a forge's push+create pair).
        sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 1))")
            .bind(key)
            .execute(&mut **tx)
            .await?;
    }
    if let Some(key) = &req.idempotency_key
        && let Some(row) = sqlx::query("select id, status, workflow from runs where idempotency_key = $1")
            .bind(key)
            .fetch_optional(&mut **tx)
            .await?
    {
        let workflow: String = row.get("workflow");
        if workflow != req.workflow {
            return Err(StoreError::Conflict(format!(
                "idempotency key '{key}' was already used to start workflow '{workflow}'"
            )));
        }
        return Ok((
            Started {
                id: RunId(row.get("id")),
                status: row
                    .get::<String, _>("status")
                    .parse()
                    .map_err(|e: UnknownVariant| StoreError::Corrupt(e.0))?,
                created: false,
                note: Some(format!(
                    "idempotency key '{key}' was used before; this is the first run"
                )),
            },
            Vec::new(),
        ));
    }

    let mut note = None;
    let mut status = RunStatus::Pending;
    let mut due = Vec::new();
    if let Some(c) = &req.concurrency {
        // Serialises starts and finishes per key, so that the counts below stay true.
        sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(&c.key)
            .execute(&mut **tx)
            .await?;
        let holders: Vec<Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
            "select id from runs where concurrency_key = $1 and admitted and status in {ACTIVE} order by created_at"
        )))
        .bind(&c.key)
        .fetch_all(&mut **tx)
        .await?;
        let full = holders.len() as u32 >= c.limit.max(1);
        let holder = holders.first().map(|h| h.to_string()).unwrap_or_default();
        match c.policy {
            ConcurrencyPolicy::Skip if full => {
                status = RunStatus::Cancelled;
                note = Some(format!(
                    "skipped: concurrency key '{}' is at its limit of {} (held by run {holder})",
                    c.key, c.limit
                ));
            }
            ConcurrencyPolicy::CancelOlder => {
                let older: Vec<Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
                    "select id from runs where concurrency_key = $1 and status in {ACTIVE}"
                )))
                .bind(&c.key)
                .fetch_all(&mut **tx)
                .await?;
                for o in older {
                    let reason = format!("cancelled by newer run {id} (concurrency key '{}')", c.key);
                    due.extend(request_cancel(tx, RunId(o), &reason, "concurrency").await?);
                }
            }
            ConcurrencyPolicy::LatestWins => {
                let superseded = sqlx::query(AssertSqlSafe(format!(
                    "update runs set status = 'cancelled', finished_at = now(), updated_at = now(), \
                         error = 'superseded by newer run ' || $2::text, wake_at = null \
                         where concurrency_key = $1 and not admitted and status in {ACTIVE} returning id"
                )))
                .bind(&c.key)
                .bind(id.to_string())
                .fetch_all(&mut **tx)
                .await?;
                for row in superseded {
                    insert_event(tx, RunId(row.get("id")), "run_superseded", json!({ "by": id })).await?;
                }
            }
            _ => {}
        }
        if status == RunStatus::Pending && full {
            note = Some(format!("queued: concurrency key '{}' is held by run {holder}", c.key));
        }
    }

    let (error, finished) = match status {
        RunStatus::Cancelled => (note.clone(), true),
        _ => (None, false),
    };
    sqlx::query(
            "insert into runs (id, workflow, workflow_version, input, status, started_by, idempotency_key, \
             concurrency_key, concurrency_limit, admitted, parent_run_id, parent_seq, wake_at, error, finished_at, trace_context) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
                     case when $10 and $5 = 'pending' then now() end, $13, case when $14 then now() end, $15)",
        )
        .bind(id.0)
        .bind(&req.workflow)
        .bind(version as i32)
        .bind(&req.input)
        .bind(status.as_str())
        .bind(&started_by)
        .bind(&req.idempotency_key)
        .bind(req.concurrency.as_ref().map(|c| c.key.clone()))
        .bind(req.concurrency.as_ref().map(|c| c.limit.max(1) as i32))
        .bind(req.concurrency.is_none())
        .bind(parent.map(|p| p.0.0))
        .bind(parent.map(|p| p.1))
        .bind(error)
        .bind(finished)
        .bind(&req.trace_context)
        .execute(&mut **tx)
        .await?;
    insert_event(
        tx,
        id,
        "run_created",
        json!({ "started_by": started_by, "workflow": req.workflow, "note": note }),
    )
    .await?;
    match &req.concurrency {
        Some(c) if status == RunStatus::Pending => due.extend(admit(tx, &c.key, c.limit.max(1) as i32).await?),
        None => due.push(id),
        _ => {}
    }
    if due.contains(&id) {
        note = None;
    }
    Ok((
        Started {
            id,
            status,
            created: true,
            note,
        },
        due,
    ))
}

/// Many runs started in `tx` at once: a run is created for each request whose idempotency key
/// has none yet, and the earlier run returned (`created: false`) for the others; `Conflict` for
/// a key that started another workflow. For requests without a concurrency key or a parent
/// (a trigger's starts), in two statements whatever their number.
///
/// The caller serialises starts under these keys (the Alertmanager intake holds its route's
/// lock, and only it makes `alert:` keys): no advisory lock per key is taken, as thousands of
/// them would fill PostgreSQL's lock table.
pub(crate) async fn create_runs_in(
    tx: &mut Transaction<'_, Postgres>,
    reqs: &[(&StartRun, u32)],
) -> StoreResult<Vec<StoreResult<Started>>> {
    debug_assert!(reqs.iter().all(|(r, _)| r.concurrency.is_none()));
    let keys: Vec<&str> = reqs.iter().filter_map(|(r, _)| r.idempotency_key.as_deref()).collect();
    let mut earlier = std::collections::HashMap::new();
    if !keys.is_empty() {
        let rows =
            sqlx::query("select idempotency_key, id, status, workflow from runs where idempotency_key = any($1)")
                .bind(&keys)
                .fetch_all(&mut **tx)
                .await?;
        for r in rows {
            let key: String = r.get("idempotency_key");
            earlier.insert(
                key,
                (
                    r.get::<Uuid, _>("id"),
                    r.get::<String, _>("status"),
                    r.get::<String, _>("workflow"),
                ),
            );
        }
    }
    let mut out = Vec::with_capacity(reqs.len());
    let (mut ids, mut workflows, mut versions, mut inputs, mut by, mut new_keys, mut traces): (
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
    ) = Default::default();
    for (req, version) in reqs {
        let key = req.idempotency_key.as_deref();
        if let Some((id, status, workflow)) = key.and_then(|k| earlier.get(k)) {
            let key = key.unwrap_or_default();
            out.push(if *workflow != req.workflow {
                Err(StoreError::Conflict(format!(
                    "idempotency key '{key}' was already used to start workflow '{workflow}'"
                )))
            } else {
                status
                    .parse()
                    .map_err(|e: UnknownVariant| StoreError::Corrupt(e.0))
                    .map(|status| Started {
                        id: RunId(*id),
                        status,
                        created: false,
                        note: Some(format!(
                            "idempotency key '{key}' was used before; this is the first run"
                        )),
                    })
            });
            continue;
        }
        let id = RunId::new();
        ids.push(id.0);
        workflows.push(req.workflow.as_str());
        versions.push(*version as i32);
        inputs.push(req.input.clone());
        by.push(req.started_by.as_deref().unwrap_or("api"));
        new_keys.push(key);
        traces.push(req.trace_context.as_deref());
        out.push(Ok(Started {
            id,
            status: RunStatus::Pending,
            created: true,
            note: None,
        }));
    }
    if !ids.is_empty() {
        // Their `run_created` events are the rows themselves ([`PgStore::events`]).
        sqlx::query(
            "insert into runs (id, workflow, workflow_version, input, started_by, idempotency_key, trace_context, wake_at) \
             select id, workflow, version, input, started_by, key, trace, now() \
             from unnest($1::uuid[], $2::text[], $3::int[], $4::jsonb[], $5::text[], $6::text[], $7::text[]) \
               as t(id, workflow, version, input, started_by, key, trace)",
        )
        .bind(&ids)
        .bind(&workflows)
        .bind(&versions)
        .bind(&inputs)
        .bind(&by)
        .bind(&new_keys)
        .bind(&traces)
        .execute(&mut **tx)
        .await?;
    }
    Ok(out)
}

async fn lock_leased(tx: &mut Transaction<'_, Postgres>, lease: &Lease) -> StoreResult<()> {
    sqlx::query(
        "update runs set lease_expires_at = now() + make_interval(secs => $3), updated_at = now() \
         where id = $1 and lease_epoch = $2 returning 1",
    )
    .bind(lease.run_id.0)
    .bind(lease.epoch)
    .bind(lease.ttl_secs())
    .fetch_optional(&mut **tx)
    .await?
    .map(|_| ())
    .ok_or(StoreError::LeaseLost(lease.run_id))
}

async fn insert_event(tx: &mut Transaction<'_, Postgres>, id: RunId, kind: &str, detail: Value) -> StoreResult<()> {
    sqlx::query("insert into run_events (run_id, kind, detail) values ($1, $2, $3)")
        .bind(id.0)
        .bind(kind)
        .bind(detail)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Makes an active run due now, or notes the wake-up for the worker holding it.
async fn wake(tx: &mut Transaction<'_, Postgres>, id: RunId) -> StoreResult<Vec<RunId>> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "update runs set wake_at = now(), wakeup_pending = true, updated_at = now() \
         where id = $1 and status in {ACTIVE} returning admitted"
    )))
    .bind(id.0)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|r| r.get::<bool, _>("admitted"))
        .map(|_| id)
        .collect())
}

/// Admits queued runs under `key` while there is room. Caller holds no advisory lock yet.
async fn admit(tx: &mut Transaction<'_, Postgres>, key: &str, limit: i32) -> StoreResult<Vec<RunId>> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(key)
        .execute(&mut **tx)
        .await?;
    let ids: Vec<Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
        "update runs set admitted = true, wake_at = now(), updated_at = now() where id in ( \
           select id from runs where concurrency_key = $1 and not admitted and status = 'pending' \
           order by created_at limit greatest(0, $2 - ( \
             select count(*) from runs where concurrency_key = $1 and admitted and status in {ACTIVE}))) \
         returning id"
    )))
    .bind(key)
    .bind(limit as i64)
    .fetch_all(&mut **tx)
    .await?;
    for id in &ids {
        insert_event(tx, RunId(*id), "run_admitted", json!({ "concurrency_key": key })).await?;
    }
    Ok(ids.into_iter().map(RunId).collect())
}

/// Flags a run (and its active children) for cancellation and wakes it. A run that never got
/// a slot under its concurrency key, or never started, ends at once.
fn request_cancel<'a>(
    tx: &'a mut Transaction<'_, Postgres>,
    id: RunId,
    reason: &'a str,
    by: &'a str,
) -> futures::future::BoxFuture<'a, StoreResult<Vec<RunId>>> {
    Box::pin(async move {
        let mut due = Vec::new();
        let ended = sqlx::query(
            "update runs set status = 'cancelled', cancel_requested = true, cancel_reason = $2, error = $2, \
               finished_at = now(), updated_at = now(), wake_at = null \
             where id = $1 and status = 'pending' and started_at is null and lease_owner is null \
             returning concurrency_key, concurrency_limit, parent_run_id",
        )
        .bind(id.0)
        .bind(reason)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(row) = ended {
            insert_event(tx, id, "run_cancelled", json!({ "reason": reason, "by": by })).await?;
            if let Some(parent) = row.get::<Option<Uuid>, _>("parent_run_id") {
                due.extend(wake(tx, RunId(parent)).await?);
            }
            if let Some(key) = row.get::<Option<String>, _>("concurrency_key") {
                let limit: Option<i32> = row.get("concurrency_limit");
                due.extend(admit(tx, &key, limit.unwrap_or(1)).await?);
            }
            return Ok(due);
        }
        let flagged = sqlx::query(AssertSqlSafe(format!(
            "update runs set cancel_requested = true, cancel_reason = coalesce(cancel_reason, $2), \
               wake_at = now(), wakeup_pending = true, updated_at = now() \
             where id = $1 and status in {ACTIVE} and not cancel_requested returning admitted"
        )))
        .bind(id.0)
        .bind(reason)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(row) = flagged {
            insert_event(tx, id, "cancel_requested", json!({ "reason": reason, "by": by })).await?;
            sqlx::query("select pg_notify($1, $2)")
                .bind(CANCEL_CHANNEL)
                .bind(id.to_string())
                .execute(&mut **tx)
                .await?;
            if row.get::<bool, _>("admitted") {
                due.push(id);
            }
            let children: Vec<Uuid> = sqlx::query_scalar(AssertSqlSafe(format!(
                "select id from runs where parent_run_id = $1 and status in {ACTIVE}"
            )))
            .bind(id.0)
            .fetch_all(&mut **tx)
            .await?;
            for child in children {
                due.extend(request_cancel(tx, RunId(child), "parent run cancelled", by).await?);
            }
        }
        Ok(due)
    })
}

// ---------------------------------------------------------------- group commit (the journal writer)
//
// Group commit: the writes of many runs, in one transaction.
//
// # Design notes
// A worker advancing 32 runs at once journals a step of each every few milliseconds, and each
// write used to be a commit of its own: on a machine where PostgreSQL shares the CPU, the
// commits are what sets the ceiling. Here the hot writes of a process go to one writer per
// store: step records (`PgStore::record`), claims (`PgStore::claim`), the common start
// (`PgStore::create_run` without idempotency or concurrency key: an API start under load) and
// the common end (`PgStore::finish` without parent or concurrency key). The writer writes
// *what queued while the last commit ran*: no batching window, so a lone write (one run at a
// time) waits for nothing but its own statement, and a busy process's writes share commits.
// Within a batch, each kind of write is one statement however many there are (the plain
// records, the claims, the ends, the starts: `unnest` of their fields), so a batch costs a
// handful of round trips rather than one per write: the batch's time is what the next batch
// waits for.
//
// # Guarantees
// - A write is answered only after the transaction holding it committed: a run's next step
//   starts only once its own record is durable, a claim's lease is held only once committed,
//   a start is answered only once the run is stored — exactly as with one commit per write.
// - Each write keeps its own fencing (the lease check or the claim's condition in its own
//   statement); one whose lease is lost writes nothing and is answered `LeaseLost` (a claim
//   that finds the run not claimable answers nothing to claim), the others commit.
// - A batch that fails as a whole (one record PostgreSQL refuses, a lost connection) is
//   written again one record at a time, so that a record only ever fails for its own reason.
// - Each statement of a batch takes its runs' row locks in run order; a run has at most one
//   write in a batch (each run awaits its last), so two batches cross locks only over a run
//   one of them no longer holds (a duplicate job). A batch that waits for a lock longer than
//   `BATCH_LOCK_TIMEOUT` (or that PostgreSQL's deadlock detection fails) is written again
//   write by write, so one run's lock never holds up the others for long.

use tokio::sync::{Semaphore, mpsc, oneshot};

/// Batches in flight at once. One: while it commits, the next batch gathers, which is what
/// makes batches (measured: 4 writers wrote 384 records of 16 busy runs in 348 transactions,
/// 2 in 190, 1 in 95).
const WRITERS: usize = 1;
/// How long a batch waits for a row lock (a claim, a cancellation holding a run's row) before
/// it gives up and its records are written one by one, each waiting only for its own run.
const BATCH_LOCK_TIMEOUT: &str = "1s";
/// The most records in one transaction.
const MAX_BATCH: usize = 128;

/// A record as the writer holds it (owned: it crosses a channel).
struct Pending {
    lease: Lease,
    seq: i32,
    name: String,
    kind: StepKind,
    status: StepStatus,
    attempts: i32,
    output: Option<Value>,
    sensitive: bool,
    error: Option<(String, String)>,
    wake_in: Option<Duration>,
    event: Option<String>,
    ran_for: Option<Duration>,
    renew: bool,
    reply: oneshot::Sender<StoreResult<Option<DateTime<Utc>>>>,
}

impl Pending {
    fn record(&self) -> StepRecord<'_> {
        StepRecord {
            seq: self.seq,
            name: &self.name,
            kind: self.kind,
            status: self.status,
            attempts: self.attempts,
            output: self.output.as_ref(),
            sensitive: self.sensitive,
            error: self.error.as_ref().map(|(k, m)| (k.as_str(), m.as_str())),
            wake_in: self.wake_in,
            event: self.event.as_deref(),
            ran_for: self.ran_for,
        }
    }
}

/// A run to create, the common way ([`PgStore::create_now`]).
struct Create {
    id: RunId,
    req: StartRun,
    version: u32,
    parent: Option<(RunId, i32)>,
    audit: Option<AuditEntry>,
}

/// What the writer writes: a step record, the common start of a run (no idempotency or
/// concurrency key), a claim, or the common end of a run (no parent to wake, no concurrency
/// key to hand on).
enum Write {
    Record(Pending),
    Create {
        create: Create,
        reply: oneshot::Sender<StoreResult<()>>,
    },
    Claim {
        run_id: RunId,
        owner: String,
        ttl: Duration,
        reply: oneshot::Sender<StoreResult<Option<(Lease, ClaimedRun)>>>,
    },
    Finish {
        lease: Lease,
        outcome: Outcome,
        reply: oneshot::Sender<StoreResult<()>>,
    },
}

/// What a write answers, until it is sent back.
enum Answer {
    Record(StoreResult<Option<DateTime<Utc>>>),
    Create(StoreResult<()>),
    Claim(StoreResult<Option<(Lease, ClaimedRun)>>),
    Finish(StoreResult<()>),
}

impl Write {
    /// The run it writes, and an order among the writes of one run.
    fn order(&self) -> (Uuid, i32) {
        match self {
            Self::Create { create, .. } => (create.id.0, i32::MIN),
            Self::Claim { run_id, .. } => (run_id.0, i32::MIN),
            Self::Record(p) => (p.lease.run_id.0, p.seq),
            Self::Finish { lease, .. } => (lease.run_id.0, i32::MAX),
        }
    }

    /// Writes it on `db`. `Err` only for an error that fails a batch: a lost lease is an answer.
    async fn write<'e>(&self, store: &PgStore, db: impl sqlx::PgExecutor<'e>) -> Result<Answer, StoreError> {
        let answer = match self {
            Self::Record(p) => Answer::Record(store.record_now(db, &p.lease, &p.record(), p.renew).await),
            Self::Create { create, .. } => Answer::Create(PgStore::create_now(db, create).await),
            Self::Claim { run_id, owner, ttl, .. } => Answer::Claim(store.claim_now(db, *run_id, owner, *ttl).await),
            Self::Finish { lease, outcome, .. } => Answer::Finish(PgStore::finish_now(db, lease, outcome).await),
        };
        match answer {
            Answer::Record(Err(e @ StoreError::Db(_)))
            | Answer::Create(Err(e @ StoreError::Db(_)))
            | Answer::Claim(Err(e @ StoreError::Db(_)))
            | Answer::Finish(Err(e @ StoreError::Db(_))) => Err(e),
            answer => Ok(answer),
        }
    }

    /// Sends `answer` back (an error for every write when the batch failed).
    fn reply(self, answer: Result<Answer, StoreError>) {
        match (self, answer) {
            (Self::Record(p), Ok(Answer::Record(r))) => drop(p.reply.send(r)),
            (Self::Create { reply, .. }, Ok(Answer::Create(r))) => drop(reply.send(r)),
            (Self::Create { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
            (Self::Claim { reply, .. }, Ok(Answer::Claim(r))) => drop(reply.send(r)),
            (Self::Finish { reply, .. }, Ok(Answer::Finish(r))) => drop(reply.send(r)),
            (Self::Record(p), Err(e)) => drop(p.reply.send(Err(e))),
            (Self::Claim { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
            (Self::Finish { reply, .. }, Err(e)) => drop(reply.send(Err(e))),
            (_, Ok(_)) => unreachable!("each write is answered in its own kind"),
        }
    }
}

/// The handle on a store's writer; the writer stops when every handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct Journal {
    queue: mpsc::UnboundedSender<Write>,
}

/// The error of a writer that is gone (its runtime ended).
fn writer_gone() -> StoreError {
    StoreError::Db(sqlx::Error::PoolClosed)
}

impl Journal {
    /// Starts the writer of `store` (on the current Tokio runtime).
    pub(crate) fn start(store: PgStore) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(store, rx));
        Self { queue }
    }

    /// Journals `r` with its lease check (see [`PgStore::record_now`]); answers once committed.
    pub(crate) async fn record(
        &self,
        lease: &Lease,
        r: &StepRecord<'_>,
        renew: bool,
    ) -> StoreResult<Option<DateTime<Utc>>> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            lease: lease.clone(),
            seq: r.seq,
            name: r.name.to_string(),
            kind: r.kind,
            status: r.status,
            attempts: r.attempts,
            output: if r.sensitive { None } else { r.output.cloned() },
            sensitive: r.sensitive,
            error: r.error.map(|(k, m)| (k.to_string(), m.to_string())),
            wake_in: r.wake_in,
            event: r.event.map(str::to_string),
            ran_for: r.ran_for,
            renew,
            reply,
        };
        self.queue.send(Write::Record(pending)).map_err(|_| writer_gone())?;
        // The writer answers every write it took; a dropped answer means its runtime is gone.
        answer.await.map_err(|_| writer_gone())?
    }

    /// Creates a run (see [`PgStore::create_now`]); answers once committed.
    async fn create(&self, create: Create) -> StoreResult<()> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Write::Create { create, reply })
            .map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// Claims `run_id` (see [`PgStore::claim_now`]); answers once committed.
    pub(crate) async fn claim(
        &self,
        run_id: RunId,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<(Lease, ClaimedRun)>> {
        let (reply, answer) = oneshot::channel();
        let write = Write::Claim {
            run_id,
            owner: owner.to_string(),
            ttl,
            reply,
        };
        self.queue.send(write).map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// Ends the run of `lease` (see [`PgStore::finish_now`]); answers once committed.
    pub(crate) async fn finish(&self, lease: &Lease, outcome: &Outcome) -> StoreResult<()> {
        let (reply, answer) = oneshot::channel();
        let write = Write::Finish {
            lease: lease.clone(),
            outcome: outcome.clone(),
            reply,
        };
        self.queue.send(write).map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }
}

/// The writer: takes what queued, writes it as one transaction, [`WRITERS`] at once.
async fn write_batches(store: PgStore, mut rx: mpsc::UnboundedReceiver<Write>) {
    let writers = std::sync::Arc::new(Semaphore::new(WRITERS));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = writers.clone().acquire_owned().await else {
            return;
        };
        // Taken after a writer is free: whatever queued while the others committed joins.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let store = store.clone();
        tokio::spawn(async move {
            write(&store, batch).await;
            drop(permit);
        });
    }
}

async fn write(store: &PgStore, mut batch: Vec<Write>) {
    if batch.len() == 1 {
        let w = batch.pop().expect("one write");
        let answer = w.write(store, store.pool()).await;
        w.reply(answer);
        return;
    }
    batch.sort_by_key(Write::order);
    match write_together(store, &batch).await {
        Ok(answers) => {
            for (w, answer) in batch.into_iter().zip(answers) {
                w.reply(Ok(answer));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, writes = batch.len(), "A batch of writes failed; writing them one by one.");
            // Each on its own, at once: a write that waits for a lock holds up no other.
            for w in batch {
                let store = store.clone();
                tokio::spawn(async move {
                    let answer = w.write(&store, store.pool()).await;
                    w.reply(answer);
                });
            }
        }
    }
}

/// Every write of `batch` in one transaction; each its own answer (a lost lease, a run that
/// cannot be claimed), or the error that failed the transaction.
async fn write_together(store: &PgStore, batch: &[Write]) -> Result<Vec<Answer>, StoreError> {
    let mut tx = store.pool().begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "set local lock_timeout = '{BATCH_LOCK_TIMEOUT}'"
    )))
    .execute(&mut *tx)
    .await?;
    let mut answers: Vec<Option<Answer>> = batch.iter().map(|_| None).collect();
    // The step records that need no lease renewal, in one statement (one round trip however
    // many); a run's records at one position twice (never, as a run awaits each) go one by one.
    // They go first, then the other writes in run order: so two batches can lock rows in
    // crossing orders only when each claims a run the other is recording (duplicate jobs on
    // two workers at once), and then the lock timeout (or PostgreSQL's deadlock detection)
    // fails one of them, whose writes are written again one by one.
    let plain: Vec<usize> = (0..batch.len())
        .filter(|&i| matches!(&batch[i], Write::Record(p) if !p.renew))
        .collect();
    let positions: std::collections::HashSet<(Uuid, i32)> = plain.iter().map(|&i| batch[i].order()).collect();
    if plain.len() > 1 && positions.len() == plain.len() {
        let records: Vec<&Pending> = plain
            .iter()
            .map(|&i| match &batch[i] {
                Write::Record(p) => p,
                _ => unreachable!("only records are plain"),
            })
            .collect();
        for (i, answer) in plain.iter().zip(record_all(&mut tx, &records).await?) {
            answers[*i] = Some(Answer::Record(answer));
        }
    }
    // Claims, ends and starts: one statement each, however many.
    let claims: Vec<usize> = (0..batch.len())
        .filter(|&i| matches!(batch[i], Write::Claim { .. }))
        .collect();
    if claims.len() > 1 {
        let claimed = claim_all(&mut tx, claims.iter().map(|&i| &batch[i])).await?;
        for (i, answer) in claims.iter().zip(claimed) {
            answers[*i] = Some(Answer::Claim(answer));
        }
    }
    let finishes: Vec<usize> = (0..batch.len())
        .filter(|&i| matches!(batch[i], Write::Finish { .. }))
        .collect();
    if finishes.len() > 1 {
        let finished = finish_all(&mut tx, finishes.iter().map(|&i| &batch[i])).await?;
        for (i, answer) in finishes.iter().zip(finished) {
            answers[*i] = Some(Answer::Finish(answer));
        }
    }
    let creates: Vec<usize> = (0..batch.len())
        .filter(|&i| matches!(batch[i], Write::Create { .. }))
        .collect();
    if creates.len() > 1 {
        create_all(&mut tx, creates.iter().map(|&i| &batch[i])).await?;
        for i in creates {
            answers[i] = Some(Answer::Create(Ok(())));
        }
    }
    for (w, answer) in batch.iter().zip(answers.iter_mut()) {
        if answer.is_none() {
            *answer = Some(w.write(store, &mut *tx).await?);
        }
    }
    tx.commit().await?;
    Ok(answers.into_iter().map(|a| a.expect("every write answered")).collect())
}

/// The lease and run a claim's row returns.
fn claimed_run(row: &sqlx::postgres::PgRow, run_id: RunId, owner: &str, ttl: Duration) -> (Lease, ClaimedRun) {
    let lease = Lease {
        run_id,
        owner: owner.to_string(),
        epoch: row.get("lease_epoch"),
        ttl,
    };
    if row.get::<bool, _>("recovered") {
        crate::core::metrics::metrics().run_recovered();
    }
    let run = ClaimedRun {
        workflow: row.get("workflow"),
        input: row.get("input"),
        cancel_requested: row.get("cancel_requested"),
        cancel_reason: row.get("cancel_reason"),
        has_parent: row.get("has_parent"),
        has_concurrency_key: row.get("has_key"),
        first_claim: row.get("first_claim"),
        now: row.get("now"),
        trace_context: row.get("trace_context"),
        started_by: row.get("started_by"),
        workflow_version: row.get::<i32, _>("workflow_version").max(0) as u32,
    };
    (lease, run)
}

/// Claims ([`PgStore::claim_now`]) in one statement: the runs' rows locked in id order, each
/// claimed if it is claimable now. Each claim's lease and run, or nothing; of two claims of
/// one run (duplicate jobs), the first gets it.
async fn claim_all<'w>(
    tx: &mut Transaction<'_, Postgres>,
    claims: impl Iterator<Item = &'w Write>,
) -> Result<Vec<StoreResult<Option<(Lease, ClaimedRun)>>>, StoreError> {
    let claims: Vec<(RunId, &str, Duration)> = claims
        .map(|w| match w {
            Write::Claim { run_id, owner, ttl, .. } => (*run_id, owner.as_str(), *ttl),
            _ => unreachable!("only claims"),
        })
        .collect();
    let ids: Vec<Uuid> = claims.iter().map(|c| c.0.0).collect();
    let owners: Vec<&str> = claims.iter().map(|c| c.1).collect();
    let ttls: Vec<f64> = claims.iter().map(|c| c.2.as_secs_f64()).collect();
    // `before` is the row as it was, as in the claim of one run; `distinct on` keeps the
    // first claim of a run claimed twice.
    let rows = sqlx::query(AssertSqlSafe(format!(
        "with input as ( \
           select distinct on (id) id, owner, ttl from unnest($1::uuid[], $2::text[], $3::float8[]) \
             with ordinality as t(id, owner, ttl, n) order by id, n), \
         before as (select id, lease_owner from runs where id = any($1::uuid[]) order by id for update) \
         update runs r set lease_owner = i.owner, lease_epoch = r.lease_epoch + 1, \
           lease_expires_at = now() + make_interval(secs => i.ttl), wakeup_pending = false, \
           status = 'running', started_at = coalesce(r.started_at, now()), updated_at = now() \
         from before join input i on i.id = before.id \
         where r.id = any($1::uuid[]) and r.id = before.id and r.status in {ACTIVE} and r.admitted and r.wake_at <= now() \
           and (r.lease_expires_at is null or r.lease_expires_at < now()) \
         returning r.id, r.lease_owner, r.lease_epoch, r.workflow, r.input, r.cancel_requested, r.cancel_reason, \
           r.parent_run_id is not null as has_parent, r.concurrency_key is not null as has_key, \
           r.started_at = now() as first_claim, now() as now, before.lease_owner is not null as recovered, \
           r.trace_context, r.started_by, r.workflow_version"
    )))
    .bind(&ids)
    .bind(&owners)
    .bind(&ttls)
    .fetch_all(&mut **tx)
    .await?;
    let mut claimed: std::collections::HashMap<Uuid, sqlx::postgres::PgRow> =
        rows.into_iter().map(|r| (r.get("id"), r)).collect();
    Ok(claims
        .iter()
        .map(|&(run_id, owner, ttl)| {
            let Some(row) = claimed
                .remove(&run_id.0)
                .filter(|r| r.get::<String, _>("lease_owner") == owner)
            else {
                return Ok(None);
            };
            Ok(Some(claimed_run(&row, run_id, owner, ttl)))
        })
        .collect())
}

/// Ends of runs ([`PgStore::finish_now`]) in one statement, each under its own lease check
/// (rows locked in id order). Each end's answer: done, or `LeaseLost`.
async fn finish_all<'w>(
    tx: &mut Transaction<'_, Postgres>,
    finishes: impl Iterator<Item = &'w Write>,
) -> Result<Vec<StoreResult<()>>, StoreError> {
    let finishes: Vec<(&Lease, &Outcome)> = finishes
        .map(|w| match w {
            Write::Finish { lease, outcome, .. } => (lease, outcome),
            _ => unreachable!("only ends"),
        })
        .collect();
    let ids: Vec<Uuid> = finishes.iter().map(|f| f.0.run_id.0).collect();
    let epochs: Vec<i64> = finishes.iter().map(|f| f.0.epoch).collect();
    let statuses: Vec<&str> = finishes.iter().map(|f| f.1.status.as_str()).collect();
    let outputs: Vec<Option<&Value>> = finishes.iter().map(|f| f.1.output.as_ref()).collect();
    let errors: Vec<Option<&str>> = finishes.iter().map(|f| f.1.error.as_deref()).collect();
    let ended: Vec<Uuid> = sqlx::query_scalar(
        "with input as ( \
           select * from unnest($1::uuid[], $2::bigint[], $3::text[], $4::jsonb[], $5::text[]) \
             as t(id, epoch, status, output, error)), \
         held as (select id, lease_epoch from runs where id = any($1::uuid[]) order by id for update) \
         update runs r set status = i.status, output = i.output, error = i.error, finished_at = now(), \
           updated_at = now(), lease_owner = null, lease_expires_at = null, wake_at = null \
         from input i join held h on h.id = i.id and h.lease_epoch = i.epoch \
         where r.id = any($1::uuid[]) and r.id = h.id \
         returning r.id",
    )
    .bind(&ids)
    .bind(&epochs)
    .bind(&statuses)
    .bind(&outputs)
    .bind(&errors)
    .fetch_all(&mut **tx)
    .await?;
    let ended: std::collections::HashSet<Uuid> = ended.into_iter().collect();
    Ok(finishes
        .iter()
        .map(|(lease, _)| {
            if ended.contains(&lease.run_id.0) {
                Ok(())
            } else {
                Err(StoreError::LeaseLost(lease.run_id))
            }
        })
        .collect())
}

/// Starts ([`PgStore::create_now`]) in one statement, each with its audit entry if it has one.
async fn create_all<'w>(
    tx: &mut Transaction<'_, Postgres>,
    creates: impl Iterator<Item = &'w Write>,
) -> Result<(), StoreError> {
    let creates: Vec<&Create> = creates
        .map(|w| match w {
            Write::Create { create, .. } => create,
            _ => unreachable!("only starts"),
        })
        .collect();
    let column = |f: &dyn Fn(&Create) -> Option<&str>| creates.iter().map(|c| f(c)).collect::<Vec<_>>();
    let ids: Vec<Uuid> = creates.iter().map(|c| c.id.0).collect();
    let versions: Vec<i32> = creates.iter().map(|c| c.version as i32).collect();
    let inputs: Vec<&Value> = creates.iter().map(|c| &c.req.input).collect();
    let parents: Vec<Option<Uuid>> = creates.iter().map(|c| c.parent.map(|p| p.0.0)).collect();
    let parent_seqs: Vec<Option<i32>> = creates.iter().map(|c| c.parent.map(|p| p.1)).collect();
    let details: Vec<Option<&Value>> = creates.iter().map(|c| c.audit.as_ref().map(|a| &a.detail)).collect();
    let workflows = column(&|c| Some(&c.req.workflow));
    let started_by = column(&|c| Some(c.req.started_by.as_deref().unwrap_or("api")));
    let traces = column(&|c| c.req.trace_context.as_deref());
    let actors = column(&|c| c.audit.as_ref().map(|a| a.actor.as_str()));
    let roles = column(&|c| c.audit.as_ref().and_then(|a| a.role.as_deref()));
    let actions = column(&|c| c.audit.as_ref().map(|a| a.action.as_str()));
    sqlx::query(
        "with input as ( \
           select * from unnest($1::uuid[], $2::text[], $3::int[], $4::jsonb[], $5::text[], $6::uuid[], $7::int[], \
                                $8::text[], $9::text[], $10::text[], $11::text[], $12::jsonb[]) \
             as t(id, workflow, version, input, started_by, parent, parent_seq, trace, actor, role, action, detail)), \
         run as ( \
           insert into runs (id, workflow, workflow_version, input, started_by, parent_run_id, parent_seq, wake_at, \
                             trace_context) \
           select id, workflow, version, input, started_by, parent, parent_seq, now(), trace from input returning id) \
         insert into audit_log (actor, role, action, target, detail) \
         select i.actor, i.role, i.action, i.id::text, i.detail from input i join run on run.id = i.id \
         where i.actor is not null",
    )
    .bind(&ids)
    .bind(&workflows)
    .bind(&versions)
    .bind(&inputs)
    .bind(&started_by)
    .bind(&parents)
    .bind(&parent_seqs)
    .bind(&traces)
    .bind(&actors)
    .bind(&roles)
    .bind(&actions)
    .bind(&details)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Step records without lease renewal ([`RECORD`]) in one statement: each checks its own lease
/// (its run's row locked `for share`, in run order) and is written only if it holds. Each
/// record's `wake_at`, or `LeaseLost`.
async fn record_all(
    tx: &mut Transaction<'_, Postgres>,
    records: &[&Pending],
) -> Result<Vec<StoreResult<Option<DateTime<Utc>>>>, StoreError> {
    // Each field a column of the statement's `unnest`.
    let (mut runs, mut epochs, mut seqs, mut names, mut kinds, mut statuses, mut attempts): (
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
    ) = Default::default();
    let (mut outputs, mut sensitive, mut errors, mut error_kinds, mut wake_in, mut terminal, mut events, mut ran_for): (
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
    ) = Default::default();
    for p in records {
        runs.push(p.lease.run_id.0);
        epochs.push(p.lease.epoch);
        seqs.push(p.seq);
        names.push(p.name.as_str());
        kinds.push(p.kind.as_str());
        statuses.push(p.status.as_str());
        attempts.push(p.attempts);
        outputs.push(if p.sensitive { None } else { p.output.clone() });
        sensitive.push(p.sensitive);
        errors.push(p.error.as_ref().map(|(_, m)| m.as_str()));
        error_kinds.push(p.error.as_ref().map(|(k, _)| k.as_str()));
        wake_in.push(p.wake_in.map(|d| d.as_millis() as f64));
        terminal.push(matches!(
            p.status,
            StepStatus::Succeeded | StepStatus::Failed | StepStatus::Cancelled
        ));
        events.push(p.event.as_deref());
        ran_for.push(p.ran_for.map(|d| d.as_secs_f64() * 1000.0));
    }
    let rows = sqlx::query(
        "with input as ( \
           select * from unnest($1::uuid[], $2::bigint[], $3::int[], $4::text[], $5::text[], $6::text[], $7::int[], \
                                $8::jsonb[], $9::bool[], $10::text[], $11::text[], $12::float8[], $13::bool[], \
                                $14::text[], $15::float8[]) \
             as t(run_id, epoch, seq, name, kind, status, attempts, output, sensitive, error, error_kind, \
                  wake_ms, terminal, event, ran_ms)), \
         held as (select id, lease_epoch from runs where id = any($1::uuid[]) order by id for share), \
         lease as (select i.* from input i join held h on h.id = i.run_id and h.lease_epoch = i.epoch), \
         step as ( \
           insert into steps (run_id, seq, name, kind, status, attempts, output, sensitive, error, error_kind, \
                              wake_at, finished_at, started_at) \
           select run_id, seq, name, kind, status, attempts, output, sensitive, error, error_kind, \
                  now() + wake_ms * interval '1 millisecond', case when terminal then now() end, \
                  now() - coalesce(ran_ms, 0) * interval '1 millisecond' from lease \
           on conflict (run_id, seq) do update set status = excluded.status, attempts = excluded.attempts, \
             output = excluded.output, sensitive = excluded.sensitive, \
             error = coalesce(excluded.error, steps.error), \
             error_kind = coalesce(excluded.error_kind, steps.error_kind), wake_at = excluded.wake_at, \
             finished_at = excluded.finished_at, updated_at = now(), \
             started_at = least(steps.started_at, excluded.started_at) \
           returning run_id, seq, wake_at), \
         event as ( \
           insert into run_events (run_id, kind, seq, step, attempt, detail) \
           select run_id, event, seq, name, attempts, jsonb_build_object('status', status, 'error', error) \
           from lease where event is not null) \
         select s.run_id, s.seq, s.wake_at from step s",
    )
    .bind(&runs)
    .bind(&epochs)
    .bind(&seqs)
    .bind(&names)
    .bind(&kinds)
    .bind(&statuses)
    .bind(&attempts)
    .bind(&outputs)
    .bind(&sensitive)
    .bind(&errors)
    .bind(&error_kinds)
    .bind(&wake_in)
    .bind(&terminal)
    .bind(&events)
    .bind(&ran_for)
    .fetch_all(&mut **tx)
    .await?;
    let written: std::collections::HashMap<(Uuid, i32), Option<DateTime<Utc>>> = rows
        .into_iter()
        .map(|r| ((r.get("run_id"), r.get("seq")), r.get("wake_at")))
        .collect();
    Ok(records
        .iter()
        .map(|p| match written.get(&(p.lease.run_id.0, p.seq)) {
            Some(at) => Ok(*at),
            None => Err(StoreError::LeaseLost(p.lease.run_id)),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    //! The fencing of journal writes, against a real PostgreSQL (`DAYSHIFT_DATABASE_URL`).

    use super::*;
    use crate::core::model::StepKind;

    async fn fresh_store() -> PgStore {
        let url = std::env::var("DAYSHIFT_DATABASE_URL")
            .expect("DAYSHIFT_DATABASE_URL is not set: run `scripts/services.sh up` and source .dayshift/env");
        let admin = PgPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
        let name = format!("dayshift_test_{}", &Uuid::new_v4().simple().to_string()[..12]);
        sqlx::query(AssertSqlSafe(format!("create database {name}")))
            .execute(&admin)
            .await
            .unwrap();
        let base = &url[..url.rfind('/').unwrap()];
        let store = PgStore::connect(&format!("{base}/{name}"), 5).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    fn record<'a>(output: &'a Value) -> StepRecord<'a> {
        StepRecord {
            seq: 0,
            name: "s",
            kind: StepKind::Step,
            status: StepStatus::Succeeded,
            attempts: 1,
            output: Some(output),
            sensitive: false,
            error: None,
            wake_in: None,
            event: None,
            ran_for: None,
        }
    }

    #[tokio::test]
    async fn a_step_journaled_while_another_worker_claims_the_run_waits_for_the_claim_and_writes_nothing() {
        let store = fresh_store().await;
        let (started, _) = store
            .create_run(&StartRun::new("w", json!(null)), 1, None, None)
            .await
            .unwrap();
        let id = started.id;
        let (a, _) = store
            .claim(id, "a", Duration::from_secs(30))
            .await
            .unwrap()
            .expect("a claims");
        // Another worker's claim, not committed yet (as `claim` does it: a new epoch).
        let mut claim = store.pool().begin().await.unwrap();
        sqlx::query("update runs set lease_epoch = lease_epoch + 1, lease_owner = 'b' where id = $1")
            .bind(id.0)
            .execute(&mut *claim)
            .await
            .unwrap();
        // a journals a step without renewing: its lease check waits for the claim's row lock.
        let output = json!("from a");
        let journal = {
            let store = store.clone();
            tokio::spawn(async move { store.record(&a, &record(&output), false).await })
        };
        let waiting = "select count(*) from pg_stat_activity where datname = current_database() \
                       and wait_event_type = 'Lock' and query like '%for share%'";
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while sqlx::query_scalar::<_, i64>(waiting)
            .fetch_one(store.pool())
            .await
            .unwrap()
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the journal write did not wait for the claim"
            );
            tokio::task::yield_now().await;
        }
        claim.commit().await.unwrap();
        // Once the claim commits, the check sees the new epoch: nothing is written.
        assert!(matches!(journal.await.unwrap(), Err(StoreError::LeaseLost(_))));
        assert!(store.journal(id).await.unwrap().is_empty(), "a wrote to the journal");
    }

    #[tokio::test]
    async fn a_runs_history_begins_with_its_creation_and_ends_with_its_end_without_storing_either() {
        let store = fresh_store().await;
        let mut req = StartRun::new("w", json!(null));
        req.started_by = Some("api:alice".into());
        let (started, _) = store.create_run(&req, 1, None, None).await.unwrap();
        let id = started.id;
        let (lease, _) = store
            .claim(id, "a", Duration::from_secs(30))
            .await
            .unwrap()
            .expect("claims");
        let mut failed = record(&Value::Null);
        (failed.status, failed.output, failed.wake_in) = (StepStatus::Retrying, None, Some(Duration::ZERO));
        failed.error = Some(("transient", "503"));
        failed.event = Some("step_attempt_failed");
        store.record(&lease, &failed, false).await.unwrap();
        let done = Outcome {
            status: RunStatus::Failed,
            output: None,
            error: Some("gave up".into()),
        };
        store.finish(&lease, &done, false, false).await.unwrap();
        let events = store.events(id).await.unwrap();
        let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["run_created", "step_attempt_failed", "run_finished"],
            "{events:#?}"
        );
        assert_eq!(
            events[0]["detail"],
            json!({ "started_by": "api:alice", "workflow": "w" })
        );
        assert_eq!(events[2]["detail"], json!({ "status": "failed", "error": "gave up" }));
        let run = store.get_run(id).await.unwrap().unwrap();
        let at: DateTime<Utc> = events[0]["at"].as_str().unwrap().parse().unwrap();
        assert_eq!(at, run.created_at);
        // Only the failure is a row of its own.
        let stored: i64 = sqlx::query_scalar("select count(*) from run_events where run_id = $1")
            .bind(id.0)
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(stored, 1);
    }

    #[tokio::test]
    async fn a_worker_that_lost_its_lease_cannot_write() {
        let store = fresh_store().await;
        let (started, _) = store
            .create_run(&StartRun::new("w", json!(null)), 1, None, None)
            .await
            .unwrap();
        let id = started.id;
        let ttl = Duration::from_secs(30);
        let (a, _) = store.claim(id, "a", ttl).await.unwrap().expect("a claims");
        // While a's lease is live, nobody else can claim.
        assert_eq!(
            store.claim(id, "b", ttl).await.unwrap().err(),
            Some(ClaimMiss::NotRunnable)
        );
        // a's lease expires (a paused); b takes over.
        sqlx::query("update runs set lease_expires_at = now() - interval '1 second' where id = $1")
            .bind(id.0)
            .execute(store.pool())
            .await
            .unwrap();
        let (b, _) = store.claim(id, "b", ttl).await.unwrap().expect("b claims");
        assert!(b.epoch > a.epoch);

        let stale = json!("from a");
        for renew in [true, false] {
            assert!(matches!(
                store.record(&a, &record(&stale), renew).await,
                Err(StoreError::LeaseLost(_))
            ));
        }
        assert!(matches!(
            store.step_started(&a, 0, "s", StepKind::Step, 1).await,
            Err(StoreError::LeaseLost(_))
        ));
        assert!(matches!(store.renew(&a).await, Err(StoreError::LeaseLost(_))));
        // Nor can it start a child: no run is created.
        let runs_before: i64 = sqlx::query_scalar("select count(*) from runs")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert!(matches!(
            store
                .start_child(&a, 0, "child", &StartRun::new("w", json!(null)), 1)
                .await,
            Err(StoreError::LeaseLost(_))
        ));
        let runs_after: i64 = sqlx::query_scalar("select count(*) from runs")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(runs_after, runs_before, "a stale worker created a child run");
        assert!(matches!(
            store.release(&a, None, RunStatus::Waiting).await,
            Err(StoreError::LeaseLost(_))
        ));
        let done = Outcome {
            status: RunStatus::Succeeded,
            output: None,
            error: None,
        };
        assert!(matches!(
            store.finish(&a, &done, false, false).await,
            Err(StoreError::LeaseLost(_))
        ));
        assert!(store.journal(id).await.unwrap().is_empty(), "a wrote to the journal");

        let fresh = json!("from b");
        store.record(&b, &record(&fresh), false).await.unwrap();
        store.finish(&b, &done, false, false).await.unwrap();
        let journal = store.journal(id).await.unwrap();
        assert_eq!(journal[0].output, Some(fresh));
        assert_eq!(store.get_run(id).await.unwrap().unwrap().status, RunStatus::Succeeded);
    }

    #[tokio::test]
    async fn a_run_is_not_claimed_before_it_is_due() {
        let store = fresh_store().await;
        let (started, _) = store
            .create_run(&StartRun::new("w", json!(null)), 1, None, None)
            .await
            .unwrap();
        let ttl = Duration::from_secs(30);
        let (lease, claimed) = store.claim(started.id, "a", ttl).await.unwrap().unwrap();
        let later = claimed.now + chrono::Duration::seconds(60);
        assert_eq!(
            store.release(&lease, Some(later), RunStatus::Waiting).await.unwrap(),
            Some(later)
        );
        assert_eq!(
            store.claim(started.id, "b", ttl).await.unwrap().err(),
            Some(ClaimMiss::NotYet(later))
        );
        assert!(store.due_runs(Duration::ZERO, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn records_of_many_runs_written_at_once_share_commits_and_each_keeps_its_fencing() {
        let store = fresh_store().await;
        let mut leases = Vec::new();
        for _ in 0..60 {
            let (started, _) = store
                .create_run(&StartRun::new("w", json!(null)), 1, None, None)
                .await
                .unwrap();
            let (lease, _) = store
                .claim(started.id, "w", Duration::from_secs(30))
                .await
                .unwrap()
                .expect("claims");
            leases.push(lease);
        }
        // One lease is stale: its record must write nothing, whatever batch it is in.
        let mut stale = leases[7].clone();
        stale.epoch -= 1;
        leases[7] = stale;
        let output = json!("done");
        let writes = leases.iter().map(|lease| {
            let r = StepRecord {
                seq: 0,
                name: "s",
                kind: StepKind::Step,
                status: StepStatus::Succeeded,
                attempts: 1,
                output: Some(&output),
                sensitive: false,
                error: None,
                wake_in: None,
                event: None,
                ran_for: None,
            };
            let store = &store;
            async move { store.record(lease, &r, false).await }
        });
        let results = futures::future::join_all(writes).await;
        for (i, r) in results.iter().enumerate() {
            match i {
                7 => assert!(matches!(r, Err(StoreError::LeaseLost(_))), "{r:?}"),
                _ => assert!(r.is_ok(), "{i}: {r:?}"),
            }
        }
        let journaled: i64 = sqlx::query_scalar("select count(*) from steps")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(journaled, 59);
        // The rows' `xmin` is the transaction that wrote them: 59 rows, far fewer commits.
        let transactions: i64 = sqlx::query_scalar("select count(distinct xmin::text) from steps")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert!(transactions <= 30, "{transactions} transactions wrote 59 records");
    }

    #[tokio::test]
    async fn starts_claims_and_ends_of_many_runs_at_once_share_commits_and_each_keeps_its_own_conditions() {
        let store = fresh_store().await;
        let audit = AuditEntry {
            actor: "alice".into(),
            role: Some("operator".into()),
            action: "run.start".into(),
            detail: json!({ "workflow": "w" }),
        };
        let starts = (0..60).map(|i| {
            let (store, audit) = (&store, &audit);
            async move {
                let req = StartRun::new("w", json!({ "i": i }));
                let audit = (i % 2 == 0).then_some(audit);
                store.create_run(&req, 1, None, audit).await.unwrap().0.id
            }
        });
        let ids = futures::future::join_all(starts).await;
        let (runs, audited): (i64, i64) = sqlx::query_as(
            "select (select count(*) from runs), (select count(*) from audit_log a join runs r on a.target = r.id::text \
               where a.actor = 'alice' and (r.input->>'i')::int % 2 = 0)",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(
            (runs, audited),
            (60, 30),
            "every run stored, and the audit entry of each audited one"
        );
        // Run 5 is not due yet; run 9 is claimed twice at once (a duplicate job).
        sqlx::query("update runs set wake_at = now() + interval '1 hour' where id = $1")
            .bind(ids[5].0)
            .execute(store.pool())
            .await
            .unwrap();
        let ttl = Duration::from_secs(30);
        let claims = ids.iter().chain([&ids[9]]).map(|&id| {
            let store = &store;
            async move { (id, store.claim(id, "w", ttl).await.unwrap()) }
        });
        let claimed = futures::future::join_all(claims).await;
        let twice: Vec<bool> = claimed
            .iter()
            .filter(|(id, _)| *id == ids[9])
            .map(|(_, c)| c.is_ok())
            .collect();
        assert_eq!(
            twice.iter().filter(|c| **c).count(),
            1,
            "one of two claims of a run gets it"
        );
        let mut leases: Vec<Lease> = claimed
            .into_iter()
            .filter_map(|(id, c)| {
                assert!(id != ids[5] || c.is_err(), "a run not due is not claimed");
                c.ok().map(|(lease, _)| lease)
            })
            .collect();
        assert_eq!(leases.len(), 59);
        let transactions: i64 =
            sqlx::query_scalar("select count(distinct xmin::text) from runs where lease_owner = 'w'")
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert!(transactions <= 30, "{transactions} transactions claimed 59 runs");
        // One lease is stale: its end must write nothing.
        leases[3].epoch -= 1;
        let done = Outcome {
            status: RunStatus::Succeeded,
            output: Some(json!("ok")),
            error: None,
        };
        let ends = leases.iter().map(|lease| {
            let (store, done) = (&store, &done);
            async move { store.finish(lease, done, false, false).await }
        });
        let ended = futures::future::join_all(ends).await;
        for (i, r) in ended.iter().enumerate() {
            match i {
                3 => assert!(matches!(r, Err(StoreError::LeaseLost(_))), "{r:?}"),
                _ => assert!(r.is_ok(), "{i}: {r:?}"),
            }
        }
        let (succeeded, transactions): (i64, i64) = sqlx::query_as(
            "select count(*), count(distinct xmin::text) from runs where status = 'succeeded' and output = '\"ok\"'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(succeeded, 58);
        assert!(transactions <= 30, "{transactions} transactions ended 58 runs");
    }
}
