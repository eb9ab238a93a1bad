//! `/api/v1/alerts/episodes` and `/api/v1/remediations`: what the Alertmanager intake did with
//! each alert, and the remediations as on-call reads them.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::core::error::EngineError;
use crate::core::model::RunFilter;
use crate::engine::Engine;

/// `GET /api/v1/alerts/episodes`: the newest alert episodes, with what became of each
/// (started, held back by a guardrail and why, failed).
pub(crate) async fn alert_episodes(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
    let episodes = engine.store().alert_episodes().await.map_err(EngineError::from)?;
    Ok(Json(json!({ "episodes": episodes })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RemediationsQuery {
    limit: Option<u32>,
}

/// The runs of the `remediate` workflow as on-call reads them: alert, playbook, what was
/// planned and done (with the Kubernetes responses), outcome, time to resolve.
pub(crate) async fn remediations(
    State(engine): State<Engine>,
    q: Result<Query<RemediationsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let runs = engine
        .list_runs(&RunFilter {
            workflow: Some("remediate".into()),
            limit: q.limit,
            ..RunFilter::default()
        })
        .await?;
    let list: Vec<Value> = runs
        .into_iter()
        .map(|r| {
            let r = r.redacted();
            let out = r.output.clone().unwrap_or(Value::Null);
            json!({
                "id": r.id, "status": r.status, "playbook": r.input["playbook"],
                "alert": { "labels": r.input["labels"], "fingerprint": r.input["fingerprint"], "starts_at": r.input["starts_at"] },
                "started_by": r.started_by, "plan": out["plan"], "taken": out["taken"],
                "outcome": out.get("outcome").cloned().unwrap_or_else(|| json!(r.status)),
                "time_to_resolve_seconds": out["time_to_resolve_seconds"], "error": r.error,
                "created_at": r.created_at, "finished_at": r.finished_at,
            })
        })
        .collect();
    Ok(Json(json!({ "remediations": list })))
}
