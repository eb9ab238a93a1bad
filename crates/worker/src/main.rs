//! `dayshift`: one binary, one process per role, all reading the same config.

mod bench;
mod client;
mod config;
mod telemetry;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use dayshift_engine::{Engine, PgStore, RedisQueue, Worker};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// dayshift: durable Day-2 workflows for Kubernetes platforms.
#[derive(Parser, Debug)]
#[command(name = "dayshift", version, about)]
struct Cli {
    /// The config file (YAML). Env: DAYSHIFT_CONFIG. Without one, defaults apply;
    /// DAYSHIFT_DATABASE_URL and DAYSHIFT_REDIS_URL override either.
    #[arg(long, global = true)]
    config: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Applies the database migrations.
    Migrate,
    /// Serves the HTTP API (and applies migrations first).
    Serve {
        /// Address to listen on; overrides server.listen.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Executes runs.
    Worker {
        /// Runs advanced at once; overrides worker.concurrency.
        #[arg(long)]
        concurrency: Option<usize>,
    },
    /// Starts a run through the API.
    Run {
        /// The workflow, e.g. selftest.chain.
        workflow: String,
        /// The input, as JSON.
        #[arg(long, default_value = "{}")]
        input: String,
        /// Waits until the run has finished, then shows it.
        #[arg(long)]
        wait: bool,
        /// A plan run: each step says what it would do, nothing is changed (workflow files).
        #[arg(long)]
        plan: bool,
        /// A second start with the same key returns the first run.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        api: client::ApiArgs,
    },
    /// Lists, shows, cancels and signals runs through the API.
    Runs {
        #[command(subcommand)]
        command: client::RunsCommand,
        #[command(flatten)]
        api: client::ApiArgs,
    },
    /// Lists Alertmanager remediations: alert, playbook, actions, outcome, time to resolve.
    Remediations {
        /// How many, newest first.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        api: client::ApiArgs,
    },
    /// Lists, shows, pauses, resumes and triggers cron schedules through the API.
    Schedules {
        #[command(subcommand)]
        command: Option<client::SchedulesCommand>,
        #[command(flatten)]
        api: client::ApiArgs,
    },
    /// Creates, lists and revokes API tokens (in the database: run it where the config is).
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Lists who did what to which run, schedule or token, newest first.
    Audit {
        /// Only entries about this run id, schedule or token name.
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Lists the registered workflows.
    Workflows {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Checks the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Measures throughput and latency against the configured PostgreSQL and Redis.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand, Debug)]
enum TokensCommand {
    /// Creates a token and prints it, once: it is stored only as a hash.
    Create {
        /// Who or what uses it (recorded as the actor of what it does), e.g. `alice` or `ci`.
        name: String,
        /// viewer (reads), operator (also starts, cancels, signals, approves) or admin (also
        /// tokens and schedules).
        #[arg(long)]
        role: dayshift_engine::api::auth::Role,
        /// When it stops working, e.g. `90d`; never by default.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
    },
    /// Lists tokens (never the tokens themselves).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revokes a token: it stops working at once.
    Revoke { name: String },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Loads the configuration (FILE, else --config, else DAYSHIFT_CONFIG) and checks it without
    /// starting anything; every error names the file, the line and the key.
    Check {
        /// The config file to check.
        file: Option<String>,
    },
    /// Prints the JSON Schema of the config file, for editors (also in docs/config.schema.json),
    /// or with --workflows that of a workflow file, every action's parameters included (also
    /// in docs/workflow.schema.json).
    Schema {
        #[arg(long)]
        workflows: bool,
    },
}

fn main() -> std::process::ExitCode {
    // Before any HTTP client is built (reqwest has rustls without a default provider).
    dayshift_workflows::adapters::http::install_crypto();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry::shutdown();
    code
}

fn env_map() -> HashMap<String, String> {
    std::env::vars().collect()
}

/// The engine with every built-in workflow, connected to PostgreSQL and Redis. `serve` is the
/// API's role: it holds no connection's credentials. `loaded` are the catalogs when the caller
/// has read them already (serve, after checking the config), so git is fetched once.
async fn connect(config: &Config, serve: bool, loaded: Option<Loaded>) -> Result<Engine> {
    let store = PgStore::connect(config.database.url.expose(), config.database.max_connections)
        .await
        .context("cannot connect to PostgreSQL (database.url)")?;
    let queue = RedisQueue::connect(config.redis.url.expose(), config.queue.clone())
        .await
        .context("cannot connect to Redis (redis.url)")?;
    if serve {
        // serve migrates at start-up, before anything reads the schema (the workflow files'
        // versions below).
        store.migrate().await.context("migration failed")?;
    }
    let pool = store.pool().clone();
    // serve checks inputs against the workflows but never runs a step: it holds no connection's
    // credentials (Vault tokens, database passwords, S3 keys), so a compromised API pod has none.
    // The catalogs hold no credentials; serve needs the workflow files to check inputs.
    let connections = if serve {
        Default::default()
    } else {
        config.connections()?
    };
    // Workflow files kept in git are loaded with those of workflows.dirs, then kept in sync.
    let (catalogs, from_git) = match loaded {
        Some(loaded) => loaded,
        None => catalogs(config).await?,
    };
    let sync_names = catalogs.connection_names.clone();
    let sync_connections = std::sync::Arc::new(connections.clone());
    // serve and every worker number the workflow files' texts in PostgreSQL the same way, so the
    // version a run records at its start is the one every worker replays it with.
    dayshift_workflows::declarative::keep_versions(&pool, &catalogs.workflows)
        .await
        .context("cannot keep the workflow files' versions in PostgreSQL (has `dayshift migrate` run?)")?;
    let mut builder =
        Engine::builder(store, queue).register_all(dayshift_workflows::all_with(pool.clone(), connections, catalogs));
    if let Ok(step) = std::env::var("DAYSHIFT_TEST_STOP_AFTER_STEP") {
        builder = builder.on_step_journaled(stop_after_step(step));
    }
    let engine = builder.build();
    if let Some((source, local, loaded)) = from_git {
        let (schedules, webhooks, alertmanager) = (
            config.schedules.clone(),
            config.webhooks.clone(),
            config.alertmanager.clone(),
        );
        let check: dayshift_workflows::file_sync::TriggerCheck = Box::new(move |registry| {
            let path = "the config";
            let mut problems = dayshift_engine::triggers::schedule::config::check(&schedules, path, registry);
            problems.extend(webhooks.check(path, registry));
            problems.extend(alertmanager.check(path, registry));
            problems
        });
        let sync = std::sync::Arc::new(dayshift_workflows::file_sync::FileSync::new(
            engine.clone(),
            pool,
            sync_connections,
            sync_names,
            local,
            source,
            check,
            loaded,
        ));
        tokio::spawn(sync.run(WORKFLOWS_PUSHED.clone(), tokio_util::sync::CancellationToken::new()));
    }
    Ok(engine)
}

/// Notified when the forge reports a push to the workflow files' branch: the sync then looks at
/// once instead of at its next `refresh`.
static WORKFLOWS_PUSHED: std::sync::LazyLock<std::sync::Arc<tokio::sync::Notify>> =
    std::sync::LazyLock::new(Default::default);

/// What `serve` serves over `engine`: authentication, the policy and the triggers, from the
/// config.
fn api(config: &Config, engine: &Engine) -> Result<dayshift_engine::api::Api> {
    let oidc = match &config.server.oidc {
        Some(o) => Some(std::sync::Arc::new(
            dayshift_engine::api::auth::Oidc::new(o.clone()).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    if let Some(oidc) = &oidc {
        // serve: the provider's keys are refetched in the background, so a rotation needs no
        // login to wait for it.
        oidc.clone().refresh_every(Duration::from_secs(15 * 60));
    }
    let mut webhooks = config.webhooks()?;
    if let Some(git) = &config.workflows.git {
        // A push to the workflow files' branch refreshes them at once.
        webhooks.watches.push(dayshift_engine::triggers::webhook::PushWatch {
            repository: git.repository_name(),
            branch: git.branch.clone(),
            pushed: WORKFLOWS_PUSHED.clone(),
        });
    }
    Ok(dayshift_engine::api::Api::builder(engine.clone())
        .auth(dayshift_engine::api::auth::AuthConfig {
            public_metrics: config.server.public_metrics,
            oidc,
            token_cache_ttl: config.server.token_cache_ttl,
        })
        .policy(config.policy().map_err(anyhow::Error::msg)?)
        .schedules(config.schedules())
        .webhooks(webhooks)
        .alerts(config.alerts()?)
        .build())
}

/// For crash tests: the process stops itself (SIGSTOP) right after step `step` is journaled,
/// the first time, so that a test can SIGKILL it at that exact step boundary.
fn stop_after_step(step: String) -> dayshift_engine::StepHook {
    let once = std::sync::atomic::AtomicBool::new(false);
    std::sync::Arc::new(move |run_id, name: &str| {
        if name == step && !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tracing::warn!(%run_id, step = name, "DAYSHIFT_TEST_STOP_AFTER_STEP: stopping this process.");
            let _ = std::process::Command::new("kill")
                .args(["-STOP", &std::process::id().to_string()])
                .status();
        }
    })
}

/// The built-in workflows, without a database (for checks and listings).
/// What the sync of workflow files kept in git starts from: the source, the files of
/// `workflows.dirs`, and the commit loaded with its workflows' names.
type FromGit = (
    dayshift_workflows::declarative::source::GitSource,
    Vec<(String, String)>,
    (String, std::collections::BTreeSet<String>),
);

/// The config's catalogs, and what the sync of `workflows.git` starts from.
type Loaded = (dayshift_workflows::Catalogs, Option<FromGit>);

/// The config's catalogs, the workflow files of `workflows.git` (fetched now) among them.
async fn catalogs(config: &Config) -> Result<Loaded, config::ConfigError> {
    let mut catalogs = config.catalogs()?;
    let Some(git) = &config.workflows.git else {
        return Ok((catalogs, None));
    };
    let invalid = |p: Vec<String>| config::ConfigError::Invalid(p.join("\n"));
    let source = git
        .resolve("workflows.git", config::secrets())
        .map_err(|e| config::ConfigError::Invalid(e.to_string()))?;
    let fetched = source.fetch().await.map_err(|e| invalid(vec![e]))?;
    let mut files =
        dayshift_workflows::declarative::read_dirs(&config.workflows.dirs, &config.base_dir).map_err(invalid)?;
    let local = files.clone();
    files.extend(fetched.files);
    catalogs.workflows =
        dayshift_workflows::declarative::compile_all(&files, &catalogs.connection_names, &dayshift_workflows::BUILT_IN)
            .map_err(invalid)?;
    let names = catalogs.workflows.iter().map(|d| d.name().to_string()).collect();
    Ok((catalogs, Some((source, local, (fetched.commit, names)))))
}

/// Checks the config ([`Config::check_with`]) against every workflow, those of `workflows.git`
/// fetched now; the catalogs it checked.
async fn check_config(config: &Config, path: &str) -> Result<Loaded> {
    let loaded = catalogs(config).await;
    let registry = offline_registry(loaded.as_ref().map(|c| c.0.clone()).unwrap_or_default())?;
    config.check_with(path, &registry, loaded.as_ref().map(|c| &c.0))?;
    Ok(loaded?)
}

fn offline_registry(catalogs: dayshift_workflows::Catalogs) -> Result<dayshift_engine::Registry> {
    // This pool never connects: only the workflows' input types are used. The workflow files
    // are among them; a file's own problems are reported by the config's checks.
    let pool = sqlx::PgPool::connect_lazy("postgres://localhost/unused")?;
    let mut registry = dayshift_engine::Registry::default();
    for d in dayshift_workflows::all_with(pool, Default::default(), catalogs) {
        registry.register(d);
    }
    Ok(registry)
}

/// Where the config came from, for messages.
fn config_path(cli: Option<&str>, env: &HashMap<String, String>) -> String {
    cli.map(str::to_string)
        .or_else(|| env.get("DAYSHIFT_CONFIG").filter(|p| !p.is_empty()).cloned())
        .unwrap_or_else(|| "(no config file)".into())
}

async fn run(cli: Cli) -> Result<std::process::ExitCode> {
    let env = env_map();
    let config = || Config::from_path(cli.config.as_deref(), &env);
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let path = file.or(cli.config.clone());
            let c = Config::from_path(path.as_deref(), &env)?;
            check_config(&c, &config_path(path.as_deref(), &env)).await?;
            println!(
                "config ok: server.listen={} worker.concurrency={} worker.lease-ttl={:?} schedules={}",
                c.server.listen,
                c.worker.concurrency,
                c.worker.lease_ttl,
                c.schedules.len()
            );
        }
        Command::Config {
            command: ConfigCommand::Schema { workflows },
        } => {
            if workflows {
                let schema = dayshift_workflows::declarative::file_schema();
                println!("{}", serde_json::to_string_pretty(&schema)?);
            } else {
                let schema = schemars::schema_for!(Config);
                println!("{}", serde_json::to_string_pretty(&schema)?);
            }
        }
        Command::Migrate => {
            let c = config()?;
            telemetry::init(&c, None);
            let store = PgStore::connect(c.database.url.expose(), 2)
                .await
                .context("cannot connect to PostgreSQL (database.url)")?;
            store.migrate().await.context("migration failed")?;
            println!("migrations applied");
        }
        Command::Serve { listen } => {
            let mut c = config()?;
            if let Some(l) = listen {
                c.server.listen = l;
            }
            telemetry::init(&c, Some("serve"));
            let loaded = check_config(&c, &config_path(cli.config.as_deref(), &env)).await?;
            serve(c, loaded).await?;
        }
        Command::Worker { concurrency } => {
            let mut c = config()?;
            if let Some(n) = concurrency {
                anyhow::ensure!(n > 0, "--concurrency must be at least 1");
                c.worker.concurrency = n;
            }
            telemetry::init(&c, Some("worker"));
            worker(c).await?;
        }
        Command::Tokens { command } => {
            let c = config()?;
            let store = PgStore::connect(c.database.url.expose(), 2)
                .await
                .context("cannot connect to PostgreSQL (database.url)")?;
            store.migrate().await.context("migration failed")?;
            tokens(store.pool(), command).await?;
        }
        Command::Audit { target, limit, json } => {
            let c = config()?;
            let store = PgStore::connect(c.database.url.expose(), 2)
                .await
                .context("cannot connect to PostgreSQL (database.url)")?;
            let entries = dayshift_engine::api::auth::list_audit(store.pool(), target.as_deref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in entries {
                    println!(
                        "{}  {:<16} {:<9} {:<16} {} {}",
                        e.at.format("%Y-%m-%d %H:%M:%S"),
                        e.actor,
                        e.role.as_deref().unwrap_or("-"),
                        e.action,
                        e.target.as_deref().unwrap_or("-"),
                        if e.detail.as_object().is_some_and(|o| o.is_empty()) {
                            String::new()
                        } else {
                            e.detail.to_string()
                        }
                    );
                }
            }
        }
        Command::Workflows { json } => {
            let registry = offline_registry(catalogs(&config()?).await.map(|c| c.0).unwrap_or_default())?;
            let list = registry.list();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for w in list {
                    println!("{:<24} v{:<3} {}", w.name, w.version, w.description);
                }
            }
        }
        Command::Run {
            workflow,
            input,
            wait,
            plan,
            idempotency_key,
            api,
        } => return client::run(&api, &workflow, &input, wait, plan, idempotency_key).await,
        Command::Runs { command, api } => return client::runs(&api, command).await,
        Command::Schedules { command, api } => return client::schedules(&api, command).await,
        Command::Remediations { limit, api } => return client::remediations(&api, limit).await,
        Command::Bench(args) => {
            let mut c = config()?;
            // The bench's own report is the output; per-run logs would only slow it down.
            c.log.level = "warn".into();
            telemetry::init(&c, None);
            bench::run(&c, args).await?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Who runs the CLI, as the actor of token changes.
fn local_actor() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}

async fn tokens(pool: &sqlx::PgPool, command: TokensCommand) -> Result<()> {
    use dayshift_engine::api::auth;
    match command {
        TokensCommand::Create { name, role, expires_in } => {
            let expires_at =
                expires_in.map(|d| chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX));
            let token = auth::create_token(pool, &name, role, expires_at, &local_actor()).await?;
            eprintln!("token '{name}' ({role}) created; it is shown this once:");
            println!("{token}");
        }
        TokensCommand::List { json } => {
            let list = auth::list_tokens(pool).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for t in list {
                    let state = match (t.revoked_at, t.expires_at) {
                        (Some(at), _) => format!("revoked {}", at.format("%Y-%m-%d %H:%M")),
                        (None, Some(at)) if at < chrono::Utc::now() => {
                            format!("expired {}", at.format("%Y-%m-%d %H:%M"))
                        }
                        (None, Some(at)) => format!("expires {}", at.format("%Y-%m-%d %H:%M")),
                        (None, None) => "live".into(),
                    };
                    println!(
                        "{:<24} {:<9} {:<24} created {} by {}, last used {}",
                        t.name,
                        t.role,
                        state,
                        t.created_at.format("%Y-%m-%d %H:%M"),
                        t.created_by,
                        t.last_used_at
                            .map(|a| a.format("%Y-%m-%d %H:%M").to_string())
                            .unwrap_or_else(|| "never".into())
                    );
                }
            }
        }
        TokensCommand::Revoke { name } => {
            anyhow::ensure!(
                auth::revoke_token(pool, &name, &local_actor()).await?,
                "no live token named '{name}'"
            );
            println!("token '{name}' revoked");
        }
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("Shutting down; a second signal exits at once.");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("Second signal: exiting now.");
        std::process::exit(130);
    });
}

