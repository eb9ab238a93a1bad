//! `serve`'s `/metrics`: the process's counters ([`crate::core::metrics`]), then gauges read
//! from PostgreSQL at scrape time, so every replica answers the same: each workflow source's
//! last success, each schedule's lateness, the queue's depth and lag.

use std::fmt::Write as _;

use crate::core::error::EngineError;
use crate::core::metrics::{encode, escape};
use crate::engine::Engine;
use crate::triggers::schedule::Scheduler;

/// `serve`'s `/metrics`: its counters, then what PostgreSQL says.
pub async fn render(engine: &Engine, scheduler: &Scheduler) -> Result<String, EngineError> {
    let mut out = encode();
    out.push_str(
        "# HELP dayshift_workflow_last_success_timestamp_seconds When the last successful run for this source finished (Unix time).\n\
         # TYPE dayshift_workflow_last_success_timestamp_seconds gauge\n",
    );
    let registry = engine.registry();
    for (workflow, field) in registry.freshness_fields() {
        for (source, at) in engine.store().last_successes(workflow, field).await? {
            let _ = writeln!(
                out,
                "dayshift_workflow_last_success_timestamp_seconds{{workflow=\"{}\",source=\"{}\"}} {}",
                escape(workflow),
                escape(&source),
                at.timestamp_millis() as f64 / 1000.0
            );
        }
    }
    // A schedule is overdue when the first tick after its last one is past and not fired.
    out.push_str(
        "# HELP dayshift_schedule_overdue_seconds How long a schedule's next tick is overdue (0: on time or paused).\n\
         # TYPE dayshift_schedule_overdue_seconds gauge\n",
    );
    let now = chrono::Utc::now();
    for view in scheduler.list().await? {
        let schedule = scheduler.schedules().iter().find(|s| s.name == view.name);
        let overdue = match (view.paused, view.last_tick, schedule) {
            (false, Some(last), Some(s)) => s
                .next_ticks(last, 1)
                .first()
                .map(|next| (now - *next).num_milliseconds().max(0) as f64 / 1000.0)
                .unwrap_or(0.0),
            _ => 0.0,
        };
        let _ = writeln!(
            out,
            "dayshift_schedule_overdue_seconds{{schedule=\"{}\"}} {overdue}",
            escape(&view.name)
        );
    }
    let (depth, lag) = engine.store().queue_depth().await?;
    let _ = write!(
        out,
        "# HELP dayshift_queue_depth Runs due now that no worker holds.\n\
         # TYPE dayshift_queue_depth gauge\n\
         dayshift_queue_depth {depth}\n\
         # HELP dayshift_queue_lag_seconds How long the longest-waiting due run has waited for a worker.\n\
         # TYPE dayshift_queue_lag_seconds gauge\n\
         dayshift_queue_lag_seconds {lag}\n"
    );
    out.push_str("# EOF\n");
    Ok(out)
}
