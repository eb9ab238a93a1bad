//! Cron schedules: exactly one run per tick across replicas, catch-up and overlap policies,
//! pause/resume/trigger, and config errors.

use std::time::Duration;

use chrono::{DateTime, Utc};
use dayshift_engine::{CatchUp, Overlap, Schedule};
use dayshift_tests::{BinEnv, TestEnv, dayshift_bin, unique};
use serde_json::{Value, json};

fn schedule(name: &str, cron: &str, workflow: &str, input: Value) -> Schedule {
    Schedule {
        name: name.into(),
        cron: cron.parse().unwrap(),
        timezone: Default::default(),
        workflow: workflow.into(),
        input,
        catch_up: CatchUp::Skip,
        catch_up_limit: 10,
        overlap: Overlap::Allow,
        misfire_grace: Duration::from_secs(60),
    }
}

async fn ticks(pool: &sqlx::PgPool, name: &str) -> Vec<(DateTime<Utc>, String)> {
    sqlx::query_as("select tick, outcome from schedule_ticks where schedule = $1 order by tick")
        .bind(name)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Moves a schedule's last tick back to the hour boundary `hours` before the current hour, as
/// if dayshift had been down since then: an hourly schedule has then missed exactly `hours` ticks.
async fn rewind_hours(pool: &sqlx::PgPool, name: &str, hours: i32) {
    sqlx::query(
        "insert into schedules (name, last_tick) values ($1, date_trunc('hour', now()) - make_interval(hours => $2)) \
         on conflict (name) do update set last_tick = excluded.last_tick",
    )
    .bind(name)
    .bind(hours)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn two_serve_processes_start_one_run_per_tick_for_30_seconds() {
    let env = BinEnv::start_with(
        "schedules:\n  - name: every-second\n    cron: \"* * * * * *\"\n    workflow: selftest.chain\n    \
         input: { steps: 1 }\n",
    )
    .await;
    let other = env
        .spawn(
            &[
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", dayshift_tests::free_port()),
            ],
            "listening on",
        )
        .await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (status, _) = env.post("/api/v1/schedules/every-second/pause", &json!({})).await;
    assert_eq!(status, 200);
    drop(other);
    let keys: Vec<String> = sqlx::query_scalar(
        "select idempotency_key from runs where started_by = 'schedule:every-second' order by idempotency_key",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    let ticks: Vec<DateTime<Utc>> = keys
        .iter()
        .map(|k| k.trim_start_matches("schedule:every-second:").parse().unwrap())
        .collect();
    assert!(ticks.len() >= 28, "only {} runs in 30 s", ticks.len());
    // One run per second: no tick twice, none missing between the first and the last.
    for pair in ticks.windows(2) {
        assert_eq!(
            (pair[1] - pair[0]).num_seconds(),
            1,
            "ticks {} and {} are not consecutive",
            pair[0],
            pair[1]
        );
    }
    let outcomes = self::ticks(&env.db.pool, "every-second").await;
    assert_eq!(outcomes.len(), ticks.len());
    assert!(outcomes.iter().all(|(_, o)| o == "started"), "{outcomes:?}");
}

#[tokio::test]
async fn catch_up_skip_latest_and_all() {
    let input = json!({ "steps": 1 });
    let mut skip = schedule("hourly-skip", "0 * * * *", "selftest.chain", input.clone());
    let mut latest = schedule("hourly-latest", "0 * * * *", "selftest.chain", input.clone());
    let mut all = schedule("hourly-all", "0 * * * *", "selftest.chain", input);
    for s in [&mut skip, &mut latest, &mut all] {
        s.misfire_grace = Duration::ZERO;
    }
    latest.catch_up = CatchUp::Latest;
    all.catch_up = CatchUp::All;
    all.catch_up_limit = 3;
    let env = TestEnv::builder(vec![])
        .schedules(vec![skip, latest, all])
        .build()
        .await;
    let pool = env.db.pool.clone();
    for name in ["hourly-skip", "hourly-latest", "hourly-all"] {
        // Down for ten hours: ten ticks were missed.
        rewind_hours(&pool, name, 10).await;
    }
    let scheduler = env.scheduler();
    scheduler.fire_due().await.unwrap();
    scheduler.fire_due().await.unwrap(); // a second pass (another replica) changes nothing

    let count = |name: &'static str, outcome: &'static str| {
        let pool = pool.clone();
        async move { ticks(&pool, name).await.iter().filter(|(_, o)| o == outcome).count() }
    };
    assert_eq!(
        (
            count("hourly-skip", "started").await,
            count("hourly-skip", "missed").await
        ),
        (0, 10)
    );
    assert_eq!(
        (
            count("hourly-latest", "started").await,
            count("hourly-latest", "missed").await
        ),
        (1, 9)
    );
    assert_eq!(
        (
            count("hourly-all", "started").await,
            count("hourly-all", "missed").await
        ),
        (3, 7)
    );
    // `latest` ran the newest missed tick; `all` the newest three.
    let latest_ticks = ticks(&pool, "hourly-latest").await;
    assert_eq!(latest_ticks.last().unwrap().1, "started");
    let runs: i64 = sqlx::query_scalar("select count(*) from runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, 4);
}

#[tokio::test]
async fn overlap_skip_holds_ticks_back_while_the_previous_run_goes_and_records_them() {
    let mut gate = schedule("gate", "* * * * * *", "selftest.gate", json!({ "signal": "go" }));
    gate.overlap = Overlap::Skip;
    let mut env = TestEnv::builder(vec![]).schedules(vec![gate]).build().await;
    env.start_worker(dayshift_tests::fast_worker("w"));
    let token = tokio_util::sync::CancellationToken::new();
    let scheduler = tokio::spawn(env.scheduler().run(Duration::from_millis(100), token.clone()));
    // Wait until the first run waits for its signal and two later ticks were held back.
    let pool = env.db.pool.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let t = ticks(&pool, "gate").await;
        if t.iter().filter(|(_, o)| o == "skipped").count() >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no tick was held back: {t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    token.cancel();
    let _ = scheduler.await;
    let t = ticks(&pool, "gate").await;
    assert_eq!(t.first().unwrap().1, "started", "{t:?}");
    let active: i64 = sqlx::query_scalar("select count(*) from runs where status in ('pending', 'running', 'waiting')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(active, 1, "only the first run may be going");
    let skipped_runs: i64 = sqlx::query_scalar("select count(*) from runs where status = 'cancelled'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(skipped_runs as usize, t.iter().filter(|(_, o)| o == "skipped").count());
    env.stop_workers().await;
}

#[tokio::test]
async fn overlap_cancel_replaces_the_previous_run() {
    let mut gate = schedule("gate", "* * * * * *", "selftest.gate", json!({ "signal": "go" }));
    gate.overlap = Overlap::Cancel;
    let mut env = TestEnv::builder(vec![]).schedules(vec![gate]).build().await;
    env.start_worker(dayshift_tests::fast_worker("w"));
    let token = tokio_util::sync::CancellationToken::new();
    let scheduler = tokio::spawn(env.scheduler().run(Duration::from_millis(100), token.clone()));
    let pool = env.db.pool.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let cancelled: i64 = sqlx::query_scalar("select count(*) from runs where status = 'cancelled'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if cancelled >= 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no run was replaced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    token.cancel();
    let _ = scheduler.await;
    let reasons: Vec<String> = sqlx::query_scalar("select error from runs where status = 'cancelled'")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(
        reasons.iter().all(|r| r.contains("cancelled by newer run")),
        "{reasons:?}"
    );
    env.stop_workers().await;
}

#[tokio::test]
async fn schedules_are_listed_paused_resumed_and_triggered() {
    let env = BinEnv::start_with(
        "schedules:\n  - name: nightly\n    cron: \"30 2 * * *\"\n    timezone: Europe/Berlin\n    \
         workflow: selftest.chain\n    input: { steps: 1 }\n",
    )
    .await;
    let (status, body) = env.get("/api/v1/schedules").await;
    assert_eq!(status, 200);
    let nightly = &body["schedules"][0];
    assert_eq!(nightly["name"], "nightly");
    assert_eq!(nightly["timezone"], "Europe/Berlin");
    let next: DateTime<Utc> = nightly["next"][0].as_str().unwrap().parse().unwrap();
    let local = next.with_timezone(&chrono_tz::Europe::Berlin);
    assert_eq!(local.format("%H:%M").to_string(), "02:30");

    let (status, paused) = env.post("/api/v1/schedules/nightly/pause", &json!({})).await;
    assert_eq!((status, paused["paused"].clone()), (200, json!(true)));
    assert_eq!(paused["next"], json!([]));
    let (_, resumed) = env.post("/api/v1/schedules/nightly/resume", &json!({})).await;
    assert_eq!(resumed["paused"], false);

    let (status, triggered) = env.post("/api/v1/schedules/nightly/trigger", &json!({})).await;
    assert_eq!(status, 201, "{triggered}");
    let run_id = triggered["run_id"].as_str().unwrap();
    let (_, run) = env.get(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(run["started_by"], "schedule:nightly (triggered by hand)");

    let (status, body) = env.post("/api/v1/schedules/weekly/pause", &json!({})).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "schedule 'weekly' not found");

    let out = tokio::process::Command::new(dayshift_bin())
        .args(["schedules", "--server", &env.api])
        .env("DAYSHIFT_TOKEN", &env.token)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("nightly") && text.contains("Europe/Berlin"),
        "{text}"
    );
    for (command, expect) in [("pause", "true"), ("resume", "false")] {
        let out = tokio::process::Command::new(dayshift_bin())
            .args(["schedules", command, "nightly", "--json", "--server", &env.api])
            .env("DAYSHIFT_TOKEN", &env.token)
            .output()
            .await
            .unwrap();
        let shown: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_eq!(shown["paused"].to_string(), expect, "{command}: {shown}");
    }
    let out = tokio::process::Command::new(dayshift_bin())
        .args(["schedules", "trigger", "nightly", "--server", &env.api])
        .env("DAYSHIFT_TOKEN", &env.token)
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("schedule nightly started run"));
}

#[tokio::test]
async fn config_check_names_file_line_and_key_for_schedule_errors() {
    let dir = std::env::temp_dir().join(format!("dayshift-sched-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |name: &str, yaml: &str| {
        let path = dir.join(name);
        std::fs::write(&path, yaml).unwrap();
        std::process::Command::new(dayshift_bin())
            .args(["config", "check"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let cases = [
        (
            "cron.yaml",
            "schedules:\n  - name: a\n    cron: \"61 * * * *\"\n    workflow: selftest.chain\n",
            vec!["cron.yaml", "line 3", "not a cron expression"],
        ),
        (
            "tz.yaml",
            "schedules:\n  - name: a\n    cron: \"@daily\"\n    timezone: Europe/Atlantis\n    workflow: selftest.chain\n",
            vec!["line 4", "not a time zone"],
        ),
        (
            "wf.yaml",
            "schedules:\n  - name: a\n    cron: \"@daily\"\n    workflow: backup.nothing\n",
            vec!["line 4", "schedules[0].workflow", "unknown workflow 'backup.nothing'"],
        ),
        (
            "dup.yaml",
            "schedules:\n  - name: a\n    cron: \"@daily\"\n    workflow: selftest.gate\n  - name: a\n    cron: \"@daily\"\n    workflow: selftest.gate\n",
            vec!["line 5", "already used on line 2"],
        ),
        (
            "field.yaml",
            "schedules:\n  - name: a\n    cron: \"@daily\"\n    workflow: selftest.gate\n    catchup: all\n",
            vec!["line 5", "catchup"],
        ),
        (
            "input.yaml",
            "schedules:\n  - name: a\n    cron: \"@daily\"\n    workflow: selftest.chain\n    input: { steps: \"{{ labels.n }}\" }\n",
            vec!["schedules[0].input", "labels.n", "schedule, tick, tick_utc"],
        ),
    ];
    for (file, yaml, expected) in cases {
        let out = check(file, yaml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} passed the check");
        for e in expected {
            assert!(err.contains(e), "{file}: '{e}' not in:\n{err}");
        }
    }
    let ok = check(
        "ok.yaml",
        "schedules:\n  - name: a\n    cron: \"*/5 * * * *\"\n    workflow: selftest.chain\n    input: { steps: 1 }\n",
    );
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn serve_refuses_a_config_with_a_schedule_error() {
    let env = BinEnv::start().await;
    let bad = env.config_path.with_file_name("bad.yaml");
    let mut yaml = std::fs::read_to_string(&env.config_path).unwrap();
    yaml.push_str("schedules:\n  - name: a\n    cron: \"@daily\"\n    workflow: backup.nothing\n");
    std::fs::write(&bad, yaml).unwrap();
    let out = tokio::process::Command::new(dayshift_bin())
        .arg("--config")
        .arg(&bad)
        .arg("serve")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown workflow 'backup.nothing'"));
}
