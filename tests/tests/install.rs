//! install.component, upgrade.component and install.platform against the Kubernetes API
//! stand-in (server-side apply, readiness driven by the test).

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{RunStatus, RunView};
use dayshift_tests::kube_api::KubeApi;
use dayshift_tests::{TestEnv, fast_worker, unique};
use dayshift_workflows::adapters::kube::KubeConfig;
use dayshift_workflows::{Connections, gate, install_component, install_platform, upgrade_component};
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
    /// A database the SQL smoke checks query (connection `app`).
    app: dayshift_tests::TestDb,
}

/// A directory holding `files`.
fn manifests(files: &[(&str, &str)]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("dayshift-manifests-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

/// The connections the components use: the stand-in as `cluster`, `app` as `app`.
fn connections(kube: &KubeApi, app: &dayshift_tests::TestDb) -> Arc<Connections> {
    let mut conns = Connections::default();
    conns.kubernetes.insert(
        "cluster".into(),
        KubeConfig {
            url: Some(kube.url.clone()),
            ..KubeConfig::default()
        },
    );
    conns.postgres.insert("app".into(), app.url.clone());
    Arc::new(conns)
}

async fn rig(files: &[(&str, &str)]) -> Rig {
    let kube = Arc::new(KubeApi::start().await);
    let dir = manifests(files);
    let app = dayshift_tests::TestDb::empty().await;
    let conns = connections(&kube, &app);
    let mut env = TestEnv::new(vec![
        install_component(conns.clone()),
        upgrade_component(conns),
        install_platform(),
        gate(),
    ])
    .await;
    env.start_worker(fast_worker("w"));
    Rig { kube, env, dir, app }
}

/// Runs `workflow` with `input` to its end.
async fn run(rig: &Rig, workflow: &str, input: serde_json::Value) -> RunView {
    rig.env.run(workflow, input).await
}

async fn install(rig: &Rig) -> RunView {
    let input = json!({ "component": "catalog", "manifests": rig.dir, "namespace": "catalog", "kubernetes": "cluster", "timeout": "10s" });
    rig.env.run("install.component", input).await
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
            "kind Widget (example.com/v1) is not one the cluster serves",
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
        let input = json!({ "component": "catalog", "manifests": dir, "namespace": "catalog", "kubernetes": "cluster", "timeout": "10s" });
        let (run, _) = env.run_killed_after(step, "install.component", input, LIMIT).await;
        assert_eq!(run["status"], "succeeded", "killed after {step}: {run:#}");
        // Every object was applied, and those of the phases journaled as done before the kill
        // exactly once: nothing journaled as done was applied again. (A phase not yet journaled
        // may apply an object twice, should an attempt of it be retried: server-side apply is
        // safe to repeat, and that is the at-least-once a step promises until it is journaled.)
        let writes: Vec<String> = kube.writes()[before..].iter().map(|w| w.path.clone()).collect();
        let mut unique_writes = writes.clone();
        unique_writes.sort();
        unique_writes.dedup();
        let attempts: Vec<(serde_json::Value, serde_json::Value)> = run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].clone(), s["attempts"].clone()))
            .collect();
        assert_eq!(
            unique_writes.len(),
            5,
            "killed after {step}: {writes:#?}; steps and attempts: {attempts:?}"
        );
        for (done, path) in [
            (
                "apply:crds",
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com",
            ),
            ("apply:namespaces", "/api/v1/namespaces/catalog"),
        ] {
            let journaled_before_the_kill = done == "apply:crds" || step == "apply:namespaces";
            if journaled_before_the_kill {
                let n = writes.iter().filter(|w| *w == path).count();
                assert_eq!(
                    n, 1,
                    "killed after {step}: {path} applied {n} times: {writes:#?}; steps and attempts: {attempts:?}"
                );
            }
        }
    }
}

/// Version 1.5.0 of the catalog: a new image, a new field, a new ConfigMap, and no
/// `catalog-config` any more.
fn catalog_v2(image: &str) -> String {
    format!(
        "apiVersion: v1
kind: ConfigMap
metadata:
  name: catalog-flags
data:
  NEW_SEARCH: \"on\"
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: catalog-api
spec:
  replicas: 2
  minReadySeconds: 10
  selector: {{ matchLabels: {{ app: catalog-api }} }}
  template:
    metadata: {{ labels: {{ app: catalog-api }} }}
    spec:
      containers:
        - name: api
          image: {image}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: catalog-db
spec:
  replicas: 1
  serviceName: catalog-db
  selector: {{ matchLabels: {{ app: catalog-db }} }}
  template:
    metadata: {{ labels: {{ app: catalog-db }} }}
    spec:
      containers:
        - name: postgres
          image: postgres:15
"
    )
}

