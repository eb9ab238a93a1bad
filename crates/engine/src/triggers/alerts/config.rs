//! The config file's `alertmanager:`: the credentials notifications carry (where they are,
//! never what), the limit and the routes; [`AlertmanagerConfig::resolve`] makes the
//! [`Alerts`] the intake runs, [`AlertmanagerConfig::validate`] and
//! [`AlertmanagerConfig::check`] say what is wrong with it.

use std::collections::HashMap;

use serde::Deserialize;

use crate::config::{InvalidConfig, SecretReader, SecretSource};
use crate::core::error::ConfigError;
use crate::core::workflow::Registry;
use crate::triggers::alerts::{AlertRoute, Alerts, CONTEXT_FIELDS, IntakeAuth};
use crate::triggers::intake::check_route_basics;

/// Alertmanager settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct AlertmanagerConfig {
    /// The bearer token Alertmanager sends (its webhook_config `http_config.authorization`).
    pub token: Option<SecretSource>,
    /// Or the user and password it sends (`http_config.basic_auth`).
    pub basic_auth: Option<BasicAuthConfig>,
    /// Accept notifications that carry no credentials at all. With any route configured, a
    /// token or basic auth is required unless this says `true` in so many words: alert labels
    /// choose what a remediation restarts, scales or deletes. Logged as a warning at start.
    pub allow_unauthenticated: bool,
    /// Largest notification accepted, in bytes. Default 32 MiB (a storm of 10,000 alerts is
    /// about 6 MB).
    pub max_body_bytes: usize,
    /// Which alerts start which workflow; every matching route starts its run.
    pub routes: Vec<AlertRoute>,
}

impl Default for AlertmanagerConfig {
    fn default() -> Self {
        Self {
            token: None,
            basic_auth: None,
            allow_unauthenticated: false,
            max_body_bytes: 32 << 20,
            routes: Vec::new(),
        }
    }
}

/// HTTP basic auth credentials, as Alertmanager's `http_config.basic_auth` sends them.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BasicAuthConfig {
    pub username: String,
    pub password: SecretSource,
}

impl AlertmanagerConfig {
    /// Refuses routes that anyone could trigger: with routes, credentials are required unless
    /// `allow-unauthenticated` says otherwise.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.routes.is_empty() && self.token.is_none() && self.basic_auth.is_none() && !self.allow_unauthenticated {
            return Err(ConfigError(
                "alertmanager.routes are configured but neither alertmanager.token nor alertmanager.basic-auth \
                 is: anyone who reaches /hooks/alertmanager could choose what a remediation acts on. Give the \
                 credentials Alertmanager's http_config sends, or set alertmanager.allow-unauthenticated: true"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The settings with the token or password read by `read` (as bytes: a secret is compared,
    /// never shown), as the intake runs them.
    pub fn resolve(&self, read: SecretReader<'_>) -> Result<Alerts, InvalidConfig> {
        let auth = match (&self.token, &self.basic_auth) {
            (Some(_), Some(_)) => {
                return Err(InvalidConfig::new(
                    "alertmanager",
                    "give one of `token` and `basic-auth`, not both",
                ));
            }
            (Some(source), None) => IntakeAuth::Bearer(read.bytes(source, "alertmanager.token")?),
            (None, Some(b)) => IntakeAuth::Basic {
                username: b.username.clone(),
                password: read.bytes(&b.password, "alertmanager.basic-auth.password")?,
            },
            (None, None) => IntakeAuth::None,
        };
        Ok(Alerts {
            auth,
            max_body: self.max_body_bytes,
            routes: self.routes.clone(),
        })
    }

    /// Checks the routes: each passes the checks every route needs and names at least one
    /// matcher. One message per problem, naming the file (`path`), the line and the key.
    pub fn check(&self, path: &str, registry: &Registry) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen = HashMap::new();
        for (i, r) in self.routes.iter().enumerate() {
            check_route_basics(
                path,
                &format!("alertmanager.routes[{i}]"),
                (&r.name, &r.workflow, &r.input),
                (CONTEXT_FIELDS, "an alert"),
                registry,
                &mut seen,
                &mut problems,
            );
            if r.matchers.is_empty() {
                let line = r.name.referenced.line();
                problems.push(format!(
                    "{path}, line {line}: alertmanager.routes[{i}].matchers: name at least one matcher"
                ));
            }
        }
        problems
    }
}
