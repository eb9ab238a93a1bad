//! `promote.image`: writes an image tag one environment further in the infra repository that
//! ArgoCD watches, and knows whether it worked.
//!
//! Steps: `commit-and-push` (clone, change exactly the value, commit with the `Dayshift-Run`
//! trailer that dayshift's webhook intake recognises as its own, push; when the branch moved,
//! fetch and apply again) and `wait-healthy` (the ArgoCD Application reports the pushed
//! revision `Synced` and `Healthy`): a durable wait, checks `wait-healthy`, `wait-healthy:2`, …
//! with durable sleeps between them (see [`crate::wait`]). When the application turns
//! `Degraded` or the wait times out, the undo reverts the commit with a new commit (never a
//! force-push), pushes it, waits for health again and sends a notice.

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{Ctx, RetryPolicy, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};

use super::values;
use crate::adapters::git::{Checkout, GitConfig, GitError};
use crate::adapters::kube::Kube;
use crate::adapters::notify::Notifier;
use crate::adapters::step_err;
use crate::connections::Connections;
use crate::gates::ApprovalGate;
use crate::wait::{self, Pace, Probe, Wait};

dayshift_engine::message_error!(
    /// An image tag or digest registries would not take.
    InvalidTag
);

dayshift_engine::message_error!(
    /// A promotion that does not say which value to change.
    InvalidTarget
);

/// How many times a push is re-applied on a branch that keeps moving.
const PUSH_ATTEMPTS: u32 = 5;

/// The ArgoCD Application that syncs the environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgoApp {
    /// The Kubernetes connection where ArgoCD runs. Default `default`.
    #[serde(default = "default_kubernetes")]
    pub kubernetes: String,
    /// Default `argocd`.
    #[serde(default = "default_argocd_namespace")]
    pub namespace: String,
    pub name: String,
}

fn default_kubernetes() -> String {
    "default".into()
}
fn default_argocd_namespace() -> String {
    "argocd".into()
}
fn default_branch() -> String {
    "main".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(600)
}

/// The input of `promote.image`; `promote.chain` hands it to each environment's child run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteInput {
    /// A git connection (connections.git): the infra repository.
    pub repository: String,
    /// The application, for messages.
    pub application: String,
    /// The target environment, for messages.
    pub environment: String,
    /// The image tag (`2.15.0`) or digest (`sha256:…`).
    pub tag: String,
    /// The branch holding the environment's values. Default `main`.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// The file, relative to the repository root (`envs/prod/values.yaml`).
    pub file: String,
    /// A Helm values key path (`api-gateway.image.tag`)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// ...or a kustomization image name, whose `newTag` (or `digest`) is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The commit that built the image, for the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_commit: Option<String>,
    /// Wait for this Application to be Synced and Healthy at the pushed revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argocd: Option<ArgoApp>,
    /// How long to wait for health. Default 10m.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A notice webhook (connections.notify).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// Wait for approval before pushing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalGate>,
    /// Who made the change being promoted (the commit author): they may not approve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}

/// What `commit-and-push` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    /// The commit that carries the value (ours, or the tip if the value was already there).
    pub commit: String,
    /// Whether this run made a commit.
    pub changed: bool,
    /// The line changed.
    pub line: Option<usize>,
    /// Pushes tried (more than one: the branch moved under us).
    pub push_attempts: u32,
}

/// What `promote.image` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    pub application: String,
    pub environment: String,
    pub tag: String,
    #[serde(flatten)]
    pub pushed: Pushed,
}

/// Checks a tag or digest the way registries do (OCI distribution spec).
pub fn check_tag(tag: &str) -> Result<(), InvalidTag> {
    if let Some(hex) = tag.strip_prefix("sha256:") {
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Ok(());
        }
        return Err(InvalidTag::from(format!(
            "{tag:?} is not a sha256 digest (sha256: and 64 lowercase hex digits)"
        )));
    }
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InvalidTag::from(format!(
            "{tag:?} is not a valid image tag: 1 to 128 of A-Z a-z 0-9 _ . -, not starting with . or -"
        )))
    }
}

