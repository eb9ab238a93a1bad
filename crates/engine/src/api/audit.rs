//! The audit trail: what each caller changed, recorded as it happens and read at
//! `/api/v1/audit`.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::core::error::EngineError;
use crate::engine::Engine;
use crate::identity::Caller;

/// Records what `caller` did; a failure to record is logged (the action has happened).
pub(crate) async fn audit(engine: &Engine, caller: &Caller, action: &str, target: &str, detail: Value) {
    if let Err(e) = crate::api::auth::audit(
        engine.store().pool(),
        &caller.name,
        Some(caller.role),
        action,
        Some(target),
        detail,
    )
    .await
    {
        tracing::error!(error = %e, actor = %caller.name, action, target, "Audit entry not recorded.");
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    target: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn audit_log(
    State(engine): State<Engine>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let entries = crate::api::auth::list_audit(engine.store().pool(), q.target.as_deref(), q.limit.unwrap_or(200))
        .await
        .map_err(EngineError::from)?;
    Ok(Json(json!({ "audit": entries })))
}
