//! The Kubernetes API: what the workflows do to a cluster, each call safe to repeat.
//!
//! - [`Kube::rollout_restart`] sends what `kubectl rollout restart` sends (a strategic merge
//!   patch of the pod template's `kubectl.kubernetes.io/restartedAt` annotation). The time is
//!   the caller's, so a repeated call with the same time changes nothing and starts no second
//!   rollout.
//! - [`Kube::rollout_status`] reads what `kubectl rollout status` reads.
//! - Secrets are changed key by key with a JSON merge patch, leaving their other keys alone.
//!
//! GitOps owns what ArgoCD syncs: these calls are for objects dayshift is asked to touch
//! (restarts, Secrets it manages), never to patch what a GitOps tool would revert.

use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// How to reach a cluster.
#[derive(Clone, Default)]
pub struct KubeConfig {
    /// The API server URL; absent: the kubeconfig (`KUBECONFIG`, `~/.kube/config`) or, inside a
    /// pod, the service account.
    pub url: Option<String>,
    /// A bearer token, with `url`.
    pub token: Option<String>,
    /// A kubeconfig context other than the current one.
    pub context: Option<String>,
}

impl std::fmt::Debug for KubeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeConfig")
            .field("url", &self.url)
            .field("context", &self.context)
            .finish_non_exhaustive()
    }
}

/// A failed Kubernetes call.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes API: {0}")]
    Transient(String),
    #[error("Kubernetes API: {0}")]
    Permanent(String),
}

impl KubeError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }

    fn from_kube(what: &str, e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if matches!(s.code, 400 | 401 | 403 | 404 | 405 | 415 | 422) => {
                Self::Permanent(format!("{what}: {} ({})", s.message, s.code))
            }
            kube::Error::Api(s) => Self::Transient(format!("{what}: {} ({})", s.message, s.code)),
            _ => Self::Transient(format!("{what}: {e}")),
        }
    }
}

/// A workload whose pods can be restarted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollout {
    Complete,
    /// Still going, and why (as `kubectl rollout status` words it).
    Waiting(String),
    /// It will not complete on its own (the progress deadline passed).
    Failed(String),
}

/// A namespaced object as a Secret reference in workflow inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

/// A client for one cluster.
#[derive(Clone)]
pub struct Kube {
    client: kube::Client,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube").finish_non_exhaustive()
    }
}

