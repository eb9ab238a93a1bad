//! Vault/OpenBao: backup.vault against a real OpenBao with raft storage and SeaweedFS, and
//! tokens from Kubernetes auth.

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::RunStatus;
use dayshift_tests::{OpenBao, TestEnv, fast_worker, s3_test_config, unique};
use dayshift_workflows::adapters::s3::S3Store;
use dayshift_workflows::adapters::vault::VaultConfig;
use dayshift_workflows::{Connections, backup_vault};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_vault_snapshot_is_stored_verified_and_accepted_back_by_openbao() {
    let bao = OpenBao::own().await.unwrap();
    bao.bao(&["secrets", "enable", "-path=secret", "kv-v2"]).await.unwrap();
    bao.bao(&["kv", "put", "secret/app", "password=before"]).await.unwrap();
    // A token that may not take snapshots.
    let weak: serde_json::Value = serde_json::from_str(
        &bao.bao(&["token", "create", "-policy=default", "-format=json"])
            .await
            .unwrap(),
    )
    .unwrap();
    let weak = weak["auth"]["client_token"].as_str().unwrap().to_string();

    let store = s3_test_config(None);
    let mut conns = Connections::default();
    conns.s3.insert("backups".into(), store.clone());
    for (name, token) in [("openbao", &bao.token), ("weak", &weak)] {
        conns
            .vault
            .insert(name.into(), VaultConfig::with_token(bao.addr.clone(), token.clone()));
    }
    let mut env = TestEnv::new(vec![backup_vault(Arc::new(conns))]).await;
    env.start_worker(fast_worker("w"));
    let prefix = format!("t-{}", unique());

    let run = env
        .run_within(
            "backup.vault",
            json!({ "vault": "openbao", "store": "backups", "prefix": prefix }),
            LIMIT,
        )
        .await;
    assert_eq!(run.status, RunStatus::Succeeded, "{run:#?}");
    let manifest = run.output.clone().unwrap();
    assert_eq!(manifest["kind"], "vault");
    assert_eq!(manifest["source"], "openbao");
    assert!(
        manifest["server_version"].as_str().unwrap().starts_with("2."),
        "{manifest}"
    );
    let key = manifest["key"].as_str().unwrap().to_string();
    assert!(
        key.starts_with(&format!("{prefix}/openbao/")) && key.ends_with(".snap"),
        "{key}"
    );
    assert!(
        !serde_json::to_string(&run).unwrap().contains(&bao.token),
        "the token reached the journal"
    );

    // The secret changes after the snapshot; restoring the snapshot brings the old one back.
    bao.bao(&["kv", "put", "secret/app", "password=after"]).await.unwrap();
    let s3 = S3Store::new(&store).await;
    let object = s3
        .client()
        .get_object()
        .bucket(s3.bucket())
        .key(&key)
        .send()
        .await
        .unwrap();
    let bytes = object.body.collect().await.unwrap().into_bytes();
    assert_eq!(bytes.len() as u64, manifest["size"].as_u64().unwrap());
    let file = std::env::temp_dir().join(format!("dayshift-snapshot-{}.snap", unique()));
    std::fs::write(&file, &bytes).unwrap();
    bao.bao(&["operator", "raft", "snapshot", "restore", file.to_str().unwrap()])
        .await
        .unwrap();
    std::fs::remove_file(&file).unwrap();
    let password = bao.bao(&["kv", "get", "-field=password", "secret/app"]).await.unwrap();
    assert_eq!(password.trim(), "before");

    // A token without the right fails at once (permission is not retried), with Vault's reason.
    let run = env
        .run_within(
            "backup.vault",
            json!({ "vault": "weak", "store": "backups", "prefix": prefix }),
            LIMIT,
        )
        .await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.clone().unwrap();
    assert!(error.contains("403") && error.contains("permission denied"), "{error}");
    let upload = run.steps.iter().find(|s| s.name == "snapshot-and-upload").unwrap();
    assert_eq!(upload.attempts, 1, "{run:#?}");
    env.stop_workers().await;
}

/// Vault tokens from Kubernetes auth: the service account token exchanged at login, checked by
/// Vault through the (stand-in) cluster's TokenReview API.
#[tokio::test]
async fn a_vault_token_comes_from_kubernetes_auth() {
    use dayshift_tests::kube_api::KubeApi;
    use dayshift_workflows::adapters::vault::{Vault, VaultAuth};

    let kube = KubeApi::start().await;
    let bao = dayshift_tests::OpenBao::shared();
    let id = unique();
    let (auth, mount) = (format!("k8s-{id}"), format!("kv-{id}"));
    bao.bao(&["auth", "enable", &format!("-path={auth}"), "kubernetes"])
        .await
        .unwrap();
    bao.bao(&[
        "write",
        &format!("auth/{auth}/config"),
        &format!("kubernetes_host={}", kube.url),
        "disable_local_ca_jwt=true",
        &format!(
            "kubernetes_ca_cert=@{}/fixtures/kube/stand-in-ca.pem",
            env!("CARGO_MANIFEST_DIR")
        ),
    ])
    .await
    .unwrap();
    bao.bao(&["secrets", "enable", &format!("-path={mount}"), "kv-v2"])
        .await
        .unwrap();
    bao.bao(&["kv", "put", &format!("-mount={mount}"), "app", "k=v"])
        .await
        .unwrap();
    let policy = std::env::temp_dir().join(format!("dayshift-policy-{id}.hcl"));
    std::fs::write(
        &policy,
        format!("path \"{mount}/data/app\" {{ capabilities = [\"read\"] }}\npath \"{mount}/metadata/app\" {{ capabilities = [\"read\"] }}\n"),
    )
    .unwrap();
    bao.bao(&["policy", "write", &format!("reader-{id}"), policy.to_str().unwrap()])
        .await
        .unwrap();
    std::fs::remove_file(&policy).unwrap();
    bao.bao(&[
        "write",
        &format!("auth/{auth}/role/dayshift"),
        "bound_service_account_names=dayshift",
        "bound_service_account_namespaces=platform",
        &format!("token_policies=reader-{id}"),
        "token_ttl=10m",
    ])
    .await
    .unwrap();

    let vault_as = |token: String| {
        let jwt_file = std::env::temp_dir().join(format!("dayshift-sa-{}", unique()));
        std::fs::write(&jwt_file, token).unwrap();
        Vault::new(VaultConfig {
            address: bao.addr.clone(),
            auth: VaultAuth::Kubernetes {
                mount: auth.clone(),
                role: "dayshift".into(),
                jwt_file,
            },
            namespace: None,
        })
    };
    let vault = vault_as(kube.issue_service_account_token("platform", "dayshift"));
    let entry = vault.kv_read(&mount, "app").await.unwrap();
    assert_eq!(entry.data["k"], "v");
    assert!(
        kube.requests()
            .iter()
            .any(|r| r.path == "/apis/authentication.k8s.io/v1/tokenreviews"),
        "Vault did not ask the cluster"
    );
    // The policy holds: nothing beyond it.
    let err = vault.kv_read(&mount, "other").await.unwrap_err().to_string();
    assert!(err.contains("403"), "{err}");
    // Another service account is not bound to the role.
    let other = vault_as(kube.issue_service_account_token("platform", "someone-else"));
    let err = other.kv_read(&mount, "app").await.unwrap_err().to_string();
    assert!(err.contains("auth/") && err.contains("login"), "{err}");
}
