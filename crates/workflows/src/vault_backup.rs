//! `backup.vault`: a snapshot of a Vault / OpenBao raft storage, streamed into S3 and verified
//! like a database backup (same key layout, manifest and verify step; kept by the same
//! `backup.retention`).

use std::sync::Arc;

use dayshift_engine::{Ctx, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};

use crate::adapters::s3::S3Store;
use crate::adapters::step_err;
use crate::adapters::vault::Vault;
use crate::backup::{Manifest, Target, store_backup};
use crate::connections::Connections;

/// The input of `backup.vault`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultBackupInput {
    /// A Vault connection name (connections.vault). Its token needs `read` on
    /// `sys/storage/raft/snapshot`.
    pub vault: String,
    /// An S3 connection name.
    pub store: String,
    /// Key prefix. Default `vault`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

fn default_prefix() -> String {
    "vault".into()
}

/// The `backup.vault` workflow.
pub fn backup_vault(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "backup.vault",
        "Streams a Vault/OpenBao raft snapshot into S3, with a manifest; verifies it.",
        move |ctx: Ctx, input: VaultBackupInput| {
            let connections = connections.clone();
            async move { run(ctx, &connections, input).await }
        },
    )
    .freshness("vault")
}

async fn run(ctx: Ctx, connections: &Connections, input: VaultBackupInput) -> Result<Manifest, WorkflowError> {
    let vault = Vault::new(connections.vault(&input.vault).map_err(WorkflowError::failed)?.clone());
    let s3 = S3Store::new(connections.s3(&input.store).map_err(WorkflowError::failed)?).await;
    let target = Target {
        kind: "vault",
        source: &input.vault,
        prefix: &input.prefix,
        extension: "snap",
    };
    let (s3r, vault) = (&s3, &vault);
    store_backup(&ctx, &s3, target, "snapshot-and-upload", |key| async move {
        s3r.ensure_bucket().await.map_err(step_err)?;
        let version = vault.version().await.map_err(step_err)?;
        let snapshot = vault.raft_snapshot().await.map_err(step_err)?;
        let stored = s3r.upload_stream(&key, snapshot, 8 << 20).await.map_err(step_err)?;
        Ok((stored, version))
    })
    .await
}
