//! Workflows written as YAML files (docs/workflows.md), loaded from the directories the config
//! names (`workflows.dirs`), run by the same engine as the built-in ones: each step journaled,
//! retried by its policy, replayed without running again.
//!
//! ```yaml
//! name: notify.disk-usage
//! description: Tells the on-call channel how full a volume is.
//! input:
//!   volume: { type: string }
//!   channel: { type: connection, connection: notify }
//! steps:
//!   - id: tell
//!     action: notify
//!     with:
//!       connection: ${{ input.channel }}
//!       text: "volume ${{ input.volume }} is filling up"
//! ```
//!
//! `file.rs` is the format and every check made when a file is loaded; `model.rs` the
//! compiled definition and the input it takes; `expr.rs` the expressions (CEL); `actions.rs`
//! the catalog of actions; here, loading the files and the interpreter that runs one.

mod actions;
mod expr;
mod file;
mod git;
mod job;
mod model;
mod plan;
mod schema;
pub mod source;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::collections::HashMap;
use std::sync::Mutex;

use dayshift_engine::{Ctx, StepCtx, StepError, WorkflowDef, WorkflowError};
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value};
use sqlx::PgPool;

use crate::connections::Connections;
use expr::Scope;
pub use model::Definition;
use model::{InputType, StepKind};
pub use schema::file_schema;

/// The config's `workflows:`: where workflow files are.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WorkflowsConfig {
    /// Directories of workflow files (`*.yaml`, `*.yml`), each file one workflow. A relative
    /// path is read from the config file's directory.
    #[serde(default)]
    pub dirs: Vec<PathBuf>,
    /// A git repository of workflow files, loaded with those of `dirs` and kept in sync.
    #[serde(default)]
    pub git: Option<source::GitSourceConfig>,
}

/// The catalog of actions a step may call: each one's name, what it does and why repeating it
/// is safe, and its parameters (docs/workflows.md lists them all; a test keeps it so).
pub fn catalog() -> Value {
    Value::Array(
        actions::Action::ALL
            .iter()
            .map(|a| {
                let params: Vec<Value> = a
                    .params()
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "name": p.name, "required": p.required, "type": p.kind, "description": p.description,
                            "target": p.target,
                        })
                    })
                    .collect();
                serde_json::json!({ "name": a.name(), "description": a.description(), "params": params })
            })
            .collect(),
    )
}

impl Definition {
    /// Compiles the workflow file `text` read from `path`; `connections` names the config's
    /// connections by kind. Each problem is `path:line:column: key: what is wrong`.
    pub fn compile(
        path: &str,
        text: &str,
        connections: &BTreeMap<String, BTreeSet<String>>,
    ) -> Result<Self, Vec<String>> {
        file::compile(path, text, connections)
    }

    /// The workflow the engine registers: it checks a run's input when the run is started
    /// (so bad input is refused before a run exists), guards every `connection` input (the
    /// policy's allow-list applies to what an API caller gives), and replays each run with the
    /// version it started on, read from `pool` when it is not this one.
    pub fn workflow(
        self: Arc<Self>,
        connections: Arc<Connections>,
        names: Arc<BTreeMap<String, BTreeSet<String>>>,
        pool: Option<PgPool>,
    ) -> WorkflowDef {
        // A guarded list is checked element by element.
        let guarded: Vec<String> = self
            .input
            .iter()
            .filter(|f| f.guarded)
            .map(|f| match f.kind {
                InputType::List => format!("{}[]", f.name),
                _ => f.name.clone(),
            })
            .collect();
        let versions = Arc::new(Versions {
            current: self.clone(),
            pool,
            names: names.clone(),
            older: Mutex::new(HashMap::new()),
        });
        let (check, check_names) = (self.clone(), names.clone());
        let schema = self.input_schema(&names);
        let concurrency_names = names.clone();
        let mut workflow = WorkflowDef::new(
            self.name.clone(),
            self.description.clone(),
            move |ctx: Ctx, input: Value| {
                let (versions, connections, names) = (versions.clone(), connections.clone(), names.clone());
                async move {
                    let def = versions.of(ctx.workflow_version()).await?;
                    def.run(ctx, input, &connections, &names).await
                }
            },
        )
        .version(self.version())
        .input_schema(schema)
        .with_plan_mode()
        .checked_by(move |input| check.complete(input, &check_names).map(|_| ()));
        for field in &guarded {
            workflow = workflow.guard(field);
        }
        if self.concurrency.is_some() {
            let def = self.clone();
            workflow = workflow.concurrency_by(move |input| def.concurrency_of(input, &concurrency_names));
        }
        workflow
    }

