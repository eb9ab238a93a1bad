//! promote.image against real git (bare repositories served by `git daemon`) and ArgoCD
//! status through the Kubernetes API stand-in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dayshift_engine::{RunStatus, RunView};
use dayshift_tests::kube_api::KubeApi;
use dayshift_tests::{GitServer, TestEnv, WebhookReceiver, fast_worker};
use dayshift_workflows::adapters::git::GitConfig;
use dayshift_workflows::adapters::kube::KubeConfig;
use dayshift_workflows::{Connections, promote_image};
use serde_json::{Value, json};

const LIMIT: Duration = Duration::from_secs(120);
const APP: &str = "/apis/argoproj.io/v1alpha1/namespaces/argocd/applications/shop-prod";
const VALUES: &str = "envs/prod/values.yaml";

struct Rig {
    git: Arc<GitServer>,
    kube: Arc<KubeApi>,
    chat: WebhookReceiver,
    /// dayshift in this process; absent when the test runs the binary.
    env: Option<TestEnv>,
    argocd: tokio::task::JoinHandle<()>,
    /// ArgoCD lets a new revision turn Healthy only while this is set (the default); cleared,
    /// the Application stays Synced and Progressing.
    healthy: Arc<AtomicBool>,
    original: String,
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/fixtures/values/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

impl Rig {
    async fn new() -> Self {
        let mut rig = Self::world().await;
        let mut env = TestEnv::new(vec![promote_image(Arc::new(rig.connections()))]).await;
        env.start_worker(fast_worker("w"));
        rig.env = Some(env);
        rig
    }

    fn connections(&self) -> Connections {
        let mut conns = Connections::default();
        conns.git.insert(
            "infra".into(),
            GitConfig {
                url: self.git.url("infra"),
                token: None,
                author_name: "dayshift".into(),
                author_email: "dayshift@acme.io".into(),
                forge: None,
            },
        );
        conns.kubernetes.insert(
            "cluster".into(),
            KubeConfig {
                url: Some(self.kube.url.clone()),
                ..KubeConfig::default()
            },
        );
        conns.notify.insert("chat".into(), self.chat.url.clone());
        conns
    }

    /// The config file's connections, for a `dayshift` process.
    fn connections_yaml(&self) -> String {
        let chat = self.git.dir.join("chat-url");
        std::fs::write(&chat, &self.chat.url).unwrap();
        format!(
            "connections:\n  git:\n    infra: {{ url: \"{}\", author-email: dayshift@acme.io }}\n  kubernetes:\n    cluster: {{ url: \"{}\" }}\n  notify:\n    chat: {{ url: {{ file: {} }} }}\n",
            self.git.url("infra"),
            self.kube.url,
            chat.display()
        )
    }

    /// The repository, the cluster and the chat, without dayshift.
    async fn world() -> Self {
        let git = Arc::new(GitServer::start().await);
        let original = fixture("umbrella-values-prod.yaml");
        git.create(
            "infra",
            "main",
            &[
                (VALUES, original.as_str()),
                ("envs/staging/kustomization.yaml", &fixture("kustomization.yaml")),
                ("README.md", "infra\n"),
            ],
        );
        let kube = Arc::new(KubeApi::start().await);
        kube.put(json!({
            "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": { "name": "shop-prod", "namespace": "argocd" },
            "spec": { "source": { "repoURL": git.url("infra"), "targetRevision": "main", "path": "envs/prod" } },
        }));
        let healthy = Arc::new(AtomicBool::new(true));
        let argocd = tokio::spawn(play_argocd(
            git.clone(),
            kube.clone(),
            vec![(APP.to_string(), VALUES.to_string())],
            healthy.clone(),
        ));
        let chat = WebhookReceiver::start().await;
        Self {
            git,
            kube,
            chat,
            env: None,
            argocd,
            healthy,
            original,
        }
    }

