//! Keeps an engine's workflow files in sync with a git repository (`workflows.git`): `serve`
//! and every worker load them at start and check the branch every `refresh` (and `serve` at
//! once when the forge reports a push to it).
//!
//! A change takes effect only whole and only when valid: every file of the new commit (and of
//! `workflows.dirs`) must compile, their children must exist, and the config's triggers must
//! find every workflow they name; otherwise the problems are logged, each with its file, line
//! and key, and the workflows stay as they were. A run keeps the version it started on: a file
//! edited or deleted in the repository never changes a run in flight, and a deleted file's
//! workflow can no longer be started but its runs finish.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use sqlx::PgPool;

use crate::connections::Connections;
use crate::declarative::source::GitSource;
use dayshift_engine::Engine;

/// What a refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// The branch is at the commit already loaded.
    Unchanged,
    /// The workflows of this commit replaced the earlier ones.
    Loaded { commit: String, workflows: Vec<String> },
}

/// The config's checks of a set of workflows: each problem, with its file, line and key.
pub type TriggerCheck = Box<dyn Fn(&dayshift_engine::Registry) -> Vec<String> + Send + Sync>;

/// Keeps an engine's workflow files in sync with a [`GitSource`].
pub struct FileSync {
    engine: Engine,
    pool: PgPool,
    connections: Arc<Connections>,
    names: Arc<BTreeMap<String, BTreeSet<String>>>,
    /// The files of `workflows.dirs`, loaded with every commit.
    local: Vec<(String, String)>,
    source: GitSource,
    /// The config's checks of what needs the workflows (its triggers name them): a commit they
    /// find problems with is refused.
    check: TriggerCheck,
    /// The commit loaded and the names of its workflows.
    loaded: Mutex<(String, BTreeSet<String>)>,
    /// Serializes refreshes (the timer and a push may come together).
    refreshing: tokio::sync::Mutex<()>,
}

impl FileSync {
    /// A sync of `engine`'s workflow files; `local` are those of `workflows.dirs`, `check` the
    /// config's checks of a set of workflows, `loaded` the commit loaded at start and its
    /// workflows' names.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: Engine,
        pool: PgPool,
        connections: Arc<Connections>,
        names: Arc<BTreeMap<String, BTreeSet<String>>>,
        local: Vec<(String, String)>,
        source: GitSource,
        check: TriggerCheck,
        loaded: (String, BTreeSet<String>),
    ) -> Self {
        Self {
            engine,
            pool,
            connections,
            names,
            local,
            source,
            check,
            loaded: Mutex::new(loaded),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Loads the branch's tip if it moved: all of it, or nothing (the problems, each with its
    /// file, line and key).
    pub async fn refresh(&self) -> Result<Refreshed, Vec<String>> {
        let _one = self.refreshing.lock().await;
        let fetched = self.source.fetch().await.map_err(|e| vec![e])?;
        let (loaded_commit, before) = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if fetched.commit == loaded_commit {
            return Ok(Refreshed::Unchanged);
        }
        let mut files = self.local.clone();
        files.extend(fetched.files);
        let defs = crate::declarative::compile_all(&files, &self.names, &crate::BUILT_IN)?;
        let now: BTreeSet<String> = defs.iter().map(|d| d.name().to_string()).collect();
        crate::declarative::keep_versions(&self.pool, &defs)
            .await
            .map_err(|e| vec![format!("workflows.git: keeping the versions: {e}")])?;
        // The files' children and the config's triggers are checked against what the engine
        // will have: the built-in workflows and the new files, without the removed ones.
        let removed: Vec<String> = before.difference(&now).cloned().collect();
        let mut candidate = dayshift_engine::Registry::clone(&self.engine.registry());
        for name in &removed {
            candidate.remove(name);
        }
        let wf: Vec<_> = defs
            .iter()
            .map(|d| {
                d.clone()
                    .workflow(self.connections.clone(), self.names.clone(), Some(self.pool.clone()))
            })
            .collect();
        for w in &wf {
            candidate.register(w.clone());
        }
        let mut problems = crate::declarative::check_children(&defs, &candidate);
        problems.extend((self.check)(&candidate));
        if !problems.is_empty() {
            return Err(problems);
        }
        let source = self.source.name();
        self.engine.update_workflows(|registry| {
            for w in wf {
                registry.register(w);
            }
            for name in &removed {
                registry.retire(
                    name,
                    &format!("it can no longer be started: its file was removed from {source}"),
                );
            }
        });
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = (fetched.commit.clone(), now.clone());
        Ok(Refreshed::Loaded {
            commit: fetched.commit,
            workflows: now.into_iter().collect(),
        })
    }

    /// Refreshes every `refresh`, and at once when `push` is notified, until `stop` is.
    pub async fn run(self: Arc<Self>, push: Arc<tokio::sync::Notify>, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.source.refresh) => {}
                _ = push.notified() => {}
            }
            match self.refresh().await {
                Ok(Refreshed::Unchanged) => {}
                Ok(Refreshed::Loaded { commit, workflows }) => {
                    tracing::info!(commit = %short(&commit), workflows = ?workflows, "Workflow files loaded from git.");
                }
                Err(problems) => {
                    tracing::error!(problems = %problems.join("\n"), "The workflow files in git were not loaded; the workflows stay as they were.");
                }
            }
        }
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}
