//! Waiting for a run to move on without polling: workers announce each change of a run after
//! it commits ([`RedisQueue::announce`]: a step recorded, a pass released, the run ended), and
//! the [`Hub`] of each process that reads runs hands the announcements to its waiting readers.
//!
//! # Design notes
//! PostgreSQL stays the truth: an announcement only says "look at run R again", and a reader
//! decides from what it reads there. Announcements travel on Redis pub/sub, so one is lost
//! when Redis restarts or a subscription drops; a reader therefore also re-reads on its own
//! every `recheck` (seconds, not milliseconds: the safety net, not the mechanism).
//!
//! The hub subscribes on first use, once per process, and stops when its engine is dropped.

use std::time::Duration;

use tokio::sync::{OnceCell, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::core::model::RunId;
use crate::core::queue::RedisQueue;

/// How many announcements a slow reader may fall behind before it re-reads regardless.
const BACKLOG: usize = 4096;

/// How long a reader that starts waiting before the first subscription stands waits for it.
const SUBSCRIBE_GRACE: Duration = Duration::from_secs(1);

/// An announcement as the hub hands it on: the run, and whether it ended.
type Change = (RunId, bool);

/// The announcements of run changes, for the readers of one process.
#[derive(Default)]
pub(crate) struct Hub {
    started: OnceCell<(broadcast::Sender<Change>, watch::Receiver<bool>)>,
    stop: CancellationToken,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One reader's view of the announcements.
pub(crate) struct Listener {
    rx: broadcast::Receiver<Change>,
}

impl Listener {
    /// Resolves when an announcement may concern `run` (one named it, or some were missed),
    /// or at `until`, whichever is first. With `ended_only`, only the announcement of its end
    /// counts (a reader waiting for the end is not woken by each step).
    pub(crate) async fn changed(&mut self, run: RunId, ended_only: bool, until: tokio::time::Instant) {
        let named = async {
            loop {
                match self.rx.recv().await {
                    Ok((id, ended)) if id == run && (ended || !ended_only) => return,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    // The hub stopped: only the deadline is left.
                    Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            () = named => {}
            () = tokio::time::sleep_until(until) => {}
        }
    }
}

impl Hub {
    /// A listener of announcements from now on. Starts the subscription on first use and
    /// waits (briefly) for it to stand, so that a change committed after this returns is seen.
    pub(crate) async fn listen(&self, queue: &RedisQueue) -> Listener {
        let (tx, subscribed) = self
            .started
            .get_or_init(|| async {
                let (tx, _) = broadcast::channel(BACKLOG);
                let (up_tx, up_rx) = watch::channel(false);
                let (queue, relay, stop) = (queue.clone(), tx.clone(), self.stop.clone());
                tokio::spawn(async move { queue.listen_for_changes(relay, up_tx, stop).await });
                (tx, up_rx)
            })
            .await;
        let rx = tx.subscribe();
        let mut subscribed = subscribed.clone();
        if !*subscribed.borrow() {
            let _ = tokio::time::timeout(SUBSCRIBE_GRACE, subscribed.wait_for(|up| *up)).await;
        }
        Listener { rx }
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("started", &self.started.initialized())
            .finish()
    }
}
