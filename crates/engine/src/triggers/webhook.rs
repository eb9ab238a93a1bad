//! Git webhooks: GitHub, Gitea, Forgejo and GitLab deliveries start the runs their routes name,
//! once per event.
//!
//! # Design notes
//! - **Authentication** before anything else: GitHub signs the body (`X-Hub-Signature-256:
//!   sha256=<hex>`), Gitea and Forgejo too (`X-Gitea-Signature` / `X-Forgejo-Signature`: bare
//!   hex), GitLab sends a shared token (`X-Gitlab-Token`). Both are compared in constant time.
//! - **One model of events** for all forges: push to a branch, tag (pushed or created), branch or
//!   tag deleted, pull/merge request opened, reopened, synchronized (new commits), closed, merged.
//! - **Once per event**: what the senders really do is redeliver with the same id (GitHub), with
//!   a new id (Gitea's "Redeliver", GitLab's retries), and announce one tag twice (GitHub: `push`
//!   and `create`). So runs are started with an idempotency key made of the route and the
//!   event's *identity*: push = repository, ref, before, after; tag = repository, tag; deletion =
//!   repository, ref; pull request = repository, number, action, head commit.
//! - **Loop protection**: a push whose every commit is authored by dayshift's own identity
//!   (`bot-emails` and the git connections' `author-email`) was made by dayshift and starts
//!   nothing. The `Dayshift-Run: <id>` trailer names the run that made such a commit; from any
//!   other author it means nothing, or anyone could write it to silence a route.

use std::collections::BTreeSet;

use globset::GlobMatcher;
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::core::model::{Concurrency, StartRun};
use crate::template;

/// A git forge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Forge {
    Github,
    Gitea,
    Forgejo,
    Gitlab,
}

impl Forge {
    /// The forge of a `/hooks/<name>` path.
    pub fn from_path(name: &str) -> Option<Self> {
        match name {
            "github" => Some(Self::Github),
            "gitea" => Some(Self::Gitea),
            "forgejo" => Some(Self::Forgejo),
            "gitlab" => Some(Self::Gitlab),
            _ => None,
        }
    }

    /// Its name in paths, config and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Github => "github",
            Self::Gitea => "gitea",
            Self::Forgejo => "forgejo",
            Self::Gitlab => "gitlab",
        }
    }
}

/// The kinds of event a route can match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// Commits pushed to a branch (including the push that creates it).
    Push,
    /// A tag pushed or created.
    Tag,
    BranchDeleted,
    TagDeleted,
    PullRequestOpened,
    PullRequestReopened,
    /// New commits on a pull/merge request.
    PullRequestSynchronized,
    /// Closed without merging.
    PullRequestClosed,
    PullRequestMerged,
}

impl EventKind {
    /// The name used in config and responses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::Tag => "tag",
            Self::BranchDeleted => "branch-deleted",
            Self::TagDeleted => "tag-deleted",
            Self::PullRequestOpened => "pull-request-opened",
            Self::PullRequestReopened => "pull-request-reopened",
            Self::PullRequestSynchronized => "pull-request-synchronized",
            Self::PullRequestClosed => "pull-request-closed",
            Self::PullRequestMerged => "pull-request-merged",
        }
    }

    fn is_pull_request(self) -> bool {
        matches!(
            self,
            Self::PullRequestOpened
                | Self::PullRequestReopened
                | Self::PullRequestSynchronized
                | Self::PullRequestClosed
                | Self::PullRequestMerged
        )
    }
}

/// A pull or merge request.
#[derive(Debug, Clone, Serialize)]
pub struct PullRequest {
    pub number: u64,
    pub title: String,
    pub head_branch: String,
    pub base_branch: String,
    pub head_sha: String,
}

/// One commit of a push.
#[derive(Debug, Clone, Serialize)]
pub struct Commit {
    pub id: String,
    pub message: String,
    pub author_email: String,
}