    /// The concurrency a run with `input` takes: the file's key evaluated over the input
    /// (defaults filled in). A plan run takes none: it changes nothing, and must not queue
    /// behind a run, or cancel one, for a key.
    fn concurrency_of(
        &self,
        input: &Value,
        names: &BTreeMap<String, BTreeSet<String>>,
    ) -> Result<Option<dayshift_engine::Concurrency>, String> {
        let Some(c) = &self.concurrency else {
            return Ok(None);
        };
        if input.get(dayshift_engine::PLAN_INPUT) == Some(&Value::Bool(true)) {
            return Ok(None);
        }
        let input = self.complete(input, names)?;
        let steps = Map::new();
        let key = c.key.eval(&Scope {
            input: &input,
            steps: &steps,
            item: None,
        })?;
        let key = match key {
            Value::String(s) => s,
            other => other.to_string(),
        };
        if key.is_empty() || key.len() > 200 {
            return Err(format!("the key must be 1 to 200 characters, not {key:?}"));
        }
        Ok(Some(dayshift_engine::Concurrency {
            key,
            limit: c.limit,
            policy: c.policy,
        }))
    }

    async fn run(
        self: &Arc<Self>,
        ctx: Ctx,
        input: Value,
        connections: &Arc<Connections>,
        names: &BTreeMap<String, BTreeSet<String>>,
    ) -> Result<Value, WorkflowError> {
        let planning = input.get(dayshift_engine::PLAN_INPUT) == Some(&Value::Bool(true));
        let input = self.complete(&input, names).map_err(WorkflowError::failed)?;
        if planning {
            return self.plan_run(&ctx, &input, connections).await;
        }
        let mut outputs = Map::new();
        // What the `finally` steps read when they run: the outputs of the steps that ran.
        let ended = Arc::new(Mutex::new(Map::new()));
        for i in 0..self.finally.len() {
            let fin = &self.finally[i];
            let (def, connections, input, ended) = (self.clone(), connections.clone(), input.clone(), ended.clone());
            ctx.finally(fin.id.clone(), fin.retry.clone(), fin.timeout, move |s| async move {
                let steps = ended.lock().unwrap_or_else(|e| e.into_inner()).clone();
                def.run_final(i, &input, steps, &connections, &s).await
            });
        }
        for (index, step) in self.steps.iter().enumerate() {
            let at = |e: String| WorkflowError::failed(format!("{}:{}: step {}: {e}", self.path, step.line, step.id));
            let scope = Scope {
                input: &input,
                steps: &outputs,
                item: None,
            };
            if let Some(when) = &step.when {
                match when.eval(&scope).map_err(at)? {
                    Value::Bool(true) => {}
                    Value::Bool(false) => {
                        outputs.insert(step.id.clone(), Value::Null);
                        continue;
                    }
                    other => return Err(at(format!("`when` must be true or false, not {other}"))),
                }
            }
            let output = match &step.kind {
                StepKind::Action { action, with } => match &step.for_each {
                    None => {
                        let params = with.eval(&scope).map_err(at)?;
                        let undo = step
                            .undo
                            .as_ref()
                            .map(|_| self.undo_of(index, &input, &outputs, None, connections));
                        self.action(&ctx, step, *action, params, undo, connections).await?
                    }
                    Some(each) => {
                        let items = match each.items.eval(&scope).map_err(at)? {
                            Value::Array(items) => items,
                            other => return Err(at(format!("for_each must give a list, not {other}"))),
                        };
                        if items.len() > MAX_BRANCHES {
                            return Err(at(format!(
                                "for_each gave {} items; a step runs at most {MAX_BRANCHES} branches",
                                items.len()
                            )));
                        }
                        // Every branch's parameters first: one that cannot be evaluated fails the
                        // step before any branch runs.
                        let mut params = Vec::with_capacity(items.len());
                        for (i, item) in items.iter().enumerate() {
                            let scope = Scope {
                                item: Some(item),
                                ..scope
                            };
                            params.push(with.eval(&scope).map_err(|e| at(format!("item {i}: {e}")))?);
                        }
                        let branches = params
                            .into_iter()
                            .enumerate()
                            .map(|(i, params)| {
                                let action = *action;
                                let conns: &Connections = connections;
                                let mut call = ctx
                                    .step(format!("{}[{i}]", step.id), move |s| async move {
                                        action.run(params, conns, &s).await
                                    })
                                    .retry(step.retry.clone());
                                if let Some(t) = step.timeout {
                                    call = call.timeout(t);
                                }
                                if step.sensitive {
                                    call = call.sensitive();
                                }
                                if let Some(undo) = &step.undo {
                                    let item = Some(&items[i]);
                                    call = call.undo(self.undo_of(index, &input, &outputs, item, connections));
                                    if let Some(r) = &undo.retry {
                                        call = call.undo_retry(r.clone());
                                    }
                                }
                                call
                            })
                            .collect();
                        let results = ctx.all(branches, each.max_in_flight).await;
                        let mut out = Vec::with_capacity(results.len());
                        let mut failed = Vec::new();
                        for (i, r) in results.into_iter().enumerate() {
                            match r {
                                Ok(v) => out.push(v),
                                Err(e) => failed.push(format!("[{i}]: {e}")),
                            }
                        }
                        if !failed.is_empty() {
                            let n = failed.len();
                            failed.truncate(5);
                            return Err(at(format!(
                                "{n} of {} branches failed: {}{}",
                                out.len() + n,
                                failed.join("; "),
                                if n > 5 { "; …" } else { "" }
                            )));
                        }
                        Value::Array(out)
                    }
                },
                StepKind::Workflow { workflow, with, .. } => {
                    let child_input = with.eval(&scope).map_err(at)?;
                    ctx.child_named::<Value>(&step.id, workflow, child_input).await?
                }
                StepKind::Approval(gate) => {
                    let none = None::<fn() -> std::future::Ready<Result<(), dayshift_engine::StepError>>>;
                    // The approvers see what the run will do once approved.
                    let plan = self.plan_after(index, &input, &outputs);
                    let by = ctx.approval_showing(gate, None, none, Some(plan)).await?;
                    serde_json::json!({ "approved_by": by })
                }
                StepKind::Wait { signal, timeout } => match ctx.wait_signal(signal.clone(), *timeout).await? {
                    Some(payload) => serde_json::json!({ "received": true, "payload": payload }),
                    None => serde_json::json!({ "received": false, "payload": null }),
                },
                StepKind::Sleep(d) => {
                    ctx.sleep(step.id.clone(), *d).await?;
                    Value::Null
                }
            };
            if !self.finally.is_empty() {
                ended
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(step.id.clone(), output.clone());
            }
            outputs.insert(step.id.clone(), output);
        }
        ctx.run_finally().await?;
        match &self.output {
            Some(t) => t
                .eval(&Scope {
                    input: &input,
                    steps: &outputs,
                    item: None,
                })
                .map_err(|e| WorkflowError::failed(format!("{}: output: {e}", self.path))),
            None => Ok(Value::Object(outputs)),
        }
    }

