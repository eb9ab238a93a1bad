//! The HTTP API (`/api/v1`), health and readiness.
//!
//! Every call but health, readiness, metrics and the webhook endpoints needs a bearer token of
//! a role that may make it ([`crate::auth`]); 401 without a valid token, 403 with a weaker role.
//! What a caller changes is recorded in the audit trail with its name.
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

use crate::auth::{Caller, Role};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::model::{RunFilter, RunId, RunStatus, StartRun};
use crate::schedule::Scheduler;

/// The longest forge header value (event type, delivery id, signature) a delivery may carry.
const MAX_HOOK_HEADER: usize = 256;

/// What `serve` lets one request, or all of them at once, take before anything is checked.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests handled at once; more are answered 503 at once (load shedding), not queued.
    pub max_concurrent_requests: usize,
    /// How long a request body may take to arrive (a client sending one byte a minute holds
    /// nothing longer than this). 408 after it.
    pub body_timeout: std::time::Duration,
    /// All the request's header names and values together; 431 above it.
    pub max_header_bytes: usize,
    /// The largest API request body (webhook and Alertmanager bodies have their own); 413.
    pub max_body_bytes: usize,
    /// How long a client may take to send a request's headers; the connection is closed after
    /// it ([`serve`]).
    pub header_timeout: std::time::Duration,
    /// Connections open at once; more are closed as they are accepted ([`serve`]).
    pub max_connections: usize,
    /// How long the caller waits for an answer; 504 after it. The handler is not cut off (it
    /// finishes in the background, holding its slot), so nothing is left half done.
    pub request_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 512,
            body_timeout: std::time::Duration::from_secs(10),
            max_header_bytes: 16 << 10,
            max_body_bytes: 2 << 20,
            header_timeout: std::time::Duration::from_secs(10),
            max_connections: 1024,
            request_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// The API's routes, on an engine, with the default [`Limits`].
pub fn router(engine: Engine) -> Router {
    router_with(engine, Limits::default())
}

/// The API's routes, on an engine.
pub fn router_with(engine: Engine, limits: Limits) -> Router {
    let hook_limit = engine.inner.webhooks.as_ref().map(|w| w.max_body).unwrap_or(1 << 20);
    let limits = std::sync::Arc::new(Guard {
        permits: std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_requests.max(1))),
        limits,
    });
    Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/workflows", get(workflows))
        .route("/api/v1/runs", post(start_run).get(list_runs))
        .route("/api/v1/runs/summary", get(run_summary))
        .route("/api/v1/runs/{id}", get(get_run))
        .route("/api/v1/runs/{id}/events", get(run_events))
        .route("/api/v1/runs/{id}/cancel", post(cancel_run))
        .route("/api/v1/runs/{id}/signals/{name}", post(signal_run))
        .route("/api/v1/runs/{id}/approve", post(approve_run))
        .route("/api/v1/runs/{id}/reject", post(reject_run))
        .route("/api/v1/runs/{id}/retry", post(retry_run))
        .route("/api/v1/runs/{id}/trigger", get(run_trigger))
        .route("/api/v1/approvals", get(approvals))
        .route("/api/v1/whoami", get(whoami))
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
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{name}", axum::routing::delete(revoke_token))
        .route("/api/v1/audit", get(audit_log))
        .merge(crate::console::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::Extension(HookLimit(hook_limit)))
        .layer(axum::Extension(BodyTimeout(limits.limits.body_timeout)))
        .layer(axum::middleware::from_fn_with_state(limits.clone(), read_body_in_time))
        .layer(axum::middleware::from_fn_with_state(engine.clone(), authenticate))
        .layer(axum::middleware::from_fn_with_state(limits, admit))
        .with_state(engine)
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the requests in flight
/// finish (the caller bounds how long). Over `axum::serve` it adds what a server facing
/// strangers needs before any request reaches a handler: a deadline for the headers
/// (`limits.header_timeout`: a client trickling them holds a connection no longer) and a cap on
/// open connections (`limits.max_connections`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: &Limits,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let header_timeout = limits.header_timeout;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, say: wait a moment rather than spin.
                tracing::warn!(error = %e, "Accepting a connection failed.");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = limits.max_connections,
                "Too many open connections; closing a new one."
            );
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone()
                .map_request(|r: axum::http::Request<hyper::body::Incoming>| r.map(axum::body::Body::new)),
        );
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopped.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// The limits as the middleware holds them.
struct Guard {
    limits: Limits,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Before anything else: headers within their size, and a free slot (else 503 at once).
async fn admit(
    State(guard): State<std::sync::Arc<Guard>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > guard.limits.max_header_bytes {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request's headers are {header_bytes} bytes; at most {} are accepted",
                guard.limits.max_header_bytes
            ),
        )
        .into_response();
    }
    let Ok(permit) = guard.permits.clone().try_acquire_owned() else {
        let mut r = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many requests in flight; try again shortly",
        )
        .into_response();
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        return r;
    };
    // The handler runs as a task of its own, holding its slot until it ends: past the deadline
    // the caller gets 504, but the handler is never cut off in the middle of a transaction
    // (see ARCHITECTURE.md, "Rules the runtime keeps").
    let handler = tokio::spawn(async move {
        let _permit = permit;
        next.run(request).await
    });
    match tokio::time::timeout(guard.limits.request_timeout, handler).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "A request handler panicked.");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request failed").into_response()
        }
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "request_timeout",
            format!(
                "no answer within {}; what was asked may still complete (look before asking again)",
                humantime::format_duration(guard.limits.request_timeout)
            ),
        )
        .into_response(),
    }
}