/// A delivery, in the one model all forges share.
#[derive(Debug, Clone, Serialize)]
pub struct GitEvent {
    pub forge: Forge,
    pub kind: EventKind,
    pub repository: String,
    /// Full ref (`refs/heads/main`, `refs/tags/v1`) where the forge gives one.
    pub git_ref: Option<String>,
    pub branch: Option<String>,
    pub tag: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
    /// The commit the event is about: a push's new head, a tag's commit (not the annotated
    /// tag object), a pull request's head.
    pub commit: Option<String>,
    pub pull_request: Option<PullRequest>,
    pub commits: Vec<Commit>,
    /// Paths added, modified or removed by the pushed commits.
    pub changed_paths: Vec<String>,
    pub sender: Option<String>,
    pub delivery: Option<String>,
    /// For a tag: how many deletions of it were delivered before, so that a tag deleted and
    /// made again is a new event (set by the intake from its records).
    #[serde(skip)]
    pub generation: u64,
}

impl GitEvent {
    /// What makes two deliveries the same event, whatever their delivery ids.
    pub fn identity(&self) -> String {
        let r = &self.repository;
        match self.kind {
            EventKind::Push => format!(
                "push|{r}|{}|{}|{}",
                self.git_ref.as_deref().unwrap_or_default(),
                self.before.as_deref().unwrap_or_default(),
                self.after.as_deref().unwrap_or_default()
            ),
            // GitHub announces a tag twice (push and create, only the first with its commit):
            // one event, until the tag is deleted and made again.
            EventKind::Tag => match self.generation {
                0 => format!("tag|{r}|{}", self.tag.as_deref().unwrap_or_default()),
                n => format!("tag|{r}|{}|{n}", self.tag.as_deref().unwrap_or_default()),
            },
            // A deletion is one occurrence: its delivery (and the commit the ref pointed to, where
            // the forge says), so a branch name used again is deleted again.
            EventKind::TagDeleted | EventKind::BranchDeleted => format!(
                "{}|{r}|{}|{}|{}",
                self.kind.as_str(),
                self.git_ref
                    .as_deref()
                    .or(self.branch.as_deref())
                    .or(self.tag.as_deref())
                    .unwrap_or_default(),
                self.before.as_deref().unwrap_or_default(),
                self.delivery.as_deref().unwrap_or_default()
            ),
            kind => {
                let pr = self.pull_request.as_ref();
                format!(
                    "{}|{r}|{}|{}",
                    kind.as_str(),
                    pr.map(|p| p.number).unwrap_or_default(),
                    pr.map(|p| p.head_sha.as_str()).unwrap_or_default()
                )
            }
        }
    }

    /// What a route's input placeholders can use.
    pub fn context(&self, payload: &Value) -> Value {
        let sha = self
            .pull_request
            .as_ref()
            .map(|p| p.head_sha.clone())
            .or_else(|| self.commit.clone())
            .or_else(|| self.after.clone());
        json!({
            "forge": self.forge.as_str(),
            "event": self.kind.as_str(),
            "delivery": self.delivery,
            "repository": self.repository,
            "ref": self.git_ref,
            "branch": self.branch,
            "tag": self.tag,
            "before": self.before,
            "after": self.after,
            "sha": sha,
            "sender": self.sender,
            "pull_request": self.pull_request,
            "changed_paths": self.changed_paths,
            "payload": payload,
        })
    }

    /// The dayshift run that made this push, if dayshift's own identity (`bot_emails`)
    /// authored every commit of it; the `Dayshift-Run:` trailer of such a commit names the run.
    pub fn pushed_by_dayshift(&self, bot_emails: &[String]) -> Option<String> {
        if self.kind != EventKind::Push || self.commits.is_empty() {
            return None;
        }
        let mut run = None;
        for c in &self.commits {
            if !bot_emails.iter().any(|e| e.eq_ignore_ascii_case(&c.author_email)) {
                return None;
            }
            let trailer = c
                .message
                .lines()
                .rev()
                .find_map(|l| l.trim().strip_prefix("Dayshift-Run:"));
            if let Some(id) = trailer {
                run = Some(id.trim().to_string());
            }
        }
        Some(run.unwrap_or_else(|| "a commit by dayshift's own author".into()))
    }
}

