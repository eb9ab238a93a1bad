//! The runtime: replays a workflow against its journal and executes what is new.
//!
//! # Design notes
//! To advance a run, a worker claims its lease, loads the journal and calls the workflow
//! function with a fresh [`Ctx`]. Each `ctx` call takes the next position (`seq`) in the journal:
//! - a completed entry returns its journaled result at once (a sensitive one is re-derived);
//! - the first new entry executes, is journaled, and the function goes on to the next call in
//!   the same pass, so a chain of steps costs one claim, not one per step;
//! - a call that cannot finish now (a sleep, a signal wait, a child run, a retry backoff)
//!   *halts* the pass: it records why, wakes the driver and never resolves. The driver drops the
//!   workflow future, releases the lease with the time the run is next due, and the run holds no
//!   worker until then.
//!
//! A call whose kind or name differs from the journal at its position halts with a
//! non-determinism error: the run fails and nothing else happens.
//!
//! When the workflow returns an error, or the run is cancelled, the undos registered by
//! completed steps run in reverse order, each journaled like a step at the positions after the
//! one where the workflow stopped. Replaying a failed or cancelled run stops at the same place
//! (the journal says so), so the undo positions are the same on every replay.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::core::error::{StepError, StoreError, WorkflowError};
use crate::core::model::{RetryPolicy, RunId, RunStatus, StartRun, StepKind, StepStatus};
use crate::core::queue::RedisQueue;
use crate::core::store::{JournalEntry, Lease, PgStore, StepRecord};

/// How long a step runs before it is journaled as in flight.
const MARKER_DELAY: Duration = Duration::from_millis(20);

/// What a step's function gets: who it is, which attempt, and the run's cancellation.
#[derive(Debug, Clone)]
pub struct StepCtx {
    /// The run.
    pub run_id: RunId,
    /// The step's name.
    pub step: String,
    /// Its position in the journal.
    pub seq: i32,
    /// 1 for the first attempt.
    pub attempt: u32,
    cancel: CancellationToken,
}

impl StepCtx {
    /// Resolves when the run is cancelled. The runtime also drops the step's future then;
    /// this is for steps that want to clean up first.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Whether the run has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

type UndoFn = Box<dyn FnOnce(StepCtx) -> BoxFuture<'static, Result<(), StepError>> + Send>;

struct Undo {
    step: String,
    policy: RetryPolicy,
    timeout: Option<Duration>,
    run: UndoFn,
}

/// A result, or the [`Halt`] that pauses the pass instead (a retry backoff, cancellation,
/// shutdown). The steps of [`Ctx::all`] return pauses as values, so that one branch's pause
/// waits for the branches still in flight; a lone step halts with it.
type Paused<T> = Result<T, Halt>;

/// Why a pass over the workflow stopped before the workflow returned.
/// Aborts a task when dropped (the lease keeper of a step that ended, however it ended).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Halt {
    /// Due again at this time, or on an outside event if `None`.
    Suspend(Option<DateTime<Utc>>),
    /// The run was cancelled; undos run next.
    Cancelled,
    /// The code no longer matches the journal.
    NonDeterminism(String),
    /// Another worker took the run over.
    LeaseLost,
    /// The store failed; the run is retried later.
    Store(String),
    /// The worker is shutting down; another takes the run over at once.
    Shutdown,
}

struct State {
    journal: Vec<Option<JournalEntry>>,
    cursor: i32,
    undos: Vec<Undo>,
    /// Registered by [`Ctx::finally`]: run after the undos when the run fails or is cancelled.
    finals: Vec<Undo>,
    halt: Option<Halt>,
    now: DateTime<Utc>,
}

/// What a run's context uses of the engine: the journal, the queue, the workflows a child may
/// be started as, and the test hooks. The engine's [`crate::core::Core`] is it; a trait, so
/// that the context does not depend on the registry of workflows that depend on it.
pub(crate) trait Host: Send + Sync + 'static {
    /// The journal.
    fn store(&self) -> &PgStore;
    /// Wake-ups.
    fn queue(&self) -> &RedisQueue;
    /// The version of `workflow` for a child run with `input`, or why it cannot be started.
    fn child_version(&self, workflow: &str, input: &Value) -> Result<u32, StepError>;
    /// A failure injected into this attempt of a step (tests only).
    fn injected_fault(&self, run: RunId, step: &str) -> Option<StepError>;
    /// Called at each step boundary (tests only).
    fn step_journaled(&self, run: RunId, step: &str);
}

pub(crate) struct CtxInner {
    pub(super) host: Arc<dyn Host>,
    workflow: String,
    /// The version of the workflow the run was started on.
    version: u32,
    /// What started the run (`api:token:alice`, ...): an API caller made the change.
    started_by: String,
    /// When the last write that renewed the lease was sent (the claim, a journal write, a
    /// renewal): the lease runs out `ttl` after it unless renewed again.
    renewed: Mutex<std::time::Instant>,
    lease: Lease,
    cancel: CancellationToken,
    shutdown: CancellationToken,
    halted: Notify,
    state: Mutex<State>,
}

impl CtxInner {
    /// The context of a pass over a claimed run, with the run's journal by position.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        host: Arc<dyn Host>,
        workflow: String,
        version: u32,
        started_by: String,
        renewed: std::time::Instant,
        lease: Lease,
        cancel: CancellationToken,
        shutdown: CancellationToken,
        journal: Vec<Option<JournalEntry>>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            host,
            workflow,
            version,
            started_by,
            renewed: Mutex::new(renewed),
            lease,
            cancel,
            shutdown,
            halted: Notify::new(),
            state: Mutex::new(State {
                journal,
                cursor: 0,
                undos: Vec::new(),
                finals: Vec::new(),
                halt: None,
                now,
            }),
        }
    }
}

/// The workflow's handle on the runtime. Every side effect goes through it.
///
/// Calls must be awaited one at a time: their journal positions are taken in call order. Steps
/// that may run at once go through [`Ctx::all`], which takes their positions in a fixed order.
#[derive(Clone)]
pub struct Ctx {
    inner: Arc<CtxInner>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("run_id", &self.inner.lease.run_id).finish()
    }
}

