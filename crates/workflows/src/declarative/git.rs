//! The git actions of workflow files: read a value, set values (the format-preserving edit
//! promotions use) or write a file and push, revert a commit, open a pull (merge) request on the forge and wait
//! until it is merged.
//!
//! Every write is safe to repeat. A commit carries the trailer `Dayshift-Step: <run>/<step>`,
//! and an attempt first looks for it among the branch's recent commits: a push whose answer was
//! lost is found, not made twice. A value already set, a commit already reverted and a pull
//! request already open are found the same way. A push refused because the branch moved is
//! made again on the new tip. Nothing is ever force-pushed.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::adapters::forge::Forge;
use crate::adapters::git::{Checkout, GitConfig, GitError};
use crate::connections::Connections;
use crate::gitops::values;
use dayshift_engine::{StepCtx, StepError};

/// How often a push is made again on a branch that keeps moving, within one attempt.
const PUSH_ATTEMPTS: u32 = 5;

/// How many of the branch's latest commits are searched for this step's own.
const RECENT: usize = 50;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReadParams {
    connection: String,
    branch: String,
    file: String,
    #[serde(default)]
    key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetValuesParams {
    connection: String,
    branch: String,
    #[serde(default)]
    from: Option<String>,
    file: String,
    values: BTreeMap<String, Value>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WriteFileParams {
    connection: String,
    branch: String,
    #[serde(default)]
    from: Option<String>,
    file: String,
    content: String,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RevertParams {
    connection: String,
    branch: String,
    #[serde(default)]
    from: Option<String>,
    commit: String,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PullRequestParams {
    connection: String,
    head: String,
    base: String,
    title: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    draft: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WaitMergedParams {
    connection: String,
    number: u64,
}

fn git_of<'c>(connections: &'c Connections, name: &str) -> Result<&'c GitConfig, StepError> {
    connections.git(name).map_err(StepError::permanent)
}

fn forge_of<'c>(connections: &'c Connections, name: &str) -> Result<&'c Forge, StepError> {
    git_of(connections, name)?.forge.as_ref().ok_or_else(|| {
        StepError::permanent(format!(
            "connections.git.{name} names no forge: give it `forge:` to open pull requests"
        ))
    })
}

/// `git.read`: `key` of `file` on `branch` (`value`), or the whole file (`text`).
pub(crate) async fn read(p: ReadParams, connections: &Connections) -> Result<Value, StepError> {
    let git = git_of(connections, &p.connection)?;
    let checkout = git.checkout(&p.branch).await?;
    let path = checkout.inside(&p.file).map_err(StepError::permanent)?;
    let text =
        std::fs::read_to_string(&path).map_err(|e| StepError::permanent(format!("{} on {}: {e}", p.file, p.branch)))?;
    let commit = checkout.head().await?;
    match &p.key {
        Some(key) => {
            let value = values::get(&text, key).map_err(|e| StepError::permanent(format!("{}: {e}", p.file)))?;
            Ok(json!({ "value": value, "commit": commit }))
        }
        None => Ok(json!({ "text": text, "commit": commit })),
    }
}

/// The trailer that marks this step's commits.
fn marker(s: &StepCtx) -> String {
    format!("Dayshift-Step: {}/{}", s.run_id, s.step)
}

/// `message`, or `default`, with this step's trailer.
fn with_marker(message: Option<&str>, default: String, s: &StepCtx) -> String {
    let message = message.map(str::trim).filter(|m| !m.is_empty()).map(str::to_string);
    format!("{}\n\n{}\n", message.unwrap_or(default), marker(s))
}

/// A commit among the branch's recent ones whose message has a line `line`.
async fn find_line(checkout: &Checkout, line: &str) -> Result<Option<String>, StepError> {
    Ok(checkout
        .recent(RECENT)
        .await?
        .into_iter()
        .find(|(_, msg)| msg.lines().any(|l| l.trim() == line))
        .map(|(id, _)| id))
}

/// A value given in `values`, refused unless it is a string (written with the file's quoting
/// kept), a number or a boolean (written plain).
fn scalar(key: &str, v: &Value) -> Result<Value, StepError> {
    match v {
        Value::String(_) | Value::Number(_) | Value::Bool(_) => Ok(v.clone()),
        other => Err(StepError::permanent(format!(
            "action git.set-values: values.{key} must be a string, a number or a boolean, not {other}"
        ))),
    }
}

/// `git.set-values`: sets each key of `values` in `file`, one commit, pushed to `branch`
/// (started from `from` when it does not exist yet).
pub(crate) async fn set_values(p: SetValuesParams, connections: &Connections, s: &StepCtx) -> Result<Value, StepError> {
    if p.values.is_empty() {
        return Err(StepError::permanent("action git.set-values: `values` sets nothing"));
    }
    let values: Vec<(String, Value)> = p
        .values
        .iter()
        .map(|(k, v)| Ok((k.clone(), scalar(k, v)?)))
        .collect::<Result<_, StepError>>()?;
    let default = format!(
        "set {} in {}",
        values
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().map_or_else(|| v.to_string(), str::to_string)))
            .collect::<Vec<_>>()
            .join(", "),
        p.file
    );
    let target = Target {
        connection: &p.connection,
        branch: &p.branch,
        from: p.from.as_deref(),
        file: &p.file,
        message: with_marker(p.message.as_deref(), default, s),
    };
    let file = p.file.clone();
    edit_and_push(target, connections, s, move |before| {
        let Some(before) = before else {
            return Err(StepError::permanent(format!("{file}: there is no such file")));
        };
        let mut text = before.to_string();
        let mut lines = Vec::new();
        for (key, value) in &values {
            let (next, change) =
                values::set_scalar(&text, key, value).map_err(|e| StepError::permanent(format!("{file}: {e}")))?;
            if next != text {
                lines.push(change.line);
            }
            text = next;
        }
        Ok((text, lines))
    })
    .await
}

