//! The configuration every role reads: defaults, then the YAML file, then the environment.
//!
//! Loading is a pure function of (file text, environment map), so tests pass both in.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use dayshift_engine::{CatchUp, CronExpr, Overlap, QueueConfig, Registry, Schedule, TimeZone, WorkerConfig};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

/// A value that must never be printed (it may carry a password).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub(crate) struct Secret(String);

impl Secret {
    /// The value itself; only for handing to the client that needs it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
#[schemars(title = "dayshift configuration")]
pub(crate) struct Config {
    /// PostgreSQL, which holds all engine state.
    pub database: DatabaseConfig,
    /// Redis, which carries wake-ups.
    pub redis: RedisConfig,
    /// The HTTP API (`dayshift serve`).
    pub server: ServerConfig,
    /// Workers (`dayshift worker`).
    pub worker: WorkerConfig,
    /// The queue on Redis.
    pub queue: QueueConfig,
    /// Logging.
    pub log: LogConfig,
    /// Traces to an OpenTelemetry collector (OTLP).
    pub telemetry: TelemetryConfig,
    /// How long runs in flight may take to reach a step boundary after SIGTERM. Default 30s.
    pub shutdown_grace_period: GracePeriod,
    /// Cron schedules; `serve` fires them (one run per tick, however many replicas).
    pub schedules: Vec<ScheduleConfig>,
    /// Git webhooks (`POST /hooks/github|gitea|forgejo|gitlab`) and the runs they start.
    pub webhooks: WebhooksConfig,
    /// Alertmanager notifications (`POST /hooks/alertmanager`) and the remediations they start.
    pub alertmanager: AlertmanagerConfig,
    /// Named connections that workflow inputs refer to (`store: backups`, `database: app`).
    pub connections: dayshift_workflows::ConnectionsConfig,
    /// How each application is promoted through its environments (`promote.chain`).
    pub promotions: std::collections::BTreeMap<String, dayshift_workflows::PromotionConfig>,
    /// Alertmanager remediation playbooks (`remediate`), by name.
    pub playbooks: std::collections::BTreeMap<String, dayshift_workflows::PlaybookConfig>,
    /// What API callers may make dayshift do: who starts which workflow, and the values the
    /// privileged input fields may take (docs/security.md).
    pub policy: PolicyConfig,
}

/// The API's policy.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct PolicyConfig {
    /// Rules by workflow glob (`rotate.*`); every rule whose glob matches applies.
    #[serde(default)]
    pub workflows: std::collections::BTreeMap<String, WorkflowPolicyConfig>,
}

/// Who may start the workflows a glob matches, and with what.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct WorkflowPolicyConfig {
    /// Roles (`operator`, `admin`: each includes the stronger ones) and OIDC groups
    /// (`group:<name>`) that may start them through the API. Default: operators (but
    /// `remediate`, which only its alert routes start).
    #[serde(default)]
    pub start: Option<Vec<String>>,
    /// For each guarded input field (`GET /api/v1/workflows` lists them; `[]` for each element:
    /// `secrets[].namespace`), the values an API caller may give: globs (`app_*`), or for
    /// SQL the exact query. A guarded field without a list here takes no value from the API.
    #[serde(default)]
    pub inputs: std::collections::BTreeMap<String, Vec<String>>,
}

/// Alertmanager settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub(crate) struct AlertmanagerConfig {
    /// The bearer token Alertmanager sends (its webhook_config `http_config.authorization`).
    pub token: Option<SecretSource>,
    /// Or the user and password it sends (`http_config.basic_auth`).
    pub basic_auth: Option<BasicAuthConfig>,
    /// Accept notifications that carry no credentials at all. With any route configured, a
    /// token or basic auth is required unless this says `true` in so many words: alert labels
    /// choose what a remediation restarts, scales or deletes. Logged as a warning at start.
    pub allow_unauthenticated: bool,
    /// Largest notification accepted, in bytes. Default 32 MiB (a storm of 10,000 alerts is
    /// about 6 MB).
    pub max_body_bytes: usize,
    /// Which alerts start which workflow; every matching route starts its run.
    pub routes: Vec<AlertRouteConfig>,
}

impl Default for AlertmanagerConfig {
    fn default() -> Self {
        Self {
            token: None,
            basic_auth: None,
            allow_unauthenticated: false,
            max_body_bytes: 32 << 20,
            routes: Vec::new(),
        }
    }
}

/// HTTP basic auth credentials, as Alertmanager's `http_config.basic_auth` sends them.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct BasicAuthConfig {
    pub username: String,
    pub password: SecretSource,
}

