//! `backup.retention`: prunes old backups by a generations policy.
//!
//! The policy reads like restic's `forget`: keep the newest `keep-last` backups, plus the newest
//! backup of each of the last `daily` days, `weekly` ISO weeks and `monthly` months that have
//! backups. A backup counts only once its manifest exists (the upload completed); the newest
//! such backup is never deleted, whatever the policy. Nothing is deleted unless the listing
//! succeeded, and `dry-run` only reports what would go.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDateTime, Utc};
use dayshift_engine::{Ctx, RetryPolicy, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};

use crate::adapters::s3::S3Store;
use crate::adapters::step_err;
use crate::backup::is_backup_object;
use crate::connections::Connections;

/// How many generations to keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetentionPolicy {
    /// The newest N backups. Default 3.
    #[serde(default = "three")]
    pub keep_last: u32,
    /// The newest backup of each of the last N days with backups. Default 7.
    #[serde(default = "seven")]
    pub daily: u32,
    /// … of each of the last N ISO weeks. Default 4.
    #[serde(default = "four")]
    pub weekly: u32,
    /// … of each of the last N months. Default 12.
    #[serde(default = "twelve")]
    pub monthly: u32,
}

fn three() -> u32 {
    3
}
fn seven() -> u32 {
    7
}
fn four() -> u32 {
    4
}
fn twelve() -> u32 {
    12
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self {
            keep_last: 3,
            daily: 7,
            weekly: 4,
            monthly: 12,
        }
    }
}

/// A backup found in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    pub key: String,
    pub at: DateTime<Utc>,
    /// Its manifest exists: the upload completed.
    pub complete: bool,
}

/// The time in a backup key (`…/<YYYYMMDDTHHMMSSZ>-<run id>.dump.zst`).
pub fn time_of(key: &str) -> Option<DateTime<Utc>> {
    let name = key.rsplit('/').next()?;
    let stamp = name.get(..16)?;
    NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
        .ok()
        .map(|t| t.and_utc())
}

/// The period a backup falls in: (year, month or ISO week, day).
type Period = dyn Fn(&DateTime<Utc>) -> (i32, u32, u32);

/// Splits `backups` into (kept, deleted) keys by `policy`.
pub fn plan(backups: &[Backup], policy: &RetentionPolicy) -> (Vec<String>, Vec<String>) {
    let mut sorted: Vec<&Backup> = backups.iter().collect();
    sorted.sort_by(|a, b| b.at.cmp(&a.at).then(b.key.cmp(&a.key)));
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    // Incomplete uploads are never counted as a generation, and never the reason to drop one.
    let complete: Vec<&Backup> = sorted.iter().copied().filter(|b| b.complete).collect();
    if let Some(newest) = complete.first() {
        keep.insert(&newest.key);
    }
    for b in complete.iter().take(policy.keep_last as usize) {
        keep.insert(&b.key);
    }
    let mut generation = |n: u32, bucket: &Period| {
        let mut seen = BTreeSet::new();
        for b in &complete {
            if seen.len() >= n as usize {
                break;
            }
            if seen.insert(bucket(&b.at)) {
                keep.insert(&b.key);
            }
        }
    };
    generation(policy.daily, &|t| (t.year(), t.month(), t.day()));
    generation(policy.weekly, &|t| (t.iso_week().year(), t.iso_week().week(), 0));
    generation(policy.monthly, &|t| (t.year(), t.month(), 0));
    let kept: Vec<String> = sorted
        .iter()
        .filter(|b| keep.contains(b.key.as_str()))
        .map(|b| b.key.clone())
        .collect();
    // An incomplete upload older than the newest complete backup is debris: it goes too.
    let deleted = sorted
        .iter()
        .filter(|b| !keep.contains(b.key.as_str()))
        .map(|b| b.key.clone())
        .collect();
    (kept, deleted)
}

/// The input of `backup.retention`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RetentionInput {
    /// An S3 connection name.
    pub store: String,
    /// Whose backups to prune: the database (or Vault) connection name the backups were taken
    /// of. `database` is accepted too.
    #[serde(alias = "database")]
    pub source: String,
    /// Key prefix. Default `postgres` (`vault` for `backup.vault`).
    #[serde(default = "prefix")]
    pub prefix: String,
    #[serde(default)]
    pub policy: RetentionPolicy,
    /// Only report what would be deleted.
    #[serde(default)]
    pub dry_run: bool,
}

fn prefix() -> String {
    "postgres".into()
}