/// After authentication: an API request's body is read within `body_timeout` and
/// `max_body_bytes`, before any handler sees it. The intake endpoints (`/hooks/…`) check their
/// credentials first and read their own bodies, within the same time.
async fn read_body_in_time(
    State(guard): State<std::sync::Arc<Guard>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.uri().path().starts_with("/hooks/") {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let limits = &guard.limits;
    match read_body(body, limits.max_body_bytes, limits.body_timeout).await {
        Ok(bytes) => {
            next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Err(e) => e.into_response(),
    }
}

/// Reads a body of at most `limit` bytes within `timeout`: 413 above it, 408 too slow.
async fn read_body(
    body: axum::body::Body,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<axum::body::Bytes, ApiError> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is larger than {limit} bytes"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the body did not arrive within {}", humantime::format_duration(timeout)),
        )),
    }
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
            EngineError::Forbidden(_) => Self::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
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

/// Checks the caller's token against the role the call needs; the caller goes into the
/// request's extensions for the handlers.
async fn authenticate(
    State(engine): State<Engine>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(needed) = crate::auth::required_role(request.method(), request.uri().path(), &engine.inner.auth) else {
        return next.run(request).await;
    };
    let token = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer)
        .unwrap_or("");
    let unauthorized = |message: &str| {
        let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
        r.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer realm=\"dayshift\""),
        );
        r
    };
    if token.is_empty() {
        return unauthorized(
            "this endpoint needs a bearer token (Authorization: Bearer …); `dayshift tokens create` makes one",
        );
    }
    let oidc = engine
        .inner
        .auth
        .oidc
        .as_ref()
        .filter(|_| !token.starts_with(crate::auth::TOKEN_PREFIX) && token.matches('.').count() == 2);
    let caller = match oidc {
        Some(oidc) => match oidc.verify(token).await {
            Ok(caller) => caller,
            Err(crate::auth::OidcRefusal::Invalid(why)) => {
                tracing::info!(reason = %why, "OIDC token refused.");
                return unauthorized(&format!("the bearer token is not valid: {why}"));
            }
            Err(crate::auth::OidcRefusal::NoRole(why)) => {
                return ApiError::new(StatusCode::FORBIDDEN, "forbidden", why).into_response();
            }
        },
        None => match crate::auth::authenticate(engine.store().pool(), token).await {
            Ok(Some(caller)) => caller,
            Ok(None) => return unauthorized("the bearer token is not valid (unknown, revoked or expired)"),
            Err(e) => return ApiError::from(EngineError::from(e)).into_response(),
        },
    };
    if caller.role < needed {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this needs the {needed} role; {} has {}", caller.name, caller.role),
        )
        .into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

type Who = axum::Extension<Caller>;

