//! Components: a set of Kubernetes manifests that dayshift installs (`install.component`),
//! upgrades with a rollback point (`upgrade.component`), plans without changing anything (both,
//! with `plan: true`), and installs in phases (`install.platform`).
//!
//! What every one of them does the same way, here:
//! - **check**: the manifests are read and every object checked (YAML, kind, namespace) before
//!   anything is applied; the journal keeps the objects' identities, their kinds as the cluster
//!   serves them and a digest, and every later step refuses manifests that changed since;
//! - **apply** in phases, each a journaled step: CRDs (then until they are established),
//!   namespaces, everything else; server-side apply under field manager `dayshift`, forced;
//! - **wait-ready**: every Deployment, StatefulSet and DaemonSet rolled out, every Job complete;
//! - **smoke**: the user's checks, an HTTP GET or a SQL query;
//! - **plan**: what an apply would change, from a server-side dry run against what is live.

mod install;
pub mod manifests;
mod platform;
mod upgrade;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use dayshift_engine::{Ctx, RetryPolicy, StepError, WorkflowError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::adapters::kube::{Kube, ObjectId, Resource};
use crate::adapters::notify::Notifier;
use crate::adapters::step_err;
use crate::connections::Connections;
use crate::gates::ApprovalGate;
use crate::wait::{self, Wait};

pub use install::install_component;
pub use platform::{Phase, PhaseReport, PhaseStart, PlatformInput, PlatformReport, install_platform};
pub use upgrade::{LiveObject, ROLLBACK_LABEL, RollbackPoint, applied_fields, upgrade_component};

/// The field manager of everything dayshift applies.
pub const FIELD_MANAGER: &str = "dayshift";
pub use manifests::COMPONENT_LABEL;

/// The input of `install.component` and `upgrade.component`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentInput {
    /// The component's name (label `dayshift.io/component` on everything applied).
    pub component: String,
    /// A directory of YAML files (read in name order), a kustomize directory, or one file
    /// (e.g. `helm template` output).
    pub manifests: PathBuf,
    /// The namespace of namespaced objects that name none.
    pub namespace: String,
    /// The Kubernetes connection. Default `default`.
    #[serde(default = "default_kubernetes")]
    pub kubernetes: String,
    /// How long workloads may take to become ready. Default 10m.
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    pub timeout: Duration,
    /// Checks run once the workloads are ready.
    #[serde(default)]
    pub smoke: Vec<SmokeCheck>,
    /// Only show what would change (a server-side dry run); change nothing.
    #[serde(default)]
    pub plan: bool,
    /// Wait for approval of the plan before changing anything.
    #[serde(default)]
    pub approval: Option<ApprovalGate>,
    /// Who asked for the change (may not approve it).
    #[serde(default)]
    pub requested_by: Option<String>,
    /// A notice webhook (connections.notify) told when approval is needed and when an upgrade
    /// was rolled back.
    #[serde(default)]
    pub notify: Option<String>,
    /// `upgrade.component` only: a workflow run first, e.g. `backup.postgres` of the
    /// component's database; the upgrade does not start unless it succeeds.
    #[serde(default)]
    pub backup: Option<ChildRun>,
    /// `upgrade.component` only: how many rollback points to keep per component. Default 3.
    #[serde(default = "three")]
    pub keep_rollback_points: usize,
}

fn default_kubernetes() -> String {
    "default".into()
}
fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}
fn three() -> usize {
    3
}

/// A workflow run as a child.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildRun {
    pub workflow: String,
    #[serde(default)]
    pub input: Value,
}

/// A check that the component works, run once its workloads are ready.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SmokeCheck {
    /// A GET answered with `status` (default 200).
    Http {
        url: String,
        #[serde(default = "ok")]
        status: u16,
    },
    /// A query on a PostgreSQL connection returning one number, within `min`..`max` if given.
    Sql {
        postgres: String,
        query: String,
        #[serde(default)]
        min: Option<f64>,
        #[serde(default)]
        max: Option<f64>,
    },
}