/// `git.write-file`: `file` holds `content` (created, or replaced whole), one commit, pushed to
/// `branch` (started from `from` when it does not exist yet).
pub(crate) async fn write_file(p: WriteFileParams, connections: &Connections, s: &StepCtx) -> Result<Value, StepError> {
    let yaml = p.file.ends_with(".yaml") || p.file.ends_with(".yml");
    if yaml && let Err(e) = serde_saphyr::from_multiple::<Value>(&p.content) {
        return Err(StepError::permanent(format!(
            "action git.write-file: the content for {} is not valid YAML: {e}",
            p.file
        )));
    }
    let content = if p.content.ends_with('\n') || p.content.is_empty() {
        p.content.clone()
    } else {
        format!("{}\n", p.content)
    };
    let target = Target {
        connection: &p.connection,
        branch: &p.branch,
        from: p.from.as_deref(),
        file: &p.file,
        message: with_marker(p.message.as_deref(), format!("write {}", p.file), s),
    };
    edit_and_push(target, connections, s, move |_| Ok((content.clone(), Vec::new()))).await
}

/// Where an edit is committed, and with what message.
struct Target<'a> {
    connection: &'a str,
    branch: &'a str,
    from: Option<&'a str>,
    file: &'a str,
    message: String,
}

/// Makes `edit` of the file (its text, `None` when it does not exist; the new text and the lines
/// changed) one commit on the branch and pushes it: once (a commit with this step's trailer is
/// found, not made again), with no commit when nothing changes, and again on the new tip when
/// the branch moved.
async fn edit_and_push(
    t: Target<'_>,
    connections: &Connections,
    s: &StepCtx,
    edit: impl Fn(Option<&str>) -> Result<(String, Vec<usize>), StepError>,
) -> Result<Value, StepError> {
    let git = git_of(connections, t.connection)?;
    let (checkout, created) = git.checkout_or_branch(t.branch, t.from).await?;
    let marker = marker(s);
    let answer = |commit: String, changed: bool, lines: Vec<usize>, created: bool| json!({ "commit": commit, "changed": changed, "lines": lines, "branch": t.branch, "created": created });
    for attempt in 1..=PUSH_ATTEMPTS {
        if attempt > 1 {
            checkout.reset_to_remote().await?;
        }
        if let Some(commit) = find_line(&checkout, &marker).await? {
            return Ok(answer(commit, true, Vec::new(), created));
        }
        let path = checkout.inside(t.file).map_err(StepError::permanent)?;
        let before = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StepError::permanent(format!("{} on {}: {e}", t.file, checkout.branch))),
        };
        let (text, lines) = edit(before.as_deref())?;
        if before.as_deref() == Some(text.as_str()) {
            // It says so already (set by someone else, or by a replay): no commit, and no new
            // branch (there is nothing to propose).
            return Ok(answer(checkout.head().await?, false, Vec::new(), false));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StepError::transient(format!("create {}: {e}", dir.display())))?;
        }
        std::fs::write(&path, &text).map_err(|e| StepError::transient(format!("write {}: {e}", t.file)))?;
        let commit = checkout.commit(&[t.file], &t.message).await?;
        match checkout.push().await {
            Ok(()) => return Ok(answer(commit, true, lines, created)),
            Err(GitError::Rejected { detail, .. }) => {
                tracing::info!(run_id = %s.run_id, step = %s.step, attempt, detail, "The branch moved; making the change again on its new tip.");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(StepError::transient(format!(
        "{} kept moving: {PUSH_ATTEMPTS} pushes were rejected",
        t.branch
    )))
}

/// A commit id as git prints it: 7 to 64 hex digits (nothing git could read as an option or
/// a revision expression).
fn check_commit(commit: &str) -> Result<(), StepError> {
    if (7..=64).contains(&commit.len()) && commit.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(StepError::permanent(format!(
            "action git.revert: commit {commit:?} is not a commit id (7 to 64 hex digits)"
        )))
    }
}

