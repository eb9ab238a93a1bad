//! The Kubernetes API server stand-in: the one allowed stand-in (no cluster runs on these
//! machines), shared by every test that needs one.
//!
//! It serves, in process on a loopback port, the REST paths, verbs and response shapes of the
//! real API server for the objects dayshift touches (core `v1` and any `/apis/<group>/<version>`
//! namespaced resource): GET, LIST, POST, PUT, DELETE, and PATCH as JSON merge patch
//! (`application/merge-patch+json`) and strategic merge patch (treated as a merge patch, which is
//! what it is for maps; the objects dayshift patches are maps). Errors are `Status` objects with
//! the real reasons (`NotFound`, `AlreadyExists`, `Conflict`, `UnsupportedMediaType`).
//!
//! Server-side apply (`application/apply-patch+yaml`) behaves as far as a client can observe:
//! the fields each manager applied are recorded in `managedFields` (`fieldsV1`, lists treated as
//! atomic), a field a manager applied before and no longer applies is removed unless another
//! manager owns it, applying what is already there changes nothing (not even the
//! resourceVersion), and `dryRun=All` answers without storing. Lists take an equality
//! `labelSelector`, in one namespace or across all.
//!
//! It records every request, so tests assert what dayshift sent. And it plays the controllers a
//! rollout needs: when a Deployment, StatefulSet or DaemonSet's pod template changes, the
//! generation goes up and the status follows as a rollout would, either completing (the default)
//! or never becoming ready ([`KubeApi::stall_rollouts`], [`KubeApi::stall_image`]). A Job
//! completes at once, or fails when stalled; its pod template is immutable, as on a real server.
//! It plays ArgoCD's application controller too: an Application's `operation` (a sync) is
//! carried out right after the write that sets it ([`KubeApi::break_application`] for one that
//! stays Degraded), and cert-manager: a Certificate whose status asks for issuance (as `cmctl
//! renew` writes it) is issued again ([`KubeApi::break_certificate`] for one whose issuer fails),
//! and CloudNativePG: a `Backup` completes when created ([`KubeApi::break_cnpg_cluster`] for
//! one that fails).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::{Json, Router};
use serde_json::{Value, json};

/// A request the stand-in received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// e.g. `/apis/apps/v1/namespaces/shop/deployments/api`.
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

/// Where an object lives: the API path prefix (`/api/v1`, `/apis/apps/v1`), the resource
/// (plural), the namespace and the name.
type Key = (String, String, String, String);

#[derive(Default)]
struct Inner {
    objects: BTreeMap<Key, Value>,
    requests: Vec<Recorded>,
    resource_version: u64,
    /// Workloads (`ns/name`) whose rollouts never become ready.
    stalled: HashSet<String>,
    /// Images whose pods never become ready.
    stalled_images: HashSet<String>,
    /// Paths (`/api/v1/namespaces/shop/secrets/db`) whose writes fail with a 500.
    failing: HashSet<String>,
    /// Whether Jobs run their containers' commands as local processes ([`KubeApi::run_jobs`]).
    kubelet: bool,
    /// Jobs (`ns/name`) whose pod has been started.
    launched: HashSet<String>,
    /// Commands run in pods: `ns/name` and the command.
    execs: Vec<(String, Vec<String>)>,
    /// Each pod's log (what its process wrote), by `ns/name`.
    logs: BTreeMap<String, String>,
    /// ArgoCD Applications that a sync leaves Degraded and Certificates that cert-manager fails
    /// to issue, by `ns/name`.
    broken: HashSet<String>,
    /// Service account tokens issued: token → (namespace, name, uid).
    tokens: BTreeMap<String, (String, String, String)>,
}

