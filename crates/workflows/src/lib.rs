//! dayshift-workflows: the built-in Day-2 workflows.
//!
//! Each family lives in its own module and is registered through [`all`].

pub mod adapters;
mod selftest;

pub use selftest::{ChainInput, ChainOutput, GateInput, GateOutput, StepCount, TableName, chain, gate};

use dayshift_engine::WorkflowDef;
use sqlx::PgPool;

/// Every built-in workflow. `pool` is the dayshift database, for workflows that keep tables
/// of their own there.
pub fn all(pool: PgPool) -> Vec<WorkflowDef> {
    vec![chain(pool), gate()]
}
