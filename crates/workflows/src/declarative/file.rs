//! The format of a workflow file, as written, and its compilation into a [`Definition`]: every
//! check that needs nothing but the file (and the names of the config's connections) is made
//! here, each problem with the file, line, column and key.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dayshift_engine::RetryPolicy;
use serde::Deserialize;
use serde_json::Value;
use serde_saphyr::Spanned;
use sha2::{Digest, Sha256};

use super::actions::Action;
use super::expr::{Expr, Read, Template};
use super::model::{Definition, InputField, InputType, Step, StepKind};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileSpec {
    name: Spanned<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    input: BTreeMap<String, Spanned<InputSpec>>,
    steps: Vec<Spanned<StepSpec>>,
    #[serde(default)]
    output: Option<Spanned<Value>>,
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
    #[serde(default, with = "humantime_serde")]
    sleep: Option<Duration>,
    #[serde(default)]
    when: Option<Spanned<String>>,
    #[serde(default)]
    retry: Option<RetrySpec>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
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
pub(crate) const CONNECTION_KINDS: [&str; 6] = ["postgres", "s3", "notify", "vault", "kubernetes", "git"];

/// Problems found in one file, each `path:line:column: key: what is wrong`.
struct Problems<'a> {
    path: &'a str,
    list: Vec<String>,
}

impl Problems<'_> {
    /// Checks what `e` reads: declared inputs, the `steps` it may see (`unseen` says why another
    /// is not one of them), and no other name.
    fn reads(
        &mut self,
        e: &Expr,
        at: &serde_saphyr::Location,
        key: &str,
        inputs: &BTreeSet<&str>,
        steps: &BTreeSet<&str>,
        unseen: &str,
    ) {
        for read in e.reads() {
            match read {
                Read::Input(f) if !inputs.contains(f.as_str()) => {
                    self.at(at, key, format!("input.{f} is not declared under `input:`"))
                }
                Read::Step(s) if !steps.contains(s.as_str()) => self.at(at, key, format!("steps.{s} {unseen}")),
                Read::Other(v) if v != "input" && v != "steps" => self.at(
                    at,
                    key,
                    format!("`{v}` is not known here (an expression reads `input` and `steps`)"),
                ),
                _ => {}
            }
        }
    }

    fn at(&mut self, loc: &serde_saphyr::Location, key: &str, what: impl std::fmt::Display) {
        self.list
            .push(format!("{}:{}:{}: {key}: {what}", self.path, loc.line(), loc.column()));
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
            connection,
        };
        if let Some(d) = &s.default
            && let Err(e) = field_def.check(d, connections)
        {
            p.at(loc, &format!("{key}.default"), e);
        }
        input.push(field_def);
    }
    let declared: BTreeSet<&str> = spec.input.keys().map(String::as_str).collect();

    let mut steps = Vec::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for (i, s) in spec.steps.iter().enumerate() {
        let loc = &s.referenced;
        let s = &s.value;
        let id = s.id.value.clone();
        let key = format!("steps[{i}]");
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
        let check_reads = |p: &mut Problems<'_>, e: &Expr, at: &serde_saphyr::Location, key: &str| {
            p.reads(e, at, key, &declared, &earlier, "is not a step before this one")
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
                        check_reads(&mut p, &e, &w.referenced, &format!("{key}.when"));
                        Some(e)
                    }
                    Err(e) => {
                        p.at(&w.referenced, &format!("{key}.when"), e);
                        None
                    }
                }
            }
        };
        let kind = match (&s.action, s.sleep) {
            (Some(a), None) => match Action::parse(&a.value) {
                None => {
                    let known: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
                    p.at(
                        &a.referenced,
                        &format!("{key}.action"),
                        format!("no action {:?} (the catalog: {})", a.value, known.join(", ")),
                    );
                    None
                }
                Some(action) => {
                    let mut with = Vec::new();
                    for (param, v) in &s.with {
                        let pkey = format!("{key}.with.{param}");
                        let Some(def) = action.params().iter().find(|d| d.name == param) else {
                            let known: Vec<&str> = action.params().iter().map(|d| d.name).collect();
                            p.at(
                                &v.referenced,
                                &pkey,
                                format!(
                                    "action {} has no parameter {param:?} (it has: {})",
                                    action.name(),
                                    known.join(", ")
                                ),
                            );
                            continue;
                        };
                        match Template::compile(&v.value) {
                            Err((below, e)) => p.at(&v.referenced, &format!("{pkey}{below}"), e),
                            Ok(t) => {
                                if let Template::Plain(value) = &t
                                    && def.kind == "string"
                                    && !value.is_string()
                                {
                                    p.at(&v.referenced, &pkey, format!("must be a string, not {value}"));
                                }
                                for e in t.exprs() {
                                    check_reads(&mut p, e, &v.referenced, &pkey);
                                }
                                with.push((param.clone(), t));
                            }
                        }
                    }
                    for def in action.params().iter().filter(|d| d.required) {
                        if !s.with.contains_key(def.name) {
                            p.at(
                                &a.referenced,
                                &format!("{key}.with"),
                                format!("action {} needs the parameter {:?}", action.name(), def.name),
                            );
                        }
                    }
                    Some(StepKind::Action {
                        action,
                        with: Template::Object(with),
                    })
                }
            },
            (None, Some(d)) => {
                if !s.with.is_empty() {
                    p.at(loc, &format!("{key}.with"), "`with:` is for an action's parameters");
                }
                Some(StepKind::Sleep(d))
            }
            (Some(_), Some(_)) => {
                p.at(loc, &key, "a step is one of `action` or `sleep`, not both");
                None
            }
            (None, None) => {
                p.at(loc, &key, "a step needs one of `action` or `sleep`");
                None
            }
        };
        let retry = match &s.retry {
            None => RetryPolicy::network(),
            Some(r) => {
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
        };
        if let Some(kind) = kind {
            steps.push(Step {
                id,
                line: loc.line(),
                kind,
                when,
                retry,
                timeout: s.timeout,
            });
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
                    p.reads(
                        e,
                        &o.referenced,
                        "output",
                        &declared,
                        &all_steps,
                        "is not a step of this workflow",
                    );
                }
                Some(t)
            }
        },
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
        output,
    })
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
            "no action \"lgo\" (the catalog: log, notify)",
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
        has(&p, "22:5: steps[4]", "one of `action` or `sleep`, not both");
        has(&p, "25:9: steps[5].id", "\"get-app\" is not an id");
        has(&p, "25:5: steps[5].with", "`with:` is for an action's parameters");
        has(&p, "28:5: steps[6]", "needs one of `action` or `sleep`");
        has(&p, "30:3: output", "`later` is not known here");
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
