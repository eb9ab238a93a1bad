//! Each workflow file shipped in examples/workflows/, run end to end as shipped (only its
//! check intervals shortened) against the real services, and the Kubernetes stand-in where a
//! cluster is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{RunStatus, StartRun};
use dayshift_tests::{ForgeKind, ForgeServer, OwnPrometheus, TestEnv, WebhookReceiver, assert_succeeded, fast_worker};
use dayshift_workflows::Connections;
use dayshift_workflows::declarative::Definition;
use serde_json::json;

/// The example `file`, its checks paced 100 ms apart instead of 10 s, as the engine registers it
/// with `conns` (each connection known by its name).
fn example(file: &str, conns: Connections) -> dayshift_engine::WorkflowDef {
    let path = format!("{}/../examples/workflows/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("delay: 10s", "delay: 100ms")
        .replace("delay: 10m", "delay: 100ms");
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |kind: &str, keys: Vec<&String>| {
        names.insert(kind.into(), keys.into_iter().cloned().collect());
    };
    add("kubernetes", conns.kubernetes.keys().collect());
    add("notify", conns.notify.keys().collect());
    add("prometheus", conns.prometheus.keys().collect());
    add("postgres", conns.postgres.keys().collect());
    add("s3", conns.s3.keys().collect());
    add("git", conns.git.keys().collect());
    let def = Arc::new(Definition::compile(file, &text, &names).unwrap_or_else(|p| panic!("{p:#?}")));
    def.workflow(Arc::new(conns), Arc::new(names), None)
}

#[tokio::test]
async fn the_externalsecret_force_sync_example_syncs_waits_for_the_new_secret_and_restarts_its_consumers() {
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    kube.put_crd("external-secrets.io", "ExternalSecret", "externalsecrets", "v1");
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
    kube.put_crd("argoproj.io", "Application", "applications", "v1alpha1");
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

#[tokio::test]
async fn the_dump_job_example_runs_a_real_dump_in_a_job_whose_output_lands_in_seaweedfs_and_a_failed_one_fails_with_its_log()
 {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // The database dumped: a real one, with a table the dump must hold.
    let db = dayshift_tests::TestDb::new().await;
    for sql in [
        "create table orders (id int primary key, item text)",
        "insert into orders values (1, 'kettle-7731')",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    // A backup role of its own, with a password found nowhere else.
    let (role, password) = (
        format!("dumper_{}", dayshift_tests::unique()),
        format!("pw-{}", dayshift_tests::unique()),
    );
    for sql in [
        format!("create role {role} login password '{password}'"),
        format!("grant pg_read_all_data to {role}"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&db.pool).await.unwrap();
    }
    let mut url = url::Url::parse(&db.url).unwrap();
    url.set_username(&role).unwrap();
    url.set_password(Some(&password)).unwrap();
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    kube.run_jobs();
    let db_secret = |name: &str, dbname: &str| {
        json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": name, "namespace": "shop" }, "data": {
            "host": b64(url.host_str().unwrap()), "port": b64(&url.port().unwrap().to_string()),
            "username": b64(url.username()), "password": b64(url.password().unwrap()), "dbname": b64(dbname),
        } })
    };
    kube.put(db_secret("shop-db-app", url.path().trim_start_matches('/')));
    kube.put(db_secret("gone-db-app", "no_such_database"));
    let s3 = dayshift_tests::s3_test_config(None);
    kube.put(json!({ "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "backup-s3", "namespace": "shop" }, "data": {
        "access-key": b64(&s3.access_key), "secret-key": b64(&s3.secret_key),
    } }));

    let mut env = TestEnv::new(vec![example("database-dump-job.yaml", kube.connections())]).await;
    env.start_worker(fast_worker("dump-job"));
    let prefix = format!("dump-job-{}", dayshift_tests::unique());
    let input = |secret: &str| {
        json!({
            "kubernetes": "default", "namespace": "shop", "database_secret": secret, "s3_secret": "backup-s3",
            "endpoint": s3.endpoint.clone().unwrap(), "bucket": s3.bucket, "region": s3.region, "prefix": prefix,
            "image": "postgres:16",
            "dump": r#"pg_dump --host="$DB_HOST" --port="$DB_PORT" --username="$DB_USER" --no-password "$DB_NAME""#,
        })
    };
    let limit = Duration::from_secs(60);
    let run = env.run_within("backup.dump-job", input("shop-db-app"), limit).await;
    assert_succeeded(&run);
    let key = format!("{prefix}/{}.sql.gz", run.id);
    let output = run.output.clone().unwrap();
    assert_eq!(output["log"], format!("uploaded {key}\n"), "{output:#}");

    // The object is in SeaweedFS, through its S3 API: the gzipped dump, table and row included.
    let store = dayshift_workflows::adapters::s3::S3Store::new(&s3).await;
    let object = store
        .client()
        .get_object()
        .bucket(store.bucket())
        .key(&key)
        .send()
        .await
        .unwrap();
    let gz = object.body.collect().await.unwrap().into_bytes();
    let mut gunzip = std::process::Command::new("gunzip")
        .arg("-c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    gunzip.stdin.take().unwrap().write_all(&gz).unwrap();
    let sql = String::from_utf8(gunzip.wait_with_output().unwrap().stdout).unwrap();
    assert!(sql.contains("CREATE TABLE public.orders"), "{sql}");
    assert!(sql.contains("kettle-7731"), "{sql}");
    // The Job and its pod are gone; the password is nowhere in the run.
    assert!(kube.pods().is_empty(), "{:?}", kube.pods());
    let job_path = format!(
        "/apis/batch/v1/namespaces/shop/jobs/{}",
        output["job"].as_str().unwrap()
    );
    assert!(kube.get(&job_path).is_none());
    let journal = serde_json::to_string(&run).unwrap();
    assert!(!journal.contains(url.password().unwrap()), "{journal}");
    let created = kube
        .writes()
        .into_iter()
        .find(|w| w.path.ends_with(output["job"].as_str().unwrap()))
        .unwrap();
    let pod = &created.body["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false, "{pod:#}");
    assert!(!created.body.to_string().contains(url.password().unwrap()));

    // A dump that fails (its database does not exist): the run fails with the Job's log, and
    // the Job is cleaned up all the same.
    let failed = env.run_within("backup.dump-job", input("gone-db-app"), limit).await;
    assert_eq!(failed.status, RunStatus::Failed, "{failed:#?}");
    let error = failed.error.clone().unwrap_or_default();
    assert!(
        error.contains("failed (") && error.contains("no_such_database"),
        "{error}"
    );
    assert!(kube.pods().is_empty(), "{:?}", kube.pods());
    env.stop_workers().await;
}

#[test]
fn the_dump_job_example_lets_no_caller_choose_the_image_or_the_command_unless_they_are_guarded() {
    let path = format!(
        "{}/../examples/workflows/database-dump-job.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let shipped = std::fs::read_to_string(path).unwrap();
    let text = shipped
        .replace("image: { type: string, guarded: true,", "image: { type: string,")
        .replace(
            "  dump:\n    type: string\n    guarded: true\n",
            "  dump:\n    type: string\n",
        );
    assert_ne!(text, shipped);
    let names = BTreeMap::from([("kubernetes".to_string(), BTreeSet::from(["default".to_string()]))]);
    let problems = Definition::compile("dump.yaml", &text, &names).unwrap_err();
    for key in ["steps[0].with.image", "steps[0].with.env"] {
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("{key}: chooses what the action acts on"))),
            "{key}: {problems:#?}"
        );
    }
    assert_eq!(problems.len(), 2, "{problems:#?}");
}

