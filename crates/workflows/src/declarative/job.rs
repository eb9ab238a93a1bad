//! The `kubernetes.job` action: an image run to completion as a Kubernetes Job, the escape hatch
//! for everything dayshift has no adapter for (`mysqldump`, `occ`, `mmctl`, `redis-cli`).
//!
//! Each attempt of the step is one look at the Job, so no worker is held while it runs: the
//! first creates it (its name derived from the run and the step, so a repeat finds the same
//! Job instead of starting another), the next ones find it still running and are retried,
//! paced; the one that finds it finished reads the tail of its pod's log and its exit code,
//! deletes the Job (its pods with it) and ends the step.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest as _;

use crate::adapters::kube::{Kube, ObjectId, Resource};
use crate::adapters::step_err;
use dayshift_engine::{StepCtx, StepError};

/// The container's name in the Job's pod.
const CONTAINER: &str = "job";

/// The Job action's parameters.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct JobParams {
    #[serde(default = "default_cluster")]
    pub connection: String,
    namespace: String,
    /// The Job's name is this, a dash, and 8 hex digits of the run and step.
    name: String,
    image: String,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Variable → `secret/key`, read by the kubelet from a Secret of the Job's namespace.
    #[serde(default)]
    secret_env: BTreeMap<String, String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default, with = "humantime_serde")]
    deadline: Option<Duration>,
    #[serde(default)]
    log_lines: Option<i64>,
}

fn default_cluster() -> String {
    "default".into()
}

fn permanent(what: String) -> StepError {
    StepError::permanent(format!("action kubernetes.job: {what}"))
}

