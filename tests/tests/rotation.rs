//! rotate.postgres-password against real PostgreSQL and OpenBao, and the Kubernetes API
//! stand-in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use dayshift_engine::{FaultInjector, RunStatus, RunView};
use dayshift_tests::kube_api::KubeApi;
use dayshift_tests::{OpenBao, TestEnv, database_url, fast_worker, unique};
use dayshift_workflows::adapters::kube::KubeConfig;
use dayshift_workflows::adapters::vault::VaultConfig;
use dayshift_workflows::{Connections, rotate_kv_secret, rotate_postgres_password, rotate_vault_database_root};
use serde_json::{Value, json};
use sqlx::Connection;

const LIMIT: Duration = Duration::from_secs(120);

/// A role with a password, its KV entry on a mount of the test's own, a cluster with the copies
/// and the consumers, and dayshift.
struct Rig {
    /// dayshift in this process; absent when the test runs the binary.
    env: Option<TestEnv>,
    bao: OpenBao,
    kube: KubeApi,
    mount: String,
    roles: [String; 2],
    initial: String,
}

impl Rig {
    /// The world and an in-process dayshift with `workflow`.
    async fn new_with(workflow: fn(Arc<Connections>) -> dayshift_engine::WorkflowDef) -> Self {
        let mut rig = Self::world(false).await;
        let mut env = TestEnv::new(vec![workflow(Arc::new(rig.connections(&database_url())))]).await;
        env.start_worker(fast_worker("w"));
        rig.env = Some(env);
        rig
    }

    async fn new(dual: bool, faults: Option<FaultInjector>) -> Self {
        let mut rig = Self::world(dual).await;
        let defs = vec![rotate_postgres_password(Arc::new(rig.connections(&database_url())))];
        let mut env = TestEnv::builder(defs).worker(fast_worker("w"));
        if let Some(f) = faults {
            env = env.faults(f);
        }
        rig.env = Some(env.build().await);
        rig
    }