#[tokio::test]
async fn the_app_consistent_backup_example_quiesces_backs_up_and_always_unquiesces() {
    let source = dayshift_tests::TestDb::new().await;
    sqlx::query("create table files (id int primary key)")
        .execute(&source.pool)
        .await
        .unwrap();
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    // The app's pod: its CLI writes the maintenance mode to a file (the node is this machine).
    let state = std::env::temp_dir().join(format!("dayshift-maintenance-{}", dayshift_tests::unique()));
    std::fs::create_dir_all(&state).unwrap();
    let modes = state.join("modes");
    for (name, phase) in [("nextcloud-0", "Running"), ("nextcloud-1", "Pending")] {
        kube.put(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "namespace": "nextcloud", "labels": { "app": "nextcloud" } },
            "spec": { "containers": [
                { "name": "nextcloud", "image": "nextcloud:30", "env": [{ "name": "MODES", "value": modes.display().to_string() }] },
                { "name": "cron", "image": "nextcloud:30" },
            ] },
            "status": { "phase": phase },
        }));
    }
    let store = dayshift_tests::s3_test_config(None);
    let mut conns = kube.connections();
    conns.postgres.insert("nextcloud".into(), source.url.clone());
    conns.s3.insert("backups".into(), store.clone());
    let mut broken = store.clone();
    broken.secret_key = "not-the-secret".into();
    conns.s3.insert("broken".into(), broken);
    let conns_arc = Arc::new(conns.clone());
    let mut env = TestEnv::new(vec![
        example("app-consistent-backup.yaml", conns),
        dayshift_workflows::backup_postgres(conns_arc),
    ])
    .await;
    env.start_worker(fast_worker("app-backup"));
    let prefix = format!("app-{}", dayshift_tests::unique());
    let input = |store: &str| {
        json!({
            "kubernetes": "default", "namespace": "nextcloud", "labels": "app=nextcloud", "container": "nextcloud",
            "quiesce": ["sh", "-c", "echo on >> \"$MODES\""], "unquiesce": ["sh", "-c", "echo off >> \"$MODES\""],
            "database": "nextcloud", "store": store, "prefix": prefix,
        })
    };
    let limit = Duration::from_secs(60);
    let run = env.run_within("backup.app-consistent", input("backups"), limit).await;
    assert_succeeded(&run);
    assert_eq!(std::fs::read_to_string(&modes).unwrap(), "on\noff\n");
    // In that order: quiesced, backed up (a child run), unquiesced.
    let order: Vec<&str> = run.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(order, ["quiesce", "backup", "finally:unquiesce"], "{run:#?}");
    let output = run.output.clone().unwrap();
    assert_eq!(output["quiesced_in"], "nextcloud-0");
    let key = output["backup"]["key"].as_str().unwrap().to_string();
    assert!(key.starts_with(&format!("{prefix}/")), "{output:#}");
    let stored = dayshift_workflows::adapters::s3::S3Store::new(&store)
        .await
        .list(&prefix)
        .await
        .unwrap();
    assert!(stored.iter().any(|o| o.key == key), "{stored:#?}");
    // Only the first Running pod's container was run in, with the commands given.
    assert_eq!(
        kube.execs(),
        [
            (
                "nextcloud/nextcloud-0".to_string(),
                vec!["sh".to_string(), "-c".into(), "echo on >> \"$MODES\"".into()]
            ),
            (
                "nextcloud/nextcloud-0".to_string(),
                vec!["sh".to_string(), "-c".into(), "echo off >> \"$MODES\"".into()]
            ),
        ]
    );

    // The backup fails (the store refuses the credentials): the app is unquiesced all the same.
    std::fs::remove_file(&modes).unwrap();
    let failed = env.run_within("backup.app-consistent", input("broken"), limit).await;
    assert_eq!(failed.status, RunStatus::Failed, "{failed:#?}");
    assert_eq!(std::fs::read_to_string(&modes).unwrap(), "on\noff\n");
    assert!(
        failed
            .steps
            .iter()
            .any(|s| s.name == "finally:unquiesce" && s.status == dayshift_engine::StepStatus::Succeeded),
        "{failed:#?}"
    );

    // A quiesce command that fails stops the run before the backup, and still unquiesces.
    std::fs::remove_file(&modes).unwrap();
    let mut bad = input("backups");
    bad["quiesce"] = json!(["sh", "-c", "echo 'maintenance mode is locked' >&2; exit 3"]);
    let refused = env.run_within("backup.app-consistent", bad, limit).await;
    assert_eq!(refused.status, RunStatus::Failed, "{refused:#?}");
    let error = refused.error.clone().unwrap_or_default();
    assert!(error.contains("exited 3: maintenance mode is locked"), "{error}");
    assert!(!refused.steps.iter().any(|s| s.name == "backup"), "{refused:#?}");
    assert_eq!(std::fs::read_to_string(&modes).unwrap(), "off\n");
    env.stop_workers().await;
    let _ = std::fs::remove_dir_all(&state);
}