enum Lookup {
    New,
    Found(JournalEntry),
}

impl Ctx {
    pub(super) fn from_inner(inner: Arc<CtxInner>) -> Self {
        Self { inner }
    }

    /// The run this workflow executes.
    pub fn run_id(&self) -> RunId {
        self.inner.lease.run_id
    }

    /// The version of the workflow the run was started on ([`crate::WorkflowDef::version`]):
    /// a workflow whose definition is data (a workflow file) replays the run with that one.
    pub fn workflow_version(&self) -> u32 {
        self.inner.version
    }

    /// A step: `f` runs once per attempt until it succeeds, fails permanently or runs out of
    /// attempts. Its result is journaled, so a replay returns it without running `f`.
    pub fn step<T, F, Fut>(&self, name: impl Into<String>, f: F) -> Step<'_, T, F>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce(StepCtx) -> Fut + Send,
        Fut: Future<Output = Result<T, StepError>> + Send,
    {
        Step {
            ctx: self,
            name: name.into(),
            f,
            policy: RetryPolicy::default(),
            timeout: None,
            sensitive: false,
            undo: None,
            undo_policy: None,
            _t: PhantomData,
        }
    }

    /// A durable timer: the run holds no worker while it sleeps, and survives restarts.
    pub async fn sleep(&self, name: impl Into<String>, duration: Duration) -> Result<(), StepError> {
        let name = name.into();
        let (seq, found) = self.next(StepKind::Sleep, &name).await;
        let entry = match found {
            Lookup::Found(e) => e,
            Lookup::New => {
                self.halt_if_cancelled(seq, &name, StepKind::Sleep).await;
                let wake_at = self
                    .record(&StepRecord {
                        seq,
                        name: &name,
                        kind: StepKind::Sleep,
                        status: StepStatus::Waiting,
                        attempts: 1,
                        output: None,
                        sensitive: false,
                        error: None,
                        wake_in: Some(duration),
                        event: None,
                        ran_for: None,
                    })
                    .await;
                return self.halt(Halt::Suspend(wake_at)).await;
            }
        };
        match entry.status() {
            StepStatus::Succeeded => return Ok(()),
            StepStatus::Cancelled => return self.halt(Halt::Cancelled).await,
            _ => {}
        }
        let now = self.now();
        match entry.wake_at {
            Some(at) if at > now => {
                self.halt_if_cancelled(seq, &name, StepKind::Sleep).await;
                self.halt(Halt::Suspend(Some(at))).await
            }
            _ => {
                self.finish_wait(seq, &name, StepKind::Sleep, None).await;
                Ok(())
            }
        }
    }

    /// Waits durably for a signal named `name` (sent with `POST /api/v1/runs/{id}/signals/{name}`),
    /// at most `timeout`. Returns its payload, or `None` if the wait timed out. Signals sent
    /// before the wait began are kept and delivered in order.
    pub async fn wait_signal(&self, name: impl Into<String>, timeout: Duration) -> Result<Option<Value>, StepError> {
        Ok(self
            .wait_signal_from(name.into(), timeout)
            .await?
            .map(|(payload, _)| payload))
    }

    /// [`Ctx::wait_signal`], with who sent the signal (the identity the engine recorded).
    async fn wait_signal_from(&self, name: String, timeout: Duration) -> Result<Option<(Value, String)>, StepError> {
        let (seq, found) = self.next(StepKind::Signal, &name).await;
        let deadline = match found {
            Lookup::Found(e) if e.status() == StepStatus::Succeeded => {
                // A signal sent with no payload is journaled as null: `timed_out` tells them apart.
                let output = e.output.unwrap_or_default();
                if output["timed_out"] != Value::Bool(false) {
                    return Ok(None);
                }
                let sent_by = output["sent_by"].as_str().unwrap_or_default().to_string();
                return Ok(Some((output["payload"].clone(), sent_by)));
            }
            Lookup::Found(e) if e.status() == StepStatus::Cancelled => {
                return self.halt(Halt::Cancelled).await;
            }
            Lookup::Found(e) => e.wake_at,
            Lookup::New => {
                self.halt_if_cancelled(seq, &name, StepKind::Signal).await;
                self.record(&StepRecord {
                    seq,
                    name: &name,
                    kind: StepKind::Signal,
                    status: StepStatus::Waiting,
                    attempts: 1,
                    output: None,
                    sensitive: false,
                    error: None,
                    wake_in: Some(timeout),
                    event: None,
                    ran_for: None,
                })
                .await
            }
        };
        let passed = deadline.is_some_and(|d| d <= self.now());
        match self
            .inner
            .host
            .store()
            .take_signal(&self.inner.lease, seq, &name, passed)
            .await
        {
            Ok(Some(received)) => Ok(received),
            Ok(None) => {
                self.halt_if_cancelled(seq, &name, StepKind::Signal).await;
                self.halt(Halt::Suspend(deadline)).await
            }
            Err(e) => self.halt(store_halt(e)).await,
        }
    }

    /// An approval gate: waits until `gate.required` distinct approvers have approved, and
    /// returns who did. Fails on a rejection by an approver, or when `gate.timeout` passes.
    ///
    /// A decision counts as the authenticated identity the engine recorded with it
    /// ([`crate::Engine::decide`]), checked by [`crate::approval::may_decide`]: an approver of
    /// the gate, not whoever started the run through the API nor `requested_by` (the author
    /// the trigger names), once each. The run shows who may approve and since when (step
    /// `request-approval`), and each decision with its identity and whether it counted
    /// (steps `decision:<n>`). `notice`, if given, runs as step `notify-approval` once the
    /// wait begins; a notice that fails is logged, not fatal.
    pub async fn approval<F, Fut>(
        &self,
        gate: &crate::approval::ApprovalGate,
        requested_by: Option<&str>,
        notice: Option<F>,
    ) -> Result<Vec<String>, WorkflowError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<(), StepError>> + Send,
    {
        self.approval_showing(gate, requested_by, notice, None).await
    }

