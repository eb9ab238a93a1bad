//! `backup.restore-test`: proves the latest backup restores. It restores it into a scratch
//! database created for the run, runs the checks the user configured against it, and drops it.
//! When anything fails, the run fails with the reason and a notice goes out.

use std::sync::Arc;
use std::time::Instant;

use dayshift_engine::{Ctx, RetryPolicy, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};

use crate::adapters::step_err;
use crate::backup::{choose_backup, count_tables, default_prefix, open, restore_into, verify_checksum};
use crate::connections::Connections;

/// The input of `backup.restore-test`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreTestInput {
    /// An S3 connection name.
    pub store: String,
    /// The backed-up database (its connection name, as given to `backup.postgres`).
    pub database: String,
    /// Key prefix. Default `postgres`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// A PostgreSQL connection whose role may create databases; the scratch database is
    /// created on its server, and dropped at the end.
    pub server: String,
    /// Queries run against the restored database; each must return one number within bounds.
    #[serde(default)]
    pub checks: Vec<Check>,
    /// A notice webhook (connections.notify) told when the test fails.
    #[serde(default)]
    pub notify: Option<String>,
}

/// A check on the restored database.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// Shown in the run and the notice, e.g. `customers present`.
    pub name: String,
    /// A query returning one row with one number, e.g. `select count(*) from customers`.
    pub query: String,
    /// The number must be at least this.
    #[serde(default)]
    pub min: Option<f64>,
    /// The number must be at most this.
    #[serde(default)]
    pub max: Option<f64>,
}

/// What a passed check measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub value: f64,
}

/// What `backup.restore-test` proved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreTestReport {
    /// The backup restored.
    pub key: String,
    /// When that backup was taken.
    pub backup_finished_at: chrono::DateTime<chrono::Utc>,
    /// The scratch database (dropped).
    pub scratch_database: String,
    /// Tables in the restored database.
    pub tables: i64,
    /// How long the restore took.
    pub restore_seconds: f64,
    pub checks: Vec<CheckResult>,
}

/// The `backup.restore-test` workflow.
pub fn backup_restore_test(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "backup.restore-test",
        "Restores the latest backup into a scratch database, runs the configured checks, drops it; fails loudly and notifies when it does not restore.",
        move |ctx: Ctx, input: RestoreTestInput| {
            let connections = connections.clone();
            async move {
                let notifier = match &input.notify {
                    Some(name) => Some(connections.notifier(name).map_err(WorkflowError::failed)?),
                    None => None,
                };
                let outcome = restore_test(&ctx, &connections, &input).await;
                if let (Err(e), Some(notifier)) = (&outcome, notifier)
                    && *e != WorkflowError::Step(StepError::Cancelled)
                {
                    let text = format!(
                        ":rotating_light: **Restore test failed** for the backups of `{}` (store `{}`, run `{}`): the backup does not restore as it should.\n\n{e}",
                        input.database,
                        input.store,
                        ctx.run_id()
                    );
                    tracing::error!(run_id = %ctx.run_id(), database = %input.database, error = %e, "Restore test failed.");
                    let notifier = &notifier;
                    let sent = ctx
                        .step("notify", |_s| async move {
                            notifier.send(&text).await.map_err(step_err)
                        })
                        .retry(RetryPolicy::network())
                        .await;
                    if let Err(n) = sent {
                        return Err(WorkflowError::failed(format!("{e} (and the notice failed: {n})")));
                    }
                }
                outcome
            }
        },
    )
    .guard_exact("checks[].query")
    .freshness("database")
}

