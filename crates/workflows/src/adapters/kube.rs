//! The Kubernetes API: what the workflows do to a cluster, each call safe to repeat.
//!
//! - [`Kube::rollout_restart`] sends what `kubectl rollout restart` sends (a strategic merge
//!   patch of the pod template's `kubectl.kubernetes.io/restartedAt` annotation). The time is
//!   the caller's, so a repeated call with the same time changes nothing and starts no second
//!   rollout.
//! - [`Kube::rollout_status`] reads what `kubectl rollout status` reads; [`Kube::job_complete`]
//!   and [`Kube::crd_established`] read a Job and a CustomResourceDefinition. Each is one read:
//!   a workflow waits with them durably, holding no worker between reads.
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

use crate::config::{InvalidConfig, SecretReader, SecretSource};

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

/// The error of a rollout that will not complete on its own.
pub fn rollout_failed(w: &Workload, why: &str) -> KubeError {
    KubeError::Permanent(format!("rollout of {w} failed: {why}"))
}

/// The error of a rollout still not complete after `limit`, with why (as of the last read).
pub fn rollout_timed_out(w: &Workload, limit: Duration, why: &str) -> KubeError {
    KubeError::Permanent(format!(
        "rollout of {w} did not complete within {}: {why}",
        humantime::format_duration(limit)
    ))
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
    /// `limit` passes. For callers outside a workflow: this holds its caller for the whole
    /// wait, so a workflow waits durably instead, one [`Kube::rollout_status`] per check.
    pub async fn wait_rollout(&self, w: &Workload, every: Duration, limit: Duration) -> Result<(), KubeError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.rollout_status(w).await? {
                Rollout::Complete => return Ok(()),
                Rollout::Failed(why) => return Err(rollout_failed(w, &why)),
                Rollout::Waiting(why) => {
                    if tokio::time::Instant::now() + every > deadline {
                        return Err(rollout_timed_out(w, limit, &why));
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

    /// The last `lines` lines of container `container`'s log in pod `namespace/name`, as
    /// `kubectl logs --tail` gives them (lossy UTF-8).
    pub async fn pod_log_tail(
        &self,
        namespace: &str,
        name: &str,
        container: &str,
        lines: i64,
    ) -> Result<String, KubeError> {
        self.pod_log(namespace, name, Some(container), lines, false).await
    }

    /// [`Kube::pod_log_tail`] of `container` (the pod's only one if `None`), or of its previous
    /// instance (`kubectl logs --previous`: the one that crashed) with `previous`.
    pub async fn pod_log(
        &self,
        namespace: &str,
        name: &str,
        container: Option<&str>,
        lines: i64,
        previous: bool,
    ) -> Result<String, KubeError> {
        let api = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), namespace);
        let params = kube::api::LogParams {
            container: container.map(str::to_string),
            tail_lines: Some(lines),
            previous,
            ..Default::default()
        };
        api.logs(name, &params)
            .await
            .map_err(|e| KubeError::from_kube(&format!("read the log of Pod {namespace}/{name}"), e))
    }

    /// Runs `command` in container `container` (the pod's only one if `None`) of pod
    /// `namespace/name`, as `kubectl exec` does (no stdin, no TTY), and waits for it to end.
    /// Each of stdout and stderr keeps its last `keep` bytes.
    pub async fn exec(
        &self,
        namespace: &str,
        name: &str,
        container: Option<&str>,
        command: &[String],
        keep: usize,
    ) -> Result<Executed, KubeError> {
        use tokio::io::AsyncReadExt as _;
        let what = format!("exec in Pod {namespace}/{name}");
        let api = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(self.client.clone(), namespace);
        let mut params = kube::api::AttachParams::default()
            .stdin(false)
            .stdout(true)
            .stderr(true);
        if let Some(c) = container {
            params = params.container(c);
        }
        let mut process = api
            .exec(name, command.to_vec(), &params)
            .await
            .map_err(|e| KubeError::from_kube(&what, e))?;
        let status = process.take_status();
        async fn tail(r: Option<impl tokio::io::AsyncRead + Unpin>, keep: usize) -> String {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf).await;
            }
            let from = buf.len().saturating_sub(keep);
            String::from_utf8_lossy(&buf[from..]).into_owned()
        }
        let (stdout, stderr) = tokio::join!(tail(process.stdout(), keep), tail(process.stderr(), keep));
        let status = match status {
            Some(s) => s.await,
            None => None,
        };
        let _ = process.join().await;
        let Some(status) = status else {
            return Err(KubeError::Transient(format!(
                "{what}: the connection ended without an exit status"
            )));
        };
        let exit_code = match status.status.as_deref() {
            Some("Success") => 0,
            _ if status.reason.as_deref() == Some("NonZeroExitCode") => status
                .details
                .as_ref()
                .and_then(|d| d.causes.as_ref())
                .and_then(|c| c.iter().find(|c| c.reason.as_deref() == Some("ExitCode")))
                .and_then(|c| c.message.as_deref())
                .and_then(|m| m.parse().ok())
                .unwrap_or(1),
            _ => {
                return Err(KubeError::Permanent(format!(
                    "{what}: {}",
                    status.message.as_deref().unwrap_or("the command could not be run")
                )));
            }
        };
        Ok(Executed {
            exit_code,
            stdout,
            stderr,
        })
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

    fn dynamic(&self, r: &Resource, namespace: Option<&str>) -> Api<DynamicObject> {
        let (group, version) = match r.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", r.api_version.as_str()),
        };
        let gvk = GroupVersionKind::gvk(group, version, &r.kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, &r.plural);
        match (r.namespaced, namespace) {
            (true, Some(ns)) => Api::namespaced_with(self.client.clone(), ns, &ar),
            _ => Api::all_with(self.client.clone(), &ar),
        }
    }

    /// Server-side apply of `object` (of resource `r`) under field manager `manager` (forced:
    /// dayshift owns what it applies); with `dry_run` the API server computes the result and
    /// stores nothing. Returns the object as the server has it (or would have it).
    pub async fn apply(
        &self,
        r: &Resource,
        object: &serde_json::Value,
        manager: &str,
        dry_run: bool,
    ) -> Result<serde_json::Value, KubeError> {
        let id = ObjectId::of(object);
        let api = self.dynamic(r, id.namespace.as_deref());
        let mut params = PatchParams::apply(manager).force();
        params.dry_run = dry_run;
        let applied = api
            .patch(&id.name, &params, &Patch::Apply(object))
            .await
            .map_err(|e| KubeError::from_kube(&format!("apply {id}"), e))?;
        Ok(serde_json::to_value(applied).unwrap_or_default())
    }

    /// The object `id` (of resource `r`) as the server has it; `None` if it does not exist.
    pub async fn get(&self, r: &Resource, id: &ObjectId) -> Result<Option<serde_json::Value>, KubeError> {
        let found = self
            .dynamic(r, id.namespace.as_deref())
            .get_opt(&id.name)
            .await
            .map_err(|e| KubeError::from_kube(&format!("read {id}"), e))?;
        Ok(found.map(|o| serde_json::to_value(o).unwrap_or_default()))
    }

    /// Where objects of `kind` in `api_version` live: a built-in kind, or one a
    /// CustomResourceDefinition of the cluster defines (an ExternalSecret, a Certificate).
    pub async fn resource(&self, api_version: &str, kind: &str) -> Result<Resource, KubeError> {
        if let Some(r) = Resource::builtin(api_version, kind) {
            return Ok(r);
        }
        self.crds()
            .await?
            .iter()
            .flat_map(Resource::from_crd)
            .find(|r| r.api_version == api_version && r.kind == kind)
            .ok_or_else(|| {
                KubeError::Permanent(format!(
                    "the cluster serves no kind {kind} in {api_version} (no built-in kind, no CustomResourceDefinition)"
                ))
            })
    }

    /// The objects of resource `r` in `namespace` (every namespace if `None`) matching the label
    /// selector `labels` (`app=web,tier!=cache`), at most `limit`.
    pub async fn list(
        &self,
        r: &Resource,
        namespace: Option<&str>,
        labels: Option<&str>,
        limit: u32,
    ) -> Result<Vec<serde_json::Value>, KubeError> {
        let mut params = kube::api::ListParams::default().limit(limit);
        if let Some(l) = labels {
            params = params.labels(l);
        }
        let list = self
            .dynamic(r, namespace)
            .list(&params)
            .await
            .map_err(|e| KubeError::from_kube(&format!("list {}", r.plural), e))?;
        Ok(list
            .items
            .into_iter()
            .take(limit as usize)
            .map(|o| serde_json::to_value(o).unwrap_or_default())
            .collect())
    }

    /// A JSON merge patch of object `id`; returns the object as patched.
    pub async fn merge_patch(
        &self,
        r: &Resource,
        id: &ObjectId,
        patch: &serde_json::Value,
    ) -> Result<serde_json::Value, KubeError> {
        let patched = self
            .dynamic(r, id.namespace.as_deref())
            .patch(&id.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(|e| KubeError::from_kube(&format!("patch {id}"), e))?;
        Ok(serde_json::to_value(patched).unwrap_or_default())
    }

    /// A JSON merge patch of object `id`'s `status` subresource (what its controller reads, as
    /// `cmctl renew` writes a Certificate's); returns the object as patched.
    pub async fn merge_patch_status(
        &self,
        r: &Resource,
        id: &ObjectId,
        patch: &serde_json::Value,
    ) -> Result<serde_json::Value, KubeError> {
        let patched = self
            .dynamic(r, id.namespace.as_deref())
            .patch_status(&id.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(|e| KubeError::from_kube(&format!("patch the status of {id}"), e))?;
        Ok(serde_json::to_value(patched).unwrap_or_default())
    }

    /// Deletes object `id`; `false` if it was already gone. Dependents are deleted in the
    /// background, as `kubectl delete` does.
    pub async fn delete(&self, r: &Resource, id: &ObjectId) -> Result<bool, KubeError> {
        let params = kube::api::DeleteParams::background();
        match self.dynamic(r, id.namespace.as_deref()).delete(&id.name, &params).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(KubeError::from_kube(&format!("delete {id}"), e)),
        }
    }

    /// The objects of resource `r` (in every namespace) carrying every label of `labels`.
    pub async fn list_labelled(
        &self,
        r: &Resource,
        labels: &[(&str, &str)],
    ) -> Result<Vec<serde_json::Value>, KubeError> {
        let selector = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let list = match self
            .dynamic(r, None)
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
        {
            Ok(list) => list,
            // A kind this cluster does not serve has no objects.
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Vec::new()),
            Err(e) => return Err(KubeError::from_kube(&format!("list {} -l {selector}", r.plural), e)),
        };
        Ok(list
            .items
            .into_iter()
            .map(|o| serde_json::to_value(o).unwrap_or_default())
            .collect())
    }

    /// The CustomResourceDefinitions the cluster serves.
    pub async fn crds(&self) -> Result<Vec<serde_json::Value>, KubeError> {
        let r = Resource::builtin("apiextensions.k8s.io/v1", "CustomResourceDefinition").expect("built in");
        let list = self
            .dynamic(&r, None)
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| KubeError::from_kube("list CustomResourceDefinitions", e))?;
        Ok(list
            .items
            .into_iter()
            .map(|o| serde_json::to_value(o).unwrap_or_default())
            .collect())
    }

    /// Whether Job `namespace/name` has completed; a Job that failed is a permanent error, with
    /// the reason its controller gave.
    pub async fn job_complete(&self, namespace: &str, name: &str) -> Result<bool, KubeError> {
        let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(self.client.clone(), namespace);
        let job = jobs
            .get(name)
            .await
            .map_err(|e| KubeError::from_kube(&format!("read Job {namespace}/{name}"), e))?;
        let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
        let with = |t: &str| conditions.iter().find(|c| c.type_ == t && c.status == "True");
        if with("Complete").is_some() {
            return Ok(true);
        }
        if let Some(c) = with("Failed") {
            return Err(KubeError::Permanent(format!(
                "Job {namespace}/{name} failed: {} ({})",
                c.message.as_deref().unwrap_or("no message"),
                c.reason.as_deref().unwrap_or("no reason")
            )));
        }
        Ok(false)
    }

    /// Whether namespace `name` exists.
    pub async fn namespace_exists(&self, name: &str) -> Result<bool, KubeError> {
        Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client.clone())
            .get_opt(name)
            .await
            .map(|n| n.is_some())
            .map_err(|e| KubeError::from_kube(&format!("read Namespace {name}"), e))
    }

    /// Whether CustomResourceDefinition `name` is `Established` (its API is served).
    pub async fn crd_established(&self, name: &str) -> Result<bool, KubeError> {
        let gvk = GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "customresourcedefinitions");
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
        let crd = api
            .get(name)
            .await
            .map_err(|e| KubeError::from_kube(&format!("read CustomResourceDefinition {name}"), e))?;
        Ok(crd.data["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Established" && c["status"] == "True")))
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