/// The fields a route's input placeholders can start with (see [`GitEvent::context`]).
pub const CONTEXT_FIELDS: &[&str] = &[
    "forge",
    "event",
    "delivery",
    "repository",
    "ref",
    "branch",
    "tag",
    "before",
    "after",
    "sha",
    "sender",
    "pull_request",
    "changed_paths",
    "payload",
];

/// What a delivery turned out to be.
#[derive(Debug)]
pub enum Parsed {
    /// The forge checking the hook.
    Ping,
    /// An event of a kind routes can match.
    Event(Box<GitEvent>),
    /// An event dayshift does not act on (a label added, a wiki edit, …).
    NotHandled(String),
}

/// Why a delivery was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HookError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    BadRequest(String),
}

/// Headers, by lower-case name.
pub trait Headers {
    fn get(&self, name: &str) -> Option<&str>;
}

impl Headers for axum::http::HeaderMap {
    fn get(&self, name: &str) -> Option<&str> {
        axum::http::HeaderMap::get(self, name).and_then(|v| v.to_str().ok())
    }
}

impl Headers for Vec<(&str, &str)> {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }
}

type HmacSha256 = hmac::Hmac<Sha256>;

/// Checks the delivery's signature or token against `secret`.
pub fn verify(forge: Forge, headers: &dyn Headers, body: &[u8], secret: &[u8]) -> Result<(), HookError> {
    let unauthorized = |m: &str| Err(HookError::Unauthorized(m.to_string()));
    match forge {
        Forge::Gitlab => match headers.get("x-gitlab-token") {
            None => unauthorized("missing X-Gitlab-Token"),
            Some(token) if crate::identity::same(token.as_bytes(), secret) => Ok(()),
            Some(_) => unauthorized("wrong X-Gitlab-Token"),
        },
        Forge::Github | Forge::Gitea | Forge::Forgejo => {
            let (header, signature) = match forge {
                Forge::Github => (
                    "X-Hub-Signature-256",
                    headers
                        .get("x-hub-signature-256")
                        .map(|s| s.strip_prefix("sha256=").unwrap_or("")),
                ),
                Forge::Gitea => ("X-Gitea-Signature", headers.get("x-gitea-signature")),
                _ => (
                    "X-Forgejo-Signature",
                    headers
                        .get("x-forgejo-signature")
                        .or_else(|| headers.get("x-gitea-signature")),
                ),
            };
            let Some(signature) = signature else {
                return unauthorized(&format!("missing {header}"));
            };
            let Ok(expected) = hex::decode(signature.trim()) else {
                return unauthorized(&format!("{header} is not a hex HMAC-SHA256"));
            };
            let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
            mac.update(body);
            mac.verify_slice(&expected)
                .or_else(|_| unauthorized(&format!("{header} does not match the body")))
        }
    }
}

