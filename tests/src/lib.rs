//! Test harness for dayshift's end-to-end tests, against real PostgreSQL, Redis, SeaweedFS,
//! OpenBao and Alertmanager.
//!
//! The services come from `scripts/services.sh`, which exports their addresses
//! (`DAYSHIFT_DATABASE_URL`, `DAYSHIFT_REDIS_URL`, ...); a test whose service is missing fails,
//! it does not skip. Each test gets its own database (created and migrated here) and its own
//! Redis queue name, so tests run in parallel without seeing each other.
//!
//! Where each concept lives:
//!
//! | module | what it holds |
//! |---|---|
//! | `services` | the shared services' addresses, the test bucket, [`unique`] names, [`free_port`] |
//! | `db` | [`TestDb`]: a database of a test's own, and what was stored in it |
//! | `env` | [`TestEnv`] and its [`TestEnvBuilder`]: an engine in this process, its workers, [`TestEnv::run`]; waiting for runs |
//! | `binary` | the `dayshift` binary: [`dayshift_bin`], [`Proc`], [`BinEnv`], [`spawn_dayshift`] |
//! | [`saga`] | generic checks over any workflow: a failure at each step compensates |
//! | [`kube_api`] | the Kubernetes API stand-in |
//! | [`browser`] | headless Chromium for the console's tests |
//! | `redis`, `alertmanager`, `openbao` | a service of a test's own: [`OwnRedis`], [`OwnAlertmanager`], [`OpenBao`] |
//! | `webhook_receiver`, `otlp`, `git_server` | stand-ins that record what dayshift sends: [`WebhookReceiver`], [`OtlpReceiver`], [`GitServer`] |
//! | `forge` | what a git forge does: signs webhook deliveries ([`hmac_sha256_hex`]), serves pull requests ([`ForgeServer`]: GitHub, Gitea, GitLab) |
//!
//! Tests import everything from the crate root (`use dayshift_tests::{TestEnv, ...}`).

mod alertmanager;
mod binary;
pub mod browser;
mod db;
mod env;
mod forge;
mod git_server;
pub mod kube_api;
mod openbao;
mod otlp;
mod prometheus;
mod redis;
pub mod saga;
mod services;
mod webhook_receiver;

pub use alertmanager::OwnAlertmanager;
pub use binary::{BinEnv, Proc, dayshift_bin, open_policy_yaml, spawn_dayshift};
pub use db::TestDb;
pub use env::{RUN_LIMIT, TestEnv, TestEnvBuilder, active_runs, assert_succeeded, fast_worker, wait_for};
pub use forge::{ForgeKind, ForgeServer, Pull, hmac_sha256_hex};
pub use git_server::GitServer;
pub use openbao::OpenBao;
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use prometheus::OwnPrometheus;
pub use redis::OwnRedis;
pub use services::{database_url, free_port, redis_url, s3_test_config, unique};
pub use webhook_receiver::WebhookReceiver;
