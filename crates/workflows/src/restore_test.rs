//! `backup.restore-test`: proves the latest backup restores. It restores it into a scratch
//! database created for the run, runs the checks the user configured against it, and drops it.
//! When anything fails, the run fails with the reason and a notice goes out.

use std::sync::Arc;
use std::time::Instant;

use dayshift_engine::{Ctx, RetryPolicy, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};

use crate::adapters::postgres::{PgAdmin, PgError};
use crate::adapters::step_err;
use crate::backup::{choose_backup, default_prefix, open, restore_into, verify_checksum};
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
    let (server, s3) = open(connections, &input.server, &input.store).await?;
    let manifest = choose_backup(ctx, &s3, None, Some(&input.database), &input.prefix).await?;
    verify_checksum(ctx, &s3, &manifest).await?;

    let scratch = format!("dayshift_restore_test_{}", ctx.run_id().0.simple());
    let scratch_db = server.on_database(&scratch).map_err(WorkflowError::failed)?;
    let (server, name) = (&server, scratch.as_str());
    ctx.step("create-scratch", |_s| async move {
        // A retry after a crash finds the database of the attempt before; start clean.
        server.recreate_database(name).await.map_err(step_err)
    })
    .retry(RetryPolicy::network())
    .undo({
        let (server, name) = (server.clone(), scratch.clone());
        move |_s, ()| async move { server.drop_database(&name).await.map_err(step_err) }
    })
    .await?;

    let (s3r, key, target) = (&s3, manifest.key.as_str(), &scratch_db);
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
            let tables = target.count_tables().await.map_err(step_err)?;
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
        server.drop_database(name).await.map_err(step_err)
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

/// Runs `check` against the restored database, read-only, and compares its number with the
/// bounds. A query that fails is reported by its SQLSTATE, not the server's message, which can
/// quote the data it choked on (a value that is not a number) to everyone who reads the run.
pub(crate) async fn run_check(pg: &PgAdmin, check: &Check) -> Result<f64, StepError> {
    let query = check.query.trim().trim_end_matches(';');
    let value = pg
        .read_only_number(query)
        .await
        .map_err(|e| match e {
            PgError::Query(why) => StepError::Permanent(format!("check '{}': the query failed: {why}", check.name)),
            other => step_err(other),
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
