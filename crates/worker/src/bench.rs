//! `dayshift bench`: throughput and latency of `selftest.chain` against the configured
//! PostgreSQL and Redis, with real `dayshift worker` processes.
//!
//! - W1: `--runs` runs of `--steps` steps submitted at once; runs/s and steps/s from the first
//!   submission to the last run finished.
//! - W2: `--latency-runs` runs one after another; end-to-end latency percentiles from the start
//!   request to the run being observed finished, and the pick-up latency (creation to claim).
//!
//! Also counted: PostgreSQL commits (`pg_stat_database.xact_commit`) and Redis commands
//! (`INFO stats`) per run, with the idle rate of each measured first, so polling is not
//! mistaken for work.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use dayshift_engine::{Engine, PgStore, QueueConfig, RedisQueue, RunId, StartRun};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::config::Config;

/// Benchmark settings.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// W1: runs submitted at once.
    #[arg(long, default_value_t = 2000)]
    runs: usize,
    /// W2: runs one after another.
    #[arg(long, default_value_t = 200)]
    latency_runs: usize,
    /// Steps per run.
    #[arg(long, default_value_t = 3)]
    steps: u32,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Runs each worker process advances at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Tasks submitting W1's runs concurrently.
    #[arg(long, default_value_t = 16)]
    submitters: usize,
}

struct Workers {
    children: Vec<Child>,
    _config: TempFile,
}

struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
    }
}

/// Runs the benchmark and prints a Markdown report.
pub(crate) async fn run(config: &Config, args: BenchArgs) -> Result<()> {
    let queue_name = format!("dayshift:bench:{:08x}", rand_u32());
    let store = PgStore::connect(config.database.url.expose(), (args.submitters as u32 + 4).max(8))
        .await
        .context("cannot connect to PostgreSQL")?;
    store.migrate().await?;
    let queue = RedisQueue::connect(
        config.redis.url.expose(),
        QueueConfig {
            name: queue_name.clone(),
            ..config.queue.clone()
        },
    )
    .await
    .context("cannot connect to Redis")?;
    let pool = store.pool().clone();
    let engine = Engine::builder(store, queue)
        .register_all(dayshift_workflows::all(pool.clone()))
        .build();

    let workers = start_workers(config, &queue_name, &args).await?;
    eprintln!(
        "bench: {} worker processes × concurrency {} on queue {queue_name}",
        args.workers, args.concurrency
    );

    // Warm-up: connections, prepared statements, the workers' first polls.
    let warm = submit(&engine, 50, args.steps, 8).await?;
    wait_all(&pool, &warm).await?;

    let redis_url = config.redis.url.expose().to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let idle_start = counters(&pool, &redis_url).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_end = counters(&pool, &redis_url).await?;
    let idle_secs = 3.0;
    let idle_commits = (idle_end.0 - idle_start.0) as f64 / idle_secs;
    let idle_redis = (idle_end.1 - idle_start.1) as f64 / idle_secs;

    // W1
    let statements = sqlx::query("create extension if not exists pg_stat_statements")
        .execute(&pool)
        .await
        .is_ok()
        && sqlx::query("select pg_stat_statements_reset()")
            .execute(&pool)
            .await
            .is_ok();
    let before = counters(&pool, &redis_url).await?;
    let t0 = Instant::now();
    let ids = submit(&engine, args.runs, args.steps, args.submitters).await?;
    let submitted = t0.elapsed();
    let polls = wait_all(&pool, &ids).await?;
    let w1 = t0.elapsed();
    let w1_secs = w1.as_secs_f64();
    // Backends report their statistics about once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = counters(&pool, &redis_url).await?;
    let settle = w1_secs + 1.5;
    let commits = (after.0 - before.0 - polls) as f64 - idle_commits * settle;
    let redis_cmds = (after.1 - before.1) as f64 - idle_redis * settle;
    let runs = args.runs as f64;
    let steps = runs * f64::from(args.steps);

    let hot = if statements {
        hot_statements(&pool).await.unwrap_or_default()
    } else {
        Vec::new()
    };

    // W2
    let mut latencies = Vec::with_capacity(args.latency_runs);
    let mut pickups = Vec::with_capacity(args.latency_runs);
    for _ in 0..args.latency_runs {
        let t = Instant::now();
        let started = engine
            .start(StartRun::new("selftest.chain", json!({ "steps": args.steps })))
            .await?;
        loop {
            let status: String = sqlx::query_scalar("select status from runs where id = $1")
                .bind(started.id.0)
                .fetch_one(&pool)
                .await?;
            if status == "succeeded" {
                break;
            }
            if status == "failed" || status == "cancelled" {
                bail!("run {} ended {status}", started.id);
            }
            tokio::time::sleep(Duration::from_micros(250)).await;
        }
        latencies.push(t.elapsed());
        let pickup: f64 = sqlx::query_scalar(
            "select extract(epoch from (started_at - created_at))::float8 * 1000 from runs where id = $1",
        )
        .bind(started.id.0)
        .fetch_one(&pool)
        .await?;
        pickups.push(pickup);
    }
    drop(workers);
    latencies.sort();
    pickups.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let ppct = |p: f64| pickups[((pickups.len() as f64 - 1.0) * p).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    println!("| measure | value |");
    println!("|---|---|");
    println!("| W1: runs × steps | {} × {} |", args.runs, args.steps);
    println!("| W1: submission time | {:.0} ms |", ms(submitted));
    println!("| W1: wall time | {:.2} s |", w1_secs);
    println!("| W1: runs/s | {:.0} |", runs / w1_secs);
    println!("| W1: steps/s | {:.0} |", steps / w1_secs);
    println!(
        "| W1: PostgreSQL commits per run (idle rate removed) | {:.1} ({:.2} per step) |",
        commits / runs,
        commits / steps
    );
    println!(
        "| W1: Redis commands per run (idle rate removed) | {:.1} |",
        redis_cmds / runs
    );
    println!("| idle: PostgreSQL commits/s, Redis commands/s | {idle_commits:.0}, {idle_redis:.0} |");
    println!("| W2: runs | {} |", args.latency_runs);
    println!(
        "| W2: end-to-end latency p50 / p95 / p99 | {:.1} / {:.1} / {:.1} ms |",
        ms(pct(0.50)),
        ms(pct(0.95)),
        ms(pct(0.99))
    );
    println!(
        "| W2: pick-up (created → claimed) p50 / p95 | {:.1} / {:.1} ms |",
        ppct(0.50),
        ppct(0.95)
    );
    if hot.is_empty() {
        println!("\n(pg_stat_statements is not loaded: no per-statement timings)");
    } else {
        println!("\nW1 statements by total time (pg_stat_statements; mean is server-side execution):\n");
        println!("| calls per run | mean ms | statement |");
        println!("|---|---|---|");
        for (calls, mean, query) in hot {
            println!("| {:.2} | {mean:.3} | `{query}` |", calls as f64 / runs);
        }
    }
    Ok(())
}

/// The statements W1 spent most server time on: (calls, mean ms, first words).
async fn hot_statements(pool: &sqlx::PgPool) -> Result<Vec<(i64, f64, String)>> {
    let rows: Vec<(i64, f64, String)> = sqlx::query_as(
        "select calls, mean_exec_time, regexp_replace(query, '\\s+', ' ', 'g') from pg_stat_statements \
         where dbid = (select oid from pg_database where datname = current_database()) \
         and query not like '%pg_stat_statements%' order by total_exec_time desc limit 10",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(c, m, q)| {
            let short: String = q.chars().take(90).collect();
            (c, m, short.replace('|', "\\|"))
        })
        .collect())
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32
}