/// The stand-in, serving until dropped.
pub struct KubeApi {
    /// The API server URL to give a kube client.
    pub url: String,
    inner: Arc<Mutex<Inner>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

const WORKLOADS: [&str; 4] = ["deployments", "statefulsets", "daemonsets", "jobs"];

/// Kinds that live outside namespaces.
const CLUSTER_KINDS: [&str; 6] = [
    "Node",
    "StorageClass",
    "Namespace",
    "PersistentVolume",
    "ClusterRole",
    "CustomResourceDefinition",
];

impl KubeApi {
    /// Starts one on a free loopback port.
    pub async fn start() -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                axum::routing::post(token_review),
            )
            .route("/api/v1/namespaces/{ns}/pods/{name}/exec", any(exec))
            // Namespaced and cluster-scoped objects and lists, core and grouped.
            .route("/api/{*path}", any(resource))
            .route("/apis/{*path}", any(resource))
            .fallback(|method: Method, uri: axum::http::Uri| async move { not_a_resource(&method, &uri) })
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, inner, server }
    }

    /// Creates or replaces an object as `kubectl apply` of a fresh cluster would leave it
    /// (metadata filled in; a workload's status as after a completed rollout).
    pub fn put(&self, object: Value) {
        let api_version = object["apiVersion"].as_str().expect("apiVersion").to_string();
        let plural = plural_of(object["kind"].as_str().expect("kind"));
        let prefix = if api_version.contains('/') {
            format!("/apis/{api_version}")
        } else {
            format!("/api/{api_version}")
        };
        let kind = object["kind"].as_str().unwrap_or_default();
        let ns = if CLUSTER_KINDS.contains(&kind) {
            String::new()
        } else {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        };
        let name = object["metadata"]["name"].as_str().expect("metadata.name").to_string();
        let mut inner = self.inner.lock().unwrap();
        let mut object = object;
        if !ns.is_empty() {
            object["metadata"]["namespace"] = json!(ns);
        }
        stamp_new(&mut inner, &mut object);
        settle(&inner, &plural, &mut object);
        inner.objects.insert((prefix, plural, ns, name), object);
    }

    /// The object at `path` (e.g. `/apis/apps/v1/namespaces/shop/deployments/api`), if any.
    pub fn get(&self, path: &str) -> Option<Value> {
        let key = key_of(path)?;
        self.inner.lock().unwrap().objects.get(&key).cloned()
    }

    /// Every object stored, by its path (as [`KubeApi::get`] takes it), in path order: what a
    /// test compares to see what a run left in the cluster.
    pub fn objects(&self) -> Vec<(String, Value)> {
        let inner = self.inner.lock().unwrap();
        inner
            .objects
            .iter()
            .map(|((prefix, plural, ns, name), o)| {
                let path = if ns.is_empty() {
                    format!("{prefix}/{plural}/{name}")
                } else {
                    format!("{prefix}/namespaces/{ns}/{plural}/{name}")
                };
                (path, o.clone())
            })
            .collect()
    }

    /// Replaces the status of the object at `path`, as its controller would (ArgoCD for an
    /// `Application`).
    pub fn set_status(&self, path: &str, status: Value) {
        let key = key_of(path).expect("an object path");
        let mut inner = self.inner.lock().unwrap();
        inner.resource_version += 1;
        let rv = inner.resource_version.to_string();
        let object = inner.objects.get_mut(&key).expect("the object exists");
        object["status"] = status;
        object["metadata"]["resourceVersion"] = json!(rv);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// The writes (anything but GET) so far.
    pub fn writes(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.method != "GET").collect()
    }

    /// From now on, rollouts of workload `namespace/name` never become ready.
    pub fn stall_rollouts(&self, namespace: &str, name: &str) {
        self.inner.lock().unwrap().stalled.insert(format!("{namespace}/{name}"));
    }

    /// From now on, a rollout to a pod template running `image` never becomes ready (the new
    /// version crashes); rolling back to another image completes.
    pub fn stall_image(&self, image: &str) {
        self.inner.lock().unwrap().stalled_images.insert(image.to_string());
    }

    /// From now on, a Job runs as a kubelet would run it on a node whose images are this machine's
    /// programs: its pod (`<job>-<5 letters>`, labelled `job-name`) runs the container's
    /// `command` and `args` as a local process, with the container's `env` (values, and
    /// `secretKeyRef`s read from the Secrets stored here) and nothing else of this process's
    /// environment but `PATH`; what it writes is the pod's log (`GET …/pods/<name>/log`), its exit
    /// code the container's, and the Job ends Complete or Failed with it. A Secret reference that
    /// does not resolve fails the Job, as `CreateContainerConfigError` would hold it. Without
    /// this, a Job completes at once.
    pub fn run_jobs(&self) {
        self.inner.lock().unwrap().kubelet = true;
    }

    /// Puts the CustomResourceDefinition of `kind` (plural `plural`) in `group`, served at
    /// `version`, as the operator's chart would install it.
    pub fn put_crd(&self, group: &str, kind: &str, plural: &str, version: &str) {
        self.put(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": { "name": format!("{plural}.{group}") },
            "spec": { "group": group, "scope": "Namespaced",
                      "names": { "kind": kind, "plural": plural },
                      "versions": [{ "name": version, "served": true, "storage": true }] },
        }));
    }

    /// Every command run in a pod (`ns/name`, the command), in order.
    pub fn execs(&self) -> Vec<(String, Vec<String>)> {
        self.inner.lock().unwrap().execs.clone()
    }

    /// The pods stored (of Jobs, once they run), by `ns/name`.
    pub fn pods(&self) -> Vec<String> {
        let inner = self.inner.lock().unwrap();
        inner
            .objects
            .keys()
            .filter(|(p, r, _, _)| p == "/api/v1" && r == "pods")
            .map(|(_, _, ns, name)| format!("{ns}/{name}"))
            .collect()
    }

    /// From now on, a sync of ArgoCD Application `namespace/name` leaves it Degraded (its new
    /// pods never become ready).
    pub fn break_application(&self, namespace: &str, name: &str) {
        self.inner.lock().unwrap().broken.insert(format!("{namespace}/{name}"));
    }

    /// The log of pod `namespace/name` (as its container wrote it) and of its previous instance.
    pub fn set_log(&self, namespace: &str, name: &str, log: &str, previous: &str) {
        let mut inner = self.inner.lock().unwrap();
        inner.logs.insert(format!("{namespace}/{name}"), log.to_string());
        inner
            .logs
            .insert(format!("{namespace}/{name} previous"), previous.to_string());
    }

    /// From now on, a CloudNativePG backup of Cluster `namespace/name` fails.
    pub fn break_cnpg_cluster(&self, namespace: &str, name: &str) {
        self.inner.lock().unwrap().broken.insert(format!("{namespace}/{name}"));
    }

    /// From now on, cert-manager fails to issue Certificate `namespace/name` (its issuer is not
    /// ready).
    pub fn break_certificate(&self, namespace: &str, name: &str) {
        self.inner.lock().unwrap().broken.insert(format!("{namespace}/{name}"));
    }

    /// A token of service account `namespace/name`, shaped like the ones the kubelet mounts (a
    /// JWT with the service account claims); the TokenReview API authenticates it.
    pub fn issue_service_account_token(&self, namespace: &str, name: &str) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let uid = uuid::Uuid::new_v4().to_string();
        let now = chrono::Utc::now().timestamp();
        let header = b64.encode(json!({ "alg": "RS256", "kid": "stand-in" }).to_string());
        let claims = b64.encode(
            json!({
                "iss": "https://kubernetes.default.svc.cluster.local",
                "aud": ["https://kubernetes.default.svc.cluster.local"],
                "sub": format!("system:serviceaccount:{namespace}:{name}"),
                "iat": now, "nbf": now, "exp": now + 3600,
                "kubernetes.io": { "namespace": namespace, "serviceaccount": { "name": name, "uid": uid } },
            })
            .to_string(),
        );
        let signature = b64.encode(uuid::Uuid::new_v4().as_bytes());
        let token = format!("{header}.{claims}.{signature}");
        self.inner
            .lock()
            .unwrap()
            .tokens
            .insert(token.clone(), (namespace.into(), name.into(), uid));
        token
    }

    /// Connections with this stand-in as Kubernetes cluster `default`.
    pub fn connections(&self) -> dayshift_workflows::Connections {
        let mut conns = dayshift_workflows::Connections::default();
        conns.kubernetes.insert(
            "default".into(),
            dayshift_workflows::adapters::kube::KubeConfig {
                url: Some(self.url.clone()),
                ..Default::default()
            },
        );
        conns
    }

    /// From now on, writes to `path` fail with a 500.
    pub fn fail_writes(&self, path: &str) {
        self.inner.lock().unwrap().failing.insert(path.to_string());
    }
}

