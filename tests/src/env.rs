//! An engine in this process ([`TestEnv`]) on a database and queue of its own, its workers,
//! and the helpers that wait for runs.

use std::time::Duration;

use dayshift_engine::{
    Engine, FaultInjector, PgStore, QueueConfig, RedisQueue, RunId, RunStatus, RunView, Schedule, StartRun, Worker,
    WorkerConfig, WorkflowDef,
};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::{TestDb, redis_url, unique};

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

/// How long [`TestEnv::run`] waits for a run to finish: long enough for any built-in workflow
/// against the local services, short enough that a hung run fails the test.
pub const RUN_LIMIT: Duration = Duration::from_secs(60);

/// An engine in this process, on a database and queue of its own.
pub struct TestEnv {
    pub db: TestDb,
    pub queue_name: String,
    pub redis_url: String,
    pub engine: Engine,
    workers: Vec<(CancellationToken, tokio::task::JoinHandle<()>)>,
    defs: Vec<WorkflowDef>,
    schedules: Vec<Schedule>,
}

/// What a [`TestEnv`] is built with; the options combine (`TestEnv::builder(defs).faults(f)
/// .schedules(s).build()`), and the engine is built once, with all of them.
#[must_use = "a builder does nothing until `build` is awaited"]
pub struct TestEnvBuilder {
    defs: Vec<WorkflowDef>,
    redis_url: Option<String>,
    faults: Option<FaultInjector>,
    schedules: Vec<Schedule>,
    workers: Vec<WorkerConfig>,
}

impl TestEnvBuilder {
    /// Uses the Redis at `url` instead of the shared one (a test's own, to flush or stop it).
    pub fn redis(mut self, url: &str) -> Self {
        self.redis_url = Some(url.to_string());
        self
    }

    /// Injects step failures: see [`FaultInjector`].
    pub fn faults(mut self, faults: FaultInjector) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Gives the env these cron schedules (its [`TestEnv::scheduler`] and API fire and list them).
    pub fn schedules(mut self, schedules: Vec<Schedule>) -> Self {
        self.schedules = schedules;
        self
    }

    /// Starts an in-process worker with `config` once the env is built (one per call).
    pub fn worker(mut self, config: WorkerConfig) -> Self {
        self.workers.push(config);
        self
    }

    /// A fresh database and queue, and the engine with the built-in workflows, the builder's
    /// `defs` and every option given.
    pub async fn build(self) -> TestEnv {
        let redis_url = self.redis_url.unwrap_or_else(redis_url);
        let db = TestDb::new().await;
        let queue_name = format!("dayshift:test:{}", unique());
        let engine = build_engine(&db, &queue_name, &redis_url, &self.defs, self.faults).await;
        let mut env = TestEnv {
            db,
            queue_name,
            redis_url,
            engine,
            workers: Vec::new(),
            defs: self.defs,
            schedules: self.schedules,
        };
        for config in self.workers {
            env.start_worker(config);
        }
        env
    }
}

impl TestEnv {
    /// An env with the built-in workflows and `defs`; the builder's options add to it.
    pub fn builder(defs: Vec<WorkflowDef>) -> TestEnvBuilder {
        TestEnvBuilder {
            defs,
            redis_url: None,
            faults: None,
            schedules: Vec::new(),
            workers: Vec::new(),
        }
    }

    /// A fresh database and queue, the built-in workflows and `defs`, nothing else.
    pub async fn new(defs: Vec<WorkflowDef>) -> Self {
        Self::builder(defs).build().await
    }

    /// Another engine on the same database and queue, with other workflow definitions (as a
    /// new release of the code would be).
    pub async fn engine_with(&self, defs: Vec<WorkflowDef>) -> Engine {
        build_engine(&self.db, &self.queue_name, &self.redis_url, &defs, None).await
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
        self.get_text_on(self.api(), path).await
    }

    /// [`TestEnv::get_text`] from the HTTP API over `api` (another engine's, say).
    pub async fn get_text_on(&self, api: dayshift_engine::api::Api, path: &str) -> (u16, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = api.router(dayshift_engine::api::ServerConfig::default());
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

    /// The workflow definitions the env was built with.
    pub fn defs(&self) -> &[WorkflowDef] {
        &self.defs
    }

    /// Waits until the run is over (at most `limit`), and returns it.
    pub async fn wait(&self, id: RunId, limit: Duration) -> RunView {
        wait_for(&self.engine, id, limit, |r| r.status.is_terminal()).await
    }

    /// Starts `workflow` with `input` and waits until the run is over (at most [`RUN_LIMIT`]).
    /// Someone must run it: a worker of this env's or of another engine on its queue.
    pub async fn run(&self, workflow: &str, input: Value) -> RunView {
        self.run_within(workflow, input, RUN_LIMIT).await
    }

    /// [`TestEnv::run`], waiting at most `limit`.
    pub async fn run_within(&self, workflow: &str, input: Value, limit: Duration) -> RunView {
        let started = self
            .engine
            .start(StartRun::new(workflow, input))
            .await
            .unwrap_or_else(|e| panic!("cannot start {workflow}: {e}"));
        self.wait(started.id, limit).await
    }
}

async fn build_engine(
    db: &TestDb,
    queue_name: &str,
    redis_url: &str,
    defs: &[WorkflowDef],
    faults: Option<FaultInjector>,
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
