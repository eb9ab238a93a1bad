//! The config file's `webhooks:`: the forges' secrets (where they are, never what), limits and
//! routes; [`WebhooksConfig::resolve`] makes the [`Webhooks`] the intake runs, and
//! [`WebhooksConfig::check`] says what is wrong with the routes.

use std::collections::HashMap;

use serde::Deserialize;

use crate::config::{InvalidConfig, SecretReader, SecretSource};
use crate::core::workflow::Registry;
use crate::triggers::intake::check_route_basics;
use crate::triggers::webhook::event::{CONTEXT_FIELDS, Forge};
use crate::triggers::webhook::routes::{WebhookRoute, Webhooks};

/// Git webhook settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct WebhooksConfig {
    /// Largest delivery accepted, in bytes (413 above it). Default 2 MiB.
    pub max_body_bytes: usize,
    /// Commit author emails that are dayshift itself (the git connections' `author-email` are
    /// too): pushes made only of their commits start nothing. A `Dayshift-Run:` trailer from
    /// any other author means nothing.
    pub bot_emails: Vec<String>,
    /// Accept deliveries from GitHub (`X-Hub-Signature-256`).
    pub github: Option<ForgeConfig>,
    /// Accept deliveries from Gitea (`X-Gitea-Signature`).
    pub gitea: Option<ForgeConfig>,
    /// Accept deliveries from Forgejo (`X-Forgejo-Signature`).
    pub forgejo: Option<ForgeConfig>,
    /// Accept deliveries from GitLab (`X-Gitlab-Token`).
    pub gitlab: Option<ForgeConfig>,
    /// Which events start which workflow; every matching route starts its run.
    pub routes: Vec<WebhookRoute>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 2 << 20,
            bot_emails: Vec::new(),
            github: None,
            gitea: None,
            forgejo: None,
            gitlab: None,
            routes: Vec::new(),
        }
    }
}

/// A forge's shared secret (the webhook secret; GitLab's secret token).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ForgeConfig {
    /// Where the secret is; never in this file.
    pub secret: SecretSource,
}

impl WebhooksConfig {
    fn forges(&self) -> [(Forge, &Option<ForgeConfig>); 4] {
        [
            (Forge::Github, &self.github),
            (Forge::Gitea, &self.gitea),
            (Forge::Forgejo, &self.forgejo),
            (Forge::Gitlab, &self.gitlab),
        ]
    }

    /// The settings with each forge's secret read by `read` (as bytes: a secret is compared,
    /// never shown), as the intake runs them. The binary adds the bot emails it knows of
    /// besides [`Self::bot_emails`].
    pub fn resolve(&self, read: SecretReader<'_>) -> Result<Webhooks, InvalidConfig> {
        let mut secrets = HashMap::new();
        for (forge, conf) in self.forges() {
            if let Some(conf) = conf {
                let key = format!("webhooks.{}.secret", forge.as_str());
                secrets.insert(forge, read.bytes(&conf.secret, &key)?);
            }
        }
        Ok(Webhooks {
            watches: Vec::new(),
            secrets,
            routes: self.routes.clone(),
            max_body: self.max_body_bytes,
            bot_emails: self.bot_emails.clone(),
        })
    }

    /// Checks the routes: each passes the checks every route needs, would match what it says,
    /// and listens to a forge that has a secret. One message per problem, naming the file
    /// (`path`), the line and the key.
    pub fn check(&self, path: &str, registry: &Registry) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen = HashMap::new();
        for (i, r) in self.routes.iter().enumerate() {
            check_route_basics(
                path,
                &format!("webhooks.routes[{i}]"),
                (&r.name, &r.workflow, &r.input),
                (CONTEXT_FIELDS, "a git event"),
                registry,
                &mut seen,
                &mut problems,
            );
            let line = r.name.referenced.line();
            let at = |key: &str| format!("{path}, line {line}: webhooks.routes[{i}].{key}");
            for problem in r.problems() {
                problems.push(at(&problem));
            }
            let configured = match r.forge {
                Some(Forge::Github) => self.github.is_some(),
                Some(Forge::Gitea) => self.gitea.is_some() || self.forgejo.is_some(),
                Some(Forge::Forgejo) => self.forgejo.is_some(),
                Some(Forge::Gitlab) => self.gitlab.is_some(),
                None => self.forges().iter().any(|(_, conf)| conf.is_some()),
            };
            if !configured {
                problems.push(format!(
                    "{}: no forge this route listens to has a secret (webhooks.<forge>.secret)",
                    at("forge")
                ));
            }
        }
        problems
    }
}
