//! The `dayshift` binary under test: where it is ([`dayshift_bin`]), its processes ([`Proc`]),
//! a running `dayshift serve` with its config and API clients ([`BinEnv`]), and the config
//! sections such tests share.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{TestDb, free_port, redis_url, unique};

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
        Self::start_serving(redis, "", extra_yaml).await
    }

    /// Same, with `server_yaml` (lines indented by two spaces) added to the `server` section.
    pub async fn start_with_server(server_yaml: &str, extra_yaml: &str) -> Self {
        Self::start_serving(&redis_url(), server_yaml, extra_yaml).await
    }

    async fn start_serving(redis: &str, server_yaml: &str, extra_yaml: &str) -> Self {
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
            "database:\n  url: {}\nredis:\n  url: {}\nserver:\n  listen: 127.0.0.1:{port}\n{server_yaml}\
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

    /// Starts `workflow` with `input` on a worker that stops itself right after step `step` is
    /// journaled (DAYSHIFT_TEST_STOP_AFTER_STEP) and is SIGKILLed there, then lets a second
    /// worker finish the run. The run as the API shows it, and both workers' logs.
    pub async fn run_killed_after(&self, step: &str, workflow: &str, input: Value, limit: Duration) -> (Value, String) {
        let mut first = self
            .spawn_with_env(&["worker"], "worker ", &[("DAYSHIFT_TEST_STOP_AFTER_STEP", step)])
            .await;
        let id = self.start_run(workflow, input).await;
        first.wait_stopped(limit).await;
        first.kill9().await;
        let mut second = self.start_worker().await;
        let run = self.wait_finished(&id, limit).await;
        second.kill9().await;
        (run, format!("{}{}", first.logs(), second.logs()))
    }

    /// Runs `dayshift ARGS` with this env's config, waiting for `ready` on stdout.
    pub async fn spawn(&self, args: &[&str], ready: &str) -> Proc {
        spawn_dayshift(&self.config_path, args, ready, &[]).await
    }

    /// [`BinEnv::spawn`] with more environment variables.
    pub async fn spawn_with_env(&self, args: &[&str], ready: &str, env: &[(&str, &str)]) -> Proc {
        spawn_dayshift(&self.config_path, args, ready, env).await
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
