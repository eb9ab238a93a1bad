//! backup.vault against a real OpenBao with raft storage and a real SeaweedFS.

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{RunStatus, StartRun};
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
        conns.vault.insert(
            name.into(),
            VaultConfig {
                address: bao.addr.clone(),
                token: token.clone(),
                namespace: None,
            },
        );
    }
    let mut env = TestEnv::new(vec![backup_vault(Arc::new(conns))]).await;
    env.start_worker(fast_worker("w"));
    let prefix = format!("t-{}", unique());

    let started = env
        .engine
        .start(StartRun::new(
            "backup.vault",
            json!({ "vault": "openbao", "store": "backups", "prefix": prefix }),
        ))
        .await
        .unwrap();
    let run = env.wait(started.id, LIMIT).await;
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
    let started = env
        .engine
        .start(StartRun::new(
            "backup.vault",
            json!({ "vault": "weak", "store": "backups", "prefix": prefix }),
        ))
        .await
        .unwrap();
    let run = env.wait(started.id, LIMIT).await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.clone().unwrap();
    assert!(error.contains("403") && error.contains("permission denied"), "{error}");
    let upload = run.steps.iter().find(|s| s.name == "snapshot-and-upload").unwrap();
    assert_eq!(upload.attempts, 1, "{run:#?}");
    env.stop_workers().await;
}
