//! Workflows written as YAML files: loaded from a directory, run by the engine, their input
//! checked when a run is started, their connection inputs under the API's policy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::api::auth::Role;
use dayshift_engine::policy::{Policy, Rule};
use dayshift_engine::{RunStatus, StartRun};
use dayshift_tests::{TestEnv, WebhookReceiver, assert_succeeded, fast_worker, unique};
use dayshift_workflows::Connections;
use dayshift_workflows::declarative::{self, Definition};
use serde_json::{Value, json};

const ANNOUNCE: &str = r#"
name: ops.announce
description: Tells the on-call channel what a scale-up would do.
input:
  service: { type: string, description: The service. }
  replicas: { type: integer, default: 2 }
  loud: { type: boolean, default: false }
  channel: { type: connection, connection: notify }
steps:
  - id: plan
    action: log
    with:
      message: "scaling ${{ input.service }} to ${{ input.replicas * 2 }}"
      data: { target: "${{ input.replicas * 2 }}" }
  - id: shout
    when: input.loud
    action: notify
    with: { connection: "${{ input.channel }}", text: "LOUD" }
  - id: tell
    action: notify
    retry: { attempts: 3, delay: 100ms }
    with:
      connection: ${{ input.channel }}
      text: "${{ steps.plan.message }} (target ${{ steps.plan.data.target }})"
output:
  target: ${{ steps.plan.data.target }}
  shouted: ${{ steps.shout != null }}
"#;

/// The workflows of `files` (name, text) written into a directory of their own and loaded as
/// the binary loads them, with one notify connection `ops` posting to `chat`.
fn load(files: &[(&str, &str)], chat: &WebhookReceiver) -> (Vec<Arc<Definition>>, Arc<Connections>) {
    let dir = std::env::temp_dir().join(format!("dayshift-workflows-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let mut conns = Connections::default();
    conns.notify.insert("ops".into(), chat.url.clone());
    let names = BTreeMap::from([("notify".to_string(), ["ops".to_string()].into())]);
    let defs = declarative::load(&[dir], std::path::Path::new("/"), &names, &dayshift_workflows::BUILT_IN).unwrap();
    (defs, Arc::new(conns))
}

fn registered(defs: &[Arc<Definition>], conns: &Arc<Connections>) -> Vec<dayshift_engine::WorkflowDef> {
    let names = Arc::new(BTreeMap::from([("notify".to_string(), ["ops".to_string()].into())]));
    defs.iter()
        .map(|d| d.clone().workflow(conns.clone(), names.clone(), None))
        .collect()
}

#[tokio::test]
async fn a_workflow_file_runs_its_steps_skips_what_its_when_says_and_answers_its_output() {
    let chat = WebhookReceiver::start().await;
    let (defs, conns) = load(&[("announce.yaml", ANNOUNCE), ("notes.txt", "not a workflow")], &chat);
    assert_eq!(defs.len(), 1, "only the YAML file is a workflow");
    let mut env = TestEnv::new(registered(&defs, &conns)).await;
    env.start_worker(fast_worker("w"));

    let run = env
        .run(
            "ops.announce",
            json!({ "service": "shop", "replicas": 3, "channel": "ops" }),
        )
        .await;
    assert_succeeded(&run);
    assert_eq!(run.output, Some(json!({ "target": 6, "shouted": false })));
    // The skipped step is not journaled; the others are, in order, with their outputs.
    let names: Vec<&str> = run.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["plan", "tell"]);
    assert_eq!(
        run.steps[0].output,
        Some(json!({ "message": "scaling shop to 6", "data": { "target": 6 } }))
    );
    let notices = chat.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0]["text"], "scaling shop to 6 (target 6)");

    // With `loud`, the conditional step runs too; the default replicas (2) is used.
    let run = env
        .run(
            "ops.announce",
            json!({ "service": "db", "loud": true, "channel": "ops" }),
        )
        .await;
    assert_succeeded(&run);
    assert_eq!(run.output, Some(json!({ "target": 4, "shouted": true })));
    let texts: Vec<Value> = chat
        .wait_for(3, Duration::from_secs(10))
        .await
        .iter()
        .map(|n| n["text"].clone())
        .collect();
    assert_eq!(texts[1..], [json!("LOUD"), json!("scaling db to 4 (target 4)")]);
    env.stop_workers().await;
}

#[tokio::test]
async fn bad_input_and_a_connection_the_config_does_not_name_are_refused_before_a_run_exists() {
    let chat = WebhookReceiver::start().await;
    let (defs, conns) = load(&[("announce.yaml", ANNOUNCE)], &chat);
    let env = TestEnv::new(registered(&defs, &conns)).await;
    for (input, says) in [
        (
            json!({ "service": "shop", "channel": "elsewhere" }),
            "\"elsewhere\" is not a connection of connections.notify",
        ),
        (json!({ "service": "shop" }), "channel: required"),
        (json!({ "service": 7, "channel": "ops" }), "service: must be a string"),
        (
            json!({ "service": "shop", "channel": "ops", "replicas": "3" }),
            "replicas: must be an integer",
        ),
        (
            json!({ "service": "shop", "channel": "ops", "url": "http://x" }),
            "url: not an input of ops.announce",
        ),
    ] {
        let err = env
            .engine
            .start(StartRun::new("ops.announce", input.clone()))
            .await
            .expect_err(&input.to_string())
            .to_string();
        assert!(err.contains(says), "{input}: {err}");
    }
    let runs: i64 = sqlx::query_scalar("select count(*) from runs")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(runs, 0, "a refused start made a run");
    assert!(chat.received().is_empty());
}

#[tokio::test]
async fn a_connection_input_from_the_api_takes_only_what_the_policy_allows() {
    let chat = WebhookReceiver::start().await;
    let (defs, conns) = load(&[("announce.yaml", ANNOUNCE)], &chat);
    let env = TestEnv::new(registered(&defs, &conns)).await;
    let serve = |policy: Policy| {
        let api = dayshift_engine::api::Api::builder(env.engine.clone())
            .policy(policy)
            .build();
        api.router(dayshift_engine::api::ServerConfig::default())
    };
    let token = dayshift_engine::api::auth::create_token(&env.db.pool, "op", Role::Operator, None, "test")
        .await
        .unwrap();
    let post = |app: axum::Router, body: Value| {
        let token = token.clone();
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/api/v1/runs", listener.local_addr().unwrap());
            let server = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            let r = dayshift_workflows::adapters::http::client()
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let out = (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null));
            server.abort();
            out
        }
    };
    let start = json!({ "workflow": "ops.announce", "input": { "service": "shop", "channel": "ops" } });
    // The guarded field without an allow-list in the policy takes no value from the API.
    let (status, body) = post(serve(Policy::default()), start.clone()).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.to_string().contains("channel"), "{body}");
    let runs = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from runs")
            .fetch_one(&env.db.pool)
            .await
            .unwrap()
    };
    assert_eq!(runs().await, 0);
    // With `ops` allowed it is started; another name is still refused.
    let allowed = Policy {
        rules: vec![
            Rule::new(
                "ops.*",
                None,
                [("channel".to_string(), vec!["ops".to_string()])].into_iter().collect(),
            )
            .unwrap(),
        ],
    };
    let (status, body) = post(serve(allowed.clone()), start).await;
    assert!(status == 201 || status == 202, "{status}: {body}");
    assert_eq!(runs().await, 1);
    let other = json!({ "workflow": "ops.announce", "input": { "service": "shop", "channel": "pager" } });
    let (status, body) = post(serve(allowed), other).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(runs().await, 1);
}

#[test]
fn files_with_problems_are_all_reported_and_a_built_in_name_is_refused() {
    let dir = std::env::temp_dir().join(format!("dayshift-workflows-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "name: backup.postgres\nsteps:\n  - { id: a, action: log, with: { message: x } }\n",
    )
    .unwrap();
    std::fs::write(dir.join("b.yml"), "name: ops.b\nsteps:\n  - { id: a, action: nope }\n").unwrap();
    std::fs::write(dir.join("c.yaml"), "name: ops.c\nsteps:\n  - { id: a, sleep: 1s }\n").unwrap();
    std::fs::write(dir.join("d.yaml"), "name: ops.c\nsteps:\n  - { id: a, sleep: 2s }\n").unwrap();
    let problems = declarative::load(
        std::slice::from_ref(&dir),
        std::path::Path::new("/"),
        &Default::default(),
        &dayshift_workflows::BUILT_IN,
    )
    .unwrap_err();
    let at = |file: &str| dir.join(file).display().to_string();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(
        problems[0].starts_with(&at("a.yaml")) && problems[0].contains("a built-in workflow's name"),
        "{problems:#?}"
    );
    assert!(
        problems[1].starts_with(&format!("{}:3:", at("b.yml"))) && problems[1].contains("no action \"nope\""),
        "{problems:#?}"
    );
    assert!(
        problems[2].starts_with(&at("d.yaml"))
            && problems[2].contains(&format!("already the name of the workflow in {}", at("c.yaml"))),
        "{problems:#?}"
    );
}

#[test]
fn docs_workflows_md_describes_every_action_and_each_of_its_parameters() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/workflows.md")).unwrap();
    for action in declarative::catalog().as_array().unwrap() {
        let name = action["name"].as_str().unwrap();
        let heading = format!("### `{name}`\n");
        let at = docs
            .find(&heading)
            .unwrap_or_else(|| panic!("docs/workflows.md has no section {heading:?}"));
        let section = &docs[at + heading.len()..];
        let section = &section[..section.find("\n#").unwrap_or(section.len())];
        for param in action["params"].as_array().unwrap() {
            let row = format!("| `{}` |", param["name"].as_str().unwrap());
            assert!(section.contains(&row), "docs/workflows.md, {name}: no row {row}");
        }
    }
}

/// Version 1 of `ops.change`: a step, an approval by alice, a step; version 2 has no approval.
const CHANGE_V1: &str = r#"
name: ops.change
steps:
  - { id: first, action: log, with: { message: v1 first } }
  - { id: approve, approval: { approvers: ["token:alice"], timeout: 1h } }
  - { id: last, action: log, with: { message: v1 last } }
output: ${{ steps.last.message }}
"#;
const CHANGE_V2: &str = r#"
name: ops.change
steps:
  - { id: first, action: log, with: { message: v2 first } }
  - { id: last, action: log, with: { message: v2 last } }
output: ${{ steps.last.message }}
"#;

/// A release of `defs`: their versions kept, and an engine on `env`'s database that has them.
async fn release(
    env: &TestEnv,
    defs: Vec<Arc<Definition>>,
    conns: Arc<Connections>,
) -> (Vec<Arc<Definition>>, dayshift_engine::Engine) {
    let pool = env.db.pool.clone();
    declarative::keep_versions(&pool, &defs).await.unwrap();
    let names = Arc::new(BTreeMap::new());
    let workflows = defs
        .iter()
        .map(|d| d.clone().workflow(conns.clone(), names.clone(), Some(pool.clone())))
        .collect();
    (defs, env.engine_with(workflows).await)
}

