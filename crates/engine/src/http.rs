//! The HTTP API (`/api/v1`), health and readiness.
//!
//! Errors are JSON `{"error": "...", "code": "..."}` with a 4xx that says what is wrong, or a
//! 500/503 that hides internals (details go to the log).

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::EngineError;
use crate::model::{RunFilter, RunId, RunStatus, StartRun};
use crate::schedule::Scheduler;

/// The API's routes, on an engine.
pub fn router(engine: Engine) -> Router {
    let hook_limit = engine.inner.webhooks.as_ref().map(|w| w.max_body).unwrap_or(1 << 20);
    Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/workflows", get(workflows))
        .route("/api/v1/runs", post(start_run).get(list_runs))
        .route("/api/v1/runs/{id}", get(get_run))
        .route("/api/v1/runs/{id}/events", get(run_events))
        .route("/api/v1/runs/{id}/cancel", post(cancel_run))
        .route("/api/v1/runs/{id}/signals/{name}", post(signal_run))
        .route("/api/v1/runs/{id}/approve", post(approve_run))
        .route("/api/v1/runs/{id}/reject", post(reject_run))
        .route(
            "/hooks/alertmanager",
            post(alertmanager).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/hooks/{forge}",
            post(webhook).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/api/v1/alerts/episodes", get(alert_episodes))
        .route("/api/v1/remediations", get(remediations))
        .route("/api/v1/schedules", get(list_schedules))
        .route("/api/v1/schedules/{name}", get(get_schedule))
        .route("/api/v1/schedules/{name}/pause", post(pause_schedule))
        .route("/api/v1/schedules/{name}/resume", post(resume_schedule))
        .route("/api/v1/schedules/{name}/trigger", post(trigger_schedule))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::Extension(HookLimit(hook_limit)))
        .with_state(engine)
}

/// An API error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message, "code": self.code }))).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::UnknownWorkflow(_) => Self::new(StatusCode::NOT_FOUND, "unknown_workflow", e.to_string()),
            EngineError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            EngineError::RunNotFound(_) => Self::new(StatusCode::NOT_FOUND, "run_not_found", e.to_string()),
            EngineError::InvalidInput { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", e.to_string())
            }
            EngineError::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            EngineError::BadRequest(_) => Self::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            EngineError::Store(_) | EngineError::Queue(_) => {
                tracing::error!(error = %e, "API request failed.");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the engine's database or queue is unavailable; try again",
                )
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        // 400 for a body that is not JSON or not the request's shape, 415 without a JSON type.
        let (status, code) = match r {
            JsonRejection::MissingJsonContentType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_json"),
            JsonRejection::JsonDataError(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            _ => (StatusCode::BAD_REQUEST, "invalid_json"),
        };
        Self::new(status, code, format!("request body: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_query", r.body_text())
    }
}

/// `Json` whose rejection is an [`ApiError`].
#[derive(FromRequest)]
#[from_request(via(Json), rejection(ApiError))]
struct Body<T>(T);

fn parse_id(id: &str) -> Result<RunId, ApiError> {
    id.parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_run_id", e))
}

async fn ready(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
    engine.ready().await.map_err(|e| {
        tracing::warn!(error = %e, "Not ready.");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", format!("not ready: {e}"))
    })?;
    Ok(Json(json!({ "status": "ready" })))
}

async fn metrics(State(engine): State<Engine>) -> Result<Response, ApiError> {
    let text = crate::metrics::render(&engine).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn workflows(State(engine): State<Engine>) -> Json<Value> {
    Json(json!({ "workflows": engine.workflows() }))
}

async fn start_run(State(engine): State<Engine>, Body(mut req): Body<StartRun>) -> Result<Response, ApiError> {
    req.started_by = Some("api".into());
    let started = engine.start(req).await?;
    let status = if started.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(started)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    workflow: Option<String>,
    limit: Option<u32>,
}

async fn list_runs(
    State(engine): State<Engine>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<RunStatus>()
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", format!("status: {e}")))?,
        ),
    };
    let runs = engine
        .list_runs(&RunFilter {
            status,
            workflow: q.workflow.filter(|w| !w.is_empty()),
            limit: q.limit,
        })
        .await?;
    let runs: Vec<_> = runs.into_iter().map(crate::model::RunView::redacted).collect();
    Ok(Json(json!({ "runs": runs })))
}

async fn get_run(State(engine): State<Engine>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let run = engine.get_run(parse_id(&id)?).await?.redacted();
    Ok(Json(serde_json::to_value(run).unwrap_or(Value::Null)))
}

async fn run_events(State(engine): State<Engine>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let events = engine.events(parse_id(&id)?).await?;
    Ok(Json(json!({ "events": events })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

async fn cancel_run(
    State(engine): State<Engine>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    let reason = if body.is_empty() {
        None
    } else {
        serde_json::from_slice::<CancelBody>(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("cancel body: {e}")))?
            .reason
    };
    let status = engine.cancel(id, reason.as_deref(), "api").await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "status": status, "cancel_requested": true })),
    ))
}

async fn signal_run(
    State(engine): State<Engine>,
    Path((id, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    let payload: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("signal payload is not JSON: {e}"),
            )
        })?
    };
    engine.signal(id, &name, payload, "api").await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id, "signal": name }))))
}

/// An approve or reject call: who decides, and why.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    by: String,
    #[serde(default)]
    comment: Option<String>,
}

async fn approve_run(
    engine: State<Engine>,
    id: Path<String>,
    body: Body<DecisionBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    decide(engine, id, body, true).await
}

