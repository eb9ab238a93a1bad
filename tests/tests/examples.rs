//! Each workflow file shipped in examples/workflows/, run end to end as shipped (only its
//! check intervals shortened) against the real services, and the Kubernetes stand-in where a
//! cluster is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{RunStatus, StartRun};
use dayshift_tests::{OwnPrometheus, TestEnv, WebhookReceiver, assert_succeeded, fast_worker};
use dayshift_workflows::Connections;
use dayshift_workflows::declarative::Definition;
use serde_json::json;

/// The example `file`, its checks paced 100 ms apart instead of 10 s, as the engine registers it
/// with `conns` (each connection known by its name).
fn example(file: &str, conns: Connections) -> dayshift_engine::WorkflowDef {
    let path = format!("{}/../examples/workflows/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("delay: 10s", "delay: 100ms");
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |kind: &str, keys: Vec<&String>| {
        names.insert(kind.into(), keys.into_iter().cloned().collect());
    };
    add("kubernetes", conns.kubernetes.keys().collect());
    add("notify", conns.notify.keys().collect());
    add("prometheus", conns.prometheus.keys().collect());
    add("postgres", conns.postgres.keys().collect());
    add("s3", conns.s3.keys().collect());
    let def = Arc::new(Definition::compile(file, &text, &names).unwrap_or_else(|p| panic!("{p:#?}")));
    def.workflow(Arc::new(conns), Arc::new(names), None)
}

#[tokio::test]
async fn the_externalsecret_force_sync_example_syncs_waits_for_the_new_secret_and_restarts_its_consumers() {
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    kube.put(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": { "name": "externalsecrets.external-secrets.io" },
        "spec": { "group": "external-secrets.io", "scope": "Namespaced",
                  "names": { "kind": "ExternalSecret", "plural": "externalsecrets" },
                  "versions": [{ "name": "v1", "served": true, "storage": true }] },
    }));
    let es_path = "/apis/external-secrets.io/v1/namespaces/shop/externalsecrets/shop-db";
    kube.put(json!({
        "apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
        "metadata": { "name": "shop-db", "namespace": "shop" },
        "spec": { "target": { "name": "shop-db-credentials" } },
    }));
    kube.set_status(
        es_path,
        json!({ "conditions": [{ "type": "Ready", "status": "True", "reason": "SecretSynced" }] }),
    );
    let secret = |password: &str| {
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "shop-db-credentials", "namespace": "shop" },
                "data": { "password": password } })
    };
    kube.put(secret("b2xk"));
    for name in ["web", "worker"] {
        kube.put(json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": name, "namespace": "shop" },
            "spec": { "replicas": 1, "selector": { "matchLabels": { "app": name } },
                      "template": { "metadata": { "labels": { "app": name } }, "spec": { "containers": [] } } },
        }));
    }
    // The example as shipped, its checks paced for a test (10 s apart in the file).
    let workflow = example("externalsecret-force-sync.yaml", kube.connections());
    let mut env = TestEnv::new(vec![workflow]).await;
    env.start_worker(fast_worker("force-sync"));
    let run = env
        .engine
        .start(StartRun::new(
            "secrets.force-sync",
            json!({ "kubernetes": "default", "namespace": "shop", "external_secret": "shop-db", "consumers": ["web", "worker"] }),
        ))
        .await
        .unwrap();
    let limit = Duration::from_secs(30);
    // The ExternalSecret is Ready, but the Secret has not changed yet: the run keeps checking.
    dayshift_tests::wait_for(&env.engine, run.id, limit, |r| {
        r.steps.iter().any(|s| s.name == "secret_changed" && s.attempts >= 2)
    })
    .await;
    let es = kube.get(es_path).unwrap();
    let stamp = es["metadata"]["annotations"]["force-sync"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(stamp.starts_with("dayshift-"), "{es:#}");
    let before_restart = kube.get("/apis/apps/v1/namespaces/shop/deployments/web").unwrap();
    assert!(
        before_restart["spec"]["template"]["metadata"]["annotations"].is_null(),
        "restarted before the Secret changed"
    );
    // The operator writes the new value.
    kube.put(secret("bmV3"));
    let done = env.wait(run.id, limit).await;
    assert_succeeded(&done);
    assert_eq!(
        done.output,
        Some(json!({
            "secret": "shop-db-credentials",
            "restarted": ["Deployment shop/web", "Deployment shop/worker"],
        }))
    );
    for name in ["web", "worker"] {
        let d = kube
            .get(&format!("/apis/apps/v1/namespaces/shop/deployments/{name}"))
            .unwrap();
        assert!(
            d["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"].is_string(),
            "{d:#}"
        );
    }

    // Without the ExternalSecret, the run fails at its check and restarts nothing.
    let writes = kube.writes().len();
    let missing = env
        .run_within(
            "secrets.force-sync",
            json!({ "kubernetes": "default", "namespace": "shop", "external_secret": "nope", "consumers": ["web"] }),
            limit,
        )
        .await;
    assert_eq!(missing.status, RunStatus::Failed, "{missing:#?}");
    assert!(
        missing
            .error
            .as_deref()
            .is_some_and(|e| e.contains("no ExternalSecret shop/nope")),
        "{missing:#?}"
    );
    assert_eq!(kube.writes().len(), writes, "{:#?}", &kube.writes()[writes..]);
    env.stop_workers().await;
}

