//! End-to-end tests of the `dayshift` binary: `serve` and `worker` processes against real
//! PostgreSQL and Redis, killed and restarted the way production kills them.

use std::time::Duration;

use dayshift_tests::{BinEnv, dayshift_bin, unique};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {run:#}"))
}

fn counts(rows: &[(String, String, i64)]) -> Vec<(String, i64)> {
    rows.iter().map(|(_, s, n)| (s.clone(), *n)).collect()
}

#[tokio::test]
async fn a_chain_of_n_steps_runs_each_step_exactly_once() {
    let env = BinEnv::start().await;
    let _worker = env.start_worker().await;
    let table = format!("fx_{}", unique());
    let id = env
        .start_run(
            "selftest.chain",
            json!({ "steps": 5, "sleep_ms": 0, "fail_first": 0, "side_effects": table }),
        )
        .await;
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], json!({ "steps": 5, "attempts": [1, 1, 1, 1, 1] }));
    let effects = env.db.side_effects(&table).await;
    assert_eq!(
        counts(&effects),
        (1..=5).map(|i| (format!("step-{i}"), 1)).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_failing_step_is_retried_with_growing_delays_and_the_api_shows_each_error() {
    let env = BinEnv::start().await;
    let _worker = env.start_worker().await;
    let id = env
        .start_run("selftest.chain", json!({ "steps": 1, "fail_first": 3 }))
        .await;
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let s = step(&run, "step-1");
    assert_eq!(s["attempts"], 4);
    let errors = s["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "{s:#}");
    for (i, e) in errors.iter().enumerate() {
        assert_eq!(e["attempt"], i + 1);
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains(&format!("failing attempt {}", i + 1)),
            "{e}"
        );
    }
    assert!(s["last_error"].as_str().unwrap().contains("failing attempt 3"));
    let (_, events) = env.get(&format!("/api/v1/runs/{id}/events")).await;
    let at = |kind: &str| -> Vec<chrono::DateTime<chrono::Utc>> {
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["at"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let failures = at("step_attempt_failed");
    let finished = at("run_finished");
    let mut times = failures.clone();
    times.extend(finished);
    let gaps: Vec<i64> = times.windows(2).map(|w| (w[1] - w[0]).num_milliseconds()).collect();
    assert_eq!(gaps.len(), 3, "{events:#}");
    // A measured gap is the scheduled delay plus the pick-up; it is never shorter than the
    // delay's lower bound (100, 200, 400 ms, each -20% jitter), and those bounds grow.
    for (gap, floor) in gaps.iter().zip([80, 160, 320]) {
        assert!(
            *gap >= floor,
            "delays did not grow as scheduled: {gaps:?} ms (floors 80, 160, 320)"
        );
    }
}

#[tokio::test]
async fn a_worker_killed_mid_step_loses_nothing() {
    let env = BinEnv::start().await;
    let mut first = env.start_worker().await;
    let table = format!("fx_{}", unique());
    let id = env
        .start_run(
            "selftest.chain",
            json!({ "steps": 4, "sleep_ms": 700, "side_effects": table }),
        )
        .await;
    // Kill the worker while step-2 is in flight (step-1 done).
    env.wait_run(&id, LIMIT, |r| {
        r["steps"].as_array().is_some_and(|s| {
            s.iter().any(|s| s["name"] == "step-1" && s["status"] == "succeeded")
                && s.iter().any(|s| s["name"] == "step-2" && s["status"] == "running")
        })
    })
    .await;
    first.kill9().await;
    let _second = env.start_worker().await;
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let effects = counts(&env.db.side_effects(&table).await);
    // step-1 completed before the kill: it never ran again. step-2 was in flight: it ran once
    // on the dead worker (maybe, if it got past its sleep) and once on the new one.
    assert_eq!(effects[0], ("step-1".into(), 1));
    assert!((1..=2).contains(&effects[1].1), "{effects:?}");
    assert_eq!(effects[2], ("step-3".into(), 1));
    assert_eq!(effects[3], ("step-4".into(), 1));
    assert!(step(&run, "step-2")["attempts"].as_i64().unwrap() >= 2, "{run:#}");
}

/// The side effects of every step journaled succeeded: (run, step) → how often it ran.
async fn completed_steps(env: &BinEnv, table: &str) -> std::collections::HashMap<(String, String), i64> {
    sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(format!(
        "select s.run_id::text, s.name, count(f.*) from steps s join {table} f \
           on f.run_id = s.run_id::text and f.step = s.name \
         where s.status = 'succeeded' group by s.run_id, s.name"
    )))
    .fetch_all(&env.db.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(run, step, n)| ((run, step), n))
    .collect()
}

#[tokio::test]
async fn workers_killed_while_batches_of_step_records_commit_lose_and_repeat_no_completed_step() {
    let env = BinEnv::start().await;
    let table = format!("fx_{}", unique());
    // As selftest.chain creates it, so that it can be read before the first step.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "create table {table} (run_id text not null, step text not null, attempt int not null, \
           at timestamptz not null default clock_timestamp())"
    )))
    .execute(&env.db.pool)
    .await
    .unwrap();
    // 48 runs of 8 instant steps, 16 at once on a worker: its step records share commits
    // (`store::journal::tests` shows they do).
    let mut ids = Vec::new();
    for _ in 0..48 {
        ids.push(
            env.start_run(
                "selftest.chain",
                json!({ "steps": 8, "sleep_ms": 0, "side_effects": table }),
            )
            .await,
        );
    }
    let mut worker = env.start_worker().await;
    let mut seen: std::collections::HashMap<(String, String), i64> = Default::default();
    for round in 1..=3 {
        // Killed at once when a quarter more of the steps are journaled: mid-stream, with
        // records in flight.
        let target = round * 48 * 8 / 4;
        let deadline = std::time::Instant::now() + LIMIT;
        while completed_steps(&env, &table).await.len() < target {
            assert!(std::time::Instant::now() < deadline, "the runs stopped advancing");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        worker.kill9().await;
        // Nothing lands after the kill: what is journaled now is what the dead worker committed.
        let completed = completed_steps(&env, &table).await;
        for (key, n) in &seen {
            assert_eq!(completed.get(key), Some(n), "{key:?} ran again after it completed");
        }
        seen = completed;
        worker = env.start_worker().await;
    }
    for id in &ids {
        let run = env.wait_finished(id, LIMIT).await;
        assert_eq!(run["status"], "succeeded", "{run:#}");
        let names: Vec<&str> = run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            (1..=8).map(|i| format!("step-{i}")).collect::<Vec<_>>(),
            "{run:#}"
        );
    }
    let completed = completed_steps(&env, &table).await;
    assert_eq!(completed.len(), 48 * 8, "a completed step is missing");
    for (key, n) in &seen {
        assert_eq!(completed.get(key), Some(n), "{key:?} ran again after it completed");
    }
    // The rows' `xmin` is the transaction that wrote them: the records shared commits.
    let (rows, transactions): (i64, i64) = sqlx::query_as("select count(*), count(distinct xmin::text) from steps")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    eprintln!("{rows} step rows written by {transactions} transactions");
    assert!(
        transactions < rows,
        "{transactions} transactions wrote {rows} step rows: no batching"
    );
    drop(worker);
}

