//! What each git webhook delivery led to (`webhook_deliveries`).

use crate::core::error::StoreResult;
use crate::core::store::PgStore;

/// One delivery, as recorded.
#[derive(Debug)]
pub(crate) struct DeliveryRow<'a> {
    pub(crate) forge: &'a str,
    pub(crate) delivery_id: Option<String>,
    pub(crate) event: String,
    pub(crate) repository: Option<String>,
    pub(crate) identity: Option<String>,
    pub(crate) outcome: &'a str,
    pub(crate) detail: Option<String>,
    pub(crate) run_ids: Vec<uuid::Uuid>,
    pub(crate) body_sha256: &'a str,
}

impl PgStore {
    /// The event a body signed for `forge` first came as, if it came as another than `event`.
    pub(crate) async fn delivered_as_other_event(
        &self,
        forge: &str,
        body_sha256: &str,
        event: &str,
    ) -> StoreResult<Option<String>> {
        Ok(sqlx::query_scalar(
            "select event from webhook_deliveries where forge = $1 and body_sha256 = $2 and event <> $3 limit 1",
        )
        .bind(forge)
        .bind(body_sha256)
        .bind(event)
        .fetch_optional(self.pool())
        .await?)
    }

    /// How many times the tag was deleted in `repository` (each deletion starts a new
    /// generation of the tag).
    pub(crate) async fn tag_deletions(&self, forge: &str, repository: &str, tag: &str) -> StoreResult<i64> {
        let like = |s: &str| s.replace('%', "\\%").replace('_', "\\_");
        Ok(sqlx::query_scalar(
            "select count(*) from webhook_deliveries where forge = $1 and event = 'tag-deleted' \
             and repository = $2 and identity like $3",
        )
        .bind(forge)
        .bind(repository)
        .bind(format!("tag-deleted|{}|refs/tags/{}|%", like(repository), like(tag)))
        .fetch_one(self.pool())
        .await?)
    }

    /// Records a delivery.
    pub(crate) async fn record_delivery(&self, d: DeliveryRow<'_>) -> StoreResult<()> {
        sqlx::query(
            "insert into webhook_deliveries (forge, delivery_id, event, repository, identity, outcome, detail, run_ids, body_sha256) \
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(d.forge)
        .bind(d.delivery_id)
        .bind(d.event)
        .bind(d.repository)
        .bind(d.identity)
        .bind(d.outcome)
        .bind(d.detail)
        .bind(&d.run_ids)
        .bind(d.body_sha256)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}