impl Kube {
    pub async fn connect(config: &KubeConfig) -> Result<Self, KubeError> {
        super::http::install_crypto();
        let mut c = match (&config.url, &config.context) {
            (Some(url), _) => {
                let uri = url
                    .parse()
                    .map_err(|e| KubeError::Permanent(format!("bad API server URL {url}: {e}")))?;
                let mut c = kube::Config::new(uri);
                c.auth_info.token = config.token.clone().map(Into::into);
                c
            }
            (None, Some(context)) => kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions {
                context: Some(context.clone()),
                ..Default::default()
            })
            .await
            .map_err(|e| KubeError::Permanent(format!("kubeconfig context {context}: {e}")))?,
            (None, None) => kube::Config::infer()
                .await
                .map_err(|e| KubeError::Permanent(format!("no cluster configured: {e}")))?,
        };
        c.connect_timeout = Some(Duration::from_secs(10));
        c.read_timeout = Some(Duration::from_secs(60));
        let client = kube::Client::try_from(c).map_err(|e| KubeError::Permanent(format!("{e}")))?;
        Ok(Self { client })
    }

    /// Restarts the workload's pods the way `kubectl rollout restart` does, stamped `at`.
    pub async fn rollout_restart(&self, w: &Workload, at: &str) -> Result<(), KubeError> {
        let patch = json!({
            "spec": { "template": { "metadata": { "annotations": { "kubectl.kubernetes.io/restartedAt": at } } } }
        });
        let params = PatchParams::default();
        let what = format!("restart {w}");
        let done = match w.kind {
            WorkloadKind::Deployment => Api::<Deployment>::namespaced(self.client.clone(), &w.namespace)
                .patch(&w.name, &params, &Patch::Strategic(&patch))
                .await
                .map(|_| ()),
            WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(self.client.clone(), &w.namespace)
                .patch(&w.name, &params, &Patch::Strategic(&patch))
                .await
                .map(|_| ()),
            WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(self.client.clone(), &w.namespace)
                .patch(&w.name, &params, &Patch::Strategic(&patch))
                .await
                .map(|_| ()),
        };
        done.map_err(|e| KubeError::from_kube(&what, e))
    }

    /// Where the workload's rollout is, by the rules of `kubectl rollout status`.
    pub async fn rollout_status(&self, w: &Workload) -> Result<Rollout, KubeError> {
        let what = format!("read {w}");
        let err = |e| KubeError::from_kube(&what, e);
        Ok(match w.kind {
            WorkloadKind::Deployment => {
                let d = Api::<Deployment>::namespaced(self.client.clone(), &w.namespace)
                    .get(&w.name)
                    .await
                    .map_err(err)?;
                let generation = d.metadata.generation.unwrap_or(0);
                let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let s = d.status.unwrap_or_default();
                let deadline = s
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
                let updated = s.updated_replicas.unwrap_or(0);
                if s.observed_generation.unwrap_or(0) < generation {
                    Rollout::Waiting("waiting for the deployment spec update to be observed".into())
                } else if deadline {
                    Rollout::Failed(format!("deployment {:?} exceeded its progress deadline", w.name))
                } else if updated < want {
                    Rollout::Waiting(format!("{updated} out of {want} new replicas have been updated"))
                } else if s.replicas.unwrap_or(0) > updated {
                    Rollout::Waiting(format!(
                        "{} old replicas are pending termination",
                        s.replicas.unwrap_or(0) - updated
                    ))
                } else if s.available_replicas.unwrap_or(0) < updated {
                    Rollout::Waiting(format!(
                        "{} of {updated} updated replicas are available",
                        s.available_replicas.unwrap_or(0)
                    ))
                } else {
                    Rollout::Complete
                }
            }
            WorkloadKind::StatefulSet => {
                let st = Api::<StatefulSet>::namespaced(self.client.clone(), &w.namespace)
                    .get(&w.name)
                    .await
                    .map_err(err)?;
                let generation = st.metadata.generation.unwrap_or(0);
                let want = st.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                let s = st.status.unwrap_or_default();
                if s.observed_generation.unwrap_or(0) < generation {
                    Rollout::Waiting("waiting for the statefulset spec update to be observed".into())
                } else if s.ready_replicas.unwrap_or(0) < want {
                    Rollout::Waiting(format!("{} of {want} pods are ready", s.ready_replicas.unwrap_or(0)))
                } else if s.updated_replicas.unwrap_or(0) < want {
                    Rollout::Waiting(format!(
                        "{} of {want} pods have the new revision",
                        s.updated_replicas.unwrap_or(0)
                    ))
                } else {
                    Rollout::Complete
                }
            }
            WorkloadKind::DaemonSet => {
                let ds = Api::<DaemonSet>::namespaced(self.client.clone(), &w.namespace)
                    .get(&w.name)
                    .await
                    .map_err(err)?;
                let generation = ds.metadata.generation.unwrap_or(0);
                let s = ds.status.unwrap_or_default();
                let want = s.desired_number_scheduled;
                if s.observed_generation.unwrap_or(0) < generation {
                    Rollout::Waiting("waiting for the daemon set spec update to be observed".into())
                } else if s.updated_number_scheduled.unwrap_or(0) < want {
                    Rollout::Waiting(format!(
                        "{} out of {want} new pods have been updated",
                        s.updated_number_scheduled.unwrap_or(0)
                    ))
                } else if s.number_available.unwrap_or(0) < want {
                    Rollout::Waiting(format!(
                        "{} of {want} updated pods are available",
                        s.number_available.unwrap_or(0)
                    ))
                } else {
                    Rollout::Complete
                }
            }
        })
    }

    /// Waits, polling every `every`, until the rollout completes; an error when it fails or
    /// `limit` passes.
    pub async fn wait_rollout(&self, w: &Workload, every: Duration, limit: Duration) -> Result<(), KubeError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.rollout_status(w).await? {
                Rollout::Complete => return Ok(()),
                Rollout::Failed(why) => return Err(KubeError::Permanent(format!("rollout of {w} failed: {why}"))),
                Rollout::Waiting(why) => {
                    if tokio::time::Instant::now() + every > deadline {
                        return Err(KubeError::Permanent(format!(
                            "rollout of {w} did not complete within {}: {why}",
                            humantime::format_duration(limit)
                        )));
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The value of `key` in Secret `s`, if the Secret and the key exist.
    pub async fn secret_key(&self, s: &ObjectRef, key: &str) -> Result<Option<Vec<u8>>, KubeError> {
        let api = Api::<Secret>::namespaced(self.client.clone(), &s.namespace);
        let secret = api
            .get_opt(&s.name)
            .await
            .map_err(|e| KubeError::from_kube(&format!("read Secret {}/{}", s.namespace, s.name), e))?;
        Ok(secret
            .and_then(|s| s.data)
            .and_then(|d| d.get(key).map(|v| v.0.clone())))
    }

    /// Sets `key` of Secret `s` to `value`, leaving its other keys alone. The Secret must exist.
    pub async fn set_secret_key(&self, s: &ObjectRef, key: &str, value: &[u8]) -> Result<(), KubeError> {
        let api = Api::<Secret>::namespaced(self.client.clone(), &s.namespace);
        let encoded = base64::engine::general_purpose::STANDARD.encode(value);
        let patch = json!({ "data": { key: encoded } });
        api.patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| KubeError::from_kube(&format!("update Secret {}/{}", s.namespace, s.name), e))
    }

    /// Asks the External Secrets Operator to sync an `ExternalSecret` now (its `force-sync`
    /// annotation, stamped `at`).
    pub async fn force_sync_external_secret(&self, s: &ObjectRef, at: &str) -> Result<(), KubeError> {
        let gvk = GroupVersionKind::gvk("external-secrets.io", "v1beta1", "ExternalSecret");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "externalsecrets");
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &s.namespace, &ar);
        let patch = json!({ "metadata": { "annotations": { "force-sync": at } } });
        api.patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(|e| KubeError::from_kube(&format!("force-sync ExternalSecret {}/{}", s.namespace, s.name), e))
    }

    /// The replicas a Deployment or StatefulSet asks for.
    pub async fn replicas(&self, w: &Workload) -> Result<i32, KubeError> {
        let what = format!("read {w}");
        match w.kind {
            WorkloadKind::Deployment => Api::<Deployment>::namespaced(self.client.clone(), &w.namespace)
                .get(&w.name)
                .await
                .map(|d| d.spec.and_then(|s| s.replicas).unwrap_or(1))
                .map_err(|e| KubeError::from_kube(&what, e)),
            WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(self.client.clone(), &w.namespace)
                .get(&w.name)
                .await
                .map(|d| d.spec.and_then(|s| s.replicas).unwrap_or(1))
                .map_err(|e| KubeError::from_kube(&what, e)),
            WorkloadKind::DaemonSet => Err(KubeError::Permanent(format!("{w}: a DaemonSet has no replica count"))),
        }
    }

    /// Sets the replicas of a Deployment or StatefulSet (a merge patch of `spec.replicas`).
    pub async fn scale(&self, w: &Workload, replicas: i32) -> Result<(), KubeError> {
        let patch = json!({ "spec": { "replicas": replicas } });
        let params = PatchParams::default();
        let what = format!("scale {w}");
        match w.kind {
            WorkloadKind::Deployment => Api::<Deployment>::namespaced(self.client.clone(), &w.namespace)
                .patch(&w.name, &params, &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(|e| KubeError::from_kube(&what, e)),
            WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(self.client.clone(), &w.namespace)
                .patch(&w.name, &params, &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .map_err(|e| KubeError::from_kube(&what, e)),
            WorkloadKind::DaemonSet => Err(KubeError::Permanent(format!("{w}: a DaemonSet cannot be scaled"))),
        }
    }

    /// Deletes a pod (its controller makes a new one). Returns whether it existed.
    pub async fn delete_pod(&self, namespace: &str, name: &str) -> Result<bool, KubeError> {
        let api = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), namespace);
        match api.delete(name, &kube::api::DeleteParams::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(KubeError::from_kube(&format!("delete Pod {namespace}/{name}"), e)),
        }
    }

    /// Marks a node unschedulable, as `kubectl cordon` does.
    pub async fn cordon(&self, node: &str) -> Result<(), KubeError> {
        let api = Api::<k8s_openapi::api::core::v1::Node>::all(self.client.clone());
        api.patch(
            node,
            &PatchParams::default(),
            &Patch::Strategic(json!({ "spec": { "unschedulable": true } })),
        )
        .await
        .map(|_| ())
        .map_err(|e| KubeError::from_kube(&format!("cordon Node {node}"), e))
    }

    /// Grows a PersistentVolumeClaim by `percent`, at most to `max_bytes`, if its StorageClass
    /// allows expansion. Returns the old and new requested sizes in bytes.
    pub async fn expand_pvc(
        &self,
        namespace: &str,
        name: &str,
        percent: u32,
        max_bytes: u64,
    ) -> Result<(u64, u64), KubeError> {
        use k8s_openapi::api::core::v1::PersistentVolumeClaim;
        use k8s_openapi::api::storage::v1::StorageClass;
        let what = format!("PersistentVolumeClaim {namespace}/{name}");
        let pvcs = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace);
        let pvc = pvcs
            .get(name)
            .await
            .map_err(|e| KubeError::from_kube(&format!("read {what}"), e))?;
        let spec = pvc.spec.unwrap_or_default();
        let class = spec.storage_class_name.ok_or_else(|| {
            KubeError::Permanent(format!("{what} names no StorageClass; cannot tell whether it may grow"))
        })?;
        let sc = Api::<StorageClass>::all(self.client.clone())
            .get(&class)
            .await
            .map_err(|e| KubeError::from_kube(&format!("read StorageClass {class}"), e))?;
        if sc.allow_volume_expansion != Some(true) {
            return Err(KubeError::Permanent(format!(
                "StorageClass {class} of {what} does not allow volume expansion"
            )));
        }
        let current = spec
            .resources
            .and_then(|r| r.requests)
            .and_then(|r| r.get("storage").map(|q| q.0.clone()))
            .ok_or_else(|| KubeError::Permanent(format!("{what} requests no storage size")))?;
        let bytes = parse_quantity(&current)
            .ok_or_else(|| KubeError::Permanent(format!("{what}: storage {current:?} is not a size")))?;
        if bytes >= max_bytes {
            return Err(KubeError::Permanent(format!(
                "{what} is {current} already, at or above the maximum of {}",
                format_gi(max_bytes)
            )));
        }
        let grown = (bytes + bytes * u64::from(percent) / 100).min(max_bytes);
        let patch = json!({ "spec": { "resources": { "requests": { "storage": format_gi(grown) } } } });
        pvcs.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| KubeError::from_kube(&format!("expand {what}"), e))?;
        Ok((bytes, grown))
    }

    /// Server-side apply of `object` under field manager `manager` (forced: dayshift owns what it
    /// applies); with `dry_run` the API server computes the result and stores nothing.
    pub async fn apply(
        &self,
        object: &serde_json::Value,
        manager: &str,
        dry_run: bool,
    ) -> Result<serde_json::Value, KubeError> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or_else(|| KubeError::Permanent(format!("a {kind} without metadata.name")))?;
        let (plural, namespaced) = resource_of(api_version, kind).ok_or_else(|| {
            KubeError::Permanent(format!(
                "kind {kind} ({api_version}) is not one dayshift knows how to apply"
            ))
        })?;
        let (group, version) = match api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
        let api: Api<DynamicObject> = if namespaced {
            let ns = object["metadata"]["namespace"].as_str().unwrap_or("default");
            Api::namespaced_with(self.client.clone(), ns, &ar)
        } else {
            Api::all_with(self.client.clone(), &ar)
        };
        let mut params = PatchParams::apply(manager).force();
        params.dry_run = dry_run;
        let applied = api
            .patch(name, &params, &Patch::Apply(object))
            .await
            .map_err(|e| KubeError::from_kube(&format!("apply {kind} {name}"), e))?;
        Ok(serde_json::to_value(applied).unwrap_or_default())
    }

    /// Whether namespace `name` exists.
    pub async fn namespace_exists(&self, name: &str) -> Result<bool, KubeError> {
        Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client.clone())
            .get_opt(name)
            .await
            .map(|n| n.is_some())
            .map_err(|e| KubeError::from_kube(&format!("read Namespace {name}"), e))
    }

    /// Waits until CustomResourceDefinition `name` is `Established` (its API is served).
    pub async fn wait_crd_established(&self, name: &str, limit: Duration) -> Result<(), KubeError> {
        let gvk = GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "customresourcedefinitions");
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let crd = api
                .get(name)
                .await
                .map_err(|e| KubeError::from_kube(&format!("read CustomResourceDefinition {name}"), e))?;
            let established = crd.data["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Established" && c["status"] == "True"));
            if established {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(KubeError::Permanent(format!(
                    "CustomResourceDefinition {name} was not Established within {}",
                    humantime::format_duration(limit)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An ArgoCD `Application` (`argoproj.io/v1alpha1`), as JSON; `None` if it does not exist.
    pub async fn argocd_application(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<serde_json::Value>, KubeError> {
        let gvk = GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Application");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "applications");
        let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &ar);
        let app = api
            .get_opt(name)
            .await
            .map_err(|e| KubeError::from_kube(&format!("read Application {namespace}/{name}"), e))?;
        Ok(app.map(|a| serde_json::to_value(a).unwrap_or_default()))
    }
}

/// The resource name and scope of the kinds dayshift applies.
pub fn resource_of(api_version: &str, kind: &str) -> Option<(&'static str, bool)> {
    Some(match (api_version, kind) {
        ("v1", "Namespace") => ("namespaces", false),
        ("v1", "ConfigMap") => ("configmaps", true),
        ("v1", "Secret") => ("secrets", true),
        ("v1", "Service") => ("services", true),
        ("v1", "ServiceAccount") => ("serviceaccounts", true),
        ("v1", "PersistentVolumeClaim") => ("persistentvolumeclaims", true),
        ("apps/v1", "Deployment") => ("deployments", true),
        ("apps/v1", "StatefulSet") => ("statefulsets", true),
        ("apps/v1", "DaemonSet") => ("daemonsets", true),
        ("batch/v1", "Job") => ("jobs", true),
        ("batch/v1", "CronJob") => ("cronjobs", true),
        ("networking.k8s.io/v1", "Ingress") => ("ingresses", true),
        ("networking.k8s.io/v1", "NetworkPolicy") => ("networkpolicies", true),
        ("policy/v1", "PodDisruptionBudget") => ("poddisruptionbudgets", true),
        ("rbac.authorization.k8s.io/v1", "Role") => ("roles", true),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => ("rolebindings", true),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => ("clusterroles", false),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => ("clusterrolebindings", false),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => ("customresourcedefinitions", false),
        ("autoscaling/v2", "HorizontalPodAutoscaler") => ("horizontalpodautoscalers", true),
        _ => return None,
    })
}

/// A Kubernetes quantity of bytes (`10Gi`, `500M`, `1073741824`).
pub fn parse_quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(q.len());
    let (number, unit) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match unit {
        "" => 1.0,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        _ => return None,
    };
    Some((number * factor).ceil() as u64)
}

/// Bytes as whole `Gi`, rounded up (what a volume resize asks for).
pub fn format_gi(bytes: u64) -> String {
    let gi = 1u64 << 30;
    format!("{}Gi", bytes.div_ceil(gi))
}

#[cfg(test)]
mod tests {
    use super::{format_gi, parse_quantity};

    #[test]
    fn quantities_are_read_and_written() {
        assert_eq!(parse_quantity("10Gi"), Some(10 << 30));
        assert_eq!(parse_quantity("500M"), Some(500_000_000));
        assert_eq!(parse_quantity("1.5Gi"), Some(3 << 29));
        assert_eq!(parse_quantity("ten"), None);
        assert_eq!(format_gi(10 << 30), "10Gi");
        assert_eq!(format_gi((10 << 30) + 1), "11Gi");
    }
}
