//! Read models the console asks for and the journal does not hold in one place: the runs
//! waiting for an approval (with what they ask to approve and whether the caller may), and
//! what started a run (its schedule tick, webhook delivery, alert episode or parent).
//!
//! Everything here is read from PostgreSQL and redacted like any run the API shows.

use serde_json::{Value, json};

use crate::api::auth::{Caller, Role};
use crate::core::error::EngineError;
use crate::core::model::{RunId, RunView, StepKind};
use crate::core::store::views::TriggerRecord;
use crate::engine::Engine;

pub use crate::approval::APPROVAL_SIGNAL;

/// The runs waiting at an approval gate, longest-waiting first, each with what it asks to
/// approve (the plan its gate was asked with or its `plan` step's result, else the run's input), who may approve, the decisions
/// so far, and whether `caller` may decide (and why not).
pub async fn approvals(engine: &Engine, caller: &Caller) -> Result<Vec<Value>, EngineError> {
    let waiting = engine.store().runs_waiting_for_signal(APPROVAL_SIGNAL).await?;
    let mut out = Vec::with_capacity(waiting.len());
    for id in waiting {
        let run = match engine.get_run(id).await {
            Ok(run) => run.redacted(),
            Err(EngineError::RunNotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        out.extend(approval(&run, caller));
    }
    Ok(out)
}

/// One waiting approval as the console shows it. Whether the caller may decide is the same
/// rule the gate applies ([`crate::approval::may_decide`]), after the role the API needs.
fn approval(run: &RunView, caller: &Caller) -> Option<Value> {
    let pending = crate::approval::PendingApproval::of(run)?;
    // The plan the gate was asked with (a workflow file's), else a `plan` step's result.
    let plan = pending.request.plan.clone().or_else(|| {
        run.steps
            .iter()
            .rev()
            .find(|s| s.name == "plan" && s.kind == StepKind::Step)
            .and_then(|s| s.output.clone())
    });
    let why_not = if caller.role < Role::Operator {
        Some(format!("the {} role cannot approve or reject", caller.role))
    } else {
        pending.may_decide(caller, true).err().map(|r| r.0)
    };
    let (about, about_kind) = match plan {
        Some(plan) => (plan, "plan"),
        None => (run.input.clone(), "input"),
    };
    let request = &pending.request;
    Some(json!({
        "run": {
            "id": run.id, "workflow": run.workflow, "status": run.status, "started_by": run.started_by,
            "created_at": run.created_at,
        },
        "about": about,
        "about_kind": about_kind,
        "approvers": request.approvers,
        "required": request.required,
        "requested_by": request.requested_by.as_ref().or(request.started_by.as_ref()),
        "waiting_since": pending.wait.started_at,
        "deadline": pending.wait.wake_at,
        "decisions": pending.decisions,
        "approved_by": pending.approved,
        "may_decide": why_not.is_none(),
        "why_not": why_not,
    }))
}

/// What started `run`, as recorded by the trigger that did: the schedule tick (or who
/// triggered it by hand), the webhook delivery, the alert episode, the parent run's step, or
/// the API caller. `kind` is one of `schedule`, `webhook`, `alertmanager`, `parent`, `api`,
/// `other`; the record is null when it is gone (or the run predates it).
pub async fn trigger(engine: &Engine, run: &RunView) -> Result<Value, EngineError> {
    let store = engine.store();
    let by = run.started_by.as_str();
    let found = if let Some(rest) = by.strip_prefix("schedule:") {
        let (name, by_hand) = match rest.split_once(" (") {
            Some((name, _)) => (name, true),
            None => (rest, false),
        };
        let tick = store.trigger_record(TriggerRecord::ScheduleTick, run.id).await?;
        let by_whom = if by_hand {
            store.schedule_triggered_by(name, run.id).await?
        } else {
            None
        };
        json!({ "kind": "schedule", "schedule": name, "by_hand": by_hand, "tick": tick, "triggered_by": by_whom })
    } else if by.starts_with("webhook:") {
        let delivery = store.trigger_record(TriggerRecord::WebhookDelivery, run.id).await?;
        json!({ "kind": "webhook", "delivery": delivery })
    } else if by.starts_with("alertmanager:") {
        let episode = store.trigger_record(TriggerRecord::AlertEpisode, run.id).await?;
        json!({ "kind": "alertmanager", "episode": episode })
    } else if let Some(parent) = run.parent_run_id {
        let found = store.parent_step(parent, run.id).await?;
        json!({ "kind": "parent", "parent": found })
    } else if let Some(rest) = by.strip_prefix("api:") {
        let (caller, retry_of) = match rest.split_once(" (retry of ") {
            Some((caller, of)) => (caller, Some(of.trim_end_matches(')'))),
            None => (rest, None),
        };
        json!({ "kind": "api", "caller": caller, "retry_of": retry_of })
    } else {
        json!({ "kind": "other" })
    };
    let mut found = found;
    found["started_by"] = json!(by);
    Ok(found)
}

/// The concurrency limit `run` was started under, for starting it again the same way.
pub async fn concurrency_limit(engine: &Engine, id: RunId) -> Result<Option<i32>, EngineError> {
    Ok(engine.store().concurrency_limit(id).await?)
}

/// For each run of `ids` that waits, what it waits on: its newest waiting or retrying step
/// (`{kind, name, status, until}`), for run listings.
pub async fn waiting_on(
    engine: &Engine,
    ids: &[RunId],
) -> Result<std::collections::HashMap<RunId, Value>, EngineError> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let rows = engine.store().waiting_steps(ids).await?;
    Ok(rows.into_iter().collect())
}

/// How many runs were created since `since`, by status: the console's at-a-glance counts.
pub async fn run_counts(engine: &Engine, since: chrono::DateTime<chrono::Utc>) -> Result<Value, EngineError> {
    let rows = engine.store().run_counts(since).await?;
    let mut counts = serde_json::Map::new();
    for status in ["pending", "running", "waiting", "succeeded", "failed", "cancelled"] {
        let n = rows.iter().find(|(s, _)| s == status).map_or(0, |(_, n)| *n);
        counts.insert(status.into(), json!(n));
    }
    Ok(json!({ "since": since, "counts": counts }))
}