/// Records what `caller` did; a failure to record is logged (the action has happened).
async fn audit(engine: &Engine, caller: &Caller, action: &str, target: &str, detail: Value) {
    if let Err(e) = crate::auth::audit(
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

fn parse_id(id: &str) -> Result<RunId, ApiError> {
    id.parse()
        .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_run_id", e))
}

/// `/readyz` is public: it names what is down, never an error's text (hosts, users, versions).
async fn ready(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
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

async fn metrics(State(engine): State<Engine>) -> Result<Response, ApiError> {
    let text = crate::metrics::render(&engine).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// The workflows, each saying whether the caller may start it (and why not).
async fn workflows(State(engine): State<Engine>, axum::Extension(caller): Who) -> Json<Value> {
    Json(json!({ "workflows": engine.workflows_for(&caller) }))
}

async fn start_run(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Body(mut req): Body<StartRun>,
) -> Result<Response, ApiError> {
    req.started_by = Some(format!("api:{}", caller.name));
    if let Err(e) = engine.check_api_start(&caller, &req) {
        if let EngineError::Forbidden(why) = &e {
            audit(
                &engine,
                &caller,
                "run.start.refused",
                &req.workflow,
                json!({ "why": why }),
            )
            .await;
        }
        return Err(e.into());
    }
    let keys = [
        ("idempotency_key", req.idempotency_key.as_deref()),
        ("concurrency.key", req.concurrency.as_ref().map(|c| c.key.as_str())),
    ];
    for (field, key) in keys {
        if let Some(key) = key {
            crate::model::check_api_key(field, key)
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_key", e))?;
        }
    }
    let workflow = req.workflow.clone();
    let started = engine.start(req).await?;
    if started.created {
        audit(
            &engine,
            &caller,
            "run.start",
            &started.id.to_string(),
            json!({ "workflow": workflow }),
        )
        .await;
    }
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
    trigger: Option<String>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
    before: Option<String>,
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
    let before = match q.before.as_deref() {
        None | Some("") => None,
        Some(id) => Some(parse_id(id)?),
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let runs = engine
        .list_runs(&RunFilter {
            status,
            workflow: q.workflow.filter(|w| !w.is_empty()),
            trigger: q.trigger.filter(|t| !t.is_empty()),
            since: q.since,
            until: q.until,
            before,
            limit: Some(limit),
        })
        .await?;
    // A full page may have more after it: `next` is the cursor for `before`.
    let next = (runs.len() == limit as usize)
        .then(|| runs.last().map(|r| r.id.to_string()))
        .flatten();
    // What the runs still going wait on (a signal, a timer, a child, a retry), at a glance.
    let going: Vec<RunId> = runs.iter().filter(|r| !r.status.is_terminal()).map(|r| r.id).collect();
    let mut waiting = crate::views::waiting_on(&engine, &going).await?;
    let runs: Vec<Value> = runs
        .into_iter()
        .map(|r| {
            let id = r.id;
            let mut v = serde_json::to_value(r.redacted()).unwrap_or(Value::Null);
            if let Some(w) = waiting.remove(&id) {
                v["waiting_on"] = w;
            }
            v
        })
        .collect();
    Ok(Json(json!({ "runs": runs, "next": next })))
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
    axum::Extension(caller): Who,
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
    let status = engine.cancel(id, reason.as_deref(), &caller.name).await?;
    audit(
        &engine,
        &caller,
        "run.cancel",
        &id.to_string(),
        json!({ "reason": reason }),
    )
    .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "status": status, "cancel_requested": true })),
    ))
}

async fn signal_run(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Path((id, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    if crate::approval::is_reserved_signal(&name) {
        audit(
            &engine,
            &caller,
            "run.signal.refused",
            &id.to_string(),
            json!({ "signal": name }),
        )
        .await;
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "reserved_signal",
            format!(
                "the signal '{name}' is the engine's own and cannot be sent here; approve or reject with \
                 POST /api/v1/runs/{id}/approve or /reject (as yourself)"
            ),
        ));
    }
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
    engine.signal(id, &name, payload, &caller.name).await?;
    audit(
        &engine,
        &caller,
        "run.signal",
        &id.to_string(),
        json!({ "signal": name }),
    )
    .await;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id, "signal": name }))))
}

/// An approve or reject call: why. Who decides is the caller.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    /// If given, it must be the caller's identity: no one decides as someone else.
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    comment: Option<String>,
}

async fn approve_run(
    engine: State<Engine>,
    caller: Who,
    id: Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    decide(engine, caller, id, body, true).await
}

async fn reject_run(
    engine: State<Engine>,
    caller: Who,
    id: Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    decide(engine, caller, id, body, false).await
}

/// An approval or rejection, as the authenticated caller. A caller the gate would not count
/// (not an approver, the change's author, approved already) is refused here with why, and the
/// refusal is in the audit trail; the gate applies the same rule to what reaches it.
async fn decide(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Path(id): Path<String>,
    body: axum::body::Bytes,
    approve: bool,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    let action = if approve { "run.approve" } else { "run.reject" };
    let d: DecisionBody = if body.is_empty() {
        DecisionBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("decision body: {e}")))?
    };
    let refused = |why: String| {
        let (engine, caller, id) = (engine.clone(), caller.clone(), id);
        async move {
            audit(
                &engine,
                &caller,
                &format!("{action}.refused"),
                &id.to_string(),
                json!({ "why": why }),
            )
            .await;
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", why)
        }
    };
    // `by` (the CLI's `--as`) only asserts who the caller is: the identity, or its bare name.
    if let Some(by) = d.by.as_deref()
        && by != caller.name
        && caller.name.split_once(':').map(|(_, bare)| bare) != Some(by)
    {
        return Err(refused(format!("{} cannot decide as '{by}'", caller.name)).await);
    }
    match engine.decide(id, &caller, approve, d.comment.clone()).await {
        Ok(()) => {}
        Err(EngineError::Forbidden(why)) => return Err(refused(why).await),
        Err(e) => return Err(e.into()),
    }
    audit(
        &engine,
        &caller,
        action,
        &id.to_string(),
        json!({ "comment": d.comment }),
    )
    .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "decision": if approve { "approve" } else { "reject" }, "by": caller.name })),
    ))
}