fn ok() -> u16 {
    200
}

/// What a component run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ComponentReport {
    pub component: String,
    /// What would change (plan mode, or what was approved).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plan: Vec<Change>,
    /// `Kind namespace/name`, in the order applied.
    pub applied: Vec<String>,
    /// Objects the new version no longer has, deleted once it was healthy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pruned: Vec<String>,
    /// Objects the new version no longer has but that are left in place, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<String>,
    /// The Secret holding the rollback point (`namespace/name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_point: Option<String>,
}

/// What a run checked: every object's identity and kind, and the digest of the manifests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checked {
    pub objects: Vec<(ObjectId, Resource)>,
    pub digest: String,
}

impl Checked {
    fn described(&self) -> Vec<String> {
        let mut order: Vec<&(ObjectId, Resource)> = self.objects.iter().collect();
        order.sort_by_key(|(id, _)| phase_of(&id.kind));
        order.into_iter().map(|(id, _)| id.to_string()).collect()
    }
}

/// The phases: CRDs, namespaces, everything else.
fn phase_of(kind: &str) -> usize {
    match kind {
        "CustomResourceDefinition" => 0,
        "Namespace" => 1,
        _ => 2,
    }
}

/// The objects as checked; an error if the manifests changed since.
fn reload(input: &ComponentInput, checked: &Checked) -> Result<Vec<Value>, StepError> {
    let docs = manifests::read(&input.manifests).map_err(StepError::permanent)?;
    let kinds: Vec<Resource> = checked.objects.iter().map(|(_, r)| r.clone()).collect();
    let objects = if docs.len() == kinds.len() {
        manifests::prepare(&docs, &kinds, &input.component, &input.namespace)
    } else {
        Vec::new()
    };
    let digest = manifests::digest(&objects);
    if digest != checked.digest {
        return Err(StepError::Permanent(format!(
            "the manifests in {} changed since this run checked them; start a new run to apply them",
            input.manifests.display()
        )));
    }
    Ok(objects)
}

/// The notice webhook `input.notify` names, if any.
fn notifier(connections: &Connections, input: &ComponentInput) -> Result<Option<Notifier>, WorkflowError> {
    input
        .notify
        .as_deref()
        .map(|name| connections.notifier(name).map_err(WorkflowError::failed))
        .transpose()
}

async fn connect(connections: &Connections, input: &ComponentInput) -> Result<Kube, WorkflowError> {
    let config = connections
        .kubernetes(&input.kubernetes)
        .map_err(WorkflowError::failed)?;
    Kube::connect(config).await.map_err(WorkflowError::failed)
}

/// Step `check`: reads and checks the manifests, before anything is applied.
async fn check(ctx: &Ctx, k: &Kube, i: &ComponentInput) -> Result<Checked, WorkflowError> {
    let checked = ctx
        .step("check", |_s| async move {
            let docs = manifests::read(&i.manifests).map_err(StepError::permanent)?;
            let kinds = manifests::resolve(&docs, || k.crds())
                .await
                .map_err(StepError::permanent)?;
            let objects = manifests::prepare(&docs, &kinds, &i.component, &i.namespace);
            let created: Vec<&str> = objects
                .iter()
                .filter(|o| o["kind"] == "Namespace")
                .filter_map(|o| o["metadata"]["name"].as_str())
                .collect();
            let mut seen = std::collections::HashSet::new();
            for (o, d) in objects.iter().zip(&docs) {
                let id = ObjectId::of(o);
                if !seen.insert(id.clone()) {
                    return Err(StepError::Permanent(format!(
                        "{}: {id} is in the manifests twice",
                        d.at
                    )));
                }
                if let Some(ns) = &id.namespace
                    && !created.contains(&ns.as_str())
                    && !k.namespace_exists(ns).await.map_err(step_err)?
                {
                    return Err(StepError::Permanent(format!(
                        "{}: {id} is in namespace {ns}, which neither the manifests nor the cluster has",
                        d.at
                    )));
                }
            }
            Ok(Checked {
                objects: manifests::ids(&objects).into_iter().zip(kinds).collect(),
                digest: manifests::digest(&objects),
            })
        })
        .await?;
    Ok(checked)
}

