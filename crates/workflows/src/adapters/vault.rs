//! Vault / OpenBao over its HTTP API, for what vaultrs does not cover as a stream: the raft
//! snapshot (`GET /v1/sys/storage/raft/snapshot`), which can be as large as the storage.
//!
//! The token is a credential: it goes only into the `X-Vault-Token` header, never into an error.
//! It is given (from the environment or a file), or obtained by Kubernetes auth: the pod's
//! service account token exchanged at `auth/<mount>/login`, and again before it expires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use serde::Deserialize;
use tokio::io::AsyncRead;

use crate::config::{InvalidConfig, SecretReader, SecretSource};

/// A Vault or OpenBao server.
#[derive(Clone)]
pub struct VaultConfig {
    /// e.g. `https://vault.vault:8200`.
    pub address: String,
    pub auth: VaultAuth,
    /// The namespace header, for Vault Enterprise / OpenBao namespaces.
    pub namespace: Option<String>,
}

impl VaultConfig {
    /// A server reached with a token.
    pub fn with_token(address: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            auth: VaultAuth::Token(token.into()),
            namespace: None,
        }
    }
}

/// How dayshift gets its Vault token.
#[derive(Clone)]
pub enum VaultAuth {
    Token(String),
    /// Kubernetes auth: `role` at `auth/<mount>/login`, with the service account token read
    /// from `jwt_file` at each login (the kubelet rotates it).
    Kubernetes {
        mount: String,
        role: String,
        jwt_file: std::path::PathBuf,
    },
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
    /// A check-and-set write found another version than the one it was based on.
    #[error(
        "{path} changed under us: its current version is no longer {expected} (a concurrent write); nothing was overwritten"
    )]
    Conflict { path: String, expected: u64 },
}

impl VaultError {
    /// Whether another attempt may work (network, a sealed or standby node, throttling).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Refused { status, .. } => *status == 429 || *status >= 500,
            Self::Conflict { .. } => false,
        }
    }
}

/// A KV v2 entry at one version: its keys and values as stored (values need not be strings).
#[derive(Clone, PartialEq)]
pub struct KvEntry {
    pub version: u64,
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl std::fmt::Debug for KvEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvEntry")
            .field("version", &self.version)
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A client for one Vault.
#[derive(Clone, Debug)]
pub struct Vault {
    config: VaultConfig,
    http: reqwest::Client,
    /// A token from Kubernetes auth, and when to log in again.
    login: Arc<tokio::sync::Mutex<Option<(String, Instant)>>>,
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
        Self {
            config,
            http,
            login: Arc::default(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.config.address.trim_end_matches('/'))
    }

    /// The token to send: the configured one, or one from Kubernetes auth (logging in when
    /// there is none or it is about to expire).
    async fn token(&self) -> Result<String, VaultError> {
        let (mount, role, jwt_file) = match &self.config.auth {
            VaultAuth::Token(token) => return Ok(token.clone()),
            VaultAuth::Kubernetes { mount, role, jwt_file } => (mount, role, jwt_file),
        };
        let mut cached = self.login.lock().await;
        if let Some((token, renew_at)) = cached.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let jwt = std::fs::read_to_string(jwt_file).map_err(|e| VaultError::Refused {
            status: 0,
            path: format!("auth/{mount}/login"),
            message: format!("cannot read the service account token {}: {e}", jwt_file.display()),
        })?;
        #[derive(Deserialize)]
        struct Login {
            auth: LoginAuth,
        }
        #[derive(Deserialize)]
        struct LoginAuth {
            client_token: String,
            lease_duration: u64,
        }
        let path = format!("auth/{mount}/login");
        let mut req = self
            .http
            .post(self.url(&path))
            .json(&serde_json::json!({ "role": role, "jwt": jwt.trim() }));
        if let Some(ns) = &self.config.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        let login: Login = self
            .send(req, &path)
            .await?
            .json()
            .await
            .map_err(|e| VaultError::Unreachable {
                address: self.config.address.clone(),
                message: e.without_url().to_string(),
            })?;
        // Log in again when two thirds of the lease have passed.
        let renew_at = Instant::now() + Duration::from_secs(login.auth.lease_duration.max(3) * 2 / 3);
        *cached = Some((login.auth.client_token.clone(), renew_at));
        Ok(login.auth.client_token)
    }

