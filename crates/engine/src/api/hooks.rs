//! `POST /hooks/{forge}` and `POST /hooks/alertmanager`: the trigger intakes' HTTP side.
//! Each checks the sender's credentials before it reads the body, within its own size, then
//! hands the request to its trigger ([`crate::triggers`]).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::Value;

use crate::api::error::ApiError;
use crate::api::server::{BodyTimeout, HookLimit, read_body};
use crate::api::state::Api;

/// The longest forge header value (event type, delivery id, signature) a delivery may carry.
const MAX_HOOK_HEADER: usize = 256;

/// `POST /hooks/{forge}`: a git forge's delivery.
pub(crate) async fn webhook(
    State(api): State<Api>,
    axum::Extension(HookLimit(limit)): axum::Extension<HookLimit>,
    axum::Extension(BodyTimeout(body_timeout)): axum::Extension<BodyTimeout>,
    Path(forge): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    use crate::triggers::webhook::{self, Forge};
    let forge = Forge::from_path(&forge).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no webhook endpoint for '{forge}'; use github, gitea, forgejo or gitlab"),
        )
    })?;
    let hooks = api.webhooks().cloned();
    let Some(secret) = hooks.as_ref().and_then(|h| h.secrets.get(&forge)) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_configured",
            format!(
                "webhooks from {} are not configured (webhooks.{}.secret)",
                forge.as_str(),
                forge.as_str()
            ),
        ));
    };
    let hooks = hooks.clone().expect("checked above");
    // What is stored and echoed of a delivery's headers is bounded.
    if let Some((name, value)) = headers.iter().find(|(name, value)| {
        let n = name.as_str();
        ["x-github-", "x-gitea-", "x-forgejo-", "x-gitlab-", "x-hub-", "x-gogs-"]
            .iter()
            .any(|p| n.starts_with(p))
            && value.len() > MAX_HOOK_HEADER
    }) {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header_too_large",
            format!(
                "header {name} is {} bytes; at most {MAX_HOOK_HEADER} are accepted",
                value.len()
            ),
        ));
    }
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "the delivery is sent as {:?}; choose application/json as the content type in the {} webhook's settings",
                media.chars().take(100).collect::<String>(),
                forge.as_str()
            ),
        ));
    }
    // GitLab's token is a header: checked before the body is read.
    if forge == Forge::Gitlab {
        webhook::verify(forge, &headers, &[], secret).map_err(|e| {
            crate::core::metrics::metrics().delivery(forge.as_str(), "refused");
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
        })?;
    }
    let bytes = read_body(body, limit, body_timeout).await?;
    let outcome = webhook::receive(api.engine(), &hooks, forge, secret, &headers, &bytes).await?;
    let status = StatusCode::from_u16(outcome.outcome.status()).expect("a valid status");
    Ok((status, Json(serde_json::to_value(outcome).unwrap_or(Value::Null))))
}

/// `POST /hooks/alertmanager`: an Alertmanager webhook notification (version 4).
pub(crate) async fn alertmanager(
    State(api): State<Api>,
    axum::Extension(BodyTimeout(body_timeout)): axum::Extension<BodyTimeout>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(alerts) = api.alerts().cloned() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_configured",
            "Alertmanager notifications are not configured (alertmanager.routes)",
        ));
    };
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    crate::triggers::alerts::admit(&alerts, authorization)?;
    let bytes = read_body(body, alerts.max_body, body_timeout).await?;
    let outcome = crate::triggers::alerts::receive(api.engine(), &alerts, &bytes).await?;
    Ok((
        StatusCode::OK,
        Json(serde_json::to_value(outcome).unwrap_or(Value::Null)),
    ))
}
