//! The engine: the front door over the durable core. Triggers, the API and the CLI start,
//! inspect, cancel, signal and decide runs through it; workers take its [`Core`]. It holds no
//! trigger or API configuration: those are built by the binary and hold an `Engine`.

use std::sync::Arc;

use serde_json::Value;

use crate::core::changes::Hub;
use crate::core::error::{EngineError, StoreError};
use crate::core::model::{RunFilter, RunId, RunStatus, RunView, StartRun, Started};
use crate::core::queue::RedisQueue;
use crate::core::store::PgStore;
use crate::core::workflow::{Registry, WorkflowDef, WorkflowInfo};
use crate::core::{Core, FaultInjector, StepHook};

/// The engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    core: Arc<Core>,
    /// The run-change announcements, for [`Engine::wait_run`].
    changes: Arc<Hub>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// Builds an [`Engine`]: `Engine::builder(store, queue).register(def).build()`.
pub struct EngineBuilder {
    store: PgStore,
    queue: RedisQueue,
    registry: Registry,
    faults: Option<FaultInjector>,
    after_step: Option<StepHook>,
}

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("registry", &self.registry)
            .field("faults", &self.faults.as_ref().map(|_| ".."))
            .finish()
    }
}

impl EngineBuilder {
    /// Injects step failures (tests only): see [`FaultInjector`].
    pub fn inject_faults(mut self, faults: FaultInjector) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Calls `hook` at every step boundary (tests only): see [`StepHook`].
    pub fn on_step_journaled(mut self, hook: StepHook) -> Self {
        self.after_step = Some(hook);
        self
    }

    /// Registers a workflow.
    pub fn register(mut self, def: WorkflowDef) -> Self {
        self.registry.register(def);
        self
    }

    /// Registers several workflows.
    pub fn register_all(mut self, defs: impl IntoIterator<Item = WorkflowDef>) -> Self {
        for def in defs {
            self.registry.register(def);
        }
        self
    }

    /// The engine.
    pub fn build(self) -> Engine {
        Engine {
            core: Arc::new(Core {
                store: self.store,
                queue: self.queue,
                registry: std::sync::RwLock::new(Arc::new(self.registry)),
                faults: self.faults,
                after_step: self.after_step,
            }),
            changes: Arc::default(),
        }
    }
}

impl Engine {
    /// Starts building an engine on this store and queue.
    pub fn builder(store: PgStore, queue: RedisQueue) -> EngineBuilder {
        EngineBuilder {
            store,
            queue,
            registry: Registry::default(),
            faults: None,
            after_step: None,
        }
    }

    /// The durable core, for workers ([`crate::Worker::new`]).
    pub fn core(&self) -> Arc<Core> {
        self.core.clone()
    }

    /// The store.
    pub fn store(&self) -> &PgStore {
        &self.core.store
    }

    /// The registered workflows, as definitions, as they are now.
    pub fn registry(&self) -> Arc<Registry> {
        self.core.registry()
    }

    /// Changes the registered workflows (workflow files that changed): `change` edits a copy,
    /// which then replaces them whole, so a run or a request sees either the old set or the new
    /// one. Runs in flight keep the version they started on (a workflow file's definition
    /// replays each run with its own).
    pub fn update_workflows(&self, change: impl FnOnce(&mut Registry)) {
        let mut guard = self.core.registry.write().unwrap_or_else(|e| e.into_inner());
        let mut next = Registry::clone(&guard);
        change(&mut next);
        *guard = Arc::new(next);
    }

    /// The queue.
    pub fn queue(&self) -> &RedisQueue {
        &self.core.queue
    }

    /// The registered workflows.
    pub fn workflows(&self) -> Vec<WorkflowInfo> {
        self.core.registry().list()
    }

    /// Starts a run (or returns the earlier one with the same idempotency key).
    pub async fn start(&self, req: StartRun) -> Result<Started, EngineError> {
        self.start_audited(req, None).await
    }