#[tokio::test]
async fn the_certificate_guard_example_renews_what_is_not_ready_or_expiring_and_escalates_what_stays_broken() {
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    kube.put_crd("cert-manager.io", "Certificate", "certificates", "v1");
    let path = |ns: &str, name: &str| format!("/apis/cert-manager.io/v1/namespaces/{ns}/certificates/{name}");
    let stamp = |days: i64| {
        (chrono::Utc::now() + chrono::Duration::days(days))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    for (ns, name, ready, expires_in) in [
        ("shop", "web-tls", "True", 5),
        ("shop", "api-tls", "False", 40),
        ("billing", "pay-tls", "True", 60),
    ] {
        kube.put(json!({ "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
                         "metadata": { "name": name, "namespace": ns },
                         "spec": { "secretName": name, "dnsNames": [format!("{name}.example")], "issuerRef": { "name": "letsencrypt", "kind": "ClusterIssuer" } } }));
        kube.set_status(
            &path(ns, name),
            json!({ "revision": 3, "notAfter": stamp(expires_in),
                    "conditions": [{ "type": "Ready", "status": ready, "reason": if ready == "True" { "Ready" } else { "DoesNotExist" } }] }),
        );
    }
    let chat = WebhookReceiver::start().await;
    let mut conns = kube.connections();
    conns.notify.insert("ops".into(), chat.url.clone());
    let mut env = TestEnv::new(vec![example("certificate-guard.yaml", conns)]).await;
    env.start_worker(fast_worker("certs"));
    let input = json!({ "kubernetes": "default", "channel": "ops" });
    let limit = Duration::from_secs(60);
    let run = env.run_within("certificates.guard", input.clone(), limit).await;
    assert_succeeded(&run);
    assert_eq!(run.output, Some(json!({ "renewed": ["shop/api-tls", "shop/web-tls"] })));
    for name in ["web-tls", "api-tls"] {
        let c = kube.get(&path("shop", name)).unwrap();
        assert_eq!(c["status"]["revision"], 4, "{c:#}");
        assert_eq!(c["status"]["conditions"][0]["status"], "True", "{c:#}");
    }
    // The one not due was not touched.
    assert!(
        !kube.writes().iter().any(|w| w.path.contains("pay-tls")),
        "{:#?}",
        kube.writes()
    );
    let texts: Vec<String> = chat
        .received()
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(texts.len(), 1, "{texts:?}");
    assert!(
        texts[0].starts_with(
            "Renewed 2 certificate(s), all Ready again: shop/api-tls (was not Ready), shop/web-tls (expiring "
        ),
        "{texts:?}"
    );

    // Its issuer broken, a Certificate does not become Ready again: the run fails and says so.
    kube.break_certificate("shop", "api-tls");
    kube.set_status(
        &path("shop", "api-tls"),
        json!({ "revision": 4, "notAfter": stamp(90), "conditions": [{ "type": "Ready", "status": "False", "reason": "Failed" }] }),
    );
    let failed = env.run_within("certificates.guard", input, limit).await;
    assert_eq!(failed.status, RunStatus::Failed, "{failed:#?}");
    let texts: Vec<String> = chat
        .wait_for(2, limit)
        .await
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        texts[1],
        "Certificates still not Ready after a renewal by dayshift, please look at them: shop/api-tls"
    );
    env.stop_workers().await;
}