/// What a command run in a container (`Kube::exec`) ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Executed {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A kind as the API serves it: where its objects live and whether they are namespaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    pub api_version: String,
    pub kind: String,
    /// The resource name in paths (`deployments`).
    pub plural: String,
    pub namespaced: bool,
}

impl Resource {
    /// One of the built-in kinds dayshift knows ([`Resource::builtins`]).
    pub fn builtin(api_version: &str, kind: &str) -> Option<Self> {
        builtin(api_version, kind).map(|(plural, namespaced)| Self {
            api_version: api_version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
        })
    }

    /// Every built-in kind dayshift knows.
    pub fn builtins() -> Vec<Self> {
        BUILTIN
            .iter()
            .filter_map(|(api_version, kind)| Self::builtin(api_version, kind))
            .collect()
    }

    /// The kinds a CustomResourceDefinition defines, one per served version.
    pub fn from_crd(crd: &serde_json::Value) -> Vec<Self> {
        let spec = &crd["spec"];
        let (Some(group), Some(kind), Some(plural)) = (
            spec["group"].as_str(),
            spec["names"]["kind"].as_str(),
            spec["names"]["plural"].as_str(),
        ) else {
            return Vec::new();
        };
        spec["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| v["served"].as_bool() != Some(false))
            .filter_map(|v| v["name"].as_str())
            .map(|version| Self {
                api_version: format!("{group}/{version}"),
                kind: kind.into(),
                plural: plural.into(),
                namespaced: spec["scope"].as_str() != Some("Cluster"),
            })
            .collect()
    }
}

/// An object's identity: `Kind namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectId {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectId {
    pub fn of(object: &serde_json::Value) -> Self {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
        Self {
            api_version: text(&object["apiVersion"]),
            kind: text(&object["kind"]),
            namespace: object["metadata"]["namespace"].as_str().map(str::to_string),
            name: text(&object["metadata"]["name"]),
        }
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

const BUILTIN: [(&str, &str); 20] = [
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("v1", "PersistentVolumeClaim"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "DaemonSet"),
    ("batch/v1", "Job"),
    ("batch/v1", "CronJob"),
    ("networking.k8s.io/v1", "Ingress"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("policy/v1", "PodDisruptionBudget"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
];

/// The resource name and scope of the built-in kinds dayshift applies ([`BUILTIN`]), and of
/// those it only reads or changes in place (nodes, pods, events).
fn builtin(api_version: &str, kind: &str) -> Option<(&'static str, bool)> {
    Some(match (api_version, kind) {
        ("v1", "Node") => ("nodes", false),
        ("v1", "Pod") => ("pods", true),
        ("v1", "Event") => ("events", true),
        ("events.k8s.io/v1", "Event") => ("events", true),
        ("v1", "PersistentVolume") => ("persistentvolumes", false),
        ("v1", "Endpoints") => ("endpoints", true),
        ("apps/v1", "ReplicaSet") => ("replicasets", true),
        ("storage.k8s.io/v1", "StorageClass") => ("storageclasses", false),
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

// `connections.kubernetes.<name>` as the config file gives it.
/// A Kubernetes cluster. With nothing set: the kubeconfig (`KUBECONFIG`, `~/.kube/config`),
/// or inside a pod its service account.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct KubernetesConnectionConfig {
    /// A kubeconfig context other than the current one.
    pub context: Option<String>,
    /// The API server URL, instead of a kubeconfig.
    pub url: Option<String>,
    /// Where the bearer token is, with `url`.
    pub token: Option<SecretSource>,
}

impl KubernetesConnectionConfig {
    /// The cluster with its token read; `key` is where it is in the config.
    pub fn resolve(&self, key: &str, read: SecretReader<'_>) -> Result<KubeConfig, InvalidConfig> {
        let key = format!("{key}.token");
        let token = match &self.token {
            Some(src) => Some(read.text(src, &key)?.trim().to_string()),
            None => None,
        };
        if token.is_some() && self.url.is_none() {
            return Err(InvalidConfig::new(key, "give `url` with it"));
        }
        Ok(KubeConfig {
            url: self.url.clone(),
            token,
            context: self.context.clone(),
        })
    }
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
