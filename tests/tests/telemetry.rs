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
