//! Trust boundaries: what a caller outside its bounds tries, and that it is refused with
//! nothing changed. Real PostgreSQL and Redis, the engine and its HTTP API in this process.

use std::time::Duration;

use dayshift_engine::api::auth::Role;
use dayshift_engine::{ApprovalGate, Ctx, RunId, RunStatus, StepKind, WorkflowDef};
use dayshift_tests::{TestEnv, fast_worker, unique, wait_for};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

/// The engine's API served on a port of its own, and tokens to call it with.
struct Api {
    base: String,
    addr: std::net::SocketAddr,
    server: tokio::task::JoinHandle<()>,
    pool: sqlx::PgPool,
}

impl Api {
    /// `env`'s engine with the default limits.
    async fn serve(env: &TestEnv) -> Self {
        Self::on(dayshift_engine::api::router(env.engine.clone()), &env.db.pool).await
    }

    /// Serves `app`, whose tokens live in `pool`.
    async fn on(app: axum::Router, pool: &sqlx::PgPool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base: format!("http://{addr}"),
            addr,
            server,
            pool: pool.clone(),
        }
    }

    async fn token(&self, name: &str, role: Role) -> String {
        dayshift_engine::api::auth::create_token(&self.pool, name, role, None, "test")
            .await
            .unwrap()
    }

    async fn post(&self, token: &str, path: &str, body: &Value) -> (u16, Value) {
        let response = dayshift_workflows::adapters::http::client()
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let response = dayshift_workflows::adapters::http::client()
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The audit trail of `target`, oldest first, as (actor, action).
    async fn audit(&self, target: &str) -> Vec<(String, String)> {
        sqlx::query_as("select actor, action from audit_log where target = $1 order by id")
            .bind(target)
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// `env`'s queue, for another engine on it.
async fn queue_of(env: &TestEnv) -> dayshift_engine::RedisQueue {
    dayshift_engine::RedisQueue::connect(
        &env.redis_url,
        dayshift_engine::QueueConfig {
            name: env.queue_name.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// An engine on `env`'s database and queue, with the built-in workflows, `auth` (an OIDC
/// provider) and `policy`, serving its API on a port of its own.
async fn serve_with_auth(
    env: &TestEnv,
    auth: dayshift_engine::api::auth::AuthConfig,
    policy: dayshift_engine::policy::Policy,
) -> Api {
    let engine =
        dayshift_engine::Engine::builder(dayshift_engine::PgStore::new(env.db.pool.clone()), queue_of(env).await)
            .register_all(dayshift_workflows::all(env.db.pool.clone()))
            .build();
    let api = dayshift_engine::api::Api::builder(engine)
        .auth(auth)
        .policy(policy)
        .build();
    Api::on(api.router(dayshift_engine::api::ServerConfig::default()), &env.db.pool).await
}

/// A workflow behind a gate that its "config" (this test) names: two of alice, bob and carol.
fn gated() -> WorkflowDef {
    WorkflowDef::new(
        "test.gated",
        "waits for two approvals",
        |ctx: Ctx, _: Value| async move {
            let gate = ApprovalGate {
                approvers: ["token:alice", "token:bob", "token:carol"]
                    .iter()
                    .map(|a| a.parse().unwrap())
                    .collect(),
                required: 2,
                timeout: Duration::from_secs(3600),
            };
            let approved = ctx.approval(&gate, None, None::<fn() -> std::future::Ready<_>>).await?;
            Ok(json!({ "approved_by": approved }))
        },
    )
}

fn decisions(run: &dayshift_engine::RunView) -> Vec<Value> {
    run.steps
        .iter()
        .filter(|s| s.name.starts_with("decision:"))
        .filter_map(|s| s.output.clone())
        .collect()
}

async fn waiting_at_gate(env: &TestEnv, id: RunId) -> dayshift_engine::RunView {
    // Waiting as a whole (released by its worker), at its newest approval wait.
    wait_for(&env.engine, id, LIMIT, |r| {
        r.status == RunStatus::Waiting
            && r.steps
                .iter()
                .rev()
                .find(|s| s.kind == StepKind::Signal && s.name == "approval")
                .is_some_and(|s| s.status == dayshift_engine::StepStatus::Waiting)
    })
    .await
}

#[tokio::test]
async fn an_approval_counts_only_as_the_authenticated_approver_and_a_quorum_needs_two_of_them() {
    let mut env = TestEnv::new(vec![gated()]).await;
    env.start_worker(fast_worker(&format!("w-{}", unique())));
    let api = Api::serve(&env).await;
    let (alice, bob, carol, otto) = (
        api.token("alice", Role::Operator).await,
        api.token("bob", Role::Operator).await,
        api.token("carol", Role::Operator).await,
        api.token("otto", Role::Operator).await,
    );
    // Carol starts the run: she made the change.
    let (status, started) = api
        .post(
            &carol,
            "/api/v1/runs",
            &json!({ "workflow": "test.gated", "input": {} }),
        )
        .await;
    assert_eq!(status, 201, "{started}");
    let id: RunId = started["id"].as_str().unwrap().parse().unwrap();
    waiting_at_gate(&env, id).await;
    let path = |what: &str| format!("/api/v1/runs/{id}/{what}");

    // Otto is no approver: neither the generic signal route (naming alice) nor /approve counts.
    let (status, body) = api
        .post(
            &otto,
            &path("signals/approval"),
            &json!({ "by": "alice", "approve": true }),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "reserved_signal");
    assert!(body["error"].as_str().unwrap().contains("/approve"), "{body}");
    let (status, body) = api.post(&otto, &path("approve"), &json!({})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "token:otto is not one of the approvers");
    // Nor may the engine's other signals or its reserved prefix be sent.
    for name in ["resolved", "dayshift.anything"] {
        let (status, _) = api.post(&otto, &path(&format!("signals/{name}")), &json!({})).await;
        assert_eq!(status, 403, "{name}");
    }

    // Carol, the author, names another approver, then asks as herself: refused both ways.
    let (status, body) = api.post(&carol, &path("approve"), &json!({ "by": "alice" })).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("cannot decide as 'alice'"),
        "{body}"
    );
    let (status, body) = api
        .post(
            &carol,
            &path("signals/approval"),
            &json!({ "by": "alice", "approve": true }),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = api.post(&carol, &path("approve"), &json!({})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "token:carol made the change and may not approve it");

    // Nothing counted: the run still waits, no signal is buffered, no decision journaled.
    let run = env.engine.get_run(id).await.unwrap();
    assert_eq!(run.status, RunStatus::Waiting);
    assert!(decisions(&run).is_empty(), "{run:#?}");
    let buffered: i64 = sqlx::query_scalar("select count(*) from signals where run_id = $1")
        .bind(id.0)
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(buffered, 0);
    // Every refusal is in the audit trail, as the identity that tried.
    let audit = api.audit(&id.to_string()).await;
    let refused: Vec<(&str, &str)> = audit
        .iter()
        .filter(|(_, action)| action.ends_with(".refused"))
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        refused,
        [
            ("token:otto", "run.signal.refused"),
            ("token:otto", "run.approve.refused"),
            ("token:otto", "run.signal.refused"),
            ("token:otto", "run.signal.refused"),
            ("token:carol", "run.approve.refused"),
            ("token:carol", "run.signal.refused"),
            ("token:carol", "run.approve.refused"),
        ]
    );

    // The console's view says the same as the gate, from the same rule.
    let (_, approvals) = api.get(&otto, "/api/v1/approvals").await;
    let mine = approvals["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["run"]["id"] == id.to_string())
        .cloned()
        .unwrap();
    assert_eq!(mine["may_decide"], false);
    assert_eq!(mine["why_not"], "token:otto is not one of the approvers");
    assert_eq!(mine["approvers"], json!(["token:alice", "token:bob", "token:carol"]));

    // Alice's approval counts once: a second one from her does not make a quorum of two.
    assert_eq!(api.post(&alice, &path("approve"), &json!({})).await.0, 202);
    wait_for(&env.engine, id, LIMIT, |r| !decisions(r).is_empty()).await;
    waiting_at_gate(&env, id).await;
    let (status, body) = api.post(&alice, &path("approve"), &json!({})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "token:alice has approved already");
    assert_eq!(env.engine.get_run(id).await.unwrap().status, RunStatus::Waiting);

    // Bob is the second distinct identity.
    assert_eq!(
        api.post(&bob, &path("approve"), &json!({ "comment": "ok" })).await.0,
        202
    );
    let run = env.wait(id, LIMIT).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    assert_eq!(run.output.unwrap()["approved_by"], json!(["token:alice", "token:bob"]));
    let by: Vec<Value> = decisions(&env.engine.get_run(id).await.unwrap())
        .iter()
        .map(|d| d["by"].clone())
        .collect();
    assert_eq!(by, [json!("token:alice"), json!("token:bob")]);
    env.stop_workers().await;
}

#[tokio::test]
async fn concurrent_starts_with_one_key_make_one_run_and_every_answer_names_it() {
    let env = TestEnv::new(vec![]).await;
    let api = Api::serve(&env).await;
    let op = api.token("op", Role::Operator).await;
    let key = format!("deploy-{}", unique());
    let body = json!({ "workflow": "selftest.chain", "input": { "steps": 1 }, "idempotency_key": key });
    let answers = futures::future::join_all((0..8).map(|_| api.post(&op, "/api/v1/runs", &body))).await;
    let mut statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    statuses.sort();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 200, 201], "{answers:#?}");
    let ids: std::collections::BTreeSet<&str> = answers.iter().map(|(_, b)| b["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "{answers:#?}");
    let runs: i64 = sqlx::query_scalar("select count(*) from runs where idempotency_key = $1")
        .bind(&key)
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);
}

#[tokio::test]
async fn a_trigger_s_key_is_refused_from_the_api_and_a_conflicting_tick_does_not_stop_the_schedules() {
    use dayshift_engine::{CatchUp, Overlap, Schedule, StartRun};
    let hourly = |name: &str| Schedule {
        name: name.into(),
        cron: "0 * * * *".parse().unwrap(),
        timezone: Default::default(),
        workflow: "selftest.chain".into(),
        input: json!({ "steps": 1 }),
        catch_up: CatchUp::Latest,
        catch_up_limit: 10,
        overlap: Overlap::Allow,
        misfire_grace: Duration::from_secs(7200),
    };
    let env = TestEnv::builder(vec![])
        .schedules(vec![hourly("a-first"), hourly("b-second")])
        .build()
        .await;
    let api = Api::serve(&env).await;
    let op = api.token("op", Role::Operator).await;
    let tick = {
        use chrono::{DurationRound, Utc};
        Utc::now().duration_trunc(chrono::Duration::hours(1)).unwrap()
    };
    let claimed = format!("schedule:a-first:{}", tick.to_rfc3339());

    // The API refuses every key a trigger owns, naming the field; nothing is created.
    for key in [claimed.as_str(), "hook:promote:abc", "alert:crashloop:fp:t", "retry:01"] {
        let body = json!({ "workflow": "selftest.chain", "input": { "steps": 1 }, "idempotency_key": key });
        let (status, answer) = api.post(&op, "/api/v1/runs", &body).await;
        assert_eq!(status, 422, "{key}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("idempotency_key"),
            "{answer}"
        );
    }
    let body = json!({ "workflow": "selftest.chain", "input": {}, "concurrency": { "key": "schedule:a-first" } });
    assert_eq!(api.post(&op, "/api/v1/runs", &body).await.0, 422);
    let runs: i64 = sqlx::query_scalar("select count(*) from runs")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 0);

    // Were the key taken anyway (by a run of another workflow), that tick fails and is
    // recorded; the next schedule in the config still fires.
    env.engine
        .start(StartRun::new("selftest.gate", json!({})).idempotency_key(claimed.clone()))
        .await
        .unwrap();
    for name in ["a-first", "b-second"] {
        sqlx::query("insert into schedules (name, last_tick) values ($1, $2 - interval '1 hour')")
            .bind(name)
            .bind(tick)
            .execute(&env.db.pool)
            .await
            .unwrap();
    }
    env.scheduler().fire_due().await.unwrap();
    let ticks: Vec<(String, String, Option<String>)> =
        sqlx::query_as("select schedule, outcome, detail from schedule_ticks order by schedule")
            .fetch_all(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(ticks.len(), 2, "{ticks:?}");
    assert_eq!((ticks[0].0.as_str(), ticks[0].1.as_str()), ("a-first", "failed"));
    assert!(ticks[0].2.as_deref().unwrap().contains("already used"), "{ticks:?}");
    assert_eq!((ticks[1].0.as_str(), ticks[1].1.as_str()), ("b-second", "started"));
}

/// A TCP proxy to PostgreSQL that can be cut: every connection through it is dropped and new
/// ones are refused, as when a worker's node loses its route to the database.
struct CutProxy {
    port: u16,
    cut: tokio_util::sync::CancellationToken,
}

impl CutProxy {
    async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = tokio_util::sync::CancellationToken::new();
        let stop = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }
}

#[tokio::test]
async fn a_worker_cut_off_from_postgresql_stops_its_step_before_another_worker_takes_the_run() {
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    // Every execution of the step notes, every 50 ms, that it is still running.
    type Beats = Arc<Mutex<Vec<(String, Instant)>>>;
    let beats: Beats = Arc::default();
    let b = beats.clone();
    let def = WorkflowDef::new("test.long", "one long step", move |ctx: Ctx, _: Value| {
        let b = b.clone();
        async move {
            ctx.step("long", move |_s| async move {
                let me = unique();
                for _ in 0..100 {
                    b.lock().unwrap().push((me.clone(), Instant::now()));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok::<_, dayshift_engine::StepError>(())
            })
            .await?;
            Ok(())
        }
    });
    let mut env = TestEnv::new(vec![def.clone()]).await;

    // Worker A reaches PostgreSQL through the proxy; worker B directly.
    let options: sqlx::postgres::PgConnectOptions = env.db.url.parse().unwrap();
    let target = format!("{}:{}", options.get_host(), options.get_port())
        .parse()
        .unwrap();
    let proxy = CutProxy::start(target).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(options.host("127.0.0.1").port(proxy.port))
        .await
        .unwrap();
    let engine_a = dayshift_engine::Engine::builder(dayshift_engine::PgStore::new(pool), queue_of(&env).await)
        .register_all([def])
        .build();
    env.start_worker_on(engine_a, fast_worker("a"));
    let id = env
        .engine
        .start(dayshift_engine::StartRun::new("test.long", json!(null)))
        .await
        .unwrap()
        .id;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while beats.lock().unwrap().len() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "the step never started");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A loses PostgreSQL mid-step; B may take the run once A's lease (2 s) has run out.
    proxy.cut.cancel();
    env.start_worker(fast_worker("b"));
    let run = env.wait(id, LIMIT).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");

    let beats = beats.lock().unwrap().clone();
    let first = beats[0].0.clone();
    let last_of_a = beats
        .iter()
        .filter(|(who, _)| *who == first)
        .map(|(_, at)| *at)
        .max()
        .unwrap();
    let first_of_b = beats.iter().filter(|(who, _)| *who != first).map(|(_, at)| *at).min();
    let first_of_b = first_of_b.expect("the step never ran on the second worker");
    assert!(
        last_of_a < first_of_b,
        "the cut-off worker's step was still running {:?} after the other worker's began",
        last_of_a - first_of_b
    );
    env.stop_workers().await;
}

#[tokio::test]
async fn revisions_and_branches_from_input_are_never_read_as_git_options() {
    use dayshift_workflows::adapters::git::GitConfig;
    let git = dayshift_tests::GitServer::start().await;
    git.create("infra", "main", &[("README.md", "hello\n")]);
    let config = GitConfig {
        url: git.url("infra"),
        author_name: "dayshift".into(),
        author_email: "dayshift@acme.io".into(),
        ..Default::default()
    };
    let scratch = std::env::temp_dir().join(format!("dayshift-pwned-{}", unique()));
    let hostile = format!("--output={}", scratch.display());
    let checkout = config.checkout("main").await.unwrap();
    assert!(checkout.message(&hostile).await.is_err());
    assert!(checkout.revert(&hostile, "x").await.is_err());
    for branch in [
        format!("--upload-pack=touch {}", scratch.display()),
        "main..x".into(),
        "a b".into(),
    ] {
        let e = config
            .checkout(&branch)
            .await
            .err()
            .expect("a hostile branch was checked out");
        assert!(e.to_string().contains("is not a branch name"), "{e}");
    }
    assert!(!scratch.exists(), "git wrote {}", scratch.display());
    // A branch name git accepts still works.
    assert!(!checkout.message("HEAD").await.unwrap().is_empty());
}

#[tokio::test]
async fn a_token_that_would_expire_beyond_any_date_is_refused_not_a_crash() {
    let env = TestEnv::new(vec![]).await;
    let api = Api::serve(&env).await;
    let admin = api.token("root", Role::Admin).await;
    for far in ["1000000years", "0s"] {
        let (status, body) = api
            .post(
                &admin,
                "/api/v1/tokens",
                &json!({ "name": format!("t-{far}"), "role": "viewer", "expires_in": far }),
            )
            .await;
        assert_eq!(status, 422, "{far}: {body}");
        assert!(body["error"].as_str().unwrap().contains("expires_in"), "{body}");
    }
    let (status, body) = api
        .post(
            &admin,
            "/api/v1/tokens",
            &json!({ "name": "ok", "role": "viewer", "expires_in": "90d" }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // The server is still there.
    assert_eq!(api.get(&admin, "/api/v1/tokens").await.0, 200);
}

#[tokio::test]
async fn a_slow_body_is_cut_off_and_requests_beyond_the_limit_are_shed_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::new(vec![]).await;
    let limits = dayshift_engine::api::ServerConfig {
        max_concurrent_requests: 2,
        body_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let api = Api::on(env.api().router(limits), &env.db.pool).await;
    let (addr, token) = (api.addr, api.token("op", Role::Operator).await);
    // A start whose body promises 100 bytes and sends 10.
    let slow = || async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"workflow\""
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s
    };
    let answer = |mut s: tokio::net::TcpStream| async move {
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    let (a, b) = (slow().await, slow().await);
    // Once both slots are held by the slow bodies, a third request is shed (503), not queued
    // behind them (it would then get 200).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let shed = loop {
        let r = dayshift_workflows::adapters::http::client()
            .get(format!("http://{addr}/api/v1/runs"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 503 || tokio::time::Instant::now() > deadline {
            break r;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(shed.status().as_u16(), 503);
    assert_eq!(shed.headers()["retry-after"], "1");
    // The slow bodies are cut off with 408, and nothing was started.
    for s in [a, b] {
        let text = answer(s).await;
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("did not arrive within"), "{text}");
    }
    let runs: i64 = sqlx::query_scalar("select count(*) from runs")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 0);
    // The slots are free again.
    let ok = dayshift_workflows::adapters::http::client()
        .get(format!("http://{addr}/api/v1/runs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
}

/// A JWT of the test identity provider, with key id `kid`.
fn oidc_token(kid: &str, claims: &Value) -> String {
    let pem = std::fs::read(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/oidc/signing-key.pem"))
        .unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

#[tokio::test]
async fn a_slow_identity_provider_and_random_key_ids_stall_no_login_and_nbf_is_checked() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    // Installs the TLS provider reqwest needs, as `dayshift` does at start.
    let _ = dayshift_workflows::adapters::http::client();
    // The provider's key endpoint answers only when the test lets it, and counts its calls.
    let jwks =
        std::fs::read_to_string(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/oidc/jwks.json"))
            .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let calls = Arc::new(AtomicUsize::new(0));
    let down_calls = Arc::new(AtomicUsize::new(0));
    let (g, c, d) = (gate.clone(), calls.clone(), down_calls.clone());
    let app = axum::Router::new()
        .route(
            "/certs",
            axum::routing::get(move || {
                let (jwks, g, c) = (jwks.clone(), g.clone(), c.clone());
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    g.acquire().await.unwrap().forget();
                    ([("content-type", "application/json")], jwks)
                }
            }),
        )
        .route(
            "/down",
            axum::routing::get(move || {
                let d = d.clone();
                async move {
                    d.fetch_add(1, Ordering::SeqCst);
                    (axum::http::StatusCode::BAD_GATEWAY, "down")
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sso = format!("http://{}", listener.local_addr().unwrap());
    let idp = tokio::spawn(async move { axum::serve(listener, app).await });
    let issuer = format!("{sso}/realms/platform");
    let oidc = |path: &str| {
        dayshift_engine::api::auth::Oidc::new(dayshift_engine::api::auth::OidcConfig {
            issuer: issuer.clone(),
            audience: "dayshift".into(),
            jwks_url: format!("{sso}{path}"),
            username_claim: "preferred_username".into(),
            roles_claim: "groups".into(),
            roles: vec![(Role::Viewer, vec!["platform".into()])],
        })
        .unwrap()
        // Unknown key ids may refetch at once: the single flight is what is tested.
        .with_cache_times(Duration::ZERO, Duration::from_secs(60))
    };
    let now = chrono::Utc::now().timestamp();
    let claims = |nbf: i64| {
        json!({ "iss": issuer, "aud": "dayshift", "preferred_username": "alice", "groups": ["platform"],
                "iat": now, "nbf": nbf, "exp": now + 300 })
    };
    let valid = oidc_token("platform-sso-1", &claims(now));

    let serve = |oidc: dayshift_engine::api::auth::Oidc| async move {
        let env = TestEnv::new(vec![]).await;
        let auth = dayshift_engine::api::auth::AuthConfig {
            oidc: Some(Arc::new(oidc)),
            ..Default::default()
        };
        let api = serve_with_auth(&env, auth, Default::default()).await;
        (env, api)
    };
    let (_env, api) = serve(oidc("/certs")).await;
    let base = api.base.clone();
    let login = |token: String| {
        let url = format!("{base}/api/v1/whoami");
        async move {
            let r = dayshift_workflows::adapters::http::client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    // The first login fetches the keys.
    gate.add_permits(1);
    assert_eq!(login(valid.clone()).await.0, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Ten tokens naming random key ids: one fetch goes out and hangs at the provider...
    let randoms: Vec<_> = (0..10)
        .map(|_| tokio::spawn(login(oidc_token(&unique(), &claims(now)))))
        .collect();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while calls.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refetch for an unknown key id"
        );
        tokio::task::yield_now().await;
    }
    // ...and a login with a known key is answered meanwhile, the fetch still hanging.
    let meanwhile = tokio::time::timeout(LIMIT, login(valid.clone()))
        .await
        .expect("a valid login waited on the provider");
    assert_eq!(meanwhile.0, 200, "{meanwhile:?}");
    assert_eq!(meanwhile.1["name"], "oidc:alice");
    gate.add_permits(100);
    for r in randoms {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 401, "{body}");
    }
    // The ten waited for that one fetch instead of each making its own.
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A token not valid yet is refused.
    let (status, body) = login(oidc_token("platform-sso-1", &claims(now + 3600))).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("ImmatureSignature"), "{body}");

    // A provider that is down is asked once, not once per login.
    let (_env2, api2) = serve(oidc("/down")).await;
    let base2 = api2.base.clone();
    let answers = futures::future::join_all((0..10).map(|_| {
        let url = format!("{base2}/api/v1/whoami");
        let token = valid.clone();
        async move {
            dayshift_workflows::adapters::http::client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    }))
    .await;
    assert!(answers.iter().all(|s| *s == 401), "{answers:?}");
    assert_eq!(down_calls.load(Ordering::SeqCst), 1);
    idp.abort();
}

#[tokio::test]
async fn an_operator_can_start_only_what_the_policy_names_and_is_told_which_field() {
    use dayshift_engine::policy::{Policy, Rule};
    let inputs = |pairs: &[(&str, &[&str])]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|x| x.to_string()).collect()))
            .collect()
    };
    // The platform's config: which roles, Vault paths and Secrets rotations may touch, the one
    // restore-test query, the infra repository's dev file; kv-secret rotations are admins'.
    let policy = Policy {
        rules: vec![
            Rule::new(
                "rotate.*",
                None,
                inputs(&[
                    ("role", &["app_*"]),
                    ("path", &["apps/*"]),
                    ("secrets[].namespace", &["shop"]),
                    ("secrets[].name", &["shop-*"]),
                ]),
            )
            .unwrap(),
            Rule::new(
                "rotate.kv-secret",
                Some(vec!["admin".parse().unwrap()]),
                Default::default(),
            )
            .unwrap(),
            Rule::new(
                "backup.restore-test",
                None,
                inputs(&[("checks[].query", &["select count(*) from orders"])]),
            )
            .unwrap(),
            Rule::new("promote.image", None, inputs(&[("file", &["envs/dev/values.yaml"])])).unwrap(),
        ],
    };
    let env = TestEnv::new(vec![]).await;
    let api = serve_with_auth(&env, Default::default(), policy).await;
    let base = api.base.clone();
    let op = dayshift_engine::api::auth::create_token(&env.db.pool, "op", Role::Operator, None, "test")
        .await
        .unwrap();
    let post = |path: String, body: Value| {
        let (url, op) = (format!("{base}{path}"), op.clone());
        async move {
            let r = dayshift_workflows::adapters::http::client()
                .post(url)
                .bearer_auth(op)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let rotate = json!({ "vault": "main", "path": "apps/shop/db", "admin": "pg", "role": "app_shop",
                         "secrets": [{ "namespace": "shop", "name": "shop-db", "key": "password" }] });
    let with = |field: &str, value: Value| {
        let mut i = rotate.clone();
        i[field] = value;
        i
    };
    let component = json!({ "component": "x", "manifests": "/etc", "namespace": "x" });
    let cases = [
        // The superuser's password, a Secret elsewhere, a Vault path elsewhere.
        (
            "rotate.postgres-password",
            with("role", json!("postgres")),
            "input field role (\"postgres\")",
        ),
        (
            "rotate.postgres-password",
            with(
                "secrets",
                json!([{ "namespace": "shop", "name": "shop-db", "key": "p" }, { "namespace": "kube-system", "name": "shop-x", "key": "p" }]),
            ),
            "secrets[1].namespace (\"kube-system\")",
        ),
        (
            "rotate.postgres-password",
            with("path", json!("platform/root")),
            "input field path",
        ),
        // A fresh secret sent to any URL: kv rotations are admins' here anyway.
        (
            "rotate.kv-secret",
            json!({ "vault": "main", "path": "apps/x", "key": "k", "check": { "url": "https://evil.example/" } }),
            "policy.workflows.\"rotate.kv-secret\".start allows admin",
        ),
        (
            "backup.restore-test",
            json!({ "store": "s", "database": "d", "server": "p", "checks": [{ "name": "n", "query": "select string_agg(passwd, ',') from pg_shadow" }] }),
            "checks[0].query",
        ),
        (
            "promote.image",
            json!({ "repository": "infra", "application": "a", "environment": "prod", "tag": "1", "file": "../../etc/passwd", "key": "a" }),
            "input field file (\"../../etc/passwd\")",
        ),
        (
            "install.component",
            component,
            "input field manifests (\"/etc\") is a privileged target and the config allows none",
        ),
        (
            "rotate.vault-database-root",
            json!({ "vault": "main", "connection": "billing" }),
            "input field connection (\"billing\")",
        ),
        (
            "restore.postgres",
            json!({ "store": "backups", "database": "shop", "target": "production" }),
            "input field target (\"production\")",
        ),
        (
            "backup.retention",
            json!({ "store": "backups", "source": "shop", "prefix": "", "policy": { "keep_last": 1 } }),
            "input field prefix",
        ),
        (
            "preview.create",
            json!({ "repository": "infra", "branch": "feat", "template": "../../../etc/passwd", "project": "default" }),
            "input field template",
        ),
        (
            "remediate",
            json!({ "playbook": "restart", "labels": { "namespace": "kube-system" } }),
            "started by its trigger only",
        ),
    ];
    for (workflow, input, expected) in &cases {
        let (status, body) = post("/api/v1/runs".into(), json!({ "workflow": workflow, "input": input })).await;
        assert_eq!(status, 403, "{workflow}: {body}");
        assert!(body["error"].as_str().unwrap().contains(expected), "{workflow}: {body}");
    }
    // Nothing was created, and every refusal is on the record.
    let runs: i64 = sqlx::query_scalar("select count(*) from runs")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 0);
    let refused: i64 =
        sqlx::query_scalar("select count(*) from audit_log where action = 'run.start.refused' and actor = 'token:op'")
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(refused, cases.len() as i64);

    // What the config names is started.
    let (status, body) = post(
        "/api/v1/runs".into(),
        json!({ "workflow": "rotate.postgres-password", "input": rotate }),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    // A retry is a start: a run made by a trigger with a target outside the policy is not
    // started again through the API.
    let outside = env
        .engine
        .start(dayshift_engine::StartRun::new(
            "rotate.postgres-password",
            with("role", json!("postgres")),
        ))
        .await
        .unwrap();
    // (It failed; no worker runs here, so it is marked so directly.)
    sqlx::query("update runs set status = 'failed', finished_at = now(), wake_at = null where id = $1")
        .bind(outside.id.0)
        .execute(&env.db.pool)
        .await
        .unwrap();
    let (status, body) = post(format!("/api/v1/runs/{}/retry", outside.id), json!({})).await;
    assert_eq!(status, 403, "{body}");

    // The caller is told what it may start and which fields the config bounds.
    let listed = dayshift_workflows::adapters::http::client()
        .get(format!("{base}/api/v1/workflows"))
        .bearer_auth(&op)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let find = |name: &str| {
        listed["workflows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(find("rotate.kv-secret")["may_start"], false);
    assert_eq!(find("rotate.postgres-password")["may_start"], true);
    assert!(
        find("rotate.postgres-password")["guarded_inputs"]
            .as_array()
            .unwrap()
            .contains(&json!("role"))
    );
    assert_eq!(find("remediate")["may_start"], false);
}

#[test]
fn repository_paths_stay_inside_their_checkout() {
    use dayshift_workflows::adapters::git::inside;
    let root = std::env::temp_dir().join(format!("dayshift-checkout-{}", unique()));
    std::fs::create_dir_all(root.join("envs/dev")).unwrap();
    std::fs::write(root.join("envs/dev/values.yaml"), "a: 1\n").unwrap();
    std::os::unix::fs::symlink("/etc", root.join("envs/escape")).unwrap();
    std::os::unix::fs::symlink("/nonexistent-dayshift", root.join("dangling")).unwrap();
    assert_eq!(
        inside(&root, "envs/dev/values.yaml").unwrap(),
        root.join("envs/dev/values.yaml")
    );
    // A path that does not exist yet (a new preview's directory) is fine inside.
    assert!(inside(&root, "previews/feat/values.yaml").is_ok());
    for hostile in [
        "/etc/passwd",
        "../../etc/passwd",
        "envs/../../x",
        "envs/escape/passwd",
        "dangling/x",
        "",
    ] {
        let e = inside(&root, hostile).expect_err(hostile);
        assert!(e.contains("repository"), "{hostile}: {e}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test]
async fn headers_sent_a_byte_at_a_time_are_cut_off_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = TestEnv::new(vec![]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = dayshift_engine::api::ServerConfig {
        header_timeout: Duration::from_secs(2),
        max_connections: 2,
        ..Default::default()
    };
    let app = env.api().router(limits.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let server = tokio::spawn(async move {
        dayshift_engine::api::serve(listener, app, &limits, async move { s.cancelled().await })
            .await
            .unwrap();
    });
    // Two clients that never finish their headers hold the two connections...
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        slow.push(c);
    }
    // ...until their header deadline closes them.
    for mut c in slow {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(LIMIT, c.read(&mut buf))
            .await
            .expect("never closed")
            .unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    // The slots are free again: a whole request is answered.
    let ok = dayshift_workflows::adapters::http::client()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    // With the cap at two, of three connections held open at once one is closed as it arrives.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        held.push(c);
    }
    let mut open = 0;
    for c in held.iter_mut() {
        let mut b = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(200), c.read(&mut b)).await {
            Err(_) => open += 1,
            Ok(r) => assert!(matches!(r, Ok(0) | Err(_)), "{r:?}"),
        }
    }
    assert!(open <= 2, "{open} connections open beyond max-connections");
    assert!(open >= 1, "no connection was served at all");
    drop(held);
    stop.cancel();
    server.await.unwrap();
}

#[tokio::test]
async fn a_request_past_its_deadline_gets_504_and_still_completes_whole() {
    let env = TestEnv::new(vec![]).await;
    let limits = dayshift_engine::api::ServerConfig {
        request_timeout: Duration::ZERO,
        ..Default::default()
    };
    let api = Api::on(env.api().router(limits), &env.db.pool).await;
    let (addr, token) = (api.addr, api.token("op", Role::Operator).await);
    let key = format!("late-{}", unique());
    let r = dayshift_workflows::adapters::http::client()
        .post(format!("http://{addr}/api/v1/runs"))
        .bearer_auth(&token)
        .json(&json!({ "workflow": "selftest.chain", "input": { "steps": 1 }, "idempotency_key": key }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 504);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("may still complete"), "{body}");
    // The start was not cut off: its run and its audit entry are there, whole.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let found: Option<(String,)> = sqlx::query_as("select started_by from runs where idempotency_key = $1")
            .bind(&key)
            .fetch_optional(&env.db.pool)
            .await
            .unwrap();
        if let Some((by,)) = found {
            assert_eq!(by, "api:token:op");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the late start never completed");
        tokio::task::yield_now().await;
    }
}

/// Roles are declared on the routes themselves: every route of the table that names a role
/// refuses a caller without a token (401) and one with the role below it (403), and changes
/// nothing; public routes and intakes are exactly those the table says. A route added without
/// an access does not compile (`Routes` takes one with every route).
#[tokio::test]
async fn every_route_refuses_a_caller_below_the_role_it_declares() {
    use dayshift_engine::api::{Access, ServerConfig, route_table};
    let env = TestEnv::new(vec![]).await;
    let state = env.api();
    let table = route_table(&state);
    let api = Api::on(state.router(ServerConfig::default()), &env.db.pool).await;
    let weaker = |role: Role| match role {
        Role::Viewer => None,
        Role::Operator => Some(Role::Viewer),
        Role::Admin => Some(Role::Operator),
    };
    let viewer = api.token("weaker-viewer", Role::Viewer).await;
    let operator = api.token("weaker-operator", Role::Operator).await;
    let before = env.db.table_checksums().await;
    let client = dayshift_workflows::adapters::http::client();
    let mut roles = 0;
    for route in &table {
        let path = route
            .path
            .replace("{id}", &RunId::new().to_string())
            .replace("{name}", "x")
            .replace("{*path}", "x");
        let Access::Role(role) = route.access else {
            continue;
        };
        roles += 1;
        let call = |token: Option<String>| {
            let mut request = client.request(route.method.clone(), format!("{}{path}", api.base));
            if let Some(t) = token {
                request = request.bearer_auth(t);
            }
            async move { request.send().await.unwrap().status().as_u16() }
        };
        assert_eq!(call(None).await, 401, "{} {} without a token", route.method, route.path);
        if let Some(weaker) = weaker(role) {
            let token = if weaker == Role::Viewer { &viewer } else { &operator };
            assert_eq!(
                call(Some(token.clone())).await,
                403,
                "{} {} with the {weaker} role (it declares {role})",
                route.method,
                route.path
            );
        }
    }
    assert!(roles >= 25, "the table lists the API's routes: {table:#?}");
    let public: Vec<&str> = table
        .iter()
        .filter(|r| r.access == Access::Public)
        .map(|r| r.path)
        .collect();
    assert_eq!(
        public,
        [
            "/healthz",
            "/readyz",
            "/metrics",
            "/",
            "/console",
            "/console/",
            "/console/{*path}"
        ]
    );
    let intakes: Vec<&str> = table
        .iter()
        .filter(|r| r.access == Access::Intake)
        .map(|r| r.path)
        .collect();
    assert_eq!(intakes, ["/hooks/alertmanager", "/hooks/{forge}"]);
    // Nothing changed but the tokens' last use.
    let after = env.db.table_checksums().await;
    let changed: Vec<_> = after
        .iter()
        .filter(|t| !before.contains(t) && t.0 != "api_tokens")
        .collect();
    assert!(changed.is_empty(), "refused calls changed {changed:?}");
}
