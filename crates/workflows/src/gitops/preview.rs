//! `preview.create` / `preview.delete`: a preview environment per pull request, as files in the
//! infra repository that ArgoCD picks up (an app-of-apps over `previews/`): a values file and
//! an ArgoCD `Application`, named after the branch made a DNS label. Both are idempotent: the
//! files are written (or removed) only when they differ.

use std::sync::Arc;

use dayshift_engine::{Ctx, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};

use super::promote::check_tag;
use super::values;
use crate::adapters::git::{GitConfig, GitError};
use crate::connections::Connections;

dayshift_engine::message_error!(
    /// A branch no preview can be named after.
    InvalidBranch
);

dayshift_engine::message_error!(
    /// A preview's Application that cannot be written.
    InvalidPreview
);

/// A branch name as a DNS label (RFC 1123): lower case, `a-z0-9-`, at most 63 characters, not
/// starting or ending with `-`. Long names keep a hash suffix so that two branches do not meet.
pub fn dns_label(branch: &str) -> Result<String, InvalidBranch> {
    let mut label = String::new();
    for c in branch.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() {
            label.push(c);
        } else if !label.ends_with('-') {
            label.push('-');
        }
    }
    let label = label.trim_matches('-').to_string();
    if label.is_empty() {
        return Err(InvalidBranch::from(format!(
            "branch {branch:?} has no letters or digits to name a preview after (a DNS label needs a-z, 0-9)"
        )));
    }
    if label.len() <= 63 {
        return Ok(label);
    }
    use sha2::Digest;
    let hash = hex::encode(sha2::Sha256::digest(branch.as_bytes()));
    Ok(format!("{}-{}", label[..54].trim_end_matches('-'), &hash[..8]))
}

/// The input of `preview.create` and `preview.delete`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewInput {
    /// The git connection of the infra repository.
    pub repository: String,
    /// The pull request's branch (in the application's repository).
    pub branch: String,
    /// The infra repository's branch ArgoCD watches. Default `main`.
    #[serde(default = "default_branch")]
    pub infra_branch: String,
    /// Where previews live. Default `previews`.
    #[serde(default = "default_dir")]
    pub directory: String,
    /// `preview.create`: the values file copied for the preview (`envs/dev/values.yaml`).
    #[serde(default)]
    pub template: Option<String>,
    /// `preview.create`: the key path of the image tag in it, and the tag.
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub tag: Option<String>,
    /// `preview.create`: the chart the Application deploys, relative to the repository root.
    #[serde(default)]
    pub chart: Option<String>,
    /// `preview.create`: the repository URL ArgoCD reads. Default the connection's.
    #[serde(default)]
    pub repo_url: Option<String>,
    /// `preview.create`: the ArgoCD AppProject of the Application. Default `dayshift-previews`
    /// (deploy/argocd: it may deploy only into `preview-*` namespaces, never `default`'s
    /// cluster-wide rights).
    #[serde(default = "default_project")]
    pub project: String,
}

fn default_project() -> String {
    "dayshift-previews".into()
}

fn default_branch() -> String {
    "main".into()
}
fn default_dir() -> String {
    "previews".into()
}

/// What a preview workflow did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviewChange {
    pub name: String,
    /// The commit made; absent when nothing had to change.
    pub commit: Option<String>,
}

/// The `preview.create` workflow.
pub fn preview_create(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "preview.create",
        "Writes a preview environment (values and an ArgoCD Application) named after a pull request's branch into the infra repository.",
        move |ctx: Ctx, input: PreviewInput| {
            let connections = connections.clone();
            async move { preview(&ctx, &connections, input, true).await }
        },
    )
    .guard("infra_branch")
    .guard("directory")
    .guard("template")
    .guard("chart")
    .guard("repo_url")
    .guard("project")
}

/// The `preview.delete` workflow.
pub fn preview_delete(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "preview.delete",
        "Removes a pull request's preview environment from the infra repository.",
        move |ctx: Ctx, input: PreviewInput| {
            let connections = connections.clone();
            async move { preview(&ctx, &connections, input, false).await }
        },
    )
    .guard("infra_branch")
    .guard("directory")
}

async fn preview(
    ctx: &Ctx,
    connections: &Connections,
    input: PreviewInput,
    create: bool,
) -> Result<PreviewChange, WorkflowError> {
    let name = dns_label(&input.branch).map_err(WorkflowError::failed)?;
    if create {
        let tag = input
            .tag
            .as_deref()
            .ok_or_else(|| WorkflowError::failed("give the `tag`"))?;
        check_tag(tag).map_err(WorkflowError::failed)?;
        for (field, v) in [
            ("template", &input.template),
            ("key", &input.key),
            ("chart", &input.chart),
        ] {
            if v.is_none() {
                return Err(WorkflowError::failed(format!("preview.create needs `{field}`")));
            }
        }
    }
    let git = connections
        .git(&input.repository)
        .map_err(WorkflowError::failed)?
        .clone();
    let (g, i, n, run) = (&git, &input, name.as_str(), ctx.run_id().to_string());
    let commit: Option<String> = ctx
        .step(
            if create { "write-and-push" } else { "remove-and-push" },
            |_s| async move { change_and_push(g, i, n, create, &run).await },
        )
        .await?;
    Ok(PreviewChange { name, commit })
}

