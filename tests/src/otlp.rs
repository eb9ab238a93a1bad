//! An OTLP/HTTP trace receiver stand-in ([`OtlpReceiver`]) that keeps every span it is sent.

use std::sync::Arc;

/// One span an [`OtlpReceiver`] received.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    pub attributes: std::collections::BTreeMap<String, String>,
    /// The resource's attributes (`service.name`, `service.instance.id`, ...).
    pub resource: std::collections::BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
}

/// An OTLP/HTTP trace receiver on loopback (`POST /v1/traces`, protobuf), as an OpenTelemetry
/// collector's `otlp` receiver takes them; it keeps every span.
pub struct OtlpReceiver {
    /// The endpoint to configure (`telemetry.otlp-endpoint`).
    pub url: String,
    spans: Arc<std::sync::Mutex<Vec<ReceivedSpan>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl OtlpReceiver {
    pub async fn start() -> Self {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
        use prost::Message as _;
        let spans: Arc<std::sync::Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let sink = spans.clone();
        let text = |kv: &[opentelemetry_proto::tonic::common::v1::KeyValue]| {
            kv.iter()
                .map(|a| {
                    let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(Any::StringValue(s)) => s.clone(),
                        Some(Any::IntValue(i)) => i.to_string(),
                        Some(Any::BoolValue(b)) => b.to_string(),
                        Some(Any::DoubleValue(d)) => d.to_string(),
                        other => format!("{other:?}"),
                    };
                    (a.key.clone(), v)
                })
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                        return axum::http::StatusCode::BAD_REQUEST;
                    };
                    let mut got = sink.lock().unwrap();
                    for rs in req.resource_spans {
                        let resource = rs.resource.map(|r| text(&r.attributes)).unwrap_or_default();
                        for ss in rs.scope_spans {
                            for span in ss.spans {
                                got.push(ReceivedSpan {
                                    trace_id: hex::encode(&span.trace_id),
                                    span_id: hex::encode(&span.span_id),
                                    parent_span_id: hex::encode(&span.parent_span_id),
                                    name: span.name.clone(),
                                    attributes: text(&span.attributes),
                                    resource: resource.clone(),
                                    links: span
                                        .links
                                        .iter()
                                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                                        .collect(),
                                });
                            }
                        }
                    }
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, spans, server }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}