#[tokio::test]
async fn a_run_waiting_for_approval_finishes_on_the_version_it_started_on_after_its_file_is_edited() {
    let chat = WebhookReceiver::start().await;
    let mut env = TestEnv::new(vec![]).await;
    let pool = env.db.pool.clone();
    // The file as first deployed: a run of it starts and waits for alice's approval.
    let (v1, conns) = load(&[("change.yaml", CHANGE_V1)], &chat);
    let (v1, engine) = release(&env, v1, conns.clone()).await;
    assert_eq!(v1[0].version(), 1);
    let old = engine.start(StartRun::new("ops.change", json!({}))).await.unwrap();
    env.start_worker_on(engine.clone(), fast_worker("v1"));
    dayshift_tests::wait_for(&engine, old.id, Duration::from_secs(30), |r| {
        r.status == RunStatus::Waiting && r.steps.iter().any(|s| s.name == "request-approval")
    })
    .await;
    env.stop_workers().await;

    // The file is edited (the approval removed) and every process restarted with the new text.
    let (v2, _) = load(&[("change.yaml", CHANGE_V2)], &chat);
    let (v2, engine) = release(&env, v2, conns.clone()).await;
    assert_eq!(v2[0].version(), 2);
    // Loading the same text again keeps its number.
    let (again, _) = load(&[("change.yaml", CHANGE_V2)], &chat);
    declarative::keep_versions(&pool, &again).await.unwrap();
    assert_eq!(again[0].version(), 2);
    // The API shows both versions, the current text, and the run still going on version 1.
    let api = |engine: &dayshift_engine::Engine| dayshift_engine::api::Api::builder(engine.clone()).build();
    let (status, body) = env.get_text_on(api(&engine), "/api/v1/workflows/ops.change").await;
    assert_eq!(status, 200, "{body}");
    let shown: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(shown["version"], 2);
    assert_eq!(shown["source"], CHANGE_V2);
    let versions: Vec<(i64, bool, Value, Value)> = shown["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_i64().unwrap(),
                v["current"].as_bool().unwrap(),
                v["runs"].clone(),
                v["in_flight"].clone(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            (2, true, json!({}), json!([])),
            (1, false, json!({ "waiting": 1 }), json!([old.id.to_string()])),
        ]
    );
    assert_eq!(shown["input_schema"]["type"], "object", "{shown:#}");
    let (status, body) = env.get_text_on(api(&engine), "/api/v1/workflows/ops.nope").await;
    assert_eq!(status, 404, "{body}");

    env.start_worker_on(engine.clone(), fast_worker("v2"));
    let new = engine.start(StartRun::new("ops.change", json!({}))).await.unwrap();
    // The new version has no gate, but the run in flight still waits at its own.
    let alice = dayshift_engine::identity::Caller::token("alice", Role::Operator);
    engine.decide(old.id, &alice, true, None).await.unwrap();
    let old = env.wait(old.id, Duration::from_secs(30)).await;
    let new = env.wait(new.id, Duration::from_secs(30)).await;
    // The run in flight finished on its own steps, none run twice; the new one on the new ones.
    assert_eq!(old.status, RunStatus::Succeeded, "{old:#?}");
    assert_eq!((old.workflow_version, old.output.clone()), (1, Some(json!("v1 last"))));
    let steps: Vec<&str> = old.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["first", "request-approval", "approval", "decision:1", "last"]);
    assert!(old.steps.iter().all(|s| s.attempts == 1), "{:#?}", old.steps);
    assert_eq!(new.status, RunStatus::Succeeded, "{new:#?}");
    assert_eq!((new.workflow_version, new.output.clone()), (2, Some(json!("v2 last"))));
    let kept: Vec<(i32, String)> =
        sqlx::query_as("select version, hash from workflow_definitions where name = 'ops.change' order by version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(kept.iter().map(|k| k.0).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(kept[1].1, v2[0].hash());
    let (_, body) = env.get_text_on(api(&engine), "/api/v1/workflows/ops.change").await;
    let shown: Value = serde_json::from_str(&body).unwrap();
    let runs: Vec<&Value> = shown["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["runs"])
        .collect();
    assert_eq!(runs, [&json!({ "succeeded": 1 }), &json!({ "succeeded": 1 })]);
    env.stop_workers().await;
}

/// `serve` with the workflow file `text` and one notify connection, `ops`, posting to `chat`.
async fn serve_file(text: &str, chat: &WebhookReceiver) -> dayshift_tests::BinEnv {
    let dir = std::env::temp_dir().join(format!("dayshift-workflows-{}", unique()));
    std::fs::create_dir_all(dir.join("wf")).unwrap();
    std::fs::write(dir.join("wf/workflow.yaml"), text).unwrap();
    std::fs::write(dir.join("chat-url"), &chat.url).unwrap();
    dayshift_tests::BinEnv::start_with(&format!(
        "workflows:\n  dirs: [{}]\nconnections:\n  notify:\n    ops: {{ url: {{ file: {} }} }}\n",
        dir.join("wf").display(),
        dir.join("chat-url").display()
    ))
    .await
}

/// Three notices, each a step; the text says which step of which run sent it.
const THREE_NOTICES: &str = r#"
name: ops.three-notices
input:
  tag: { type: string }
steps:
  - { id: one, action: notify, with: { connection: ops, text: "one ${{ input.tag }}" } }
  - { id: two, action: notify, with: { connection: ops, text: "two ${{ input.tag }}" } }
  - { id: three, action: notify, with: { connection: ops, text: "three ${{ input.tag }}" } }
output: ${{ steps.one.sent && steps.two.sent && steps.three.sent }}
"#;

#[tokio::test]
async fn a_worker_killed_at_each_step_boundary_of_a_workflow_file_runs_no_completed_step_again() {
    let chat = WebhookReceiver::start().await;
    let env = serve_file(THREE_NOTICES, &chat).await;
    let limit = Duration::from_secs(60);
    for step in ["one", "two", "three"] {
        let (run, _) = env
            .run_killed_after(step, "ops.three-notices", json!({ "tag": step }), limit)
            .await;
        assert_eq!(run["status"], "succeeded", "killed after {step}: {run:#}");
        assert_eq!(run["output"], json!(true));
    }
    // Each step of each run posted its notice exactly once.
    let mut texts: Vec<String> = chat
        .wait_for(9, limit)
        .await
        .iter()
        .map(|n| n["text"].as_str().unwrap().to_string())
        .collect();
    texts.sort();
    let mut expected: Vec<String> = ["one", "two", "three"]
        .iter()
        .flat_map(|run| ["one", "two", "three"].map(|s| format!("{s} {run}")))
        .collect();
    expected.sort();
    assert_eq!(texts, expected);
}

#[test]
fn every_shipped_example_workflow_compiles() {
    let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/workflows"));
    let names = BTreeMap::from([("notify".to_string(), ["ops".to_string()].into())]);
    let defs = declarative::load(&[dir], std::path::Path::new("/"), &names, &dayshift_workflows::BUILT_IN)
        .unwrap_or_else(|problems| panic!("{}", problems.join("\n")));
    assert!(defs.iter().any(|d| d.name() == "notice.maintenance"), "{defs:?}");
    assert!(defs.iter().any(|d| d.name() == "secrets.force-sync"), "{defs:?}");
}

/// Every kind of step but an action alone: a fan-out, a child run of another file, a wait for a
/// signal and an approval gate.
const PARENT: &str = r#"
name: ops.parent
input:
  hosts: { type: list }
steps:
  - id: each
    for_each: ${{ input.hosts }}
    max-in-flight: 2
    action: log
    with: { message: "drained ${{ item }}" }
  - id: child
    workflow: ops.child
    with: { count: "${{ steps.each.size() }}" }
  - id: go
    wait: go
    timeout: 1m
  - id: approve
    approval: { approvers: ["token:alice"], timeout: 1h }
output:
  drained: ${{ steps.each.map(m, m.message) }}
  child: ${{ steps.child }}
  go: ${{ steps.go }}
  by: ${{ steps.approve.approved_by }}
"#;
const CHILD: &str = r#"
name: ops.child
input:
  count: { type: integer }
steps:
  - { id: say, action: log, with: { message: "${{ input.count }} hosts drained" } }
output: ${{ steps.say.message }}
"#;

#[tokio::test]
async fn a_workflow_file_fans_out_starts_a_child_run_and_waits_for_a_signal_and_an_approval() {
    let chat = WebhookReceiver::start().await;
    let (defs, conns) = load(&[("parent.yaml", PARENT), ("child.yaml", CHILD)], &chat);
    let mut env = TestEnv::new(registered(&defs, &conns)).await;
    env.start_worker(fast_worker("parent"));
    let run = env
        .engine
        .start(StartRun::new("ops.parent", json!({ "hosts": ["a", "b", "c"] })))
        .await
        .unwrap();
    let limit = Duration::from_secs(30);
    dayshift_tests::wait_for(&env.engine, run.id, limit, |r| r.steps.iter().any(|s| s.name == "go")).await;
    env.engine
        .signal(run.id, "go", json!({ "ticket": "OPS-7" }), "token:bob")
        .await
        .unwrap();
    dayshift_tests::wait_for(&env.engine, run.id, limit, |r| {
        r.steps.iter().any(|s| s.name == "request-approval")
    })
    .await;
    // Who started the run may not approve it; the gate's approver may.
    let alice = dayshift_engine::identity::Caller::token("alice", Role::Operator);
    env.engine.decide(run.id, &alice, true, None).await.unwrap();
    let done = env.wait(run.id, limit).await;
    assert_succeeded(&done);
    assert_eq!(
        done.output,
        Some(json!({
            "drained": ["drained a", "drained b", "drained c"],
            "child": "3 hosts drained",
            "go": { "received": true, "payload": { "ticket": "OPS-7" } },
            "by": ["token:alice"],
        }))
    );
    let steps: Vec<&str> = done.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        steps,
        [
            "each[0]",
            "each[1]",
            "each[2]",
            "child",
            "go",
            "request-approval",
            "approval",
            "decision:1"
        ]
    );
    // The child is a run of its own, started by this one.
    let children: i64 = sqlx::query_scalar("select count(*) from runs where workflow = 'ops.child'")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(children, 1);
    env.stop_workers().await;
}

#[tokio::test]
async fn a_wait_that_times_out_says_so_and_the_run_goes_on() {
    let chat = WebhookReceiver::start().await;
    let text = "name: ops.timeout\nsteps:\n  - { id: go, wait: go, timeout: 200ms }\n  - { id: after, action: log, with: { message: \"received: ${{ steps.go.received }}\" } }\noutput: ${{ steps.after.message }}\n";
    let (defs, conns) = load(&[("t.yaml", text)], &chat);
    let mut env = TestEnv::new(registered(&defs, &conns)).await;
    env.start_worker(fast_worker("timeout"));
    let run = env.engine.start(StartRun::new("ops.timeout", json!({}))).await.unwrap();
    let done = env.wait(run.id, Duration::from_secs(30)).await;
    assert_succeeded(&done);
    assert_eq!(done.output, Some(json!("received: false")));
    // A signal the engine owns cannot be waited for by a file.
    let bad = "name: ops.bad\nsteps:\n  - { id: go, wait: approval, timeout: 1s }\n";
    let problems = Definition::compile("bad.yaml", bad, &BTreeMap::new()).unwrap_err();
    assert!(problems[0].starts_with("bad.yaml:3:21: steps[0].wait:"), "{problems:?}");
    env.stop_workers().await;
}

