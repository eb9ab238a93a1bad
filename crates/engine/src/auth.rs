//! Who may call the API: bearer tokens with a role, stored hashed, and the audit trail of what
//! each caller did.
//!
//! Roles, each including the ones before it:
//! - `viewer`: reads runs, events, schedules, workflows, remediations;
//! - `operator`: also starts, cancels and signals runs, approves and rejects;
//! - `admin`: also manages tokens and schedules (pause, resume, trigger) and reads the audit.
//!
//! `/healthz`, `/readyz`, `/metrics` (unless configured otherwise) and the webhook endpoints
//! (`/hooks/…`, which check their own signatures) need no token.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest as _;
use sqlx::{PgPool, Row};

use crate::error::StoreError;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(format!("unknown role '{other}'; use viewer, operator or admin")),
        }
    }
}

/// An authenticated caller: the name its token was created with (or its OIDC identity).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// How the API authenticates.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Serve `/metrics` without a token (the default: Prometheus scrapes it).
    pub public_metrics: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { public_metrics: true }
    }
}

/// A token as listed (never the token itself).
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A token's prefix, so one found in a log or a repository is recognised as dayshift's.
pub const TOKEN_PREFIX: &str = "dsh_";

fn hash(token: &str) -> Vec<u8> {
    sha2::Sha256::digest(token.as_bytes()).to_vec()
}

/// Creates a token named `name` with `role`; returns the token, shown this once.
pub async fn create_token(
    pool: &PgPool,
    name: &str,
    role: Role,
    expires_at: Option<DateTime<Utc>>,
    created_by: &str,
) -> Result<String, StoreError> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(StoreError::Conflict(
            "a token name must be 1 to 200 printable characters".into(),
        ));
    }
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
    let inserted = sqlx::query(
        "insert into api_tokens (id, name, role, token_hash, created_by, expires_at) \
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(name)
    .bind(role.to_string())
    .bind(hash(&token))
    .bind(created_by)
    .bind(expires_at)
    .execute(pool)
    .await;
    match inserted {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(StoreError::Conflict(format!(
                "a token named '{name}' exists; revoke it first or choose another name"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    audit(
        pool,
        created_by,
        None,
        "token.create",
        Some(name),
        serde_json::json!({ "role": role }),
    )
    .await?;
    Ok(token)
}

/// Revokes the live token named `name`; it stops working at once. `false` if there is none.
pub async fn revoke_token(pool: &PgPool, name: &str, by: &str) -> Result<bool, StoreError> {
    let done = sqlx::query("update api_tokens set revoked_at = now() where name = $1 and revoked_at is null")
        .bind(name)
        .execute(pool)
        .await?
        .rows_affected()
        > 0;
    if done {
        audit(pool, by, None, "token.revoke", Some(name), Value::Null).await?;
    }
    Ok(done)
}

/// Every token, live ones first, newest first.
pub async fn list_tokens(pool: &PgPool) -> Result<Vec<TokenInfo>, StoreError> {
    let rows = sqlx::query(
        "select name, role, created_at, created_by, expires_at, revoked_at, last_used_at from api_tokens \
         order by revoked_at is not null, created_at desc",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(TokenInfo {
                name: r.get("name"),
                role: r.get::<String, _>("role").parse().map_err(StoreError::Conflict)?,
                created_at: r.get("created_at"),
                created_by: r.get("created_by"),
                expires_at: r.get("expires_at"),
                revoked_at: r.get("revoked_at"),
                last_used_at: r.get("last_used_at"),
            })
        })
        .collect()
}

/// The caller a token belongs to, if it is live (not revoked, not expired). Looked up on every
/// request, so a revocation takes effect at once.
pub async fn authenticate(pool: &PgPool, token: &str) -> Result<Option<Caller>, StoreError> {
    if !token.starts_with(TOKEN_PREFIX) {
        return Ok(None);
    }
    // last_used_at is written at most once a minute per token, not on every request.
    let row = sqlx::query(
        "with found as ( \
           select id, name, role, last_used_at from api_tokens \
           where token_hash = $1 and revoked_at is null and (expires_at is null or expires_at > now())), \
         touched as ( \
           update api_tokens t set last_used_at = now() from found \
           where t.id = found.id and (found.last_used_at is null or found.last_used_at < now() - interval '1 minute')) \
         select name, role from found",
    )
    .bind(hash(token))
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(Caller {
            name: r.get("name"),
            role: r.get::<String, _>("role").parse().map_err(StoreError::Conflict)?,
        })
    })
    .transpose()
}

/// Records that `actor` did `action` to `target`.
pub async fn audit(
    pool: &PgPool,
    actor: &str,
    role: Option<Role>,
    action: &str,
    target: Option<&str>,
    detail: Value,
) -> Result<(), StoreError> {
    let detail = if detail.is_null() {
        serde_json::json!({})
    } else {
        detail
    };
    sqlx::query("insert into audit_log (actor, role, action, target, detail) values ($1, $2, $3, $4, $5)")
        .bind(actor)
        .bind(role.map(|r| r.to_string()))
        .bind(action)
        .bind(target)
        .bind(detail)
        .execute(pool)
        .await?;
    Ok(())
}

/// One audit entry.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    pub actor: String,
    pub role: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub detail: Value,
}

/// The audit trail, newest first; only entries about `target` if given.
pub async fn list_audit(pool: &PgPool, target: Option<&str>, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
    let rows = sqlx::query(
        "select at, actor, role, action, target, detail from audit_log \
         where ($1::text is null or target = $1) order by at desc, id desc limit $2",
    )
    .bind(target)
    .bind(i64::from(limit.clamp(1, 10_000)))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| AuditEntry {
            at: r.get("at"),
            actor: r.get("actor"),
            role: r.get("role"),
            action: r.get("action"),
            target: r.get("target"),
            detail: r.get("detail"),
        })
        .collect())
}

/// The role an API call needs, or `None` for a public one.
pub fn required_role(method: &axum::http::Method, path: &str, config: &AuthConfig) -> Option<Role> {
    use axum::http::Method;
    if path == "/healthz" || path == "/readyz" || path.starts_with("/hooks/") {
        return None;
    }
    if path == "/metrics" {
        return (!config.public_metrics).then_some(Role::Viewer);
    }
    let admin_only = path.starts_with("/api/v1/tokens") || path.starts_with("/api/v1/audit");
    if admin_only {
        return Some(Role::Admin);
    }
    if method == Method::GET || method == Method::HEAD {
        return Some(Role::Viewer);
    }
    if path.starts_with("/api/v1/schedules/") {
        return Some(Role::Admin);
    }
    if path == "/api/v1/runs" || path.starts_with("/api/v1/runs/") {
        return Some(Role::Operator);
    }
    // Anything else that changes something: the strictest role.
    Some(Role::Admin)
}
