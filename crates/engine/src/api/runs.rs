//! `/api/v1/runs`: start, list, read, cancel, signal, approve or reject, retry; the run
//! summary, what started a run, and the approvals waiting. A start through the API is checked
//! against the config's policy first ([`check_api_start`]).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::access::Who;
use crate::api::audit::audit;
use crate::api::error::{ApiError, Body, parse_id};
use crate::api::state::Api;
use crate::core::error::{EngineError, InvalidInput};
use crate::core::model::{RunFilter, RunId, RunStatus, StartRun, TRIGGER_KEY_PREFIXES};
use crate::engine::Engine;
use crate::identity::Caller;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartQuery {
    /// How long to wait for the run to end before answering (as `GET …?wait=`).
    wait: Option<String>,
}

/// `POST /api/v1/runs[?wait=30s]`: starts a run. With `wait`, the answer also holds the run as
/// `GET /api/v1/runs/{id}` shows it, once it has ended or the wait has run out (one round trip
/// for a run a client waits for).
pub(crate) async fn start_run(
    State(api): State<Api>,
    axum::Extension(caller): Who,
    axum::Extension(waits): axum::Extension<crate::api::server::Waits>,
    q: Result<Query<StartQuery>, QueryRejection>,
    Body(mut req): Body<StartRun>,
) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let wait = match q.wait.as_deref() {
        None | Some("") => None,
        Some(w) => Some(parse_wait(w)?.min(waits.max)),
    };
    let engine = api.engine();
    req.started_by = Some(format!("api:{}", caller.name));
    if let Err(e) = check_api_start(&api, &caller, &req) {
        if let EngineError::Forbidden(why) = &e {
            audit(
                engine,
                &caller,
                "run.start.refused",
                &req.workflow,
                json!({ "why": why }),
            )
            .await;
        }
        return Err(e.into());
    }
    let keys = [
        ("idempotency_key", req.idempotency_key.as_deref()),
        ("concurrency.key", req.concurrency.as_ref().map(|c| c.key.as_str())),
    ];
    for (field, key) in keys {
        if let Some(key) = key {
            check_api_key(field, key)
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_key", e.0))?;
        }
    }
    let audit = crate::core::store::AuditEntry {
        actor: caller.name.clone(),
        role: Some(caller.role.to_string()),
        action: "run.start".into(),
        detail: json!({ "workflow": req.workflow }),
    };
    // The run is started whatever happens to the wait: too many waiting reads only mean the
    // answer comes at once.
    let slot = wait.and_then(|w| Some((w, waits.slots.clone().try_acquire_owned().ok()?)));
    let (started, run) = match (wait, slot) {
        (None, _) => (engine.start_audited(req, Some(audit)).await?, None),
        (Some(_), Some((timeout, _slot))) => {
            let (started, run) = engine.start_and_wait(req, Some(audit), timeout, waits.recheck).await?;
            (started, Some(run))
        }
        (Some(_), None) => {
            let started = engine.start_audited(req, Some(audit)).await?;
            let run = engine.get_run(started.id).await?;
            (started, Some(run))
        }
    };
    let status = if started.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let Some(run) = run else {
        return Ok((status, Json(started)).into_response());
    };
    let mut body = serde_json::to_value(&started).unwrap_or(Value::Null);
    body["run"] = run_view(run).0;
    Ok((status, Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    status: Option<String>,
    workflow: Option<String>,
    trigger: Option<String>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    until: Option<chrono::DateTime<chrono::Utc>>,
    before: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn list_runs(
    State(engine): State<Engine>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<RunStatus>()
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", format!("status: {e}")))?,
        ),
    };
    let before = match q.before.as_deref() {
        None | Some("") => None,
        Some(id) => Some(parse_id(id)?),
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let runs = engine
        .list_runs(&RunFilter {
            status,
            workflow: q.workflow.filter(|w| !w.is_empty()),
            trigger: q.trigger.filter(|t| !t.is_empty()),
            since: q.since,
            until: q.until,
            before,
            limit: Some(limit),
        })
        .await?;
    // A full page may have more after it: `next` is the cursor for `before`.
    let next = (runs.len() == limit as usize)
        .then(|| runs.last().map(|r| r.id.to_string()))
        .flatten();
    // What the runs still going wait on (a signal, a timer, a child, a retry), at a glance.
    let going: Vec<RunId> = runs.iter().filter(|r| !r.status.is_terminal()).map(|r| r.id).collect();
    let mut waiting = crate::api::views::waiting_on(&engine, &going).await?;
    let runs: Vec<Value> = runs
        .into_iter()
        .map(|r| {
            let id = r.id;
            let mut v = serde_json::to_value(r.redacted()).unwrap_or(Value::Null);
            if let Some(w) = waiting.remove(&id) {
                v["waiting_on"] = w;
            }
            v
        })
        .collect();
    Ok(Json(json!({ "runs": runs, "next": next })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GetQuery {
    /// How long to wait (`30s`, `2m`): for the run to end, or with `If-None-Match`, for it to
    /// differ from the version named there.
    wait: Option<String>,
}

/// `GET /api/v1/runs/{id}[?wait=30s]`: the run, its steps and what it waits on, with an `ETag`.
///
/// With `wait`, the answer comes when the run has ended (at once if it has), or with
/// `If-None-Match: <etag>`, as soon as the run no longer matches that version: a step
/// finished, a wait began, the run ended. When `wait` runs out first, the answer is the run as
/// it is (`200`), or `304` if it still matches `If-None-Match`. The wait is woken by the
/// workers' announcements, not by polling (see [`crate::core::changes`]); it is cut to
/// `server.max-wait`, and beyond `server.max-waiting-requests` waiting reads one more gets 503.
pub(crate) async fn get_run(
    State(engine): State<Engine>,
    axum::Extension(waits): axum::Extension<crate::api::server::Waits>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    q: Result<Query<GetQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let Query(q) = q?;
    let seen = headers
        .get(axum::http::header::IF_NONE_MATCH)
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_header", "If-None-Match is not text"))
        })
        .transpose()?;
    let matches = |tag: &str| seen.as_deref().is_some_and(|seen| etag_matches(seen, tag));
    let wait = match q.wait.as_deref() {
        None | Some("") => None,
        Some(w) => Some(parse_wait(w)?.min(waits.max)),
    };
    let run = match wait {
        None => engine.get_run(id).await?,
        Some(timeout) => {
            let Ok(_slot) = waits.slots.clone().try_acquire_owned() else {
                return Ok(ApiError::busy(
                    "too_many_waits",
                    "too many reads are waiting at once; ask again shortly",
                ));
            };
            engine
                .wait_run(id, timeout, waits.recheck, seen.is_none(), |run| {
                    run.status.is_terminal() || (seen.is_some() && !matches(&run_view(run.clone()).1))
                })
                .await?
        }
    };
    let (body, tag) = run_view(run);
    let mut response = if matches(&tag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, Json(body)).into_response()
    };
    if let Ok(value) = axum::http::HeaderValue::from_str(&tag) {
        response.headers_mut().insert(axum::http::header::ETAG, value);
    }
    Ok(response)
}

/// A run as `GET /api/v1/runs/{id}` shows it (redacted, with `waiting_on` while it waits on
/// something), and its entity tag: a digest of exactly that.
fn run_view(run: crate::core::model::RunView) -> (Value, String) {
    let waiting = waiting_on(&run);
    let mut body = serde_json::to_value(run.redacted()).unwrap_or(Value::Null);
    if let Some(w) = waiting {
        body["waiting_on"] = w;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(body.to_string().as_bytes());
    (body, format!("\"{}\"", hex::encode(&digest[..12])))
}

/// What a run that has not ended waits on, if anything: an approval (who may give it, how many
/// are needed, who gave one), or its newest step that waits (a signal, a timer, a child run)
/// or retries (with its last error).
fn waiting_on(run: &crate::core::model::RunView) -> Option<Value> {
    use crate::core::model::StepStatus;
    if run.status.is_terminal() {
        return None;
    }
    if let Some(pending) = crate::approval::PendingApproval::of(run) {
        return Some(json!({
            "kind": "approval",
            "name": pending.wait.name,
            "approvers": pending.request.approvers,
            "required": pending.request.required,
            "approved_by": pending.approved,
            "since": pending.wait.started_at,
            "until": pending.wait.wake_at,
        }));
    }
    let step = run
        .steps
        .iter()
        .rev()
        .find(|s| matches!(s.status, StepStatus::Waiting | StepStatus::Retrying))?;
    let mut w = json!({
        "kind": step.kind,
        "name": step.name,
        "status": step.status,
        "since": step.started_at,
        "until": step.wake_at,
        "attempts": step.attempts,
    });
    if step.status == StepStatus::Retrying {
        w["last_error"] = json!(step.last_error);
    }
    Some(w)
}

/// Whether an `If-None-Match` value names `tag` (a list, weak tags and `*` included).
fn etag_matches(header: &str, tag: &str) -> bool {
    header
        .split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == tag)
}

/// `wait=` as a duration.
fn parse_wait(text: &str) -> Result<std::time::Duration, ApiError> {
    humantime::parse_duration(text).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("wait: '{text}' is not a duration such as 30s or 2m ({e})"),
        )
    })
}