#[tokio::test]
async fn a_worker_that_lost_its_lease_cannot_journal() {
    let env = BinEnv::start().await;
    let stale = env.start_worker().await;
    let table = format!("fx_{}", unique());
    let id = env
        .start_run(
            "selftest.chain",
            json!({ "steps": 1, "sleep_ms": 1500, "side_effects": table }),
        )
        .await;
    env.wait_run(&id, LIMIT, |r| step_is(r, "step-1", "running")).await;
    // Freeze the worker mid-step (a long GC pause, a partition): its lease expires and another
    // worker takes the run over and finishes it.
    stale.signal("STOP");
    let _fresh = env.start_worker().await;
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let journaled = run["output"].clone();
    // Thaw the stale worker: whether its step finishes first or its lease renewal notices the
    // loss first, it must write nothing to the journal.
    stale.signal("CONT");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !stale.logs().contains("Lease lost") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stale worker did not report its lost lease:\n{}",
            stale.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, after) = env.get(&format!("/api/v1/runs/{id}")).await;
    assert_eq!(after["output"], journaled, "the stale worker changed the journal");
    assert_eq!(step(&after, "step-1")["attempts"], 2);
    assert_eq!(after["status"], "succeeded");
    let effects = env.db.side_effects(&table).await;
    assert!((1..=2).contains(&effects[0].2), "{effects:?}");
}

fn step_is(run: &Value, name: &str, status: &str) -> bool {
    run["steps"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["name"] == name && s["status"] == status))
}