/// The resource name of a kind (`Deployment` → `deployments`), as the API server spells it.
fn plural_of(kind: &str) -> String {
    let lower = kind.to_lowercase();
    match lower.as_str() {
        "ingress" => "ingresses".into(),
        "networkpolicy" => "networkpolicies".into(),
        "storageclass" => "storageclasses".into(),
        s if s.ends_with('s') => format!("{s}es"),
        s if s.ends_with('y') => format!("{}ies", &s[..s.len() - 1]),
        s => format!("{s}s"),
    }
}

fn key_of(path: &str) -> Option<Key> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["api", v, "namespaces", ns, plural, name] => Some((
            format!("/api/{v}"),
            plural.to_string(),
            ns.to_string(),
            name.to_string(),
        )),
        ["api", v, plural, name] => Some((format!("/api/{v}"), plural.to_string(), String::new(), name.to_string())),
        ["apis", g, v, plural, name] => Some((
            format!("/apis/{g}/{v}"),
            plural.to_string(),
            String::new(),
            name.to_string(),
        )),
        ["apis", g, v, "namespaces", ns, plural, name] => Some((
            format!("/apis/{g}/{v}"),
            plural.to_string(),
            ns.to_string(),
            name.to_string(),
        )),
        _ => None,
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    (
        code,
        Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
        })),
    )
        .into_response()
}

fn not_found(plural: &str, prefix: &str, name: &str) -> Response {
    let group = prefix.strip_prefix("/apis/").and_then(|g| g.split('/').next());
    let resource = match group {
        Some(g) => format!("{plural}.{g}"),
        None => plural.to_string(),
    };
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
    )
}

/// Fills in the metadata a new object gets.
fn stamp_new(inner: &mut Inner, object: &mut Value) {
    inner.resource_version += 1;
    let meta = &mut object["metadata"];
    meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
    meta["resourceVersion"] = json!(inner.resource_version.to_string());
    meta["creationTimestamp"] = json!(chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string());
    meta["generation"] = json!(1);
}

/// What the controllers would do to a workload: complete its rollout, unless it is stalled.
fn settle(inner: &Inner, plural: &str, object: &mut Value) {
    if plural == "backups"
        && object["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("postgresql.cnpg.io/"))
    {
        // CloudNativePG takes the backup of the Cluster named, unless it is broken.
        let cluster = object["spec"]["cluster"]["name"].as_str().unwrap_or_default();
        let ns = object["metadata"]["namespace"].as_str().unwrap_or_default();
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
        object["status"] = if inner.broken.contains(&format!("{ns}/{cluster}")) {
            json!({ "phase": "failed", "error": "can't execute backup: the instance is not ready", "startedAt": now })
        } else {
            json!({ "phase": "completed", "method": object["spec"]["method"].as_str().unwrap_or("barmanObjectStore"),
                    "backupId": format!("{}", chrono::Utc::now().format("%Y%m%dT%H%M%S")), "startedAt": now, "stoppedAt": now,
                    "destinationPath": format!("s3://backups/{cluster}") })
        };
        return;
    }
    if plural == "customresourcedefinitions" {
        object["status"] = json!({
            "conditions": [
                { "type": "NamesAccepted", "status": "True", "reason": "NoConflicts" },
                { "type": "Established", "status": "True", "reason": "InitialNamesAccepted" },
            ],
            "acceptedNames": object["spec"]["names"].clone(),
        });
        return;
    }
    if !WORKLOADS.contains(&plural) {
        return;
    }
    let id = format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or_default(),
        object["metadata"]["name"].as_str().unwrap_or_default()
    );
    let generation = object["metadata"]["generation"].clone();
    let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
    let stalled_image = object["spec"]["template"]["spec"]["containers"]
        .as_array()
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["image"].as_str().is_some_and(|i| inner.stalled_images.contains(i)))
        });
    let stalled = inner.stalled.contains(&id) || stalled_image;
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let status = if plural == "jobs" && inner.kubelet {
        json!({ "active": 1, "startTime": now })
    } else if plural == "jobs" && !stalled {
        let completions = object["spec"]["completions"].as_i64().unwrap_or(1);
        json!({
            "succeeded": completions, "startTime": now, "completionTime": now,
            "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": now}],
        })
    } else if plural == "jobs" {
        json!({
            "failed": object["spec"]["backoffLimit"].as_i64().unwrap_or(6) + 1, "startTime": now,
            "conditions": [{
                "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit", "lastTransitionTime": now,
            }],
        })
    } else if !stalled {
        json!({
            "observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": replicas, "availableReplicas": replicas, "currentReplicas": replicas,
            "updatedNumberScheduled": replicas, "numberAvailable": replicas, "numberReady": replicas,
            "desiredNumberScheduled": replicas, "currentNumberScheduled": replicas,
            "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}],
        })
    } else if plural == "deployments" {
        // A surge pod of the new ReplicaSet never becomes ready; the old pods keep serving.
        json!({
            "observedGeneration": generation, "replicas": replicas + 1, "updatedReplicas": 1,
            "readyReplicas": replicas, "availableReplicas": replicas, "unavailableReplicas": 1,
            "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}],
        })
    } else if plural == "statefulsets" {
        // The highest ordinal was replaced and its new pod never becomes ready.
        json!({
            "observedGeneration": generation, "replicas": replicas, "updatedReplicas": 1,
            "readyReplicas": replicas - 1, "availableReplicas": replicas - 1, "currentReplicas": replicas - 1,
        })
    } else {
        json!({
            "observedGeneration": generation, "desiredNumberScheduled": replicas,
            "currentNumberScheduled": replicas, "updatedNumberScheduled": 1,
            "numberReady": replicas - 1, "numberAvailable": replicas - 1, "numberUnavailable": 1,
        })
    };
    object["status"] = status;
}

