//! Gates a run waits at: approvals, given through the API or the CLI as the signal `approval`
//! (`{by, approve, comment}`), by the people the gate lists.

use std::time::Duration;

use dayshift_engine::{Ctx, StepError, WorkflowError};
use serde::{Deserialize, Serialize};

use crate::adapters::notify::Notifier;
use crate::adapters::step_err;

/// Who must approve, and how many of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalGate {
    /// Who may approve (names or emails, as the approve call gives them).
    pub approvers: Vec<String>,
    /// Distinct approvals needed. Default 1.
    #[serde(default = "one")]
    pub required: usize,
    /// How long to wait. Default 3 days.
    #[serde(default = "three_days", with = "humantime_serde")]
    pub timeout: Duration,
}

fn one() -> usize {
    1
}
fn three_days() -> Duration {
    Duration::from_secs(3 * 86400)
}

/// What `request-approval` shows while the run waits: who may approve, how many, since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub approvers: Vec<String>,
    pub required: usize,
    pub requested_by: Option<String>,
    pub since: String,
}

/// One approve or reject call, as a signal `approval` carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub by: String,
    pub approve: bool,
    #[serde(default)]
    pub comment: Option<String>,
}

/// How a decision was taken into account (journaled per decision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counted {
    pub by: String,
    pub approve: bool,
    pub comment: Option<String>,
    /// Why it did not count, if it did not.
    pub ignored: Option<String>,
}

/// Waits until `gate.required` distinct allowed approvers (not `requested_by`, the author of
/// the change) have approved; fails on a rejection by an allowed approver or when the wait
/// times out. The run shows who may approve and since when (step `request-approval`), and each
/// decision with its identity and whether it counted (steps `decision:<n>`). `notice` is posted
/// once the wait begins; a notice that fails is logged, not fatal.
pub(crate) async fn approval(
    ctx: &Ctx,
    gate: &ApprovalGate,
    requested_by: Option<&str>,
    notice: Option<(&Notifier, String)>,
) -> Result<(), WorkflowError> {
    let request: ApprovalRequest = ctx
        .step("request-approval", |_s| async move {
            Ok::<_, StepError>(ApprovalRequest {
                approvers: gate.approvers.clone(),
                required: gate.required,
                requested_by: requested_by.map(str::to_string),
                since: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            })
        })
        .await?;
    if let Some((notifier, text)) = notice {
        let sent = ctx
            .step("notify-approval", |_s| async move {
                notifier.send(&text).await.map_err(step_err)
            })
            .await;
        if let Err(e) = sent {
            tracing::warn!(run_id = %ctx.run_id(), error = %e, "An approval notice could not be sent.");
        }
    }
    let mut approved: Vec<String> = Vec::new();
    let mut n = 0;
    while approved.len() < gate.required {
        n += 1;
        // The wait's deadline is journaled with it, so restarts do not extend it.
        let Some(payload) = ctx.wait_signal("approval", gate.timeout).await? else {
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
        let (seen, requester) = (&approved, &request.requested_by);
        let counted: Counted = ctx
            .step(format!("decision:{n}"), |_s| async move {
                let d: Decision = serde_json::from_value(payload).map_err(|e| {
                    StepError::Permanent(format!("an approval signal must be {{by, approve, comment?}}: {e}"))
                })?;
                let ignored = if !gate.approvers.iter().any(|a| a.eq_ignore_ascii_case(&d.by)) {
                    Some(format!("{} may not approve", d.by))
                } else if requester.as_deref().is_some_and(|r| r.eq_ignore_ascii_case(&d.by)) {
                    Some(format!("{} made the change and may not approve it", d.by))
                } else if d.approve && seen.iter().any(|a| a.eq_ignore_ascii_case(&d.by)) {
                    Some(format!("{} approved already", d.by))
                } else {
                    None
                };
                Ok::<_, StepError>(Counted {
                    by: d.by,
                    approve: d.approve,
                    comment: d.comment,
                    ignored,
                })
            })
            .await?;
        if counted.ignored.is_some() {
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
    Ok(())
}
