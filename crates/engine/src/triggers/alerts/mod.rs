//! Alertmanager notifications start remediation runs: one per alert episode, within guardrails.
//!
//! # Design notes
//! - Alertmanager sends no delivery id and no signature; a repeat notification is identical to
//!   the first, and an HA pair sends each one twice. So an *episode* (the alert's `fingerprint`
//!   and `startsAt`) starts at most one run per route: the run's idempotency key is
//!   `alert:<route>:<fingerprint>:<startsAt>`, and `alert_episodes` records it.
//! - Routes match each alert's labels (not the group's) with Alertmanager's operators: `=`,
//!   `!=`, `=~`, `!~`; regular expressions match the whole value, as in Alertmanager.
//! - A resolved alert starts nothing; it is delivered as the signal `resolved` (payload: the
//!   alert) to the run its episode started, so a remediation can wait for it.
//! - Guardrails per route: a cooldown per target (the values of the labels named), at most
//!   `max-runs` per `window`, at most `max-concurrent` runs going. An episode held back is
//!   recorded with the reason and tried again when a later notification still reports it firing.
//!
//! [`config`] holds the config file's `alertmanager:` and its checks.

pub mod config;

pub use config::{AlertmanagerConfig, BasicAuthConfig};

use std::time::Duration;

use crate::core::store::alerts::{self as store, Episode};
use chrono::{DateTime, Utc};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use serde_saphyr::Spanned;

use crate::core::error::EngineError;
use crate::core::model::{RunId, StartRun};
use crate::engine::Engine;
use crate::template;
use crate::triggers::intake::{IntakeError, Refusal};

/// One label matcher, in Alertmanager's syntax: `name="value"`, `name!="value"`,
/// `name=~"regex"`, `name!~"regex"`.
#[derive(Debug, Clone)]
pub struct Matcher {
    text: String,
    name: String,
    op: Op,
    value: String,
    regex: Option<Regex>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Re,
    NotRe,
}

crate::message_error!(
    /// Text that is not a label matcher: the text, and what a matcher looks like.
    InvalidMatcher
);

impl std::str::FromStr for Matcher {
    type Err = InvalidMatcher;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            InvalidMatcher(format!(
                "'{text}' is not a matcher; expected name=\"value\", name!=\"value\", name=~\"regex\" or name!~\"regex\""
            ))
        };
        let pos = text.find(['=', '!']).ok_or_else(bad)?;
        let name = text[..pos].trim();
        let rest = &text[pos..];
        let (op, value) = if let Some(v) = rest.strip_prefix("=~") {
            (Op::Re, v)
        } else if let Some(v) = rest.strip_prefix("!~") {
            (Op::NotRe, v)
        } else if let Some(v) = rest.strip_prefix("!=") {
            (Op::Ne, v)
        } else if let Some(v) = rest.strip_prefix('=') {
            (Op::Eq, v)
        } else {
            return Err(bad());
        };
        let valid_name = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(bad());
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value)
            .to_string();
        let regex = match op {
            Op::Re | Op::NotRe => Some(
                Regex::new(&format!("^(?:{value})$"))
                    .map_err(|e| InvalidMatcher(format!("'{text}': bad regular expression: {e}")))?,
            ),
            _ => None,
        };
        Ok(Self {
            text: text.to_string(),
            name: name.to_string(),
            op,
            value,
            regex,
        })
    }
}

