//! `dayshift bench`: throughput and latency of `selftest.chain` against the configured
//! PostgreSQL and Redis, with real `dayshift worker` processes, started either in-process
//! (`Engine::start`, the default) or as a client sees it (`--api`: `POST /api/v1/runs` to a
//! `dayshift serve` of the bench's own, with an operator token).
//!
//! - W1: `--runs` runs of `--steps` steps submitted at once; runs/s and steps/s from the first
//!   submission to the last run finished (read from PostgreSQL in both modes).
//! - W2: `--latency-runs` runs one after another; end-to-end latency percentiles from the start
//!   request to the run being observed finished, and the pick-up latency (creation to claim).
//!
//! Also counted over W1: PostgreSQL commits (`pg_stat_database.xact_commit`) and tuple writes
//! (inserts, updates, deletes; database-wide and per table), Redis commands (`INFO stats`) per
//! run, with the idle rate of each measured first, so polling is not mistaken for work; the CPU
//! seconds of every process involved (`serve`, each worker, the bench itself, PostgreSQL's,
//! Redis) and the peak RSS of dayshift's processes ([`probe`], [`procs`]).

mod api;
mod probe;
mod procs;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use dayshift_engine::{Engine, PgStore, QueueConfig, RedisQueue, RunId, StartRun};
use serde_json::json;
use sqlx::{Connection as _, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::config::Config;
use probe::{COMMITS, CpuUse, DELETED, HOT_UPDATED, INSERTED, Probe, REDIS_COMMANDS, UPDATED};

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
    /// Tasks submitting W1's runs concurrently (in-process mode).
    #[arg(long, default_value_t = 16)]
    submitters: usize,
    /// Starts runs through the API, as a client does: a `dayshift serve` of the bench's own on
    /// 127.0.0.1, `POST /api/v1/runs` with an operator token (created for the bench, deleted
    /// after), W2 reading each run with `GET /api/v1/runs/{id}?wait=` (or polling: --w2-poll).
    #[arg(long)]
    api: bool,
    /// With --api: W2 polls `GET /api/v1/runs/{id}` instead of waiting on it (how clients
    /// learned of a run's end before the wait call).
    #[arg(long)]
    w2_poll: bool,
    /// W3: steps of the one run whose steps all run at once (0: no W3).
    #[arg(long, default_value_t = 500)]
    fan_out: u32,
    /// W3: how many times it is measured.
    #[arg(long, default_value_t = 3)]
    fan_out_runs: usize,
    /// With --api: W1's HTTP/1.1 keep-alive connections, each starting runs one after another.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// With --api --w2-poll: W2's pause between two reads of a run, in microseconds; 0 reads
    /// back to back.
    #[arg(long, default_value_t = 0)]
    poll_interval_us: u64,
    /// W1 and W2 run a workflow file of `--steps` `log` steps (`bench.chain`, written for the
    /// bench) instead of `selftest.chain`: what interpreting a definition costs. No W3.
    #[arg(long)]
    declarative: bool,
}

/// What each run of W1 and W2 is: a workflow and its input.
struct Subject {
    workflow: &'static str,
    input: serde_json::Value,
}

impl Subject {
    fn of(args: &BenchArgs) -> Self {
        if args.declarative {
            Self {
                workflow: "bench.chain",
                input: json!({}),
            }
        } else {
            Self {
                workflow: "selftest.chain",
                input: json!({ "steps": args.steps }),
            }
        }
    }

    /// The API's start body.
    fn body(&self) -> serde_json::Value {
        json!({ "workflow": self.workflow, "input": self.input })
    }
}

/// The bench's workflow file for `--declarative`: `steps` steps of the `log` action, each a
/// journaled step doing nothing, as `selftest.chain`'s do.
fn bench_workflow_dir(steps: u32) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("dayshift-bench-workflows-{}", rand_u32()));
    std::fs::create_dir_all(&dir)?;
    let mut text = String::from(
        "name: bench.chain\ndescription: A chain of no-op steps, for `dayshift bench --declarative`.\nsteps:\n",
    );
    for i in 1..=steps {
        text.push_str(&format!(
            "  - {{ id: step{i}, action: log, with: {{ message: step {i} }} }}\n"
        ));
    }
    std::fs::write(dir.join("bench.yaml"), text)?;
    Ok(dir)
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

