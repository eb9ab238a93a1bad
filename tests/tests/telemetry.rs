//! dayshift's own telemetry, read by the real tools: Prometheus scrapes `serve` and a worker.

use std::time::Duration;

use dayshift_tests::{BinEnv, free_port, spawn_dayshift, unique};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

/// A Prometheus server (Debian's `prometheus`) scraping `targets` every second.
struct Prometheus {
    url: String,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Prometheus {
    async fn start(targets: &[String]) -> Self {
        let dir = std::env::temp_dir().join(format!("dayshift-prometheus-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global: {{ scrape_interval: 1s, scrape_timeout: 900ms }}\nscrape_configs:\n  - job_name: dayshift\n    static_configs:\n      - targets: [{}]\n",
            targets
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus is missing: run `scripts/services.sh up` (Debian package prometheus)");
        let p = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            dir,
        };
        let http = dayshift_workflows::adapters::http::client();
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            if let Ok(r) = http.get(format!("{}/-/ready", p.url)).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus did not start: {}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The instant vector of `query`, as (labels, value) pairs.
    async fn query(&self, query: &str) -> Vec<(Value, f64)> {
        let url = url::Url::parse_with_params(&format!("{}/api/v1/query", self.url), [("query", query)]).unwrap();
        let body: Value = dayshift_workflows::adapters::http::client()
            .get(url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r["metric"].clone(), r["value"][1].as_str().unwrap().parse().unwrap()))
            .collect()
    }

    /// Waits until `query` has a sample with a value of at least `min`; its value.
    async fn wait_for(&self, query: &str, min: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let got = self.query(query).await;
            if let Some(v) = got.iter().map(|(_, v)| *v).reduce(f64::max)
                && v >= min
            {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{query} never reached {min}: {got:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn prometheus_scrapes_serve_and_a_worker_and_the_counters_move_as_runs_run() {
    let env = BinEnv::start().await;
    // A worker that serves its own metrics.
    let metrics_port = free_port();
    let config = std::fs::read_to_string(&env.config_path).unwrap().replace(
        "worker:\n",
        &format!("worker:\n  metrics-listen: 127.0.0.1:{metrics_port}\n"),
    );
    let worker_config = env.config_path.with_file_name("worker.yaml");
    std::fs::write(&worker_config, config).unwrap();
    let _worker = spawn_dayshift(&worker_config, &["worker"], "worker ", &[]).await;

    let serve = env.api.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&[serve.clone(), format!("127.0.0.1:{metrics_port}")]).await;
    // Both targets are scraped and parsed: `up` is 1 only for a parseable exposition.
    assert_eq!(prometheus.wait_for("sum(up)", 2.0).await, 2.0);
    let before = prometheus
        .query("sum(dayshift_runs_finished_total)")
        .await
        .first()
        .map(|(_, v)| *v)
        .unwrap_or(0.0);
    assert_eq!(before, 0.0);

    // Three runs whose steps each fail once and are retried, and one that fails.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            env.start_run("selftest.chain", json!({ "steps": 2, "fail_first": 1 }))
                .await,
        );
    }
    ids.push(env.start_run("selftest.gate", json!({ "timeout_ms": 10 })).await);
    for id in &ids {
        env.wait_finished(id, LIMIT).await;
    }

    let started = prometheus
        .wait_for(r#"sum(dayshift_runs_started_total{trigger="api"})"#, 4.0)
        .await;
    assert_eq!(started, 4.0, "counted once, by serve");
    assert_eq!(
        prometheus
            .wait_for(
                r#"dayshift_runs_finished_total{workflow="selftest.chain",outcome="succeeded"}"#,
                3.0
            )
            .await,
        3.0
    );
    assert_eq!(
        prometheus
            .wait_for(
                r#"dayshift_runs_finished_total{workflow="selftest.gate",outcome="failed"}"#,
                1.0
            )
            .await,
        1.0
    );
    // Each chain step failed once, then succeeded: 6 retries and 12 attempts timed.
    assert_eq!(
        prometheus
            .wait_for(r#"sum(dayshift_step_retries_total{workflow="selftest.chain"})"#, 6.0)
            .await,
        6.0
    );
    assert_eq!(
        prometheus
            .wait_for(
                r#"sum(dayshift_step_duration_seconds_count{workflow="selftest.chain"})"#,
                12.0
            )
            .await,
        12.0
    );
    // The queue is read from PostgreSQL by serve: nothing is waiting now.
    let depth = prometheus.query("dayshift_queue_depth").await;
    assert_eq!(depth.len(), 1, "{depth:?}");
    assert_eq!(depth[0].1, 0.0);
}

#[tokio::test]
async fn one_trace_per_run_joins_the_spans_of_two_workers_and_links_its_trigger() {
    let receiver = dayshift_tests::OtlpReceiver::start().await;
    let mut env = BinEnv::start_with(&format!(
        "telemetry:\n  otlp-endpoint: {}\nlog:\n  format: json\n\
         schedules:\n  - name: nightly\n    cron: \"0 3 * * *\"\n    workflow: selftest.chain\n    input: {{ steps: 1 }}\n",
        receiver.url
    ))
    .await;
    // A run handed from one worker to another: the first stops (SIGTERM) at a step boundary.
    let mut first = env.start_worker().await;
    let id = env
        .start_run(
            "selftest.chain",
            json!({ "steps": 4, "sleep_ms": 400, "fail_first": 1 }),
        )
        .await;
    env.wait_run(&id, LIMIT, |r| {
        r["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["status"] == "succeeded"))
    })
    .await;
    first.terminate(LIMIT).await;
    let mut second = env.start_worker().await;
    assert_eq!(env.wait_finished(&id, LIMIT).await["status"], "succeeded");
    // A schedule tick started by hand: the run it starts links to the tick's span.
    let (status, body) = env.post("/api/v1/schedules/nightly/trigger", &json!({})).await;
    assert_eq!(status, 201, "{body}");
    let scheduled = body["run_id"].as_str().unwrap().to_string();
    env.wait_finished(&scheduled, LIMIT).await;
    second.terminate(LIMIT).await;
    env.server.as_mut().unwrap().terminate(LIMIT).await;

    let spans = receiver.spans();
    let passes: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "pass selftest.chain" && s.attributes.get("run_id") == Some(&id))
        .collect();
    assert!(
        passes.len() >= 2,
        "{passes:#?}\nall spans: {:?}\nworker log:\n{}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>(),
        first.logs()
    );
    let trace = passes[0].trace_id.clone();
    assert!(passes.iter().all(|p| p.trace_id == trace), "one trace: {passes:#?}");
    let workers: std::collections::BTreeSet<&String> =
        passes.iter().map(|p| &p.resource["service.instance.id"]).collect();
    assert_eq!(workers.len(), 2, "passes by two worker processes: {passes:#?}");
    // The root, from serve, started the trace; every pass is its child.
    let root = spans
        .iter()
        .find(|s| s.trace_id == trace && s.parent_span_id.is_empty())
        .expect("the run's root span");
    assert_eq!(root.name, "run selftest.chain");
    assert_eq!(root.resource["dayshift.role"], "serve");
    assert!(passes.iter().all(|p| p.parent_span_id == root.span_id), "{passes:#?}");
    // A span per step attempt (4 steps, each failing once), each inside a pass.
    let pass_ids: Vec<&String> = passes.iter().map(|p| &p.span_id).collect();
    let attempts: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == trace && s.attributes.contains_key("step"))
        .collect();
    assert_eq!(attempts.len(), 8, "{attempts:#?}");
    assert!(attempts.iter().all(|a| pass_ids.contains(&&a.parent_span_id)));
    for n in 1..=4 {
        let step = format!("step-{n}");
        let tries: Vec<&String> = attempts
            .iter()
            .filter(|a| a.name == step)
            .map(|a| &a.attributes["attempt"])
            .collect();
        assert_eq!(tries.len(), 2, "{step}: {tries:?}");
    }

    // The scheduled run: a trace of its own, linked to the tick that started it.
    let tick = spans
        .iter()
        .find(|s| s.name == "schedule nightly")
        .expect("the tick's span");
    let scheduled_pass = spans
        .iter()
        .find(|s| s.attributes.get("run_id") == Some(&scheduled))
        .expect("the scheduled run's pass");
    let scheduled_root = spans
        .iter()
        .find(|s| s.trace_id == scheduled_pass.trace_id && s.parent_span_id.is_empty())
        .expect("the scheduled run's root");
    assert_ne!(scheduled_root.trace_id, tick.trace_id);
    assert_eq!(scheduled_root.links, [(tick.trace_id.clone(), tick.span_id.clone())]);

    // Every log line about a step carries the run, the workflow, the step and the attempt.
    let logs = second.logs() + &first.logs();
    let lines: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "Step attempt failed; retrying.")
        .collect();
    assert!(!lines.is_empty(), "{logs}");
    for l in &lines {
        assert_eq!(l["span"]["run_id"], id.as_str(), "{l}");
        assert_eq!(l["span"]["workflow"], "selftest.chain", "{l}");
        assert!(
            l["fields"]["step"].is_string() && l["fields"]["attempt"].is_number(),
            "{l}"
        );
    }
}