impl<'de> Deserialize<'de> for Matcher {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Matcher {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl Matcher {
    /// Whether the labels match; a missing label is the empty string, as in Alertmanager.
    pub fn matches(&self, labels: &serde_json::Map<String, Value>) -> bool {
        let v = labels.get(&self.name).and_then(Value::as_str).unwrap_or("");
        match self.op {
            Op::Eq => v == self.value,
            Op::Ne => v != self.value,
            Op::Re => self.regex.as_ref().is_some_and(|r| r.is_match(v)),
            Op::NotRe => !self.regex.as_ref().is_some_and(|r| r.is_match(v)),
        }
    }
}

/// How much automation an alert route may do.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Guardrails {
    /// The labels that name what a run acts on (e.g. `[namespace, deployment]`); the cooldown
    /// applies per distinct target. Default: the alert's fingerprint.
    #[serde(default)]
    pub target: Vec<String>,
    /// After a run for a target, no new run for it for this long.
    #[serde(default, with = "humantime_serde::option")]
    #[schemars(with = "Option<String>")]
    pub cooldown: Option<Duration>,
    /// At most this many runs per `window` for the route.
    pub max_runs: Option<u32>,
    /// The window of `max-runs`. Default 1h.
    #[serde(default, with = "humantime_serde::option")]
    #[schemars(with = "Option<String>")]
    pub window: Option<Duration>,
    /// At most this many of the route's runs going at once.
    pub max_concurrent: Option<u32>,
}

// The config file's route as it is (`alertmanager.routes`), with the lines of its name and
// workflow kept for the config's messages. Its doc comments are the schema's descriptions.
/// An alert route.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
// The name the schema has always had (docs/config.schema.json).
#[schemars(rename = "AlertRouteConfig")]
pub struct AlertRoute {
    /// Unique name; in the runs' `started_by`.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Label matchers, all of which must match one alert: `alertname="KubePodCrashLooping"`,
    /// `namespace=~"prod-.*"`, `severity!="info"`, `team!~"data|ml"`.
    #[schemars(with = "Vec<String>")]
    pub matchers: Vec<Matcher>,
    /// The workflow to start, once per alert episode.
    #[schemars(with = "String")]
    pub workflow: Spanned<String>,
    /// Its input; placeholders such as `{{ labels.namespace }}`, `{{ annotations.summary }}`.
    // The fields are those of `CONTEXT_FIELDS`.
    #[serde(default)]
    pub input: Value,
    /// Cooldown per target, runs per window, runs at once.
    #[serde(default)]
    pub guardrails: Guardrails,
}

/// The fields an alert route's placeholders can start with.
pub const CONTEXT_FIELDS: &[&str] = &[
    "labels",
    "annotations",
    "fingerprint",
    "starts_at",
    "generator_url",
    "status",
    "receiver",
    "external_url",
];

/// The credentials a notification must carry, as Alertmanager's `http_config` sends them.
#[derive(Clone, Default)]
pub enum IntakeAuth {
    /// `Authorization: Bearer <token>`.
    Bearer(Vec<u8>),
    /// `Authorization: Basic <user:password>`.
    Basic { username: String, password: Vec<u8> },
    /// None: only when the config says `allow-unauthenticated: true`.
    #[default]
    None,
}

impl std::fmt::Debug for IntakeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bearer(_) => "Bearer(..)",
            Self::Basic { .. } => "Basic(..)",
            Self::None => "None",
        })
    }
}

impl IntakeAuth {
    /// Whether the request's `Authorization` header carries these credentials. Compared in
    /// constant time; checked before the body is read.
    pub fn admits(&self, authorization: Option<&str>) -> bool {
        let given = authorization.unwrap_or("");
        match self {
            Self::None => true,
            Self::Bearer(token) => {
                crate::identity::bearer(given).is_some_and(|t| crate::identity::same(t.as_bytes(), token))
            }
            Self::Basic { username, password } => {
                use base64::Engine as _;
                let Some(encoded) = given
                    .split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
                    .map(|(_, v)| v.trim())
                else {
                    return false;
                };
                let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
                    return false;
                };
                let mut expected = username.as_bytes().to_vec();
                expected.push(b':');
                expected.extend_from_slice(password);
                crate::identity::same(&decoded, &expected)
            }
        }
    }
}

/// Alertmanager settings.
#[derive(Debug, Clone, Default)]
pub struct Alerts {
    /// The credentials notifications must carry.
    pub auth: IntakeAuth,
    pub routes: Vec<AlertRoute>,
    pub max_body: usize,
}

/// Alertmanager's webhook payload, version 4.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Notification {
    pub version: String,
    #[serde(default)]
    pub group_key: Option<String>,
    pub status: String,
    #[serde(default)]
    pub receiver: Option<String>,
    #[serde(default, rename = "externalURL")]
    pub external_url: Option<String>,
    pub alerts: Vec<Alert>,
}