/// The registry `serve` builds: the built-in workflows and `defs`.
fn registry_with(defs: &[Arc<Definition>]) -> dayshift_engine::Registry {
    let pool = sqlx::PgPool::connect_lazy("postgres://localhost/unused").unwrap();
    let mut registry = dayshift_engine::Registry::default();
    for w in dayshift_workflows::all(pool) {
        registry.register(w);
    }
    let conns = Arc::new(Connections::default());
    for w in registered(defs, &conns) {
        registry.register(w);
    }
    registry
}

#[tokio::test]
async fn a_child_run_takes_a_guarded_input_only_from_the_file_or_from_a_guarded_input() {
    // restore.postgres guards `target` (the database overwritten): an API caller's free text may not
    // choose it through a workflow file, a connection input (under the policy) or the file may.
    let text = r#"
name: ops.dump
input:
  store: { type: connection, connection: notify }
  where: { type: string, default: x }
steps:
  - id: from_caller
    workflow: restore.postgres
    with: { store: backups, target: "${{ input.where }}" }
  - id: built
    workflow: restore.postgres
    with: { store: backups, target: "s3-${{ input.store }}" }
  - id: passed_on
    workflow: restore.postgres
    with: { store: backups, target: "${{ input.store }}" }
  - id: written
    workflow: restore.postgres
    with: { store: backups, target: seaweed }
  - id: unknown
    workflow: backup.mysql
  - id: again
    workflow: ops.dump
"#;
    let chat = WebhookReceiver::start().await;
    let (defs, _) = load(&[("dump.yaml", text)], &chat);
    let problems = declarative::check_children(&defs, &registry_with(&defs));
    let path = defs[0].path().to_string();
    let expect = [
        ("9:37: steps[0].with.target", "restore.postgres guards `target`"),
        ("12:37: steps[1].with.target", "restore.postgres guards `target`"),
        ("20:15: steps[4].workflow", "no workflow \"backup.mysql\""),
        ("22:15: steps[5].workflow", "ops.dump starts ops.dump again"),
    ];
    assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    for (at, what) in expect {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("{path}:{at}")) && p.contains(what)),
            "no {at}: {what} in {problems:#?}"
        );
    }
}

/// 500 notices, 50 at a time, each one a branch of one step.
const FAN_OUT: &str = r#"
name: ops.fan-out
input:
  items: { type: list }
steps:
  - id: fan
    for_each: ${{ input.items }}
    max-in-flight: 50
    action: notify
    with: { connection: ops, text: "branch ${{ item }}" }
output: ${{ steps.fan.size() }}
"#;

