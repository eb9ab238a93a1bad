//! What the config sections the workflows own have in common: the error that names the key
//! that is wrong, and the checked approval gate. Each section's type lives with the workflow
//! that reads it (`promotions:` in `gitops/chain.rs`, `playbooks:` in `remediate.rs`,
//! `connections:` in `connections.rs`); the binary only composes them.

use crate::gates::ApprovalGate;

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

/// `gate` checked; an error names `key`.
pub(crate) fn checked_gate(gate: &ApprovalGate, key: &str) -> Result<ApprovalGate, InvalidConfig> {
    gate.check().map_err(|e| InvalidConfig::new(key, e))?;
    Ok(gate.clone())
}

pub(crate) fn default_connection() -> String {
    "default".into()
}

pub(crate) fn ten_minutes() -> std::time::Duration {
    std::time::Duration::from_secs(600)
}