/// What ArgoCD's application controller does with an Application's `operation`: it removes it,
/// records it in `status.operationState` as Succeeded, and the Application is Synced at its
/// target revision and Healthy, unless [`KubeApi::break_application`] said it stays Degraded.
fn argocd_sync(inner: &Inner, app: &mut Value) {
    let operation = app
        .as_object_mut()
        .and_then(|o| o.remove("operation"))
        .unwrap_or_default();
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let revision = operation["sync"]["revision"]
        .as_str()
        .or(app["spec"]["source"]["targetRevision"].as_str())
        .unwrap_or("HEAD")
        .to_string();
    let id = format!(
        "{}/{}",
        app["metadata"]["namespace"].as_str().unwrap_or_default(),
        app["metadata"]["name"].as_str().unwrap_or_default()
    );
    let health = if inner.broken.contains(&id) {
        json!({ "status": "Degraded", "message": "Deployment \"web\" exceeded its progress deadline" })
    } else {
        json!({ "status": "Healthy" })
    };
    app["status"]["operationState"] = json!({
        "operation": operation, "phase": "Succeeded", "message": "successfully synced (all tasks run)",
        "startedAt": now, "finishedAt": now, "syncResult": { "revision": revision },
    });
    app["status"]["sync"] = json!({ "status": "Synced", "revision": revision });
    app["status"]["health"] = health;
}

/// Server-side apply, as far as it can be observed: creates the object or merges the applied
/// fields into it, removes the fields this manager applied before and no longer applies (unless
/// another manager owns them), records what each manager owns in `managedFields`, and with
/// `dryRun=All` answers with the result without storing it. A field manager is required, as on a
/// real server; conflicts are always forced (dayshift always forces).
fn apply(state: &mut Inner, key: Key, query: &str, body: &Bytes) -> Response {
    let param = |name: &str| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
    };
    let Some(manager) = param("fieldManager").filter(|m| !m.is_empty()) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        );
    };
    let dry_run = param("dryRun").as_deref() == Some("All");
    let applied: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &format!("not an object: {e}")),
    };
    let (plural, ns, name) = (key.1.clone(), key.2.clone(), key.3.clone());
    let paths = owned_paths(&applied);
    let entry = json!({
        "manager": manager, "operation": "Apply", "apiVersion": applied["apiVersion"],
        "time": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(), "fieldsType": "FieldsV1",
        "fieldsV1": fields_v1(&paths),
    });
    let (object, created) = match state.objects.get(&key).cloned() {
        None => {
            let mut object = applied;
            object["metadata"]["name"] = json!(name);
            if !ns.is_empty() {
                object["metadata"]["namespace"] = json!(ns);
            }
            stamp_new(state, &mut object);
            settle(state, &plural, &mut object);
            fold_string_data(&plural, &mut object);
            object["metadata"]["managedFields"] = json!([entry]);
            (object, true)
        }
        Some(current) => {
            if plural == "jobs" && applied["spec"]["template"] != current["spec"]["template"] {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    &format!("Job.batch \"{name}\" is invalid: spec.template: Invalid value: field is immutable"),
                );
            }
            let fields: Vec<Value> = current["metadata"]["managedFields"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let mine = |f: &&Value| f["manager"] == json!(manager) && f["operation"] == "Apply";
            let before: Vec<Vec<String>> = fields
                .iter()
                .find(mine)
                .map(|f| paths_of(&f["fieldsV1"]))
                .unwrap_or_default();
            let others: Vec<Vec<String>> = fields
                .iter()
                .filter(|f| !mine(f))
                .flat_map(|f| paths_of(&f["fieldsV1"]))
                .collect();
            let mut updated = current.clone();
            for gone in before.iter().filter(|p| !paths.contains(p) && !others.contains(p)) {
                remove_path(&mut updated, gone);
            }
            merge(&mut updated, &applied);
            fold_string_data(&plural, &mut updated);
            for field in [
                "uid",
                "creationTimestamp",
                "name",
                "namespace",
                "resourceVersion",
                "generation",
            ] {
                updated["metadata"][field] = current["metadata"][field].clone();
            }
            updated["metadata"]["managedFields"] = current["metadata"]["managedFields"].clone();
            if updated == current && before == paths {
                // Nothing new: the object stays as it is, resourceVersion included.
                return (StatusCode::OK, Json(current)).into_response();
            }
            // Forced: the applied fields are taken from the managers that had them.
            let mut fields: Vec<Value> = fields
                .into_iter()
                .filter(|f| !mine(&f))
                .filter_map(|mut f| {
                    let kept: Vec<Vec<String>> = paths_of(&f["fieldsV1"])
                        .into_iter()
                        .filter(|p| !paths.contains(p))
                        .collect();
                    if kept.is_empty() {
                        return None;
                    }
                    f["fieldsV1"] = fields_v1(&kept);
                    Some(f)
                })
                .collect();
            fields.push(entry);
            updated["metadata"]["managedFields"] = json!(fields);
            state.resource_version += 1;
            updated["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            if updated.get("spec") != current.get("spec") {
                let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
                updated["metadata"]["generation"] = json!(generation + 1);
                settle(state, &plural, &mut updated);
            }
            (updated, false)
        }
    };
    if !dry_run {
        state.objects.insert(key, object.clone());
    }
    let code = if created { StatusCode::CREATED } else { StatusCode::OK };
    (code, Json(object)).into_response()
}