/// An alert route.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct AlertRouteConfig {
    /// Unique name; in the runs' `started_by`.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Label matchers, all of which must match one alert: `alertname="KubePodCrashLooping"`,
    /// `namespace=~"prod-.*"`, `severity!="info"`, `team!~"data|ml"`.
    #[schemars(with = "Vec<String>")]
    pub matchers: Vec<dayshift_engine::triggers::alerts::Matcher>,
    /// The workflow to start, once per alert episode.
    #[schemars(with = "String")]
    pub workflow: Spanned<String>,
    /// Its input; placeholders such as `{{ labels.namespace }}`, `{{ annotations.summary }}`.
    #[serde(default)]
    pub input: serde_json::Value,
    /// Cooldown per target, runs per window, runs at once.
    #[serde(default)]
    pub guardrails: dayshift_engine::triggers::alerts::Guardrails,
}

/// Git webhook settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub(crate) struct WebhooksConfig {
    /// Largest delivery accepted, in bytes (413 above it). Default 2 MiB.
    pub max_body_bytes: usize,
    /// Commit author emails that are dayshift itself (the git connections' `author-email` are
    /// too): pushes made only of their commits start nothing. A `Dayshift-Run:` trailer from
    /// any other author means nothing.
    pub bot_emails: Vec<String>,
    /// Accept deliveries from GitHub (`X-Hub-Signature-256`).
    pub github: Option<ForgeConfig>,
    /// Accept deliveries from Gitea (`X-Gitea-Signature`).
    pub gitea: Option<ForgeConfig>,
    /// Accept deliveries from Forgejo (`X-Forgejo-Signature`).
    pub forgejo: Option<ForgeConfig>,
    /// Accept deliveries from GitLab (`X-Gitlab-Token`).
    pub gitlab: Option<ForgeConfig>,
    /// Which events start which workflow; every matching route starts its run.
    pub routes: Vec<RouteConfig>,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 2 << 20,
            bot_emails: Vec::new(),
            github: None,
            gitea: None,
            forgejo: None,
            gitlab: None,
            routes: Vec::new(),
        }
    }
}

/// A forge's shared secret (the webhook secret; GitLab's secret token).
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct ForgeConfig {
    /// Where the secret is; never in this file.
    pub secret: SecretSource,
}

/// Where a secret comes from; the workflows' config types hold it, this module reads it.
pub(crate) use dayshift_workflows::SecretSource;

/// Why a secret could not be read (the caller says which key it was).
#[derive(Debug, thiserror::Error)]
enum SecretError {
    #[error("environment variable {0} is not set")]
    EnvNotSet(String),
    #[error("{} is empty; an empty secret is a key anyone can use", .0.display())]
    Empty(std::path::PathBuf),
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("give exactly one of `env` and `file`")]
    NotOne,
    #[error("not UTF-8")]
    NotUtf8,
}

/// Reads `source` (a file's trailing newline dropped).
fn read_secret(source: &SecretSource) -> Result<Vec<u8>, SecretError> {
    match (&source.env, &source.file) {
        (Some(var), None) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(v.into_bytes()),
            _ => Err(SecretError::EnvNotSet(var.clone())),
        },
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(s) if s.trim_end_matches(['\n', '\r']).is_empty() => Err(SecretError::Empty(path.clone())),
            Ok(s) => Ok(s.trim_end_matches(['\n', '\r']).as_bytes().to_vec()),
            Err(source) => Err(SecretError::Unreadable {
                path: path.clone(),
                source,
            }),
        },
        _ => Err(SecretError::NotOne),
    }
}

/// Reads `source` for `key`, as the engine's intakes take it; an error names `key`.
fn read_secret_at(source: &SecretSource, key: &str) -> Result<Vec<u8>, ConfigError> {
    read_secret(source).map_err(|e| ConfigError::Invalid(format!("{key}: {e}")))
}

/// Reads `source` as text (URLs, tokens), as the workflows' config types take it.
fn read_secret_text(source: &SecretSource, key: &str) -> Result<String, dayshift_workflows::InvalidConfig> {
    read_secret(source)
        .and_then(|b| String::from_utf8(b).map_err(|_| SecretError::NotUtf8))
        .map_err(|e| dayshift_workflows::InvalidConfig::new(key, e))
}

