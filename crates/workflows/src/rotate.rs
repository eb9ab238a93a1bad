//! `rotate.postgres-password`: a PostgreSQL role's password, kept in Vault KV v2, rotated so
//! that the run either completes or puts everything back.
//!
//! The password never enters the journal: steps return versions and names only, and every step
//! that needs a password reads it from Vault (the version the run wrote, or the one it started
//! from). PostgreSQL receives a SCRAM verifier, never the plaintext.
//!
//! Order, and why:
//! 1. `read-current`: the KV version the rotation is based on, and which role to change.
//! 2. `write-vault`: the new password as the next KV version, with check-and-set on that version
//!    and every other key of the entry kept. This is the first change, so a concurrent writer
//!    makes the run fail before anything else was touched. Its undo puts everything back.
//! 3. `set-role-password`, then the copies named in the input (Kubernetes Secrets, PgBouncer user
//!    lists), ExternalSecrets asked to sync, consumers restarted and their rollouts awaited,
//!    the new password tried, and the rotation recorded in the KV entry's custom metadata.
//!
//! With two roles (`roles: [a, b]`, the dual-account strategy of Vault's static roles), the new
//! password goes to the role not in use, and the entry's username switches to it: consumers
//! keep working with the old role until they are restarted with the new one.

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{Ctx, RetryPolicy, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::adapters::kube::{Kube, ObjectRef, Workload};
use crate::adapters::postgres::PgAdmin;
use crate::adapters::step_err;
use crate::adapters::vault::{Vault, VaultError};
use crate::connections::Connections;
use crate::secrets::Generator;
use crate::wait::{self, Wait};

/// Custom-metadata key marking an entry a run is rotating (so that a retried write can tell
/// its own earlier write from a concurrent one).
const PENDING: &str = "dayshift-rotation-pending";

/// A key of a Kubernetes Secret that holds the password (and, for two roles, the username).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyRef {
    pub namespace: String,
    pub name: String,
    /// The key holding the password.
    pub key: String,
    /// The key holding the username, to switch with two roles.
    #[serde(default)]
    pub username_key: Option<String>,
}

/// The input of `rotate.postgres-password`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgRotateInput {
    /// A Vault connection (connections.vault).
    pub vault: String,
    /// The KV v2 mount. Default `secret`.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// The entry's path under the mount, e.g. `apps/shop/db`.
    pub path: String,
    /// The entry's key holding the password. Default `password`.
    #[serde(default = "default_password_key")]
    pub password_key: String,
    /// The entry's key holding the username. Default `username`.
    #[serde(default = "default_username_key")]
    pub username_key: String,
    /// A PostgreSQL connection allowed to `ALTER ROLE` (connections.postgres).
    pub admin: String,
    /// The role, for one role.
    #[serde(default)]
    pub role: Option<String>,
    /// Two roles used in turn, instead of `role`.
    #[serde(default)]
    pub roles: Option<[String; 2]>,
    #[serde(default)]
    pub generator: Generator,
    /// The Kubernetes connection for the objects below. Default `default`.
    #[serde(default = "default_kubernetes")]
    pub kubernetes: String,
    /// Secrets that hold a copy of the password.
    #[serde(default)]
    pub secrets: Vec<SecretKeyRef>,
    /// PgBouncer/pgpool user lists (`"user" "password"` lines) in Secrets.
    #[serde(default)]
    pub pgbouncer: Vec<SecretKeyRef>,
    /// ExternalSecrets to sync from Vault now.
    #[serde(default)]
    pub external_secrets: Vec<ObjectRef>,
    /// Consumers restarted to pick the new password up.
    #[serde(default)]
    pub restart: Vec<Workload>,
    /// How long each rollout may take. Default 5m.
    #[serde(default = "default_rollout_timeout", with = "humantime_serde")]
    pub rollout_timeout: Duration,
    /// Report what would change and change nothing.
    #[serde(default)]
    pub plan: bool,
}

fn default_mount() -> String {
    "secret".into()
}
fn default_password_key() -> String {
    "password".into()
}
fn default_username_key() -> String {
    "username".into()
}
fn default_kubernetes() -> String {
    "default".into()
}
fn default_rollout_timeout() -> Duration {
    Duration::from_secs(300)
}

