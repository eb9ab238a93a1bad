//! dayshift-engine: the durable core of dayshift and its front doors.
//!
//! Workflows are async functions whose side effects go through a [`Ctx`]. The runtime journals
//! each completed step in PostgreSQL ([`PgStore`]), so a run survives the death of any worker:
//! another one replays the journal and carries on from the first step that has no result.
//! Redis ([`RedisQueue`]) only carries wake-ups; a sweeper re-enqueues whatever PostgreSQL says
//! is due, so losing Redis loses no run. See ARCHITECTURE.md for the glossary and the contract.
//!
//! The crate reads top down, each layer using only those above it:
//! - [`core`]: model, context and pass (journal and replay), store, queue, worker loops;
//! - [`Engine`] (`engine.rs`): the front door over the core (start, cancel, signal, decide, read);
//! - [`identity`], [`approval`], [`policy`], [`template`]: what the front doors share;
//!   [`config`]: what every config section shares (the error naming a key, secret sources and
//!   the reader the binary provides);
//! - [`triggers`]: cron schedules, git webhooks, Alertmanager: each intake whole in its module,
//!   with its config section;
//! - [`api`]: the HTTP API (one file per resource, roles declared on the routes), the console,
//!   its config section (`api::ServerConfig`).

pub mod api;
pub mod approval;
pub mod config;
pub mod core;
mod engine;
pub mod identity;
pub mod policy;
pub mod template;
pub mod triggers;

pub use approval::{ApprovalGate, ApprovalRequest, Approver, Counted};
pub use core::ctx::{Ctx, Step, StepCtx};
pub use core::error::{EngineError, QueueError, StepError, StoreError, WorkflowError};
pub use core::model::{
    AttemptError, Concurrency, ConcurrencyPolicy, PLAN_INPUT, RetryPolicy, RunFilter, RunId, RunStatus, RunView,
    StartRun, Started, StepKind, StepStatus, StepView,
};
pub use core::queue::{QueueConfig, RedisQueue};
pub use core::store::{Lease, MIGRATOR, PgStore};
pub use core::worker::{Worker, WorkerConfig};
pub use core::workflow::{Guard, Registry, WorkflowDef, WorkflowInfo};
pub use core::{Core, FaultInjector, StepHook};
pub use engine::{Engine, EngineBuilder};
pub use triggers::schedule::{CatchUp, CronExpr, Overlap, Schedule, ScheduleView, Scheduler, TickView, TimeZone};
