//! Test harness for dayshift's end-to-end tests, against real PostgreSQL and Redis.
//!
//! The services come from `scripts/services.sh`, which exports `DAYSHIFT_DATABASE_URL` and
//! `DAYSHIFT_REDIS_URL`; a test whose service is missing fails, it does not skip. Each test
//! gets its own database (created and migrated here) and its own Redis queue name, so tests run
//! in parallel without seeing each other.

pub mod browser;
pub mod kube_api;
pub mod saga;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dayshift_engine::{
    Engine, PgStore, QueueConfig, RedisQueue, RunId, RunStatus, RunView, Worker, WorkerConfig, WorkflowDef,
};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// The PostgreSQL server URL from the environment (the services script's).
pub fn database_url() -> String {
    std::env::var("DAYSHIFT_DATABASE_URL")
        .expect("DAYSHIFT_DATABASE_URL is not set: run `scripts/services.sh up` and `source .dayshift/env`")
}

/// The Redis URL from the environment (the services script's).
pub fn redis_url() -> String {
    std::env::var("DAYSHIFT_REDIS_URL")
        .expect("DAYSHIFT_REDIS_URL is not set: run `scripts/services.sh up` and `source .dayshift/env`")
}

/// A short unique suffix.
pub fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// A database of its own, migrated.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    /// Creates `dayshift_test_<unique>` and applies the migrations.
    pub async fn new() -> Self {
        let db = Self::create(30).await;
        PgStore::new(db.pool.clone()).migrate().await.expect("migrate");
        db
    }

    /// A database of its own with nothing in it (a backup's source or restore target).
    pub async fn empty() -> Self {
        Self::create(5).await
    }

    async fn create(max_connections: u32) -> Self {
        let server = database_url();
        let name = format!("dayshift_test_{}", unique());
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&server)
            .await
            .expect("cannot connect to PostgreSQL; is `scripts/services.sh up` running?");
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let url = replace_db(&server, &name);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .connect(&url)
            .await
            .expect("connect to test database");
        Self { url, pool }
    }

    /// A checksum of every row of every table in `public`, by table.
    pub async fn table_checksums(&self) -> Vec<(String, String)> {
        let tables: Vec<String> = sqlx::query_scalar(
            "select table_name::text from information_schema.tables where table_schema = 'public' order by 1",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let mut out = Vec::new();
        for t in tables {
            let sum: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "select md5(string_agg(x.r, ',' order by x.r)) from (select t::text as r from \"{t}\" t) x"
            )))
            .fetch_one(&self.pool)
            .await
            .unwrap();
            out.push((t, sum.unwrap_or_default()));
        }
        out
    }

    /// Every row of every dayshift table, as text: for checking what was stored.
    pub async fn dump(&self) -> String {
        let tables: Vec<String> =
            sqlx::query_scalar("select table_name::text from information_schema.tables where table_schema = 'public'")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let mut out = String::new();
        for t in tables {
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "select row_to_json(t)::text from \"{t}\" t"
            )))
            .fetch_all(&self.pool)
            .await
            .unwrap();
            for r in rows {
                out.push_str(&t);
                out.push(' ');
                out.push_str(&r);
                out.push('\n');
            }
        }
        out
    }

    /// Counts rows of a side-effect table per (run, step).
    pub async fn side_effects(&self, table: &str) -> Vec<(String, String, i64)> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "select run_id, step, count(*) from {table} group by run_id, step order by run_id, step"
        )))
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default()
    }
}

fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// The shared test bucket of the local SeaweedFS (tests keep to key prefixes of their own; a
/// bucket per test would use up its volumes). `secret` replaces the secret key, to test refusal.
pub fn s3_test_config(secret: Option<&str>) -> dayshift_workflows::adapters::s3::S3Config {
    let env = |k: &str| {
        std::env::var(k)
            .unwrap_or_else(|_| panic!("{k} is not set: run `scripts/services.sh up` and source .dayshift/env"))
    };
    dayshift_workflows::adapters::s3::S3Config {
        endpoint: Some(env("DAYSHIFT_S3_ENDPOINT")),
        region: env("DAYSHIFT_S3_REGION"),
        bucket: "dayshift-test".into(),
        access_key: env("DAYSHIFT_S3_ACCESS_KEY"),
        secret_key: secret
            .map(str::to_string)
            .unwrap_or_else(|| env("DAYSHIFT_S3_SECRET_KEY")),
        path_style: true,
    }
}

