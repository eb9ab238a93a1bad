//! The actions a workflow file's steps call: each a typed call with its parameters checked
//! when the file is loaded (names, and the type of every parameter that holds no expression)
//! and again when it runs.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::connections::Connections;
use dayshift_engine::StepError;

/// One parameter of an action.
pub(crate) struct Param {
    pub name: &'static str,
    pub required: bool,
    /// The JSON type its value must have: "string", "any".
    pub kind: &'static str,
    pub description: &'static str,
}

/// An action of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Records a message (and any data) as the step's output. Changes nothing.
    Log,
    /// Posts a notice to a chat webhook the config names (`connections.notify`).
    Notify,
}

impl Action {
    pub(crate) const ALL: [Action; 2] = [Action::Log, Action::Notify];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Notify => "notify",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// What it does, and why running it again is safe.
    pub(crate) fn description(self) -> &'static str {
        match self {
            Action::Log => {
                "Records `message` (and `data`) as the step's output; changes nothing, so repeating it is harmless."
            }
            Action::Notify => {
                "Posts `text` to the chat webhook `connection` names (connections.notify). A retry after a lost answer \
                 may post the notice twice; nothing else changes."
            }
        }
    }

    pub(crate) fn params(self) -> &'static [Param] {
        match self {
            Action::Log => &[
                Param {
                    name: "message",
                    required: true,
                    kind: "string",
                    description: "The text recorded.",
                },
                Param {
                    name: "data",
                    required: false,
                    kind: "any",
                    description: "Any value recorded with it.",
                },
            ],
            Action::Notify => &[
                Param {
                    name: "connection",
                    required: true,
                    kind: "string",
                    description: "A chat webhook of connections.notify, by name.",
                },
                Param {
                    name: "text",
                    required: true,
                    kind: "string",
                    description: "The notice (Markdown).",
                },
            ],
        }
    }

    /// Runs it with `params` (the step's `with:`, expressions evaluated).
    pub(crate) async fn run(self, params: Value, connections: &Connections) -> Result<Value, StepError> {
        match self {
            Action::Log => {
                let p: LogParams = parse(self, params)?;
                Ok(json!({ "message": p.message, "data": p.data }))
            }
            Action::Notify => {
                let p: NotifyParams = parse(self, params)?;
                let notifier = connections.notifier(&p.connection).map_err(StepError::permanent)?;
                notifier.send(&p.text).await.map_err(|e| {
                    if e.is_transient() {
                        StepError::transient(e)
                    } else {
                        StepError::permanent(e)
                    }
                })?;
                Ok(json!({ "sent": true }))
            }
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(action: Action, params: Value) -> Result<T, StepError> {
    serde_json::from_value(params).map_err(|e| StepError::permanent(format!("action {}: {e}", action.name())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogParams {
    message: String,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NotifyParams {
    connection: String,
    text: String,
}
