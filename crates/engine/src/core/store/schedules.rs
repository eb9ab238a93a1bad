//! The schedules' state (`schedules`: paused, the last tick fired) and what each tick led to
//! (`schedule_ticks`).

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::core::error::StoreResult;
use crate::core::model::RunId;
use crate::core::store::PgStore;

/// A schedule's state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScheduleState {
    pub(crate) paused: bool,
    pub(crate) last_tick: DateTime<Utc>,
}

/// One tick of a schedule, as recorded.
#[derive(Debug, Clone)]
pub(crate) struct TickRow {
    pub(crate) tick: DateTime<Utc>,
    pub(crate) outcome: String,
    pub(crate) run_id: Option<RunId>,
    pub(crate) detail: Option<String>,
}

impl PgStore {
    /// Records the schedules not seen before as starting from now (no backfill); the
    /// database's now. One statement however many schedules.
    pub(crate) async fn enrol_schedules(&self, names: &[&str]) -> StoreResult<DateTime<Utc>> {
        Ok(sqlx::query_scalar(
            "with new as (insert into schedules (name, last_tick) select unnest($1::text[]), now() \
               on conflict (name) do nothing) select now()",
        )
        .bind(names)
        .fetch_one(self.pool())
        .await?)
    }

    /// The state of each of `names` that has one.
    pub(crate) async fn schedule_states(
        &self,
        names: &[&str],
    ) -> StoreResult<std::collections::HashMap<String, ScheduleState>> {
        Ok(sqlx::query_as::<_, (String, bool, DateTime<Utc>)>(
            "select name, paused, last_tick from schedules where name = any($1)",
        )
        .bind(names)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|(name, paused, last_tick)| (name, ScheduleState { paused, last_tick }))
        .collect())
    }

    /// Moves the schedule's last tick forward to `tick` (never back).
    pub(crate) async fn advance_schedule(&self, name: &str, tick: DateTime<Utc>) -> StoreResult<()> {
        sqlx::query("update schedules set last_tick = greatest(last_tick, $2), updated_at = now() where name = $1")
            .bind(name)
            .bind(tick)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// The schedule's state, if it has fired or been paused.
    pub(crate) async fn schedule_state(&self, name: &str) -> StoreResult<Option<ScheduleState>> {
        let row = sqlx::query("select paused, last_tick from schedules where name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.map(|r| ScheduleState {
            paused: r.get("paused"),
            last_tick: r.get("last_tick"),
        }))
    }

    /// The schedule's ten newest ticks.
    pub(crate) async fn recent_ticks(&self, name: &str) -> StoreResult<Vec<TickRow>> {
        Ok(sqlx::query(
            "select tick, outcome, run_id, detail from schedule_ticks where schedule = $1 order by tick desc limit 10",
        )
        .bind(name)
        .fetch_all(self.pool())
        .await?
        .into_iter()
        .map(|r| TickRow {
            tick: r.get("tick"),
            outcome: r.get("outcome"),
            run_id: r.get::<Option<uuid::Uuid>, _>("run_id").map(RunId),
            detail: r.get("detail"),
        })
        .collect())
    }

    /// Pauses or resumes the schedule, as `by`. A resumed schedule starts from now: the ticks
    /// it slept through are not fired.
    pub(crate) async fn set_schedule_paused(&self, name: &str, paused: bool, by: &str) -> StoreResult<()> {
        sqlx::query(
            "insert into schedules (name, paused, last_tick, updated_by) values ($1, $2, now(), $3) \
             on conflict (name) do update set paused = $2, updated_by = $3, updated_at = now(), \
               last_tick = case when schedules.paused and not $2 then greatest(schedules.last_tick, now()) \
                                else schedules.last_tick end",
        )
        .bind(name)
        .bind(paused)
        .bind(by)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Records what a tick led to (once per schedule and tick).
    pub(crate) async fn record_tick(
        &self,
        schedule: &str,
        tick: DateTime<Utc>,
        outcome: &str,
        run_id: Option<RunId>,
        detail: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query(
            "insert into schedule_ticks (schedule, tick, outcome, run_id, detail) values ($1, $2, $3, $4, $5) \
             on conflict (schedule, tick) do nothing",
        )
        .bind(schedule)
        .bind(tick)
        .bind(outcome)
        .bind(run_id.map(|r| r.0))
        .bind(detail)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}
