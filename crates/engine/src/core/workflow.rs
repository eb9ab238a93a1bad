//! Workflow definitions and the registry of them.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::core::ctx::Ctx;
use crate::core::error::{InvalidInput, WorkflowError};

/// One guarded input field ([`crate::policy`] checks it against the config): a dotted path into the input, `[]` for every element of an array
/// (`secrets[].namespace`). `exact` fields (SQL) match their allow-list verbatim, others as
/// globs (`apps/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub path: String,
    pub exact: bool,
}

type RunFn = dyn Fn(Ctx, Value) -> BoxFuture<'static, Result<Value, WorkflowError>> + Send + Sync;
type ValidateFn = dyn Fn(&Value) -> Result<(), String> + Send + Sync;

/// A workflow: a name (`family.action`), a version, a one-line description, and an async
/// function whose side effects all go through its [`Ctx`].
///
/// ```ignore
/// WorkflowDef::new("backup.postgres", "Dumps a database to S3 and verifies it.", |ctx, input: BackupInput| async move {
///     let upload = ctx.step("upload", |s| upload(s, &input)).await?;
///     Ok(upload)
/// })
/// ```
#[derive(Clone)]
pub struct WorkflowDef {
    pub(crate) name: String,
    pub(crate) version: u32,
    pub(crate) description: String,
    pub(crate) run: Arc<RunFn>,
    validate: Arc<ValidateFn>,
    /// The input field naming what a run acts on (`database`), for the freshness metric.
    freshness: Option<String>,
    /// The input fields that choose privileged targets ([`crate::policy`]).
    guards: Vec<Guard>,
    /// The input as a JSON Schema, when the workflow declares it as data (a workflow file).
    input_schema: Option<Value>,
    /// Whether it runs as a plan ([`crate::core::model::PLAN_INPUT`]): says what each step
    /// would do, changes nothing.
    pub(crate) plans: bool,
    /// The concurrency every run of it takes, from its input ([`WorkflowDef::concurrency_by`]).
    pub(crate) concurrency: Option<Arc<ConcurrencyFn>>,
}

/// A workflow's concurrency from a run's input, or why the input gives none.
pub type ConcurrencyFn = dyn Fn(&Value) -> Result<Option<crate::core::model::Concurrency>, String> + Send + Sync;

