//! deploy/: the Kubernetes manifests render (`kubectl kustomize`), parse, and are valid for the
//! Kubernetes API types they claim; the pieces fit together (selectors, ports, the config they
//! mount); the PrometheusRule is exactly the rule files promtool tests; the Dockerfile builds a
//! non-root image. No cluster is needed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(text)
        .expect("valid YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn render(dir: &Path) -> Vec<Value> {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl is missing: run `scripts/services.sh up`");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8(out.stdout).unwrap())
}

/// Where `a` and `b` differ, as paths (a field the typed API object dropped shows as missing).
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => differences(&format!("{path}.{k}"), v, w, out),
                    None => out.push(format!("{path}.{k}: not a field of the API type")),
                }
            }
            for k in y.keys().filter(|k| !x.contains_key(*k)) {
                out.push(format!("{path}.{k}: added"));
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                differences(&format!("{path}[{i}]"), v, w, out);
            }
        }
        _ if a == b => {}
        _ => out.push(format!("{path}: {a} is read as {b}")),
    }
}

/// The object read as its Kubernetes API type and written back: what does not survive is
/// not valid for that type (an unknown or misspelt field, a value of the wrong type).
fn check_typed(o: &Value) -> Result<(), String> {
    use k8s_openapi::api::{apps, batch, core, networking, policy, rbac};
    fn round<T: serde::de::DeserializeOwned + serde::Serialize>(o: &Value) -> Result<Value, String> {
        let typed: T = serde_json::from_value(o.clone()).map_err(|e| e.to_string())?;
        serde_json::to_value(typed).map_err(|e| e.to_string())
    }
    let kind = (o["apiVersion"].as_str().unwrap_or(""), o["kind"].as_str().unwrap_or(""));
    let back = match kind {
        ("v1", "ServiceAccount") => round::<core::v1::ServiceAccount>(o)?,
        ("v1", "ConfigMap") => round::<core::v1::ConfigMap>(o)?,
        ("v1", "Service") => round::<core::v1::Service>(o)?,
        ("apps/v1", "Deployment") => round::<apps::v1::Deployment>(o)?,
        ("batch/v1", "Job") => round::<batch::v1::Job>(o)?,
        ("policy/v1", "PodDisruptionBudget") => round::<policy::v1::PodDisruptionBudget>(o)?,
        ("networking.k8s.io/v1", "NetworkPolicy") => round::<networking::v1::NetworkPolicy>(o)?,
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round::<rbac::v1::ClusterRole>(o)?,
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => round::<rbac::v1::ClusterRoleBinding>(o)?,
        ("rbac.authorization.k8s.io/v1", "Role") => round::<rbac::v1::Role>(o)?,
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round::<rbac::v1::RoleBinding>(o)?,
        ("monitoring.coreos.com/v1", "PrometheusRule" | "ServiceMonitor") => return Ok(()),
        other => return Err(format!("{other:?} is not a kind this test knows")),
    };
    let mut diff = Vec::new();
    differences("", o, &back, &mut diff);
    if diff.is_empty() { Ok(()) } else { Err(diff.join("; ")) }
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn named(objects: &[Value], kind: &str, name: &str) -> Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_overlays_render_into_valid_objects_that_fit_together() {
    for overlay in ["staging", "production"] {
        let objects = render(&repo().join("deploy/kubernetes/overlays").join(overlay));
        let mut problems = Vec::new();
        for o in &objects {
            if let Err(e) = check_typed(o) {
                problems.push(format!("{} {}: {e}", o["kind"], o["metadata"]["name"]));
            }
            if o["metadata"]["namespace"].is_null()
                && !["ClusterRole", "ClusterRoleBinding"].contains(&o["kind"].as_str().unwrap())
            {
                problems.push(format!("{} {}: no namespace", o["kind"], o["metadata"]["name"]));
            }
        }
        assert!(problems.is_empty(), "{overlay}:\n{}", problems.join("\n"));

        let deployments: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Deployment").collect();
        let pods: Vec<&Value> = deployments.iter().map(|d| &d["spec"]["template"]).collect();
        for d in &deployments {
            let name = d["metadata"]["name"].as_str().unwrap();
            assert!(
                labels_match(
                    &d["spec"]["selector"]["matchLabels"],
                    &d["spec"]["template"]["metadata"]["labels"]
                ),
                "{name}: selector"
            );
            let spec = &d["spec"]["template"]["spec"];
            assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
            for c in spec["containers"].as_array().unwrap() {
                assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{name}");
                assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{name}");
                let image = c["image"].as_str().unwrap();
                assert!(
                    image.starts_with("registry.example.com/platform/dayshift:"),
                    "{name}: {image}"
                );
                // The ServiceAccount and ConfigMap it uses exist.
                assert_eq!(c["args"][1], "/etc/dayshift/dayshift.yaml");
            }
            named(&objects, "ServiceAccount", spec["serviceAccountName"].as_str().unwrap());
        }
        // Every Service, NetworkPolicy and PodDisruptionBudget selects a workload's pods, and
        // a Service's named target port is one of that pod's ports.
        for o in &objects {
            let selector = match o["kind"].as_str().unwrap() {
                "Service" => &o["spec"]["selector"],
                "NetworkPolicy" => &o["spec"]["podSelector"]["matchLabels"],
                "PodDisruptionBudget" => &o["spec"]["selector"]["matchLabels"],
                _ => continue,
            };
            let selected: Vec<&&Value> = pods
                .iter()
                .filter(|p| labels_match(selector, &p["metadata"]["labels"]))
                .collect();
            assert_eq!(
                selected.len(),
                1,
                "{} {} selects {} workloads",
                o["kind"],
                o["metadata"]["name"],
                selected.len()
            );
            if o["kind"] == "Service" {
                for port in o["spec"]["ports"].as_array().unwrap() {
                    let target = &port["targetPort"];
                    let found = selected[0]["spec"]["containers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                        .any(|p| &p["name"] == target);
                    assert!(found, "Service {}: no container port {target}", o["metadata"]["name"]);
                }
            }
        }
        // The ServiceMonitor scrapes both Services, on ports they have.
        let monitor = named(&objects, "ServiceMonitor", "dayshift");
        let services: Vec<&Value> = objects
            .iter()
            .filter(|o| {
                o["kind"] == "Service"
                    && labels_match(&monitor["spec"]["selector"]["matchLabels"], &o["metadata"]["labels"])
            })
            .collect();
        assert_eq!(
            services.len(),
            2,
            "{overlay}: the ServiceMonitor selects serve and the workers"
        );
        for e in monitor["spec"]["endpoints"].as_array().unwrap() {
            assert!(
                services.iter().any(|s| s["spec"]["ports"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["name"] == e["port"])),
                "{overlay}: no Service port {}",
                e["port"]
            );
        }
        // A worker's grace period covers dayshift's shutdown grace period.
        let config = named(&objects, "ConfigMap", "dayshift-config");
        let yaml = config["data"]["dayshift.yaml"].as_str().unwrap();
        let app: Value = serde_saphyr::from_str(yaml).unwrap();
        let grace = humantime::parse_duration(app["shutdown-grace-period"].as_str().unwrap()).unwrap();
        let worker = named(&objects, "Deployment", "dayshift-worker");
        assert!(
            worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap()
                > grace.as_secs() + 5,
            "{overlay}: the worker's terminationGracePeriodSeconds must exceed shutdown-grace-period"
        );
        // The mounted config is one dayshift accepts.
        let dir = std::env::temp_dir().join(format!("dayshift-deploy-{}", dayshift_tests::unique()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dayshift.yaml"), yaml).unwrap();
        let out = std::process::Command::new(dayshift_tests::dayshift_bin())
            .args(["config", "check"])
            .arg(dir.join("dayshift.yaml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    // The installer's rights are production's only.
    let staging = render(&repo().join("deploy/kubernetes/overlays/staging"));
    assert!(!staging.iter().any(|o| o["metadata"]["name"] == "dayshift-installer"));
}

#[test]
fn each_pod_holds_only_the_rights_its_role_needs() {
    for overlay in ["staging", "production"] {
        let objects = render(&repo().join("deploy/kubernetes/overlays").join(overlay));
        let of_kind = |kind: &str| -> Vec<&Value> { objects.iter().filter(|o| o["kind"] == kind).collect() };
        // serve: its own ServiceAccount, no token mounted, no connection credentials.
        let serve = named(&objects, "Deployment", "dayshift-serve");
        let worker = named(&objects, "Deployment", "dayshift-worker");
        let pod = &serve["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "dayshift-serve", "{overlay}");
        assert_eq!(pod["automountServiceAccountToken"], false, "{overlay}");
        assert_eq!(
            named(&objects, "ServiceAccount", "dayshift-serve")["automountServiceAccountToken"],
            false
        );
        let env_of =
            |d: &Value| d["spec"]["template"]["spec"]["containers"][0]["envFrom"][0]["secretRef"]["name"].clone();
        assert_eq!(env_of(&serve), "dayshift-serve-env", "{overlay}");
        assert_eq!(env_of(&worker), "dayshift-worker-env", "{overlay}");
        assert_eq!(
            worker["spec"]["template"]["spec"]["serviceAccountName"],
            "dayshift-worker"
        );
        let job = named(&objects, "Job", "dayshift-migrate");
        assert_eq!(job["spec"]["template"]["spec"]["automountServiceAccountToken"], false);

        // Nothing is granted cluster-wide but what a component adds on purpose, and no rule
        // reads or writes Secrets except by name.
        let cluster_bindings: Vec<&str> = of_kind("ClusterRoleBinding")
            .iter()
            .map(|b| b["roleRef"]["name"].as_str().unwrap())
            .collect();
        let expected: &[&str] = if overlay == "production" {
            &["dayshift-installer"]
        } else {
            &[]
        };
        assert_eq!(cluster_bindings, expected, "{overlay}");
        for role in of_kind("ClusterRole").into_iter().chain(of_kind("Role")) {
            for rule in role["rules"].as_array().unwrap() {
                let resources = rule["resources"].as_array().unwrap();
                if resources.iter().any(|r| r == "secrets") {
                    assert!(
                        rule["resourceNames"].as_array().is_some_and(|n| !n.is_empty()),
                        "{overlay}: {} grants Secrets without resourceNames",
                        role["metadata"]["name"]
                    );
                }
            }
        }
        let day2 = named(&objects, "ClusterRole", "dayshift-day2");
        let granted: Vec<&Value> = day2["rules"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r["resources"].as_array().unwrap())
            .collect();
        assert!(!granted.iter().any(|r| *r == "nodes" || *r == "secrets"), "{granted:?}");
        // Every binding is to the workers, and the ArgoCD rights are in argocd only.
        for b in of_kind("RoleBinding").into_iter().chain(of_kind("ClusterRoleBinding")) {
            for s in b["subjects"].as_array().unwrap() {
                assert_eq!(s["name"], "dayshift-worker", "{overlay}: {}", b["metadata"]["name"]);
            }
        }
        assert_eq!(
            named(&objects, "Role", "dayshift-argocd")["metadata"]["namespace"],
            "argocd"
        );

        // Egress is bounded, and the cloud's metadata service is out of reach of every pod.
        for policy in of_kind("NetworkPolicy") {
            let name = policy["metadata"]["name"].as_str().unwrap();
            assert!(
                policy["spec"]["policyTypes"]
                    .as_array()
                    .unwrap()
                    .contains(&Value::from("Egress")),
                "{overlay}: {name} leaves egress open"
            );
            for rule in policy["spec"]["egress"].as_array().unwrap() {
                for to in rule["to"].as_array().unwrap() {
                    if let Some(block) = to.get("ipBlock") {
                        let except = block["except"].as_array().cloned().unwrap_or_default();
                        assert!(
                            except.contains(&Value::from("169.254.0.0/16")),
                            "{overlay}: {name} reaches the metadata service"
                        );
                    }
                }
            }
        }
    }
    // Previews deploy through their own AppProject: into preview-* namespaces only, of the
    // cluster-scoped kinds only their Namespace; and it is what preview.create names by default.
    let project =
        yaml_docs(&std::fs::read_to_string(repo().join("deploy/argocd/previews-appproject.yaml")).unwrap()).remove(0);
    assert_eq!(project["kind"], "AppProject");
    let destinations = project["spec"]["destinations"].as_array().unwrap();
    assert!(
        destinations.iter().all(|d| d["namespace"] == "preview-*"),
        "{destinations:?}"
    );
    assert_eq!(
        project["spec"]["clusterResourceWhitelist"],
        serde_json::json!([{ "group": "", "kind": "Namespace" }])
    );
    let input: dayshift_workflows::PreviewInput =
        serde_json::from_value(serde_json::json!({ "repository": "infra", "branch": "feat" })).unwrap();
    assert_eq!(project["metadata"]["name"], input.project.as_str());
}

/// The files themselves are checked and unit-tested by promtool (tests/tests/monitoring.rs).
#[test]
fn the_prometheus_rule_is_the_rule_files() {
    let rule = yaml_docs(
        &std::fs::read_to_string(repo().join("deploy/kubernetes/components/monitoring/prometheusrule.yaml")).unwrap(),
    )
    .remove(0);
    let mut groups = Vec::new();
    for file in ["dayshift.rules.yml", "dayshift-backups.rules.yml"] {
        let text = std::fs::read_to_string(repo().join("deploy/prometheus").join(file)).unwrap();
        let doc = yaml_docs(&text).remove(0);
        groups.extend(doc["groups"].as_array().unwrap().clone());
    }
    assert_eq!(
        rule["spec"]["groups"],
        Value::Array(groups),
        "the PrometheusRule drifted from deploy/prometheus"
    );
}

#[test]
fn the_examples_and_the_dockerfile_are_what_they_claim() {
    // The ArgoCD Application points at an overlay that renders.
    let app = yaml_docs(&std::fs::read_to_string(repo().join("deploy/argocd/application.yaml")).unwrap()).remove(0);
    assert_eq!(app["apiVersion"], "argoproj.io/v1alpha1");
    let path = app["spec"]["source"]["path"].as_str().unwrap();
    assert!(!render(&repo().join(path)).is_empty());
    assert_eq!(app["spec"]["destination"]["namespace"], "dayshift");
    // The Alertmanager receiver posts to serve's webhook endpoint, on the Service's port.
    let receiver = yaml_docs(
        &std::fs::read_to_string(repo().join("deploy/kubernetes/alertmanager-receiver.example.yaml")).unwrap(),
    )
    .remove(0);
    let url = receiver["spec"]["receivers"][0]["webhookConfigs"][0]["url"]
        .as_str()
        .unwrap();
    assert_eq!(url, "http://dayshift.dayshift.svc:8080/hooks/alertmanager");
    // Multi-stage, and the image runs as a non-root user.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    let last_stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    let user: BTreeMap<&str, &str> = last_stage
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .map(|u| ("user", u))
        .collect();
    let uid: u32 = user["user"].split(':').next().unwrap().parse().unwrap();
    assert!(uid >= 1000, "the runtime stage runs as {uid}");
}