/// `POST /api/v1/runs/{id}/retry`: a failed or cancelled run started again, as a new run of
/// the same workflow with the same input (the stored one, not the redacted one shown) and
/// under the same concurrency key (queued for a slot). Retrying a run twice gives the first
/// retry back (`200`): a double click starts one run; to retry again, retry the newer run.
async fn retry_run(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let run = engine.get_run(id).await?;
    if !matches!(run.status, RunStatus::Failed | RunStatus::Cancelled) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "run {id} is {}; only a failed or cancelled run can be retried",
                run.status
            ),
        ));
    }
    let mut req = StartRun::new(run.workflow.clone(), run.input);
    req.idempotency_key = Some(format!("retry:{id}"));
    req.started_by = Some(format!("api:{} (retry of {id})", caller.name));
    if let Some(key) = run.concurrency_key {
        let limit = crate::views::concurrency_limit(&engine, id).await?.unwrap_or(1).max(1);
        req = req.concurrency(key, limit as u32, crate::model::ConcurrencyPolicy::Queue);
    }
    // A retry is a start through the API: the same policy applies to it.
    engine.check_api_start(&caller, &req)?;
    let started = engine.start(req).await?;
    if started.created {
        audit(
            &engine,
            &caller,
            "run.retry",
            &id.to_string(),
            json!({ "run_id": started.id, "workflow": run.workflow }),
        )
        .await;
    }
    let status = if started.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "id": started.id, "status": started.status, "created": started.created, "retry_of": id })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SummaryQuery {
    since: Option<chrono::DateTime<chrono::Utc>>,
}

/// `GET /api/v1/runs/summary?since=`: how many runs were created since then (default: the
/// last 24 hours), by status.
async fn run_summary(
    State(engine): State<Engine>,
    q: Result<Query<SummaryQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let since = q
        .since
        .unwrap_or_else(|| chrono::Utc::now() - chrono::Duration::hours(24));
    Ok(Json(crate::views::run_counts(&engine, since).await?))
}

/// `GET /api/v1/runs/{id}/trigger`: what started the run (see [`crate::views::trigger`]).
async fn run_trigger(State(engine): State<Engine>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let run = engine.get_run(parse_id(&id)?).await?;
    Ok(Json(crate::views::trigger(&engine, &run).await?))
}

/// `GET /api/v1/approvals`: the runs waiting at an approval gate (see [`crate::views::approvals`]).
async fn approvals(State(engine): State<Engine>, axum::Extension(caller): Who) -> Result<Json<Value>, ApiError> {
    let approvals = crate::views::approvals(&engine, &caller).await?;
    Ok(Json(json!({ "approvals": approvals })))
}

