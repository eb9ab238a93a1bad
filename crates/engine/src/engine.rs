//! The engine: what triggers, the API and workers use to start, inspect, cancel and signal runs.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::error::{EngineError, StepError, StoreError};
use crate::model::{RunFilter, RunId, RunStatus, RunView, StartRun, Started};
use crate::queue::RedisQueue;
use crate::schedule::Schedule;
use crate::store::PgStore;
use crate::workflow::{Registry, WorkflowDef, WorkflowInfo};

/// Decides, for a run and a step name, whether the step's next attempt fails with the given
/// error instead of running. For tests that inject a failure at each step in turn.
pub type FaultInjector = Arc<dyn Fn(RunId, &str) -> Option<StepError> + Send + Sync>;

/// Called with the run and the step's name each time a step (or an undo) has succeeded and its
/// result is journaled: a step boundary. For crash tests that stop a worker at each boundary.
pub type StepHook = Arc<dyn Fn(RunId, &str) + Send + Sync>;

pub(crate) struct EngineInner {
    pub(crate) store: PgStore,
    pub(crate) queue: RedisQueue,
    pub(crate) registry: Registry,
    pub(crate) faults: Option<FaultInjector>,
    pub(crate) after_step: Option<StepHook>,
    pub(crate) schedules: Vec<Schedule>,
    pub(crate) webhooks: Option<std::sync::Arc<crate::webhook::Webhooks>>,
    pub(crate) alerts: Option<std::sync::Arc<crate::alerts::Alerts>>,
    pub(crate) auth: crate::auth::AuthConfig,
    pub(crate) policy: crate::policy::Policy,
}

impl EngineInner {
    /// Enqueues wake-ups for runs that are due now. A failure is logged, not returned: the
    /// sweeper finds every due run in PostgreSQL anyway.
    pub(crate) async fn enqueue_now(&self, runs: &[RunId]) {
        for run in runs {
            if let Err(e) = self.queue.enqueue(*run).await {
                tracing::warn!(run_id = %run, error = %e, "Enqueue failed; the sweeper will pick the run up.");
            }
        }
    }

    /// Enqueues a wake-up for `at`.
    pub(crate) async fn enqueue_at(&self, run: RunId, at: DateTime<Utc>) {
        if let Err(e) = self.queue.enqueue_at(run, at).await {
            tracing::warn!(run_id = %run, error = %e, "Delayed enqueue failed; the sweeper will pick the run up.");
        }
    }
}

/// The engine. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<EngineInner>,
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
    schedules: Vec<Schedule>,
    webhooks: Option<crate::webhook::Webhooks>,
    alerts: Option<crate::alerts::Alerts>,
    auth: crate::auth::AuthConfig,
    policy: crate::policy::Policy,
}

impl std::fmt::Debug for FaultInjectorSlot<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}
struct FaultInjectorSlot<'a>(&'a Option<FaultInjector>);

