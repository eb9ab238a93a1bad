//! Vault / OpenBao over its HTTP API, for what vaultrs does not cover as a stream: the raft
//! snapshot (`GET /v1/sys/storage/raft/snapshot`), which can be as large as the storage.
//!
//! The token is a credential: it goes only into the `X-Vault-Token` header, never into an error.

use std::time::Duration;

use futures::TryStreamExt;
use serde::Deserialize;
use tokio::io::AsyncRead;

/// A Vault or OpenBao server.
#[derive(Clone)]
pub struct VaultConfig {
    /// e.g. `https://vault.vault:8200`.
    pub address: String,
    pub token: String,
    /// The namespace header, for Vault Enterprise / OpenBao namespaces.
    pub namespace: Option<String>,
}

impl std::fmt::Debug for VaultConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultConfig")
            .field("address", &self.address)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// What went wrong talking to Vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("Vault at {address} could not be reached: {message}")]
    Unreachable { address: String, message: String },
    #[error("Vault answered {status} to {path}: {message}")]
    Refused { status: u16, path: String, message: String },
}

impl VaultError {
    /// Whether another attempt may work (network, a sealed or standby node, throttling).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Refused { status, .. } => *status == 429 || *status >= 500,
        }
    }
}

/// A client for one Vault.
#[derive(Clone, Debug)]
pub struct Vault {
    config: VaultConfig,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct SealStatus {
    #[serde(default)]
    version: String,
    sealed: bool,
}

#[derive(Deserialize)]
struct Errors {
    #[serde(default)]
    errors: Vec<String>,
}

impl Vault {
    pub fn new(config: VaultConfig) -> Self {
        // No overall timeout: a snapshot streams for as long as it is large. A stalled
        // connection still ends, through the read timeout.
        let http = super::http::builder()
            .read_timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client with static settings builds");
        Self { config, http }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}/v1/{path}", self.config.address.trim_end_matches('/'));
        let mut req = self
            .http
            .request(method, url)
            .header("X-Vault-Token", &self.config.token)
            .header("X-Vault-Request", "true");
        if let Some(ns) = &self.config.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        req
    }

    async fn send(&self, req: reqwest::RequestBuilder, path: &str) -> Result<reqwest::Response, VaultError> {
        let response = req.send().await.map_err(|e| VaultError::Unreachable {
            address: self.config.address.clone(),
            message: e.without_url().to_string(),
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<Errors>(&body) {
            Ok(e) if !e.errors.is_empty() => e.errors.join("; "),
            _ => body.chars().take(300).collect(),
        };
        Err(VaultError::Refused {
            status: status.as_u16(),
            path: path.to_string(),
            message: message.trim().to_string(),
        })
    }

    /// The server's version; an error if it is sealed.
    pub async fn version(&self) -> Result<String, VaultError> {
        let path = "sys/seal-status";
        let status: SealStatus = self
            .send(self.request(reqwest::Method::GET, path), path)
            .await?
            .json()
            .await
            .map_err(|e| VaultError::Unreachable {
                address: self.config.address.clone(),
                message: e.without_url().to_string(),
            })?;
        if status.sealed {
            return Err(VaultError::Refused {
                status: 503,
                path: path.into(),
                message: "Vault is sealed".into(),
            });
        }
        Ok(status.version)
    }

    /// A snapshot of the raft storage, as a stream (a gzipped archive that
    /// `POST sys/storage/raft/snapshot` accepts back).
    pub async fn raft_snapshot(&self) -> Result<impl AsyncRead + Unpin + Send + use<>, VaultError> {
        let path = "sys/storage/raft/snapshot";
        let response = self.send(self.request(reqwest::Method::GET, path), path).await?;
        let stream = response.bytes_stream().map_err(std::io::Error::other);
        Ok(tokio_util::io::StreamReader::new(stream))
    }
}
