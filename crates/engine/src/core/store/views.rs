//! Read models the API and console ask for that the journal does not hold in one place: the
//! runs waiting at a signal, what a trigger recorded about the run it started, what runs wait
//! on, and counts by status.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::core::error::StoreResult;
use crate::core::model::RunId;
use crate::core::store::PgStore;

/// Where a run's trigger recorded what it did.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TriggerRecord {
    /// The schedule tick that started the run.
    ScheduleTick,
    /// The webhook delivery whose runs include it.
    WebhookDelivery,
    /// The alert episode that started it.
    AlertEpisode,
}

impl PgStore {
    /// The runs still going that wait for the signal `name`, longest-waiting first (at most 500).
    pub(crate) async fn runs_waiting_for_signal(&self, name: &str) -> StoreResult<Vec<RunId>> {
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "select s.run_id from steps s join runs r on r.id = s.run_id \
             where s.kind = 'signal' and s.status = 'waiting' and s.name = $1 \
               and r.status in ('pending', 'running', 'waiting') \
             order by s.started_at limit 500",
        )
        .bind(name)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|(id,)| RunId(id)).collect())
    }

    /// What the trigger recorded about starting `run`, as JSON, if it is still there.
    pub(crate) async fn trigger_record(&self, record: TriggerRecord, run: RunId) -> StoreResult<Option<Value>> {
        let sql = match record {
            TriggerRecord::ScheduleTick => {
                "select jsonb_build_object('tick', tick, 'outcome', outcome, 'detail', detail, 'at', at) \
                 from schedule_ticks where run_id = $1 limit 1"
            }
            TriggerRecord::WebhookDelivery => {
                "select jsonb_build_object('forge', forge, 'delivery_id', delivery_id, 'event', event, \
                   'repository', repository, 'outcome', outcome, 'detail', detail, 'received_at', received_at, \
                   'runs', cardinality(run_ids)) \
                 from webhook_deliveries where run_ids @> array[$1] order by id limit 1"
            }
            TriggerRecord::AlertEpisode => {
                "select jsonb_build_object('route', route, 'fingerprint', fingerprint, 'starts_at', starts_at, \
                   'target', target, 'labels', labels, 'outcome', outcome, 'first_seen', first_seen, \
                   'resolved_at', resolved_at) \
                 from alert_episodes where run_id = $1 limit 1"
            }
        };
        Ok(sqlx::query_scalar::<_, Value>(sql)
            .bind(run.0)
            .fetch_optional(self.pool())
            .await?)
    }

    /// Who triggered the schedule `name` by hand to start `run`, and when.
    pub(crate) async fn schedule_triggered_by(&self, name: &str, run: RunId) -> StoreResult<Option<Value>> {
        Ok(sqlx::query_scalar::<_, Value>(
            "select jsonb_build_object('actor', actor, 'at', at) from audit_log \
             where target = $1 and action = 'schedule.trigger' and detail->>'run_id' = $2 limit 1",
        )
        .bind(name)
        .bind(run.0.to_string())
        .fetch_optional(self.pool())
        .await?)
    }

    /// The parent run and the step of it that started `child`.
    pub(crate) async fn parent_step(&self, parent: RunId, child: RunId) -> StoreResult<Option<Value>> {
        Ok(sqlx::query_scalar::<_, Value>(
            "select jsonb_build_object('id', r.id, 'workflow', r.workflow, 'status', r.status, 'step', s.name) \
             from runs r left join steps s on s.run_id = r.id and s.child_run_id = $2 where r.id = $1 limit 1",
        )
        .bind(parent.0)
        .bind(child.0)
        .fetch_optional(self.pool())
        .await?)
    }

    /// The concurrency limit `run` was started under.
    pub(crate) async fn concurrency_limit(&self, run: RunId) -> StoreResult<Option<i32>> {
        Ok(sqlx::query_scalar("select concurrency_limit from runs where id = $1")
            .bind(run.0)
            .fetch_optional(self.pool())
            .await?
            .flatten())
    }

    /// For each of `runs` that waits, its newest waiting or retrying step
    /// (`{kind, name, status, until}`).
    pub(crate) async fn waiting_steps(&self, runs: &[RunId]) -> StoreResult<Vec<(RunId, Value)>> {
        let ids: Vec<Uuid> = runs.iter().map(|id| id.0).collect();
        let rows: Vec<(Uuid, Value)> = sqlx::query_as(
            "select distinct on (run_id) run_id, \
               jsonb_build_object('kind', kind, 'name', name, 'status', status, 'until', wake_at) \
             from steps where run_id = any($1) and status in ('waiting', 'retrying') \
             order by run_id, seq desc",
        )
        .bind(&ids)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|(id, v)| (RunId(id), v)).collect())
    }

    /// How many runs were created since `since`, by status.
    pub(crate) async fn run_counts(&self, since: DateTime<Utc>) -> StoreResult<Vec<(String, i64)>> {
        Ok(
            sqlx::query_as("select status, count(*) from runs where created_at >= $1 group by status")
                .bind(since)
                .fetch_all(self.pool())
                .await?,
        )
    }

    /// The versions of workflow `name` kept in `workflow_definitions` (its files' texts), newest
    /// first, at most 100: version, hash, path, when first loaded, and the text.
    pub(crate) async fn workflow_definitions(&self, name: &str) -> StoreResult<Vec<Value>> {
        let rows: Vec<(Value,)> = sqlx::query_as(
            "select jsonb_build_object('version', version, 'hash', hash, 'path', path, 'loaded_at', loaded_at, \
               'source', source) \
             from workflow_definitions where name = $1 order by version desc limit 100",
        )
        .bind(name)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|(v,)| v).collect())
    }

    /// The runs of workflow `name` by the version they started on: per version, the count by
    /// status and the ids of the runs still going (the oldest 20).
    pub(crate) async fn runs_by_version(&self, name: &str) -> StoreResult<Vec<(i32, Value, Vec<RunId>)>> {
        let rows: Vec<(i32, Value, Vec<Uuid>)> = sqlx::query_as(
            "select workflow_version, jsonb_object_agg(status, n), \
               coalesce((select array_agg(id order by created_at) from ( \
                  select id, created_at from runs r where r.workflow = $1 and r.workflow_version = c.workflow_version \
                    and r.status in ('pending', 'running', 'waiting') order by created_at limit 20) g), '{}') \
             from (select workflow_version, status, count(*) as n from runs where workflow = $1 \
                   group by workflow_version, status) c \
             group by workflow_version order by workflow_version desc",
        )
        .bind(name)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(v, counts, ids)| (v, counts, ids.into_iter().map(RunId).collect()))
            .collect())
    }
}