pub(crate) async fn run_events(State(engine): State<Engine>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let events = engine.events(parse_id(&id)?).await?;
    Ok(Json(json!({ "events": events })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelBody {
    reason: Option<String>,
}

pub(crate) async fn cancel_run(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    let reason = if body.is_empty() {
        None
    } else {
        serde_json::from_slice::<CancelBody>(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("cancel body: {e}")))?
            .reason
    };
    let status = engine.cancel(id, reason.as_deref(), &caller.name).await?;
    audit(
        &engine,
        &caller,
        "run.cancel",
        &id.to_string(),
        json!({ "reason": reason }),
    )
    .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "status": status, "cancel_requested": true })),
    ))
}

pub(crate) async fn signal_run(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Path((id, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    if crate::approval::is_reserved_signal(&name) {
        audit(
            &engine,
            &caller,
            "run.signal.refused",
            &id.to_string(),
            json!({ "signal": name }),
        )
        .await;
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "reserved_signal",
            format!(
                "the signal '{name}' is the engine's own and cannot be sent here; approve or reject with \
                 POST /api/v1/runs/{id}/approve or /reject (as yourself)"
            ),
        ));
    }
    let payload: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("signal payload is not JSON: {e}"),
            )
        })?
    };
    engine.signal(id, &name, payload, &caller.name).await?;
    audit(
        &engine,
        &caller,
        "run.signal",
        &id.to_string(),
        json!({ "signal": name }),
    )
    .await;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id, "signal": name }))))
}