async fn reject_run(
    engine: State<Engine>,
    id: Path<String>,
    body: Body<DecisionBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    decide(engine, id, body, false).await
}

/// Approvals are the signal `approval` with `{by, approve, comment}`; the workflow decides
/// whether the decision counts (who may approve, no self-approval) and journals it.
async fn decide(
    State(engine): State<Engine>,
    Path(id): Path<String>,
    Body(d): Body<DecisionBody>,
    approve: bool,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    if d.by.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "`by` must name who decides",
        ));
    }
    let payload = json!({ "by": d.by, "approve": approve, "comment": d.comment });
    engine.signal(id, "approval", payload, &d.by).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "decision": if approve { "approve" } else { "reject" }, "by": d.by })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemediationsQuery {
    limit: Option<u32>,
}

/// The runs of the `remediate` workflow as on-call reads them: alert, playbook, what was
/// planned and done (with the Kubernetes responses), outcome, time to resolve.
async fn remediations(
    State(engine): State<Engine>,
    q: Result<Query<RemediationsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let runs = engine
        .list_runs(&RunFilter {
            status: None,
            workflow: Some("remediate".into()),
            limit: q.limit,
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

async fn list_schedules(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
    let schedules = Scheduler::new(engine).list().await?;
    Ok(Json(json!({ "schedules": schedules })))
}

async fn get_schedule(State(engine): State<Engine>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let schedule = Scheduler::new(engine).get(&name).await?;
    Ok(Json(serde_json::to_value(schedule).unwrap_or(Value::Null)))
}

async fn pause_schedule(State(engine): State<Engine>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let schedule = Scheduler::new(engine).pause(&name, "api").await?;
    Ok(Json(serde_json::to_value(schedule).unwrap_or(Value::Null)))
}

async fn resume_schedule(State(engine): State<Engine>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let schedule = Scheduler::new(engine).resume(&name, "api").await?;
    Ok(Json(serde_json::to_value(schedule).unwrap_or(Value::Null)))
}

async fn trigger_schedule(
    State(engine): State<Engine>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let run = Scheduler::new(engine).trigger(&name, "api").await?;
    Ok((StatusCode::CREATED, Json(json!({ "schedule": name, "run_id": run }))))
}

#[derive(Clone, Copy)]
struct HookLimit(usize);

/// `POST /hooks/{forge}`: a git forge's delivery.
async fn webhook(
    State(engine): State<Engine>,
    axum::Extension(HookLimit(limit)): axum::Extension<HookLimit>,
    Path(forge): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    use crate::webhook::{self, Forge, HookError};
    let forge = Forge::from_path(&forge).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no webhook endpoint for '{forge}'; use github, gitea, forgejo or gitlab"),
        )
    })?;
    let hooks = engine.inner.webhooks.clone();
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
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is larger than {limit} bytes"),
        )
    })?;
    webhook::verify(forge, &headers, &bytes, secret).map_err(|e| {
        tracing::warn!(forge = forge.as_str(), error = %e, "Webhook delivery refused.");
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    })?;
    let parsed = webhook::parse(forge, &headers, &bytes).map_err(|e| match e {
        HookError::Unauthorized(m) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m),
        HookError::BadRequest(m) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m),
    })?;
    let payload: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let outcome = webhook::deliver(&engine, &hooks, forge, parsed, &payload).await?;
    let status = match outcome.outcome.as_str() {
        "pong" | "duplicate" => StatusCode::OK,
        "failed" => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::ACCEPTED,
    };
    Ok((status, Json(serde_json::to_value(outcome).unwrap_or(Value::Null))))
}

/// `POST /hooks/alertmanager`: an Alertmanager webhook notification (version 4).
async fn alertmanager(
    State(engine): State<Engine>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(alerts) = engine.inner.alerts.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_configured",
            "Alertmanager notifications are not configured (alertmanager.routes)",
        ));
    };
    if let Some(token) = &alerts.token {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let same = given.len() == token.len() && given.bytes().zip(token).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0;
        if !same {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or wrong bearer token",
            ));
        }
    }
    let bytes = axum::body::to_bytes(body, alerts.max_body).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is larger than {} bytes", alerts.max_body),
        )
    })?;
    let notification: crate::alerts::Notification = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("not an Alertmanager notification: {e}"),
        )
    })?;
    if notification.version != "4" {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "notification version {} is not supported; Alertmanager sends version 4",
                notification.version
            ),
        ));
    }
    let outcome = crate::alerts::handle(&engine, &alerts, notification).await?;
    Ok((
        StatusCode::OK,
        Json(serde_json::to_value(outcome).unwrap_or(Value::Null)),
    ))
}

/// `GET /api/v1/alerts/episodes`: the newest alert episodes, with what became of each
/// (started, held back by a guardrail and why, failed).
async fn alert_episodes(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
    let rows: Vec<(Value,)> = sqlx::query_as(
        "select jsonb_build_object('route', route, 'fingerprint', fingerprint, 'starts_at', starts_at, \
           'target', target, 'labels', labels, 'outcome', outcome, 'detail', detail, 'run_id', run_id, \
           'first_seen', first_seen, 'started_at', started_at, 'resolved_at', resolved_at) \
         from alert_episodes order by first_seen desc limit 500",
    )
    .fetch_all(engine.store().pool())
    .await
    .map_err(|e| ApiError::from(EngineError::from(e)))?;
    Ok(Json(
        json!({ "episodes": rows.into_iter().map(|(v,)| v).collect::<Vec<_>>() }),
    ))
}