#[tokio::test]
async fn the_cnpg_backup_example_creates_a_backup_waits_for_it_and_reports_a_failed_one() {
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    kube.put_crd("postgresql.cnpg.io", "Backup", "backups", "v1");
    kube.break_cnpg_cluster("shop", "broken-db");
    let chat = WebhookReceiver::start().await;
    let mut conns = kube.connections();
    conns.notify.insert("ops".into(), chat.url.clone());
    let mut env = TestEnv::new(vec![example("cnpg-backup.yaml", conns)]).await;
    env.start_worker(fast_worker("cnpg"));
    let limit = Duration::from_secs(60);
    let input =
        |cluster: &str| json!({ "kubernetes": "default", "namespace": "shop", "cluster": cluster, "channel": "ops" });
    let run = env.run_within("backup.cnpg", input("shop-db"), limit).await;
    assert_succeeded(&run);
    let output = run.output.clone().unwrap();
    let name = output["backup"].as_str().unwrap();
    assert!(name.starts_with("shop-db-"), "{output:#}");
    let backup = kube
        .get(&format!("/apis/postgresql.cnpg.io/v1/namespaces/shop/backups/{name}"))
        .unwrap();
    assert_eq!(
        backup["spec"],
        json!({ "cluster": { "name": "shop-db" }, "method": "barmanObjectStore" })
    );
    assert_eq!(backup["metadata"]["managedFields"][0]["manager"], "dayshift");
    assert_eq!(
        chat.received()[0]["text"],
        format!(
            "CloudNativePG backup of shop/shop-db completed: {}.",
            output["id"].as_str().unwrap()
        )
    );

    let failed = env.run_within("backup.cnpg", input("broken-db"), limit).await;
    assert_eq!(failed.status, RunStatus::Failed, "{failed:#?}");
    assert!(
        failed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("status.phase is \"failed\"")),
        "{failed:#?}"
    );
    let texts = chat.wait_for(2, limit).await;
    let text = texts[1]["text"].as_str().unwrap();
    assert!(
        text.starts_with("CloudNativePG backup shop/broken-db-")
            && text.ends_with("did not complete: kubectl describe backup shows why."),
        "{text}"
    );
    env.stop_workers().await;
}

/// A values file of `env` whose image tag is `tag`, with the comments and quoting a team's
/// file has (the promotion must keep them).
fn values_file(env: &str, tag: &str) -> String {
    format!(
        "# shop in {env}: the tag is set by promotions\nimage:\n  repository: registry.acme.io/shop  # built by CI\n  tag: \"{tag}\"\nreplicas: 2\n"
    )
}

