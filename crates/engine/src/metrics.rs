//! `/metrics` in the Prometheus text exposition format.
//!
//! What is served is read from PostgreSQL at scrape time, so every `serve` replica tells the
//! same story and nothing is lost on restart.

use std::fmt::Write;

use crate::engine::Engine;
use crate::error::EngineError;

/// The metrics, rendered.
pub(crate) async fn render(engine: &Engine) -> Result<String, EngineError> {
    let mut out = String::new();
    out.push_str(
        "# HELP dayshift_workflow_last_success_timestamp_seconds When the last successful run for this source finished (Unix time).\n\
         # TYPE dayshift_workflow_last_success_timestamp_seconds gauge\n",
    );
    for (workflow, field) in engine.inner.registry.freshness_fields() {
        for (source, at) in engine.inner.store.last_successes(workflow, field).await? {
            let _ = writeln!(
                out,
                "dayshift_workflow_last_success_timestamp_seconds{{workflow=\"{}\",source=\"{}\"}} {}",
                escape(workflow),
                escape(&source),
                at.timestamp_millis() as f64 / 1000.0
            );
        }
    }
    Ok(out)
}

/// A label value as the exposition format wants it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