/// One alert of a notification.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: String,
    pub labels: serde_json::Map<String, Value>,
    #[serde(default)]
    pub annotations: serde_json::Map<String, Value>,
    pub starts_at: DateTime<Utc>,
    #[serde(default, rename = "generatorURL")]
    pub generator_url: Option<String>,
    pub fingerprint: String,
}

/// What a notification led to.
#[derive(Debug, Default, Serialize)]
pub struct NotificationOutcome {
    pub alerts: usize,
    pub started: Vec<RunId>,
    /// Episodes that already had their run (repeat notifications, HA duplicates).
    pub duplicates: usize,
    pub held_back: Vec<String>,
    /// Resolved alerts delivered as a signal to their episode's run.
    pub resolved_signals: usize,
    /// Firing alerts no route matched.
    pub no_route: usize,
    pub errors: Vec<String>,
}

/// Whether the request's `Authorization` header carries the credentials the config names:
/// checked before the body is read.
pub fn admit(alerts: &Alerts, authorization: Option<&str>) -> Result<(), IntakeError> {
    if alerts.auth.admits(authorization) {
        Ok(())
    } else {
        Err(IntakeError::Unauthorized(
            "missing or wrong credentials (the token or basic auth of alertmanager in dayshift's config)".into(),
        ))
    }
}

/// Takes one notification whose sender was admitted ([`admit`]) and whose body has been read:
/// reads it (version 4 only), starts and signals what its routes say, counts the results.
pub async fn receive(engine: &Engine, alerts: &Alerts, body: &[u8]) -> Result<NotificationOutcome, Refusal> {
    let notification: Notification = serde_json::from_slice(body)
        .map_err(|e| IntakeError::BadRequest(format!("not an Alertmanager notification: {e}")))?;
    if notification.version != "4" {
        return Err(IntakeError::BadRequest(format!(
            "notification version {} is not supported; Alertmanager sends version 4",
            notification.version
        ))
        .into());
    }
    let span = tracing::info_span!(
        "alertmanager",
        otel.name = "alertmanager notification",
        receiver = notification.receiver.as_deref().unwrap_or("")
    );
    let outcome = tracing::Instrument::instrument(handle(engine, alerts, notification), span).await?;
    let m = crate::core::metrics::metrics();
    let results = [
        ("started", outcome.started.len()),
        ("duplicate", outcome.duplicates),
        ("held_back", outcome.held_back.len()),
        ("resolved", outcome.resolved_signals),
        ("no_route", outcome.no_route),
        ("failed", outcome.errors.len()),
    ];
    for (result, n) in results {
        for _ in 0..n {
            m.delivery("alertmanager", result);
        }
    }
    Ok(outcome)
}

