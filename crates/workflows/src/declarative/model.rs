//! A workflow file compiled: the definition the interpreter runs, and the input it takes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dayshift_engine::RetryPolicy;
use dayshift_engine::approval::ApprovalGate;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::actions::Action;
use super::expr::{Expr, Template};

/// A workflow file, compiled: every expression parsed, every reference checked.
#[derive(Debug)]
pub struct Definition {
    pub(super) name: String,
    pub(super) description: String,
    pub(super) path: String,
    /// SHA-256 of the file's text.
    pub(super) hash: String,
    /// The file's text, kept in PostgreSQL by version.
    pub(super) source: String,
    /// Its number among the texts of this name ([`super::keep_versions`]); 1 until then.
    pub(super) version: std::sync::OnceLock<u32>,
    pub(super) input: Vec<InputField>,
    pub(super) steps: Vec<Step>,
    /// Action steps run when the run ends, however it ends: after the undos on failure.
    pub(super) finally: Vec<Step>,
    pub(super) output: Option<Template>,
    /// The concurrency every run takes.
    pub(super) concurrency: Option<ConcurrencyTemplate>,
}

/// A file's `concurrency:`: the key, made from the input when a run starts.
#[derive(Debug)]
pub(super) struct ConcurrencyTemplate {
    pub(super) key: Template,
    pub(super) limit: u32,
    pub(super) policy: dayshift_engine::ConcurrencyPolicy,
}

/// The type of a declared input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum InputType {
    String,
    Integer,
    Number,
    Boolean,
    List,
    Object,
    /// The name of one of the config's connections of a kind (`connection: postgres`): what a
    /// caller may choose is only what the config names, and the policy's allow-list on top.
    Connection,
}

#[derive(Debug)]
pub(super) struct InputField {
    pub(super) name: String,
    pub(super) kind: InputType,
    pub(super) description: String,
    pub(super) default: Option<Value>,
    pub(super) required: bool,
    pub(super) choices: Option<Vec<Value>>,
    pub(super) connection: Option<String>,
    /// Through the API, it takes only what the policy allows (connections, `guarded: true`).
    pub(super) guarded: bool,
}

impl Definition {
    /// Its input as a JSON Schema (2020-12), what `GET /api/v1/workflows/{name}` answers and the
    /// console's start form is made from: each field's type, description, default and choices; a
    /// connection's choices are the config's names of its kind (`connections`), and a guarded
    /// field says so (`x-dayshift-guarded`: through the API, the policy decides what it takes).
    pub fn input_schema(&self, connections: &BTreeMap<String, BTreeSet<String>>) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for f in &self.input {
            let kind = match f.kind {
                InputType::String | InputType::Connection => "string",
                InputType::Integer => "integer",
                InputType::Number => "number",
                InputType::Boolean => "boolean",
                InputType::List => "array",
                InputType::Object => "object",
            };
            let mut p = serde_json::json!({ "type": kind });
            if !f.description.is_empty() {
                p["description"] = Value::String(f.description.clone());
            }
            if let Some(d) = &f.default {
                p["default"] = d.clone();
            }
            if let Some(c) = &f.choices {
                p["enum"] = Value::Array(c.clone());
            }
            if let Some(kind) = &f.connection {
                let names = connections.get(kind).cloned().unwrap_or_default();
                p["enum"] = names.into_iter().map(Value::String).collect();
                p["x-dayshift-connection"] = Value::String(kind.clone());
            }
            if f.guarded {
                p["x-dayshift-guarded"] = Value::Bool(true);
            }
            if f.required {
                required.push(Value::String(f.name.clone()));
            }
            properties.insert(f.name.clone(), p);
        }
        serde_json::json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object", "additionalProperties": false,
            "properties": properties, "required": required,
        })
    }
}

