//! What the Alertmanager intake decides and records: alert episodes (`alert_episodes`: one
//! per route, fingerprint and start, with what became of it) and notifications
//! (`alert_notifications`). The decisions for a route are made under its advisory lock, in the
//! transaction the intake holds, so that its guardrails hold under concurrent notifications.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Postgres, Row, Transaction};

use crate::core::error::StoreResult;
use crate::core::store::PgStore;

/// An alert episode: which route, alert and target.
#[derive(Debug)]
pub(crate) struct Episode<'a> {
    pub(crate) route: &'a str,
    pub(crate) fingerprint: &'a str,
    pub(crate) starts_at: DateTime<Utc>,
    pub(crate) target: &'a str,
    pub(crate) labels: Value,
}

/// Serialises the decisions of `route` until `tx` ends.
pub(crate) async fn lock_route(tx: &mut Transaction<'_, Postgres>, route: &str) -> StoreResult<()> {
    sqlx::query("select pg_advisory_xact_lock(hashtextextended($1, 1))")
        .bind(format!("alert-route:{route}"))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// What became of the episode so far, if it was seen.
pub(crate) async fn episode_outcome(
    tx: &mut Transaction<'_, Postgres>,
    e: &Episode<'_>,
) -> StoreResult<Option<String>> {
    let row =
        sqlx::query("select outcome from alert_episodes where route = $1 and fingerprint = $2 and starts_at = $3")
            .bind(e.route)
            .bind(e.fingerprint)
            .bind(e.starts_at)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.map(|r| r.get("outcome")))
}

/// Records the episode as held back by a guardrail, and why.
pub(crate) async fn hold_back(tx: &mut Transaction<'_, Postgres>, e: &Episode<'_>, why: &str) -> StoreResult<()> {
    sqlx::query(
        "insert into alert_episodes (route, fingerprint, starts_at, target, labels, outcome, detail) \
         values ($1, $2, $3, $4, $5, 'held-back', $6) \
         on conflict (route, fingerprint, starts_at) do update set detail = excluded.detail",
    )
    .bind(e.route)
    .bind(e.fingerprint)
    .bind(e.starts_at)
    .bind(e.target)
    .bind(&e.labels)
    .bind(why)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Records the episode as having started `run`.
pub(crate) async fn started(tx: &mut Transaction<'_, Postgres>, e: &Episode<'_>, run: uuid::Uuid) -> StoreResult<()> {
    sqlx::query(
        "insert into alert_episodes (route, fingerprint, starts_at, target, labels, outcome, run_id, started_at) \
         values ($1, $2, $3, $4, $5, 'started', $6, now()) \
         on conflict (route, fingerprint, starts_at) do update set outcome = 'started', detail = null, \
           run_id = excluded.run_id, started_at = now()",
    )
    .bind(e.route)
    .bind(e.fingerprint)
    .bind(e.starts_at)
    .bind(e.target)
    .bind(&e.labels)
    .bind(run)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// When the route last started a run for `target`, if within the last `secs` seconds.
pub(crate) async fn last_start_within(
    tx: &mut Transaction<'_, Postgres>,
    route: &str,
    target: &str,
    secs: f64,
) -> StoreResult<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "select max(started_at) from alert_episodes where route = $1 and target = $2 and outcome = 'started' \
         and started_at > now() - make_interval(secs => $3)",
    )
    .bind(route)
    .bind(target)
    .bind(secs)
    .fetch_one(&mut **tx)
    .await?)
}

/// How many runs the route started in the last `secs` seconds.
pub(crate) async fn starts_within(tx: &mut Transaction<'_, Postgres>, route: &str, secs: f64) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "select count(*) from alert_episodes where route = $1 and outcome = 'started' \
         and started_at > now() - make_interval(secs => $2)",
    )
    .bind(route)
    .bind(secs)
    .fetch_one(&mut **tx)
    .await?)
}

/// How many runs the route started are still going.
pub(crate) async fn runs_going(tx: &mut Transaction<'_, Postgres>, route: &str) -> StoreResult<i64> {
    Ok(sqlx::query_scalar(
        "select count(*) from alert_episodes e join runs r on r.id = e.run_id where e.route = $1 \
         and r.status in ('pending', 'running', 'waiting')",
    )
    .bind(route)
    .fetch_one(&mut **tx)
    .await?)
}

impl PgStore {
    /// Marks the alert's started episodes of `routes` resolved; each one's run, and whether
    /// this is the first time it was resolved.
    pub(crate) async fn resolve_episodes(
        &self,
        fingerprint: &str,
        starts_at: DateTime<Utc>,
        routes: &[String],
    ) -> StoreResult<Vec<(Option<uuid::Uuid>, bool)>> {
        let rows = sqlx::query(
            "update alert_episodes set resolved_at = coalesce(resolved_at, now()) \
             where fingerprint = $1 and starts_at = $2 and route = any($3) and outcome = 'started' \
             returning run_id, (resolved_at = now()) as first",
        )
        .bind(fingerprint)
        .bind(starts_at)
        .bind(routes)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|r| (r.get("run_id"), r.get("first"))).collect())
    }

    /// Records a notification and what it led to.
    pub(crate) async fn record_notification(
        &self,
        receiver: Option<&str>,
        status: &str,
        group_key: Option<&str>,
        alerts: i32,
        summary: Value,
    ) -> StoreResult<()> {
        sqlx::query(
            "insert into alert_notifications (receiver, status, group_key, alerts, summary) values ($1, $2, $3, $4, $5)",
        )
        .bind(receiver)
        .bind(status)
        .bind(group_key)
        .bind(alerts)
        .bind(summary)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The newest alert episodes (at most 500), as the API shows them.
    pub(crate) async fn alert_episodes(&self) -> StoreResult<Vec<Value>> {
        let rows: Vec<(Value,)> = sqlx::query_as(
            "select jsonb_build_object('route', route, 'fingerprint', fingerprint, 'starts_at', starts_at, \
               'target', target, 'labels', labels, 'outcome', outcome, 'detail', detail, 'run_id', run_id, \
               'first_seen', first_seen, 'started_at', started_at, 'resolved_at', resolved_at) \
             from alert_episodes order by first_seen desc limit 500",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|(v,)| v).collect())
    }
}
