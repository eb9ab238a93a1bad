//! The data users see: ids, statuses, runs and their steps, start requests, retry policy.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Identifies one run. Time-ordered (UUIDv7), so ids sort by creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub Uuid);

impl RunId {
    /// A new, time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

crate::message_error!(
    /// Text that is not a run id: the text, and why.
    InvalidRunId
);

crate::message_error!(
    /// A name that is none of a kind's (a run status, a step kind, ...): the name, and the ones
    /// there are.
    UnknownVariant
);

impl FromStr for RunId {
    type Err = InvalidRunId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|e| InvalidRunId(format!("'{s}' is not a run id (a UUID): {e}")))
    }
}

macro_rules! text_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
        #[serde(rename_all = "kebab-case")]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            /// The name stored in PostgreSQL and shown by the API.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownVariant;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(UnknownVariant(format!(
                        "'{other}' is not a {}; expected one of: {}",
                        stringify!($name),
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }
    };
}

text_enum! {
    /// Where a run is in its life.
    RunStatus {
        /// Created, not yet picked up (or waiting for a slot under its concurrency key).
        Pending = "pending",
        /// A worker holds it, or held it and may have died (the sweeper resumes it).
        Running = "running",
        /// Suspended on a timer, a signal, a child run or a retry backoff; holds no worker.
        Waiting = "waiting",
        /// Finished with an output.
        Succeeded = "succeeded",
        /// Finished with an error, after its undos ran.
        Failed = "failed",
        /// Cancelled (or skipped/superseded under its concurrency key), after its undos ran.
        Cancelled = "cancelled",
    }
}

impl RunStatus {
    /// Whether the run is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

text_enum! {
    /// Where a journal entry is in its life.
    StepStatus {
        /// An attempt is in flight (or was, when its worker died).
        Running = "running",
        /// The last attempt failed with a transient error; the next one is due at `wake_at`.
        Retrying = "retrying",
        /// A sleep, a signal wait or a child run that has not finished.
        Waiting = "waiting",
        /// Done; its result is journaled (unless sensitive).
        Succeeded = "succeeded",
        /// Failed for good: a permanent error or attempts exhausted.
        Failed = "failed",
        /// Cancelled while in flight.
        Cancelled = "cancelled",
    }
}

text_enum! {
    /// What a journal entry records.
    StepKind {
        /// A side effect run by `ctx.step`.
        Step = "step",
        /// A durable timer (`ctx.sleep`).
        Sleep = "sleep",
        /// A durable wait for a signal (`ctx.wait_signal`).
        Signal = "signal",
        /// A child run (`ctx.child`).
        Child = "child",
        /// The undo of a completed step, run when the run fails or is cancelled.
        Undo = "undo",
    }
}

text_enum! {
    /// What happens when a run starts while its concurrency key is at its limit.
    ConcurrencyPolicy {
        /// Wait for a slot; runs start in the order they were created.
        Queue = "queue",
        /// Do not run: the new run ends at once as cancelled, naming the run holding the key.
        Skip = "skip",
        /// Cancel the runs holding the key (their undos run), then start.
        CancelOlder = "cancel-older",
        /// Like queue, but a newer run replaces the one still queued: a burst coalesces to the newest.
        LatestWins = "latest-wins",
    }
}

/// One-at-a-time (or n-at-a-time) per target: runs sharing a key, whatever started them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// e.g. `promote:web:prod` or `backup:postgres:main`.
    pub key: String,
    /// How many runs with this key may be active at once. Default 1.
    #[serde(default = "one")]
    pub limit: u32,
    /// What a start does when the key is at its limit. Default `queue`.
    #[serde(default = "queue")]
    pub policy: ConcurrencyPolicy,
}

fn one() -> u32 {
    1
}
fn queue() -> ConcurrencyPolicy {
    ConcurrencyPolicy::Queue
}

/// The idempotency-key prefixes the triggers own (`schedule:<name>:<tick>`, `hook:<route>:…`,
/// `alert:<route>:…`, `retry:<run>`). A key under one of them from the API could claim a
/// trigger's run before it fires, so the API refuses them, as it refuses them for
/// concurrency keys.
pub(crate) const TRIGGER_KEY_PREFIXES: &[&str] = &["schedule:", "hook:", "alert:", "retry:", "dayshift:"];