    /// The role, the KV entry and the cluster, without dayshift.
    async fn world(dual: bool) -> Self {
        let id = unique();
        let roles = [format!("rot_{id}_a"), format!("rot_{id}_b")];
        let initial = format!("initial-{id}");
        let admin = sqlx::PgPool::connect(&database_url()).await.unwrap();
        for role in &roles {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "create role {role} login password '{initial}'"
            )))
            .execute(&admin)
            .await
            .unwrap();
        }
        admin.close().await;

        let bao = OpenBao::shared();
        let mount = format!("kv-{id}");
        bao.bao(&["secrets", "enable", &format!("-path={mount}"), "kv-v2"])
            .await
            .unwrap();
        let seed = std::env::temp_dir().join(format!("dayshift-seed-{id}.json"));
        std::fs::write(
            &seed,
            json!({ "username": roles[0], "password": initial, "host": "db.shop.svc", "port": 5432, "options": { "sslmode": "require" } })
                .to_string(),
        )
        .unwrap();
        bao.bao(&[
            "kv",
            "put",
            &format!("-mount={mount}"),
            "shop/db",
            &format!("@{}", seed.display()),
        ])
        .await
        .unwrap();
        std::fs::remove_file(&seed).unwrap();

        let kube = KubeApi::start().await;
        let b64 = |s: &str| encode(s);
        kube.put(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "db", "namespace": "shop" },
            "data": { "username": b64(&roles[0]), "password": b64(&initial), "host": b64("db.shop.svc") },
        }));
        kube.put(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "pgbouncer", "namespace": "shop" },
            "data": { "userlist.txt": b64(&format!("\"stats\" \"s3cret\"\n\"{}\" \"{initial}\"\n", roles[0])) },
        }));
        kube.put(json!({
            "apiVersion": "external-secrets.io/v1beta1", "kind": "ExternalSecret",
            "metadata": { "name": "db", "namespace": "shop" }, "spec": { "refreshInterval": "1h" },
        }));
        kube.put(json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "api", "namespace": "shop" },
            "spec": { "replicas": 2, "template": { "metadata": { "labels": { "app": "api" } } } },
        }));
        kube.put(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": { "name": "worker", "namespace": "shop" },
            "spec": { "replicas": 1, "template": { "metadata": { "labels": { "app": "worker" } } } },
        }));

        let rig = Self {
            env: None,
            bao,
            kube,
            mount,
            roles,
            initial,
        };
        if dual {
            // Only role a is in use; role b's password is unknown to anyone.
            rig.alter_password(&rig.roles[1], &format!("unknown-{}", unique()))
                .await;
        }
        rig
    }

    /// The connections a rotation needs, as the config file would name them.
    fn connections(&self, admin_url: &str) -> Connections {
        let mut conns = Connections::default();
        conns.postgres.insert("admin".into(), admin_url.to_string());
        conns.vault.insert(
            "openbao".into(),
            VaultConfig::with_token(self.bao.addr.clone(), self.bao.token.clone()),
        );
        conns.kubernetes.insert(
            "cluster".into(),
            KubeConfig {
                url: Some(self.kube.url.clone()),
                ..KubeConfig::default()
            },
        );
        conns
    }

    fn env(&mut self) -> &mut TestEnv {
        self.env.as_mut().expect("dayshift in process")
    }

    fn input(&self, dual: bool) -> Value {
        let mut input = json!({
            "vault": "openbao", "mount": self.mount, "path": "shop/db", "admin": "admin",
            "kubernetes": "cluster",
            "secrets": [{ "namespace": "shop", "name": "db", "key": "password", "username_key": "username" }],
            "pgbouncer": [{ "namespace": "shop", "name": "pgbouncer", "key": "userlist.txt" }],
            "external_secrets": [{ "namespace": "shop", "name": "db" }],
            "restart": [
                { "kind": "Deployment", "namespace": "shop", "name": "api" },
                { "kind": "StatefulSet", "namespace": "shop", "name": "worker" },
            ],
            "rollout_timeout": "2s",
        });
        if dual {
            input["roles"] = json!(self.roles);
        } else {
            input["role"] = json!(self.roles[0]);
        }
        input
    }

    async fn run(&self, dual: bool) -> RunView {
        let env = self.env.as_ref().expect("dayshift in process");
        env.run_within("rotate.postgres-password", self.input(dual), LIMIT)
            .await
    }

    /// The KV entry's current version and data.
    async fn kv(&self) -> (u64, Value) {
        let out = self
            .bao
            .bao(&[
                "kv",
                "get",
                "-format=json",
                &format!("-mount={}", self.mount),
                "shop/db",
            ])
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        (
            v["data"]["metadata"]["version"].as_u64().unwrap(),
            v["data"]["data"].clone(),
        )
    }

    async fn custom_metadata(&self) -> Value {
        let out = self
            .bao
            .bao(&[
                "kv",
                "metadata",
                "get",
                "-format=json",
                &format!("-mount={}", self.mount),
                "shop/db",
            ])
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        v["data"]["custom_metadata"].clone()
    }

    fn secret(&self, name: &str, key: &str) -> String {
        let s = self
            .kube
            .get(&format!("/api/v1/namespaces/shop/secrets/{name}"))
            .unwrap();
        decode(s["data"][key].as_str().unwrap())
    }

    async fn alter_password(&self, role: &str, password: &str) {
        let admin = sqlx::PgPool::connect(&database_url()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("alter role {role} password '{password}'")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
    }

    /// Whatever dayshift stored, and what its API shows of the run.
    async fn everything_dayshift_kept(&self, run: &RunView) -> String {
        let mut all = self.env.as_ref().expect("dayshift in process").db.dump().await;
        all.push_str(&serde_json::to_string(run).unwrap());
        all
    }
}

/// Whether `role` logs in with `password`.
async fn logs_in(role: &str, password: &str) -> bool {
    let options: sqlx::postgres::PgConnectOptions = database_url().parse().unwrap();
    sqlx::PgConnection::connect_with(&options.username(role).password(password))
        .await
        .is_ok()
}

fn encode(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn decode(text: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(text).unwrap()).unwrap()
}