    /// Runs `action` with `params` as `step`, with its retry policy, timeout and `undo`.
    async fn action(
        &self,
        ctx: &Ctx,
        step: &model::Step,
        action: actions::Action,
        params: Value,
        undo: Option<UndoFn>,
        connections: &Connections,
    ) -> Result<Value, WorkflowError> {
        let mut call = ctx
            .step(step.id.clone(), move |s| async move {
                action.run(params, connections, &s).await
            })
            .retry(step.retry.clone());
        if let Some(t) = step.timeout {
            call = call.timeout(t);
        }
        if step.sensitive {
            call = call.sensitive();
        }
        if let Some(undo) = undo {
            call = call.undo(undo);
            if let Some(r) = step.undo.as_ref().and_then(|u| u.retry.clone()) {
                call = call.undo_retry(r);
            }
        }
        Ok(call.await?)
    }

    /// The undo of step `index` (of the branch of `item`, in a `for_each`): its action, with
    /// parameters that read the input, the steps before it and its own output.
    fn undo_of(
        self: &Arc<Self>,
        index: usize,
        input: &Value,
        outputs: &Map<String, Value>,
        item: Option<&Value>,
        connections: &Arc<Connections>,
    ) -> UndoFn {
        let (def, input, mut steps) = (self.clone(), input.clone(), outputs.clone());
        let (item, connections) = (item.cloned(), connections.clone());
        Box::new(move |s, output: Value| {
            Box::pin(async move {
                let step = &def.steps[index];
                let Some(undo) = &step.undo else {
                    return Ok(());
                };
                steps.insert(step.id.clone(), output);
                let scope = Scope {
                    input: &input,
                    steps: &steps,
                    item: item.as_ref(),
                };
                let params = undo
                    .with
                    .eval(&scope)
                    .map_err(|e| StepError::Permanent(format!("{}: undo of {}: {e}", def.path, step.id)))?;
                undo.action.run(params, &connections, &s).await.map(|_| ())
            })
        })
    }

