//! `upgrade.component`: a component moved to new manifests with a way back.
//!
//! 1. `check` the new manifests (as an install does); with `plan: true`, show what would
//!    change and stop; with `approval`, show it and wait for approval.
//! 2. Optionally run a backup workflow as a child (`backup`); nothing changes unless it
//!    succeeds.
//! 3. `rollback-point`: what is live now, as dayshift applied it (the fields its field manager
//!    owns), for every object of the new manifests and every object dayshift applied for the
//!    component before. It is stored in the cluster as a Secret (labelled
//!    `dayshift.io/rollback-point-of`), so Secret values never reach the journal, and it
//!    outlives dayshift's database. The journal keeps the identities, resource versions and
//!    images.
//! 4. Apply the new manifests in phases, wait until ready, run the smoke checks. If any of
//!    that fails, the rollback point's undo re-applies it, deletes what this upgrade created,
//!    and waits until the old version is healthy again; the run fails with the reason.
//! 5. `prune`: only once the new version is healthy, the objects it no longer has, and only
//!    those dayshift applied (field manager `dayshift` and the component label). CRDs and
//!    namespaces are never pruned: deleting one deletes everything of its kind or in it.
//! 6. `retire-rollback-points`: all but the newest `keep_rollback_points` are deleted.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_compression::tokio::bufread::{ZstdDecoder, ZstdEncoder};
use base64::Engine as _;
use dayshift_engine::{Ctx, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;

use super::{
    COMPONENT_LABEL, Checked, ComponentInput, ComponentReport, FIELD_MANAGER, apply_phases, check, comparable, connect,
    notifier, phase_of, plan_and_approve, ready_interval, smoke, wait_ready,
};
use crate::adapters::kube::{Kube, ObjectId, Resource};
use crate::adapters::notify::Notifier;
use crate::adapters::step_err;
use crate::connections::Connections;
use crate::wait::Pace;

/// The label on rollback point Secrets, naming their component.
pub const ROLLBACK_LABEL: &str = "dayshift.io/rollback-point-of";
const KEY: &str = "objects.json.zst";

/// One object as it was before the upgrade (what the journal keeps of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveObject {
    pub id: ObjectId,
    pub resource: Resource,
    pub resource_version: String,
    /// The container images of a workload: the version that was running.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// Applied by dayshift for this component (field manager and label): dayshift may prune it.
    pub ours: bool,
}

/// What was live before the upgrade, and where its full content is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackPoint {
    pub namespace: String,
    /// The Secret holding the objects.
    pub secret: String,
    pub live: Vec<LiveObject>,
}

/// The `upgrade.component` workflow.
pub fn upgrade_component(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "upgrade.component",
        "Upgrades a component: records what is live as a rollback point, optionally backs up first, applies the new manifests, and rolls back if they do not become healthy; prunes what the new version dropped.",
        move |ctx: Ctx, input: ComponentInput| {
            let connections = connections.clone();
            async move { upgrade(&ctx, &connections, input).await }
        },
    )
    .guard("manifests")
    .guard("namespace")
    .guard("smoke[].http.url")
    .guard_exact("smoke[].sql.query")
    .guard("backup.workflow")
    .freshness("component")
}