/// A webhook route.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RouteConfig {
    /// Unique name; in the runs' `started_by`.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// Only deliveries from this forge (a `gitea` route also takes Forgejo's); any if absent.
    pub forge: Option<dayshift_engine::triggers::webhook::Forge>,
    /// Repository full names, globs allowed (`platform/*`); any if absent.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub repositories: Vec<dayshift_engine::triggers::webhook::Pattern>,
    /// push, tag, branch-deleted, tag-deleted, pull-request-opened, pull-request-reopened,
    /// pull-request-synchronized, pull-request-closed, pull-request-merged.
    pub events: Vec<dayshift_engine::triggers::webhook::EventKind>,
    /// Branch globs (the pushed branch, or a pull request's base branch); any if absent.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub branches: Vec<dayshift_engine::triggers::webhook::Pattern>,
    /// Tag globs (`v*`); any if absent.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub tags: Vec<dayshift_engine::triggers::webhook::Pattern>,
    /// Changed-path globs of a push (`apps/web/**`); at least one changed path must match.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub paths: Vec<dayshift_engine::triggers::webhook::Pattern>,
    /// The workflow to start.
    #[schemars(with = "String")]
    pub workflow: Spanned<String>,
    /// Its input; placeholders such as `{{ branch }}`, `{{ sha }}`, `{{ payload.pusher.name }}`.
    #[serde(default)]
    pub input: serde_json::Value,
    /// One (or n) at a time per target; the key may hold placeholders (`promote:{{ repository }}`).
    pub concurrency: Option<dayshift_engine::Concurrency>,
}

/// One cron schedule.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct ScheduleConfig {
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
    pub(crate) fn to_schedule(&self) -> Schedule {
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

/// A duration with a default of 30 s.
#[derive(Debug, Clone, Copy, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub(crate) struct GracePeriod(
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub Duration,
);

impl Default for GracePeriod {
    fn default() -> Self {
        Self(Duration::from_secs(30))
    }
}

/// PostgreSQL settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub(crate) struct DatabaseConfig {
    /// Connection URL. Env: `DAYSHIFT_DATABASE_URL`. Default
    /// `postgres://dayshift:dayshift@127.0.0.1:15432/dayshift` (the local services script).
    pub url: Secret,
    /// Pool size per process. Default 20.
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: Secret("postgres://dayshift:dayshift@127.0.0.1:15432/dayshift".into()),
            max_connections: 20,
        }
    }
}

/// Redis settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub(crate) struct RedisConfig {
    /// Connection URL. Env: `DAYSHIFT_REDIS_URL`. Default `redis://127.0.0.1:16379/`.
    pub url: Secret,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: Secret("redis://127.0.0.1:16379/".into()),
        }
    }
}

/// HTTP API settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub(crate) struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    #[schemars(with = "String")]
    pub listen: SocketAddr,
    /// Serve `/metrics` without a token (for Prometheus). Default true; false: it needs a
    /// viewer token.
    pub public_metrics: bool,
    /// Also accept JWTs of the platform's OpenID Connect provider (Keycloak, Authentik, ...).
    pub oidc: Option<OidcConfig>,
    /// Requests handled at once; more get 503 at once (with `Retry-After`), never a queue.
    /// Default 512.
    pub max_concurrent_requests: usize,
    /// How long a request body may take to arrive; 408 after it. Default 10s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub body_timeout: Duration,
    /// All of a request's headers together, in bytes; 431 above it. Default 16384.
    pub max_header_bytes: usize,
    /// The largest API request body, in bytes (webhooks and Alertmanager have their own);
    /// 413 above it. Default 2 MiB.
    pub max_body_bytes: usize,
    /// How long a client may take to send its request's headers; then the connection is
    /// closed. Default 10s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub header_timeout: Duration,
    /// Connections open at once; more are closed as they arrive. Default 1024.
    pub max_connections: usize,
    /// How long a caller waits for an answer; 504 after it (the request still completes, it
    /// is never cut off half done). Default 60s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let limits = dayshift_engine::api::Limits::default();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_metrics: true,
            oidc: None,
            max_concurrent_requests: limits.max_concurrent_requests,
            body_timeout: limits.body_timeout,
            max_header_bytes: limits.max_header_bytes,
            max_body_bytes: limits.max_body_bytes,
            header_timeout: limits.header_timeout,
            max_connections: limits.max_connections,
            request_timeout: limits.request_timeout,
        }
    }
}

