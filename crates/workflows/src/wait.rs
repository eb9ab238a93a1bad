//! Durable waits: a long wait for something outside dayshift (ArgoCD health, a rollout, a Job,
//! a CustomResourceDefinition) is a loop of short journaled check steps and durable sleeps, so
//! that no worker is held while it waits, and a worker killed in the middle leaves a wait that
//! the next worker resumes where it was, instead of a held step that starts over.
//!
//! # Journal
//! `until(ctx, Wait { name: "wait-healthy", .. }, ..)` journals `wait-healthy` (a step),
//! `wait-healthy:sleep:1` (a sleep), `wait-healthy:2`, `wait-healthy:sleep:2`, … until a check
//! finds the thing ready or fails. The names are a function of the position in the loop, so
//! every replay calls the same names in the same order. A wait that is ready at once journals
//! one step, named like the wait.
//!
//! # Deadline
//! The first check computes the deadline (its time plus the timeout) and journals it with its
//! result; every later check reads it from there, on any worker and in any replay, so a restart
//! neither extends nor shortens the wait.
//!
//! # One entry instead: [`paced`], [`Pace`]
//! Where the journal keeps one entry per phase (a component's `wait-ready`, which its plan and
//! the console show as one step), [`paced`] makes the checks the attempts of one step: "not
//! yet" is a transient error retried after a fixed delay, during which the run is released
//! like any retry backoff. Its deadline is a number of attempts (timeout / interval), which the
//! journal keeps as the step's attempt count. An undo that waits is paced the same way
//! ([`Pace`] with the step's `undo_retry`): no wait anywhere holds a worker.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dayshift_engine::{Ctx, RetryPolicy, StepError};
use serde::{Deserialize, Serialize};

use crate::adapters::kube::{
    Kube, KubeError, ObjectId, Rollout, Workload, WorkloadKind, rollout_failed, rollout_timed_out,
};
use crate::adapters::step_err;

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Probe {
    /// Done: the wait is over.
    Ready,
    /// Not yet: `status` says why (journaled with the check), `late` is the error if the
    /// deadline has passed.
    Pending { status: String, late: String },
}

/// How long and how often to check.
#[derive(Debug, Clone)]
pub(crate) struct Wait<'a> {
    /// The first check's step name; the later ones are numbered after it.
    pub name: &'a str,
    /// The whole wait, from the first check.
    pub timeout: Duration,
    /// The durable sleep between two checks.
    pub every: Duration,
    /// Each check's retries (a check that cannot read the state is retried as a step).
    pub retry: RetryPolicy,
}

/// One check's journaled result.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Checked {
    ready: bool,
    /// Why it is not ready yet; empty when ready.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pending: String,
    /// When the wait gives up, set by the first check.
    deadline: DateTime<Utc>,
}

