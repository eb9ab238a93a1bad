//! OpenBao ([`OpenBao`]): the services script's shared server, or one of a test's own, and
//! its CLI.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::process::Command;

use crate::{free_port, unique};

/// An OpenBao server: the services script's, or one of a test's own.
pub struct OpenBao {
    pub addr: String,
    /// The root token.
    pub token: String,
    /// Set for a server of the test's own, stopped on drop.
    dir: Option<PathBuf>,
}

impl OpenBao {
    /// The server `scripts/services.sh` started (raft storage, unsealed). Tests on it keep to
    /// mounts of their own.
    pub fn shared() -> Self {
        let addr = std::env::var("DAYSHIFT_VAULT_ADDR").expect("DAYSHIFT_VAULT_ADDR is not set: source .dayshift/env");
        let file = std::env::var("DAYSHIFT_VAULT_TOKEN_FILE").expect("DAYSHIFT_VAULT_TOKEN_FILE is not set");
        let token = std::fs::read_to_string(&file)
            .expect("the OpenBao root token file")
            .trim()
            .to_string();
        Self { addr, token, dir: None }
    }

    /// A server of its own, with raft storage, initialised and unsealed (for tests that restore
    /// snapshots, which would roll back a shared server under other tests). Started through
    /// `scripts/openbao.sh`, the services script's way, on a free port.
    pub async fn own() -> Result<Self> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("dayshift-openbao-{}", unique()));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/openbao.sh");
        let out = Command::new(&script)
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .output()
            .await
            .with_context(|| format!("cannot run {}", script.display()))?;
        let bao = Self {
            addr: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            dir: Some(dir.clone()),
        };
        if !out.status.success() {
            bail!("OpenBao did not start: {}", String::from_utf8_lossy(&out.stderr));
        }
        let init: Value = serde_json::from_slice(&std::fs::read(dir.join("init.json"))?)?;
        let mut bao = bao;
        bao.token = init["root_token"]
            .as_str()
            .context("no root_token in init.json")?
            .to_string();
        Ok(bao)
    }

    /// Runs the `bao` CLI against this server as root; its stdout, or an error with its stderr.
    pub async fn bao(&self, args: &[&str]) -> Result<String> {
        let bin = std::env::var("DAYSHIFT_BAO").context("DAYSHIFT_BAO is not set: source .dayshift/env")?;
        let out = Command::new(bin)
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .output()
            .await?;
        if !out.status.success() {
            bail!("bao {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        let Some(dir) = &self.dir else { return };
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/openbao.sh");
        let _ = std::process::Command::new(script)
            .arg("stop")
            .arg(dir)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(dir);
    }
}