/// Fast settings for tests: short leases, frequent sweeps.
pub fn fast_worker(name: &str) -> WorkerConfig {
    WorkerConfig {
        name: Some(format!("{name}-{}", unique())),
        concurrency: 16,
        lease_ttl: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(300),
        metrics_listen: None,
    }
}

/// A `policy:` section that lets API callers give any value to every guarded input field of
/// every built-in workflow, as a platform's config would list its own targets. Tests of other
/// behaviour start their runs through the API with it; the trust tests (`tests/trust.rs`) and
/// any config that has a `policy:` of its own get none.
pub fn open_policy_yaml() -> String {
    let defs = dayshift_workflows::all(PgPool::connect_lazy("postgres://unused/unused").expect("a lazy pool"));
    let mut fields: Vec<String> = defs
        .iter()
        .flat_map(|d| d.guards().map(str::to_string).collect::<Vec<_>>())
        .collect();
    fields.sort();
    fields.dedup();
    let mut yaml = String::from("policy:\n  workflows:\n    \"*\":\n      inputs:\n");
    for f in fields {
        yaml.push_str(&format!("        \"{f}\": [\"*\"]\n"));
    }
    yaml
}

/// An engine in this process, on a database and queue of its own.
pub struct TestEnv {
    pub db: TestDb,
    pub queue_name: String,
    pub redis_url: String,
    pub engine: Engine,
    workers: Vec<(CancellationToken, tokio::task::JoinHandle<()>)>,
    defs: Vec<WorkflowDef>,
    schedules: Vec<dayshift_engine::Schedule>,
}

impl TestEnv {
    /// A fresh database and queue, the built-in workflows and `defs`.
    pub async fn new(defs: Vec<WorkflowDef>) -> Self {
        Self::with_redis(defs, &redis_url()).await
    }

    /// Same, on another Redis.
    pub async fn with_redis(defs: Vec<WorkflowDef>, redis_url: &str) -> Self {
        Self::build(defs, redis_url, None).await
    }

    /// Same, with injected step failures.
    pub async fn with_faults(defs: Vec<WorkflowDef>, faults: dayshift_engine::FaultInjector) -> Self {
        Self::build(defs, &redis_url(), Some(faults)).await
    }

    /// Same, with cron schedules.
    pub async fn with_schedules(defs: Vec<WorkflowDef>, schedules: Vec<dayshift_engine::Schedule>) -> Self {
        let mut env = Self::build(defs, &redis_url(), None).await;
        env.schedules = schedules;
        env
    }

    async fn build(defs: Vec<WorkflowDef>, redis_url: &str, faults: Option<dayshift_engine::FaultInjector>) -> Self {
        let db = TestDb::new().await;
        let queue_name = format!("dayshift:test:{}", unique());
        let engine = build_engine(&db, &queue_name, redis_url, &defs, faults).await;
        Self {
            db,
            queue_name,
            redis_url: redis_url.to_string(),
            engine,
            workers: Vec::new(),
            defs,
            schedules: Vec::new(),
        }
    }

    /// Another engine on the same database and queue, with other workflow definitions (as a
    /// new release of the code would be).
    pub async fn engine_with(&self, defs: Vec<WorkflowDef>) -> Engine {
        build_engine(&self.db, &self.queue_name, &self.redis_url, &defs, None).await
    }

    /// Starts an in-process worker on this env's engine.
    pub fn start_worker(&mut self, config: WorkerConfig) {
        let engine = self.engine.clone();
        self.start_worker_on(engine, config);
    }

    /// Starts an in-process worker on `engine`.
    pub fn start_worker_on(&mut self, engine: Engine, config: WorkerConfig) {
        let token = CancellationToken::new();
        let t = token.clone();
        let handle = tokio::spawn(async move {
            Worker::new(engine.core(), config).run(t).await.expect("worker failed");
        });
        self.workers.push((token, handle));
    }

    /// Stops every in-process worker (gracefully).
    pub async fn stop_workers(&mut self) {
        for (token, handle) in self.workers.drain(..) {
            token.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
        }
    }