fn s(v: &Value, path: &[&str]) -> Option<String> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    match cur {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

fn commits_of(payload: &Value) -> (Vec<Commit>, Vec<String>) {
    let mut commits = Vec::new();
    let mut paths = BTreeSet::new();
    for c in payload.get("commits").and_then(Value::as_array).into_iter().flatten() {
        commits.push(Commit {
            id: s(c, &["id"]).unwrap_or_default(),
            message: s(c, &["message"]).unwrap_or_default(),
            author_email: s(c, &["author", "email"]).unwrap_or_default(),
        });
        for key in ["added", "modified", "removed"] {
            for p in c.get(key).and_then(Value::as_array).into_iter().flatten() {
                if let Some(p) = p.as_str() {
                    paths.insert(p.to_string());
                }
            }
        }
    }
    (commits, paths.into_iter().collect())
}

/// What a push to `git_ref` is: the event kind, and the branch or the tag it names. `None` for
/// refs that are neither (notes, pull request heads).
fn pushed_ref(git_ref: &str, deleted: bool) -> Option<(EventKind, Option<String>, Option<String>)> {
    if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
        let kind = if deleted { EventKind::TagDeleted } else { EventKind::Tag };
        Some((kind, None, Some(tag.to_string())))
    } else if let Some(branch) = git_ref.strip_prefix("refs/heads/") {
        let kind = if deleted {
            EventKind::BranchDeleted
        } else {
            EventKind::Push
        };
        Some((kind, Some(branch.to_string()), None))
    } else {
        None
    }
}

/// Reads a delivery (after [`verify`]).
pub fn parse(forge: Forge, headers: &dyn Headers, body: &[u8]) -> Result<Parsed, HookError> {
    let payload: Value =
        serde_json::from_slice(body).map_err(|e| HookError::BadRequest(format!("body is not JSON: {e}")))?;
    if !payload.is_object() {
        return Err(HookError::BadRequest("body is not a JSON object".into()));
    }
    let (event_header, delivery) = match forge {
        Forge::Github => ("x-github-event", headers.get("x-github-delivery")),
        Forge::Gitea => ("x-gitea-event", headers.get("x-gitea-delivery")),
        Forge::Forgejo => (
            "x-forgejo-event",
            headers
                .get("x-forgejo-delivery")
                .or_else(|| headers.get("x-gitea-delivery")),
        ),
        Forge::Gitlab => (
            "x-gitlab-event",
            headers
                .get("idempotency-key")
                .or_else(|| headers.get("x-gitlab-webhook-uuid")),
        ),
    };
    let event_name = headers
        .get(event_header)
        .or_else(|| {
            (forge == Forge::Forgejo)
                .then(|| headers.get("x-gitea-event"))
                .flatten()
        })
        .ok_or_else(|| HookError::BadRequest(format!("missing {event_header} header")))?;
    let parsed = match forge {
        Forge::Gitlab => parse_gitlab(event_name, &payload),
        _ => parse_github_like(forge, event_name, &payload),
    }?;
    Ok(match parsed {
        Parsed::Event(mut e) => {
            e.delivery = delivery.map(str::to_string);
            Parsed::Event(e)
        }
        other => other,
    })
}

fn base_event(forge: Forge, kind: EventKind, repository: String) -> GitEvent {
    GitEvent {
        forge,
        kind,
        repository,
        git_ref: None,
        branch: None,
        tag: None,
        before: None,
        after: None,
        commit: None,
        pull_request: None,
        commits: Vec::new(),
        changed_paths: Vec::new(),
        sender: None,
        delivery: None,
        generation: 0,
    }
}