#[tokio::test]
async fn a_for_each_of_500_branches_survives_a_worker_kill_and_runs_no_journaled_branch_again() {
    let chat = WebhookReceiver::start().await;
    let env = serve_file(FAN_OUT, &chat).await;
    let limit = Duration::from_secs(120);
    // The worker freezes when branch 250 is journaled and is SIGKILLed there.
    let mut first = env
        .spawn_with_env(&["worker"], "worker ", &[("DAYSHIFT_TEST_STOP_AFTER_STEP", "fan[250]")])
        .await;
    let items: Vec<usize> = (0..500).collect();
    let id = env.start_run("ops.fan-out", json!({ "items": items })).await;
    first.wait_stopped(limit).await;
    first.kill9().await;
    // Each journaled branch with its attempts: what the journal held when the worker died.
    let succeeded = |r: &Value| -> BTreeMap<String, i64> {
        r["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["status"] == "succeeded")
            .map(|s| (s["name"].as_str().unwrap().to_string(), s["attempts"].as_i64().unwrap()))
            .collect()
    };
    let (_, at_kill) = env.get(&format!("/api/v1/runs/{id}")).await;
    let done_before = succeeded(&at_kill);
    assert!(
        done_before.contains_key("fan[250]") && done_before.len() < 500,
        "{} journaled at the kill",
        done_before.len()
    );

    let mut second = env.start_worker().await;
    let run = env.wait_finished(&id, limit).await;
    second.kill9().await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"], json!(500));
    let steps = run["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 500);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["name"], json!(format!("fan[{i}]")), "{s:#}");
    }
    let after = succeeded(&run);
    let mut posted: BTreeMap<String, i64> = BTreeMap::new();
    for n in chat.received() {
        *posted.entry(n["text"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert_eq!(posted.len(), 500, "every branch posted its notice");
    // A branch journaled before the kill never ran again: its journal entry is as it was, and
    // it posted once per attempt it made then (a notice whose answer was lost is retried, and
    // posts again: the action says so). A branch in flight at the kill ran again after it.
    for (name, attempts) in &done_before {
        let i = &name["fan[".len()..name.len() - 1];
        assert_eq!(after[name], *attempts, "{name} ran again after the kill");
        assert_eq!(
            posted[&format!("branch {i}")],
            *attempts,
            "{name} posted more than it tried"
        );
    }
    let again = posted
        .iter()
        .filter(|(text, n)| {
            let name = format!("fan[{}]", &text["branch ".len()..]);
            !done_before.contains_key(&name) && **n > after[&name]
        })
        .count();
    assert!(again <= 50, "{again} branches ran again: more than were in flight");
}

/// A drill: freezes deploys (released by `finally`, whatever happens), scales up (undone on
/// failure), checks, records (undone on failure). Each change is a chat message, `+what` or
/// `-what`, so what is left changed is what the messages add up to.
const DRILL: &str = r#"
name: ops.drill
input:
  tag: { type: string }
steps:
  - id: freeze
    action: notify
    with: { connection: ops, text: "+freeze ${{ input.tag }}" }
  - id: scale
    action: notify
    with: { connection: ops, text: "+scale ${{ input.tag }}" }
    undo:
      action: notify
      retry: { attempts: 3, delay: 100ms }
      with: { connection: ops, text: "-scale ${{ input.tag }}" }
  - id: check
    action: log
    with: { message: healthy }
  - id: record
    action: notify
    with: { connection: ops, text: "+record ${{ input.tag }}" }
    undo: { action: notify, with: { connection: ops, text: "-record ${{ input.tag }}" } }
  - id: hold
    wait: done
    timeout: 100ms
finally:
  - id: thaw
    when: steps.freeze != null
    action: notify
    with: { connection: ops, text: "-freeze ${{ input.tag }}" }
  - id: report
    when: steps.check != null
    action: log
    with: { message: "check said ${{ steps.check.message }}" }
"#;

/// What the chat messages of `chat` leave changed: each `+what` not taken back by a `-what`.
fn left_changed(chat: &WebhookReceiver) -> BTreeMap<String, i32> {
    let mut net: BTreeMap<String, i32> = BTreeMap::new();
    for m in chat.received() {
        let text = m["text"].as_str().unwrap_or_default();
        let (sign, what) = text.split_at(1);
        *net.entry(what.to_string()).or_default() += if sign == "+" { 1 } else { -1 };
    }
    net.retain(|_, n| *n != 0);
    net
}

#[tokio::test]
async fn a_failure_at_each_step_of_a_workflow_file_runs_the_undos_before_it_then_its_finally_steps() {
    let chat = Arc::new(WebhookReceiver::start().await);
    let (defs, conns) = load(&[("drill.yaml", DRILL)], &chat);
    dayshift_tests::saga::Saga::new("ops.drill", |i| json!({ "tag": format!("run{i}") }))
        .finally(["thaw", "report"])
        .failure_at_each_step_compensates(TestEnv::builder(registered(&defs, &conns)), |_| {
            let chat = chat.clone();
            async move { left_changed(&chat) }
        })
        .await;
    // The run that succeeded kept its scale-up and record; its freeze was thawed.
    let left = left_changed(&chat);
    assert_eq!(
        left.keys().map(String::as_str).collect::<Vec<_>>(),
        ["record run0", "scale run0"]
    );
}

#[tokio::test]
async fn a_cancelled_run_of_a_workflow_file_runs_its_undos_then_its_finally_steps() {
    let chat = WebhookReceiver::start().await;
    let text = DRILL.replace("timeout: 100ms", "timeout: 1h");
    let (defs, conns) = load(&[("drill.yaml", &text)], &chat);
    let mut env = TestEnv::new(registered(&defs, &conns)).await;
    env.start_worker(fast_worker("cancel"));
    let run = env
        .engine
        .start(StartRun::new("ops.drill", json!({ "tag": "c" })))
        .await
        .unwrap();
    let limit = Duration::from_secs(30);
    dayshift_tests::wait_for(&env.engine, run.id, limit, |r| r.status == RunStatus::Waiting).await;
    env.engine
        .cancel(run.id, Some("drill over"), "token:ops")
        .await
        .unwrap();
    let done = env.wait(run.id, limit).await;
    assert_eq!(done.status, RunStatus::Cancelled, "{done:#?}");
    let ends: Vec<&str> = done
        .steps
        .iter()
        .filter(|s| s.kind == dayshift_engine::StepKind::Undo)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(ends, ["undo:record", "undo:scale", "finally:thaw", "finally:report"]);
    assert!(left_changed(&chat).is_empty(), "{:?}", chat.received());
    env.stop_workers().await;
}

const NOTE: &str = r#"
name: ops.note
input:
  text: { type: string }
steps:
  - { id: tell, action: notify, with: { connection: ops, text: "${{ input.text }}" } }
"#;

#[tokio::test]
async fn a_schedule_a_webhook_route_and_an_alert_route_each_start_a_workflow_file() {
    let chat = WebhookReceiver::start().await;
    let dir = std::env::temp_dir().join(format!("dayshift-workflows-{}", unique()));
    std::fs::create_dir_all(dir.join("wf")).unwrap();
    std::fs::write(dir.join("wf/note.yaml"), NOTE).unwrap();
    std::fs::write(dir.join("chat-url"), &chat.url).unwrap();
    std::fs::write(dir.join("secret"), "hook secret\n").unwrap();
    std::fs::write(dir.join("token"), "am token\n").unwrap();
    let d = dir.display();
    let env = dayshift_tests::BinEnv::start_with(&format!(
        r#"workflows:
  dirs: [{d}/wf]
connections:
  notify:
    ops: {{ url: {{ file: {d}/chat-url }} }}
schedules:
  - {{ name: every-second, cron: "* * * * * *", workflow: ops.note, input: {{ text: "tick {{{{ schedule }}}}" }} }}
webhooks:
  github: {{ secret: {{ file: {d}/secret }} }}
  routes:
    - {{ name: pushed, forge: github, events: [push], workflow: ops.note, input: {{ text: "push {{{{ sha }}}}" }} }}
alertmanager:
  token: {{ file: {d}/token }}
  routes:
    - name: degraded
      matchers: ['alertname="ArgoCDAppDegraded"']
      workflow: ops.note
      input: {{ text: "alert {{{{ fingerprint }}}}" }}
"#
    ))
    .await;
    let _worker = env.start_worker().await;

    let push = serde_json::to_vec(&json!({
        "ref": "refs/heads/main", "before": "0".repeat(40), "after": "a".repeat(40),
        "repository": { "full_name": "platform/infra" }, "commits": [], "head_commit": null,
        "pusher": { "name": "alice", "email": "alice@platform.example" },
    }))
    .unwrap();
    let sig = format!("sha256={}", dayshift_tests::hmac_sha256_hex("hook secret", &push));
    let resp = env
        .http
        .post(format!("{}/hooks/github", env.api))
        .header("content-type", "application/json")
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", "wf-1")
        .header("X-Hub-Signature-256", sig)
        .body(push)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{:?}", resp.text().await);

    let alert = json!({
        "version": "4", "groupKey": "{}:{alertname=\"ArgoCDAppDegraded\"}", "truncatedAlerts": 0,
        "status": "firing", "receiver": "dayshift", "groupLabels": {}, "commonLabels": {},
        "commonAnnotations": {}, "externalURL": "http://alertmanager.example",
        "alerts": [{
            "status": "firing", "labels": { "alertname": "ArgoCDAppDegraded", "name": "shop" },
            "annotations": {}, "startsAt": "2026-12-03T08:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example/graph", "fingerprint": "00000000000000aa",
        }],
    });
    let resp = env
        .http
        .post(format!("{}/hooks/alertmanager", env.api))
        .bearer_auth("am token")
        .json(&alert)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{:?}", resp.text().await);

    // Each trigger's run of the file posted its notice.
    let limit = Duration::from_secs(60);
    let deadline = tokio::time::Instant::now() + limit;
    let expect = [
        "tick every-second".to_string(),
        format!("push {}", "a".repeat(40)),
        "alert 00000000000000aa".into(),
    ];
    loop {
        let texts: Vec<String> = chat
            .received()
            .iter()
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
            .collect();
        if expect.iter().all(|e| texts.contains(e)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {texts:?}");
        chat.wait_for(texts.len() + 1, limit).await;
    }
    let started_by: Vec<String> = sqlx::query_scalar(
        "select distinct split_part(started_by, ':', 1) from runs where workflow = 'ops.note' order by 1",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        started_by,
        ["alertmanager", "schedule", "webhook"],
        "who started the runs"
    );
}

/// ExternalSecret force-sync, the workflow-file way: read it, annotate it, restart its
/// consumers, scale one of them.
const FORCE_SYNC: &str = r#"
name: secrets.force-sync
input:
  namespace: { type: string, guarded: true }
  secret: { type: string, guarded: true }
  consumers: { type: list, guarded: true }
  stamp: { type: string }
steps:
  - id: before
    action: kubernetes.get
    with:
      api-version: external-secrets.io/v1beta1
      kind: ExternalSecret
      namespace: ${{ input.namespace }}
      name: ${{ input.secret }}
      field: spec.target.name
  - id: sync
    action: kubernetes.annotate
    with:
      api-version: external-secrets.io/v1beta1
      kind: ExternalSecret
      namespace: ${{ input.namespace }}
      name: ${{ input.secret }}
      annotations: { force-sync: "${{ input.stamp }}" }
  - id: restart
    for_each: ${{ input.consumers }}
    action: kubernetes.restart
    with: { namespace: "${{ input.namespace }}", name: "${{ item }}" }
  - id: scale
    action: kubernetes.scale
    with: { namespace: "${{ input.namespace }}", name: "${{ input.consumers[0] }}", replicas: 3 }
    undo:
      action: kubernetes.scale
      with: { namespace: "${{ input.namespace }}", name: "${{ input.consumers[0] }}", replicas: "${{ steps.scale.previous }}" }
output:
  target: ${{ steps.before.value }}
  annotations: ${{ steps.sync.annotations }}
  previous: ${{ steps.scale.previous }}
"#;

fn kube_objects(kube: &dayshift_tests::kube_api::KubeApi) {
    kube.put(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": { "name": "externalsecrets.external-secrets.io" },
        "spec": { "group": "external-secrets.io", "scope": "Namespaced",
                  "names": { "kind": "ExternalSecret", "plural": "externalsecrets" },
                  "versions": [{ "name": "v1beta1", "served": true, "storage": true }] },
    }));
    kube.put(json!({
        "apiVersion": "external-secrets.io/v1beta1", "kind": "ExternalSecret",
        "metadata": { "name": "shop-db", "namespace": "shop" },
        "spec": { "target": { "name": "shop-db-credentials" } },
    }));
    for name in ["web", "worker"] {
        kube.put(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": name, "namespace": "shop" },
            "spec": { "replicas": 1, "selector": { "matchLabels": { "app": name } },
                      "template": { "metadata": { "labels": { "app": name } }, "spec": { "containers": [] } } },
        }));
    }
}

#[tokio::test]
async fn a_workflow_file_reads_annotates_restarts_and_scales_kubernetes_objects() {
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    kube_objects(&kube);
    let chat = WebhookReceiver::start().await;
    let (defs, _) = load(&[("force-sync.yaml", FORCE_SYNC)], &chat);
    let conns = kube.connections();
    let workflows = registered(&defs, &Arc::new(conns));
    // Its guarded inputs are under the policy for API callers: a namespace it does not list,
    // or a consumer outside the list, is refused.
    let guards: Vec<&str> = workflows[0].guards().collect();
    assert_eq!(guards, ["consumers[]", "namespace", "secret"]);
    let guards: Vec<dayshift_engine::Guard> = guards
        .iter()
        .map(|g| dayshift_engine::Guard {
            path: g.to_string(),
            exact: false,
        })
        .collect();
    let allow = |k: &str, v: &[&str]| (k.to_string(), v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let policy = Policy {
        rules: vec![
            Rule::new(
                "secrets.*",
                None,
                [
                    allow("namespace", &["shop"]),
                    allow("secret", &["shop-*"]),
                    allow("consumers[]", &["web", "worker"]),
                ]
                .into_iter()
                .collect(),
            )
            .unwrap(),
        ],
    };
    let check = |input: Value| policy.check_input("secrets.force-sync", &guards, &input);
    let ok = json!({ "namespace": "shop", "secret": "shop-db", "consumers": ["web", "worker"], "stamp": "s" });
    assert!(check(ok).is_ok());
    let other_ns = json!({ "namespace": "kube-system", "secret": "shop-db", "consumers": ["web"], "stamp": "s" });
    assert!(check(other_ns).unwrap_err().to_string().contains("namespace"));
    let other_consumer =
        json!({ "namespace": "shop", "secret": "shop-db", "consumers": ["web", "coredns"], "stamp": "s" });
    assert!(check(other_consumer).unwrap_err().to_string().contains("consumers"));

    let mut env = TestEnv::new(workflows).await;
    env.start_worker(fast_worker("kube"));
    let input = json!({ "namespace": "shop", "secret": "shop-db", "consumers": ["web", "worker"], "stamp": "s-1" });
    let run = env
        .run_within("secrets.force-sync", input, Duration::from_secs(30))
        .await;
    assert_succeeded(&run);
    assert_eq!(
        run.output,
        Some(json!({
            "target": "shop-db-credentials",
            "annotations": { "force-sync": "s-1" },
            "previous": 1,
        }))
    );
    let es = kube
        .get("/apis/external-secrets.io/v1beta1/namespaces/shop/externalsecrets/shop-db")
        .unwrap();
    assert_eq!(es["metadata"]["annotations"]["force-sync"], "s-1");
    for (name, replicas) in [("web", 3), ("worker", 1)] {
        let d = kube
            .get(&format!("/apis/apps/v1/namespaces/shop/deployments/{name}"))
            .unwrap();
        let stamp = &d["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"];
        // Stamped with the run and the branch: a repeat of the step stamps the same value.
        assert!(
            stamp
                .as_str()
                .is_some_and(|s| s.starts_with("dayshift ") && s.contains("/restart[")),
            "{d:#}"
        );
        assert_eq!(d["spec"]["replicas"], replicas, "{d:#}");
    }
    env.stop_workers().await;
}

#[test]
fn an_action_target_read_from_an_input_that_is_not_guarded_is_refused_when_the_file_is_loaded() {
    let text = FORCE_SYNC
        .replace(
            "namespace: { type: string, guarded: true }",
            "namespace: { type: string }",
        )
        .replace("consumers: { type: list, guarded: true }", "consumers: { type: list }");
    let problems = Definition::compile("fs.yaml", &text, &BTreeMap::new()).unwrap_err();
    let at = |line: usize, key: &str| {
        problems
            .iter()
            .any(|p| p.starts_with(&format!("fs.yaml:{line}:")) && p.contains(key) && p.contains("guarded"))
    };
    // The namespace of every step, and the consumers restarted (through `item`) and scaled.
    assert!(at(14, "steps[0].with.namespace"), "{problems:#?}");
    assert!(at(22, "steps[1].with.namespace"), "{problems:#?}");
    assert!(at(28, "steps[2].with.name"), "{problems:#?}");
    assert!(at(31, "steps[3].with.name"), "{problems:#?}");
    assert!(at(34, "steps[3].undo.with.name"), "{problems:#?}");
    // A free-text input that chooses nothing (the stamp) needs no guard.
    assert!(!problems.iter().any(|p| p.contains("stamp")), "{problems:#?}");
}

/// A cleanup: the ConfigMaps of one app, listed by label, each deleted.
const CLEANUP: &str = r#"
name: ops.cleanup
input:
  app: { type: string }
steps:
  - id: found
    action: kubernetes.list
    with: { api-version: v1, kind: ConfigMap, namespace: shop, labels: "app=${{ input.app }}" }
  - id: delete
    for_each: ${{ steps.found.names }}
    action: kubernetes.delete
    with: { api-version: v1, kind: ConfigMap, namespace: shop, name: "${{ item }}" }
  - id: uncordon
    action: kubernetes.patch
    with: { api-version: v1, kind: Node, name: node-1, patch: { spec: { unschedulable: null } } }
output:
  deleted: ${{ steps.delete.map(d, d.deleted) }}
  unschedulable: ${{ has(steps.uncordon.object.spec.unschedulable) }}
"#;

#[tokio::test]
async fn a_workflow_file_lists_objects_by_label_deletes_each_once_and_patches_a_node() {
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    for (name, app) in [("web-a", "web"), ("web-b", "web"), ("db-a", "db")] {
        kube.put(json!({ "apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": { "name": name, "namespace": "shop", "labels": { "app": app } } }));
    }
    kube.put(
        json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node-1" },
                     "spec": { "unschedulable": true } }),
    );
    let chat = WebhookReceiver::start().await;
    let (defs, _) = load(&[("cleanup.yaml", CLEANUP)], &chat);
    let conns = kube.connections();
    let mut env = TestEnv::new(registered(&defs, &Arc::new(conns))).await;
    env.start_worker(fast_worker("cleanup"));
    // The app label comes from the caller, but it only selects within the namespace the file
    // names: it needs no guard (a selector is not a target).
    let run = env
        .run_within("ops.cleanup", json!({ "app": "web" }), Duration::from_secs(30))
        .await;
    assert_succeeded(&run);
    assert_eq!(
        run.output,
        Some(json!({ "deleted": [true, true], "unschedulable": false }))
    );
    assert!(kube.get("/api/v1/nodes/node-1").unwrap()["spec"]["unschedulable"].is_null());
    assert!(kube.get("/api/v1/namespaces/shop/configmaps/web-a").is_none());
    assert!(kube.get("/api/v1/namespaces/shop/configmaps/web-b").is_none());
    assert!(kube.get("/api/v1/namespaces/shop/configmaps/db-a").is_some());
    env.stop_workers().await;
}

/// A change behind an approval: a read, a check, the gate, a scale, a notice, a final log.
const PLANNED: &str = r#"
name: ops.planned
input:
  namespace: { type: string, guarded: true }
  replicas: { type: integer, default: 3 }
steps:
  - id: web
    action: kubernetes.get
    with: { api-version: apps/v1, kind: Deployment, namespace: "${{ input.namespace }}", name: web, field: spec.replicas }
  - id: exists
    action: assert
    with: { that: "${{ steps.web.found }}", message: "there is a Deployment web" }
  - { id: gate, approval: { approvers: ["token:alice"], timeout: 1h } }
  - id: scale
    action: kubernetes.scale
    with: { namespace: "${{ input.namespace }}", name: web, replicas: "${{ input.replicas }}" }
  - id: tell
    action: notify
    with: { connection: ops, text: "web was at ${{ steps.web.value }}, now ${{ steps.scale.replicas }}" }
finally:
  - { id: note, action: log, with: { message: "scaled ${{ input.namespace }}/web" } }
"#;

#[tokio::test]
async fn a_plan_run_reads_says_what_each_step_would_do_and_changes_nothing_and_an_approval_shows_the_plan() {
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    kube.put(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "web", "namespace": "shop" },
        "spec": { "replicas": 1, "selector": { "matchLabels": { "app": "web" } },
                  "template": { "metadata": { "labels": { "app": "web" } }, "spec": { "containers": [] } } },
    }));
    let chat = WebhookReceiver::start().await;
    let (defs, _) = load(&[("planned.yaml", PLANNED)], &chat);
    let mut conns = kube.connections();
    conns.notify.insert("ops".into(), chat.url.clone());
    let mut workflows = registered(&defs, &Arc::new(conns));
    workflows.push(dayshift_workflows::gate());
    let mut env = TestEnv::new(workflows).await;
    env.start_worker(fast_worker("plan"));
    let limit = Duration::from_secs(30);

    let mut start = StartRun::new("ops.planned", json!({ "namespace": "shop" }));
    start.plan = true;
    let run = env.engine.start(start).await.unwrap();
    let run = env.wait(run.id, limit).await;
    assert_succeeded(&run);
    assert_eq!(run.input, json!({ "namespace": "shop", "$plan": true }));
    let plan = &run.output.as_ref().unwrap()["plan"];
    assert_eq!(
        plan,
        &json!([
            { "step": "web", "action": "kubernetes.get", "read": "read Deployment shop/web" },
            { "step": "exists", "action": "assert", "held": true,
              "with": { "that": true, "message": "there is a Deployment web" } },
            { "step": "gate", "would": "wait up to 1h for 1 approval(s) from token:alice" },
            { "step": "scale", "action": "kubernetes.scale", "would": "scale Deployment shop/web to 3 replicas",
              "with": { "namespace": "shop", "name": "web", "replicas": 3 } },
            { "step": "tell", "action": "notify",
              "depends": "depends on what an earlier step does (`steps.scale.replicas` failed: No such key: replicas)" },
            { "step": "note", "finally": true, "action": "log", "would": "record \"scaled shop/web\"",
              "with": { "message": "scaled shop/web" } },
        ]),
        "{plan:#}"
    );
    // Only the read was made; no notice, no approval asked, nothing written.
    assert!(kube.writes().is_empty(), "{:#?}", kube.writes());
    assert!(chat.received().is_empty());
    assert!(!run.steps.iter().any(|s| s.name == "request-approval"), "{run:#?}");

    // A built-in has no plan mode: refused, and no run is made.
    let runs_before = dayshift_tests::active_runs(&env.db.pool).await;
    let mut start = StartRun::new("selftest.gate", json!({ "signal": "go", "timeout_ms": 1000 }));
    start.plan = true;
    let refused = env.engine.start(start).await.unwrap_err().to_string();
    assert!(refused.contains("has no plan mode"), "{refused}");
    let sneaked = env
        .engine
        .start(StartRun::new(
            "selftest.gate",
            json!({ "signal": "go", "timeout_ms": 1000, "$plan": true }),
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(sneaked.contains("may not have \"$plan\""), "{sneaked}");
    assert_eq!(dayshift_tests::active_runs(&env.db.pool).await, runs_before);

    // A real run waits at its gate, and the approvers see what it will do once approved.
    let real = env
        .engine
        .start(StartRun::new("ops.planned", json!({ "namespace": "shop" })))
        .await
        .unwrap();
    dayshift_tests::wait_for(&env.engine, real.id, limit, |r| r.status == RunStatus::Waiting).await;
    let alice = dayshift_engine::identity::Caller::token("alice", Role::Operator);
    let shown = dayshift_engine::api::views::approvals(&env.engine, &alice)
        .await
        .unwrap();
    assert_eq!(shown.len(), 1, "{shown:#?}");
    assert_eq!(shown[0]["about_kind"], "plan");
    let would: Vec<&str> = shown[0]["about"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["would"].as_str().unwrap_or("(depends)"))
        .collect();
    assert_eq!(
        would,
        [
            "scale Deployment shop/web to 3 replicas",
            "(depends)",
            "record \"scaled shop/web\""
        ]
    );
    assert!(kube.writes().is_empty(), "{:#?}", kube.writes());
    env.engine.decide(real.id, &alice, true, None).await.unwrap();
    let done = env.wait(real.id, limit).await;
    assert_succeeded(&done);
    assert_eq!(chat.received()[0]["text"], "web was at 1, now 3");
    env.stop_workers().await;
}

/// An IdP's admin API, as a client secret rotation calls it: find the client, make it a new
/// secret (the answer holds it), and say so without it.
const ROTATE_CLIENT: &str = r#"
name: idp.rotate-client-secret
input:
  client: { type: string, guarded: true }
steps:
  - id: found
    action: http.request
    with: { connection: idp, path: clients, query: { clientId: "${{ input.client }}" } }
  - id: exists
    action: assert
    with: { that: "${{ size(steps.found.json) == 1 }}", message: "no client ${{ input.client }}" }
  - id: rotate
    sensitive: true
    action: http.request
    with: { connection: idp, method: POST, path: "clients/${{ steps.found.json[0].id }}/client-secret", expect: [200] }
  - id: tell
    action: log
    with: { message: "rotated ${{ input.client }}: ${{ steps.rotate.json.type }}" }
output: ${{ steps.tell.message }}
"#;

#[tokio::test]
async fn http_request_calls_only_the_api_the_config_names_with_its_credentials_and_keeps_a_sensitive_answer_out_of_the_journal()
 {
    use axum::routing::{get, post};
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    let authorized = move |headers: &axum::http::HeaderMap, what: &str| {
        log.lock().unwrap().push(what.to_string());
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer idp-admin-token")
    };
    let (a, b) = (authorized.clone(), authorized);
    let app = axum::Router::new()
        .route(
            "/admin/realms/platform/clients",
            get(
                move |headers: axum::http::HeaderMap, q: axum::extract::Query<BTreeMap<String, String>>| async move {
                    if !a(&headers, &format!("GET clients {:?}", q.get("clientId"))) {
                        return (
                            axum::http::StatusCode::UNAUTHORIZED,
                            axum::Json(json!({ "error": "HTTP 401" })),
                        );
                    }
                    let found: Vec<Value> = match q.get("clientId").map(String::as_str) {
                        Some("grafana") => vec![json!({ "id": "c-42", "clientId": "grafana" })],
                        _ => vec![],
                    };
                    (axum::http::StatusCode::OK, axum::Json(Value::Array(found)))
                },
            ),
        )
        .route(
            "/admin/realms/platform/clients/{id}/client-secret",
            post(
                move |headers: axum::http::HeaderMap, axum::extract::Path(id): axum::extract::Path<String>| async move {
                    if !b(&headers, &format!("POST secret {id}")) {
                        return (
                            axum::http::StatusCode::UNAUTHORIZED,
                            axum::Json(json!({ "error": "HTTP 401" })),
                        );
                    }
                    (
                        axum::http::StatusCode::OK,
                        axum::Json(json!({ "type": "secret", "value": "brand-new-secret-7f3a" })),
                    )
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/admin/realms/platform", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = std::env::temp_dir().join(format!("dayshift-idp-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "idp-admin-token\n").unwrap();
    let config: dayshift_workflows::ConnectionsConfig = serde_saphyr::from_str(&format!(
        "http:\n  idp: {{ url: \"{base}\", token: {{ file: {} }} }}\n",
        dir.join("token").display()
    ))
    .unwrap();
    let read = |src: &dayshift_workflows::SecretSource, key: &str| match &src.file {
        Some(f) => std::fs::read(f).map_err(|e| dayshift_workflows::InvalidConfig::new(key, e.to_string())),
        None => Err(dayshift_workflows::InvalidConfig::new(key, "file only here")),
    };
    let conns = config.resolve(dayshift_workflows::SecretReader::new(&read)).unwrap();
    let names = config.names();
    let text = |t: &str| Arc::new(Definition::compile("rotate.yaml", t, &names).unwrap_or_else(|p| panic!("{p:#?}")));
    let hostile = ROTATE_CLIENT
        .replace("name: idp.rotate-client-secret", "name: idp.hostile")
        .replace(
            "path: clients, query:",
            "path: clients, headers: { Authorization: Bearer stolen }, query:",
        );
    let escape = ROTATE_CLIENT
        .replace("name: idp.rotate-client-secret", "name: idp.escape")
        .replace("path: clients, query:", "path: \"../master/clients\", query:");
    let (conns, names) = (Arc::new(conns), Arc::new(names.clone()));
    let defs: Vec<_> = [ROTATE_CLIENT, &hostile, &escape]
        .into_iter()
        .map(|t| text(t).workflow(conns.clone(), names.clone(), None))
        .collect();
    let mut env = TestEnv::new(defs).await;
    env.start_worker(fast_worker("idp"));
    let limit = Duration::from_secs(30);

    let run = env
        .run_within("idp.rotate-client-secret", json!({ "client": "grafana" }), limit)
        .await;
    assert_succeeded(&run);
    assert_eq!(run.output, Some(json!("rotated grafana: secret")));
    assert_eq!(
        *seen.lock().unwrap(),
        ["GET clients Some(\"grafana\")", "POST secret c-42"]
    );
    // The new secret and the connection's token are nowhere in what the run kept.
    let kept: String = sqlx::query_scalar("select coalesce(string_agg(coalesce(output::text, '') || coalesce(error, ''), ' '), '') from steps where run_id = $1")
        .bind(run.id.0)
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert!(!kept.contains("brand-new-secret"), "{kept}");
    assert!(
        !kept.contains("idp-admin-token") && !format!("{run:?}").contains("idp-admin-token"),
        "{kept}"
    );
    assert!(run.steps.iter().any(|s| s.name == "rotate" && s.sensitive), "{run:#?}");

    // A step cannot replace the connection's credentials, nor leave its URL: refused before
    // any request is sent.
    seen.lock().unwrap().clear();
    for (workflow, why) in [
        ("idp.hostile", "header \"Authorization\" is not one a step may set"),
        ("idp.escape", "may not leave the connection's URL"),
    ] {
        let refused = env.run_within(workflow, json!({ "client": "grafana" }), limit).await;
        assert_eq!(refused.status, RunStatus::Failed, "{refused:#?}");
        assert!(
            refused.error.as_deref().is_some_and(|e| e.contains(why)),
            "{refused:#?}"
        );
    }
    assert!(seen.lock().unwrap().is_empty(), "{:?}", seen.lock().unwrap());
    env.stop_workers().await;
}

/// A KV v2 mount of its own on the shared OpenBao, holding `shop/db` with user `shop` and
/// `password`; its name.
async fn kv_mount_with_shop_db(bao: &dayshift_tests::OpenBao, password: &str) -> String {
    let mount = format!("kv-{}", unique());
    bao.bao(&["secrets", "enable", &format!("-path={mount}"), "kv-v2"])
        .await
        .unwrap();
    let password = format!("password={password}");
    bao.bao(&[
        "kv",
        "put",
        &format!("-mount={mount}"),
        "shop/db",
        "username=shop",
        &password,
    ])
    .await
    .unwrap();
    mount
}

/// The connection to `bao` with its root token.
fn vault_of(bao: &dayshift_tests::OpenBao) -> dayshift_workflows::adapters::vault::VaultConfig {
    dayshift_workflows::adapters::vault::VaultConfig::with_token(bao.addr.clone(), bao.token.clone())
}

/// A password bump: read the entry (sensitive), write the next version with check-and-set,
/// count what a database holds, read the keys back without their values.
const BUMP: &str = r#"
name: secrets.bump
input:
  mount: { type: string, guarded: true }
  stamp: { type: string }
steps:
  - id: current
    action: vault.kv-read
    sensitive: true
    with: { connection: bao, mount: "${{ input.mount }}", path: shop/db }
  - id: write
    action: vault.kv-write
    with:
      connection: bao
      mount: ${{ input.mount }}
      path: shop/db
      cas: ${{ steps.current.version }}
      data: { username: "${{ steps.current.data.username }}", password: "rotated-${{ input.stamp }}" }
  - id: orders
    action: postgres.query
    with: { connection: app, sql: "select count(*)::int as n, max(item) as item from orders where id > $1", params: [0] }
  - id: keys
    action: vault.kv-read
    with: { connection: bao, mount: "${{ input.mount }}", path: shop/db, values: false }
output: { version: "${{ steps.write.version }}", keys: "${{ steps.keys.keys }}", orders: "${{ steps.orders.rows[0] }}" }
"#;

#[tokio::test]
async fn vault_kv_and_postgres_query_read_and_write_only_what_they_say_and_keep_secrets_out_of_the_journal() {
    let bao = dayshift_tests::OpenBao::shared();
    let mount = kv_mount_with_shop_db(&bao, "old-pw-3c9d").await;
    let db = dayshift_tests::TestDb::new().await;
    for sql in [
        "create table orders (id int primary key, item text)",
        "insert into orders values (1, 'kettle')",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    let mut conns = Connections::default();
    conns.vault.insert("bao".into(), vault_of(&bao));
    conns.postgres.insert("app".into(), db.url.clone());
    let names = BTreeMap::from([
        ("vault".to_string(), ["bao".to_string()].into()),
        ("postgres".to_string(), ["app".to_string()].into()),
    ]);
    let (conns, names_arc) = (Arc::new(conns), Arc::new(names.clone()));
    let compile = |text: &str| {
        Arc::new(Definition::compile("bump.yaml", text, &names).unwrap_or_else(|p| panic!("{p:#?}"))).workflow(
            conns.clone(),
            names_arc.clone(),
            None,
        )
    };
    let stale = BUMP
        .replace("name: secrets.bump", "name: secrets.stale")
        .replace("cas: ${{ steps.current.version }}", "cas: 1");
    let writes = BUMP.replace("name: secrets.bump", "name: secrets.sneaky").replace(
        "select count(*)::int as n, max(item) as item from orders where id > $1",
        "delete from orders where id > $1 returning id",
    );
    let mut env = TestEnv::new(vec![compile(BUMP), compile(&stale), compile(&writes)]).await;
    env.start_worker(fast_worker("bump"));
    let limit = Duration::from_secs(30);
    let input = json!({ "mount": mount, "stamp": "5e1f" });

    let run = env.run_within("secrets.bump", input.clone(), limit).await;
    assert_succeeded(&run);
    assert_eq!(
        run.output,
        Some(json!({ "version": 2, "keys": ["password", "username"], "orders": { "n": 1, "item": "kettle" } }))
    );
    let now = bao
        .bao(&["kv", "get", "-format=json", &format!("-mount={mount}"), "shop/db"])
        .await
        .unwrap();
    let now: Value = serde_json::from_str(&now).unwrap();
    assert_eq!(
        now["data"]["data"],
        json!({ "username": "shop", "password": "rotated-5e1f" })
    );
    // Neither the old password nor the new one is in what the run kept.
    let kept: String = sqlx::query_scalar(
        "select coalesce(string_agg(coalesce(output::text, '') || coalesce(error, ''), ' '), '') from steps where run_id = $1",
    )
    .bind(run.id.0)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert!(
        !kept.contains("old-pw-3c9d") && !kept.contains("rotated-5e1f"),
        "{kept}"
    );

    // Written by someone else in between (a stale cas): refused, nothing written.
    let refused = env
        .run_within("secrets.stale", json!({ "mount": mount, "stamp": "9a0b" }), limit)
        .await;
    assert_eq!(refused.status, RunStatus::Failed, "{refused:#?}");
    assert!(
        refused
            .error
            .as_deref()
            .is_some_and(|e| e.contains("another writer changed it first")),
        "{refused:#?}"
    );
    let after = bao
        .bao(&["kv", "get", "-format=json", &format!("-mount={mount}"), "shop/db"])
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&after).unwrap()["data"]["metadata"]["version"],
        2
    );

    // A query that would write is refused by the server; the table is as it was.
    let refused = env.run_within("secrets.sneaky", input, limit).await;
    assert_eq!(refused.status, RunStatus::Failed, "{refused:#?}");
    assert!(
        refused.error.as_deref().is_some_and(|e| e.contains("SQLSTATE")),
        "{refused:#?}"
    );
    let n: i64 = sqlx::query_scalar("select count(*) from orders")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);

    // Reading the values without `sensitive: true` is refused when the file is loaded.
    let open = BUMP.replace("    sensitive: true\n", "");
    let problems = Definition::compile("bump.yaml", &open, &names).unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("steps[0].sensitive: vault.kv-read gives secrets")),
        "{problems:#?}"
    );
    env.stop_workers().await;
}