    /// [`Ctx::approval`], showing the approvers `plan`: what the run will do once approved
    /// (journaled with the request, so every replay shows the same).
    pub async fn approval_showing<F, Fut>(
        &self,
        gate: &crate::approval::ApprovalGate,
        requested_by: Option<&str>,
        notice: Option<F>,
        plan: Option<Value>,
    ) -> Result<Vec<String>, WorkflowError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<(), StepError>> + Send,
    {
        use crate::approval::{APPROVAL_SIGNAL, ApprovalRequest, Counted, Decider, DecisionSignal, may_decide};
        let started_by = self
            .inner
            .started_by
            .strip_prefix("api:")
            .map(|s| s.split(" (").next().unwrap_or(s).to_string());
        let request: ApprovalRequest = self
            .step("request-approval", |_s| async move {
                Ok::<_, StepError>(ApprovalRequest {
                    approvers: gate.approvers.clone(),
                    required: gate.required,
                    requested_by: requested_by.map(str::to_string),
                    started_by,
                    since: Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                    plan,
                })
            })
            .await?;
        if let Some(notice) = notice {
            let sent = self.step("notify-approval", |_s| notice()).await;
            if let Err(e) = sent {
                tracing::warn!(run_id = %self.run_id(), error = %e, "An approval notice could not be sent.");
            }
        }
        let mut approved: Vec<String> = Vec::new();
        let mut n = 0;
        while approved.len() < gate.required {
            n += 1;
            // The wait's deadline is journaled with it, so restarts do not extend it.
            let Some((payload, sent_by)) = self.wait_signal_from(APPROVAL_SIGNAL.into(), gate.timeout).await? else {
                return Err(WorkflowError::failed(format!(
                    "no approval within {} ({} of {} given: {})",
                    humantime::format_duration(gate.timeout),
                    approved.len(),
                    gate.required,
                    if approved.is_empty() {
                        "none".into()
                    } else {
                        approved.join(", ")
                    }
                )));
            };
            let (seen, request) = (&approved, &request);
            let counted: Counted = self
                .step(format!("decision:{n}"), |_s| async move {
                    // Only the engine sends this signal; a payload of another shape is ignored.
                    let d: DecisionSignal = serde_json::from_value(payload).unwrap_or(DecisionSignal {
                        approve: false,
                        comment: None,
                        groups: Vec::new(),
                    });
                    let decider = Decider {
                        identity: sent_by,
                        groups: d.groups,
                    };
                    let ignored = may_decide(request, seen, &decider, d.approve).err().map(|r| r.0);
                    Ok::<_, StepError>(Counted {
                        by: decider.identity,
                        approve: d.approve,
                        comment: d.comment,
                        ignored,
                    })
                })
                .await?;
            if let Some(why) = &counted.ignored {
                tracing::warn!(run_id = %self.run_id(), by = %counted.by, why = %why, "A decision did not count.");
                continue;
            }
            if !counted.approve {
                return Err(WorkflowError::failed(format!(
                    "rejected by {}{}",
                    counted.by,
                    counted.comment.map(|c| format!(": {c}")).unwrap_or_default()
                )));
            }
            approved.push(counted.by);
        }
        Ok(approved)
    }

    /// Starts `workflow` as a child run and waits durably for its result. A failed or cancelled
    /// child is a permanent error; cancelling this run cancels the child.
    pub async fn child<O: DeserializeOwned>(&self, workflow: &str, input: impl Serialize) -> Result<O, StepError> {
        self.child_named(workflow, workflow, input).await
    }

    /// [`Ctx::child`], journaled as step `name` (e.g. `install:databases/postgres`), so a run
    /// with several children of one workflow shows which is which.
    pub async fn child_named<O: DeserializeOwned>(
        &self,
        name: &str,
        workflow: &str,
        input: impl Serialize,
    ) -> Result<O, StepError> {
        let (seq, found) = self.next(StepKind::Child, name).await;
        let entry = match found {
            Lookup::Found(e) => e,
            Lookup::New => {
                self.halt_if_cancelled(seq, name, StepKind::Child).await;
                let input = serde_json::to_value(input).map_err(StepError::permanent)?;
                let version = self.inner.host.child_version(workflow, &input)?;
                let mut req = StartRun::new(workflow, input);
                req.started_by = Some(format!("parent:{}", self.run_id()));
                req.trace_context = crate::core::telemetry::begin_run(workflow);
                let child = match self
                    .inner
                    .host
                    .store()
                    .start_child(&self.inner.lease, seq, name, &req, version)
                    .await
                {
                    Ok(id) => id,
                    Err(e) => return self.halt(store_halt(e)).await,
                };
                self.inner.host.queue().wake_now(&[child]);
                return self.halt(Halt::Suspend(None)).await;
            }
        };
        let output = match entry.status() {
            StepStatus::Succeeded => entry.output.unwrap_or(Value::Null),
            StepStatus::Failed => {
                return Err(StepError::from_journal(Some("permanent"), entry.error));
            }
            StepStatus::Cancelled => return self.halt(Halt::Cancelled).await,
            _ => {
                let child = RunId(entry.child_run_id.unwrap_or_default());
                let (status, output, error) = match self.inner.host.store().run_outcome(child).await {
                    Ok(o) => o,
                    Err(e) => return self.halt(store_halt(e)).await,
                };
                match status {
                    RunStatus::Succeeded => {
                        let output = output.unwrap_or(Value::Null);
                        self.finish_wait(seq, name, StepKind::Child, Some(&output)).await;
                        output
                    }
                    RunStatus::Failed | RunStatus::Cancelled => {
                        // A child cancelled along with this run: this run's cancellation wins
                        // over the child's outcome, even if this pass was claimed before it.
                        if status == RunStatus::Cancelled
                            && let Ok(true) = self.inner.host.store().renew(&self.inner.lease).await
                        {
                            self.inner.cancel.cancel();
                        }
                        self.halt_if_cancelled(seq, name, StepKind::Child).await;
                        let msg = format!(
                            "child run {child} ({workflow}) {status}: {}",
                            error.unwrap_or_else(|| "no error recorded".into())
                        );
                        self.record(&StepRecord {
                            seq,
                            name,
                            kind: StepKind::Child,
                            status: StepStatus::Failed,
                            attempts: 1,
                            output: None,
                            sensitive: false,
                            error: Some(("permanent", &msg)),
                            wake_in: None,
                            event: Some("step_failed"),
                            ran_for: None,
                        })
                        .await;
                        return Err(StepError::Permanent(msg));
                    }
                    _ => {
                        self.halt_if_cancelled(seq, name, StepKind::Child).await;
                        return self.halt(Halt::Suspend(None)).await;
                    }
                }
            }
        };
        serde_json::from_value(output).map_err(|e| StepError::Permanent(format!("child output: {e}")))
    }