    /// GETs `path` from the HTTP API of this env's engine (served for the call), with a viewer
    /// token; status and body.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = self.api().router(dayshift_engine::api::Limits::default());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let viewer = dayshift_engine::api::auth::create_token(
            &self.db.pool,
            &format!("test-viewer-{}", unique()),
            dayshift_engine::api::auth::Role::Viewer,
            None,
            "test",
        )
        .await
        .unwrap();
        let response = dayshift_workflows::adapters::http::client()
            .get(format!("{base}{path}"))
            .bearer_auth(viewer)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        server.abort();
        (status, text)
    }

    /// The API's state over this env's engine, with its schedules.
    pub fn api(&self) -> dayshift_engine::api::Api {
        dayshift_engine::api::Api::builder(self.engine.clone())
            .schedules(self.schedules.clone())
            .build()
    }

    /// The scheduler of this env's schedules.
    pub fn scheduler(&self) -> dayshift_engine::Scheduler {
        self.api().scheduler().clone()
    }

    /// The workflow definitions given to `new`.
    pub fn defs(&self) -> &[WorkflowDef] {
        &self.defs
    }

    /// Waits until the run is over (at most `limit`), and returns it.
    pub async fn wait(&self, id: RunId, limit: Duration) -> RunView {
        wait_for(&self.engine, id, limit, |r| r.status.is_terminal()).await
    }
}

async fn build_engine(
    db: &TestDb,
    queue_name: &str,
    redis_url: &str,
    defs: &[WorkflowDef],
    faults: Option<dayshift_engine::FaultInjector>,
) -> Engine {
    let queue = RedisQueue::connect(
        redis_url,
        QueueConfig {
            name: queue_name.to_string(),
            ..QueueConfig::default()
        },
    )
    .await
    .expect("cannot connect to Redis; is `scripts/services.sh up` running?");
    let mut builder = Engine::builder(PgStore::new(db.pool.clone()), queue)
        .register_all(dayshift_workflows::all(db.pool.clone()))
        .register_all(defs.iter().cloned());
    if let Some(f) = faults {
        builder = builder.inject_faults(f);
    }
    builder.build()
}

