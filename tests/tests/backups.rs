//! backup.postgres and restore.postgres against real PostgreSQL and SeaweedFS.

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{RunStatus, StartRun};
use dayshift_tests::{TestDb, TestEnv, fast_worker, s3_test_config, unique};
use dayshift_workflows::adapters::s3::{S3Config, S3Store};
use dayshift_workflows::{Connections, backup_postgres, restore_postgres};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

/// A source database with known content: several tables, types, an index, a sequence.
async fn source() -> TestDb {
    let db = TestDb::empty().await;
    for sql in [
        "create table customers (id serial primary key, name text not null, balance numeric(12,2), tags text[], joined date)",
        "insert into customers (name, balance, tags, joined) select 'customer ' || i, i * 1.25, array['t' || (i % 7)], date '2020-01-01' + i from generate_series(1, 5000) i",
        "create table orders (id bigint primary key, customer int references customers(id), body jsonb, at timestamptz)",
        "insert into orders select i, 1 + i % 5000, jsonb_build_object('items', i % 13, 'note', repeat('x', i % 50)), timestamptz '2026-01-01' + i * interval '1 minute' from generate_series(1, 20000) i",
        "create index orders_by_customer on orders (customer)",
    ] {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
    }
    db
}

struct Setup {
    /// A key prefix of this test's own in the shared bucket.
    prefix: String,
    env: TestEnv,
    source: TestDb,
    target: TestDb,
    store: S3Config,
}

async fn setup() -> Setup {
    let (source, target, store) = (source().await, TestDb::empty().await, s3_test_config(None));
    let mut conns = Connections::default();
    conns.s3.insert("backups".into(), store.clone());
    conns.postgres.insert("app".into(), source.url.clone());
    conns.postgres.insert("scratch".into(), target.url.clone());
    let conns = Arc::new(conns);
    let mut env = TestEnv::new(vec![backup_postgres(conns.clone()), restore_postgres(conns)]).await;
    env.start_worker(fast_worker("w"));
    Setup {
        prefix: format!("t-{}", unique()),
        env,
        source,
        target,
        store,
    }
}

async fn run(env: &TestEnv, workflow: &str, input: serde_json::Value) -> dayshift_engine::RunView {
    let started = env.engine.start(StartRun::new(workflow, input)).await.unwrap();
    env.wait(started.id, LIMIT).await
}

#[tokio::test]
async fn a_backup_restores_into_another_database_with_identical_content() {
    let mut s = setup().await;
    let backup = run(
        &s.env,
        "backup.postgres",
        json!({ "database": "app", "store": "backups", "prefix": s.prefix }),
    )
    .await;
    assert_eq!(backup.status, RunStatus::Succeeded, "{backup:#?}");
    let manifest = backup.output.clone().unwrap();
    assert!(
        manifest["key"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/app/", s.prefix)),
        "{manifest}"
    );
    assert!(manifest["size"].as_u64().unwrap() > 0);
    assert!(
        manifest["server_version"].as_str().unwrap().starts_with("15"),
        "{manifest}"
    );
    // The password is nowhere in what was journaled.
    let password = "dayshift";
    let journal = serde_json::to_string(&backup).unwrap();
    assert!(
        !journal.contains(&format!(":{password}@")),
        "a credential reached the journal"
    );

    let restore = run(
        &s.env,
        "restore.postgres",
        json!({ "store": "backups", "database": "app", "target": "scratch", "prefix": s.prefix }),
    )
    .await;
    assert_eq!(restore.status, RunStatus::Succeeded, "{restore:#?}");
    let (a, b) = (s.source.table_checksums().await, s.target.table_checksums().await);
    assert_eq!(a.len(), 2);
    assert_eq!(a, b, "restored content differs");

    // Restoring again over the now non-empty target is refused without `overwrite`.
    let again = run(
        &s.env,
        "restore.postgres",
        json!({ "store": "backups", "database": "app", "target": "scratch", "prefix": s.prefix }),
    )
    .await;
    assert_eq!(again.status, RunStatus::Failed);
    assert!(again.error.unwrap().contains("set `overwrite: true`"));
    s.env.stop_workers().await;
}

#[tokio::test]
async fn a_dump_with_one_corrupted_byte_is_refused_with_a_checksum_error() {
    let mut s = setup().await;
    let backup = run(
        &s.env,
        "backup.postgres",
        json!({ "database": "app", "store": "backups", "prefix": s.prefix }),
    )
    .await;
    assert_eq!(backup.status, RunStatus::Succeeded, "{backup:#?}");
    let key = backup.output.unwrap()["key"].as_str().unwrap().to_string();
    let store = S3Store::new(&s.store).await;
    let object = store
        .client()
        .get_object()
        .bucket(store.bucket())
        .key(&key)
        .send()
        .await
        .unwrap();
    let mut bytes = object.body.collect().await.unwrap().into_bytes().to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    store.put(&key, bytes).await.unwrap();

    let restore = run(
        &s.env,
        "restore.postgres",
        json!({ "store": "backups", "key": key, "target": "scratch" }),
    )
    .await;
    assert_eq!(restore.status, RunStatus::Failed);
    let error = restore.error.unwrap();
    assert!(error.contains("checksum mismatch"), "{error}");
    assert!(s.target.table_checksums().await.is_empty(), "something was restored");
    s.env.stop_workers().await;
}