#[tokio::test]
async fn the_daily_digest_example_posts_what_prometheus_and_the_cluster_say_in_one_notice() {
    let prometheus = OwnPrometheus::start(
        "groups:\n  - name: digest\n    rules:\n      - alert: DiskFilling\n        expr: vector(1)\n        \
         labels: { severity: warning }\n      - alert: BackupStale\n        expr: vector(1)\n",
    )
    .await
    .unwrap();
    let limit = Duration::from_secs(60);
    prometheus
        .wait_for_series(r#"ALERTS{alertstate="firing"}"#, 2, limit)
        .await
        .unwrap();
    prometheus.wait_for_series("up == 0", 1, limit).await.unwrap();
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    let ready = |name: &str, status: &str| {
        json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": name },
                "status": { "conditions": [{ "type": "Ready", "status": status }] } })
    };
    kube.put(ready("node-1", "True"));
    kube.put(ready("node-2", "False"));
    kube.put(json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node-3" } }));
    for (ns, name, phase) in [
        ("shop", "web", Some("Running")),
        ("shop", "db-0", Some("Pending")),
        ("jobs", "report", Some("Succeeded")),
        ("jobs", "new", None),
    ] {
        let mut pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name, "namespace": ns } });
        if let Some(phase) = phase {
            pod["status"] = json!({ "phase": phase });
        }
        kube.put(pod);
    }
    let chat = WebhookReceiver::start().await;
    let mut conns = kube.connections();
    conns.notify.insert("ops".into(), chat.url.clone());
    conns.prometheus.insert(
        "monitoring".into(),
        dayshift_workflows::adapters::prometheus::PrometheusConfig {
            url: prometheus.url.clone(),
            token: None,
        },
    );
    let mut env = TestEnv::new(vec![example("daily-digest.yaml", conns)]).await;
    env.start_worker(fast_worker("digest"));
    let input = json!({ "prometheus": "monitoring", "kubernetes": "default", "channel": "ops" });
    let run = env.run_within("report.daily-digest", input, limit).await;
    assert_succeeded(&run);
    let notices = chat.received();
    assert_eq!(notices.len(), 1, "{notices:#?}");
    let down = run.output.as_ref().unwrap()["down"][0].as_str().unwrap().to_string();
    assert!(down.starts_with("absent 127.0.0.1:"), "{down}");
    assert_eq!(
        notices[0]["text"],
        format!(
            "**Daily digest**\nAlerts firing: BackupStale, DiskFilling (warning)\nTargets down: {down}\n\
             Nodes not Ready: node-2, node-3\nPods not running: jobs/new (no phase), shop/db-0 (Pending)"
        )
    );
    // A Prometheus that is not there: the run is retried, not failed at once, and nothing is posted.
    drop(prometheus);
    let run = env
        .engine
        .start(StartRun::new(
            "report.daily-digest",
            json!({ "prometheus": "monitoring", "kubernetes": "default", "channel": "ops" }),
        ))
        .await
        .unwrap();
    dayshift_tests::wait_for(&env.engine, run.id, limit, |r| {
        r.steps.iter().any(|s| s.name == "firing" && s.attempts >= 2)
    })
    .await;
    let r = env.engine.get_run(run.id).await.unwrap();
    assert_ne!(r.status, RunStatus::Succeeded);
    assert_eq!(chat.received().len(), 1);
    env.stop_workers().await;
}

