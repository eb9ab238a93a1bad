//! Git webhooks through `dayshift serve`, with payloads in the exact shape each forge sends
//! (tests/fixtures; see its README for where each comes from).

use std::path::PathBuf;

use dayshift_tests::{BinEnv, unique};
use serde_json::{Value, json};

const SECRET: &str = "It's a Secret to Everybody";

fn fixture(path: &str) -> Value {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(path);
    serde_json::from_str(&std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()))).unwrap()
}

/// A serve process with webhook secrets in files and the given routes.
async fn hooks_env(routes: &str, extra: &str) -> BinEnv {
    let dir = std::env::temp_dir().join(format!("dayshift-hooks-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let s = secret.display();
    BinEnv::start_with(&format!(
        "webhooks:\n  github:\n    secret: {{ file: {s} }}\n  gitea:\n    secret: {{ file: {s} }}\n  \
         forgejo:\n    secret: {{ file: {s} }}\n  gitlab:\n    secret: {{ file: {s} }}\n{extra}  routes:\n{routes}"
    ))
    .await
}

/// Posts a GitHub delivery, signed.
async fn github(env: &BinEnv, event: &str, delivery: &str, body: &Value) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    let sig = format!("sha256={}", dayshift_tests::hmac_sha256_hex(SECRET, &bytes));
    send(
        env,
        "github",
        bytes,
        &[
            ("X-GitHub-Event", event),
            ("X-GitHub-Delivery", delivery),
            ("X-Hub-Signature-256", &sig),
        ],
    )
    .await
}

async fn send(env: &BinEnv, forge: &str, body: Vec<u8>, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = env
        .http
        .post(format!("{}/hooks/{forge}", env.api))
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

async fn run_count(env: &BinEnv) -> i64 {
    sqlx::query_scalar("select count(*) from runs")
        .fetch_one(&env.db.pool)
        .await
        .unwrap()
}

const PUSH_ROUTE: &str = "    - name: deploy-master\n      forge: github\n      repositories: [Codertocat/*]\n      \
                          events: [push]\n      branches: [master]\n      workflow: selftest.gate\n      \
                          input: { signal: \"deploy-{{ branch }}-{{ sha }}\" }\n";

#[tokio::test]
async fn a_github_push_starts_its_route_once_and_a_redelivery_is_a_duplicate() {
    let env = hooks_env(PUSH_ROUTE, "").await;
    let push = fixture("github/push-branch.json");
    let (status, body) = github(&env, "push", "d-1", &push).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["outcome"], "started");
    let run_id = body["runs"][0]["run_id"].as_str().unwrap().to_string();
    let (_, run) = env.get(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(
        run["input"]["signal"],
        format!("deploy-master-{}", push["after"].as_str().unwrap())
    );
    assert!(
        run["started_by"]
            .as_str()
            .unwrap()
            .contains("webhook:deploy-master:github push (delivery d-1)")
    );

    // GitHub's redelivery keeps the delivery id.
    let (status, body) = github(&env, "push", "d-1", &push).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "duplicate");
    assert_eq!(body["runs"][0]["run_id"], run_id.as_str());
    assert_eq!(run_count(&env).await, 1);
}

#[tokio::test]
async fn a_tag_push_and_its_create_event_start_one_run() {
    let routes = "    - name: release\n      events: [tag]\n      tags: [\"simple-*\"]\n      workflow: selftest.chain\n      \
                  input: { steps: 1 }\n";
    let env = hooks_env(routes, "").await;
    let (status, first) = github(&env, "push", "t-1", &fixture("github/push-tag.json")).await;
    assert_eq!((status, first["outcome"].clone()), (202, json!("started")), "{first}");
    let (status, second) = github(&env, "create", "t-2", &fixture("github/create-tag.json")).await;
    assert_eq!(
        (status, second["outcome"].clone()),
        (200, json!("duplicate")),
        "{second}"
    );
    assert_eq!(second["runs"][0]["run_id"], first["runs"][0]["run_id"]);
    assert_eq!(run_count(&env).await, 1);
}

#[tokio::test]
async fn a_signed_body_replayed_under_another_event_is_refused_and_a_tag_made_again_is_new() {
    let routes = "    - name: release\n      events: [tag]\n      tags: [\"simple-*\"]\n      workflow: selftest.chain\n      \
                  input: { steps: 1 }\n    \
                  - name: cleanup\n      events: [tag-deleted]\n      workflow: selftest.chain\n      input: { steps: 1 }\n";
    let env = hooks_env(routes, "").await;
    let create = fixture("github/create-tag.json");
    let (status, made) = github(&env, "create", "r-1", &create).await;
    assert_eq!((status, made["outcome"].clone()), (202, json!("started")), "{made}");
    // The same signed body, with the header saying delete: refused, nothing started.
    let (status, replay) = github(&env, "delete", "r-2", &create).await;
    assert_eq!(status, 409, "{replay}");
    assert!(
        replay["error"]
            .as_str()
            .unwrap()
            .contains("delivered before as a tag event"),
        "{replay}"
    );
    assert_eq!(run_count(&env).await, 1);

    // The tag is deleted, then made again: both are new events, each with its run.
    let (status, deleted) = github(&env, "delete", "r-3", &fixture("github/delete-tag.json")).await;
    assert_eq!(
        (status, deleted["outcome"].clone()),
        (202, json!("started")),
        "{deleted}"
    );
    let mut again = create.clone();
    again["description"] = json!("made again");
    let (status, made_again) = github(&env, "create", "r-4", &again).await;
    assert_eq!(
        (status, made_again["outcome"].clone()),
        (202, json!("started")),
        "{made_again}"
    );
    // Deleted a second time: a second cleanup, not a duplicate of the first.
    let mut second_delete = fixture("github/delete-tag.json");
    second_delete["pusher_type"] = json!("user ");
    let (status, deleted_again) = github(&env, "delete", "r-5", &second_delete).await;
    assert_eq!(
        (status, deleted_again["outcome"].clone()),
        (202, json!("started")),
        "{deleted_again}"
    );
    assert_eq!(run_count(&env).await, 4);
    // A redelivery of one of them (same delivery id) is still a duplicate.
    let (status, redelivered) = github(&env, "delete", "r-5", &second_delete).await;
    assert_eq!(
        (status, redelivered["outcome"].clone()),
        (200, json!("duplicate")),
        "{redelivered}"
    );
    assert_eq!(run_count(&env).await, 4);
}

#[tokio::test]
async fn pull_request_events_start_the_routes_for_their_action() {
    let routes = "    - name: preview-up\n      events: [pull-request-opened, pull-request-synchronized]\n      \
                  workflow: selftest.gate\n      input: { signal: \"pr-{{ pull_request.number }}-{{ pull_request.head_branch }}\" }\n    \
                  - name: preview-down\n      events: [pull-request-closed, pull-request-merged]\n      branches: [master]\n      \
                  workflow: selftest.chain\n      input: { steps: 1 }\n";
    let env = hooks_env(routes, "").await;
    let (status, opened) = github(&env, "pull_request", "p-1", &fixture("github/pull_request-opened.json")).await;
    assert_eq!(status, 202, "{opened}");
    assert_eq!(opened["runs"][0]["route"], "preview-up");
    let (_, run) = env
        .get(&format!(
            "/api/v1/runs/{}",
            opened["runs"][0]["run_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(run["input"]["signal"], "pr-2-changes");
    let (_, sync) = github(
        &env,
        "pull_request",
        "p-2",
        &fixture("github/pull_request-synchronize.json"),
    )
    .await;
    assert_eq!(
        (sync["outcome"].clone(), sync["event"].clone()),
        (json!("started"), json!("pull-request-synchronized"))
    );
    let (_, closed) = github(&env, "pull_request", "p-3", &fixture("github/pull_request-closed.json")).await;
    assert_eq!(
        (closed["runs"][0]["route"].clone(), closed["event"].clone()),
        (json!("preview-down"), json!("pull-request-closed"))
    );
    // The examples hold no merged pull request: the closed one, marked merged as GitHub does.
    let mut merged = fixture("github/pull_request-closed.json");
    merged["pull_request"]["merged"] = json!(true);
    let (_, body) = github(&env, "pull_request", "p-4", &merged).await;
    assert_eq!(body["event"], "pull-request-merged");
    assert_eq!(body["outcome"], "started");
    let (status, labeled) = github(&env, "pull_request", "p-5", &json!({ "action": "labeled", "number": 2, "pull_request": {}, "repository": { "full_name": "Codertocat/Hello-World" } })).await;
    assert_eq!(
        (status, labeled["outcome"].clone()),
        (202, json!("not handled")),
        "{labeled}"
    );
    assert_eq!(run_count(&env).await, 4);
}

#[tokio::test]
async fn changed_path_globs_select_routes() {
    let routes = "    - name: docs\n      events: [push]\n      paths: [\"*.md\"]\n      workflow: selftest.chain\n      input: { steps: 1 }\n    \
                  - name: apps\n      events: [push]\n      paths: [\"apps/**\"]\n      workflow: selftest.chain\n      input: { steps: 1 }\n";
    let env = hooks_env(routes, "").await;
    let (_, body) = github(&env, "push", "c-1", &fixture("github/push-branch.json")).await;
    let routes: Vec<&str> = body["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["route"].as_str().unwrap())
        .collect();
    assert_eq!(routes, vec!["docs"], "the push only adds README.md: {body}");
}

#[tokio::test]
async fn pushes_made_by_dayshift_start_nothing() {
    let env = hooks_env(PUSH_ROUTE, "  bot-emails: [dayshift@acme.io]\n").await;
    let mut push = fixture("github/push-branch.json");
    let message = push["commits"][0]["message"].as_str().unwrap().to_string();
    push["commits"][0]["message"] = json!(format!(
        "{message}\n\nDayshift-Run: 01a1fd85-bb7e-74e6-b688-276161ff3a10"
    ));
    // The trailer from anyone but dayshift's own identity means nothing: the route runs.
    let (status, body) = github(&env, "push", "l-0", &push).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["outcome"], "started", "{body}");
    assert_eq!(run_count(&env).await, 1);
    push["commits"][0]["author"]["email"] = json!("dayshift@acme.io");
    push["after"] = json!("1111111111111111111111111111111111111111");
    let (status, body) = github(&env, "push", "l-1", &push).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["outcome"], "ignored");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("01a1fd85-bb7e-74e6-b688-276161ff3a10"),
        "{body}"
    );
    assert_eq!(run_count(&env).await, 1);
}

#[tokio::test]
async fn bad_deliveries_get_the_right_status_and_start_nothing() {
    let env = hooks_env(PUSH_ROUTE, "  max-body-bytes: 30000\n").await;
    let push = serde_json::to_vec(&fixture("github/push-branch.json")).unwrap();
    let good = format!("sha256={}", dayshift_tests::hmac_sha256_hex(SECRET, &push));
    let wrong = format!("sha256={}", dayshift_tests::hmac_sha256_hex("another secret", &push));
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16);
    let cases: Vec<Case> = vec![
        ("no signature", vec![("X-GitHub-Event", "push")], push.clone(), 401),
        (
            "wrong secret",
            vec![("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &wrong)],
            push.clone(),
            401,
        ),
        (
            "not hex",
            vec![("X-GitHub-Event", "push"), ("X-Hub-Signature-256", "sha256=zz")],
            push.clone(),
            401,
        ),
        (
            "tampered body",
            vec![("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &good)],
            [&push[..], b" "].concat(),
            401,
        ),
        (
            "too large",
            vec![("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &good)],
            vec![b' '; 40000],
            413,
        ),
    ];
    for (what, headers, body, expected) in cases {
        let (status, answer) = send(&env, "github", body, &headers).await;
        assert_eq!(status, expected, "{what}: {answer}");
        assert!(answer["error"].is_string(), "{what}: {answer}");
    }
    // A 2 KB event type is refused before it is logged or stored, and so are 20 KB of
    // headers of any name.
    let long = "push".repeat(500);
    let huge = "push".repeat(5000);
    let (status, answer) = send(
        &env,
        "github",
        push.clone(),
        &[("X-GitHub-Event", &long), ("X-Hub-Signature-256", &good)],
    )
    .await;
    assert_eq!(status, 431, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("x-github-event"), "{answer}");
    let (status, _) = send(
        &env,
        "github",
        push.clone(),
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &good),
            ("X-Padding", &huge),
        ],
    )
    .await;
    assert_eq!(status, 431);
    // A body sent form-encoded or as text is not taken for JSON.
    for content_type in ["application/x-www-form-urlencoded", "text/plain"] {
        let r = env
            .http
            .post(format!("{}/hooks/github", env.api))
            .header("content-type", content_type)
            .header("X-GitHub-Event", "push")
            .header("X-Hub-Signature-256", &good)
            .body(push.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 415, "{content_type}");
        let answer: Value = r.json().await.unwrap();
        assert!(
            answer["error"].as_str().unwrap().contains("choose application/json"),
            "{answer}"
        );
    }
    let not_json = b"{\"ref\": refs/heads/master".to_vec();
    let sig = format!("sha256={}", dayshift_tests::hmac_sha256_hex(SECRET, &not_json));
    let (status, answer) = send(
        &env,
        "github",
        not_json,
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("not JSON"));
    let (status, _) = send(&env, "bitbucket", push.clone(), &[]).await;
    assert_eq!(status, 404);
    assert_eq!(run_count(&env).await, 0);
    let recorded: i64 = sqlx::query_scalar("select count(*) from webhook_deliveries")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 0, "refused deliveries are not accepted deliveries");

    let (status, pong) = github(&env, "ping", "ping-1", &fixture("github/ping.json")).await;
    assert_eq!((status, pong["outcome"].clone()), (200, json!("pong")));
    let (status, none) = github(&env, "pull_request", "n-1", &fixture("github/pull_request-opened.json")).await;
    assert_eq!((status, none["outcome"].clone()), (202, json!("no route")), "{none}");
}

#[tokio::test]
async fn a_forge_without_a_secret_is_not_listened_to() {
    let env = BinEnv::start().await;
    let (status, body) = send(&env, "github", b"{}".to_vec(), &[("X-GitHub-Event", "ping")]).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("not configured"));
}

/// Posts a Gitea (or Forgejo) delivery: bare hex HMAC, event and delivery headers.
async fn gitea(env: &BinEnv, forge: &str, event: &str, delivery: &str, body: &Value) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    let sig = dayshift_tests::hmac_sha256_hex(SECRET, &bytes);
    let prefix = if forge == "forgejo" { "X-Forgejo" } else { "X-Gitea" };
    let (ev, dl, sg) = (
        format!("{prefix}-Event"),
        format!("{prefix}-Delivery"),
        format!("{prefix}-Signature"),
    );
    send(env, forge, bytes, &[(&ev, event), (&dl, delivery), (&sg, &sig)]).await
}

/// Posts a GitLab delivery with its token and retry headers.
async fn gitlab(env: &BinEnv, event: &str, uuid: &str, idempotency: &str, body: &Value) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    send(
        env,
        "gitlab",
        bytes,
        &[
            ("X-Gitlab-Event", event),
            ("X-Gitlab-Token", SECRET),
            ("X-Gitlab-Webhook-UUID", uuid),
            ("Idempotency-Key", idempotency),
        ],
    )
    .await
}

const INFRA_ROUTES: &str = "    - name: promote-web\n      repositories: [platform/infra]\n      events: [push]\n      \
     branches: [main]\n      paths: [\"apps/web/**\"]\n      workflow: selftest.gate\n      \
     input: { signal: \"{{ forge }}-{{ branch }}-{{ sha }}\" }\n    \
     - name: release\n      events: [tag]\n      tags: [\"v*\"]\n      workflow: selftest.gate\n      \
     input: { signal: \"release-{{ tag }}-{{ sha }}\" }\n    \
     - name: cleanup\n      events: [branch-deleted]\n      workflow: selftest.chain\n      input: { steps: 1 }\n    \
     - name: preview\n      events: [pull-request-opened, pull-request-synchronized, pull-request-merged]\n      \
     branches: [main]\n      workflow: selftest.gate\n      \
     input: { signal: \"{{ event }}-{{ pull_request.number }}-{{ pull_request.head_branch }}\" }\n";

async fn signal_of(env: &BinEnv, answer: &Value) -> String {
    let id = answer["runs"][0]["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no run in {answer}"));
    let (_, run) = env.get(&format!("/api/v1/runs/{id}")).await;
    run["input"]["signal"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn gitea_and_forgejo_deliveries_start_their_routes_once() {
    let env = hooks_env(INFRA_ROUTES, "  bot-emails: [dayshift@platform.example]\n").await;
    let push = fixture("gitea/push-branch.json");
    let (status, first) = gitea(&env, "gitea", "push", "g-1", &push).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(
        signal_of(&env, &first).await,
        "gitea-main-3f5ac1412a4a9e0a562e8b98576ee5c2dd290b1f"
    );
    // Gitea's "Redeliver" sends the same body with a new delivery id.
    let (status, again) = gitea(&env, "gitea", "push", "g-2", &push).await;
    assert_eq!((status, again["outcome"].clone()), (200, json!("duplicate")), "{again}");

    let (_, own) = gitea(&env, "gitea", "push", "g-3", &fixture("gitea/push-by-dayshift.json")).await;
    assert_eq!(own["outcome"], "ignored", "{own}");

    // A tag arrives as a push and as a create; the run gets the tagged commit, not the tag object.
    let (_, tag) = gitea(&env, "gitea", "push", "g-4", &fixture("gitea/push-tag.json")).await;
    assert_eq!(
        signal_of(&env, &tag).await,
        "release-v1.4.0-12604003e902f022e235afe0970aac15eaa5e924"
    );
    let (status, create) = gitea(&env, "gitea", "create", "g-5", &fixture("gitea/create-tag.json")).await;
    assert_eq!(
        (status, create["outcome"].clone()),
        (200, json!("duplicate")),
        "{create}"
    );
    // Forgejo names the ref in full, and signs with its own header.
    let mut forgejo_create = fixture("gitea/create-tag.json");
    forgejo_create["ref"] = json!("refs/tags/v1.4.0");
    let (status, fj) = gitea(&env, "forgejo", "create", "f-1", &forgejo_create).await;
    assert_eq!((status, fj["outcome"].clone()), (200, json!("duplicate")), "{fj}");

    let (_, deleted) = gitea(&env, "gitea", "delete", "g-6", &fixture("gitea/delete-branch.json")).await;
    assert_eq!(
        (deleted["event"].clone(), deleted["runs"][0]["route"].clone()),
        (json!("branch-deleted"), json!("cleanup"))
    );

    let (_, opened) = gitea(
        &env,
        "gitea",
        "pull_request",
        "g-7",
        &fixture("gitea/pull_request-opened.json"),
    )
    .await;
    assert_eq!(signal_of(&env, &opened).await, "pull-request-opened-7-feature/login");
    let (_, sync) = gitea(
        &env,
        "gitea",
        "pull_request",
        "g-8",
        &fixture("gitea/pull_request-synchronized.json"),
    )
    .await;
    assert_eq!(sync["event"], "pull-request-synchronized");
    let (_, merged) = gitea(
        &env,
        "gitea",
        "pull_request",
        "g-9",
        &fixture("gitea/pull_request-closed-merged.json"),
    )
    .await;
    assert_eq!(merged["event"], "pull-request-merged");
    assert_eq!(merged["outcome"], "started");

    let bytes = serde_json::to_vec(&push).unwrap();
    let prefixed = format!("sha256={}", dayshift_tests::hmac_sha256_hex(SECRET, &bytes));
    let (status, _) = send(
        &env,
        "gitea",
        bytes,
        &[("X-Gitea-Event", "push"), ("X-Gitea-Signature", &prefixed)],
    )
    .await;
    assert_eq!(
        status, 401,
        "Gitea signs with bare hex; a prefixed signature is not Gitea's"
    );
    assert_eq!(run_count(&env).await, 6);
}

#[tokio::test]
async fn gitlab_deliveries_start_their_routes_once_and_retries_are_duplicates() {
    let env = hooks_env(INFRA_ROUTES, "").await;
    let push = fixture("gitlab/push-branch.json");
    let (status, first) = gitlab(&env, "Push Hook", "u-1", "k-1", &push).await;
    assert_eq!(status, 202, "{first}");
    assert_eq!(
        signal_of(&env, &first).await,
        "gitlab-main-3f5ac1412a4a9e0a562e8b98576ee5c2dd290b1f"
    );
    // GitLab retries with a new webhook UUID and the same Idempotency-Key.
    let (status, retry) = gitlab(&env, "Push Hook", "u-2", "k-1", &push).await;
    assert_eq!((status, retry["outcome"].clone()), (200, json!("duplicate")), "{retry}");

    let (_, tag) = gitlab(&env, "Tag Push Hook", "u-3", "k-3", &fixture("gitlab/tag-push.json")).await;
    assert_eq!(
        signal_of(&env, &tag).await,
        "release-v1.4.0-12604003e902f022e235afe0970aac15eaa5e924"
    );
    let (_, deleted) = gitlab(
        &env,
        "Push Hook",
        "u-4",
        "k-4",
        &fixture("gitlab/push-branch-deleted.json"),
    )
    .await;
    assert_eq!(deleted["event"], "branch-deleted");
    let (_, opened) = gitlab(
        &env,
        "Merge Request Hook",
        "u-5",
        "k-5",
        &fixture("gitlab/merge_request-opened.json"),
    )
    .await;
    assert_eq!(signal_of(&env, &opened).await, "pull-request-opened-7-feature/login");
    let (_, updated) = gitlab(
        &env,
        "Merge Request Hook",
        "u-6",
        "k-6",
        &fixture("gitlab/merge_request-updated.json"),
    )
    .await;
    assert_eq!(updated["event"], "pull-request-synchronized");
    let (_, merged) = gitlab(
        &env,
        "Merge Request Hook",
        "u-7",
        "k-7",
        &fixture("gitlab/merge_request-merged.json"),
    )
    .await;
    assert_eq!(merged["event"], "pull-request-merged");

    let bytes = serde_json::to_vec(&push).unwrap();
    let (status, body) = send(
        &env,
        "gitlab",
        bytes,
        &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "guess")],
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(run_count(&env).await, 6);
}

#[tokio::test]
async fn config_check_catches_route_mistakes() {
    let dir = std::env::temp_dir().join(format!("dayshift-routes-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |name: &str, yaml: &str| {
        let path = dir.join(name);
        std::fs::write(&path, yaml).unwrap();
        std::process::Command::new(dayshift_tests::dayshift_bin())
            .args(["config", "check"])
            .arg(&path)
            .env_remove("GH_SECRET")
            .output()
            .unwrap()
    };
    let secret = dir.join("secret");
    std::fs::write(&secret, "x").unwrap();
    let head = format!(
        "webhooks:\n  github:\n    secret: {{ file: {} }}\n  routes:\n",
        secret.display()
    );
    let cases = [
        (
            "event.yaml",
            format!("{head}    - name: a\n      events: [pushed]\n      workflow: selftest.gate\n"),
            vec!["line 6", "unknown variant `pushed`"],
        ),
        (
            "glob.yaml",
            format!(
                "{head}    - name: a\n      events: [push]\n      branches: [\"release/[\"]\n      workflow: selftest.gate\n"
            ),
            vec!["line 7", "not a glob"],
        ),
        (
            "paths.yaml",
            format!(
                "{head}    - name: a\n      events: [tag]\n      paths: [\"apps/**\"]\n      workflow: selftest.gate\n"
            ),
            vec!["routes[0].paths", "push events only"],
        ),
        (
            "field.yaml",
            format!(
                "{head}    - name: a\n      events: [push]\n      workflow: selftest.gate\n      input: {{ signal: \"{{{{ labels.app }}}}\" }}\n"
            ),
            vec!["routes[0].input.signal", "labels.app", "payload"],
        ),
        (
            "secret.yaml",
            "webhooks:\n  github:\n    secret: { env: GH_SECRET }\n".to_string(),
            vec!["webhooks.github.secret", "GH_SECRET is not set"],
        ),
        (
            "inline.yaml",
            "webhooks:\n  github:\n    secret: hunter2\n".to_string(),
            vec!["line 3"],
        ),
    ];
    for (file, yaml, expected) in cases {
        let out = check(file, &yaml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} passed the check");
        for e in expected {
            assert!(err.contains(e), "{file}: '{e}' not in:\n{err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_route_whose_input_needs_a_missing_payload_field_fails_clearly() {
    let routes = "    - name: needs-milestone\n      events: [push]\n      workflow: selftest.gate\n      \
                  input: { signal: \"{{ payload.milestone.title }}\" }\n";
    let env = hooks_env(routes, "").await;
    let (status, body) = github(&env, "push", "m-1", &fixture("github/push-branch.json")).await;
    assert_eq!(status, 422, "{body}");
    let error = body["errors"][0].as_str().unwrap();
    assert!(
        error.contains("route 'needs-milestone'") && error.contains("payload.milestone.title"),
        "{error}"
    );
    assert_eq!(run_count(&env).await, 0);
}