fn component(dir: &std::path::Path) -> serde_json::Value {
    json!({ "component": "catalog", "manifests": dir, "namespace": "catalog", "kubernetes": "cluster", "timeout": "3s" })
}

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/catalog/deployments/catalog-api";

#[tokio::test]
async fn an_upgrade_whose_new_deployment_never_becomes_ready_is_rolled_back() {
    let mut rig = rig(&[("01-namespace.yaml", NAMESPACE), ("02-app.yaml", APP)]).await;
    let installed = install(&rig).await;
    assert_eq!(installed.status, RunStatus::Succeeded, "{installed:#?}");
    let v2 = manifests(&[("02-app.yaml", &catalog_v2("registry.acme.io/catalog-api:1.5.0"))]);
    // The new version's pods crash: its rollout never completes.
    rig.kube.stall_image("registry.acme.io/catalog-api:1.5.0");
    let run = run(&rig, "upgrade.component", component(&v2)).await;

    assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
    let error = run.error.clone().unwrap();
    assert!(
        error.contains("Deployment catalog/catalog-api did not complete within 3s"),
        "{error}"
    );
    let steps: Vec<(&str, String)> = run
        .steps
        .iter()
        .map(|s| (s.name.as_str(), format!("{:?}", s.status)))
        .collect();
    assert_eq!(
        steps.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [
            "check",
            "rollback-point",
            "apply:crds",
            "apply:namespaces",
            "apply:resources",
            "wait-ready",
            "undo:rollback-point"
        ],
        "{steps:?}"
    );
    assert_eq!(steps.last().unwrap().1, "Succeeded", "{run:#?}");

    // The old version is back, healthy, and nothing of the new one is left.
    let api = rig.kube.get(DEPLOYMENT).unwrap();
    assert_eq!(
        api["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.acme.io/catalog-api:1.4.0"
    );
    assert!(api["spec"].get("minReadySeconds").is_none(), "{api:#}");
    assert_eq!(api["status"]["readyReplicas"], 2);
    assert_eq!(api["status"]["updatedReplicas"], 2);
    assert!(
        rig.kube
            .get("/api/v1/namespaces/catalog/configmaps/catalog-flags")
            .is_none()
    );
    assert!(
        rig.kube
            .get("/api/v1/namespaces/catalog/configmaps/catalog-config")
            .is_some(),
        "the old version's ConfigMap must not be pruned before the new version is healthy"
    );
    // The rollback point is kept in the cluster; the journal has only identities and versions.
    let point = &run.steps[1].output.clone().unwrap();
    let secret = point["secret"].as_str().unwrap();
    assert!(
        rig.kube
            .get(&format!("/api/v1/namespaces/catalog/secrets/{secret}"))
            .is_some()
    );
    let live = point["live"].as_array().unwrap();
    let api_entry = live.iter().find(|l| l["id"]["name"] == "catalog-api").unwrap();
    assert_eq!(api_entry["images"], json!(["registry.acme.io/catalog-api:1.4.0"]));
    rig.env.stop_workers().await;
}

#[tokio::test]
async fn a_healthy_upgrade_prunes_only_what_dayshift_applied_and_the_new_version_dropped() {
    let mut rig = rig(&[("01-namespace.yaml", NAMESPACE), ("02-app.yaml", APP)]).await;
    assert_eq!(install(&rig).await.status, RunStatus::Succeeded);
    // Someone else's ConfigMap with the component's label: not dayshift's to delete.
    rig.kube.put(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "catalog-notes", "namespace": "catalog", "labels": { "dayshift.io/component": "catalog" } },
        "data": { "owner": "team-catalog" },
    }));
    let v2 = manifests(&[("02-app.yaml", &catalog_v2("registry.acme.io/catalog-api:1.5.0"))]);
    let run = run(&rig, "upgrade.component", component(&v2)).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    let output = run.output.clone().unwrap();
    assert_eq!(output["pruned"], json!(["ConfigMap catalog/catalog-config"]));
    assert!(
        rig.kube
            .get("/api/v1/namespaces/catalog/configmaps/catalog-config")
            .is_none()
    );
    assert!(
        rig.kube
            .get("/api/v1/namespaces/catalog/configmaps/catalog-notes")
            .is_some()
    );
    let api = rig.kube.get(DEPLOYMENT).unwrap();
    assert_eq!(
        api["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.acme.io/catalog-api:1.5.0"
    );
    // Pruned only after the new version was healthy.
    let names: Vec<&str> = run.steps.iter().map(|s| s.name.as_str()).collect();
    let at = |n: &str| names.iter().position(|s| *s == n).unwrap();
    assert!(at("wait-ready") < at("prune"), "{names:?}");
    let deleted: Vec<String> = rig
        .kube
        .writes()
        .iter()
        .filter(|w| w.method == "DELETE")
        .map(|w| w.path.clone())
        .collect();
    assert_eq!(deleted, ["/api/v1/namespaces/catalog/configmaps/catalog-config"]);

    // Rollback points are kept, the newest `keep_rollback_points` of them.
    for image in ["1.5.1", "1.5.2"] {
        let v = manifests(&[(
            "02-app.yaml",
            &catalog_v2(&format!("registry.acme.io/catalog-api:{image}")),
        )]);
        let mut input = component(&v);
        input["keep_rollback_points"] = json!(2);
        let again = run_upgrade(&rig, input).await;
        assert_eq!(again.status, RunStatus::Succeeded, "{again:#?}");
    }
    let points = rig
        .kube
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE" && r.path.contains("/secrets/dayshift-rollback-catalog-"))
        .count();
    let secrets: Vec<String> = rig
        .kube
        .requests()
        .iter()
        .filter(|r| r.path.contains("secrets"))
        .map(|r| format!("{} {} {}", r.method, r.path, r.query))
        .collect();
    assert_eq!(points, 1, "three rollback points, two kept: {secrets:#?}");
    rig.env.stop_workers().await;
}

