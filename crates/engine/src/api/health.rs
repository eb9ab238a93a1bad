//! `/healthz`, `/readyz` and `/metrics`: public unless configured otherwise, and saying
//! nothing of internals (which service is down, never its error).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::api::error::ApiError;
use crate::api::state::Api;
use crate::engine::Engine;

/// `/healthz`: the process answers.
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// `/readyz` is public: it names what is down, never an error's text (hosts, users, versions).
pub(crate) async fn ready(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
    let down = engine.unreachable().await;
    if !down.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("not ready: {} unreachable", down.join(" and ")),
        ));
    }
    Ok(Json(json!({ "status": "ready" })))
}

/// `/metrics`: the counters of this process, then what PostgreSQL says ([`crate::api::metrics`]).
pub(crate) async fn metrics(State(api): State<Api>) -> Result<Response, ApiError> {
    let text = crate::api::metrics::render(api.engine(), api.scheduler()).await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, crate::core::metrics::CONTENT_TYPE)],
        text,
    )
        .into_response())
}
