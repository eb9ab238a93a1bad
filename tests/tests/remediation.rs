//! Alertmanager remediation playbooks: a real Alertmanager (or its exact notifications) to
//! `dayshift serve`, actions against the Kubernetes API stand-in, notices to a local webhook.

use std::time::Duration;

use chrono::Utc;
use dayshift_tests::kube_api::KubeApi;
use dayshift_tests::{BinEnv, OwnAlertmanager, WebhookReceiver, unique};
use serde_json::{Value, json};

const TOKEN: &str = "am-bearer-token";
const LIMIT: Duration = Duration::from_secs(60);
const WEB: &str = "/apis/apps/v1/namespaces/prod-web/deployments/web";

struct Rig {
    env: BinEnv,
    kube: KubeApi,
    chat: WebhookReceiver,
}

/// `dayshift serve` and a worker with the crash-loop route and playbook `extra` (YAML lines
/// under the playbook), a cluster with Deployment prod-web/web and staging-web/web.
async fn rig(playbook: &str) -> Rig {
    rig_for("KubePodCrashLooping", playbook).await
}

/// Same, for alerts named `alertname`.
async fn rig_for(alertname: &str, playbook: &str) -> Rig {
    let kube = KubeApi::start().await;
    for ns in ["prod-web", "staging-web"] {
        kube.put(json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": { "name": "web", "namespace": ns },
            "spec": { "replicas": 2, "template": { "metadata": { "labels": { "app": "web" } } } },
        }));
    }
    let chat = WebhookReceiver::start().await;
    let dir = std::env::temp_dir().join(format!("dayshift-remediation-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    std::fs::write(dir.join("chat"), &chat.url).unwrap();
    let yaml = format!(
        "alertmanager:\n  token: {{ file: {} }}\n  routes:\n    - name: crashloop\n      matchers: ['alertname=\"{alertname}\"']\n      workflow: remediate\n      \
         input: {{ playbook: crash-loop, labels: \"{{{{ labels }}}}\", annotations: \"{{{{ annotations }}}}\", fingerprint: \"{{{{ fingerprint }}}}\", starts_at: \"{{{{ starts_at }}}}\" }}\n      \
         guardrails: {{ target: [namespace, deployment], cooldown: 10m }}\n\
         connections:\n  kubernetes:\n    cluster: {{ url: \"{}\" }}\n  notify:\n    ops: {{ url: {{ file: {} }} }}\n\
         playbooks:\n  crash-loop:\n    kubernetes: cluster\n    namespaces: [\"prod-*\"]\n    escalate: ops\n{playbook}",
        dir.join("token").display(),
        kube.url,
        dir.join("chat").display(),
    );
    let env = BinEnv::start_with(&yaml).await;
    Rig { env, kube, chat }
}

const RESTART: &str = "    actions:\n      - action: kube.rollout-restart\n        with: { kind: Deployment, namespace: \"{{ labels.namespace }}\", name: \"{{ labels.deployment }}\" }\n";

fn alert(namespace: &str, starts: chrono::DateTime<Utc>, ends: Option<chrono::DateTime<Utc>>) -> Value {
    let mut a = json!({
        "labels": { "alertname": "KubePodCrashLooping", "namespace": namespace, "deployment": "web", "pod": "web-7d9f-x2", "severity": "critical" },
        "annotations": { "summary": "Pod web-7d9f-x2 is crash looping." },
        "startsAt": starts.to_rfc3339(),
        "generatorURL": "http://prometheus.example/graph",
    });
    if let Some(ends) = ends {
        a["endsAt"] = json!(ends.to_rfc3339());
    }
    a
}

/// The remediation runs so far.
async fn runs(env: &BinEnv) -> Vec<Value> {
    let (_, list) = env.get("/api/v1/runs?workflow=remediate&limit=100").await;
    list["runs"].as_array().unwrap().clone()
}

async fn first_run(env: &BinEnv) -> String {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Some(r) = runs(env).await.first() {
            return r["id"].as_str().unwrap().to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "no remediation started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn restarts(kube: &KubeApi) -> Vec<dayshift_tests::kube_api::Recorded> {
    kube.writes().into_iter().filter(|w| w.method == "PATCH").collect()
}

#[tokio::test]
async fn a_crash_loop_gets_one_rollout_restart_and_the_resolution_ends_the_run() {
    let rig = rig(&format!("{RESTART}    wait-resolved: 5m\n")).await;
    let _worker = rig.env.start_worker().await;
    let am = OwnAlertmanager::start(&format!("{}/hooks/alertmanager", rig.env.api), TOKEN)
        .await
        .unwrap();
    let started = Utc::now() - chrono::Duration::seconds(30);
    am.post_alerts(&json!([alert("prod-web", started, None)]))
        .await
        .unwrap();
    let id = first_run(&rig.env).await;
    rig.env
        .wait_run(&id, LIMIT, |r| {
            r["steps"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "resolved" && s["status"] == "waiting"))
        })
        .await;
    // Exactly the patch `kubectl rollout restart` sends, once, repeats included.
    let patches = restarts(&rig.kube);
    assert_eq!(patches.len(), 1, "{patches:#?}");
    assert_eq!(patches[0].path, WEB);
    assert_eq!(patches[0].content_type, "application/strategic-merge-patch+json");
    assert!(
        patches[0].body["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"].is_string()
    );
    am.post_alerts(&json!([alert("prod-web", started, Some(Utc::now()))]))
        .await
        .unwrap();
    let run = rig.env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"]["outcome"], "resolved");
    assert!(
        run["output"]["time_to_resolve_seconds"].as_f64().unwrap() >= 30.0,
        "{run:#}"
    );
    assert_eq!(run["output"]["taken"][0]["action"], "restart Deployment prod-web/web");
    assert_eq!(restarts(&rig.kube).len(), 1);
}

#[tokio::test]
async fn an_alert_that_never_resolves_escalates_with_the_alert_and_what_was_tried() {
    let rig = rig(&format!("{RESTART}    wait-resolved: 2s\n")).await;
    let _worker = rig.env.start_worker().await;
    let am = OwnAlertmanager::start(&format!("{}/hooks/alertmanager", rig.env.api), TOKEN)
        .await
        .unwrap();
    am.post_alerts(&json!([alert("prod-web", Utc::now(), None)]))
        .await
        .unwrap();
    let id = first_run(&rig.env).await;
    let run = rig.env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert!(
        run["error"].as_str().unwrap().contains("did not resolve within 2s"),
        "{run:#}"
    );
    let notice = rig.chat.wait_for(1, LIMIT).await[0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        notice.contains("KubePodCrashLooping") && notice.contains("did not resolve"),
        "{notice}"
    );
    assert!(
        notice.contains("restart Deployment prod-web/web") && notice.contains("\"namespace\":\"prod-web\""),
        "{notice}"
    );
    assert!(notice.contains(&id), "{notice}");
}

/// Alertmanager's webhook body (version 4).
fn notification(status: &str, mut alerts: Vec<Value>) -> Value {
    for a in &mut alerts {
        if a.get("fingerprint").is_none() {
            a["fingerprint"] = json!(format!("fp-{}", a["labels"]["namespace"].as_str().unwrap_or_default()));
        }
        if a.get("status").is_none() {
            a["status"] = json!(status);
        }
    }
    json!({
        "version": "4", "groupKey": "{}:{alertname=\"KubePodCrashLooping\"}", "truncatedAlerts": 0,
        "status": status, "receiver": "dayshift", "groupLabels": {}, "commonLabels": {},
        "commonAnnotations": {}, "externalURL": "http://alertmanager.example", "alerts": alerts,
    })
}

async fn notify(env: &BinEnv, body: &Value) {
    let r = env
        .http
        .post(format!("{}/hooks/alertmanager", env.api))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn a_flapping_alert_does_not_restart_twenty_times() {
    let rig = rig(&format!("{RESTART}    wait-resolved: 5m\n")).await;
    let _worker = rig.env.start_worker().await;
    let base = Utc::now() - chrono::Duration::seconds(60);
    for i in 0..20 {
        let starts = base + chrono::Duration::seconds(3 * i);
        let mut firing = alert("prod-web", starts, None);
        firing["status"] = json!("firing");
        firing["fingerprint"] = json!("f00d");
        notify(&rig.env, &notification("firing", vec![firing.clone()])).await;
        let mut resolved = alert("prod-web", starts, Some(starts + chrono::Duration::seconds(2)));
        resolved["status"] = json!("resolved");
        resolved["fingerprint"] = json!("f00d");
        notify(&rig.env, &notification("resolved", vec![resolved])).await;
    }
    let id = first_run(&rig.env).await;
    rig.env.wait_finished(&id, LIMIT).await;
    assert_eq!(
        runs(&rig.env).await.len(),
        1,
        "more than one remediation for a flapping alert"
    );
    assert_eq!(restarts(&rig.kube).len(), 1);
}

#[tokio::test]
async fn label_values_that_are_not_kubernetes_names_act_on_nothing_and_say_why() {
    // The allow-list glob `prod-*` would match these; the names must still be names.
    let rig = rig(&format!("{RESTART}    wait-resolved: 5m\n")).await;
    let _w = rig.env.start_worker().await;
    let cases = [
        (
            "prod-web/../../kube-system",
            "web",
            "namespace \"prod-web/../../kube-system\" is not a Kubernetes namespace",
        ),
        (
            "prod-web",
            "web?dryRun=All",
            "name \"web?dryRun=All\" is not a Kubernetes object name",
        ),
        (
            "prod-Web",
            "web",
            "namespace \"prod-Web\" is not a Kubernetes namespace",
        ),
    ];
    for (i, (namespace, deployment, _)) in cases.iter().enumerate() {
        let mut a = alert(namespace, Utc::now(), None);
        a["labels"]["deployment"] = json!(deployment);
        a["fingerprint"] = json!(format!("fp-hostile-{i}"));
        notify(&rig.env, &notification("firing", vec![a])).await;
    }
    let deadline = tokio::time::Instant::now() + LIMIT;
    let all = loop {
        let all = runs(&rig.env).await;
        if all.len() == cases.len() && all.iter().all(|r| r["status"] == "failed") {
            break all;
        }
        assert!(tokio::time::Instant::now() < deadline, "{all:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (_, _, expected) in cases {
        assert!(
            all.iter()
                .any(|r| r["error"].as_str().unwrap_or_default().contains(expected)),
            "no run failed with {expected:?}: {all:#?}"
        );
    }
    assert!(rig.kube.writes().is_empty(), "{:?}", rig.kube.writes());
}

#[tokio::test]
async fn dry_run_allow_list_and_missing_labels_do_nothing_and_say_so() {
    // Dry run: the plan is recorded, nothing is sent to the cluster.
    let rig_dry = rig(&format!("{RESTART}    dry-run: true\n")).await;
    let _w = rig_dry.env.start_worker().await;
    notify(
        &rig_dry.env,
        &notification("firing", vec![alert("prod-web", Utc::now(), None)]),
    )
    .await;
    let run = rig_dry.env.wait_finished(&first_run(&rig_dry.env).await, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["output"]["outcome"], "dry-run");
    assert_eq!(run["output"]["plan"], json!(["restart Deployment prod-web/web"]));
    assert!(rig_dry.kube.writes().is_empty());

    // A namespace outside the allow-list is refused, and the refusal is the run's error.
    let rig_ns = rig(&format!("{RESTART}    wait-resolved: 5m\n")).await;
    let _w = rig_ns.env.start_worker().await;
    notify(
        &rig_ns.env,
        &notification("firing", vec![alert("staging-web", Utc::now(), None)]),
    )
    .await;
    let run = rig_ns.env.wait_finished(&first_run(&rig_ns.env).await, LIMIT).await;
    assert_eq!(run["status"], "failed");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("namespace \"staging-web\" is not in the playbook's allow-list"),
        "{run:#}"
    );
    assert!(rig_ns.kube.writes().is_empty());

    // A playbook that needs a label the alert does not have: a clear error, nothing done.
    let rig_label = rig(
        "    actions:\n      - action: kube.rollout-restart\n        with: { kind: Deployment, namespace: \"{{ labels.namespace }}\", name: \"{{ labels.statefulset }}\" }\n",
    )
    .await;
    let _w = rig_label.env.start_worker().await;
    notify(
        &rig_label.env,
        &notification("firing", vec![alert("prod-web", Utc::now(), None)]),
    )
    .await;
    let run = rig_label
        .env
        .wait_finished(&first_run(&rig_label.env).await, LIMIT)
        .await;
    assert_eq!(run["status"], "failed");
    let error = run["error"].as_str().unwrap();
    assert!(
        error.contains("labels.statefulset") && error.contains("alertname, deployment, namespace"),
        "{error}"
    );
    assert!(rig_label.kube.writes().is_empty());
}

#[tokio::test]
async fn a_filling_volume_grows_only_where_its_storage_class_allows_and_remediations_are_listed() {
    let rig = rig_for(
        "KubePersistentVolumeFillingUp",
        "    actions:\n      - action: pvc.expand\n        with: { namespace: \"{{ labels.namespace }}\", name: \"{{ labels.persistentvolumeclaim }}\", percent: 50, max: 30Gi }\n    wait-resolved: 5m\n",
    )
    .await;
    for (name, expandable) in [("expandable", true), ("fixed", false)] {
        rig.kube.put(json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": { "name": name },
            "provisioner": "driver.longhorn.io", "allowVolumeExpansion": expandable,
        }));
    }
    for (pvc, class) in [("data-0", "expandable"), ("data-1", "fixed")] {
        rig.kube.put(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": { "name": pvc, "namespace": "prod-db" },
            "spec": { "storageClassName": class, "accessModes": ["ReadWriteOnce"], "resources": { "requests": { "storage": "10Gi" } } },
        }));
    }
    let _worker = rig.env.start_worker().await;
    let since = Utc::now() - chrono::Duration::seconds(120);
    let filling = |pvc: &str, ends: Option<chrono::DateTime<Utc>>| {
        let mut a = json!({
            "labels": { "alertname": "KubePersistentVolumeFillingUp", "namespace": "prod-db", "deployment": pvc, "persistentvolumeclaim": pvc },
            "annotations": { "summary": "volume is 97% full" },
            "startsAt": since.to_rfc3339(),
            "fingerprint": format!("fp-{pvc}"), "status": if ends.is_some() { "resolved" } else { "firing" },
        });
        if let Some(ends) = ends {
            a["endsAt"] = json!(ends.to_rfc3339());
        }
        a
    };
    notify(&rig.env, &notification("firing", vec![filling("data-0", None)])).await;
    let grown = first_run(&rig.env).await;
    rig.env
        .wait_run(&grown, LIMIT, |r| {
            r["steps"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "resolved" && s["status"] == "waiting"))
        })
        .await;
    let pvc = rig
        .kube
        .get("/api/v1/namespaces/prod-db/persistentvolumeclaims/data-0")
        .unwrap();
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "15Gi");
    notify(
        &rig.env,
        &notification("resolved", vec![filling("data-0", Some(Utc::now()))]),
    )
    .await;
    let run = rig.env.wait_finished(&grown, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(
        run["output"]["taken"][0]["response"],
        json!({ "expanded": "prod-db/data-0", "from": "10Gi", "to": "15Gi" })
    );

    notify(&rig.env, &notification("firing", vec![filling("data-1", None)])).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let refused = loop {
        let all = runs(&rig.env).await;
        if all.len() == 2 {
            break all[0]["id"].as_str().unwrap().to_string();
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let run = rig.env.wait_finished(&refused, LIMIT).await;
    assert_eq!(run["status"], "failed");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("StorageClass fixed of PersistentVolumeClaim prod-db/data-1 does not allow volume expansion"),
        "{run:#}"
    );
    let pvc = rig
        .kube
        .get("/api/v1/namespaces/prod-db/persistentvolumeclaims/data-1")
        .unwrap();
    assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "10Gi");

    // Both are on record, through the API and the CLI.
    let (_, list) = rig.env.get("/api/v1/remediations").await;
    let list = list["remediations"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1]["outcome"], "resolved");
    assert_eq!(list[1]["alert"]["labels"]["persistentvolumeclaim"], "data-0");
    assert!(list[1]["time_to_resolve_seconds"].as_f64().unwrap() >= 120.0);
    assert_eq!(list[0]["outcome"], "failed");
    let out = std::process::Command::new(dayshift_tests::dayshift_bin())
        .args(["remediations", "--server", &rig.env.api])
        .env("DAYSHIFT_TOKEN", &rig.env.token)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("crash-loop")
            && text.contains("KubePersistentVolumeFillingUp prod-db")
            && text.contains("expand PersistentVolumeClaim prod-db/data-0 by 50% up to 30Gi"),
        "{text}"
    );
}