    // ------------------------------------------------------------ internals

    fn now(&self) -> DateTime<Utc> {
        self.inner.state.lock().expect("ctx state").now
    }

    /// Takes the next journal position and checks that the journal agrees with the call.
    async fn next(&self, kind: StepKind, name: &str) -> (i32, Lookup) {
        let mismatch = {
            let mut st = self.inner.state.lock().expect("ctx state");
            let seq = st.cursor;
            st.cursor += 1;
            match st.journal.get_mut(seq as usize).and_then(Option::take) {
                None => return (seq, Lookup::New),
                Some(e) if e.kind() == kind && e.name == name => return (seq, Lookup::Found(e)),
                Some(e) => format!(
                    "non-determinism at journal position {seq}: the journal has {} '{}' but the workflow now calls {} \
                     '{}'; the workflow code changed under a running run",
                    e.kind, e.name, kind, name
                ),
            }
        };
        self.halt(Halt::NonDeterminism(mismatch)).await
    }

    /// Stops this pass: records why, wakes the driver, never resolves.
    async fn halt<T>(&self, halt: Halt) -> T {
        {
            let mut st = self.inner.state.lock().expect("ctx state");
            st.halt.get_or_insert(halt);
        }
        self.inner.halted.notify_one();
        futures::future::pending().await
    }

    async fn halt_if_cancelled(&self, seq: i32, name: &str, kind: StepKind) {
        if let Err(pause) = self.stop_if_cancelled(seq, name, kind).await {
            self.halt::<()>(pause).await;
        }
    }

    /// [`Halt::Cancelled`] (the entry at `seq` marked so) if the run is cancelled,
    /// [`Halt::Shutdown`] if the worker stops.
    async fn stop_if_cancelled(&self, seq: i32, name: &str, kind: StepKind) -> Paused<()> {
        if self.inner.cancel.is_cancelled() {
            self.mark_cancelled(seq, name, kind).await;
            return Err(Halt::Cancelled);
        }
        if self.inner.shutdown.is_cancelled() {
            return Err(Halt::Shutdown);
        }
        Ok(())
    }

    async fn mark_cancelled(&self, seq: i32, name: &str, kind: StepKind) {
        // A position not journaled yet is journaled cancelled: the step never started.
        let _ = self
            .inner
            .host
            .store()
            .record(
                &self.inner.lease,
                &StepRecord {
                    seq,
                    name,
                    kind,
                    status: StepStatus::Cancelled,
                    attempts: 1,
                    output: None,
                    sensitive: false,
                    error: Some(("cancelled", "run cancelled")),
                    wake_in: None,
                    event: Some("step_cancelled"),
                    ran_for: None,
                },
                false,
            )
            .await;
    }

    async fn finish_wait(&self, seq: i32, name: &str, kind: StepKind, output: Option<&Value>) {
        self.record(&StepRecord {
            seq,
            name,
            kind,
            status: StepStatus::Succeeded,
            attempts: 1,
            output,
            sensitive: false,
            error: None,
            wake_in: None,
            event: None,
            ran_for: None,
        })
        .await;
    }

    /// Journals, or halts the pass if the store refuses.
    ///
    /// The write renews the lease only once a third of it has passed since the last renewal
    /// (as [`Ctx::keep_lease`] would): a run of fast steps renews it every `ttl / 3`, not at
    /// every step, and each step writes its own row only.
    async fn record(&self, r: &StepRecord<'_>) -> Option<DateTime<Utc>> {
        let sent = std::time::Instant::now();
        let lease = &self.inner.lease;
        let renew = sent.duration_since(*self.inner.renewed.lock().expect("lease clock")) >= lease.ttl / 3;
        match self.inner.host.store().record(lease, r, renew).await {
            Ok(at) => {
                if renew {
                    *self.inner.renewed.lock().expect("lease clock") = sent;
                }
                self.inner.host.queue().announce(lease.run_id, false);
                at
            }
            Err(e) => self.halt(store_halt(e)).await,
        }
    }