async fn upgrade(
    ctx: &Ctx,
    connections: &Connections,
    input: ComponentInput,
) -> Result<ComponentReport, WorkflowError> {
    let kube = connect(connections, &input).await?;
    let notifier = notifier(connections, &input)?;
    let (k, i) = (&kube, &input);
    let checked = check(ctx, k, i).await?;
    let plan = plan_and_approve(ctx, notifier.as_ref(), k, i, &checked, "upgrade.component").await?;
    if i.plan {
        return Ok(ComponentReport {
            component: i.component.clone(),
            plan,
            ..ComponentReport::default()
        });
    }
    if let Some(backup) = &i.backup {
        ctx.child::<Value>(&backup.workflow, &backup.input).await.map_err(|e| {
            WorkflowError::failed(format!(
                "the backup before the upgrade ({}) failed: {e}",
                backup.workflow
            ))
        })?;
    }

    let run_id = ctx.run_id().to_string();
    let c = &checked;
    let point: RollbackPoint =
        ctx.step("rollback-point", |_s| async move { record(k, i, c, &run_id).await })
            .undo({
                let (k, i, c, n, run) = (
                    kube.clone(),
                    input.clone(),
                    checked.clone(),
                    notifier.clone(),
                    ctx.run_id().to_string(),
                );
                move |s, point: RollbackPoint| async move {
                    roll_back(&k, &i, &c, &point, n.as_ref(), &run, s.attempt).await
                }
            })
            .undo_retry(rollback_pace(&input).policy())
            .await?;

    apply_phases(ctx, k, i, &checked).await?;
    wait_ready(ctx, k, i, &checked).await?;
    smoke(ctx, connections, i).await?;

    let p = &point;
    let (pruned, kept): (Vec<String>, Vec<String>) =
        ctx.step("prune", |_s| async move { prune(k, i, c, p).await }).await?;
    let retired = ctx
        .step("retire-rollback-points", |_s| async move {
            retire(k, &i.component, i.keep_rollback_points.max(1)).await
        })
        .await;
    if let Err(e) = retired {
        tracing::warn!(run_id = %ctx.run_id(), error = %e, "Old rollback points could not be deleted.");
    }
    Ok(ComponentReport {
        component: i.component.clone(),
        plan,
        applied: checked.described(),
        pruned,
        kept,
        rollback_point: Some(format!("{}/{}", point.namespace, point.secret)),
    })
}

/// Whether dayshift applied `o` for `component`.
fn ours(o: &Value, component: &str) -> bool {
    o["metadata"]["labels"][COMPONENT_LABEL].as_str() == Some(component)
        && o["metadata"]["managedFields"]
            .as_array()
            .is_some_and(|m| m.iter().any(|f| f["manager"] == FIELD_MANAGER))
}

/// Step `rollback-point`: every object of the new manifests that is live, and every object
/// dayshift applied for the component, stored as dayshift applied them.
async fn record(k: &Kube, i: &ComponentInput, c: &Checked, run_id: &str) -> Result<RollbackPoint, StepError> {
    if !k.namespace_exists(&i.namespace).await.map_err(step_err)? {
        return Err(StepError::Permanent(format!(
            "namespace {} does not exist: install the component before upgrading it",
            i.namespace
        )));
    }
    let mut found: Vec<(Resource, Value)> = Vec::new();
    for (id, r) in &c.objects {
        if let Some(o) = k.get(r, id).await.map_err(step_err)? {
            found.push((r.clone(), o));
        }
    }
    // What dayshift applied before that the new manifests may no longer have.
    let mut kinds: Vec<Resource> = Resource::builtins();
    kinds.extend(c.objects.iter().map(|(_, r)| r.clone()));
    let mut n = 0;
    while n < kinds.len() {
        let r = kinds[n].clone();
        n += 1;
        for o in k
            .list_labelled(&r, &[(COMPONENT_LABEL, &i.component)])
            .await
            .map_err(step_err)?
        {
            if !ours(&o, &i.component) {
                continue;
            }
            if r.kind == "CustomResourceDefinition" {
                for defined in Resource::from_crd(&o) {
                    if !kinds.contains(&defined) {
                        kinds.push(defined);
                    }
                }
            }
            let id = ObjectId::of(&json!({"apiVersion": r.api_version, "kind": r.kind, "metadata": o["metadata"]}));
            if !found.iter().any(|(fr, f)| {
                fr.kind == r.kind && ObjectId::of(f).name == id.name && ObjectId::of(f).namespace == id.namespace
            }) {
                found.push((r.clone(), o));
            }
        }
    }
    let mut live = Vec::new();
    let mut restorable = Vec::new();
    for (r, o) in &found {
        let mut id = ObjectId::of(o);
        id.api_version = r.api_version.clone();
        id.kind = r.kind.clone();
        let images = o["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["image"].as_str().map(str::to_string))
            .collect();
        live.push(LiveObject {
            id: id.clone(),
            resource: r.clone(),
            resource_version: o["metadata"]["resourceVersion"].as_str().unwrap_or_default().into(),
            images,
            ours: ours(o, &i.component),
        });
        let mut object = applied_fields(o, FIELD_MANAGER).unwrap_or_else(|| comparable(o));
        if r.kind == "Secret" {
            // `stringData` is write-only: what it set is in `data`, which is restored whole.
            if let Some(m) = object.as_object_mut() {
                m.remove("stringData");
            }
            object["data"] = o["data"].clone();
        }
        object["apiVersion"] = json!(r.api_version);
        object["kind"] = json!(r.kind);
        object["metadata"]["name"] = json!(id.name);
        if let Some(ns) = &id.namespace {
            object["metadata"]["namespace"] = json!(ns);
        }
        restorable.push(json!({ "resource": r, "object": object }));
    }
    let json = serde_json::to_vec(&restorable).map_err(StepError::permanent)?;
    let mut packed = Vec::new();
    ZstdEncoder::new(json.as_slice())
        .read_to_end(&mut packed)
        .await
        .map_err(StepError::permanent)?;
    if packed.len() > 900 * 1024 {
        return Err(StepError::Permanent(format!(
            "the rollback point of {} is {} KiB compressed, more than a Secret holds (1 MiB); nothing was changed",
            i.component,
            packed.len() / 1024
        )));
    }
    // The run id's random end (its start is a timestamp, shared by runs close in time).
    let short: String = run_id.chars().filter(char::is_ascii_alphanumeric).collect();
    let short = &short[short.len().saturating_sub(12)..];
    let secret = format!("dayshift-rollback-{}-{short}", i.component);
    let object = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "dayshift.io/rollback-point",
        "metadata": {
            "name": secret, "namespace": i.namespace,
            "labels": { ROLLBACK_LABEL: i.component, "app.kubernetes.io/managed-by": "dayshift" },
            "annotations": {
                "dayshift.io/run": run_id,
                "dayshift.io/recorded-at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            },
        },
        "data": { KEY: base64::engine::general_purpose::STANDARD.encode(&packed) },
    });
    let secrets = Resource::builtin("v1", "Secret").expect("built in");
    k.apply(&secrets, &object, FIELD_MANAGER, false)
        .await
        .map_err(step_err)?;
    Ok(RollbackPoint {
        namespace: i.namespace.clone(),
        secret,
        live,
    })
}

