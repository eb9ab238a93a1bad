//! The Kubernetes adapter against the API server stand-in.

use std::time::Duration;

use dayshift_tests::kube_api::KubeApi;
use dayshift_workflows::adapters::kube::{Kube, KubeConfig, ObjectRef, Resource, Rollout, Workload, WorkloadKind};
use serde_json::json;

async fn cluster() -> (KubeApi, Kube) {
    let api = KubeApi::start().await;
    api.put(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": "api", "namespace": "shop" },
        "spec": { "replicas": 2, "template": { "metadata": { "labels": { "app": "api" } } } },
    }));
    api.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "db", "namespace": "shop" },
        "data": { "username": "c2hvcA==", "password": "b2xk" },
    }));
    let kube = Kube::connect(&KubeConfig {
        url: Some(api.url.clone()),
        ..KubeConfig::default()
    })
    .await
    .unwrap();
    (api, kube)
}

fn deployment() -> Workload {
    Workload {
        kind: WorkloadKind::Deployment,
        namespace: "shop".into(),
        name: "api".into(),
    }
}

#[tokio::test]
async fn a_rollout_restart_sends_what_kubectl_sends_and_waits_for_the_rollout() {
    let (api, kube) = cluster().await;
    let at = "2026-11-21T03:00:00Z";
    kube.rollout_restart(&deployment(), at).await.unwrap();
    let writes = api.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].method, "PATCH");
    assert_eq!(writes[0].path, "/apis/apps/v1/namespaces/shop/deployments/api");
    assert_eq!(writes[0].content_type, "application/strategic-merge-patch+json");
    assert_eq!(
        writes[0].body,
        json!({ "spec": { "template": { "metadata": { "annotations": { "kubectl.kubernetes.io/restartedAt": at } } } } })
    );
    let live = api.get("/apis/apps/v1/namespaces/shop/deployments/api").unwrap();
    assert_eq!(live["metadata"]["generation"], 2);
    assert_eq!(
        live["spec"]["template"]["metadata"]["labels"]["app"], "api",
        "the patch replaced the template"
    );
    kube.wait_rollout(&deployment(), Duration::from_millis(10), Duration::from_secs(5))
        .await
        .unwrap();

    // The same stamp again changes nothing: no second rollout.
    kube.rollout_restart(&deployment(), at).await.unwrap();
    let live = api.get("/apis/apps/v1/namespaces/shop/deployments/api").unwrap();
    assert_eq!(live["metadata"]["generation"], 2);
}

#[tokio::test]
async fn a_rollout_that_never_becomes_ready_times_out_with_the_reason() {
    let (api, kube) = cluster().await;
    api.stall_rollouts("shop", "api");
    kube.rollout_restart(&deployment(), "2026-11-21T03:00:00Z")
        .await
        .unwrap();
    assert!(matches!(
        kube.rollout_status(&deployment()).await.unwrap(),
        Rollout::Waiting(_)
    ));
    let err = kube
        .wait_rollout(&deployment(), Duration::from_millis(10), Duration::from_millis(200))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("did not complete within 200ms"), "{err}");
    assert!(err.contains("1 out of 2 new replicas have been updated"), "{err}");

    // A missing workload is a permanent error that names it.
    let missing = Workload {
        name: "nope".into(),
        ..deployment()
    };
    let err = kube.rollout_restart(&missing, "x").await.unwrap_err();
    assert!(!err.is_transient());
    assert!(err.to_string().contains("deployments.apps \"nope\" not found"), "{err}");
}

