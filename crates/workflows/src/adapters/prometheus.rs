//! Instant queries to a Prometheus (or anything serving its HTTP API: Thanos, Mimir,
//! VictoriaMetrics) named in `connections.prometheus`. Reads only, so repeating one is harmless.
//!
//! The bearer token, when there is one, is a credential: it never appears in errors.

use serde_json::{Value, json};

use crate::config::{InvalidConfig, SecretReader, SecretSource};

/// Why a query gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("Prometheus could not be reached: {0}")]
    Unreachable(String),
    /// Prometheus answered with an error (`bad_data` for a query that does not parse).
    #[error("Prometheus answered {status} ({kind}): {message}")]
    Refused { status: u16, kind: String, message: String },
}

impl PromError {
    /// Whether asking again may work: network trouble, a timeout, throttling, a server error.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) => true,
            Self::Refused { status, kind, .. } => *status == 429 || *status >= 500 || kind == "timeout",
        }
    }
}

// `connections.prometheus.<name>` as the config file gives it.
/// A Prometheus HTTP API.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrometheusConnectionConfig {
    /// Its base URL, e.g. `http://prometheus-operated.monitoring:9090`.
    pub url: String,
    /// Where a bearer token is, if it needs one.
    #[serde(default)]
    pub token: Option<SecretSource>,
}

impl PrometheusConnectionConfig {
    /// The connection with its token read; `key` is where it is in the config.
    pub fn resolve(&self, key: &str, read: SecretReader<'_>) -> Result<PrometheusConfig, InvalidConfig> {
        let url = self.url.trim_end_matches('/').to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(InvalidConfig::new(
                format!("{key}.url"),
                "must start with http:// or https://",
            ));
        }
        let token = match &self.token {
            Some(src) => Some(read.text(src, &format!("{key}.token"))?.trim().to_string()),
            None => None,
        };
        Ok(PrometheusConfig { url, token })
    }
}

/// A resolved `connections.prometheus` entry. `Debug` leaves the token out.
#[derive(Clone)]
pub struct PrometheusConfig {
    pub url: String,
    pub token: Option<String>,
}

impl std::fmt::Debug for PrometheusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusConfig")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The answer to an instant query, as a workflow reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// `vector`, `scalar` or `string` (`matrix` is refused: an instant query does not give one).
    pub kind: String,
    /// For a vector, one `{labels, value}` per series; for a scalar or string, one `{labels: {},
    /// value}`.
    pub series: Vec<Value>,
}

impl Answer {
    /// The value when there is exactly one series (a scalar, or `count(...)`); `None` otherwise.
    pub fn value(&self) -> Option<&Value> {
        match self.series.as_slice() {
            [one] => Some(&one["value"]),
            _ => None,
        }
    }
}

impl PrometheusConfig {
    /// The instant query `query`, evaluated now, with Prometheus' own timeout of `timeout`.
    pub async fn query(&self, query: &str, timeout: std::time::Duration) -> Result<Answer, PromError> {
        let mut url = url::Url::parse(&format!("{}/api/v1/query", self.url))
            .map_err(|e| PromError::Unreachable(format!("not a URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("query", query)
            .append_pair("timeout", &format!("{}s", timeout.as_secs().max(1)));
        let mut request = super::http::client().get(url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|e| PromError::Unreachable(e.without_url().to_string()))?;
        let status = response.status().as_u16();
        let body: Value = response
            .json()
            .await
            .map_err(|e| PromError::Unreachable(format!("not a Prometheus API answer: {}", e.without_url())))?;
        if body["status"] != "success" {
            return Err(PromError::Refused {
                status,
                kind: body["errorType"].as_str().unwrap_or("unknown").to_string(),
                message: body["error"]
                    .as_str()
                    .unwrap_or("no message")
                    .chars()
                    .take(300)
                    .collect(),
            });
        }
        parse(&body["data"]).map_err(|message| PromError::Refused {
            status,
            kind: "bad_answer".into(),
            message,
        })
    }
}

/// A sample's value as a number; Prometheus writes it as a string (`"1"`, `"NaN"`, `"+Inf"`),
/// and a number JSON cannot hold stays a string.
fn number(v: &Value) -> Value {
    let text = v.as_str().unwrap_or_default();
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => json!(f),
        _ => json!(text),
    }
}

fn parse(data: &Value) -> Result<Answer, String> {
    let kind = data["resultType"].as_str().unwrap_or_default().to_string();
    let series = match kind.as_str() {
        "vector" => data["result"]
            .as_array()
            .ok_or("a vector without a result list")?
            .iter()
            .map(|s| json!({ "labels": s["metric"], "value": number(&s["value"][1]) }))
            .collect(),
        "scalar" => vec![json!({ "labels": {}, "value": number(&data["result"][1]) })],
        "string" => vec![json!({ "labels": {}, "value": data["result"][1] })],
        other => return Err(format!("an instant query gave a {other:?}, not a vector or a scalar")),
    };
    Ok(Answer { kind, series })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_and_scalars_become_series_with_numbers() {
        let v = parse(&json!({ "resultType": "vector", "result": [
            { "metric": { "alertname": "A" }, "value": [1.5, "2"] },
            { "metric": { "alertname": "B" }, "value": [1.5, "NaN"] },
        ]}))
        .unwrap();
        assert_eq!(v.series[0], json!({ "labels": { "alertname": "A" }, "value": 2.0 }));
        assert_eq!(v.series[1]["value"], json!("NaN"));
        assert_eq!(v.value(), None);
        let s = parse(&json!({ "resultType": "scalar", "result": [1.5, "0.25"] })).unwrap();
        assert_eq!(s.value(), Some(&json!(0.25)));
        assert!(
            parse(&json!({ "resultType": "matrix", "result": [] }))
                .unwrap_err()
                .contains("matrix")
        );
    }
}
