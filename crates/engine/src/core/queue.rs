//! The Redis queue (apalis + apalis-redis) that carries "advance run" wake-ups.
//!
//! # Design notes
//! Redis is not the source of truth: a job only says "look at run R". The worker claims the
//! run's lease in PostgreSQL; a duplicate or stale job finds nothing to do. If Redis loses its
//! data, the sweeper (see `worker.rs`) re-enqueues every due run it finds in PostgreSQL.
//!
//! apalis-redis polls Redis with a Lua script (there is no blocking pop), so every enqueue also
//! publishes on a wake-up channel; workers subscribe and fetch at once. Polling remains as the
//! fallback for a missed message ([`QueueConfig::poll_interval`]).
//!
//! apalis-redis schedules delayed jobs at whole seconds, so a wake-up due within
//! [`QueueConfig::local_timer_horizon`] is held by a timer in this process instead, and enqueued
//! when due; should the process die first, the sweeper enqueues the run when PostgreSQL says it
//! is due. Retries and attempts live in PostgreSQL too (apalis-redis would re-run a failed job
//! up to 25 times whatever its policy says), so the job handler never returns an error.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use apalis::prelude::{PollSnapshot, PollStrategy, TaskBuilder, TaskSink};
use apalis_redis::{Config, RedisStorage};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;
use tokio_util::sync::CancellationToken;

use crate::core::error::QueueError;
use crate::core::model::RunId;

/// The job: "advance run R".
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct AdvanceJob {
    pub(crate) run_id: RunId,
}

/// How the queue talks to Redis.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct QueueConfig {
    /// The apalis queue name; runs of different dayshift installations sharing a Redis must
    /// differ. Default `dayshift:advance`.
    pub name: String,
    /// How often an idle worker asks Redis for new jobs even without a wake-up message: the
    /// pick-up latency should a message be lost. Default 50ms (a cheap Lua call).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub poll_interval: Duration,
    /// Worker heartbeat; a worker silent for `heartbeat_interval × missed_heartbeats` has its
    /// jobs handed to others. Default 5s × 3.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub heartbeat_interval: Duration,
    /// See `heartbeat_interval`.
    pub missed_heartbeats: u32,
    /// How long one Redis command may take before it fails (redis-rs defaults to 500ms, which
    /// turns a short stall into a dead worker). Default 5s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub response_timeout: Duration,
    /// Wake-ups due sooner than this are timed in-process rather than by Redis. Default 30s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub local_timer_horizon: Duration,
    /// Jobs fetched per poll. Default 16.
    pub batch_size: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            name: "dayshift:advance".into(),
            poll_interval: Duration::from_millis(50),
            heartbeat_interval: Duration::from_secs(5),
            missed_heartbeats: 3,
            response_timeout: Duration::from_secs(5),
            local_timer_horizon: Duration::from_secs(30),
            batch_size: 16,
        }
    }
}

/// The queue. Cheap to clone.
#[derive(Clone)]
pub struct RedisQueue {
    storage: RedisStorage<AdvanceJob>,
    conn: ConnectionManager,
    client: redis::Client,
    config: QueueConfig,
    /// The batching publisher of [`RedisQueue::announce`], started on first use.
    announcer: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<(RunId, bool)>>>,
    /// The batching pusher of [`RedisQueue::wake_now`], started on first use (and again should
    /// its runtime have ended).
    enqueuer: Arc<std::sync::Mutex<Option<tokio::sync::mpsc::Sender<RunId>>>>,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue").field("name", &self.config.name).finish()
    }
}

fn redis_err(e: impl std::fmt::Display) -> QueueError {
    QueueError::Redis(e.to_string())
}

