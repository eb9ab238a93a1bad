//! An Alertmanager of a test's own ([`OwnAlertmanager`]) that notifies dayshift.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{free_port, unique};

/// An Alertmanager of its own (Debian's `prometheus-alertmanager`), sending to `receiver_url`
/// with a bearer token, grouping by alert name, repeating every second.
pub struct OwnAlertmanager {
    pub url: String,
    child: std::process::Child,
    dir: PathBuf,
}

impl OwnAlertmanager {
    /// Starts it and waits until its API answers.
    pub async fn start(receiver_url: &str, token: &str) -> Result<Self> {
        Self::start_with(receiver_url, token, "0s", "1s").await
    }

    /// Same, waiting `group_wait` before a group's first notification and `repeat_interval`
    /// before sending an unchanged one again. Its notification timeout is Alertmanager's own:
    /// `group_interval` (1s here) raised to its minimum of 10 s.
    pub async fn start_with(receiver_url: &str, token: &str, group_wait: &str, repeat_interval: &str) -> Result<Self> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("dayshift-am-{}", unique()));
        std::fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                "route:\n  receiver: dayshift\n  group_by: [alertname]\n  group_wait: {group_wait}\n  group_interval: 1s\n  \
                 repeat_interval: {repeat_interval}\nreceivers:\n  - name: dayshift\n    webhook_configs:\n      - url: {receiver_url}\n        \
                 send_resolved: true\n        http_config:\n          authorization:\n            type: Bearer\n            \
                 credentials: {token}\n"
            ),
        )?;
        let child = std::process::Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("prometheus-alertmanager is not installed; run `scripts/services.sh up`")?;
        let url = format!("http://127.0.0.1:{port}");
        let http = dayshift_workflows::adapters::http::client();
        for _ in 0..200 {
            if let Ok(r) = http.get(format!("{url}/-/ready")).send().await
                && r.status().is_success()
            {
                return Ok(Self { url, child, dir });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("Alertmanager on port {port} did not become ready")
    }

    /// The value of one of its own metrics (`/metrics`), summed over the series whose labels
    /// contain `labels` (e.g. `integration="webhook"`); 0 if there is none.
    pub async fn metric(&self, name: &str, labels: &str) -> Result<f64> {
        let text = dayshift_workflows::adapters::http::client()
            .get(format!("{}/metrics", self.url))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(series, _)| series.split('{').next() == Some(name) && series.contains(labels))
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum())
    }

    /// Posts alerts to its API (`/api/v2/alerts`), as Prometheus does.
    pub async fn post_alerts(&self, alerts: &Value) -> Result<()> {
        let r = dayshift_workflows::adapters::http::client()
            .post(format!("{}/api/v2/alerts", self.url))
            .json(alerts)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "Alertmanager refused the alerts: {}",
                r.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for OwnAlertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
