//! The bench as an API client (`dayshift bench --api`): a `dayshift serve` process of its own,
//! an operator token, and HTTP/1.1 keep-alive connections that start runs with
//! `POST /api/v1/runs` and read them with `GET /api/v1/runs/{id}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dayshift_engine::RunId;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{TempFile, write_private};

/// How W2's client learns that a run has finished.
#[derive(Debug, Clone, Copy)]
pub(super) enum Finish {
    /// `POST /api/v1/runs?wait=30s`, answered by `serve` when the run ends (woken by the
    /// worker's announcement), then `GET /api/v1/runs/{id}?wait=30s` should the wait run out.
    Wait,
    /// `GET /api/v1/runs/{id}` until the run has ended, pausing this long between two reads
    /// (zero: back to back, each read starting when the previous answer is in).
    Poll { interval: Duration },
}

/// One keep-alive connection to `serve`: a client that holds at most one connection, used by
/// one task at a time, so N of them are N connections.
#[derive(Clone)]
pub(super) struct Connection {
    http: reqwest::Client,
    base: Arc<str>,
}

/// The connections of a bench and the body every start sends.
pub(super) struct Client {
    connections: Vec<Connection>,
    body: Arc<str>,
}

impl Client {
    /// `n` connections to `base` with `token`, each opened ([`Client::touch`]) so that W1 does
    /// not time TCP handshakes.
    pub(super) async fn connect(base: &str, token: &str, n: usize, body: serde_json::Value) -> Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))?;
        auth.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, auth);
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/json"),
        );
        let mut connections = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let http = dayshift_workflows::adapters::http::builder()
                .http1_only()
                .pool_max_idle_per_host(1)
                .pool_idle_timeout(None)
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(60))
                .default_headers(headers.clone())
                .build()?;
            connections.push(Connection {
                http,
                base: base.into(),
            });
        }
        let client = Self {
            connections,
            body: body.to_string().into(),
        };
        client.touch().await?;
        Ok(client)
    }

    /// A `GET /healthz` on every connection at once (it reads nothing), so that each is open
    /// (again, should serve have closed it while idle) before a measurement.
    pub(super) async fn touch(&self) -> Result<()> {
        let mut tasks = Vec::with_capacity(self.connections.len());
        for c in &self.connections {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.http
                    .get(format!("{}/healthz", c.base))
                    .send()
                    .await
                    .with_context(|| format!("cannot reach serve at {}", c.base))?
                    .error_for_status()?;
                Ok::<_, anyhow::Error>(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(())
    }

    /// The first connection: W2's.
    pub(super) fn one(&self) -> &Connection {
        &self.connections[0]
    }

    /// The body of a start of the bench's workflow.
    pub(super) fn body(&self) -> &str {
        &self.body
    }

    /// Starts `n` runs over every connection at once, each connection taking the next start
    /// when its previous answer is in. The ids, in no particular order.
    pub(super) async fn submit(&self, n: usize) -> Result<Vec<RunId>> {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::with_capacity(self.connections.len());
        for c in &self.connections {
            let (c, next, body) = (c.clone(), next.clone(), self.body.clone());
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    ids.push(c.start(&body).await?);
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
}

impl Connection {
    /// `POST /api/v1/runs`; the new run's id.
    pub(super) async fn start(&self, body: &str) -> Result<RunId> {
        Ok(self.start_with(body, "").await?.0)
    }

    /// `POST /api/v1/runs{query}`; the new run's id and the answer.
    async fn start_with(&self, body: &str, query: &str) -> Result<(RunId, Value)> {
        let resp = self
            .http
            .post(format!("{}/api/v1/runs{query}", self.base))
            .body(body.to_string())
            .send()
            .await?;
        let status = resp.status();
        let v: Value = resp.json().await?;
        if status != reqwest::StatusCode::CREATED {
            bail!("POST /api/v1/runs answered {status}: {v}");
        }
        Ok((started_id(&v)?, v))
    }

    /// Starts a run with `body` and returns once it has succeeded (an error if it failed or
    /// was cancelled); its id.
    pub(super) async fn start_until_finished(&self, body: &str, how: Finish) -> Result<RunId> {
        if let Finish::Wait = how {
            let (id, v) = self.start_with(body, "?wait=30s").await?;
            match v["run"]["status"].as_str() {
                Some("succeeded") => return Ok(id),
                Some(s @ ("failed" | "cancelled")) => bail!("run {id} ended {s}"),
                _ => {}
            }
            self.until_finished(id, how).await?;
            return Ok(id);
        }
        let id = self.start(body).await?;
        self.until_finished(id, how).await?;
        Ok(id)
    }

    /// Returns once run `id` has succeeded (an error if it failed or was cancelled).
    pub(super) async fn until_finished(&self, id: RunId, how: Finish) -> Result<()> {
        let done = |v: &Value| match v["status"].as_str() {
            Some("succeeded") => Ok(true),
            Some(s @ ("failed" | "cancelled")) => bail!("run {id} ended {s}"),
            _ => Ok(false),
        };
        let (query, pause) = match how {
            Finish::Wait => ("?wait=30s", Duration::ZERO),
            Finish::Poll { interval } => ("", interval),
        };
        loop {
            let resp = self
                .http
                .get(format!("{}/api/v1/runs/{id}{query}", self.base))
                .send()
                .await?
                .error_for_status()?;
            if done(&resp.json().await?)? {
                return Ok(());
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// The run id of a start's answer.
fn started_id(v: &Value) -> Result<RunId> {
    let id = v["id"]
        .as_str()
        .with_context(|| format!("a start's answer has no id: {v}"))?;
    Ok(RunId(id.parse().with_context(|| format!("not a run id: {id}"))?))
}

/// A `dayshift serve` process of the bench's own, killed when dropped.
pub(super) struct Serve {
    pub(super) child: Child,
    /// Where it listens, e.g. `http://127.0.0.1:43121`.
    pub(super) base: String,
    _config: TempFile,
}

/// Starts `dayshift serve` on a free port of 127.0.0.1 with `yaml` as its config (a private
/// file), and waits for it to listen.
pub(super) async fn start_serve(yaml: &str) -> Result<Serve> {
    let path = std::env::temp_dir().join(format!("dayshift-bench-serve-{}.yaml", super::rand_u32()));
    write_private(&path, yaml)?;
    let config = TempFile(path.clone());
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env_remove("DAYSHIFT_DATABASE_URL")
        .env_remove("DAYSHIFT_REDIS_URL")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start dayshift serve")?;
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = listening_on(&line) {
                return Ok(addr.to_string());
            }
        }
        bail!("serve exited before it listened")
    })
    .await
    .context("serve did not listen within 30 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Serve {
        child,
        base: format!("http://{addr}"),
        _config: config,
    })
}

/// The address in serve's `listening on <addr>` line.
fn listening_on(line: &str) -> Option<&str> {
    line.strip_prefix("listening on ")
        .map(str::trim)
        .filter(|a| !a.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_address_is_read_from_serves_line() {
        assert_eq!(listening_on("listening on 127.0.0.1:40211\n"), Some("127.0.0.1:40211"));
        assert_eq!(listening_on("worker w-1 started"), None);
        assert_eq!(listening_on("listening on "), None);
    }

    #[test]
    fn a_starts_answer_gives_the_run_id() {
        let v = json!({ "id": "0192f0c4-6f5e-7a3b-9c1d-2e4f6a8b0c1d", "status": "pending", "created": true });
        assert_eq!(
            started_id(&v).unwrap().to_string(),
            "0192f0c4-6f5e-7a3b-9c1d-2e4f6a8b0c1d"
        );
        assert!(started_id(&json!({ "status": "pending" })).is_err());
        assert!(started_id(&json!({ "id": "nope" })).is_err());
    }
}