/// Where the bench's runs are started.
enum Front {
    /// `Engine::start` in the bench process.
    Engine(Engine),
    /// `POST /api/v1/runs` to the bench's `serve`.
    Api { client: api::Client, finish: api::Finish },
}

/// How long after a workload its statistics are all in `pg_stat_database`: a backend flushes
/// them at most once a second, and one that has gone idle with some pending flushes them only
/// when its idle timeout fires (PostgreSQL's `PGSTAT_IDLE_INTERVAL`, 10 s).
const STATS_SETTLE: Duration = Duration::from_secs(11);

/// How long the idle rates are measured.
const IDLE_WINDOW: Duration = Duration::from_secs(5);

impl Front {
    /// Opens the API's connections again should they have been closed while idle.
    async fn touch(&self) -> Result<()> {
        match self {
            Self::Engine(_) => Ok(()),
            Self::Api { client, .. } => client.touch().await,
        }
    }

    /// Starts `n` runs at once: `submitters` tasks in-process, every connection through the API.
    async fn submit(&self, n: usize, subject: &Subject, submitters: usize) -> Result<Vec<RunId>> {
        match self {
            Self::Engine(engine) => submit(engine, n, subject, submitters).await,
            Self::Api { client, .. } => client.submit(n).await,
        }
    }

    /// W2: starts one run and returns once it is seen succeeded.
    async fn one(&self, poller: &mut PgConnection, subject: &Subject) -> Result<RunId> {
        self.one_with(poller, None, subject.workflow, subject.input.clone())
            .await
    }

