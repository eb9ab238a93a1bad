//! Plan mode: what a workflow file's run would do, with nothing changed.
//!
//! A plan run (`plan: true`) goes through the steps in order. The actions that only read (a
//! `kubernetes.get` or `list`, a Prometheus query, the clock, a `log`) run for real, journaled
//! as in any run, so the steps after them are planned with what the cluster says; every other
//! step says what it would do, with its parameters evaluated, and changes nothing. A parameter
//! that reads the result of a step that did not run is said to depend on it. An `assert` that
//! does not hold ends the plan where the run would fail. The run's output is `{plan: [...]}`.
//!
//! An approval step of a normal run shows its approvers the plan of the steps after it, worked
//! out from what the run knows at the gate (nothing is read for it).

use serde_json::{Map, Value, json};

use super::actions::Action;
use super::expr::Scope;
use super::model::{Definition, Step, StepKind};
use crate::connections::Connections;
use dayshift_engine::{Ctx, WorkflowError};

/// What a step that did not run leaves for the steps after it: not null (so `steps.x != null`
/// holds, as it would), and without the fields its real output would have.
fn not_run() -> Value {
    json!({ "planned": true })
}

/// `<kind> <namespace>/<name>` (or `<kind> <name>`) from an action's parameters.
fn object(p: &Value, default_kind: &str) -> String {
    let kind = p["kind"].as_str().unwrap_or(default_kind);
    let name = p["name"].as_str().or(p["pod"].as_str()).unwrap_or("?");
    match p["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The branch a git action pushes to, where it starts from, and the repository:
/// `promote/x (started from main) of infra`.
fn pushed_to(p: &Value) -> String {
    format!(
        "{}{} of {}",
        text(&p["branch"]),
        p["from"]
            .as_str()
            .map(|f| format!(" (started from {f})"))
            .unwrap_or_default(),
        text(&p["connection"])
    )
}

fn words(v: &Value) -> String {
    v.as_array()
        .map(|a| a.iter().map(text).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Action {
    /// Whether it only reads, so that a plan run runs it for real.
    pub(super) fn reads_only(self) -> bool {
        matches!(
            self,
            Action::Log
                | Action::KubeGet
                | Action::KubeList
                | Action::KubeLogs
                | Action::PromQuery
                | Action::TimeNow
                | Action::PgQuery
                | Action::GitRead
        )
    }

    /// What it would do with `p`, its parameters, in a sentence.
    pub(super) fn plan(self, p: &Value) -> String {
        match self {
            Action::Log => format!("record {:?}", text(&p["message"])),
            Action::Notify => format!("post to {}: {}", text(&p["connection"]), text(&p["text"])),
            Action::KubeGet => format!("read {}", object(p, "?")),
            Action::KubeList => format!(
                "list the {} objects in {}{}",
                text(&p["kind"]),
                p["namespace"]
                    .as_str()
                    .map_or("every namespace".to_string(), |n| format!("namespace {n}")),
                p["labels"]
                    .as_str()
                    .map(|l| format!(" labelled {l}"))
                    .unwrap_or_default()
            ),
            Action::KubeAnnotate => format!("annotate {} with {}", object(p, "?"), p["annotations"]),
            Action::KubePatch => format!("merge-patch {} with {}", object(p, "?"), p["patch"]),
            Action::KubeDelete => format!("delete {}", object(p, "?")),
            Action::KubeRestart => format!("restart the pods of {}", object(p, "Deployment")),
            Action::KubeScale => format!("scale {} to {} replicas", object(p, "Deployment"), p["replicas"]),
            Action::KubeWait => match p["field"].as_str() {
                Some(f) if p.get("equals").is_some() => {
                    format!("wait until {} of {} is {}", f, object(p, "?"), p["equals"])
                }
                Some(f) if p.get("changed-from").is_some() => {
                    format!(
                        "wait until {} of {} changes from {}",
                        f,
                        object(p, "?"),
                        p["changed-from"]
                    )
                }
                _ => format!(
                    "wait until {} is {}={}",
                    object(p, "?"),
                    p["condition"].as_str().unwrap_or("Ready"),
                    p["status"].as_str().unwrap_or("True")
                ),
            },
            Action::Assert => format!("check that {}", text(&p["message"])),
            Action::ArgoSync => format!(
                "sync ArgoCD Application {}/{}{}{}",
                p["namespace"].as_str().unwrap_or("argocd"),
                text(&p["name"]),
                p["revision"].as_str().map(|r| format!(" to {r}")).unwrap_or_default(),
                if p["prune"] == true { ", pruning" } else { "" }
            ),
            Action::ArgoWaitHealthy => format!(
                "wait until ArgoCD Application {}/{} is Synced and Healthy",
                p["namespace"].as_str().unwrap_or("argocd"),
                text(&p["name"])
            ),
            Action::PromQuery => format!(
                "ask Prometheus {}: {}",
                p["connection"].as_str().unwrap_or("default"),
                text(&p["query"])
            ),
            Action::KubeJob => format!(
                "run {} ({}) as a Job in namespace {}",
                text(&p["image"]),
                [words(&p["command"]), words(&p["args"])].join(" ").trim(),
                text(&p["namespace"])
            ),
            Action::KubeExec => format!(
                "run `{}` in {} of namespace {}",
                words(&p["command"]),
                match (p["pod"].as_str(), p["labels"].as_str()) {
                    (Some(pod), _) => format!("pod {pod}"),
                    (None, Some(l)) => format!("the first Running pod labelled {l}"),
                    _ => "a pod".into(),
                },
                text(&p["namespace"])
            ),
            Action::CertRenew => format!("renew Certificate {}", object(p, "Certificate")),
            Action::TimeNow => "read the clock".into(),
            Action::KubeApply if p.get("path").is_some() => format!(
                "apply the objects of {} on {} of {}",
                text(&p["path"]),
                p["branch"].as_str().unwrap_or("main"),
                text(&p["repository"])
            ),
            Action::KubeApply => format!(
                "apply {} {}{}",
                text(&p["manifest"]["kind"]),
                p["manifest"]["metadata"]["namespace"]
                    .as_str()
                    .map(|n| format!("{n}/"))
                    .unwrap_or_default(),
                text(&p["manifest"]["metadata"]["name"])
            ),
            Action::KubeLogs => format!(
                "read the log of {} in namespace {}",
                p["pod"].as_str().map_or_else(
                    || format!("the first pod labelled {}", text(&p["labels"])),
                    |pod| format!("pod {pod}")
                ),
                text(&p["namespace"])
            ),
            Action::VaultKvRead => format!(
                "read {}/{} from Vault {}",
                p["mount"].as_str().unwrap_or("secret"),
                text(&p["path"]),
                text(&p["connection"])
            ),
            Action::VaultKvWrite => format!(
                "write keys {} to {}/{} on Vault {}, if it is still at version {}",
                p["data"]
                    .as_object()
                    .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default(),
                p["mount"].as_str().unwrap_or("secret"),
                text(&p["path"]),
                text(&p["connection"]),
                p["cas"]
            ),
            Action::PgQuery => format!("query {}: {}", text(&p["connection"]), text(&p["sql"])),
            Action::VaultKvGenerate => format!(
                "generate a new {} in {}/{} on Vault {}, if it is still at version {}",
                text(&p["key"]),
                p["mount"].as_str().unwrap_or("secret"),
                text(&p["path"]),
                text(&p["connection"]),
                p["cas"]
            ),
            Action::GitRead => format!(
                "read {} of {} on {} of {}",
                p["key"].as_str().unwrap_or("all"),
                text(&p["file"]),
                text(&p["branch"]),
                text(&p["connection"])
            ),
            Action::GitSetValues => format!(
                "set {} in {} and push it to {}",
                p["values"]
                    .as_object()
                    .map(|m| m
                        .iter()
                        .map(|(k, v)| format!("{k}={}", text(v)))
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default(),
                text(&p["file"]),
                pushed_to(p)
            ),
            Action::GitWriteFile => format!(
                "write {} ({} bytes) and push it to {}",
                text(&p["file"]),
                p["content"].as_str().map_or(0, str::len),
                pushed_to(p)
            ),
            Action::GitRevert => format!("revert commit {} on {}", text(&p["commit"]), pushed_to(p)),
            Action::GitPullRequest => format!(
                "open a pull request from {} to {} on {}: {}",
                text(&p["head"]),
                text(&p["base"]),
                text(&p["connection"]),
                text(&p["title"])
            ),
            Action::GitWaitMerged => format!(
                "wait until pull request {} of {} is merged",
                p["number"],
                text(&p["connection"])
            ),
            Action::HttpRequest => format!(
                "send {} {} to {}",
                p["method"].as_str().unwrap_or("GET").to_ascii_uppercase(),
                p["path"]
                    .as_str()
                    .map_or("/".to_string(), |x| format!("/{}", x.trim_start_matches('/'))),
                text(&p["connection"])
            ),
        }
    }
}

impl Definition {
    /// The plan entries of `step` (prefixed `finally` for a final step) over `scope`, nothing
    /// run: what it would do, or why that cannot be told yet.
    pub(super) fn plan_step(&self, step: &Step, scope: &Scope<'_>, finally: bool) -> Vec<Value> {
        let mut entry = json!({ "step": step.id });
        if finally {
            entry["finally"] = json!(true);
        }
        let depends = |mut e: Value, why: String| {
            e["depends"] = json!(format!("depends on what an earlier step does ({why})"));
            vec![e]
        };
        if let Some(when) = &step.when {
            match when.eval(scope) {
                Ok(Value::Bool(true)) => {}
                Ok(Value::Bool(false)) => {
                    entry["skipped"] = json!("its `when` is false");
                    return vec![entry];
                }
                Ok(other) => return depends(entry, format!("`when` gave {other}")),
                Err(e) => return depends(entry, e),
            }
        }
        match &step.kind {
            StepKind::Action { action, with } => {
                entry["action"] = json!(action.name());
                let Some(each) = &step.for_each else {
                    return match with.eval(scope) {
                        Ok(params) => {
                            entry["would"] = json!(action.plan(&params));
                            entry["with"] = params;
                            vec![entry]
                        }
                        Err(e) => depends(entry, e),
                    };
                };
                let items = match each.items.eval(scope) {
                    Ok(Value::Array(items)) => items,
                    Ok(other) => return depends(entry, format!("for_each gave {other}")),
                    Err(e) => return depends(entry, e),
                };
                if items.is_empty() {
                    entry["would"] = json!("nothing: for_each gives no items");
                    return vec![entry];
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let mut e = json!({ "step": format!("{}[{i}]", step.id), "action": action.name() });
                        if finally {
                            e["finally"] = json!(true);
                        }
                        let scope = Scope {
                            item: Some(item),
                            ..*scope
                        };
                        match with.eval(&scope) {
                            Ok(params) => {
                                e["would"] = json!(action.plan(&params));
                                e["with"] = params;
                                e
                            }
                            Err(why) => {
                                e["depends"] = json!(format!("depends on what an earlier step does ({why})"));
                                e
                            }
                        }
                    })
                    .collect()
            }
            StepKind::Workflow { workflow, with, .. } => match with.eval(scope) {
                Ok(child) => {
                    entry["would"] = json!(format!("start a run of {workflow} and wait for it"));
                    entry["with"] = child;
                    vec![entry]
                }
                Err(e) => depends(entry, e),
            },
            StepKind::Approval(gate) => {
                let who: Vec<String> = gate.approvers.iter().map(|a| a.to_string()).collect();
                entry["would"] = json!(format!(
                    "wait up to {} for {} approval(s) from {}",
                    humantime::format_duration(gate.timeout),
                    gate.required,
                    who.join(", ")
                ));
                vec![entry]
            }
            StepKind::Wait { signal, timeout } => {
                entry["would"] = json!(format!(
                    "wait up to {} for the signal {signal}",
                    humantime::format_duration(*timeout)
                ));
                vec![entry]
            }
            StepKind::Sleep(d) => {
                entry["would"] = json!(format!("sleep {}", humantime::format_duration(*d)));
                vec![entry]
            }
        }
    }

    /// The plan of what comes after step `index` (its `finally` steps included), from the
    /// outputs known so far: what an approval step shows its approvers. Nothing is read.
    pub(super) fn plan_after(&self, index: usize, input: &Value, outputs: &Map<String, Value>) -> Value {
        let mut known = outputs.clone();
        let mut plan = Vec::new();
        for step in &self.steps[index + 1..] {
            let scope = Scope {
                input,
                steps: &known,
                item: None,
            };
            plan.extend(self.plan_step(step, &scope, false));
            known.insert(step.id.clone(), not_run());
        }
        for fin in &self.finally {
            let scope = Scope {
                input,
                steps: &known,
                item: None,
            };
            plan.extend(self.plan_step(fin, &scope, true));
        }
        json!({ "steps": plan })
    }

    /// A plan run: the reads run (journaled), everything else is planned; `{plan: [...]}`.
    pub(super) async fn plan_run(
        &self,
        ctx: &Ctx,
        input: &Value,
        connections: &Connections,
    ) -> Result<Value, WorkflowError> {
        let mut outputs = Map::new();
        let mut plan = Vec::new();
        let mut stopped = false;
        for step in &self.steps {
            let scope = Scope {
                input,
                steps: &outputs,
                item: None,
            };
            let read = match (&step.kind, &step.for_each) {
                (StepKind::Action { action, with }, None) if action.reads_only() || *action == Action::Assert => {
                    let runs = match &step.when {
                        None => true,
                        Some(w) => w.eval(&scope) == Ok(Value::Bool(true)),
                    };
                    match with.eval(&scope) {
                        Ok(params) if runs => Some((*action, params)),
                        _ => None,
                    }
                }
                _ => None,
            };
            match read {
                Some((Action::Assert, params)) => {
                    let mut e = json!({ "step": step.id, "action": "assert", "with": params });
                    if params["that"] == Value::Bool(true) {
                        e["held"] = json!(true);
                        plan.push(e);
                        outputs.insert(step.id.clone(), json!({ "held": true }));
                    } else {
                        e["would"] = json!(format!("fail the run here: {}", text(&params["message"])));
                        plan.push(e);
                        stopped = true;
                        break;
                    }
                }
                Some((action, params)) => {
                    let what = action.plan(&params);
                    let out = self.action(ctx, step, action, params, None, connections).await?;
                    plan.push(json!({ "step": step.id, "action": action.name(), "read": what }));
                    outputs.insert(step.id.clone(), out);
                }
                None => {
                    let entries = self.plan_step(step, &scope, false);
                    let skipped = entries.len() == 1 && entries[0].get("skipped").is_some();
                    plan.extend(entries);
                    outputs.insert(step.id.clone(), if skipped { Value::Null } else { not_run() });
                }
            }
        }
        for fin in &self.finally {
            let scope = Scope {
                input,
                steps: &outputs,
                item: None,
            };
            plan.extend(self.plan_step(fin, &scope, true));
        }
        Ok(json!({ "plan": plan, "complete": !stopped }))
    }
}