fn parse_github_like(forge: Forge, event: &str, p: &Value) -> Result<Parsed, HookError> {
    let repository = s(p, &["repository", "full_name"]);
    let need_repo = || {
        repository
            .clone()
            .ok_or_else(|| HookError::BadRequest("payload has no repository.full_name".into()))
    };
    let sender = s(p, &["sender", "login"]);
    let mut e = match event {
        "ping" => return Ok(Parsed::Ping),
        "push" => {
            let git_ref = s(p, &["ref"]).ok_or_else(|| HookError::BadRequest("push payload has no ref".into()))?;
            let after = s(p, &["after"]);
            let deleted =
                p.get("deleted").and_then(Value::as_bool).unwrap_or(false) || after.as_deref() == Some(ZERO_SHA);
            let Some((kind, branch, tag)) = pushed_ref(&git_ref, deleted) else {
                return Ok(Parsed::NotHandled(format!("push to {git_ref}")));
            };
            let mut e = base_event(forge, kind, need_repo()?);
            let (commits, paths) = commits_of(p);
            e.git_ref = Some(git_ref);
            e.branch = branch;
            e.tag = tag;
            e.before = s(p, &["before"]);
            e.commit = s(p, &["head_commit", "id"]).or_else(|| after.clone());
            e.after = after;
            e.commits = commits;
            e.changed_paths = paths;
            e
        }
        "create" | "delete" => {
            // Gitea sends the short name, Forgejo (and GitHub for some hooks) the full ref.
            let full = s(p, &["ref"]).unwrap_or_default();
            let name = full
                .strip_prefix("refs/tags/")
                .or_else(|| full.strip_prefix("refs/heads/"))
                .unwrap_or(&full)
                .to_string();
            match (event, s(p, &["ref_type"]).as_deref()) {
                ("create", Some("tag")) => {
                    let mut e = base_event(forge, EventKind::Tag, need_repo()?);
                    e.git_ref = Some(format!("refs/tags/{name}"));
                    e.after = s(p, &["sha"]);
                    e.tag = Some(name);
                    e
                }
                ("delete", Some("tag")) => {
                    let mut e = base_event(forge, EventKind::TagDeleted, need_repo()?);
                    e.git_ref = Some(format!("refs/tags/{name}"));
                    e.tag = Some(name);
                    e
                }
                ("delete", Some("branch")) => {
                    let mut e = base_event(forge, EventKind::BranchDeleted, need_repo()?);
                    e.git_ref = Some(format!("refs/heads/{name}"));
                    e.branch = Some(name);
                    e
                }
                // A new branch also arrives as a push, which routes match.
                (_, kind) => return Ok(Parsed::NotHandled(format!("{event} of a {}", kind.unwrap_or("ref")))),
            }
        }
        "pull_request" => {
            let action = s(p, &["action"]).unwrap_or_default();
            let merged = p["pull_request"]["merged"].as_bool().unwrap_or(false);
            let kind = match action.as_str() {
                "opened" => EventKind::PullRequestOpened,
                "reopened" => EventKind::PullRequestReopened,
                // GitHub says "synchronize", Gitea and Forgejo "synchronized".
                "synchronize" | "synchronized" => EventKind::PullRequestSynchronized,
                "closed" if merged => EventKind::PullRequestMerged,
                "closed" => EventKind::PullRequestClosed,
                other => return Ok(Parsed::NotHandled(format!("pull_request {other}"))),
            };
            let pr = &p["pull_request"];
            let mut e = base_event(forge, kind, need_repo()?);
            e.pull_request = Some(PullRequest {
                number: p["number"]
                    .as_u64()
                    .or_else(|| pr["number"].as_u64())
                    .unwrap_or_default(),
                title: s(pr, &["title"]).unwrap_or_default(),
                head_branch: s(pr, &["head", "ref"]).unwrap_or_default(),
                base_branch: s(pr, &["base", "ref"]).unwrap_or_default(),
                head_sha: s(pr, &["head", "sha"]).unwrap_or_default(),
            });
            e.branch = s(pr, &["base", "ref"]);
            e
        }
        other => return Ok(Parsed::NotHandled(other.to_string())),
    };
    e.sender = sender;
    Ok(Parsed::Event(Box::new(e)))
}