/// The key path the input names.
fn key_path(input: &PromoteInput) -> Result<String, InvalidTarget> {
    match (&input.key, &input.image) {
        (Some(key), None) => Ok(key.clone()),
        (None, Some(image)) => {
            let field = if input.tag.starts_with("sha256:") {
                "digest"
            } else {
                "newTag"
            };
            Ok(format!("images.[name={image}].{field}"))
        }
        _ => Err("give either `key` (a Helm values key path) or `image` (a kustomization image name)".into()),
    }
}

struct Promote {
    input: PromoteInput,
    path: String,
    git: GitConfig,
    kube: Option<Kube>,
    notifier: Option<Notifier>,
}

/// The `promote.image` workflow.
pub fn promote_image(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "promote.image",
        "Writes an image tag into an environment's values in git, waits until ArgoCD reports it Synced and Healthy; reverts the commit when it does not.",
        move |ctx: Ctx, input: PromoteInput| {
            let connections = connections.clone();
            async move {
                check_tag(&input.tag).map_err(WorkflowError::failed)?;
                let path = key_path(&input).map_err(WorkflowError::failed)?;
                let git = connections
                    .git(&input.repository)
                    .map_err(WorkflowError::failed)?
                    .clone();
                let kube = match &input.argocd {
                    Some(app) => {
                        let config = connections.kubernetes(&app.kubernetes).map_err(WorkflowError::failed)?;
                        Some(Kube::connect(config).await.map_err(WorkflowError::failed)?)
                    }
                    None => None,
                };
                let notifier = match &input.notify {
                    Some(n) => Some(connections.notifier(n).map_err(WorkflowError::failed)?),
                    None => None,
                };
                let p = Arc::new(Promote {
                    input,
                    path,
                    git,
                    kube,
                    notifier,
                });
                promote(&ctx, p).await
            }
        },
    )
    .guard("branch")
    .guard("file")
}

async fn promote(ctx: &Ctx, p: Arc<Promote>) -> Result<Promotion, WorkflowError> {
    let run_id = ctx.run_id().to_string();
    let text = format!(
        ":arrow_forward: promoting **{}** to **{}**: `{}` (run `{run_id}`)",
        p.input.application, p.input.environment, p.input.tag
    );
    notify(ctx, &p, "notify-start", text).await;
    if let Some(gate) = &p.input.approval {
        approve(ctx, &p, gate).await?;
    }
    let (pr, run) = (&p, run_id.as_str());
    let step = ctx
        .step("commit-and-push", |_s| async move { commit_and_push(pr, run).await })
        .undo({
            let (p, run) = (p.clone(), run_id.clone());
            move |s, pushed: Pushed| async move { revert(&p, &pushed, &run, s.attempt).await }
        });
    // The revert waits for health again, one check per attempt (see `revert`).
    let pushed: Pushed = match &p.input.argocd {
        Some(_) => step.undo_retry(revert_pace(&p.input).policy()).await?,
        None => step.await?,
    };

    if let Some(app) = &p.input.argocd {
        let commit = pushed.commit.as_str();
        let wait = Wait {
            name: "wait-healthy",
            timeout: p.input.timeout,
            every: check_interval(p.input.timeout),
            retry: RetryPolicy::cautious(),
        };
        wait::until(ctx, wait, || async move { argo_probe(pr, app, commit).await }).await?;
    }
    let text = format!(
        ":white_check_mark: **{}** promoted to **{}**: `{}` (commit `{}`, run `{run_id}`)",
        p.input.application,
        p.input.environment,
        p.input.tag,
        short(&pushed.commit)
    );
    notify(ctx, &p, "notify-promoted", text).await;
    Ok(Promotion {
        application: p.input.application.clone(),
        environment: p.input.environment.clone(),
        tag: p.input.tag.clone(),
        pushed,
    })
}

/// The approval gate, with a notice to the promotion's webhook while it waits.
async fn approve(ctx: &Ctx, p: &Promote, gate: &ApprovalGate) -> Result<(), WorkflowError> {
    let i = &p.input;
    let text = format!(
        ":hourglass: **{}** to **{}** (`{}`) waits for {} approval(s) from {} (run `{}`)",
        i.application,
        i.environment,
        i.tag,
        gate.required,
        gate.approver_list(),
        ctx.run_id()
    );
    crate::gates::approval(
        ctx,
        gate,
        i.requested_by.as_deref(),
        p.notifier.as_ref().map(|n| (n, text)),
    )
    .await
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(10)]
}