#[test]
fn the_workflow_file_schema_is_current_and_every_shipped_example_and_none_with_a_wrong_parameter_fits_it() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let schema = declarative::file_schema();
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{root}/docs/workflow.schema.json")).unwrap()).unwrap();
    assert!(
        written == schema,
        "docs/workflow.schema.json is out of date: run `dayshift config schema --workflows > docs/workflow.schema.json`"
    );
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(format!("{root}/examples/workflows")).unwrap() {
        let path = entry.unwrap().path();
        let file: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&file)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        checked += 1;
    }
    assert!(checked >= 7, "{checked} examples");
    // What an editor then flags: an action's unknown parameter, one of the wrong type.
    let wrong: Value = serde_saphyr::from_str(
        "name: x\nsteps:\n  - { id: a, action: kubernetes.scale, with: { namespace: shop, name: web, replicas: many, size: 3 } }\n",
    )
    .unwrap();
    let errors: Vec<String> = validator.iter_errors(&wrong).map(|e| e.to_string()).collect();
    assert!(errors.iter().any(|e| e.contains("size")), "{errors:#?}");
    assert!(errors.iter().any(|e| e.contains("many")), "{errors:#?}");
    // And the config schema is what `dayshift config schema` prints.
    let out = std::process::Command::new(dayshift_tests::dayshift_bin())
        .args(["config", "schema"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        std::fs::read_to_string(format!("{root}/docs/config.schema.json")).unwrap(),
        "docs/config.schema.json is out of date: run `dayshift config schema > docs/config.schema.json`"
    );
}