async fn serve(config: Config, loaded: Loaded) -> Result<()> {
    let engine = connect(&config, true, Some(loaded)).await?;
    let api = api(&config, &engine)?;
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    tracing::info!(listen = %config.server.listen, "API listening.");
    if config.alertmanager.allow_unauthenticated && !config.alertmanager.routes.is_empty() {
        tracing::warn!(
            "Alertmanager notifications are accepted without credentials (alertmanager.allow-unauthenticated): \
             anyone who reaches /hooks/alertmanager can start remediations."
        );
    }
    // Printed on stdout so that scripts and tests can wait for it.
    println!("listening on {}", listener.local_addr()?);
    let token = CancellationToken::new();
    let scheduler = tokio::spawn(api.scheduler().clone().run(Duration::from_millis(250), token.clone()));
    let stop = token.clone();
    let limits = config.server.clone();
    dayshift_engine::api::serve(listener, api.router(limits.clone()), &limits, async move {
        shutdown_signal().await;
        stop.cancel();
    })
    .await?;
    token.cancel();
    let _ = scheduler.await;
    Ok(())
}

async fn worker(config: Config) -> Result<()> {
    let engine = connect(&config, false, None).await?;
    let token = CancellationToken::new();
    let worker = Worker::new(engine.core(), config.worker.clone());
    let name = worker.name().to_string();
    let run = tokio::spawn(worker.run(token.clone()));
    if let Some(addr) = config.worker.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (worker.metrics-listen)"))?;
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        dayshift_engine::core::metrics::CONTENT_TYPE,
                    )],
                    dayshift_engine::core::metrics::render_process(),
                )
            }),
        );
        println!("worker metrics on {}", listener.local_addr()?);
        let stop = token.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
    }
    println!("worker {name} started");
    shutdown_signal().await;
    token.cancel();
    let grace: Duration = config.shutdown_grace_period.0;
    match tokio::time::timeout(grace, run).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e.into()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            tracing::warn!(?grace, "Grace period over; leases of unfinished runs will expire.");
            Ok(())
        }
    }
}