async fn restore_test(
    ctx: &Ctx,
    connections: &Connections,
    input: &RestoreTestInput,
) -> Result<RestoreTestReport, WorkflowError> {
    let (server_url, s3) = open(connections, &input.server, &input.store).await?;
    let manifest = choose_backup(ctx, &s3, None, Some(&input.database), &input.prefix).await?;
    verify_checksum(ctx, &s3, &manifest).await?;

    let scratch = format!("dayshift_restore_test_{}", ctx.run_id().0.simple());
    let scratch_url = with_database(&server_url, &scratch)?;
    let (server, name) = (server_url.as_str(), scratch.as_str());
    ctx.step("create-scratch", |_s| async move {
        // A retry after a crash finds the database of the attempt before; start clean.
        admin(server, &format!("drop database if exists \"{name}\" with (force)")).await?;
        admin(server, &format!("create database \"{name}\"")).await
    })
    .retry(RetryPolicy::network())
    .undo({
        let (server, name) = (server_url.clone(), scratch.clone());
        move |_s, ()| async move { admin(&server, &format!("drop database if exists \"{name}\" with (force)")).await }
    })
    .await?;

    let (s3r, key, target) = (&s3, manifest.key.as_str(), scratch_url.as_str());
    let restore_seconds: f64 = ctx
        .step("restore", |_s| async move {
            let started = Instant::now();
            restore_into(s3r, key, target, true).await?;
            Ok(started.elapsed().as_secs_f64())
        })
        .retry(RetryPolicy::network())
        .await?;

    let tables: i64 = ctx
        .step("check:tables", |_s| async move {
            let tables = count_tables(target).await?;
            if tables == 0 {
                return Err(StepError::Permanent(format!("the backup {key} restored no tables")));
            }
            Ok(tables)
        })
        .retry(RetryPolicy::network())
        .await?;

    let mut checks = Vec::with_capacity(input.checks.len());
    for check in &input.checks {
        let value: f64 = ctx
            .step(format!("check:{}", check.name), |_s| run_check(target, check))
            .retry(RetryPolicy::network())
            .await?;
        checks.push(CheckResult {
            name: check.name.clone(),
            value,
        });
    }

    ctx.step("drop-scratch", |_s| async move {
        admin(server, &format!("drop database if exists \"{name}\" with (force)")).await
    })
    .retry(RetryPolicy::network())
    .await?;

    Ok(RestoreTestReport {
        key: manifest.key.clone(),
        backup_finished_at: manifest.finished_at,
        scratch_database: scratch,
        tables,
        restore_seconds,
        checks,
    })
}

/// `url` with its database replaced by `database`.
fn with_database(url: &str, database: &str) -> Result<String, WorkflowError> {
    let mut parsed = url::Url::parse(url).map_err(|e| WorkflowError::failed(format!("the server's URL: {e}")))?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.into())
}

/// Runs one statement (CREATE/DROP DATABASE, which cannot run in a transaction) on the server.
async fn admin(url: &str, sql: &str) -> Result<(), StepError> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.map_err(pg_err)?;
    let done = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut conn)
        .await
        .map_err(pg_err);
    let _ = conn.close().await;
    done.map(|_| ())
}

/// Runs `check` against the restored database, read-only, and compares its number with the
/// bounds. A query that fails is reported by its SQLSTATE, not the server's message, which can
/// quote the data it choked on (a value that is not a number) to everyone who reads the run.
pub(crate) async fn run_check(url: &str, check: &Check) -> Result<f64, StepError> {
    use sqlx::Connection;
    let query = check.query.trim().trim_end_matches(';');
    let mut conn = sqlx::PgConnection::connect(url).await.map_err(pg_err)?;
    sqlx::query("set session characteristics as transaction read only")
        .execute(&mut conn)
        .await
        .map_err(pg_err)?;
    let value: Result<Option<f64>, _> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select (({query}))::double precision")))
            .fetch_one(&mut conn)
            .await;
    let _ = conn.close().await;
    let value = value
        .map_err(|e| {
            let why = match &e {
                sqlx::Error::Database(db) => format!(
                    "SQLSTATE {} (the server's message is not shown: it may quote data)",
                    db.code().as_deref().unwrap_or("unknown")
                ),
                other => other.to_string(),
            };
            StepError::Permanent(format!("check '{}': the query failed: {why}", check.name))
        })?
        .ok_or_else(|| StepError::Permanent(format!("check '{}': the query returned NULL", check.name)))?;
    if let Some(min) = check.min
        && value < min
    {
        return Err(StepError::Permanent(format!(
            "check '{}' failed: `{query}` returned {value}, expected at least {min}",
            check.name
        )));
    }
    if let Some(max) = check.max
        && value > max
    {
        return Err(StepError::Permanent(format!(
            "check '{}' failed: `{query}` returned {value}, expected at most {max}",
            check.name
        )));
    }
    Ok(value)
}

/// Connection trouble is retried; what the server refuses (authentication, permissions, SQL)
/// is not.
fn pg_err(e: sqlx::Error) -> StepError {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => StepError::transient(e),
        other => StepError::permanent(other),
    }
}