/// A request that must succeed with the new secret: `GET url` with `header: <prefix><secret>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub url: String,
    /// Default `Authorization`.
    #[serde(default = "default_header")]
    pub header: String,
    /// Default `Bearer ` (with the space).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Default 200.
    #[serde(default = "default_status")]
    pub expect_status: u16,
}

fn default_header() -> String {
    "Authorization".into()
}
fn default_prefix() -> String {
    "Bearer ".into()
}
fn default_status() -> u16 {
    200
}

impl HttpCheck {
    async fn run(&self, secret: &str) -> Result<(), StepError> {
        let response = crate::adapters::http::client()
            .get(&self.url)
            .header(&self.header, format!("{}{secret}", self.prefix))
            .send()
            .await
            .map_err(|e| StepError::transient(format!("the check of {} failed: {}", self.url, e.without_url())))?;
        let status = response.status().as_u16();
        if status == self.expect_status {
            Ok(())
        } else {
            // Retried: a consumer just restarted may not be serving yet.
            Err(StepError::Transient(format!(
                "the check of {} with the new secret answered {status}, expected {}",
                self.url, self.expect_status
            )))
        }
    }
}

/// The input of `rotate.kv-secret`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvRotateInput {
    /// A Vault connection (connections.vault).
    pub vault: String,
    /// The KV v2 mount. Default `secret`.
    #[serde(default = "default_mount")]
    pub mount: String,
    /// The entry's path under the mount.
    pub path: String,
    /// The entry's key holding the secret.
    pub key: String,
    #[serde(default)]
    pub generator: Generator,
    /// The Kubernetes connection for the objects below. Default `default`.
    #[serde(default = "default_kubernetes")]
    pub kubernetes: String,
    /// Secrets that hold a copy.
    #[serde(default)]
    pub secrets: Vec<SecretKeyRef>,
    /// ExternalSecrets to sync from Vault now.
    #[serde(default)]
    pub external_secrets: Vec<ObjectRef>,
    /// Consumers restarted to pick the new secret up.
    #[serde(default)]
    pub restart: Vec<Workload>,
    /// How long each rollout may take. Default 5m.
    #[serde(default = "default_rollout_timeout", with = "humantime_serde")]
    pub rollout_timeout: Duration,
    /// Report what would change and change nothing.
    #[serde(default)]
    pub plan: bool,
    /// Checked with the new secret once the consumers run.
    #[serde(default)]
    pub check: Option<HttpCheck>,
}

/// The `rotate.kv-secret` workflow.
pub fn rotate_kv_secret(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "rotate.kv-secret",
        "Rotates a generated secret in Vault KV v2, updates its copies, restarts consumers, checks it over HTTP; puts everything back on failure.",
        move |ctx: Ctx, input: KvRotateInput| {
            let connections = connections.clone();
            async move {
                let spec = Spec {
                    mount: input.mount,
                    path: input.path,
                    key: input.key,
                    username_key: String::new(),
                    generator: input.generator,
                    secrets: input.secrets,
                    external_secrets: input.external_secrets,
                    restart: input.restart,
                    rollout_timeout: input.rollout_timeout,
                    plan: input.plan,
                    subject: Subject::Generated { check: input.check },
                };
                let targets = open_targets(&connections, &input.vault, &input.kubernetes, spec).await?;
                rotate(&ctx, targets).await
            }
        },
    )
    .guard("mount")
    .guard("path")
    .guard("secrets[].namespace")
    .guard("secrets[].name")
    .guard("external_secrets[].namespace")
    .guard("external_secrets[].name")
    .guard("restart[].namespace")
    .guard("restart[].name")
    .guard("check.url")
    .freshness("path")
}

/// The input of `rotate.vault-database-root`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseRootInput {
    /// A Vault connection (connections.vault).
    pub vault: String,
    /// The database secrets engine's mount. Default `database`.
    #[serde(default = "default_database_mount")]
    pub mount: String,
    /// The engine's connection whose root credential to rotate.
    pub connection: String,
    /// A role of the engine to issue credentials from afterwards, proving Vault still reaches
    /// the database (the lease is revoked at once).
    #[serde(default)]
    pub verify_role: Option<String>,
}

