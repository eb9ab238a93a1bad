//! The driver: one pass over one run. A worker claims the run's lease, replays the journal
//! through the workflow function with a fresh [`Ctx`], and ends the pass as the workflow ends
//! or halts: finished (with undos on failure or cancellation), or released with the time it is
//! next due.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::core::ctx::{Ctx, CtxInner, Halt, compensate, drive, panic_message};
use crate::core::error::{StoreError, WorkflowError};
use crate::core::model::{RunId, RunStatus};
use crate::core::store::{JournalEntry, Lease, Outcome};

/// What a worker passes to each pass.
#[derive(Clone)]
pub(crate) struct PassOptions {
    pub(crate) owner: String,
    pub(crate) lease_ttl: Duration,
    pub(crate) shutdown: CancellationToken,
    pub(crate) cancels: CancelRegistry,
}

/// The cancellation tokens of the runs a worker is advancing, so that a cancel notification
/// reaches the step in flight.
#[derive(Clone, Default)]
pub(crate) struct CancelRegistry {
    tokens: Arc<Mutex<std::collections::HashMap<RunId, CancellationToken>>>,
}

impl CancelRegistry {
    fn register(&self, id: RunId) -> CancellationToken {
        let token = CancellationToken::new();
        self.tokens.lock().expect("cancel registry").insert(id, token.clone());
        token
    }

    fn unregister(&self, id: RunId) {
        self.tokens.lock().expect("cancel registry").remove(&id);
    }

    /// Cancels the step in flight of run `id`, if this worker runs one.
    pub(crate) fn cancel(&self, id: RunId) {
        if let Some(t) = self.tokens.lock().expect("cancel registry").get(&id) {
            t.cancel();
        }
    }
}

/// Claims run `run_id` and advances it as far as it can go now.
///
/// # Cancel safety
/// Not cancel-safe: poll to completion. Shutdown is signalled through `opts.shutdown`, which
/// the runtime checks between steps.
pub(crate) async fn advance(core: &Arc<Core>, run_id: RunId, opts: &PassOptions) -> Result<(), StoreError> {
    use crate::core::store::ClaimMiss;
    // Taken before the claim is sent: the lease runs out `ttl` after the database's now().
    let claimed_at = std::time::Instant::now();
    let (lease, claimed) = match core.store.claim(run_id, &opts.owner, opts.lease_ttl).await? {
        Ok(c) => c,
        Err(ClaimMiss::NotYet(at)) => {
            core.queue.wake_at(run_id, at).await;
            return Ok(());
        }
        Err(ClaimMiss::NotRunnable) => return Ok(()),
    };
    let Some(def) = core.registry().get(&claimed.workflow).cloned() else {
        tracing::warn!(run_id = %run_id, workflow = %claimed.workflow, worker = %opts.owner,
            "Workflow not registered on this worker; leaving the run for another.");
        let retry_at = claimed.now + chrono::Duration::seconds(30);
        core.store.release(&lease, Some(retry_at), RunStatus::Waiting).await?;
        core.queue.wake_at(run_id, retry_at).await;
        return Ok(());
    };
    let span = crate::core::telemetry::pass_span(
        &run_id.to_string(),
        &claimed.workflow,
        &opts.owner,
        claimed.trace_context.as_deref(),
    );
    tracing::Instrument::instrument(pass(core, run_id, opts, lease, claimed, claimed_at, def), span).await
}

/// One pass over a claimed run: replays its journal and runs it on until it ends or halts.
async fn pass(
    core: &Arc<Core>,
    run_id: RunId,
    opts: &PassOptions,
    lease: Lease,
    claimed: crate::core::store::ClaimedRun,
    claimed_at: std::time::Instant,
    def: crate::core::workflow::WorkflowDef,
) -> Result<(), StoreError> {
    // A run claimed for the first time has no journal yet.
    let journal = if claimed.first_claim {
        Vec::new()
    } else {
        core.store.journal(run_id).await?
    };
    let mut slots: Vec<Option<JournalEntry>> = Vec::new();
    for e in journal {
        let i = e.seq as usize;
        if slots.len() <= i {
            slots.resize_with(i + 1, || None);
        }
        slots[i] = Some(e);
    }
    let cancel = opts.cancels.register(run_id);
    if claimed.cancel_requested {
        cancel.cancel();
    }
    let inner = Arc::new(CtxInner::new(
        core.clone(),
        claimed.workflow.clone(),
        claimed.workflow_version,
        claimed.started_by.clone(),
        claimed_at,
        lease.clone(),
        cancel,
        opts.shutdown.clone(),
        slots,
        claimed.now,
    ));
    let ctx = Ctx::from_inner(inner.clone());
    let body = (def.run)(ctx.clone(), claimed.input.clone());
    let body = std::panic::AssertUnwindSafe(body).catch_unwind();
    let ended = drive(&inner, body).await.map(|outcome| {
        outcome.unwrap_or_else(|panic| {
            Err(WorkflowError::failed(format!(
                "workflow panicked: {}",
                panic_message(&*panic)
            )))
        })
    });
    let result = conclude(core, &ctx, &lease, &claimed, ended).await;
    opts.cancels.unregister(run_id);
    result
}

