//! Group commit of journal writes: the step records of many runs, written in one transaction.
//!
//! # Design notes
//! A worker advancing 32 runs at once journals a step of each every few milliseconds, and each
//! write used to be a commit of its own: on a machine where PostgreSQL shares the CPU, the
//! commits are what sets the ceiling. Here every [`PgStore::record`] goes to one writer per
//! store, which writes *what queued while the last commit ran*: no batching window, so a lone
//! write (one run at a time) waits for nothing but its own statement, and a busy worker's
//! writes share commits.
//!
//! # Guarantees
//! - A write is answered only after the transaction holding it committed: a run's next step
//!   starts only once its own record is durable, exactly as with one commit per record.
//! - Each record keeps its own fencing (the lease check in its statement); a record whose lease
//!   is lost writes nothing and is answered `LeaseLost`, the others commit.
//! - A batch that fails as a whole (one record PostgreSQL refuses, a lost connection) is
//!   written again one record at a time, so that a record only ever fails for its own reason.
//! - Records of a batch are written in run order, so that batches take the runs' row locks in
//!   one order; a batch that waits for a lock longer than [`BATCH_LOCK_TIMEOUT`] is written
//!   again record by record, so one run's lock never holds up the others for long.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Lease, PgStore, StepRecord};
use crate::core::error::{StoreError, StoreResult};
use crate::core::model::{StepKind, StepStatus};

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

/// The handle on a store's writer; the writer stops when every handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct Journal {
    queue: mpsc::UnboundedSender<Pending>,
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
        self.queue
            .send(pending)
            .map_err(|_| StoreError::Db(sqlx::Error::PoolClosed))?;
        // The writer answers every record it took; a dropped answer means its runtime is gone.
        answer.await.map_err(|_| StoreError::Db(sqlx::Error::PoolClosed))?
    }
}

/// The writer: takes what queued, writes it as one transaction, [`WRITERS`] at once.
async fn write_batches(store: PgStore, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let writers = Arc::new(Semaphore::new(WRITERS));
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

async fn write(store: &PgStore, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let p = batch.pop().expect("one record");
        let result = store.record_now(store.pool(), &p.lease, &p.record(), p.renew).await;
        let _ = p.reply.send(result);
        return;
    }
    batch.sort_by_key(|p| (p.lease.run_id.0, p.seq));
    match write_together(store, &batch).await {
        Ok(results) => {
            for (p, result) in batch.into_iter().zip(results) {
                let _ = p.reply.send(result);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, records = batch.len(), "A batch of journal writes failed; writing them one by one.");
            // Each on its own, at once: a record that waits for a lock holds up no other.
            for p in batch {
                let store = store.clone();
                tokio::spawn(async move {
                    let result = store.record_now(store.pool(), &p.lease, &p.record(), p.renew).await;
                    let _ = p.reply.send(result);
                });
            }
        }
    }
}

/// Every record of `batch` in one transaction; each its own result (a lost lease), or the
/// error that failed the transaction.
async fn write_together(
    store: &PgStore,
    batch: &[Pending],
) -> Result<Vec<StoreResult<Option<DateTime<Utc>>>>, StoreError> {
    let mut tx = store.pool().begin().await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "set local lock_timeout = '{BATCH_LOCK_TIMEOUT}'"
    )))
    .execute(&mut *tx)
    .await?;
    let mut results = Vec::with_capacity(batch.len());
    for p in batch {
        match store.record_now(&mut *tx, &p.lease, &p.record(), p.renew).await {
            Err(StoreError::LeaseLost(id)) => results.push(Err(StoreError::LeaseLost(id))),
            Err(e) => return Err(e),
            Ok(at) => results.push(Ok(at)),
        }
    }
    tx.commit().await?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use sqlx::postgres::PgPoolOptions;

    use super::*;
    use crate::core::model::StartRun;

    #[tokio::test]
    async fn records_of_many_runs_written_at_once_share_commits_and_each_keeps_its_fencing() {
        let url = std::env::var("DAYSHIFT_DATABASE_URL")
            .expect("DAYSHIFT_DATABASE_URL is not set: run `scripts/services.sh up` and source .dayshift/env");
        let admin = PgPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
        let name = format!("dayshift_test_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&admin)
            .await
            .unwrap();
        let base = &url[..url.rfind('/').unwrap()];
        let store = PgStore::connect(&format!("{base}/{name}"), 10).await.unwrap();
        store.migrate().await.unwrap();
        let mut leases = Vec::new();
        for _ in 0..60 {
            let (started, _) = store
                .create_run(&StartRun::new("w", json!(null)), 1, None)
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
}
