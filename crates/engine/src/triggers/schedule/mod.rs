//! Cron schedules: which ticks are due, and the loop that starts one run per tick.
//!
//! # Design notes
//! - Expressions mean what crontab means (croner): 5 fields, or 6/7 with seconds (and year);
//!   day-of-week 0 and 7 are Sunday; when both day-of-month and day-of-week are restricted, a
//!   day matching either fires (as in Vixie cron); `@daily`, `@hourly`, … are accepted.
//! - Times are evaluated in the schedule's time zone. Daylight saving, as in ISC/Vixie cron:
//!   a fixed-time schedule whose time falls in a spring-forward gap runs once, at the first
//!   valid time after the gap (02:30 → 03:00); one whose time occurs twice in a fall-back
//!   overlap runs once, at the first occurrence. Schedules with a wildcard or step in the hour,
//!   minute or second field follow elapsed wall-clock time (they skip the gap's non-existent
//!   times and run in both folds of an overlap).
//! - Exactly one run per tick, however many `serve` replicas run the loop: the run is started
//!   with the idempotency key `schedule:<name>:<tick>`, which is unique in PostgreSQL.
//! - A tick more than `misfire-grace` old when the loop sees it was missed (dayshift was down);
//!   the catch-up policy decides what to do with missed ticks.
//!
//! [`config`] holds the config file's `schedules:` and their checks.

pub mod config;

pub use config::ScheduleConfig;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::core::error::{EngineError, TemplateError};
use crate::core::model::{ConcurrencyPolicy, RunId, StartRun};
use crate::engine::Engine;
use crate::template;

/// A cron expression, checked when it is read.
#[derive(Clone)]
pub struct CronExpr {
    text: String,
    cron: Cron,
}

impl fmt::Debug for CronExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialEq for CronExpr {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

crate::message_error!(
    /// Text that is not a cron expression: the text, why, and what is expected.
    InvalidCron
);

crate::message_error!(
    /// A name that is not an IANA time zone.
    InvalidTimeZone
);

impl FromStr for CronExpr {
    type Err = InvalidCron;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parser = CronParser::builder().seconds(Seconds::Optional).build();
        let cron = parser.parse(text.trim()).map_err(|e| {
            InvalidCron(format!(
                "'{text}' is not a cron expression ({e}); expected 5 fields \
                 (minute hour day-of-month month day-of-week), 6 or 7 with seconds and year, or @daily/@hourly/…"
            ))
        })?;
        Ok(Self {
            text: text.trim().to_string(),
            cron,
        })
    }
}

impl TryFrom<String> for CronExpr {
    type Error = InvalidCron;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CronExpr> for String {
    fn from(c: CronExpr) -> String {
        c.text
    }
}

impl Serialize for CronExpr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for CronExpr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl CronExpr {
    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// An IANA time zone name (`Europe/Berlin`, `UTC`), checked when it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeZone(pub Tz);

impl Default for TimeZone {
    fn default() -> Self {
        Self(Tz::UTC)
    }
}

impl FromStr for TimeZone {
    type Err = InvalidTimeZone;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<Tz>().map(Self).map_err(|_| {
            InvalidTimeZone(format!(
                "'{s}' is not a time zone; expected an IANA name such as UTC or Europe/Berlin"
            ))
        })
    }
}

impl Serialize for TimeZone {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for TimeZone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What to do with ticks missed while dayshift was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CatchUp {
    /// Run none of them (the default).
    #[default]
    Skip,
    /// Run the newest one.
    Latest,
    /// Run the newest `catch-up-limit` of them, oldest first.
    All,
}

/// What to do when a tick comes while the schedule's previous run is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Overlap {
    /// Start it anyway (the default).
    #[default]
    Allow,
    /// Do not start it; the tick is recorded as skipped.
    Skip,
    /// Cancel the previous run (its undos run), then start.
    Cancel,
}

/// A schedule, as the engine runs it.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Unique name.
    pub name: String,
    /// When it fires.
    pub cron: CronExpr,
    /// In which time zone the expression is read.
    pub timezone: TimeZone,
    /// What it starts.
    pub workflow: String,
    /// The input, with placeholders: `{{ tick }}` (RFC 3339 in the schedule's zone),
    /// `{{ tick_utc }}`, `{{ schedule }}`.
    pub input: Value,
    /// Missed ticks.
    pub catch_up: CatchUp,
    /// How many missed ticks `catch-up: all` runs at most.
    pub catch_up_limit: u32,
    /// Overlapping runs.
    pub overlap: Overlap,
    /// How late a tick may be seen and still count as on time.
    pub misfire_grace: Duration,
}