async fn conclude(
    core: &Arc<Core>,
    ctx: &Ctx,
    lease: &Lease,
    claimed: &crate::core::store::ClaimedRun,
    ended: Result<Result<Value, WorkflowError>, Halt>,
) -> Result<(), StoreError> {
    let run_id = lease.run_id;
    let outcome = match ended {
        Ok(Ok(output)) => Outcome {
            status: RunStatus::Succeeded,
            output: Some(output),
            error: None,
        },
        Ok(Err(e)) => match compensate(ctx).await {
            Ok(undo_errors) => Outcome {
                status: RunStatus::Failed,
                output: None,
                error: Some(with_undo_errors(e.to_string(), undo_errors)),
            },
            Err(h) => return settle(core, lease, h).await,
        },
        Err(Halt::Cancelled) => match compensate(ctx).await {
            Ok(undo_errors) => {
                // Read now: the cancellation may have arrived after the claim.
                let reason = match core.store.cancel_reason(run_id).await {
                    Ok(Some(r)) => r,
                    _ => claimed.cancel_reason.clone().unwrap_or_else(|| "cancelled".into()),
                };
                let failed = !undo_errors.is_empty();
                Outcome {
                    status: RunStatus::Cancelled,
                    output: None,
                    error: Some(if failed {
                        with_undo_errors(reason, undo_errors)
                    } else {
                        reason
                    }),
                }
            }
            Err(h) => return settle(core, lease, h).await,
        },
        Err(Halt::NonDeterminism(msg)) => {
            tracing::error!(run_id = %run_id, error = %msg, "Run stopped: non-determinism.");
            Outcome {
                status: RunStatus::Failed,
                output: None,
                error: Some(msg),
            }
        }
        Err(h) => return settle(core, lease, h).await,
    };
    tracing::info!(run_id = %run_id, status = %outcome.status, "Run finished.");
    let due = core
        .store
        .finish(lease, &outcome, claimed.has_parent, claimed.has_concurrency_key)
        .await;
    match due {
        Ok(due) => {
            crate::core::metrics::metrics().run_finished(&claimed.workflow, outcome.status.as_str());
            core.queue.announce(run_id, true);
            core.queue.wake_now(&due);
            Ok(())
        }
        Err(StoreError::LeaseLost(_)) => {
            crate::core::metrics::metrics().lease_lost();
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn with_undo_errors(error: String, undo_errors: Vec<String>) -> String {
    if undo_errors.is_empty() {
        error
    } else {
        format!("{error}; and undo failed: {}", undo_errors.join("; "))
    }
}

/// Ends a pass that did not end the run.
async fn settle(core: &Arc<Core>, lease: &Lease, halt: Halt) -> Result<(), StoreError> {
    let run_id = lease.run_id;
    let (wake_at, status) = match halt {
        Halt::Suspend(at) => (at, RunStatus::Waiting),
        Halt::Shutdown => (Some(Utc::now()), RunStatus::Running),
        Halt::Store(e) => {
            tracing::warn!(run_id = %run_id, error = %e, "Store error; the run will be retried.");
            (Some(Utc::now() + chrono::Duration::seconds(5)), RunStatus::Running)
        }
        Halt::LeaseLost => {
            tracing::warn!(run_id = %run_id, "Lease lost; another worker has the run.");
            crate::core::metrics::metrics().lease_lost();
            return Ok(());
        }
        Halt::Cancelled | Halt::NonDeterminism(_) => unreachable!("handled by conclude"),
    };
    match core.store.release(lease, wake_at, status).await {
        Ok(Some(at)) => {
            core.queue.announce(run_id, false);
            core.queue.wake_at(run_id, at).await;
            Ok(())
        }
        Ok(None) => {
            core.queue.announce(run_id, false);
            Ok(())
        }
        Err(StoreError::LeaseLost(_)) => Ok(()),
        Err(e) => Err(e),
    }
}
