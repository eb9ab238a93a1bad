//! dayshift-engine: the durable core of dayshift.
//!
//! Workflows are async functions whose side effects go through a [`Ctx`]. The runtime journals
//! each completed step in PostgreSQL ([`PgStore`]), so a run survives the death of any worker:
//! another one replays the journal and carries on from the first step that has no result.
//! Redis ([`RedisQueue`]) only carries wake-ups; a sweeper re-enqueues whatever PostgreSQL says
//! is due, so losing Redis loses no run. See ARCHITECTURE.md for the glossary and the contract.

pub mod alerts;
pub mod approval;
pub mod auth;
mod console;
mod engine;
mod error;
pub mod http;
pub mod metrics;
mod model;
pub mod policy;
mod queue;
mod runtime;
mod schedule;
mod store;
mod telemetry;
pub mod template;
pub mod views;
pub mod webhook;
mod worker;
mod workflow;

pub use approval::{ApprovalGate, ApprovalRequest, Approver, Counted};
pub use engine::{Engine, EngineBuilder, FaultInjector, StepHook};
pub use error::{EngineError, QueueError, StepError, StoreError, WorkflowError};
pub use model::{
    AttemptError, Concurrency, ConcurrencyPolicy, RetryPolicy, RunFilter, RunId, RunStatus, RunView, StartRun, Started,
    StepKind, StepStatus, StepView,
};
pub use queue::{QueueConfig, RedisQueue};
pub use runtime::{Ctx, Step, StepCtx};
pub use schedule::{CatchUp, CronExpr, Overlap, Schedule, ScheduleView, Scheduler, TickView, TimeZone};
pub use store::{Lease, MIGRATOR, PgStore};
pub use worker::{Worker, WorkerConfig};
pub use workflow::{Registry, WorkflowDef, WorkflowInfo};
