//! A worker: consumes "advance run" jobs, sweeps PostgreSQL for due runs, and relays
//! cancellations to the steps it runs.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::core::error::EngineError;
use crate::core::model::RunId;
use crate::core::pass::{self, CancelRegistry, PassOptions};
use crate::core::queue::AdvanceJob;
use crate::core::store::CANCEL_CHANNEL;

/// How a worker behaves.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct WorkerConfig {
    /// Unique per process; shows in leases and logs. Default `<host>-<pid>-<random>`, made
    /// when the worker starts.
    pub name: Option<String>,
    /// Runs advanced at once by this process. Default 16.
    pub concurrency: usize,
    /// How long a claimed run stays leased without renewal; a worker that dies holding a run
    /// delays it by at most this. Default 30s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub lease_ttl: Duration,
    /// How often PostgreSQL is scanned for runs that have been due for this long without a
    /// worker taking them (Redis lost its data, a worker died). Default 5s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub sweep_interval: Duration,
    /// Where `dayshift worker` serves its own `/metrics` (step durations, retries, runs
    /// finished, leases lost), e.g. `0.0.0.0:9464` in a pod. Default: not served.
    #[schemars(with = "Option<String>")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: None,
            concurrency: 16,
            lease_ttl: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(5),
            metrics_listen: None,
        }
    }
}

/// `<host>-<pid>-<random>`: unique per process start, so a restarted worker never collides with
/// the heartbeat of its previous life.
pub(crate) fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!(
        "{host}-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    )
}

struct Shared {
    core: Arc<Core>,
    opts: PassOptions,
}

/// A worker process's loops.
#[derive(Debug)]
pub struct Worker {
    core: Arc<Core>,
    config: WorkerConfig,
}

impl Worker {
    /// A worker advancing the runs of `core` ([`crate::Engine::core`]).
    pub fn new(core: Arc<Core>, mut config: WorkerConfig) -> Self {
        config.name.get_or_insert_with(default_worker_name);
        Self { core, config }
    }

    /// This worker's name (given, or `<host>-<pid>-<random>`).
    pub fn name(&self) -> &str {
        self.config.name.as_deref().unwrap_or_default()
    }

    /// Runs until `shutdown` is cancelled, then stops taking jobs; runs in flight stop at their
    /// next step boundary and are released for another worker at once.
    ///
    /// # Cancel safety
    /// Not cancel-safe: signal shutdown through the token and await the result (bounded by a
    /// grace period in the caller); dropping it leaves leases to expire.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), EngineError> {
        let inner = self.core.clone();
        let cancels = CancelRegistry::default();
        let shared = Arc::new(Shared {
            core: inner.clone(),
            opts: PassOptions {
                owner: self.name().to_string(),
                lease_ttl: self.config.lease_ttl,
                shutdown: shutdown.clone(),
                cancels: cancels.clone(),
            },
        });
        tracing::info!(worker = %self.name(), concurrency = self.config.concurrency, "Worker started.");

        let listener = tokio::spawn(listen_for_cancels(inner.clone(), cancels, shutdown.clone()));
        let sweeper = tokio::spawn(sweep(inner.clone(), self.config.sweep_interval, shutdown.clone()));
        let wake = Arc::new(tokio::sync::Notify::new());
        let waker = {
            let (queue, wake, shutdown) = (inner.queue.clone(), wake.clone(), shutdown.clone());
            tokio::spawn(async move { queue.listen_for_wakeups(wake, shutdown).await })
        };

        // The apalis consumer stops with an error when Redis loses its data (its worker
        // registration is gone) or after a long stall; it is started again under a fresh name,
        // while the sweeper keeps re-enqueueing from PostgreSQL.
        let queue = &inner.queue;
        let mut generation = 0u32;
        let result = loop {
            let name = if generation == 0 {
                self.name().to_string()
            } else {
                format!("{}-{generation}", self.name())
            };
            let worker = WorkerBuilder::new(name.clone())
                .backend(queue.backend().poll_with_strategy(queue.poll_strategy(wake.clone())))
                .data(shared.clone())
                .concurrency(self.config.concurrency.max(1))
                .build(handle);
            // The consumer is stopped on shutdown, or when the watchdog finds it dead: a
            // consumer whose acknowledgements fail (Redis lost the jobs) ends its stream
            // quietly and would otherwise never fetch again.
            let (stop, watched) = (shutdown.clone(), queue.clone());
            let outcome = worker
                .run_with_ctx(move |ctx| {
                    let (stop, watched, name) = (stop.clone(), watched.clone(), name.clone());
                    async move {
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = watched.watch_consumer(&name) => {}
                        }
                        ctx.stop()
                    }
                })
                .await;
            if shutdown.is_cancelled() {
                break Ok(());
            }
            match outcome {
                Ok(()) | Err(_) => {
                    generation += 1;
                    let error = outcome
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "registration lost".into());
                    tracing::warn!(worker = %self.name(), %error, generation,
                        "Queue consumer stopped; starting it again.");
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        shutdown.cancel();
        let _ = tokio::join!(listener, sweeper, waker);
        tracing::info!(worker = %self.name(), "Worker stopped.");
        result
    }
}

/// Advances the job's run in a task of its own.
///
/// A pass is not cancel-safe, and apalis drops the futures of the jobs in flight when its
/// consumer fails (as it does when Redis loses its data). A pass dropped in the middle of a
/// `BEGIN` or `COMMIT` can hand its connection back to the pool with the server still inside a
/// transaction, after which every statement on that connection goes uncommitted. So the pass
/// runs as a task the handler only awaits: if the handler is dropped, the pass still finishes.
async fn handle(job: AdvanceJob, shared: Data<Arc<Shared>>) -> Result<(), BoxDynError> {
    let run_id = job.run_id;
    let shared = Arc::clone(&shared);
    let pass = tokio::spawn(async move { pass::advance(&shared.core, run_id, &shared.opts).await });
    match pass.await {
        Ok(Ok(())) => {}
        // Nothing is lost: the run is due in PostgreSQL and the sweeper re-enqueues it.
        Ok(Err(e)) => tracing::warn!(run_id = %run_id, error = %e, "Advancing the run failed; it will be retried."),
        Err(e) => tracing::error!(run_id = %run_id, error = %e, "A pass ended abnormally; the run will be retried."),
    }
    Ok(())
}

/// Re-enqueues every run PostgreSQL says is due and nobody holds.
async fn sweep(core: Arc<Core>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match core.store.due_runs(every, 10_000).await {
            Ok(due) if !due.is_empty() => {
                tracing::debug!(count = due.len(), "Sweeper re-enqueues due runs.");
                core.queue.wake_now(&due);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Sweep failed."),
        }
    }
}

/// Relays `pg_notify` cancellations to the steps this worker runs.
async fn listen_for_cancels(core: Arc<Core>, cancels: CancelRegistry, shutdown: CancellationToken) {
    loop {
        let mut listener = match PgListener::connect_with(core.store.pool()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "Cancel listener cannot connect; retrying.");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                }
            }
        };
        if let Err(e) = listener.listen(CANCEL_CHANNEL).await {
            tracing::warn!(error = %e, "Cancel listener cannot listen; retrying.");
            continue;
        }
        loop {
            let n = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = listener.recv() => n,
            };
            match n {
                Ok(n) => {
                    if let Ok(id) = n.payload().parse::<RunId>() {
                        cancels.cancel(id);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Cancel listener lost its connection; reconnecting.");
                    break;
                }
            }
        }
    }
}