    /// [`Engine::start`], recording `audit` in the same commit when a run is created (an API
    /// start: one commit for the run and the record of who started it).
    pub(crate) async fn start_audited(
        &self,
        mut req: StartRun,
        audit: Option<crate::core::store::AuditEntry>,
    ) -> Result<Started, EngineError> {
        let version = self.prepare(&mut req)?;
        let (started, due) = self
            .core
            .store
            .create_run(&req, version, None, audit.as_ref())
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => EngineError::Conflict(m),
                other => EngineError::Store(other),
            })?;
        if started.created {
            tracing::info!(run_id = %started.id, workflow = %req.workflow, status = %started.status, "Run started.");
        }
        self.core.queue.wake_now(&due);
        Ok(started)
    }

    /// Many prepared starts ([`Engine::prepare`]) in the caller's transaction, in two
    /// statements: see [`crate::core::store::create_runs_in`], whose rule on serialising the
    /// keys the caller keeps. Once `tx` commits, pass the runs created to
    /// [`Engine::started_many`].
    pub(crate) async fn start_many_in_tx(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        reqs: &[(&StartRun, u32)],
    ) -> Result<Vec<Result<Started, EngineError>>, EngineError> {
        Ok(crate::core::store::create_runs_in(tx, reqs)
            .await?
            .into_iter()
            .map(|r| {
                r.map_err(|e| match e {
                    StoreError::Conflict(m) => EngineError::Conflict(m),
                    other => EngineError::Store(other),
                })
            })
            .collect())
    }

    /// What follows the commit of [`Engine::start_many_in_tx`]'s transaction: the runs are
    /// counted and enqueued, in the background (they are committed; should this process die
    /// first, the sweeper enqueues them).
    pub(crate) fn started_many(&self, workflow: &str, started_by: &str, created: Vec<RunId>) {
        if created.is_empty() {
            return;
        }
        let m = crate::core::metrics::metrics();
        for _ in &created {
            m.run_started(workflow, started_by);
        }
        tracing::info!(runs = created.len(), workflow, started_by, "Runs started.");
        self.core.queue.wake_now(&created);
    }

    /// Checks a start request before anything is written (a trigger's, before it goes into
    /// [`Engine::start_many_in_tx`]); the workflow's version.
    pub(crate) fn prepare(&self, req: &mut StartRun) -> Result<u32, EngineError> {
        let registry = self.core.registry();
        let def = registry
            .get(&req.workflow)
            .ok_or_else(|| EngineError::UnknownWorkflow(req.workflow.clone()))?;
        let invalid = |message: String| EngineError::InvalidInput {
            workflow: req.workflow.clone(),
            message,
        };
        let asks_plan = req.input.get(crate::core::model::PLAN_INPUT).is_some();
        if (req.plan || asks_plan) && !def.plans {
            return Err(invalid(format!(
                "it has no plan mode (workflow files do), so it cannot be run with plan: true{}",
                if asks_plan {
                    format!(", and its input may not have {:?}", crate::core::model::PLAN_INPUT)
                } else {
                    String::new()
                }
            )));
        }
        if req.plan {
            let Some(fields) = req.input.as_object_mut() else {
                return Err(invalid("a plan run's input must be an object".into()));
            };
            fields.insert(crate::core::model::PLAN_INPUT.into(), Value::Bool(true));
            req.plan = false;
        }
        def.validate(&req.input).map_err(|e| EngineError::InvalidInput {
            workflow: req.workflow.clone(),
            message: e.0,
        })?;
        if let Some(by) = &def.concurrency
            && let Some(mut c) = by(&req.input).map_err(|message| EngineError::InvalidInput {
                workflow: req.workflow.clone(),
                message: format!("concurrency: {message}"),
            })?
        {
            c.key = format!("dayshift:{}:{}", req.workflow, c.key);
            req.concurrency = Some(c);
        }
        if let Some(key) = &req.idempotency_key
            && (key.is_empty() || key.len() > 512)
        {
            return Err(EngineError::BadRequest(
                "idempotency_key must be 1 to 512 characters".into(),
            ));
        }
        if let Some(c) = &req.concurrency
            && (c.key.is_empty() || c.limit == 0)
        {
            return Err(EngineError::BadRequest(
                "concurrency.key must not be empty and concurrency.limit must be at least 1".into(),
            ));
        }
        if req.trace_context.is_none() {
            req.trace_context = crate::core::telemetry::begin_run(&req.workflow);
        }
        Ok(def.version)
    }

    /// A run with its steps.
    pub async fn get_run(&self, id: RunId) -> Result<RunView, EngineError> {
        self.core.store.get_run(id).await?.ok_or(EngineError::RunNotFound(id))
    }

    /// Run `id` once `done` holds for it, or as it is after `timeout`: woken by the workers'
    /// announcements ([`crate::core::changes`]; with `ended_only`, by that of its end alone),
    /// re-read every `recheck` should one be lost. Each read is a fresh read of PostgreSQL.
    pub async fn wait_run(
        &self,
        id: RunId,
        timeout: std::time::Duration,
        recheck: std::time::Duration,
        ended_only: bool,
        done: impl FnMut(&RunView) -> bool,
    ) -> Result<RunView, EngineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Listening starts before the first read, so no change after that read is missed.
        let changes = self.changes.listen(&self.core.queue).await;
        self.wait_with(changes, id, deadline, recheck, ended_only, true, done)
            .await
    }

    /// [`Engine::start_audited`], then [`Engine::wait_run`] for the run's end. Listening
    /// starts before the run is created, so a run this call created is not read until its end
    /// is announced (or `recheck` passes): one read of it, not two.
    pub(crate) async fn start_and_wait(
        &self,
        req: StartRun,
        audit: Option<crate::core::store::AuditEntry>,
        timeout: std::time::Duration,
        recheck: std::time::Duration,
    ) -> Result<(Started, RunView), EngineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let changes = self.changes.listen(&self.core.queue).await;
        let started = self.start_audited(req, audit).await?;
        let read_now = !started.created || started.status.is_terminal();
        let run = self
            .wait_with(changes, started.id, deadline, recheck, true, read_now, |r| {
                r.status.is_terminal()
            })
            .await?;
        Ok((started, run))
    }

    /// The loop of [`Engine::wait_run`]: reads run `id` (at once if `read_now`, else after the
    /// first announcement) until `done` holds or `deadline` passes.
    #[allow(clippy::too_many_arguments)]
    async fn wait_with(
        &self,
        mut changes: crate::core::changes::Listener,
        id: RunId,
        deadline: tokio::time::Instant,
        recheck: std::time::Duration,
        ended_only: bool,
        mut read_now: bool,
        mut done: impl FnMut(&RunView) -> bool,
    ) -> Result<RunView, EngineError> {
        loop {
            let now = tokio::time::Instant::now();
            if read_now || now >= deadline {
                let run = self.get_run(id).await?;
                if done(&run) || tokio::time::Instant::now() >= deadline {
                    return Ok(run);
                }
            }
            read_now = true;
            changes.changed(id, ended_only, deadline.min(now + recheck)).await;
        }
    }

    /// Runs, newest first.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunView>, EngineError> {
        Ok(self.core.store.list_runs(filter).await?)
    }

    /// The run's history.
    pub async fn events(&self, id: RunId) -> Result<Vec<Value>, EngineError> {
        self.get_run(id).await?;
        Ok(self.core.store.events(id).await?)
    }

    /// Requests cancellation: the step in flight is cancelled, the undos of completed steps run
    /// in reverse, and the run ends `cancelled`. Cancelling a finished run changes nothing.
    pub async fn cancel(&self, id: RunId, reason: Option<&str>, by: &str) -> Result<RunStatus, EngineError> {
        let reason = reason.unwrap_or("cancelled on request");
        let (status, due) = self
            .core
            .store
            .cancel(id, reason, by)
            .await?
            .ok_or(EngineError::RunNotFound(id))?;
        tracing::info!(run_id = %id, by, reason, "Cancellation requested.");
        self.core.queue.wake_now(&due);
        Ok(status)
    }

    /// Sends a signal to a run; a wait for it (now or later) receives `payload`. `by` is the
    /// authenticated sender. The engine's own signals (approvals, alert resolutions: see
    /// [`crate::approval::is_reserved_signal`]) are refused: approvals go through
    /// [`Engine::decide`].
    pub async fn signal(&self, id: RunId, name: &str, payload: Value, by: &str) -> Result<(), EngineError> {
        if name.is_empty() || name.len() > 200 {
            return Err(EngineError::BadRequest(
                "signal name must be 1 to 200 characters".into(),
            ));
        }
        if crate::approval::is_reserved_signal(name) {
            return Err(EngineError::Forbidden(format!(
                "the signal '{name}' is the engine's own; approve or reject with `dayshift runs approve|reject`"
            )));
        }
        self.send_signal(id, name, payload, by).await
    }

    /// Decides at the approval gate `id` waits at, as `caller`. Refused (`Forbidden`, saying
    /// why) when the gate would not count the decision; `Conflict` when the run waits at no
    /// gate. The identity recorded is the caller's, never anything the caller sends.
    pub async fn decide(
        &self,
        id: RunId,
        caller: &crate::identity::Caller,
        approve: bool,
        comment: Option<String>,
    ) -> Result<(), EngineError> {
        let run = self.get_run(id).await?;
        let Some(pending) = crate::approval::PendingApproval::of(&run) else {
            return Err(EngineError::Conflict(format!(
                "run {id} is {} and waits at no approval gate",
                run.status
            )));
        };
        pending.may_decide(caller, approve)?;
        let payload = serde_json::to_value(crate::approval::DecisionSignal {
            approve,
            comment,
            groups: caller.groups.clone(),
        })
        .expect("a decision serializes");
        self.send_signal(id, crate::approval::APPROVAL_SIGNAL, payload, &caller.name)
            .await
    }

    /// Sends any signal, the engine's own included.
    pub(crate) async fn send_signal(&self, id: RunId, name: &str, payload: Value, by: &str) -> Result<(), EngineError> {
        match self.core.store.signal(id, name, &payload, by).await? {
            None => Err(EngineError::RunNotFound(id)),
            Some(Err(status)) => Err(EngineError::Conflict(format!(
                "run {id} is {status}; it takes no more signals"
            ))),
            Some(Ok(due)) => {
                self.core.queue.wake_now(&due);
                Ok(())
            }
        }
    }

    /// Sends the engine's signal `name` to many runs at once (see [`PgStore::signal_many`]):
    /// how many took it (the others had ended).
    pub(crate) async fn send_signals(
        &self,
        signals: &[(RunId, Value)],
        name: &str,
        by: &str,
    ) -> Result<usize, EngineError> {
        let (sent, due) = self.core.store.signal_many(signals, name, by).await?;
        self.core.queue.wake_now(&due);
        Ok(sent)
    }

    /// Whether PostgreSQL and Redis answer.
    pub async fn ready(&self) -> Result<(), EngineError> {
        self.core.store.ping().await?;
        self.core.queue.ping().await?;
        Ok(())
    }

    /// Which services are unreachable (`postgresql`, `redis`), for `/readyz`: names only, the
    /// errors go to the log.
    pub async fn unreachable(&self) -> Vec<&'static str> {
        let mut down = Vec::new();
        if let Err(e) = self.core.store.ping().await {
            tracing::warn!(error = %e, "Not ready: PostgreSQL is unreachable.");
            down.push("postgresql");
        }
        if let Err(e) = self.core.queue.ping().await {
            tracing::warn!(error = %e, "Not ready: Redis is unreachable.");
            down.push("redis");
        }
        down
    }
}