impl RedisQueue {
    /// Enqueues wake-ups for runs that are due now, in the background: the runs are committed,
    /// so a wake-up lost here (Redis down, this process killed) only waits for the sweeper,
    /// which finds every due run in PostgreSQL. The caller never waits on Redis.
    ///
    /// One task per queue pushes whatever queued while its last push was in flight, as one
    /// `push_bulk` and one wake-up message: under load a serve's starts cost Redis two
    /// commands per batch, not per run.
    pub(crate) fn wake_now(&self, runs: &[RunId]) {
        if runs.is_empty() {
            return;
        }
        let sender = {
            let mut slot = self.enqueuer.lock().unwrap_or_else(|e| e.into_inner());
            match slot.as_ref() {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    let (tx, rx) = tokio::sync::mpsc::channel(MAX_PENDING_WAKEUPS);
                    tokio::spawn(push_wakeups(
                        self.storage.clone(),
                        self.conn.clone(),
                        self.wake_channel(),
                        rx,
                    ));
                    slot.insert(tx).clone()
                }
            }
        };
        for &run in runs {
            if sender.try_send(run).is_err() {
                // Redis is down or far behind: leave the rest to the sweeper.
                tracing::debug!(run_id = %run, "Wake-up queue full; the sweeper will pick the run up.");
            }
        }
    }

    /// Enqueues a wake-up for `at`; a failure is logged, as for [`RedisQueue::wake_now`].
    pub(crate) async fn wake_at(&self, run: RunId, at: chrono::DateTime<chrono::Utc>) {
        if let Err(e) = self.enqueue_at(run, at).await {
            tracing::warn!(run_id = %run, error = %e, "Delayed enqueue failed; the sweeper will pick the run up.");
        }
    }

    /// Connects to Redis at `url`.
    pub async fn connect(url: &str, config: QueueConfig) -> Result<Self, QueueError> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        let pubsub_client = client.clone();
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(6);
        let conn = ConnectionManager::new_with_config(client, manager_config)
            .await
            .map_err(redis_err)?;
        let apalis_config = Config::default()
            .queue(&config.name)
            .heartbeat_interval(config.heartbeat_interval)
            .missed_heartbeats(config.missed_heartbeats as usize)
            .batch_size(config.batch_size);
        let storage = RedisStorage::new(conn.clone()).with_config(apalis_config);
        Ok(Self {
            storage,
            conn,
            client: pubsub_client,
            config,
            announcer: Arc::default(),
            enqueuer: Arc::default(),
        })
    }

    /// The queue's settings.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Asks for run `run` to be advanced now.
    pub async fn enqueue(&self, run: RunId) -> Result<(), QueueError> {
        let mut storage = self.storage.clone();
        storage.push(AdvanceJob { run_id: run }).await.map_err(redis_err)?;
        self.wake_workers().await;
        Ok(())
    }

    fn wake_channel(&self) -> String {
        format!("{}:wake", self.config.name)
    }

    /// Tells idle workers to fetch now. Best effort: polling covers a lost message.
    async fn wake_workers(&self) {
        publish_wakeup(&mut self.conn.clone(), &self.wake_channel()).await
    }

    /// Relays wake-up messages to `notify` until `shutdown`, reconnecting as needed.
    pub(crate) async fn listen_for_wakeups(&self, notify: Arc<Notify>, shutdown: CancellationToken) {
        self.listen(&self.wake_channel(), "wake-ups", shutdown, None, |_| {
            notify.notify_one()
        })
        .await
    }

    fn changes_channel(&self) -> String {
        format!("{}:changed", self.config.name)
    }

    /// Says that run `run` moved on (a step recorded, a pass released, the run ended) to
    /// whoever waits on it ([`crate::core::changes`]). Called after the change committed; best
    /// effort, like the wake-ups: a reader that misses it re-reads the run on its own.
    ///
    /// Announcements are batched: one task per queue publishes whatever queued while its last
    /// `PUBLISH` was in flight, as one message of run ids separated by spaces.
    /// `ended`: the change is the run's end (readers waiting only for that wake on it alone).
    pub(crate) fn announce(&self, run: RunId, ended: bool) {
        let sender = self.announcer.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(publish_announcements(self.conn.clone(), self.changes_channel(), rx));
            tx
        });
        let _ = sender.send((run, ended));
    }

    /// Relays change announcements (the run, and whether it ended) to `to` until `shutdown`,
    /// reconnecting as needed; `subscribed` says whether the subscription stands (a reader that starts waiting
    /// while it does not re-reads the run on its own schedule).
    pub(crate) async fn listen_for_changes(
        &self,
        to: tokio::sync::broadcast::Sender<(RunId, bool)>,
        subscribed: tokio::sync::watch::Sender<bool>,
        shutdown: CancellationToken,
    ) {
        self.listen(
            &self.changes_channel(),
            "run changes",
            shutdown,
            Some(&subscribed),
            |payload| {
                let text = String::from_utf8_lossy(payload);
                for id in text.split_ascii_whitespace() {
                    let (id, ended) = match id.strip_suffix('!') {
                        Some(id) => (id, true),
                        None => (id, false),
                    };
                    if let Ok(id) = id.parse::<uuid::Uuid>() {
                        let _ = to.send((RunId(id), ended));
                    }
                }
            },
        )
        .await
    }

    /// Calls `on_message` with the payload of each message on `channel` until `shutdown`,
    /// subscribing again after a lost connection.
    async fn listen(
        &self,
        channel: &str,
        what: &str,
        shutdown: CancellationToken,
        subscribed: Option<&tokio::sync::watch::Sender<bool>>,
        mut on_message: impl FnMut(&[u8]),
    ) {
        let set = |up: bool| {
            if let Some(s) = subscribed {
                s.send_replace(up);
            }
        };
        loop {
            let subscribing = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let mut pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                p = subscribing => match p {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "Cannot subscribe to {what}; polling meanwhile.");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
            };
            set(true);
            let mut messages = pubsub.on_message();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = messages.next() => match m {
                        Some(m) => on_message(m.get_payload_bytes()),
                        None => {
                            tracing::warn!("The subscription to {what} closed; subscribing again.");
                            break;
                        }
                    },
                }
            }
            set(false);
        }
    }

    /// Asks for run `run` to be advanced at `at`.
    pub async fn enqueue_at(&self, run: RunId, at: DateTime<Utc>) -> Result<(), QueueError> {
        let delay = (at - Utc::now()).to_std().unwrap_or_default();
        if delay.is_zero() {
            self.wake_now(&[run]);
            return Ok(());
        }
        if delay <= self.config.local_timer_horizon {
            let queue = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                queue.wake_now(&[run]);
            });
            return Ok(());
        }
        // Whole seconds, rounded up, so the job never arrives before the run is due.
        let secs = at.timestamp() as u64 + u64::from(at.timestamp_subsec_nanos() > 0);
        let task = TaskBuilder::new(AdvanceJob { run_id: run })
            .run_at_timestamp(secs)
            .build();
        let mut storage = self.storage.clone();
        storage.push_task(task).await.map_err(redis_err)
    }

    /// Resolves when the consumer `name` is dead: its registration is gone (Redis lost its data)
    /// or its heartbeat is older than `missed_heartbeats` intervals. Checked once per heartbeat
    /// interval, after a first interval of grace for the registration.
    pub(crate) async fn watch_consumer(&self, name: &str) {
        let every = self.config.heartbeat_interval;
        let stale_after = every.as_secs_f64() * f64::from(self.config.missed_heartbeats.max(1)) + 1.0;
        let key = format!("{}:workers", self.config.name);
        let mut conn = self.conn.clone();
        loop {
            tokio::time::sleep(every).await;
            let score = redis::cmd("ZSCORE")
                .arg(&key)
                .arg(name)
                .query_async::<Option<f64>>(&mut conn)
                .await;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default();
            match score {
                Ok(None) => {
                    tracing::warn!(consumer = name, "Queue consumer is no longer registered in Redis.");
                    return;
                }
                Ok(Some(seen)) if now - seen > stale_after => {
                    tracing::warn!(
                        consumer = name,
                        silent_secs = now - seen,
                        "Queue consumer stopped beating."
                    );
                    return;
                }
                Ok(Some(_)) => {}
                // Redis unreachable: the consumer fails on its own; nothing to decide here.
                Err(e) => tracing::debug!(error = %e, "Consumer watchdog cannot reach Redis."),
            }
        }
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    /// A polling backend for an apalis worker.
    pub(crate) fn backend(&self) -> RedisStorage<AdvanceJob> {
        self.storage.clone()
    }

    pub(crate) fn poll_strategy(&self, wake: Arc<Notify>) -> Tick {
        Tick::new(self.config.poll_interval, wake)
    }
}