/// A Secret's `stringData` is write-only: the server folds it into `data`, base64-encoded.
fn fold_string_data(plural: &str, object: &mut Value) {
    use base64::Engine as _;
    if plural != "secrets" {
        return;
    }
    let Some(Value::Object(strings)) = object.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    for (k, v) in strings {
        let text = v.as_str().unwrap_or_default().as_bytes().to_vec();
        object["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

/// The fields an applied object sets, as paths to leaves (a list is one leaf, as an atomic list
/// is on a real server). The identity (`apiVersion`, `kind`, name, namespace) is no one's.
fn owned_paths(applied: &Value) -> Vec<Vec<String>> {
    fn walk(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, v) in m {
                    at.push(k.clone());
                    walk(v, at, out);
                    at.pop();
                }
            }
            _ => out.push(at.clone()),
        }
    }
    let mut out = Vec::new();
    walk(applied, &mut Vec::new(), &mut out);
    out.retain(|p| {
        !matches!(
            p.iter().map(String::as_str).collect::<Vec<_>>().as_slice(),
            ["apiVersion"] | ["kind"] | ["metadata", "name"] | ["metadata", "namespace"] | ["status", ..]
        )
    });
    out.sort();
    out
}

/// Paths as `fieldsV1` spells them: `{"f:spec": {"f:replicas": {}}}`.
fn fields_v1(paths: &[Vec<String>]) -> Value {
    let mut root = json!({});
    for p in paths {
        let mut at = &mut root;
        for k in p {
            at = at
                .as_object_mut()
                .expect("fieldsV1 nodes are objects")
                .entry(format!("f:{k}"))
                .or_insert(json!({}));
        }
    }
    root
}

/// The inverse of [`fields_v1`].
fn paths_of(fields: &Value) -> Vec<Vec<String>> {
    fn walk(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match v.as_object() {
            Some(m) if !m.is_empty() => {
                for (k, v) in m {
                    let Some(k) = k.strip_prefix("f:") else { continue };
                    at.push(k.to_string());
                    walk(v, at, out);
                    at.pop();
                }
            }
            _ if !at.is_empty() => out.push(at.clone()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(fields, &mut Vec::new(), &mut out);
    out.sort();
    out
}

/// Removes the field at `path`, and the maps it leaves empty.
fn remove_path(object: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    if let Some(parent) = parents.iter().try_fold(&mut *object, |v, k| v.get_mut(k))
        && let Some(m) = parent.as_object_mut()
    {
        m.remove(last);
        if m.is_empty() && !parents.is_empty() {
            remove_path(object, parents);
        }
    }
}

/// RFC 7386.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

type Shared = State<Arc<Mutex<Inner>>>;

fn record(
    inner: &Arc<Mutex<Inner>>,
    method: &Method,
    path: String,
    query: Option<String>,
    headers: &HeaderMap,
    body: &Bytes,
) {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = serde_json::from_slice(body).unwrap_or(Value::Null);
    inner.lock().unwrap().requests.push(Recorded {
        method: method.to_string(),
        path,
        query: query.unwrap_or_default(),
        content_type,
        body,
    });
}

/// One request, as the routes see it.
struct Req {
    method: Method,
    /// `/api/v1` or `/apis/<group>/<version>`.
    prefix: String,
    ns: String,
    plural: String,
    name: Option<String>,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

async fn handle(inner: Arc<Mutex<Inner>>, req: Req) -> Response {
    let jobs = req.plural == "jobs" && req.method != Method::GET;
    let response = serve_request(&inner, req);
    if jobs {
        start_jobs(&inner);
    }
    response
}

fn serve_request(inner: &Arc<Mutex<Inner>>, req: Req) -> Response {
    let Req {
        method,
        prefix,
        ns,
        plural,
        name,
        query,
        headers,
        body,
    } = req;
    let path = match (&name, ns.is_empty()) {
        (Some(n), true) => format!("{prefix}/{plural}/{n}"),
        (Some(n), false) => format!("{prefix}/namespaces/{ns}/{plural}/{n}"),
        (None, true) => format!("{prefix}/{plural}"),
        (None, false) => format!("{prefix}/namespaces/{ns}/{plural}"),
    };
    record(inner, &method, path.clone(), query.clone(), &headers, &body);
    let mut state = inner.lock().unwrap();
    if method != Method::GET && state.failing.contains(&path) {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "etcdserver: request timed out",
        );
    }
    let Some(name) = name else {
        if method == Method::POST {
            let mut object: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            };
            let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let key = (prefix, plural.clone(), ns.clone(), name.clone());
            if state.objects.contains_key(&key) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{plural} \"{name}\" already exists"),
                );
            }
            if !ns.is_empty() {
                object["metadata"]["namespace"] = json!(ns);
            }
            stamp_new(&mut state, &mut object);
            settle(&state, &plural, &mut object);
            state.objects.insert(key, object.clone());
            return (StatusCode::CREATED, Json(object)).into_response();
        }
        // An equality label selector (`a=b,c=d`), as `kubectl get -l` sends it.
        let selector: Vec<(String, String)> = query
            .as_deref()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.strip_prefix("labelSelector="))
            .flat_map(|s| {
                let s = s.replace("%3D", "=").replace("%2C", ",").replace("%2F", "/");
                s.split(',')
                    .filter_map(|t| t.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                    .collect::<Vec<_>>()
            })
            .collect();
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((p, r, n, _), _)| *p == prefix && *r == plural && (ns.is_empty() || *n == ns))
            .filter(|(_, v)| {
                selector
                    .iter()
                    .all(|(k, val)| v["metadata"]["labels"][k].as_str() == Some(val.as_str()))
            })
            .map(|(_, v)| v.clone())
            .collect();
        return Json(json!({
            "kind": "List", "apiVersion": "v1",
            "metadata": { "resourceVersion": state.resource_version.to_string() },
            "items": items,
        }))
        .into_response();
    };
    let key = (prefix.clone(), plural.clone(), ns.clone(), name.clone());
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    if method == Method::PATCH && content_type == "application/apply-patch+yaml" {
        return apply(&mut state, key, query.as_deref().unwrap_or_default(), &body);
    }
    let Some(current) = state.objects.get(&key).cloned() else {
        return not_found(&plural, &prefix, &name);
    };
    match method {
        Method::GET => Json(current).into_response(),
        Method::DELETE => {
            state.objects.remove(&key);
            if plural == "jobs" {
                // Its pods go with it (background propagation, as dayshift asks).
                state.objects.retain(|(p, r, n, _), o| {
                    !(p == "/api/v1" && r == "pods" && *n == ns && o["metadata"]["labels"]["job-name"] == name.as_str())
                });
            }
            Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name}}))
                .into_response()
        }
        Method::PUT | Method::PATCH => {
            let body: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            };
            let mut updated = current.clone();
            if method == Method::PUT {
                let sent = body["metadata"]["resourceVersion"].as_str();
                if sent.is_some() && sent != current["metadata"]["resourceVersion"].as_str() {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                updated = body;
            } else {
                let content_type = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !matches!(
                    content_type,
                    "application/merge-patch+json" | "application/strategic-merge-patch+json"
                ) {
                    return status(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        &format!("the stand-in does not take {content_type:?} patches"),
                    );
                }
                merge(&mut updated, &body);
            }
            // Identity and bookkeeping stay the server's.
            for field in ["uid", "creationTimestamp", "name", "namespace"] {
                updated["metadata"][field] = current["metadata"][field].clone();
            }
            state.resource_version += 1;
            updated["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
            if updated.get("spec") != current.get("spec") {
                updated["metadata"]["generation"] = json!(generation + 1);
                settle(&state, &plural, &mut updated);
            } else {
                updated["metadata"]["generation"] = json!(generation);
                updated["status"] = current["status"].clone();
            }
            state.objects.insert(key.clone(), updated.clone());
            if plural == "applications" && updated["operation"].is_object() {
                // The ArgoCD application controller picks the operation up after the write.
                let mut synced = updated.clone();
                argocd_sync(&state, &mut synced);
                state.resource_version += 1;
                synced["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
                state.objects.insert(key, synced);
            }
            Json(updated).into_response()
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "method not allowed"),
    }
}

