//! Steps of one run executed concurrently (`Ctx::all`): journaled at deterministic positions,
//! so that replay, non-determinism detection, cancellation and undo work as for steps awaited
//! one after another; and a worker killed with half the branches done loses none of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dayshift_engine::{Ctx, RetryPolicy, RunStatus, StartRun, StepCtx, StepError, StepKind, StepStatus, WorkflowDef};
use dayshift_tests::{BinEnv, TestEnv, assert_succeeded, fast_worker, unique, wait_for};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(60);

/// How often each step ran, by name.
type Ran = Arc<Mutex<HashMap<String, u32>>>;

fn count(ran: &Ran, step: &str) {
    *ran.lock().unwrap().entry(step.to_string()).or_default() += 1;
}

/// `prepare`, then `n` steps `item:<i>` at most `limit` at once, then `done`. Item 1 fails its
/// first attempt (transiently, retried 100 ms later); each item takes `ms` milliseconds, the
/// first ones longest, so they finish in another order than they started.
fn fan_out(n: usize, limit: usize, ms: u64, ran: Ran, peak: Arc<AtomicUsize>) -> WorkflowDef {
    let now = Arc::new(AtomicUsize::new(0));
    WorkflowDef::new("test.fanout", "a fan-out", move |ctx: Ctx, _: Value| {
        let (ran, peak, now) = (ran.clone(), peak.clone(), now.clone());
        async move {
            let r = ran.clone();
            ctx.step("prepare", move |s: StepCtx| async move {
                count(&r, &s.step);
                Ok(())
            })
            .await?;
            let steps = (0..n)
                .map(|i| {
                    let (ran, peak, now) = (ran.clone(), peak.clone(), now.clone());
                    ctx.step(format!("item:{i}"), move |s: StepCtx| async move {
                        count(&ran, &s.step);
                        let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(at_once, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(ms * (n - i) as u64 / n as u64 + 1)).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        if i == 1 && s.attempt == 1 {
                            return Err(StepError::transient("item 1 fails once"));
                        }
                        Ok(i * 10)
                    })
                    .retry(RetryPolicy {
                        initial_delay: Duration::from_millis(100),
                        ..RetryPolicy::default()
                    })
                })
                .collect();
            let results = ctx.all(steps, limit).await;
            let values = results.into_iter().collect::<Result<Vec<usize>, _>>()?;
            let r = ran.clone();
            ctx.step("done", move |s: StepCtx| async move {
                count(&r, &s.step);
                Ok(())
            })
            .await?;
            Ok(values)
        }
    })
}

#[tokio::test]
async fn a_fan_out_runs_its_steps_at_once_within_its_limit_each_at_its_own_journal_position() {
    let (ran, peak) = (Ran::default(), Arc::new(AtomicUsize::new(0)));
    let mut env = TestEnv::new(vec![fan_out(12, 4, 120, ran.clone(), peak.clone())]).await;
    env.start_worker(fast_worker("w"));
    let run = env.run_within("test.fanout", json!(null), LIMIT).await;
    assert_succeeded(&run);
    // The results come back in the order of the steps, whatever order they finished in.
    let expected: Vec<usize> = (0..12).map(|i| i * 10).collect();
    assert_eq!(run.output, Some(json!(expected)));
    assert_eq!(
        peak.load(Ordering::SeqCst),
        4,
        "at most 4 at once, and 4 did run at once"
    );
    // Positions: prepare, then item:0..11 in order, then done.
    let journal: Vec<(i32, &str)> = run.steps.iter().map(|s| (s.seq, s.name.as_str())).collect();
    let mut want = vec![(0, "prepare".to_string())];
    want.extend((0..12).map(|i| (i + 1, format!("item:{i}"))));
    want.push((13, "done".to_string()));
    assert_eq!(journal, want.iter().map(|(s, n)| (*s, n.as_str())).collect::<Vec<_>>());
    // Item 1's retry paused the pass once the others had finished; the replay that resumed it
    // ran nothing else again.
    let ran = ran.lock().unwrap().clone();
    assert_eq!(ran["item:1"], 2, "{ran:?}");
    for (name, n) in &ran {
        if name != "item:1" {
            assert_eq!(*n, 1, "{name} ran {n} times: {ran:?}");
        }
    }
    let item1 = run.steps.iter().find(|s| s.name == "item:1").unwrap();
    assert_eq!((item1.status, item1.attempts), (StepStatus::Succeeded, 2));
    env.stop_workers().await;
}

