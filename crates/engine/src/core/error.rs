//! Errors, one enum per layer. Errors that are journaled are data (`Serialize`).

use serde::{Deserialize, Serialize};

use crate::core::model::RunId;

/// How a step failed. Journaled, so it round-trips through serde.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "message", rename_all = "kebab-case")]
pub enum StepError {
    /// Worth retrying (network, throttling, a conflict that may clear).
    #[error("{0}")]
    Transient(String),
    /// Retrying will not help (bad input, not found, forbidden). Fails the step at once.
    #[error("{0}")]
    Permanent(String),
    /// The attempt took longer than the step's timeout; retried like a transient error.
    #[error("step timed out after {0} ms")]
    Timeout(u64),
    /// The run was cancelled while this step was in flight.
    #[error("cancelled")]
    Cancelled,
}

impl StepError {
    /// A transient error from anything displayable.
    pub fn transient(e: impl std::fmt::Display) -> Self {
        Self::Transient(e.to_string())
    }

    /// A permanent error from anything displayable.
    pub fn permanent(e: impl std::fmt::Display) -> Self {
        Self::Permanent(e.to_string())
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient(_) | Self::Timeout(_))
    }

    /// The name stored in `steps.error_kind`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Transient(_) => "transient",
            Self::Permanent(_) => "permanent",
            Self::Timeout(_) => "timeout",
            Self::Cancelled => "cancelled",
        }
    }

    pub(crate) fn from_journal(kind: Option<&str>, message: Option<String>) -> Self {
        let message = message.unwrap_or_default();
        match kind {
            Some("transient") => Self::Transient(message),
            Some("cancelled") => Self::Cancelled,
            Some("timeout") => Self::Transient(message),
            _ => Self::Permanent(message),
        }
    }
}

/// Why a workflow failed. A workflow returns it; `?` on a step error converts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum WorkflowError {
    /// A step failed for good.
    #[error("step failed: {0}")]
    Step(#[from] StepError),
    /// The workflow decided to fail (a precondition, a gate that said no, ...).
    #[error("{0}")]
    Failed(String),
}

impl WorkflowError {
    /// A failure with a message.
    pub fn failed(msg: impl std::fmt::Display) -> Self {
        Self::Failed(msg.to_string())
    }
}

/// Errors of the PostgreSQL store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Another worker took the run over: this one must stop and write nothing more.
    #[error("lease on run {0} lost")]
    LeaseLost(RunId),
    /// The request contradicts what is stored (e.g. an idempotency key reused for another workflow).
    #[error("{0}")]
    Conflict(String),
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
}

/// Errors of the queue that carries wake-ups.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis error: {0}")]
    Redis(String),
}

/// Errors the engine's API returns to callers (HTTP, CLI, triggers).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown workflow '{0}'; `dayshift workflows` lists the registered ones")]
    UnknownWorkflow(String),
    #[error("invalid input for workflow '{workflow}': {message}")]
    InvalidInput { workflow: String, message: String },
    #[error("run {0} not found")]
    RunNotFound(RunId),
    /// Something else named in the request does not exist (a schedule, a route).
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    /// The caller may not do this (outside what the config allows it).
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
}

impl From<sqlx::Error> for EngineError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(StoreError::Db(e))
    }
}

/// The store's result type.
pub(crate) type StoreResult<T> = std::result::Result<T, StoreError>;

/// Declares an error that is one sentence for whoever reads it (a caller, a config's author):
/// a type of its own, so that a signature says what went wrong, with the sentence as its text.
/// The crate using it needs `thiserror` and `serde`.
#[macro_export]
macro_rules! message_error {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, ::thiserror::Error, ::serde::Serialize)]
        #[error("{0}")]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
    };
}

message_error!(
    /// Why a caller may not do what it asks (who may start a workflow, a guarded input's value,
    /// whether a decision at an approval gate counts): shown to the caller and audited.
    Refused
);

message_error!(
    /// What is wrong with a workflow's input: the field and why.
    InvalidInput
);

message_error!(
    /// What is wrong with a template or what it was filled with: the input key and the path.
    TemplateError
);

message_error!(
    /// What is wrong with a piece of configuration (an approval gate, an OIDC provider).
    ConfigError
);

impl From<Refused> for EngineError {
    fn from(r: Refused) -> Self {
        Self::Forbidden(r.0)
    }
}
