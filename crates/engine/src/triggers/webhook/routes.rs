//! Routes: which events start which workflow, with what input (placeholders filled from the
//! event), and the webhook settings they belong to, as the intake runs them. A route is the
//! config file's as it is; the rest of `webhooks:` is in [`super::config`].

use globset::GlobMatcher;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use crate::core::error::TemplateError;
use crate::core::model::{Concurrency, StartRun};
use crate::template;
use crate::triggers::webhook::event::{EventKind, Forge, GitEvent};

/// A glob that was checked when it was read.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    matcher: GlobMatcher,
}

crate::message_error!(
    /// Text that is not a glob: the text, and why.
    InvalidPattern
);

impl std::str::FromStr for Pattern {
    type Err = InvalidPattern;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let glob = globset::GlobBuilder::new(text)
            .literal_separator(true)
            .build()
            .map_err(|e| InvalidPattern(format!("'{text}' is not a glob pattern: {e}")))?;
        Ok(Self {
            text: text.to_string(),
            matcher: glob.compile_matcher(),
        })
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Pattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl Pattern {
    pub(crate) fn is_match(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }
}

// The config file's route as it is (`webhooks.routes`), with the lines of its name and workflow
// kept for the config's messages. Its doc comments are the schema's descriptions.
/// A webhook route.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
// The name the schema has always had (docs/config.schema.json).
#[schemars(rename = "RouteConfig")]
pub struct WebhookRoute {
    /// Unique name; in the runs' `started_by`.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Only deliveries from this forge (a `gitea` route also takes Forgejo's); any if absent.
    pub forge: Option<Forge>,
    /// Repository full names, globs allowed (`platform/*`); any if absent.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub repositories: Vec<Pattern>,
    /// push, tag, branch-deleted, tag-deleted, pull-request-opened, pull-request-reopened,
    /// pull-request-synchronized, pull-request-closed, pull-request-merged.
    pub events: Vec<EventKind>,
    /// Branch globs (the pushed branch, or a pull request's base branch); any if absent.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub branches: Vec<Pattern>,
    /// Tag globs (`v*`); any if absent.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub tags: Vec<Pattern>,
    /// Changed-path globs of a push (`apps/web/**`); at least one changed path must match.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub paths: Vec<Pattern>,
    /// The workflow to start.
    #[schemars(with = "String")]
    pub workflow: Spanned<String>,
    /// Its input; placeholders such as `{{ branch }}`, `{{ sha }}`, `{{ payload.pusher.name }}`.
    // The fields are those of `GitEvent::context`.
    #[serde(default)]
    pub input: Value,
    /// One (or n) at a time per target; the key may hold placeholders (`promote:{{ repository }}`).
    pub concurrency: Option<Concurrency>,
}

impl WebhookRoute {
    /// Whether the route takes the event.
    pub fn matches(&self, e: &GitEvent) -> bool {
        if self
            .forge
            .is_some_and(|f| f != e.forge && !(f == Forge::Gitea && e.forge == Forge::Forgejo))
        {
            return false;
        }
        if !self.events.contains(&e.kind) {
            return false;
        }
        let any = |patterns: &[Pattern], value: Option<&str>| {
            patterns.is_empty() || value.is_some_and(|v| patterns.iter().any(|p| p.is_match(v)))
        };
        if !any(&self.repositories, Some(&e.repository)) {
            return false;
        }
        match e.kind {
            EventKind::Tag | EventKind::TagDeleted => any(&self.tags, e.tag.as_deref()),
            EventKind::Push => {
                any(&self.branches, e.branch.as_deref())
                    && (self.paths.is_empty()
                        || e.changed_paths.iter().any(|p| self.paths.iter().any(|g| g.is_match(p))))
            }
            _ => any(&self.branches, e.branch.as_deref()),
        }
    }

    /// Config mistakes that would make the route never or wrongly match.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.events.is_empty() {
            out.push("events: name at least one event".to_string());
        }
        if !self.paths.is_empty() && self.events.iter().any(|e| *e != EventKind::Push) {
            out.push("paths: changed paths are known for push events only; use a route of its own for them".into());
        }
        if !self.tags.is_empty()
            && !self
                .events
                .iter()
                .any(|e| matches!(e, EventKind::Tag | EventKind::TagDeleted))
        {
            out.push("tags: this route matches no tag event".into());
        }
        if !self.branches.is_empty()
            && !self
                .events
                .iter()
                .any(|e| matches!(e, EventKind::Push | EventKind::BranchDeleted) || e.is_pull_request())
        {
            out.push("branches: this route matches no branch or pull-request event".into());
        }
        out
    }

    /// The run this route starts for the event.
    pub fn start_request(&self, e: &GitEvent, payload: &Value) -> Result<StartRun, TemplateError> {
        let input = template::render(&self.input, &e.context(payload))?;
        let mut req = StartRun::new(self.workflow.value.clone(), input);
        let digest = hex::encode(Sha256::digest(e.identity().as_bytes()));
        req.idempotency_key = Some(format!("hook:{}:{}", self.name.value, &digest[..32]));
        req.started_by = Some(format!(
            "webhook:{}:{} {}{}",
            self.name.value,
            e.forge.as_str(),
            e.kind.as_str(),
            e.delivery
                .as_deref()
                .map(|d| format!(" (delivery {d})"))
                .unwrap_or_default()
        ));
        req.concurrency = self.concurrency.clone();
        Ok(req)
    }
}

/// Webhook settings: per-forge secrets, routes, limits.
#[derive(Debug, Clone, Default)]
pub struct Webhooks {
    /// The secret (GitHub, Gitea, Forgejo) or token (GitLab) of each forge that may deliver.
    pub secrets: std::collections::HashMap<Forge, Vec<u8>>,
    /// Routes, tried in order; every matching route starts its run.
    pub routes: Vec<WebhookRoute>,
    /// Largest body accepted, in bytes.
    pub max_body: usize,
    /// Commit authors that are dayshift itself (besides the `Dayshift-Run:` trailer).
    pub bot_emails: Vec<String>,
    /// Branches whose pushes refresh something of serve's own (the workflow files kept in git).
    pub watches: Vec<PushWatch>,
}

/// A branch whose pushes are told to `pushed`: the forge's repository name (`owner/name`,
/// GitLab's project path), compared without regard to case, and the branch.
#[derive(Debug, Clone)]
pub struct PushWatch {
    pub repository: String,
    pub branch: String,
    pub pushed: std::sync::Arc<tokio::sync::Notify>,
}

impl PushWatch {
    /// Whether `e` is a push to this branch.
    pub fn matches(&self, e: &GitEvent) -> bool {
        e.kind == super::event::EventKind::Push
            && e.repository.eq_ignore_ascii_case(&self.repository)
            && e.branch.as_deref() == Some(self.branch.as_str())
    }
}
