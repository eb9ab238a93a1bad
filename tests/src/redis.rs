//! A Redis server of a test's own ([`OwnRedis`]), for tests that flush or stop it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{free_port, unique};

/// A Redis server of its own (for tests that flush everything).
pub struct OwnRedis {
    pub url: String,
    port: u16,
    dir: PathBuf,
}

impl OwnRedis {
    /// Starts `redis-server` on a free loopback port.
    pub async fn start() -> Result<Self> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("dayshift-redis-{}", unique()));
        std::fs::create_dir_all(&dir)?;
        let status = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--daemonize", "yes"])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(&dir)
            .status()
            .context("redis-server is not installed; run `scripts/services.sh up`")?;
        if !status.success() {
            bail!("redis-server failed to start");
        }
        let url = format!("redis://127.0.0.1:{port}/");
        let client = redis::Client::open(url.as_str())?;
        for _ in 0..100 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut c).await.is_ok()
            {
                return Ok(Self { url, port, dir });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server on port {port} did not answer")
    }

    /// `FLUSHALL`.
    pub async fn flushall(&self) -> Result<()> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("FLUSHALL").query_async::<String>(&mut c).await?;
        Ok(())
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "nosave"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
