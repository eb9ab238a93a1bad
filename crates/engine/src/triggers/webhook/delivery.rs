//! A delivery, whole: verified, parsed once, loop-protected, routed, its runs started and what
//! it led to recorded, with a typed outcome and the one mapping of outcomes to HTTP statuses.

use serde::Serialize;
use serde_json::Value;

use sha2::Digest as _;

use crate::core::error::EngineError;
use crate::core::metrics::metrics;
use crate::core::store::webhooks::DeliveryRow;
use crate::engine::Engine;
use crate::triggers::intake::Refusal;
use crate::triggers::webhook::event::{EventKind, Forge, HookError, Parsed};
use crate::triggers::webhook::parse::parse_payload;
use crate::triggers::webhook::routes::Webhooks;
use crate::triggers::webhook::verify::{Headers, verify};

/// What a delivery led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// A route started a run.
    #[serde(rename = "started")]
    Started,
    /// Every run the routes name was started for an earlier delivery of the same event.
    #[serde(rename = "duplicate")]
    Duplicate,
    /// No route matches the event.
    #[serde(rename = "no route")]
    NoRoute,
    /// Pushed by dayshift itself: its own commits start nothing.
    #[serde(rename = "ignored")]
    Ignored,
    /// An event dayshift does not act on.
    #[serde(rename = "not handled")]
    NotHandled,
    /// The forge checking the hook.
    #[serde(rename = "pong")]
    Pong,
    /// Routes match but none could start its run (the errors say why).
    #[serde(rename = "failed")]
    Failed,
}

impl Outcome {
    /// As recorded in `webhook_deliveries.outcome` and the metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Duplicate => "duplicate",
            Self::NoRoute => "no route",
            Self::Ignored => "ignored",
            Self::NotHandled => "not handled",
            Self::Pong => "pong",
            Self::Failed => "failed",
        }
    }

    /// The HTTP status the forge gets: 200 for what needs nothing more, 422 when routes
    /// matched and none could start, 202 for the rest (accepted, runs on their way).
    pub fn status(self) -> u16 {
        match self {
            Self::Pong | Self::Duplicate => 200,
            Self::Failed => 422,
            Self::Started | Self::NoRoute | Self::Ignored | Self::NotHandled => 202,
        }
    }
}

/// What a delivery led to, as the forge's response shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryOutcome {
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<StartedByRoute>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// A run a route started (or had started for an earlier delivery of the same event).
#[derive(Debug, Clone, Serialize)]
pub struct StartedByRoute {
    pub route: String,
    pub workflow: String,
    pub run_id: crate::core::model::RunId,
    pub duplicate: bool,
}

impl DeliveryOutcome {
    fn new(outcome: Outcome) -> Self {
        Self {
            outcome,
            event: None,
            reason: None,
            runs: Vec::new(),
            errors: Vec::new(),
        }
    }
}

/// Takes one delivery of `forge` whose body has been read: checks its signature or token,
/// reads it (once), then routes it ([`deliver`]).
pub async fn receive(
    engine: &Engine,
    hooks: &Webhooks,
    forge: Forge,
    secret: &[u8],
    headers: &(dyn Headers + Sync),
    body: &[u8],
) -> Result<DeliveryOutcome, Refusal> {
    if let Err(e) = verify(forge, headers, body, secret) {
        tracing::warn!(forge = forge.as_str(), error = %e, "Webhook delivery refused.");
        metrics().delivery(forge.as_str(), "refused");
        return Err(e.into());
    }
    let payload: Value =
        serde_json::from_slice(body).map_err(|e| HookError::BadRequest(format!("body is not JSON: {e}")))?;
    let parsed = parse_payload(forge, headers, &payload)?;
    let digest = hex::encode(sha2::Sha256::digest(body));
    // The delivery's span: the runs it starts link to it.
    let span =
        tracing::info_span!("webhook", otel.name = %format!("webhook {}", forge.as_str()), forge = forge.as_str());
    let outcome =
        tracing::Instrument::instrument(deliver(engine, hooks, forge, parsed, &payload, &digest), span).await?;
    metrics().delivery(forge.as_str(), outcome.outcome.as_str());
    Ok(outcome)
}

