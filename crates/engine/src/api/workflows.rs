//! `/api/v1/workflows`: the registered workflows, each saying whether the caller may start it
//! (and why not) and which input fields the policy guards.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::api::access::Who;
use crate::api::state::Api;
use crate::identity::Caller;

/// The workflows, each saying whether the caller may start it (and why not).
pub(crate) async fn workflows(State(api): State<Api>, axum::Extension(caller): Who) -> Json<Value> {
    Json(json!({ "workflows": workflows_for(&api, &caller) }))
}

/// The registered workflows, each with whether `caller` may start it and, if it has any,
/// its guarded input fields.
pub(crate) fn workflows_for(api: &Api, caller: &Caller) -> Vec<Value> {
    api.engine()
        .registry()
        .list()
        .into_iter()
        .map(|w| {
            let why_not = api.policy().may_start(caller, &w.name).err();
            let guarded: Vec<&str> = api
                .engine()
                .registry()
                .guards_of(&w.name)
                .iter()
                .map(|g| g.path.as_str())
                .collect();
            serde_json::json!({
                "name": w.name, "version": w.version, "description": w.description,
                "may_start": why_not.is_none(), "why_not": why_not, "guarded_inputs": guarded,
            })
        })
        .collect()
}
