//! Waiting for a run without polling: `GET /api/v1/runs/{id}?wait=`, woken by the worker's
//! announcement after its commit, on any `serve`; and the CLI's `run --wait` / `runs show
//! --follow`, which show each step as it ends and what the run waits on.

use std::process::Stdio;
use std::time::{Duration, Instant};

use dayshift_tests::{BinEnv, Proc, dayshift_bin, free_port, spawn_dayshift};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

const LIMIT: Duration = Duration::from_secs(30);

/// A second `serve` on the same database and Redis, whose waiting reads never re-read on
/// their own schedule (`wait-recheck: 10m`): an answer before the wait runs out can only come
/// from an announcement. One read waits there at a time.
async fn second_serve(env: &BinEnv) -> (Proc, String) {
    let port = free_port();
    let yaml = std::fs::read_to_string(&env.config_path).unwrap();
    let first = env.api.trim_start_matches("http://");
    let yaml = yaml.replace(
        &format!("listen: {first}\n"),
        &format!("listen: 127.0.0.1:{port}\n  wait-recheck: 10m\n  max-waiting-requests: 1\n"),
    );
    assert!(
        yaml.contains("wait-recheck"),
        "the config names no listen address: {yaml}"
    );
    let path = env.config_path.with_file_name("second.yaml");
    std::fs::write(&path, yaml).unwrap();
    let proc = spawn_dayshift(&path, &["serve"], "listening on", &[]).await;
    (proc, format!("http://127.0.0.1:{port}"))
}

