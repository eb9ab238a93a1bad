//! Serving the API to strangers: the limits one request, or all of them at once, may take
//! before anything is checked ([`Limits`]), the accept loop ([`serve`]) and the middlewares
//! that enforce them.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::api::error::ApiError;

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
pub(crate) struct Guard {
    limits: Limits,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Guard {
    pub(crate) fn new(limits: Limits) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_requests.max(1))),
            limits,
        })
    }
}

/// Before anything else: headers within their size, and a free slot (else 503 at once).
pub(crate) async fn admit(
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
pub(crate) async fn read_body_in_time(
    State(guard): State<std::sync::Arc<Guard>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
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
pub(crate) async fn read_body(
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

#[derive(Clone, Copy)]
pub(crate) struct HookLimit(pub(crate) usize);

/// How long an intake's body may take to arrive ([`Limits::body_timeout`]).
#[derive(Clone, Copy)]
pub(crate) struct BodyTimeout(pub(crate) std::time::Duration);
