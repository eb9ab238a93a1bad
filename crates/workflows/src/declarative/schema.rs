//! The JSON Schema of a workflow file, for editors (`dayshift config schema --workflows`,
//! docs/workflow.schema.json): every key of the format, and for each action of the catalog its
//! parameters, with their types and descriptions. `config check` stays the judge: it also
//! checks what a schema cannot say (references, expressions, targets).

use serde_json::{Map, Value, json};

use super::actions::Action;
use super::file::CONNECTION_KINDS;

/// A value of JSON type `kind`, or a string holding an expression (`${{ … }}`).
fn typed(kind: &str) -> Value {
    let kind = match kind {
        "any" => return json!({}),
        "object" => "object",
        other => other,
    };
    json!({ "anyOf": [
        { "type": kind },
        { "type": "string", "pattern": "\\$\\{\\{", "description": "an expression: ${{ … }}" },
    ] })
}

/// The schema.
pub fn file_schema() -> Value {
    let mut defs = Map::new();
    let mut per_action = Vec::new();
    for a in Action::ALL {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for p in a.params() {
            let mut s = typed(p.kind);
            s["description"] = json!(if p.target {
                format!(
                    "{} (a target: reads only guarded inputs, the file's own values or steps' outputs)",
                    p.description
                )
            } else {
                p.description.to_string()
            });
            properties.insert(p.name.to_string(), s);
            if p.required {
                required.push(json!(p.name));
            }
        }
        let def = format!("with:{}", a.name());
        defs.insert(
            def.clone(),
            json!({ "type": "object", "description": a.description(), "additionalProperties": false,
                    "properties": properties, "required": required }),
        );
        per_action.push(json!({
            "if": { "properties": { "action": { "const": a.name() } }, "required": ["action"] },
            "then": { "properties": { "with": { "$ref": format!("#/$defs/{def}") } } },
        }));
    }
    let names: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
    let duration = json!({ "type": "string", "pattern": "^[0-9]+(ms|s|m|h|d)([0-9]+(ms|s|m|h))*$", "description": "30s, 10m, 2h" });
    let retry = json!({
        "type": "object", "additionalProperties": false, "required": ["attempts"],
        "properties": {
            "attempts": { "type": "integer", "minimum": 1, "maximum": 100, "description": "Attempts in all, the first one included." },
            "delay": duration, "multiplier": { "type": "number", "minimum": 1, "maximum": 10 }, "max-delay": duration,
        },
    });
    defs.insert("retry".into(), retry);
    defs.insert(
        "step".into(),
        json!({
            "type": "object", "additionalProperties": false, "required": ["id"],
            "description": "One step: an `action`, a `workflow`, an `approval`, a `wait` or a `sleep`.",
            "properties": {
                "id": { "type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "description": "Its id: steps.<id> reads its output." },
                "action": { "enum": names, "description": "An action of the catalog (docs/workflows.md)." },
                "with": { "type": "object", "description": "The action's parameters, or the child workflow's input." },
                "workflow": { "type": "string", "description": "A child run of this workflow (built in, or a file)." },
                "approval": {
                    "type": "object", "additionalProperties": false, "required": ["approvers"],
                    "properties": {
                        "approvers": { "type": "array", "items": { "type": "string", "pattern": "^(token|oidc|group):" } },
                        "required": { "type": "integer", "minimum": 1 },
                        "timeout": duration,
                    },
                },
                "wait": { "type": "string", "description": "A signal to wait for, at most `timeout`." },
                "sleep": duration,
                "timeout": duration,
                "when": { "type": "string", "description": "A condition (CEL): the step runs only when it is true." },
                "retry": { "$ref": "#/$defs/retry" },
                "for_each": { "description": "A list, or `${{ expression }}` giving one: one branch per item." },
                "max-in-flight": { "type": "integer", "minimum": 1, "maximum": 1000 },
                "sensitive": { "type": "boolean", "description": "Its output holds a secret: never journaled." },
                "undo": {
                    "type": "object", "additionalProperties": false, "required": ["action"],
                    "properties": { "action": { "enum": names }, "with": { "type": "object" }, "retry": { "$ref": "#/$defs/retry" } },
                },
            },
            "allOf": per_action,
        }),
    );
    defs.insert(
        "input".into(),
        json!({
            "type": "object", "additionalProperties": false, "required": ["type"],
            "properties": {
                "type": { "enum": ["string", "integer", "number", "boolean", "list", "object", "connection"] },
                "connection": { "enum": CONNECTION_KINDS },
                "description": { "type": "string" },
                "default": {},
                "required": { "type": "boolean" },
                "enum": { "type": "array" },
                "guarded": { "type": "boolean", "description": "Through the API, it takes only what the policy allows." },
            },
        }),
    );
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "dayshift workflow file",
        "description": "A workflow file (docs/workflows.md). `dayshift config check` checks what a schema cannot: references, expressions and targets.",
        "type": "object", "additionalProperties": false, "required": ["name", "steps"],
        "properties": {
            "name": { "type": "string", "description": "The workflow's name: `secrets.force-sync`." },
            "description": { "type": "string" },
            "input": { "type": "object", "additionalProperties": { "$ref": "#/$defs/input" } },
            "steps": { "type": "array", "minItems": 1, "items": { "$ref": "#/$defs/step" } },
            "finally": { "type": "array", "items": { "$ref": "#/$defs/step" } },
            "output": { "description": "The run's output: a value, or expressions over the steps." },
            "concurrency": {
                "type": "object", "additionalProperties": false, "required": ["key"],
                "description": "Every run takes this concurrency: runs with one key share `limit` slots.",
                "properties": {
                    "key": { "type": "string", "description": "A text over `input`: `db-${{ input.database }}`." },
                    "limit": { "type": "integer", "minimum": 1, "maximum": 1000 },
                    "policy": { "enum": ["queue", "skip", "cancel-older", "latest-wins"] },
                },
            },
        },
        "$defs": defs,
    })
}
