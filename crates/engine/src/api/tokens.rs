//! `/api/v1/tokens` (an admin's) and `/api/v1/whoami` (anyone's): API tokens, shown once when
//! created and never again, and who the caller is.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::access::Who;
use crate::api::error::{ApiError, Body};
use crate::core::error::EngineError;
use crate::engine::Engine;
use crate::identity::Role;

pub(crate) async fn list_tokens(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
    let tokens = crate::api::auth::list_tokens(engine.store().pool())
        .await
        .map_err(EngineError::from)?;
    Ok(Json(json!({ "tokens": tokens })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewToken {
    name: String,
    role: Role,
    /// When it stops working, e.g. `90d`; never if absent.
    #[serde(default, with = "humantime_serde")]
    expires_in: Option<std::time::Duration>,
}

/// `POST /api/v1/tokens`: the token is in this answer and nowhere else.
pub(crate) async fn create_token(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Body(t): Body<NewToken>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    const TEN_YEARS: std::time::Duration = std::time::Duration::from_secs(10 * 366 * 86400);
    if t.expires_in.is_some_and(|d| d > TEN_YEARS || d.is_zero()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            "expires_in must be more than 0 and at most 10 years (omit it for a token that does not expire)",
        ));
    }
    let expires_at = t
        .expires_in
        .and_then(|d| chrono::Duration::from_std(d).ok())
        .map(|d| chrono::Utc::now() + d);
    let token = crate::api::auth::create_token(engine.store().pool(), &t.name, t.role, expires_at, &caller.name)
        .await
        .map_err(|e| match e {
            crate::core::error::StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            other => ApiError::from(EngineError::from(other)),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": t.name, "role": t.role, "expires_at": expires_at, "token": token })),
    ))
}

pub(crate) async fn revoke_token(
    State(api): State<crate::api::Api>,
    axum::Extension(caller): Who,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let revoked = crate::api::auth::revoke_token(api.engine().store().pool(), &name, &caller.name)
        .await
        .map_err(EngineError::from)?;
    // At once on this serve; elsewhere within `server.token-cache-ttl`.
    api.tokens().forget_all();
    if !revoked {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no live token named '{name}'"),
        ));
    }
    Ok(Json(json!({ "name": name, "revoked": true })))
}

/// `GET /api/v1/whoami`: the caller's name and role, and what that role may do.
pub(crate) async fn whoami(axum::Extension(caller): Who) -> Json<Value> {
    Json(json!({
        "name": caller.name,
        "role": caller.role,
        "may": { "operate": caller.role >= Role::Operator, "administer": caller.role >= Role::Admin },
    }))
}