fn default_database_mount() -> String {
    "database".into()
}

/// The `rotate.vault-database-root` workflow. The new root credential is known only to Vault:
/// there is nothing to roll back to, so the run verifies instead.
pub fn rotate_vault_database_root(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "rotate.vault-database-root",
        "Has Vault's database secrets engine rotate its root credential for a connection, then checks it still issues credentials.",
        move |ctx: Ctx, input: DatabaseRootInput| {
            let connections = connections.clone();
            async move {
                let vault = Vault::new(connections.vault(&input.vault).map_err(WorkflowError::failed)?.clone());
                let (v, i) = (&vault, &input);
                ctx.step("rotate-root", |_s| async move {
                    v.rotate_database_root(&i.mount, &i.connection).await.map_err(step_err)
                })
                .retry(RetryPolicy::network())
                .await?;
                if let Some(role) = &input.verify_role {
                    ctx.step("verify-credentials", |_s| async move {
                        v.check_database_credentials(&i.mount, role).await.map_err(step_err)
                    })
                    .retry(RetryPolicy::network())
                    .await?;
                }
                Ok(serde_json::json!({ "connection": input.connection, "verified_with": input.verify_role }))
            }
        },
    )
    .guard("mount")
    .guard("connection")
    .guard("verify_role")
    .freshness("connection")
}

/// What `read-current` found: no secrets, only where they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Basis {
    /// The KV version the rotation is based on (and rolls back to).
    pub version: u64,
    /// The role consumers use now.
    pub active_role: String,
    /// The role that gets the new password.
    pub target_role: String,
    /// When the rotation started; the restart stamp.
    pub at: String,
}

/// What `rotate.postgres-password` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationReport {
    /// The role that got the new password (PostgreSQL rotations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub previous_version: u64,
    /// The KV version written; absent in plan mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    pub rotated_at: String,
    pub restarted: Vec<String>,
    /// Plan mode: what the rotation would change (nothing was).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub would_change: Vec<String>,
}

/// What is rotated, whichever workflow started it.
struct Spec {
    mount: String,
    path: String,
    /// The entry's key holding the secret.
    key: String,
    username_key: String,
    generator: Generator,
    secrets: Vec<SecretKeyRef>,
    external_secrets: Vec<ObjectRef>,
    restart: Vec<Workload>,
    rollout_timeout: Duration,
    plan: bool,
    subject: Subject,
}

/// Where the secret is used besides its copies.
enum Subject {
    /// A PostgreSQL role's password (or two roles used in turn), set through an admin
    /// connection; PgBouncer user lists hold copies.
    Postgres {
        admin: PgAdmin,
        role: Option<String>,
        roles: Option<[String; 2]>,
        pgbouncer: Vec<SecretKeyRef>,
    },
    /// A generated secret (token, key) that consumers read; optionally checked over HTTP.
    Generated { check: Option<HttpCheck> },
}

impl Spec {
    fn roles(&self) -> Option<&[String; 2]> {
        match &self.subject {
            Subject::Postgres { roles, .. } => roles.as_ref(),
            Subject::Generated { .. } => None,
        }
    }

    fn pgbouncer(&self) -> &[SecretKeyRef] {
        match &self.subject {
            Subject::Postgres { pgbouncer, .. } => pgbouncer,
            Subject::Generated { .. } => &[],
        }
    }
}

/// Everything a rotation talks to.
#[derive(Clone)]
struct Targets {
    input: Arc<Spec>,
    vault: Vault,
    kube: Option<Kube>,
}

/// The `rotate.postgres-password` workflow.
pub fn rotate_postgres_password(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "rotate.postgres-password",
        "Rotates a PostgreSQL role's password kept in Vault KV v2, updates its copies, restarts consumers, verifies; puts everything back on failure.",
        move |ctx: Ctx, input: PgRotateInput| {
            let connections = connections.clone();
            async move {
                let targets = open(&connections, input).await?;
                rotate(&ctx, targets).await
            }
        },
    )
    .guard("mount")
    .guard("path")
    .guard("role")
    .guard("roles[]")
    .guard("secrets[].namespace")
    .guard("secrets[].name")
    .guard("pgbouncer[].namespace")
    .guard("pgbouncer[].name")
    .guard("external_secrets[].namespace")
    .guard("external_secrets[].name")
    .guard("restart[].namespace")
    .guard("restart[].name")
    .freshness("path")
}

