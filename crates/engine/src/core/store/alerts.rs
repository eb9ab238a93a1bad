//! What the Alertmanager intake decides and records: alert episodes (`alert_episodes`: one
//! per route, fingerprint and start, with what became of it) and notifications
//! (`alert_notifications`). The decisions for a route are made under its advisory lock, in the
//! transaction the intake holds, so that its guardrails hold under concurrent notifications.

use std::collections::HashMap;

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

/// What became of each of these episodes of `route` so far, for those seen: by fingerprint
/// and start.
pub(crate) async fn episode_outcomes(
    tx: &mut Transaction<'_, Postgres>,
    route: &str,
    episodes: &[(&str, DateTime<Utc>)],
) -> StoreResult<HashMap<(String, DateTime<Utc>), String>> {
    let (fingerprints, starts): (Vec<&str>, Vec<DateTime<Utc>>) = episodes.iter().copied().unzip();
    let rows = sqlx::query(
        "select e.fingerprint, e.starts_at, e.outcome from alert_episodes e \
         join unnest($2::text[], $3::timestamptz[]) as t(fingerprint, starts_at) \
           on e.fingerprint = t.fingerprint and e.starts_at = t.starts_at \
         where e.route = $1",
    )
    .bind(route)
    .bind(&fingerprints)
    .bind(&starts)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.get("fingerprint"), r.get("starts_at")), r.get("outcome")))
        .collect())
}

/// When the route last started a run for each of `targets`, for those within the last `secs`
/// seconds.
pub(crate) async fn last_starts_within(
    tx: &mut Transaction<'_, Postgres>,
    route: &str,
    targets: &[&str],
    secs: f64,
) -> StoreResult<HashMap<String, DateTime<Utc>>> {
    let rows = sqlx::query(
        "select target, max(started_at) as at from alert_episodes where route = $1 and target = any($2) \
         and outcome = 'started' and started_at > now() - make_interval(secs => $3) group by target",
    )
    .bind(route)
    .bind(targets)
    .bind(secs)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|r| (r.get("target"), r.get("at"))).collect())
}

/// Records episodes as held back by a guardrail (each with why) or as having started a run, in
/// one statement.
pub(crate) async fn record_episodes(
    tx: &mut Transaction<'_, Postgres>,
    held: &[(Episode<'_>, String)],
    started: &[(Episode<'_>, uuid::Uuid)],
) -> StoreResult<()> {
    if held.is_empty() && started.is_empty() {
        return Ok(());
    }
    let all = held
        .iter()
        .map(|(e, why)| (e, "held-back", Some(why.as_str()), None))
        .chain(started.iter().map(|(e, run)| (e, "started", None, Some(*run))));
    let (mut routes, mut fps, mut starts, mut targets, mut labels, mut outcomes, mut details, mut runs): (
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
        Vec<_>,
    ) = Default::default();
    for (e, outcome, detail, run) in all {
        routes.push(e.route);
        fps.push(e.fingerprint);
        starts.push(e.starts_at);
        targets.push(e.target);
        labels.push(e.labels.clone());
        outcomes.push(outcome);
        details.push(detail);
        runs.push(run);
    }
    // A held-back episode seen again keeps its first outcome's row and takes the new reason;
    // one that starts a run now says so (as `started` does).
    sqlx::query(
        "insert into alert_episodes (route, fingerprint, starts_at, target, labels, outcome, detail, run_id, started_at) \
         select route, fingerprint, starts_at, target, labels, outcome, detail, run_id, \
                case when outcome = 'started' then now() end \
         from unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::jsonb[], $6::text[], $7::text[], $8::uuid[]) \
           as t(route, fingerprint, starts_at, target, labels, outcome, detail, run_id) \
         on conflict (route, fingerprint, starts_at) do update set \
           outcome = case when excluded.outcome = 'started' then 'started' else alert_episodes.outcome end, \
           detail = excluded.detail, \
           run_id = coalesce(excluded.run_id, alert_episodes.run_id), \
           started_at = case when excluded.outcome = 'started' then now() else alert_episodes.started_at end",
    )
    .bind(&routes)
    .bind(&fps)
    .bind(&starts)
    .bind(&targets)
    .bind(&labels)
    .bind(&outcomes)
    .bind(&details)
    .bind(&runs)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl PgStore {
    /// Marks these started episodes resolved (fingerprint, start, route), in one statement:
    /// for each one that was started, its index in `episodes`, its run, and whether this is the
    /// first time it was resolved.
    pub(crate) async fn resolve_episodes_all(
        &self,
        episodes: &[(&str, DateTime<Utc>, &str)],
    ) -> StoreResult<Vec<(usize, Option<uuid::Uuid>, bool)>> {
        if episodes.is_empty() {
            return Ok(Vec::new());
        }
        let fingerprints: Vec<&str> = episodes.iter().map(|e| e.0).collect();
        let starts: Vec<DateTime<Utc>> = episodes.iter().map(|e| e.1).collect();
        let routes: Vec<&str> = episodes.iter().map(|e| e.2).collect();
        let rows = sqlx::query(
            "update alert_episodes e set resolved_at = coalesce(e.resolved_at, now()) \
             from unnest($1::text[], $2::timestamptz[], $3::text[]) with ordinality as t(fingerprint, starts_at, route, i) \
             where e.fingerprint = t.fingerprint and e.starts_at = t.starts_at and e.route = t.route \
               and e.outcome = 'started' \
             returning t.i, e.run_id, (e.resolved_at = now()) as first",
        )
        .bind(&fingerprints)
        .bind(&starts)
        .bind(&routes)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get::<i64, _>("i") as usize - 1, r.get("run_id"), r.get("first")))
            .collect())
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
