//! Adapters to the systems the built-in workflows act on. Each is a thin, tested wrapper that
//! says how its operations behave when repeated (steps are at-least-once).

pub mod endpoint;
pub mod forge;
pub mod git;
pub mod http;
pub mod kube;
pub mod notify;
pub mod postgres;
pub mod prometheus;
pub mod s3;
pub mod vault;

use dayshift_engine::StepError;

/// An adapter error that knows whether another attempt may succeed.
pub(crate) trait Transient: std::fmt::Display {
    fn is_transient(&self) -> bool;
}

/// The step error for an adapter error: retried if transient, permanent otherwise.
pub(crate) fn step_err<E: Transient>(e: E) -> StepError {
    if e.is_transient() {
        StepError::transient(e)
    } else {
        StepError::permanent(e)
    }
}

macro_rules! transient {
    ($($t:ty),*) => {
        $(impl Transient for $t {
            fn is_transient(&self) -> bool {
                <$t>::is_transient(self)
            }
        })*
    };
}

transient!(
    s3::S3Error,
    kube::KubeError,
    vault::VaultError,
    notify::NotifyError,
    postgres::PgError,
    prometheus::PromError,
    endpoint::EndpointError
);
