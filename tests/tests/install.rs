//! install.component against the Kubernetes API stand-in (server-side apply, readiness).

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{RunStatus, RunView, StartRun};
use dayshift_tests::kube_api::KubeApi;
use dayshift_tests::{TestEnv, fast_worker, unique};
use dayshift_workflows::adapters::kube::KubeConfig;
use dayshift_workflows::{Connections, install_component};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

const CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: { plural: widgets, singular: widget, kind: Widget }
  versions:
    - name: v1
      served: true
      storage: true
      schema: { openAPIV3Schema: { type: object } }
";

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: catalog\n";

const APP: &str = "# The catalog component: config, API and its database.
apiVersion: v1
kind: ConfigMap
metadata:
  name: catalog-config
data:
  LOG_LEVEL: info
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: catalog-api
spec:
  replicas: 2
  selector: { matchLabels: { app: catalog-api } }
  template:
    metadata: { labels: { app: catalog-api } }
    spec:
      containers:
        - name: api
          image: registry.acme.io/catalog-api:1.4.0
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: catalog-db
spec:
  replicas: 1
  serviceName: catalog-db
  selector: { matchLabels: { app: catalog-db } }
  template:
    metadata: { labels: { app: catalog-db } }
    spec:
      containers:
        - name: postgres
          image: postgres:15
";

struct Rig {
    kube: Arc<KubeApi>,
    env: TestEnv,
    dir: std::path::PathBuf,
}

async fn rig(files: &[(&str, &str)]) -> Rig {
    let kube = Arc::new(KubeApi::start().await);
    let dir = std::env::temp_dir().join(format!("dayshift-manifests-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let mut conns = Connections::default();
    conns.kubernetes.insert(
        "cluster".into(),
        KubeConfig {
            url: Some(kube.url.clone()),
            ..KubeConfig::default()
        },
    );
    let mut env = TestEnv::new(vec![install_component(Arc::new(conns))]).await;
    env.start_worker(fast_worker("w"));
    Rig { kube, env, dir }
}

async fn install(rig: &Rig) -> RunView {
    let input = json!({ "component": "catalog", "manifests": rig.dir, "namespace": "catalog", "kubernetes": "cluster", "timeout": "10s" });
    let started = rig
        .env
        .engine
        .start(StartRun::new("install.component", input))
        .await
        .unwrap();
    rig.env.wait(started.id, LIMIT).await
}

#[tokio::test]
async fn an_install_applies_crds_then_namespaces_then_the_rest_and_waits_until_ready() {
    let mut rig = rig(&[
        ("00-crd.yaml", CRD),
        ("01-namespace.yaml", NAMESPACE),
        ("02-app.yaml", APP),
    ])
    .await;
    let run = install(&rig).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    assert_eq!(
        run.output.clone().unwrap()["applied"],
        json!([
            "CustomResourceDefinition widgets.example.com",
            "Namespace catalog",
            "ConfigMap catalog/catalog-config",
            "Deployment catalog/catalog-api",
            "StatefulSet catalog/catalog-db",
        ])
    );
    let writes: Vec<String> = rig.kube.writes().iter().map(|w| w.path.clone()).collect();
    assert_eq!(
        writes[0],
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com"
    );
    assert_eq!(writes[1], "/api/v1/namespaces/catalog");
    assert!(
        rig.kube
            .writes()
            .iter()
            .all(|w| w.content_type == "application/apply-patch+yaml")
    );
    let api = rig
        .kube
        .get("/apis/apps/v1/namespaces/catalog/deployments/catalog-api")
        .unwrap();
    assert_eq!(api["metadata"]["managedFields"][0]["manager"], "dayshift");
    assert_eq!(api["metadata"]["labels"]["dayshift.io/component"], "catalog");
    let steps: Vec<&str> = run.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        steps,
        [
            "check",
            "apply:crds",
            "wait:crds-established",
            "apply:namespaces",
            "apply:resources",
            "wait-ready"
        ]
    );

    // Installing what is installed changes nothing.
    let versions = |k: &KubeApi| {
        [
            "/apis/apps/v1/namespaces/catalog/deployments/catalog-api",
            "/apis/apps/v1/namespaces/catalog/statefulsets/catalog-db",
            "/api/v1/namespaces/catalog/configmaps/catalog-config",
        ]
        .map(|p| k.get(p).unwrap()["metadata"]["resourceVersion"].clone())
    };
    let before = versions(&rig.kube);
    let again = install(&rig).await;
    assert_eq!(again.status, RunStatus::Succeeded, "{again:#?}");
    assert_eq!(versions(&rig.kube), before);
    rig.env.stop_workers().await;
}

#[tokio::test]
async fn a_workload_that_never_becomes_ready_fails_the_install_with_the_reason() {
    let mut rig = rig(&[("01-namespace.yaml", NAMESPACE), ("02-app.yaml", APP)]).await;
    rig.kube.stall_rollouts("catalog", "catalog-db");
    let run = install(&rig).await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.unwrap();
    assert!(
        error.contains("rollout of StatefulSet catalog/catalog-db did not complete within 10s")
            && error.contains("pods are ready"),
        "{error}"
    );
    rig.env.stop_workers().await;
}

#[tokio::test]
async fn bad_manifests_are_refused_before_anything_is_applied() {
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[(
                "app.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n data: [\n",
            )],
            "app.yaml is not valid YAML",
        ),
        (
            &[(
                "w.yaml",
                "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n  namespace: catalog\n",
            )],
            "kind Widget (example.com/v1) is not one the cluster is known to serve",
        ),
        (
            &[("02-app.yaml", APP)],
            "ConfigMap catalog/catalog-config is in namespace catalog, which neither the manifests nor the cluster has",
        ),
    ];
    for (files, expected) in cases {
        let mut rig = rig(files).await;
        let run = install(&rig).await;
        assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
        let error = run.error.unwrap();
        assert!(error.contains(expected), "{error}");
        assert!(rig.kube.writes().is_empty(), "applied despite: {error}");
        rig.env.stop_workers().await;
    }
}