async fn get(api: &str, token: &str, path: &str, etag: Option<&str>) -> (u16, Option<String>, Value) {
    let mut req = dayshift_workflows::adapters::http::builder()
        .timeout(Duration::from_secs(90))
        .build()
        .unwrap()
        .get(format!("{api}{path}"));
    if !token.is_empty() {
        req = req.bearer_auth(token);
    }
    if let Some(tag) = etag {
        req = req.header("if-none-match", tag);
    }
    let resp = req.send().await.unwrap();
    let tag = resp.headers().get("etag").map(|v| v.to_str().unwrap().to_string());
    (resp.status().as_u16(), tag, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_waiting_read_on_another_serve_answers_as_the_run_ends_and_times_out_cleanly() {
    let env = BinEnv::start().await;
    let (_second, other) = second_serve(&env).await;
    let _worker = env.start_worker().await;
    let viewer = env.token_for("vera", "viewer").await;

    // A run that waits for a signal, started on the first serve.
    let id = env.start_run("selftest.gate", json!({})).await;
    let waiting = env.wait_run(&id, LIMIT, |r| r["waiting_on"]["kind"] == "signal").await;
    assert_eq!(waiting["waiting_on"]["name"], "approve", "{waiting:#}");

    // A viewer waits on the second serve for the run to end.
    let path = format!("/api/v1/runs/{id}?wait=45s");
    let reader = {
        let (other, viewer, path) = (other.clone(), viewer.clone(), path.clone());
        tokio::spawn(async move {
            let asked = Instant::now();
            let answer = get(&other, &viewer, &path, None).await;
            (answer, chrono::Utc::now(), asked.elapsed())
        })
    };
    // The reader is waiting (not answered) until the run ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!reader.is_finished(), "a waiting read answered before the run ended");
    let (status, _) = env
        .post(&format!("/api/v1/runs/{id}/signals/approve"), &json!({"ok": true}))
        .await;
    assert_eq!(status, 202);
    let ((status, tag, run), answered_at, waited) = reader.await.unwrap();
    assert_eq!(status, 200, "{run:#}");
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert!(tag.is_some(), "a run read carries an ETag");
    let finished: chrono::DateTime<chrono::Utc> = run["finished_at"].as_str().unwrap().parse().unwrap();
    let after_end = (answered_at - finished).to_std().unwrap_or_default();
    println!("answered {after_end:?} after the run's end (waited {waited:?} in all)");
    // Woken by the announcement: the recheck is 10 minutes and the wait 45 s.
    assert!(
        after_end < Duration::from_secs(2) && waited < Duration::from_secs(40),
        "answered {after_end:?} after the end"
    );
    assert!(run["waiting_on"].is_null(), "a finished run waits on nothing: {run:#}");

    // A wait that runs out answers with the run as it is, on time.
    let id = env.start_run("selftest.gate", json!({})).await;
    env.wait_run(&id, LIMIT, |r| r["waiting_on"]["kind"] == "signal").await;
    let asked = Instant::now();
    let (status, tag, run) = get(&other, &viewer, &format!("/api/v1/runs/{id}?wait=1s"), None).await;
    let took = asked.elapsed();
    assert_eq!((status, run["status"].as_str()), (200, Some("waiting")), "{run:#}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // With its version: 304 when it is still the same after the wait, at once without one.
    let tag = tag.unwrap();
    let (status, _, _) = get(&other, &viewer, &format!("/api/v1/runs/{id}?wait=1s"), Some(&tag)).await;
    assert_eq!(status, 304);
    let (status, same, _) = get(&other, &viewer, &format!("/api/v1/runs/{id}"), Some(&tag)).await;
    assert_eq!((status, same.as_deref()), (304, Some(tag.as_str())));

    // Beyond `max-waiting-requests`, a waiting read is refused at once, saying when to ask again.
    let reads: Vec<_> = (0..2)
        .map(|_| {
            let (other, viewer, id) = (other.clone(), viewer.clone(), id.clone());
            tokio::spawn(async move { get(&other, &viewer, &format!("/api/v1/runs/{id}?wait=3s"), None).await })
        })
        .collect();
    let mut answers = Vec::new();
    for r in reads {
        let (status, _, body) = r.await.unwrap();
        answers.push((status, body["code"].as_str().unwrap_or("").to_string()));
    }
    answers.sort();
    assert_eq!(
        answers,
        [(200, String::new()), (503, "too_many_waits".into())],
        "two reads waiting at once where one may"
    );

    // Bad input is refused with what is wrong, and nobody without a token waits.
    let (status, _, body) = get(&other, &viewer, &format!("/api/v1/runs/{id}?wait=soon"), None).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("wait: 'soon'"), "{body}");
    let (status, _, body) = get(&other, &viewer, &format!("/api/v1/runs/{id}?wait=1s&poll=1"), None).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = get(&other, "", &format!("/api/v1/runs/{id}?wait=1s"), None).await;
    assert_eq!(status, 401);
    // A start can wait for its run's end in the same request; bad input starts nothing.
    let (status, started) = env
        .post(
            "/api/v1/runs?wait=20s",
            &json!({ "workflow": "selftest.chain", "input": { "steps": 2 } }),
        )
        .await;
    assert_eq!(status, 201, "{started}");
    assert_eq!(started["run"]["status"], "succeeded", "{started}");
    assert_eq!(started["run"]["steps"].as_array().map(Vec::len), Some(2), "{started}");
    let runs = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from runs")
            .fetch_one(&env.db.pool)
            .await
            .unwrap()
    };
    let before = runs().await;
    let (status, body) = env
        .post(
            "/api/v1/runs?wait=later",
            &json!({ "workflow": "selftest.chain", "input": { "steps": 1 } }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = env
        .post_as(
            &viewer,
            "/api/v1/runs?wait=1s",
            &json!({ "workflow": "selftest.chain", "input": { "steps": 1 } }),
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(runs().await, before, "a refused start started a run");

    let missing = uuid::Uuid::now_v7();
    let (status, _, _) = get(&other, &viewer, &format!("/api/v1/runs/{missing}?wait=1s"), None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn run_wait_shows_each_step_and_what_the_run_waits_on_until_it_ends() {
    let env = BinEnv::start().await;
    let _worker = env.start_worker().await;
    let mut cli = tokio::process::Command::new(dayshift_bin())
        .args(["run", "selftest.gate", "--input", r#"{"sleep_ms": 300}"#, "--wait"])
        .args(["--server", &env.api])
        .env("DAYSHIFT_TOKEN", &env.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut progress = BufReader::new(cli.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut next_line = async || {
        let line = tokio::time::timeout(LIMIT, progress.next_line())
            .await
            .expect("the CLI printed nothing more")
            .unwrap()
            .expect("the CLI's stderr closed");
        seen.push(line.clone());
        line
    };
    let started = next_line().await;
    assert!(started.starts_with("run ") && started.contains("started"), "{started}");
    let id = started.split_whitespace().nth(1).unwrap().to_string();
    // The steps as they end, and the wait for the signal, before anyone sends it.
    loop {
        let line = next_line().await;
        if line.contains("waiting") && line.contains("for the signal 'approve'") {
            break;
        }
    }
    let (status, _) = env
        .post(&format!("/api/v1/runs/{id}/signals/approve"), &json!({"by": "test"}))
        .await;
    assert_eq!(status, 202);
    let out = tokio::time::timeout(LIMIT, cli.wait_with_output())
        .await
        .expect("the CLI did not end with the run")
        .unwrap();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(1), progress.next_line()).await {
        seen.push(line);
    }
    let seen = seen.join("\n");
    assert!(out.status.success(), "{seen}");
    let step = |name: &str| {
        seen.lines()
            .any(|l| l.trim_start().starts_with("succeeded") && l.contains(&format!(" {name} ")) && l.ends_with(" ms"))
    };
    assert!(step("prepare") && step("pause") && step("apply"), "{seen}");
    let order: Vec<usize> = ["prepare", "for the signal", "apply"]
        .iter()
        .map(|w| seen.find(w).unwrap_or_else(|| panic!("no '{w}' in:\n{seen}")))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{seen}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("status    succeeded"), "{stdout}");

    // `runs show --follow` on a run started elsewhere ends with it, non-zero when it failed.
    let id = env.start_run("selftest.gate", json!({"timeout_ms": 3000})).await;
    let out = tokio::time::timeout(LIMIT, env.cli(&["runs", "show", &id, "--follow"]))
        .await
        .expect("--follow did not end with the run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("for the signal 'approve'"), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("status    failed"));
}