    async fn request(&self, method: reqwest::Method, path: &str) -> Result<reqwest::RequestBuilder, VaultError> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("X-Vault-Token", self.token().await?)
            .header("X-Vault-Request", "true");
        if let Some(ns) = &self.config.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        Ok(req)
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
            .send(self.request(reqwest::Method::GET, path).await?, path)
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
        let response = self.send(self.request(reqwest::Method::GET, path).await?, path).await?;
        let stream = response.bytes_stream().map_err(std::io::Error::other);
        Ok(tokio_util::io::StreamReader::new(stream))
    }
}

/// KV v2 and the database secrets engine, through vaultrs.
impl Vault {
    async fn client(&self) -> Result<vaultrs::client::VaultClient, VaultError> {
        let mut settings = vaultrs::client::VaultClientSettingsBuilder::default();
        settings
            .address(&self.config.address)
            .token(self.token().await?)
            .timeout(Some(Duration::from_secs(30)));
        if let Some(ns) = &self.config.namespace {
            settings.namespace(Some(ns.clone()));
        }
        let settings = settings.build().map_err(|e| VaultError::Unreachable {
            address: self.config.address.clone(),
            message: e.to_string(),
        })?;
        vaultrs::client::VaultClient::new(settings).map_err(|e| self.client_error("client", e))
    }

    fn client_error(&self, path: &str, e: vaultrs::error::ClientError) -> VaultError {
        match e {
            vaultrs::error::ClientError::APIError { code, errors } => VaultError::Refused {
                status: code,
                path: path.to_string(),
                message: if errors.is_empty() {
                    "no details".into()
                } else {
                    errors.join("; ").trim().to_string()
                },
            },
            other => VaultError::Unreachable {
                address: self.config.address.clone(),
                message: other.to_string(),
            },
        }
    }

    /// The current version of a KV v2 entry.
    pub async fn kv_read(&self, mount: &str, path: &str) -> Result<KvEntry, VaultError> {
        let client = self.client().await?;
        let where_ = format!("{mount}/metadata/{path}");
        let meta = vaultrs::kv2::read_metadata(&client, mount, path)
            .await
            .map_err(|e| self.client_error(&where_, e))?;
        let data = self.kv_read_version(mount, path, meta.current_version).await?;
        Ok(KvEntry {
            version: meta.current_version,
            data,
        })
    }

    /// One version of a KV v2 entry.
    pub async fn kv_read_version(
        &self,
        mount: &str,
        path: &str,
        version: u64,
    ) -> Result<serde_json::Map<String, serde_json::Value>, VaultError> {
        let client = self.client().await?;
        vaultrs::kv2::read_version(&client, mount, path, version)
            .await
            .map_err(|e| self.client_error(&format!("{mount}/data/{path} (version {version})"), e))
    }

    /// Writes `data` as the next version, only if the current version is still `based_on`
    /// (check-and-set). Returns the new version.
    pub async fn kv_write(
        &self,
        mount: &str,
        path: &str,
        data: &serde_json::Map<String, serde_json::Value>,
        based_on: u64,
    ) -> Result<u64, VaultError> {
        let client = self.client().await?;
        let where_ = format!("{mount}/data/{path}");
        let cas = u32::try_from(based_on).map_err(|_| VaultError::Refused {
            status: 400,
            path: where_.clone(),
            message: format!("version {based_on} is beyond what check-and-set takes"),
        })?;
        let written = vaultrs::kv2::set_with_options(
            &client,
            mount,
            path,
            data,
            vaultrs::api::kv2::requests::SetSecretRequestOptions { cas },
        )
        .await
        .map_err(|e| match self.client_error(&where_, e) {
            VaultError::Refused {
                status: 400, message, ..
            } if message.contains("check-and-set") => VaultError::Conflict {
                path: where_.clone(),
                expected: based_on,
            },
            other => other,
        })?;
        Ok(written.version)
    }

    /// The entry's custom metadata.
    pub async fn kv_custom_metadata(
        &self,
        mount: &str,
        path: &str,
    ) -> Result<std::collections::HashMap<String, String>, VaultError> {
        let client = self.client().await?;
        let meta = vaultrs::kv2::read_metadata(&client, mount, path)
            .await
            .map_err(|e| self.client_error(&format!("{mount}/metadata/{path}"), e))?;
        Ok(meta.custom_metadata.unwrap_or_default())
    }

