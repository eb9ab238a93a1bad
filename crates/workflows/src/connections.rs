//! Named connections (S3 stores, PostgreSQL databases, Vaults, clusters, git repositories,
//! chat webhooks) that workflow inputs refer to by name, so that no input carries a credential.
//! Adapters only: what a workflow reads from the config besides them (promotions, playbooks)
//! is handed to that workflow, not kept here.

use std::collections::BTreeMap;

use crate::adapters::endpoint::{Endpoint, HttpConnectionConfig};
use crate::adapters::git::{GitConfig, GitConnectionConfig};
use crate::adapters::kube::{KubeConfig, KubernetesConnectionConfig};
use crate::adapters::notify::{Notifier, NotifyConnectionConfig};
use crate::adapters::postgres::PostgresConnectionConfig;
use crate::adapters::prometheus::{PrometheusConfig, PrometheusConnectionConfig};
use crate::adapters::s3::{S3Config, S3ConnectionConfig};
use crate::adapters::vault::{VaultConfig, VaultConnectionConfig};
use crate::config::{InvalidConfig, SecretReader};

// The config file's `connections:`; `resolve` makes the `Connections` the workflows use.
/// Named connections. Credentials come from the environment or files, never from this file.
#[derive(Debug, Clone, Default, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ConnectionsConfig {
    /// S3-compatible stores (SeaweedFS, MinIO, AWS), by name.
    pub s3: BTreeMap<String, S3ConnectionConfig>,
    /// PostgreSQL databases, by name.
    pub postgres: BTreeMap<String, PostgresConnectionConfig>,
    /// Chat webhooks for notices (Mattermost, Slack: anything taking `{"text": …}`), by name.
    pub notify: BTreeMap<String, NotifyConnectionConfig>,
    /// Vault / OpenBao servers, by name.
    pub vault: BTreeMap<String, VaultConnectionConfig>,
    /// Kubernetes clusters, by name.
    pub kubernetes: BTreeMap<String, KubernetesConnectionConfig>,
    /// Git repositories (the infra repositories ArgoCD watches), by name.
    pub git: BTreeMap<String, GitConnectionConfig>,
    /// Prometheus HTTP APIs (Prometheus, Thanos, Mimir), by name.
    pub prometheus: BTreeMap<String, PrometheusConnectionConfig>,
    /// HTTP APIs the `http.request` action may call (a registry, an IdP, a forge), by name.
    pub http: BTreeMap<String, HttpConnectionConfig>,
}

impl ConnectionsConfig {
    /// The connections' names by kind (`postgres`, `s3`, …), without reading any secret.
    pub fn names(&self) -> BTreeMap<String, std::collections::BTreeSet<String>> {
        let names = |m: Vec<&String>| m.into_iter().cloned().collect();
        BTreeMap::from([
            ("s3".to_string(), names(self.s3.keys().collect())),
            ("postgres".to_string(), names(self.postgres.keys().collect())),
            ("notify".to_string(), names(self.notify.keys().collect())),
            ("vault".to_string(), names(self.vault.keys().collect())),
            ("kubernetes".to_string(), names(self.kubernetes.keys().collect())),
            ("git".to_string(), names(self.git.keys().collect())),
            ("prometheus".to_string(), names(self.prometheus.keys().collect())),
            ("http".to_string(), names(self.http.keys().collect())),
        ])
    }