/// Polls the run until `done` says so (every 20 ms, at most `limit`); panics with the run's
/// last state otherwise.
pub async fn wait_for(engine: &Engine, id: RunId, limit: Duration, done: impl Fn(&RunView) -> bool) -> RunView {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let run = engine.get_run(id).await.expect("get run");
        if done(&run) {
            return run;
        }
        if tokio::time::Instant::now() > deadline {
            let active = active_runs(engine.store().pool()).await;
            panic!(
                "run {id} did not reach the expected state within {limit:?}; last: {run:#?}\n\
                 active runs (id, status, wake_at, lease_owner, lease_expires_at, now):\n{active}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every run that is not over, with what decides when it runs next: for failure messages.
pub async fn active_runs(pool: &PgPool) -> String {
    let rows: Vec<(String,)> = sqlx::query_as(
        "select concat_ws(' ', id, status, wake_at, lease_owner, lease_expires_at, now(), cancel_requested) \
         from runs where status in ('pending', 'running', 'waiting') order by created_at limit 50",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    rows.into_iter().map(|(r,)| r + "\n").collect()
}

/// Asserts the run succeeded, showing it if not.
pub fn assert_succeeded(run: &RunView) {
    assert_eq!(run.status, RunStatus::Succeeded, "run did not succeed: {run:#?}");
}

// ------------------------------------------------------------------------------ the binary

/// The `dayshift` binary built by this cargo invocation (next to this test executable).
pub fn dayshift_bin() -> PathBuf {
    // Benchmarks point this at a release build.
    if let Some(bin) = std::env::var_os("DAYSHIFT_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let bin = dir.join("dayshift");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p dayshift` (the test command does)",
        bin.display()
    );
    bin
}

/// A `dayshift` process with a config of its own.
pub struct Proc {
    pub child: Child,
    pub stderr: Arc<std::sync::Mutex<String>>,
}

impl Proc {
    /// Sends SIGKILL and waits for the process to die.
    pub async fn kill9(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Sends a signal by name (`TERM`, `STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// Waits until the process has stopped itself (SIGSTOP; `T` in /proc), at most `limit`.
    pub async fn wait_stopped(&self, limit: Duration) {
        let pid = self.child.id().expect("a running process");
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses.
            if stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('T'))
                == Some(true)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "process {pid} did not stop within {limit:?}; its log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// What the process logged so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits until the process has exited (at most `limit`).
    pub async fn terminate(&mut self, limit: Duration) {
        self.signal("TERM");
        let exited = tokio::time::timeout(limit, self.child.wait()).await;
        assert!(
            exited.is_ok(),
            "did not exit on SIGTERM within {limit:?}:\n{}",
            self.logs()
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// An HTTP client that sends `token` as its bearer token.
fn authorized_client(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    dayshift_workflows::adapters::http::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// A running `dayshift serve` plus the environment to start workers beside it.
pub struct BinEnv {
    pub db: TestDb,
    pub config_path: PathBuf,
    pub api: String,
    /// An admin token (`test-admin`); [`BinEnv::http`] sends it.
    pub token: String,
    /// Tokens made by [`BinEnv::as_user`], by name.
    users: std::sync::Mutex<std::collections::HashMap<String, String>>,
    pub http: reqwest::Client,
    pub server: Option<Proc>,
    _dir: tempdir::Dir,
}

mod tempdir {
    /// A directory removed on drop.
    pub(crate) struct Dir(pub(crate) std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl BinEnv {
    /// A database, a config file (short leases, own queue), and `dayshift serve` on a free port.
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Same, with extra YAML appended to the config.
    pub async fn start_with(extra_yaml: &str) -> Self {
        Self::start_on(&redis_url(), extra_yaml).await
    }

    /// Same, on another Redis.
    pub async fn start_on(redis: &str, extra_yaml: &str) -> Self {
        let db = TestDb::new().await;
        let dir = std::env::temp_dir().join(format!("dayshift-test-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let config_path = dir.join("dayshift.yaml");
        let policy = if extra_yaml.contains("\npolicy:") || extra_yaml.starts_with("policy:") {
            String::new()
        } else {
            open_policy_yaml()
        };
        let yaml = format!(
            "database:\n  url: {}\nredis:\n  url: {}\nserver:\n  listen: 127.0.0.1:{port}\n\
             queue:\n  name: dayshift:test:{}\n\
             worker:\n  lease-ttl: 2s\n  sweep-interval: 300ms\nshutdown-grace-period: 5s\n{extra_yaml}{policy}",
            db.url,
            redis,
            unique()
        );
        std::fs::write(&config_path, yaml).unwrap();
        let token = dayshift_engine::api::auth::create_token(
            &db.pool,
            "test-admin",
            dayshift_engine::api::auth::Role::Admin,
            None,
            "test",
        )
        .await
        .unwrap();
        let mut env = Self {
            db,
            config_path,
            api: format!("http://127.0.0.1:{port}"),
            http: authorized_client(&token),
            token,
            users: Default::default(),
            server: None,
            _dir: tempdir::Dir(dir),
        };
        env.start_server().await;
        env
    }

    /// Starts (or restarts) `dayshift serve` and waits until it is ready.
    pub async fn start_server(&mut self) {
        let proc = self.spawn(&["serve"], "listening on").await;
        self.server = Some(proc);
    }

    /// Starts `dayshift worker` and waits until it runs.
    pub async fn start_worker(&self) -> Proc {
        self.spawn(&["worker"], "worker ").await
    }

    /// Runs `dayshift ARGS` with this env's config, waiting for `ready` on stdout.
    pub async fn spawn(&self, args: &[&str], ready: &str) -> Proc {
        spawn_dayshift(&self.config_path, args, ready, &[]).await
    }

    /// A new token named `name` with `role`.
    pub async fn token_for(&self, name: &str, role: &str) -> String {
        dayshift_engine::api::auth::create_token(&self.db.pool, name, role.parse().unwrap(), None, "test")
            .await
            .unwrap()
    }

    /// The operator token of `name` (made on first use): what a person approves with.
    pub async fn as_user(&self, name: &str) -> String {
        if let Some(t) = self.users.lock().unwrap().get(name) {
            return t.clone();
        }
        let token = self.token_for(name, "operator").await;
        self.users.lock().unwrap().insert(name.to_string(), token.clone());
        token
    }

    /// `POST` JSON to the API with `token` (none if empty); returns status and body.
    pub async fn post_as(&self, token: &str, path: &str, body: &Value) -> (u16, Value) {
        let mut req = dayshift_workflows::adapters::http::client()
            .post(format!("{}{path}", self.api))
            .json(body);
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    /// `GET` from the API with `token` (none if empty).
    pub async fn get_as(&self, token: &str, path: &str) -> (u16, Value) {
        let mut req = dayshift_workflows::adapters::http::client().get(format!("{}{path}", self.api));
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    /// `dayshift ARGS` as a CLI call against this env's API with its admin token; the output.
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(dayshift_bin())
            .args(args)
            .args(["--server", &self.api])
            .env("DAYSHIFT_TOKEN", &self.token)
            .output()
            .await
            .unwrap()
    }

    /// `dayshift --config <this env's config> ARGS`, as an admin on the host runs it (tokens,
    /// audit): the output.
    pub fn local_cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(dayshift_bin())
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .env_remove("DAYSHIFT_DATABASE_URL")
            .env_remove("DAYSHIFT_REDIS_URL")
            .output()
            .unwrap()
    }

    /// `POST` JSON to the API; returns status and body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.api))
            .json(body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    /// `POST` raw bytes to the API.
    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.api))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    /// `GET` from the API.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(format!("{}{path}", self.api)).send().await.unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
    }

    /// Starts a run through the API and returns its id.
    pub async fn start_run(&self, workflow: &str, input: Value) -> String {
        let (status, body) = self
            .post(
                "/api/v1/runs",
                &serde_json::json!({ "workflow": workflow, "input": input }),
            )
            .await;
        assert_eq!(status, 201, "start failed: {body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// Polls `GET /api/v1/runs/{id}` until `done` (at most `limit`).
    pub async fn wait_run(&self, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (_, run) = self.get(&format!("/api/v1/runs/{id}")).await;
            if done(&run) {
                return run;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("run {id} did not reach the expected state within {limit:?}; last: {run:#}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the run is over.
    pub async fn wait_finished(&self, id: &str, limit: Duration) -> Value {
        self.wait_run(id, limit, |r| {
            matches!(r["status"].as_str(), Some("succeeded" | "failed" | "cancelled"))
        })
        .await
    }
}

/// Runs `dayshift --config CONFIG ARGS`, waiting for a stdout line containing `ready`.
pub async fn spawn_dayshift(config: &std::path::Path, args: &[&str], ready: &str, env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(dayshift_bin());
    cmd.arg("--config")
        .arg(config)
        .args(args)
        .env_remove("DAYSHIFT_DATABASE_URL")
        .env_remove("DAYSHIFT_REDIS_URL")
        .env("DAYSHIFT_LOG", "info,dayshift_engine=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn dayshift");
    let stderr = Arc::new(std::sync::Mutex::new(String::new()));
    let sink = stderr.clone();
    let err = child.stderr.take().unwrap();
    tokio::spawn(async move {
        let mut lines = BufReader::new(err).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(ready) {
                return true;
            }
        }
        false
    })
    .await;
    if !matches!(found, Ok(true)) {
        panic!(
            "dayshift {args:?} did not print '{ready}'; its log:\n{}",
            stderr.lock().unwrap()
        );
    }
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Proc { child, stderr }
}

/// A port that was free a moment ago.
/// The hex HMAC-SHA256 of `body` with `secret`: how git forges sign webhook deliveries
/// (GitHub's `X-Hub-Signature-256` is `sha256=` and this; Gitea's is this alone).
pub fn hmac_sha256_hex(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis server of its own (for tests that flush everything).
pub struct OwnRedis {
    pub url: String,
    port: u16,
    dir: PathBuf,
}

impl OwnRedis {
    /// Starts `redis-server` on a free loopback port.
    pub async fn start() -> Result<Self> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("dayshift-redis-{}", unique()));
        std::fs::create_dir_all(&dir)?;
        let status = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--daemonize", "yes"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .status()
            .context("redis-server is not installed; run `scripts/services.sh up`")?;
        if !status.success() {
            bail!("redis-server failed to start");
        }
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str())?;
        for _ in 0..100 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
            {
                return Ok(Self { url, port, dir });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server on port {port} did not answer")
    }

    /// `FLUSHALL`.
    pub async fn flushall(&self) -> Result<()> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("FLUSHALL").query_async::<String>(&mut c).await?;
        Ok(())
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "nosave"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An Alertmanager of its own (Debian's `prometheus-alertmanager`), sending to `receiver_url`
/// with a bearer token, grouping by alert name, repeating every second.
pub struct OwnAlertmanager {
    pub url: String,
    child: std::process::Child,
    dir: PathBuf,
}

impl OwnAlertmanager {
    /// Starts it and waits until its API answers.
    pub async fn start(receiver_url: &str, token: &str) -> Result<Self> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("dayshift-am-{}", unique()));
        std::fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                "route:\n  receiver: dayshift\n  group_by: [alertname]\n  group_wait: 0s\n  group_interval: 1s\n  \
                 repeat_interval: 1s\nreceivers:\n  - name: dayshift\n    webhook_configs:\n      - url: {receiver_url}\n        \
                 send_resolved: true\n        http_config:\n          authorization:\n            type: Bearer\n            \
                 credentials: {token}\n"
            ),
        )?;
        let child = std::process::Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("prometheus-alertmanager is not installed; run `scripts/services.sh up`")?;
        let url = format!("http://127.0.0.1:{port}");
        let http = dayshift_workflows::adapters::http::client();
        for _ in 0..200 {
            if let Ok(r) = http.get(format!("{url}/-/ready")).send().await
                && r.status().is_success()
            {
                return Ok(Self { url, child, dir });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("Alertmanager on port {port} did not become ready")
    }

    /// Posts alerts to its API (`/api/v2/alerts`), as Prometheus does.
    pub async fn post_alerts(&self, alerts: &Value) -> Result<()> {
        let r = dayshift_workflows::adapters::http::client()
            .post(format!("{}/api/v2/alerts", self.url))
            .json(alerts)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "Alertmanager refused the alerts: {}",
                r.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for OwnAlertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An OpenBao server: the services script's, or one of a test's own.
pub struct OpenBao {
    pub addr: String,
    /// The root token.
    pub token: String,
    /// Set for a server of the test's own, stopped on drop.
    dir: Option<PathBuf>,
}

impl OpenBao {
    /// The server `scripts/services.sh` started (raft storage, unsealed). Tests on it keep to
    /// mounts of their own.
    pub fn shared() -> Self {
        let addr = std::env::var("DAYSHIFT_VAULT_ADDR").expect("DAYSHIFT_VAULT_ADDR is not set: source .dayshift/env");
        let file = std::env::var("DAYSHIFT_VAULT_TOKEN_FILE").expect("DAYSHIFT_VAULT_TOKEN_FILE is not set");
        let token = std::fs::read_to_string(&file)
            .expect("the OpenBao root token file")
            .trim()
            .to_string();
        Self { addr, token, dir: None }
    }

    /// A server of its own, with raft storage, initialised and unsealed (for tests that restore
    /// snapshots, which would roll back a shared server under other tests). Started through
    /// `scripts/openbao.sh`, the services script's way, on a free port.
    pub async fn own() -> Result<Self> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("dayshift-openbao-{}", unique()));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/openbao.sh");
        let out = Command::new(&script)
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .output()
            .await
            .with_context(|| format!("cannot run {}", script.display()))?;
        let bao = Self {
            addr: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            dir: Some(dir.clone()),
        };
        if !out.status.success() {
            bail!("OpenBao did not start: {}", String::from_utf8_lossy(&out.stderr));
        }
        let init: Value = serde_json::from_slice(&std::fs::read(dir.join("init.json"))?)?;
        let mut bao = bao;
        bao.token = init["root_token"]
            .as_str()
            .context("no root_token in init.json")?
            .to_string();
        Ok(bao)
    }

    /// Runs the `bao` CLI against this server as root; its stdout, or an error with its stderr.
    pub async fn bao(&self, args: &[&str]) -> Result<String> {
        let bin = std::env::var("DAYSHIFT_BAO").context("DAYSHIFT_BAO is not set: source .dayshift/env")?;
        let out = Command::new(bin)
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .output()
            .await?;
        if !out.status.success() {
            bail!("bao {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        let Some(dir) = &self.dir else { return };
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/openbao.sh");
        let _ = std::process::Command::new(script)
            .arg("stop")
            .arg(dir)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A chat webhook (Mattermost/Slack shaped) that records what is posted to it.
pub struct WebhookReceiver {
    /// The URL to post to.
    pub url: String,
    received: Arc<std::sync::Mutex<Vec<Value>>>,
    arrived: Arc<tokio::sync::Notify>,
    server: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (r, a) = (received.clone(), arrived.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let (r, a) = (r.clone(), a.clone());
                async move {
                    r.lock().unwrap().push(body);
                    a.notify_waiters();
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            received,
            arrived,
            server,
        }
    }

    /// What has been posted so far.
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages have arrived; panics after `limit`.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let arrived = self.arrived.notified();
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!("{} of {n} messages arrived within {limit:?}: {got:#?}", got.len());
            }
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Bare git repositories on disk, served on loopback by `git daemon` (pushes allowed).
pub struct GitServer {
    pub dir: PathBuf,
    port: u16,
    daemon: Child,
}

impl GitServer {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("dayshift-git-server-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        // git-daemon itself, not `git daemon`: the `git` wrapper would leave the daemon running
        // when it is killed.
        let exec_path = std::process::Command::new("git")
            .arg("--exec-path")
            .output()
            .expect("git is missing: run `scripts/services.sh up`");
        let daemon_bin = PathBuf::from(String::from_utf8_lossy(&exec_path.stdout).trim()).join("git-daemon");
        let daemon = Command::new(daemon_bin)
            .args([
                "--reuseaddr",
                "--export-all",
                "--enable=receive-pack",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", dir.display()))
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("git is missing: run `scripts/services.sh up`");
        // Ready when the port accepts connections.
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self { dir, port, daemon }
    }

    /// The URL dayshift clones.
    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}.git", self.port)
    }

    fn bare(&self, repo: &str) -> PathBuf {
        self.dir.join(format!("{repo}.git"))
    }

    /// A new repository whose branch `branch` holds `files` (path, content) in one commit.
    pub fn create(&self, repo: &str, branch: &str, files: &[(&str, &str)]) {
        let bare = self.bare(repo);
        git(
            &self.dir,
            &[
                "init",
                "--quiet",
                "--bare",
                "--initial-branch",
                branch,
                bare.to_str().unwrap(),
            ],
        );
        let work = self.dir.join(format!("{repo}-seed"));
        git(
            &self.dir,
            &["clone", "--quiet", bare.to_str().unwrap(), work.to_str().unwrap()],
        );
        git(&work, &["checkout", "--quiet", "-b", branch]);
        for (path, content) in files {
            let file = work.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, content).unwrap();
        }
        git(&work, &["add", "."]);
        git(&work, &["commit", "--quiet", "-m", "seed"]);
        git(&work, &["push", "--quiet", "origin", branch]);
        std::fs::remove_dir_all(work).unwrap();
    }

    /// The tip of `branch`.
    pub fn head(&self, repo: &str, branch: &str) -> String {
        git(&self.bare(repo), &["rev-parse", branch])
    }

    /// `path` at the tip of `branch`.
    pub fn read(&self, repo: &str, branch: &str, path: &str) -> String {
        git(&self.bare(repo), &["show", &format!("{branch}:{path}")])
    }

    /// `git log` of `branch`: (commit, author email, full message), newest first.
    pub fn log(&self, repo: &str, branch: &str) -> Vec<(String, String, String)> {
        git(&self.bare(repo), &["log", "--format=%H%x00%ae%x00%B%x1e", branch])
            .split('\u{1e}')
            .filter_map(|c| {
                let mut parts = c.trim().splitn(3, '\0');
                Some((
                    parts.next()?.to_string(),
                    parts.next()?.to_string(),
                    parts.next()?.trim().to_string(),
                ))
            })
            .collect()
    }

    /// The diff `git show` prints for `commit`, without its header.
    pub fn diff(&self, repo: &str, commit: &str) -> String {
        git(&self.bare(repo), &["show", "--format=", "--unified=0", commit])
    }

    /// Another writer commits `content` to `path` on `branch` and pushes.
    pub fn push_other(&self, repo: &str, branch: &str, path: &str, content: &str) {
        let work = self.dir.join(format!("{repo}-other-{}", unique()));
        git(
            &self.dir,
            &[
                "clone",
                "--quiet",
                "--branch",
                branch,
                self.bare(repo).to_str().unwrap(),
                work.to_str().unwrap(),
            ],
        );
        std::fs::write(work.join(path), content).unwrap();
        git(&work, &["add", "."]);
        git(
            &work,
            &[
                "-c",
                "user.email=other@acme.io",
                "-c",
                "user.name=Other",
                "commit",
                "--quiet",
                "-m",
                "another writer",
            ],
        );
        git(&work, &["push", "--quiet", "origin", branch]);
        std::fs::remove_dir_all(work).unwrap();
    }

    /// Makes the next push to `repo` race with another writer, for certain: the push waits in
    /// the repository's pre-receive hook until [`GitServer::push_other`] has moved the branch,
    /// so its update is then refused. Returns once that push is waiting.
    pub async fn race_next_push(&self, repo: &str, branch: &str, path: &str, content: &str) {
        let bare = self.bare(repo);
        let hook = bare.join("hooks/pre-receive");
        std::fs::write(
            &hook,
            "#!/bin/sh\ncat >/dev/null\nif mkdir \"$GIT_DIR/first-push\" 2>/dev/null; then\n  touch \"$GIT_DIR/first-push-waiting\"\n  while [ ! -f \"$GIT_DIR/other-pushed\" ]; do sleep 0.02; done\nfi\nexit 0\n",
        )
        .unwrap();
        let mut perms = std::fs::metadata(&hook).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&hook, perms).unwrap();
        let waiting = bare.join("first-push-waiting");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !waiting.exists() {
            assert!(tokio::time::Instant::now() < deadline, "no push arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.push_other(repo, branch, path, content);
        std::fs::write(bare.join("other-pushed"), "").unwrap();
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.daemon.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs git in `dir`; its trimmed stdout. Panics with stderr on failure.
fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Seed")
        .env("GIT_AUTHOR_EMAIL", "seed@acme.io")
        .env("GIT_COMMITTER_NAME", "Seed")
        .env("GIT_COMMITTER_EMAIL", "seed@acme.io")
        .output()
        .expect("git is missing: run `scripts/services.sh up`");
    assert!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One span an [`OtlpReceiver`] received.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    pub attributes: std::collections::BTreeMap<String, String>,
    /// The resource's attributes (`service.name`, `service.instance.id`, ...).
    pub resource: std::collections::BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
}

/// An OTLP/HTTP trace receiver on loopback (`POST /v1/traces`, protobuf), as an OpenTelemetry
/// collector's `otlp` receiver takes them; it keeps every span.
pub struct OtlpReceiver {
    /// The endpoint to configure (`telemetry.otlp-endpoint`).
    pub url: String,
    spans: Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        use prost::Message as _;
        let spans: Arc<std::sync::Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let sink = spans.clone();
        let text = |kv: &[opentelemetry_proto::tonic::common::v1::KeyValue]| {
            kv.iter()
                .map(|a| {
                    let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Any::StringValue(s)) => s.clone(),
                        Some(Any::IntValue(i)) => i.to_string(),
                        Some(Any::BoolValue(b)) => b.to_string(),
                        Some(Any::DoubleValue(d)) => d.to_string(),
                        other => format!("{other:?}"),
                    };
                    (a.key.clone(), v)
                })
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                        return axum::http::StatusCode::BAD_REQUEST;
                    };
                    let mut got = sink.lock().unwrap();
                    for rs in req.resource_spans {
                        let resource = rs.resource.map(|r| text(&r.attributes)).unwrap_or_default();
                        for ss in rs.scope_spans {
                            for span in ss.spans {
                                got.push(ReceivedSpan {
                                    trace_id: hex::encode(&span.trace_id),
                                    span_id: hex::encode(&span.span_id),
                                    parent_span_id: hex::encode(&span.parent_span_id),
                                    name: span.name.clone(),
                                    attributes: text(&span.attributes),
                                    resource: resource.clone(),
                                    links: span
                                        .links
                                        .iter()
                                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                                        .collect(),
                                });
                            }
                        }
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, spans, server }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}
