//! The one model of git events every forge's delivery is read into: push, tag, deletion,
//! pull/merge request, with the identity that makes a redelivery the same event.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

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

    pub(crate) fn is_pull_request(self) -> bool {
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

/// Why a delivery was refused: an [`IntakeError`], as every intake refuses.
pub type HookError = crate::triggers::intake::IntakeError;