/// Sends a notice if a webhook is configured; a notice that cannot be sent is logged, not fatal.
async fn notify(ctx: &Ctx, p: &Promote, step: &str, text: String) {
    let Some(notifier) = &p.notifier else { return };
    let sent = ctx
        .step(step, |_s| async move { notifier.send(&text).await.map_err(step_err) })
        .await;
    if let Err(e) = sent {
        tracing::warn!(run_id = %ctx.run_id(), error = %e, "A promotion notice could not be sent.");
    }
}

fn message(p: &Promote, run_id: &str) -> String {
    let i = &p.input;
    let mut m = format!("promote {} to {}: {}\n\n", i.application, i.environment, i.tag);
    m.push_str(&format!("Sets {} in {} on {}.\n\n", p.path, i.file, i.branch));
    if let Some(source) = &i.source_commit {
        m.push_str(&format!("Source-Commit: {source}\n"));
    }
    m.push_str(&format!("Dayshift-Run: {run_id}\n"));
    m
}

/// Our commit among the branch's recent ones (an attempt that pushed before a crash).
async fn find_ours(checkout: &Checkout, marker: &str) -> Result<Option<String>, StepError> {
    let recent = checkout.recent(50).await?;
    Ok(recent
        .into_iter()
        .find(|(_, msg)| msg.lines().any(|l| l.trim() == marker))
        .map(|(id, _)| id))
}

