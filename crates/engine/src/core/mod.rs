//! The durable core: what a run is ([`model`]), how a workflow's calls are journaled and
//! replayed ([`ctx`], [`pass`]), where that journal lives ([`store`], PostgreSQL), how wake-ups
//! travel ([`queue`], Redis), how readers learn that a run moved on ([`changes`]), and the loops that advance runs ([`worker`]).
//!
//! Nothing here knows of triggers, the HTTP API or any workflow: those are front doors and
//! users of the core, above it (see ARCHITECTURE.md).

pub mod changes;
pub mod ctx;
pub mod error;
pub mod metrics;
pub mod model;
pub mod pass;
pub mod queue;
pub mod store;
pub mod telemetry;
pub mod worker;
pub mod workflow;

use std::sync::Arc;

use serde_json::Value;

use crate::core::error::StepError;
use crate::core::model::RunId;
use crate::core::queue::RedisQueue;
use crate::core::store::PgStore;
use crate::core::workflow::Registry;

/// Decides, for a run and a step name, whether the step's next attempt fails with the given
/// error instead of running. For tests that inject a failure at each step in turn.
pub type FaultInjector = Arc<dyn Fn(RunId, &str) -> Option<StepError> + Send + Sync>;

/// Called with the run and the step's name each time a step (or an undo) has succeeded and its
/// result is journaled: a step boundary. For crash tests that stop a worker at each boundary.
pub type StepHook = Arc<dyn Fn(RunId, &str) + Send + Sync>;

/// The durable core of one engine: the journal (PostgreSQL), the wake-ups (Redis) and the
/// registered workflows. Workers and the passes they run take it; the front door
/// ([`crate::Engine`]) is built over it.
pub struct Core {
    pub(crate) store: PgStore,
    pub(crate) queue: RedisQueue,
    /// The workflows; replaced whole when workflow files change ([`crate::Engine::update_workflows`]).
    pub(crate) registry: std::sync::RwLock<Arc<Registry>>,
    pub(crate) faults: Option<FaultInjector>,
    pub(crate) after_step: Option<StepHook>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("registry", &self.registry())
            .finish_non_exhaustive()
    }
}

impl Core {
    /// The workflows registered now.
    pub(crate) fn registry(&self) -> Arc<Registry> {
        self.registry.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ctx::Host for Core {
    fn store(&self) -> &PgStore {
        &self.store
    }

    fn queue(&self) -> &RedisQueue {
        &self.queue
    }

    fn child_version(&self, workflow: &str, input: &Value) -> Result<u32, StepError> {
        let registry = self.registry();
        let Some(def) = registry.get(workflow) else {
            return Err(StepError::Permanent(format!("unknown workflow '{workflow}'")));
        };
        def.validate(input)
            .map_err(|e| StepError::Permanent(format!("invalid child input: {e}")))?;
        Ok(def.version)
    }

    fn injected_fault(&self, run: RunId, step: &str) -> Option<StepError> {
        self.faults.as_ref().and_then(|f| f(run, step))
    }

    fn step_journaled(&self, run: RunId, step: &str) {
        if let Some(hook) = &self.after_step {
            hook(run, step);
        }
    }
}