async fn start_workers(config: &Config, queue_name: &str, args: &BenchArgs) -> Result<Workers> {
    let path = std::env::temp_dir().join(format!("dayshift-bench-{}.yaml", rand_u32()));
    let yaml = format!(
        "database:\n  url: {}\n  max-connections: {}\nredis:\n  url: {}\nqueue:\n  name: {queue_name}\n\
         worker:\n  concurrency: {}\nlog:\n  level: warn\n",
        config.database.url.expose(),
        args.concurrency + 4,
        config.redis.url.expose(),
        args.concurrency,
    );
    write_private(&path, &yaml)?;
    let config_file = TempFile(path.clone());
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for _ in 0..args.workers {
        let mut child = Command::new(&exe)
            .arg("--config")
            .arg(&path)
            .arg("worker")
            .env_remove("DAYSHIFT_DATABASE_URL")
            .env_remove("DAYSHIFT_REDIS_URL")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a worker process")?;
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("worker did not start within 30 s")??;
        if !line.unwrap_or_default().contains("started") {
            bail!("worker did not start");
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        children.push(child);
    }
    Ok(Workers {
        children,
        _config: config_file,
    })
}

fn write_private(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

async fn submit(engine: &Engine, n: usize, steps: u32, submitters: usize) -> Result<Vec<RunId>> {
    let per = n.div_ceil(submitters.max(1));
    let mut tasks = Vec::new();
    for chunk in 0..submitters.max(1) {
        let engine = engine.clone();
        let count = per.min(n.saturating_sub(chunk * per));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                let s = engine
                    .start(StartRun::new("selftest.chain", json!({ "steps": steps })))
                    .await?;
                ids.push(s.id);
            }
            Ok::<_, anyhow::Error>(ids)
        }));
    }
    let mut ids = Vec::with_capacity(n);
    for t in tasks {
        ids.extend(t.await??);
    }
    Ok(ids)
}

/// Waits until every run succeeded. Returns how many polling queries (each a commit) it made.
async fn wait_all(pool: &sqlx::PgPool, ids: &[RunId]) -> Result<i64> {
    let uuids: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut polls = 0;
    loop {
        polls += 1;
        let (done, failed): (i64, i64) = sqlx::query_as(
            "select count(*) filter (where status = 'succeeded'), \
             count(*) filter (where status in ('failed', 'cancelled')) from runs where id = any($1)",
        )
        .bind(&uuids)
        .fetch_one(pool)
        .await?;
        if failed > 0 {
            bail!("{failed} runs failed");
        }
        if done as usize == ids.len() {
            return Ok(polls);
        }
        if Instant::now() > deadline {
            bail!("only {done} of {} runs finished within 10 minutes", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// (PostgreSQL commits in this database, Redis commands processed).
async fn counters(pool: &sqlx::PgPool, redis_url: &str) -> Result<(i64, i64)> {
    let commits: i64 =
        sqlx::query_scalar("select xact_commit from pg_stat_database where datname = current_database()")
            .fetch_one(pool)
            .await?;
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("stats").query_async(&mut conn).await?;
    let cmds = info
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok((commits, cmds))
}