impl InputField {
    /// Whether `v` is a value of this field.
    pub(super) fn check(&self, v: &Value, connections: &BTreeMap<String, BTreeSet<String>>) -> Result<(), String> {
        let ok = match self.kind {
            InputType::String | InputType::Connection => v.is_string(),
            InputType::Integer => v.is_i64() || v.is_u64(),
            InputType::Number => v.is_number(),
            InputType::Boolean => v.is_boolean(),
            InputType::List => v.is_array(),
            InputType::Object => v.is_object(),
        };
        if !ok {
            return Err(format!("must be {}, not {v}", self.kind_name()));
        }
        if let Some(choices) = &self.choices
            && !choices.contains(v)
        {
            let list: Vec<String> = choices.iter().map(Value::to_string).collect();
            return Err(format!("must be one of {}, not {v}", list.join(", ")));
        }
        if let (Some(kind), Some(name)) = (&self.connection, v.as_str()) {
            let names = connections.get(kind);
            if !names.is_some_and(|n| n.contains(name)) {
                return Err(format!(
                    "{name:?} is not a connection of connections.{kind} in the config"
                ));
            }
        }
        Ok(())
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            InputType::String => "a string",
            InputType::Integer => "an integer",
            InputType::Number => "a number",
            InputType::Boolean => "true or false",
            InputType::List => "a list",
            InputType::Object => "an object",
            InputType::Connection => "a connection's name",
        }
    }
}

#[derive(Debug)]
pub(super) struct Step {
    pub(super) id: String,
    /// Where it is written, for messages.
    pub(super) line: u64,
    pub(super) kind: StepKind,
    pub(super) when: Option<Expr>,
    pub(super) retry: RetryPolicy,
    pub(super) timeout: Option<Duration>,
    /// Runs the step once per item of a list, at most `max_in_flight` at once.
    pub(super) for_each: Option<ForEach>,
    /// What puts back what the step did, if the run later fails or is cancelled.
    pub(super) undo: Option<Undo>,
    /// Its output holds a secret: never journaled, and the step runs again on replay.
    pub(super) sensitive: bool,
}

/// A step's `undo`: an action, its parameters able to read the step's own output.
#[derive(Debug)]
pub(super) struct Undo {
    pub(super) action: Action,
    pub(super) with: Template,
    /// Its own retry policy, if not the step's.
    pub(super) retry: Option<RetryPolicy>,
}

#[derive(Debug)]
pub(super) enum StepKind {
    /// An action of the catalog, with its parameters.
    Action {
        action: Action,
        with: Template,
    },
    /// A child run of another workflow (built-in or a file), with its input.
    Workflow {
        workflow: String,
        with: Template,
        /// `path:line:column: steps[i]`, for the checks made once every workflow is known.
        at: String,
        /// Each key of `with:` and where its value is (`path:line:column`).
        with_at: Vec<(String, String)>,
    },
    /// The engine's approval gate.
    Approval(ApprovalGate),
    /// A durable wait for a signal, at most `timeout`.
    Wait {
        signal: String,
        timeout: Duration,
    },
    Sleep(Duration),
}

/// What a `for_each` step goes over: each item is one branch, the step's output their list.
#[derive(Debug)]
pub(super) struct ForEach {
    pub(super) items: Template,
    pub(super) max_in_flight: usize,
}

impl Definition {
    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SHA-256 of its file's text.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Its version: its number among the texts of its name kept in PostgreSQL.
    pub fn version(&self) -> u32 {
        self.version.get().copied().unwrap_or(1)
    }

    /// The file it was read from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `input` checked against the declared fields, defaults filled in.
    pub(super) fn complete(
        &self,
        input: &Value,
        connections: &BTreeMap<String, BTreeSet<String>>,
    ) -> Result<Value, String> {
        let mut given = match input {
            Value::Object(m) => m.clone(),
            Value::Null => Map::new(),
            other => return Err(format!("the input must be an object, not {other}")),
        };
        // Plan mode is the engine's, not an input of the file.
        if let Some(plan) = given.remove(dayshift_engine::PLAN_INPUT)
            && !plan.is_boolean()
        {
            return Err(format!("{}: must be true or false", dayshift_engine::PLAN_INPUT));
        }
        if let Some(unknown) = given.keys().find(|k| !self.input.iter().any(|f| &f.name == *k)) {
            let known: Vec<&str> = self.input.iter().map(|f| f.name.as_str()).collect();
            return Err(format!(
                "{unknown}: not an input of {} (it takes: {})",
                self.name,
                if known.is_empty() {
                    "nothing".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
        let mut out = Map::new();
        for field in &self.input {
            match given.get(&field.name).or(field.default.as_ref()) {
                Some(v) => {
                    field
                        .check(v, connections)
                        .map_err(|e| format!("{}: {e}", field.name))?;
                    out.insert(field.name.clone(), v.clone());
                }
                None if field.required => return Err(format!("{}: required", field.name)),
                None => {
                    out.insert(field.name.clone(), Value::Null);
                }
            }
        }
        Ok(Value::Object(out))
    }
}
