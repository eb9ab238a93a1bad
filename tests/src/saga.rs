//! Generic checks any workflow's tests can use (like omicron's saga test helpers): inject a
//! failure at each step in turn and check that exactly the undos of the steps before it ran,
//! in reverse, and that the world is as it was before the run.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dayshift_engine::{FaultInjector, RunStatus, StartRun, StepError, StepKind, StepStatus, WorkflowDef};
use serde_json::Value;

use crate::{TestEnv, fast_worker};

/// Runs `workflow` once to learn its steps, then once per step with that step failing
/// permanently. After each failed run, `world()` must equal what it was before the run, and
/// the undos that ran must be those of the steps before the failed one, newest first.
///
/// `world` snapshots whatever the workflow changes (rows, files, objects), as a comparable value.
pub async fn failure_at_each_step_compensates<W, Fut, S>(defs: Vec<WorkflowDef>, workflow: &str, input: Value, world: W)
where
    W: Fn(&TestEnv) -> Fut,
    Fut: Future<Output = S>,
    S: PartialEq + std::fmt::Debug,
{
    let target: Arc<Mutex<Option<String>>> = Arc::default();
    let t = target.clone();
    let faults: FaultInjector = Arc::new(move |_run, step: &str| {
        (t.lock().unwrap().as_deref() == Some(step))
            .then(|| StepError::Permanent(format!("injected failure at step '{step}'")))
    });
    let mut env = TestEnv::builder(defs).faults(faults).build().await;
    env.start_worker(fast_worker("saga"));

    // The steps, in order, from a run that succeeds.
    let baseline = env
        .engine
        .start(StartRun::new(workflow, input.clone()))
        .await
        .expect("start baseline run");
    let run = env.wait(baseline.id, Duration::from_secs(60)).await;
    crate::assert_succeeded(&run);
    let steps: Vec<String> = run
        .steps
        .iter()
        .filter(|s| s.kind == StepKind::Step)
        .map(|s| s.name.clone())
        .collect();
    assert!(!steps.is_empty(), "workflow {workflow} ran no step");

    for (i, failing) in steps.iter().enumerate() {
        let before = world(&env).await;
        *target.lock().unwrap() = Some(failing.clone());
        let started = env
            .engine
            .start(StartRun::new(workflow, input.clone()))
            .await
            .expect("start run");
        let run = env.wait(started.id, Duration::from_secs(60)).await;
        *target.lock().unwrap() = None;
        assert_eq!(
            run.status,
            RunStatus::Failed,
            "failure at '{failing}' did not fail the run: {run:#?}"
        );
        let after = world(&env).await;
        assert_eq!(before, after, "failure at step '{failing}' left the world changed");

        let ran: Vec<&str> = run
            .steps
            .iter()
            .filter(|s| s.kind == StepKind::Undo)
            .map(|s| {
                assert_eq!(s.status, StepStatus::Succeeded, "undo did not succeed: {s:#?}");
                s.name.strip_prefix("undo:").unwrap_or(&s.name)
            })
            .collect();
        // Undos only of steps before the failed one, newest first.
        let earlier: Vec<&str> = steps[..i].iter().rev().map(String::as_str).collect();
        let mut it = earlier.iter();
        for undone in &ran {
            assert!(
                it.any(|s| s == undone),
                "failure at '{failing}': undo of '{undone}' ran out of order or for a step that had not completed; undos: {ran:?}"
            );
        }
    }
    env.stop_workers().await;
}