/// `git.revert`: reverts `commit` on `branch` (started from `from` when it does not exist yet)
/// and pushes. Once per commit: a branch that already holds its revert (this step's, or anyone's
/// `git revert`) is left as it is.
pub(crate) async fn revert(p: RevertParams, connections: &Connections, s: &StepCtx) -> Result<Value, StepError> {
    check_commit(&p.commit)?;
    let git = git_of(connections, &p.connection)?;
    let (checkout, created) = git.checkout_or_branch(&p.branch, p.from.as_deref()).await?;
    let marker = marker(s);
    for attempt in 1..=PUSH_ATTEMPTS {
        if attempt > 1 {
            checkout.reset_to_remote().await?;
        }
        checkout.reach(&p.commit).await?;
        let full = checkout.message(&format!("{}^{{commit}}", p.commit)).await?;
        let subject = full.lines().next().unwrap_or_default().to_string();
        let id = resolve(&checkout, &p.commit).await?;
        // This step's own revert, pushed by an attempt whose answer was lost.
        if let Some(commit) = find_line(&checkout, &marker).await? {
            return Ok(
                json!({ "commit": commit, "reverted": id, "changed": true, "branch": p.branch, "created": created }),
            );
        }
        // Reverted already, by another run or by hand: nothing to do, and no new branch.
        let reverts = format!("This reverts commit {id}");
        if let Some(commit) = find_line(&checkout, &format!("{reverts}.")).await? {
            return Ok(
                json!({ "commit": commit, "reverted": id, "changed": false, "branch": p.branch, "created": false }),
            );
        }
        // The message always says what it reverts, as `git revert` writes it, so that a later
        // revert of the same commit finds this one.
        let title = p
            .message
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map_or_else(|| format!("Revert \"{subject}\""), str::to_string);
        let message = format!("{title}\n\n{reverts}.\n\n{marker}\n");
        let commit = checkout.revert(&id, &message).await?;
        match checkout.push().await {
            Ok(()) => {
                return Ok(
                    json!({ "commit": commit, "reverted": id, "changed": true, "branch": p.branch, "created": created }),
                );
            }
            Err(GitError::Rejected { detail, .. }) => {
                tracing::info!(run_id = %s.run_id, step = %s.step, attempt, detail, "The branch moved; reverting again on its new tip.");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(StepError::transient(format!(
        "{} kept moving: {PUSH_ATTEMPTS} pushes were rejected",
        p.branch
    )))
}

/// The full id of `commit`.
async fn resolve(checkout: &Checkout, commit: &str) -> Result<String, StepError> {
    Ok(checkout.rev_parse(&format!("{commit}^{{commit}}")).await?)
}

/// `git.pull-request`: the open pull request from `head` to `base`, opened if there is none.
pub(crate) async fn pull_request(p: PullRequestParams, connections: &Connections) -> Result<Value, StepError> {
    crate::adapters::git::check_branch(&p.head)?;
    crate::adapters::git::check_branch(&p.base)?;
    if p.head == p.base {
        return Err(StepError::permanent(format!(
            "action git.pull-request: head and base are both {}",
            p.head
        )));
    }
    let forge = forge_of(connections, &p.connection)?;
    let (pr, created) = forge
        .open(
            &p.head,
            &p.base,
            &p.title,
            p.body.as_deref().unwrap_or_default(),
            p.draft,
        )
        .await
        .map_err(crate::adapters::step_err)?;
    Ok(json!({ "number": pr.number, "url": pr.url, "state": pr.state, "created": created }))
}

/// `git.wait-merged`: succeeds once pull request `number` is merged; one that is still open is
/// a transient error (retried, paced); one closed without merging fails the step.
pub(crate) async fn wait_merged(p: WaitMergedParams, connections: &Connections) -> Result<Value, StepError> {
    let forge = forge_of(connections, &p.connection)?;
    let pr = forge.get(p.number).await.map_err(crate::adapters::step_err)?;
    match pr.state {
        "merged" => Ok(json!({ "merged": true, "merge-commit": pr.merge_commit, "url": pr.url })),
        "open" => Err(StepError::transient(format!(
            "pull request {} is still open: {}",
            pr.number, pr.url
        ))),
        _ => Err(StepError::permanent(format!(
            "pull request {} was closed without being merged: {}",
            pr.number, pr.url
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_must_be_an_id_not_an_option_or_an_expression() {
        assert!(check_commit("0123abc").is_ok());
        for bad in ["--all", "HEAD~1", "main", "0123ab", "0123abc^"] {
            assert!(check_commit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn values_are_strings_numbers_or_booleans() {
        assert_eq!(scalar("a", &json!(3)).unwrap(), json!(3));
        assert_eq!(scalar("a", &json!("v1")).unwrap(), json!("v1"));
        let e = scalar("image.tag", &json!({"x": 1})).unwrap_err();
        assert!(e.to_string().contains("values.image.tag"), "{e}");
    }
}