/// A schedule as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleView {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub workflow: String,
    pub catch_up: CatchUp,
    pub overlap: Overlap,
    pub paused: bool,
    pub last_tick: Option<DateTime<Utc>>,
    /// The next fire times (none while paused).
    pub next: Vec<DateTime<Utc>>,
    /// The most recent ticks and what became of them.
    pub recent: Vec<TickView>,
}

/// One tick of a schedule and its outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TickView {
    pub tick: DateTime<Utc>,
    pub outcome: String,
    pub run_id: Option<RunId>,
    pub detail: Option<String>,
}

impl Schedule {
    /// The input a tick starts the workflow with.
    pub fn input_for(&self, tick: DateTime<Utc>) -> Result<Value, TemplateError> {
        let context = json!({
            "tick": tick.with_timezone(&self.timezone.0).to_rfc3339(),
            "tick_utc": tick.to_rfc3339(),
            "schedule": self.name,
        });
        template::render(&self.input, &context)
    }

    /// Fire times after `after`, in order.
    fn ticks_after(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> {
        let start = after.with_timezone(&self.timezone.0);
        self.cron.cron.clone().iter_after(start).map(|t| t.with_timezone(&Utc))
    }

    /// Fire times after `after`, up to and including `until`, at most `cap` of them.
    pub fn ticks_between(&self, after: DateTime<Utc>, until: DateTime<Utc>, cap: usize) -> Vec<DateTime<Utc>> {
        self.ticks_after(after).take_while(|t| *t <= until).take(cap).collect()
    }

    /// The next `n` fire times after `after`.
    pub fn next_ticks(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        self.ticks_after(after).take(n).collect()
    }

    /// Splits due ticks into those to run and those the catch-up policy drops.
    pub fn plan(&self, due: &[DateTime<Utc>], now: DateTime<Utc>) -> (Vec<DateTime<Utc>>, Vec<DateTime<Utc>>) {
        let grace = chrono::Duration::from_std(self.misfire_grace).unwrap_or_default();
        let (missed, on_time): (Vec<_>, Vec<_>) = due.iter().partition(|t| now - **t > grace);
        let keep_missed = match self.catch_up {
            CatchUp::Skip => 0,
            CatchUp::Latest => 1,
            CatchUp::All => self.catch_up_limit as usize,
        };
        let cut = missed.len().saturating_sub(keep_missed);
        let dropped = missed[..cut].to_vec();
        let mut run = missed[cut..].to_vec();
        run.extend(on_time);
        (run, dropped)
    }

    fn idempotency_key(&self, tick: DateTime<Utc>) -> String {
        format!("schedule:{}:{}", self.name, tick.to_rfc3339())
    }

    fn start_request(&self, tick: DateTime<Utc>, input: Value, manual: bool) -> StartRun {
        let mut req = StartRun::new(self.workflow.clone(), input);
        if !manual {
            req.idempotency_key = Some(self.idempotency_key(tick));
        }
        req.started_by = Some(if manual {
            format!("schedule:{} (triggered by hand)", self.name)
        } else {
            format!("schedule:{}", self.name)
        });
        match self.overlap {
            Overlap::Allow => {}
            Overlap::Skip => req = req.concurrency(format!("schedule:{}", self.name), 1, ConcurrencyPolicy::Skip),
            Overlap::Cancel => {
                req = req.concurrency(format!("schedule:{}", self.name), 1, ConcurrencyPolicy::CancelOlder)
            }
        }
        req
    }
}

/// The scheduler loop and the schedule operations of the API.
#[derive(Clone, Debug)]
pub struct Scheduler {
    engine: Engine,
    schedules: std::sync::Arc<[Schedule]>,
}

impl Scheduler {
    /// The scheduler of `schedules`, starting their runs on `engine`.
    pub fn new(engine: Engine, schedules: Vec<Schedule>) -> Self {
        Self {
            engine,
            schedules: schedules.into(),
        }
    }