/// Handles one notification.
async fn handle(engine: &Engine, alerts: &Alerts, n: Notification) -> Result<NotificationOutcome, EngineError> {
    // Alertmanager sends `firing` or `resolved`; anything else is not its notification, and
    // taking it as firing would start a remediation. Refused whole, before anything is done.
    if let Some((i, a)) = n
        .alerts
        .iter()
        .enumerate()
        .find(|(_, a)| a.status != "firing" && a.status != "resolved")
    {
        let status: String = a.status.chars().take(40).collect();
        return Err(EngineError::BadRequest(format!(
            "alerts[{i}] (fingerprint {}) has status {status:?}; Alertmanager sends \"firing\" or \"resolved\"",
            a.fingerprint.chars().take(64).collect::<String>()
        )));
    }
    let mut out = NotificationOutcome {
        alerts: n.alerts.len(),
        ..Default::default()
    };
    // Firing alerts by route (each route's decided in one transaction); resolved ones by alert.
    let mut firing: Vec<Vec<&Alert>> = vec![Vec::new(); alerts.routes.len()];
    let mut resolved = Vec::new();
    for alert in &n.alerts {
        let matching: Vec<usize> = (0..alerts.routes.len())
            .filter(|&i| alerts.routes[i].matchers.iter().all(|m| m.matches(&alert.labels)))
            .collect();
        if alert.status == "resolved" {
            resolved.push((alert, matching));
        } else if matching.is_empty() {
            out.no_route += 1;
        } else {
            for i in matching {
                firing[i].push(alert);
            }
        }
    }
    for (route, alerts_of_route) in alerts.routes.iter().zip(&firing) {
        if alerts_of_route.is_empty() {
            continue;
        }
        for (alert, fired) in fire(engine, route, alerts_of_route, &n).await? {
            match fired {
                Fired::Started(id) => out.started.push(id),
                Fired::Duplicate => out.duplicates += 1,
                Fired::HeldBack(why) => out
                    .held_back
                    .push(format!("{} ({}): {why}", route.name.value, alert.fingerprint)),
                Fired::Failed(why) => out
                    .errors
                    .push(format!("{} ({}): {why}", route.name.value, alert.fingerprint)),
            }
        }
    }
    out.resolved_signals = resolve(engine, alerts, &resolved).await?;
    engine
        .store()
        .record_notification(
            n.receiver.as_deref(),
            &n.status,
            n.group_key.as_deref(),
            n.alerts.len() as i32,
            json!({
                "started": out.started.len(), "duplicates": out.duplicates, "held_back": out.held_back.len(),
                "resolved_signals": out.resolved_signals, "no_route": out.no_route, "errors": out.errors.len()
            }),
        )
        .await?;
    tracing::info!(
        alerts = out.alerts,
        started = out.started.len(),
        duplicates = out.duplicates,
        held_back = out.held_back.len(),
        resolved = out.resolved_signals,
        "Alertmanager notification handled."
    );
    Ok(out)
}

enum Fired {
    Started(RunId),
    Duplicate,
    HeldBack(String),
    Failed(String),
}

