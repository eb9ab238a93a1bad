//! Reading a delivery: each forge's headers and payload into the one event model.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::triggers::webhook::event::{Commit, EventKind, Forge, GitEvent, HookError, Parsed, PullRequest};
use crate::triggers::webhook::verify::Headers;

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

/// Reads a delivery (after [`crate::triggers::webhook::verify()`]).
pub fn parse(forge: Forge, headers: &dyn Headers, body: &[u8]) -> Result<Parsed, HookError> {
    let payload: Value =
        serde_json::from_slice(body).map_err(|e| HookError::BadRequest(format!("body is not JSON: {e}")))?;
    parse_payload(forge, headers, &payload)
}

/// Reads a delivery whose body is parsed JSON.
pub(crate) fn parse_payload(forge: Forge, headers: &dyn Headers, payload: &Value) -> Result<Parsed, HookError> {
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
        Forge::Gitlab => parse_gitlab(event_name, payload),
        _ => parse_github_like(forge, event_name, payload),
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