impl ServerConfig {
    /// The request limits, as the router applies them.
    pub(crate) fn limits(&self) -> dayshift_engine::api::Limits {
        dayshift_engine::api::Limits {
            max_concurrent_requests: self.max_concurrent_requests,
            body_timeout: self.body_timeout,
            max_header_bytes: self.max_header_bytes,
            max_body_bytes: self.max_body_bytes,
            header_timeout: self.header_timeout,
            max_connections: self.max_connections,
            request_timeout: self.request_timeout,
        }
    }
}

/// An OpenID Connect provider whose tokens the API accepts.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct OidcConfig {
    /// The tokens' `iss`, e.g. `https://sso.example.com/realms/platform`.
    pub issuer: String,
    /// The tokens' `aud`: the client id dayshift is registered as.
    pub audience: String,
    /// The provider's signing keys (JWKS), e.g. `<issuer>/protocol/openid-connect/certs`.
    pub jwks_url: String,
    /// The claim naming the caller. Default `preferred_username`.
    #[serde(default = "preferred_username")]
    pub username_claim: String,
    /// The claim with the caller's groups; a dotted path for nested ones (Keycloak:
    /// `realm_access.roles`). Default `groups`.
    #[serde(default = "groups")]
    pub roles_claim: String,
    /// Which groups grant which role, e.g. `{ operator: [platform-oncall], viewer: [platform] }`;
    /// the strongest role granted wins.
    pub roles: std::collections::BTreeMap<dayshift_engine::api::auth::Role, Vec<String>>,
}

fn preferred_username() -> String {
    "preferred_username".into()
}
fn groups() -> String {
    "groups".into()
}

/// Trace export settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub(crate) struct TelemetryConfig {
    /// An OpenTelemetry collector's OTLP/HTTP endpoint, e.g. `http://otel-collector:4318`;
    /// traces are sent to `<endpoint>/v1/traces`. Default: `OTEL_EXPORTER_OTLP_ENDPOINT` if
    /// set, else no traces. A collector that is down never slows or fails work: spans are
    /// dropped.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans. Default `dayshift`.
    pub service_name: String,
    /// The fraction of runs traced, 0 to 1. Default 1.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "dayshift".into(),
            sample_ratio: 1.0,
        }
    }
}

/// Log settings.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub(crate) struct LogConfig {
    /// A tracing filter, e.g. `info` or `info,dayshift_engine=debug`. Env `DAYSHIFT_LOG` wins.
    pub level: String,
    /// `text` or `json`. Default `text`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config: {0}")]
    Invalid(String),
}

/// Why the `policy:` section does not make a policy.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PolicyError {
    /// A `start` entry names no role or group.
    #[error("policy.workflows.{pattern:?}.start: {problem}")]
    Starter {
        pattern: String,
        problem: dayshift_engine::policy::InvalidStarter,
    },
    /// The engine refuses the rule (its message names the key).
    #[error(transparent)]
    Rule(#[from] dayshift_engine::core::error::ConfigError),
}

/// The checks every kind of route needs: a unique name, a registered workflow, and input
/// placeholders that name fields its trigger provides.
fn check_route_basics(
    path: &str,
    section: &str,
    (name, workflow, input): (&Spanned<String>, &Spanned<String>, &serde_json::Value),
    (fields, trigger): (&[&str], &str),
    registry: &Registry,
    seen: &mut HashMap<String, u64>,
    problems: &mut Vec<String>,
) {
    let line = name.referenced.line();
    let at = |key: &str| format!("{path}, line {line}: {section}.{key}");
    if let Some(first) = seen.insert(name.value.clone(), line) {
        problems.push(format!(
            "{}: route name '{}' is already used on line {first}; names must be unique",
            at("name"),
            name.value
        ));
    }
    if registry
        .validate_input(&workflow.value, &serde_json::Value::Null)
        .is_none()
    {
        problems.push(format!(
            "{path}, line {}: {section}.workflow: unknown workflow '{}'",
            workflow.referenced.line(),
            workflow.value
        ));
    }
    for (key, placeholder) in dayshift_engine::template::placeholders(input) {
        let root = placeholder.split('.').next().unwrap_or_default();
        if !fields.contains(&root) {
            problems.push(format!(
                "{}: '{{{{ {placeholder} }}}}' names no field of {trigger}; fields: {}",
                at(&key),
                fields.join(", ")
            ));
        }
    }
}

