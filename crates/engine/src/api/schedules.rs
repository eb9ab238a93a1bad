//! `/api/v1/schedules`: the cron schedules, paused, resumed or fired by hand.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::api::access::Who;
use crate::api::audit::audit;
use crate::api::error::ApiError;
use crate::api::state::Api;

pub(crate) async fn list_schedules(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let schedules = api.scheduler().list().await?;
    Ok(Json(json!({ "schedules": schedules })))
}

pub(crate) async fn get_schedule(State(api): State<Api>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let schedule = api.scheduler().get(&name).await?;
    Ok(Json(serde_json::to_value(schedule).unwrap_or(Value::Null)))
}

pub(crate) async fn pause_schedule(
    State(api): State<Api>,
    axum::Extension(caller): Who,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let schedule = api.scheduler().pause(&name, &caller.name).await?;
    audit(api.engine(), &caller, "schedule.pause", &name, Value::Null).await;
    Ok(Json(serde_json::to_value(schedule).unwrap_or(Value::Null)))
}

pub(crate) async fn resume_schedule(
    State(api): State<Api>,
    axum::Extension(caller): Who,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let schedule = api.scheduler().resume(&name, &caller.name).await?;
    audit(api.engine(), &caller, "schedule.resume", &name, Value::Null).await;
    Ok(Json(serde_json::to_value(schedule).unwrap_or(Value::Null)))
}

pub(crate) async fn trigger_schedule(
    State(api): State<Api>,
    axum::Extension(caller): Who,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let run = api.scheduler().trigger(&name, &caller.name).await?;
    audit(
        api.engine(),
        &caller,
        "schedule.trigger",
        &name,
        json!({ "run_id": run }),
    )
    .await;
    Ok((StatusCode::CREATED, Json(json!({ "schedule": name, "run_id": run }))))
}
