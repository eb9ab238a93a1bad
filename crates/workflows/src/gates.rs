//! The approval gate promotions, playbooks and components share: the engine's
//! [`Ctx::approval`] (decisions count as their authenticated sender), with a notice to a chat
//! webhook while the run waits.

use dayshift_engine::{Ctx, WorkflowError};

pub use dayshift_engine::{ApprovalGate, ApprovalRequest, Approver, Counted};

use crate::adapters::notify::Notifier;
use crate::adapters::step_err;
use crate::config::InvalidConfig;

/// Waits at `gate` ([`Ctx::approval`]); `notice` is posted once the wait begins.
pub(crate) async fn approval(
    ctx: &Ctx,
    gate: &ApprovalGate,
    requested_by: Option<&str>,
    notice: Option<(&Notifier, String)>,
) -> Result<(), WorkflowError> {
    let notice = notice.map(|(notifier, text)| move || async move { notifier.send(&text).await.map_err(step_err) });
    ctx.approval(gate, requested_by, notice).await.map(|_| ())
}

/// `gate` as the config gives it, checked; an error names `key`.
pub(crate) fn checked_gate(gate: &ApprovalGate, key: &str) -> Result<ApprovalGate, InvalidConfig> {
    gate.check().map_err(|e| InvalidConfig::new(key, e))?;
    Ok(gate.clone())
}