impl Config {
    /// The webhook settings with their secrets read, as the engine runs them.
    pub(crate) fn webhooks(&self) -> Result<dayshift_engine::triggers::webhook::Webhooks, ConfigError> {
        use dayshift_engine::triggers::webhook::{Forge, WebhookRoute, Webhooks};
        let w = &self.webhooks;
        let mut secrets = HashMap::new();
        for (forge, conf) in [
            (Forge::Github, &w.github),
            (Forge::Gitea, &w.gitea),
            (Forge::Forgejo, &w.forgejo),
            (Forge::Gitlab, &w.gitlab),
        ] {
            if let Some(conf) = conf {
                let key = format!("webhooks.{}.secret", forge.as_str());
                secrets.insert(forge, read_secret_at(&conf.secret, &key)?);
            }
        }
        let routes = w
            .routes
            .iter()
            .map(|r| WebhookRoute {
                name: r.name.value.clone(),
                forge: r.forge,
                repositories: r.repositories.clone(),
                events: r.events.clone(),
                branches: r.branches.clone(),
                tags: r.tags.clone(),
                paths: r.paths.clone(),
                workflow: r.workflow.value.clone(),
                input: r.input.clone(),
                concurrency: r.concurrency.clone(),
            })
            .collect();
        Ok(Webhooks {
            secrets,
            routes,
            max_body: w.max_body_bytes,
            // dayshift's own commits are authored as the git connections say.
            bot_emails: w
                .bot_emails
                .iter()
                .cloned()
                .chain(self.connections.git.values().map(|g| g.author_email.clone()))
                .collect(),
        })
    }

    /// The promotions and playbooks, checked, for the workflows that run them.
    pub(crate) fn catalogs(&self) -> Result<dayshift_workflows::Catalogs, ConfigError> {
        let mut out = dayshift_workflows::Catalogs::default();
        let invalid = |e: dayshift_workflows::InvalidConfig| ConfigError::Invalid(e.to_string());
        for (name, p) in &self.playbooks {
            out.playbooks.insert(name.clone(), p.check(name).map_err(invalid)?);
        }
        for (app, p) in &self.promotions {
            out.promotions.insert(app.clone(), p.check(app).map_err(invalid)?);
        }
        Ok(out)
    }