#[tokio::test]
async fn a_durable_sleep_and_a_signal_wait_survive_a_restart_of_every_process() {
    let mut env = BinEnv::start().await;
    let mut worker = env.start_worker().await;
    let id = env
        .start_run("selftest.gate", json!({ "sleep_ms": 1500, "signal": "approve" }))
        .await;
    env.wait_run(&id, LIMIT, |r| step_is(r, "pause", "waiting")).await;
    // Everything dies during the sleep.
    worker.kill9().await;
    env.server.as_mut().unwrap().kill9().await;
    env.start_server().await;
    let mut worker = env.start_worker().await;
    let run = env
        .wait_run(&id, LIMIT, |r| {
            r["status"] == "waiting" && step_is(r, "approve", "waiting")
        })
        .await;
    assert_eq!(step(&run, "pause")["status"], "succeeded");
    // And again while it waits for the approval.
    worker.kill9().await;
    env.server.as_mut().unwrap().kill9().await;
    env.start_server().await;
    let _worker = env.start_worker().await;
    let (status, body) = env
        .post(&format!("/api/v1/runs/{id}/signals/approve"), &json!({ "by": "alice" }))
        .await;
    assert_eq!(status, 202, "{body}");
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"]["approval"], json!({ "by": "alice" }));
    assert_eq!(step(&run, "prepare")["attempts"], 1, "prepare ran again: {run:#}");
}

#[tokio::test]
async fn bad_input_gets_a_clear_error() {
    let env = BinEnv::start().await;
    let (status, body) = env
        .post("/api/v1/runs", &json!({ "workflow": "backup.nothing", "input": {} }))
        .await;
    assert_eq!(status, 404);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown workflow 'backup.nothing'"),
        "{body}"
    );

    let (status, body) = env.post_raw("/api/v1/runs", "{\"workflow\": selftest.chain").await;
    assert_eq!(status, 400);
    assert_eq!(body["code"], "invalid_json", "{body}");
    assert!(body["error"].as_str().unwrap().contains("line 1"), "{body}");

    let (status, body) = env
        .post(
            "/api/v1/runs",
            &json!({ "workflow": "selftest.chain", "input": { "steps": "three" } }),
        )
        .await;
    assert_eq!(status, 422);
    assert!(body["error"].as_str().unwrap().contains("invalid type"), "{body}");

    let (status, body) = env
        .post(
            "/api/v1/runs",
            &json!({ "workflow": "selftest.chain", "input": { "steps": 0 } }),
        )
        .await;
    assert_eq!(status, 422);
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("steps must be 1 to 1000, not 0"), "{body}");

    let (status, body) = env
        .post(
            "/api/v1/runs",
            &json!({
                "workflow": "selftest.chain",
                "input": { "steps": 1, "side_effects": "x; drop table runs" }
            }),
        )
        .await;
    assert_eq!(status, 422);
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("plain table name"), "{body}");

    let (status, body) = env
        .post("/api/v1/runs", &json!({ "workflow": "selftest.chain", "inputs": {} }))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("unknown field `inputs`"),
        "{body}"
    );

    let missing = uuid::Uuid::now_v7();
    let (status, body) = env.get(&format!("/api/v1/runs/{missing}")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], format!("run {missing} not found"));

    let (status, body) = env.get("/api/v1/runs/not-a-uuid").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("not a run id"), "{body}");

    let (status, body) = env.get("/api/v1/runs?status=done").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("pending, running"), "{body}");

    let (status, _) = env
        .post(&format!("/api/v1/runs/{missing}/signals/approve"), &json!(null))
        .await;
    assert_eq!(status, 404);
    // Nothing was created by any of it.
    let (_, list) = env.get("/api/v1/runs").await;
    assert_eq!(list["runs"], json!([]));
}

#[tokio::test]
async fn a_config_file_error_names_the_key_and_the_line() {
    let dir = std::env::temp_dir().join(format!("dayshift-cfg-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(&path, "server:\n  listen: 127.0.0.1:8080\nworker:\n  concurency: 4\n").unwrap();
    let out = tokio::process::Command::new(dayshift_bin())
        .args(["--config"])
        .arg(&path)
        .args(["config", "check"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("bad.yaml"), "{stderr}");
    assert!(stderr.contains("concurency"), "{stderr}");
    assert!(stderr.contains("line 4"), "{stderr}");

    std::fs::write(&path, "worker:\n  lease-ttl: soon\n").unwrap();
    let out = tokio::process::Command::new(dayshift_bin())
        .arg("--config")
        .arg(&path)
        .arg("worker")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 2"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_cli_starts_a_run_waits_for_it_and_shows_its_steps() {
    let env = BinEnv::start().await;
    let _worker = env.start_worker().await;
    let out = tokio::process::Command::new(dayshift_bin())
        .args([
            "run",
            "selftest.chain",
            "--input",
            r#"{"steps": 2}"#,
            "--wait",
            "--server",
            &env.api,
        ])
        .env("DAYSHIFT_TOKEN", &env.token)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("status    succeeded"), "{stdout}");
    assert!(stdout.contains("step-1") && stdout.contains("step-2"), "{stdout}");

    let out = tokio::process::Command::new(dayshift_bin())
        .args(["runs", "list", "--json", "--server", &env.api])
        .env("DAYSHIFT_TOKEN", &env.token)
        .output()
        .await
        .unwrap();
    let runs: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 1);

    let out = tokio::process::Command::new(dayshift_bin())
        .args(["run", "selftest.chain", "--input", "{steps: 2}", "--server", &env.api])
        .env("DAYSHIFT_TOKEN", &env.token)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--input is not JSON"));

    let out = tokio::process::Command::new(dayshift_bin())
        .arg("workflows")
        .output()
        .await
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains("selftest.chain") && listed.contains("selftest.gate"),
        "{listed}"
    );
}

