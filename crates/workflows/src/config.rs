//! What the config sections the workflows own have in common: the error that names the key
//! that is wrong, and where a secret comes from. Each section's type lives with what reads it
//! (`promotions:` in `gitops/chain.rs`, `playbooks:` in `remediate.rs`, `connections:` in
//! `connections.rs` and each adapter); the binary only composes them and reads the secrets.
//!
//! Imports nothing of the crate, so that every module may use it.

/// A config value that is wrong: `key` is where (`promotions.api.environments[0].window.from`),
/// `problem` what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct InvalidConfig {
    /// The dotted path of the value.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl InvalidConfig {
    /// `key` is wrong because of `problem`.
    pub fn new(key: impl Into<String>, problem: impl std::fmt::Display) -> Self {
        Self {
            key: key.into(),
            problem: problem.to_string(),
        }
    }
}

/// Where a secret comes from: an environment variable or a file (e.g. a mounted Kubernetes
/// secret). Exactly one.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// The environment variable holding it.
    pub env: Option<String>,
    /// The file holding it (trailing newline ignored).
    pub file: Option<std::path::PathBuf>,
}

/// Reads a [`SecretSource`] as text; the error names the key (`connections.s3.backups.access-key`).
/// The binary provides it: reading the environment and files is its business, not a workflow's.
pub type SecretReader<'a> = &'a dyn Fn(&SecretSource, &str) -> Result<String, InvalidConfig>;

pub(crate) fn default_connection() -> String {
    "default".into()
}

pub(crate) fn ten_minutes() -> std::time::Duration {
    std::time::Duration::from_secs(600)
}