/// The part of `live` that field manager `manager` applied, read from `managedFields`
/// (`fieldsV1`): what applying it again restores. `None` if the manager applied nothing.
pub fn applied_fields(live: &Value, manager: &str) -> Option<Value> {
    let fields = live["metadata"]["managedFields"]
        .as_array()?
        .iter()
        .find(|f| f["manager"] == manager && f["operation"] == "Apply")?;
    project(live, &fields["fieldsV1"])
}

/// The part of `value` that the field set `fields` names.
fn project(value: &Value, fields: &Value) -> Option<Value> {
    let set = fields.as_object()?;
    let children: Vec<(&String, &Value)> = set.iter().filter(|(k, _)| k.as_str() != ".").collect();
    if children.is_empty() {
        return Some(value.clone());
    }
    match value {
        Value::Object(m) => {
            let mut out = serde_json::Map::new();
            for (key, sub) in children {
                if let Some(name) = key.strip_prefix("f:")
                    && let Some(v) = m.get(name)
                    && let Some(p) = project(v, sub)
                {
                    out.insert(name.to_string(), p);
                }
            }
            Some(Value::Object(out))
        }
        Value::Array(items) => {
            let mut out = Vec::new();
            for (key, sub) in children {
                let item = if let Some(k) = key.strip_prefix("k:") {
                    let k: Value = serde_json::from_str(k).ok()?;
                    let k = k.as_object()?;
                    items
                        .iter()
                        .find(|it| k.iter().all(|(f, want)| it.get(f) == Some(want)))
                } else if let Some(v) = key.strip_prefix("v:") {
                    let v: Value = serde_json::from_str(v).ok()?;
                    items.iter().find(|it| **it == v)
                } else if let Some(n) = key.strip_prefix("i:") {
                    items.get(n.parse::<usize>().ok()?)
                } else {
                    None
                };
                if let Some(p) = item.and_then(|it| project(it, sub)) {
                    out.push(p);
                }
            }
            Some(Value::Array(out))
        }
        other => Some(other.clone()),
    }
}