    /// Runs attempts of a step (or undo) at `seq` until one succeeds, fails for good, or a retry
    /// must wait. Returns the result to hand back, or the pause that ends the pass (a retry
    /// backoff, cancellation, shutdown: [`Paused`]); a lost lease or a failed store halts at once.
    #[allow(clippy::too_many_arguments)]
    async fn execute<'f>(
        &self,
        seq: i32,
        name: &str,
        kind: StepKind,
        attempt: u32,
        policy: &RetryPolicy,
        timeout: Option<Duration>,
        sensitive: bool,
        cancellable: bool,
        f: impl FnOnce(StepCtx) -> BoxFuture<'f, Result<Value, StepError>>,
    ) -> Paused<Result<Value, StepError>> {
        if cancellable {
            self.stop_if_cancelled(seq, name, kind).await?;
        } else if self.inner.shutdown.is_cancelled() {
            return Err(Halt::Shutdown);
        }
        let store = &self.inner.host.store();
        let lease = &self.inner.lease;
        let step_cancel = if cancellable {
            self.inner.cancel.child_token()
        } else {
            CancellationToken::new()
        };
        let sctx = StepCtx {
            run_id: lease.run_id,
            step: name.to_string(),
            seq,
            attempt,
            cancel: step_cancel.clone(),
        };
        let injected = match kind {
            StepKind::Step => self.inner.host.injected_fault(lease.run_id, name),
            _ => None,
        };
        let work: BoxFuture<'f, Result<Value, StepError>> = match injected {
            Some(e) => Box::pin(async move { Err(e) }),
            None => f(sctx),
        };
        // One span per attempt, within the pass's span: its logs carry step and attempt.
        let work = tracing::Instrument::instrument(
            work,
            tracing::info_span!("step", otel.name = %name, step = %name, attempt, kind = %kind.as_str()),
        );
        // A panicking step is a bug, not a flaky dependency: it fails the step for good and
        // leaves the worker running.
        let work = std::panic::AssertUnwindSafe(work).catch_unwind();
        let work = async move {
            let outcome = match timeout {
                Some(t) => match tokio::time::timeout(t, work).await {
                    Ok(outcome) => outcome,
                    Err(_) => Ok(Err(StepError::Timeout(t.as_millis() as u64))),
                },
                None => work.await,
            };
            outcome.unwrap_or_else(|panic| {
                Err(StepError::Permanent(format!(
                    "step panicked: {}",
                    panic_message(&*panic)
                )))
            })
        };
        // A step still running after MARKER_DELAY is marked in flight, so that the API shows it
        // and a worker that dies mid-attempt still counts the attempt. Faster steps are
        // journaled once, when they finish: most steps cost one write.
        let mut work = std::pin::pin!(work);
        // The lease is kept on a task of its own: a step whose poll runs long (CPU work on the
        // async workers: compression, hashing) cannot hold up its own lease's renewals while
        // another worker thread is free. The task stops with the step.
        let keeper = {
            let ctx = self.clone();
            tokio::spawn(async move { ctx.keep_lease().await })
        };
        let _stop_keeper = AbortOnDrop(keeper.abort_handle());
        // A keeper that panicked cannot vouch for the lease: the step stops, as if it were lost.
        let mut keep = std::pin::pin!(async { keeper.await.unwrap_or(Halt::LeaseLost) });
        let mut marker = std::pin::pin!(tokio::time::sleep(MARKER_DELAY));
        let mut marked = false;
        let began = std::time::Instant::now();
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = step_cancel.cancelled() => break Err(StepError::Cancelled),
                lost = &mut keep => return self.halt(lost).await,
                _ = &mut marker, if !marked => {
                    marked = true;
                    if let Err(e) = store.step_started(lease, seq, name, kind, attempt as i32).await {
                        return self.halt(store_halt(e)).await;
                    }
                }
            }
        };
        let attempts = attempt as i32;
        let ran_for = Some(began.elapsed());
        if !matches!(result, Err(StepError::Cancelled)) {
            let retrying = matches!(&result, Err(e) if e.is_retryable() && attempt < policy.max_attempts);
            crate::core::metrics::metrics().step_attempt(
                &self.inner.workflow,
                name,
                began.elapsed().as_secs_f64(),
                retrying,
            );
        }
        match result {
            Ok(value) => {
                let event = if kind == StepKind::Undo {
                    Some("undo_succeeded")
                } else {
                    None
                };
                self.record(&StepRecord {
                    seq,
                    name,
                    kind,
                    status: StepStatus::Succeeded,
                    attempts,
                    output: Some(&value),
                    sensitive,
                    error: None,
                    wake_in: None,
                    event,
                    ran_for,
                })
                .await;
                self.inner.host.step_journaled(lease.run_id, name);
                Ok(Ok(value))
            }
            Err(StepError::Cancelled) => {
                self.mark_cancelled(seq, name, kind).await;
                Err(Halt::Cancelled)
            }
            Err(e) if e.is_retryable() && attempt < policy.max_attempts => {
                let delay = policy.delay_after(attempt);
                tracing::info!(run_id = %lease.run_id, step = name, attempt, error = %e, ?delay, "Step attempt failed; retrying.");
                let msg = e.to_string();
                let wake_at = self
                    .record(&StepRecord {
                        seq,
                        name,
                        kind,
                        status: StepStatus::Retrying,
                        attempts,
                        output: None,
                        sensitive,
                        error: Some((e.kind(), &msg)),
                        wake_in: Some(delay),
                        event: Some("step_attempt_failed"),
                        ran_for,
                    })
                    .await;
                Err(Halt::Suspend(wake_at))
            }
            Err(e) => {
                tracing::info!(run_id = %lease.run_id, step = name, attempt, error = %e, "Step failed.");
                let msg = if e.is_retryable() {
                    format!("{e} (attempt {attempt} of {})", policy.max_attempts)
                } else {
                    e.to_string()
                };
                self.record(&StepRecord {
                    seq,
                    name,
                    kind,
                    status: StepStatus::Failed,
                    attempts,
                    output: None,
                    sensitive,
                    error: Some(("permanent", &msg)),
                    wake_in: None,
                    event: Some("step_attempt_failed"),
                    ran_for,
                })
                .await;
                Ok(Err(StepError::Permanent(msg)))
            }
        }
    }

    /// Renews the lease while a step runs; resolves only if the lease is lost. Learns of
    /// cancellation here too, should the cancel notification have been missed.
    ///
    /// # Guarantees
    /// The step stops before its lease can run out: when renewals fail (PostgreSQL unreachable
    /// from this worker) until `ttl`, less a margin, has passed since the last one that
    /// succeeded was sent, this resolves as lost, and the step's future is dropped before
    /// another worker can claim the run.
    async fn keep_lease(&self) -> Halt {
        let lease = &self.inner.lease;
        let period = lease.ttl / 3;
        let margin = (lease.ttl / 10).max(Duration::from_millis(100)).min(lease.ttl / 2);
        loop {
            let expires = *self.inner.renewed.lock().expect("lease clock") + lease.ttl - margin;
            let now = std::time::Instant::now();
            if now >= expires {
                tracing::warn!(run_id = %lease.run_id, ttl = ?lease.ttl,
                    "The lease could not be renewed before it ran out; stopping the step.");
                return Halt::LeaseLost;
            }
            tokio::time::sleep(period.min(expires - now)).await;
            if std::time::Instant::now() >= expires {
                continue;
            }
            let sent = std::time::Instant::now();
            match self.inner.host.store().renew(lease).await {
                Ok(cancelled) => {
                    *self.inner.renewed.lock().expect("lease clock") = sent;
                    if cancelled {
                        self.inner.cancel.cancel();
                    }
                }
                Err(StoreError::LeaseLost(_)) => return Halt::LeaseLost,
                Err(e) => {
                    tracing::warn!(run_id = %lease.run_id, error = %e, "Lease renewal failed; will retry.")
                }
            }
        }
    }

    /// Decides what to do with the step at `seq` (`found` in the journal, or new), or runs it.
    #[allow(clippy::too_many_arguments)]
    async fn run_step<'f>(
        &self,
        seq: i32,
        found: Lookup,
        name: &str,
        policy: &RetryPolicy,
        timeout: Option<Duration>,
        sensitive: bool,
        f: impl FnOnce(StepCtx) -> BoxFuture<'f, Result<Value, StepError>>,
    ) -> Paused<Result<Value, StepError>> {
        let attempt = match found {
            Lookup::New => 1,
            Lookup::Found(e) => match e.status() {
                StepStatus::Succeeded if !e.sensitive => {
                    return Ok(Ok(e.output.unwrap_or(Value::Null)));
                }
                StepStatus::Succeeded => {
                    // Re-derive the sensitive result; it was never stored.
                    let sctx = StepCtx {
                        run_id: self.run_id(),
                        step: name.to_string(),
                        seq,
                        attempt: e.attempts.max(1) as u32,
                        cancel: self.inner.cancel.child_token(),
                    };
                    return match f(sctx).await {
                        Ok(v) => Ok(Ok(v)),
                        Err(err) => {
                            tracing::warn!(run_id = %self.run_id(), step = name, error = %err,
                                "Re-deriving a sensitive step result failed; trying again later.");
                            let at = self.now() + chrono::Duration::from_std(policy.delay_after(1)).unwrap_or_default();
                            Err(Halt::Suspend(Some(at)))
                        }
                    };
                }
                StepStatus::Failed => {
                    return Ok(Err(StepError::from_journal(e.error_kind.as_deref(), e.error)));
                }
                StepStatus::Cancelled => return Err(Halt::Cancelled),
                StepStatus::Retrying => match e.wake_at {
                    Some(at) if at > self.now() => {
                        self.stop_if_cancelled(seq, name, StepKind::Step).await?;
                        return Err(Halt::Suspend(Some(at)));
                    }
                    _ => e.attempts as u32 + 1,
                },
                // An attempt was in flight when its worker died (or the lease was lost).
                StepStatus::Running | StepStatus::Waiting => {
                    let tried = e.attempts.max(1) as u32;
                    if tried >= policy.max_attempts {
                        let msg = format!(
                            "attempt {tried} of {} did not finish (worker lost)",
                            policy.max_attempts
                        );
                        self.record(&StepRecord {
                            seq,
                            name,
                            kind: StepKind::Step,
                            status: StepStatus::Failed,
                            attempts: tried as i32,
                            output: None,
                            sensitive,
                            error: Some(("permanent", &msg)),
                            wake_in: None,
                            event: Some("step_attempt_failed"),
                            ran_for: None,
                        })
                        .await;
                        return Ok(Err(StepError::Permanent(msg)));
                    }
                    tried + 1
                }
            },
        };
        self.execute(seq, name, StepKind::Step, attempt, policy, timeout, sensitive, true, f)
            .await
    }

    fn push_undo(&self, undo: Undo) {
        self.inner.state.lock().expect("ctx state").undos.push(undo);
    }

    /// Registers `f` to run when the run ends, however it ends: after the undos when it fails
    /// or is cancelled (the engine runs it then), or when the workflow calls
    /// [`Ctx::run_finally`] on success. Journaled as `finally:<name>` after the undos, retried
    /// by `policy`, never cut short by a cancellation (it is what must happen then), so it must
    /// be safe to repeat. Finals run in the order they were registered; register them on every
    /// pass, before the steps they clean up after, like the steps themselves.
    pub fn finally<F, Fut>(&self, name: impl Into<String>, policy: RetryPolicy, timeout: Option<Duration>, f: F)
    where
        F: FnOnce(StepCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        let run: UndoFn = Box::new(move |s| Box::pin(f(s)));
        self.inner.state.lock().expect("ctx state").finals.push(Undo {
            step: name.into(),
            policy,
            timeout,
            run,
        });
    }

    /// Runs what [`Ctx::finally`] registered, now (the end of a run that succeeded): each one
    /// journaled as on failure. Fails, naming them, if any failed for good; the run's undos run
    /// then as for any failure (the finals do not run twice).
    pub async fn run_finally(&self) -> Result<(), WorkflowError> {
        let finals = std::mem::take(&mut self.inner.state.lock().expect("ctx state").finals);
        let entries = finals.into_iter().map(|f| (format!("finally:{}", f.step), f)).collect();
        match run_journaled(self, entries, true).await {
            Ok(failed) if failed.is_empty() => Ok(()),
            Ok(failed) => Err(WorkflowError::failed(format!("finally failed: {}", failed.join("; ")))),
            Err(halt) => self.halt(halt).await,
        }
    }
}