/// An approve or reject call: why. Who decides is the caller.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct DecisionBody {
    /// If given, it must be the caller's identity: no one decides as someone else.
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    comment: Option<String>,
}

pub(crate) async fn approve_run(
    engine: State<Engine>,
    caller: Who,
    id: Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    decide(engine, caller, id, body, true).await
}

pub(crate) async fn reject_run(
    engine: State<Engine>,
    caller: Who,
    id: Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    decide(engine, caller, id, body, false).await
}

/// An approval or rejection, as the authenticated caller. A caller the gate would not count
/// (not an approver, the change's author, approved already) is refused here with why, and the
/// refusal is in the audit trail; the gate applies the same rule to what reaches it.
pub(crate) async fn decide(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
    Path(id): Path<String>,
    body: axum::body::Bytes,
    approve: bool,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    let action = if approve { "run.approve" } else { "run.reject" };
    let d: DecisionBody = if body.is_empty() {
        DecisionBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("decision body: {e}")))?
    };
    let refused = |why: String| {
        let (engine, caller, id) = (engine.clone(), caller.clone(), id);
        async move {
            audit(
                &engine,
                &caller,
                &format!("{action}.refused"),
                &id.to_string(),
                json!({ "why": why }),
            )
            .await;
            ApiError::new(StatusCode::FORBIDDEN, "forbidden", why)
        }
    };
    // `by` (the CLI's `--as`) only asserts who the caller is: the identity, or its bare name.
    if let Some(by) = d.by.as_deref()
        && by != caller.name
        && caller.name.split_once(':').map(|(_, bare)| bare) != Some(by)
    {
        return Err(refused(format!("{} cannot decide as '{by}'", caller.name)).await);
    }
    match engine.decide(id, &caller, approve, d.comment.clone()).await {
        Ok(()) => {}
        Err(EngineError::Forbidden(why)) => return Err(refused(why).await),
        Err(e) => return Err(e.into()),
    }
    audit(
        &engine,
        &caller,
        action,
        &id.to_string(),
        json!({ "comment": d.comment }),
    )
    .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "decision": if approve { "approve" } else { "reject" }, "by": caller.name })),
    ))
}