async fn open(connections: &Connections, input: PgRotateInput) -> Result<Targets, WorkflowError> {
    match (&input.role, &input.roles) {
        (Some(_), None) => {}
        (None, Some([a, b])) if a != b => {}
        (None, Some(_)) => return Err(WorkflowError::failed("roles: give two different roles")),
        _ => {
            return Err(WorkflowError::failed(
                "give either `role` or `roles` (two roles used in turn)",
            ));
        }
    }
    let admin = PgAdmin::new(connections.postgres(&input.admin).map_err(WorkflowError::failed)?);
    let spec = Spec {
        mount: input.mount,
        path: input.path,
        key: input.password_key,
        username_key: input.username_key,
        generator: input.generator,
        secrets: input.secrets,
        external_secrets: input.external_secrets,
        restart: input.restart,
        rollout_timeout: input.rollout_timeout,
        plan: input.plan,
        subject: Subject::Postgres {
            admin,
            role: input.role,
            roles: input.roles,
            pgbouncer: input.pgbouncer,
        },
    };
    open_targets(connections, &input.vault, &input.kubernetes, spec).await
}

async fn open_targets(
    connections: &Connections,
    vault: &str,
    kubernetes: &str,
    spec: Spec,
) -> Result<Targets, WorkflowError> {
    spec.generator.check().map_err(WorkflowError::failed)?;
    let vault = Vault::new(connections.vault(vault).map_err(WorkflowError::failed)?.clone());
    let needs_kube = !(spec.secrets.is_empty()
        && spec.pgbouncer().is_empty()
        && spec.external_secrets.is_empty()
        && spec.restart.is_empty());
    let kube = if needs_kube {
        let config = connections.kubernetes(kubernetes).map_err(WorkflowError::failed)?;
        Some(Kube::connect(config).await.map_err(WorkflowError::failed)?)
    } else {
        None
    };
    Ok(Targets {
        input: Arc::new(spec),
        vault,
        kube,
    })
}

