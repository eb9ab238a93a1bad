//! `/metrics`, in the OpenMetrics text format (which Prometheus scrapes).
//!
//! Two kinds of numbers:
//! - **what this process did**, counted as it happens: runs started and finished, step
//!   durations, retries, leases lost, runs recovered after a worker died, trigger deliveries,
//!   schedule lag. `serve` serves its own on `/metrics`, each worker on `worker.metrics-listen`;
//!   Prometheus sums them across processes.
//! - **what PostgreSQL says**, read at scrape time by `serve` (so every replica tells the same
//!   story and nothing is lost on restart): backup freshness, the queue's depth and lag.

use std::sync::OnceLock;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// The counters of this process.
pub struct Metrics {
    registry: Registry,
    runs_started: Family<Labels, Counter>,
    runs_finished: Family<Labels, Counter>,
    step_seconds: Family<Labels, Histogram>,
    step_retries: Family<Labels, Counter>,
    leases_lost: Counter,
    runs_recovered: Counter,
    deliveries: Family<Labels, Counter>,
    schedule_lag: Histogram,
}

fn step_histogram() -> Histogram {
    // 5 ms to about 45 minutes.
    Histogram::new(exponential_buckets(0.005, 4.0, 10))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let runs_started = Family::<Labels, Counter>::default();
        registry.register(
            "dayshift_runs_started",
            "Runs started, by workflow and trigger (api, schedule, webhook, alert, parent)",
            runs_started.clone(),
        );
        let runs_finished = Family::<Labels, Counter>::default();
        registry.register(
            "dayshift_runs_finished",
            "Runs finished, by workflow and outcome (succeeded, failed, cancelled)",
            runs_finished.clone(),
        );
        let step_seconds = Family::<Labels, Histogram>::new_with_constructor(step_histogram as fn() -> Histogram);
        registry.register(
            "dayshift_step_duration_seconds",
            "How long step attempts ran, by workflow and step",
            step_seconds.clone(),
        );
        let step_retries = Family::<Labels, Counter>::default();
        registry.register(
            "dayshift_step_retries",
            "Step attempts that failed and will be retried, by workflow and step",
            step_retries.clone(),
        );
        let leases_lost = Counter::default();
        registry.register(
            "dayshift_leases_lost",
            "Runs this worker stopped advancing because its lease had expired (another worker took over)",
            leases_lost.clone(),
        );
        let runs_recovered = Counter::default();
        registry.register(
            "dayshift_runs_recovered",
            "Runs claimed after the worker holding them stopped renewing its lease",
            runs_recovered.clone(),
        );
        let deliveries = Family::<Labels, Counter>::default();
        registry.register(
            "dayshift_trigger_deliveries",
            "Trigger deliveries (webhook, alertmanager, schedule) by source and result",
            deliveries.clone(),
        );
        let schedule_lag = Histogram::new(exponential_buckets(0.01, 4.0, 9));
        registry.register(
            "dayshift_schedule_lag_seconds",
            "How late schedule ticks started their run, after the tick time",
            schedule_lag.clone(),
        );
        Self {
            registry,
            runs_started,
            runs_finished,
            step_seconds,
            step_retries,
            leases_lost,
            runs_recovered,
            deliveries,
            schedule_lag,
        }
    }

    pub(crate) fn run_started(&self, workflow: &str, started_by: &str) {
        let trigger = started_by.split(':').next().unwrap_or("api");
        self.runs_started
            .get_or_create(&vec![("workflow", workflow.into()), ("trigger", trigger.into())])
            .inc();
    }

    pub(crate) fn run_finished(&self, workflow: &str, outcome: &str) {
        self.runs_finished
            .get_or_create(&vec![("workflow", workflow.into()), ("outcome", outcome.into())])
            .inc();
    }

    /// `step` is labelled by its family, the name up to its first `:` (`action:1:restart
    /// Deployment prod-web/web` is `action`): names carry data (alert labels, counters) that
    /// would make the series grow without bound.
    pub(crate) fn step_attempt(&self, workflow: &str, step: &str, seconds: f64, retrying: bool) {
        let family = step.split(':').next().unwrap_or(step);
        let family: String = family.chars().take(64).collect();
        let labels = vec![("workflow", workflow.into()), ("step", family)];
        self.step_seconds.get_or_create(&labels).observe(seconds);
        if retrying {
            self.step_retries.get_or_create(&labels).inc();
        }
    }

    pub(crate) fn lease_lost(&self) {
        self.leases_lost.inc();
    }

    pub(crate) fn run_recovered(&self) {
        self.runs_recovered.inc();
    }

    pub(crate) fn delivery(&self, source: &str, result: &str) {
        self.deliveries
            .get_or_create(&vec![("source", source.into()), ("result", result.into())])
            .inc();
    }

    pub(crate) fn schedule_lag(&self, seconds: f64) {
        self.schedule_lag.observe(seconds.max(0.0));
    }
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The content type of what [`render`] and [`render_process`] return.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// This process's counters (a worker's `/metrics`).
pub fn render_process() -> String {
    let mut out = encode();
    out.push_str("# EOF\n");
    out
}

pub(crate) fn encode() -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &metrics().registry).expect("writing to a String");
    // Gauges from PostgreSQL follow; the end marker goes after them.
    out.strip_suffix("# EOF\n").map(str::to_string).unwrap_or(out)
}

/// A label value as the exposition format wants it.
pub(crate) fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::{escape, metrics, render_process};

    #[test]
    fn step_series_are_per_step_family_whatever_the_names_carry() {
        for target in ["prod-web/web", "prod-web/api", "staging/x"] {
            metrics().step_attempt(
                "test.families",
                &format!("action:1:restart Deployment {target}"),
                0.1,
                false,
            );
        }
        let text = render_process();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("dayshift_step_duration_seconds_count") && l.contains("test.families"))
            .collect();
        assert_eq!(series.len(), 1, "{series:?}");
        assert!(series[0].contains("step=\"action\""), "{series:?}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
