//! The HTTP API (`/api/v1`), health, readiness, metrics, the trigger intakes and the console.
//!
//! This file is the one place routes are declared, each with who may call it
//! ([`access::Access`]): a role (401 without a valid token, 403 with a weaker role), public,
//! or an intake that checks its sender's own credentials. One file per resource holds its
//! handlers. What a caller changes is recorded in the audit trail with its name ([`audit`]).
//!
//! Errors are JSON `{"error": "...", "code": "..."}` ([`error::ApiError`]).

pub mod access;
mod alerts;
pub mod audit;
pub mod auth;
mod console;
pub mod error;
mod health;
mod hooks;
pub mod metrics;
mod runs;
mod schedules;
pub mod server;
pub mod state;
mod tokens;
pub mod views;
mod workflows;

use axum::Router;

pub use access::{Access, RouteInfo};
pub use error::ApiError;
pub use server::{ServerConfig, serve};
pub use state::{Api, ApiBuilder};

use crate::engine::Engine;
use crate::identity::Role;

const VIEWER: Access = Access::Role(Role::Viewer);
const OPERATOR: Access = Access::Role(Role::Operator);
const ADMIN: Access = Access::Role(Role::Admin);

/// Every route of the API with who may call it.
fn routes(api: &Api, guard: std::sync::Arc<server::Guard>) -> access::Routes {
    let metrics = if api.auth().public_metrics {
        Access::Public
    } else {
        VIEWER
    };
    let routes = access::Routes::new(api.clone(), guard)
        .get("/healthz", Access::Public, health::healthz)
        .get("/readyz", Access::Public, health::ready)
        .get("/metrics", metrics, health::metrics)
        .get("/api/v1/whoami", VIEWER, tokens::whoami)
        .get("/api/v1/workflows", VIEWER, workflows::workflows)
        .get("/api/v1/workflows/{name}", VIEWER, workflows::workflow)
        .get("/api/v1/runs", VIEWER, runs::list_runs)
        .post("/api/v1/runs", OPERATOR, runs::start_run)
        .get("/api/v1/runs/summary", VIEWER, runs::run_summary)
        .get("/api/v1/runs/{id}", VIEWER, runs::get_run)
        .get("/api/v1/runs/{id}/events", VIEWER, runs::run_events)
        .get("/api/v1/runs/{id}/trigger", VIEWER, runs::run_trigger)
        .post("/api/v1/runs/{id}/cancel", OPERATOR, runs::cancel_run)
        .post("/api/v1/runs/{id}/signals/{name}", OPERATOR, runs::signal_run)
        .post("/api/v1/runs/{id}/approve", OPERATOR, runs::approve_run)
        .post("/api/v1/runs/{id}/reject", OPERATOR, runs::reject_run)
        .post("/api/v1/runs/{id}/retry", OPERATOR, runs::retry_run)
        .get("/api/v1/approvals", VIEWER, runs::approvals)
        .get("/api/v1/alerts/episodes", VIEWER, alerts::alert_episodes)
        .get("/api/v1/remediations", VIEWER, alerts::remediations)
        .get("/api/v1/schedules", VIEWER, schedules::list_schedules)
        .get("/api/v1/schedules/{name}", VIEWER, schedules::get_schedule)
        .post("/api/v1/schedules/{name}/pause", ADMIN, schedules::pause_schedule)
        .post("/api/v1/schedules/{name}/resume", ADMIN, schedules::resume_schedule)
        .post("/api/v1/schedules/{name}/trigger", ADMIN, schedules::trigger_schedule)
        .get("/api/v1/tokens", ADMIN, tokens::list_tokens)
        .post("/api/v1/tokens", ADMIN, tokens::create_token)
        .delete("/api/v1/tokens/{name}", ADMIN, tokens::revoke_token)
        .get("/api/v1/audit", ADMIN, audit::audit_log)
        .post("/hooks/alertmanager", Access::Intake, hooks::alertmanager)
        .post("/hooks/{forge}", Access::Intake, hooks::webhook);
    console::routes(routes)
}

/// Every route the API declares, with who may call it (for tests and documentation).
pub fn route_table(api: &Api) -> Vec<RouteInfo> {
    let guard = server::Guard::new(ServerConfig::default());
    routes(api, guard).table().to_vec()
}

/// The API's routes over `engine` alone: no schedules, webhook or Alertmanager routes, the
/// default authentication and policy, the default limits ([`ServerConfig`]).
pub fn router(engine: Engine) -> Router {
    Api::builder(engine).build().router(ServerConfig::default())
}

impl Api {
    /// The API's routes, serving this state within the limits of `limits` (its other settings
    /// are not the router's: see [`ServerConfig`]).
    pub fn router(&self, limits: ServerConfig) -> Router {
        let hook_limit = self.webhooks().map(|w| w.max_body).unwrap_or(1 << 20);
        let body_timeout = limits.body_timeout;
        let waits = server::Waits::new(&limits);
        let guard = server::Guard::new(limits);
        routes(self, guard.clone())
            .into_router()
            .fallback(access::no_such_route)
            .layer(axum::Extension(server::HookLimit(hook_limit)))
            .layer(axum::Extension(server::BodyTimeout(body_timeout)))
            .layer(axum::Extension(waits))
            .layer(axum::middleware::from_fn_with_state(guard, server::admit))
            .with_state(self.clone())
    }
}