async fn rotate(ctx: &Ctx, t: Targets) -> Result<RotationReport, WorkflowError> {
    let input = &t.input;
    let tr = &t;
    let basis: Basis = ctx
        .step("read-current", |_s| async move {
            let entry = tr.vault.kv_read(&input.mount, &input.path).await.map_err(step_err)?;
            if !entry.data.contains_key(&input.key) {
                return Err(StepError::Permanent(format!(
                    "{}/{} has no key {:?} (it has {})",
                    input.mount,
                    input.path,
                    input.key,
                    entry.data.keys().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            let (active_role, target_role) = match &input.subject {
                Subject::Postgres { role: Some(role), .. } => (role.clone(), role.clone()),
                Subject::Postgres {
                    roles: Some([a, b]), ..
                } => {
                    let current = entry.data.get(&input.username_key).and_then(Value::as_str);
                    match current {
                        Some(u) if u == a => (a.clone(), b.clone()),
                        Some(u) if u == b => (b.clone(), a.clone()),
                        other => {
                            return Err(StepError::Permanent(format!(
                                "{}/{} key {:?} is {other:?}, neither of the roles {a} and {b}",
                                input.mount, input.path, input.username_key
                            )));
                        }
                    }
                }
                Subject::Postgres { .. } => return Err(StepError::permanent("give either `role` or `roles`")),
                Subject::Generated { .. } => (String::new(), String::new()),
            };
            Ok(Basis {
                version: entry.version,
                active_role,
                target_role,
                at: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            })
        })
        .retry(RetryPolicy::network())
        .await?;

    if input.plan {
        return Ok(plan(input, &basis));
    }

    let run_id = ctx.run_id().to_string();
    let (b, run) = (&basis, run_id.as_str());
    let version: u64 = ctx
        .step("write-vault", |_s| async move { write_vault(tr, b, run).await })
        .retry(RetryPolicy::network())
        .undo({
            let (t, basis, run) = (t.clone(), basis.clone(), run_id.clone());
            move |_s, version: u64| async move { roll_back(&t, &basis, version, &run).await }
        })
        .await?;

    if let Subject::Postgres { admin, .. } = &input.subject {
        ctx.step("set-role-password", |_s| async move {
            let password = new_secret(tr, version).await?;
            admin
                .set_role_password(&b.target_role, &password)
                .await
                .map_err(step_err)
        })
        .retry(RetryPolicy::network())
        .await?;
    }

    for s in &input.secrets {
        ctx.step(
            format!("update-secret:{}/{}/{}", s.namespace, s.name, s.key),
            |_s| async move {
                let password = new_secret(tr, version).await?;
                write_secret_copy(tr, s, &b.target_role, &password).await
            },
        )
        .retry(RetryPolicy::network())
        .await?;
    }
    for s in input.pgbouncer() {
        ctx.step(
            format!("update-pgbouncer:{}/{}/{}", s.namespace, s.name, s.key),
            |_s| async move {
                let password = new_secret(tr, version).await?;
                write_userlist(tr, s, &b.active_role, &b.target_role, &password).await
            },
        )
        .retry(RetryPolicy::network())
        .await?;
    }
    for es in &input.external_secrets {
        ctx.step(format!("force-sync:{}/{}", es.namespace, es.name), |_s| async move {
            kube(tr)?.force_sync_external_secret(es, &b.at).await.map_err(step_err)
        })
        .retry(RetryPolicy::network())
        .await?;
    }
    for w in &input.restart {
        ctx.step(
            format!("restart:{:?}/{}/{}", w.kind, w.namespace, w.name),
            |_s| async move { kube(tr)?.rollout_restart(w, &b.at).await.map_err(step_err) },
        )
        .retry(RetryPolicy::network())
        .await?;
    }
    for w in &input.restart {
        let name = format!("wait-rollout:{:?}/{}/{}", w.kind, w.namespace, w.name);
        let wait = Wait {
            name: &name,
            timeout: input.rollout_timeout,
            every: Duration::from_secs(1).min(input.rollout_timeout / 10),
            retry: RetryPolicy::network(),
        };
        wait::until(ctx, wait, || async move {
            wait::rollout(kube(tr)?, w, input.rollout_timeout).await
        })
        .await?;
    }

    match &input.subject {
        Subject::Postgres { admin, .. } => {
            ctx.step("verify-login", |_s| async move {
                let password = new_secret(tr, version).await?;
                admin.check_login(&b.target_role, &password).await.map_err(step_err)
            })
            .retry(RetryPolicy::network())
            .await?;
        }
        Subject::Generated { check: Some(check) } => {
            ctx.step("verify-http", |_s| async move {
                let secret = new_secret(tr, version).await?;
                check.run(&secret).await
            })
            .retry(RetryPolicy::network())
            .await?;
        }
        Subject::Generated { check: None } => {}
    }

    ctx.step("record", |_s| async move {
        tr.vault
            .kv_update_custom_metadata(
                &input.mount,
                &input.path,
                &[
                    ("rotated-at", Some(&b.at)),
                    ("rotated-by-run", Some(run)),
                    ("rotated-version", Some(&version.to_string())),
                    (PENDING, None),
                ],
            )
            .await
            .map_err(step_err)
    })
    .retry(RetryPolicy::network())
    .await?;

    Ok(RotationReport {
        role: Some(basis.target_role.clone()).filter(|r| !r.is_empty()),
        previous_version: basis.version,
        version: Some(version),
        rotated_at: basis.at.clone(),
        restarted: input.restart.iter().map(ToString::to_string).collect(),
        would_change: Vec::new(),
    })
}

/// What a rotation based on `basis` would change, in order.
fn plan(input: &Spec, basis: &Basis) -> RotationReport {
    let mut changes = vec![format!(
        "write a new {} at {}/{} as version {} (check-and-set on version {}), other keys kept",
        input.key,
        input.mount,
        input.path,
        basis.version + 1,
        basis.version
    )];
    if let Subject::Postgres { .. } = &input.subject {
        changes.push(format!("set the password of role {}", basis.target_role));
    }
    for s in &input.secrets {
        changes.push(format!("update key {} of Secret {}/{}", s.key, s.namespace, s.name));
    }
    for s in input.pgbouncer() {
        changes.push(format!(
            "update the line of {} in key {} of Secret {}/{}",
            basis.target_role, s.key, s.namespace, s.name
        ));
    }
    for es in &input.external_secrets {
        changes.push(format!("force-sync ExternalSecret {}/{}", es.namespace, es.name));
    }
    for w in &input.restart {
        changes.push(format!("restart {w} and wait for its rollout"));
    }
    RotationReport {
        role: Some(basis.target_role.clone()).filter(|r| !r.is_empty()),
        previous_version: basis.version,
        version: None,
        rotated_at: basis.at.clone(),
        restarted: Vec::new(),
        would_change: changes,
    }
}

fn kube(t: &Targets) -> Result<&Kube, StepError> {
    t.kube
        .as_ref()
        .ok_or_else(|| StepError::permanent("no Kubernetes connection"))
}

/// Writes the new password as the next KV version, based on `basis.version`; or, when an
/// earlier attempt of this run already did, returns that version.
async fn write_vault(t: &Targets, basis: &Basis, run_id: &str) -> Result<u64, StepError> {
    let input = &t.input;
    let current = t.vault.kv_read(&input.mount, &input.path).await.map_err(step_err)?;
    if current.version != basis.version {
        let ours = current.version == basis.version + 1
            && t.vault
                .kv_custom_metadata(&input.mount, &input.path)
                .await
                .map_err(step_err)?
                .get(PENDING)
                .map(String::as_str)
                == Some(run_id);
        if ours {
            return Ok(current.version);
        }
        return Err(step_err(VaultError::Conflict {
            path: format!("{}/data/{}", input.mount, input.path),
            expected: basis.version,
        }));
    }
    t.vault
        .kv_update_custom_metadata(&input.mount, &input.path, &[(PENDING, Some(run_id))])
        .await
        .map_err(step_err)?;
    let mut data = current.data;
    data.insert(input.key.clone(), Value::String(input.generator.generate()));
    if input.roles().is_some() {
        data.insert(input.username_key.clone(), Value::String(basis.target_role.clone()));
    }
    match t.vault.kv_write(&input.mount, &input.path, &data, basis.version).await {
        Ok(version) => Ok(version),
        Err(e) => {
            // Not ours to mark any more; the concurrent writer's value stays as it is.
            let _ = t
                .vault
                .kv_update_custom_metadata(&input.mount, &input.path, &[(PENDING, None)])
                .await;
            Err(step_err(e))
        }
    }
}

/// Puts back what the run changed, from the KV version it was based on: the entry (as a new
/// version, unless someone else wrote after the run), the role's password, the copies; then
/// asks ExternalSecrets to sync and restarts the consumers so they pick the old value up.
/// Safe to repeat.
async fn roll_back(t: &Targets, basis: &Basis, version: u64, run_id: &str) -> Result<(), StepError> {
    let input = &t.input;
    let old = t
        .vault
        .kv_read_version(&input.mount, &input.path, basis.version)
        .await
        .map_err(step_err)?;
    let current = t.vault.kv_read(&input.mount, &input.path).await.map_err(step_err)?;
    if current.version == version {
        t.vault
            .kv_write(&input.mount, &input.path, &old, version)
            .await
            .map_err(step_err)?;
    } else if current.data != old {
        return Err(StepError::Permanent(format!(
            "cannot roll back {}/{}: version {} was written after this run's version {version}; left as it is",
            input.mount, input.path, current.version
        )));
    }
    let old_password = secret_of(&old, &input.key)?;
    let old_username = old
        .get(&input.username_key)
        .and_then(Value::as_str)
        .unwrap_or(&basis.active_role)
        .to_string();
    if let Subject::Postgres { admin, roles: None, .. } = &input.subject {
        admin
            .set_role_password(&basis.active_role, &old_password)
            .await
            .map_err(step_err)?;
    }
    for s in &input.secrets {
        write_secret_copy(t, s, &old_username, &old_password).await?;
    }
    for s in input.pgbouncer() {
        write_userlist(t, s, &basis.target_role, &basis.active_role, &old_password).await?;
    }
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    for es in &input.external_secrets {
        kube(t)?.force_sync_external_secret(es, &now).await.map_err(step_err)?;
    }
    for w in &input.restart {
        kube(t)?.rollout_restart(w, &now).await.map_err(step_err)?;
    }
    t.vault
        .kv_update_custom_metadata(&input.mount, &input.path, &[(PENDING, None)])
        .await
        .map_err(step_err)?;
    tracing::warn!(run_id, path = %input.path, "Rotation rolled back.");
    Ok(())
}

fn secret_of(data: &serde_json::Map<String, Value>, key: &str) -> Result<String, StepError> {
    data.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| StepError::Permanent(format!("the KV entry's {key:?} is not a string")))
}

/// The secret of KV version `version` (the one this run wrote).
async fn new_secret(t: &Targets, version: u64) -> Result<String, StepError> {
    let data = t
        .vault
        .kv_read_version(&t.input.mount, &t.input.path, version)
        .await
        .map_err(step_err)?;
    secret_of(&data, &t.input.key)
}

/// Writes the password (and, with two roles, the username) into a Secret that holds a copy.
async fn write_secret_copy(t: &Targets, s: &SecretKeyRef, username: &str, password: &str) -> Result<(), StepError> {
    let kube = kube(t)?;
    let obj = ObjectRef {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
    };
    kube.set_secret_key(&obj, &s.key, password.as_bytes())
        .await
        .map_err(step_err)?;
    if let (Some(key), Some(_)) = (&s.username_key, t.input.roles()) {
        kube.set_secret_key(&obj, key, username.as_bytes())
            .await
            .map_err(step_err)?;
    }
    Ok(())
}

/// Replaces `from`'s line of a PgBouncer user list (`"user" "password"`) with `to`'s new
/// password, keeping every other line.
async fn write_userlist(t: &Targets, s: &SecretKeyRef, from: &str, to: &str, password: &str) -> Result<(), StepError> {
    let kube = kube(t)?;
    let obj = ObjectRef {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
    };
    let current = kube
        .secret_key(&obj, &s.key)
        .await
        .map_err(step_err)?
        .ok_or_else(|| StepError::Permanent(format!("Secret {}/{} has no key {:?}", s.namespace, s.name, s.key)))?;
    let text = String::from_utf8(current)
        .map_err(|_| StepError::Permanent(format!("Secret {}/{} key {:?} is not text", s.namespace, s.name, s.key)))?;
    let updated = userlist_with(&text, from, to, password);
    kube.set_secret_key(&obj, &s.key, updated.as_bytes())
        .await
        .map_err(step_err)
}

fn userlist_quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `text` with the lines of users `from` and `to` replaced by one line for `to`.
fn userlist_with(text: &str, from: &str, to: &str, password: &str) -> String {
    let (qf, qt) = (userlist_quote(from), userlist_quote(to));
    let line = format!("{qt} {}", userlist_quote(password));
    let mut out = Vec::new();
    let mut placed = false;
    for l in text.lines() {
        let user = l.trim_start();
        if user.starts_with(&format!("{qf} ")) || user.starts_with(&format!("{qt} ")) {
            if !placed {
                out.push(line.clone());
                placed = true;
            }
        } else {
            out.push(l.to_string());
        }
    }
    if !placed {
        out.push(line);
    }
    let mut joined = out.join("\n");
    joined.push('\n');
    joined
}

#[cfg(test)]
mod tests {
    use super::userlist_with;

    #[test]
    fn a_user_list_line_is_replaced_and_the_others_kept() {
        let text = "\"admin\" \"a\"\n\"shop\" \"old\"\n\"stats\" \"s\"\n";
        assert_eq!(
            userlist_with(text, "shop", "shop", "n\"w"),
            "\"admin\" \"a\"\n\"shop\" \"n\"\"w\"\n\"stats\" \"s\"\n"
        );
        // Two roles: the old role's line becomes the new role's.
        assert_eq!(
            userlist_with(text, "shop", "shop_b", "new"),
            "\"admin\" \"a\"\n\"shop_b\" \"new\"\n\"stats\" \"s\"\n"
        );
        assert_eq!(userlist_with("", "u", "u", "p"), "\"u\" \"p\"\n");
    }
}
