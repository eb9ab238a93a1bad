//! Serving the API to strangers: the config file's `server:` section ([`ServerConfig`]: where
//! to listen, who is let in besides dayshift's tokens, and the limits one request, or all of
//! them at once, may take before anything is checked), the accept loop ([`serve`]) and the
//! middlewares that enforce the limits.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::api::auth::OidcConfig;
use crate::api::error::ApiError;
use crate::core::error::ConfigError;

// The config file's `server:` section, which is also what `serve` and the router take: one
// type, because its keys are one flat map in the file and serde's `flatten` cannot be combined
// with `deny_unknown_fields`. `listen` is the binary's; `public-metrics` and `oidc` reach the
// API as its `AuthConfig` (the OIDC verifier is built from them); the rest are the limits one
// request, or all of them at once, may take before anything is checked. Its doc comments are
// the schema's descriptions.
/// HTTP API settings.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    #[schemars(with = "String")]
    pub listen: std::net::SocketAddr,
    /// Serve `/metrics` without a token (for Prometheus). Default true; false: it needs a
    /// viewer token.
    pub public_metrics: bool,
    /// Also accept JWTs of the platform's OpenID Connect provider (Keycloak, Authentik, ...).
    pub oidc: Option<OidcConfig>,
    /// Requests handled at once; more get 503 at once (with `Retry-After`), never a queue.
    /// Default 512.
    // Load shedding: a queue would only make every caller wait.
    pub max_concurrent_requests: usize,
    /// How long a request body may take to arrive; 408 after it. Default 10s.
    // A client sending one byte a minute holds nothing longer than this.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub body_timeout: std::time::Duration,
    /// All of a request's headers together, in bytes; 431 above it. Default 16384.
    pub max_header_bytes: usize,
    /// The largest API request body, in bytes (webhooks and Alertmanager have their own);
    /// 413 above it. Default 2 MiB.
    pub max_body_bytes: usize,
    /// How long a client may take to send its request's headers; then the connection is
    /// closed. Default 10s.
    // Enforced by `serve`, not the router.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub header_timeout: std::time::Duration,
    /// Connections open at once; more are closed as they arrive. Default 1024.
    // Enforced by `serve`, not the router.
    pub max_connections: usize,
    /// How long a caller waits for an answer; 504 after it (the request still completes, it
    /// is never cut off half done). Default 60s.
    // The handler finishes in the background, holding its slot.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_timeout: std::time::Duration,
    /// The longest a read of a run with `?wait=` waits for it to end (or change); a longer
    /// `wait` is cut to this. Must be below `request-timeout`. Default 50s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_wait: std::time::Duration,
    /// Reads with `?wait=` waiting at once; one more is answered 503 with `Retry-After`, so
    /// that waiting readers never take every slot of `max-concurrent-requests`. Default 256.
    pub max_waiting_requests: usize,
    /// How often a waiting read looks at its run again should the announcement of a change be
    /// lost (they travel on Redis pub/sub); it is woken by the announcement otherwise.
    /// Default 5s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub wait_recheck: std::time::Duration,
    /// How long `serve` reuses the lookup of a dayshift API token: a token revoked elsewhere
    /// (`dayshift tokens revoke`, another replica) still works on this `serve` for at most this
    /// long; one revoked through this `serve` stops at once. 0s looks the token up on every
    /// request. Default 5s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub token_cache_ttl: std::time::Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_metrics: true,
            oidc: None,
            max_concurrent_requests: 512,
            body_timeout: std::time::Duration::from_secs(10),
            max_header_bytes: 16 << 10,
            max_body_bytes: 2 << 20,
            header_timeout: std::time::Duration::from_secs(10),
            max_connections: 1024,
            request_timeout: std::time::Duration::from_secs(60),
            max_wait: std::time::Duration::from_secs(50),
            max_waiting_requests: 256,
            wait_recheck: std::time::Duration::from_secs(5),
            token_cache_ttl: std::time::Duration::from_secs(5),
        }
    }
}

impl ServerConfig {
    /// Refuses limits that would refuse everything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_concurrent_requests == 0
            || self.body_timeout.is_zero()
            || self.header_timeout.is_zero()
            || self.max_connections == 0
            || self.request_timeout.is_zero()
        {
            return Err(ConfigError(
                "server.max-concurrent-requests, server.max-connections, server.body-timeout, \
                 server.header-timeout and server.request-timeout must be more than 0"
                    .into(),
            ));
        }
        if self.max_wait.is_zero() || self.max_wait >= self.request_timeout {
            return Err(ConfigError(format!(
                "server.max-wait must be more than 0 and less than server.request-timeout ({}), \
                 or every waiting read would end in 504",
                humantime::format_duration(self.request_timeout)
            )));
        }
        if self.wait_recheck.is_zero() {
            return Err(ConfigError("server.wait-recheck must be more than 0".into()));
        }
        Ok(())
    }
}

/// What a read with `?wait=` may take, as the handlers hold it.
#[derive(Clone)]
pub(crate) struct Waits {
    pub(crate) max: std::time::Duration,
    pub(crate) recheck: std::time::Duration,
    pub(crate) slots: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Waits {
    pub(crate) fn new(limits: &ServerConfig) -> Self {
        Self {
            max: limits.max_wait,
            recheck: limits.wait_recheck,
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_waiting_requests)),
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
    limits: &ServerConfig,
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
    limits: ServerConfig,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Guard {
    pub(crate) fn new(limits: ServerConfig) -> std::sync::Arc<Self> {
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
        return ApiError::busy("busy", "too many requests in flight; try again shortly");
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

/// How long an intake's body may take to arrive ([`ServerConfig::body_timeout`]).
#[derive(Clone, Copy)]
pub(crate) struct BodyTimeout(pub(crate) std::time::Duration);
