//! backup.postgres and restore.postgres against real PostgreSQL and SeaweedFS.

use std::sync::Arc;
use std::time::Duration;

use dayshift_engine::{RunStatus, StartRun, StepStatus};
use dayshift_tests::{
    TestDb, TestEnv, WebhookReceiver, database_url, fast_worker, free_port, s3_test_config, unique, wait_for,
};
use dayshift_workflows::adapters::s3::{S3Config, S3Store};
use dayshift_workflows::{Connections, backup_postgres, backup_restore_test, restore_postgres};
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
    /// The `ops` notice webhook.
    chat: WebhookReceiver,
}

async fn setup() -> Setup {
    let (source, target, store) = (source().await, TestDb::empty().await, s3_test_config(None));
    let chat = WebhookReceiver::start().await;
    let mut conns = Connections::default();
    conns.s3.insert("backups".into(), store.clone());
    conns.postgres.insert("app".into(), source.url.clone());
    conns.postgres.insert("scratch".into(), target.url.clone());
    conns.postgres.insert("server".into(), database_url());
    conns.notify.insert("ops".into(), chat.url.clone());
    let conns = Arc::new(conns);
    let mut env = TestEnv::new(vec![
        backup_postgres(conns.clone()),
        restore_postgres(conns.clone()),
        backup_restore_test(conns),
    ])
    .await;
    env.start_worker(fast_worker("w"));
    Setup {
        prefix: format!("t-{}", unique()),
        env,
        source,
        target,
        store,
        chat,
    }
}

async fn run(env: &TestEnv, workflow: &str, input: serde_json::Value) -> dayshift_engine::RunView {
    env.run_within(workflow, input, LIMIT).await
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

    // The restore test refuses it too, and says so in the chat.
    let test = run(&s.env, "backup.restore-test", restore_test_input(&s, json!([]))).await;
    assert_eq!(test.status, RunStatus::Failed);
    assert!(
        test.error.as_deref().unwrap().contains("checksum mismatch"),
        "{test:#?}"
    );
    let notices = s.chat.wait_for(1, LIMIT).await;
    let text = notices[0]["text"].as_str().unwrap();
    assert!(
        text.contains("Restore test failed") && text.contains("checksum mismatch"),
        "{text}"
    );
    assert!(
        scratch_databases()
            .await
            .iter()
            .all(|d| !d.ends_with(&test.id.0.simple().to_string()))
    );
    s.env.stop_workers().await;
}

fn restore_test_input(s: &Setup, checks: serde_json::Value) -> serde_json::Value {
    json!({
        "store": "backups", "database": "app", "prefix": s.prefix, "server": "server",
        "checks": checks, "notify": "ops",
    })
}

/// The restore-test scratch databases on the server.
async fn scratch_databases() -> Vec<String> {
    let admin = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let names = sqlx::query_scalar("select datname from pg_database where datname like 'dayshift_restore_test_%'")
        .fetch_all(&admin)
        .await
        .unwrap();
    admin.close().await;
    names
}

