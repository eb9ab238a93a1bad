//! The format of a workflow file, as written, and its compilation into a [`Definition`]: every
//! check that needs nothing but the file (and the names of the config's connections) is made
//! here, each problem with the file, line, column and key.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dayshift_engine::RetryPolicy;
use dayshift_engine::approval::ApprovalGate;
use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use super::actions::Action;
use super::expr::{Expr, Read, Template};
use super::model::{Definition, ForEach, InputField, InputType, Step, StepKind, Undo};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileSpec {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    input: BTreeMap<String, Spanned<InputSpec>>,
    steps: Vec<Spanned<StepSpec>>,
    /// Action steps run when the run ends, however it ends.
    #[serde(default)]
    finally: Vec<Spanned<StepSpec>>,
    #[serde(default)]
    output: Option<Spanned<Value>>,
    /// The concurrency every run takes: a key made from the input, a limit, a policy.
    #[serde(default)]
    concurrency: Option<Spanned<ConcurrencySpec>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct ConcurrencySpec {
    key: Value,
    #[serde(default = "one_run")]
    limit: u32,
    #[serde(default)]
    policy: Option<dayshift_engine::ConcurrencyPolicy>,
}

fn one_run() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct InputSpec {
    #[serde(rename = "type")]
    kind: InputType,
    #[serde(default)]
    description: String,
    #[serde(default)]
    default: Option<Value>,
    #[serde(default)]
    required: Option<bool>,
    #[serde(default, rename = "enum")]
    choices: Option<Vec<Value>>,
    /// Through the API, the value must be one the policy allows (`policy.workflows.<glob>.inputs`):
    /// for an input that chooses what an action acts on (a namespace, a name).
    #[serde(default)]
    guarded: bool,
    /// For `type: connection`: which kind (`postgres`, `s3`, `notify`, `vault`, `kubernetes`, `git`).
    #[serde(default)]
    connection: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct StepSpec {
    id: Spanned<String>,
    #[serde(default)]
    action: Option<Spanned<String>>,
    #[serde(default)]
    with: BTreeMap<String, Spanned<Value>>,
    /// A child run of this workflow, `with:` its input.
    #[serde(default)]
    workflow: Option<Spanned<String>>,
    #[serde(default)]
    approval: Option<Spanned<ApprovalGate>>,
    /// A signal to wait for, at most `timeout`.
    #[serde(default)]
    wait: Option<Spanned<String>>,
    #[serde(default, with = "humantime_serde")]
    sleep: Option<Duration>,
    #[serde(default, rename = "for_each", alias = "for-each")]
    for_each: Option<Spanned<Value>>,
    #[serde(default)]
    max_in_flight: Option<usize>,
    #[serde(default)]
    when: Option<Spanned<String>>,
    #[serde(default)]
    retry: Option<RetrySpec>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    /// An action that puts back what the step did, if the run later fails or is cancelled.
    #[serde(default)]
    undo: Option<Spanned<UndoSpec>>,
    /// Its output holds a secret: never journaled, the step run again on replay.
    #[serde(default)]
    sensitive: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct UndoSpec {
    action: Spanned<String>,
    #[serde(default)]
    with: BTreeMap<String, Spanned<Value>>,
    #[serde(default)]
    retry: Option<RetrySpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RetrySpec {
    /// Attempts in all, the first one included.
    attempts: u32,
    #[serde(default = "one_second", with = "humantime_serde")]
    delay: Duration,
    #[serde(default = "two")]
    multiplier: f64,
    #[serde(default = "one_minute", with = "humantime_serde")]
    max_delay: Duration,
}

fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn one_minute() -> Duration {
    Duration::from_secs(60)
}
fn two() -> f64 {
    2.0
}

/// The connection kinds a `type: connection` input may name.
pub(crate) const CONNECTION_KINDS: [&str; 8] = [
    "postgres",
    "s3",
    "notify",
    "vault",
    "kubernetes",
    "git",
    "prometheus",
    "http",
];

/// What an expression may read where it is written.
#[derive(Clone, Copy)]
struct Visible<'a> {
    inputs: &'a BTreeSet<&'a str>,
    /// The steps whose output it may read; `unseen` says why another is not one of them.
    steps: &'a BTreeSet<&'a str>,
    unseen: &'a str,
    /// Whether `item` exists (the parameters of a `for_each` step).
    item: bool,
    /// The inputs an API caller gives only as the policy allows (connections, `guarded: true`).
    guarded: &'a BTreeSet<&'a str>,
    /// Whether `item` comes only from guarded inputs (or from no input at all).
    item_guarded: bool,
}

/// Problems found in one file, each `path:line:column: key: what is wrong`.
struct Problems<'a> {
    path: &'a str,
    list: Vec<String>,
}

impl Problems<'_> {
    /// Checks what `e` reads: declared inputs, the `steps` it may see (`unseen` says why another
    /// is not one of them), and no other name.
    fn reads(&mut self, e: &Expr, at: &serde_saphyr::Location, key: &str, seen: &Visible<'_>) {
        let Visible {
            inputs,
            steps,
            unseen,
            item,
            ..
        } = *seen;
        for read in e.reads() {
            match read {
                Read::Input(f) if !inputs.contains(f.as_str()) => {
                    self.at(at, key, format!("input.{f} is not declared under `input:`"))
                }
                Read::Step(s) if !steps.contains(s.as_str()) => self.at(at, key, format!("steps.{s} {unseen}")),
                Read::Other(v) if v == "item" && !item => {
                    self.at(at, key, "`item` is known only in the parameters of a `for_each` step")
                }
                Read::Other(v) if v != "input" && v != "steps" && v != "item" => self.at(
                    at,
                    key,
                    format!("`{v}` is not known here (an expression reads `input` and `steps`)"),
                ),
                _ => {}
            }
        }
    }

    /// The values of `with:` (under `key`), compiled, each checked against `seen`; `params` names
    /// what they may be (an action's), or `None` for a child workflow's input, checked by the
    /// child when the run starts it.
    fn with_values(
        &mut self,
        key: &str,
        with: &BTreeMap<String, Spanned<Value>>,
        params: Option<Action>,
        seen: &Visible<'_>,
    ) -> Template {
        let mut out = Vec::new();
        for (param, v) in with {
            let pkey = format!("{key}.with.{param}");
            let def = match params {
                None => None,
                Some(action) => match action.params().iter().find(|d| d.name == param) {
                    Some(d) => Some(d),
                    None => {
                        let known: Vec<&str> = action.params().iter().map(|d| d.name).collect();
                        self.at(
                            &v.referenced,
                            &pkey,
                            format!(
                                "action {} has no parameter {param:?} (it has: {})",
                                action.name(),
                                known.join(", ")
                            ),
                        );
                        continue;
                    }
                },
            };
            match Template::compile(&v.value) {
                Err((below, e)) => self.at(&v.referenced, &format!("{pkey}{below}"), e),
                Ok(t) => {
                    if let (Template::Plain(value), Some(def)) = (&t, def) {
                        let ok = match def.kind {
                            "string" => value.is_string(),
                            "integer" => value.is_i64() || value.is_u64(),
                            "object" => value.is_object(),
                            "boolean" => value.is_boolean(),
                            _ => true,
                        };
                        if !ok {
                            self.at(
                                &v.referenced,
                                &pkey,
                                format!("must be {}, not {value}", a_kind(def.kind)),
                            );
                        }
                    }
                    for e in t.exprs() {
                        self.reads(e, &v.referenced, &pkey, seen);
                        if def.is_some_and(|d| d.target) {
                            self.target_reads(e, &v.referenced, &pkey, seen);
                        }
                    }
                    out.push((param.clone(), t));
                }
            }
        }
        Template::Object(out)
    }

    /// Checks that `e`, the value of a parameter choosing what an action acts on, reads only
    /// what an API caller cannot choose past the policy.
    fn target_reads(&mut self, e: &Expr, at: &serde_saphyr::Location, key: &str, seen: &Visible<'_>) {
        for read in e.reads() {
            match read {
                Read::Input(f) if seen.inputs.contains(f.as_str()) && !seen.guarded.contains(f.as_str()) => self.at(
                    at,
                    key,
                    format!(
                        "chooses what the action acts on, so it may read only guarded inputs: declare input.{f} \
                         `guarded: true` (an API caller then gives only what policy.workflows.<glob>.inputs.{f} allows)"
                    ),
                ),
                Read::Other(v) if v == "item" && seen.item && !seen.item_guarded => self.at(
                    at,
                    key,
                    "chooses what the action acts on, so `item` must come from guarded inputs only \
                     (declare the inputs `for_each` reads `guarded: true`)",
                ),
                _ => {}
            }
        }
    }

    /// The action `name` of the catalog with its parameters `with` (under `key`), checked.
    fn action(
        &mut self,
        key: &str,
        name: &Spanned<String>,
        with: &BTreeMap<String, Spanned<Value>>,
        seen: &Visible<'_>,
    ) -> Option<(Action, Template)> {
        let Some(action) = Action::parse(&name.value) else {
            let known: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
            self.at(
                &name.referenced,
                &format!("{key}.action"),
                format!("no action {:?} (the catalog: {})", name.value, known.join(", ")),
            );
            return None;
        };
        let params = self.with_values(key, with, Some(action), seen);
        for def in action.params().iter().filter(|d| d.required) {
            if !with.contains_key(def.name) {
                self.at(
                    &name.referenced,
                    &format!("{key}.with"),
                    format!("action {} needs the parameter {:?}", action.name(), def.name),
                );
            }
        }
        Some((action, params))
    }

    fn at(&mut self, loc: &serde_saphyr::Location, key: &str, what: impl std::fmt::Display) {
        self.list
            .push(format!("{}:{}:{}: {key}: {what}", self.path, loc.line(), loc.column()));
    }
}

/// "a string", "an integer", "an object".
fn a_kind(kind: &str) -> String {
    match kind {
        "integer" | "object" => format!("an {kind}"),
        other => format!("a {other}"),
    }
}

/// A plain identifier: what CEL reads as one name (`steps.get_app`; `get-app` would be a
/// subtraction).
fn is_identifier(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Compiles the workflow file `text` (read from `path`). `connections` names the config's
/// connections by kind, for `type: connection` inputs.
pub(crate) fn compile(
    path: &str,
    text: &str,
    connections: &BTreeMap<String, BTreeSet<String>>,
) -> Result<Definition, Vec<String>> {
    let spec: FileSpec = serde_saphyr::from_str(text).map_err(|e| vec![format!("{path}: {e}")])?;
    let mut p = Problems { path, list: Vec::new() };
    let name = spec.name.value.clone();
    let valid_name = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    if !valid_name {
        p.at(
            &spec.name.referenced,
            "name",
            format!("{name:?} is not a workflow name (lowercase letters, digits, `.`, `-`, `_`)"),
        );
    }

    let mut input = Vec::new();
    for (field, s) in &spec.input {
        let key = format!("input.{field}");
        let loc = &s.referenced;
        let s = &s.value;
        if !is_identifier(field) {
            p.at(loc, &key, "an input's name is letters, digits and `_`");
        }
        let connection = match (&s.kind, &s.connection) {
            (InputType::Connection, Some(kind)) if CONNECTION_KINDS.contains(&kind.as_str()) => Some(kind.clone()),
            (InputType::Connection, Some(kind)) => {
                p.at(
                    loc,
                    &key,
                    format!("connection: {kind:?} is not one of {}", CONNECTION_KINDS.join(", ")),
                );
                None
            }
            (InputType::Connection, None) => {
                p.at(
                    loc,
                    &key,
                    format!("type: connection needs `connection:` ({})", CONNECTION_KINDS.join(", ")),
                );
                None
            }
            (_, Some(_)) => {
                p.at(loc, &key, "`connection:` is only for type: connection");
                None
            }
            (_, None) => None,
        };
        let field_def = InputField {
            name: field.clone(),
            kind: s.kind,
            description: s.description.clone(),
            default: s.default.clone(),
            required: s.required.unwrap_or(s.default.is_none()),
            choices: s.choices.clone(),
            guarded: s.guarded || s.kind == InputType::Connection,
            connection,
        };
        if s.guarded && !matches!(s.kind, InputType::String | InputType::List | InputType::Connection) {
            p.at(loc, &format!("{key}.guarded"), "is for a string or a list of strings");
        }
        if let Some(d) = &s.default
            && let Err(e) = field_def.check(d, connections)
        {
            p.at(loc, &format!("{key}.default"), e);
        }
        input.push(field_def);
    }
    let declared: BTreeSet<&str> = spec.input.keys().map(String::as_str).collect();
    let guarded: BTreeSet<&str> = input.iter().filter(|f| f.guarded).map(|f| f.name.as_str()).collect();

    let mut steps = Vec::new();
    let mut finals = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let all = spec.steps.iter().enumerate().map(|(i, s)| (false, i, s));
    for (fin, i, s) in all.chain(spec.finally.iter().enumerate().map(|(i, s)| (true, i, s))) {
        let loc = &s.referenced;
        let s = &s.value;
        let id = s.id.value.clone();
        let key = if fin {
            format!("finally[{i}]")
        } else {
            format!("steps[{i}]")
        };
        if !is_identifier(&id) {
            p.at(
                &s.id.referenced,
                &format!("{key}.id"),
                format!("{id:?} is not an id (letters, digits and `_`, not starting with a digit)"),
            );
        }
        if !seen.insert(id.clone()) {
            p.at(
                &s.id.referenced,
                &format!("{key}.id"),
                format!("{id:?} is the id of an earlier step"),
            );
        }
        let earlier: BTreeSet<&str> = steps.iter().map(|s: &Step| s.id.as_str()).collect();
        let each = s.for_each.is_some();
        // Whether the items of a `for_each` come only from guarded inputs.
        let item_guarded = s.for_each.as_ref().is_none_or(|f| {
            Template::compile(&f.value).is_ok_and(|t| {
                t.exprs().iter().all(|e| {
                    e.reads()
                        .iter()
                        .all(|r| !matches!(r, Read::Input(x) if !guarded.contains(x.as_str())))
                })
            })
        });
        let check_reads = |p: &mut Problems<'_>, e: &Expr, at: &serde_saphyr::Location, key: &str, item: bool| {
            let seen = Visible {
                inputs: &declared,
                steps: &earlier,
                unseen: "is not a step before this one",
                item,
                guarded: &guarded,
                item_guarded,
            };
            p.reads(e, at, key, &seen)
        };
        let when = match &s.when {
            None => None,
            Some(w) => {
                let source = w.value.trim();
                let source = source
                    .strip_prefix("${{")
                    .and_then(|x| x.strip_suffix("}}"))
                    .unwrap_or(source);
                match Expr::compile(source) {
                    Ok(e) => {
                        check_reads(&mut p, &e, &w.referenced, &format!("{key}.when"), false);
                        Some(e)
                    }
                    Err(e) => {
                        p.at(&w.referenced, &format!("{key}.when"), e);
                        None
                    }
                }
            }
        };
        let chosen: Vec<&str> = [
            ("action", s.action.is_some()),
            ("workflow", s.workflow.is_some()),
            ("approval", s.approval.is_some()),
            ("wait", s.wait.is_some()),
            ("sleep", s.sleep.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, set)| set.then_some(k))
        .collect();
        const KINDS: &str = "`action`, `workflow`, `approval`, `wait` or `sleep`";
        if chosen.len() > 1 {
            p.at(
                loc,
                &key,
                format!("a step is one of {KINDS}, not {}", chosen.join(" and ")),
            );
        }
        let no_with = |p: &mut Problems<'_>, what: &str| {
            if !s.with.is_empty() {
                p.at(
                    loc,
                    &format!("{key}.with"),
                    format!("`with:` is for an action's parameters or a workflow's input, not a {what} step"),
                );
            }
        };
        let kind = match chosen.first().copied() {
            _ if chosen.len() > 1 => None,
            None => {
                p.at(loc, &key, format!("a step needs one of {KINDS}"));
                None
            }
            Some("action") => {
                let a = s.action.as_ref().expect("chosen");
                let seen = Visible {
                    inputs: &declared,
                    steps: &earlier,
                    unseen: "is not a step before this one",
                    item: each,
                    guarded: &guarded,
                    item_guarded,
                };
                p.action(&key, a, &s.with, &seen)
                    .map(|(action, with)| StepKind::Action { action, with })
            }
            Some("workflow") => {
                let w = s.workflow.as_ref().expect("chosen");
                let seen = Visible {
                    inputs: &declared,
                    steps: &earlier,
                    unseen: "is not a step before this one",
                    item: false,
                    guarded: &guarded,
                    item_guarded: true,
                };
                let with = p.with_values(&key, &s.with, None, &seen);
                Some(StepKind::Workflow {
                    workflow: w.value.clone(),
                    with,
                    at: format!("{path}:{}:{}: {key}", w.referenced.line(), w.referenced.column()),
                    with_at: s
                        .with
                        .iter()
                        .map(|(k, v)| {
                            let at = format!("{path}:{}:{}", v.referenced.line(), v.referenced.column());
                            (k.clone(), at)
                        })
                        .collect(),
                })
            }
            Some("approval") => {
                let gate = &s.approval.as_ref().expect("chosen");
                no_with(&mut p, "approval");
                if let Err(e) = gate.value.check() {
                    p.at(&gate.referenced, &format!("{key}.approval"), e);
                }
                Some(StepKind::Approval(gate.value.clone()))
            }
            Some("wait") => {
                let signal = s.wait.as_ref().expect("chosen");
                no_with(&mut p, "wait");
                let name = &signal.value;
                let valid = !name.is_empty()
                    && name.len() <= 100
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
                if !valid {
                    p.at(
                        &signal.referenced,
                        &format!("{key}.wait"),
                        format!("{name:?} is not a signal name (letters, digits, `.`, `-`, `_`)"),
                    );
                } else if dayshift_engine::approval::is_reserved_signal(name) {
                    p.at(
                        &signal.referenced,
                        &format!("{key}.wait"),
                        format!("{name:?} is a signal only the engine sends (approvals, resolved alerts)"),
                    );
                }
                match s.timeout {
                    Some(timeout) => Some(StepKind::Wait {
                        signal: name.clone(),
                        timeout,
                    }),
                    None => {
                        p.at(
                            &signal.referenced,
                            &format!("{key}.timeout"),
                            "a `wait` step needs `timeout:`, how long to wait for the signal",
                        );
                        None
                    }
                }
            }
            Some(_) => {
                no_with(&mut p, "sleep");
                s.sleep.map(StepKind::Sleep)
            }
        };
        let is_action = matches!(kind, Some(StepKind::Action { .. }));
        if !is_action && kind.is_some() {
            if s.retry.is_some() {
                p.at(loc, &format!("{key}.retry"), "`retry` is for action steps");
            }
            if s.timeout.is_some() && !matches!(kind, Some(StepKind::Wait { .. })) {
                p.at(
                    loc,
                    &format!("{key}.timeout"),
                    "`timeout` is for action and wait steps (an approval has its own)",
                );
            }
        }
        let for_each = match &s.for_each {
            None => {
                if s.max_in_flight.is_some() {
                    p.at(loc, &format!("{key}.max-in-flight"), "is for a `for_each` step");
                }
                None
            }
            Some(_) if !is_action => {
                if kind.is_some() {
                    p.at(loc, &format!("{key}.for_each"), "`for_each` is for action steps");
                }
                None
            }
            Some(items) => {
                let fkey = format!("{key}.for_each");
                let max_in_flight = s.max_in_flight.unwrap_or(10);
                if !(1..=1000).contains(&max_in_flight) {
                    p.at(loc, &format!("{key}.max-in-flight"), "must be 1 to 1000");
                }
                match Template::compile(&items.value) {
                    Err((below, e)) => {
                        p.at(&items.referenced, &format!("{fkey}{below}"), e);
                        None
                    }
                    Ok(t) => {
                        for e in t.exprs() {
                            check_reads(&mut p, e, &items.referenced, &fkey, false);
                        }
                        match &t {
                            Template::Plain(Value::Array(_)) | Template::List(_) => {}
                            Template::Whole(e) => {
                                // `input.x` of a declared type that is not a list.
                                let field = e.source().strip_prefix("input.").and_then(|f| {
                                    spec.input.get(f).filter(|f| f.value.kind != InputType::List).map(|_| f)
                                });
                                if let Some(f) = field {
                                    p.at(
                                        &items.referenced,
                                        &fkey,
                                        format!("input.{f} is not a list (its type is not `list`)"),
                                    );
                                }
                            }
                            other => p.at(
                                &items.referenced,
                                &fkey,
                                format!(
                                    "must be a list or `${{{{ expression }}}}` giving one, not {}",
                                    match other {
                                        Template::Plain(v) => v.to_string(),
                                        _ => "text".into(),
                                    }
                                ),
                            ),
                        }
                        Some(ForEach {
                            items: t,
                            max_in_flight: max_in_flight.clamp(1, 1000),
                        })
                    }
                }
            }
        };
        let retry = match (&kind, &s.retry) {
            (Some(StepKind::Action { action, .. }), None) => action.default_retry(),
            _ => retry_policy(&mut p, loc, &key, s.retry.as_ref()),
        };
        let undo = match &s.undo {
            None => None,
            Some(_) if !is_action => {
                p.at(loc, &format!("{key}.undo"), "`undo` is for action steps");
                None
            }
            Some(_) if fin => {
                p.at(loc, &format!("{key}.undo"), "a `finally` step has no undo");
                None
            }
            Some(u) => {
                let ukey = format!("{key}.undo");
                // The undo reads this step's output too (`steps.<id>`: the branch's, in a
                // `for_each`).
                let mut with_this = earlier.clone();
                with_this.insert(id.as_str());
                let seen = Visible {
                    inputs: &declared,
                    steps: &with_this,
                    unseen: "is not this step or one before it",
                    item: each,
                    guarded: &guarded,
                    item_guarded,
                };
                let action = p.action(&ukey, &u.value.action, &u.value.with, &seen);
                let retry = u
                    .value
                    .retry
                    .as_ref()
                    .map(|r| retry_policy(&mut p, &u.referenced, &ukey, Some(r)));
                action.map(|(action, with)| Undo { action, with, retry })
            }
        };
        if fin && kind.is_some() && !is_action {
            p.at(loc, &key, "a `finally` step is an `action` step");
        }
        if fin && for_each.is_some() {
            p.at(loc, &format!("{key}.for_each"), "a `finally` step has no `for_each`");
        }
        if s.sensitive && !is_action {
            p.at(loc, &format!("{key}.sensitive"), "`sensitive` is for action steps");
        }
        if let Some(StepKind::Action {
            action: Action::VaultKvRead,
            ..
        }) = &kind
            && !s.sensitive
            && s.with.get("values").map(|v| &v.value) != Some(&Value::Bool(false))
        {
            p.at(
                loc,
                &format!("{key}.sensitive"),
                "vault.kv-read gives secrets, so the step must be `sensitive: true` (or give `values: false` for \
                 the version and keys only)",
            );
        }
        if s.sensitive && s.undo.is_some() {
            p.at(
                loc,
                &format!("{key}.sensitive"),
                "a sensitive step has no undo (its output, which an undo reads, is not kept)",
            );
        }
        if let Some(kind) = kind {
            let step = Step {
                id,
                line: loc.line(),
                kind,
                when,
                retry,
                timeout: s.timeout,
                for_each,
                undo,
                sensitive: s.sensitive,
            };
            if fin { finals.push(step) } else { steps.push(step) }
        }
    }
    if spec.steps.is_empty() {
        p.at(&spec.name.referenced, "steps", "a workflow needs at least one step");
    }

    let all_steps: BTreeSet<&str> = steps.iter().map(|s| s.id.as_str()).collect();
    let output = match &spec.output {
        None => None,
        Some(o) => match Template::compile(&o.value) {
            Err((below, e)) => {
                p.at(&o.referenced, &format!("output{below}"), e);
                None
            }
            Ok(t) => {
                for e in t.exprs() {
                    let seen = Visible {
                        inputs: &declared,
                        steps: &all_steps,
                        unseen: "is not a step of this workflow",
                        item: false,
                        guarded: &guarded,
                        item_guarded: true,
                    };
                    p.reads(e, &o.referenced, "output", &seen);
                }
                Some(t)
            }
        },
    };

    let concurrency = match &spec.concurrency {
        None => None,
        Some(c) => {
            let no_steps = BTreeSet::new();
            let seen = Visible {
                inputs: &declared,
                steps: &no_steps,
                unseen: "is not known when a run starts (the key reads only `input`)",
                item: false,
                guarded: &guarded,
                item_guarded: true,
            };
            if !(1..=1000).contains(&c.value.limit) {
                p.at(&c.referenced, "concurrency.limit", "must be 1 to 1000");
            }
            match Template::compile(&c.value.key) {
                Err((below, e)) => {
                    p.at(&c.referenced, &format!("concurrency.key{below}"), e);
                    None
                }
                Ok(t) => {
                    for e in t.exprs() {
                        p.reads(e, &c.referenced, "concurrency.key", &seen);
                    }
                    Some(super::model::ConcurrencyTemplate {
                        key: t,
                        limit: c.value.limit,
                        policy: c.value.policy.unwrap_or(dayshift_engine::ConcurrencyPolicy::Queue),
                    })
                }
            }
        }
    };

    if !p.list.is_empty() {
        return Err(p.list);
    }
    Ok(Definition {
        name,
        description: spec.description,
        path: path.to_string(),
        hash: hex::encode(Sha256::digest(text.as_bytes())),
        source: text.to_string(),
        version: std::sync::OnceLock::new(),
        input,
        steps,
        finally: finals,
        output,
        concurrency,
    })
}