#[tokio::test]
async fn a_worker_killed_mid_install_resumes_without_applying_completed_phases_again() {
    let kube = Arc::new(KubeApi::start().await);
    let dir = std::env::temp_dir().join(format!("dayshift-manifests-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in [
        ("00-crd.yaml", CRD),
        ("01-namespace.yaml", NAMESPACE),
        ("02-app.yaml", APP),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let yaml = format!(
        "connections:\n  kubernetes:\n    cluster: {{ url: \"{}\" }}\n",
        kube.url
    );
    let env = dayshift_tests::BinEnv::start_with(&yaml).await;
    for step in ["apply:crds", "apply:namespaces"] {
        let before = kube.writes().len();
        let mut first = dayshift_tests::spawn_dayshift(
            &env.config_path,
            &["worker"],
            "worker ",
            &[("DAYSHIFT_TEST_STOP_AFTER_STEP", step)],
        )
        .await;
        let id = env
            .start_run(
                "install.component",
                json!({ "component": "catalog", "manifests": dir, "namespace": "catalog", "kubernetes": "cluster", "timeout": "10s" }),
            )
            .await;
        first.wait_stopped(LIMIT).await;
        first.kill9().await;
        let mut second = env.start_worker().await;
        let run = env.wait_finished(&id, LIMIT).await;
        second.kill9().await;
        assert_eq!(run["status"], "succeeded", "killed after {step}: {run:#}");
        // Every object was applied once by this run: nothing journaled as done was applied again.
        let writes: Vec<String> = kube.writes()[before..].iter().map(|w| w.path.clone()).collect();
        let mut unique_writes = writes.clone();
        unique_writes.sort();
        unique_writes.dedup();
        assert_eq!(writes.len(), 5, "killed after {step}: {writes:#?}");
        assert_eq!(
            unique_writes.len(),
            5,
            "killed after {step}: applied twice: {writes:#?}"
        );
    }
}