#[tokio::test]
async fn escalation_actions_run_when_the_first_fix_did_not_help() {
    let rig = rig(
        "    actions:\n      - action: kube.delete-pod\n        with: { namespace: \"{{ labels.namespace }}\", name: \"{{ labels.pod }}\" }\n    wait-resolved: 1s\n    escalate-actions:\n      - action: kube.cordon-node\n        with: { node: \"{{ labels.node }}\" }\n",
    )
    .await;
    rig.kube.put(json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "web-7d9f-x2", "namespace": "prod-web" }, "spec": {} }));
    rig.kube
        .put(json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node-1" }, "spec": {} }));
    let _worker = rig.env.start_worker().await;
    let mut a = alert("prod-web", Utc::now(), None);
    a["labels"]["node"] = json!("node-1");
    notify(&rig.env, &notification("firing", vec![a])).await;
    let run = rig.env.wait_finished(&first_run(&rig.env).await, LIMIT).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert!(
        rig.kube.get("/api/v1/namespaces/prod-web/pods/web-7d9f-x2").is_none(),
        "the pod was not deleted"
    );
    assert_eq!(
        rig.kube.get("/api/v1/nodes/node-1").unwrap()["spec"]["unschedulable"],
        true
    );
    assert!(
        rig.chat.wait_for(1, LIMIT).await[0]["text"]
            .as_str()
            .unwrap()
            .contains("did not resolve within 1s")
    );
}

