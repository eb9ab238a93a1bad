//! `remediate`: an Alertmanager playbook run. An alert route starts it with the alert; the
//! playbook (config `playbooks.<name>`) says which actions to take, with inputs from the alert's
//! labels and annotations. After acting it waits for the alert's `resolved` signal: resolved,
//! the run succeeds and notes how long it took; not resolved, it escalates.
//!
//! Guardrails beyond the trigger's cooldowns: a plan step renders every action first (a label
//! the alert lacks fails the run before anything is done), checks the namespace allow-list and
//! the blast radius (replica bounds); dry-run records the plan and does nothing.

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{Ctx, RetryPolicy, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::adapters::kube::{Kube, Workload, WorkloadKind};
use crate::adapters::step_err;
use crate::config::{InvalidConfig, default_connection, ten_minutes};
use crate::connections::{Connections, lookup};
use crate::gates::checked_gate;

dayshift_engine::message_error!(
    /// A label value that is not the Kubernetes name it is used as.
    InvalidName
);

/// A playbook, as the config gives it.
#[derive(Debug, Clone, Default)]
pub struct Playbook {
    pub kubernetes: String,
    /// Record what would be done; do nothing.
    pub dry_run: bool,
    /// Namespaces actions may touch (globs; `"*"` for all, written out). None if empty.
    pub namespaces: Vec<globset::GlobMatcher>,
    pub actions: Vec<ActionSpec>,
    /// How long to wait for the alert to resolve.
    pub wait_resolved: Duration,
    /// A notice webhook told when the alert does not resolve.
    pub escalate_notify: Option<String>,
    /// Never scale above this many replicas.
    pub max_replicas: Option<i32>,
    /// Taken, after the escalation notice, when the alert does not resolve.
    pub escalate_actions: Vec<ActionSpec>,
    /// Approvals required before the first action marked destructive.
    pub approval: Option<crate::gates::ApprovalGate>,
}

/// One action with its parameters (placeholders `{{ labels.* }}`, `{{ annotations.* }}`).
#[derive(Debug, Clone, PartialEq)]
pub struct ActionSpec {
    pub action: String,
    pub with: Value,
    /// Waits for the playbook's approval gate before it is taken.
    pub destructive: bool,
}

// `playbooks.<name>` as the config file gives it; `check` makes the `Playbook` that `remediate`
// runs. (Its doc comment is the schema's description.)
/// A remediation playbook.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PlaybookConfig {
    /// The Kubernetes connection. Default `default`.
    #[serde(default = "default_connection")]
    pub kubernetes: String,
    /// Record what would be done and do nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Namespaces the actions may touch (globs: `prod-*`; `"*"` means all and must be written
    /// out). Required when an action acts in a namespace.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Never scale above this many replicas.
    #[serde(default)]
    pub max_replicas: Option<i32>,
    /// In order: `{ action: kube.rollout-restart | kube.scale | notify, with: {...} }`, the
    /// `with` values may hold `{{ labels.* }}` and `{{ annotations.* }}`.
    pub actions: Vec<ActionConfig>,
    /// How long to wait for the alert to resolve. Default 10m.
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub wait_resolved: Duration,
    /// A notice webhook told when the alert does not resolve.
    #[serde(default)]
    pub escalate: Option<String>,
    /// Actions taken after that notice, when the alert does not resolve.
    #[serde(default)]
    pub escalate_actions: Vec<ActionConfig>,
    /// Approvals required before the first action marked `destructive`.
    #[serde(default)]
    pub approval: Option<crate::gates::ApprovalGate>,
}

/// One playbook action.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    pub action: String,
    #[serde(default)]
    pub with: Value,
    /// Wait for the playbook's `approval` before taking it.
    #[serde(default)]
    pub destructive: bool,
}

/// The actions a playbook may name.
const ACTIONS: [&str; 8] = [
    "kube.rollout-restart",
    "kube.scale",
    "kube.delete-pod",
    "kube.cordon-node",
    "pvc.expand",
    "workflow",
    "http",
    "notify",
];

