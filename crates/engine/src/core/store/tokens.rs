//! API tokens (`api_tokens`, stored as hashes) and the audit trail (`audit_log`). What a token
//! is and who may make one is the API's ([`crate::api::auth`]); this is where they are kept.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::Row;

use crate::core::error::{StoreError, StoreResult};
use crate::core::store::PgStore;

/// A token as stored, without its hash.
#[derive(Debug, Clone)]
pub(crate) struct TokenRow {
    pub(crate) name: String,
    pub(crate) role: String,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) created_by: String,
    pub(crate) expires_at: Option<DateTime<Utc>>,
    pub(crate) revoked_at: Option<DateTime<Utc>>,
    pub(crate) last_used_at: Option<DateTime<Utc>>,
}

/// One audit entry as stored.
#[derive(Debug, Clone)]
pub(crate) struct AuditRow {
    pub(crate) at: DateTime<Utc>,
    pub(crate) actor: String,
    pub(crate) role: Option<String>,
    pub(crate) action: String,
    pub(crate) target: Option<String>,
    pub(crate) detail: Value,
}

impl PgStore {
    /// Stores a new token by its hash; `Conflict` (saying so) if the name is taken.
    pub(crate) async fn insert_token(
        &self,
        name: &str,
        role: &str,
        hash: &[u8],
        created_by: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> StoreResult<()> {
        let inserted = sqlx::query(
            "insert into api_tokens (id, name, role, token_hash, created_by, expires_at) \
             values ($1, $2, $3, $4, $5, $6)",
        )
        .bind(uuid::Uuid::now_v7())
        .bind(name)
        .bind(role)
        .bind(hash)
        .bind(created_by)
        .bind(expires_at)
        .execute(self.pool())
        .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(StoreError::Conflict(format!(
                "a token named '{name}' exists; revoke it first or choose another name"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Revokes the live token named `name`; `false` if there is none.
    pub(crate) async fn revoke_token(&self, name: &str) -> StoreResult<bool> {
        Ok(
            sqlx::query("update api_tokens set revoked_at = now() where name = $1 and revoked_at is null")
                .bind(name)
                .execute(self.pool())
                .await?
                .rows_affected()
                > 0,
        )
    }

    /// Every token, live ones first, newest first.
    pub(crate) async fn tokens(&self) -> StoreResult<Vec<TokenRow>> {
        let rows = sqlx::query(
            "select name, role, created_at, created_by, expires_at, revoked_at, last_used_at from api_tokens \
             order by revoked_at is not null, created_at desc",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| TokenRow {
                name: r.get("name"),
                role: r.get("role"),
                created_at: r.get("created_at"),
                created_by: r.get("created_by"),
                expires_at: r.get("expires_at"),
                revoked_at: r.get("revoked_at"),
                last_used_at: r.get("last_used_at"),
            })
            .collect())
    }

    /// The name, role and expiry of the live token (not revoked, not expired) with this hash.
    /// Its last use is written at most once a minute, not on every request.
    pub(crate) async fn live_token(&self, hash: &[u8]) -> StoreResult<Option<(String, String, Option<DateTime<Utc>>)>> {
        let row = sqlx::query(
            "with found as ( \
               select id, name, role, expires_at, last_used_at from api_tokens \
               where token_hash = $1 and revoked_at is null and (expires_at is null or expires_at > now())), \
             touched as ( \
               update api_tokens t set last_used_at = now() from found \
               where t.id = found.id and (found.last_used_at is null or found.last_used_at < now() - interval '1 minute')) \
             select name, role, expires_at from found",
        )
        .bind(hash)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.map(|r| (r.get("name"), r.get("role"), r.get("expires_at"))))
    }

    /// Records that `actor` did `action` to `target`.
    pub(crate) async fn audit(
        &self,
        actor: &str,
        role: Option<&str>,
        action: &str,
        target: Option<&str>,
        detail: Value,
    ) -> StoreResult<()> {
        sqlx::query("insert into audit_log (actor, role, action, target, detail) values ($1, $2, $3, $4, $5)")
            .bind(actor)
            .bind(role)
            .bind(action)
            .bind(target)
            .bind(detail)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The audit trail, newest first; only entries about `target` if given.
    pub(crate) async fn audit_entries(&self, target: Option<&str>, limit: u32) -> StoreResult<Vec<AuditRow>> {
        let rows = sqlx::query(
            "select at, actor, role, action, target, detail from audit_log \
             where ($1::text is null or target = $1) order by at desc, id desc limit $2",
        )
        .bind(target)
        .bind(i64::from(limit.clamp(1, 10_000)))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AuditRow {
                at: r.get("at"),
                actor: r.get("actor"),
                role: r.get("role"),
                action: r.get("action"),
                target: r.get("target"),
                detail: r.get("detail"),
            })
            .collect())
    }
}
