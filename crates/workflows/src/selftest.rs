//! `selftest.chain`: a chain of real, journaled steps, for checking an installation, for tests
//! and for benchmarks; with `parallel`, the same steps as one fan-out ([`Ctx::all`]).
//!
//! With `side_effects` set to a table name, each step's work is to insert a row
//! `(run_id, step, attempt)` into that table of the dayshift database, in its own transaction,
//! before the step is journaled; counting the rows tells how often each step really ran.

use std::time::Duration;

use dayshift_engine::{Ctx, RetryPolicy, StepCtx, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The input of `selftest.chain`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainInput {
    /// How many steps, 1 to 1000.
    pub steps: StepCount,
    /// Each step sleeps this long (in the step, holding the worker) before it does its work.
    #[serde(default)]
    pub sleep_ms: u64,
    /// Each step fails its first K attempts with a retryable error.
    #[serde(default)]
    pub fail_first: u32,
    /// A table of the dayshift database to record each step attempt in; created if missing.
    #[serde(default)]
    pub side_effects: Option<TableName>,
    /// Run the steps as one fan-out, this many at once (1 to 1000), instead of one after another.
    #[serde(default)]
    pub parallel: Option<StepCount>,
}

/// A number of steps, 1 to 1000.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "u32", into = "u32")]
pub struct StepCount(u32);

impl TryFrom<u32> for StepCount {
    type Error = String;
    fn try_from(n: u32) -> Result<Self, Self::Error> {
        if (1..=1000).contains(&n) {
            Ok(Self(n))
        } else {
            Err(format!("steps must be 1 to 1000, not {n}"))
        }
    }
}

impl From<StepCount> for u32 {
    fn from(n: StepCount) -> u32 {
        n.0
    }
}

/// A plain SQL identifier (letters, digits, `_`; not starting with a digit; at most 63
/// characters), since it is spliced into SQL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "String", into = "String")]
pub struct TableName(String);

impl TryFrom<String> for TableName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, Self::Error> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if ok {
            Ok(Self(name.to_ascii_lowercase()))
        } else {
            Err(format!(
                "side_effects must be a plain table name (letters, digits, _), not '{name}'"
            ))
        }
    }
}

impl From<TableName> for String {
    fn from(t: TableName) -> String {
        t.0
    }
}

/// What `selftest.chain` returns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChainOutput {
    /// How many steps ran.
    pub steps: u32,
    /// The attempt that succeeded, per step.
    pub attempts: Vec<u32>,
}

/// The `selftest.chain` workflow.
pub fn chain(pool: PgPool) -> WorkflowDef {
    WorkflowDef::new(
        "selftest.chain",
        "A chain of N journaled steps (optionally slow, failing, or recording side effects); checks an installation.",
        move |ctx: Ctx, input: ChainInput| {
            let pool = pool.clone();
            async move { run_chain(ctx, pool, input).await }
        },
    )
}

async fn run_chain(ctx: Ctx, pool: PgPool, input: ChainInput) -> Result<ChainOutput, WorkflowError> {
    let steps = u32::from(input.steps);
    let table = input.side_effects.as_ref().map(|t| t.0.clone());
    let retry = RetryPolicy {
        max_attempts: input.fail_first + 3,
        initial_delay: Duration::from_millis(100),
        multiplier: 2.0,
        max_delay: Duration::from_secs(5),
        jitter: 0.2,
    };
    let mut attempts = Vec::with_capacity(steps as usize);
    if let Some(limit) = input.parallel {
        let (pool, table, input_ref) = (&pool, table.as_deref(), &input);
        let fan_out = (1..=steps)
            .map(|i| {
                ctx.step(format!("step-{i}"), move |s: StepCtx| async move {
                    one_step(s, pool, table, input_ref).await
                })
                .retry(retry.clone())
            })
            .collect();
        for attempt in ctx.all(fan_out, u32::from(limit) as usize).await {
            attempts.push(attempt?);
        }
        return Ok(ChainOutput { steps, attempts });
    }
    for i in 1..=steps {
        let name = format!("step-{i}");
        let (pool, table, input_ref) = (&pool, table.as_deref(), &input);
        let attempt = ctx
            .step(
                name,
                |s: StepCtx| async move { one_step(s, pool, table, input_ref).await },
            )
            .retry(retry.clone())
            .await?;
        attempts.push(attempt);
    }
    Ok(ChainOutput { steps, attempts })
}

