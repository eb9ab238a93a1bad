//! The CLI side of the API: `dayshift run` and `dayshift runs …`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Where the API is and how to print.
#[derive(Args, Debug, Clone)]
pub(crate) struct ApiArgs {
    /// The dayshift API. Env: DAYSHIFT_SERVER.
    #[arg(
        long,
        env = "DAYSHIFT_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// A bearer token (`dayshift tokens create`). Env: DAYSHIFT_TOKEN.
    #[arg(long, env = "DAYSHIFT_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Machine-readable output (JSON).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub(crate) enum RunsCommand {
    /// Lists runs, newest first.
    List {
        /// pending, running, waiting, succeeded, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Shows a run and its steps.
    Show {
        id: String,
        /// Follows the run until it ends: each step as it finishes and what the run waits on,
        /// on stderr; the run at the end, on stdout (exit status 0 only if it succeeded).
        #[arg(long)]
        follow: bool,
    },
    /// Cancels a run: the step in flight is cancelled and the undos run.
    Cancel {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Starts a failed or cancelled run again, as a new run with the same input; a run
    /// retried already gives that retry back.
    Retry { id: String },
    /// Sends a signal to a run.
    Signal {
        id: String,
        name: String,
        /// The payload, as JSON.
        #[arg(long, default_value = "null")]
        payload: String,
    },
    /// Approves a run waiting for approval (a promotion gate), as the token's owner.
    Approve {
        id: String,
        /// Who approves: if given, it must be the token's name (no one approves as someone else).
        #[arg(long = "as")]
        by: Option<String>,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Rejects a run waiting for approval: it ends without changing anything.
    Reject {
        id: String,
        /// Who rejects: if given, it must be the token's name.
        #[arg(long = "as")]
        by: Option<String>,
        #[arg(long)]
        comment: Option<String>,
    },
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(args: &ApiArgs) -> Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = args.token.as_deref().filter(|t| !t.is_empty()) {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("--token / DAYSHIFT_TOKEN has characters a header cannot carry")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        Ok(Self {
            http: dayshift_workflows::adapters::http::builder()
                .timeout(Duration::from_secs(30))
                .default_headers(headers)
                .build()?,
            base: args.server.trim_end_matches('/').to_string(),
        })
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        let resp = req.send().await.with_context(|| {
            format!(
                "cannot reach the dayshift API at {} (is `dayshift serve` running?)",
                self.base
            )
        })?;
        self.answer(resp).await
    }

    /// The body of an answer, or its error.
    async fn answer(&self, resp: reqwest::Response) -> Result<Value> {
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = body.get("error").and_then(Value::as_str).unwrap_or("no error message");
            bail!("{msg} (HTTP {})", status.as_u16());
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.call(self.http.get(format!("{}{path}", self.base))).await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.call(self.http.post(format!("{}{path}", self.base)).json(body))
            .await
    }
}

fn parse_json(what: &str, text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("{what} is not JSON: {text}"))
}

/// `dayshift run`.
pub(crate) async fn run(
    args: &ApiArgs,
    workflow: &str,
    input: &str,
    wait: bool,
    plan: bool,
    key: Option<String>,
) -> Result<ExitCode> {
    let api = Api::new(args)?;
    let input = parse_json("--input", input)?;
    let mut body = json!({ "workflow": workflow, "input": input, "plan": plan });
    if let Some(k) = key {
        body["idempotency_key"] = json!(k);
    }
    let started = api.post("/api/v1/runs", &body).await?;
    let id = started["id"]
        .as_str()
        .context("the API returned no run id")?
        .to_string();
    if !wait {
        if args.json {
            println!("{started}");
        } else {
            println!("run {id} {}", started["status"].as_str().unwrap_or("?"));
            if let Some(note) = started["note"].as_str() {
                println!("  {note}");
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("run {id} started ({})", started["status"].as_str().unwrap_or("?"));
    follow(&api, &id, args.json).await
}

/// How long one waiting read asks the server to wait (below the client's 30 s timeout and the
/// server's default `max-wait`).
const FOLLOW_WAIT: &str = "25s";

/// Follows run `id` until it ends, through waiting reads (`?wait=` with `If-None-Match`: the
/// server answers when the run changes, no polling): prints each step as it ends, with its
/// duration, and what the run waits on whenever that changes, to stderr; then the run, to
/// stdout. Exit status 0 only if it succeeded.
async fn follow(api: &Api, id: &str, json: bool) -> Result<ExitCode> {
    let url = format!("{}/api/v1/runs/{id}", api.base);
    let mut tag: Option<reqwest::header::HeaderValue> = None;
    let mut progress = Progress::default();
    loop {
        // The first read answers at once; each next one when the run differs from the last.
        let req = match &tag {
            None => api.http.get(&url),
            Some(t) => api
                .http
                .get(format!("{url}?wait={FOLLOW_WAIT}"))
                .header(reqwest::header::IF_NONE_MATCH, t.clone()),
        };
        let resp = req.send().await.with_context(|| {
            format!(
                "cannot reach the dayshift API at {} (is `dayshift serve` running?)",
                api.base
            )
        })?;
        match resp.status() {
            reqwest::StatusCode::NOT_MODIFIED => continue,
            reqwest::StatusCode::SERVICE_UNAVAILABLE => {
                let after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(after)).await;
                continue;
            }
            _ => {}
        }
        let new_tag = resp.headers().get(reqwest::header::ETAG).cloned();
        let run = api.answer(resp).await?;
        tag = new_tag;
        progress.show(&run);
        let status = run["status"].as_str().unwrap_or("");
        if matches!(status, "succeeded" | "failed" | "cancelled") {
            print_run(&run, json);
            return Ok(if status == "succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    }
}

/// What [`follow`] has shown so far.
#[derive(Default)]
struct Progress {
    /// The steps shown as ended, by position.
    ended: std::collections::HashSet<i64>,
    /// What the run was last shown waiting on.
    waiting: Option<Value>,
}

impl Progress {
    /// Prints, to stderr, the steps that ended since the last call and what the run now waits
    /// on, if that changed.
    fn show(&mut self, run: &Value) {
        let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
        for st in run["steps"].as_array().into_iter().flatten() {
            let status = s(&st["status"]);
            if !matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
                continue;
            }
            if !self.ended.insert(st["seq"].as_i64().unwrap_or(-1)) {
                continue;
            }
            let took = st["duration_ms"]
                .as_i64()
                .map(|ms| format!("{ms} ms"))
                .unwrap_or_default();
            let attempts = st["attempts"].as_i64().unwrap_or(1);
            let tries = if attempts > 1 {
                format!(", {attempts} attempts")
            } else {
                String::new()
            };
            let error = st["last_error"]
                .as_str()
                .filter(|_| status != "succeeded")
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            eprintln!("  {status:<9} {} {}{tries}{error}", s(&st["name"]), took);
        }
        let waiting = run.get("waiting_on").filter(|w| !w.is_null()).cloned();
        if waiting != self.waiting {
            if let Some(w) = &waiting {
                eprintln!("  waiting   {}", describe_wait(w, run["id"].as_str().unwrap_or("?")));
            }
            self.waiting = waiting;
        }
    }
}

/// What a run waits on, in words.
fn describe_wait(w: &Value, id: &str) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("?").to_string();
    let until = w["until"].as_str().map(|t| format!(" (until {t})")).unwrap_or_default();
    match w["kind"].as_str().unwrap_or("") {
        "approval" => {
            let who: Vec<String> = w["approvers"].as_array().into_iter().flatten().map(s).collect();
            let given = w["approved_by"].as_array().map_or(0, Vec::len);
            format!(
                "for approval by {} ({given} of {} given){until}: `dayshift runs approve {id}` as one of them",
                if who.is_empty() {
                    "no one named".into()
                } else {
                    who.join(", ")
                },
                w["required"].as_u64().unwrap_or(1),
            )
        }
        "signal" => format!("for the signal '{}'{until}", s(&w["name"])),
        "sleep" => format!("on a timer{until}"),
        "child" => format!("for the child run of step '{}'", s(&w["name"])),
        _ if w["status"] == "retrying" => format!(
            "to retry step '{}' (attempt {} failed: {}){until}",
            s(&w["name"]),
            w["attempts"].as_i64().unwrap_or(1),
            w["last_error"].as_str().unwrap_or("no error recorded")
        ),
        _ => format!("on step '{}'{until}", s(&w["name"])),
    }
}

/// `dayshift runs …`.
pub(crate) async fn runs(args: &ApiArgs, command: RunsCommand) -> Result<ExitCode> {
    let api = Api::new(args)?;
    match command {
        RunsCommand::List {
            status,
            workflow,
            limit,
        } => {
            let mut url = reqwest::Url::parse(&format!("{}/api/v1/runs", api.base))?;
            url.query_pairs_mut().append_pair("limit", &limit.to_string());
            if let Some(s) = status {
                url.query_pairs_mut().append_pair("status", &s);
            }
            if let Some(w) = workflow {
                url.query_pairs_mut().append_pair("workflow", &w);
            }
            let body = api.call(api.http.get(url)).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&body["runs"])?);
            } else {
                println!("{:<36}  {:<24} {:<10} {:<25}", "ID", "WORKFLOW", "STATUS", "CREATED");
                for r in body["runs"].as_array().into_iter().flatten() {
                    println!(
                        "{:<36}  {:<24} {:<10} {:<25}",
                        r["id"].as_str().unwrap_or(""),
                        r["workflow"].as_str().unwrap_or(""),
                        r["status"].as_str().unwrap_or(""),
                        r["created_at"].as_str().unwrap_or("")
                    );
                }
            }
        }
        RunsCommand::Show { id, follow: true } => return follow(&api, &id, args.json).await,
        RunsCommand::Show { id, follow: false } => {
            let run = api.get(&format!("/api/v1/runs/{id}")).await?;
            print_run(&run, args.json);
        }
        RunsCommand::Cancel { id, reason } => {
            let body = api
                .post(&format!("/api/v1/runs/{id}/cancel"), &json!({ "reason": reason }))
                .await?;
            if args.json {
                println!("{body}");
            } else {
                println!(
                    "cancellation requested for run {id} (now {})",
                    body["status"].as_str().unwrap_or("?")
                );
            }
        }
        RunsCommand::Retry { id } => {
            let body = api.post(&format!("/api/v1/runs/{id}/retry"), &json!({})).await?;
            if args.json {
                println!("{body}");
            } else if body["created"] == true {
                println!("run {id} started again as run {}", body["id"].as_str().unwrap_or("?"));
            } else {
                println!(
                    "run {id} was retried already, as run {}",
                    body["id"].as_str().unwrap_or("?")
                );
            }
        }
        RunsCommand::Approve { id, by, comment } => decide(&api, args, "approve", &id, by, comment).await?,
        RunsCommand::Reject { id, by, comment } => decide(&api, args, "reject", &id, by, comment).await?,
        RunsCommand::Signal { id, name, payload } => {
            let payload = parse_json("--payload", &payload)?;
            let body = api.post(&format!("/api/v1/runs/{id}/signals/{name}"), &payload).await?;
            if args.json {
                println!("{body}");
            } else {
                println!("signal {name} sent to run {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_run(run: &Value, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(run).unwrap_or_default());
        return;
    }
    let s = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| "-".into());
    println!("run       {}", s(&run["id"]));
    println!("workflow  {} v{}", s(&run["workflow"]), run["workflow_version"]);
    println!("status    {}", s(&run["status"]));
    println!("started   {} by {}", s(&run["created_at"]), s(&run["started_by"]));
    if let Some(e) = run["error"].as_str() {
        println!("error     {e}");
    }
    if !run["output"].is_null() {
        println!("output    {}", run["output"]);
    }
    println!("steps");
    println!(
        "  {:>3}  {:<28} {:<7} {:<10} {:>8} {:>9}  LAST ERROR",
        "#", "NAME", "KIND", "STATUS", "ATTEMPTS", "MS"
    );
    for st in run["steps"].as_array().into_iter().flatten() {
        println!(
            "  {:>3}  {:<28} {:<7} {:<10} {:>8} {:>9}  {}",
            st["seq"].as_i64().unwrap_or_default(),
            s(&st["name"]),
            s(&st["kind"]),
            s(&st["status"]),
            st["attempts"].as_i64().unwrap_or_default(),
            st["duration_ms"]
                .as_i64()
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into()),
            st["last_error"].as_str().unwrap_or("")
        );
    }
}

#[derive(Subcommand, Debug)]
pub(crate) enum SchedulesCommand {
    /// Lists schedules with their next fire times (the default).
    List,
    /// Shows a schedule and its recent ticks.
    Show { name: String },
    /// Pauses a schedule: no tick fires until it is resumed.
    Pause { name: String },
    /// Resumes a schedule; ticks that passed while it was paused do not fire.
    Resume { name: String },
    /// Starts the schedule's workflow now.
    Trigger { name: String },
}

/// `dayshift schedules …`.
pub(crate) async fn schedules(args: &ApiArgs, command: Option<SchedulesCommand>) -> Result<ExitCode> {
    let api = Api::new(args)?;
    let body = match command.unwrap_or(SchedulesCommand::List) {
        SchedulesCommand::List => api.get("/api/v1/schedules").await?,
        SchedulesCommand::Show { name } => api.get(&format!("/api/v1/schedules/{name}")).await?,
        SchedulesCommand::Pause { name } => api.post(&format!("/api/v1/schedules/{name}/pause"), &json!({})).await?,
        SchedulesCommand::Resume { name } => {
            api.post(&format!("/api/v1/schedules/{name}/resume"), &json!({}))
                .await?
        }
        SchedulesCommand::Trigger { name } => {
            let body = api
                .post(&format!("/api/v1/schedules/{name}/trigger"), &json!({}))
                .await?;
            if args.json {
                println!("{body}");
            } else {
                println!("schedule {name} started run {}", body["run_id"].as_str().unwrap_or("?"));
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    let list = match body.get("schedules") {
        Some(list) => list.as_array().cloned().unwrap_or_default(),
        None => vec![body],
    };
    println!(
        "{:<24} {:<18} {:<16} {:<22} {:<7} NEXT",
        "NAME", "CRON", "TIMEZONE", "WORKFLOW", "PAUSED"
    );
    for s in &list {
        let next = s["next"]
            .as_array()
            .and_then(|n| n.first())
            .and_then(Value::as_str)
            .unwrap_or("-");
        println!(
            "{:<24} {:<18} {:<16} {:<22} {:<7} {next}",
            s["name"].as_str().unwrap_or(""),
            s["cron"].as_str().unwrap_or(""),
            s["timezone"].as_str().unwrap_or(""),
            s["workflow"].as_str().unwrap_or(""),
            s["paused"].as_bool().unwrap_or(false),
        );
    }
    if list.len() == 1 {
        for t in list[0]["recent"].as_array().into_iter().flatten() {
            println!(
                "  {}  {:<8} {} {}",
                t["tick"].as_str().unwrap_or(""),
                t["outcome"].as_str().unwrap_or(""),
                t["run_id"].as_str().unwrap_or(""),
                t["detail"].as_str().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `runs approve` / `runs reject`.
async fn decide(
    api: &Api,
    args: &ApiArgs,
    verb: &str,
    id: &str,
    by: Option<String>,
    comment: Option<String>,
) -> Result<()> {
    let mut request = json!({ "comment": comment });
    if let Some(by) = by {
        request["by"] = json!(by);
    }
    let body = api.post(&format!("/api/v1/runs/{id}/{verb}"), &request).await?;
    if args.json {
        println!("{body}");
    } else {
        println!(
            "{verb} of run {id} by {} sent",
            body["by"].as_str().unwrap_or("(unknown)")
        );
    }
    Ok(())
}

/// `dayshift remediations`.
pub(crate) async fn remediations(args: &ApiArgs, limit: u32) -> Result<ExitCode> {
    let api = Api::new(args)?;
    let body = api.get(&format!("/api/v1/remediations?limit={limit}")).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<38}{:<11}{:<16}{:<34}{:<12}ACTIONS",
        "RUN", "STATUS", "PLAYBOOK", "ALERT", "RESOLVED IN"
    );
    for r in body["remediations"].as_array().cloned().unwrap_or_default() {
        let alert = format!(
            "{} {}",
            r["alert"]["labels"]["alertname"].as_str().unwrap_or("?"),
            r["alert"]["labels"]["namespace"].as_str().unwrap_or("")
        );
        let resolved = r["time_to_resolve_seconds"]
            .as_f64()
            .map(|s| format!("{s:.0}s"))
            .unwrap_or_else(|| r["outcome"].as_str().unwrap_or("-").to_string());
        let actions: Vec<String> = r["plan"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        println!(
            "{:<38}{:<11}{:<16}{:<34}{:<12}{}",
            r["id"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["playbook"].as_str().unwrap_or(""),
            alert,
            resolved,
            actions.join("; ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
