//! `install.component`: a component's manifests applied with server-side apply under dayshift's
//! field manager, in phases (CRDs first, then until they are established; namespaces; then
//! everything else), then waited on until every workload is ready. Each phase is a journaled
//! step, so a worker killed mid-install resumes without applying completed phases again, and
//! an install that completed changes nothing when run again.
//!
//! Everything is parsed and checked before anything is applied: YAML that does not parse, a
//! kind dayshift cannot apply, a namespace that neither the manifests nor the cluster has.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{Ctx, RetryPolicy, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::adapters::kube::{Kube, Workload, WorkloadKind, resource_of};
use crate::adapters::step_err;
use crate::connections::Connections;

/// The field manager of everything dayshift applies.
pub const FIELD_MANAGER: &str = "dayshift";

/// The input of `install.component`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallInput {
    /// The component's name (a label on everything applied).
    pub component: String,
    /// A directory of YAML files (read in name order), or one file (e.g. `helm template` output).
    pub manifests: PathBuf,
    /// The namespace of namespaced objects that name none.
    pub namespace: String,
    /// The Kubernetes connection. Default `default`.
    #[serde(default = "default_kubernetes")]
    pub kubernetes: String,
    /// How long workloads may take to become ready. Default 10m.
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_kubernetes() -> String {
    "default".into()
}
fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}

/// What was installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub component: String,
    /// `Kind namespace/name`, in the order applied.
    pub applied: Vec<String>,
}

/// The manifests' objects, in file order, each with its namespace filled in (if namespaced)
/// and the component label; an error names the file and what is wrong.
pub fn load(path: &Path, component: &str, namespace: &str) -> Result<Vec<Value>, String> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    if files.is_empty() {
        return Err(format!("{}: no .yaml files", path.display()));
    }
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).map_err(|e| format!("{} is not valid YAML: {e}", file.display()))?;
        for (n, mut doc) in docs.into_iter().enumerate() {
            if doc.is_null() {
                continue;
            }
            let at = format!("{} (document {})", file.display(), n + 1);
            let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_string();
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            if api_version.is_empty() || kind.is_empty() || doc["metadata"]["name"].as_str().is_none() {
                return Err(format!("{at}: an object needs apiVersion, kind and metadata.name"));
            }
            let Some((_, namespaced)) = resource_of(&api_version, &kind) else {
                return Err(format!(
                    "{at}: kind {kind} ({api_version}) is not one the cluster is known to serve"
                ));
            };
            if namespaced && doc["metadata"]["namespace"].as_str().is_none() {
                doc["metadata"]["namespace"] = json!(namespace);
            }
            doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] = json!("dayshift");
            doc["metadata"]["labels"]["dayshift.io/component"] = json!(component);
            out.push(doc);
        }
    }
    Ok(out)
}

fn describe(o: &Value) -> String {
    match o["metadata"]["namespace"].as_str() {
        Some(ns) => format!(
            "{} {ns}/{}",
            o["kind"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap_or("")
        ),
        None => format!(
            "{} {}",
            o["kind"].as_str().unwrap_or(""),
            o["metadata"]["name"].as_str().unwrap_or("")
        ),
    }
}

/// The phases: CRDs, namespaces, everything else.
fn phase_of(o: &Value) -> usize {
    match o["kind"].as_str() {
        Some("CustomResourceDefinition") => 0,
        Some("Namespace") => 1,
        _ => 2,
    }
}

/// The `install.component` workflow.
pub fn install_component(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "install.component",
        "Applies a component's manifests by server-side apply in phases (CRDs, namespaces, the rest) and waits until its workloads are ready.",
        move |ctx: Ctx, input: InstallInput| {
            let connections = connections.clone();
            async move { install(&ctx, &connections, input).await }
        },
    )
    .freshness("component")
}

async fn install(ctx: &Ctx, connections: &Connections, input: InstallInput) -> Result<Installed, WorkflowError> {
    let config = connections
        .kubernetes(&input.kubernetes)
        .map_err(WorkflowError::failed)?;
    let kube = Kube::connect(config).await.map_err(WorkflowError::failed)?;
    let (k, i) = (&kube, &input);
    // Parse and check everything before applying anything.
    let plan: Vec<String> = ctx
        .step("check", |_s| async move {
            let objects = load(&i.manifests, &i.component, &i.namespace).map_err(StepError::Permanent)?;
            let created: Vec<&str> = objects
                .iter()
                .filter(|o| o["kind"] == "Namespace")
                .filter_map(|o| o["metadata"]["name"].as_str())
                .collect();
            for o in &objects {
                if let Some(ns) = o["metadata"]["namespace"].as_str()
                    && !created.contains(&ns)
                    && !k.namespace_exists(ns).await.map_err(step_err)?
                {
                    return Err(StepError::Permanent(format!(
                        "{} is in namespace {ns}, which neither the manifests nor the cluster has",
                        describe(o)
                    )));
                }
            }
            let mut ordered: Vec<&Value> = objects.iter().collect();
            ordered.sort_by_key(|o| phase_of(o));
            Ok(ordered.into_iter().map(describe).collect())
        })
        .await?;

    for (phase, name) in [(0, "crds"), (1, "namespaces"), (2, "resources")] {
        let applied: usize = ctx
            .step(format!("apply:{name}"), |_s| async move {
                let objects = load(&i.manifests, &i.component, &i.namespace).map_err(StepError::Permanent)?;
                let mut n = 0;
                for o in objects.iter().filter(|o| phase_of(o) == phase) {
                    k.apply(o, FIELD_MANAGER, false).await.map_err(step_err)?;
                    n += 1;
                }
                Ok::<_, StepError>(n)
            })
            .retry(RetryPolicy {
                max_attempts: 5,
                ..RetryPolicy::default()
            })
            .await?;
        if phase == 0 && applied > 0 {
            ctx.step("wait:crds-established", |_s| async move {
                let objects = load(&i.manifests, &i.component, &i.namespace).map_err(StepError::Permanent)?;
                for o in objects.iter().filter(|o| phase_of(o) == 0) {
                    let name = o["metadata"]["name"].as_str().unwrap_or_default();
                    k.wait_crd_established(name, i.timeout).await.map_err(step_err)?;
                }
                Ok(())
            })
            .await?;
        }
    }

    ctx.step("wait-ready", |_s| async move {
        let objects = load(&i.manifests, &i.component, &i.namespace).map_err(StepError::Permanent)?;
        for o in &objects {
            let kind = match o["kind"].as_str() {
                Some("Deployment") => WorkloadKind::Deployment,
                Some("StatefulSet") => WorkloadKind::StatefulSet,
                Some("DaemonSet") => WorkloadKind::DaemonSet,
                _ => continue,
            };
            let w = Workload {
                kind,
                namespace: o["metadata"]["namespace"].as_str().unwrap_or_default().to_string(),
                name: o["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            };
            k.wait_rollout(&w, Duration::from_millis(500).min(i.timeout / 10), i.timeout)
                .await
                .map_err(step_err)?;
        }
        Ok(())
    })
    .await?;
    Ok(Installed {
        component: input.component.clone(),
        applied: plan,
    })
}