/// The objects of a rollback point, as stored.
async fn load_point(k: &Kube, point: &RollbackPoint) -> Result<Vec<(Resource, Value)>, StepError> {
    let secrets = Resource::builtin("v1", "Secret").expect("built in");
    let id = ObjectId {
        api_version: "v1".into(),
        kind: "Secret".into(),
        namespace: Some(point.namespace.clone()),
        name: point.secret.clone(),
    };
    let secret = k
        .get(&secrets, &id)
        .await
        .map_err(step_err)?
        .ok_or_else(|| StepError::Permanent(format!("the rollback point {id} is gone")))?;
    let packed = base64::engine::general_purpose::STANDARD
        .decode(secret["data"][KEY].as_str().unwrap_or_default())
        .map_err(|e| StepError::Permanent(format!("the rollback point {id} is damaged: {e}")))?;
    let mut json = Vec::new();
    ZstdDecoder::new(packed.as_slice())
        .read_to_end(&mut json)
        .await
        .map_err(|e| StepError::Permanent(format!("the rollback point {id} is damaged: {e}")))?;
    let entries: Vec<Value> = serde_json::from_slice(&json)
        .map_err(|e| StepError::Permanent(format!("the rollback point {id} is damaged: {e}")))?;
    entries
        .into_iter()
        .map(|mut e| {
            let r: Resource = serde_json::from_value(e["resource"].take())
                .map_err(|e| StepError::Permanent(format!("the rollback point {id} is damaged: {e}")))?;
            Ok((r, e["object"].take()))
        })
        .collect()
}

/// How the rollback's attempts wait for the old version: as often and as long as `wait-ready`.
fn rollback_pace(i: &ComponentInput) -> Pace {
    Pace::new(i.timeout, ready_interval(i.timeout))
}

