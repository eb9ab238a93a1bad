//! The config file's `schedules:`: each schedule as written (with the lines of its name and
//! workflow, for messages), the [`Schedule`] the loop runs from it, and the checks that need
//! the registered workflows.

use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{CatchUp, CronExpr, Overlap, Schedule, TimeZone};
use crate::core::workflow::Registry;

/// One cron schedule.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ScheduleConfig {
    /// Unique name; used in the API (`/api/v1/schedules/NAME`) and in the runs' `started_by`.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Crontab expression: 5 fields, or 6/7 with seconds (and year), or @daily, @hourly, ….
    #[schemars(with = "String")]
    pub cron: CronExpr,
    /// IANA time zone the expression is read in. Default UTC.
    #[serde(default)]
    #[schemars(with = "String")]
    pub timezone: TimeZone,
    /// The workflow each tick starts.
    #[schemars(with = "String")]
    pub workflow: Spanned<String>,
    /// The workflow's input; `{{ tick }}`, `{{ tick_utc }}` and `{{ schedule }}` are filled in.
    #[serde(default)]
    pub input: serde_json::Value,
    /// Ticks missed while dayshift was down: skip (default), latest, or all (up to catch-up-limit).
    #[serde(default)]
    pub catch_up: CatchUp,
    /// How many missed ticks `catch-up: all` runs at most. Default 10.
    #[serde(default = "ten")]
    pub catch_up_limit: u32,
    /// A tick while the previous run still goes: allow (default), skip, or cancel the previous.
    #[serde(default)]
    pub overlap: Overlap,
    /// How late a tick may fire and still count as on time rather than missed. Default 1m.
    #[serde(default = "one_minute", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub misfire_grace: Duration,
}

fn ten() -> u32 {
    10
}

fn one_minute() -> Duration {
    Duration::from_secs(60)
}

impl ScheduleConfig {
    /// The schedule, as the loop runs it.
    pub fn to_schedule(&self) -> Schedule {
        Schedule {
            name: self.name.value.clone(),
            cron: self.cron.clone(),
            timezone: self.timezone,
            workflow: self.workflow.value.clone(),
            input: self.input.clone(),
            catch_up: self.catch_up,
            catch_up_limit: self.catch_up_limit,
            overlap: self.overlap,
            misfire_grace: self.misfire_grace,
        }
    }
}

/// Checks what needs the registered workflows: schedule names are unique, each names a
/// workflow that exists, and its input (filled for a sample tick) fits that workflow. One
/// message per problem, naming the file (`path`), the line and the key.
pub fn check(schedules: &[ScheduleConfig], path: &str, registry: &Registry) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (i, s) in schedules.iter().enumerate() {
        let at = |line: u64, key: &str| format!("{path}, line {line}: schedules[{i}].{key}");
        if let Some(first) = seen.insert(s.name.value.clone(), s.name.referenced.line()) {
            problems.push(format!(
                "{}: schedule name '{}' is already used on line {first}; names must be unique",
                at(s.name.referenced.line(), "name"),
                s.name.value
            ));
        }
        let schedule = s.to_schedule();
        let input = match schedule.input_for(chrono::Utc::now()) {
            Ok(input) => input,
            Err(e) => {
                problems.push(format!("{}: {e}", at(s.name.referenced.line(), "input")));
                continue;
            }
        };
        match registry.validate_input(&s.workflow.value, &input) {
            None => problems.push(format!(
                "{}: unknown workflow '{}'; registered: {}",
                at(s.workflow.referenced.line(), "workflow"),
                s.workflow.value,
                registry
                    .list()
                    .iter()
                    .map(|w| w.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some(Err(e)) => problems.push(format!(
                "{}: does not fit workflow '{}': {e}",
                at(s.name.referenced.line(), "input"),
                s.workflow.value
            )),
            Some(Ok(())) => {}
        }
    }
    problems
}