fn target_of(route: &AlertRoute, alert: &Alert) -> String {
    if route.guardrails.target.is_empty() {
        return alert.fingerprint.clone();
    }
    route
        .guardrails
        .target
        .iter()
        .map(|l| format!("{l}={}", alert.labels.get(l).and_then(Value::as_str).unwrap_or("")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Decides, for the firing alerts of one notification that `route` matches, which start a run,
/// which already have theirs and which a guardrail holds back, and starts those runs: in one
/// transaction under the route's lock, reading what it needs in a few statements and deciding
/// in memory, alert after alert in the notification's order, exactly as if each were decided
/// alone (a run started for one counts in the guardrails of the next).
async fn fire<'n>(
    engine: &Engine,
    route: &AlertRoute,
    alerts: &[&'n Alert],
    n: &Notification,
) -> Result<Vec<(&'n Alert, Fired)>, EngineError> {
    let name = route.name.value.as_str();
    let g = &route.guardrails;
    let targets: Vec<String> = alerts.iter().map(|a| target_of(route, a)).collect();
    let episode = |i: usize| Episode {
        route: name,
        fingerprint: &alerts[i].fingerprint,
        starts_at: alerts[i].starts_at,
        target: &targets[i],
        labels: Value::Object(alerts[i].labels.clone()),
    };
    // Serialises decisions for this route, so that caps hold under concurrent notifications.
    let mut tx = engine.store().pool().begin().await?;
    store::lock_route(&mut tx, name).await?;
    let seen: Vec<(&str, DateTime<Utc>)> = alerts.iter().map(|a| (a.fingerprint.as_str(), a.starts_at)).collect();
    let mut outcomes = store::episode_outcomes(&mut tx, name, &seen).await?;
    let mut state = GuardState::default();
    if let Some(cooldown) = g.cooldown {
        let distinct: std::collections::BTreeSet<&str> = targets.iter().map(String::as_str).collect();
        let distinct: Vec<&str> = distinct.into_iter().collect();
        state.last_start = store::last_starts_within(&mut tx, name, &distinct, cooldown.as_secs_f64()).await?;
    }
    if g.max_runs.is_some() {
        let window = g.window.unwrap_or(Duration::from_secs(3600));
        state.in_window = store::starts_within(&mut tx, name, window.as_secs_f64()).await?;
    }
    if g.max_concurrent.is_some() {
        state.going = store::runs_going(&mut tx, name).await?;
    }

    enum Decision {
        Fired(Fired),
        Start(usize),
    }
    let mut decisions = Vec::with_capacity(alerts.len());
    let mut held = Vec::new();
    let mut reqs: Vec<(StartRun, u32)> = Vec::new();
    for (i, alert) in alerts.iter().enumerate() {
        let key = (alert.fingerprint.clone(), alert.starts_at);
        if outcomes.get(&key).map(String::as_str) == Some("started") {
            decisions.push(Decision::Fired(Fired::Duplicate));
            continue;
        }
        if let Some(why) = state.held_back(g, &targets[i]) {
            held.push((episode(i), why.clone()));
            outcomes.entry(key).or_insert_with(|| "held-back".into());
            decisions.push(Decision::Fired(Fired::HeldBack(why)));
            continue;
        }
        let mut req = match start_request(route, alert, n) {
            Ok(req) => req,
            Err(why) => {
                decisions.push(Decision::Fired(Fired::Failed(why)));
                continue;
            }
        };
        let version = match engine.prepare(&mut req) {
            Ok(v) => v,
            Err(
                e @ (EngineError::InvalidInput { .. } | EngineError::UnknownWorkflow(_) | EngineError::BadRequest(_)),
            ) => {
                decisions.push(Decision::Fired(Fired::Failed(e.to_string())));
                continue;
            }
            Err(e) => return Err(e),
        };
        reqs.push((req, version));
        decisions.push(Decision::Start(reqs.len() - 1));
        outcomes.insert(key, "started".into());
        state.started(&targets[i]);
    }
    // Created in this transaction: no second connection, no Redis call while the route's lock
    // is held (about twenty concurrent notifications used to exhaust the pool).
    let refs: Vec<(&StartRun, u32)> = reqs.iter().map(|(r, v)| (r, *v)).collect();
    let mut results: Vec<Option<Result<crate::core::model::Started, EngineError>>> = engine
        .start_many_in_tx(&mut tx, &refs)
        .await?
        .into_iter()
        .map(Some)
        .collect();
    let mut started = Vec::new();
    let mut created = Vec::new();
    let mut fired = Vec::with_capacity(alerts.len());
    for (i, decision) in decisions.into_iter().enumerate() {
        let f = match decision {
            Decision::Fired(f) => f,
            Decision::Start(j) => match results[j].take().expect("one result per start") {
                Ok(s) => {
                    started.push((episode(i), s.id.0));
                    if s.created {
                        created.push(s.id);
                        Fired::Started(s.id)
                    } else {
                        Fired::Duplicate
                    }
                }
                Err(e @ EngineError::Conflict(_)) => Fired::Failed(e.to_string()),
                Err(e) => return Err(e),
            },
        };
        fired.push((alerts[i], f));
    }
    store::record_episodes(&mut tx, &held, &started).await?;
    tx.commit().await?;
    if let Some((_, why)) = held.first() {
        tracing::warn!(route = name, held_back = held.len(), first_reason = %why, "Alerts held back by a guardrail.");
    }
    let started_by = reqs.first().and_then(|(r, _)| r.started_by.clone()).unwrap_or_default();
    engine.started_many(&route.workflow.value, &started_by, created);
    Ok(fired)
}

/// The run `route` starts for `alert`: its input rendered from the alert, its idempotency key
/// the episode's. Why not, if the input cannot be rendered.
fn start_request(route: &AlertRoute, alert: &Alert, n: &Notification) -> Result<StartRun, String> {
    let context = json!({
        "labels": alert.labels, "annotations": alert.annotations, "fingerprint": alert.fingerprint,
        "starts_at": alert.starts_at.to_rfc3339(), "generator_url": alert.generator_url, "status": alert.status,
        "receiver": n.receiver, "external_url": n.external_url,
    });
    let input = template::render(&route.input, &context).map_err(|e| e.0)?;
    let mut req = StartRun::new(route.workflow.value.clone(), input);
    req.idempotency_key = Some(format!(
        "alert:{}:{}:{}",
        route.name.value,
        alert.fingerprint,
        alert.starts_at.to_rfc3339()
    ));
    req.started_by = Some(format!(
        "alertmanager:{} {}",
        route.name.value,
        alert.labels.get("alertname").and_then(Value::as_str).unwrap_or("alert")
    ));
    Ok(req)
}

/// What a route's guardrails look at, read once per notification and kept up to date in
/// memory as its alerts start runs.
#[derive(Default)]
struct GuardState {
    /// The last start per target, within the cooldown.
    last_start: std::collections::HashMap<String, DateTime<Utc>>,
    /// Starts within the `max-runs` window.
    in_window: i64,
    /// Runs of the route going.
    going: i64,
}

impl GuardState {
    /// Why a new run for `target` would break a guardrail, if it would.
    fn held_back(&self, g: &Guardrails, target: &str) -> Option<String> {
        if let Some(cooldown) = g.cooldown
            && let Some(at) = self.last_start.get(target)
        {
            return Some(format!(
                "cooldown: a run for {target} started at {at}, less than {} ago",
                humantime::format_duration(cooldown)
            ));
        }
        if let Some(max) = g.max_runs
            && self.in_window >= i64::from(max)
        {
            let window = g.window.unwrap_or(Duration::from_secs(3600));
            return Some(format!(
                "max-runs: {} runs in the last {}, the limit is {max}",
                self.in_window,
                humantime::format_duration(window)
            ));
        }
        if let Some(max) = g.max_concurrent
            && self.going >= i64::from(max)
        {
            return Some(format!("max-concurrent: {} runs going, the limit is {max}", self.going));
        }
        None
    }

    /// Counts a run started for `target`.
    fn started(&mut self, target: &str) {
        self.last_start.insert(target.to_string(), Utc::now());
        self.in_window += 1;
        self.going += 1;
    }
}

/// Signals `resolved` to the runs the resolved alerts' episodes started, the first time each
/// is resolved (a repeated resolved notification signals nothing new): the episodes in one
/// statement, the signals in one more. Returns how many runs were signalled (a run that has
/// ended takes no signal).
async fn resolve(engine: &Engine, alerts: &Alerts, resolved: &[(&Alert, Vec<usize>)]) -> Result<usize, EngineError> {
    let mut episodes: Vec<(&str, DateTime<Utc>, &str)> = Vec::new();
    let mut of_alert: Vec<&Alert> = Vec::new();
    for (alert, routes) in resolved {
        for &i in routes {
            episodes.push((&alert.fingerprint, alert.starts_at, &alerts.routes[i].name.value));
            of_alert.push(alert);
        }
    }
    let mut signals = Vec::new();
    for (i, run, first) in engine.store().resolve_episodes_all(&episodes).await? {
        let (Some(run), true, Some(alert)) = (run, first, of_alert.get(i)) else {
            continue;
        };
        let payload = json!({ "fingerprint": alert.fingerprint, "labels": alert.labels, "starts_at": alert.starts_at });
        signals.push((RunId(run), payload));
    }
    engine
        .send_signals(&signals, crate::approval::RESOLVED_SIGNAL, "alertmanager")
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> serde_json::Map<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect()
    }

    #[test]
    fn matchers_use_alertmanagers_operators() {
        let l = labels(&[
            ("alertname", "KubePodCrashLooping"),
            ("namespace", "prod-web"),
            ("severity", "critical"),
        ]);
        for (m, expected) in [
            (r#"alertname="KubePodCrashLooping""#, true),
            (r#"severity!="info""#, true),
            (r#"namespace=~"prod-.*""#, true),
            (r#"namespace=~"prod""#, false), // anchored, as in Alertmanager
            (r#"namespace!~"staging-.*""#, true),
            (r#"team="""#, true), // a missing label is the empty string
            ("severity=critical", true),
        ] {
            assert_eq!(m.parse::<Matcher>().unwrap().matches(&l), expected, "{m}");
        }
    }

    #[test]
    fn bad_matchers_say_what_is_expected() {
        assert!(
            "alertname"
                .parse::<Matcher>()
                .unwrap_err()
                .contains("expected name=\"value\"")
        );
        assert!(r#"x=~"(""#.parse::<Matcher>().unwrap_err().contains("bad regular expression"));
        assert!(r#"="v""#.parse::<Matcher>().is_err());
    }
}