#[tokio::test]
async fn a_secret_key_changes_alone_and_an_external_secret_is_asked_to_sync() {
    let (api, kube) = cluster().await;
    let db = ObjectRef {
        namespace: "shop".into(),
        name: "db".into(),
    };
    assert_eq!(kube.secret_key(&db, "password").await.unwrap().unwrap(), b"old");
    kube.set_secret_key(&db, "password", b"new").await.unwrap();
    assert_eq!(kube.secret_key(&db, "password").await.unwrap().unwrap(), b"new");
    assert_eq!(kube.secret_key(&db, "username").await.unwrap().unwrap(), b"shop");
    let missing = ObjectRef {
        namespace: "shop".into(),
        name: "nope".into(),
    };
    assert_eq!(kube.secret_key(&missing, "password").await.unwrap(), None);

    api.put(json!({
        "apiVersion": "external-secrets.io/v1beta1", "kind": "ExternalSecret",
        "metadata": { "name": "db", "namespace": "shop" },
        "spec": { "refreshInterval": "1h" },
    }));
    kube.force_sync_external_secret(&db, "1795000000").await.unwrap();
    let es = api
        .get("/apis/external-secrets.io/v1beta1/namespaces/shop/externalsecrets/db")
        .unwrap();
    assert_eq!(es["metadata"]["annotations"]["force-sync"], "1795000000");
    assert_eq!(es["spec"]["refreshInterval"], "1h");
}

#[tokio::test]
async fn server_side_apply_creates_patches_records_the_manager_and_dry_runs() {
    let (api, kube) = cluster().await;
    let deployment = |image: &str| {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": { "name": "catalog", "namespace": "shop", "labels": { "app.kubernetes.io/managed-by": "dayshift" } },
            "spec": { "replicas": 1, "template": { "spec": { "containers": [{ "name": "app", "image": image }] } } },
        })
    };
    let namespace = json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "shop" } });
    let namespaces = Resource::builtin("v1", "Namespace").unwrap();
    let deployments = Resource::builtin("apps/v1", "Deployment").unwrap();
    kube.apply(&namespaces, &namespace, "dayshift", false).await.unwrap();
    assert_eq!(
        api.get("/api/v1/namespaces/shop").unwrap()["metadata"]["managedFields"][0]["manager"],
        "dayshift"
    );
    let created = kube
        .apply(&deployments, &deployment("catalog:1"), "dayshift", false)
        .await
        .unwrap();
    assert_eq!(created["metadata"]["managedFields"][0]["manager"], "dayshift");
    assert_eq!(created["metadata"]["managedFields"][0]["operation"], "Apply");
    let path = "/apis/apps/v1/namespaces/shop/deployments/catalog";
    let last = api.writes().last().unwrap().clone();
    assert_eq!(last.content_type, "application/apply-patch+yaml");
    assert!(
        last.query.contains("fieldManager=dayshift") && last.query.contains("force=true"),
        "{}",
        last.query
    );

    // The same again changes nothing; a new image is a new generation.
    let rv = api.get(path).unwrap()["metadata"]["resourceVersion"].clone();
    kube.apply(&deployments, &deployment("catalog:1"), "dayshift", false)
        .await
        .unwrap();
    assert_eq!(api.get(path).unwrap()["metadata"]["resourceVersion"], rv);
    // A dry run answers with the result and stores nothing.
    let planned = kube
        .apply(&deployments, &deployment("catalog:2"), "dayshift", true)
        .await
        .unwrap();
    assert_eq!(
        planned["spec"]["template"]["spec"]["containers"][0]["image"],
        "catalog:2"
    );
    assert_eq!(
        api.get(path).unwrap()["spec"]["template"]["spec"]["containers"][0]["image"],
        "catalog:1"
    );
    assert!(api.writes().last().unwrap().query.contains("dryRun=All"));
    kube.apply(&deployments, &deployment("catalog:2"), "dayshift", false)
        .await
        .unwrap();
    let live = api.get(path).unwrap();
    assert_eq!(live["metadata"]["generation"], 2);
    assert_eq!(live["spec"]["template"]["spec"]["containers"][0]["image"], "catalog:2");

    // A field applied before and no longer applied is removed; the same apply by another
    // manager leaves dayshift's fields alone.
    let mut fewer = deployment("catalog:2");
    fewer["spec"].as_object_mut().unwrap().remove("replicas");
    kube.apply(&deployments, &fewer, "dayshift", false).await.unwrap();
    let live = api.get(path).unwrap();
    assert!(live["spec"].get("replicas").is_none(), "{live:#}");
    assert_eq!(
        live["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"],
        json!({})
    );
}