/// The undo: re-applies the rollback point, deletes what the upgrade created, and waits until
/// the old version is healthy. Safe to repeat (applying the point again changes nothing, a
/// deleted object stays deleted), so each attempt of [`rollback_pace`] does it and checks once;
/// "not yet" is retried with the run released.
async fn roll_back(
    k: &Kube,
    i: &ComponentInput,
    c: &Checked,
    point: &RollbackPoint,
    notifier: Option<&Notifier>,
    run_id: &str,
    attempt: u32,
) -> Result<(), StepError> {
    let mut objects = load_point(k, point).await?;
    objects.sort_by_key(|(r, _)| phase_of(&r.kind));
    for (r, o) in &objects {
        k.apply(r, o, FIELD_MANAGER, false).await.map_err(step_err)?;
    }
    let before: BTreeSet<&ObjectId> = point.live.iter().map(|l| &l.id).collect();
    let mut created: Vec<&(ObjectId, Resource)> = c
        .objects
        .iter()
        .filter(|(id, _)| !before.contains(id) && phase_of(&id.kind) == 2)
        .collect();
    created.reverse();
    for (id, r) in created {
        k.delete(r, id).await.map_err(step_err)?;
    }
    let workloads: Vec<&ObjectId> = point.live.iter().map(|l| &l.id).collect();
    let pace = rollback_pace(i);
    let late = match pace
        .attempt(attempt, crate::wait::workloads_ready(k, &workloads, i.timeout))
        .await
    {
        Ok(None) => None,
        Ok(Some(late)) => Some(late),
        Err(e) if e.is_retryable() && !pace.is_last(attempt) => return Err(e),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = late {
        return Err(StepError::Permanent(format!(
            "the rollback point was re-applied, but: {why}"
        )));
    }
    if let Some(n) = notifier {
        let text = format!(
            "upgrade.component of {} (run {run_id}) failed and was rolled back; the previous version is healthy again. Rollback point: {}/{}",
            i.component, point.namespace, point.secret
        );
        if let Err(e) = n.send(&text).await {
            tracing::warn!(run_id, error = %e, "A rollback notice could not be sent.");
        }
    }
    Ok(())
}

/// Step `prune`: the objects dayshift applied for the component that the new version no
/// longer has. Returns (pruned, kept with the reason).
async fn prune(
    k: &Kube,
    i: &ComponentInput,
    c: &Checked,
    point: &RollbackPoint,
) -> Result<(Vec<String>, Vec<String>), StepError> {
    let now: BTreeSet<&ObjectId> = c.objects.iter().map(|(id, _)| id).collect();
    let mut gone: Vec<&super::upgrade::LiveObject> = point
        .live
        .iter()
        .filter(|l| {
            l.ours
                && !now
                    .iter()
                    .any(|n| n.kind == l.id.kind && n.namespace == l.id.namespace && n.name == l.id.name)
        })
        .collect();
    gone.sort_by_key(|l| std::cmp::Reverse(phase_of(&l.id.kind)));
    let (mut pruned, mut kept) = (Vec::new(), Vec::new());
    for l in gone {
        if phase_of(&l.id.kind) < 2 {
            kept.push(format!(
                "{}: a {} is never pruned (deleting it deletes everything {})",
                l.id,
                l.id.kind,
                if l.id.kind == "Namespace" {
                    "in it"
                } else {
                    "of its kind"
                }
            ));
            continue;
        }
        // Checked again now: someone may have taken it over since the rollback point.
        match k.get(&l.resource, &l.id).await.map_err(step_err)? {
            Some(o) if ours(&o, &i.component) => {
                k.delete(&l.resource, &l.id).await.map_err(step_err)?;
                pruned.push(l.id.to_string());
            }
            Some(_) => kept.push(format!("{}: no longer applied by dayshift for {}", l.id, i.component)),
            None => {}
        }
    }
    Ok((pruned, kept))
}

/// Step `retire-rollback-points`: deletes all but the newest `keep` rollback points of
/// `component`.
async fn retire(k: &Kube, component: &str, keep: usize) -> Result<Vec<String>, StepError> {
    let secrets = Resource::builtin("v1", "Secret").expect("built in");
    let mut points = k
        .list_labelled(&secrets, &[(ROLLBACK_LABEL, component)])
        .await
        .map_err(step_err)?;
    points.sort_by(|a, b| {
        let at = |o: &Value| {
            o["metadata"]["annotations"]["dayshift.io/recorded-at"]
                .as_str()
                .unwrap_or("")
                .to_string()
        };
        at(b).cmp(&at(a))
    });
    let mut retired = Vec::new();
    for o in points.iter().skip(keep) {
        let id = ObjectId::of(&json!({"apiVersion": "v1", "kind": "Secret", "metadata": o["metadata"]}));
        k.delete(&secrets, &id).await.map_err(step_err)?;
        retired.push(id.to_string());
    }
    Ok(retired)
}

#[cfg(test)]
mod tests {
    use super::applied_fields;
    use serde_json::json;

    #[test]
    fn what_a_manager_applied_is_read_back_from_managed_fields() {
        // managedFields as a real API server writes them for a Deployment applied by dayshift
        // and scaled by an HPA (containers keyed by name, labels as a map).
        let live = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "api", "namespace": "shop", "resourceVersion": "42",
                "labels": { "app": "api", "team": "payments" },
                "managedFields": [
                    { "manager": "dayshift", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {
                        "f:metadata": { "f:labels": { "f:app": {} } },
                        "f:spec": {
                            "f:selector": {},
                            "f:template": { "f:spec": { "f:containers": {
                                "k:{\"name\":\"api\"}": { ".": {}, "f:image": {}, "f:name": {} }
                            } } }
                        }
                    } },
                    { "manager": "kube-controller-manager", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {
                        "f:spec": { "f:replicas": {} }
                    } }
                ]
            },
            "spec": {
                "replicas": 7,
                "selector": { "matchLabels": { "app": "api" } },
                "template": { "spec": { "containers": [
                    { "name": "sidecar", "image": "envoy:1.30" },
                    { "name": "api", "image": "shop/api:2.0", "terminationMessagePath": "/dev/termination-log" }
                ] } }
            },
            "status": { "readyReplicas": 7 }
        });
        assert_eq!(
            applied_fields(&live, "dayshift").unwrap(),
            json!({
                "metadata": { "labels": { "app": "api" } },
                "spec": {
                    "selector": { "matchLabels": { "app": "api" } },
                    "template": { "spec": { "containers": [ { "name": "api", "image": "shop/api:2.0" } ] } }
                }
            })
        );
        assert_eq!(applied_fields(&live, "kubectl"), None);
    }
}
