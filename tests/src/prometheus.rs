//! A Prometheus of a test's own (Debian's `prometheus`), evaluating the alerting rules a test
//! gives it every second, scraping itself (job `prometheus`, up) and a port where nothing
//! listens (job `absent`, down), so that `ALERTS` and `up` hold real series.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{free_port, unique};

/// A Prometheus of its own, stopped when dropped.
pub struct OwnPrometheus {
    pub url: String,
    child: std::process::Child,
    dir: PathBuf,
}

impl OwnPrometheus {
    /// Starts one with the rule groups `rules` (a rule file's `groups:` YAML) and waits until
    /// it is ready.
    pub async fn start(rules: &str) -> Result<Self> {
        let (port, nothing) = (free_port(), free_port());
        let dir = std::env::temp_dir().join(format!("dayshift-prom-{}", unique()));
        std::fs::create_dir_all(dir.join("data"))?;
        std::fs::write(dir.join("rules.yml"), rules)?;
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{}]\nscrape_configs:\n  \
                 - job_name: prometheus\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n  \
                 - job_name: absent\n    static_configs:\n      - targets: ['127.0.0.1:{nothing}']\n",
                dir.join("rules.yml").display()
            ),
        )?;
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("prometheus is not installed; run `scripts/services.sh up`")?;
        let url = format!("http://127.0.0.1:{port}");
        let http = dayshift_workflows::adapters::http::client();
        for _ in 0..400 {
            if let Ok(r) = http.get(format!("{url}/-/ready")).send().await
                && r.status().is_success()
            {
                return Ok(Self { url, child, dir });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("Prometheus on port {port} did not become ready")
    }

    /// Waits until the instant query `query` gives at least `n` series.
    pub async fn wait_for_series(&self, query: &str, n: usize, limit: Duration) -> Result<()> {
        let http = dayshift_workflows::adapters::http::client();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut url = url::Url::parse(&format!("{}/api/v1/query", self.url))?;
            url.query_pairs_mut().append_pair("query", query);
            let body: serde_json::Value = http.get(url).send().await?.json().await?;
            let found = body["data"]["result"].as_array().map_or(0, Vec::len);
            if found >= n {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{query} gave {found} series, not {n}, within {limit:?}: {body}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for OwnPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
