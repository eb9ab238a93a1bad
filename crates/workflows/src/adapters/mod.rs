//! Adapters to the systems the built-in workflows act on. Each is a thin, tested wrapper that
//! says how its operations behave when repeated (steps are at-least-once).

pub mod git;
pub mod http;
pub mod kube;
pub mod notify;
pub mod s3;
pub mod vault;