#[tokio::test]
async fn a_full_rotation_changes_the_password_everywhere_and_restarts_the_consumers() {
    let mut rig = Rig::new(false, None).await;
    let role = rig.roles[0].clone();
    let (before, _) = rig.kv().await;
    let run = rig.run(false).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");

    let (version, data) = rig.kv().await;
    assert_eq!(version, before + 1);
    let new = data["password"].as_str().unwrap().to_string();
    assert_eq!(new.len(), 32);
    assert!(new.chars().all(|c| c.is_ascii_alphanumeric()), "{new}");
    // Every other key as it was, types included.
    assert_eq!(data["username"], json!(role));
    assert_eq!(data["host"], json!("db.shop.svc"));
    assert_eq!(data["port"], json!(5432));
    assert_eq!(data["options"], json!({ "sslmode": "require" }));
    let meta = rig.custom_metadata().await;
    assert_eq!(meta["rotated-by-run"], json!(run.id.to_string()), "{meta}");
    assert!(meta["rotated-at"].as_str().unwrap().starts_with("20"), "{meta}");
    assert!(meta.get("dayshift-rotation-pending").is_none(), "{meta}");

    assert!(logs_in(&role, &new).await, "the new password does not log in");
    assert!(!logs_in(&role, &rig.initial).await, "the old password still logs in");

    assert_eq!(rig.secret("db", "password"), new);
    assert_eq!(rig.secret("db", "host"), "db.shop.svc");
    assert_eq!(
        rig.secret("pgbouncer", "userlist.txt"),
        format!("\"stats\" \"s3cret\"\n\"{role}\" \"{new}\"\n")
    );
    let es = rig
        .kube
        .get("/apis/external-secrets.io/v1beta1/namespaces/shop/externalsecrets/db")
        .unwrap();
    assert!(es["metadata"]["annotations"]["force-sync"].is_string(), "{es}");
    for path in [
        "/apis/apps/v1/namespaces/shop/deployments/api",
        "/apis/apps/v1/namespaces/shop/statefulsets/worker",
    ] {
        let w = rig.kube.get(path).unwrap();
        assert_eq!(w["metadata"]["generation"], 2, "{path} was not restarted once");
        assert!(w["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"].is_string());
    }

    // The passwords are nowhere dayshift keeps anything.
    let kept = rig.everything_dayshift_kept(&run).await;
    assert!(!kept.contains(&new), "the new password was stored");
    assert!(!kept.contains(&rig.initial), "the old password was stored");
    rig.env().stop_workers().await;
}

#[tokio::test]
async fn a_rollout_that_never_becomes_ready_puts_the_old_password_back() {
    let mut rig = Rig::new(false, None).await;
    let role = rig.roles[0].clone();
    rig.kube.stall_rollouts("shop", "worker");
    let (before, original) = rig.kv().await;
    let run = rig.run(false).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
    let error = run.error.clone().unwrap();
    assert!(
        error.contains("rollout of StatefulSet shop/worker did not complete within 2s"),
        "{error}"
    );

    // KV: the rotation's version, then the old value again as the current one.
    let (version, data) = rig.kv().await;
    assert_eq!(version, before + 2);
    assert_eq!(data, original);
    let rotated = rig
        .bao
        .bao(&[
            "kv",
            "get",
            "-format=json",
            &format!("-mount={}", rig.mount),
            &format!("-version={}", before + 1),
            "shop/db",
        ])
        .await
        .unwrap();
    let rotated: Value = serde_json::from_str(&rotated).unwrap();
    let new = rotated["data"]["data"]["password"].as_str().unwrap().to_string();
    assert!(
        logs_in(&role, &rig.initial).await,
        "the old password does not work again"
    );
    assert!(!logs_in(&role, &new).await, "the abandoned password still logs in");
    assert_eq!(rig.secret("db", "password"), rig.initial);
    assert_eq!(
        rig.secret("pgbouncer", "userlist.txt"),
        format!("\"stats\" \"s3cret\"\n\"{role}\" \"{}\"\n", rig.initial)
    );
    assert!(rig.custom_metadata().await.get("dayshift-rotation-pending").is_none());
    let kept = rig.everything_dayshift_kept(&run).await;
    assert!(
        !kept.contains(&new) && !kept.contains(&rig.initial),
        "a password was stored"
    );
    rig.env().stop_workers().await;
}

