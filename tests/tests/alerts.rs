//! Alertmanager notifications: a real Alertmanager (Debian's prometheus-alertmanager) sending to
//! `dayshift serve`, and notifications posted in Alertmanager's exact shape for the cases a test
//! cannot wait for (a 10,000-alert storm, guardrails, bad input).

use std::time::Duration;

use chrono::Utc;
use dayshift_tests::{BinEnv, OwnAlertmanager, unique};
use serde_json::{Value, json};

const TOKEN: &str = "am-bearer-token";
const LIMIT: Duration = Duration::from_secs(60);

async fn alert_env(routes: &str) -> BinEnv {
    let dir = std::env::temp_dir().join(format!("dayshift-alerts-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    BinEnv::start_with(&format!(
        "alertmanager:\n  token: {{ file: {} }}\n  routes:\n{routes}",
        token.display()
    ))
    .await
}

async fn count(env: &BinEnv, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&env.db.pool)
        .await
        .unwrap()
}

async fn wait_until(env: &BinEnv, sql: &str, at_least: i64) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let n = count(env, sql).await;
        if n >= at_least {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{sql}` stayed at {n}, expected {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn am_alert(name: &str, namespace: &str, starts: chrono::DateTime<Utc>, ends: Option<chrono::DateTime<Utc>>) -> Value {
    let mut a = json!({
        "labels": { "alertname": name, "namespace": namespace, "pod": "web-1", "severity": "critical" },
        "annotations": { "summary": format!("{name} in {namespace}") },
        "startsAt": starts.to_rfc3339(),
        "generatorURL": "http://prometheus.example/graph",
    });
    if let Some(ends) = ends {
        a["endsAt"] = json!(ends.to_rfc3339());
    }
    a
}

const CRASHLOOP: &str = "    - name: crashloop\n      matchers: ['alertname=\"KubePodCrashLooping\"', 'namespace=~\"prod-.*\"']\n      \
                         workflow: selftest.gate\n      input: { signal: resolved, timeout_ms: 600000 }\n";

#[tokio::test]
async fn alertmanager_starts_one_run_per_episode_and_its_resolution_reaches_the_run() {
    let env = alert_env(CRASHLOOP).await;
    let _worker = env.start_worker().await;
    let am = OwnAlertmanager::start(&format!("{}/hooks/alertmanager", env.api), TOKEN)
        .await
        .unwrap();
    let started = Utc::now() - chrono::Duration::seconds(30);
    am.post_alerts(&json!([
        am_alert("KubePodCrashLooping", "prod-web", started, None),
        am_alert("KubePodCrashLooping", "staging-web", started, None),
        am_alert("KubeDeploymentReplicasMismatch", "prod-web", started, None),
    ]))
    .await
    .unwrap();
    // The first notification and at least two repeats: still one run, for the matching alert.
    wait_until(&env, "select count(*) from alert_notifications", 3).await;
    assert_eq!(count(&env, "select count(*) from runs").await, 1);
    assert_eq!(count(&env, "select count(*) from alert_episodes").await, 1);
    let run_id: uuid::Uuid = sqlx::query_scalar("select run_id from alert_episodes")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    let (_, run) = env.get(&format!("/api/v1/runs/{run_id}")).await;
    assert_eq!(run["started_by"], "alertmanager:crashloop KubePodCrashLooping");

    // Resolved: nothing new starts, and the waiting run receives the signal and finishes.
    am.post_alerts(&json!([am_alert(
        "KubePodCrashLooping",
        "prod-web",
        started,
        Some(Utc::now())
    )]))
    .await
    .unwrap();
    let run = env
        .wait_run(&run_id.to_string(), LIMIT, |r| r["status"] == "succeeded")
        .await;
    assert_eq!(run["output"]["approval"]["labels"]["namespace"], "prod-web");
    assert_eq!(count(&env, "select count(*) from runs").await, 1);

    // It fires again: a new episode, a new run.
    am.post_alerts(&json!([am_alert("KubePodCrashLooping", "prod-web", Utc::now(), None)]))
        .await
        .unwrap();
    // The episode is recorded once its run is started: wait for the episode, then count runs.
    wait_until(&env, "select count(*) from alert_episodes where outcome = 'started'", 2).await;
    assert_eq!(count(&env, "select count(*) from runs").await, 2);
}

/// Alertmanager's webhook payload (version 4) for `alerts`.
fn notification(status: &str, alerts: Vec<Value>) -> Value {
    json!({
        "version": "4",
        "groupKey": "{}:{alertname=\"KubePodCrashLooping\"}",
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "dayshift",
        "groupLabels": { "alertname": "KubePodCrashLooping" },
        "commonLabels": { "alertname": "KubePodCrashLooping" },
        "commonAnnotations": {},
        "externalURL": "http://alertmanager.example",
        "alerts": alerts,
    })
}

fn v4_alert(i: usize, namespace: &str, deployment: &str, status: &str) -> Value {
    json!({
        "status": status,
        "labels": {
            "alertname": "KubePodCrashLooping", "namespace": namespace, "deployment": deployment,
            "pod": format!("{deployment}-{i:05}-x7k2p"), "container": "app", "severity": "critical",
            "cluster": "k3s-prod-eu-1", "job": "kube-state-metrics", "instance": "10.42.0.17:8080",
            "prometheus": "monitoring/k8s", "service": "kube-state-metrics", "uid": format!("{i:08x}-5d2c-4b7e-9f1a-1c2d3e4f5a6b")
        },
        "annotations": {
            "summary": "Pod is crash looping.",
            "description": format!("Pod {namespace}/{deployment}-{i:05} (app) is in waiting state (reason: \"CrashLoopBackOff\")."),
            "runbook_url": "https://runbooks.prometheus-operator.dev/runbooks/kubernetes/kubepodcrashlooping"
        },
        "startsAt": "2026-11-21T08:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.example/graph?g0.expr=max_over_time%28kube_pod_container_status_waiting_reason%5B5m%5D%29+%3E%3D+1",
        "fingerprint": format!("{i:016x}")
    })
}

async fn post(env: &BinEnv, body: &Value, token: Option<&str>) -> (u16, Value) {
    let mut req = env.http.post(format!("{}/hooks/alertmanager", env.api)).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_storm_of_10000_alerts_is_taken_in_one_request_and_starts_runs_only_for_matches() {
    let env = alert_env(
        "    - name: db\n      matchers: ['namespace=\"prod-db\"']\n      workflow: selftest.chain\n      input: { steps: 1 }\n",
    )
    .await;
    let alerts: Vec<Value> = (0..10_000)
        .map(|i| {
            let ns = if i % 2000 == 7 { "prod-db" } else { "prod-web" };
            v4_alert(i, ns, "web", "firing")
        })
        .collect();
    let body = notification("firing", alerts);
    let size = serde_json::to_vec(&body).unwrap().len();
    assert!(size > 5_000_000, "the storm is {size} bytes");
    let storm = {
        let (http, url) = (env.http.clone(), format!("{}/hooks/alertmanager", env.api));
        tokio::spawn(async move { http.post(url).bearer_auth(TOKEN).json(&body).send().await.unwrap() })
    };
    // Meanwhile the API answers.
    for _ in 0..10 {
        assert_eq!(env.get("/healthz").await.0, 200);
    }
    let resp = storm.await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let out: Value = resp.json().await.unwrap();
    assert_eq!(out["alerts"], 10_000);
    assert_eq!(out["started"].as_array().unwrap().len(), 5);
    assert_eq!(out["no_route"], 9_995);
    assert_eq!(count(&env, "select count(*) from runs").await, 5);
}

/// 10,000 firing alerts, each its own pod, through a real Alertmanager that groups them into
/// one notification: answered well within Alertmanager's notification timeout (10 s here), so
/// it neither fails nor sends it again; one run per episode, and the route's `max-runs` holds
/// back exactly the alerts beyond it.
#[tokio::test]
async fn a_real_alertmanagers_notification_of_10000_alerts_is_answered_in_time_and_not_sent_again() {
    let env = alert_env(
        "    - name: pods\n      matchers: ['alertname=\"KubePodCrashLooping\"']\n      workflow: selftest.chain\n      \
         input: { steps: 1 }\n      guardrails:\n        target: [pod]\n        cooldown: 1h\n        max-runs: 9000\n",
    )
    .await;
    // Alertmanager gathers the group for 5 s, then sends all of it at once; it would send the
    // unchanged group again only after an hour, or after a failed or timed-out attempt. (The
    // alerts start now: a group whose alerts started longer than `group_wait` ago is sent at
    // once, before the rest of them has arrived.)
    let am = OwnAlertmanager::start_with(&format!("{}/hooks/alertmanager", env.api), TOKEN, "5s", "1h")
        .await
        .unwrap();
    let started = Utc::now();
    let alerts: Vec<Value> = (0..10_000)
        .map(|i| {
            let mut a = am_alert("KubePodCrashLooping", "prod-web", started, None);
            a["labels"]["pod"] = json!(format!("web-{i:05}"));
            a
        })
        .collect();
    am.post_alerts(&Value::Array(alerts)).await.unwrap();

    let webhook = "integration=\"webhook\"";
    let deadline = tokio::time::Instant::now() + LIMIT;
    // Counted when the attempt has ended (its answer in, or the timeout past).
    while am
        .metric("alertmanager_notification_latency_seconds_count", webhook)
        .await
        .unwrap()
        < 1.0
    {
        assert!(tokio::time::Instant::now() < deadline, "Alertmanager sent nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let latency = am
        .metric("alertmanager_notification_latency_seconds_sum", webhook)
        .await
        .unwrap();
    println!("Alertmanager's notification of 10,000 alerts took {latency:.3} s");
    assert_eq!(
        am.metric("alertmanager_notifications_failed_total", webhook)
            .await
            .unwrap(),
        0.0
    );
    assert!(latency < 10.0, "the notification took {latency} s");
    let notified: Vec<(i32,)> = sqlx::query_as("select alerts from alert_notifications")
        .fetch_all(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(notified, [(10_000,)], "one notification with every alert");
    assert_eq!(count(&env, "select count(*) from runs").await, 9_000);
    assert_eq!(
        count(
            &env,
            "select count(*) from alert_episodes where outcome = 'started' and run_id is not null"
        )
        .await,
        9_000
    );
    assert_eq!(
        count(
            &env,
            "select count(*) from alert_episodes where outcome = 'held-back' and detail like 'max-runs: 9000 runs%'"
        )
        .await,
        1_000
    );
    // Two group intervals later it has sent nothing again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        am.metric("alertmanager_notifications_total", webhook).await.unwrap(),
        1.0
    );
    assert_eq!(count(&env, "select count(*) from alert_notifications").await, 1);

    // They all resolve: one notification again, in time, and each run started gets its
    // `resolved` signal once.
    let ended = Utc::now();
    let resolved: Vec<Value> = (0..10_000)
        .map(|i| {
            let mut a = am_alert("KubePodCrashLooping", "prod-web", started, Some(ended));
            a["labels"]["pod"] = json!(format!("web-{i:05}"));
            a
        })
        .collect();
    am.post_alerts(&Value::Array(resolved)).await.unwrap();
    // Alertmanager flushes the group every second (group_interval): a flush made while it is
    // still taking in the 10,000 resolutions sends those it has, and the next flush the rest.
    // So wait until every run has its signal, each notification with its answer in.
    let signalled = "select count(distinct run_id) from signals where name = 'resolved' and sent_by = 'alertmanager'";
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let ended = am
            .metric("alertmanager_notification_latency_seconds_count", webhook)
            .await
            .unwrap();
        let sent = am.metric("alertmanager_notifications_total", webhook).await.unwrap();
        if ended >= 2.0 && ended == sent && count(&env, signalled).await == 9_000 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "Alertmanager did not send every resolution: {} runs signalled",
            count(&env, signalled).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resolution = am
        .metric("alertmanager_notification_latency_seconds_sum", webhook)
        .await
        .unwrap()
        - latency;
    println!("Alertmanager's resolution of 10,000 alerts took {resolution:.3} s");
    assert_eq!(
        am.metric("alertmanager_notifications_failed_total", webhook)
            .await
            .unwrap(),
        0.0
    );
    assert!(resolution < 10.0, "the resolution took {resolution} s");
    assert_eq!(count(&env, signalled).await, 9_000);
    assert_eq!(count(&env, "select count(*) from signals").await, 9_000);
    assert_eq!(
        count(
            &env,
            "select count(*) from alert_episodes where resolved_at is not null"
        )
        .await,
        9_000
    );
}

#[tokio::test]
async fn guardrails_hold_runs_back_and_say_why() {
    let env = alert_env(
        "    - name: restart\n      matchers: ['alertname=\"KubePodCrashLooping\"']\n      workflow: selftest.gate\n      \
         input: { signal: \"restart-{{ labels.namespace }}-{{ labels.deployment }}\" }\n      guardrails:\n        \
         target: [namespace, deployment]\n        cooldown: 1h\n        max-runs: 2\n        window: 1h\n",
    )
    .await;
    // Two pods of one deployment: one run; the other is held back by the cooldown.
    let (status, out) = post(
        &env,
        &notification(
            "firing",
            vec![
                v4_alert(1, "prod-a", "web", "firing"),
                v4_alert(2, "prod-a", "web", "firing"),
            ],
        ),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["started"].as_array().unwrap().len(), 1);
    assert!(
        out["held_back"][0]
            .as_str()
            .unwrap()
            .contains("cooldown: a run for namespace=prod-a,deployment=web"),
        "{out}"
    );
    // Another target starts; a third one is over max-runs.
    let (_, out) = post(
        &env,
        &notification("firing", vec![v4_alert(3, "prod-b", "api", "firing")]),
        Some(TOKEN),
    )
    .await;
    assert_eq!(out["started"].as_array().unwrap().len(), 1, "{out}");
    let (_, out) = post(
        &env,
        &notification("firing", vec![v4_alert(4, "prod-c", "api", "firing")]),
        Some(TOKEN),
    )
    .await;
    assert!(
        out["held_back"][0]
            .as_str()
            .unwrap()
            .contains("max-runs: 2 runs in the last 1h"),
        "{out}"
    );
    // A repeat notification of a started episode is a duplicate, not a new run.
    let (_, out) = post(
        &env,
        &notification("firing", vec![v4_alert(3, "prod-b", "api", "firing")]),
        Some(TOKEN),
    )
    .await;
    assert_eq!(out["duplicates"], 1, "{out}");
    assert_eq!(count(&env, "select count(*) from runs").await, 2);
    // What was held back is visible.
    let (_, list) = env.get("/api/v1/alerts/episodes").await;
    let held: Vec<&Value> = list["episodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["outcome"] == "held-back")
        .collect();
    assert_eq!(held.len(), 2, "{list}");
    assert!(held.iter().all(|e| e["detail"].as_str().is_some_and(|d| !d.is_empty())));
}

#[tokio::test]
async fn bad_notifications_get_the_right_status_and_start_nothing() {
    let env = alert_env(CRASHLOOP).await;
    let good = notification("firing", vec![v4_alert(1, "prod-web", "web", "firing")]);
    assert_eq!(post(&env, &good, None).await.0, 401);
    assert_eq!(post(&env, &good, Some("wrong")).await.0, 401);
    let mut v3 = good.clone();
    v3["version"] = json!("3");
    let (status, body) = post(&env, &v3, Some(TOKEN)).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("version 3"), "{body}");
    let (status, body) = post(&env, &json!({ "version": "4", "status": "firing" }), Some(TOKEN)).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("alerts"), "{body}");
    let r = env
        .http
        .post(format!("{}/hooks/alertmanager", env.api))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // An alert whose own status is neither firing nor resolved is refused, naming the alert.
    let exploding = notification(
        "firing",
        vec![
            v4_alert(1, "prod-web", "web", "firing"),
            v4_alert(2, "prod-web", "web", "exploding"),
        ],
    );
    let (status, body) = post(&env, &exploding, Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("alerts[1]") && error.contains("0000000000000002") && error.contains("\"exploding\""),
        "{error}"
    );
    assert_eq!(count(&env, "select count(*) from runs").await, 0);
    // Nothing was recorded of any of these: not a notification, not an episode.
    assert_eq!(count(&env, "select count(*) from alert_notifications").await, 0);
    assert_eq!(count(&env, "select count(*) from alert_episodes").await, 0);
}

#[tokio::test]
async fn alert_routes_without_credentials_are_refused_unless_the_config_says_so_in_so_many_words() {
    let dir = std::env::temp_dir().join(format!("dayshift-alerts-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |yaml: String| {
        let path = dir.join(format!("{}.yaml", unique()));
        std::fs::write(&path, yaml).unwrap();
        std::process::Command::new(dayshift_tests::dayshift_bin())
            .args(["config", "check", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = check(format!("alertmanager:\n  routes:\n{CRASHLOOP}"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("alertmanager.token") && stderr.contains("allow-unauthenticated: true"),
        "{stderr}"
    );
    // An empty secret file is no secret.
    std::fs::write(dir.join("empty"), "\n").unwrap();
    let out = check(format!(
        "alertmanager:\n  token: {{ file: {} }}\n  routes:\n{CRASHLOOP}",
        dir.join("empty").display()
    ));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is empty"), "{stderr}");
    let out = check(format!(
        "alertmanager:\n  allow-unauthenticated: true\n  routes:\n{CRASHLOOP}"
    ));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Basic auth, as Alertmanager's http_config.basic_auth sends it.
    std::fs::write(dir.join("password"), "s3cret-am\n").unwrap();
    let env = BinEnv::start_with(&format!(
        "alertmanager:\n  basic-auth: {{ username: am, password: {{ file: {} }} }}\n  routes:\n{CRASHLOOP}",
        dir.join("password").display()
    ))
    .await;
    let good = notification("firing", vec![v4_alert(1, "prod-web", "web", "firing")]);
    let send = |user: &str, password: &str| {
        env.http
            .post(format!("{}/hooks/alertmanager", env.api))
            .basic_auth(user, Some(password))
            .json(&good)
            .send()
    };
    assert_eq!(send("am", "wrong").await.unwrap().status().as_u16(), 401);
    assert_eq!(send("other", "s3cret-am").await.unwrap().status().as_u16(), 401);
    assert_eq!(post(&env, &good, Some("s3cret-am")).await.0, 401);
    assert_eq!(count(&env, "select count(*) from alert_notifications").await, 0);
    assert_eq!(send("am", "s3cret-am").await.unwrap().status().as_u16(), 200);
    assert_eq!(count(&env, "select count(*) from alert_episodes").await, 1);
}

#[tokio::test]
async fn two_hundred_concurrent_notifications_for_one_route_are_all_answered_with_one_run_per_episode() {
    let env = alert_env(CRASHLOOP).await;
    // 50 episodes, each sent four times at once (repeats, an HA pair, a group's re-sends).
    let bodies: Vec<Value> = (0..200)
        .map(|i| notification("firing", vec![v4_alert(i % 50, "prod-web", "web", "firing")]))
        .collect();
    let answers = futures::future::join_all(bodies.iter().map(|b| post(&env, b, Some(TOKEN)))).await;
    let failed: Vec<&(u16, Value)> = answers.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of 200 not answered 200: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert_eq!(count(&env, "select count(*) from runs").await, 50);
    assert_eq!(
        count(&env, "select count(*) from alert_episodes where outcome = 'started'").await,
        50
    );
    assert_eq!(count(&env, "select count(*) from alert_notifications").await, 200);
}

#[tokio::test]
async fn an_ha_pair_of_alertmanagers_starts_one_run_per_episode() {
    let env = alert_env(CRASHLOOP).await;
    let url = format!("{}/hooks/alertmanager", env.api);
    // Two Alertmanagers that both get the alert from Prometheus, as an HA pair does.
    let (a, b) = (
        OwnAlertmanager::start(&url, TOKEN).await.unwrap(),
        OwnAlertmanager::start(&url, TOKEN).await.unwrap(),
    );
    let alert = json!([am_alert(
        "KubePodCrashLooping",
        "prod-web",
        Utc::now() - chrono::Duration::seconds(10),
        None
    )]);
    a.post_alerts(&alert).await.unwrap();
    b.post_alerts(&alert).await.unwrap();
    wait_until(&env, "select count(*) from alert_notifications", 4).await;
    assert_eq!(count(&env, "select count(*) from runs").await, 1);
}

#[tokio::test]
async fn resolved_alerts_inside_a_firing_group_are_signalled_one_by_one() {
    let env = alert_env(CRASHLOOP).await;
    let (a, b) = (
        v4_alert(1, "prod-a", "web", "firing"),
        v4_alert(2, "prod-b", "web", "firing"),
    );
    let (_, out) = post(&env, &notification("firing", vec![a.clone(), b.clone()]), Some(TOKEN)).await;
    assert_eq!(out["started"].as_array().unwrap().len(), 2, "{out}");
    // The group still fires (a does), but b inside it has resolved.
    let mut b_resolved = b.clone();
    b_resolved["status"] = json!("resolved");
    b_resolved["endsAt"] = json!(Utc::now().to_rfc3339());
    let (status, out) = post(&env, &notification("firing", vec![a, b_resolved.clone()]), Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(
        (out["duplicates"].clone(), out["resolved_signals"].clone()),
        (json!(1), json!(1)),
        "{out}"
    );
    // The same resolved notification again signals nothing new.
    let (_, out) = post(&env, &notification("resolved", vec![b_resolved]), Some(TOKEN)).await;
    assert_eq!(out["resolved_signals"], 0, "{out}");
    let signals: i64 = count(&env, "select count(*) from signals where name = 'resolved'").await;
    assert_eq!(signals, 1);
    assert_eq!(count(&env, "select count(*) from runs").await, 2);
}

#[tokio::test]
async fn a_notification_above_the_cap_gets_413() {
    let env = BinEnv::start_with(&format!(
        "alertmanager:\n  max-body-bytes: 10000\n  allow-unauthenticated: true\n  routes:\n{CRASHLOOP}"
    ))
    .await;
    let big = notification(
        "firing",
        (0..100).map(|i| v4_alert(i, "prod-a", "web", "firing")).collect(),
    );
    let (status, body) = post(&env, &big, None).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(count(&env, "select count(*) from runs").await, 0);
}
