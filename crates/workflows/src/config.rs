//! What the config sections the workflows own have in common: the error that names the key
//! that is wrong and where a secret comes from (the engine's, [`dayshift_engine::config`],
//! shared by every section), and the defaults several sections use. Each section's type lives
//! with what reads it (`promotions:` in `gitops/chain.rs`, `playbooks:` in `remediate.rs`,
//! `connections:` in `connections.rs` and each adapter); the binary only composes them and
//! reads the secrets.
//!
//! Imports nothing of the crate, so that every module may use it.

pub use dayshift_engine::config::{InvalidConfig, SecretReader, SecretSource};

pub(crate) fn default_connection() -> String {
    "default".into()
}

pub(crate) fn ten_minutes() -> std::time::Duration {
    std::time::Duration::from_secs(600)
}
