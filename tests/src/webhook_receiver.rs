//! A chat webhook stand-in ([`WebhookReceiver`]) that records every notice posted to it.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// A chat webhook (Mattermost/Slack shaped) that records what is posted to it.
pub struct WebhookReceiver {
    /// The URL to post to.
    pub url: String,
    received: Arc<std::sync::Mutex<Vec<Value>>>,
    arrived: Arc<tokio::sync::Notify>,
    server: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> Self {
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let arrived = Arc::new(tokio::sync::Notify::new());
        let (r, a) = (received.clone(), arrived.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let (r, a) = (r.clone(), a.clone());
                async move {
                    r.lock().unwrap().push(body);
                    a.notify_waiters();
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            received,
            arrived,
            server,
        }
    }

    /// What has been posted so far.
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until at least `n` messages have arrived; panics after `limit`.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let arrived = self.arrived.notified();
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!("{} of {n} messages arrived within {limit:?}: {got:#?}", got.len());
            }
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}