async fn run_upgrade(rig: &Rig, input: serde_json::Value) -> RunView {
    run(rig, "upgrade.component", input).await
}

#[tokio::test]
async fn a_plan_shows_what_would_change_and_changes_nothing() {
    let mut rig = rig(&[("01-namespace.yaml", NAMESPACE), ("02-app.yaml", APP)]).await;
    assert_eq!(install(&rig).await.status, RunStatus::Succeeded);
    let before = rig.kube.writes().len();
    let v2 = manifests(&[("02-app.yaml", &catalog_v2("registry.acme.io/catalog-api:1.5.0"))]);
    let mut input = component(&v2);
    input["plan"] = json!(true);
    let run = run(&rig, "upgrade.component", input).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    let plan = run.output.clone().unwrap()["plan"].clone();
    let find = |object: &str| {
        plan.as_array()
            .unwrap()
            .iter()
            .find(|c| c["object"] == object)
            .cloned()
            .unwrap_or_else(|| panic!("{object} not in {plan:#}"))
    };
    assert_eq!(find("ConfigMap catalog/catalog-flags")["action"], "create");
    assert_eq!(find("StatefulSet catalog/catalog-db")["action"], "unchanged");
    let api = find("Deployment catalog/catalog-api");
    assert_eq!(api["action"], "change");
    let fields: Vec<&str> = api["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(fields.contains(&"spec.minReadySeconds: (none) → 10"), "{fields:#?}");
    assert!(
        fields
            .iter()
            .any(|f| f.starts_with("spec.template.spec.containers:") && f.contains("catalog-api:1.5.0")),
        "{fields:#?}"
    );
    // Only dry runs were sent.
    let writes = &rig.kube.writes()[before..];
    assert!(!writes.is_empty());
    assert!(writes.iter().all(|w| w.query.contains("dryRun=All")), "{writes:#?}");
    assert_eq!(
        rig.kube.get(DEPLOYMENT).unwrap()["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.acme.io/catalog-api:1.4.0"
    );
    rig.env.stop_workers().await;
}

#[tokio::test]
async fn a_failed_backup_before_an_upgrade_leaves_the_component_untouched() {
    let mut rig = rig(&[("01-namespace.yaml", NAMESPACE), ("02-app.yaml", APP)]).await;
    assert_eq!(install(&rig).await.status, RunStatus::Succeeded);
    let before = rig.kube.writes().len();
    let v2 = manifests(&[("02-app.yaml", &catalog_v2("registry.acme.io/catalog-api:1.5.0"))]);
    let mut input = component(&v2);
    // A child that fails: a gate nobody opens.
    input["backup"] = json!({ "workflow": "gate", "input": { "timeout_ms": 10 } });
    let run = run(&rig, "upgrade.component", input).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
    assert!(
        run.error
            .clone()
            .unwrap()
            .contains("the backup before the upgrade (gate) failed"),
        "{run:#?}"
    );
    assert_eq!(rig.kube.writes().len(), before, "{:#?}", &rig.kube.writes()[before..]);
    rig.env.stop_workers().await;
}

#[tokio::test]
async fn custom_resources_jobs_and_smoke_checks_are_part_of_an_install() {
    const EXTRAS: &str = "apiVersion: example.com/v1
kind: Widget
metadata:
  name: front-page
spec: { size: 3 }
---
apiVersion: batch/v1
kind: Job
metadata:
  name: catalog-migrate
spec:
  backoffLimit: 2
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: migrate
          image: registry.acme.io/catalog-migrate:1.4.0
";
    let mut rig = rig(&[
        ("00-crd.yaml", CRD),
        ("01-namespace.yaml", NAMESPACE),
        ("02-app.yaml", APP),
        ("03-extras.yaml", EXTRAS),
    ])
    .await;
    sqlx::query("create table products (id int); insert into products values (1), (2)")
        .execute(&rig.app.pool)
        .await
        .ok();
    sqlx::raw_sql("create table products (id int); insert into products values (1), (2);")
        .execute(&rig.app.pool)
        .await
        .unwrap();
    let mut input = component(&rig.dir);
    input["smoke"] = json!([
        { "http": { "url": format!("{}/api/v1/namespaces/catalog/configmaps/catalog-config", rig.kube.url) } },
        { "sql": { "postgres": "app", "query": "select count(*) from products", "min": 1 } },
    ]);
    let ok = run(&rig, "install.component", input.clone()).await;
    assert_eq!(ok.status, RunStatus::Succeeded, "{ok:#?}");
    // The Widget's plural comes from its CRD, applied after the CRD is established.
    let widget = rig
        .kube
        .get("/apis/example.com/v1/namespaces/catalog/widgets/front-page")
        .unwrap();
    assert_eq!(widget["spec"]["size"], 3);
    assert!(ok.steps.iter().any(|s| s.name == "smoke"));

    // A smoke check that fails fails the install, saying which and why.
    input["smoke"] = json!([{ "sql": { "postgres": "app", "query": "select count(*) from products", "min": 5 } }]);
    let failed = run(&rig, "install.component", input).await;
    assert_eq!(failed.status, RunStatus::Failed);
    let error = failed.error.unwrap();
    assert!(
        error.contains("smoke check") && error.contains("select count(*) from products"),
        "{error}"
    );
    rig.env.stop_workers().await;
}

#[tokio::test]
async fn a_job_that_fails_fails_the_install_with_its_reason() {
    const JOB: &str = "apiVersion: batch/v1
kind: Job
metadata:
  name: catalog-migrate
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: migrate
          image: registry.acme.io/catalog-migrate:broken
";
    let mut rig = rig(&[("01-namespace.yaml", NAMESPACE), ("02-job.yaml", JOB)]).await;
    rig.kube.stall_image("registry.acme.io/catalog-migrate:broken");
    let run = install(&rig).await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.unwrap();
    assert!(
        error.contains(
            "Job catalog/catalog-migrate failed: Job has reached the specified backoff limit (BackoffLimitExceeded)"
        ),
        "{error}"
    );
    rig.env.stop_workers().await;
}

#[tokio::test]
async fn a_platform_installs_phase_after_phase_and_stops_at_a_failed_one() {
    let mut rig = rig(&[("00-crd.yaml", CRD), ("01-namespace.yaml", NAMESPACE)]).await;
    let core = rig.dir.clone();
    let apps = manifests(&[("02-app.yaml", APP)]);
    let platform = |apps_timeout: &str| {
        json!({ "phases": [
            { "name": "cluster-core", "components": [
                { "component": "core", "manifests": core, "namespace": "catalog", "kubernetes": "cluster" },
            ] },
            { "name": "services", "components": [
                { "component": "catalog", "manifests": apps, "namespace": "catalog", "kubernetes": "cluster", "timeout": apps_timeout },
            ] },
        ] })
    };
    let done = run(&rig, "install.platform", platform("10s")).await;
    assert_eq!(done.status, RunStatus::Succeeded, "{done:#?}");
    let steps: Vec<&str> = done.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        steps,
        [
            "phase:cluster-core",
            "install:cluster-core/core",
            "phase:services",
            "install:services/catalog"
        ]
    );
    let output = done.output.unwrap();
    assert_eq!(
        output["phases"][1]["components"][0]["applied"][1],
        "Deployment catalog/catalog-api"
    );
    // The namespace (phase 1) was applied before anything of phase 2.
    let writes: Vec<String> = rig.kube.writes().iter().map(|w| w.path.clone()).collect();
    let at = |p: &str| writes.iter().position(|w| w == p).unwrap();
    assert!(at("/api/v1/namespaces/catalog") < at(DEPLOYMENT));

    // A phase that fails says where, and what comes after it does not start.
    let mut failing = platform("2s");
    failing["phases"][0]["components"][0]["component"] = json!("core-2");
    failing["phases"]
        .as_array_mut()
        .unwrap()
        .push(json!({ "name": "monitoring", "components": [
        { "component": "never", "manifests": rig.dir, "namespace": "catalog", "kubernetes": "cluster" },
    ] }));
    rig.kube.stall_rollouts("catalog", "catalog-db");
    // A changed StatefulSet starts a new rollout, which stalls.
    let apps_v2 = manifests(&[("02-app.yaml", &APP.replace("postgres:15", "postgres:15.8"))]);
    failing["phases"][1]["components"][0]["manifests"] = json!(apps_v2);
    let failed = run(&rig, "install.platform", failing).await;
    assert_eq!(failed.status, RunStatus::Failed, "{failed:#?}");
    let error = failed.error.unwrap();
    assert!(
        error.contains("phase 2 of 3 (services): component catalog failed, so later phases were not started"),
        "{error}"
    );
    assert!(
        !failed.steps.iter().any(|s| s.name.contains("monitoring")),
        "{:#?}",
        failed.steps
    );
    rig.env.stop_workers().await;
}

#[tokio::test]
async fn kustomize_directories_and_helm_template_output_are_sources() {
    // A kustomize directory, rendered by `kubectl kustomize` (scripts/services.sh installs it).
    let mut rig = rig(&[
        ("01-namespace.yaml", NAMESPACE),
        ("02-app.yaml", APP),
        (
            "kustomization.yaml",
            "resources: [01-namespace.yaml, 02-app.yaml]\nnamePrefix: eu-\nlabels:\n  - pairs: { region: eu }\n",
        ),
    ])
    .await;
    let kustomized = install(&rig).await;
    assert_eq!(kustomized.status, RunStatus::Succeeded, "{kustomized:#?}");
    let api = rig
        .kube
        .get("/apis/apps/v1/namespaces/catalog/deployments/eu-catalog-api")
        .expect("kustomize's name prefix applied");
    assert_eq!(api["metadata"]["labels"]["region"], "eu");
    assert_eq!(api["metadata"]["labels"]["dayshift.io/component"], "catalog");

    // What `helm template` prints: one file, `# Source:` comments, empty documents.
    let helm = format!(
        "---\n# Source: catalog/templates/namespace.yaml\n{NAMESPACE}---\n# Source: catalog/templates/empty.yaml\n---\n# Source: catalog/templates/app.yaml\n{}",
        APP.replace("catalog-api", "helm-api")
    );
    let file = rig.dir.join("rendered.yaml.out");
    std::fs::write(&file, helm).unwrap();
    let helmed = run(&rig, "install.component", component(&file)).await;
    assert_eq!(helmed.status, RunStatus::Succeeded, "{helmed:#?}");
    assert!(
        rig.kube
            .get("/apis/apps/v1/namespaces/catalog/deployments/helm-api")
            .is_some()
    );

    // A kustomization that does not build is an error naming it, before anything is applied.
    let broken = manifests(&[("kustomization.yaml", "resources: [missing.yaml]\n")]);
    let before = rig.kube.writes().len();
    let failed = run(&rig, "install.component", component(&broken)).await;
    assert_eq!(failed.status, RunStatus::Failed);
    let error = failed.error.unwrap();
    assert!(
        error.contains("kubectl kustomize failed") && error.contains("missing.yaml"),
        "{error}"
    );
    assert_eq!(rig.kube.writes().len(), before);
    rig.env.stop_workers().await;
}

#[tokio::test]
async fn a_worker_killed_mid_upgrade_resumes_and_either_finishes_or_rolls_back() {
    let kube = Arc::new(KubeApi::start().await);
    let yaml = format!(
        "connections:\n  kubernetes:\n    cluster: {{ url: \"{}\" }}\n",
        kube.url
    );
    let env = dayshift_tests::BinEnv::start_with(&yaml).await;
    let cases = [
        ("rollback-point", "1.5.0", true),
        ("apply:resources", "1.5.0", true),
        ("apply:resources", "1.5.0-broken", false),
    ];
    kube.stall_image("registry.acme.io/catalog-api:1.5.0-broken");
    for (n, (step, version, healthy)) in cases.into_iter().enumerate() {
        let ns = format!("catalog-{n}");
        let v1 = manifests(&[
            ("01-namespace.yaml", &NAMESPACE.replace("catalog", &ns)),
            ("02-app.yaml", APP),
        ]);
        let v2 = manifests(&[(
            "02-app.yaml",
            &catalog_v2(&format!("registry.acme.io/catalog-api:{version}")),
        )]);
        let input = |dir: &std::path::Path| json!({ "component": format!("catalog-{n}"), "manifests": dir, "namespace": ns, "kubernetes": "cluster", "timeout": "3s" });
        let mut worker = env.start_worker().await;
        let id = env.start_run("install.component", input(&v1)).await;
        assert_eq!(env.wait_finished(&id, LIMIT).await["status"], "succeeded");
        worker.kill9().await;

        let before = kube.writes().len();
        let (run, _) = env.run_killed_after(step, "upgrade.component", input(&v2), LIMIT).await;

        let deployment = format!("/apis/apps/v1/namespaces/{ns}/deployments/catalog-api");
        let image = kube.get(&deployment).unwrap()["spec"]["template"]["spec"]["containers"][0]["image"].clone();
        if healthy {
            assert_eq!(run["status"], "succeeded", "killed after {step}: {run:#}");
            assert_eq!(image, format!("registry.acme.io/catalog-api:{version}"));
            // Nothing journaled as done was done again: each object applied and pruned once.
            let writes: Vec<String> = kube.writes()[before..]
                .iter()
                .filter(|w| !w.query.contains("dryRun") && !w.path.contains("/secrets/"))
                .map(|w| format!("{} {}", w.method, w.path))
                .collect();
            let mut unique_writes = writes.clone();
            unique_writes.sort();
            unique_writes.dedup();
            assert_eq!(writes.len(), 4, "killed after {step}: {writes:#?}");
            assert_eq!(unique_writes.len(), 4, "killed after {step}: {writes:#?}");
            assert!(
                writes.contains(&format!("DELETE /api/v1/namespaces/{ns}/configmaps/catalog-config")),
                "{writes:#?}"
            );
        } else {
            assert_eq!(run["status"], "failed", "killed after {step}: {run:#}");
            assert_eq!(
                image, "registry.acme.io/catalog-api:1.4.0",
                "killed after {step}: {run:#}"
            );
            assert!(
                kube.get(&format!("/api/v1/namespaces/{ns}/configmaps/catalog-flags"))
                    .is_none(),
                "killed after {step}: what the upgrade created is gone"
            );
        }
    }
}

#[tokio::test]
async fn secret_values_in_manifests_never_reach_the_journal() {
    const PASSWORD: &str = "hunter2-Zq8v-not-for-journals";
    let secret = |password: &str| {
        format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: catalog-db\nstringData:\n  password: {password}\n")
    };
    let mut rig = rig(&[
        ("01-namespace.yaml", NAMESPACE),
        ("02-app.yaml", APP),
        ("03-secret.yaml", &secret(PASSWORD)),
    ])
    .await;
    assert_eq!(install(&rig).await.status, RunStatus::Succeeded);
    let rotated = format!("{PASSWORD}-2");
    let v2 = manifests(&[("02-app.yaml", APP), ("03-secret.yaml", &secret(&rotated))]);
    let mut input = component(&v2);
    input["plan"] = json!(true);
    let planned = run(&rig, "upgrade.component", input).await;
    assert_eq!(planned.status, RunStatus::Succeeded, "{planned:#?}");
    let plan = planned.output.clone().unwrap()["plan"].to_string();
    assert!(plan.contains("(secret value)"), "{plan}");
    // A failed upgrade, so the rollback point is written and read back.
    rig.kube.stall_rollouts("catalog", "catalog-api");
    let v3 = manifests(&[
        ("02-app.yaml", &APP.replace("1.4.0", "1.4.1")),
        ("03-secret.yaml", &secret(&rotated)),
    ]);
    let failed = run(&rig, "upgrade.component", component(&v3)).await;
    assert_eq!(failed.status, RunStatus::Failed, "{failed:#?}");
    let secret = rig.kube.get("/api/v1/namespaces/catalog/secrets/catalog-db").unwrap();
    use base64::Engine as _;
    assert_eq!(
        secret["data"]["password"],
        base64::engine::general_purpose::STANDARD.encode(PASSWORD),
        "rolled back"
    );

    let stored = rig.env.db.dump().await;
    assert!(stored.contains("rollback-point"), "the dump has the journal");
    assert!(!stored.contains(PASSWORD), "a Secret value reached dayshift's database");
    rig.env.stop_workers().await;
}

/// A later version of the catalog: `image`, a new ConfigMap `catalog-extra`, and no
/// `catalog-flags` any more (so an upgrade to it creates, changes and prunes).
fn catalog_v3(image: &str) -> String {
    let v3 = catalog_v2(image).replacen(
        "name: catalog-flags\ndata:\n  NEW_SEARCH: \"on\"",
        "name: catalog-extra\ndata:\n  EXTRA: \"yes\"",
        1,
    );
    assert!(
        v3.contains("catalog-extra"),
        "version 2 no longer has catalog-flags: {v3}"
    );
    v3
}

#[tokio::test]
async fn an_upgrade_failing_at_any_step_leaves_the_previous_version_running() {
    let mut rig = rig(&[("01-namespace.yaml", NAMESPACE), ("02-app.yaml", APP)]).await;
    assert_eq!(install(&rig).await.status, RunStatus::Succeeded);
    rig.env.stop_workers().await;
    let kube = &rig.kube;
    // Run 0 (the one that succeeds) upgrades to version 2; every later run tries a version 3
    // of its own, which the failure must undo back to version 2.
    dayshift_tests::saga::Saga::new("upgrade.component", |i| {
        let text = match i {
            0 => catalog_v2("registry.acme.io/catalog-api:1.5.0"),
            i => catalog_v3(&format!("registry.acme.io/catalog-api:1.6.{i}")),
        };
        component(&manifests(&[("02-app.yaml", &text)]))
    })
    // Deleting old rollback points is housekeeping: the upgrade stands when it fails.
    .tolerating(["retire-rollback-points"])
    .failure_at_each_step_compensates(
        TestEnv::builder(vec![upgrade_component(connections(&rig.kube, &rig.app))]),
        // What the cluster runs: each object's identity, labels, annotations, spec and data, and
        // whether its pods are ready; not what changes on any write (resourceVersion,
        // generation, uid, managedFields). Not the rollback points either: a failed upgrade
        // keeps its own (dayshift-rollback-*), as the rollback test asserts, for a later
        // upgrade's `retire-rollback-points` to delete.
        move |_env| async move {
            kube.objects()
                .into_iter()
                .filter(|(path, _)| !path.contains("/secrets/dayshift-rollback-"))
                .map(|(path, o)| {
                    let m = &o["metadata"];
                    let s = &o["status"];
                    let seen = json!({
                        "labels": m["labels"], "annotations": m["annotations"], "spec": o["spec"],
                        "data": o["data"], "ready": [s["readyReplicas"], s["updatedReplicas"]],
                    });
                    (path, seen)
                })
                .collect::<Vec<_>>()
        },
    )
    .await;
}