/// The announcer's loop: waits for one announcement, takes every other one queued meanwhile
/// (distinct ids, at most [`MAX_ANNOUNCED`]), publishes them in one message: each id, followed
/// by `!` if the run ended. It ends when the last clone of the queue is gone.
async fn publish_announcements(
    mut conn: ConnectionManager,
    channel: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(RunId, bool)>,
) {
    let mut batch: Vec<(RunId, bool)> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.clear();
        batch.push(first);
        while batch.len() < MAX_ANNOUNCED {
            match rx.try_recv() {
                Ok((id, ended)) => match batch.iter_mut().find(|(seen, _)| *seen == id) {
                    Some(seen) => seen.1 |= ended,
                    None => batch.push((id, ended)),
                },
                Err(_) => break,
            }
        }
        let mut payload = String::with_capacity(batch.len() * 38);
        for (id, ended) in &batch {
            if !payload.is_empty() {
                payload.push(' ');
            }
            payload.push_str(&id.to_string());
            if *ended {
                payload.push('!');
            }
        }
        let sent = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "Run changes not announced; waiting readers re-read on their own.");
        }
    }
}

/// The task behind [`RedisQueue::wake_now`]: pushes the runs that queued meanwhile as one batch
/// and sends one wake-up message for them.
/// It ends when the queue's last clone is dropped.
async fn push_wakeups(
    storage: RedisStorage<AdvanceJob>,
    mut conn: ConnectionManager,
    channel: String,
    mut rx: tokio::sync::mpsc::Receiver<RunId>,
) {
    let mut batch = Vec::with_capacity(MAX_PUSHED);
    while rx.recv_many(&mut batch, MAX_PUSHED).await > 0 {
        let jobs: Vec<AdvanceJob> = batch.drain(..).map(|run_id| AdvanceJob { run_id }).collect();
        let count = jobs.len();
        let mut storage = storage.clone();
        let pushed = if count == 1 {
            storage.push(jobs.into_iter().next().expect("one job")).await
        } else {
            storage.push_bulk(jobs).await
        };
        match pushed {
            Ok(_) => publish_wakeup(&mut conn, &channel).await,
            Err(e) => {
                tracing::warn!(runs = count, error = %e, "Enqueue failed; the sweeper will pick the runs up.");
            }
        }
    }
}