    /// The connections with their secrets read by `read`, each checked; the first problem
    /// names its key (`connections.vault.openbao.address`).
    pub fn resolve(&self, read: SecretReader<'_>) -> Result<Connections, InvalidConfig> {
        fn each<C, T>(
            section: &str,
            map: &BTreeMap<String, C>,
            resolve: impl Fn(&C, &str) -> Result<T, InvalidConfig>,
        ) -> Result<BTreeMap<String, T>, InvalidConfig> {
            map.iter()
                .map(|(name, c)| Ok((name.clone(), resolve(c, &format!("connections.{section}.{name}"))?)))
                .collect()
        }
        // In this order, so that the first problem reported stays the same.
        let s3 = each("s3", &self.s3, |c, key| c.resolve(key, read))?;
        let postgres = each("postgres", &self.postgres, |c, key| c.resolve(key, read))?;
        let notify = each("notify", &self.notify, |c, key| c.resolve(key, read))?;
        let kubernetes = each("kubernetes", &self.kubernetes, |c, key| c.resolve(key, read))?;
        let git = each("git", &self.git, |c, key| c.resolve(key, read))?;
        let vault = each("vault", &self.vault, |c, key| c.resolve(key, read))?;
        let prometheus = each("prometheus", &self.prometheus, |c, key| c.resolve(key, read))?;
        let http = each("http", &self.http, |c, key| c.resolve(key, read))?;
        Ok(Connections {
            s3,
            postgres,
            notify,
            vault,
            kubernetes,
            git,
            prometheus,
            http,
        })
    }
}

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
    /// Prometheus HTTP APIs, by name.
    pub prometheus: BTreeMap<String, PrometheusConfig>,
    /// HTTP APIs, by name. Their credentials are never journaled, logged or returned.
    pub http: BTreeMap<String, Endpoint>,
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
            .field("prometheus", &self.prometheus.keys().collect::<Vec<_>>())
            .field("http", &self.http.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A name the config does not declare; the message lists the names it does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{missing} '{name}' ({section}: {known})")]
pub struct NotConfigured {
    missing: &'static str,
    name: String,
    section: &'static str,
    known: String,
}

/// The one lookup by name: `map[name]`, or an error that says `missing` (`no S3 connection
/// named`) and which names `section` (`connections.s3`) has.
pub(crate) fn lookup<'a, T>(
    map: &'a BTreeMap<String, T>,
    name: &str,
    missing: &'static str,
    section: &'static str,
) -> Result<&'a T, NotConfigured> {
    map.get(name).ok_or_else(|| NotConfigured {
        missing,
        name: name.to_string(),
        section,
        known: map.keys().cloned().collect::<Vec<_>>().join(", "),
    })
}

impl Connections {
    /// The S3 store named `name`.
    pub fn s3(&self, name: &str) -> Result<&S3Config, NotConfigured> {
        lookup(&self.s3, name, "no S3 connection named", "connections.s3")
    }

    /// The PostgreSQL URL named `name`.
    pub fn postgres(&self, name: &str) -> Result<&str, NotConfigured> {
        lookup(
            &self.postgres,
            name,
            "no PostgreSQL connection named",
            "connections.postgres",
        )
        .map(String::as_str)
    }

    /// The Vault named `name`.
    pub fn vault(&self, name: &str) -> Result<&VaultConfig, NotConfigured> {
        lookup(&self.vault, name, "no Vault connection named", "connections.vault")
    }

    /// The Kubernetes cluster named `name`.
    pub fn kubernetes(&self, name: &str) -> Result<&KubeConfig, NotConfigured> {
        lookup(
            &self.kubernetes,
            name,
            "no Kubernetes connection named",
            "connections.kubernetes",
        )
    }

    /// The git repository named `name`.
    pub fn git(&self, name: &str) -> Result<&GitConfig, NotConfigured> {
        lookup(&self.git, name, "no git connection named", "connections.git")
    }

    /// The Prometheus named `name`.
    pub fn prometheus(&self, name: &str) -> Result<&PrometheusConfig, NotConfigured> {
        lookup(
            &self.prometheus,
            name,
            "no Prometheus connection named",
            "connections.prometheus",
        )
    }

    /// The HTTP API named `name`.
    pub fn http(&self, name: &str) -> Result<&Endpoint, NotConfigured> {
        lookup(&self.http, name, "no HTTP connection named", "connections.http")
    }

    /// The notice webhook named `name`.
    pub fn notifier(&self, name: &str) -> Result<Notifier, NotConfigured> {
        lookup(&self.notify, name, "no notice webhook named", "connections.notify").map(Notifier::new)
    }
}

#[cfg(test)]
mod tests {
    use super::Connections;

    #[test]
    fn a_missing_name_is_refused_with_the_names_there_are() {
        let mut c = Connections::default();
        c.postgres.insert("app".into(), "postgres://a".into());
        c.postgres.insert("billing".into(), "postgres://b".into());
        assert_eq!(c.postgres("app").unwrap(), "postgres://a");
        assert_eq!(
            c.postgres("ap").unwrap_err().to_string(),
            "no PostgreSQL connection named 'ap' (connections.postgres: app, billing)"
        );
        assert_eq!(
            c.notifier("ops").unwrap_err().to_string(),
            "no notice webhook named 'ops' (connections.notify: )"
        );
    }
}