#[tokio::test]
async fn a_fan_out_replayed_by_code_that_reorders_it_stops_with_a_non_determinism_error() {
    let ran = Ran::default();
    let flow = |order: [&'static str; 3], ran: Ran| {
        WorkflowDef::new("test.order", "a fan-out, then a signal", move |ctx: Ctx, _: Value| {
            let ran = ran.clone();
            async move {
                let steps = order
                    .iter()
                    .map(|name| {
                        let ran = ran.clone();
                        ctx.step(*name, move |s: StepCtx| async move {
                            count(&ran, &s.step);
                            Ok(())
                        })
                    })
                    .collect();
                for r in ctx.all(steps, 3).await {
                    r?;
                }
                ctx.wait_signal("continue", Duration::from_secs(600)).await?;
                Ok(())
            }
        })
    };
    let mut env = TestEnv::new(vec![flow(["a", "b", "c"], ran.clone())]).await;
    env.start_worker(fast_worker("v1"));
    let started = env
        .engine
        .start(StartRun::new("test.order", json!(null)))
        .await
        .unwrap();
    wait_for(&env.engine, started.id, LIMIT, |r| r.status == RunStatus::Waiting).await;
    env.stop_workers().await;

    // A new release lists the branches in another order.
    let v2 = env.engine_with(vec![flow(["a", "c", "b"], ran.clone())]).await;
    env.start_worker_on(v2.clone(), fast_worker("v2"));
    v2.signal(started.id, "continue", json!(null), "test").await.unwrap();
    let run = wait_for(&v2, started.id, LIMIT, |r| r.status.is_terminal()).await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.unwrap();
    assert!(error.contains("non-determinism at journal position 1"), "{error}");
    assert!(error.contains("'b'") && error.contains("'c'"), "{error}");
    // Nothing ran again, not even the branch whose position still agreed.
    let ran = ran.lock().unwrap().clone();
    assert_eq!(ran, HashMap::from([("a".into(), 1), ("b".into(), 1), ("c".into(), 1)]));
    env.stop_workers().await;
}

/// Six branches, three at once; each records itself in `log` when done and when undone.
/// Branches 0 and 1 are quick; `slow` ones take 300 s; `failing` fails for good.
fn branches(log: Arc<Mutex<Vec<String>>>, slow: &'static [usize], failing: Option<usize>) -> WorkflowDef {
    WorkflowDef::new("test.branches", "six branches with undos", move |ctx: Ctx, _: Value| {
        let log = log.clone();
        async move {
            let steps = (0..6usize)
                .map(|i| {
                    let (l, u) = (log.clone(), log.clone());
                    ctx.step(format!("b{i}"), move |_s: StepCtx| async move {
                        // The first ones finish last: completion order is not index order.
                        tokio::time::sleep(Duration::from_millis(if slow.contains(&i) {
                            300_000
                        } else {
                            (6 - i as u64) * 40
                        }))
                        .await;
                        if failing == Some(i) {
                            return Err(StepError::permanent(format!("b{i} cannot")));
                        }
                        l.lock().unwrap().push(format!("done b{i}"));
                        Ok(i)
                    })
                    .undo(move |_s, i: usize| async move {
                        u.lock().unwrap().push(format!("undo b{i}"));
                        Ok(())
                    })
                })
                .collect();
            for r in ctx.all(steps, 3).await {
                r?;
            }
            Ok(())
        }
    })
}

fn undos(run: &dayshift_engine::RunView) -> Vec<(&str, StepStatus)> {
    run.steps
        .iter()
        .filter(|s| s.kind == StepKind::Undo)
        .map(|s| (s.name.as_str(), s.status))
        .collect()
}

#[tokio::test]
async fn a_failed_branch_compensates_the_others_in_reverse_of_their_order_not_of_their_finish() {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut env = TestEnv::new(vec![branches(log.clone(), &[], Some(2))]).await;
    env.start_worker(fast_worker("w"));
    let run = env.run_within("test.branches", json!(null), LIMIT).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
    assert!(run.error.as_deref().unwrap().contains("b2 cannot"), "{run:#?}");
    // The other branches ran to their end though b2 failed.
    let log = log.lock().unwrap().clone();
    let done: Vec<&String> = log.iter().filter(|l| l.starts_with("done")).collect();
    assert_eq!(done.len(), 5, "{log:?}");
    assert_ne!(
        done,
        ["done b0", "done b1", "done b3", "done b4", "done b5"]
            .iter()
            .collect::<Vec<_>>(),
        "the branches must finish out of order for this test to mean anything"
    );
    // Undone in reverse of the branches' order (b2 never completed: nothing to undo).
    assert_eq!(
        undos(&run),
        ["undo:b5", "undo:b4", "undo:b3", "undo:b1", "undo:b0"]
            .into_iter()
            .map(|n| (n, StepStatus::Succeeded))
            .collect::<Vec<_>>()
    );
    let undone: Vec<&String> = log.iter().filter(|l| l.starts_with("undo")).collect();
    assert_eq!(
        undone,
        ["undo b5", "undo b4", "undo b3", "undo b1", "undo b0"]
            .iter()
            .collect::<Vec<_>>()
    );
    env.stop_workers().await;
}