#[tokio::test]
async fn a_restore_test_runs_the_checks_on_a_scratch_copy_and_drops_it() {
    let mut s = setup().await;
    let backup = run(
        &s.env,
        "backup.postgres",
        json!({ "database": "app", "store": "backups", "prefix": s.prefix }),
    )
    .await;
    assert_eq!(backup.status, RunStatus::Succeeded, "{backup:#?}");

    let checks = json!([
        { "name": "customers", "query": "select count(*) from customers", "min": 5000, "max": 5000 },
        { "name": "recent orders", "query": "select count(*) from orders where at > timestamptz '2026-01-10';", "min": 1 },
    ]);
    let test = run(&s.env, "backup.restore-test", restore_test_input(&s, checks)).await;
    assert_eq!(test.status, RunStatus::Succeeded, "{test:#?}");
    let report = test.output.clone().unwrap();
    assert_eq!(report["key"], backup.output.clone().unwrap()["key"]);
    assert_eq!(report["tables"], 2);
    assert_eq!(report["checks"][0], json!({ "name": "customers", "value": 5000.0 }));
    assert!(report["checks"][1]["value"].as_f64().unwrap() > 1000.0, "{report}");
    let scratch = report["scratch_database"].as_str().unwrap();
    assert!(
        !scratch_databases().await.iter().any(|d| d == scratch),
        "{scratch} was not dropped"
    );
    assert!(s.chat.received().is_empty(), "a passing test sent a notice");

    // Both are fresh on /metrics, as of when their runs finished.
    let (status, metrics) = s.env.get_text("/metrics").await;
    assert_eq!(status, 200);
    for (workflow, run) in [("backup.postgres", &backup), ("backup.restore-test", &test)] {
        let line =
            format!("dayshift_workflow_last_success_timestamp_seconds{{workflow=\"{workflow}\",source=\"app\"}} ");
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {line} in:\n{metrics}"))
            .parse()
            .unwrap();
        let finished = run.finished_at.unwrap().timestamp_millis() as f64 / 1000.0;
        assert!((value - finished).abs() < 0.002, "{workflow}: {value} vs {finished}");
    }

    // A check whose bound the data misses fails the run, names the check, tells the chat, and
    // still drops the scratch database.
    let failing = json!([{ "name": "customers", "query": "select count(*) from customers", "min": 10000 }]);
    let test = run(&s.env, "backup.restore-test", restore_test_input(&s, failing)).await;
    assert_eq!(test.status, RunStatus::Failed);
    let error = test.error.clone().unwrap();
    assert!(
        error.contains("check 'customers' failed") && error.contains("returned 5000, expected at least 10000"),
        "{error}"
    );
    let text = s.chat.wait_for(1, LIMIT).await[0]["text"].as_str().unwrap().to_string();
    assert!(
        text.contains("check 'customers' failed") && text.contains(&test.id.to_string()),
        "{text}"
    );
    let suffix = test.id.0.simple().to_string();
    assert!(
        !scratch_databases().await.iter().any(|d| d.ends_with(&suffix)),
        "scratch left behind"
    );

    // A query that quotes data in its failure shows only the SQLSTATE; one that writes is
    // refused (the checks run read-only) and changes nothing.
    let leaking = json!([
        { "name": "leak", "query": "select name from customers order by id limit 1" },
    ]);
    let test = run(&s.env, "backup.restore-test", restore_test_input(&s, leaking)).await;
    assert_eq!(test.status, RunStatus::Failed);
    let error = test.error.clone().unwrap();
    assert!(error.contains("SQLSTATE 22P02"), "{error}");
    let first: String = sqlx::query_scalar("select name from customers order by id limit 1")
        .fetch_one(&s.source.pool)
        .await
        .unwrap();
    assert!(!error.contains(&first), "the error quotes the data: {error}");
    let writing = json!([
        { "name": "write", "query": "select nextval('customers_id_seq')" },
    ]);
    let test = run(&s.env, "backup.restore-test", restore_test_input(&s, writing)).await;
    assert_eq!(test.status, RunStatus::Failed);
    assert!(
        test.error.clone().unwrap().contains("SQLSTATE 25006"),
        "{:?}",
        test.error
    );
    s.env.stop_workers().await;
}