#[tokio::test]
async fn cancelling_over_the_api_ends_a_waiting_run() {
    let env = BinEnv::start().await;
    let _worker = env.start_worker().await;
    let id = env.start_run("selftest.gate", json!({})).await;
    env.wait_run(&id, LIMIT, |r| r["status"] == "waiting").await;
    let (status, body) = env
        .post(&format!("/api/v1/runs/{id}/cancel"), &json!({ "reason": "not needed" }))
        .await;
    assert_eq!(status, 202, "{body}");
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["error"], "not needed");
    assert_eq!(step(&run, "approve")["status"], "cancelled");
    let (status, body) = env.post(&format!("/api/v1/runs/{id}/signals/approve"), &json!(1)).await;
    assert_eq!(status, 409, "{body}");
}

#[tokio::test]
async fn health_and_readiness() {
    let env = BinEnv::start().await;
    assert_eq!(env.get("/healthz").await.0, 200);
    let (status, body) = env.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn sigterm_hands_the_run_over_at_a_step_boundary() {
    let env = BinEnv::start().await;
    let mut first = env.start_worker().await;
    let table = format!("fx_{}", unique());
    let id = env
        .start_run(
            "selftest.chain",
            json!({ "steps": 6, "sleep_ms": 300, "side_effects": table }),
        )
        .await;
    env.wait_run(&id, LIMIT, |r| step_is(r, "step-2", "running")).await;
    first.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(10), first.child.wait())
        .await
        .expect("the worker did not exit within its grace period")
        .unwrap();
    assert!(status.success(), "exit status {status:?}\n{}", first.logs());
    let (_, mid) = env.get(&format!("/api/v1/runs/{id}")).await;
    assert_ne!(
        mid["status"], "succeeded",
        "the worker finished the whole run instead of handing it over"
    );
    let _second = env.start_worker().await;
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    // A graceful stop finishes the step in flight and journals it: nothing runs twice.
    let effects = counts(&env.db.side_effects(&table).await);
    assert_eq!(effects, (1..=6).map(|i| (format!("step-{i}"), 1)).collect::<Vec<_>>());
}

#[tokio::test]
async fn readyz_says_which_service_is_down() {
    let redis = dayshift_tests::OwnRedis::start().await.unwrap();
    let env = BinEnv::start_on(&redis.url, "").await;
    assert_eq!(env.get("/readyz").await.0, 200);
    drop(redis);
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (status, body) = env.get("/readyz").await;
        if status == 503 {
            // Which service, never the error's text (addresses, versions) to whoever asks.
            assert_eq!(body["error"], "not ready: redis unreachable", "{body}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "readyz stayed {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.get("/healthz").await.0, 200, "liveness does not depend on Redis");
}

#[tokio::test]
async fn the_cli_signals_and_cancels_runs() {
    let env = BinEnv::start().await;
    let _worker = env.start_worker().await;
    let cli = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(["--server".to_string(), env.api.clone()]);
        tokio::process::Command::new(dayshift_bin())
            .args(all)
            .env("DAYSHIFT_TOKEN", &env.token)
            .output()
    };
    let approved = env.start_run("selftest.gate", json!({})).await;
    env.wait_run(&approved, LIMIT, |r| r["status"] == "waiting").await;
    let out = cli(&[
        "runs",
        "signal",
        &approved,
        "approve",
        "--payload",
        r#"{"ticket": "CHG-7"}"#,
    ])
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = env.wait_finished(&approved, LIMIT).await;
    assert_eq!(run["output"]["approval"], json!({ "ticket": "CHG-7" }));

    let doomed = env.start_run("selftest.gate", json!({})).await;
    env.wait_run(&doomed, LIMIT, |r| r["status"] == "waiting").await;
    let out = cli(&["runs", "cancel", &doomed, "--reason", "change freeze"])
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = env.wait_finished(&doomed, LIMIT).await;
    assert_eq!(run["status"], "cancelled");
    assert_eq!(run["error"], "change freeze");

    let out = cli(&["runs", "show", "01234567-0000-7000-8000-000000000000"])
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found (HTTP 404)"));
}