    /// Sets keys of the entry's custom metadata (absent values remove the key), keeping the others.
    pub async fn kv_update_custom_metadata(
        &self,
        mount: &str,
        path: &str,
        changes: &[(&str, Option<&str>)],
    ) -> Result<(), VaultError> {
        let mut custom = self.kv_custom_metadata(mount, path).await?;
        for (k, v) in changes {
            match v {
                Some(v) => custom.insert(k.to_string(), v.to_string()),
                None => custom.remove(*k),
            };
        }
        let client = self.client().await?;
        let mut request = vaultrs::api::kv2::requests::SetSecretMetadataRequest::builder();
        request.custom_metadata(custom);
        vaultrs::kv2::set_metadata(&client, mount, path, Some(&mut request))
            .await
            .map_err(|e| self.client_error(&format!("{mount}/metadata/{path}"), e))
    }

    /// Issues credentials from database role `role` and revokes their lease at once: proves the
    /// engine still reaches its database. The credentials are dropped unread.
    pub async fn check_database_credentials(&self, mount: &str, role: &str) -> Result<(), VaultError> {
        let path = format!("{mount}/creds/{role}");
        #[derive(Deserialize)]
        struct Issued {
            lease_id: String,
        }
        let issued: Issued = self
            .send(self.request(reqwest::Method::GET, &path).await?, &path)
            .await?
            .json()
            .await
            .map_err(|e| VaultError::Unreachable {
                address: self.config.address.clone(),
                message: e.without_url().to_string(),
            })?;
        let revoke = "sys/leases/revoke";
        self.send(
            self.request(reqwest::Method::PUT, revoke)
                .await?
                .json(&serde_json::json!({ "lease_id": issued.lease_id })),
            revoke,
        )
        .await?;
        Ok(())
    }

    /// Rotates the root credential the database secrets engine at `mount` uses for `connection`.
    pub async fn rotate_database_root(&self, mount: &str, connection: &str) -> Result<(), VaultError> {
        let client = self.client().await?;
        vaultrs::database::connection::rotate(&client, mount, connection)
            .await
            .map_err(|e| self.client_error(&format!("{mount}/rotate-root/{connection}"), e))
    }
}

// `connections.vault.<name>` as the config file gives it.
/// A Vault or OpenBao server.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VaultConnectionConfig {
    /// e.g. `https://vault.vault.svc:8200`.
    pub address: String,
    /// Where the token is; or use `kubernetes`.
    #[serde(default)]
    pub token: Option<SecretSource>,
    /// Kubernetes auth with the pod's service account, instead of `token`.
    #[serde(default)]
    pub kubernetes: Option<VaultKubernetesAuthConfig>,
    /// A namespace (Vault Enterprise, OpenBao namespaces).
    #[serde(default)]
    pub namespace: Option<String>,
}

/// Vault's Kubernetes auth method.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VaultKubernetesAuthConfig {
    /// The Vault role to log in as.
    pub role: String,
    /// Where the auth method is mounted. Default `kubernetes`.
    #[serde(default = "kubernetes_mount")]
    pub mount: String,
    /// The service account token. Default the one Kubernetes mounts into every pod.
    #[serde(default = "service_account_token")]
    pub jwt_file: std::path::PathBuf,
}

fn kubernetes_mount() -> String {
    "kubernetes".into()
}

fn service_account_token() -> std::path::PathBuf {
    "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
}

impl VaultConnectionConfig {
    /// The server with its token read, checked; `key` is where it is in the config.
    pub fn resolve(&self, key: &str, read: SecretReader<'_>) -> Result<VaultConfig, InvalidConfig> {
        if !(self.address.starts_with("http://") || self.address.starts_with("https://"))
            || url::Url::parse(&self.address).is_err()
        {
            return Err(InvalidConfig::new(
                format!("{key}.address"),
                "must start with http:// or https://",
            ));
        }
        let auth = match (&self.token, &self.kubernetes) {
            (Some(source), None) => VaultAuth::Token(read.text(source, &format!("{key}.token"))?.trim().to_string()),
            (None, Some(k)) => VaultAuth::Kubernetes {
                mount: k.mount.clone(),
                role: k.role.clone(),
                jwt_file: k.jwt_file.clone(),
            },
            _ => return Err(InvalidConfig::new(key, "give exactly one of `token` and `kubernetes`")),
        };
        Ok(VaultConfig {
            address: self.address.clone(),
            auth,
            namespace: self.namespace.clone(),
        })
    }
}