/// One maintenance per database at a time: a second start for the same database is skipped.
const ONE_PER_DATABASE: &str = r#"
name: ops.maintain
input:
  database: { type: string }
  region: { type: string, default: eu }
concurrency: { key: "${{ input.region }}/${{ input.database }}", policy: skip }
steps:
  - { id: hold, wait: done, timeout: 1h }
  - { id: note, action: log, with: { message: "maintained ${{ input.database }}" } }
"#;

#[tokio::test]
async fn a_workflow_file_s_concurrency_key_holds_one_run_per_target_whatever_the_starter_asks() {
    let chat = WebhookReceiver::start().await;
    let (defs, conns) = load(&[("maintain.yaml", ONE_PER_DATABASE)], &chat);
    let mut env = TestEnv::new(registered(&defs, &conns)).await;
    env.start_worker(fast_worker("maintain"));
    let limit = Duration::from_secs(30);
    let first = env
        .engine
        .start(StartRun::new("ops.maintain", json!({ "database": "shop" })))
        .await
        .unwrap();
    dayshift_tests::wait_for(&env.engine, first.id, limit, |r| r.status == RunStatus::Waiting).await;
    // The same database: skipped, even with a key of the caller's own; another one runs.
    let mut second = StartRun::new("ops.maintain", json!({ "database": "shop" }));
    second.concurrency = Some(serde_json::from_value(json!({ "key": "mine", "limit": 5 })).unwrap());
    let second = env.engine.start(second).await.unwrap();
    let other = env
        .engine
        .start(StartRun::new("ops.maintain", json!({ "database": "billing" })))
        .await
        .unwrap();
    let skipped = env.wait(second.id, limit).await;
    assert_eq!(skipped.status, RunStatus::Cancelled, "{skipped:#?}");
    assert_eq!(
        skipped.concurrency_key.as_deref(),
        Some("dayshift:ops.maintain:eu/shop")
    );
    dayshift_tests::wait_for(&env.engine, other.id, limit, |r| r.status == RunStatus::Waiting).await;
    // A plan takes no slot: it is not skipped.
    let mut plan = StartRun::new("ops.maintain", json!({ "database": "shop" }));
    plan.plan = true;
    let plan = env.engine.start(plan).await.unwrap();
    assert_succeeded(&env.wait(plan.id, limit).await);
    for run in [first.id, other.id] {
        env.engine.signal(run, "done", json!({}), "token:test").await.unwrap();
        assert_succeeded(&env.wait(run, limit).await);
    }
    env.stop_workers().await;
}