/// Tells idle workers to fetch now. Best effort: polling covers a lost message.
async fn publish_wakeup(conn: &mut ConnectionManager, channel: &str) {
    let sent = redis::cmd("PUBLISH").arg(channel).arg(1).query_async::<i64>(conn).await;
    if let Err(e) = sent {
        tracing::debug!(error = %e, "Wake-up message not sent; workers will poll.");
    }
}

/// The most wake-ups one push carries.
const MAX_PUSHED: usize = 500;

/// Wake-ups waiting for their push beyond which new ones are left to the sweeper (Redis is
/// down or far behind; memory stays bounded).
const MAX_PENDING_WAKEUPS: usize = 50_000;

/// The most run ids one announcement carries.
const MAX_ANNOUNCED: usize = 256;

/// Wakes the apalis fetcher on a wake-up message, and every `every` regardless. Unlike the
/// stock interval strategy, it re-arms and polls the next timer (and the next notification)
/// before returning, so an empty fetch never leaves the worker without a wake-up until the
/// next heartbeat.
pub(crate) struct Tick {
    every: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    notify: Arc<Notify>,
    woken: Pin<Box<OwnedNotified>>,
}

impl Tick {
    fn new(every: Duration, notify: Arc<Notify>) -> Self {
        Self {
            every,
            sleep: Box::pin(tokio::time::sleep(every)),
            woken: Box::pin(notify.clone().notified_owned()),
            notify,
        }
    }
}

impl PollStrategy for Tick {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        let mut fired = false;
        while self.sleep.as_mut().poll(cx).is_ready() {
            fired = true;
            let next = tokio::time::Instant::now() + self.every;
            self.sleep.as_mut().reset(next);
        }
        while self.woken.as_mut().poll(cx).is_ready() {
            fired = true;
            self.woken = Box::pin(self.notify.clone().notified_owned());
        }
        if fired { Poll::Ready(Some(())) } else { Poll::Pending }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn queue(heartbeat: Duration) -> RedisQueue {
        let url = std::env::var("DAYSHIFT_REDIS_URL")
            .expect("DAYSHIFT_REDIS_URL is not set: run `scripts/services.sh up` and source .dayshift/env");
        let name = format!("dayshift:test:{}", uuid::Uuid::new_v4().simple());
        RedisQueue::connect(
            &url,
            QueueConfig {
                name,
                heartbeat_interval: heartbeat,
                missed_heartbeats: 1,
                ..QueueConfig::default()
            },
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn the_watchdog_reports_a_consumer_that_is_not_registered() {
        let q = queue(Duration::from_millis(50)).await;
        q.watch_consumer("never-registered").await;
    }

    #[tokio::test]
    async fn the_watchdog_reports_a_consumer_whose_heartbeat_stopped() {
        let q = queue(Duration::from_millis(50)).await;
        let mut conn = q.conn.clone();
        let long_ago = Utc::now().timestamp() - 600;
        redis::cmd("ZADD")
            .arg(format!("{}:workers", q.config.name))
            .arg(long_ago)
            .arg("silent")
            .query_async::<i64>(&mut conn)
            .await
            .unwrap();
        q.watch_consumer("silent").await;
    }
}