fn parse_gitlab(event: &str, p: &Value) -> Result<Parsed, HookError> {
    let repository = s(p, &["project", "path_with_namespace"])
        .ok_or_else(|| HookError::BadRequest("payload has no project.path_with_namespace".into()));
    let kind_of = s(p, &["object_kind"]).unwrap_or_default();
    let mut e = match (event, kind_of.as_str()) {
        ("Push Hook", _) | ("Tag Push Hook", _) | (_, "push") | (_, "tag_push") => {
            let git_ref = s(p, &["ref"]).ok_or_else(|| HookError::BadRequest("push payload has no ref".into()))?;
            let after = s(p, &["after"]);
            let deleted = after.as_deref() == Some(ZERO_SHA);
            let Some((kind, branch, tag)) = pushed_ref(&git_ref, deleted) else {
                return Ok(Parsed::NotHandled(format!("push to {git_ref}")));
            };
            let mut e = base_event(Forge::Gitlab, kind, repository?);
            let (commits, paths) = commits_of(p);
            e.git_ref = Some(git_ref);
            e.branch = branch;
            e.tag = tag;
            e.before = s(p, &["before"]);
            e.commit = s(p, &["checkout_sha"]).or_else(|| after.clone());
            e.after = after;
            e.commits = commits;
            e.changed_paths = paths;
            e.sender = s(p, &["user_username"]);
            e
        }
        ("Merge Request Hook", _) | (_, "merge_request") => {
            let attrs = &p["object_attributes"];
            let action = s(attrs, &["action"]).unwrap_or_default();
            let kind = match action.as_str() {
                "open" => EventKind::PullRequestOpened,
                "reopen" => EventKind::PullRequestReopened,
                // An update with `oldrev` brought new commits; one without is an edit.
                "update" if attrs.get("oldrev").is_some_and(|v| !v.is_null()) => EventKind::PullRequestSynchronized,
                "close" => EventKind::PullRequestClosed,
                "merge" => EventKind::PullRequestMerged,
                other => return Ok(Parsed::NotHandled(format!("merge request {other}"))),
            };
            let mut e = base_event(Forge::Gitlab, kind, repository?);
            e.pull_request = Some(PullRequest {
                number: attrs["iid"].as_u64().unwrap_or_default(),
                title: s(attrs, &["title"]).unwrap_or_default(),
                head_branch: s(attrs, &["source_branch"]).unwrap_or_default(),
                base_branch: s(attrs, &["target_branch"]).unwrap_or_default(),
                head_sha: s(attrs, &["last_commit", "id"]).unwrap_or_default(),
            });
            e.branch = s(attrs, &["target_branch"]);
            e.sender = s(p, &["user", "username"]);
            e
        }
        (other, _) => return Ok(Parsed::NotHandled(other.to_string())),
    };
    if e.sender.is_none() {
        e.sender = s(p, &["user_name"]);
    }
    Ok(Parsed::Event(Box::new(e)))
}

/// A glob that was checked when it was read.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    matcher: GlobMatcher,
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let glob = globset::GlobBuilder::new(text)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("'{text}' is not a glob pattern: {e}"))?;
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
    fn is_match(&self, s: &str) -> bool {
        self.matcher.is_match(s)
    }
}