/// One step: sleep, maybe fail, maybe record the attempt.
///
/// Idempotent in the sense the test needs: running it again records another row, which is
/// exactly what the side-effect table is there to count.
async fn one_step(s: StepCtx, pool: &PgPool, table: Option<&str>, input: &ChainInput) -> Result<u32, StepError> {
    if input.sleep_ms > 0 {
        tokio::time::sleep(Duration::from_millis(input.sleep_ms)).await;
    }
    if let Some(table) = table {
        let mut tx = pool.begin().await.map_err(StepError::transient)?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "create table if not exists {table} (run_id text not null, step text not null, attempt int not null, \
             at timestamptz not null default clock_timestamp())"
        )))
        .execute(&mut *tx)
        .await
        .map_err(StepError::transient)?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "insert into {table} (run_id, step, attempt) values ($1, $2, $3)"
        )))
        .bind(s.run_id.to_string())
        .bind(&s.step)
        .bind(s.attempt as i32)
        .execute(&mut *tx)
        .await
        .map_err(StepError::transient)?;
        tx.commit().await.map_err(StepError::transient)?;
    }
    if s.attempt <= input.fail_first {
        return Err(StepError::Transient(format!(
            "{}: failing attempt {} of the first {} on purpose",
            s.step, s.attempt, input.fail_first
        )));
    }
    Ok(s.attempt)
}

/// The input of `selftest.gate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateInput {
    /// A durable sleep before the gate, in milliseconds.
    #[serde(default)]
    pub sleep_ms: u64,
    /// The signal that opens the gate. Default `approve`.
    #[serde(default = "approve")]
    pub signal: String,
    /// How long the gate waits for it. Default one hour.
    #[serde(default = "hour_ms")]
    pub timeout_ms: u64,
}

fn approve() -> String {
    "approve".into()
}
fn hour_ms() -> u64 {
    3_600_000
}

/// What `selftest.gate` returns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GateOutput {
    /// The payload the signal carried.
    pub approval: serde_json::Value,
    /// When the `prepare` step ran (unix ms), to show it ran once.
    pub prepared_at_ms: i64,
}

/// The `selftest.gate` workflow: a step, a durable sleep, a durable wait for a signal, a step.
/// Shows that timers and approvals hold no worker and survive restarts of every process.
pub fn gate() -> WorkflowDef {
    WorkflowDef::new(
        "selftest.gate",
        "A step, a durable sleep, a wait for a signal (an approval), then a step; checks durable waits.",
        |ctx: Ctx, input: GateInput| async move {
            let prepared_at_ms = ctx
                .step("prepare", |_s| async {
                    Ok::<_, StepError>(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis() as i64)
                            .unwrap_or_default(),
                    )
                })
                .await?;
            if input.sleep_ms > 0 {
                ctx.sleep("pause", Duration::from_millis(input.sleep_ms)).await?;
            }
            let Some(approval) = ctx
                .wait_signal(&input.signal, Duration::from_millis(input.timeout_ms))
                .await?
            else {
                return Err(WorkflowError::failed(format!(
                    "no '{}' signal within {} ms",
                    input.signal, input.timeout_ms
                )));
            };
            let approval = ctx
                .step("apply", move |_s| async move { Ok::<_, StepError>(approval) })
                .await?;
            Ok(GateOutput {
                approval,
                prepared_at_ms,
            })
        },
    )
}
