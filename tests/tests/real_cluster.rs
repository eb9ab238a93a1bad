//! install.component against a real cluster, when there is one: with `KUBECONFIG` set, a small
//! component (a namespace, a ConfigMap and a Deployment) is installed and installed again, then
//! removed. Without `KUBECONFIG` the test says it is skipped and passes; these machines have no
//! cluster, so CI runs the stand-in tests instead.

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{RunStatus, StartRun};
use dayshift_tests::{TestEnv, fast_worker, unique};
use dayshift_workflows::adapters::kube::KubeConfig;
use dayshift_workflows::{Connections, install_component};
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
    let mut env = TestEnv::new(vec![install_component(Arc::new(conns))]).await;
    env.start_worker(fast_worker("w"));
    let input =
        json!({ "component": "hello", "manifests": dir, "namespace": ns, "kubernetes": "cluster", "timeout": "5m" });
    for attempt in ["install", "install again"] {
        let started = env
            .engine
            .start(StartRun::new("install.component", input.clone()))
            .await
            .unwrap();
        let run = env.wait(started.id, Duration::from_secs(600)).await;
        assert_eq!(run.status, RunStatus::Succeeded, "{attempt}: {run:#?}");
    }
    env.stop_workers().await;
    let _ = std::process::Command::new("kubectl")
        .args(["delete", "namespace", &ns, "--wait=false"])
        .status();
}
