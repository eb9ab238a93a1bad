//! dayshift-workflows: the built-in Day-2 workflows.
//!
//! Each family lives in its own module and is registered through [`all`].

pub mod adapters;
mod backup;
pub mod component;
mod config;
mod connections;
pub mod declarative;
pub mod file_sync;
mod gates;
pub mod gitops;
mod remediate;
mod restore_test;
mod retention;
mod rotate;
pub mod secrets;
mod selftest;
mod vault_backup;
mod wait;

pub use backup::{BackupInput, Manifest, RestoreInput, backup_postgres, restore_postgres};
pub use component::{
    ChildRun, ComponentInput, ComponentReport, FIELD_MANAGER, Phase, PlatformInput, PlatformReport, RollbackPoint,
    SmokeCheck, install_component, install_platform, upgrade_component,
};
pub use config::{InvalidConfig, SecretReader, SecretSource};
pub use connections::{Connections, ConnectionsConfig, NotConfigured};
pub use gates::{ApprovalGate, ApprovalRequest, Approver, Counted};
pub use gitops::chain::{
    AppPromotion, ChainPlan, EnvPromotion, EnvironmentConfig, PromoteChainInput, PromotionConfig, Promotions, Window,
    WindowConfig, promote_chain,
};
pub use gitops::preview::{PreviewChange, PreviewInput, dns_label, preview_create, preview_delete};
pub use gitops::promote::{ArgoApp, PromoteInput, Promotion, Pushed, promote_image};
pub use remediate::{
    Action, ActionConfig, ActionSpec, Playbook, PlaybookConfig, Playbooks, RemediateInput, Remediation, Taken,
    remediate,
};
pub use restore_test::{Check, CheckResult, RestoreTestInput, RestoreTestReport, backup_restore_test};
pub use retention::{Backup, RetentionInput, RetentionPolicy, RetentionReport, backup_retention, plan, time_of};
pub use rotate::{
    Basis, DatabaseRootInput, HttpCheck, KvRotateInput, PgRotateInput, RotationReport, SecretKeyRef, rotate_kv_secret,
    rotate_postgres_password, rotate_vault_database_root,
};
pub use selftest::{ChainInput, ChainOutput, GateInput, GateOutput, StepCount, TableName, chain, gate};
pub use vault_backup::{VaultBackupInput, backup_vault};

use dayshift_engine::WorkflowDef;
use sqlx::PgPool;

/// What the config file declares for the workflows that read it besides the connections:
/// each catalog is handed to the workflow that uses it.
#[derive(Debug, Clone, Default)]
pub struct Catalogs {
    /// How each application is promoted (`promotions:`), for `promote.chain`.
    pub promotions: Promotions,
    /// Alertmanager remediation playbooks (`playbooks:`), for `remediate`.
    pub playbooks: Playbooks,
    /// Workflows written as files (`workflows.dirs`), each registered under its own name.
    pub workflows: Vec<std::sync::Arc<declarative::Definition>>,
    /// The config's connection names by kind (no credentials): what a `type: connection` input
    /// of a workflow file may name.
    pub connection_names: std::sync::Arc<std::collections::BTreeMap<String, std::collections::BTreeSet<String>>>,
}

/// Every built-in workflow, with no named connections. `pool` is the dayshift database, for
/// workflows that keep tables of their own there.
pub fn all(pool: PgPool) -> Vec<WorkflowDef> {
    all_with(pool, Connections::default(), Catalogs::default())
}

/// Every built-in workflow, with the connections and catalogs the config file names.
pub fn all_with(pool: PgPool, connections: Connections, catalogs: Catalogs) -> Vec<WorkflowDef> {
    let connections = std::sync::Arc::new(connections);
    let declared: Vec<WorkflowDef> = catalogs
        .workflows
        .iter()
        .map(|d| {
            d.clone().workflow(
                connections.clone(),
                catalogs.connection_names.clone(),
                Some(pool.clone()),
            )
        })
        .collect();
    let mut all = vec![
        chain(pool),
        gate(),
        backup_postgres(connections.clone()),
        backup_retention(connections.clone()),
        backup_restore_test(connections.clone()),
        backup_vault(connections.clone()),
        rotate_postgres_password(connections.clone()),
        rotate_kv_secret(connections.clone()),
        rotate_vault_database_root(connections.clone()),
        promote_image(connections.clone()),
        promote_chain(connections.clone(), std::sync::Arc::new(catalogs.promotions)),
        preview_create(connections.clone()),
        preview_delete(connections.clone()),
        remediate(connections.clone(), std::sync::Arc::new(catalogs.playbooks)),
        install_component(connections.clone()),
        upgrade_component(connections.clone()),
        install_platform(),
        restore_postgres(connections),
    ];
    all.extend(declared);
    all
}

/// The built-in workflows' names, which a workflow file may not take.
pub const BUILT_IN: [&str; 18] = [
    "selftest.chain",
    "selftest.gate",
    "backup.postgres",
    "backup.retention",
    "backup.restore-test",
    "backup.vault",
    "rotate.postgres-password",
    "rotate.kv-secret",
    "rotate.vault-database-root",
    "promote.image",
    "promote.chain",
    "preview.create",
    "preview.delete",
    "remediate",
    "install.component",
    "upgrade.component",
    "install.platform",
    "restore.postgres",
];

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_reserved_names_are_those_of_the_built_in_workflows() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://localhost/unused")
            .unwrap();
        let mut registered: Vec<String> = super::all(pool).iter().map(|w| w.name().to_string()).collect();
        let mut reserved: Vec<String> = super::BUILT_IN.iter().map(|s| s.to_string()).collect();
        registered.sort();
        reserved.sort();
        assert_eq!(registered, reserved);
    }
}