/// The backup of a database big enough that its upload takes a while, by real `dayshift`
/// processes: the worker is SIGKILLed while the multipart upload is in flight.
#[tokio::test]
async fn a_worker_killed_during_the_upload_leaves_one_good_backup_and_no_incomplete_upload() {
    let source = TestDb::empty().await;
    // About 60 MB of poorly compressible rows: several 8 MiB parts.
    for sql in [
        "create table blobs (id int primary key, body text not null)",
        "insert into blobs select i, (select string_agg(md5(random()::text || i || j), '') from generate_series(1, 8) j) from generate_series(1, 200000) i",
    ] {
        sqlx::query(sql).execute(&source.pool).await.unwrap();
    }
    let target = TestDb::empty().await;
    let store = s3_test_config(None);
    let dir = std::env::temp_dir().join(format!("dayshift-kill-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = |name: &str, value: &str| {
        let path = dir.join(name);
        std::fs::write(&path, value).unwrap();
        path.display().to_string()
    };
    let yaml = format!(
        "connections:\n  s3:\n    backups:\n      endpoint: {}\n      bucket: {}\n      access-key: {{ file: {} }}\n      secret-key: {{ file: {} }}\n  postgres:\n    app: {{ url: {{ file: {} }} }}\n    restored: {{ url: {{ file: {} }} }}\n",
        store.endpoint.clone().unwrap(),
        store.bucket,
        secret("ak", &store.access_key),
        secret("sk", &store.secret_key),
        secret("app", &source.url),
        secret("restored", &target.url),
    );
    let env = dayshift_tests::BinEnv::start_with(&yaml).await;
    let mut worker = env.start_worker().await;
    let prefix = format!("t-{}", unique());
    let id = env
        .start_run(
            "backup.postgres",
            json!({ "database": "app", "store": "backups", "prefix": prefix }),
        )
        .await;

    // Kill the worker once the upload has parts in flight.
    let s3 = S3Store::new(&store).await;
    let in_flight = |s3: S3Store, prefix: String| async move {
        let listed = s3
            .client()
            .list_multipart_uploads()
            .bucket(s3.bucket())
            .prefix(&prefix)
            .send()
            .await
            .unwrap();
        listed.uploads().len()
    };
    let deadline = tokio::time::Instant::now() + LIMIT;
    while in_flight(s3.clone(), prefix.clone()).await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.kill9().await;
    let (_, run) = env.get(&format!("/api/v1/runs/{id}")).await;
    let upload = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "dump-and-upload")
        .unwrap();
    assert_eq!(
        upload["status"], "running",
        "the worker was not killed mid-upload: {run:#}"
    );
    assert_eq!(
        in_flight(s3.clone(), prefix.clone()).await,
        1,
        "no incomplete upload to clean up"
    );

    // Another worker takes the run over once the lease expires.
    let _second = env.start_worker().await;
    let run = env.wait_finished(&id, LIMIT).await;
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let upload = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "dump-and-upload")
        .unwrap();
    assert_eq!(upload["attempts"], 2, "{run:#}");

    // One backup, one manifest, nothing incomplete; and it restores.
    let mut keys: Vec<String> = s3.list(&prefix).await.unwrap().into_iter().map(|o| o.key).collect();
    keys.sort();
    let key = run["output"]["key"].as_str().unwrap().to_string();
    assert_eq!(keys, vec![key.clone(), format!("{key}.manifest.json")]);
    assert_eq!(
        in_flight(s3.clone(), prefix.clone()).await,
        0,
        "an incomplete upload was left behind"
    );
    let restore = env
        .start_run(
            "restore.postgres",
            json!({ "store": "backups", "key": key, "target": "restored" }),
        )
        .await;
    let restore = env.wait_finished(&restore, LIMIT).await;
    assert_eq!(restore["status"], "succeeded", "{restore:#}");
    assert_eq!(source.table_checksums().await, target.table_checksums().await);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_wrong_password_fails_at_once_and_an_unreachable_store_is_retried() {
    let source = TestDb::empty().await;
    let wrong = source.url.replacen("dayshift:dayshift@", "dayshift:wrong@", 1);
    assert_ne!(wrong, source.url);
    let mut down = s3_test_config(None);
    down.endpoint = Some(format!("http://127.0.0.1:{}", free_port()));
    let mut conns = Connections::default();
    conns.postgres.insert("wrong".into(), wrong);
    conns.postgres.insert("app".into(), source.url.clone());
    conns.s3.insert("backups".into(), s3_test_config(None));
    conns.s3.insert("down".into(), down);
    let mut env = TestEnv::new(vec![backup_postgres(Arc::new(conns))]).await;
    env.start_worker(fast_worker("w"));
    let prefix = format!("t-{}", unique());

    // pg_dump's authentication failure: permanent, one attempt, PostgreSQL's words.
    let run = run(
        &env,
        "backup.postgres",
        json!({ "database": "wrong", "store": "backups", "prefix": prefix }),
    )
    .await;
    assert_eq!(run.status, RunStatus::Failed);
    let error = run.error.clone().unwrap();
    assert!(error.contains("password authentication failed"), "{error}");
    assert!(!error.contains("wrong@"), "the password reached the error: {error}");
    let step = run.steps.iter().find(|s| s.name == "dump-and-upload").unwrap();
    assert_eq!(step.attempts, 1, "{run:#?}");

    // A store that does not answer: the step is retried with a delay.
    let started = env
        .engine
        .start(StartRun::new(
            "backup.postgres",
            json!({ "database": "app", "store": "down", "prefix": prefix }),
        ))
        .await
        .unwrap();
    let retried = wait_for(&env.engine, started.id, LIMIT, |r| {
        r.steps
            .iter()
            .any(|s| s.name == "dump-and-upload" && s.status == StepStatus::Retrying && s.attempts >= 2)
    })
    .await;
    let step = retried.steps.iter().find(|s| s.name == "dump-and-upload").unwrap();
    assert!(step.last_error.as_deref().unwrap().contains("S3"), "{step:#?}");
    env.engine.cancel(started.id, None, "test").await.unwrap();
    env.stop_workers().await;
}

/// A failure at any step (verification included) leaves no dump and no manifest behind: each
/// step's undo removes what it wrote.
#[tokio::test]
async fn a_backup_failing_at_any_step_leaves_nothing_behind() {
    let (source, store) = (source().await, s3_test_config(None));
    let mut conns = Connections::default();
    conns.s3.insert("backups".into(), store.clone());
    conns.postgres.insert("app".into(), source.url.clone());
    let prefix = format!("t-{}", unique());
    let s3 = S3Store::new(&store).await;
    let (s3, p) = (&s3, prefix.as_str());
    dayshift_tests::saga::failure_at_each_step_compensates(
        TestEnv::builder(vec![backup_postgres(Arc::new(conns))]),
        "backup.postgres",
        json!({ "database": "app", "store": "backups", "prefix": prefix }),
        // What a backup writes: objects (dump and manifest) and multipart uploads under the
        // test's prefix.
        move |_env| async move {
            let objects: Vec<(String, u64)> = s3.list(p).await.unwrap().into_iter().map(|o| (o.key, o.size)).collect();
            (objects, s3.incomplete_uploads(p).await.unwrap())
        },
    )
    .await;
}
