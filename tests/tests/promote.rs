//! promote.image against real git (bare repositories served by `git daemon`) and ArgoCD
//! status through the Kubernetes API stand-in.

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{RunStatus, RunView, StartRun};
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
        let argocd = tokio::spawn(play_argocd(git.clone(), kube.clone()));
        let chat = WebhookReceiver::start().await;
        Self {
            git,
            kube,
            chat,
            env: None,
            argocd,
            original,
        }
    }

    async fn promote(&self, input: Value) -> RunView {
        let env = self.env.as_ref().expect("dayshift in process");
        let started = env.engine.start(StartRun::new("promote.image", input)).await.unwrap();
        env.wait(started.id, LIMIT).await
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.argocd.abort();
    }
}

/// ArgoCD, as seen through the API: when the branch moves, the Application goes OutOfSync,
/// then Synced and Progressing at the new revision, then Healthy; or Degraded when the values
/// hold a tag ending in `-broken`.
async fn play_argocd(git: Arc<GitServer>, kube: Arc<KubeApi>) {
    let mut seen = String::new();
    loop {
        let head = git.head("infra", "main");
        if head != seen {
            kube.set_status(
                APP,
                json!({ "sync": { "status": "OutOfSync", "revision": seen }, "health": { "status": "Healthy" } }),
            );
            tokio::time::sleep(Duration::from_millis(60)).await;
            kube.set_status(
                APP,
                json!({ "sync": { "status": "Synced", "revision": head }, "health": { "status": "Progressing" } }),
            );
            tokio::time::sleep(Duration::from_millis(60)).await;
            let broken = git.read("infra", "main", VALUES).contains("-broken\"");
            let health = if broken {
                json!({ "status": "Degraded", "message": "Deployment shop/api-gateway: 0/3 pods ready (CrashLoopBackOff)" })
            } else {
                json!({ "status": "Healthy" })
            };
            kube.set_status(
                APP,
                json!({ "sync": { "status": "Synced", "revision": head }, "health": health }),
            );
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
    let notices = rig.chat.wait_for(1, LIMIT).await;
    assert!(
        notices[0]["text"]
            .as_str()
            .unwrap()
            .contains("promoted to **prod**: `2.15.0`"),
        "{notices:?}"
    );

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
    let notices = rig.chat.wait_for(1, LIMIT).await;
    let text = notices[0]["text"].as_str().unwrap();
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
    gated["approval"] = json!({ "approvers": ["alice", "bob", "carol"], "required": 2 });
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
    assert_eq!(request["output"]["approvers"], json!(["alice", "bob", "carol"]));
    assert_eq!(request["output"]["required"], 2);
    assert!(request["output"]["since"].as_str().unwrap().starts_with("20"));

    // The author cannot approve her own change.
    let (status, _) = env
        .post(&format!("/api/v1/runs/{id}/approve"), &json!({ "by": "carol" }))
        .await;
    assert_eq!(status, 202);
    env.wait_run(&id, LIMIT, |r| {
        r["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "decision:1"))
    })
    .await;

    // Every process restarts while the run waits.
    worker.kill9().await;
    env.server.as_mut().unwrap().kill9().await;
    env.start_server().await;
    let _worker = env.start_worker().await;

    // Alice approves with the CLI, Bob through the API.
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
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    env.wait_run(&id, LIMIT, |r| {
        r["status"] == "waiting"
            && r["steps"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "decision:2"))
    })
    .await;
    assert_eq!(rig.git.head("infra", "main"), seed, "pushed with one approval");
    let (status, _) = env
        .post(&format!("/api/v1/runs/{id}/approve"), &json!({ "by": "bob" }))
        .await;
    assert_eq!(status, 202);
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let steps = run["steps"].as_array().unwrap();
    let decision = |n: usize| steps.iter().find(|s| s["name"] == format!("decision:{n}")).unwrap()["output"].clone();
    assert_eq!(decision(1)["ignored"], "carol made the change and may not approve it");
    assert_eq!(decision(2)["by"], "alice");
    assert_eq!(decision(2)["comment"], "looks good");
    assert_eq!(decision(3)["by"], "bob");
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
        .post(
            &format!("/api/v1/runs/{id}/reject"),
            &json!({ "by": "bob", "comment": "freeze until Monday" }),
        )
        .await;
    assert_eq!(status, 202);
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "failed");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("rejected by bob: freeze until Monday"),
        "{run:#}"
    );
    assert_eq!(rig.git.head("infra", "main"), head, "a rejected promotion pushed");
    env.server.as_mut().unwrap().kill9().await;
}