/// `GET /api/v1/whoami`: the caller's name and role, and what that role may do.
async fn whoami(axum::Extension(caller): Who) -> Json<Value> {
    Json(json!({
        "name": caller.name,
        "role": caller.role,
        "may": { "operate": caller.role >= Role::Operator, "administer": caller.role >= Role::Admin },
    }))
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

async fn list_schedules(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
    let schedules = Scheduler::new(engine).list().await?;
    Ok(Json(json!({ "schedules": schedules })))
}

async fn get_schedule(State(engine): State<Engine>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let schedule = Scheduler::new(engine).get(&name).await?;
    Ok(Json(serde_json::to_value(schedule).unwrap_or(Value::Null)))
}

async fn pause_schedule(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let schedule = Scheduler::new(engine.clone()).pause(&name, &caller.name).await?;
    audit(&engine, &caller, "schedule.pause", &name, Value::Null).await;
    Ok(Json(serde_json::to_value(schedule).unwrap_or(Value::Null)))
}

async fn resume_schedule(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let schedule = Scheduler::new(engine.clone()).resume(&name, &caller.name).await?;
    audit(&engine, &caller, "schedule.resume", &name, Value::Null).await;
    Ok(Json(serde_json::to_value(schedule).unwrap_or(Value::Null)))
}

async fn trigger_schedule(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let run = Scheduler::new(engine.clone()).trigger(&name, &caller.name).await?;
    audit(&engine, &caller, "schedule.trigger", &name, json!({ "run_id": run })).await;
    Ok((StatusCode::CREATED, Json(json!({ "schedule": name, "run_id": run }))))
}

async fn list_tokens(State(engine): State<Engine>) -> Result<Json<Value>, ApiError> {
    let tokens = crate::auth::list_tokens(engine.store().pool())
        .await
        .map_err(EngineError::from)?;
    Ok(Json(json!({ "tokens": tokens })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: Role,
    /// When it stops working, e.g. `90d`; never if absent.
    #[serde(default, with = "humantime_serde")]
    expires_in: Option<std::time::Duration>,
}

/// `POST /api/v1/tokens`: the token is in this answer and nowhere else.
async fn create_token(
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
    let token = crate::auth::create_token(engine.store().pool(), &t.name, t.role, expires_at, &caller.name)
        .await
        .map_err(|e| match e {
            crate::error::StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            other => ApiError::from(EngineError::from(other)),
        })?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": t.name, "role": t.role, "expires_at": expires_at, "token": token })),
    ))
}

async fn revoke_token(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let revoked = crate::auth::revoke_token(engine.store().pool(), &name, &caller.name)
        .await
        .map_err(EngineError::from)?;
    if !revoked {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no live token named '{name}'"),
        ));
    }
    Ok(Json(json!({ "name": name, "revoked": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    target: Option<String>,
    limit: Option<u32>,
}

async fn audit_log(
    State(engine): State<Engine>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let entries = crate::auth::list_audit(engine.store().pool(), q.target.as_deref(), q.limit.unwrap_or(200))
        .await
        .map_err(EngineError::from)?;
    Ok(Json(json!({ "audit": entries })))
}

#[derive(Clone, Copy)]
struct HookLimit(usize);

/// How long an intake's body may take to arrive ([`Limits::body_timeout`]).
#[derive(Clone, Copy)]
struct BodyTimeout(std::time::Duration);

/// `POST /hooks/{forge}`: a git forge's delivery.
async fn webhook(
    State(engine): State<Engine>,
    axum::Extension(HookLimit(limit)): axum::Extension<HookLimit>,
    axum::Extension(BodyTimeout(body_timeout)): axum::Extension<BodyTimeout>,
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
            crate::metrics::metrics().delivery(forge.as_str(), "refused");
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
        })?;
    }
    let bytes = read_body(body, limit, body_timeout).await?;
    webhook::verify(forge, &headers, &bytes, secret).map_err(|e| {
        tracing::warn!(forge = forge.as_str(), error = %e, "Webhook delivery refused.");
        crate::metrics::metrics().delivery(forge.as_str(), "refused");
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    })?;
    let parsed = webhook::parse(forge, &headers, &bytes).map_err(|e| match e {
        HookError::Unauthorized(m) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m),
        HookError::BadRequest(m) => ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m),
    })?;
    let payload: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    // The delivery's span: the runs it starts link to it.
    let span =
        tracing::info_span!("webhook", otel.name = %format!("webhook {}", forge.as_str()), forge = forge.as_str());
    let outcome = tracing::Instrument::instrument(
        webhook::deliver(&engine, &hooks, forge, parsed, &payload, &digest),
        span,
    )
    .await?;
    crate::metrics::metrics().delivery(forge.as_str(), &outcome.outcome);
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
    axum::Extension(BodyTimeout(body_timeout)): axum::Extension<BodyTimeout>,
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
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !alerts.auth.admits(authorization) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong credentials (the token or basic auth of alertmanager in dayshift's config)",
        ));
    }
    let bytes = read_body(body, alerts.max_body, body_timeout).await?;
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
    let span = tracing::info_span!(
        "alertmanager",
        otel.name = "alertmanager notification",
        receiver = notification.receiver.as_deref().unwrap_or("")
    );
    let outcome = tracing::Instrument::instrument(crate::alerts::handle(&engine, &alerts, notification), span).await?;
    let m = crate::metrics::metrics();
    let results = [
        ("started", outcome.started.len()),
        ("duplicate", outcome.duplicates),
        ("held_back", outcome.held_back.len()),
        ("resolved", outcome.resolved_signals),
        ("no_route", outcome.no_route),
        ("failed", outcome.errors.len()),
    ];
    for (result, n) in results {
        for _ in 0..n {
            m.delivery("alertmanager", result);
        }
    }
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