/// Any resource path: `/api/v1` or `/apis/<group>/<version>`, then `namespaces/<ns>/` for a
/// namespaced resource, the resource (plural), and the name for one object. A list without a
/// namespace covers all of them.
async fn resource(
    State(s): Shared,
    method: Method,
    uri: axum::http::Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let parts: Vec<String> = uri
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let (prefix, rest) = match parts.first().map(String::as_str) {
        Some("api") if parts.len() >= 2 => (format!("/api/{}", parts[1]), &parts[2..]),
        Some("apis") if parts.len() >= 3 => (format!("/apis/{}/{}", parts[1], parts[2]), &parts[3..]),
        _ => return not_a_resource(&method, &uri),
    };
    let (ns, plural, name) = match rest {
        [ns_word, ns, plural] if ns_word == "namespaces" => (ns.clone(), plural.clone(), None),
        [ns_word, ns, plural, name] if ns_word == "namespaces" => (ns.clone(), plural.clone(), Some(name.clone())),
        [ns_word, ns, pods, name, log] if ns_word == "namespaces" && pods == "pods" && log == "log" => {
            return pod_log(&s, ns, name, query.as_deref().unwrap_or_default());
        }
        [ns_word, ns, plural, name, sub] if ns_word == "namespaces" && sub == "status" && method == Method::PATCH => {
            record(
                &s,
                &method,
                format!("{prefix}/namespaces/{ns}/{plural}/{name}/status"),
                query.clone(),
                &headers,
                &body,
            );
            return patch_status(&s, (prefix, plural.clone(), ns.clone(), name.clone()), &body);
        }
        [plural] => (String::new(), plural.clone(), None),
        [plural, name] => (String::new(), plural.clone(), Some(name.clone())),
        _ => return not_a_resource(&method, &uri),
    };
    let req = Req {
        method,
        prefix,
        ns,
        plural,
        name,
        query,
        headers,
        body,
    };
    handle(s, req).await
}

/// `GET /api/v1/namespaces/<ns>/pods/<name>/exec`, upgraded to a WebSocket with the
/// `v5.channel.k8s.io` or `v4.channel.k8s.io` subprotocol, as `kubectl exec` and kube-rs use
/// it: the command runs as a local program (the node's images are this machine's programs, as
/// for Jobs) with the container's plain `env` values and `PATH`; its stdout is sent on channel
/// 1, its stderr on 2, and its end as a `Status` on channel 3 (`NonZeroExitCode` with the code
/// for a failure). A pod that is not there is a 404; one not Running, a 400.
async fn exec(
    State(s): Shared,
    axum::extract::Path((ns, name)): axum::extract::Path<(String, String)>,
    RawQuery(query): RawQuery,
    upgrade: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let mut argv = Vec::new();
    let mut container_name = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match k.as_ref() {
            "command" => argv.push(v.into_owned()),
            "container" => container_name = Some(v.into_owned()),
            _ => {}
        }
    }
    let env: Vec<(String, String)> = {
        let mut inner = s.lock().unwrap();
        let Some(pod) = inner
            .objects
            .get(&("/api/v1".into(), "pods".into(), ns.clone(), name.clone()))
            .cloned()
        else {
            return not_found("pods", "/api/v1", &name);
        };
        if pod["status"]["phase"] != "Running" {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("pod {name} is not running (phase {})", pod["status"]["phase"]),
            );
        }
        let containers = pod["spec"]["containers"].as_array().cloned().unwrap_or_default();
        let container = match &container_name {
            Some(c) => containers.iter().find(|x| x["name"] == c.as_str()).cloned(),
            None => containers.first().cloned(),
        };
        let Some(container) = container else {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("container {container_name:?} is not valid for pod {name}"),
            );
        };
        inner.execs.push((format!("{ns}/{name}"), argv.clone()));
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
            .collect()
    };
    upgrade
        .protocols(["v5.channel.k8s.io", "v4.channel.k8s.io"])
        .on_upgrade(move |mut socket| async move {
            use axum::extract::ws::Message;
            let frame = |channel: u8, data: &[u8]| {
                let mut b = vec![channel];
                b.extend_from_slice(data);
                Message::Binary(b.into())
            };
            let Some((program, args)) = argv.split_first() else {
                return;
            };
            let out = run_in_container(program, args, env).await;
            let end = match out {
                Ok(out) => {
                    if !out.stdout.is_empty() {
                        let _ = socket.send(frame(1, &out.stdout)).await;
                    }
                    if !out.stderr.is_empty() {
                        let _ = socket.send(frame(2, &out.stderr)).await;
                    }
                    match out.status.code() {
                        Some(0) => json!({ "metadata": {}, "status": "Success" }),
                        code => json!({
                            "metadata": {}, "status": "Failure",
                            "message": format!("command terminated with non-zero exit code: exit status {}", code.unwrap_or(137)),
                            "reason": "NonZeroExitCode",
                            "details": { "causes": [{ "reason": "ExitCode", "message": code.unwrap_or(137).to_string() }] },
                        }),
                    }
                }
                Err(e) => json!({
                    "metadata": {}, "status": "Failure", "reason": "InternalError",
                    "message": format!("failed to exec in container: exec: {program:?}: {e}"),
                }),
            };
            let _ = socket.send(frame(3, end.to_string().as_bytes())).await;
            let _ = socket.send(Message::Close(None)).await;
        })
}