#[tokio::test]
async fn a_concurrent_kv_write_fails_the_run_and_nothing_is_overwritten() {
    // Another writer changes the entry after the run read it and before it writes.
    let cell: Arc<std::sync::OnceLock<(String, String, String)>> = Arc::new(std::sync::OnceLock::new());
    let done = Arc::new(AtomicBool::new(false));
    let (c, d) = (cell.clone(), done.clone());
    let faults: FaultInjector = Arc::new(move |_run, step| {
        if step == "write-vault" && !d.swap(true, Ordering::SeqCst) {
            let (addr, token, mount) = c.get().unwrap().clone();
            let status = std::process::Command::new(std::env::var("DAYSHIFT_BAO").unwrap())
                .args([
                    "kv",
                    "patch",
                    &format!("-mount={mount}"),
                    "shop/db",
                    "password=written-by-someone-else",
                ])
                .env("BAO_ADDR", addr)
                .env("BAO_TOKEN", token)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
        }
        None
    });
    let mut rig = Rig::new(false, Some(faults)).await;
    cell.set((rig.bao.addr.clone(), rig.bao.token.clone(), rig.mount.clone()))
        .unwrap();
    let (before, _) = rig.kv().await;
    let run = rig.run(false).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
    let error = run.error.clone().unwrap();
    assert!(
        error.contains("changed under us") && error.contains("nothing was overwritten"),
        "{error}"
    );
    let step = run.steps.iter().find(|s| s.name == "write-vault").unwrap();
    assert_eq!(step.attempts, 1, "a conflict is not retried");

    let (version, data) = rig.kv().await;
    assert_eq!(version, before + 1, "only the other writer's version");
    assert_eq!(data["password"], "written-by-someone-else");
    assert!(logs_in(&rig.roles[0], &rig.initial).await, "the role was changed");
    assert!(
        rig.kube.writes().is_empty(),
        "the cluster was touched: {:?}",
        rig.kube.writes()
    );
    assert!(rig.custom_metadata().await.get("dayshift-rotation-pending").is_none());
    rig.env().stop_workers().await;
}

#[tokio::test]
async fn with_two_roles_the_idle_role_gets_the_new_password_and_the_active_one_keeps_working() {
    let mut rig = Rig::new(true, None).await;
    let [a, b] = rig.roles.clone();
    let run = rig.run(true).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    assert_eq!(run.output.as_ref().unwrap()["role"], json!(b));
    let (_, data) = rig.kv().await;
    let new = data["password"].as_str().unwrap().to_string();
    assert_eq!(data["username"], json!(b));
    assert!(logs_in(&b, &new).await);
    assert!(
        logs_in(&a, &rig.initial).await,
        "the role in use stopped working during the rotation"
    );
    assert_eq!(rig.secret("db", "username"), b);
    assert_eq!(rig.secret("db", "password"), new);
    assert_eq!(
        rig.secret("pgbouncer", "userlist.txt"),
        format!("\"stats\" \"s3cret\"\n\"{b}\" \"{new}\"\n")
    );

    // The next rotation goes back to role a.
    let run = rig.run(true).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    let (_, data) = rig.kv().await;
    assert_eq!(data["username"], json!(a));
    assert!(logs_in(&a, data["password"].as_str().unwrap()).await);
    assert!(
        logs_in(&b, &new).await,
        "role b stopped working before its consumers moved"
    );
    rig.env().stop_workers().await;
}

/// The config of a `dayshift` process that rotates in `rig`'s world.
fn connections_yaml(rig: &Rig, dir: &std::path::Path) -> String {
    let admin = dir.join("admin-url");
    std::fs::write(&admin, database_url()).unwrap();
    let token = dir.join("vault-token");
    std::fs::write(&token, &rig.bao.token).unwrap();
    format!(
        "connections:\n  postgres:\n    admin: {{ url: {{ file: {} }} }}\n  vault:\n    openbao: {{ address: {}, token: {{ file: {} }} }}\n  kubernetes:\n    cluster: {{ url: {} }}\n",
        admin.display(),
        rig.bao.addr,
        token.display(),
        rig.kube.url
    )
}