#[tokio::test]
async fn cancelling_a_fan_out_stops_every_branch_in_flight_and_undoes_the_finished_ones() {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    // b0 and b1 finish; b2, b3 and b4 take 300 s; b5 waits for a free slot (three at once).
    let mut env = TestEnv::new(vec![branches(log.clone(), &[2, 3, 4], None)]).await;
    env.start_worker(fast_worker("w"));
    let started = env
        .engine
        .start(StartRun::new("test.branches", json!(null)))
        .await
        .unwrap();
    wait_for(&env.engine, started.id, LIMIT, |r| {
        let running: Vec<&str> = r
            .steps
            .iter()
            .filter(|s| s.status == StepStatus::Running)
            .map(|s| s.name.as_str())
            .collect();
        running == ["b2", "b3", "b4"]
    })
    .await;
    env.engine
        .cancel(started.id, Some("change freeze"), "test")
        .await
        .unwrap();
    let run = wait_for(&env.engine, started.id, LIMIT, |r| r.status.is_terminal()).await;
    assert_eq!(run.status, RunStatus::Cancelled, "{run:#?}");
    let status = |name: &str| run.steps.iter().find(|s| s.name == name).map(|s| s.status);
    assert_eq!(status("b0"), Some(StepStatus::Succeeded));
    assert_eq!(status("b1"), Some(StepStatus::Succeeded));
    for b in ["b2", "b3", "b4"] {
        assert_eq!(status(b), Some(StepStatus::Cancelled), "{b}: {run:#?}");
    }
    // b5's turn came after the cancellation: journaled cancelled, never run.
    assert_eq!(status("b5"), Some(StepStatus::Cancelled));
    assert!(!log.lock().unwrap().contains(&"done b5".to_string()), "b5 ran");
    assert_eq!(
        undos(&run),
        vec![("undo:b1", StepStatus::Succeeded), ("undo:b0", StepStatus::Succeeded)]
    );
    assert_eq!(run.error.as_deref(), Some("change freeze"));
    env.stop_workers().await;
}

#[tokio::test]
async fn a_worker_killed_with_half_the_branches_done_loses_none_and_repeats_none_of_them() {
    let env = BinEnv::start().await;
    let mut first = env.start_worker().await;
    let table = format!("fx_{}", unique());
    // 40 branches, 8 at once, 300 ms each: about 1.5 s in all.
    let id = env
        .start_run(
            "selftest.chain",
            json!({ "steps": 40, "parallel": 8, "sleep_ms": 300, "side_effects": table }),
        )
        .await;
    let succeeded = |r: &Value| -> Vec<String> {
        r["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["status"] == "succeeded")
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    let half = env.wait_run(&id, LIMIT, |r| succeeded(r).len() >= 20).await;
    first.kill9().await;
    // What the journal held when the worker died (read after the kill: nothing newer can land).
    let (_, at_kill) = env.get(&format!("/api/v1/runs/{id}")).await;
    let done_before = succeeded(&at_kill);
    assert!(
        done_before.len() >= succeeded(&half).len() && done_before.len() < 40,
        "{at_kill:#}"
    );

    let _second = env.start_worker().await;
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 40, "{run:#}");
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["seq"], json!(i), "{s:#}");
        assert_eq!(s["name"], json!(format!("step-{}", i + 1)), "{s:#}");
    }
    let effects: HashMap<String, i64> = env
        .db
        .side_effects(&table)
        .await
        .into_iter()
        .map(|(_, step, n)| (step, n))
        .collect();
    assert_eq!(effects.len(), 40, "every branch ran: {effects:?}");
    // A branch journaled before the kill never ran again; the ones in flight ran again, at
    // most 8 of them (the limit), at most twice each.
    for name in &done_before {
        assert_eq!(effects[name], 1, "{name} ran again after the kill: {effects:?}");
    }
    let again: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    assert!(again.len() <= 8 && again.iter().all(|(_, n)| **n == 2), "{again:?}");
}
