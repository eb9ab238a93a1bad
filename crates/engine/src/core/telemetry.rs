//! Traces: one per run.
//!
//! A run's trace begins when the run is created, with a short root span `run <workflow>`
//! linked to whatever started it (the webhook delivery, alert notification or schedule tick
//! span, or the parent's step for a child run). Its W3C trace context is stored with the run
//! in PostgreSQL, so every worker that advances the run later (the job on Redis carries the run
//! id, and a run re-enqueued by the sweeper finds the same context) opens its pass span as a
//! child of that root: the spans of one run on several workers join up. Each step attempt is a
//! span within its pass.
//!
//! Without an OpenTelemetry exporter configured, spans have no valid context and nothing is
//! stored.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C `traceparent` of `span`, if it is traced.
pub(crate) fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// The context a W3C `traceparent` names, as a remote parent.
pub(crate) fn remote(traceparent: &str) -> Option<opentelemetry::Context> {
    let mut parts = traceparent.split('-');
    let (Some("00"), Some(trace), Some(span), Some(flags), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    sc.is_valid()
        .then(|| opentelemetry::Context::new().with_remote_span_context(sc))
}

/// Begins the trace of a new run of `workflow`: a root span linked to the span current now
/// (the trigger). Returns its `traceparent`, to be stored with the run.
pub(crate) fn begin_run(workflow: &str) -> Option<String> {
    let trigger = tracing::Span::current().context().span().span_context().clone();
    let root = tracing::info_span!(parent: None, "run", otel.name = %format!("run {workflow}"), workflow = %workflow);
    if trigger.is_valid() {
        root.add_link(trigger);
    }
    traceparent(&root)
}

/// The span of one pass of a worker over a run, a child of the run's root span.
pub(crate) fn pass_span(run_id: &str, workflow: &str, worker: &str, traceparent: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "pass",
        otel.name = %format!("pass {workflow}"),
        run_id = %run_id,
        workflow = %workflow,
        worker = %worker,
    );
    if let Some(cx) = traceparent.and_then(remote) {
        let _ = span.set_parent(cx);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::remote;
    use opentelemetry::trace::TraceContextExt as _;

    #[test]
    fn a_traceparent_is_read_back() {
        let cx = remote("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let sc = cx.span().span_context().clone();
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert!(remote("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(remote("garbage").is_none());
    }
}