/// A request to start a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// The registered workflow's name, e.g. `selftest.chain`.
    pub workflow: String,
    /// The workflow's input; checked against its type before the run is created.
    #[serde(default)]
    pub input: Value,
    /// A second start with the same key returns the first run instead of creating one.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Limits how many runs with the same key are active at once.
    #[serde(default)]
    pub concurrency: Option<Concurrency>,
    /// Who or what starts it (`api`, `cli`, `cron:<schedule>`, ...). Set by the caller's front door.
    #[serde(default, skip_deserializing)]
    pub started_by: Option<String>,
    /// The run's trace (W3C traceparent); set by the engine when tracing is on.
    #[serde(skip)]
    pub trace_context: Option<String>,
    /// A plan run: each step says what it would do and nothing is changed. Only workflows with
    /// a plan mode (workflow files) take it; the engine records it in the input as
    /// [`PLAN_INPUT`].
    #[serde(default)]
    pub plan: bool,
}

/// The input field that makes a run a plan run ([`StartRun::plan`]), reserved: a workflow
/// without a plan mode refuses input that has it.
pub const PLAN_INPUT: &str = "$plan";

impl StartRun {
    /// A start of `workflow` with `input` and nothing else.
    pub fn new(workflow: impl Into<String>, input: Value) -> Self {
        Self {
            workflow: workflow.into(),
            input,
            idempotency_key: None,
            concurrency: None,
            started_by: None,
            trace_context: None,
            plan: false,
        }
    }

    /// Sets the idempotency key.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the concurrency key, limit and policy.
    pub fn concurrency(mut self, key: impl Into<String>, limit: u32, policy: ConcurrencyPolicy) -> Self {
        self.concurrency = Some(Concurrency {
            key: key.into(),
            limit,
            policy,
        });
        self
    }
}

/// What a start returned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Started {
    /// The run (the earlier one, for a repeated idempotency key).
    pub id: RunId,
    /// Its status right after the start.
    pub status: RunStatus,
    /// false when an earlier run with the same idempotency key was returned.
    pub created: bool,
    /// Why the run did not start right away, if it did not (queued or skipped under a concurrency key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A run as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunView {
    pub id: RunId,
    pub workflow: String,
    pub workflow_version: i32,
    pub status: RunStatus,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub started_by: String,
    pub idempotency_key: Option<String>,
    pub concurrency_key: Option<String>,
    pub parent_run_id: Option<RunId>,
    pub cancel_requested: bool,
    pub wake_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Present on a single-run read, not in listings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepView>,
}

impl RunView {
    /// The run with the values of fields named like secrets (`password`, `token`, …) in its
    /// input, output and step results replaced, for showing. Inputs name connections and should
    /// hold no secret; this catches the ones that do anyway.
    pub fn redacted(mut self) -> Self {
        redact_secrets(&mut self.input);
        if let Some(output) = &mut self.output {
            redact_secrets(output);
        }
        for step in &mut self.steps {
            if let Some(output) = &mut step.output {
                redact_secrets(output);
            }
        }
        self
    }
}

/// Field names whose string values are secrets wherever they appear.
const SECRET_FIELDS: [&str; 12] = [
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "private_key",
    "client_secret",
    "secret_key",
    "access_token",
    "refresh_token",
    "secret_access_key",
];

/// Replaces, at any depth, the string values of fields named like secrets with `[redacted]`.
pub(crate) fn redact_secrets(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let key = k.to_ascii_lowercase().replace('-', "_");
                if v.is_string() && SECRET_FIELDS.contains(&key.as_str()) {
                    *v = Value::String("[redacted]".into());
                } else {
                    redact_secrets(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_secrets),
        _ => {}
    }
}

/// One journal entry as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepView {
    pub seq: i32,
    pub name: String,
    pub kind: StepKind,
    pub status: StepStatus,
    pub attempts: i32,
    pub sensitive: bool,
    /// The step's result; absent for sensitive steps.
    pub output: Option<Value>,
    /// The last error, if any attempt failed.
    pub last_error: Option<String>,
    /// Every failed attempt, oldest first.
    #[serde(default)]
    pub errors: Vec<AttemptError>,
    pub child_run_id: Option<RunId>,
    pub wake_at: Option<DateTime<Utc>>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Wall time from the first attempt to the end, in milliseconds.
    pub duration_ms: Option<i64>,
}