    /// The named connections with their credentials read, as the workflows use them.
    pub(crate) fn connections(&self) -> Result<dayshift_workflows::Connections, ConfigError> {
        self.connections
            .resolve(&read_secret_text)
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// The API's policy, as the engine applies it.
    pub(crate) fn policy(&self) -> Result<dayshift_engine::policy::Policy, PolicyError> {
        let mut rules = Vec::new();
        for (pattern, rule) in &self.policy.workflows {
            let start = rule
                .start
                .as_ref()
                .map(|s| {
                    s.iter()
                        .map(|x| {
                            x.parse().map_err(|problem| PolicyError::Starter {
                                pattern: pattern.clone(),
                                problem,
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?;
            rules.push(
                dayshift_engine::policy::Rule::new(pattern, start, rule.inputs.clone()).map_err(PolicyError::Rule)?,
            );
        }
        Ok(dayshift_engine::policy::Policy { rules })
    }

    /// The Alertmanager settings with the token read, as the engine runs them.
    pub(crate) fn alerts(&self) -> Result<dayshift_engine::triggers::alerts::Alerts, ConfigError> {
        let a = &self.alertmanager;
        use dayshift_engine::triggers::alerts::IntakeAuth;
        let auth = match (&a.token, &a.basic_auth) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "alertmanager: give one of `token` and `basic-auth`, not both".into(),
                ));
            }
            (Some(source), None) => IntakeAuth::Bearer(read_secret_at(source, "alertmanager.token")?),
            (None, Some(b)) => IntakeAuth::Basic {
                username: b.username.clone(),
                password: read_secret_at(&b.password, "alertmanager.basic-auth.password")?,
            },
            (None, None) => IntakeAuth::None,
        };
        Ok(dayshift_engine::triggers::alerts::Alerts {
            auth,
            max_body: a.max_body_bytes,
            routes: a
                .routes
                .iter()
                .map(|r| dayshift_engine::triggers::alerts::AlertRoute {
                    name: r.name.value.clone(),
                    matchers: r.matchers.clone(),
                    workflow: r.workflow.value.clone(),
                    input: r.input.clone(),
                    guardrails: r.guardrails.clone(),
                })
                .collect(),
        })
    }

    /// The schedules, as the engine runs them.
    pub(crate) fn schedules(&self) -> Vec<Schedule> {
        self.schedules.iter().map(ScheduleConfig::to_schedule).collect()
    }

    /// Checks what needs the registered workflows: schedule names are unique, each names a
    /// workflow that exists, and its input (filled for a sample tick) fits that workflow.
    /// Each problem names the file, the line and the key.
    pub(crate) fn check_with(&self, path: &str, registry: &Registry) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for (i, s) in self.schedules.iter().enumerate() {
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
        self.check_routes(path, registry, &mut problems);
        self.check_alert_routes(path, registry, &mut problems);
        if let Err(e) = self.policy() {
            problems.push(format!("{path}: {e}"));
        }
        for (pattern, rule) in &self.policy.workflows {
            let Ok(glob) = globset::Glob::new(pattern) else {
                continue;
            };
            let glob = glob.compile_matcher();
            let matched: Vec<String> = registry
                .list()
                .into_iter()
                .map(|w| w.name)
                .filter(|n| glob.is_match(n))
                .collect();
            if matched.is_empty() {
                problems.push(format!(
                    "{path}: policy.workflows.{pattern:?} matches no registered workflow"
                ));
            }
            for field in rule.inputs.keys() {
                if !matched.iter().any(|w| registry.guards(w).any(|g| g == field)) {
                    problems.push(format!(
                        "{path}: policy.workflows.{pattern:?}.inputs.{field}: no workflow it matches guards that field \
                         (GET /api/v1/workflows lists the guarded inputs)"
                    ));
                }
            }
        }
        if let Err(ConfigError::Invalid(e)) = self.alerts() {
            problems.push(format!("{path}: {e}"));
        }
        if let Err(ConfigError::Invalid(e)) = self.connections() {
            problems.push(format!("{path}: {e}"));
        }
        if let Err(ConfigError::Invalid(e)) = self.catalogs() {
            problems.push(format!("{path}: {e}"));
        }
        if let Err(ConfigError::Invalid(e)) = self.webhooks() {
            problems.push(format!("{path}: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems.join("\n")))
        }
    }

    /// Loads defaults, then `file` (path and text) if given, then the environment.
    pub(crate) fn load(file: Option<(&str, &str)>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some((path, text)) if !text.trim().is_empty() => {
                serde_saphyr::from_str::<Config>(text).map_err(|e| ConfigError::Parse {
                    path: path.to_string(),
                    message: e.to_string(),
                })?
            }
            _ => Config::default(),
        };
        if let Some(url) = env.get("DAYSHIFT_DATABASE_URL").filter(|v| !v.is_empty()) {
            config.database.url = Secret(url.clone());
        }
        if let Some(url) = env.get("DAYSHIFT_REDIS_URL").filter(|v| !v.is_empty()) {
            config.redis.url = Secret(url.clone());
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads the file named by `path` (or `DAYSHIFT_CONFIG`) and loads.
    pub(crate) fn from_path(path: Option<&str>, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let path = path
            .map(str::to_string)
            .or_else(|| env.get("DAYSHIFT_CONFIG").filter(|p| !p.is_empty()).cloned());
        match path {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::load(Some((&path, &text)), env)
            }
            None => Self::load(None, env),
        }
    }

    fn check_routes(&self, path: &str, registry: &Registry, problems: &mut Vec<String>) {
        use dayshift_engine::triggers::webhook::{CONTEXT_FIELDS, Forge};
        let w = &self.webhooks;
        let mut seen = HashMap::new();
        for (i, r) in w.routes.iter().enumerate() {
            check_route_basics(
                path,
                &format!("webhooks.routes[{i}]"),
                (&r.name, &r.workflow, &r.input),
                (CONTEXT_FIELDS, "a git event"),
                registry,
                &mut seen,
                problems,
            );
            let line = r.name.referenced.line();
            let at = |key: &str| format!("{path}, line {line}: webhooks.routes[{i}].{key}");
            let route = self.webhooks().ok().and_then(|h| h.routes.into_iter().nth(i));
            for problem in route.map(|r| r.problems()).unwrap_or_default() {
                problems.push(at(&problem));
            }
            let configured = match r.forge {
                Some(Forge::Github) => w.github.is_some(),
                Some(Forge::Gitea) => w.gitea.is_some() || w.forgejo.is_some(),
                Some(Forge::Forgejo) => w.forgejo.is_some(),
                Some(Forge::Gitlab) => w.gitlab.is_some(),
                None => w.github.is_some() || w.gitea.is_some() || w.forgejo.is_some() || w.gitlab.is_some(),
            };
            if !configured {
                problems.push(format!(
                    "{}: no forge this route listens to has a secret (webhooks.<forge>.secret)",
                    at("forge")
                ));
            }
        }
    }

    fn check_alert_routes(&self, path: &str, registry: &Registry, problems: &mut Vec<String>) {
        use dayshift_engine::triggers::alerts::CONTEXT_FIELDS;
        let mut seen = HashMap::new();
        for (i, r) in self.alertmanager.routes.iter().enumerate() {
            check_route_basics(
                path,
                &format!("alertmanager.routes[{i}]"),
                (&r.name, &r.workflow, &r.input),
                (CONTEXT_FIELDS, "an alert"),
                registry,
                &mut seen,
                problems,
            );
            if r.matchers.is_empty() {
                let line = r.name.referenced.line();
                problems.push(format!(
                    "{path}, line {line}: alertmanager.routes[{i}].matchers: name at least one matcher"
                ));
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let db = self.database.url.expose();
        if !(db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            return Err(ConfigError::Invalid(
                "database.url must start with postgres:// or postgresql://".into(),
            ));
        }
        let redis = self.redis.url.expose();
        if !(redis.starts_with("redis://") || redis.starts_with("rediss://") || redis.starts_with("unix://")) {
            return Err(ConfigError::Invalid(
                "redis.url must start with redis://, rediss:// or unix://".into(),
            ));
        }
        if self.database.max_connections < 2 {
            return Err(ConfigError::Invalid(
                "database.max-connections must be at least 2".into(),
            ));
        }
        if self.worker.concurrency == 0 {
            return Err(ConfigError::Invalid("worker.concurrency must be at least 1".into()));
        }
        if self.worker.lease_ttl < Duration::from_secs(1) {
            return Err(ConfigError::Invalid("worker.lease-ttl must be at least 1s".into()));
        }
        let s = &self.server;
        if s.max_concurrent_requests == 0
            || s.body_timeout.is_zero()
            || s.header_timeout.is_zero()
            || s.max_connections == 0
            || s.request_timeout.is_zero()
        {
            return Err(ConfigError::Invalid(
                "server.max-concurrent-requests, server.max-connections, server.body-timeout, \
                 server.header-timeout and server.request-timeout must be more than 0"
                    .into(),
            ));
        }
        if self.queue.poll_interval.is_zero() {
            return Err(ConfigError::Invalid("queue.poll-interval must be more than 0".into()));
        }
        let a = &self.alertmanager;
        if !a.routes.is_empty() && a.token.is_none() && a.basic_auth.is_none() && !a.allow_unauthenticated {
            return Err(ConfigError::Invalid(
                "alertmanager.routes are configured but neither alertmanager.token nor alertmanager.basic-auth \
                 is: anyone who reaches /hooks/alertmanager could choose what a remediation acts on. Give the \
                 credentials Alertmanager's http_config sends, or set alertmanager.allow-unauthenticated: true"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_playbook_that_acts_in_namespaces_must_list_them_and_approvers_say_what_they_are() {
        let text = "playbooks:\n  p:\n    actions:\n      - action: kube.rollout-restart\n        \
                    with: { kind: Deployment, namespace: x, name: y }\n"
            .to_string();
        let c = Config::load(Some(("c.yaml", &text)), &env(&[])).unwrap();
        let err = c.playbooks["p"].check("p").unwrap_err().to_string();
        assert!(err.contains("playbooks.p.namespaces") && err.contains("\"*\""), "{err}");
        let text = text.replace("    actions:", "    namespaces: [\"*\"]\n    actions:");
        let c = Config::load(Some(("c.yaml", &text)), &env(&[])).unwrap();
        assert!(c.playbooks["p"].check("p").is_ok());
        let text = format!("{text}    approval: {{ approvers: [alice] }}\n");
        let err = Config::load(Some(("c.yaml", &text)), &env(&[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("token:alice") && err.contains("line 7"), "{err}");
    }

    #[test]
    fn defaults_need_no_file() {
        let c = Config::load(None, &env(&[])).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.worker.concurrency, 16);
    }

    #[test]
    fn env_overrides_the_file() {
        let text = "database:\n  url: postgres://file/db\nredis:\n  url: redis://file/\n";
        let c = Config::load(
            Some(("c.yaml", text)),
            &env(&[("DAYSHIFT_DATABASE_URL", "postgres://env/db")]),
        )
        .unwrap();
        assert_eq!(c.database.url.expose(), "postgres://env/db");
        assert_eq!(c.redis.url.expose(), "redis://file/");
    }

    #[test]
    fn file_settings_are_read() {
        let text =
            "worker:\n  concurrency: 4\n  lease-ttl: 10s\nserver:\n  listen: 0.0.0.0:9000\nshutdown-grace-period: 5s\n";
        let c = Config::load(Some(("c.yaml", text)), &env(&[])).unwrap();
        assert_eq!(c.worker.concurrency, 4);
        assert_eq!(c.worker.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.shutdown_grace_period.0, Duration::from_secs(5));
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let text = "server:\n  listen: 127.0.0.1:8080\nworker:\n  concurency: 4\n";
        let err = Config::load(Some(("c.yaml", text)), &env(&[])).unwrap_err().to_string();
        assert!(err.contains("concurency"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("c.yaml"), "{err}");
    }

    #[test]
    fn a_wrong_type_is_named_with_its_line() {
        let text = "worker:\n  concurrency: lots\n";
        let err = Config::load(Some(("c.yaml", text)), &env(&[])).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn connections_read_their_secrets_and_name_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("dayshift-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let (ak, sk, pg, hook, token) = (
            file("ak", "access\n"),
            file("sk", "secret\n"),
            file("pg", "postgres://u:p@db/app\n"),
            file("hook", "https://chat.example/hooks/abc\n"),
            file("token", "s.root-token\n"),
        );
        let yaml = |address: &str, hook: &str| {
            format!(
                "connections:\n  s3:\n    backups:\n      bucket: b\n      access-key: {{ file: {ak} }}\n      secret-key: {{ file: {sk} }}\n  postgres:\n    app: {{ url: {{ file: {pg} }} }}\n  notify:\n    ops: {{ url: {{ file: {hook} }} }}\n  vault:\n    openbao:\n      address: {address}\n      token: {{ file: {token} }}\n"
            )
        };
        let c = Config::load(Some(("c.yaml", &yaml("http://127.0.0.1:8200", &hook))), &env(&[])).unwrap();
        let conns = c.connections().unwrap();
        assert_eq!(conns.s3["backups"].access_key, "access");
        assert_eq!(conns.postgres["app"], "postgres://u:p@db/app");
        assert_eq!(conns.notify["ops"], "https://chat.example/hooks/abc");
        assert!(
            matches!(&conns.vault["openbao"].auth, dayshift_workflows::adapters::vault::VaultAuth::Token(t) if t == "s.root-token")
        );
        let printed = format!("{conns:?}");
        for secret in ["access", "secret", "u:p@", "hooks/abc", "s.root-token"] {
            assert!(!printed.contains(secret), "{secret} is printable: {printed}");
        }

        let c = Config::load(Some(("c.yaml", &yaml("openbao:8200", &hook))), &env(&[])).unwrap();
        let err = c.connections().unwrap_err().to_string();
        assert!(
            err.contains("connections.vault.openbao.address: must start with http"),
            "{err}"
        );
        let c = Config::load(Some(("c.yaml", &yaml("http://o:8200", "/nonexistent/hook"))), &env(&[])).unwrap();
        let err = c.connections().unwrap_err().to_string();
        assert!(
            err.contains("connections.notify.ops.url: cannot read /nonexistent/hook"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn promotion_mistakes_are_named_with_where_they_are() {
        let base =
            "promotions:\n  api:\n    repository: infra\n    environments:\n      - name: prod\n        file: v.yaml\n";
        let cases = [
            (
                "        key: a.b\n        image: x\n",
                "promotions.api.environments[0]: give exactly one of `key` and `image`",
            ),
            (
                "        key: a.b\n        window: { from: \"9am\", to: \"16:00\" }\n",
                "promotions.api.environments[0].window.from: \"9am\" is not HH:MM",
            ),
            (
                "        key: a.b\n        window: { days: [funday], from: \"09:00\", to: \"16:00\" }\n",
                "window.days: \"funday\" is not a day",
            ),
            (
                "        key: a.b\n        window: { from: \"09:00\", to: \"16:00\", timezone: Mars/Olympus }\n",
                "window.timezone: \"Mars/Olympus\" is not an IANA time zone",
            ),
        ];
        for (extra, expected) in cases {
            let c = Config::load(Some(("c.yaml", &format!("{base}{extra}"))), &env(&[])).unwrap();
            let err = c.catalogs().unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
        let ok = Config::load(
            Some(("c.yaml", &format!("{base}        key: a.b\n        soak: 10m\n"))),
            &env(&[]),
        )
        .unwrap();
        let conns = ok.catalogs().unwrap();
        assert_eq!(
            conns.promotions["api"].environments[0].soak,
            Some(Duration::from_secs(600))
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::load(None, &env(&[("DAYSHIFT_DATABASE_URL", "postgres://u:hunter2@h/db")])).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
