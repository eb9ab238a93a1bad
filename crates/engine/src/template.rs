//! Filling a workflow's input from what triggered it.
//!
//! An input in the config is JSON with placeholders `{{ path.to.field }}` in its strings. A
//! string that is exactly one placeholder takes the field's value as it is (a number stays a
//! number, an object an object); a placeholder inside a longer string is replaced by the field's
//! text. A path names object keys and array indexes: `{{ payload.commits.0.id }}`.
//!
//! ```text
//! input:                                  context:
//!   app: "{{ labels.deployment }}"          { "labels": { "deployment": "web" },
//!   replicas: "{{ annotations.want }}"        "annotations": { "want": 3 } }
//!   note: "fired at {{ tick }}"           → { "app": "web", "replicas": 3, "note": "fired at 2026-…" }
//! ```
//!
//! A path that is not in the context is an error naming the input key and the path.

use serde_json::Value;

use crate::core::error::TemplateError;

/// Renders `template` against `context`.
pub fn render(template: &Value, context: &Value) -> Result<Value, TemplateError> {
    render_at(template, context, "input")
}

/// Every placeholder path in `template`, with the input key it is in.
pub fn placeholders(template: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    collect(template, "input", &mut out);
    out
}

fn collect(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(start) = rest.find("{{") {
                let after = &rest[start + 2..];
                let Some(end) = after.find("}}") else { break };
                out.push((at.to_string(), after[..end].trim().to_string()));
                rest = &after[end + 2..];
            }
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .for_each(|(i, v)| collect(v, &format!("{at}[{i}]"), out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| collect(v, &format!("{at}.{k}"), out)),
        _ => {}
    }
}

fn render_at(template: &Value, context: &Value, at: &str) -> Result<Value, TemplateError> {
    match template {
        Value::String(s) => render_str(s, context, at),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| render_at(v, context, &format!("{at}[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| Ok((k.clone(), render_at(v, context, &format!("{at}.{k}"))?)))
            .collect::<Result<serde_json::Map<_, _>, TemplateError>>()
            .map(Value::Object),
        other => Ok(other.clone()),
    }
}

fn render_str(s: &str, context: &Value, at: &str) -> Result<Value, TemplateError> {
    let trimmed = s.trim();
    if let Some(path) = whole_placeholder(trimmed) {
        return lookup(context, path, at).cloned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(format!("{at}: '{{{{' without a closing '}}}}' in \"{s}\"").into());
        };
        let path = after[..end].trim();
        match lookup(context, path, at)? {
            Value::String(v) => out.push_str(v),
            Value::Null => out.push_str("null"),
            other => out.push_str(&other.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

fn whole_placeholder(s: &str) -> Option<&str> {
    let inner = s.strip_prefix("{{")?.strip_suffix("}}")?;
    (!inner.contains("{{") && !inner.contains("}}")).then(|| inner.trim())
}

fn lookup<'a>(context: &'a Value, path: &str, at: &str) -> Result<&'a Value, TemplateError> {
    if path.is_empty() {
        return Err(format!("{at}: empty placeholder '{{{{ }}}}'").into());
    }
    let mut current = context;
    for part in path.split('.') {
        let next = match current {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        };
        current = next.ok_or_else(|| {
            let known = match context {
                Value::Object(map) => map.keys().cloned().collect::<Vec<_>>().join(", "),
                _ => String::new(),
            };
            TemplateError(format!(
                "{at}: '{{{{ {path} }}}}' refers to a field that is not there (the trigger provides: {known})"
            ))
        })?;
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_whole_placeholder_keeps_the_type() {
        let ctx = json!({ "annotations": { "want": 3 }, "labels": { "app": "web" } });
        let out = render(&json!({ "n": "{{ annotations.want }}", "app": "{{labels.app}}" }), &ctx).unwrap();
        assert_eq!(out, json!({ "n": 3, "app": "web" }));
    }

    #[test]
    fn placeholders_inside_text_are_interpolated() {
        let ctx = json!({ "tick": "2026-11-21T02:30:00+01:00", "n": 2 });
        let out = render(&json!(["at {{ tick }} (#{{ n }})"]), &ctx).unwrap();
        assert_eq!(out, json!(["at 2026-11-21T02:30:00+01:00 (#2)"]));
    }

    #[test]
    fn arrays_are_indexed() {
        let ctx = json!({ "payload": { "commits": [{ "id": "abc" }] } });
        assert_eq!(
            render(&json!("{{ payload.commits.0.id }}"), &ctx).unwrap(),
            json!("abc")
        );
    }

    #[test]
    fn a_missing_field_names_the_input_key_and_the_path() {
        let ctx = json!({ "tick": "t", "schedule": "s" });
        let err = render(&json!({ "db": { "name": "{{ labels.db }}" } }), &ctx).unwrap_err();
        assert!(err.contains("input.db.name"), "{err}");
        assert!(err.contains("labels.db"), "{err}");
        assert!(err.contains("schedule, tick"), "{err}");
    }

    #[test]
    fn an_unclosed_placeholder_is_an_error() {
        assert!(render(&json!("{{ tick"), &json!({ "tick": 1 })).is_err());
    }
}
