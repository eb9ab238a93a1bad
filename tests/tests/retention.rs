//! backup.retention over a synthetic history in a real SeaweedFS.

use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, TimeZone, Utc};
use dayshift_engine::RunStatus;
use dayshift_tests::{TestEnv, fast_worker, s3_test_config, unique};
use dayshift_workflows::adapters::s3::S3Store;
use dayshift_workflows::{Connections, backup_retention};
use serde_json::json;

/// 400 daily backups, 2025-10-17 … 2026-11-20, each with its manifest.
async fn history(s3: &S3Store, prefix: &str) -> Vec<String> {
    s3.ensure_bucket().await.unwrap();
    let last = NaiveDate::from_ymd_opt(2026, 11, 20).unwrap();
    let keys: Vec<String> = (0..400)
        .map(|i| {
            let day = last - chrono::Duration::days(i);
            let at = Utc.from_utc_datetime(&day.and_hms_opt(2, 0, 0).unwrap());
            format!(
                "{prefix}/app/{}/{}-run{i}.dump.zst",
                at.format("%Y/%m/%d"),
                at.format("%Y%m%dT%H%M%SZ")
            )
        })
        .collect();
    let objects: Vec<(String, Vec<u8>)> = keys
        .iter()
        .flat_map(|k| {
            [
                (k.clone(), b"dump".to_vec()),
                (format!("{k}.manifest.json"), b"{}".to_vec()),
            ]
        })
        .collect();
    for chunk in objects.chunks(50) {
        let puts = chunk.iter().map(|(k, v)| s3.put(k, v.clone()));
        for r in futures::future::join_all(puts).await {
            r.unwrap();
        }
    }
    keys
}

#[tokio::test]
async fn retention_over_400_daily_backups_keeps_exactly_what_the_policy_says() {
    let prefix = format!("t-{}", unique());
    let s3 = S3Store::new(&s3_test_config(None)).await;
    let all = history(&s3, &prefix).await;
    let mut conns = Connections::default();
    conns.s3.insert("backups".into(), s3_test_config(None));
    conns.s3.insert("broken".into(), s3_test_config(Some("wrong-secret")));
    let mut env = TestEnv::new(vec![backup_retention(Arc::new(conns))]).await;
    env.start_worker(fast_worker("w"));
    let wait = Duration::from_secs(120);
    let run = |store: &str, dry: bool| {
        let input = json!({
            "store": store, "database": "app", "prefix": prefix, "dry_run": dry,
            "policy": { "keep-last": 3, "daily": 7, "weekly": 4, "monthly": 12 }
        });
        env.run_within("backup.retention", input, wait)
    };

    // A listing that fails deletes nothing.
    let r = run("broken", false).await;
    assert_eq!(r.status, RunStatus::Failed, "{r:#?}");
    assert_eq!(s3.list(&format!("{prefix}/")).await.unwrap().len(), 800);

    // A dry run says what would go and deletes nothing.
    let r = run("backups", true).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:#?}");
    let report = r.output.unwrap();
    assert_eq!(report["deleted"].as_array().unwrap().len(), 380);
    assert_eq!(s3.list(&format!("{prefix}/")).await.unwrap().len(), 800);

    let r = run("backups", false).await;
    assert_eq!(r.status, RunStatus::Succeeded, "{r:#?}");
    let left: Vec<String> = s3
        .list(&format!("{prefix}/"))
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with(".dump.zst"))
        .map(|k| k.rsplit('/').next().unwrap()[..8].to_string())
        .collect();
    // Last 3 and daily 7: Nov 14 … 20 (2026-11-20 is a Friday). Weekly 4: the newest of ISO
    // weeks 47 (Nov 20), 46 (Sunday Nov 15), 45 (Sunday Nov 8), 44 (Sunday Nov 1). Monthly 12:
    // the last day of each month back to December 2025 (November: the 20th).
    let mut expected: Vec<&str> = vec![
        "20251231", "20260131", "20260228", "20260331", "20260430", "20260531", "20260630", "20260731", "20260831",
        "20260930", "20261031", "20261101", "20261108", "20261114", "20261115", "20261116", "20261117", "20261118",
        "20261119", "20261120",
    ];
    expected.sort();
    let mut left_sorted = left.clone();
    left_sorted.sort();
    assert_eq!(left_sorted, expected);
    // Each kept dump still has its manifest; the deleted ones took theirs along.
    assert_eq!(s3.list(&format!("{prefix}/")).await.unwrap().len(), 40);
    assert_eq!(all.len(), 400);
    env.stop_workers().await;
}