/// Checks with `check` until it reports [`Probe::Ready`] (`Ok`), fails (its error), or the
/// deadline passes: then the last check's `late` error, permanent. Between two checks the run
/// sleeps durably and holds no worker.
///
/// # Idempotency
/// `check` only reads; a check repeated after a half-finished attempt reads again.
pub(crate) async fn until<C, Fut>(ctx: &Ctx, wait: Wait<'_>, check: C) -> Result<(), StepError>
where
    C: Fn() -> Fut + Sync,
    Fut: Future<Output = Result<Probe, StepError>> + Send,
{
    let (check, every, timeout) = (&check, wait.every, wait.timeout);
    let mut deadline: Option<DateTime<Utc>> = None;
    let mut n = 0u32;
    loop {
        n += 1;
        let name = if n == 1 {
            wait.name.to_string()
        } else {
            format!("{}:{n}", wait.name)
        };
        let checked: Checked = ctx
            .step(name, |_s| async move {
                let deadline = deadline.unwrap_or_else(|| Utc::now() + timeout);
                match check().await? {
                    Probe::Ready => Ok(Checked {
                        ready: true,
                        pending: String::new(),
                        deadline,
                    }),
                    Probe::Pending { late, .. } if Utc::now() + every > deadline => Err(StepError::Permanent(late)),
                    Probe::Pending { status, .. } => Ok(Checked {
                        ready: false,
                        pending: status,
                        deadline,
                    }),
                }
            })
            .retry(wait.retry.clone())
            .await?;
        if checked.ready {
            return Ok(());
        }
        deadline = Some(checked.deadline);
        ctx.sleep(format!("{}:sleep:{n}", wait.name), every).await?;
    }
}

/// The wait as one step named `wait.name`, whose attempts are the checks, `wait.every` apart
/// (see the module's notes). "Not yet" is a transient error naming why, retried after a fixed
/// delay with the run released; the last attempt allowed by the timeout fails with `late`.
/// `wait.retry` is not used: the pace is the policy.
pub(crate) async fn paced<C, Fut>(ctx: &Ctx, wait: Wait<'_>, check: C) -> Result<(), StepError>
where
    C: Fn() -> Fut + Sync,
    Fut: Future<Output = Result<Probe, StepError>> + Send,
{
    let pace = Pace::new(wait.timeout, wait.every);
    let check = &check;
    ctx.step(wait.name, |s| async move {
        match pace.attempt(s.attempt, check()).await? {
            None => Ok(()),
            Some(late) => Err(StepError::Permanent(late)),
        }
    })
    .retry(pace.policy())
    .await
}

/// A wait whose checks are the attempts of one step or undo: `attempts` of them, `every` apart,
/// the run released in between. An undo that waits (health after a revert, readiness after a
/// rollback) is paced so: it has no `ctx` to sleep with, and its action is safe to repeat, so
/// each attempt does the action again (a no-op once done) and checks once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    every: Duration,
    attempts: u32,
}

impl Pace {
    /// Checks every `every` for `timeout`.
    pub(crate) fn new(timeout: Duration, every: Duration) -> Self {
        let every = every.max(Duration::from_millis(1));
        let attempts = u32::try_from(timeout.as_millis() / every.as_millis())
            .unwrap_or(u32::MAX)
            .max(1);
        Self { every, attempts }
    }

    /// The retry policy that paces the attempts (for `.retry` or `.undo_retry`).
    pub(crate) fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.attempts,
            initial_delay: self.every,
            multiplier: 1.0,
            max_delay: self.every,
            jitter: 0.0,
        }
    }

    /// Whether `attempt` is the last one the pace allows.
    pub(crate) fn is_last(&self, attempt: u32) -> bool {
        attempt >= self.attempts
    }

    /// Attempt `attempt`'s check: `None` when ready; a transient "not yet" error (retried at
    /// the pace) while attempts are left; on the last attempt, `Some(late)`: the wait is over
    /// without the thing ready, and the caller says what that means.
    pub(crate) async fn attempt(
        &self,
        attempt: u32,
        check: impl Future<Output = Result<Probe, StepError>>,
    ) -> Result<Option<String>, StepError> {
        match check.await? {
            Probe::Ready => Ok(None),
            Probe::Pending { late, .. } if self.is_last(attempt) => Ok(Some(late)),
            Probe::Pending { status, .. } => Err(StepError::Transient(format!("not yet: {status}"))),
        }
    }
}

// ------------------------------------------------------------------ Kubernetes probes

/// Whether every workload of `ids` is rolled out and every Job complete (other kinds are
/// ready when applied); the first one that is not says why. `limit` is for the error.
pub(crate) async fn workloads_ready(kube: &Kube, ids: &[&ObjectId], limit: Duration) -> Result<Probe, StepError> {
    for id in ids {
        let namespace = id.namespace.clone().unwrap_or_default();
        let kind = match id.kind.as_str() {
            "Deployment" => WorkloadKind::Deployment,
            "StatefulSet" => WorkloadKind::StatefulSet,
            "DaemonSet" => WorkloadKind::DaemonSet,
            "Job" => {
                if !kube.job_complete(&namespace, &id.name).await.map_err(step_err)? {
                    return Ok(Probe::Pending {
                        status: format!("Job {namespace}/{} has not completed", id.name),
                        late: KubeError::Permanent(format!(
                            "Job {namespace}/{} did not complete within {}",
                            id.name,
                            humantime::format_duration(limit)
                        ))
                        .to_string(),
                    });
                }
                continue;
            }
            _ => continue,
        };
        let w = Workload {
            kind,
            namespace,
            name: id.name.clone(),
        };
        if let Probe::Pending { status, late } = rollout(kube, &w, limit).await? {
            return Ok(Probe::Pending { status, late });
        }
    }
    Ok(Probe::Ready)
}

/// Whether the rollout of `w` is complete, as `kubectl rollout status` decides; a rollout that
/// will not complete on its own is a permanent error. `limit` is for the error.
pub(crate) async fn rollout(kube: &Kube, w: &Workload, limit: Duration) -> Result<Probe, StepError> {
    match kube.rollout_status(w).await.map_err(step_err)? {
        Rollout::Complete => Ok(Probe::Ready),
        Rollout::Failed(why) => Err(step_err(rollout_failed(w, &why))),
        Rollout::Waiting(why) => Ok(Probe::Pending {
            late: rollout_timed_out(w, limit, &why).to_string(),
            status: format!("{w}: {why}"),
        }),
    }
}

/// Whether every CustomResourceDefinition of `names` is `Established`. `limit` is for the error.
pub(crate) async fn crds_established(kube: &Kube, names: &[&str], limit: Duration) -> Result<Probe, StepError> {
    for name in names {
        if !kube.crd_established(name).await.map_err(step_err)? {
            return Ok(Probe::Pending {
                status: format!("CustomResourceDefinition {name} is not Established"),
                late: KubeError::Permanent(format!(
                    "CustomResourceDefinition {name} was not Established within {}",
                    humantime::format_duration(limit)
                ))
                .to_string(),
            });
        }
    }
    Ok(Probe::Ready)
}