/// The message of a panic payload, if it has one.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

fn store_halt(e: StoreError) -> Halt {
    match e {
        StoreError::LeaseLost(_) => Halt::LeaseLost,
        other => Halt::Store(other.to_string()),
    }
}

type UndoSpec<T> = Box<dyn FnOnce(StepCtx, T) -> BoxFuture<'static, Result<(), StepError>> + Send>;

/// A step being configured; `.await` runs it.
#[must_use = "a step does nothing until awaited"]
pub struct Step<'a, T, F> {
    ctx: &'a Ctx,
    name: String,
    f: F,
    policy: RetryPolicy,
    timeout: Option<Duration>,
    sensitive: bool,
    undo: Option<UndoSpec<T>>,
    undo_policy: Option<RetryPolicy>,
    _t: PhantomData<fn() -> T>,
}

impl<'a, T, F, Fut> Step<'a, T, F>
where
    T: Serialize + DeserializeOwned + Send + 'static,
    F: FnOnce(StepCtx) -> Fut + Send + 'a,
    Fut: Future<Output = Result<T, StepError>> + Send + 'a,
{
    /// How failed attempts are retried. Default: [`RetryPolicy::default`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Each attempt may take at most this long; a slower one counts as a transient failure.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The result carries a secret: it is never journaled, and a replay runs the step again to
    /// re-derive it (so the step must be safe to repeat).
    pub fn sensitive(mut self) -> Self {
        self.sensitive = true;
        self
    }

    /// How to put things back if the run later fails or is cancelled. Runs (journaled, with the
    /// step's retry policy) for this step's result, after the undos of later steps.
    pub fn undo<U, UFut>(mut self, undo: U) -> Self
    where
        U: FnOnce(StepCtx, T) -> UFut + Send + 'static,
        UFut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        self.undo = Some(Box::new(move |s, t| Box::pin(undo(s, t))));
        self
    }

    /// How the undo's failed attempts are retried, when not as the step's: an undo that waits
    /// for something (health after a revert) is paced, each attempt one check, with the run
    /// released between two of them like any retry backoff. Default: the step's policy.
    pub fn undo_retry(mut self, policy: RetryPolicy) -> Self {
        self.undo_policy = Some(policy);
        self
    }
}