/// What `backup.retention` kept and deleted (or would delete, in a dry run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionReport {
    pub kept: Vec<String>,
    pub deleted: Vec<String>,
    pub dry_run: bool,
}

/// The `backup.retention` workflow.
pub fn backup_retention(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "backup.retention",
        "Prunes old backups by a generations policy (last N, daily, weekly, monthly); never the newest; dry-run.",
        move |ctx: Ctx, input: RetentionInput| {
            let connections = connections.clone();
            async move {
                let s3 = S3Store::new(connections.s3(&input.store).map_err(WorkflowError::failed)?).await;
                let root = format!("{}/{}/", input.prefix.trim_end_matches('/'), input.source);
                let (s3r, rootr) = (&s3, &root);
                // Listing first, in a step of its own: if it fails, nothing is deleted.
                let backups: Vec<Backup> = ctx
                    .step("list", |_s| async move {
                        let listed = s3r.list(rootr).await.map_err(step_err)?;
                        let manifests: BTreeSet<&str> = listed
                            .iter()
                            .filter_map(|o| o.key.strip_suffix(".manifest.json"))
                            .collect();
                        Ok::<_, StepError>(
                            listed
                                .iter()
                                .filter(|o| is_backup_object(&o.key))
                                .filter_map(|o| {
                                    Some(Backup {
                                        key: o.key.clone(),
                                        at: time_of(&o.key)?,
                                        complete: manifests.contains(o.key.as_str()),
                                    })
                                })
                                .collect(),
                        )
                    })
                    .retry(RetryPolicy::default())
                    .await?;
                let (kept, deleted) = plan(&backups, &input.policy);
                if !input.dry_run && !deleted.is_empty() {
                    let doomed = &deleted;
                    // Deleting what is already gone is not an error: safe to repeat.
                    ctx.step("delete", |_s| async move {
                        for key in doomed {
                            s3r.delete(key).await.map_err(step_err)?;
                            s3r.delete(&format!("{key}.manifest.json")).await.map_err(step_err)?;
                        }
                        Ok::<_, StepError>(doomed.len())
                    })
                    .retry(RetryPolicy::default())
                    .await?;
                }
                Ok(RetentionReport {
                    kept,
                    deleted,
                    dry_run: input.dry_run,
                })
            }
        },
    )
    .guard("prefix")
    .guard("source")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn backup(y: i32, m: u32, d: u32, h: u32, complete: bool) -> Backup {
        let at = Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap();
        Backup {
            key: format!("postgres/app/{}-run.dump.zst", at.format("%Y%m%dT%H%M%SZ")),
            at,
            complete,
        }
    }

    #[test]
    fn keys_carry_their_time() {
        let t = time_of("postgres/app/2026/11/21/20261121T023000Z-01a1.dump.zst").unwrap();
        assert_eq!(t, Utc.with_ymd_and_hms(2026, 11, 21, 2, 30, 0).unwrap());
        assert_eq!(time_of("postgres/app/notes.txt"), None);
    }

    #[test]
    fn generations_keep_the_newest_of_each_period() {
        // Two backups a day for ten days in January 2026 (Thursday 1st … Saturday 10th).
        let backups: Vec<Backup> = (1..=10)
            .flat_map(|d| [backup(2026, 1, d, 2, true), backup(2026, 1, d, 14, true)])
            .collect();
        let policy = RetentionPolicy {
            keep_last: 2,
            daily: 3,
            weekly: 2,
            monthly: 1,
        };
        let (kept, deleted) = plan(&backups, &policy);
        let kept: Vec<String> = kept.iter().map(|k| k[13..26].to_string()).collect();
        // last 2: 10th 14h, 10th 02h; daily 3: 10th, 9th, 8th (the 14h ones); weekly 2: ISO week
        // 2 (newest: 10th 14h) and week 1 (newest: Sunday 4th 14h); monthly 1: 10th 14h.
        assert_eq!(
            kept,
            vec![
                "20260110T1400",
                "20260110T0200",
                "20260109T1400",
                "20260108T1400",
                "20260104T1400"
            ]
        );
        assert_eq!(deleted.len(), 15);
    }

    #[test]
    fn the_newest_complete_backup_is_never_deleted() {
        let backups = vec![backup(2026, 1, 2, 2, false), backup(2026, 1, 1, 2, true)];
        let policy = RetentionPolicy {
            keep_last: 0,
            daily: 0,
            weekly: 0,
            monthly: 0,
        };
        let (kept, deleted) = plan(&backups, &policy);
        assert_eq!(kept, vec![backups[1].key.clone()]);
        assert_eq!(deleted, vec![backups[0].key.clone()]);
    }
}