/// Steps `apply:crds`, `wait:crds-established`, `apply:namespaces`, `apply:resources`.
async fn apply_phases(ctx: &Ctx, k: &Kube, i: &ComponentInput, checked: &Checked) -> Result<(), WorkflowError> {
    for (phase, name) in [(0, "crds"), (1, "namespaces"), (2, "resources")] {
        let applied: usize = ctx
            .step(format!("apply:{name}"), |_s| async move {
                let objects = reload(i, checked)?;
                let mut n = 0;
                for (o, (_, r)) in objects.iter().zip(&checked.objects) {
                    if phase_of(&r.kind) == phase {
                        k.apply(r, o, FIELD_MANAGER, false).await.map_err(step_err)?;
                        n += 1;
                    }
                }
                Ok::<_, StepError>(n)
            })
            .await?;
        if phase == 0 && applied > 0 {
            let crds: Vec<&str> = checked
                .objects
                .iter()
                .filter(|(id, _)| phase_of(&id.kind) == 0)
                .map(|(id, _)| id.name.as_str())
                .collect();
            let wait = Wait {
                name: "wait:crds-established",
                timeout: i.timeout,
                every: Duration::from_millis(200).min(i.timeout / 10),
                retry: RetryPolicy::network(),
            };
            let crds = &crds;
            wait::paced(
                ctx,
                wait,
                || async move { wait::crds_established(k, crds, i.timeout).await },
            )
            .await?;
        }
    }
    Ok(())
}

/// How often readiness is read while waiting.
pub(crate) fn ready_interval(timeout: Duration) -> Duration {
    Duration::from_millis(500).min(timeout / 10)
}

/// Step `wait-ready`, one step paced durably ([`crate::wait::paced`]): every workload rolled out,
/// every Job complete.
async fn wait_ready(ctx: &Ctx, k: &Kube, i: &ComponentInput, checked: &Checked) -> Result<(), WorkflowError> {
    let ids: Vec<&ObjectId> = checked.objects.iter().map(|(id, _)| id).collect();
    let wait = Wait {
        name: "wait-ready",
        timeout: i.timeout,
        every: ready_interval(i.timeout),
        retry: RetryPolicy::network(),
    };
    let ids = &ids;
    wait::paced(
        ctx,
        wait,
        || async move { wait::workloads_ready(k, ids, i.timeout).await },
    )
    .await?;
    Ok(())
}