#[tokio::test]
async fn a_destructive_action_waits_for_an_approval_and_a_rejection_does_nothing() {
    let rig = rig(
        "    actions:\n      - action: kube.delete-pod\n        destructive: true\n        with: { namespace: \"{{ labels.namespace }}\", name: \"{{ labels.pod }}\" }\n    approval: { approvers: [\"token:oncall@acme.io\"] }\n    wait-resolved: 5m\n",
    )
    .await;
    rig.kube.put(json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "web-7d9f-x2", "namespace": "prod-web" }, "spec": {} }));
    let _worker = rig.env.start_worker().await;
    let waiting_for_approval = |r: &Value| {
        r["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == "approval" && s["status"] == "waiting"))
    };
    notify(
        &rig.env,
        &notification("firing", vec![alert("prod-web", Utc::now(), None)]),
    )
    .await;
    let id = first_run(&rig.env).await;
    rig.env.wait_run(&id, LIMIT, waiting_for_approval).await;
    assert!(
        rig.kube.get("/api/v1/namespaces/prod-web/pods/web-7d9f-x2").is_some(),
        "deleted before approval"
    );
    let notice = rig.chat.wait_for(1, LIMIT).await[0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        notice.contains("wants to delete Pod prod-web/web-7d9f-x2") && notice.contains(&id),
        "{notice}"
    );
    // Someone not on the list cannot approve; on-call can.
    for (by, expected) in [("intern@acme.io", 403), ("oncall@acme.io", 202)] {
        let (status, body) = rig
            .env
            .post_as(
                &rig.env.as_user(by).await,
                &format!("/api/v1/runs/{id}/approve"),
                &json!({}),
            )
            .await;
        assert_eq!(status, expected, "{by}: {body}");
    }
    rig.env
        .wait_run(&id, LIMIT, |r| {
            r["steps"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "resolved" && s["status"] == "waiting"))
        })
        .await;
    assert!(
        rig.kube.get("/api/v1/namespaces/prod-web/pods/web-7d9f-x2").is_none(),
        "not deleted after approval"
    );
    let (_, run) = rig.env.get(&format!("/api/v1/runs/{id}")).await;
    let steps = run["steps"].as_array().unwrap();
    let decision = |n: usize| steps.iter().find(|s| s["name"] == format!("decision:{n}")).unwrap()["output"].clone();
    assert_eq!(decision(1)["by"], "token:oncall@acme.io");
    assert_eq!(decision(1)["ignored"], Value::Null);

    // The next episode (another pod's deployment) is rejected: nothing is deleted.
    rig.kube.put(json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "api-1", "namespace": "prod-web" }, "spec": {} }));
    let mut second = alert("prod-web", Utc::now(), None);
    second["labels"]["pod"] = json!("api-1");
    second["labels"]["deployment"] = json!("api");
    second["fingerprint"] = json!("fp-api");
    notify(&rig.env, &notification("firing", vec![second])).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let id2 = loop {
        let all = runs(&rig.env).await;
        if let Some(r) = all.iter().find(|r| r["id"] != json!(id)) {
            break r["id"].as_str().unwrap().to_string();
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    rig.env.wait_run(&id2, LIMIT, waiting_for_approval).await;
    let (status, _) = rig
        .env
        .post_as(
            &rig.env.as_user("oncall@acme.io").await,
            &format!("/api/v1/runs/{id2}/reject"),
            &json!({ "comment": "api is being migrated" }),
        )
        .await;
    assert_eq!(status, 202);
    let run = rig.env.wait_finished(&id2, LIMIT).await;
    assert_eq!(run["status"], "failed");
    assert!(
        run["error"]
            .as_str()
            .unwrap()
            .contains("rejected by token:oncall@acme.io: api is being migrated")
    );
    assert!(
        rig.kube.get("/api/v1/namespaces/prod-web/pods/api-1").is_some(),
        "deleted after a rejection"
    );
}

#[tokio::test]
async fn scale_stays_within_the_blast_radius_and_workflow_http_and_notify_actions_run() {
    let rig = rig(
        "    max-replicas: 3\n    actions:\n      - action: kube.scale\n        with: { kind: Deployment, namespace: \"{{ labels.namespace }}\", name: \"{{ labels.deployment }}\", by: 5 }\n      - action: workflow\n        with: { workflow: selftest.chain, input: { steps: 1 } }\n      - action: http\n        with: { url: \"{{ annotations.hook }}\" }\n      - action: notify\n        with: { to: ops, text: \"scaled {{ labels.deployment }} in {{ labels.namespace }}\" }\n    wait-resolved: 1s\n",
    )
    .await;
    let _worker = rig.env.start_worker().await;
    let mut a = alert("prod-web", Utc::now(), None);
    a["annotations"]["hook"] = json!(format!("{}/healthz", rig.env.api));
    notify(&rig.env, &notification("firing", vec![a])).await;
    let run = rig.env.wait_finished(&first_run(&rig.env).await, LIMIT).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert!(
        run["error"].as_str().unwrap().contains("did not resolve within 1s"),
        "{run:#}"
    );
    // +5 from 2 would be 7: the playbook's maximum of 3 holds.
    let web = rig.kube.get(WEB).unwrap();
    assert_eq!(web["spec"]["replicas"], 3);
    let steps = run["steps"].as_array().unwrap();
    let scaled = steps
        .iter()
        .find(|s| s["name"].as_str().unwrap().starts_with("action:1:"))
        .unwrap();
    assert_eq!(
        scaled["output"]["response"],
        json!({ "scaled": "Deployment prod-web/web", "from": 2, "to": 3 })
    );
    let child = steps.iter().find(|s| s["kind"] == "child").unwrap();
    let (_, chain) = rig
        .env
        .get(&format!("/api/v1/runs/{}", child["child_run_id"].as_str().unwrap()))
        .await;
    assert_eq!(chain["status"], "succeeded");
    let http = steps
        .iter()
        .find(|s| s["name"].as_str().unwrap().starts_with("action:3:"))
        .unwrap();
    assert_eq!(http["output"]["response"], json!({ "status": 200 }));
    // The notice, then the escalation, reached the webhook receiver.
    let got = rig.chat.wait_for(2, LIMIT).await;
    assert!(got.iter().any(|m| m["text"] == "scaled web in prod-web"), "{got:#?}");
    assert!(
        got.iter()
            .any(|m| m["text"].as_str().is_some_and(|t| t.contains("did not resolve"))),
        "{got:#?}"
    );
}