    /// Runs `finally` step `index`, over the outputs of the steps that ran (`null` for the
    /// others).
    async fn run_final(
        &self,
        index: usize,
        input: &Value,
        mut steps: Map<String, Value>,
        connections: &Connections,
        s: &StepCtx,
    ) -> Result<(), StepError> {
        let fin = &self.finally[index];
        for s in &self.steps {
            steps.entry(s.id.clone()).or_insert(Value::Null);
        }
        let scope = Scope {
            input,
            steps: &steps,
            item: None,
        };
        let at = |e: String| StepError::Permanent(format!("{}:{}: finally {}: {e}", self.path, fin.line, fin.id));
        if let Some(when) = &fin.when {
            match when.eval(&scope).map_err(at)? {
                Value::Bool(true) => {}
                Value::Bool(false) => return Ok(()),
                other => return Err(at(format!("`when` must be true or false, not {other}"))),
            }
        }
        let StepKind::Action { action, with } = &fin.kind else {
            return Err(at("a finally step is an action".into()));
        };
        let params = with.eval(&scope).map_err(at)?;
        action.run(params, connections, s).await.map(|_| ())
    }
}

/// A step's undo, as the engine takes it.
type UndoFn = Box<dyn FnOnce(StepCtx, Value) -> BoxFuture<'static, Result<(), StepError>> + Send>;

/// The most branches a `for_each` step runs: each is a journal entry of the run.
const MAX_BRANCHES: usize = 10_000;

/// Reads every workflow file (`*.yaml`, `*.yml`) of `dirs`, a relative one read from `base`,
/// in name order. `reserved` are the built-in workflows' names, which a file may not take.
/// Every problem of every file is returned, each with its file, line and key.
pub fn load(
    dirs: &[PathBuf],
    base: &Path,
    names: &BTreeMap<String, BTreeSet<String>>,
    reserved: &[&str],
) -> Result<Vec<Arc<Definition>>, Vec<String>> {
    let files = read_dirs(dirs, base)?;
    compile_all(&files, names, reserved)
}