/// The promotion example's connections: the repository `infra` of `git` on `forge`, whose
/// token is `token`, and the chat webhook `ops`.
fn forge_connections(
    git: &dayshift_tests::GitServer,
    forge: &ForgeServer,
    kind: ForgeKind,
    repository: &str,
    token: &str,
    chat: &WebhookReceiver,
) -> Connections {
    let dir = std::env::temp_dir().join(format!("dayshift-forge-{}", dayshift_tests::unique()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    let config: dayshift_workflows::ConnectionsConfig = serde_saphyr::from_str(&format!(
        "git:\n  infra:\n    url: \"{}\"\n    author-email: dayshift@acme.io\n    forge: {{ kind: {}, api-url: \"{}\", repository: {repository}, token: {{ file: {} }} }}\n",
        git.url("infra"),
        kind.name(),
        forge.api_url,
        dir.join("token").display()
    ))
    .unwrap();
    let read = |src: &dayshift_workflows::SecretSource, key: &str| match &src.file {
        Some(f) => std::fs::read(f).map_err(|e| dayshift_workflows::InvalidConfig::new(key, e.to_string())),
        None => Err(dayshift_workflows::InvalidConfig::new(key, "file only here")),
    };
    let mut conns = config.resolve(dayshift_workflows::SecretReader::new(&read)).unwrap();
    conns.notify.insert("ops".into(), chat.url.clone());
    conns
}

/// The promotion example on `kind`: a pull request with a format-preserving edit on a branch
/// of its own, the base untouched until a reviewer merges it; then nothing to propose; a pull
/// request closed unmerged fails the run and says so.
async fn promote_by_pull_request_on(kind: ForgeKind) {
    let git = dayshift_tests::GitServer::start().await;
    let (staging, production) = ("envs/staging/shop/values.yaml", "envs/production/shop/values.yaml");
    git.create(
        "infra",
        "main",
        &[
            (staging, &values_file("staging", "v1.4.2")),
            (production, &values_file("production", "v1.3.0")),
        ],
    );
    let repository = if kind == ForgeKind::Gitlab {
        "platform/gitops/infra"
    } else {
        "acme/infra"
    };
    let forge = ForgeServer::start(kind, &git, "infra", repository, "forge-t0ken").await;
    let chat = WebhookReceiver::start().await;
    let conns = forge_connections(&git, &forge, kind, repository, "forge-t0ken", &chat);
    let mut env = TestEnv::new(vec![example("promote-by-pull-request.yaml", conns)]).await;
    env.start_worker(fast_worker("promote-pr"));
    let input = json!({ "application": "shop", "from": "staging", "to": "production", "repository": "infra", "channel": "ops" });
    let limit = Duration::from_secs(60);
    let main_before = git.head("infra", "main");
    let run = env
        .engine
        .start(StartRun::new("gitops.promote-by-pull-request", input.clone()))
        .await
        .unwrap();

    // The run waits for the review: one pull request, from a branch of its own, the base as it was.
    dayshift_tests::wait_for(&env.engine, run.id, limit, |r| {
        r.steps.iter().any(|s| s.name == "merged" && s.attempts >= 2)
    })
    .await;
    let pulls = forge.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:#?}");
    let pr = &pulls[0];
    assert_eq!(
        (pr.head.as_str(), pr.base.as_str(), pr.state),
        ("promote/shop-production-v1.4.2", "main", "open")
    );
    assert_eq!(pr.title, "Promote shop to production: v1.4.2");
    assert_eq!(git.head("infra", "main"), main_before, "the base was pushed to");
    assert_eq!(
        git.read("infra", &pr.head, production),
        values_file("production", "v1.4.2").trim_end()
    );
    let log = git.log("infra", &pr.head);
    assert_eq!(log[0].1, "dayshift@acme.io");
    assert!(
        log[0].2.starts_with("promote shop to production: v1.4.2"),
        "{}",
        log[0].2
    );
    assert!(
        log[0].2.contains(&format!("Dayshift-Step: {}/change", run.id)),
        "{}",
        log[0].2
    );
    let notices = chat.wait_for(1, limit).await;
    assert!(notices[0].to_string().contains("waits for review"), "{notices:#?}");

    // A reviewer merges it: the run ends with the merge commit, and production runs the tag.
    let merge = forge.merge(pr.number);
    let done = env.wait(run.id, limit).await;
    assert_succeeded(&done);
    let output = done.output.clone().unwrap();
    assert_eq!(output["tag"], "v1.4.2");
    assert_eq!(output["merge-commit"], merge.as_str());
    assert!(output["pull-request"].as_str().unwrap().ends_with("/1"), "{output:#}");
    assert_eq!(
        git.read("infra", "main", production),
        values_file("production", "v1.4.2").trim_end()
    );
    let notices = chat.wait_for(2, limit).await;
    assert!(notices[1].to_string().contains("was merged"), "{notices:#?}");

    // Promoting again proposes nothing: production runs that tag.
    let again = env
        .run_within("gitops.promote-by-pull-request", input.clone(), limit)
        .await;
    assert_succeeded(&again);
    assert_eq!(again.output.as_ref().unwrap()["changed"], false, "{again:#?}");
    assert_eq!(forge.pulls().len(), 1);

    // A new tag in staging, its pull request closed by a reviewer: the run fails and says so.
    git.push_other("infra", "main", staging, &values_file("staging", "v1.5.0"));
    let run = env
        .engine
        .start(StartRun::new("gitops.promote-by-pull-request", input))
        .await
        .unwrap();
    dayshift_tests::wait_for(&env.engine, run.id, limit, |r| {
        r.steps.iter().any(|s| s.name == "merged" && s.attempts >= 1)
    })
    .await;
    forge.close(2);
    let closed = env.wait(run.id, limit).await;
    assert_eq!(closed.status, RunStatus::Failed, "{closed:#?}");
    assert!(
        closed
            .error
            .as_deref()
            .is_some_and(|e| e.contains("closed without being merged")),
        "{closed:#?}"
    );
    let notices = chat.wait_for(4, limit).await;
    assert!(notices[3].to_string().contains("was not merged"), "{notices:#?}");
    assert_eq!(
        git.read("infra", "main", production),
        values_file("production", "v1.4.2").trim_end()
    );
    assert_eq!(forge.unauthorized(), 0);
    env.stop_workers().await;
}

#[tokio::test]
async fn the_promotion_by_pull_request_example_proposes_waits_for_the_merge_and_reports_on_github() {
    promote_by_pull_request_on(ForgeKind::Github).await;
}

#[tokio::test]
async fn the_promotion_by_pull_request_example_proposes_waits_for_the_merge_and_reports_on_gitea() {
    promote_by_pull_request_on(ForgeKind::Gitea).await;
}

#[tokio::test]
async fn the_promotion_by_pull_request_example_proposes_waits_for_the_merge_and_reports_on_gitlab() {
    promote_by_pull_request_on(ForgeKind::Gitlab).await;
}

#[tokio::test]
async fn a_forge_that_refuses_the_token_fails_the_promotion_at_once_without_the_token_in_the_error() {
    let git = dayshift_tests::GitServer::start().await;
    git.create(
        "infra",
        "main",
        &[
            ("envs/staging/shop/values.yaml", &values_file("staging", "v1.4.2")),
            ("envs/production/shop/values.yaml", &values_file("production", "v1.3.0")),
        ],
    );
    let forge = ForgeServer::start(ForgeKind::Github, &git, "infra", "acme/infra", "the-right-one").await;
    let chat = WebhookReceiver::start().await;
    let conns = forge_connections(&git, &forge, ForgeKind::Github, "acme/infra", "wr0ng-t0ken", &chat);
    let mut env = TestEnv::new(vec![example("promote-by-pull-request.yaml", conns)]).await;
    env.start_worker(fast_worker("promote-pr-401"));
    let done = env
        .run_within(
            "gitops.promote-by-pull-request",
            json!({ "application": "shop", "from": "staging", "to": "production", "repository": "infra", "channel": "ops" }),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(done.status, RunStatus::Failed, "{done:#?}");
    let pr_step = done.steps.iter().find(|s| s.name == "pr").unwrap();
    assert_eq!(pr_step.attempts, 1, "a refused token is not tried again: {pr_step:#?}");
    let error = done.error.clone().unwrap_or_default();
    assert!(error.contains("401"), "{error}");
    let journal = serde_json::to_string(&done).unwrap();
    assert!(!journal.contains("wr0ng-t0ken"), "{journal}");
    assert!(forge.pulls().is_empty());
    assert_eq!(forge.unauthorized(), 1);
    env.stop_workers().await;
}

#[test]
fn the_promotion_example_lets_no_caller_choose_the_file_or_the_branch_unless_they_are_guarded() {
    let path = format!(
        "{}/../examples/workflows/promote-by-pull-request.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let shipped = std::fs::read_to_string(path).unwrap();
    let text = shipped
        .replace("to: { type: string, guarded: true,", "to: { type: string,")
        .replace("base: { type: string, guarded: true,", "base: { type: string,");
    assert_ne!(text, shipped);
    let names = BTreeMap::from([
        ("git".to_string(), BTreeSet::from(["infra".to_string()])),
        ("notify".to_string(), BTreeSet::from(["ops".to_string()])),
    ]);
    let problems = Definition::compile("promote.yaml", &text, &names).unwrap_err();
    for key in [
        "steps[0].with.branch",
        "steps[1].with.branch",
        "steps[1].with.from",
        "steps[1].with.file",
        "steps[2].with.base",
    ] {
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("{key}: chooses what the action acts on"))),
            "{key}: {problems:#?}"
        );
    }
    assert_eq!(problems.len(), 5, "{problems:#?}");
}

#[tokio::test]
async fn the_gitops_revert_example_proposes_the_revert_of_the_commit_a_degraded_application_runs_once() {
    let git = dayshift_tests::GitServer::start().await;
    let production = "envs/production/shop/values.yaml";
    git.create("infra", "main", &[(production, &values_file("production", "v1.3.0"))]);
    let good = git.head("infra", "main");
    git.push_other("infra", "main", production, &values_file("production", "v1.4.0"));
    let bad = git.head("infra", "main");
    let forge = ForgeServer::start(ForgeKind::Github, &git, "infra", "acme/infra", "forge-t0ken").await;
    let chat = WebhookReceiver::start().await;
    let mut conns = forge_connections(&git, &forge, ForgeKind::Github, "acme/infra", "forge-t0ken", &chat);
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    kube.put_crd("argoproj.io", "Application", "applications", "v1alpha1");
    let app = "/apis/argoproj.io/v1alpha1/namespaces/argocd/applications/shop";
    kube.put(json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
        "metadata": { "name": "shop", "namespace": "argocd" },
        "spec": { "project": "default", "source": { "repoURL": git.url("infra"), "path": "envs/production/shop", "targetRevision": "main" },
                  "destination": { "server": "https://kubernetes.default.svc", "namespace": "shop" } },
    }));
    let degraded_at = |revision: &str| {
        json!({ "sync": { "status": "Synced", "revision": revision },
                "health": { "status": "Degraded", "message": "Deployment \"web\" exceeded its progress deadline" } })
    };
    kube.set_status(app, degraded_at(&bad));
    conns.kubernetes = kube.connections().kubernetes;
    let mut env = TestEnv::new(vec![example("gitops-revert.yaml", conns)]).await;
    env.start_worker(fast_worker("revert"));
    let input = json!({ "application": "shop", "kubernetes": "default", "repository": "infra", "channel": "ops" });
    let limit = Duration::from_secs(60);

    let done = env.run_within("gitops.revert-degraded", input.clone(), limit).await;
    assert_succeeded(&done);
    assert_eq!(done.output.as_ref().unwrap()["reverted"], bad.as_str());
    let pulls = forge.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:#?}");
    let branch = format!("revert/{bad}");
    assert_eq!(
        (pulls[0].head.as_str(), pulls[0].base.as_str()),
        (branch.as_str(), "main")
    );
    // The branch holds exactly what ran before the bad commit; main is as it was.
    assert_eq!(git.tree("infra", &branch), git.tree("infra", &good));
    assert_eq!(git.head("infra", "main"), bad);
    let log = git.log("infra", &branch);
    assert!(
        log[0].2.contains(&format!("This reverts commit {bad}.")),
        "{}",
        log[0].2
    );
    let notices = chat.wait_for(1, limit).await;
    assert!(notices[0].to_string().contains("waits for review"), "{notices:#?}");

    // The alert fires again before the review: the revert is there, nothing new is proposed.
    let again = env.run_within("gitops.revert-degraded", input.clone(), limit).await;
    assert_succeeded(&again);
    assert_eq!(again.output.as_ref().unwrap()["pull-request"], serde_json::Value::Null);
    assert_eq!(git.log("infra", &branch).len(), log.len());
    assert_eq!(forge.pulls().len(), 1);

    // A revision that is not a commit of the branch reverts nothing and proposes nothing.
    kube.set_status(app, degraded_at("0123456789abcdef0123456789abcdef01234567"));
    let unknown = env.run_within("gitops.revert-degraded", input, limit).await;
    assert_eq!(unknown.status, RunStatus::Failed, "{unknown:#?}");
    assert!(
        unknown
            .error
            .as_deref()
            .is_some_and(|e| e.contains("is not a commit of main")),
        "{unknown:#?}"
    );
    assert_eq!(forge.pulls().len(), 1);
    assert_eq!(chat.received().len(), 1);
    env.stop_workers().await;
}