/// The example `file` as shipped, its checks paced 100 ms apart, written alone into a new
/// directory for `dayshift serve` to load; the directory.
fn example_dir(file: &str) -> std::path::PathBuf {
    let path = format!("{}/../examples/workflows/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("delay: 10s", "delay: 100ms");
    let dir = std::env::temp_dir().join(format!("dayshift-example-{}", dayshift_tests::unique()));
    std::fs::create_dir_all(dir.join("wf")).unwrap();
    std::fs::write(dir.join("wf").join(file), text).unwrap();
    dir
}

#[tokio::test]
async fn the_argocd_example_syncs_a_degraded_application_a_real_alertmanager_reports_and_escalates_one_that_stays_so() {
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    kube.put(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": { "name": "applications.argoproj.io" },
        "spec": { "group": "argoproj.io", "scope": "Namespaced",
                  "names": { "kind": "Application", "plural": "applications" },
                  "versions": [{ "name": "v1alpha1", "served": true, "storage": true }] },
    }));
    let app_path = |name: &str| format!("/apis/argoproj.io/v1alpha1/namespaces/argocd/applications/{name}");
    for name in ["shop", "billing", "payments"] {
        kube.put(json!({
            "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": { "name": name, "namespace": "argocd" },
            "spec": { "project": "default", "source": { "repoURL": "https://git.example/infra", "path": name, "targetRevision": "main" },
                      "destination": { "server": "https://kubernetes.default.svc", "namespace": name } },
        }));
        kube.set_status(
            &app_path(name),
            json!({ "sync": { "status": "OutOfSync", "revision": "0a1b" },
                    "health": { "status": "Degraded", "message": "Deployment \"web\" exceeded its progress deadline" } }),
        );
    }
    kube.break_application("argocd", "billing");

    let chat = WebhookReceiver::start().await;
    let dir = example_dir("argocd-degraded-sync.yaml");
    std::fs::write(dir.join("chat-url"), &chat.url).unwrap();
    std::fs::write(dir.join("token"), "am token\n").unwrap();
    let d = dir.display();
    let env = dayshift_tests::BinEnv::start_with(&format!(
        r#"workflows:
  dirs: [{d}/wf]
connections:
  notify:
    ops: {{ url: {{ file: {d}/chat-url }} }}
  kubernetes:
    prod: {{ url: "{}" }}
alertmanager:
  token: {{ file: {d}/token }}
  routes:
    - name: argocd-degraded
      matchers: ['alertname="ArgoCDAppDegraded"', 'name=~"shop|billing"']
      workflow: argocd.remediate-degraded
      input: {{ application: "{{{{ labels.name }}}}", kubernetes: prod, channel: ops }}
      guardrails: {{ target: [name], cooldown: 30m, max-runs: 10, window: 1h }}
"#,
        kube.url
    ))
    .await;
    let _worker = env.start_worker().await;
    let am = dayshift_tests::OwnAlertmanager::start(&format!("{}/hooks/alertmanager", env.api), "am token")
        .await
        .unwrap();
    let started = chrono::Utc::now() - chrono::Duration::seconds(30);
    let alert = |name: &str| {
        json!({
            "labels": { "alertname": "ArgoCDAppDegraded", "name": name, "namespace": "argocd", "health_status": "Degraded" },
            "annotations": { "summary": format!("{name} is Degraded") },
            "startsAt": started.to_rfc3339(), "generatorURL": "http://prometheus.example/graph",
        })
    };
    am.post_alerts(&json!([alert("shop"), alert("billing"), alert("payments")]))
        .await
        .unwrap();

    // Both runs end: shop synced and healthy, billing synced but still Degraded.
    let limit = Duration::from_secs(60);
    let deadline = tokio::time::Instant::now() + limit;
    let runs: Vec<(String, String)> = loop {
        let runs: Vec<(String, String)> = sqlx::query_as(
            "select input->>'application', status from runs where workflow = 'argocd.remediate-degraded' \
             and status in ('succeeded', 'failed') order by 1",
        )
        .fetch_all(&env.db.pool)
        .await
        .unwrap();
        if runs.len() == 2 {
            break runs;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {runs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        runs,
        [
            ("billing".to_string(), "failed".to_string()),
            ("shop".into(), "succeeded".into())
        ]
    );
    let shop = kube.get(&app_path("shop")).unwrap();
    assert_eq!(shop["status"]["health"]["status"], "Healthy");
    assert_eq!(
        shop["status"]["operationState"]["operation"]["initiatedBy"]["username"],
        "dayshift"
    );
    let texts: BTreeSet<String> = chat
        .wait_for(2, limit)
        .await
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        texts,
        BTreeSet::from([
            "ArgoCD Application billing is still not healthy after a sync by dayshift (it was Degraded): please look at it."
                .to_string(),
            "ArgoCD Application shop was Degraded; dayshift synced it and it is Synced and Healthy again.".into(),
        ])
    );
    // The alert about an Application the route does not name started nothing and changed nothing.
    let payments = kube.get(&app_path("payments")).unwrap();
    assert!(payments["status"]["operationState"].is_null(), "{payments:#}");
    assert!(
        !kube.writes().iter().any(|w| w.path.ends_with("/payments")),
        "{:#?}",
        kube.writes()
    );
    // Alertmanager keeps repeating the firing alerts; each episode still has its one run.
    let count: i64 = sqlx::query_scalar("select count(*) from runs where workflow = 'argocd.remediate-degraded'")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
}