/// The end of a crashing pod's log, now and from before the crash.
const LOGS: &str = r#"
name: ops.why-crashing
input:
  namespace: { type: string, guarded: true }
steps:
  - id: now
    action: kubernetes.logs
    with: { namespace: "${{ input.namespace }}", labels: app=web, lines: 2 }
  - id: before
    action: kubernetes.logs
    with: { namespace: "${{ input.namespace }}", pod: web-0, previous: true }
output: { pod: "${{ steps.now.pod }}", now: "${{ steps.now.logs }}", before: "${{ steps.before.logs }}" }
"#;

#[tokio::test]
async fn kubernetes_logs_reads_the_end_of_a_pod_s_log_and_its_previous_instance_s() {
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    for name in ["web-1", "web-0"] {
        kube.put(json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": name, "namespace": "shop", "labels": { "app": "web" } },
                         "status": { "phase": "Running" } }));
    }
    kube.set_log(
        "shop",
        "web-0",
        "starting\nlistening on :8080\nGET /health 200\n",
        "starting\npanic: no DATABASE_URL\n",
    );
    let chat = WebhookReceiver::start().await;
    let (defs, _) = load(&[("logs.yaml", LOGS)], &chat);
    let mut env = TestEnv::new(registered(&defs, &Arc::new(kube.connections()))).await;
    env.start_worker(fast_worker("logs"));
    let run = env
        .run_within(
            "ops.why-crashing",
            json!({ "namespace": "shop" }),
            Duration::from_secs(30),
        )
        .await;
    assert_succeeded(&run);
    assert_eq!(
        run.output,
        Some(
            json!({ "pod": "web-0", "now": "listening on :8080\nGET /health 200\n", "before": "starting\npanic: no DATABASE_URL\n" })
        )
    );
    assert!(kube.writes().is_empty());
    env.stop_workers().await;
}

/// A credential made once and stored first: the next version of the entry gets a new password
/// (its other keys kept), and what follows reads the stored one.
const REGENERATE: &str = r#"
name: secrets.regenerate
input:
  mount: { type: string, guarded: true }
steps:
  - id: keys
    action: vault.kv-read
    with: { connection: bao, mount: "${{ input.mount }}", path: shop/db, values: false }
  - id: fresh
    action: vault.kv-generate
    with: { connection: bao, mount: "${{ input.mount }}", path: shop/db, key: password, cas: "${{ steps.keys.version }}", length: 40 }
  - id: stored
    action: vault.kv-read
    sensitive: true
    with: { connection: bao, mount: "${{ input.mount }}", path: shop/db }
  - id: check
    action: assert
    with:
      that: ${{ size(steps.stored.data.password) == 40 && steps.stored.data.username == 'shop' }}
      message: the stored password is not the generated one
output: ${{ steps.fresh.version }}
"#;

/// The `data` of `shop/db` in `mount`, as `bao kv get` shows it (its data and metadata).
async fn kv_get(bao: &dayshift_tests::OpenBao, mount: &str) -> Value {
    let text = bao
        .bao(&["kv", "get", "-format=json", &format!("-mount={mount}"), "shop/db"])
        .await
        .unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["data"].clone()
}

#[tokio::test]
async fn vault_kv_generate_makes_a_secret_once_stores_it_first_and_never_journals_it() {
    let bao = dayshift_tests::OpenBao::shared();
    let mount = kv_mount_with_shop_db(&bao, "old-pw-77e1").await;
    let mut conns = Connections::default();
    conns.vault.insert("bao".into(), vault_of(&bao));
    let names = BTreeMap::from([("vault".to_string(), ["bao".to_string()].into())]);
    let (conns, names_arc) = (Arc::new(conns), Arc::new(names.clone()));
    let compile =
        |text: &str| {
            Arc::new(Definition::compile("regenerate.yaml", text, &names).unwrap_or_else(|p| panic!("{p:#?}")))
                .workflow(conns.clone(), names_arc.clone(), None)
        };
    let stale = REGENERATE
        .replace("name: secrets.regenerate", "name: secrets.regenerate-stale")
        .replace("cas: \"${{ steps.keys.version }}\"", "cas: 1");
    // Held before it generates, so the test can play the attempt whose answer was lost.
    let held = REGENERATE
        .replace("name: secrets.regenerate", "name: secrets.regenerate-held")
        .replace(
            "  - id: fresh\n",
            "  - { id: hold, wait: go, timeout: 1h }\n  - id: fresh\n",
        );
    let mut env = TestEnv::new(vec![compile(REGENERATE), compile(&stale), compile(&held)]).await;
    env.start_worker(fast_worker("regenerate"));
    let limit = Duration::from_secs(30);

    let run = env
        .run_within("secrets.regenerate", json!({ "mount": mount }), limit)
        .await;
    assert_succeeded(&run);
    assert_eq!(run.output, Some(json!(2)));
    let now = kv_get(&bao, &mount).await;
    let password = now["data"]["password"].as_str().unwrap().to_string();
    assert_eq!(password.len(), 40);
    assert_ne!(password, "old-pw-77e1");
    assert_eq!(now["data"]["username"], "shop");
    let kept: String = sqlx::query_scalar(
        "select coalesce(string_agg(coalesce(output::text, '') || coalesce(error, ''), ' '), '') from steps where run_id = $1",
    )
    .bind(run.id.0)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert!(!kept.contains(&password) && !kept.contains("old-pw-77e1"), "{kept}");

    // Another run that read version 1 before this one wrote: refused, nothing generated.
    let refused = env
        .run_within("secrets.regenerate-stale", json!({ "mount": mount }), limit)
        .await;
    assert_eq!(refused.status, RunStatus::Failed, "{refused:#?}");
    assert!(
        refused
            .error
            .as_deref()
            .is_some_and(|e| e.contains("another writer changed it first")),
        "{refused:#?}"
    );
    let after = kv_get(&bao, &mount).await;
    assert_eq!(after["metadata"]["version"], 2);
    assert_eq!(after["data"]["password"], password.as_str());

    // A repeat whose first attempt wrote the secret but lost the answer (played here: the
    // entry at the next version, marked with this run's step) makes no second secret.
    let run = env
        .engine
        .start(StartRun::new("secrets.regenerate-held", json!({ "mount": mount })))
        .await
        .unwrap();
    dayshift_tests::wait_for(&env.engine, run.id, limit, |r| r.status == RunStatus::Waiting).await;
    let written = "written-by-the-lost-attempt-0123456789ab";
    bao.bao(&[
        "kv",
        "metadata",
        "put",
        &format!("-mount={mount}"),
        &format!("-custom-metadata=dayshift-generated-by={}/fresh:3", run.id),
        "shop/db",
    ])
    .await
    .unwrap();
    bao.bao(&[
        "kv",
        "put",
        &format!("-mount={mount}"),
        "shop/db",
        "username=shop",
        &format!("password={written}"),
    ])
    .await
    .unwrap();
    env.engine.signal(run.id, "go", json!({}), "token:test").await.unwrap();
    let done = env.wait(run.id, limit).await;
    assert_succeeded(&done);
    assert_eq!(done.output, Some(json!(3)));
    let after = kv_get(&bao, &mount).await;
    assert_eq!(after["metadata"]["version"], 3);
    assert_eq!(after["data"]["password"], written);
    env.stop_workers().await;
}

const PROPOSE_BACKUP: &str = r#"
name: gitops.add-backup
description: Adds a ScheduledBackup to a database's directory and sets its retention.
input:
  cluster: { type: string, guarded: true }
  repository: { type: connection, connection: git }
  kind: { type: string, default: ScheduledBackup }
steps:
  - id: manifest
    action: git.write-file
    with:
      connection: ${{ input.repository }}
      branch: main
      file: "apps/${{ input.cluster }}/scheduled-backup.yaml"
      content: |
        apiVersion: postgresql.cnpg.io/v1
        kind: ${{ input.kind }}
        metadata:
          name: ${{ input.cluster }}-daily
        spec:
          schedule: "0 0 3 * * *"
          cluster:
            name: ${{ input.cluster }}
  - id: retention
    action: git.set-values
    with:
      connection: ${{ input.repository }}
      branch: main
      file: "apps/${{ input.cluster }}/cluster.yaml"
      values: { spec.backup.retentionPolicy: 30d, spec.instances: 3 }
"#;

#[tokio::test]
async fn git_write_file_and_set_values_commit_once_on_a_branch_that_moved_and_keep_the_file_s_format() {
    let git = dayshift_tests::GitServer::start().await;
    let cluster_yaml =
        "# the shop database\nspec:\n  instances: 2   # one per zone\n  backup:\n    retentionPolicy: \"7d\"\n";
    git.create(
        "infra",
        "main",
        &[("apps/shop-db/cluster.yaml", cluster_yaml), ("README.md", "infra\n")],
    );
    let mut conns = Connections::default();
    conns.git.insert(
        "infra".into(),
        dayshift_workflows::adapters::git::GitConfig {
            url: git.url("infra"),
            author_name: "dayshift".into(),
            author_email: "dayshift@acme.io".into(),
            ..Default::default()
        },
    );
    let names = BTreeMap::from([("git".to_string(), ["infra".to_string()].into())]);
    let def =
        Arc::new(Definition::compile("propose.yaml", PROPOSE_BACKUP, &names).unwrap_or_else(|p| panic!("{p:#?}")));
    let mut env = TestEnv::new(vec![def.workflow(Arc::new(conns), Arc::new(names), None)]).await;
    env.start_worker(fast_worker("git-edit"));
    let input = json!({ "cluster": "shop-db", "repository": "infra" });
    let limit = Duration::from_secs(60);

    // Another writer pushes while the first commit is on its way: it is made again on the new tip.
    let run = env
        .engine
        .start(StartRun::new("gitops.add-backup", input.clone()))
        .await
        .unwrap();
    git.race_next_push("infra", "main", "README.md", "infra, edited meanwhile\n")
        .await;
    let done = env.wait(run.id, limit).await;
    assert_succeeded(&done);
    let log = git.log("infra", "main");
    assert_eq!(log.len(), 4, "{log:#?}");
    // Newest first: the set, the write made again on top of the other writer's commit, the seed.
    assert!(
        log[0].2.contains(&format!("Dayshift-Step: {}/retention", run.id)),
        "{log:#?}"
    );
    assert!(
        log[1].2.starts_with("write apps/shop-db/scheduled-backup.yaml"),
        "{log:#?}"
    );
    assert_eq!(log[2].2, "another writer", "{log:#?}");
    assert_eq!(git.read("infra", "main", "README.md"), "infra, edited meanwhile");
    let manifest = git.read("infra", "main", "apps/shop-db/scheduled-backup.yaml");
    assert!(
        manifest.contains("kind: ScheduledBackup") && manifest.contains("name: shop-db-daily"),
        "{manifest}"
    );
    // Only the two values changed: the comments and the quoting stay.
    assert_eq!(
        git.read("infra", "main", "apps/shop-db/cluster.yaml"),
        "# the shop database\nspec:\n  instances: 3   # one per zone\n  backup:\n    retentionPolicy: \"30d\""
    );

    // Run again: everything says so already; no commit.
    let again = env.run_within("gitops.add-backup", input, limit).await;
    assert_succeeded(&again);
    assert!(
        again
            .steps
            .iter()
            .all(|s| s.output.as_ref().unwrap()["changed"] == false),
        "{again:#?}"
    );
    assert_eq!(git.log("infra", "main").len(), 4);

    // Content that is not YAML for a YAML file fails the step, and nothing is pushed.
    let broken = env
        .run_within(
            "gitops.add-backup",
            json!({ "cluster": "shop-db", "repository": "infra", "kind": "[unclosed" }),
            limit,
        )
        .await;
    assert_eq!(broken.status, RunStatus::Failed, "{broken:#?}");
    assert!(
        broken.error.as_deref().is_some_and(|e| e.contains("is not valid YAML")),
        "{broken:#?}"
    );
    assert_eq!(git.log("infra", "main").len(), 4);
    env.stop_workers().await;
}