/// `PATCH …/<name>/status`: a merge patch of the status subresource (the rest of the body is
/// ignored, as on a real server). cert-manager is played here: a Certificate whose `Issuing`
/// condition turns True is issued again at once (a new `notAfter` 90 days on, `revision` up,
/// Ready), unless [`KubeApi::break_certificate`] said its issuer fails.
fn patch_status(inner: &Arc<Mutex<Inner>>, key: Key, body: &Bytes) -> Response {
    let patch: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let mut state = inner.lock().unwrap();
    let Some(mut object) = state.objects.get(&key).cloned() else {
        return not_found(&key.1, &key.0, &key.3);
    };
    let mut status = object["status"].clone();
    if status.is_null() {
        status = json!({});
    }
    merge(&mut status, &patch["status"]);
    object["status"] = status;
    state.resource_version += 1;
    object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
    let answer = object.clone();
    let conditions = object["status"]["conditions"].as_array().cloned().unwrap_or_default();
    if key.1 == "certificates"
        && conditions
            .iter()
            .any(|c| c["type"] == "Issuing" && c["status"] == "True")
    {
        let now = chrono::Utc::now();
        let stamp = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let broken = state.broken.contains(&format!("{}/{}", key.2, key.3));
        let ready = if broken {
            json!({ "type": "Ready", "status": "False", "reason": "Failed", "lastTransitionTime": stamp(now),
                    "message": "The certificate request has failed to complete and will be retried: the issuer is not ready" })
        } else {
            object["status"]["notBefore"] = json!(stamp(now));
            object["status"]["notAfter"] = json!(stamp(now + chrono::Duration::days(90)));
            object["status"]["renewalTime"] = json!(stamp(now + chrono::Duration::days(60)));
            object["status"]["revision"] = json!(object["status"]["revision"].as_i64().unwrap_or(0) + 1);
            json!({ "type": "Ready", "status": "True", "reason": "Ready", "lastTransitionTime": stamp(now),
                    "message": "Certificate is up to date and has not expired" })
        };
        let mut kept: Vec<Value> = conditions
            .into_iter()
            .filter(|c| c["type"] != "Issuing" && c["type"] != "Ready")
            .collect();
        kept.push(ready);
        object["status"]["conditions"] = json!(kept);
        state.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
    }
    state.objects.insert(key, object);
    Json(answer).into_response()
}

/// `GET /api/v1/namespaces/<ns>/pods/<name>/log`, with `tailLines`.
fn pod_log(inner: &Arc<Mutex<Inner>>, ns: &str, name: &str, query: &str) -> Response {
    let inner = inner.lock().unwrap();
    let id = format!("{ns}/{name}");
    if !inner
        .objects
        .contains_key(&("/api/v1".into(), "pods".into(), ns.to_string(), name.to_string()))
    {
        return not_found("pods", "/api/v1", name);
    }
    let previous = query.split('&').any(|kv| kv == "previous=true");
    let log = inner
        .logs
        .get(&if previous { format!("{id} previous") } else { id })
        .cloned()
        .unwrap_or_default();
    let tail = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("tailLines="))
        .and_then(|n| n.parse::<usize>().ok());
    let lines: Vec<&str> = log.lines().collect();
    let from = tail.map_or(0, |n| lines.len().saturating_sub(n));
    let mut text = lines[from..].join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    (StatusCode::OK, [("content-type", "text/plain")], text).into_response()
}

/// Runs a container's command as the stand-in's nodes do: a local program with the
/// container's environment `env` and this machine's `PATH`, nothing else of this process's
/// environment, no stdin.
async fn run_in_container(
    program: &str,
    args: &[String],
    env: Vec<(String, String)>,
) -> std::io::Result<std::process::Output> {
    tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .stdin(std::process::Stdio::null())
        .output()
        .await
}