/// One failed attempt of a step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptError {
    pub attempt: i32,
    pub at: DateTime<Utc>,
    pub error: String,
}

/// A filter for listing runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    pub workflow: Option<String>,
    /// What started the runs: `api`, `schedule`, `webhook`, `alertmanager` or `parent` (the
    /// part of `started_by` before the first `:`).
    #[serde(default)]
    pub trigger: Option<String>,
    /// Created at or after this time.
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    /// Created before this time.
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
    /// The page after this run (the last of the previous page): runs created before it.
    #[serde(default)]
    pub before: Option<RunId>,
    /// At most this many, newest first. Default 50, at most 1000.
    pub limit: Option<u32>,
}

/// How a step is retried: attempts, exponential backoff with jitter, a cap on the delay.
///
/// Permanent errors ([`crate::StepError::Permanent`]) are never retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included. 1 means no retry.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Each further delay is the previous one times this.
    pub multiplier: f64,
    /// No delay is longer than this.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Each delay is moved at random by up to this fraction (0.2 = ±20%), so that runs that
    /// failed together do not retry together.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts, 1 s, ×2, at most 1 min apart, ±20%.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            jitter: 0.2,
        }
    }
}

/// The named policies: a step picks the one that says why it retries, and leaves out
/// `.retry(…)` when the default (the same as [`RetryPolicy::network`]) is meant.
impl RetryPolicy {
    /// One attempt, no retry: for steps whose repetition would do harm or make no sense.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// For calls over the network to a service that may be briefly away (a timeout, a 5xx, a
    /// connection refused while a pod restarts): 5 attempts over about half a minute, the
    /// default. A permanent error (bad credentials, a missing object) still fails at once.
    pub fn network() -> Self {
        Self::default()
    }

    /// For steps that act on production (a remediation action) or poll until something is
    /// ready, where five attempts would repeat an effect or a long wait too often: 3 attempts.
    pub fn cautious() -> Self {
        Self {
            max_attempts: 3,
            ..Self::default()
        }
    }

    /// The delay before attempt `failed + 1`, after `failed` failed attempts (`failed >= 1`).
    pub fn delay_after(&self, failed: u32) -> Duration {
        let exp = self.multiplier.max(1.0).powi(failed.saturating_sub(1).min(64) as i32);
        let base = (self.initial_delay.as_secs_f64() * exp).min(self.max_delay.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = if jitter > 0.0 {
            1.0 + rand::random_range(-jitter..=jitter)
        } else {
            1.0
        };
        Duration::from_secs_f64((base * factor).clamp(0.0, self.max_delay.as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(100),
            multiplier: 2.0,
            max_delay: Duration::from_millis(500),
            jitter: 0.0,
        };
        let d: Vec<_> = (1..=5).map(|n| p.delay_after(n).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn named_policies_differ_only_in_attempts() {
        assert_eq!(RetryPolicy::network(), RetryPolicy::default());
        assert_eq!(RetryPolicy::cautious().max_attempts, 3);
        assert_eq!(RetryPolicy::none().max_attempts, 1);
        for p in [RetryPolicy::cautious(), RetryPolicy::none()] {
            assert_eq!(
                (p.initial_delay, p.max_delay),
                (Duration::from_secs(1), Duration::from_secs(60))
            );
        }
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..RetryPolicy::default()
        };
        for _ in 0..1000 {
            let d = p.delay_after(1).as_secs_f64();
            assert!((0.5..=1.5).contains(&d), "{d}");
        }
    }

    #[test]
    fn unknown_status_names_the_choices() {
        let err = "done".parse::<RunStatus>().unwrap_err();
        assert!(
            err.contains("pending, running, waiting, succeeded, failed, cancelled"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod redaction_tests {
    use serde_json::json;

    use super::redact_secrets;

    #[test]
    fn values_of_secret_fields_are_redacted_at_any_depth_and_names_are_kept() {
        let mut v = json!({
            "password": "hunter2", "Api-Key": "k", "password_key": "password",
            "nested": [{ "token": "t", "key": "token" }], "secret": { "name": "db" },
        });
        redact_secrets(&mut v);
        assert_eq!(
            v,
            json!({
                "password": "[redacted]", "Api-Key": "[redacted]", "password_key": "password",
                "nested": [{ "token": "[redacted]", "key": "token" }], "secret": { "name": "db" },
            })
        );
    }
}