/// A route: which events start which workflow.
#[derive(Debug, Clone)]
pub struct WebhookRoute {
    pub name: String,
    /// Only deliveries from this forge; any if `None`.
    pub forge: Option<Forge>,
    /// Repository full names (`platform/infra`, `platform/*`); any if empty.
    pub repositories: Vec<Pattern>,
    /// Event kinds; at least one.
    pub events: Vec<EventKind>,
    /// Branches (of a push or deletion; the base branch of a pull request); any if empty.
    pub branches: Vec<Pattern>,
    /// Tags; any if empty.
    pub tags: Vec<Pattern>,
    /// Changed paths of a push (`apps/web/**`): at least one must match; any if empty.
    pub paths: Vec<Pattern>,
    pub workflow: String,
    /// Input with placeholders; see [`GitEvent::context`].
    pub input: Value,
    /// Limits runs started by this route.
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
    pub fn start_request(&self, e: &GitEvent, payload: &Value) -> Result<StartRun, String> {
        let input = template::render(&self.input, &e.context(payload))?;
        let mut req = StartRun::new(self.workflow.clone(), input);
        let digest = hex::encode(Sha256::digest(e.identity().as_bytes()));
        req.idempotency_key = Some(format!("hook:{}:{}", self.name, &digest[..32]));
        req.started_by = Some(format!(
            "webhook:{}:{} {}{}",
            self.name,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector in GitHub's "Validating webhook deliveries".
    #[test]
    fn githubs_published_signature_vector_verifies() {
        let secret = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let headers = vec![("X-Hub-Signature-256", sig)];
        assert_eq!(verify(Forge::Github, &headers, body, secret), Ok(()));
        let tampered = vec![(
            "X-Hub-Signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e18",
        )];
        assert!(verify(Forge::Github, &tampered, body, secret).is_err());
        assert!(verify(Forge::Github, &Vec::new(), body, secret).is_err());
    }

    #[test]
    fn gitea_signs_with_bare_hex_and_gitlab_with_a_token() {
        let secret = b"s3cret";
        let body = br#"{"a":1}"#;
        let mut mac = HmacSha256::new_from_slice(secret).unwrap();
        mac.update(body);
        let hexsig = hex::encode(mac.finalize().into_bytes());
        assert!(
            verify(
                Forge::Gitea,
                &vec![("X-Gitea-Signature", hexsig.as_str())],
                body,
                secret
            )
            .is_ok()
        );
        assert!(
            verify(
                Forge::Forgejo,
                &vec![("X-Forgejo-Signature", hexsig.as_str())],
                body,
                secret
            )
            .is_ok()
        );
        let prefixed = format!("sha256={hexsig}");
        assert!(
            verify(
                Forge::Gitea,
                &vec![("X-Gitea-Signature", prefixed.as_str())],
                body,
                secret
            )
            .is_err()
        );
        assert!(verify(Forge::Gitlab, &vec![("X-Gitlab-Token", "s3cret")], body, secret).is_ok());
        assert!(verify(Forge::Gitlab, &vec![("X-Gitlab-Token", "s3creT")], body, secret).is_err());
    }

    #[test]
    fn globs_do_not_cross_slashes_unless_asked() {
        let p: Pattern = "apps/*".parse().unwrap();
        assert!(p.is_match("apps/web") && !p.is_match("apps/web/values.yaml"));
        let p: Pattern = "apps/**".parse().unwrap();
        assert!(p.is_match("apps/web/values.yaml"));
        assert!("release/[".parse::<Pattern>().is_err());
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
}

/// What a delivery led to, as the forge's response shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryOutcome {
    /// started | duplicate | no route | ignored | not handled | pong
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<StartedByRoute>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// A run a route started (or had started for an earlier delivery of the same event).
#[derive(Debug, Clone, Serialize)]
pub struct StartedByRoute {
    pub route: String,
    pub workflow: String,
    pub run_id: crate::core::model::RunId,
    pub duplicate: bool,
}

impl DeliveryOutcome {
    fn new(outcome: &str) -> Self {
        Self {
            outcome: outcome.to_string(),
            event: None,
            reason: None,
            runs: Vec::new(),
            errors: Vec::new(),
        }
    }
}

/// Handles one authenticated, parsed delivery: loop protection, routing, starting runs,
/// recording. `Err` only when the store or queue failed.
pub(crate) async fn deliver(
    engine: &crate::engine::Engine,
    hooks: &Webhooks,
    forge: Forge,
    parsed: Parsed,
    payload: &Value,
    body_sha256: &str,
) -> Result<DeliveryOutcome, crate::core::error::EngineError> {
    let pool = engine.store().pool();
    let (mut out, mut event) = match parsed {
        Parsed::Ping => (DeliveryOutcome::new("pong"), None),
        Parsed::NotHandled(what) => {
            let mut o = DeliveryOutcome::new("not handled");
            o.event = Some(what);
            (o, None)
        }
        Parsed::Event(e) => {
            let mut o = DeliveryOutcome::new("no route");
            o.event = Some(e.kind.as_str().to_string());
            (o, Some(e))
        }
    };
    // The event type is not signed: a body is bound to the one it first came as.
    let kind = out.event.clone().unwrap_or_else(|| "ping".into());
    let before: Option<String> = sqlx::query_scalar(
        "select event from webhook_deliveries where forge = $1 and body_sha256 = $2 and event <> $3 limit 1",
    )
    .bind(forge.as_str())
    .bind(body_sha256)
    .bind(&kind)
    .fetch_optional(pool)
    .await?;
    if let Some(first) = before {
        return Err(crate::core::error::EngineError::Conflict(format!(
            "this signed body was delivered before as a {first} event; it is not taken again as {kind}"
        )));
    }
    if let Some(e) = &mut event
        && e.kind == EventKind::Tag
    {
        let deleted: i64 = sqlx::query_scalar(
            "select count(*) from webhook_deliveries where forge = $1 and event = 'tag-deleted' \
             and repository = $2 and identity like $3",
        )
        .bind(forge.as_str())
        .bind(&e.repository)
        .bind(format!(
            "tag-deleted|{}|refs/tags/{}|%",
            e.repository.replace('%', "\\%").replace('_', "\\_"),
            e.tag
                .as_deref()
                .unwrap_or_default()
                .replace('%', "\\%")
                .replace('_', "\\_")
        ))
        .fetch_one(pool)
        .await?;
        e.generation = deleted as u64;
    }
    if let Some(e) = &event {
        if let Some(run) = e.pushed_by_dayshift(&hooks.bot_emails) {
            out.outcome = "ignored".into();
            out.reason = Some(format!("pushed by dayshift ({run}); its own commits start nothing"));
        } else {
            for route in hooks.routes.iter().filter(|r| r.matches(e)) {
                let req = match route.start_request(e, payload) {
                    Ok(req) => req,
                    Err(err) => {
                        out.errors.push(format!("route '{}': {err}", route.name));
                        continue;
                    }
                };
                match engine.start(req).await {
                    Ok(started) => out.runs.push(StartedByRoute {
                        route: route.name.clone(),
                        workflow: route.workflow.clone(),
                        run_id: started.id,
                        duplicate: !started.created,
                    }),
                    Err(
                        err @ (crate::core::error::EngineError::InvalidInput { .. }
                        | crate::core::error::EngineError::UnknownWorkflow(_)
                        | crate::core::error::EngineError::BadRequest(_)
                        | crate::core::error::EngineError::Conflict(_)),
                    ) => out.errors.push(format!("route '{}': {err}", route.name)),
                    Err(err) => return Err(err),
                }
            }
            if !out.runs.is_empty() {
                out.outcome = if out.runs.iter().all(|r| r.duplicate) {
                    "duplicate"
                } else {
                    "started"
                }
                .into();
            } else if !out.errors.is_empty() {
                out.outcome = "failed".into();
            }
        }
    }
    let run_ids: Vec<uuid::Uuid> = out.runs.iter().map(|r| r.run_id.0).collect();
    sqlx::query(
        "insert into webhook_deliveries (forge, delivery_id, event, repository, identity, outcome, detail, run_ids, body_sha256) \
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(forge.as_str())
    .bind(event.as_ref().and_then(|e| e.delivery.clone()))
    .bind(out.event.clone().unwrap_or_else(|| "ping".into()))
    .bind(event.as_ref().map(|e| e.repository.clone()))
    .bind(event.as_ref().map(|e| e.identity()))
    .bind(&out.outcome)
    .bind(
        out.reason
            .clone()
            .or_else(|| (!out.errors.is_empty()).then(|| out.errors.join("; "))),
    )
    .bind(&run_ids)
    .bind(body_sha256)
    .execute(pool)
    .await?;
    tracing::info!(forge = forge.as_str(), event = ?out.event, outcome = %out.outcome, runs = out.runs.len(), "Webhook delivery handled.");
    Ok(out)
}