    async fn promote(&self, input: Value) -> RunView {
        let env = self.env.as_ref().expect("dayshift in process");
        env.run_within("promote.image", input, LIMIT).await
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.argocd.abort();
    }
}

/// ArgoCD, as seen through the API: when the branch moves, the Application goes OutOfSync,
/// then Synced and Progressing at the new revision, then Healthy; or Degraded when the values
/// hold a tag ending in `-broken`. While `healthy` is cleared, the last step waits.
async fn play_argocd(git: Arc<GitServer>, kube: Arc<KubeApi>, apps: Vec<(String, String)>, healthy: Arc<AtomicBool>) {
    let mut seen = String::new();
    loop {
        let head = git.head("infra", "main");
        if head != seen {
            for (app, _) in &apps {
                kube.set_status(
                    app,
                    json!({ "sync": { "status": "OutOfSync", "revision": seen }, "health": { "status": "Healthy" } }),
                );
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
            for (app, _) in &apps {
                kube.set_status(
                    app,
                    json!({ "sync": { "status": "Synced", "revision": head }, "health": { "status": "Progressing" } }),
                );
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
            while !healthy.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            for (app, values) in &apps {
                let broken = git.read("infra", "main", values).contains("-broken\"");
                let health = if broken {
                    json!({ "status": "Degraded", "message": "Deployment shop/api-gateway: 0/3 pods ready (CrashLoopBackOff)" })
                } else {
                    json!({ "status": "Healthy" })
                };
                kube.set_status(
                    app,
                    json!({ "sync": { "status": "Synced", "revision": head }, "health": health }),
                );
            }
            seen = head;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn input(tag: &str) -> Value {
    json!({
        "repository": "infra", "application": "api-gateway", "environment": "prod", "tag": tag,
        "file": VALUES, "key": "api-gateway.image.tag", "source_commit": "4f2a9c1",
        "argocd": { "kubernetes": "cluster", "name": "shop-prod" },
        "timeout": "20s", "notify": "chat",
    })
}

#[tokio::test]
async fn a_promotion_commits_one_line_and_waits_until_argocd_is_healthy() {
    let mut rig = Rig::new().await;
    let run = rig.promote(input("2.15.0")).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    let out = run.output.clone().unwrap();
    let log = rig.git.log("infra", "main");
    let (commit, author, message) = &log[0];
    assert_eq!(out["commit"], json!(commit));
    assert_eq!(author, "dayshift@acme.io");
    assert!(message.starts_with("promote api-gateway to prod: 2.15.0"), "{message}");
    assert!(message.contains("Source-Commit: 4f2a9c1"), "{message}");
    assert!(message.contains(&format!("Dayshift-Run: {}", run.id)), "{message}");
    // The commit's diff is the one line.
    let diff = rig.git.diff("infra", commit);
    let changed: Vec<&str> = diff
        .lines()
        .filter(|l| (l.starts_with('+') || l.starts_with('-')) && !l.starts_with("+++") && !l.starts_with("---"))
        .collect();
    assert_eq!(
        changed,
        vec![
            "-    tag: \"2.14.0\"          # promoted 2026-11-20 by run 01a1f...",
            "+    tag: \"2.15.0\"          # promoted 2026-11-20 by run 01a1f...",
        ]
    );
    assert_eq!(out["push_attempts"], 1);
    let notices = rig.chat.wait_for(2, LIMIT).await;
    let texts: Vec<&str> = notices.iter().map(|n| n["text"].as_str().unwrap()).collect();
    assert!(texts[0].contains("promoting **api-gateway** to **prod**"), "{texts:?}");
    assert!(texts[1].contains("promoted to **prod**: `2.15.0`"), "{texts:?}");

    // Promoting the same tag again changes nothing.
    let again = rig.promote(input("2.15.0")).await;
    assert_eq!(again.status, RunStatus::Succeeded, "{again:#?}");
    assert_eq!(again.output.unwrap()["changed"], false);
    assert_eq!(rig.git.log("infra", "main").len(), log.len());
    rig.env.as_mut().unwrap().stop_workers().await;
}

#[tokio::test]
async fn a_degraded_application_gets_its_promotion_reverted_by_a_new_commit() {
    let mut rig = Rig::new().await;
    let seed = rig.git.head("infra", "main");
    let run = rig.promote(input("3.0.0-broken")).await;
    assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
    let error = run.error.clone().unwrap();
    assert!(
        error.contains("Application shop-prod is Degraded") && error.contains("CrashLoopBackOff"),
        "{error}"
    );
    let log = rig.git.log("infra", "main");
    assert_eq!(log.len(), 3, "seed, promotion, revert: {log:#?}");
    let (revert, _, message) = &log[0];
    let (promotion, _, _) = &log[1];
    assert!(
        message.contains(&format!("Dayshift-Revert-Of: {promotion}")),
        "{message}"
    );
    assert_eq!(log[2].0, seed, "history was rewritten");
    assert_eq!(rig.git.read("infra", "main", VALUES), rig.original.trim_end());
    // ArgoCD reports the revert healthy; the chat hears of the rollback.
    let status = rig.kube.get(APP).unwrap()["status"].clone();
    assert_eq!(status["sync"]["revision"], json!(revert));
    let notices = rig.chat.wait_for(2, LIMIT).await;
    let text = notices[1]["text"].as_str().unwrap();
    assert!(
        text.contains("was rolled back") && text.contains("healthy again"),
        "{text}"
    );
    rig.env.as_mut().unwrap().stop_workers().await;
}

#[tokio::test]
async fn a_push_rejected_because_another_writer_pushed_first_is_applied_again() {
    let mut rig = Rig::new().await;
    let git = rig.git.clone();
    let race = tokio::spawn(async move {
        git.race_next_push("infra", "main", "README.md", "infra, edited by someone else\n")
            .await;
    });
    let run = rig.promote(input("2.15.1")).await;
    race.await.unwrap();
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    assert_eq!(run.output.clone().unwrap()["push_attempts"], 2, "{run:#?}");
    let log = rig.git.log("infra", "main");
    assert!(log[0].2.contains(&format!("Dayshift-Run: {}", run.id)));
    assert_eq!(log[1].2, "another writer");
    assert!(rig.git.read("infra", "main", VALUES).contains("tag: \"2.15.1\""));
    assert_eq!(
        rig.git.read("infra", "main", "README.md"),
        "infra, edited by someone else"
    );
    rig.env.as_mut().unwrap().stop_workers().await;
}

#[tokio::test]
async fn bad_input_fails_clearly_and_pushes_nothing() {
    let mut rig = Rig::new().await;
    let seed = rig.git.head("infra", "main");
    let mut missing = input("2.15.0");
    missing["key"] = json!("api-gateway.image.tagg");
    let cases = [
        (
            missing,
            "no tagg under api-gateway.image (keys there: repository, tag, pullPolicy)",
        ),
        (input("2.15.0:latest"), "is not a valid image tag"),
        (input("-rc1"), "is not a valid image tag"),
        (
            json!({
                "repository": "infra", "application": "checkout", "environment": "staging", "tag": "v3.4.0",
                "file": "envs/staging/kustomization.yaml", "image": "registry.acme.io/shop/nope",
            }),
            "no [name=registry.acme.io/shop/nope] under images",
        ),
    ];
    for (input, expected) in cases {
        let run = rig.promote(input).await;
        assert_eq!(run.status, RunStatus::Failed, "{run:#?}");
        let error = run.error.unwrap();
        assert!(error.contains(expected), "{error}");
    }
    assert_eq!(rig.git.head("infra", "main"), seed, "something was pushed");
    rig.env.as_mut().unwrap().stop_workers().await;
}

#[tokio::test]
async fn a_prod_promotion_waits_for_approvals_across_a_restart_and_a_rejection_pushes_nothing() {
    let rig = Rig::world().await;
    let mut env = dayshift_tests::BinEnv::start_with(&rig.connections_yaml()).await;
    let mut worker = env.start_worker().await;
    let seed = rig.git.head("infra", "main");
    let mut gated = input("2.16.0");
    gated["approval"] = json!({ "approvers": ["token:alice", "token:bob", "token:carol"], "required": 2 });
    gated["requested_by"] = json!("carol");
    let id = env.start_run("promote.image", gated.clone()).await;
    let waiting = env
        .wait_run(&id, LIMIT, |r| {
            r["steps"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "approval" && s["status"] == "waiting"))
        })
        .await;
    // The run shows who may approve, how many, and since when.
    let request = waiting["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "request-approval")
        .unwrap();
    assert_eq!(
        request["output"]["approvers"],
        json!(["token:alice", "token:bob", "token:carol"])
    );
    assert_eq!(request["output"]["required"], 2);
    assert!(request["output"]["since"].as_str().unwrap().starts_with("20"));

    // The author cannot approve her own change: refused, and nothing is counted.
    let (status, refused) = env
        .post_as(
            &env.as_user("carol").await,
            &format!("/api/v1/runs/{id}/approve"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"], "token:carol made the change and may not approve it");

    // Every process restarts while the run waits.
    worker.kill9().await;
    env.server.as_mut().unwrap().kill9().await;
    env.start_server().await;
    let _worker = env.start_worker().await;

    // Alice approves with the CLI (her own token), Bob through the API.
    let alice = env.as_user("alice").await;
    let out = std::process::Command::new(dayshift_tests::dayshift_bin())
        .args([
            "runs",
            "approve",
            &id,
            "--as",
            "alice",
            "--comment",
            "looks good",
            "--server",
            &env.api,
        ])
        .env("DAYSHIFT_TOKEN", &alice)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.wait_run(&id, LIMIT, |r| {
        r["status"] == "waiting"
            && r["steps"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "decision:1"))
    })
    .await;
    assert_eq!(rig.git.head("infra", "main"), seed, "pushed with one approval");
    let (status, _) = env
        .post_as(
            &env.as_user("bob").await,
            &format!("/api/v1/runs/{id}/approve"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 202);
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let steps = run["steps"].as_array().unwrap();
    let decision = |n: usize| steps.iter().find(|s| s["name"] == format!("decision:{n}")).unwrap()["output"].clone();
    assert_eq!(decision(1)["by"], "token:alice");
    assert_eq!(decision(1)["comment"], "looks good");
    assert_eq!(decision(2)["by"], "token:bob");
    assert!(rig.git.read("infra", "main", VALUES).contains("tag: \"2.16.0\""));

    // A rejection ends the next promotion with nothing pushed.
    let head = rig.git.head("infra", "main");
    gated["tag"] = json!("2.17.0");
    let id = env.start_run("promote.image", gated).await;
    env.wait_run(&id, LIMIT, |r| {
        r["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "approval" && s["status"] == "waiting"))
    })
    .await;
    let (status, _) = env
        .post_as(
            &env.as_user("bob").await,
            &format!("/api/v1/runs/{id}/reject"),
            &json!({ "comment": "freeze until Monday" }),
        )
        .await;
    assert_eq!(status, 202);
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "failed");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("rejected by token:bob: freeze until Monday"),
        "{run:#}"
    );
    assert_eq!(rig.git.head("infra", "main"), head, "a rejected promotion pushed");
    env.server.as_mut().unwrap().kill9().await;
}

/// The journal entries of the health wait (its checks and the sleeps between them), in order.
fn health_wait(run: &Value) -> Vec<Value> {
    run["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with("wait-healthy")))
        .cloned()
        .collect()
}

fn health_checks(run: &Value) -> Vec<Value> {
    health_wait(run).into_iter().filter(|s| s["kind"] == "step").collect()
}

/// Between two checks of the health wait: the run released, its sleep pending.
fn between_checks(run: &Value) -> bool {
    run["status"] == "waiting"
        && health_wait(run)
            .last()
            .is_some_and(|s| s["kind"] == "sleep" && s["status"] == "waiting")
}

#[tokio::test]
async fn a_worker_killed_during_wait_healthy_leaves_a_durable_wait_that_the_next_worker_resumes() {
    let rig = Rig::world().await;
    // ArgoCD syncs the promotion but keeps it Progressing until the test says otherwise.
    rig.healthy.store(false, Ordering::SeqCst);
    let mut env = dayshift_tests::BinEnv::start_with(&rig.connections_yaml()).await;
    let mut first = env.start_worker().await;
    let mut promotion = input("2.18.0");
    // Checks 2 s apart (a twentieth of the timeout, at most 2 s).
    promotion["timeout"] = json!("60s");
    let id = env.start_run("promote.image", promotion).await;
    env.wait_run(&id, LIMIT, between_checks).await;
    // Killed while the run sleeps between two checks: it holds the run no longer.
    first.kill9().await;
    let (_, after_kill) = env.get(&format!("/api/v1/runs/{id}")).await;
    assert!(
        between_checks(&after_kill),
        "the killed worker was holding the run: {after_kill:#}"
    );
    let checked_by_first = health_checks(&after_kill).len();

    let _second = env.start_worker().await;
    env.wait_run(&id, LIMIT, |r| health_checks(r).len() > checked_by_first)
        .await;
    rig.healthy.store(true, Ordering::SeqCst);
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");

    // The wait is check, sleep, check, …, check: each a journal entry of its own, in order.
    let wait = health_wait(&run);
    assert_eq!(wait.len() % 2, 1, "{wait:#?}");
    for (n, entry) in wait.iter().enumerate() {
        let k = n / 2 + 1;
        let (name, kind) = match (n % 2, k) {
            (0, 1) => ("wait-healthy".to_string(), "step"),
            (0, k) => (format!("wait-healthy:{k}"), "step"),
            (_, k) => (format!("wait-healthy:sleep:{k}"), "sleep"),
        };
        assert_eq!(
            (entry["name"].as_str().unwrap(), entry["kind"].as_str().unwrap()),
            (name.as_str(), kind),
            "{wait:#?}"
        );
        assert_eq!(entry["status"], "succeeded", "{entry:#}");
    }
    let checks = health_checks(&run);
    let (last, pending) = checks.split_last().unwrap();
    assert_eq!(last["output"]["ready"], true, "{last:#}");
    assert!(
        pending
            .iter()
            .all(|c| c["output"]["ready"] == false && c["output"]["pending"].is_string()),
        "{pending:#?}"
    );
    let held = pending.last().unwrap()["output"]["pending"].as_str().unwrap();
    assert!(held.ends_with("Synced, Progressing"), "{held}");
    // The second worker finished the wait: the check that found it still Progressing and the
    // last one are its own, the first worker being dead.
    assert!(checks.len() >= checked_by_first + 2, "{wait:#?}");
    // The deadline set by the first check was kept by every later one, on either worker.
    assert!(
        checks
            .iter()
            .all(|c| c["output"]["deadline"] == checks[0]["output"]["deadline"]),
        "{checks:#?}"
    );
    // No check ran again once journaled: one attempt each, and ArgoCD's Application was read
    // exactly once per check (a replayed check would have read it again).
    assert!(checks.iter().all(|c| c["attempts"] == 1), "{checks:#?}");
    let reads = rig
        .kube
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == APP)
        .count();
    assert_eq!(reads, checks.len(), "{checks:#?}");
    // No step held a worker through the wait: each check took less than the sleep after it.
    for c in &checks {
        assert!(c["duration_ms"].as_i64().unwrap() < 2000, "{c:#}");
    }
    assert!(rig.git.read("infra", "main", VALUES).contains("tag: \"2.18.0\""));
    env.server.as_mut().unwrap().kill9().await;
}

/// The revert's undo entry (`undo:commit-and-push`), if it has one yet.
fn revert_undo(run: &Value) -> Option<Value> {
    run["steps"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == "undo:commit-and-push")
        .cloned()
}

/// Between two health checks of the revert: the run released, its undo retrying.
fn reverting(run: &Value) -> bool {
    run["status"] == "waiting" && revert_undo(run).is_some_and(|u| u["status"] == "retrying")
}

#[tokio::test]
async fn a_revert_waits_for_health_again_without_holding_a_worker_and_a_killed_worker_resumes_it() {
    let rig = Rig::world().await;
    // ArgoCD keeps every new revision Progressing: the promotion times out, and the revert
    // waits for health until the test lets it turn Healthy.
    rig.healthy.store(false, Ordering::SeqCst);
    let mut env = dayshift_tests::BinEnv::start_with(&rig.connections_yaml()).await;
    let mut first = env.start_worker().await;
    let mut promotion = input("2.19.0");
    // Checks 400 ms apart, for 8 s: the promotion's wait, then the revert's.
    promotion["timeout"] = json!("8s");
    let id = env.start_run("promote.image", promotion).await;
    env.wait_run(&id, LIMIT, reverting).await;
    // Killed between two of the revert's checks: it holds the run no longer.
    first.kill9().await;
    let (_, after_kill) = env.get(&format!("/api/v1/runs/{id}")).await;
    assert!(
        reverting(&after_kill),
        "the killed worker was holding the run: {after_kill:#}"
    );
    let by_first = revert_undo(&after_kill).unwrap()["attempts"].as_i64().unwrap();
    assert!(
        revert_undo(&after_kill).unwrap()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not yet") && e.contains("Progressing")),
        "{after_kill:#}"
    );

    let _second = env.start_worker().await;
    env.wait_run(&id, LIMIT, |r| {
        revert_undo(r).is_some_and(|u| u["attempts"].as_i64().unwrap() > by_first)
    })
    .await;
    rig.healthy.store(true, Ordering::SeqCst);
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("did not become Synced and Healthy"),
        "{run:#}"
    );
    let undo = revert_undo(&run).unwrap();
    assert_eq!(undo["status"], "succeeded", "{undo:#}");
    assert!(undo["attempts"].as_i64().unwrap() > by_first, "{undo:#}");
    // However many attempts, on two workers: one revert commit, the promotion's.
    let log = rig.git.log("infra", "main");
    assert_eq!(log.len(), 3, "seed, promotion, revert: {log:#?}");
    assert!(
        log[0].2.contains(&format!("Dayshift-Revert-Of: {}", log[1].0)),
        "{log:#?}"
    );
    assert_eq!(rig.git.read("infra", "main", VALUES), rig.original.trim_end());
    let notices = rig.chat.wait_for(2, LIMIT).await;
    let text = notices[1]["text"].as_str().unwrap();
    assert!(
        text.contains("was rolled back") && text.contains("healthy again"),
        "{text}"
    );
    env.server.as_mut().unwrap().kill9().await;
}

const SECRET: &str = "chain-webhook-secret";

fn signed(body: &[u8]) -> String {
    format!("sha256={}", dayshift_tests::hmac_sha256_hex(SECRET, body))
}

/// A repository with dev, staging and prod values, ArgoCD for staging and prod, and `dayshift
/// serve` + a worker configured with the api-gateway promotions and the push route.
async fn chain_world() -> (
    Arc<GitServer>,
    tokio::task::JoinHandle<()>,
    dayshift_tests::BinEnv,
    dayshift_tests::Proc,
) {
    let git = Arc::new(GitServer::start().await);
    let values = fixture("umbrella-values-prod.yaml");
    let paths: Vec<String> = ["dev", "staging", "prod"]
        .iter()
        .map(|e| format!("envs/{e}/values.yaml"))
        .collect();
    let files: Vec<(&str, &str)> = paths.iter().map(|p| (p.as_str(), values.as_str())).collect();
    git.create("infra", "main", &files);
    let kube = Arc::new(KubeApi::start().await);
    let mut apps = Vec::new();
    for env in ["staging", "prod"] {
        kube.put(json!({
            "apiVersion": "argoproj.io/v1alpha1", "kind": "Application",
            "metadata": { "name": format!("shop-{env}"), "namespace": "argocd" }, "spec": {},
        }));
        apps.push((
            format!("/apis/argoproj.io/v1alpha1/namespaces/argocd/applications/shop-{env}"),
            format!("envs/{env}/values.yaml"),
        ));
    }
    let argocd = tokio::spawn(play_argocd(
        git.clone(),
        kube.clone(),
        apps,
        Arc::new(AtomicBool::new(true)),
    ));

    let dir = git.dir.join("config");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let env_yaml = |name: &str, extra: &str| {
        format!(
            "      - name: {name}\n        file: envs/{name}/values.yaml\n        key: api-gateway.image.tag\n{extra}"
        )
    };
    let yaml = format!(
        "connections:\n  git:\n    infra: {{ url: \"{}\", author-email: dayshift@acme.io }}\n  kubernetes:\n    cluster: {{ url: \"{}\" }}\n\
         webhooks:\n  github:\n    secret: {{ file: {} }}\n  bot-emails: [dayshift@acme.io]\n  routes:\n    - name: promote-api-gateway\n      forge: github\n      repositories: [acme/infra]\n      events: [push]\n      branches: [main]\n      paths: [envs/dev/**]\n      workflow: promote.chain\n      input: {{ application: api-gateway, from: dev, source_commit: \"{{{{ sha }}}}\", requested_by: \"{{{{ payload.head_commit.author.email }}}}\" }}\n      concurrency: {{ key: promote-api-gateway, policy: cancel-older }}\n\
         promotions:\n  api-gateway:\n    repository: infra\n    kubernetes: cluster\n    environments:\n{}{}{}",
        git.url("infra"),
        kube.url,
        dir.join("secret").display(),
        env_yaml("dev", ""),
        env_yaml(
            "staging",
            "        argocd-application: shop-staging\n        timeout: 20s\n        soak: 1s\n"
        ),
        env_yaml(
            "prod",
            "        argocd-application: shop-prod\n        timeout: 20s\n        soak: 1s\n        approval: { approvers: [\"token:alice\", \"token:ci@acme.io\"] }\n"
        ),
    );
    let env = dayshift_tests::BinEnv::start_with(&yaml).await;
    let worker = env.start_worker().await;
    (git, argocd, env, worker)
}

/// CI writes `tag` into dev's values and pushes; GitHub tells dayshift (delivery `delivery`).
async fn ci_pushes_to_dev(git: &GitServer, env: &dayshift_tests::BinEnv, tag: &str, delivery: &str) -> String {
    let dev = fixture("umbrella-values-prod.yaml").replace("tag: \"2.14.0\"", &format!("tag: \"{tag}\""));
    git.push_other("infra", "main", "envs/dev/values.yaml", &dev);
    let sha = git.head("infra", "main");
    let mut push: Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/fixtures/github/push-branch.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    push["ref"] = json!("refs/heads/main");
    push["after"] = json!(sha);
    push["repository"]["full_name"] = json!("acme/infra");
    let commit = json!({
        "id": sha, "tree_id": sha, "distinct": true, "message": format!("ci: api-gateway {tag} to dev"),
        "timestamp": "2026-11-21T10:00:00Z", "url": "https://github.com/acme/infra/commit/x",
        "author": { "name": "CI", "email": "ci@acme.io", "username": "ci" },
        "committer": { "name": "CI", "email": "ci@acme.io", "username": "ci" },
        "added": [], "removed": [], "modified": ["envs/dev/values.yaml"],
    });
    push["commits"] = json!([commit]);
    push["head_commit"] = commit;
    let body = serde_json::to_vec(&push).unwrap();
    let resp = env
        .http
        .post(format!("{}/hooks/github", env.api))
        .header("content-type", "application/json")
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", delivery)
        .header("X-Hub-Signature-256", signed(&body))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert!(status < 300, "{status} {}", resp.text().await.unwrap());
    sha
}

#[tokio::test]
async fn a_push_to_dev_starts_the_chain_through_staging_and_an_approved_prod() {
    let (git, argocd, mut env, _worker) = chain_world().await;
    let sha = ci_pushes_to_dev(&git, &env, "2.18.0", "d-1").await;

    // Staging is promoted on its own; prod waits for an approval, which CI cannot give itself.
    let deadline = tokio::time::Instant::now() + LIMIT;
    let prod = loop {
        let (_, runs) = env.get("/api/v1/runs?workflow=promote.image&limit=10").await;
        let waiting = runs["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["status"] == "waiting" && r["input"]["environment"] == "prod")
            .cloned();
        if let Some(r) = waiting {
            break r["id"].as_str().unwrap().to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no prod promotion waits: {runs:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        git.read("infra", "main", "envs/staging/values.yaml")
            .contains("tag: \"2.18.0\"")
    );
    assert!(
        git.read("infra", "main", "envs/prod/values.yaml")
            .contains("tag: \"2.14.0\"")
    );
    // The commit's author (a token of the same name) is refused; alice approves.
    for (by, expected) in [("ci@acme.io", 403), ("alice", 202)] {
        let (status, body) = env
            .post_as(
                &env.as_user(by).await,
                &format!("/api/v1/runs/{prod}/approve"),
                &json!({}),
            )
            .await;
        assert_eq!(status, expected, "{by}: {body}");
    }
    let (_, chains) = env.get("/api/v1/runs?workflow=promote.chain").await;
    let chain = chains["runs"][0]["id"].as_str().unwrap().to_string();
    let chain = env.wait_finished(&chain, LIMIT).await;
    assert_eq!(chain["status"], "succeeded", "{chain:#}");
    assert_eq!(chain["output"]["promoted"], json!(["staging", "prod"]));
    assert_eq!(chain["output"]["tag"], "2.18.0");
    assert!(
        chain["started_by"].as_str().unwrap().contains("promote-api-gateway"),
        "{chain:#}"
    );
    let steps = chain["steps"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["name"] == "soak:prod"), "{chain:#}");
    assert!(
        git.read("infra", "main", "envs/prod/values.yaml")
            .contains("tag: \"2.18.0\"")
    );
    let log = git.log("infra", "main");
    assert!(log[0].2.starts_with("promote api-gateway to prod: 2.18.0"), "{log:#?}");
    assert!(
        log[1].2.starts_with("promote api-gateway to staging: 2.18.0"),
        "{log:#?}"
    );
    assert!(log[0].2.contains(&format!("Source-Commit: {sha}")), "{log:#?}");
    // Only alice's approval reached the gate.
    let (_, prod_run) = env.get(&format!("/api/v1/runs/{prod}")).await;
    let decisions: Vec<&Value> = prod_run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"].as_str().unwrap().starts_with("decision:"))
        .collect();
    assert_eq!(decisions.len(), 1, "{prod_run:#}");
    assert_eq!(decisions[0]["output"]["by"], "token:alice");
    argocd.abort();
    env.server.as_mut().unwrap().kill9().await;
}

/// Posts a signed GitHub `pull_request` delivery for `branch`; the run it started.
async fn deliver_pr(env: &dayshift_tests::BinEnv, file: &str, branch: &str, delivery: &str) -> String {
    let mut body: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}/fixtures/github/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap(),
    )
    .unwrap();
    body["pull_request"]["head"]["ref"] = json!(branch);
    let bytes = serde_json::to_vec(&body).unwrap();
    let resp = env
        .http
        .post(format!("{}/hooks/github", env.api))
        .header("content-type", "application/json")
        .header("X-GitHub-Event", "pull_request")
        .header("X-GitHub-Delivery", delivery)
        .header("X-Hub-Signature-256", signed(&bytes))
        .body(bytes)
        .send()
        .await
        .unwrap();
    let answer: Value = resp.json().await.unwrap();
    answer["runs"][0]["run_id"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| panic!("{answer:#}"))
}

#[tokio::test]
async fn pull_requests_get_a_preview_created_and_removed_by_their_webhooks() {
    let git = Arc::new(GitServer::start().await);
    git.create(
        "infra",
        "main",
        &[
            (VALUES, &fixture("umbrella-values-prod.yaml")),
            ("charts/shop/Chart.yaml", "name: shop\n"),
        ],
    );
    let dir = git.dir.join("config");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let create = "{ repository: infra, branch: \"{{ pull_request.head_branch }}\", template: envs/prod/values.yaml, key: api-gateway.image.tag, tag: \"pr-{{ pull_request.number }}\", chart: charts/shop }";
    let delete = "{ repository: infra, branch: \"{{ pull_request.head_branch }}\" }";
    let yaml = format!(
        "connections:\n  git:\n    infra: {{ url: \"{}\", author-email: dayshift@acme.io }}\n\
         webhooks:\n  github:\n    secret: {{ file: {} }}\n  routes:\n\
         \x20   - name: preview-create\n      forge: github\n      events: [pull-request-opened, pull-request-reopened]\n      workflow: preview.create\n      input: {create}\n\
         \x20   - name: preview-delete\n      forge: github\n      events: [pull-request-closed, pull-request-merged]\n      workflow: preview.delete\n      input: {delete}\n",
        git.url("infra"),
        dir.join("secret").display(),
    );
    let env = dayshift_tests::BinEnv::start_with(&yaml).await;
    let _worker = env.start_worker().await;

    let opened = deliver_pr(&env, "pull_request-opened.json", "feature/Login_UI", "p-1").await;
    let run = env.wait_finished(&opened, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"]["name"], "feature-login-ui");
    let values = git.read("infra", "main", "previews/feature-login-ui/values.yaml");
    assert!(values.contains("tag: \"pr-2\""), "{values}");
    let app = git.read("infra", "main", "previews/feature-login-ui/application.yaml");
    assert!(
        app.contains("name: preview-feature-login-ui") && app.contains("namespace: preview-feature-login-ui"),
        "{app}"
    );
    assert!(app.contains("- ../../previews/feature-login-ui/values.yaml"), "{app}");

    // Creating it again changes nothing.
    let again = env
        .start_run(
            "preview.create",
            json!({ "repository": "infra", "branch": "feature/Login_UI", "template": VALUES,
                    "key": "api-gateway.image.tag", "tag": "pr-2", "chart": "charts/shop" }),
        )
        .await;
    let again = env.wait_finished(&again, LIMIT).await;
    assert_eq!(again["status"], "succeeded", "{again:#}");
    assert!(again["output"]["commit"].is_null(), "{again:#}");

    let closed = deliver_pr(&env, "pull_request-closed.json", "feature/Login_UI", "p-2").await;
    let run = env.wait_finished(&closed, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let listing = std::process::Command::new("git")
        .args(["ls-tree", "-r", "--name-only", "main"])
        .current_dir(git.dir.join("infra.git"))
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(!listing.contains("previews/") && listing.contains(VALUES), "{listing}");

    // A branch that cannot name a preview is refused with the reason.
    let bad = env
        .start_run(
            "preview.create",
            json!({ "repository": "infra", "branch": "///", "template": VALUES,
                    "key": "api-gateway.image.tag", "tag": "pr-3", "chart": "charts/shop" }),
        )
        .await;
    let bad = env.wait_finished(&bad, LIMIT).await;
    assert_eq!(bad["status"], "failed");
    assert!(
        bad["error"].as_str().unwrap().contains("no letters or digits"),
        "{bad:#}"
    );
}

/// The prod promotion of `tag` waiting for approval, once there is one.
async fn waiting_prod(env: &dayshift_tests::BinEnv, tag: &str) -> String {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (_, runs) = env.get("/api/v1/runs?workflow=promote.image&limit=20").await;
        let found = runs["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["status"] == "waiting" && r["input"]["environment"] == "prod" && r["input"]["tag"] == tag);
        if let Some(r) = found {
            return r["id"].as_str().unwrap().to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no prod promotion of {tag} waits: {runs:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_newer_tag_cancels_the_older_chain_still_waiting_for_approval() {
    let (git, argocd, mut env, _worker) = chain_world().await;
    ci_pushes_to_dev(&git, &env, "2.18.0", "d-1").await;
    let old_prod = waiting_prod(&env, "2.18.0").await;
    let (_, chains) = env.get("/api/v1/runs?workflow=promote.chain").await;
    let old_chain = chains["runs"][0]["id"].as_str().unwrap().to_string();

    // 2.19.0 arrives while 2.18.0 waits for prod's approval: the older chain is cancelled.
    ci_pushes_to_dev(&git, &env, "2.19.0", "d-2").await;
    let old = env.wait_finished(&old_chain, LIMIT).await;
    assert_eq!(old["status"], "cancelled", "{old:#}");
    let old_prod = env.wait_finished(&old_prod, LIMIT).await;
    assert_eq!(old_prod["status"], "cancelled", "{old_prod:#}");

    let new_prod = waiting_prod(&env, "2.19.0").await;
    let (status, _) = env
        .post_as(
            &env.as_user("alice").await,
            &format!("/api/v1/runs/{new_prod}/approve"),
            &json!({}),
        )
        .await;
    assert_eq!(status, 202);
    let new = env.wait_finished(&new_prod, LIMIT).await;
    assert_eq!(new["status"], "succeeded", "{new:#}");
    assert!(
        git.read("infra", "main", "envs/prod/values.yaml")
            .contains("tag: \"2.19.0\"")
    );
    assert!(
        !git.log("infra", "main")
            .iter()
            .any(|(_, _, m)| m.starts_with("promote api-gateway to prod: 2.18.0")),
        "the superseded tag reached prod"
    );
    argocd.abort();
    env.server.as_mut().unwrap().kill9().await;
}

#[tokio::test]
async fn a_promotion_failing_at_any_step_leaves_the_environment_at_its_previous_version() {
    let rig = Rig::world().await;
    let git = &rig.git;
    // Each run promotes a tag of its own: promoting the tag already there commits nothing, and
    // there would be nothing to revert.
    dayshift_tests::saga::Saga::new("promote.image", |i| input(&format!("2.16.{i}")))
        // A notice that cannot be sent is logged, not fatal: the promotion stands.
        .tolerating(["notify-start", "notify-promoted"])
        .failure_at_each_step_compensates(
            TestEnv::builder(vec![promote_image(Arc::new(rig.connections()))]),
            // What ArgoCD deploys: the files at the tip of the branch. Not the tip itself: the
            // undo reverts with a commit of its own (never a force-push), so after a failure
            // at `wait-healthy` the history has the promotion and its revert, and the files as
            // before.
            move |_env| async move { (git.tree("infra", "main"), git.read("infra", "main", VALUES)) },
        )
        .await;
}