/// A step's `retry:` as the engine's policy (default: [`RetryPolicy::network`]).
fn retry_policy(
    p: &mut Problems<'_>,
    loc: &serde_saphyr::Location,
    key: &str,
    retry: Option<&RetrySpec>,
) -> RetryPolicy {
    let Some(r) = retry else {
        return RetryPolicy::network();
    };
    if r.attempts == 0 || r.attempts > 100 {
        p.at(loc, &format!("{key}.retry.attempts"), "must be 1 to 100");
    }
    if !(1.0..=10.0).contains(&r.multiplier) {
        p.at(loc, &format!("{key}.retry.multiplier"), "must be 1 to 10");
    }
    RetryPolicy {
        max_attempts: r.attempts.clamp(1, 100),
        initial_delay: r.delay,
        multiplier: r.multiplier,
        max_delay: r.max_delay,
        ..RetryPolicy::network()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> BTreeMap<String, BTreeSet<String>> {
        BTreeMap::from([("notify".to_string(), BTreeSet::from(["ops".to_string()]))])
    }

    fn problems(text: &str) -> Vec<String> {
        match compile("wf/x.yaml", text, &names()) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(p) => p,
        }
    }

    /// The one problem containing `needle`, which must also name `at` (`line:column: key`).
    fn has(problems: &[String], at: &str, needle: &str) {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("wf/x.yaml:{at}")) && p.contains(needle)),
            "no problem at {at} saying {needle:?} in:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn a_valid_file_compiles_with_its_hash() {
        let text = "name: ops.hello\nsteps:\n  - id: hi\n    action: log\n    with: { message: hello }\n";
        let def = compile("wf/x.yaml", text, &names()).unwrap();
        assert_eq!(def.name, "ops.hello");
        assert_eq!(def.hash, hex::encode(Sha256::digest(text.as_bytes())));
    }

    #[test]
    fn every_problem_of_a_file_is_named_with_its_line_column_and_key() {
        let p = problems(
            r#"name: ops.Bad
input:
  app: { type: string }
  channel: { type: connection, connection: notify, default: elsewhere }
  kind: { type: connection }
steps:
  - id: first
    action: lgo
  - id: second
    action: log
    with:
      message: "${{ input.nope }}"
      colour: red
  - id: third
    action: notify
    with:
      text: "${{ steps.fourth.x }}"
  - id: fourth
    when: "input.app =="
    action: log
    with: { message: 42 }
  - id: fourth
    action: log
    sleep: 1s
  - id: get-app
    sleep: 1s
    with: { message: x }
  - id: nothing
output:
  x: "${{ later.y }}"
"#,
        );
        has(&p, "1:7: name", "not a workflow name");
        has(
            &p,
            "4:12: input.channel.default",
            "\"elsewhere\" is not a connection of connections.notify",
        );
        has(&p, "5:9: input.kind", "type: connection needs `connection:`");
        has(
            &p,
            "8:13: steps[0].action",
            "no action \"lgo\" (the catalog: log, notify, kubernetes.get,",
        );
        has(&p, "12:16: steps[1].with.message", "input.nope is not declared");
        has(
            &p,
            "13:15: steps[1].with.colour",
            "action log has no parameter \"colour\"",
        );
        has(&p, "15:13: steps[2].with", "needs the parameter \"connection\"");
        has(
            &p,
            "17:13: steps[2].with.text",
            "steps.fourth is not a step before this one",
        );
        has(&p, "19:11: steps[3].when", "`input.app ==` does not compile (column");
        has(&p, "21:22: steps[3].with.message", "must be a string, not 42");
        has(&p, "22:9: steps[4].id", "the id of an earlier step");
        has(&p, "22:5: steps[4]", "`wait` or `sleep`, not action and sleep");
        has(&p, "25:9: steps[5].id", "\"get-app\" is not an id");
        has(&p, "25:5: steps[5].with", "not a sleep step");
        has(&p, "28:5: steps[6]", "needs one of `action`, `workflow`");
        has(&p, "30:3: output", "`later` is not known here");
    }

    #[test]
    fn each_kind_of_step_is_checked_with_its_line_column_and_key() {
        let p = problems(
            r#"name: ops.kinds
input:
  app: { type: string }
  hosts: { type: list }
steps:
  - id: each
    for_each: ${{ input.app }}
    action: log
    with: { message: "${{ item }}" }
  - id: plain
    for_each: seven
    max-in-flight: 0
    action: log
    with: { message: x }
  - id: outside
    action: log
    max-in-flight: 3
    with: { message: "${{ item }}" }
  - id: gate
    approval: { approvers: [], timeout: 1h }
    retry: { attempts: 2 }
  - id: bad_approver
    approval: { approvers: ["token:a", "token:b"], required: 3 }
  - id: wait_forever
    wait: go
  - id: engine_signal
    wait: resolved
    timeout: 1m
    with: { x: 1 }
  - id: nap
    sleep: 1s
    timeout: 1s
    for_each: ${{ input.hosts }}
  - id: child
    workflow: ops.other
    with: { app: "${{ steps.later.x }}" }
"#,
        );
        has(&p, "7:15: steps[0].for_each", "input.app is not a list");
        has(
            &p,
            "11:15: steps[1].for_each",
            "must be a list or `${{ expression }}` giving one, not \"seven\"",
        );
        has(&p, "10:5: steps[1].max-in-flight", "must be 1 to 1000");
        has(&p, "15:5: steps[2].max-in-flight", "is for a `for_each` step");
        has(
            &p,
            "18:22: steps[2].with.message",
            "`item` is known only in the parameters of a `for_each` step",
        );
        has(&p, "20:15: steps[3].approval", "must name at least one approver");
        has(&p, "19:5: steps[3].retry", "`retry` is for action steps");
        has(&p, "23:15: steps[4].approval", "requires 3 approvals but names only 2");
        has(&p, "25:11: steps[5].timeout", "a `wait` step needs `timeout:`");
        has(&p, "27:11: steps[6].wait", "a signal only the engine sends");
        has(&p, "26:5: steps[6].with", "not a wait step");
        has(&p, "30:5: steps[7].timeout", "`timeout` is for action and wait steps");
        has(&p, "30:5: steps[7].for_each", "`for_each` is for action steps");
        has(
            &p,
            "36:18: steps[8].with.app",
            "steps.later is not a step before this one",
        );
        // An approver that is not one stops the reading there, with its line and column.
        let p = problems("name: ops.x\nsteps:\n  - { id: a, approval: { approvers: [alice] } }\n");
        assert!(
            p.len() == 1 && p[0].contains("line 3") && p[0].contains("approver 'alice' must say what it is"),
            "{p:?}"
        );
    }

    #[test]
    fn undo_and_finally_are_checked_with_their_line_column_and_key() {
        let p = problems(
            r#"name: ops.undo
steps:
  - id: scale
    action: log
    with: { message: up }
    undo: { action: log, with: { message: "${{ steps.scale.message }} ${{ steps.later.x }}" } }
  - id: nap
    sleep: 1s
    undo: { action: log, with: { message: x } }
  - id: later
    action: log
    with: { message: x }
    undo: { action: lgo }
finally:
  - id: scale
    action: log
    with: { message: x }
  - id: wait_more
    sleep: 1s
  - id: tidy
    action: log
    with: { message: "${{ steps.later.message }} ${{ input.nope }}" }
    undo: { action: log, with: { message: x } }
"#,
        );
        has(
            &p,
            "6:43: steps[0].undo.with.message",
            "steps.later is not this step or one before it",
        );
        has(&p, "7:5: steps[1].undo", "`undo` is for action steps");
        has(&p, "13:21: steps[2].undo.action", "no action \"lgo\"");
        has(&p, "15:9: finally[0].id", "the id of an earlier step");
        has(&p, "18:5: finally[1]", "a `finally` step is an `action` step");
        has(&p, "22:22: finally[2].with.message", "input.nope is not declared");
        has(&p, "20:5: finally[2].undo", "a `finally` step has no undo");
    }

    #[test]
    fn a_key_the_format_does_not_have_is_named_with_its_line() {
        let p = problems("name: ops.x\nsteps:\n  - id: a\n    action: log\n    retries: 3\n");
        assert!(
            p.len() == 1 && p[0].contains("retries") && p[0].contains("line 5"),
            "{p:?}"
        );
    }
}
