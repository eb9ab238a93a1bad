//! Named connections (S3 stores, PostgreSQL databases) that workflow inputs refer to by name,
//! so that no input carries a credential.

use std::collections::BTreeMap;

use crate::adapters::s3::S3Config;

/// The connections declared in the config file, with their secrets read.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    /// S3-compatible stores, by name.
    pub s3: BTreeMap<String, S3Config>,
    /// PostgreSQL connection URLs, by name. Never journaled, logged or returned.
    pub postgres: BTreeMap<String, String>,
}

impl Connections {
    /// The S3 store named `name`.
    pub fn s3(&self, name: &str) -> Result<&S3Config, String> {
        self.s3.get(name).ok_or_else(|| {
            format!(
                "no S3 connection named '{name}' (connections.s3: {})",
                self.s3.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The PostgreSQL URL named `name`.
    pub fn postgres(&self, name: &str) -> Result<&str, String> {
        self.postgres.get(name).map(String::as_str).ok_or_else(|| {
            format!(
                "no PostgreSQL connection named '{name}' (connections.postgres: {})",
                self.postgres.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}
