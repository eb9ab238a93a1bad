//! The configuration every role reads: defaults, then the YAML file, then the environment.
//!
//! Each section's type is its domain's (the API's `server:`, the triggers' `schedules:`,
//! `webhooks:` and `alertmanager:`, the workflows' `connections:`, `promotions:` and
//! `playbooks:`), with its defaults and checks; this module composes them, holds the binary's
//! own settings (database, Redis, logs, traces, the grace period, the policy), and reads the
//! secrets the sections point at.
//!
//! Loading is a pure function of (file text, environment map), so tests pass both in.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use dayshift_engine::api::ServerConfig;
use dayshift_engine::config::{InvalidConfig, SecretReader, SecretSource};
use dayshift_engine::triggers::alerts::AlertmanagerConfig;
use dayshift_engine::triggers::schedule::ScheduleConfig;
use dayshift_engine::triggers::webhook::WebhooksConfig;
use dayshift_engine::{QueueConfig, Registry, Schedule, WorkerConfig};
use serde::{Deserialize, Serialize};

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
    /// Workflows written as files (docs/workflows.md).
    pub workflows: dayshift_workflows::declarative::WorkflowsConfig,
    /// The directory of the config file, which relative paths are read from.
    #[serde(skip)]
    #[schemars(skip)]
    pub base_dir: std::path::PathBuf,
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

/// Reads `source` for `key`, as the config sections' [`SecretReader`] does; an error names `key`.
fn read_secret_at(source: &SecretSource, key: &str) -> Result<Vec<u8>, InvalidConfig> {
    read_secret(source).map_err(|e| InvalidConfig::new(key, e))
}

/// What the config sections read their secrets with.
pub(crate) fn secrets() -> SecretReader<'static> {
    SecretReader::new(&read_secret_at)
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

/// An error of a section, as the config's.
fn invalid(e: InvalidConfig) -> ConfigError {
    ConfigError::Invalid(e.to_string())
}

impl Config {
    /// The webhook settings with their secrets read, as the engine runs them.
    pub(crate) fn webhooks(&self) -> Result<dayshift_engine::triggers::webhook::Webhooks, ConfigError> {
        let mut webhooks = self.webhooks.resolve(secrets()).map_err(invalid)?;
        // dayshift's own commits are authored as the git connections say.
        webhooks
            .bot_emails
            .extend(self.connections.git.values().map(|g| g.author_email.clone()));
        Ok(webhooks)
    }

    /// The promotions and playbooks, checked, for the workflows that run them.
    pub(crate) fn catalogs(&self) -> Result<dayshift_workflows::Catalogs, ConfigError> {
        let mut out = dayshift_workflows::Catalogs::default();
        for (name, p) in &self.playbooks {
            out.playbooks.insert(name.clone(), p.check(name).map_err(invalid)?);
        }
        for (app, p) in &self.promotions {
            out.promotions.insert(app.clone(), p.check(app).map_err(invalid)?);
        }
        let names = self.connections.names();
        out.workflows = dayshift_workflows::declarative::load(
            &self.workflows.dirs,
            &self.base_dir,
            &names,
            &dayshift_workflows::BUILT_IN,
        )
        .map_err(|problems| ConfigError::Invalid(problems.join("\n")))?;
        out.connection_names = std::sync::Arc::new(names);
        Ok(out)
    }

    /// The named connections with their credentials read, as the workflows use them.
    pub(crate) fn connections(&self) -> Result<dayshift_workflows::Connections, ConfigError> {
        self.connections.resolve(secrets()).map_err(invalid)
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
        self.alertmanager.resolve(secrets()).map_err(invalid)
    }

    /// The schedules, as the engine runs them.
    pub(crate) fn schedules(&self) -> Vec<Schedule> {
        self.schedules.iter().map(ScheduleConfig::to_schedule).collect()
    }

    /// Checks what needs the registered workflows (each section's checks: schedules, webhook
    /// and alert routes, the policy) and what needs the secrets read (the triggers' and the
    /// connections'). Each problem names the file, the line and the key. `catalogs` are the
    /// config's, with every workflow file (those of `workflows.git` fetched).
    pub(crate) fn check_with(
        &self,
        path: &str,
        registry: &Registry,
        catalogs: Result<&dayshift_workflows::Catalogs, &ConfigError>,
    ) -> Result<(), ConfigError> {
        let mut problems = dayshift_engine::triggers::schedule::config::check(&self.schedules, path, registry);
        problems.extend(self.webhooks.check(path, registry));
        problems.extend(self.alertmanager.check(path, registry));
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
        match catalogs {
            Err(ConfigError::Invalid(e)) => problems.push(format!("{path}: {e}")),
            // Each names its workflow file.
            Ok(c) => problems.extend(dayshift_workflows::declarative::check_children(&c.workflows, registry)),
            Err(_) => {}
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
        if let Some((path, _)) = file {
            config.base_dir = std::path::Path::new(path)
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default();
        }
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
        self.server.validate().map_err(|e| ConfigError::Invalid(e.0))?;
        if self.queue.poll_interval.is_zero() {
            return Err(ConfigError::Invalid("queue.poll-interval must be more than 0".into()));
        }
        self.alertmanager.validate().map_err(|e| ConfigError::Invalid(e.0))?;
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
    fn workflow_files_are_read_from_the_config_s_directory_and_their_problems_named() {
        let dir = std::env::temp_dir().join(format!("dayshift-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("wf")).unwrap();
        std::fs::write(
            dir.join("wf/ok.yaml"),
            "name: ops.ok\nsteps:\n  - { id: a, action: log, with: { message: hi } }\n",
        )
        .unwrap();
        let path = dir.join("dayshift.yaml").display().to_string();
        let text = "workflows:\n  dirs: [wf]\n";
        let c = Config::load(Some((&path, text)), &HashMap::new()).unwrap();
        let catalogs = c.catalogs().unwrap();
        assert_eq!(catalogs.workflows.len(), 1);
        assert_eq!(catalogs.workflows[0].name(), "ops.ok");

        std::fs::write(
            dir.join("wf/bad.yaml"),
            "name: ops.bad\nsteps:\n  - { id: a, action: nope }\n",
        )
        .unwrap();
        let err = c.catalogs().unwrap_err().to_string();
        let bad = dir.join("wf/bad.yaml").display().to_string();
        assert!(
            err.contains(&format!("{bad}:3:")) && err.contains("no action \"nope\""),
            "{err}"
        );
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
