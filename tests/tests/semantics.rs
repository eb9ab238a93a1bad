//! The durable-execution contract, against real PostgreSQL and Redis, with engines and workers
//! in this process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dayshift_engine::{
    ConcurrencyPolicy, Ctx, RetryPolicy, RunStatus, StartRun, StepCtx, StepError, StepKind, StepStatus, WorkflowDef,
};
use dayshift_tests::{OwnRedis, TestEnv, assert_succeeded, fast_worker, unique, wait_for};
use serde_json::{Value, json};
use sqlx::PgPool;

const LIMIT: Duration = Duration::from_secs(60);

fn chain(steps: u32, sleep_ms: u64, table: &str) -> Value {
    json!({ "steps": steps, "sleep_ms": sleep_ms, "fail_first": 0, "side_effects": table })
}

#[tokio::test]
async fn a_fast_step_shows_how_long_it_ran() {
    // Steps faster than the in-flight marker are journaled once, when they end; their duration
    // must still be theirs, not zero. A slower one is marked in flight first (20 ms after it
    // began, committed later still): its duration is still all of it, not what followed the mark.
    let def = WorkflowDef::new(
        "test.timed",
        "two short steps and a longer one",
        |ctx: Ctx, _: Value| async move {
            for (name, ms) in [("first", 12), ("second", 12), ("third", 60)] {
                ctx.step(name, move |_s| async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok::<_, StepError>(())
                })
                .await?;
            }
            Ok(())
        },
    );
    let mut env = TestEnv::new(vec![def]).await;
    env.start_worker(fast_worker("w"));
    let run = env.run_within("test.timed", json!(null), Duration::from_secs(30)).await;
    assert_succeeded(&run);
    for step in &run.steps {
        let ms = step.duration_ms.unwrap();
        let slept = if step.name == "third" { 60 } else { 12 };
        assert!((slept..1000).contains(&ms), "{}: {ms} ms", step.name);
    }
    assert_eq!(run.steps.len(), 3);
    env.stop_workers().await;
}

#[tokio::test]
async fn permanent_error_fails_the_run_at_once() {
    let attempts = Arc::new(Mutex::new(0u32));
    let a = attempts.clone();
    let def = WorkflowDef::new("test.permanent", "fails for good", move |ctx: Ctx, _: Value| {
        let a = a.clone();
        async move {
            ctx.step("forbidden", move |_s| async move {
                *a.lock().unwrap() += 1;
                Err::<(), _>(StepError::permanent("403 forbidden: token lacks write access"))
            })
            .retry(RetryPolicy {
                max_attempts: 10,
                ..RetryPolicy::default()
            })
            .await?;
            Ok(())
        }
    });
    let mut env = TestEnv::new(vec![def]).await;
    env.start_worker(fast_worker("w"));
    let run = env.run("test.permanent", json!(null)).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(run.error.as_deref().unwrap().contains("403 forbidden"), "{run:#?}");
    assert_eq!(*attempts.lock().unwrap(), 1, "a permanent error must not be retried");
    assert_eq!(run.steps[0].attempts, 1);
    assert_eq!(run.steps[0].status, StepStatus::Failed);
    env.stop_workers().await;
}

#[tokio::test]
async fn retries_stop_after_max_attempts() {
    let def = WorkflowDef::new("test.flaky", "always transient", |ctx: Ctx, _: Value| async move {
        ctx.step("flaky", |s: StepCtx| async move {
            Err::<(), _>(StepError::transient(format!("503 on attempt {}", s.attempt)))
        })
        .retry(RetryPolicy {
            max_attempts: 3,
            initial_delay: Duration::from_millis(20),
            multiplier: 2.0,
            max_delay: Duration::from_millis(100),
            jitter: 0.0,
        })
        .await?;
        Ok(())
    });
    let mut env = TestEnv::new(vec![def]).await;
    env.start_worker(fast_worker("w"));
    let run = env.run("test.flaky", json!(null)).await;
    assert_eq!(run.status, RunStatus::Failed);
    let step = &run.steps[0];
    assert_eq!(step.attempts, 3);
    let errors: Vec<_> = step.errors.iter().map(|e| e.error.as_str()).collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].contains("503 on attempt 1") && errors[2].contains("503 on attempt 3"),
        "{errors:?}"
    );
    assert!(
        step.last_error.as_deref().unwrap().contains("attempt 3 of 3"),
        "{step:#?}"
    );
    env.stop_workers().await;
}