/// The workflow files (`*.yaml`, `*.yml`) of `dirs`, a relative one read from `base`, in name
/// order: each one's path and text.
pub fn read_dirs(dirs: &[PathBuf], base: &Path) -> Result<Vec<(String, String)>, Vec<String>> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for dir in dirs {
        let dir = if dir.is_absolute() { dir.clone() } else { base.join(dir) };
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("workflows.dirs: cannot read {}: {e}", dir.display()));
                continue;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        for file in files {
            let path = file.display().to_string();
            match std::fs::read_to_string(&file) {
                Ok(t) => out.push((path, t)),
                Err(e) => problems.push(format!("{path}: cannot read: {e}")),
            }
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}

/// Compiles `files` (each one's path and text): every problem of every file, each with its
/// file, line and key, or the definitions. A file may not take a name of `reserved` (the
/// built-in workflows) or of an earlier file.
pub fn compile_all(
    files: &[(String, String)],
    names: &BTreeMap<String, BTreeSet<String>>,
    reserved: &[&str],
) -> Result<Vec<Arc<Definition>>, Vec<String>> {
    let mut problems = Vec::new();
    let mut out: Vec<Arc<Definition>> = Vec::new();
    for (path, text) in files {
        match Definition::compile(path, text, names) {
            Err(e) => problems.extend(e),
            Ok(def) if reserved.contains(&def.name.as_str()) => {
                problems.push(format!("{path}: name: {:?} is a built-in workflow's name", def.name))
            }
            Ok(def) => match out.iter().find(|d| d.name == def.name) {
                Some(first) => problems.push(format!(
                    "{path}: name: {:?} is already the name of the workflow in {}",
                    def.name, first.path
                )),
                None => out.push(Arc::new(def)),
            },
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}

/// Checks the `workflow` steps of `defs` against every workflow `registry` has (the built-in
/// ones and the files): the workflow exists, no file starts itself again through its children,
/// and a guarded input of the child is given only what the config controls. That is a value
/// written in the file, or `${{ input.x }}` where `x` is a guarded input of this workflow (so
/// an API caller's value has passed this workflow's policy); anything else would let a caller
/// steer a privileged field past the policy. Each problem is `path:line:column: key: what`.
pub fn check_children(defs: &[Arc<Definition>], registry: &dayshift_engine::Registry) -> Vec<String> {
    let known: BTreeSet<String> = registry.list().into_iter().map(|w| w.name).collect();
    let mut problems = Vec::new();
    for def in defs {
        let guarded: BTreeSet<&str> = def
            .input
            .iter()
            .filter(|f| f.guarded)
            .map(|f| f.name.as_str())
            .collect();
        for step in &def.steps {
            let StepKind::Workflow {
                workflow,
                with,
                at,
                with_at,
            } = &step.kind
            else {
                continue;
            };
            let (file_at, key) = at.rsplit_once(": ").unwrap_or((at.as_str(), ""));
            let file_at = file_at.to_string();
            if !known.contains(workflow) {
                problems.push(format!(
                    "{at}.workflow: no workflow {workflow:?} (neither built in nor a workflow file)"
                ));
                continue;
            }
            if starts_again(defs, workflow, &def.name, &mut BTreeSet::new()) {
                problems.push(format!(
                    "{at}.workflow: {workflow} starts {} again, which would start runs without end",
                    def.name
                ));
            }
            for guard in registry.guards(workflow) {
                let path: Vec<&str> = guard.split('.').collect();
                for (below, t) in expr::at_path(with, &path, "") {
                    let passed_on = match t {
                        expr::Template::Whole(e) => {
                            e.source().strip_prefix("input.").is_some_and(|f| guarded.contains(f))
                        }
                        _ => false,
                    };
                    if !passed_on {
                        problems.push(format!(
                            "{}: {key}.with{below}: {workflow} guards `{guard}`, so it takes a value written in the file \
                             or `${{{{ input.<name> }}}}` of a guarded input of {} (a connection or `guarded: true`), not a value \
                             computed from what a caller gives",
                            with_at
                                .iter()
                                .find(|(k, _)| below[1..].split(['.', '[']).next() == Some(k.as_str()))
                                .map_or(file_at.as_str(), |(_, at)| at.as_str()),
                            def.name
                        ));
                    }
                }
            }
        }
    }
    problems
}

/// Whether the file workflow `name` (or one it starts) starts `target`.
fn starts_again(defs: &[Arc<Definition>], name: &str, target: &str, seen: &mut BTreeSet<String>) -> bool {
    if name == target {
        return true;
    }
    if !seen.insert(name.to_string()) {
        return false;
    }
    let Some(def) = defs.iter().find(|d| d.name == name) else {
        return false;
    };
    def.steps.iter().any(|s| match &s.kind {
        StepKind::Workflow { workflow, .. } => starts_again(defs, workflow, target, seen),
        _ => false,
    })
}

/// Keeps each definition's text in PostgreSQL, once per content, and numbers it: a name's first
/// text is version 1, each different text the next. Every process that loads the files (serve
/// and each worker) calls it before registering them, so all of them agree on the numbers; a
/// run records the version it started on and is replayed with that text, whatever the file
/// says by then (a run waiting days for an approval finishes on the steps it started with).
pub async fn keep_versions(pool: &PgPool, defs: &[Arc<Definition>]) -> Result<(), sqlx::Error> {
    for def in defs {
        // Two processes numbering new texts at once: the loser's insert conflicts, and it reads
        // the winner's number (same text) or takes the next one (another text).
        let mut attempt = 0;
        let version: i32 = loop {
            attempt += 1;
            let kept = sqlx::query_scalar(
                "with found as (select version from workflow_definitions where name = $1 and hash = $2), \
                 added as ( \
                   insert into workflow_definitions (name, version, hash, source, path) \
                   select $1, coalesce((select max(version) from workflow_definitions where name = $1), 0) + 1, \
                          $2, $3, $4 \
                   where not exists (select 1 from found) \
                   returning version) \
                 select version from found union all select version from added",
            )
            .bind(&def.name)
            .bind(&def.hash)
            .bind(&def.source)
            .bind(&def.path)
            .fetch_one(pool)
            .await;
            match kept {
                Ok(v) => break v,
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempt < 10 => continue,
                Err(e) => return Err(e),
            }
        };
        let _ = def.version.set(version.max(1) as u32);
    }
    Ok(())
}

/// A workflow's definitions by version: the current one (the file as loaded) and the older ones
/// runs in flight started on, read from PostgreSQL once each.
struct Versions {
    current: Arc<Definition>,
    pool: Option<PgPool>,
    names: Arc<BTreeMap<String, BTreeSet<String>>>,
    older: Mutex<HashMap<u32, Arc<Definition>>>,
}

impl Versions {
    async fn of(&self, version: u32) -> Result<Arc<Definition>, WorkflowError> {
        if version == self.current.version() {
            return Ok(self.current.clone());
        }
        if let Some(def) = self.older.lock().unwrap_or_else(|e| e.into_inner()).get(&version) {
            return Ok(def.clone());
        }
        let name = &self.current.name;
        let Some(pool) = &self.pool else {
            return Err(WorkflowError::failed(format!(
                "the run started on version {version} of {name}, which this process does not have"
            )));
        };
        let row: Option<(String, String)> =
            sqlx::query_as("select source, path from workflow_definitions where name = $1 and version = $2")
                .bind(name)
                .bind(version as i32)
                .fetch_optional(pool)
                .await
                .map_err(|e| WorkflowError::failed(format!("cannot read version {version} of {name}: {e}")))?;
        let Some((source, path)) = row else {
            return Err(WorkflowError::failed(format!(
                "the run started on version {version} of {name}, which is not in workflow_definitions"
            )));
        };
        let def = Definition::compile(&path, &source, &self.names).map_err(|problems| {
            WorkflowError::failed(format!(
                "version {version} of {name} no longer compiles: {}",
                problems.join("; ")
            ))
        })?;
        let _ = def.version.set(version);
        let def = Arc::new(def);
        self.older
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(version, def.clone());
        Ok(def)
    }
}
