//! What every trigger that takes requests (a forge's delivery, an Alertmanager notification)
//! has in common: why it refuses what it was sent, the same for all of them (the API maps each
//! to one status), and the checks every one of their configured routes needs.

use std::collections::HashMap;

use serde_saphyr::Spanned;

use crate::core::error::EngineError;
use crate::core::workflow::Registry;

/// What is wrong with a request, before anything is done.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IntakeError {
    /// The sender is not who the configured secret or token says.
    #[error("{0}")]
    Unauthorized(String),
    /// The request is not what the sender sends.
    #[error("{0}")]
    BadRequest(String),
}

/// Why a request was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Refused before anything was done ([`IntakeError`]).
    #[error(transparent)]
    Intake(#[from] IntakeError),
    /// The engine refused or failed (a webhook body replayed under another event: `Conflict`).
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The checks every kind of route needs: a unique name, a registered workflow, and input
/// placeholders that name fields its trigger provides. `section` is where the route is
/// (`webhooks.routes[0]`), `fields` what its trigger fills in and `trigger` what that is called
/// (`a git event`); `seen` holds the names (and lines) of the routes checked before it. Each
/// problem names the file (`path`), the line and the key.
pub(crate) fn check_route_basics(
    path: &str,
    section: &str,
    (name, workflow, input): (&Spanned<String>, &Spanned<String>, &serde_json::Value),
    (fields, trigger): (&[&str], &str),
    registry: &Registry,
    seen: &mut HashMap<String, u64>,
    problems: &mut Vec<String>,
) {
    let line = name.referenced.line();
    let at = |key: &str| format!("{path}, line {line}: {section}.{key}");
    if let Some(first) = seen.insert(name.value.clone(), line) {
        problems.push(format!(
            "{}: route name '{}' is already used on line {first}; names must be unique",
            at("name"),
            name.value
        ));
    }
    if registry
        .validate_input(&workflow.value, &serde_json::Value::Null)
        .is_none()
    {
        problems.push(format!(
            "{path}, line {}: {section}.workflow: unknown workflow '{}'",
            workflow.referenced.line(),
            workflow.value
        ));
    }
    for (key, placeholder) in crate::template::placeholders(input) {
        let root = placeholder.split('.').next().unwrap_or_default();
        if !fields.contains(&root) {
            problems.push(format!(
                "{}: '{{{{ {placeholder} }}}}' names no field of {trigger}; fields: {}",
                at(&key),
                fields.join(", ")
            ));
        }
    }
}