/// A step's function, boxed to return its result as JSON.
type StepFn<'a> = Box<dyn FnOnce(StepCtx) -> BoxFuture<'a, Result<Value, StepError>> + Send + 'a>;

/// A step taken apart for running: its settings and its undo (its function goes apart).
struct Parts<T> {
    name: String,
    policy: RetryPolicy,
    timeout: Option<Duration>,
    sensitive: bool,
    undo: Option<UndoSpec<T>>,
    undo_policy: Option<RetryPolicy>,
}

impl<'a, T, F, Fut> Step<'a, T, F>
where
    T: Serialize + DeserializeOwned + Clone + Send + 'static,
    F: FnOnce(StepCtx) -> Fut + Send + 'a,
    Fut: Future<Output = Result<T, StepError>> + Send + 'a,
{
    fn into_parts(self) -> (&'a Ctx, Parts<T>, StepFn<'a>) {
        let Step {
            ctx,
            name,
            f,
            policy,
            timeout,
            sensitive,
            undo,
            undo_policy,
            ..
        } = self;
        let f: StepFn<'a> = Box::new(move |s: StepCtx| -> BoxFuture<'a, Result<Value, StepError>> {
            let fut = f(s);
            Box::pin(async move {
                let v = fut.await?;
                serde_json::to_value(v).map_err(|e| StepError::Permanent(format!("result is not JSON: {e}")))
            })
        });
        let parts = Parts {
            name,
            policy,
            timeout,
            sensitive,
            undo,
            undo_policy,
        };
        (ctx, parts, f)
    }
}

impl<T: DeserializeOwned + Clone + Send + 'static> Parts<T> {
    /// The step's journaled `value` as `T`, its undo registered if it has one.
    fn finish(self, ctx: &Ctx, value: Value) -> Result<T, StepError> {
        let name = self.name;
        let out: T = serde_json::from_value(value)
            .map_err(|e| StepError::Permanent(format!("journaled result of step '{name}' no longer decodes: {e}")))?;
        if let Some(undo) = self.undo {
            let arg = out.clone();
            ctx.push_undo(Undo {
                step: name,
                policy: self.undo_policy.unwrap_or(self.policy),
                timeout: self.timeout,
                run: Box::new(move |s| undo(s, arg)),
            });
        }
        Ok(out)
    }
}

impl<'a, T, F, Fut> IntoFuture for Step<'a, T, F>
where
    T: Serialize + DeserializeOwned + Clone + Send + 'static,
    F: FnOnce(StepCtx) -> Fut + Send + 'a,
    Fut: Future<Output = Result<T, StepError>> + Send + 'a,
{
    type Output = Result<T, StepError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let (ctx, p, f) = self.into_parts();
            let (seq, found) = ctx.next(StepKind::Step, &p.name).await;
            let value = match ctx
                .run_step(seq, found, &p.name, &p.policy, p.timeout, p.sensitive, f)
                .await
            {
                Ok(result) => result?,
                Err(pause) => return ctx.halt(pause).await,
            };
            p.finish(ctx, value)
        })
    }
}