/// SIGKILLs a real worker at step boundary `step` of a rotation (the worker stops itself there,
/// see DAYSHIFT_TEST_STOP_AFTER_STEP), lets a second worker finish the run, and returns it with
/// both workers' logs.
async fn kill_at(env: &dayshift_tests::BinEnv, rig: &Rig, step: &str) -> (Value, String) {
    env.run_killed_after(step, "rotate.postgres-password", rig.input(false), LIMIT)
        .await
}

#[tokio::test]
async fn a_worker_killed_at_each_step_boundary_leaves_a_complete_rotation() {
    let rig = Rig::world(false).await;
    let role = rig.roles[0].clone();
    let dir = std::env::temp_dir().join(format!("dayshift-rotation-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut env = dayshift_tests::BinEnv::start_with(&connections_yaml(&rig, &dir)).await;
    let mut passwords = vec![rig.initial.clone()];
    let mut logs = String::new();
    let mut api = String::new();
    for step in [
        "read-current",
        "write-vault",
        "set-role-password",
        "update-secret:shop/db/password",
        "update-pgbouncer:shop/pgbouncer/userlist.txt",
        "force-sync:shop/db",
        "restart:Deployment/shop/api",
        "restart:StatefulSet/shop/worker",
        "wait-rollout:Deployment/shop/api",
        "wait-rollout:StatefulSet/shop/worker",
        "verify-login",
        "record",
    ] {
        let (before, _) = rig.kv().await;
        let (run, log) = kill_at(&env, &rig, step).await;
        logs.push_str(&log);
        api.push_str(&run.to_string());
        assert_eq!(run["status"], "succeeded", "killed after {step}: {run:#}");
        // Fully rotated: one new KV version, its password works and is everywhere, the old one
        // no longer logs in, and the consumers were restarted once more.
        let (version, data) = rig.kv().await;
        assert_eq!(version, before + 1, "killed after {step}");
        let new = data["password"].as_str().unwrap().to_string();
        let old = passwords.last().unwrap().clone();
        assert!(
            logs_in(&role, &new).await,
            "killed after {step}: the new password does not log in"
        );
        assert!(
            !logs_in(&role, &old).await,
            "killed after {step}: the old password still logs in"
        );
        assert_eq!(rig.secret("db", "password"), new, "killed after {step}");
        assert!(rig.secret("pgbouncer", "userlist.txt").contains(&format!("\"{new}\"")));
        assert!(rig.custom_metadata().await.get("dayshift-rotation-pending").is_none());
        passwords.push(new);
    }
    let (_, list) = env.get("/api/v1/runs?limit=100").await;
    api.push_str(&list.to_string());
    let server_logs = env.server.as_ref().unwrap().logs();
    logs.push_str(&server_logs);
    let stored = env.db.dump().await;
    for p in &passwords {
        assert!(!stored.contains(p.as_str()), "a password is in dayshift's database");
        assert!(!logs.contains(p.as_str()), "a password is in the logs");
        assert!(!api.contains(p.as_str()), "a password is in the API output");
    }
    env.server.as_mut().unwrap().kill9().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_worker_killed_at_each_boundary_of_a_failing_rotation_leaves_it_fully_rolled_back() {
    let rig = Rig::world(false).await;
    let role = rig.roles[0].clone();
    rig.kube.stall_rollouts("shop", "worker");
    let dir = std::env::temp_dir().join(format!("dayshift-rotation-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut env = dayshift_tests::BinEnv::start_with(&connections_yaml(&rig, &dir)).await;
    let (_, original) = rig.kv().await;
    for step in [
        "write-vault",
        "set-role-password",
        "restart:StatefulSet/shop/worker",
        "wait-rollout:Deployment/shop/api",
        "undo:write-vault",
    ] {
        let (before, _) = rig.kv().await;
        let (run, _) = kill_at(&env, &rig, step).await;
        assert_eq!(run["status"], "failed", "killed after {step}: {run:#}");
        let error = run["error"].as_str().unwrap();
        assert!(
            error.contains("did not complete within 2s"),
            "killed after {step}: {error}"
        );
        // Fully rolled back: the KV entry as before (one version for the rotation, one for the
        // rollback), the old password works, the copies hold it.
        let (version, data) = rig.kv().await;
        assert_eq!(version, before + 2, "killed after {step}");
        assert_eq!(data, original, "killed after {step}");
        assert!(
            logs_in(&role, &rig.initial).await,
            "killed after {step}: the old password does not work"
        );
        assert_eq!(rig.secret("db", "password"), rig.initial, "killed after {step}");
        assert!(rig.custom_metadata().await.get("dayshift-rotation-pending").is_none());
    }
    env.server.as_mut().unwrap().kill9().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An API that accepts the bearer token its consumer Deployment was given: the `token` key of
/// Secret shop/api-token in the stand-in (what the restarted pods would read).
async fn token_checking_api(kube: &KubeApi, always_refuse: bool) -> (String, tokio::task::JoinHandle<()>) {
    let secret_url = format!("{}/api/v1/namespaces/shop/secrets/api-token", kube.url);
    let app = axum::Router::new().route(
        "/whoami",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let secret_url = secret_url.clone();
            async move {
                let secret: Value = reqwest::get(&secret_url).await.unwrap().json().await.unwrap();
                let token = decode(secret["data"]["token"].as_str().unwrap());
                let sent = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if !always_refuse && sent == format!("Bearer {token}") {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::UNAUTHORIZED
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/whoami", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (url, server)
}

async fn kv_secret_run(rig: &Rig, check_url: &str) -> RunView {
    rig.kube.put(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": { "name": "api-token", "namespace": "shop" },
        "data": { "token": encode("token-before") },
    }));
    rig.bao
        .bao(&[
            "kv",
            "put",
            &format!("-mount={}", rig.mount),
            "shop/api",
            "token=token-before",
            "issuer=platform",
        ])
        .await
        .unwrap();
    let input = json!({
        "vault": "openbao", "mount": rig.mount, "path": "shop/api", "key": "token",
        "generator": { "length": 48, "alphabet": "urlsafe" },
        "kubernetes": "cluster",
        "secrets": [{ "namespace": "shop", "name": "api-token", "key": "token" }],
        "restart": [{ "kind": "Deployment", "namespace": "shop", "name": "api" }],
        "rollout_timeout": "2s",
        "check": { "url": check_url },
    });
    let env = rig.env.as_ref().unwrap();
    env.run_within("rotate.kv-secret", input, LIMIT).await
}

async fn kv_entry(rig: &Rig, path: &str) -> Value {
    let out = rig
        .bao
        .bao(&["kv", "get", "-format=json", &format!("-mount={}", rig.mount), path])
        .await
        .unwrap();
    serde_json::from_str::<Value>(&out).unwrap()["data"]["data"].clone()
}

#[tokio::test]
async fn a_kv_secret_is_rotated_handed_to_its_consumer_and_checked() {
    let mut rig = Rig::new_with(rotate_kv_secret).await;
    let (url, _api) = token_checking_api(&rig.kube, false).await;
    let run = kv_secret_run(&rig, &url).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    let data = kv_entry(&rig, "shop/api").await;
    let token = data["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 48);
    assert_ne!(token, "token-before");
    assert_eq!(data["issuer"], "platform");
    assert_eq!(rig.secret("api-token", "token"), token);
    assert!(run.steps.iter().any(|s| s.name == "verify-http"), "{run:#?}");
    let kept = rig.everything_dayshift_kept(&run).await;
    assert!(!kept.contains(&token), "the token was stored");
    rig.env().stop_workers().await;
}

#[tokio::test]
async fn a_kv_secret_whose_check_fails_is_put_back() {
    let mut rig = Rig::new_with(rotate_kv_secret).await;
    let (url, _api) = token_checking_api(&rig.kube, true).await;
    let run = kv_secret_run(&rig, &url).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
    assert!(
        run.error.as_deref().unwrap().contains("answered 401, expected 200"),
        "{run:#?}"
    );
    let data = kv_entry(&rig, "shop/api").await;
    assert_eq!(data, json!({ "token": "token-before", "issuer": "platform" }));
    assert_eq!(rig.secret("api-token", "token"), "token-before");
    rig.env().stop_workers().await;
}

#[tokio::test]
async fn vaults_database_root_credential_is_rotated_and_still_issues_credentials() {
    let id = unique();
    let root = format!("rot_{id}_vroot");
    let root_password = format!("root-{id}");
    let admin = sqlx::PgPool::connect(&database_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "create role {root} login createrole password '{root_password}'"
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    let bao = OpenBao::shared();
    let mount = format!("db-{id}");
    bao.bao(&["secrets", "enable", &format!("-path={mount}"), "database"])
        .await
        .unwrap();
    let port = std::env::var("DAYSHIFT_PG_PORT").unwrap();
    bao.bao(&[
        "write",
        &format!("{mount}/config/app"),
        "plugin_name=postgresql-database-plugin",
        &format!(
            "connection_url=postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{port}/dayshift?sslmode=disable"
        ),
        &format!("username={root}"),
        &format!("password={root_password}"),
        "allowed_roles=reader",
    ])
    .await
    .unwrap();
    bao.bao(&[
        "write",
        &format!("{mount}/roles/reader"),
        "db_name=app",
        "creation_statements=CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
        "revocation_statements=DROP ROLE IF EXISTS \"{{name}}\";",
        "default_ttl=5m",
    ])
    .await
    .unwrap();

    let mut conns = Connections::default();
    conns.vault.insert(
        "openbao".into(),
        VaultConfig::with_token(bao.addr.clone(), bao.token.clone()),
    );
    let mut env = TestEnv::new(vec![rotate_vault_database_root(Arc::new(conns))]).await;
    env.start_worker(fast_worker("w"));
    assert!(logs_in(&root, &root_password).await);
    let run = env
        .run_within(
            "rotate.vault-database-root",
            json!({ "vault": "openbao", "mount": mount, "connection": "app", "verify_role": "reader" }),
            LIMIT,
        )
        .await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    assert!(
        !logs_in(&root, &root_password).await,
        "the old root password still logs in"
    );
    assert!(run.steps.iter().any(|s| s.name == "verify-credentials"));
    env.stop_workers().await;
}

#[tokio::test]
async fn plan_mode_says_what_would_change_and_changes_nothing() {
    let mut rig = Rig::new(false, None).await;
    let (before, original) = rig.kv().await;
    let mut input = rig.input(false);
    input["plan"] = json!(true);
    let env = rig.env.as_ref().unwrap();
    let run = env.run_within("rotate.postgres-password", input, LIMIT).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    let changes: Vec<String> = serde_json::from_value(run.output.clone().unwrap()["would_change"].clone()).unwrap();
    assert_eq!(changes.len(), 7, "{changes:#?}");
    assert!(changes[0].contains(&format!(
        "as version {} (check-and-set on version {before})",
        before + 1
    )));
    assert!(changes[1].contains(&format!("set the password of role {}", rig.roles[0])));
    assert!(changes[6].contains("restart StatefulSet shop/worker"), "{changes:#?}");
    assert_eq!(rig.kv().await, (before, original));
    assert!(logs_in(&rig.roles[0], &rig.initial).await);
    assert!(rig.kube.writes().is_empty(), "{:?}", rig.kube.writes());
    rig.env().stop_workers().await;
}

#[tokio::test]
async fn a_rotation_failing_at_any_step_leaves_the_old_password_working_everywhere() {
    let rig = Rig::world(false).await;
    let defs = vec![rotate_postgres_password(Arc::new(rig.connections(&database_url())))];
    let r = &rig;
    dayshift_tests::saga::failure_at_each_step_compensates(
        TestEnv::builder(defs),
        "rotate.postgres-password",
        rig.input(false),
        // What the role's users see: the KV entry's data and metadata, whether its password logs
        // in, and the copies in the cluster. Not the KV version (a rollback writes the old value
        // as a new version, as the existing rollback test asserts), not the role's SCRAM verifier
        // (setting the old password again salts it anew), and not the consumers' restart and
        // force-sync annotations (a rollback restarts them again so they read the old password).
        move |_env| async move {
            let (_, data) = r.kv().await;
            let password = data["password"].as_str().unwrap().to_string();
            (
                logs_in(&r.roles[0], &password).await,
                data,
                r.custom_metadata().await,
                r.secret("db", "username"),
                r.secret("db", "password"),
                r.secret("pgbouncer", "userlist.txt"),
            )
        },
    )
    .await;
}
