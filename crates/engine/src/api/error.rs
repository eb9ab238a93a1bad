//! The API's errors: JSON `{"error": "...", "code": "..."}` with a 4xx that says what is
//! wrong, or a 500/503 that hides internals (details go to the log). One mapping from the
//! engine's errors to statuses, here.

use axum::Json;
use axum::extract::FromRequest;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::core::error::EngineError;
use crate::core::model::RunId;
use crate::triggers::intake::{IntakeError, Refusal};

/// An API error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 503 with `Retry-After: 1`: a limit of requests at once is reached; nothing was done.
    pub(crate) fn busy(code: &'static str, message: &str) -> Response {
        let mut r = Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message).into_response();
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            axum::http::HeaderValue::from_static("1"),
        );
        r
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message, "code": self.code }))).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::UnknownWorkflow(_) => Self::new(StatusCode::NOT_FOUND, "unknown_workflow", e.to_string()),
            EngineError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            EngineError::RunNotFound(_) => Self::new(StatusCode::NOT_FOUND, "run_not_found", e.to_string()),
            EngineError::InvalidInput { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", e.to_string())
            }
            EngineError::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            EngineError::BadRequest(_) => Self::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()),
            EngineError::Forbidden(_) => Self::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
            EngineError::Store(_) | EngineError::Queue(_) => {
                tracing::error!(error = %e, "API request failed.");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the engine's database or queue is unavailable; try again",
                )
            }
        }
    }
}

impl From<IntakeError> for ApiError {
    fn from(e: IntakeError) -> Self {
        match e {
            IntakeError::Unauthorized(m) => Self::new(StatusCode::UNAUTHORIZED, "unauthorized", m),
            IntakeError::BadRequest(m) => Self::new(StatusCode::BAD_REQUEST, "bad_request", m),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(e: Refusal) -> Self {
        match e {
            Refusal::Intake(e) => e.into(),
            Refusal::Engine(e) => e.into(),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        // 400 for a body that is not JSON or not the request's shape, 415 without a JSON type.
        let (status, code) = match r {
            JsonRejection::MissingJsonContentType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_json"),
            JsonRejection::JsonDataError(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            _ => (StatusCode::BAD_REQUEST, "invalid_json"),
        };
        Self::new(status, code, format!("request body: {}", r.body_text()))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_query", r.body_text())
    }
}

/// `Json` whose rejection is an [`ApiError`].
#[derive(FromRequest)]
#[from_request(via(Json), rejection(ApiError))]
pub(crate) struct Body<T>(pub(crate) T);

pub(crate) fn parse_id(id: &str) -> Result<RunId, ApiError> {
    id.parse()
        .map_err(|e: crate::core::model::InvalidRunId| ApiError::new(StatusCode::BAD_REQUEST, "invalid_run_id", e.0))
}