impl Ctx {
    /// Runs `steps` concurrently, at most `limit` at once: a fan-out within one run. Each step
    /// is journaled at a position of its own, all taken in the order of `steps` before any
    /// runs, so replay, non-determinism detection, cancellation and undo work exactly as for
    /// steps awaited one after another.
    ///
    /// Every step runs to its end, success or failure (one failing does not stop the others),
    /// and the results come back in the order of `steps`; the undos of those that succeeded
    /// are registered in that order too, so compensation runs them in reverse of it. A step
    /// that must wait (a retry backoff) lets the steps in flight finish, then the pass waits
    /// for the earliest such step; cancellation stops every step.
    ///
    /// # Journal
    /// Positions `p..p+n` for `n` steps, where `p` is the next position; the call after this
    /// one takes `p+n`. A replay with steps of other names, or in another order, is
    /// non-determinism.
    pub async fn all<'a, T, F, Fut>(&'a self, steps: Vec<Step<'a, T, F>>, limit: usize) -> Vec<Result<T, StepError>>
    where
        T: Serialize + DeserializeOwned + Clone + Send + 'static,
        F: FnOnce(StepCtx) -> Fut + Send + 'a,
        Fut: Future<Output = Result<T, StepError>> + Send + 'a,
    {
        use futures::StreamExt as _;
        let mut parts = Vec::with_capacity(steps.len());
        let mut fs = Vec::with_capacity(steps.len());
        for step in steps {
            let (_, p, f) = step.into_parts();
            fs.push(f);
            parts.push(p);
        }
        // What each branch needs of its step (the undos stay behind: they are not `Sync`).
        let settings: Vec<_> = parts
            .iter()
            .map(|p| (p.name.clone(), p.policy.clone(), p.timeout, p.sensitive))
            .collect();
        let settings = &settings;
        // Every position first: the journal must agree with each before any step runs.
        let mut at = Vec::with_capacity(parts.len());
        for (name, ..) in settings {
            at.push(self.next(StepKind::Step, name).await);
        }
        // Boxed, so that the stream's type names no closure (which trips up `Send` inference).
        let runs: Vec<BoxFuture<'_, (usize, Branch)>> = fs
            .into_iter()
            .zip(at)
            .enumerate()
            .map(|(i, (f, (seq, found)))| -> BoxFuture<'_, _> {
                Box::pin(async move {
                    let (name, policy, timeout, sensitive) = &settings[i];
                    (
                        i,
                        self.run_step(seq, found, name, policy, *timeout, *sensitive, f).await,
                    )
                })
            })
            .collect();
        let mut outcomes: Vec<(usize, Branch)> = futures::stream::iter(runs)
            .buffer_unordered(limit.max(1))
            .collect()
            .await;
        outcomes.sort_by_key(|(i, _)| *i);
        let mut pause: Option<Halt> = None;
        let mut results = Vec::with_capacity(parts.len());
        for (p, (_, outcome)) in parts.into_iter().zip(outcomes) {
            match outcome {
                Ok(Ok(value)) => results.push(p.finish(self, value)),
                Ok(Err(e)) => results.push(Err(e)),
                Err(h) => {
                    pause = Some(match pause {
                        None => h,
                        Some(other) => sooner(other, h),
                    });
                    results.push(Err(StepError::Cancelled));
                }
            }
        }
        match pause {
            Some(pause) => self.halt(pause).await,
            None => results,
        }
    }
}

/// How one branch of [`Ctx::all`] ended: its step's result, or the pause it asks for.
type Branch = Paused<Result<Value, StepError>>;

/// Of two branches' pauses, the one the pass takes: cancellation, then shutdown, then the
/// earliest wake-up.
fn sooner(a: Halt, b: Halt) -> Halt {
    fn rank(h: &Halt) -> u8 {
        match h {
            Halt::Suspend(_) => 0,
            Halt::Shutdown => 1,
            _ => 2,
        }
    }
    match (a, b) {
        (Halt::Suspend(x), Halt::Suspend(y)) => Halt::Suspend(match (x, y) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        }),
        (a, b) if rank(&b) > rank(&a) => b,
        (a, _) => a,
    }
}

/// Polls `fut` until it resolves or the pass halts.
pub(super) async fn drive<F: Future>(inner: &CtxInner, fut: F) -> Result<F::Output, Halt> {
    let out = tokio::select! {
        biased;
        _ = inner.halted.notified() => None,
        out = fut => Some(out),
    };
    let halt = inner.state.lock().expect("ctx state").halt.take();
    match (out, halt) {
        (_, Some(h)) => Err(h),
        (Some(out), None) => Ok(out),
        (None, None) => Err(Halt::Store("pass halted without a reason".into())),
    }
}

/// Runs the registered undos in reverse, then what [`Ctx::finally`] registered. Returns those
/// that failed for good.
pub(super) async fn compensate(ctx: &Ctx) -> Result<Vec<String>, Halt> {
    let (undos, finals) = {
        let mut st = ctx.inner.state.lock().expect("ctx state");
        (std::mem::take(&mut st.undos), std::mem::take(&mut st.finals))
    };
    let mut entries: Vec<(String, Undo)> = undos
        .into_iter()
        .rev()
        .map(|u| (format!("undo:{}", u.step), u))
        .collect();
    entries.extend(finals.into_iter().map(|f| (format!("finally:{}", f.step), f)));
    run_journaled(ctx, entries, false).await
}

/// Runs `entries` (journal name, work) one after another at the next positions of the journal,
/// each journaled like a step of kind undo, none cut short by a cancellation. Returns those that
/// failed for good. `in_body`: called by the workflow, whose pass is already driven (a halt
/// inside stops the workflow), rather than by the pass after it.
async fn run_journaled(ctx: &Ctx, entries: Vec<(String, Undo)>, in_body: bool) -> Result<Vec<String>, Halt> {
    let inner = &ctx.inner;
    let base = {
        let mut st = inner.state.lock().expect("ctx state");
        let base = st.cursor;
        st.cursor += entries.len() as i32;
        base
    };
    let mut failures = Vec::new();
    for (i, (name, undo)) in entries.into_iter().enumerate() {
        let seq = base + i as i32;
        let found = {
            let mut st = inner.state.lock().expect("ctx state");
            st.journal.get_mut(seq as usize).and_then(Option::take)
        };
        let attempt = match found {
            None => 1,
            Some(e) if e.kind() != StepKind::Undo || e.name != name => {
                return Err(Halt::NonDeterminism(format!(
                    "non-determinism at journal position {seq}: the journal has {} '{}' but compensation now runs '{}'",
                    e.kind, e.name, name
                )));
            }
            Some(e) => match e.status() {
                StepStatus::Succeeded => continue,
                StepStatus::Failed => {
                    failures.push(format!("{name}: {}", e.error.unwrap_or_default()));
                    continue;
                }
                StepStatus::Retrying => match e.wake_at {
                    Some(at) if at > ctx.now() => return Err(Halt::Suspend(Some(at))),
                    _ => e.attempts as u32 + 1,
                },
                _ => e.attempts.max(1) as u32 + 1,
            },
        };
        let run = undo.run;
        let work = ctx.execute(
            seq,
            &name,
            StepKind::Undo,
            attempt,
            &undo.policy,
            undo.timeout,
            false,
            false,
            |s| Box::pin(async move { run(s).await.map(|()| Value::Null) }),
        );
        let done = if in_body { work.await } else { drive(inner, work).await? };
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failures.push(format!("{name}: {e}")),
            Err(pause) => return Err(pause),
        }
    }
    Ok(failures)
}