impl std::fmt::Debug for EngineBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineBuilder")
            .field("registry", &self.registry)
            .field("faults", &FaultInjectorSlot(&self.faults))
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

    /// The cron schedules this engine fires (see [`crate::Scheduler`]).
    pub fn schedules(mut self, schedules: Vec<Schedule>) -> Self {
        self.schedules = schedules;
        self
    }

    /// The git webhook secrets and routes (see [`crate::webhook`]).
    pub fn webhooks(mut self, webhooks: crate::webhook::Webhooks) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    /// The Alertmanager routes and guardrails (see [`crate::alerts`]).
    pub fn alerts(mut self, alerts: crate::alerts::Alerts) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// How the API authenticates (see [`crate::auth`]).
    pub fn auth(mut self, auth: crate::auth::AuthConfig) -> Self {
        self.auth = auth;
        self
    }

    /// What API callers may start, with which values of guarded input ([`crate::policy`]).
    pub fn policy(mut self, policy: crate::policy::Policy) -> Self {
        self.policy = policy;
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
            inner: Arc::new(EngineInner {
                store: self.store,
                queue: self.queue,
                registry: self.registry,
                faults: self.faults,
                after_step: self.after_step,
                schedules: self.schedules,
                webhooks: self.webhooks.map(std::sync::Arc::new),
                alerts: self.alerts.map(std::sync::Arc::new),
                auth: self.auth,
                policy: self.policy,
            }),
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
            schedules: Vec::new(),
            webhooks: None,
            alerts: None,
            auth: crate::auth::AuthConfig::default(),
            policy: Default::default(),
        }
    }

    /// The store.
    pub fn store(&self) -> &PgStore {
        &self.inner.store
    }

    /// The queue.
    pub fn queue(&self) -> &RedisQueue {
        &self.inner.queue
    }

    /// The registered workflows.
    pub fn workflows(&self) -> Vec<WorkflowInfo> {
        self.inner.registry.list()
    }

    /// Starts a run (or returns the earlier one with the same idempotency key).
    pub async fn start(&self, mut req: StartRun) -> Result<Started, EngineError> {
        let version = self.prepare(&mut req)?;
        let (started, due) = self
            .inner
            .store
            .create_run(&req, version, None)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => EngineError::Conflict(m),
                other => EngineError::Store(other),
            })?;
        if started.created {
            tracing::info!(run_id = %started.id, workflow = %req.workflow, status = %started.status, "Run started.");
        }
        self.inner.enqueue_now(&due).await;
        Ok(started)
    }

    /// [`Engine::start`] inside the caller's transaction (a trigger recording what it did in
    /// the same commit). Nothing is enqueued: once `tx` commits, pass the runs returned to
    /// [`Engine::started_in_tx`].
    pub(crate) async fn start_in_tx(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        mut req: StartRun,
    ) -> Result<(Started, Vec<RunId>), EngineError> {
        let version = self.prepare(&mut req)?;
        crate::store::create_run_in(tx, RunId::new(), &req, version, None)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => EngineError::Conflict(m),
                other => EngineError::Store(other),
            })
    }

    /// What follows the commit of [`Engine::start_in_tx`]'s transaction.
    pub(crate) async fn started_in_tx(&self, workflow: &str, started_by: &str, started: &Started, due: &[RunId]) {
        if started.created {
            crate::metrics::metrics().run_started(workflow, started_by);
            tracing::info!(run_id = %started.id, workflow, status = %started.status, "Run started.");
        }
        self.inner.enqueue_now(due).await;
    }

    /// Whether `caller` may start `req` through the API: the config's policy on who starts the
    /// workflow, and on the values of its guarded input fields ([`crate::policy`]). `Forbidden`
    /// names the field or the rule.
    pub fn check_api_start(&self, caller: &crate::auth::Caller, req: &StartRun) -> Result<(), EngineError> {
        let policy = &self.inner.policy;
        if self.inner.registry.get(&req.workflow).is_none() {
            return Err(EngineError::UnknownWorkflow(req.workflow.clone()));
        }
        policy
            .may_start(caller, &req.workflow)
            .map_err(EngineError::Forbidden)?;
        policy
            .check_input(&req.workflow, self.inner.registry.guards_of(&req.workflow), &req.input)
            .map_err(EngineError::Forbidden)
    }

    /// The registered workflows, each with whether `caller` may start it and, if it has any,
    /// its guarded input fields.
    pub fn workflows_for(&self, caller: &crate::auth::Caller) -> Vec<Value> {
        self.inner
            .registry
            .list()
            .into_iter()
            .map(|w| {
                let why_not = self.inner.policy.may_start(caller, &w.name).err();
                let guarded: Vec<&str> = self
                    .inner
                    .registry
                    .guards_of(&w.name)
                    .iter()
                    .map(|g| g.path.as_str())
                    .collect();
                serde_json::json!({
                    "name": w.name, "version": w.version, "description": w.description,
                    "may_start": why_not.is_none(), "why_not": why_not, "guarded_inputs": guarded,
                })
            })
            .collect()
    }

    /// Checks a start request before anything is written; the workflow's version.
    fn prepare(&self, req: &mut StartRun) -> Result<u32, EngineError> {
        let def = self
            .inner
            .registry
            .get(&req.workflow)
            .ok_or_else(|| EngineError::UnknownWorkflow(req.workflow.clone()))?;
        def.validate(&req.input).map_err(|message| EngineError::InvalidInput {
            workflow: req.workflow.clone(),
            message,
        })?;
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
            req.trace_context = crate::telemetry::begin_run(&req.workflow);
        }
        Ok(def.version)
    }

    /// A run with its steps.
    pub async fn get_run(&self, id: RunId) -> Result<RunView, EngineError> {
        self.inner.store.get_run(id).await?.ok_or(EngineError::RunNotFound(id))
    }

    /// Runs, newest first.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunView>, EngineError> {
        Ok(self.inner.store.list_runs(filter).await?)
    }

    /// The run's history.
    pub async fn events(&self, id: RunId) -> Result<Vec<Value>, EngineError> {
        self.get_run(id).await?;
        Ok(self.inner.store.events(id).await?)
    }

    /// Requests cancellation: the step in flight is cancelled, the undos of completed steps run
    /// in reverse, and the run ends `cancelled`. Cancelling a finished run changes nothing.
    pub async fn cancel(&self, id: RunId, reason: Option<&str>, by: &str) -> Result<RunStatus, EngineError> {
        let reason = reason.unwrap_or("cancelled on request");
        let (status, due) = self
            .inner
            .store
            .cancel(id, reason, by)
            .await?
            .ok_or(EngineError::RunNotFound(id))?;
        tracing::info!(run_id = %id, by, reason, "Cancellation requested.");
        self.inner.enqueue_now(&due).await;
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
        caller: &crate::auth::Caller,
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
        pending.may_decide(caller, approve).map_err(EngineError::Forbidden)?;
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
        match self.inner.store.signal(id, name, &payload, by).await? {
            None => Err(EngineError::RunNotFound(id)),
            Some(Err(status)) => Err(EngineError::Conflict(format!(
                "run {id} is {status}; it takes no more signals"
            ))),
            Some(Ok(due)) => {
                self.inner.enqueue_now(&due).await;
                Ok(())
            }
        }
    }

    /// Checks what can be checked of the schedules before any fires: names are unique, each
    /// names a registered workflow, and its input (filled for a sample tick) fits the
    /// workflow's input type. Returns one message per problem, naming the schedule.
    pub fn check_schedules(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for s in &self.inner.schedules {
            if !seen.insert(s.name.as_str()) {
                problems.push(format!("schedule '{}' is declared twice", s.name));
            }
            let Some(def) = self.inner.registry.get(&s.workflow) else {
                problems.push(format!(
                    "schedule '{}': unknown workflow '{}'; `dayshift workflows` lists the registered ones",
                    s.name, s.workflow
                ));
                continue;
            };
            match s.input_for(chrono::Utc::now()) {
                Err(e) => problems.push(format!("schedule '{}': {e}", s.name)),
                Ok(input) => {
                    if let Err(e) = def.validate(&input) {
                        problems.push(format!(
                            "schedule '{}': input for workflow '{}': {e}",
                            s.name, s.workflow
                        ));
                    }
                }
            }
        }
        problems
    }

    /// Whether PostgreSQL and Redis answer.
    pub async fn ready(&self) -> Result<(), EngineError> {
        self.inner.store.ping().await?;
        self.inner.queue.ping().await?;
        Ok(())
    }

    /// Which services are unreachable (`postgresql`, `redis`), for `/readyz`: names only, the
    /// errors go to the log.
    pub async fn unreachable(&self) -> Vec<&'static str> {
        let mut down = Vec::new();
        if let Err(e) = self.inner.store.ping().await {
            tracing::warn!(error = %e, "Not ready: PostgreSQL is unreachable.");
            down.push("postgresql");
        }
        if let Err(e) = self.inner.queue.ping().await {
            tracing::warn!(error = %e, "Not ready: Redis is unreachable.");
            down.push("redis");
        }
        down
    }
}
