//! Logs and traces of a dayshift process.
//!
//! Logs go to stderr, as text or JSON (`log.format`); inside a run, every line carries the
//! run id, workflow and worker (the pass span) and, inside a step, the step and attempt.
//!
//! Traces go to an OpenTelemetry collector over OTLP/HTTP when `telemetry.otlp-endpoint` (or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) is set. The batch exporter runs on its own thread with a
//! bounded queue: a collector that is down or slow costs dropped spans, never a blocked or
//! failed step. Only dayshift's own spans are exported (not those of the HTTP clients, the
//! exporter's included).

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{Config, LogFormat};

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Sets up logging, and tracing for `role` (`serve`, `worker`) when an endpoint is configured.
pub(crate) fn init(config: &Config, role: Option<&str>) {
    use std::io::IsTerminal;
    let level = std::env::var("DAYSHIFT_LOG").unwrap_or_else(|_| config.log.level.clone());
    let logs = match config.log.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let endpoint = config
        .telemetry
        .otlp_endpoint
        .clone()
        .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
        .filter(|e| !e.is_empty());
    let traces = match (role, endpoint) {
        (Some(role), Some(endpoint)) => match provider(config, role, &endpoint) {
            Ok(provider) => {
                let tracer = provider.tracer("dayshift");
                let _ = PROVIDER.set(provider);
                // dayshift's own spans and events only: not the HTTP clients' (the exporter's
                // own requests would trace themselves).
                let ours = tracing_subscriber::filter::filter_fn(|m| {
                    m.target().starts_with("dayshift") && *m.level() <= tracing::Level::INFO
                });
                Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours))
            }
            Err(e) => {
                eprintln!("warning: traces are off: {e}");
                None
            }
        },
        _ => None,
    };
    // One filter for both (per-layer filters on both layers lost span context and events):
    // the log level, raised to info for dayshift's own spans and events when they are traced.
    let traced = if traces.is_some() {
        ",dayshift=info,dayshift_engine=info,dayshift_workflows=info"
    } else {
        ""
    };
    // PostgreSQL's notices ("relation already exists, skipping") are not news.
    let filter = EnvFilter::try_new(format!("{level}{traced},sqlx::postgres::notice=warn"))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init();
}

fn provider(config: &Config, role: &str, endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_timeout(Duration::from_secs(3))
        .build()?;
    let instance = format!(
        "{}-{}",
        hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    );
    let resource = Resource::builder()
        .with_service_name(config.telemetry.service_name.clone())
        .with_attributes([
            KeyValue::new("service.instance.id", instance),
            KeyValue::new("dayshift.role", role.to_string()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    let ratio = config.telemetry.sample_ratio.clamp(0.0, 1.0);
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))))
        .with_batch_exporter(exporter)
        .build())
}

/// Sends the spans still queued (a few seconds at most) and stops the exporter. Called outside
/// the async runtime (the exporter's HTTP client is a blocking one).
pub(crate) fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
        let _ = p.shutdown();
    }
}