/// Starts the pod of each Job not started yet, when Jobs run ([`KubeApi::run_jobs`]).
fn start_jobs(inner: &Arc<Mutex<Inner>>) {
    let mut state = inner.lock().unwrap();
    if !state.kubelet {
        return;
    }
    let pending: Vec<(Key, Value)> = state
        .objects
        .iter()
        .filter(|((p, r, ns, name), _)| {
            p == "/apis/batch/v1" && r == "jobs" && !state.launched.contains(&format!("{ns}/{name}"))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, job) in pending {
        let (ns, job_name) = (key.2.clone(), key.3.clone());
        state.launched.insert(format!("{ns}/{job_name}"));
        let suffix: String = uuid::Uuid::new_v4()
            .simple()
            .to_string()
            .chars()
            .filter(char::is_ascii_lowercase)
            .take(5)
            .collect();
        let pod_name = format!("{job_name}-{suffix:a<5}");
        let container = job["spec"]["template"]["spec"]["containers"][0].clone();
        // The container's environment, Secret references resolved as the kubelet does.
        let mut env: Vec<(String, String)> = Vec::new();
        let mut unresolved = None;
        for e in container["env"].as_array().into_iter().flatten() {
            let var = e["name"].as_str().unwrap_or_default().to_string();
            if let Some(v) = e["value"].as_str() {
                env.push((var, v.to_string()));
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                let (secret, k) = (
                    r["name"].as_str().unwrap_or_default(),
                    r["key"].as_str().unwrap_or_default(),
                );
                let value = state
                    .objects
                    .get(&("/api/v1".into(), "secrets".into(), ns.clone(), secret.to_string()))
                    .and_then(|s| s["data"][k].as_str().map(str::to_string))
                    .and_then(|b| {
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD.decode(b).ok()
                    })
                    .and_then(|b| String::from_utf8(b).ok());
                match value {
                    Some(v) => env.push((var, v)),
                    None => unresolved = Some(format!("secret \"{secret}\" (key {k:?}) not found")),
                }
            }
        }
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": pod_name, "namespace": ns,
                          "labels": { "job-name": job_name, "batch.kubernetes.io/job-name": job_name } },
            "spec": job["spec"]["template"]["spec"].clone(),
            "status": { "phase": "Running" },
        });
        stamp_new(&mut state, &mut pod);
        state
            .objects
            .insert(("/api/v1".into(), "pods".into(), ns.clone(), pod_name.clone()), pod);
        if let Some(why) = unresolved {
            finish_job(&mut state, &key, &pod_name, None, why);
            continue;
        }
        let argv: Vec<String> = container["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(container["args"].as_array().into_iter().flatten())
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        let inner = inner.clone();
        tokio::spawn(async move {
            let Some((program, args)) = argv.split_first() else {
                let mut state = inner.lock().unwrap();
                finish_job(&mut state, &key, &pod_name, None, "the container has no command".into());
                return;
            };
            let out = run_in_container(program, args, env).await;
            let mut state = inner.lock().unwrap();
            match out {
                Ok(out) => {
                    let mut log = String::from_utf8_lossy(&out.stdout).to_string();
                    log.push_str(&String::from_utf8_lossy(&out.stderr));
                    state.logs.insert(format!("{}/{pod_name}", key.2), log);
                    let code = out.status.code().unwrap_or(137);
                    finish_job(&mut state, &key, &pod_name, Some(code), String::new());
                }
                Err(e) => finish_job(
                    &mut state,
                    &key,
                    &pod_name,
                    None,
                    format!("cannot start {program}: {e}"),
                ),
            }
        });
    }
}

/// Records that the pod `pod` of Job `key` ended with `code` (`None`: it never started, for
/// `why`), and the Job with it. A Job deleted meanwhile stays deleted.
fn finish_job(state: &mut Inner, key: &Key, pod: &str, code: Option<i32>, why: String) {
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    state.resource_version += 1;
    let rv = state.resource_version.to_string();
    let pod_key = (
        "/api/v1".to_string(),
        "pods".to_string(),
        key.2.clone(),
        pod.to_string(),
    );
    if let Some(p) = state.objects.get_mut(&pod_key) {
        p["metadata"]["resourceVersion"] = json!(rv);
        p["status"] = match code {
            Some(c) => json!({
                "phase": if c == 0 { "Succeeded" } else { "Failed" },
                "containerStatuses": [{ "name": p["spec"]["containers"][0]["name"], "ready": false, "state": { "terminated": {
                    "exitCode": c, "reason": if c == 0 { "Completed" } else { "Error" }, "finishedAt": now,
                } } }],
            }),
            None => json!({
                "phase": "Pending",
                "containerStatuses": [{ "name": p["spec"]["containers"][0]["name"], "ready": false, "state": { "waiting": {
                    "reason": "CreateContainerConfigError", "message": why,
                } } }],
            }),
        };
    }
    let Some(job) = state.objects.get_mut(key) else {
        return;
    };
    job["metadata"]["resourceVersion"] = json!(rv);
    job["status"] = if code == Some(0) {
        json!({ "succeeded": 1, "startTime": job["status"]["startTime"], "completionTime": now,
                "conditions": [{ "type": "Complete", "status": "True", "lastTransitionTime": now }] })
    } else {
        let message = match code {
            Some(_) => "Job has reached the specified backoff limit".to_string(),
            None => why,
        };
        json!({ "failed": 1, "startTime": job["status"]["startTime"],
                "conditions": [{ "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                 "message": message, "lastTransitionTime": now }] })
    };
}

fn not_a_resource(method: &Method, uri: &axum::http::Uri) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("the server could not find the requested resource ({method} {uri})"),
    )
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`: what Vault's Kubernetes auth asks.
async fn token_review(State(s): Shared, headers: HeaderMap, body: Bytes) -> Response {
    record(
        &s,
        &Method::POST,
        "/apis/authentication.k8s.io/v1/tokenreviews".into(),
        None,
        &headers,
        &body,
    );
    let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let known = s.lock().unwrap().tokens.get(token).cloned();
    let status = match known {
        Some((ns, name, uid)) => json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{ns}:{name}"),
                "uid": uid,
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
            },
            "audiences": review["spec"]["audiences"].clone(),
        }),
        None => json!({ "authenticated": false, "error": "invalid bearer token" }),
    };
    (
        StatusCode::CREATED,
        Json(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": { "creationTimestamp": null }, "spec": review["spec"].clone(), "status": status,
        })),
    )
        .into_response()
}