/// The actions that act in a namespace, which the playbook must therefore list.
const NAMESPACED: [&str; 4] = ["kube.rollout-restart", "kube.scale", "kube.delete-pod", "pvc.expand"];

impl PlaybookConfig {
    /// `playbooks.<name>` checked, as `remediate` takes it; an error names the key.
    pub fn check(&self, name: &str) -> Result<Playbook, InvalidConfig> {
        let specs = |list: &[ActionConfig], field: &str| {
            list.iter()
                .enumerate()
                .map(|(n, a)| {
                    if ACTIONS.contains(&a.action.as_str()) {
                        Ok(ActionSpec {
                            action: a.action.clone(),
                            with: a.with.clone(),
                            destructive: a.destructive,
                        })
                    } else {
                        Err(InvalidConfig::new(
                            format!("playbooks.{name}.{field}[{n}].action"),
                            format!("{:?} is not one of {}", a.action, ACTIONS.join(", ")),
                        ))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let actions = specs(&self.actions, "actions")?;
        let escalate_actions = specs(&self.escalate_actions, "escalate-actions")?;
        let key = format!("playbooks.{name}.namespaces");
        let namespaces = self
            .namespaces
            .iter()
            .map(|g| {
                globset::Glob::new(g)
                    .map(|g| g.compile_matcher())
                    .map_err(|e| InvalidConfig::new(&key, format!("{g:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if namespaces.is_empty()
            && actions
                .iter()
                .chain(&escalate_actions)
                .any(|a| NAMESPACED.contains(&a.action.as_str()))
        {
            return Err(InvalidConfig::new(
                key,
                "list the namespaces its actions may act in (globs such as `prod-*`, or \"*\" for all): \
                 alert labels choose the namespace",
            ));
        }
        Ok(Playbook {
            kubernetes: self.kubernetes.clone(),
            dry_run: self.dry_run,
            namespaces,
            actions,
            wait_resolved: self.wait_resolved,
            escalate_notify: self.escalate.clone(),
            max_replicas: self.max_replicas,
            escalate_actions,
            approval: self
                .approval
                .as_ref()
                .map(|a| checked_gate(a, &format!("playbooks.{name}.approval")))
                .transpose()?,
        })
    }
}

/// The input of `remediate` (what an alert route passes).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemediateInput {
    pub playbook: String,
    #[serde(default)]
    pub labels: Map<String, Value>,
    #[serde(default)]
    pub annotations: Map<String, Value>,
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// When the alert started firing (RFC 3339).
    #[serde(default)]
    pub starts_at: Option<String>,
}

/// An action after its placeholders were filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action")]
pub enum Action {
    #[serde(rename = "kube.rollout-restart")]
    RolloutRestart {
        kind: WorkloadKind,
        namespace: String,
        name: String,
    },
    #[serde(rename = "kube.scale")]
    Scale {
        kind: WorkloadKind,
        namespace: String,
        name: String,
        /// Scale to this many replicas...
        #[serde(default)]
        replicas: Option<i32>,
        /// ...or by this many (negative: down).
        #[serde(default)]
        by: Option<i32>,
    },
    #[serde(rename = "kube.delete-pod")]
    DeletePod { namespace: String, name: String },
    #[serde(rename = "kube.cordon-node")]
    CordonNode { node: String },
    #[serde(rename = "pvc.expand")]
    PvcExpand {
        namespace: String,
        name: String,
        /// Grow by this much. Default 20.
        #[serde(default = "twenty")]
        percent: u32,
        /// Never above this size (`100Gi`).
        max: String,
    },
    #[serde(rename = "workflow")]
    Workflow {
        workflow: String,
        #[serde(default)]
        input: Value,
    },
    #[serde(rename = "http")]
    Http {
        url: String,
        #[serde(default = "get")]
        method: String,
        #[serde(default = "ok")]
        expect_status: u16,
    },
    #[serde(rename = "notify")]
    Notify { to: String, text: String },
}

fn twenty() -> u32 {
    20
}
fn get() -> String {
    "GET".into()
}
fn ok() -> u16 {
    200
}

impl Action {
    fn namespace(&self) -> Option<&str> {
        match self {
            Self::RolloutRestart { namespace, .. }
            | Self::Scale { namespace, .. }
            | Self::DeletePod { namespace, .. }
            | Self::PvcExpand { namespace, .. } => Some(namespace),
            Self::CordonNode { .. } | Self::Workflow { .. } | Self::Http { .. } | Self::Notify { .. } => None,
        }
    }

    /// The Kubernetes names the action acts on, with the rule each must follow.
    fn kube_names(&self) -> Vec<(&'static str, &str, KubeName)> {
        match self {
            Self::RolloutRestart { namespace, name, .. }
            | Self::Scale { namespace, name, .. }
            | Self::DeletePod { namespace, name }
            | Self::PvcExpand { namespace, name, .. } => vec![
                ("namespace", namespace, KubeName::Label),
                ("name", name, KubeName::Subdomain),
            ],
            Self::CordonNode { node } => vec![("node", node, KubeName::Subdomain)],
            Self::Workflow { .. } | Self::Http { .. } | Self::Notify { .. } => Vec::new(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::RolloutRestart { kind, namespace, name } => format!("restart {kind:?} {namespace}/{name}"),
            Self::Scale {
                kind,
                namespace,
                name,
                replicas,
                by,
            } => match (replicas, by) {
                (Some(n), _) => format!("scale {kind:?} {namespace}/{name} to {n}"),
                (None, Some(b)) => format!("scale {kind:?} {namespace}/{name} by {b:+}"),
                _ => format!("scale {kind:?} {namespace}/{name}"),
            },
            Self::DeletePod { namespace, name } => format!("delete Pod {namespace}/{name}"),
            Self::CordonNode { node } => format!("cordon Node {node}"),
            Self::PvcExpand {
                namespace,
                name,
                percent,
                max,
            } => format!("expand PersistentVolumeClaim {namespace}/{name} by {percent}% up to {max}"),
            Self::Workflow { workflow, .. } => format!("start workflow {workflow}"),
            Self::Http { method, url, .. } => format!("{method} {url}"),
            Self::Notify { to, .. } => format!("notify {to}"),
        }
    }
}

/// The two shapes of Kubernetes object names (RFC 1123).
#[derive(Debug, Clone, Copy)]
pub(crate) enum KubeName {
    /// A DNS label: namespaces (at most 63 of `a-z`, `0-9`, `-`, alphanumeric at both ends).
    Label,
    /// A DNS subdomain: most object names (labels joined by `.`, at most 253 characters).
    Subdomain,
}

impl KubeName {
    /// `Err` says what is wrong with `value`.
    pub(crate) fn check(self, value: &str) -> Result<(), InvalidName> {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        match self {
            Self::Label if label_ok(value) => Ok(()),
            Self::Label => Err("is not a Kubernetes namespace or label name (RFC 1123: at most 63 of a-z, 0-9 and '-', starting and ending alphanumeric)".into()),
            Self::Subdomain if value.len() <= 253 && value.split('.').all(label_ok) => Ok(()),
            Self::Subdomain => Err("is not a Kubernetes object name (RFC 1123 subdomain: at most 253 of a-z, 0-9, '-' and '.')".into()),
        }
    }
}

/// What an action did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    pub action: String,
    /// What the Kubernetes API answered (the object's generation, replicas), or the notice sent.
    pub response: Value,
}

/// How a remediation ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Remediation {
    pub playbook: String,
    pub alert: Value,
    pub dry_run: bool,
    /// The plan (what was, or in a dry run would be, done).
    pub plan: Vec<String>,
    pub taken: Vec<Taken>,
    /// `resolved`, `dry-run`.
    pub outcome: String,
    /// Seconds from the alert's start to its resolution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_to_resolve_seconds: Option<f64>,
}

/// The playbooks, by name (the config's `playbooks:`).
pub type Playbooks = std::collections::BTreeMap<String, Playbook>;

/// The `remediate` workflow, with the playbooks it may run.
pub fn remediate(connections: Arc<Connections>, playbooks: Arc<Playbooks>) -> WorkflowDef {
    WorkflowDef::new(
        "remediate",
        "Runs an Alertmanager playbook: actions from the alert's labels, within guardrails; waits for the alert to resolve, escalates when it does not.",
        move |ctx: Ctx, input: RemediateInput| {
            let (connections, playbooks) = (connections.clone(), playbooks.clone());
            async move { run(&ctx, &connections, &playbooks, input).await }
        },
    )
    .freshness("playbook")
}

async fn run(
    ctx: &Ctx,
    connections: &Connections,
    playbooks: &Playbooks,
    input: RemediateInput,
) -> Result<Remediation, WorkflowError> {
    let book = lookup(playbooks, &input.playbook, "no playbook named", "playbooks")
        .map_err(WorkflowError::failed)?
        .clone();
    let alert = json!({ "labels": input.labels, "annotations": input.annotations, "fingerprint": input.fingerprint });
    let (b, a) = (&book, &alert);
    let (plan, escalation): (Vec<Action>, Vec<Action>) = ctx
        .step("plan", |_s| async move {
            Ok::<_, StepError>((plan(b, &b.actions, a)?, plan(b, &b.escalate_actions, a)?))
        })
        .await?;
    let described: Vec<String> = plan.iter().map(Action::describe).collect();
    let mut report = Remediation {
        playbook: input.playbook.clone(),
        alert: alert.clone(),
        dry_run: book.dry_run,
        plan: described,
        taken: Vec::new(),
        outcome: String::new(),
        time_to_resolve_seconds: None,
    };
    if book.dry_run {
        report.outcome = "dry-run".into();
        return Ok(report);
    }
    let kube = if plan
        .iter()
        .chain(&escalation)
        .any(|a| !matches!(a, Action::Workflow { .. } | Action::Http { .. } | Action::Notify { .. }))
    {
        let config = connections
            .kubernetes(&book.kubernetes)
            .map_err(WorkflowError::failed)?;
        Some(Kube::connect(config).await.map_err(WorkflowError::failed)?)
    } else {
        None
    };
    let mut approved = false;
    for (n, action) in plan.iter().enumerate() {
        if book.actions[n].destructive
            && !approved
            && let Some(gate) = &book.approval
        {
            let notice = match &book.escalate_notify {
                Some(to) => Some((
                    connections.notifier(to).map_err(WorkflowError::failed)?,
                    format!(
                        ":raised_hand: playbook **{}** wants to {} for {}; approve with `dayshift runs approve {}` (approvers: {})",
                        input.playbook,
                        report.plan.join("; "),
                        input
                            .labels
                            .get("alertname")
                            .and_then(Value::as_str)
                            .unwrap_or("the alert"),
                        ctx.run_id(),
                        gate.approver_list()
                    ),
                )),
                None => None,
            };
            crate::gates::approval(ctx, gate, None, notice.as_ref().map(|(n, t)| (n, t.clone()))).await?;
            approved = true;
        }
        let taken = act(
            ctx,
            connections,
            kube.as_ref(),
            action,
            &book,
            &format!("action:{}", n + 1),
        )
        .await?;
        report.taken.push(taken);
    }

    match ctx.wait_signal("resolved", book.wait_resolved).await? {
        Some(_) => {
            let seconds: f64 = ctx
                .step("resolved", |_s| async {
                    let started = input
                        .starts_at
                        .as_deref()
                        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok());
                    Ok::<_, StepError>(
                        started
                            .map(|s| {
                                (chrono::Utc::now() - s.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0
                            })
                            .unwrap_or(0.0),
                    )
                })
                .await?;
            report.outcome = "resolved".into();
            report.time_to_resolve_seconds = Some(seconds);
            Ok(report)
        }
        None => {
            let wait = humantime::format_duration(book.wait_resolved).to_string();
            if let Some(to) = &book.escalate_notify {
                let notifier = connections.notifier(to).map_err(WorkflowError::failed)?;
                let text = format!(
                    ":sos: **{}** did not resolve within {wait} after playbook **{}** ran (run `{}`).\n\nAlert: {}\n\nTried: {}",
                    input
                        .labels
                        .get("alertname")
                        .and_then(Value::as_str)
                        .unwrap_or("the alert"),
                    input.playbook,
                    ctx.run_id(),
                    Value::Object(input.labels.clone()),
                    report.plan.join("; ")
                );
                let n = &notifier;
                ctx.step("escalate", |_s| async move { n.send(&text).await.map_err(step_err) })
                    .await?;
            }
            for (n, action) in escalation.iter().enumerate() {
                act(
                    ctx,
                    connections,
                    kube.as_ref(),
                    action,
                    &book,
                    &format!("escalation:{}", n + 1),
                )
                .await?;
            }
            Err(WorkflowError::failed(format!(
                "the alert did not resolve within {wait} after {}; escalated",
                report.plan.join("; ")
            )))
        }
    }
}

/// One action as a journaled step (a `workflow` action is a child run).
async fn act(
    ctx: &Ctx,
    connections: &Connections,
    kube: Option<&Kube>,
    action: &Action,
    book: &Playbook,
    step: &str,
) -> Result<Taken, WorkflowError> {
    if let Action::Workflow { workflow, input } = action {
        let output: Value = ctx.child(workflow, input.clone()).await?;
        return Ok(Taken {
            action: action.describe(),
            response: output,
        });
    }
    let max = book.max_replicas;
    let taken = ctx
        .step(format!("{step}:{}", action.describe()), |_s| async move {
            perform(connections, kube, action, max).await
        })
        .retry(RetryPolicy::cautious())
        .await?;
    Ok(taken)
}

/// Renders every action against the alert and checks the guardrails; nothing is done here.
fn plan(book: &Playbook, actions: &[ActionSpec], alert: &Value) -> Result<Vec<Action>, StepError> {
    let mut out = Vec::new();
    for (n, spec) in actions.iter().enumerate() {
        let mut with = dayshift_engine::template::render(&spec.with, alert).map_err(|e| {
            StepError::Permanent(format!(
                "action {} ({}): {e}; the alert has labels {}",
                n + 1,
                spec.action,
                alert["labels"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default()
            ))
        })?;
        with["action"] = json!(spec.action);
        let action: Action = serde_json::from_value(with)
            .map_err(|e| StepError::Permanent(format!("action {} ({}): {e}", n + 1, spec.action)))?;
        // Label values become object names: each must be a Kubernetes name, so that no value
        // reaches the API as a path, a selector or another namespace's object.
        for (field, value, rule) in action.kube_names() {
            rule.check(value).map_err(|why| {
                StepError::Permanent(format!(
                    "action {} ({}): {field} {value:?} {why}; nothing was done",
                    n + 1,
                    spec.action
                ))
            })?;
        }
        if let Some(ns) = action.namespace()
            && !book.namespaces.iter().any(|g| g.is_match(ns))
        {
            return Err(StepError::Permanent(format!(
                "action {} ({}): namespace {ns:?} is not in the playbook's allow-list; nothing was done",
                n + 1,
                action.describe()
            )));
        }
        if let (Action::Scale { replicas: Some(r), .. }, Some(max)) = (&action, book.max_replicas)
            && *r > max
        {
            return Err(StepError::Permanent(format!(
                "action {} ({}): above the playbook's maximum of {max} replicas; nothing was done",
                n + 1,
                action.describe()
            )));
        }
        out.push(action);
    }
    Ok(out)
}

async fn perform(
    connections: &Connections,
    kube: Option<&Kube>,
    action: &Action,
    max_replicas: Option<i32>,
) -> Result<Taken, StepError> {
    let response = match action {
        Action::RolloutRestart { kind, namespace, name } => {
            let kube = kube.ok_or_else(|| StepError::permanent("no Kubernetes connection"))?;
            let w = Workload {
                kind: *kind,
                namespace: namespace.clone(),
                name: name.clone(),
            };
            let at = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
            kube.rollout_restart(&w, &at).await.map_err(step_err)?;
            json!({ "patched": w.to_string(), "restartedAt": at })
        }
        Action::Scale {
            kind,
            namespace,
            name,
            replicas,
            by,
        } => {
            let kube = kube.ok_or_else(|| StepError::permanent("no Kubernetes connection"))?;
            let w = Workload {
                kind: *kind,
                namespace: namespace.clone(),
                name: name.clone(),
            };
            let current = kube.replicas(&w).await.map_err(step_err)?;
            let mut want = match (replicas, by) {
                (Some(n), _) => *n,
                (None, Some(b)) => current + b,
                _ => return Err(StepError::permanent("kube.scale needs `replicas` or `by`")),
            };
            want = want.max(0);
            if let Some(max) = max_replicas {
                want = want.min(max);
            }
            kube.scale(&w, want).await.map_err(step_err)?;
            json!({ "scaled": w.to_string(), "from": current, "to": want })
        }
        Action::DeletePod { namespace, name } => {
            let kube = kube.ok_or_else(|| StepError::permanent("no Kubernetes connection"))?;
            let existed = kube.delete_pod(namespace, name).await.map_err(step_err)?;
            json!({ "deleted": format!("{namespace}/{name}"), "existed": existed })
        }
        Action::CordonNode { node } => {
            let kube = kube.ok_or_else(|| StepError::permanent("no Kubernetes connection"))?;
            kube.cordon(node).await.map_err(step_err)?;
            json!({ "cordoned": node })
        }
        Action::PvcExpand {
            namespace,
            name,
            percent,
            max,
        } => {
            let kube = kube.ok_or_else(|| StepError::permanent("no Kubernetes connection"))?;
            let max_bytes = crate::adapters::kube::parse_quantity(max)
                .ok_or_else(|| StepError::Permanent(format!("pvc.expand max {max:?} is not a size")))?;
            let (from, to) = kube
                .expand_pvc(namespace, name, *percent, max_bytes)
                .await
                .map_err(step_err)?;
            json!({
                "expanded": format!("{namespace}/{name}"),
                "from": crate::adapters::kube::format_gi(from), "to": crate::adapters::kube::format_gi(to),
            })
        }
        Action::Http {
            url,
            method,
            expect_status,
        } => {
            let method = reqwest::Method::from_bytes(method.as_bytes())
                .map_err(|_| StepError::Permanent(format!("http: {method:?} is not a method")))?;
            let response = crate::adapters::http::client()
                .request(method, url)
                .send()
                .await
                .map_err(|e| StepError::transient(format!("{url}: {}", e.without_url())))?;
            let status = response.status().as_u16();
            if status != *expect_status {
                return Err(StepError::Transient(format!(
                    "{url} answered {status}, expected {expect_status}"
                )));
            }
            json!({ "status": status })
        }
        Action::Workflow { .. } => return Err(StepError::permanent("a workflow action runs as a child run")),
        Action::Notify { to, text } => {
            let notifier = connections.notifier(to).map_err(StepError::permanent)?;
            notifier.send(text).await.map_err(step_err)?;
            json!({ "notified": to })
        }
    };
    Ok(Taken {
        action: action.describe(),
        response,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{ActionSpec, Playbook, plan};

    #[test]
    fn a_label_the_alert_lacks_fails_the_plan_and_names_it() {
        let book = Playbook {
            actions: vec![ActionSpec {
                action: "kube.rollout-restart".into(),
                with: json!({ "kind": "Deployment", "namespace": "{{ labels.namespace }}", "name": "{{ labels.deployment }}" }),
                destructive: false,
            }],
            ..Playbook::default()
        };
        let alert = json!({ "labels": { "alertname": "KubePodCrashLooping", "namespace": "shop" } });
        let err = plan(&book, &book.actions, &alert).unwrap_err().to_string();
        assert!(
            err.contains("labels.deployment") && err.contains("alertname, namespace"),
            "{err}"
        );
    }
}
