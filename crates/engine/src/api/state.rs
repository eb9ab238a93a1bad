//! What the API serves: the engine, and the front doors' configuration the binary built from
//! the config file (authentication, policy, schedules, webhook routes, Alertmanager routes).
//! The engine holds none of it.

use std::sync::Arc;

use axum::extract::FromRef;

use crate::api::auth::{AuthConfig, TokenCache};
use crate::engine::Engine;
use crate::policy::Policy;
use crate::triggers::alerts::Alerts;
use crate::triggers::schedule::{Schedule, Scheduler};
use crate::triggers::webhook::Webhooks;

/// The API's state. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Api {
    inner: Arc<ApiInner>,
}

#[derive(Debug)]
struct ApiInner {
    engine: Engine,
    auth: AuthConfig,
    tokens: TokenCache,
    policy: Policy,
    scheduler: Scheduler,
    webhooks: Option<Arc<Webhooks>>,
    alerts: Option<Arc<Alerts>>,
}

/// Builds an [`Api`]: `Api::builder(engine).auth(a).policy(p).build()`; what is not given is
/// off (no schedules, no webhook or Alertmanager routes) or the default (dayshift's own tokens,
/// the default policy).
#[derive(Debug)]
pub struct ApiBuilder {
    engine: Engine,
    auth: AuthConfig,
    policy: Policy,
    schedules: Vec<Schedule>,
    webhooks: Option<Webhooks>,
    alerts: Option<Alerts>,
}

impl ApiBuilder {
    /// How callers authenticate ([`crate::api::auth`]).
    pub fn auth(mut self, auth: AuthConfig) -> Self {
        self.auth = auth;
        self
    }

    /// What API callers may start, with which values of guarded input ([`crate::policy`]).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// The cron schedules the API lists, pauses, resumes and fires.
    pub fn schedules(mut self, schedules: Vec<Schedule>) -> Self {
        self.schedules = schedules;
        self
    }

    /// The git webhook secrets and routes ([`crate::triggers::webhook`]).
    pub fn webhooks(mut self, webhooks: Webhooks) -> Self {
        self.webhooks = Some(webhooks);
        self
    }

    /// The Alertmanager routes and guardrails ([`crate::triggers::alerts`]).
    pub fn alerts(mut self, alerts: Alerts) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// The state.
    pub fn build(self) -> Api {
        let scheduler = Scheduler::new(self.engine.clone(), self.schedules);
        Api {
            inner: Arc::new(ApiInner {
                engine: self.engine,
                tokens: TokenCache::new(self.auth.token_cache_ttl),
                auth: self.auth,
                policy: self.policy,
                scheduler,
                webhooks: self.webhooks.map(Arc::new),
                alerts: self.alerts.map(Arc::new),
            }),
        }
    }
}

impl Api {
    /// Starts building the API's state over `engine`.
    pub fn builder(engine: Engine) -> ApiBuilder {
        ApiBuilder {
            engine,
            auth: AuthConfig::default(),
            policy: Policy::default(),
            schedules: Vec::new(),
            webhooks: None,
            alerts: None,
        }
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// How callers authenticate.
    pub fn auth(&self) -> &AuthConfig {
        &self.inner.auth
    }

    /// The dayshift tokens looked up lately.
    pub(crate) fn tokens(&self) -> &TokenCache {
        &self.inner.tokens
    }

    /// The policy on what API callers may start.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// The schedules, and the operations on them.
    pub fn scheduler(&self) -> &Scheduler {
        &self.inner.scheduler
    }

    /// The webhook routes, if any are configured.
    pub fn webhooks(&self) -> Option<&Arc<Webhooks>> {
        self.inner.webhooks.as_ref()
    }

    /// The Alertmanager routes, if any are configured.
    pub fn alerts(&self) -> Option<&Arc<Alerts>> {
        self.inner.alerts.as_ref()
    }
}

/// Handlers that need only the engine take `State<Engine>`.
impl FromRef<Api> for Engine {
    fn from_ref(api: &Api) -> Engine {
        api.inner.engine.clone()
    }
}