/// Whether `s` is a Kubernetes name (DNS label or subdomain).
fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Whether `s` is an environment variable name a container takes (`C_IDENTIFIER`).
fn is_variable(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl JobParams {
    /// The Job this step runs: its name and the object, every parameter checked.
    fn job(&self, s: &StepCtx) -> Result<(String, Value), StepError> {
        if !is_name(&self.namespace, 63) {
            return Err(permanent(format!(
                "namespace {:?} is not a Kubernetes name",
                self.namespace
            )));
        }
        if !is_name(&self.name, 54) || self.name.contains('.') {
            return Err(permanent(format!(
                "name {:?} must be a Kubernetes name of at most 54 characters without dots (the Job is <name>-<8 hex digits>)",
                self.name
            )));
        }
        if self.image.trim().is_empty() || self.image.chars().any(char::is_whitespace) {
            return Err(permanent(format!("image {:?} is not an image reference", self.image)));
        }
        let lines = self.log_lines.unwrap_or(20);
        if !(0..=1000).contains(&lines) {
            return Err(permanent(format!("log-lines must be 0 to 1000, not {lines}")));
        }
        let mut env: Vec<Value> = vec![
            json!({ "name": "DAYSHIFT_RUN_ID", "value": s.run_id.to_string() }),
            json!({ "name": "DAYSHIFT_STEP", "value": s.step }),
        ];
        for (var, value) in &self.env {
            if !is_variable(var) || var.starts_with("DAYSHIFT_") {
                return Err(permanent(format!("env: {var:?} is not a variable name a step may set")));
            }
            env.push(json!({ "name": var, "value": value }));
        }
        for (var, reference) in &self.secret_env {
            if !is_variable(var) || var.starts_with("DAYSHIFT_") || self.env.contains_key(var) {
                return Err(permanent(format!(
                    "secret-env: {var:?} is not a variable name a step may set (or env sets it too)"
                )));
            }
            let Some((secret, key)) = reference.split_once('/') else {
                return Err(permanent(format!(
                    "secret-env.{var}: {reference:?} is not <secret>/<key>"
                )));
            };
            let key_ok = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
            if !is_name(secret, 253) || !key_ok {
                return Err(permanent(format!(
                    "secret-env.{var}: {reference:?} is not <secret>/<key>"
                )));
            }
            env.push(json!({ "name": var, "valueFrom": { "secretKeyRef": { "name": secret, "key": key } } }));
        }
        if let Some(sa) = &self.service_account
            && !is_name(sa, 253)
        {
            return Err(permanent(format!("service-account {sa:?} is not a Kubernetes name")));
        }
        let deadline = self.deadline.unwrap_or(Duration::from_secs(3600)).as_secs().max(1);
        let digest = sha2::Sha256::digest(format!("{}/{}", s.run_id, s.step));
        let name = format!("{}-{}", self.name, &hex::encode(digest)[..8]);
        let labels = json!({ "app.kubernetes.io/managed-by": "dayshift", "dayshift.io/run": s.run_id.to_string() });
        let mut pod = json!({
            "restartPolicy": "Never",
            // A Job needs no API token unless it runs as a service account named for it.
            "automountServiceAccountToken": self.service_account.is_some(),
            "containers": [{ "name": CONTAINER, "image": self.image, "env": env }],
        });
        if !self.command.is_empty() {
            pod["containers"][0]["command"] = json!(self.command);
        }
        if !self.args.is_empty() {
            pod["containers"][0]["args"] = json!(self.args);
        }
        if let Some(sa) = &self.service_account {
            pod["serviceAccountName"] = json!(sa);
        }
        let job = json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": { "name": name, "namespace": self.namespace, "labels": labels,
                          "annotations": { "dayshift.io/step": s.step } },
            "spec": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": deadline,
                // Kubernetes removes it a day after it ends if dayshift has not (a cancelled run).
                "ttlSecondsAfterFinished": 86400,
                "template": { "metadata": { "labels": labels }, "spec": pod },
            },
        });
        Ok((name, job))
    }

    /// One attempt: create the Job, or see how it is doing; once it has ended, collect its
    /// exit code and log, delete it, and give the output (or fail with its log).
    pub(crate) async fn run(&self, kube: &Kube, s: &StepCtx) -> Result<Value, StepError> {
        let (name, job) = self.job(s)?;
        let r = Resource::builtin("batch/v1", "Job").expect("Job is a built-in kind");
        let id = ObjectId {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            namespace: Some(self.namespace.clone()),
            name: name.clone(),
        };
        let Some(found) = kube.get(&r, &id).await.map_err(step_err)? else {
            kube.apply(&r, &job, "dayshift", false).await.map_err(step_err)?;
            return Err(StepError::transient(format!("{id} started")));
        };
        let conditions = found["status"]["conditions"].as_array().cloned().unwrap_or_default();
        let ended = |kind: &str| conditions.iter().find(|c| c["type"] == kind && c["status"] == "True");
        let (complete, failed) = (ended("Complete").cloned(), ended("Failed").cloned());
        if complete.is_none() && failed.is_none() {
            let active = found["status"]["active"].as_i64().unwrap_or(0);
            return Err(StepError::transient(format!("{id} is still running ({active} active)")));
        }
        // Its pod: the exit code and the log's tail.
        let pods = Resource::builtin("v1", "Pod").expect("Pod is a built-in kind");
        let selector = format!("job-name={name}");
        let mut found_pods = kube
            .list(&pods, Some(&self.namespace), Some(&selector), 10)
            .await
            .map_err(step_err)?;
        found_pods.sort_by(|a, b| {
            let t = |p: &Value| {
                p["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            };
            t(a).cmp(&t(b))
        });
        let (mut exit_code, mut logs) = (Value::Null, String::new());
        if let Some(pod) = found_pods.last() {
            let state = &pod["status"]["containerStatuses"][0]["state"];
            exit_code = state["terminated"]["exitCode"].clone();
            let lines = self.log_lines.unwrap_or(20);
            let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
            if lines > 0 && state["terminated"].is_object() {
                logs = kube
                    .pod_log_tail(&self.namespace, pod_name, CONTAINER, lines)
                    .await
                    .map_err(step_err)?;
            }
            if let Some(why) = state["waiting"]["message"].as_str() {
                logs = why.to_string();
            }
        }
        kube.delete(&r, &id).await.map_err(step_err)?;
        if let Some(f) = failed {
            return Err(StepError::permanent(format!(
                "{id} failed ({}; exit code {exit_code}): {}",
                f["message"].as_str().or(f["reason"].as_str()).unwrap_or("no message"),
                if logs.trim().is_empty() {
                    "no log"
                } else {
                    logs.trim_end()
                }
            )));
        }
        Ok(json!({ "job": name, "succeeded": true, "exit_code": exit_code, "logs": logs }))
    }
}