/// `POST /api/v1/runs/{id}/retry`: a failed or cancelled run started again, as a new run of
/// the same workflow with the same input (the stored one, not the redacted one shown) and
/// under the same concurrency key (queued for a slot). Retrying a run twice gives the first
/// retry back (`200`): a double click starts one run; to retry again, retry the newer run.
pub(crate) async fn retry_run(
    State(api): State<Api>,
    axum::Extension(caller): Who,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let engine = api.engine();
    let id = parse_id(&id)?;
    let run = engine.get_run(id).await?;
    if !matches!(run.status, RunStatus::Failed | RunStatus::Cancelled) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "run {id} is {}; only a failed or cancelled run can be retried",
                run.status
            ),
        ));
    }
    let mut req = StartRun::new(run.workflow.clone(), run.input);
    req.idempotency_key = Some(format!("retry:{id}"));
    req.started_by = Some(format!("api:{} (retry of {id})", caller.name));
    if let Some(key) = run.concurrency_key {
        let limit = crate::api::views::concurrency_limit(engine, id)
            .await?
            .unwrap_or(1)
            .max(1);
        req = req.concurrency(key, limit as u32, crate::core::model::ConcurrencyPolicy::Queue);
    }
    // A retry is a start through the API: the same policy applies to it.
    check_api_start(&api, &caller, &req)?;
    let started = engine.start(req).await?;
    if started.created {
        audit(
            engine,
            &caller,
            "run.retry",
            &id.to_string(),
            json!({ "run_id": started.id, "workflow": run.workflow }),
        )
        .await;
    }
    let status = if started.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "id": started.id, "status": started.status, "created": started.created, "retry_of": id })),
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SummaryQuery {
    since: Option<chrono::DateTime<chrono::Utc>>,
}

/// `GET /api/v1/runs/summary?since=`: how many runs were created since then (default: the
/// last 24 hours), by status.
pub(crate) async fn run_summary(
    State(engine): State<Engine>,
    q: Result<Query<SummaryQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q?;
    let since = q
        .since
        .unwrap_or_else(|| chrono::Utc::now() - chrono::Duration::hours(24));
    Ok(Json(crate::api::views::run_counts(&engine, since).await?))
}

/// `GET /api/v1/runs/{id}/trigger`: what started the run (see [`crate::api::views::trigger`]).
pub(crate) async fn run_trigger(State(engine): State<Engine>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let run = engine.get_run(parse_id(&id)?).await?;
    Ok(Json(crate::api::views::trigger(&engine, &run).await?))
}

/// `GET /api/v1/approvals`: the runs waiting at an approval gate (see [`crate::api::views::approvals`]).
pub(crate) async fn approvals(
    State(engine): State<Engine>,
    axum::Extension(caller): Who,
) -> Result<Json<Value>, ApiError> {
    let approvals = crate::api::views::approvals(&engine, &caller).await?;
    Ok(Json(json!({ "approvals": approvals })))
}

/// Whether `caller` may start `req` through the API: the config's policy on who starts the
/// workflow, and on the values of its guarded input fields ([`crate::policy`]). `Forbidden`
/// names the field or the rule.
pub(crate) fn check_api_start(api: &Api, caller: &Caller, req: &StartRun) -> Result<(), EngineError> {
    let (policy, registry) = (api.policy(), api.engine().registry());
    if registry.get(&req.workflow).is_none() {
        return Err(EngineError::UnknownWorkflow(req.workflow.clone()));
    }
    policy.may_start(caller, &req.workflow).map_err(EngineError::from)?;
    policy
        .check_input(&req.workflow, registry.guards_of(&req.workflow), &req.input)
        .map_err(EngineError::from)
}

/// Why a key given through the API is refused, if it is: too long, unprintable, or under a
/// prefix a trigger owns. `field` names it in the message.
fn check_api_key(field: &str, key: &str) -> Result<(), InvalidInput> {
    if key.is_empty() || key.len() > 200 || key.chars().any(char::is_control) {
        return Err(InvalidInput::from(format!(
            "{field} must be 1 to 200 printable characters"
        )));
    }
    if let Some(prefix) = TRIGGER_KEY_PREFIXES.iter().find(|p| key.starts_with(*p)) {
        return Err(InvalidInput::from(format!(
            "{field} may not start with '{prefix}': keys under {} belong to dayshift's triggers",
            TRIGGER_KEY_PREFIXES.join(", ")
        )));
    }
    Ok(())
}
