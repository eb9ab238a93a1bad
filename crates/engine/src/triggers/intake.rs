//! Why an intake refuses what it was sent, the same for every trigger that takes requests (a
//! forge's delivery, an Alertmanager notification); the API maps each to one status.

use crate::core::error::EngineError;

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