async fn commit_and_push(p: &Promote, run_id: &str) -> Result<Pushed, StepError> {
    let i = &p.input;
    let checkout = p.git.checkout(&i.branch).await?;
    let marker = format!("Dayshift-Run: {run_id}");
    for attempt in 1..=PUSH_ATTEMPTS {
        if attempt > 1 {
            checkout.reset_to_remote().await?;
        }
        if let Some(commit) = find_ours(&checkout, &marker).await? {
            return Ok(Pushed {
                commit,
                changed: true,
                line: None,
                push_attempts: attempt,
            });
        }
        let file = checkout.inside(&i.file).map_err(StepError::permanent)?;
        let text = std::fs::read_to_string(&file)
            .map_err(|e| StepError::Permanent(format!("{} on {}: {e}", i.file, i.branch)))?;
        let (new_text, change) =
            values::set(&text, &p.path, &i.tag).map_err(|e| StepError::Permanent(format!("{}: {e}", i.file)))?;
        if new_text == text {
            // Already there (someone promoted this tag before us): nothing to commit.
            return Ok(Pushed {
                commit: checkout.head().await?,
                changed: false,
                line: None,
                push_attempts: attempt - 1,
            });
        }
        std::fs::write(&file, &new_text).map_err(|e| StepError::Transient(format!("write {}: {e}", i.file)))?;
        let commit = checkout.commit(&[i.file.as_str()], &message(p, run_id)).await?;
        match checkout.push().await {
            Ok(()) => {
                return Ok(Pushed {
                    commit,
                    changed: true,
                    line: Some(change.line),
                    push_attempts: attempt,
                });
            }
            Err(GitError::Rejected { detail, .. }) => {
                tracing::info!(run_id, attempt, detail, "The branch moved; applying the change again.");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(StepError::Transient(format!(
        "{} kept moving: {PUSH_ATTEMPTS} pushes were rejected",
        i.branch
    )))
}

/// How often the Application is read while waiting: every 2 s, more often for short timeouts.
fn check_interval(timeout: Duration) -> Duration {
    Duration::from_secs(2).min(timeout / 20).max(Duration::from_millis(20))
}

/// One read of the Application: ready when it reports `commit` Synced and Healthy; a permanent
/// error when it is Degraded at `commit` or missing.
async fn argo_probe(p: &Promote, app: &ArgoApp, commit: &str) -> Result<Probe, StepError> {
    let kube = p
        .kube
        .as_ref()
        .ok_or_else(|| StepError::permanent("no Kubernetes connection"))?;
    let found = kube
        .argocd_application(&app.namespace, &app.name)
        .await
        .map_err(step_err)?;
    let Some(a) = found else {
        return Err(StepError::Permanent(format!(
            "there is no ArgoCD Application {}/{}",
            app.namespace, app.name
        )));
    };
    let status = &a["status"];
    let revision = status["sync"]["revision"].as_str().unwrap_or_default();
    let sync = status["sync"]["status"].as_str().unwrap_or("Unknown");
    let health = status["health"]["status"].as_str().unwrap_or("Unknown");
    let at_commit = revision == commit;
    if at_commit && health == "Degraded" {
        let why = status["health"]["message"].as_str().unwrap_or("no message");
        return Err(StepError::Permanent(format!(
            "Application {} is Degraded at {}: {why}",
            app.name,
            short(commit)
        )));
    }
    if at_commit && sync == "Synced" && health == "Healthy" {
        return Ok(Probe::Ready);
    }
    let last = format!("revision {}, {sync}, {health}", short(revision));
    Ok(Probe::Pending {
        late: not_healthy(p, app, commit, &last),
        status: last,
    })
}

/// The timeout error, with what the Application said `last`.
fn not_healthy(p: &Promote, app: &ArgoApp, commit: &str, last: &str) -> String {
    format!(
        "Application {} did not become Synced and Healthy at {} within {} (last: {last})",
        app.name,
        short(commit),
        humantime::format_duration(p.input.timeout)
    )
}

/// How the revert's attempts wait for health again: as often and as long as `wait-healthy`.
fn revert_pace(i: &PromoteInput) -> Pace {
    Pace::new(i.timeout, check_interval(i.timeout))
}

/// The undo: a revert commit of ours (never a force-push), pushed, health awaited again, a
/// notice. Safe to repeat: an existing revert is found by its trailer, so each attempt (of
/// [`revert_pace`]) finds it and checks the Application once; "not yet" is retried with the run
/// released, and the last attempt says in the notice that it is still not healthy.
async fn revert(p: &Promote, pushed: &Pushed, run_id: &str, attempt: u32) -> Result<(), StepError> {
    if !pushed.changed {
        return Ok(());
    }
    let i = &p.input;
    let marker = format!("Dayshift-Revert-Of: {}", pushed.commit);
    let checkout = p.git.checkout(&i.branch).await?;
    let mut reverted = None;
    for attempt in 1..=PUSH_ATTEMPTS {
        if attempt > 1 {
            checkout.reset_to_remote().await?;
        }
        if let Some(commit) = find_ours(&checkout, &marker).await? {
            reverted = Some(commit);
            break;
        }
        let message = format!(
            "revert the promotion of {} to {}: {}\n\nThe application did not become healthy.\n\n{marker}\nDayshift-Run: {run_id}\n",
            i.application, i.environment, i.tag
        );
        let commit = checkout.revert(&pushed.commit, &message).await?;
        match checkout.push().await {
            Ok(()) => {
                reverted = Some(commit);
                break;
            }
            Err(GitError::Rejected { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let reverted = reverted.ok_or_else(|| StepError::transient("the branch kept moving while reverting"))?;
    let health = match &i.argocd {
        Some(app) => {
            let pace = revert_pace(i);
            match pace.attempt(attempt, argo_probe(p, app, &reverted)).await {
                Ok(None) => "healthy again".to_string(),
                Ok(Some(late)) => format!("NOT healthy after the revert: {late}"),
                Err(e) if e.is_retryable() && !pace.is_last(attempt) => return Err(e),
                Err(e) => format!("NOT healthy after the revert: {e}"),
            }
        }
        None => "no Application to watch".to_string(),
    };
    tracing::warn!(run_id, commit = %pushed.commit, revert = %reverted, "Promotion reverted.");
    if let Some(notifier) = &p.notifier {
        let text = format!(
            ":rewind: **{}** promotion to **{}** of `{}` was rolled back: commit `{}` reverted by `{}`; {health} (run `{run_id}`)",
            i.application,
            i.environment,
            i.tag,
            short(&pushed.commit),
            short(&reverted)
        );
        if let Err(e) = notifier.send(&text).await {
            tracing::warn!(run_id, error = %e, "The rollback notice could not be sent.");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_tag;

    #[test]
    fn tags_and_digests_are_checked_as_registries_do() {
        for ok in [
            "2.15.0",
            "v1",
            "latest",
            "1.0.0-rc.1_build.7",
            &format!("sha256:{}", "a".repeat(64)),
        ] {
            check_tag(ok).unwrap();
        }
        for bad in [
            "",
            "-v1",
            ".v1",
            "v1 2",
            "v1:2",
            "feature/x",
            &"a".repeat(129),
            "sha256:XYZ",
        ] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
    }
}