#[tokio::test]
async fn redis_flushall_with_100_runs_in_flight_loses_none() {
    let redis = OwnRedis::start().await.expect("own redis");
    let mut env = TestEnv::builder(vec![]).redis(&redis.url).build().await;
    env.start_worker(fast_worker("a"));
    env.start_worker(fast_worker("b"));
    let table = format!("fx_{}", unique());
    let mut ids = Vec::new();
    for _ in 0..100 {
        let s = env
            .engine
            .start(StartRun::new("selftest.chain", chain(3, 50, &table)))
            .await
            .unwrap();
        ids.push(s.id);
    }
    // Wait until some runs are in flight, then lose every job and every worker heartbeat.
    let pool = env.db.pool.clone();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let started: i64 = sqlx::query_scalar("select count(*) from steps")
            .fetch_one(&pool)
            .await
            .unwrap();
        if started >= 20 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "runs never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.flushall().await.unwrap();
    for id in &ids {
        assert_succeeded(&env.wait(*id, LIMIT).await);
    }
    // Every step of every run completed exactly once in the journal.
    let journaled: i64 = sqlx::query_scalar("select count(*) from steps where status = 'succeeded'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(journaled, 300);
    env.stop_workers().await;
}

/// Steps record when they start and end; overlapping intervals within one run would mean two
/// workers advanced it at once.
#[tokio::test]
async fn two_workers_never_run_steps_of_the_same_run_at_once() {
    let def = |pool: PgPool| {
        WorkflowDef::new("test.timed", "records step intervals", move |ctx: Ctx, _: Value| {
            let pool = pool.clone();
            async move {
                for i in 0..4 {
                    let pool = pool.clone();
                    ctx.step(format!("s{i}"), move |s: StepCtx| async move {
                        let started = chrono::Utc::now();
                        tokio::time::sleep(Duration::from_millis(15)).await;
                        sqlx::query("insert into intervals (run_id, step, started, ended) values ($1, $2, $3, now())")
                            .bind(s.run_id.to_string())
                            .bind(&s.step)
                            .bind(started)
                            .execute(&pool)
                            .await
                            .map_err(StepError::transient)?;
                        Ok(())
                    })
                    .await?;
                }
                Ok(())
            }
        })
    };
    let mut env = TestEnv::new(vec![]).await;
    sqlx::query("create table intervals (run_id text, step text, started timestamptz, ended timestamptz)")
        .execute(&env.db.pool)
        .await
        .unwrap();
    let engine = env.engine_with(vec![def(env.db.pool.clone())]).await;
    for name in ["a", "b", "c"] {
        env.start_worker_on(engine.clone(), fast_worker(name));
    }
    let mut ids = Vec::new();
    for _ in 0..30 {
        let s = engine.start(StartRun::new("test.timed", json!(null))).await.unwrap();
        // Duplicate wake-ups: every worker is told about every run several times.
        for _ in 0..5 {
            engine.queue().enqueue(s.id).await.unwrap();
        }
        ids.push(s.id);
    }
    for id in &ids {
        assert_succeeded(&wait_for(&engine, *id, LIMIT, |r| r.status.is_terminal()).await);
    }
    let overlaps: i64 = sqlx::query_scalar(
        "select count(*) from intervals a join intervals b on a.run_id = b.run_id and a.step < b.step \
         and a.started < b.ended and b.started < a.ended",
    )
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(overlaps, 0, "steps of one run overlapped in time");
    let per_step: Vec<i64> = sqlx::query_scalar("select count(*) from intervals group by run_id, step")
        .fetch_all(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(per_step.len(), 120);
    assert!(per_step.iter().all(|&n| n == 1), "a step ran twice: {per_step:?}");
    env.stop_workers().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_first_run() {
    let env = TestEnv::new(vec![]).await;
    let req = StartRun::new("selftest.chain", json!({ "steps": 1 })).idempotency_key("deploy-42");
    let first = env.engine.start(req.clone()).await.unwrap();
    let second = env.engine.start(req).await.unwrap();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.id, second.id);
    let other = env
        .engine
        .start(StartRun::new("selftest.gate", json!({})).idempotency_key("deploy-42"))
        .await;
    assert!(
        matches!(other, Err(dayshift_engine::EngineError::Conflict(_))),
        "reusing a key for another workflow must be refused: {other:?}"
    );
}

#[tokio::test]
async fn concurrency_limit_one_queues_or_skips_the_second_run() {
    let mut env = TestEnv::new(vec![]).await;
    env.start_worker(fast_worker("w"));
    let gate =
        |policy| StartRun::new("selftest.gate", json!({ "signal": "go" })).concurrency("promote:web:prod", 1, policy);
    let first = env.engine.start(gate(ConcurrencyPolicy::Queue)).await.unwrap();
    let queued = env.engine.start(gate(ConcurrencyPolicy::Queue)).await.unwrap();
    assert_eq!(queued.status, RunStatus::Pending);
    assert!(queued.note.as_deref().unwrap().contains("queued"), "{queued:?}");
    let skipped = env.engine.start(gate(ConcurrencyPolicy::Skip)).await.unwrap();
    assert_eq!(skipped.status, RunStatus::Cancelled);
    assert!(skipped.note.as_deref().unwrap().contains("skipped"), "{skipped:?}");

    // The first run holds the key while it waits; the queued one has not started.
    wait_for(&env.engine, first.id, LIMIT, |r| r.status == RunStatus::Waiting).await;
    let q = env.engine.get_run(queued.id).await.unwrap();
    assert_eq!(q.status, RunStatus::Pending);
    assert!(q.steps.is_empty(), "the queued run must not start: {q:#?}");

    env.engine.signal(first.id, "go", json!("ok"), "test").await.unwrap();
    assert_succeeded(&env.wait(first.id, LIMIT).await);
    // Now the queued run gets the slot and starts.
    wait_for(&env.engine, queued.id, LIMIT, |r| r.status == RunStatus::Waiting).await;
    env.engine.signal(queued.id, "go", json!("ok"), "test").await.unwrap();
    assert_succeeded(&env.wait(queued.id, LIMIT).await);
    env.stop_workers().await;
}

#[tokio::test]
async fn latest_wins_coalesces_a_burst_to_the_newest_run() {
    let mut env = TestEnv::new(vec![]).await;
    env.start_worker(fast_worker("w"));
    let start = || {
        env.engine
            .start(StartRun::new("selftest.gate", json!({ "signal": "go" })).concurrency(
                "promote:api:stg",
                1,
                ConcurrencyPolicy::LatestWins,
            ))
    };
    let holder = start().await.unwrap();
    let mut burst = Vec::new();
    for _ in 0..5 {
        burst.push(start().await.unwrap());
    }
    for superseded in &burst[..4] {
        let r = env.engine.get_run(superseded.id).await.unwrap();
        assert_eq!(r.status, RunStatus::Cancelled, "{r:#?}");
        assert!(r.error.unwrap().contains("superseded"));
    }
    let newest = burst.last().unwrap();
    wait_for(&env.engine, holder.id, LIMIT, |r| r.status == RunStatus::Waiting).await;
    env.engine.signal(holder.id, "go", json!(1), "test").await.unwrap();
    wait_for(&env.engine, newest.id, LIMIT, |r| r.status == RunStatus::Waiting).await;
    env.engine.signal(newest.id, "go", json!(2), "test").await.unwrap();
    assert_succeeded(&env.wait(newest.id, LIMIT).await);
    env.stop_workers().await;
}

/// A workflow of three steps that each add a row and register an undo that removes it; the
/// third step is slow (it is the one in flight when the run is cancelled).
fn rows_workflow(pool: PgPool, slow_last: bool) -> WorkflowDef {
    WorkflowDef::new("test.rows", "adds rows, undoes them", move |ctx: Ctx, _: Value| {
        let pool = pool.clone();
        async move {
            for name in ["a", "b", "c"] {
                let (p1, p2) = (pool.clone(), pool.clone());
                let slow = slow_last && name == "c";
                // Items are per run, so an undo removes exactly what its run added; the insert
                // is idempotent, so a repeated attempt adds nothing more.
                ctx.step(name, move |s: StepCtx| async move {
                    let item = format!("{}:{}", s.run_id, s.step);
                    sqlx::query("insert into world (item) values ($1) on conflict do nothing")
                        .bind(&item)
                        .execute(&p1)
                        .await
                        .map_err(StepError::transient)?;
                    if slow {
                        tokio::time::sleep(Duration::from_secs(300)).await;
                    }
                    Ok(item)
                })
                .undo(move |_s, item: String| async move {
                    sqlx::query("delete from world where item = $1")
                        .bind(&item)
                        .execute(&p2)
                        .await
                        .map_err(StepError::transient)?;
                    sqlx::query("insert into undo_log (item) values ($1)")
                        .bind(&item)
                        .execute(&p2)
                        .await
                        .map_err(StepError::transient)?;
                    Ok(())
                })
                .await?;
            }
            Ok(())
        }
    })
}

async fn world_tables(pool: &PgPool) {
    sqlx::query("create table world (item text primary key)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("create table undo_log (id serial, item text)")
        .execute(pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn cancellation_stops_the_step_in_flight_and_runs_undos_in_reverse() {
    let mut env = TestEnv::new(vec![]).await;
    world_tables(&env.db.pool).await;
    let engine = env.engine_with(vec![rows_workflow(env.db.pool.clone(), true)]).await;
    env.start_worker_on(engine.clone(), fast_worker("w"));
    let started = engine.start(StartRun::new("test.rows", json!(null))).await.unwrap();
    // Wait until step c is in flight.
    wait_for(&engine, started.id, LIMIT, |r| {
        r.steps.iter().any(|s| s.name == "c" && s.status == StepStatus::Running)
    })
    .await;
    let t0 = std::time::Instant::now();
    engine.cancel(started.id, Some("change freeze"), "test").await.unwrap();
    let run = wait_for(&engine, started.id, LIMIT, |r| r.status.is_terminal()).await;
    assert_eq!(run.status, RunStatus::Cancelled, "{run:#?}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the in-flight step was not interrupted"
    );
    let c = run.steps.iter().find(|s| s.name == "c").unwrap();
    assert_eq!(c.status, StepStatus::Cancelled);
    let undos: Vec<_> = run
        .steps
        .iter()
        .filter(|s| s.kind == StepKind::Undo)
        .map(|s| (s.name.as_str(), s.status))
        .collect();
    assert_eq!(
        undos,
        vec![("undo:b", StepStatus::Succeeded), ("undo:a", StepStatus::Succeeded)]
    );
    let log: Vec<String> = sqlx::query_scalar("select split_part(item, ':', 2) from undo_log order by id")
        .fetch_all(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(log, vec!["b", "a"]);
    // c's own row stays: it never completed, so it has no undo (its step must be idempotent).
    let world: Vec<String> = sqlx::query_scalar("select split_part(item, ':', 2) from world order by item")
        .fetch_all(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(world, vec!["c"]);
    assert_eq!(run.error.as_deref(), Some("change freeze"));
    env.stop_workers().await;
}

#[tokio::test]
async fn failure_at_each_step_runs_exactly_the_undos_before_it() {
    // The world lives in a database of its own, which the workflow's steps and undos change.
    let shared = dayshift_tests::TestDb::new().await;
    world_tables(&shared.pool).await;
    let pool = shared.pool.clone();
    let snapshot_pool = pool.clone();
    dayshift_tests::saga::failure_at_each_step_compensates(
        TestEnv::builder(vec![rows_workflow(pool.clone(), false)]),
        "test.rows",
        json!(null),
        move |_env| {
            let p = snapshot_pool.clone();
            async move {
                let rows: Vec<String> = sqlx::query_scalar("select item from world order by item")
                    .fetch_all(&p)
                    .await
                    .unwrap();
                rows
            }
        },
    )
    .await;
    let log: Vec<String> = sqlx::query_scalar("select split_part(item, ':', 2) from undo_log order by id")
        .fetch_all(&pool)
        .await
        .unwrap();
    // Failure at a: no undo. At b: undo a. At c: undo b, then a.
    assert_eq!(log, vec!["a", "b", "a"]);
}

#[tokio::test]
async fn reordered_steps_under_a_running_run_stop_it_with_a_non_determinism_error() {
    let executed: Arc<Mutex<Vec<String>>> = Arc::default();
    let flow = |order: [&'static str; 2], log: Arc<Mutex<Vec<String>>>| {
        WorkflowDef::new("test.order", "two steps around a signal", move |ctx: Ctx, _: Value| {
            let log = log.clone();
            async move {
                let l = log.clone();
                ctx.step(order[0], move |s: StepCtx| async move {
                    l.lock().unwrap().push(s.step.clone());
                    Ok(())
                })
                .await?;
                ctx.wait_signal("continue", Duration::from_secs(600)).await?;
                let l = log.clone();
                ctx.step(order[1], move |s: StepCtx| async move {
                    l.lock().unwrap().push(s.step.clone());
                    Ok(())
                })
                .await?;
                Ok(())
            }
        })
    };
    let mut env = TestEnv::new(vec![flow(["first", "second"], executed.clone())]).await;
    env.start_worker(fast_worker("v1"));
    let started = env
        .engine
        .start(StartRun::new("test.order", json!(null)))
        .await
        .unwrap();
    wait_for(&env.engine, started.id, LIMIT, |r| r.status == RunStatus::Waiting).await;
    env.stop_workers().await;

    // A new release swaps the steps; the run's journal says "first" came first.
    let v2 = env.engine_with(vec![flow(["second", "first"], executed.clone())]).await;
    env.start_worker_on(v2.clone(), fast_worker("v2"));
    v2.signal(started.id, "continue", json!(null), "test").await.unwrap();
    let run = wait_for(&v2, started.id, LIMIT, |r| r.status.is_terminal()).await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.unwrap();
    assert!(error.contains("non-determinism at journal position 0"), "{error}");
    assert!(error.contains("'first'") && error.contains("'second'"), "{error}");
    assert_eq!(*executed.lock().unwrap(), vec!["first"], "nothing else may run");
    env.stop_workers().await;
}

#[tokio::test]
async fn a_child_run_returns_its_result_to_the_parent() {
    let parent = WorkflowDef::new(
        "test.parent",
        "runs a chain as a child",
        |ctx: Ctx, _: Value| async move {
            let out: Value = ctx.child("selftest.chain", json!({ "steps": 2 })).await?;
            Ok(json!({ "child": out }))
        },
    );
    let mut env = TestEnv::new(vec![parent]).await;
    env.start_worker(fast_worker("w"));
    let started = env
        .engine
        .start(StartRun::new("test.parent", json!(null)))
        .await
        .unwrap();
    let run = env.wait(started.id, LIMIT).await;
    assert_succeeded(&run);
    assert_eq!(run.output.unwrap()["child"], json!({ "steps": 2, "attempts": [1, 1] }));
    let child_id = run.steps[0].child_run_id.expect("child id");
    let child = env.engine.get_run(child_id).await.unwrap();
    assert_eq!(child.parent_run_id, Some(started.id));
    assert_eq!(child.started_by, format!("parent:{}", started.id));
    env.stop_workers().await;
}

#[tokio::test]
async fn a_sensitive_result_is_never_stored_or_logged() {
    let secret = format!("s3cr3t-{}", unique());
    let (s1, seen) = (secret.clone(), Arc::new(Mutex::new(None::<String>)));
    let seen2 = seen.clone();
    let def = WorkflowDef::new("test.secret", "uses a secret", move |ctx: Ctx, _: Value| {
        let (s1, seen) = (s1.clone(), seen2.clone());
        async move {
            let token: String = ctx
                .step("read-token", move |_s| async move { Ok(s1) })
                .sensitive()
                .await?;
            ctx.sleep("settle", Duration::from_millis(50)).await?;
            // After the sleep the run is replayed: the token is re-derived, not read back.
            let len = ctx
                .step("use-token", move |_s| async move {
                    *seen.lock().unwrap() = Some(token.clone());
                    Ok(token.len())
                })
                .await?;
            Ok(json!({ "token_length": len }))
        }
    });
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("trace,sqlx=trace")
        .with_writer(move || LogSink(writer.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut env = TestEnv::new(vec![def]).await;
    env.start_worker(fast_worker("w"));
    let run = env.run("test.secret", json!(null)).await;
    assert_succeeded(&run);
    assert_eq!(
        seen.lock().unwrap().as_deref(),
        Some(secret.as_str()),
        "the step got the secret"
    );
    let step = &run.steps[0];
    assert!(step.sensitive && step.output.is_none(), "{step:#?}");
    env.stop_workers().await;

    let dump = env.db.dump().await;
    assert!(dump.contains("read-token"), "the dump must cover the journal");
    assert!(!dump.contains(&secret), "the secret is in PostgreSQL");
    let api = serde_json::to_string(&env.engine.get_run(run.id).await.unwrap()).unwrap();
    assert!(!api.contains(&secret), "the secret is in the API output");
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(logged.contains("Run finished"), "the logs were captured");
    assert!(!logged.contains(&secret), "the secret is in the logs");
}

#[derive(Clone)]
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_step_that_exceeds_its_timeout_is_retried_then_fails() {
    let def = WorkflowDef::new("test.slow", "a step that hangs", |ctx: Ctx, _: Value| async move {
        ctx.step("hang", |_s| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, StepError>(())
        })
        .timeout(Duration::from_millis(100))
        .retry(RetryPolicy {
            max_attempts: 2,
            initial_delay: Duration::from_millis(10),
            multiplier: 1.0,
            max_delay: Duration::from_millis(10),
            jitter: 0.0,
        })
        .await?;
        Ok(())
    });
    let mut env = TestEnv::new(vec![def]).await;
    env.start_worker(fast_worker("w"));
    let run = env.run("test.slow", json!(null)).await;
    assert_eq!(run.status, RunStatus::Failed);
    let step = &run.steps[0];
    assert_eq!(step.attempts, 2);
    assert!(
        step.errors.iter().all(|e| e.error.contains("timed out after 100 ms")),
        "{step:#?}"
    );
    env.stop_workers().await;
}

#[tokio::test]
async fn cancel_older_cancels_the_run_holding_the_key_then_starts() {
    let mut env = TestEnv::new(vec![]).await;
    env.start_worker(fast_worker("w"));
    let start = |policy| {
        env.engine
            .start(StartRun::new("selftest.gate", json!({ "signal": "go" })).concurrency("rotate:vault:db", 1, policy))
    };
    let older = start(ConcurrencyPolicy::Queue).await.unwrap();
    wait_for(&env.engine, older.id, LIMIT, |r| r.status == RunStatus::Waiting).await;
    let newer = start(ConcurrencyPolicy::CancelOlder).await.unwrap();
    let old = env.wait(older.id, LIMIT).await;
    assert_eq!(old.status, RunStatus::Cancelled);
    assert!(
        old.error
            .unwrap()
            .contains(&format!("cancelled by newer run {}", newer.id))
    );
    wait_for(&env.engine, newer.id, LIMIT, |r| r.status == RunStatus::Waiting).await;
    env.engine.signal(newer.id, "go", json!(true), "test").await.unwrap();
    assert_succeeded(&env.wait(newer.id, LIMIT).await);
    env.stop_workers().await;
}

#[tokio::test]
async fn cancelling_a_parent_cancels_its_child() {
    let parent = WorkflowDef::new(
        "test.parent-gate",
        "waits on a child gate",
        |ctx: Ctx, _: Value| async move {
            let _: Value = ctx.child("selftest.gate", json!({ "signal": "go" })).await?;
            Ok(())
        },
    );
    let mut env = TestEnv::new(vec![parent]).await;
    env.start_worker(fast_worker("w"));
    let started = env
        .engine
        .start(StartRun::new("test.parent-gate", json!(null)))
        .await
        .unwrap();
    let waiting = wait_for(&env.engine, started.id, LIMIT, |r| {
        r.status == RunStatus::Waiting && r.steps.first().is_some_and(|s| s.child_run_id.is_some())
    })
    .await;
    let child_id = waiting.steps[0].child_run_id.unwrap();
    wait_for(&env.engine, child_id, LIMIT, |r| r.status == RunStatus::Waiting).await;
    env.engine.cancel(started.id, None, "test").await.unwrap();
    assert_eq!(env.wait(started.id, LIMIT).await.status, RunStatus::Cancelled);
    let child = env.wait(child_id, LIMIT).await;
    assert_eq!(child.status, RunStatus::Cancelled);
    assert_eq!(child.error.as_deref(), Some("parent run cancelled"));
    env.stop_workers().await;
}

#[tokio::test]
async fn a_panicking_step_fails_its_run_and_the_worker_goes_on() {
    let def = WorkflowDef::new("test.panics", "a buggy step", |ctx: Ctx, _: Value| async move {
        ctx.step("buggy", |_s| async {
            let v: Vec<u32> = Vec::new();
            Ok::<_, StepError>(v[3])
        })
        .await?;
        Ok(())
    });
    let mut env = TestEnv::new(vec![def]).await;
    env.start_worker(fast_worker("w"));
    let run = env.run("test.panics", json!(null)).await;
    assert_eq!(run.status, RunStatus::Failed);
    assert!(
        run.error
            .as_deref()
            .unwrap()
            .contains("step panicked: index out of bounds"),
        "{run:#?}"
    );
    assert_eq!(run.steps[0].attempts, 1, "a panic is not retried");
    // The same worker still runs other runs.
    assert_succeeded(&env.run("selftest.chain", json!({ "steps": 1 })).await);
    env.stop_workers().await;
}

/// A run cancelled during a sleep whose compensation waits (an undo retrying) until past the
/// sleep's deadline: the replay must stop at the cancelled sleep, not wake up from it. (The
/// sleep is long enough for the cancellation to reach it on a busy machine.)
#[tokio::test]
async fn a_cancelled_sleep_stays_cancelled_when_compensation_outlives_it() {
    let after: Arc<Mutex<u32>> = Arc::default();
    let undo_attempts: Arc<Mutex<u32>> = Arc::default();
    let (a, u) = (after.clone(), undo_attempts.clone());
    let def = WorkflowDef::new("test.nap", "a step, a sleep, a step", move |ctx: Ctx, _: Value| {
        let (a, u) = (a.clone(), u.clone());
        async move {
            ctx.step("reserve", |_s| async { Ok::<_, StepError>("slot-1".to_string()) })
                .retry(RetryPolicy {
                    max_attempts: 3,
                    initial_delay: Duration::from_millis(1500),
                    multiplier: 1.0,
                    max_delay: Duration::from_millis(1500),
                    jitter: 0.0,
                })
                .undo(move |_s, _slot: String| async move {
                    let mut n = u.lock().unwrap();
                    *n += 1;
                    if *n == 1 {
                        Err(StepError::transient("release endpoint busy"))
                    } else {
                        Ok(())
                    }
                })
                .await?;
            ctx.sleep("nap", Duration::from_millis(1000)).await?;
            ctx.step("after-nap", move |_s| async move {
                *a.lock().unwrap() += 1;
                Ok::<_, StepError>(())
            })
            .await?;
            Ok(())
        }
    });
    let mut env = TestEnv::new(vec![def]).await;
    env.start_worker(fast_worker("w"));
    let started = env.engine.start(StartRun::new("test.nap", json!(null))).await.unwrap();
    wait_for(&env.engine, started.id, LIMIT, |r| r.status == RunStatus::Waiting).await;
    env.engine.cancel(started.id, None, "test").await.unwrap();
    let run = env.wait(started.id, LIMIT).await;
    assert_eq!(run.status, RunStatus::Cancelled, "{run:#?}");
    assert_eq!(
        *undo_attempts.lock().unwrap(),
        2,
        "the undo's retry came after the sleep's deadline"
    );
    assert_eq!(*after.lock().unwrap(), 0, "the workflow went on past a cancelled sleep");
    let nap = run.steps.iter().find(|s| s.name == "nap").unwrap();
    assert_eq!(nap.status, StepStatus::Cancelled);
    let undo = run.steps.iter().find(|s| s.name == "undo:reserve").unwrap();
    assert_eq!((undo.status, undo.attempts), (StepStatus::Succeeded, 2));
    env.stop_workers().await;
}

/// FLUSHALL while the worker's only slot is busy: the first thing its consumer says to Redis
/// afterwards is the acknowledgement of the finished job, which fails because the job is gone,
/// and the consumer stops. The worker must start a new one, or no later run would be fetched.
#[tokio::test]
async fn a_consumer_silenced_by_lost_redis_data_is_replaced() {
    let redis = OwnRedis::start().await.expect("own redis");
    let mut env = TestEnv::builder(vec![]).redis(&redis.url).build().await;
    env.start_worker(dayshift_engine::WorkerConfig {
        concurrency: 1,
        ..fast_worker("solo")
    });
    let first = env
        .engine
        .start(StartRun::new("selftest.chain", json!({ "steps": 1, "sleep_ms": 1000 })))
        .await
        .unwrap();
    wait_for(&env.engine, first.id, LIMIT, |r| {
        r.steps.iter().any(|s| s.status == StepStatus::Running)
    })
    .await;
    redis.flushall().await.unwrap();
    assert_succeeded(&env.wait(first.id, LIMIT).await);
    assert_succeeded(&env.run("selftest.chain", json!({ "steps": 1 })).await);
    env.stop_workers().await;
}

#[tokio::test]
async fn the_api_redacts_fields_named_like_secrets_in_runs() {
    // Inputs should only name connections; when one carries a secret anyway, the API does not
    // show it.
    let def = WorkflowDef::new("test.echo", "returns its input", |_ctx: Ctx, input: Value| async move {
        Ok(input)
    });
    let mut env = TestEnv::new(vec![def]).await;
    env.start_worker(fast_worker("w"));
    let input = json!({ "database": "app", "password": "hunter2", "nested": { "api_key": "k-123" } });
    let run = env.run("test.echo", input).await;
    assert_succeeded(&run);
    for path in [format!("/api/v1/runs/{}", run.id), "/api/v1/runs".to_string()] {
        let (status, body) = env.get_text(&path).await;
        assert_eq!(status, 200);
        assert!(!body.contains("hunter2") && !body.contains("k-123"), "{path}: {body}");
        assert!(
            body.contains("\"password\":\"[redacted]\"") && body.contains("\"database\":\"app\""),
            "{body}"
        );
    }
    env.stop_workers().await;
}

#[tokio::test]
async fn runs_are_listed_by_trigger_and_time_a_page_at_a_time() {
    let def = WorkflowDef::new("test.noop", "does nothing", |_ctx: Ctx, _input: Value| async move {
        Ok(Value::Null)
    });
    let env = TestEnv::new(vec![def]).await;
    let mut ids = Vec::new();
    for by in [
        "api:alice",
        "schedule:nightly",
        "webhook:infra:github push",
        "alertmanager:crashloop KubePodCrashLooping",
        "schedule:nightly",
        "api:bob",
        "schedule:hourly",
    ] {
        let mut req = StartRun::new("test.noop", json!({}));
        req.started_by = Some(by.into());
        ids.push(env.engine.start(req).await.unwrap().id.to_string());
    }
    let list = |body: &str| -> (Vec<String>, Value) {
        let v: Value = serde_json::from_str(body).unwrap();
        let ids = v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        (ids, v["next"].clone())
    };
    // By trigger, newest first.
    let (status, body) = env.get_text("/api/v1/runs?trigger=schedule").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(list(&body).0, [ids[6].clone(), ids[4].clone(), ids[1].clone()]);
    let (_, body) = env.get_text("/api/v1/runs?trigger=api").await;
    assert_eq!(list(&body).0, [ids[5].clone(), ids[0].clone()]);

    // Pages of 3: every run once, in order, and the last page says there is no next one.
    let mut seen = Vec::new();
    let mut path = "/api/v1/runs?limit=3".to_string();
    loop {
        let (_, body) = env.get_text(&path).await;
        let (page, next) = list(&body);
        seen.extend(page);
        match next.as_str() {
            Some(cursor) => path = format!("/api/v1/runs?limit=3&before={cursor}"),
            None => break,
        }
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    // A time window: nothing before the first run, everything since it.
    let (_, body) = env
        .get_text(&format!("/api/v1/runs?until={}", "2000-01-01T00:00:00Z"))
        .await;
    assert!(list(&body).0.is_empty());
    let (_, body) = env.get_text("/api/v1/runs?since=2000-01-01T00:00:00Z&limit=1000").await;
    assert_eq!(list(&body).0.len(), 7);
    let (status, body) = env.get_text("/api/v1/runs?since=yesterday").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("since"), "{body}");
}
