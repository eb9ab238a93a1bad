//! Generic checks any workflow's tests can use (like omicron's saga test helpers): inject a
//! failure at each step in turn and check that exactly the undos of the steps before it ran,
//! in reverse, and that the world is as it was before the run.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dayshift_engine::{FaultInjector, RunStatus, StepError, StepKind, StepStatus};
use serde_json::Value;

use crate::{TestEnv, TestEnvBuilder, assert_succeeded, fast_worker};

/// How long one run of the check may take, its undos included.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs `workflow` once to learn its steps, then once per step with that step failing
/// permanently. After each failed run, `world()` must equal what it was before the run, and
/// the undos that ran must be those of the steps before the failed one, newest first.
///
/// `env` is the env to build (its workflows and options); the check adds the fault injector and
/// a worker. `world` snapshots whatever the workflow changes (rows, files, objects), as a
/// comparable value. Every run gets `input`; see [`Saga`] for inputs that differ per run and for
/// steps whose failure the workflow tolerates.
pub async fn failure_at_each_step_compensates<W, Fut, S>(env: TestEnvBuilder, workflow: &str, input: Value, world: W)
where
    W: Fn(&TestEnv) -> Fut,
    Fut: Future<Output = S>,
    S: PartialEq + std::fmt::Debug,
{
    Saga::new(workflow, move |_| input.clone())
        .failure_at_each_step_compensates(env, world)
        .await;
}

/// The failure-at-each-step check of one workflow, with what it needs to know about it.
pub struct Saga<I> {
    workflow: String,
    input: I,
    tolerated: Vec<String>,
    finally: Vec<String>,
}

impl<I: Fn(usize) -> Value> Saga<I> {
    /// A check of `workflow`; run `i` gets `input(i)`, run 0 being the one that succeeds and
    /// tells the steps. A workflow whose repeated run would find its work done (an image tag
    /// already promoted, a version already live) needs an input of its own per run, or the
    /// later steps would have nothing to undo.
    pub fn new(workflow: &str, input: I) -> Self {
        Self {
            workflow: workflow.to_string(),
            input,
            tolerated: Vec::new(),
            finally: Vec::new(),
        }
    }

    /// The steps the workflow runs at its end however it ends (a workflow file's `finally`),
    /// in order: every run, the one that succeeds and each failed one, must run exactly these,
    /// once each, after all its undos.
    pub fn finally<S: Into<String>>(mut self, steps: impl IntoIterator<Item = S>) -> Self {
        self.finally = steps.into_iter().map(Into::into).collect();
        self
    }

    /// Steps whose failure the workflow carries on past by design (a chat notice, a cleanup of
    /// old rollback points): failing one must not fail the run, and no undo may run for it.
    /// The world is not compared after such a run, since the workflow went on and finished.
    pub fn tolerating<S: Into<String>>(mut self, steps: impl IntoIterator<Item = S>) -> Self {
        self.tolerated = steps.into_iter().map(Into::into).collect();
        self
    }

    /// Runs the check (see [`failure_at_each_step_compensates`]) on the env `env` builds.
    pub async fn failure_at_each_step_compensates<W, Fut, S>(self, env: TestEnvBuilder, world: W)
    where
        W: Fn(&TestEnv) -> Fut,
        Fut: Future<Output = S>,
        S: PartialEq + std::fmt::Debug,
    {
        let workflow = self.workflow.as_str();
        let target: Arc<Mutex<Option<String>>> = Arc::default();
        let t = target.clone();
        let faults: FaultInjector = Arc::new(move |_run, step: &str| {
            (t.lock().unwrap().as_deref() == Some(step))
                .then(|| StepError::Permanent(format!("injected failure at step '{step}'")))
        });
        let mut env = env.faults(faults).worker(fast_worker("saga")).build().await;

        // The steps, in order, from a run that succeeds.
        let run = env.run_within(workflow, (self.input)(0), LIMIT).await;
        assert_succeeded(&run);
        self.ran_its_finally(&run, "the run that succeeded");
        let steps: Vec<String> = run
            .steps
            .iter()
            .filter(|s| s.kind == StepKind::Step)
            .map(|s| s.name.clone())
            .collect();
        assert!(!steps.is_empty(), "workflow {workflow} ran no step");
        for t in &self.tolerated {
            assert!(
                steps.contains(t),
                "{workflow} has no step '{t}' to tolerate; its steps: {steps:?}"
            );
        }

        for (i, failing) in steps.iter().enumerate() {
            let before = world(&env).await;
            *target.lock().unwrap() = Some(failing.clone());
            let run = env.run_within(workflow, (self.input)(i + 1), LIMIT).await;
            *target.lock().unwrap() = None;
            self.ran_its_finally(&run, &format!("the run failing at '{failing}'"));
            let undos: Vec<&str> = run
                .steps
                .iter()
                .filter(|s| s.kind == StepKind::Undo)
                .filter_map(|s| {
                    assert_eq!(s.status, StepStatus::Succeeded, "undo did not succeed: {s:#?}");
                    s.name.strip_prefix("undo:")
                })
                .collect();

            if self.tolerated.contains(failing) {
                assert_eq!(
                    run.status,
                    RunStatus::Succeeded,
                    "a failure at '{failing}', which {workflow} tolerates, failed the run: {run:#?}"
                );
                assert!(undos.is_empty(), "failure at '{failing}' ran undos: {undos:?}");
                continue;
            }
            assert_eq!(
                run.status,
                RunStatus::Failed,
                "failure at '{failing}' did not fail the run: {run:#?}"
            );
            let after = world(&env).await;
            assert_eq!(before, after, "failure at step '{failing}' left the world changed");

            // Undos only of steps before the failed one, newest first.
            let earlier: Vec<&str> = steps[..i].iter().rev().map(String::as_str).collect();
            let mut it = earlier.iter();
            for undone in &undos {
                assert!(
                    it.any(|s| s == undone),
                    "failure at '{failing}': undo of '{undone}' ran out of order or for a step that had not completed; undos: {undos:?}"
                );
            }
        }
        env.stop_workers().await;
    }

    /// Checks that `run` ran the `finally` steps, each once, in order, after every undo.
    fn ran_its_finally(&self, run: &dayshift_engine::RunView, which: &str) {
        let ends: Vec<(usize, &str)> = run
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind == StepKind::Undo)
            .map(|(i, s)| (i, s.name.as_str()))
            .collect();
        let finals: Vec<&str> = ends.iter().filter_map(|(_, n)| n.strip_prefix("finally:")).collect();
        assert_eq!(finals, self.finally, "{which}: the finally steps that ran");
        let first_final = ends.iter().find(|(_, n)| n.starts_with("finally:")).map(|(i, _)| *i);
        let last_undo = ends
            .iter()
            .filter(|(_, n)| n.starts_with("undo:"))
            .map(|(i, _)| *i)
            .max();
        if let (Some(f), Some(u)) = (first_final, last_undo) {
            assert!(u < f, "{which}: an undo ran after a finally step: {ends:?}");
        }
    }
}
