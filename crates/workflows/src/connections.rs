//! Named connections (S3 stores, PostgreSQL databases) that workflow inputs refer to by name,
//! so that no input carries a credential.

use std::collections::BTreeMap;

use crate::adapters::git::GitConfig;
use crate::adapters::kube::KubeConfig;
use crate::adapters::notify::Notifier;
use crate::adapters::s3::S3Config;
use crate::adapters::vault::VaultConfig;
use crate::gitops::chain::AppPromotion;
use crate::remediate::Playbook;

/// The connections declared in the config file, with their secrets read. `Debug` shows the
/// names only.
#[derive(Clone, Default)]
pub struct Connections {
    /// S3-compatible stores, by name.
    pub s3: BTreeMap<String, S3Config>,
    /// PostgreSQL connection URLs, by name. Never journaled, logged or returned.
    pub postgres: BTreeMap<String, String>,
    /// Chat webhooks for notices (Mattermost, Slack), by name. The URL is a credential.
    pub notify: BTreeMap<String, String>,
    /// Vault / OpenBao servers, by name.
    pub vault: BTreeMap<String, VaultConfig>,
    /// Kubernetes clusters, by name.
    pub kubernetes: BTreeMap<String, KubeConfig>,
    /// Git repositories, by name.
    pub git: BTreeMap<String, GitConfig>,
    /// How each application is promoted through its environments (`promotions:`).
    pub promotions: BTreeMap<String, AppPromotion>,
    /// Alertmanager remediation playbooks, by name (`playbooks:`).
    pub playbooks: BTreeMap<String, Playbook>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("s3", &self.s3.keys().collect::<Vec<_>>())
            .field("postgres", &self.postgres.keys().collect::<Vec<_>>())
            .field("notify", &self.notify.keys().collect::<Vec<_>>())
            .field("vault", &self.vault.keys().collect::<Vec<_>>())
            .field("kubernetes", &self.kubernetes.keys().collect::<Vec<_>>())
            .field("git", &self.git.keys().collect::<Vec<_>>())
            .finish()
    }
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

    /// The Vault named `name`.
    pub fn vault(&self, name: &str) -> Result<&VaultConfig, String> {
        self.vault.get(name).ok_or_else(|| {
            format!(
                "no Vault connection named '{name}' (connections.vault: {})",
                self.vault.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The Kubernetes cluster named `name`.
    pub fn kubernetes(&self, name: &str) -> Result<&KubeConfig, String> {
        self.kubernetes.get(name).ok_or_else(|| {
            format!(
                "no Kubernetes connection named '{name}' (connections.kubernetes: {})",
                self.kubernetes.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The git repository named `name`.
    pub fn git(&self, name: &str) -> Result<&GitConfig, String> {
        self.git.get(name).ok_or_else(|| {
            format!(
                "no git connection named '{name}' (connections.git: {})",
                self.git.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// How application `name` is promoted.
    pub fn promotion(&self, name: &str) -> Result<&AppPromotion, String> {
        self.promotions.get(name).ok_or_else(|| {
            format!(
                "no promotions configured for application '{name}' (promotions: {})",
                self.promotions.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The playbook named `name`.
    pub fn playbook(&self, name: &str) -> Result<&Playbook, String> {
        self.playbooks.get(name).ok_or_else(|| {
            format!(
                "no playbook named '{name}' (playbooks: {})",
                self.playbooks.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The notice webhook named `name`.
    pub fn notifier(&self, name: &str) -> Result<Notifier, String> {
        self.notify.get(name).map(Notifier::new).ok_or_else(|| {
            format!(
                "no notice webhook named '{name}' (connections.notify: {})",
                self.notify.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}