/// Step `smoke`: the user's checks, each with its outcome in the error when it fails.
async fn smoke(ctx: &Ctx, connections: &Connections, i: &ComponentInput) -> Result<(), WorkflowError> {
    if i.smoke.is_empty() {
        return Ok(());
    }
    ctx.step("smoke", |_s| async move {
        for check in &i.smoke {
            match check {
                SmokeCheck::Http { url, status } => {
                    let got = crate::adapters::http::client()
                        .get(url)
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await
                        .map_err(|e| StepError::Transient(format!("smoke check GET {url}: {e}")))?
                        .status()
                        .as_u16();
                    if got != *status {
                        return Err(StepError::Transient(format!(
                            "smoke check GET {url} answered {got}, not {status}"
                        )));
                    }
                }
                SmokeCheck::Sql {
                    postgres,
                    query,
                    min,
                    max,
                } => {
                    let url = connections.postgres(postgres).map_err(StepError::permanent)?;
                    let check = crate::restore_test::Check {
                        name: query.clone(),
                        query: query.clone(),
                        min: *min,
                        max: *max,
                    };
                    crate::restore_test::run_check(&crate::adapters::postgres::PgAdmin::new(url), &check)
                        .await
                        .map_err(|e| StepError::Transient(format!("smoke check: {e}")))?;
                }
            }
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// One object's change in a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// `Kind namespace/name`.
    pub object: String,
    /// `create`, `change`, `unchanged` or `prune`.
    pub action: String,
    /// What changes, field by field (`spec.replicas: 2 → 3`); no value of a Secret is shown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

/// What applying the checked objects would change: each one dry-run applied and compared with
/// what is live. Nothing is changed.
async fn plan(k: &Kube, i: &ComponentInput, checked: &Checked) -> Result<Vec<Change>, StepError> {
    let objects = reload(i, checked)?;
    let mut out = Vec::new();
    for (o, (id, r)) in objects.iter().zip(&checked.objects) {
        let live = k.get(r, id).await.map_err(step_err)?;
        let Some(live) = live else {
            out.push(Change {
                object: id.to_string(),
                action: "create".into(),
                fields: Vec::new(),
            });
            continue;
        };
        // A namespace that does not exist yet cannot take a dry run of what goes in it; its
        // objects are creations, handled above.
        let after = k.apply(r, o, FIELD_MANAGER, true).await.map_err(step_err)?;
        let mut fields = Vec::new();
        diff(
            "",
            &comparable(&live),
            &comparable(&after),
            id.kind == "Secret",
            &mut fields,
        );
        out.push(Change {
            object: id.to_string(),
            action: if fields.is_empty() { "unchanged" } else { "change" }.into(),
            fields,
        });
    }
    Ok(out)
}

/// An object without what the server maintains (status, bookkeeping metadata).
fn comparable(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("status");
    }
    if let Some(meta) = o["metadata"].as_object_mut() {
        for f in [
            "managedFields",
            "resourceVersion",
            "generation",
            "uid",
            "creationTimestamp",
            "selfLink",
        ] {
            meta.remove(f);
        }
    }
    o
}

/// The fields that differ between `a` and `b`, as `path: before → after` lines.
fn diff(path: &str, a: &Value, b: &Value, secret: bool, out: &mut Vec<String>) {
    if a == b {
        return;
    }
    if let (Value::Object(x), Value::Object(y)) = (a, b) {
        let keys: BTreeMap<&String, ()> = x.keys().chain(y.keys()).map(|k| (k, ())).collect();
        for k in keys.keys() {
            let at = if path.is_empty() {
                k.to_string()
            } else {
                format!("{path}.{k}")
            };
            diff(
                &at,
                x.get(*k).unwrap_or(&Value::Null),
                y.get(*k).unwrap_or(&Value::Null),
                secret,
                out,
            );
        }
        return;
    }
    let show = |v: &Value| match v {
        Value::Null => "(none)".to_string(),
        // Any field of a Secret may hold its value (data, stringData, a last-applied annotation).
        _ if secret => "(secret value)".into(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    out.push(format!("{path}: {} → {}", show(a), show(b)));
}

/// Plan mode, then the approval gate: returns the plan if the run should stop (plan mode) or
/// the plan that was approved.
async fn plan_and_approve(
    ctx: &Ctx,
    notifier: Option<&Notifier>,
    k: &Kube,
    i: &ComponentInput,
    checked: &Checked,
    workflow: &str,
) -> Result<Vec<Change>, WorkflowError> {
    if !i.plan && i.approval.is_none() {
        return Ok(Vec::new());
    }
    let changes: Vec<Change> = ctx.step("plan", |_s| async move { plan(k, i, checked).await }).await?;
    if let (false, Some(gate)) = (i.plan, &i.approval) {
        let changed: Vec<String> = changes
            .iter()
            .filter(|c| c.action != "unchanged")
            .map(|c| format!("- {} {}", c.action, c.object))
            .collect();
        let text = format!(
            "{workflow} of {} (run {}) waits for approval: {} object(s) change:\n{}\nApprove with `dayshift runs approve {}` (with your own token).",
            i.component,
            ctx.run_id(),
            changed.len(),
            changed.join("\n"),
            ctx.run_id()
        );
        crate::gates::approval(ctx, gate, i.requested_by.as_deref(), notifier.map(|n| (n, text))).await?;
    }
    Ok(changes)
}
