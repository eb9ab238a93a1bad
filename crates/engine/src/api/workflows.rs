//! `/api/v1/workflows`: the registered workflows, each saying whether the caller may start it
//! (and why not) and which input fields the policy guards.

use axum::Json;
use axum::extract::{Path, State};
use serde_json::{Value, json};

use crate::api::access::Who;
use crate::api::error::ApiError;
use crate::api::state::Api;
use crate::core::error::EngineError;
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
            let guarded: Vec<String> = api
                .engine()
                .registry()
                .guards_of(&w.name)
                .iter()
                .map(|g| g.path.clone())
                .collect();
            serde_json::json!({
                "name": w.name, "version": w.version, "description": w.description,
                "may_start": why_not.is_none(), "why_not": why_not, "guarded_inputs": guarded,
            })
        })
        .collect()
}

/// `GET /api/v1/workflows/{name}`: one workflow as [`workflows_for`] shows it, with its input
/// schema (a workflow file's), its source (the current version's text, for a file), and its
/// versions: each kept text of a file, and each version runs started on, with their counts by
/// status and the runs still going on it.
pub(crate) async fn workflow(
    State(api): State<Api>,
    axum::Extension(caller): Who,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let Some(mut shown) = workflows_for(&api, &caller)
        .into_iter()
        .find(|w| w["name"] == name.as_str())
    else {
        return Err(EngineError::UnknownWorkflow(name).into());
    };
    let store = api.engine().store();
    let (texts, runs) =
        tokio::try_join!(store.workflow_definitions(&name), store.runs_by_version(&name)).map_err(EngineError::from)?;
    let current = shown["version"].as_i64().unwrap_or(0);
    let mut versions: std::collections::BTreeMap<i64, Value> = std::collections::BTreeMap::new();
    for mut t in texts {
        let v = t["version"].as_i64().unwrap_or(0);
        if v == current {
            shown["source"] = t["source"].clone();
            shown["path"] = t["path"].clone();
        }
        t.as_object_mut().map(|o| o.remove("source"));
        versions.insert(v, t);
    }
    for (v, counts, going) in runs {
        let entry = versions.entry(i64::from(v)).or_insert_with(|| json!({ "version": v }));
        entry["runs"] = counts;
        entry["in_flight"] = json!(going.iter().map(|id| id.to_string()).collect::<Vec<_>>());
    }
    let versions: Vec<Value> = versions
        .into_values()
        .rev()
        .map(|mut v| {
            let n = v["version"].as_i64().unwrap_or(0);
            v["current"] = json!(n == current);
            if v.get("runs").is_none() {
                v["runs"] = json!({});
                v["in_flight"] = json!([]);
            }
            v
        })
        .collect();
    shown["versions"] = json!(versions);
    shown["input_schema"] = api
        .engine()
        .registry()
        .input_schema_of(&name)
        .cloned()
        .unwrap_or(Value::Null);
    Ok(Json(shown))
}