async fn change_and_push(
    git: &GitConfig,
    input: &PreviewInput,
    name: &str,
    create: bool,
    run_id: &str,
) -> Result<Option<String>, StepError> {
    let checkout = git.checkout(&input.infra_branch).await?;
    let dir = format!("{}/{name}", input.directory.trim_end_matches('/'));
    for attempt in 1..=5 {
        if attempt > 1 {
            checkout.reset_to_remote().await?;
        }
        let root = checkout.inside(&dir).map_err(StepError::permanent)?;
        if create {
            let template = input.template.as_deref().unwrap_or_default();
            let text = std::fs::read_to_string(checkout.inside(template).map_err(StepError::permanent)?)
                .map_err(|e| StepError::Permanent(format!("{template}: {e}")))?;
            let (values, _) = values::set(
                &text,
                input.key.as_deref().unwrap_or_default(),
                input.tag.as_deref().unwrap_or_default(),
            )
            .map_err(|e| StepError::Permanent(format!("{template}: {e}")))?;
            std::fs::create_dir_all(&root).map_err(StepError::transient)?;
            std::fs::write(root.join("values.yaml"), values).map_err(StepError::transient)?;
            let app = application(input, name, git, &dir).map_err(StepError::permanent)?;
            std::fs::write(root.join("application.yaml"), app).map_err(StepError::transient)?;
        } else if root.exists() {
            std::fs::remove_dir_all(&root).map_err(StepError::transient)?;
        }
        let verb = if create { "create" } else { "delete" };
        let message = format!(
            "{verb} preview {name} for branch {}\n\nDayshift-Run: {run_id}\n",
            input.branch
        );
        let Some(commit) = checkout.commit_all(&message).await? else {
            return Ok(None);
        };
        match checkout.push().await {
            Ok(()) => return Ok(Some(commit)),
            Err(GitError::Rejected { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StepError::transient(format!(
        "{} kept moving: the preview's pushes were rejected",
        input.infra_branch
    )))
}

/// The ArgoCD Application of a preview: its own namespace, synced and pruned automatically.
/// Written by a YAML serializer, so no input can add a key or a document to it.
fn application(input: &PreviewInput, name: &str, git: &GitConfig, dir: &str) -> Result<String, InvalidPreview> {
    let chart = input.chart.as_deref().unwrap_or_default().trim_end_matches('/');
    let depth = chart.split('/').filter(|p| !p.is_empty()).count();
    let values = format!("{}{dir}/values.yaml", "../".repeat(depth));
    let repo = input.repo_url.clone().unwrap_or_else(|| git.url.clone());
    let app = serde_json::json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {
            "name": format!("preview-{name}"),
            "namespace": "argocd",
            "labels": { "dayshift.io/preview": name },
            "finalizers": ["resources-finalizer.argocd.argoproj.io"],
        },
        "spec": {
            "project": input.project,
            "source": {
                "repoURL": repo,
                "targetRevision": input.infra_branch,
                "path": chart,
                "helm": { "valueFiles": [values] },
            },
            "destination": {
                "server": "https://kubernetes.default.svc",
                "namespace": format!("preview-{name}"),
            },
            "syncPolicy": {
                "automated": { "prune": true, "selfHeal": true },
                "syncOptions": ["CreateNamespace=true"],
            },
        },
    });
    let body = serde_saphyr::to_string(&app).map_err(|e| format!("the preview's Application: {e}"))?;
    // The branch is shown escaped ({:?}): a newline in it cannot end the comment.
    Ok(format!(
        "# Written by dayshift (preview.create) for branch {:?}; removed when the pull request closes.\n{body}",
        input.branch.chars().take(200).collect::<String>()
    ))
}

#[cfg(test)]
mod tests {
    use super::{PreviewInput, application, dns_label};

    #[test]
    fn hostile_fields_cannot_add_keys_or_documents_to_the_application() {
        let input: PreviewInput = serde_json::from_value(serde_json::json!({
            "repository": "infra",
            "branch": "feat\n---\nkind: ClusterRoleBinding",
            "chart": "charts/shop\n  project: production\n---\nkind: Secret",
            "repo_url": "https://git.example/infra.git\"\n    path: /",
        }))
        .unwrap();
        let git = crate::adapters::git::GitConfig::default();
        let text = application(&input, "feat", &git, "previews/feat").unwrap();
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).unwrap();
        assert_eq!(docs.len(), 1, "{text}");
        let app = &docs[0];
        assert_eq!(app["spec"]["project"], "dayshift-previews", "{text}");
        assert_eq!(
            app["spec"]["source"]["path"],
            "charts/shop\n  project: production\n---\nkind: Secret"
        );
        assert_eq!(
            app["spec"]["source"]["repoURL"],
            "https://git.example/infra.git\"\n    path: /"
        );
        assert_eq!(app["kind"], "Application");
    }

    #[test]
    fn branches_become_dns_labels() {
        assert_eq!(dns_label("feature/Login_UI").unwrap(), "feature-login-ui");
        assert_eq!(dns_label("--Fix--#123--").unwrap(), "fix-123");
        let long = dns_label(&format!("feature/{}", "x".repeat(80))).unwrap();
        assert!(long.len() <= 63 && long.starts_with("feature-xxx"), "{long}");
        assert_ne!(long, dns_label(&format!("feature/{}", "x".repeat(81))).unwrap());
        assert!(dns_label("///___").unwrap_err().contains("no letters or digits"));
    }
}