#[tokio::test]
async fn the_missing_backup_example_proposes_a_scheduled_backup_in_the_owner_s_directory_once() {
    let git = dayshift_tests::GitServer::start().await;
    git.create(
        "infra",
        "main",
        &[(
            "apps/shop/cluster.yaml",
            "apiVersion: postgresql.cnpg.io/v1\nkind: Cluster\nmetadata:\n  name: shop-db\n",
        )],
    );
    let forge = ForgeServer::start(ForgeKind::Gitea, &git, "infra", "acme/infra", "forge-t0ken").await;
    let chat = WebhookReceiver::start().await;
    let mut conns = forge_connections(&git, &forge, ForgeKind::Gitea, "acme/infra", "forge-t0ken", &chat);
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    kube.put_crd("postgresql.cnpg.io", "Cluster", "clusters", "v1");
    kube.put_crd("postgresql.cnpg.io", "ScheduledBackup", "scheduledbackups", "v1");
    kube.put_crd("argoproj.io", "Application", "applications", "v1alpha1");
    let cluster = |ns: &str, name: &str, meta: serde_json::Value| {
        let mut metadata = json!({ "name": name, "namespace": ns });
        metadata
            .as_object_mut()
            .unwrap()
            .extend(meta.as_object().unwrap().clone());
        json!({ "apiVersion": "postgresql.cnpg.io/v1", "kind": "Cluster", "metadata": metadata, "spec": { "instances": 2 } })
    };
    // Owned through ArgoCD's tracking annotation, and no backup.
    kube.put(cluster(
        "shop",
        "shop-db",
        json!({ "annotations": { "argocd.argoproj.io/tracking-id": "shop:postgresql.cnpg.io/Cluster:shop/shop-db" } }),
    ));
    // Backed up already.
    kube.put(cluster(
        "billing",
        "billing-db",
        json!({ "labels": { "app.kubernetes.io/instance": "billing" } }),
    ));
    kube.put(json!({
        "apiVersion": "postgresql.cnpg.io/v1", "kind": "ScheduledBackup",
        "metadata": { "name": "billing-db-daily", "namespace": "billing" },
        "spec": { "schedule": "0 0 2 * * *", "cluster": { "name": "billing-db" } },
    }));
    // No owner.
    kube.put(cluster("scratch", "orphan-db", json!({})));
    kube.put(json!({
        "apiVersion": "argoproj.io/v1alpha1", "kind": "Application", "metadata": { "name": "shop", "namespace": "argocd" },
        "spec": { "project": "default", "source": { "repoURL": git.url("infra"), "path": "apps/shop", "targetRevision": "main" },
                  "destination": { "server": "https://kubernetes.default.svc", "namespace": "shop" } },
    }));
    conns.kubernetes = kube.connections().kubernetes;
    let mut env = TestEnv::new(vec![example("propose-missing-backup.yaml", conns)]).await;
    env.start_worker(fast_worker("propose"));
    let input = |ns: &str, name: &str| json!({ "cluster": name, "namespace": ns, "kubernetes": "default", "repository": "infra", "channel": "ops" });
    let limit = Duration::from_secs(60);
    let writes = kube.writes().len();

    let done = env
        .run_within("gitops.propose-missing-backup", input("shop", "shop-db"), limit)
        .await;
    assert_succeeded(&done);
    let output = done.output.clone().unwrap();
    assert_eq!(
        (output["covered"].clone(), output["owner"].clone()),
        (json!(false), json!("shop"))
    );
    let pulls = forge.pulls();
    assert_eq!(pulls.len(), 1, "{pulls:#?}");
    let branch = "dayshift/scheduled-backup-shop-shop-db";
    assert_eq!((pulls[0].head.as_str(), pulls[0].base.as_str()), (branch, "main"));
    let manifest = git.read("infra", branch, "apps/shop/shop-db-scheduled-backup.yaml");
    let parsed: serde_json::Value = serde_saphyr::from_str(&manifest).unwrap();
    assert_eq!(parsed["kind"], "ScheduledBackup");
    assert_eq!(parsed["spec"]["cluster"]["name"], "shop-db");
    assert_eq!(parsed["metadata"]["namespace"], "shop");
    // Proposed in Git only: the live cluster is not touched, and the base branch is as it was.
    assert_eq!(kube.writes().len(), writes, "{:#?}", &kube.writes()[writes..]);
    assert_eq!(git.log("infra", "main").len(), 1);
    assert!(
        chat.wait_for(1, limit).await[0]
            .to_string()
            .contains("waits for review")
    );

    // Again, the proposal still open: nothing new.
    let again = env
        .run_within("gitops.propose-missing-backup", input("shop", "shop-db"), limit)
        .await;
    assert_succeeded(&again);
    assert_eq!(forge.pulls().len(), 1);
    assert_eq!(git.log("infra", branch).len(), 2);

    // A cluster with a ScheduledBackup is covered: nothing is proposed.
    let covered = env
        .run_within("gitops.propose-missing-backup", input("billing", "billing-db"), limit)
        .await;
    assert_succeeded(&covered);
    assert_eq!(covered.output.as_ref().unwrap()["covered"], true);
    // One that no Application owns fails and says so.
    let orphan = env
        .run_within("gitops.propose-missing-backup", input("scratch", "orphan-db"), limit)
        .await;
    assert_eq!(orphan.status, RunStatus::Failed, "{orphan:#?}");
    assert!(
        orphan.error.as_deref().is_some_and(|e| e.contains("no ArgoCD owner")),
        "{orphan:#?}"
    );
    assert_eq!(forge.pulls().len(), 1);
    assert_eq!(chat.received().len(), 1);
    assert_eq!(kube.writes().len(), writes);
    env.stop_workers().await;
}