    /// Starts one run of `workflow` with `input` and returns once it is seen succeeded.
    /// `body` is the API's start body, if it is not the client's usual one.
    async fn one_with(
        &self,
        poller: &mut PgConnection,
        body: Option<&str>,
        workflow: &str,
        input: serde_json::Value,
    ) -> Result<RunId> {
        match self {
            Self::Engine(engine) => {
                let started = engine.start(StartRun::new(workflow, input)).await?;
                loop {
                    let status: String = sqlx::query_scalar("/* bench */ select status from runs where id = $1")
                        .bind(started.id.0)
                        .fetch_one(&mut *poller)
                        .await?;
                    if status == "succeeded" {
                        return Ok(started.id);
                    }
                    if status == "failed" || status == "cancelled" {
                        bail!("run {} ended {status}", started.id);
                    }
                    tokio::time::sleep(Duration::from_micros(250)).await;
                }
            }
            Self::Api { client, finish } => {
                client
                    .one()
                    .start_until_finished(body.unwrap_or(client.body()), *finish)
                    .await
            }
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
    let pool = store.pool().clone();
    let workflows = if args.declarative {
        Some(bench_workflow_dir(args.steps)?)
    } else {
        None
    };
    let workers = start_workers(config, &queue_name, &args, workflows.as_deref()).await?;
    eprintln!(
        "bench: {} worker processes × concurrency {} on queue {queue_name}",
        args.workers, args.concurrency
    );
    if !args.api {
        let queue = RedisQueue::connect(
            config.redis.url.expose(),
            QueueConfig {
                name: queue_name.clone(),
                ..config.queue.clone()
            },
        )
        .await
        .context("cannot connect to Redis")?;
        let mut catalogs = dayshift_workflows::Catalogs::default();
        if let Some(dir) = &workflows {
            catalogs.workflows = dayshift_workflows::declarative::load(
                std::slice::from_ref(dir),
                dir,
                &Default::default(),
                &dayshift_workflows::BUILT_IN,
            )
            .map_err(|problems| anyhow::anyhow!(problems.join("\n")))?;
            dayshift_workflows::declarative::keep_versions(&pool, &catalogs.workflows).await?;
        }
        let engine = Engine::builder(store, queue)
            .register_all(dayshift_workflows::all_with(pool.clone(), Default::default(), catalogs))
            .build();
        return measure(config, &args, &pool, Front::Engine(engine), workers, None).await;
    }

    let serve = api::start_serve(&serve_yaml(config, &queue_name, workflows.as_deref())).await?;
    eprintln!(
        "bench: serve at {} (database.max-connections {}), {} connections",
        serve.base, config.database.max_connections, args.connections
    );
    // The bench's own operator token, as `dayshift tokens create` makes one; it expires by
    // itself should the bench not get to delete it.
    let token_name = format!("bench-{}", queue_name.rsplit(':').next().unwrap_or("x"));
    let token = dayshift_engine::api::auth::create_token(
        &pool,
        &token_name,
        dayshift_engine::api::auth::Role::Operator,
        Some(chrono::Utc::now() + chrono::Duration::hours(1)),
        &crate::local_actor(),
    )
    .await?;
    let measured = async {
        let client = api::Client::connect(&serve.base, &token, args.connections, Subject::of(&args).body()).await?;
        let finish = if args.w2_poll {
            api::Finish::Poll {
                interval: Duration::from_micros(args.poll_interval_us),
            }
        } else {
            api::Finish::Wait
        };
        measure(
            config,
            &args,
            &pool,
            Front::Api { client, finish },
            workers,
            Some(serve),
        )
        .await
    }
    .await;
    // Revoked as the CLI does (the audit trail says so), then deleted, so that benches do not
    // fill the token list; a failed measurement is still the error reported.
    let cleanup = async {
        dayshift_engine::api::auth::revoke_token(&pool, &token_name, &crate::local_actor())
            .await
            .context("cannot revoke the bench's token")?;
        sqlx::query("delete from api_tokens where name = $1 and revoked_at is not null")
            .bind(&token_name)
            .execute(&pool)
            .await
            .context("cannot delete the bench's token")?;
        anyhow::Ok(())
    }
    .await;
    measured?;
    cleanup
}

/// The config of the bench's `serve`: the same database and Redis, the bench's queue, and the
/// pool size of the config (what a deployed `serve` has).
fn serve_yaml(config: &Config, queue_name: &str, workflows: Option<&std::path::Path>) -> String {
    format!(
        "database:\n  url: {}\n  max-connections: {}\nredis:\n  url: {}\nqueue:\n  name: {queue_name}\nlog:\n  level: warn\n{}",
        config.database.url.expose(),
        config.database.max_connections,
        config.redis.url.expose(),
        workflows_yaml(workflows),
    )
}

/// The `workflows:` of the bench's processes, for `--declarative`.
fn workflows_yaml(workflows: Option<&std::path::Path>) -> String {
    workflows
        .map(|d| format!("workflows:\n  dirs: [{}]\n", d.display()))
        .unwrap_or_default()
}

/// What W1 measured, and the idle rates its counters were corrected by.
struct W1 {
    runs: f64,
    steps: f64,
    submitted: Duration,
    wall: Duration,
    /// Counter growth over W1, less the idle rate and the bench's polling.
    grew: BTreeMap<String, f64>,
    idle: BTreeMap<String, f64>,
    cpu: CpuUse,
    idle_cpu: CpuUse,
}

async fn measure(
    config: &Config,
    args: &BenchArgs,
    pool: &sqlx::PgPool,
    front: Front,
    workers: Workers,
    serve: Option<api::Serve>,
) -> Result<()> {
    // The bench polls on a connection of its own, so that its backend's CPU is counted apart.
    let mut poller = PgConnection::connect(config.database.url.expose())
        .await
        .context("cannot connect to PostgreSQL")?;
    let poller_pid: i32 = sqlx::query_scalar("/* bench */ select pg_backend_pid()")
        .fetch_one(&mut poller)
        .await?;
    let probe = Probe::new(pool, config.redis.url.expose(), u32::try_from(poller_pid).ok()).await?;
    let mut named: Vec<(String, u32)> = Vec::new();
    if let Some(pid) = serve.as_ref().and_then(|s| s.child.id()) {
        named.push(("serve".into(), pid));
    }
    for (i, w) in workers.children.iter().enumerate() {
        if let Some(pid) = w.id() {
            named.push((format!("worker {}", i + 1), pid));
        }
    }

    // Warm-up: connections, prepared statements, the workers' first polls.
    let subject = Subject::of(args);
    let warm = front.submit(50, &subject, 8).await?;
    wait_all(&mut poller, &warm).await?;

    tokio::time::sleep(STATS_SETTLE).await;
    let idle_start = probe.counters().await?;
    let idle_at = Instant::now();
    let idle_cpu_start = probe.cpu(&named).await?;
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_cpu_end = probe.cpu(&named).await?;
    let idle_end = probe.counters().await?;
    let idle_secs = idle_at.elapsed().as_secs_f64();
    let idle_cpu = probe.used(&idle_cpu_start, &idle_cpu_end);
    let idle: BTreeMap<String, f64> = idle_end
        .since(&idle_start, &BTreeMap::new(), 0.0)
        .into_iter()
        .map(|(k, v)| (k, v / idle_secs))
        .collect();

    // W1
    let statements = sqlx::query("create extension if not exists pg_stat_statements")
        .execute(pool)
        .await
        .is_ok()
        && sqlx::query("select pg_stat_statements_reset()")
            .execute(pool)
            .await
            .is_ok();
    front.touch().await?;
    let before = probe.counters().await?;
    let window = Instant::now();
    let cpu_start = probe.cpu(&named).await?;
    let t0 = Instant::now();
    let ids = front.submit(args.runs, &subject, args.submitters).await?;
    let submitted = t0.elapsed();
    let polls = wait_all(&mut poller, &ids).await?;
    let wall = t0.elapsed();
    let cpu_end = probe.cpu(&named).await?;
    tokio::time::sleep(STATS_SETTLE).await;
    let after = probe.counters().await?;
    let mut grew = after.since(&before, &idle, window.elapsed().as_secs_f64());
    *grew.entry(COMMITS.into()).or_default() -= polls as f64;
    let w1 = W1 {
        runs: args.runs as f64,
        steps: args.runs as f64 * f64::from(args.steps),
        submitted,
        wall,
        grew,
        idle,
        cpu: probe.used(&cpu_start, &cpu_end),
        idle_cpu,
    };
    let hot = if statements {
        hot_statements(pool).await.unwrap_or_default()
    } else {
        Vec::new()
    };

    // W2
    let mut latencies = Vec::with_capacity(args.latency_runs);
    let mut pickups = Vec::with_capacity(args.latency_runs);
    for _ in 0..args.latency_runs {
        let t = Instant::now();
        let id = front.one(&mut poller, &subject).await?;
        latencies.push(t.elapsed());
        let pickup: f64 = sqlx::query_scalar(
            "/* bench */ select extract(epoch from (started_at - created_at))::float8 * 1000 from runs where id = $1",
        )
        .bind(id.0)
        .fetch_one(&mut poller)
        .await?;
        pickups.push(pickup);
    }
    // W3: one run whose steps all run at once (`ctx.all`), a few times.
    let mut fan_outs = Vec::new();
    if args.fan_out > 0 && !args.declarative {
        let input = json!({ "steps": args.fan_out, "parallel": args.fan_out });
        let body = json!({ "workflow": "selftest.chain", "input": input }).to_string();
        for _ in 0..args.fan_out_runs {
            let t = Instant::now();
            front
                .one_with(&mut poller, Some(&body), "selftest.chain", input.clone())
                .await?;
            fan_outs.push(t.elapsed());
        }
    }
    let rss: Vec<(String, Option<f64>)> = named
        .iter()
        .map(|(l, pid)| (l.clone(), procs::peak_rss_mib(*pid)))
        .chain([("bench (client)".to_string(), procs::peak_rss_mib(std::process::id()))])
        .collect();
    drop(workers);
    drop(serve);
    latencies.sort();
    pickups.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let ppct = |p: f64| pickups[((pickups.len() as f64 - 1.0) * p).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    let mode = if args.api {
        format!(
            "through the API: `serve` (database.max-connections {}), {} HTTP/1.1 connections; W2 {}",
            config.database.max_connections,
            args.connections,
            if !args.w2_poll {
                "waits with `POST /api/v1/runs?wait=30s` (the start's answer comes at the run's end)".to_string()
            } else if args.poll_interval_us == 0 {
                "polls `GET /api/v1/runs/{id}` back to back".to_string()
            } else {
                format!("polls `GET /api/v1/runs/{{id}}` every {} µs", args.poll_interval_us)
            }
        )
    } else {
        format!("in-process: `Engine::start` by {} tasks", args.submitters)
    };
    println!("| measure | value |");
    println!("|---|---|");
    println!("| mode | {mode} |");
    println!("| W1: runs × steps | {} × {} |", args.runs, args.steps);
    println!("| W1: submission time | {:.0} ms |", ms(w1.submitted));
    println!("| W1: wall time | {:.2} s |", w1.wall.as_secs_f64());
    println!("| W1: runs/s | {:.0} |", w1.runs / w1.wall.as_secs_f64());
    println!("| W1: steps/s | {:.0} |", w1.steps / w1.wall.as_secs_f64());
    w1.print_counters();
    w1.print_cpu(probe.pg_is_local());
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
    if !fan_outs.is_empty() {
        let mut sorted = fan_outs.clone();
        sorted.sort();
        println!(
            "| W3: one run of {n} steps all at once (`parallel: {n}`), start to seen succeeded: runs, median | {}; **{:.3} s** |",
            fan_outs
                .iter()
                .map(|d| format!("{:.3}", d.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(", "),
            sorted[sorted.len() / 2].as_secs_f64(),
            n = args.fan_out
        );
    }
    let mib = |m: Option<f64>| m.map_or("–".into(), |m| format!("{m:.1}"));
    println!(
        "| peak RSS (VmHWM) MiB: {} | {} |",
        rss.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>().join(", "),
        rss.iter().map(|(_, m)| mib(*m)).collect::<Vec<_>>().join(", ")
    );
    let dayshift_rss: f64 = rss
        .iter()
        .filter(|(l, _)| !l.starts_with("bench"))
        .filter_map(|(_, m)| *m)
        .sum();
    println!(
        "| peak RSS of dayshift's processes ({}), summed | {dayshift_rss:.1} MiB |",
        dayshift_label(&w1.cpu.named)
    );
    w1.print_tables();
    if hot.is_empty() {
        println!("\n(pg_stat_statements is not loaded: no per-statement timings)");
    } else {
        println!("\nW1 statements by total time (pg_stat_statements; mean is server-side execution):\n");
        println!("| calls per run | mean ms | ms per run | statement |");
        println!("|---|---|---|---|");
        let (mut calls_per_run, mut ms_per_run) = (0.0, 0.0);
        for (calls, mean, query) in hot {
            let per_run = calls as f64 / w1.runs;
            calls_per_run += per_run;
            ms_per_run += per_run * mean;
            // Rarer ones (the sweeper's, say) are in the sums only.
            if per_run >= 0.01 {
                println!("| {per_run:.2} | {mean:.3} | {:.3} | `{query}` |", per_run * mean);
            }
        }
        println!("| {calls_per_run:.2} | | {ms_per_run:.3} | all of the above and the rarer ones |");
    }
    Ok(())
}

impl W1 {
    fn per_run(&self, key: &str) -> f64 {
        self.grew.get(key).copied().unwrap_or(0.0) / self.runs
    }

    fn print_counters(&self) {
        println!(
            "| W1: PostgreSQL commits per run (idle rate removed) | {:.1} ({:.2} per step) |",
            self.per_run(COMMITS),
            self.per_run(COMMITS) * self.runs / self.steps
        );
        let writes = self.per_run(INSERTED) + self.per_run(UPDATED) + self.per_run(DELETED);
        println!(
            "| W1: tuple writes per run: inserts / updates (of them HOT) / deletes (idle rate removed) | \
             {writes:.1}: {:.1} / {:.1} ({:.1}) / {:.1} |",
            self.per_run(INSERTED),
            self.per_run(UPDATED),
            self.per_run(HOT_UPDATED),
            self.per_run(DELETED)
        );
        println!(
            "| W1: Redis commands per run (idle rate removed) | {:.1} |",
            self.per_run(REDIS_COMMANDS)
        );
        let rate = |k: &str| self.idle.get(k).copied().unwrap_or(0.0);
        println!(
            "| idle: PostgreSQL commits/s, tuple writes/s, Redis commands/s | {:.0}, {:.0}, {:.0} |",
            rate(COMMITS),
            rate(INSERTED) + rate(UPDATED) + rate(DELETED),
            rate(REDIS_COMMANDS)
        );
    }

    fn print_cpu(&self, pg_is_local: bool) {
        let k = 1000.0 / self.runs;
        let c = &self.cpu;
        println!(
            "| W1: CPU s per 1,000 runs, everything (dayshift, client, PostgreSQL, Redis) | {:.2} |",
            c.everything() * k
        );
        println!(
            "| W1: CPU s per 1,000 runs, dayshift's processes ({}) | {:.2} |",
            dayshift_label(&c.named),
            c.dayshift() * k
        );
        for (label, s) in &c.named {
            println!("| W1: CPU s per 1,000 runs, {label} | {:.2} |", s * k);
        }
        println!(
            "| W1: CPU s per 1,000 runs, bench process (the client) | {:.2} |",
            c.client * k
        );
        match c.pg {
            Some(pg) => {
                println!(
                    "| W1: CPU s per 1,000 runs, PostgreSQL: this database's backends + server processes | \
                     {:.2} ({:.2} + {:.2}) |",
                    pg.workload() * k,
                    pg.ours * k,
                    pg.server * k
                );
                println!(
                    "| W1: CPU s per 1,000 runs, PostgreSQL: the bench's polling backend | {:.2} |",
                    pg.bench * k
                );
                println!(
                    "| W1: not counted: PostgreSQL backends of other databases, processes exited during W1 | \
                     {:.2}, {:.2} s per 1,000 runs |",
                    pg.other * k,
                    pg.exited * k
                );
            }
            None if !pg_is_local => println!("| W1: CPU of PostgreSQL | not on this machine: not measured |"),
            None => {}
        }
        println!("| W1: CPU s per 1,000 runs, Redis (INFO cpu) | {:.2} |", c.redis * k);
        if let Some((busy, all)) = c.machine {
            println!(
                "| W1: the machine: busy CPU s of all its cores, and busy with anything else | {:.1} of {:.1}, {:.1} |",
                busy,
                all,
                (busy - c.everything()).max(0.0)
            );
        }
        let i = &self.idle_cpu;
        println!(
            "| idle: CPU s/s of dayshift's processes, PostgreSQL (ours + server), Redis, the machine | \
             {:.3}, {}, {:.3}, {} |",
            i.dayshift() / i.secs,
            i.pg.map_or("–".into(), |p| format!("{:.3}", p.workload() / i.secs)),
            i.redis / i.secs,
            i.machine
                .map_or("–".into(), |(busy, _)| format!("{:.3}", busy / i.secs)),
        );
    }

    /// Tuple writes per run by table, the tables written to.
    fn print_tables(&self) {
        let mut tables: BTreeMap<&str, [f64; 3]> = BTreeMap::new();
        for (key, v) in &self.grew {
            let Some((table, what)) = key.rsplit_once('.') else {
                continue;
            };
            let i = match what {
                "ins" => 0,
                "upd" => 1,
                "del" => 2,
                _ => continue,
            };
            tables.entry(table).or_default()[i] = v / self.runs;
        }
        tables.retain(|_, w| w.iter().any(|v| v.abs() >= 0.005));
        if tables.is_empty() {
            return;
        }
        println!("\nW1 tuple writes per run by table (pg_stat_user_tables, idle rate removed):\n");
        println!("| table | inserts | updates | deletes |");
        println!("|---|---|---|---|");
        for (t, [i, u, d]) in tables {
            println!("| {t} | {i:.2} | {u:.2} | {d:.2} |");
        }
    }
}

/// "serve + 2 workers", or "2 workers": which of dayshift's processes a figure sums.
fn dayshift_label<T>(named: &[(String, T)]) -> String {
    let workers = named.iter().filter(|(l, _)| l.starts_with("worker")).count();
    let serve = named.iter().any(|(l, _)| l == "serve");
    format!("{}{workers} workers", if serve { "serve + " } else { "" })
}

/// The 30 statements W1 spent most server time on: (calls, mean ms, first words). The bench's
/// own (marked `/* bench */`) are left out.
async fn hot_statements(pool: &sqlx::PgPool) -> Result<Vec<(i64, f64, String)>> {
    let rows: Vec<(i64, f64, String)> = sqlx::query_as(
        "select calls, mean_exec_time, regexp_replace(query, '\\s+', ' ', 'g') from pg_stat_statements \
         where dbid = (select oid from pg_database where datname = current_database()) \
         and query not like '%pg_stat_statements%' and query not like '/* bench */%' \
         order by total_exec_time desc limit 30",
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

async fn start_workers(
    config: &Config,
    queue_name: &str,
    args: &BenchArgs,
    workflows: Option<&std::path::Path>,
) -> Result<Workers> {
    let path = std::env::temp_dir().join(format!("dayshift-bench-{}.yaml", rand_u32()));
    let yaml = format!(
        "database:\n  url: {}\n  max-connections: {}\nredis:\n  url: {}\nqueue:\n  name: {queue_name}\n\
         worker:\n  concurrency: {}\nlog:\n  level: warn\n{}",
        config.database.url.expose(),
        args.concurrency + 4,
        config.redis.url.expose(),
        args.concurrency,
        workflows_yaml(workflows),
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

async fn submit(engine: &Engine, n: usize, subject: &Subject, submitters: usize) -> Result<Vec<RunId>> {
    let per = n.div_ceil(submitters.max(1));
    let mut tasks = Vec::new();
    for chunk in 0..submitters.max(1) {
        let (engine, workflow, input) = (engine.clone(), subject.workflow, subject.input.clone());
        let count = per.min(n.saturating_sub(chunk * per));
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(count);
            for _ in 0..count {
                let s = engine.start(StartRun::new(workflow, input.clone())).await?;
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

/// Waits until every run succeeded, asking only about those not yet seen succeeded (so the
/// polling costs less as runs finish). Returns how many polling queries (each a commit) it made.
async fn wait_all(poller: &mut PgConnection, ids: &[RunId]) -> Result<i64> {
    let mut left: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut polls = 0;
    loop {
        polls += 1;
        let rows: Vec<(uuid::Uuid, String)> =
            sqlx::query_as("/* bench */ select id, status from runs where id = any($1) and status <> 'succeeded'")
                .bind(&left)
                .fetch_all(&mut *poller)
                .await?;
        let failed = rows.iter().filter(|(_, s)| s == "failed" || s == "cancelled").count();
        if failed > 0 {
            bail!("{failed} runs failed");
        }
        left = rows.into_iter().map(|(id, _)| id).collect();
        if left.is_empty() {
            return Ok(polls);
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} runs finished within 10 minutes",
                ids.len() - left.len(),
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