/// A workflow file named `name` whose one step records `said`, its output.
fn saying(name: &str, said: &str) -> String {
    format!(
        "name: {name}\nsteps:\n  - {{ id: say, action: log, with: {{ message: {said} }} }}\noutput: ${{{{ steps.say.message }}}}\n"
    )
}

/// Pushes `changes` to `main` of `platform-workflows` in one commit, and delivers the forge's
/// push webhook for it to `env` (GitHub's, signed with `push-secret`); the delivery's answer.
async fn push_and_deliver(
    env: &dayshift_tests::BinEnv,
    git: &dayshift_tests::GitServer,
    changes: &[(&str, Option<&str>)],
) -> Value {
    let (secret, repository, branch) = ("push-secret", "acme/platform-workflows", "main");
    git.push_changes("platform-workflows", branch, changes);
    let after = git.head("platform-workflows", branch);
    let after = after.as_str();
    let body = serde_json::to_vec(&json!({
        "ref": format!("refs/heads/{branch}"), "before": "0".repeat(40), "after": after,
        "repository": { "full_name": repository, "name": repository.split('/').nth(1) },
        "commits": [{ "id": after, "message": "edit", "author": { "email": "alice@acme.io" }, "added": [], "modified": [], "removed": [] }],
        "head_commit": { "id": after, "author": { "email": "alice@acme.io" } },
        "sender": { "login": "alice" },
    }))
    .unwrap();
    let sig = format!("sha256={}", dayshift_tests::hmac_sha256_hex(secret, &body));
    let resp = env
        .http
        .post(format!("{}/hooks/github", env.api))
        .header("content-type", "application/json")
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", unique())
        .header("X-Hub-Signature-256", sig)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "{:?}", resp.text().await);
    resp.json().await.unwrap()
}

/// The version of workflow `name` that `serve` starts runs on.
async fn current_version(env: &dayshift_tests::BinEnv, name: &str) -> Value {
    let (status, w) = env.get(&format!("/api/v1/workflows/{name}")).await;
    if status != 200 {
        return Value::Null;
    }
    w["version"].clone()
}

#[tokio::test]
async fn workflow_files_in_git_are_loaded_kept_in_sync_on_a_push_and_a_broken_commit_changes_nothing() {
    let git = dayshift_tests::GitServer::start().await;
    git.create(
        "platform-workflows",
        "main",
        &[("workflows/hello.yaml", &saying("ops.hello", "v1"))],
    );
    let dir = std::env::temp_dir().join(format!("dayshift-wf-git-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("secret"), "push-secret\n").unwrap();
    let source = |refresh: &str| {
        format!(
            "workflows:\n  git: {{ url: \"{}\", path: workflows, refresh: {refresh}, repository: acme/platform-workflows }}\n\
             webhooks:\n  github:\n    secret: {{ file: {} }}\n  routes: []\n",
            git.url("platform-workflows"),
            dir.join("secret").display()
        )
    };
    // serve refreshes on a push only (its timer is an hour); the worker every second.
    let env = dayshift_tests::BinEnv::start_with(&source("1h")).await;
    let worker_config = dir.join("worker.yaml");
    std::fs::write(
        &worker_config,
        std::fs::read_to_string(&env.config_path)
            .unwrap()
            .replace("refresh: 1h", "refresh: 1s"),
    )
    .unwrap();
    let mut worker = dayshift_tests::spawn_dayshift(&worker_config, &["worker"], "worker ", &[]).await;
    let limit = Duration::from_secs(60);
    assert_eq!(current_version(&env, "ops.hello").await, 1);
    let id = env.start_run("ops.hello", json!({})).await;
    assert_eq!(env.wait_finished(&id, limit).await["output"], "v1");

    // A commit edits one file and adds another; the forge's push makes serve load it at once.
    let delivered = push_and_deliver(
        &env,
        &git,
        &[
            ("workflows/hello.yaml", Some(&saying("ops.hello", "v2"))),
            ("workflows/new.yaml", Some(&saying("ops.new", "new"))),
        ],
    )
    .await;
    assert!(
        delivered["reason"].as_str().is_some_and(|r| r.contains("refreshes")),
        "{delivered:#}"
    );
    let deadline = tokio::time::Instant::now() + limit;
    while current_version(&env, "ops.new").await != 1 || current_version(&env, "ops.hello").await != 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve did not load the pushed commit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The worker has loaded it on its own timer before it is asked to run the new workflow.
    while !worker.logs().contains("Workflow files loaded from git.") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not load the pushed commit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = env.start_run("ops.hello", json!({})).await;
    assert_eq!(env.wait_finished(&id, limit).await["output"], "v2");
    let id = env.start_run("ops.new", json!({})).await;
    assert_eq!(env.wait_finished(&id, limit).await["output"], "new");

    // A commit with a broken file is not loaded: the workflows stay as they were, and serve says why.
    push_and_deliver(
        &env,
        &git,
        &[(
            "workflows/hello.yaml",
            Some("name: ops.hello\nsteps:\n  - { id: a, action: nope }\n"),
        )],
    )
    .await;
    while !env.server.as_ref().unwrap().logs().contains("were not loaded") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "serve did not report the broken commit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logs = env.server.as_ref().unwrap().logs();
    assert!(
        logs.contains("workflows/hello.yaml:3:") && logs.contains("no action \"nope\""),
        "{logs}"
    );
    assert_eq!(current_version(&env, "ops.hello").await, 2);
    let id = env.start_run("ops.hello", json!({})).await;
    assert_eq!(env.wait_finished(&id, limit).await["output"], "v2");

    // A file deleted: its workflow can no longer be started.
    push_and_deliver(
        &env,
        &git,
        &[
            ("workflows/hello.yaml", Some(&saying("ops.hello", "v2"))),
            ("workflows/new.yaml", None),
        ],
    )
    .await;
    loop {
        let (status, body) = env
            .post("/api/v1/runs", &json!({ "workflow": "ops.new", "input": {} }))
            .await;
        if status == 422 {
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains("it can no longer be started: its file was removed"),
                "{body:#}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ops.new can still be started: {status} {body:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill9().await;
}

const APPLY_FROM_GIT: &str = r#"
name: ops.apply-from-git
input:
  path: { type: string, guarded: true, default: plain }
steps:
  - id: plain
    action: kubernetes.apply
    with: { repository: infra, path: "${{ input.path }}", namespace: shop }
  - id: overlay
    action: kubernetes.apply
    with: { repository: infra, branch: main, path: overlays/prod }
output: ${{ steps.plain.applied + steps.overlay.applied }}
"#;

#[tokio::test]
async fn kubernetes_apply_takes_a_directory_or_a_kustomize_overlay_from_git_and_nothing_outside_the_repository() {
    let git = dayshift_tests::GitServer::start().await;
    let settings = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  mode: fast\n";
    git.create(
        "infra",
        "main",
        &[
            ("plain/10-settings.yaml", settings),
            (
                "plain/20-flags.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: flags\n  namespace: shop\ndata:\n  beta: \"true\"\n---\n",
            ),
            ("overlays/base/settings.yaml", settings),
            ("overlays/base/kustomization.yaml", "resources: [settings.yaml]\n"),
            (
                "overlays/prod/kustomization.yaml",
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: shop\nnamePrefix: prod-\nresources: [../base]\n",
            ),
        ],
    );
    let kube = dayshift_tests::kube_api::KubeApi::start().await;
    let mut conns = kube.connections();
    conns.git.insert(
        "infra".into(),
        dayshift_workflows::adapters::git::GitConfig {
            url: git.url("infra"),
            author_name: "dayshift".into(),
            author_email: "dayshift@acme.io".into(),
            ..Default::default()
        },
    );
    let names = BTreeMap::from([
        ("git".to_string(), ["infra".to_string()].into()),
        ("kubernetes".to_string(), ["default".to_string()].into()),
    ]);
    let def = Arc::new(Definition::compile("apply.yaml", APPLY_FROM_GIT, &names).unwrap_or_else(|p| panic!("{p:#?}")));
    let mut env = TestEnv::new(vec![def.workflow(Arc::new(conns), Arc::new(names), None)]).await;
    env.start_worker(fast_worker("apply-git"));
    let limit = Duration::from_secs(60);

    let done = env.run_within("ops.apply-from-git", json!({}), limit).await;
    assert_succeeded(&done);
    assert_eq!(
        done.output,
        Some(json!([
            "ConfigMap shop/settings",
            "ConfigMap shop/flags",
            "ConfigMap shop/prod-settings"
        ]))
    );
    for name in ["settings", "flags", "prod-settings"] {
        let cm = kube.get(&format!("/api/v1/namespaces/shop/configmaps/{name}"));
        assert!(cm.is_some(), "{name} was not applied");
    }
    assert_eq!(
        kube.get("/api/v1/namespaces/shop/configmaps/prod-settings").unwrap()["data"]["mode"],
        "fast"
    );

    // A path out of the repository is refused before anything is applied.
    let writes = kube.writes().len();
    let escape = env
        .run_within("ops.apply-from-git", json!({ "path": "../../../etc" }), limit)
        .await;
    assert_eq!(escape.status, RunStatus::Failed, "{escape:#?}");
    assert!(
        escape.error.as_deref().is_some_and(|e| e.contains("without '..'")),
        "{escape:#?}"
    );
    assert_eq!(kube.writes().len(), writes);
    env.stop_workers().await;
}