/// Handles one authenticated, parsed delivery: loop protection, routing, starting runs,
/// recording. `Err` only when the store or queue failed.
async fn deliver(
    engine: &Engine,
    hooks: &Webhooks,
    forge: Forge,
    parsed: Parsed,
    payload: &Value,
    body_sha256: &str,
) -> Result<DeliveryOutcome, EngineError> {
    let store = engine.store();
    let (mut out, mut event) = match parsed {
        Parsed::Ping => (DeliveryOutcome::new(Outcome::Pong), None),
        Parsed::NotHandled(what) => {
            let mut o = DeliveryOutcome::new(Outcome::NotHandled);
            o.event = Some(what);
            (o, None)
        }
        Parsed::Event(e) => {
            let mut o = DeliveryOutcome::new(Outcome::NoRoute);
            o.event = Some(e.kind.as_str().to_string());
            (o, Some(e))
        }
    };
    // The event type is not signed: a body is bound to the one it first came as.
    let kind = out.event.clone().unwrap_or_else(|| "ping".into());
    let before = store
        .delivered_as_other_event(forge.as_str(), body_sha256, &kind)
        .await?;
    if let Some(first) = before {
        return Err(EngineError::Conflict(format!(
            "this signed body was delivered before as a {first} event; it is not taken again as {kind}"
        )));
    }
    if let Some(e) = &mut event
        && e.kind == EventKind::Tag
    {
        let deleted = store
            .tag_deletions(forge.as_str(), &e.repository, e.tag.as_deref().unwrap_or_default())
            .await?;
        e.generation = deleted as u64;
    }
    if let Some(e) = &event {
        // Told even for dayshift's own pushes: a refresh only reads.
        for watch in hooks.watches.iter().filter(|w| w.matches(e)) {
            watch.pushed.notify_one();
            out.reason = Some(format!(
                "refreshes what serve keeps of {}#{}",
                watch.repository, watch.branch
            ));
        }
        if let Some(run) = e.pushed_by_dayshift(&hooks.bot_emails) {
            out.outcome = Outcome::Ignored;
            out.reason = Some(format!("pushed by dayshift ({run}); its own commits start nothing"));
        } else {
            for route in hooks.routes.iter().filter(|r| r.matches(e)) {
                let req = match route.start_request(e, payload) {
                    Ok(req) => req,
                    Err(err) => {
                        out.errors.push(format!("route '{}': {err}", route.name.value));
                        continue;
                    }
                };
                match engine.start(req).await {
                    Ok(started) => out.runs.push(StartedByRoute {
                        route: route.name.value.clone(),
                        workflow: route.workflow.value.clone(),
                        run_id: started.id,
                        duplicate: !started.created,
                    }),
                    Err(
                        err @ (EngineError::InvalidInput { .. }
                        | EngineError::UnknownWorkflow(_)
                        | EngineError::BadRequest(_)
                        | EngineError::Conflict(_)),
                    ) => out.errors.push(format!("route '{}': {err}", route.name.value)),
                    Err(err) => return Err(err),
                }
            }
            if !out.runs.is_empty() {
                out.outcome = if out.runs.iter().all(|r| r.duplicate) {
                    Outcome::Duplicate
                } else {
                    Outcome::Started
                };
            } else if !out.errors.is_empty() {
                out.outcome = Outcome::Failed;
            }
        }
    }
    let run_ids: Vec<uuid::Uuid> = out.runs.iter().map(|r| r.run_id.0).collect();
    store
        .record_delivery(DeliveryRow {
            forge: forge.as_str(),
            delivery_id: event.as_ref().and_then(|e| e.delivery.clone()),
            event: out.event.clone().unwrap_or_else(|| "ping".into()),
            repository: event.as_ref().map(|e| e.repository.clone()),
            identity: event.as_ref().map(|e| e.identity()),
            outcome: out.outcome.as_str(),
            detail: out
                .reason
                .clone()
                .or_else(|| (!out.errors.is_empty()).then(|| out.errors.join("; "))),
            run_ids,
            body_sha256,
        })
        .await?;
    tracing::info!(forge = forge.as_str(), event = ?out.event, outcome = out.outcome.as_str(), runs = out.runs.len(), "Webhook delivery handled.");
    Ok(out)
}