impl std::fmt::Debug for WorkflowDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowDef")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl WorkflowDef {
    /// Defines a workflow taking input `I` and returning `O`, at version 1.
    ///
    /// The input is checked against `I` when a run is started, so bad input is refused before
    /// a run exists.
    pub fn new<I, O, F, Fut>(name: impl Into<String>, description: impl Into<String>, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(Ctx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let run: Arc<RunFn> = Arc::new(move |ctx: Ctx, input: Value| {
            let f = f.clone();
            Box::pin(async move {
                let input: I =
                    serde_json::from_value(input).map_err(|e| WorkflowError::failed(format!("invalid input: {e}")))?;
                let out = f(ctx, input).await?;
                serde_json::to_value(out).map_err(|e| WorkflowError::failed(format!("output is not JSON: {e}")))
            })
        });
        let validate: Arc<ValidateFn> = Arc::new(|v: &Value| {
            serde_json::from_value::<I>(v.clone())
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        Self {
            name: name.into(),
            version: 1,
            description: description.into(),
            run,
            validate,
            freshness: None,
            guards: Vec::new(),
            input_schema: None,
            plans: false,
            concurrency: None,
        }
    }

    /// Gives every run of it the concurrency `by` makes from its input (a key per target: one
    /// backup of a database at a time), whatever the starter asked: the key is kept under
    /// `dayshift:<workflow>:`, a prefix no API caller may use, so no other run shares it.
    pub fn concurrency_by(
        mut self,
        by: impl Fn(&Value) -> Result<Option<crate::core::model::Concurrency>, String> + Send + Sync + 'static,
    ) -> Self {
        self.concurrency = Some(Arc::new(by));
        self
    }

    /// Declares that it has a plan mode: a run whose input has
    /// [`crate::core::model::PLAN_INPUT`] `true` says what each step would do and changes
    /// nothing. Without it, such input is refused.
    pub fn with_plan_mode(mut self) -> Self {
        self.plans = true;
        self
    }

    /// Publishes `schema` (a JSON Schema) as the workflow's input: `GET /api/v1/workflows/{name}`
    /// answers it and the console's start form is made from it.
    pub fn input_schema(mut self, schema: Value) -> Self {
        self.input_schema = Some(schema);
        self
    }

    /// Replaces the check of a run's input made when the run is started (by default, that it
    /// deserializes into the input type): for workflows whose input is declared as data (a
    /// workflow file's `input:`), not as a type.
    pub fn checked_by(mut self, check: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static) -> Self {
        self.validate = Arc::new(check);
        self
    }

    /// Marks the input field at `path` (dotted, `[]` for each element of an array:
    /// `secrets[].namespace`) as choosing a privileged target: given through the API, its
    /// value must match an allow-list of the config's `policy` ([`crate::policy`]).
    pub fn guard(mut self, path: &str) -> Self {
        self.guards.push(Guard {
            path: path.into(),
            exact: false,
        });
        self
    }

    /// [`WorkflowDef::guard`] for a field whose allowed values are compared verbatim, not as
    /// globs (SQL queries).
    pub fn guard_exact(mut self, path: &str) -> Self {
        self.guards.push(Guard {
            path: path.into(),
            exact: true,
        });
        self
    }

    /// The guarded input fields.
    pub fn guards(&self) -> impl Iterator<Item = &str> {
        self.guards.iter().map(|g| g.path.as_str())
    }

    /// Publishes the time of the last successful run per value of the input field `field` (the
    /// database a backup dumps, say) as `dayshift_workflow_last_success_timestamp_seconds
    /// {workflow, source}` on `/metrics`, so that an alert rule can tell when runs silently stop.
    pub fn freshness(mut self, field: impl Into<String>) -> Self {
        self.freshness = Some(field.into());
        self
    }

    /// Sets the version recorded on runs started from now on. Bump it when the order of the
    /// steps changes; runs started on an older version then stop with a non-determinism error
    /// if their journal no longer matches.
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn validate(&self, input: &Value) -> Result<(), InvalidInput> {
        (self.validate)(input).map_err(InvalidInput)
    }
}

/// What `dayshift workflows` shows of a workflow.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WorkflowInfo {
    pub name: String,
    pub version: u32,
    pub description: String,
}

/// The registered workflows, by name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    defs: BTreeMap<String, WorkflowDef>,
}

impl Registry {
    /// Adds a workflow; a second one with the same name replaces the first.
    pub fn register(&mut self, def: WorkflowDef) {
        self.defs.insert(def.name.clone(), def);
    }

    /// Removes workflow `name` (to check what a set without it would lack).
    pub fn remove(&mut self, name: &str) -> Option<WorkflowDef> {
        self.defs.remove(name)
    }

    /// Refuses new runs of workflow `name`, saying `why`; its runs in flight go on (a workflow
    /// file that was deleted: its runs finish on their version).
    pub fn retire(&mut self, name: &str, why: &str) {
        if let Some(def) = self.defs.get_mut(name) {
            let why = why.to_string();
            def.validate = Arc::new(move |_| Err(why.clone()));
        }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&WorkflowDef> {
        self.defs.get(name)
    }

    /// The input schema of workflow `name`, if it publishes one.
    pub fn input_schema_of(&self, name: &str) -> Option<&Value> {
        self.defs.get(name).and_then(|d| d.input_schema.as_ref())
    }

    /// The guarded input fields of workflow `name`.
    pub(crate) fn guards_of(&self, name: &str) -> &[Guard] {
        self.defs.get(name).map_or(&[], |d| d.guards.as_slice())
    }

    /// The paths of the guarded input fields of workflow `name`.
    pub fn guards(&self, name: &str) -> impl Iterator<Item = &str> {
        self.guards_of(name).iter().map(|g| g.path.as_str())
    }

    /// Checks `input` against the input type of workflow `name`; `None` if there is no such
    /// workflow.
    pub fn validate_input(&self, name: &str, input: &serde_json::Value) -> Option<Result<(), InvalidInput>> {
        self.defs.get(name).map(|d| d.validate(input))
    }

    /// The workflows with a freshness field, and the field.
    pub(crate) fn freshness_fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.defs
            .values()
            .filter_map(|d| d.freshness.as_deref().map(|f| (d.name.as_str(), f)))
    }

    /// Name, version and description of each workflow, sorted by name.
    pub fn list(&self) -> Vec<WorkflowInfo> {
        self.defs
            .values()
            .map(|d| WorkflowInfo {
                name: d.name.clone(),
                version: d.version,
                description: d.description.clone(),
            })
            .collect()
    }
}
