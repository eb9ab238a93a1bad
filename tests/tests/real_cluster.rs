//! install.component and upgrade.component against a real cluster, when there is one: with
//! `KUBECONFIG` set, a small component (a namespace, a ConfigMap and a Deployment) is installed
//! and installed again, upgraded to a version without the ConfigMap (pruned), upgraded to an
//! image that does not exist (rolled back), then removed. Without `KUBECONFIG` the test says it is skipped and passes; these machines have no
//! cluster, so CI runs the stand-in tests instead.

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::RunStatus;
use dayshift_tests::{TestEnv, fast_worker, unique};
use dayshift_workflows::adapters::kube::KubeConfig;
use dayshift_workflows::{Connections, install_component, upgrade_component};
use serde_json::json;

#[tokio::test]
async fn a_small_component_installs_on_a_real_cluster() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("skipped: KUBECONFIG is not set (no real cluster to install on)");
        return;
    }
    let ns = format!("dayshift-e2e-{}", &unique()[..8]);
    let dir = std::env::temp_dir().join(format!("dayshift-e2e-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("component.yaml"),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hello\ndata:\n  greeting: hello\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: hello\nspec:\n  replicas: 1\n  selector: {{ matchLabels: {{ app: hello }} }}\n  template:\n    metadata: {{ labels: {{ app: hello }} }}\n    spec:\n      containers:\n        - name: hello\n          image: registry.k8s.io/pause:3.9\n"
        ),
    )
    .unwrap();
    let mut conns = Connections::default();
    conns.kubernetes.insert("cluster".into(), KubeConfig::default());
    let conns = Arc::new(conns);
    let mut env = TestEnv::new(vec![install_component(conns.clone()), upgrade_component(conns)]).await;
    env.start_worker(fast_worker("w"));
    let input =
        json!({ "component": "hello", "manifests": dir, "namespace": ns, "kubernetes": "cluster", "timeout": "5m" });
    for attempt in ["install", "install again"] {
        let run = env
            .run_within("install.component", input.clone(), Duration::from_secs(600))
            .await;
        assert_eq!(run.status, RunStatus::Succeeded, "{attempt}: {run:#?}");
    }

    // Version 2 drops the ConfigMap: pruned once the new Deployment is ready.
    let v2 = std::fs::read_to_string(dir.join("component.yaml"))
        .unwrap()
        .replace(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hello\ndata:\n  greeting: hello\n",
            "",
        )
        .replace("pause:3.9", "pause:3.10");
    let v2_dir = dir.join("v2");
    std::fs::create_dir_all(&v2_dir).unwrap();
    std::fs::write(v2_dir.join("component.yaml"), &v2).unwrap();
    let mut upgrade = input.clone();
    upgrade["manifests"] = json!(v2_dir);
    let run = env
        .run_within("upgrade.component", upgrade.clone(), Duration::from_secs(600))
        .await;
    assert_eq!(run.status, RunStatus::Succeeded, "upgrade: {run:#?}");
    assert_eq!(run.output.unwrap()["pruned"], json!([format!("ConfigMap {ns}/hello")]));

    // Version 3's image does not exist: its pods never become ready, and it is rolled back.
    let v3_dir = dir.join("v3");
    std::fs::create_dir_all(&v3_dir).unwrap();
    std::fs::write(
        v3_dir.join("component.yaml"),
        v2.replace("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:does-not-exist"),
    )
    .unwrap();
    upgrade["manifests"] = json!(v3_dir);
    upgrade["timeout"] = json!("90s");
    let run = env
        .run_within("upgrade.component", upgrade, Duration::from_secs(600))
        .await;
    assert_eq!(run.status, RunStatus::Failed, "bad image: {run:#?}");
    assert!(
        run.steps
            .iter()
            .any(|s| s.name == "undo:rollback-point" && format!("{:?}", s.status) == "Succeeded"),
        "{run:#?}"
    );
    let image = std::process::Command::new("kubectl")
        .args([
            "-n",
            &ns,
            "get",
            "deployment",
            "hello",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&image.stdout), "registry.k8s.io/pause:3.10");
    env.stop_workers().await;
    let _ = std::process::Command::new("kubectl")
        .args(["delete", "namespace", &ns, "--wait=false"])
        .status();
}