    /// The schedules.
    pub fn schedules(&self) -> &[Schedule] {
        &self.schedules
    }

    fn schedule(&self, name: &str) -> Result<&Schedule, EngineError> {
        self.schedules
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| EngineError::NotFound(format!("schedule '{name}' not found")))
    }

    /// Starts due runs every `period` until `shutdown`.
    ///
    /// Safe to run in several processes at once: each tick starts one run.
    pub async fn run(self, period: Duration, shutdown: CancellationToken) {
        if self.schedules.is_empty() {
            return;
        }
        tracing::info!(count = self.schedules.len(), "Scheduler started.");
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.fire_due().await {
                tracing::warn!(error = %e, "Scheduler pass failed; retrying.");
            }
        }
    }

    /// One pass: for every schedule, start the runs of the ticks that are due.
    pub async fn fire_due(&self) -> Result<(), EngineError> {
        let store = self.engine.store();
        let names: Vec<&str> = self.schedules.iter().map(|s| s.name.as_str()).collect();
        // Two statements per pass, however many schedules. A schedule seen for the first time
        // starts from now: no backfill.
        let now = store.enrol_schedules(&names).await?;
        let states = store.schedule_states(&names).await?;
        for schedule in self.schedules.iter() {
            // Missing only if it was inserted by this pass's first statement: due from now.
            let (paused, last) = states
                .get(&schedule.name)
                .map(|s| (s.paused, s.last_tick))
                .unwrap_or((false, now));
            if paused {
                continue;
            }
            let due = schedule.ticks_between(last, now, 10_000);
            if due.is_empty() {
                continue;
            }
            let (run, dropped) = schedule.plan(&due, now);
            for tick in &dropped {
                store
                    .record_tick(&schedule.name, *tick, "missed", None, Some("catch-up policy"))
                    .await?;
            }
            for tick in &run {
                // A tick that cannot start (recorded as failed) does not stop the others; only
                // the database or the queue being down ends the pass.
                match self.start_tick(schedule, *tick, false).await {
                    Ok(_) => {}
                    Err(e @ (EngineError::Store(_) | EngineError::Queue(_))) => return Err(e),
                    Err(_) => {}
                }
            }
            let newest = *due.last().expect("due is not empty");
            store.advance_schedule(&schedule.name, newest).await?;
        }
        Ok(())
    }

    async fn start_tick(&self, schedule: &Schedule, tick: DateTime<Utc>, manual: bool) -> Result<RunId, EngineError> {
        let store = self.engine.store();
        let input = match schedule.input_for(tick) {
            Ok(i) => i,
            Err(e) => {
                store
                    .record_tick(&schedule.name, tick, "failed", None, Some(&e))
                    .await?;
                return Err(EngineError::BadRequest(e.0));
            }
        };
        let span = tracing::info_span!("schedule", otel.name = %format!("schedule {}", schedule.name), schedule = %schedule.name, %tick);
        let started =
            tracing::Instrument::instrument(self.engine.start(schedule.start_request(tick, input, manual)), span).await;
        match started {
            Ok(started) => {
                let (outcome, detail) = match &started.note {
                    Some(note) if note.starts_with("skipped") => ("skipped", Some(note.as_str())),
                    _ => ("started", manual.then_some("triggered by hand")),
                };
                if started.created {
                    tracing::info!(schedule = %schedule.name, %tick, run_id = %started.id, outcome, "Schedule fired.");
                    let m = crate::core::metrics::metrics();
                    m.delivery("schedule", outcome);
                    if !manual {
                        m.schedule_lag((Utc::now() - tick).num_milliseconds() as f64 / 1000.0);
                    }
                }
                store
                    .record_tick(&schedule.name, tick, outcome, Some(started.id), detail)
                    .await?;
                Ok(started.id)
            }
            Err(
                e @ (EngineError::UnknownWorkflow(_) | EngineError::InvalidInput { .. } | EngineError::Conflict(_)),
            ) => {
                crate::core::metrics::metrics().delivery("schedule", "failed");
                store
                    .record_tick(&schedule.name, tick, "failed", None, Some(&e.to_string()))
                    .await?;
                tracing::error!(schedule = %schedule.name, %tick, error = %e, "Schedule could not start its run.");
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Every schedule with its state and next fire times.
    pub async fn list(&self) -> Result<Vec<ScheduleView>, EngineError> {
        let mut out = Vec::new();
        for s in self.schedules.iter() {
            out.push(self.view(s).await?);
        }
        Ok(out)
    }

    /// One schedule.
    pub async fn get(&self, name: &str) -> Result<ScheduleView, EngineError> {
        let s = self.schedule(name)?;
        self.view(s).await
    }

    async fn view(&self, s: &Schedule) -> Result<ScheduleView, EngineError> {
        let store = self.engine.store();
        let state = store.schedule_state(&s.name).await?;
        let paused = state.is_some_and(|s| s.paused);
        let last_tick = state.map(|s| s.last_tick);
        let recent = store
            .recent_ticks(&s.name)
            .await?
            .into_iter()
            .map(|r| TickView {
                tick: r.tick,
                outcome: r.outcome,
                run_id: r.run_id,
                detail: r.detail,
            })
            .collect();
        Ok(ScheduleView {
            name: s.name.clone(),
            cron: s.cron.as_str().to_string(),
            timezone: s.timezone.0.name().to_string(),
            workflow: s.workflow.clone(),
            catch_up: s.catch_up,
            overlap: s.overlap,
            paused,
            last_tick,
            next: if paused {
                Vec::new()
            } else {
                s.next_ticks(Utc::now(), 3)
            },
            recent,
        })
    }

    /// Pauses a schedule: no tick fires until it is resumed.
    pub async fn pause(&self, name: &str, by: &str) -> Result<ScheduleView, EngineError> {
        self.set_paused(name, true, by).await
    }

    /// Resumes a schedule. Ticks that passed while it was paused do not fire.
    pub async fn resume(&self, name: &str, by: &str) -> Result<ScheduleView, EngineError> {
        self.set_paused(name, false, by).await
    }

    async fn set_paused(&self, name: &str, paused: bool, by: &str) -> Result<ScheduleView, EngineError> {
        let s = self.schedule(name)?;
        self.engine.store().set_schedule_paused(name, paused, by).await?;
        tracing::info!(schedule = name, paused, by, "Schedule paused or resumed.");
        self.view(s).await
    }

    /// Starts the schedule's workflow now (its overlap policy applies).
    pub async fn trigger(&self, name: &str, by: &str) -> Result<RunId, EngineError> {
        let s = self.schedule(name)?.clone();
        let now = Utc::now();
        tracing::info!(schedule = name, by, "Schedule triggered by hand.");
        self.start_tick(&s, now, true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;

    fn schedule(cron: &str, tz: &str) -> Schedule {
        Schedule {
            name: "s".into(),
            cron: cron.parse().unwrap(),
            timezone: tz.parse().unwrap(),
            workflow: "w".into(),
            input: json!({}),
            catch_up: CatchUp::Skip,
            catch_up_limit: 10,
            overlap: Overlap::Allow,
            misfire_grace: Duration::from_secs(60),
        }
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn five_fields_mean_what_crontab_means() {
        // Weekday 1 is Monday; 2026-11-23 is a Monday.
        let s = schedule("0 9 * * 1", "UTC");
        assert_eq!(s.next_ticks(utc(2026, 11, 21, 0, 0), 1), vec![utc(2026, 11, 23, 9, 0)]);
        // Day-of-month OR day-of-week, as in Vixie cron: the 13th, or any Friday.
        let s = schedule("0 0 13 * 5", "UTC");
        let next = s.next_ticks(utc(2026, 3, 1, 0, 0), 3);
        assert_eq!(
            next,
            vec![utc(2026, 3, 6, 0, 0), utc(2026, 3, 13, 0, 0), utc(2026, 3, 20, 0, 0)]
        );
    }

    #[test]
    fn six_fields_have_seconds() {
        let s = schedule("*/20 * * * * *", "UTC");
        let t = utc(2026, 1, 1, 0, 0);
        let next = s.next_ticks(t, 2);
        assert_eq!(
            next,
            vec![t + chrono::Duration::seconds(20), t + chrono::Duration::seconds(40)]
        );
    }

    #[test]
    fn spring_forward_runs_a_gap_time_once_after_the_gap() {
        // Europe/Berlin, 2026-03-29: 02:00 CET jumps to 03:00 CEST.
        let s = schedule("30 2 * * *", "Europe/Berlin");
        let ticks = s.ticks_between(utc(2026, 3, 28, 12, 0), utc(2026, 3, 30, 12, 0), 10);
        // 03-29 runs once at 03:00 CEST (01:00 UTC); 03-30 at 02:30 CEST (00:30 UTC).
        assert_eq!(ticks, vec![utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)]);
    }

    #[test]
    fn fall_back_runs_a_repeated_time_once() {
        // Europe/Berlin, 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
        let s = schedule("30 2 * * *", "Europe/Berlin");
        let ticks = s.ticks_between(utc(2026, 10, 24, 12, 0), utc(2026, 10, 26, 12, 0), 10);
        // 10-25 once, at the first 02:30 (CEST, 00:30 UTC); 10-26 at 02:30 CET (01:30 UTC).
        assert_eq!(ticks, vec![utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]);
    }

    #[test]
    fn catch_up_policies() {
        let now = utc(2026, 1, 1, 12, 0);
        let mut s = schedule("0 * * * *", "UTC");
        let due = s.ticks_between(utc(2026, 1, 1, 6, 30), now, 100); // 07:00 … 12:00
        assert_eq!(due.len(), 6);
        let (run, dropped) = s.plan(&due, now);
        assert_eq!(
            (run, dropped.len()),
            (vec![now], 5),
            "skip: only the tick that is on time"
        );
        s.catch_up = CatchUp::Latest;
        let (run, _) = s.plan(&due, now);
        assert_eq!(run, vec![utc(2026, 1, 1, 11, 0), now]);
        s.catch_up = CatchUp::All;
        s.catch_up_limit = 3;
        let (run, dropped) = s.plan(&due, now);
        assert_eq!(run.len(), 4);
        assert_eq!(run[0], utc(2026, 1, 1, 9, 0));
        assert_eq!(dropped, vec![utc(2026, 1, 1, 7, 0), utc(2026, 1, 1, 8, 0)]);
    }

    #[test]
    fn bad_expressions_and_zones_say_what_is_expected() {
        let err = "61 * * * *".parse::<CronExpr>().unwrap_err();
        assert!(
            err.contains("'61 * * * *' is not a cron expression") && err.contains("5 fields"),
            "{err}"
        );
        let err = "Mars/Olympus".parse::<TimeZone>().unwrap_err();
        assert!(err.contains("IANA"), "{err}");
    }

    #[test]
    fn the_input_gets_the_tick() {
        let mut s = schedule("0 2 * * *", "Europe/Berlin");
        s.input = json!({ "label": "nightly {{ tick }}", "at": "{{ tick_utc }}", "by": "{{ schedule }}" });
        let input = s.input_for(utc(2026, 1, 1, 1, 0)).unwrap();
        assert_eq!(
            input,
            json!({ "label": "nightly 2026-01-01T02:00:00+01:00", "at": "2026-01-01T01:00:00+00:00", "by": "s" })
        );
    }
}
