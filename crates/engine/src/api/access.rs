//! Who may call each route, declared with the route itself ([`Access`]): the router
//! ([`crate::api`]) adds routes only through [`Routes`], whose every method takes one, so a
//! route without a declared access does not compile. A route of a role authenticates the
//! caller (dayshift's token or an OIDC JWT) and checks the role before its body is read.

use axum::Router;
use axum::extract::State;
use axum::handler::Handler;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;

use crate::api::error::ApiError;
use crate::api::server::{Guard, read_body_in_time};
use crate::api::state::Api;
use crate::core::error::EngineError;
use crate::identity::{Caller, Role};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token: health, readiness, the console's files (they hold no data:
    /// what the console shows comes from the API, with the token the person signs in with).
    Public,
    /// A trigger intake (`/hooks/…`): anyone may call it, and it checks the sender's own
    /// credentials (a forge's signature, Alertmanager's token) before it reads the body.
    Intake,
    /// A caller holding this role or a stronger one.
    Role(Role),
}

/// One declared route, as [`Routes::table`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
}

/// The API's routes, each added with its method, path and [`Access`].
pub(crate) struct Routes {
    api: Api,
    guard: std::sync::Arc<Guard>,
    router: Router<Api>,
    table: Vec<RouteInfo>,
}

impl Routes {
    pub(crate) fn new(api: Api, guard: std::sync::Arc<Guard>) -> Self {
        Self {
            api,
            guard,
            router: Router::new(),
            table: Vec::new(),
        }
    }

    /// `GET` (and `HEAD`) on `path`, for callers `access` admits.
    pub(crate) fn get<H: Handler<T, Api>, T: 'static>(self, path: &'static str, access: Access, handler: H) -> Self {
        self.add(Method::GET, path, access, axum::routing::get(handler))
    }

    /// `POST` on `path`, for callers `access` admits.
    pub(crate) fn post<H: Handler<T, Api>, T: 'static>(self, path: &'static str, access: Access, handler: H) -> Self {
        self.add(Method::POST, path, access, axum::routing::post(handler))
    }

    /// `DELETE` on `path`, for callers `access` admits.
    pub(crate) fn delete<H: Handler<T, Api>, T: 'static>(self, path: &'static str, access: Access, handler: H) -> Self {
        self.add(Method::DELETE, path, access, axum::routing::delete(handler))
    }

    fn add(mut self, method: Method, path: &'static str, access: Access, route: MethodRouter<Api>) -> Self {
        let body = axum::middleware::from_fn_with_state(self.guard.clone(), read_body_in_time);
        let route = match access {
            // An intake reads its own body, after its own credential check.
            Access::Intake => route.layer(axum::extract::DefaultBodyLimit::disable()),
            Access::Public => route.route_layer(body),
            // The role is checked first, then the body is read (route layers wrap outwards).
            Access::Role(role) => route
                .route_layer(body)
                .route_layer(axum::middleware::from_fn_with_state((self.api.clone(), role), require)),
        };
        self.router = self.router.route(path, route);
        self.table.push(RouteInfo { method, path, access });
        self
    }

    /// Every route declared, in order.
    pub(crate) fn table(&self) -> &[RouteInfo] {
        &self.table
    }

    pub(crate) fn into_router(self) -> Router<Api> {
        self.router
    }
}

/// Checks the caller's token against the role the route was declared with; the caller goes
/// into the request's extensions for the handlers.
async fn require(
    State((api, needed)): State<(Api, Role)>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let caller = match authenticated(&api, request.headers()).await {
        Ok(caller) => caller,
        Err(refused) => return refused,
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

/// A path no route declares: 404 to an authenticated caller, 401 to anyone else (what the API
/// has is not told to strangers).
pub(crate) async fn no_such_route(State(api): State<Api>, headers: axum::http::HeaderMap) -> Response {
    match authenticated(&api, &headers).await {
        Ok(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint").into_response(),
        Err(refused) => refused,
    }
}

/// The caller a request's bearer token names (dayshift's own token or an OIDC JWT), or the
/// 401/403 response that refuses it.
async fn authenticated(api: &Api, headers: &axum::http::HeaderMap) -> Result<Caller, Response> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::api::auth::bearer)
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
        return Err(unauthorized(
            "this endpoint needs a bearer token (Authorization: Bearer …); `dayshift tokens create` makes one",
        ));
    }
    let oidc = api
        .auth()
        .oidc
        .as_ref()
        .filter(|_| !token.starts_with(crate::api::auth::TOKEN_PREFIX) && token.matches('.').count() == 2);
    let caller = match oidc {
        Some(oidc) => match oidc.verify(token).await {
            Ok(caller) => caller,
            Err(crate::api::auth::OidcRefusal::Invalid(why)) => {
                tracing::info!(reason = %why, "OIDC token refused.");
                return Err(unauthorized(&format!("the bearer token is not valid: {why}")));
            }
            Err(crate::api::auth::OidcRefusal::NoRole(why)) => {
                return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", why).into_response());
            }
        },
        None => match api.tokens().authenticate(api.engine().store().pool(), token).await {
            Ok(Some(caller)) => caller,
            Ok(None) => {
                return Err(unauthorized(
                    "the bearer token is not valid (unknown, revoked or expired)",
                ));
            }
            Err(e) => return Err(ApiError::from(EngineError::from(e)).into_response()),
        },
    };
    Ok(caller)
}

/// The authenticated caller, for handlers of routes that need a role.
pub(crate) type Who = axum::Extension<Caller>;
