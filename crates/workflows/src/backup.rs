//! `backup.postgres` and `restore.postgres`: a database dumped, compressed and streamed into S3,
//! verified; and restored, after its checksum is checked.
//!
//! Object layout: `<prefix>/<database>/<YYYY>/<MM>/<DD>/<YYYYMMDDTHHMMSSZ>-<run id>.dump.zst`, with
//! `….manifest.json` beside it (database, server version, size, sha256, times, run id).

use std::process::Stdio;
use std::sync::Arc;

use async_compression::tokio::bufread::ZstdDecoder;
use chrono::{DateTime, Utc};
use dayshift_engine::{Ctx, RetryPolicy, StepCtx, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};
use tokio::io::BufReader;

use crate::adapters::postgres::{PgAdmin, PgError};
use crate::adapters::s3::{S3Store, Stored};
use crate::adapters::step_err;
use crate::connections::Connections;

/// The input of `backup.postgres`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupInput {
    /// A PostgreSQL connection name (connections.postgres).
    pub database: String,
    /// An S3 connection name (connections.s3).
    pub store: String,
    /// Key prefix. Default `postgres`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
}

pub(crate) fn default_prefix() -> String {
    "postgres".into()
}

/// What a backup workflow stored (and the manifest beside it says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// What was backed up: `postgres` (a pg_dump custom-format archive, zstd) or `vault` (a
    /// raft snapshot, as Vault/OpenBao produce it).
    pub kind: String,
    /// The connection name of the database or Vault backed up.
    pub source: String,
    /// The version of the server the backup was taken from.
    pub server_version: String,
    pub key: String,
    pub size: u64,
    pub sha256: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub run_id: String,
}

/// Whether `key` is a backup object (rather than a manifest or something else).
pub(crate) fn is_backup_object(key: &str) -> bool {
    key.ends_with(".dump.zst") || key.ends_with(".snap")
}

/// The database and the store named in a workflow's input.
pub(crate) async fn open(
    connections: &Connections,
    database: &str,
    store: &str,
) -> Result<(PgAdmin, S3Store), WorkflowError> {
    let pg = PgAdmin::new(connections.postgres(database).map_err(WorkflowError::failed)?);
    let s3 = S3Store::new(connections.s3(store).map_err(WorkflowError::failed)?).await;
    Ok((pg, s3))
}

/// The `backup.postgres` workflow.
pub fn backup_postgres(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "backup.postgres",
        "Dumps a PostgreSQL database (pg_dump custom format, zstd) into S3 as a stream, with a manifest; verifies it.",
        move |ctx: Ctx, input: BackupInput| {
            let connections = connections.clone();
            async move { run_backup(ctx, connections, input).await }
        },
    )
    .freshness("database")
}

async fn run_backup(ctx: Ctx, connections: Arc<Connections>, input: BackupInput) -> Result<Manifest, WorkflowError> {
    let (pg, s3) = open(&connections, &input.database, &input.store).await?;
    let (s3r, pg) = (&s3, &pg);
    let target = Target {
        kind: "postgres",
        source: &input.database,
        prefix: &input.prefix,
        extension: "dump.zst",
    };
    store_backup(&ctx, &s3, target, "dump-and-upload", |key| async move {
        dump_and_upload(s3r, &key, pg).await
    })
    .await
}

/// Where a backup goes: `<prefix>/<source>/<YYYY>/<MM>/<DD>/<time>-<run id>.<extension>`.
pub(crate) struct Target<'a> {
    pub kind: &'a str,
    pub source: &'a str,
    pub prefix: &'a str,
    pub extension: &'a str,
}

/// The steps every backup shares: plan the key (journaled, so that an attempt after a crash
/// writes, and first cleans up, the same key), `upload` into it (step `upload_step`; returns what
/// was stored and the server's version), write the manifest, verify size and checksum.
pub(crate) async fn store_backup<F, Fut>(
    ctx: &Ctx,
    s3: &S3Store,
    target: Target<'_>,
    upload_step: &str,
    upload: F,
) -> Result<Manifest, WorkflowError>
where
    F: FnOnce(String) -> Fut + Send,
    Fut: std::future::Future<Output = Result<(Stored, String), StepError>> + Send,
{
    let run_id = ctx.run_id().to_string();
    let t = &target;
    let (key, started_at): (String, DateTime<Utc>) = ctx
        .step("plan", |_s| async {
            let now = Utc::now();
            let key = format!(
                "{}/{}/{}/{}-{}.{}",
                t.prefix.trim_end_matches('/'),
                t.source,
                now.format("%Y/%m/%d"),
                now.format("%Y%m%dT%H%M%SZ"),
                run_id,
                t.extension
            );
            Ok::<_, StepError>((key, now))
        })
        .await?;
    let (stored, server_version): (Stored, String) = ctx
        .step(upload_step, |_s: StepCtx| upload(key))
        .retry(RetryPolicy::network())
        .undo({
            let s3 = s3.clone();
            move |_s, (stored, _): (Stored, String)| async move { s3.delete(&stored.key).await.map_err(step_err) }
        })
        .await?;
    let manifest = Manifest {
        kind: target.kind.into(),
        source: target.source.into(),
        server_version,
        key: stored.key.clone(),
        size: stored.size,
        sha256: stored.sha256.clone(),
        started_at,
        finished_at: Utc::now(),
        run_id: ctx.run_id().to_string(),
    };
    let m = &manifest;
    ctx.step("write-manifest", |_s| async move {
        let bytes = serde_json::to_vec_pretty(m).map_err(StepError::permanent)?;
        s3.put(&format!("{}.manifest.json", m.key), bytes)
            .await
            .map_err(step_err)
    })
    .retry(RetryPolicy::network())
    // A manifest must never name a dump that is not there: if verification fails, the dump's
    // undo deletes it, and this one deletes its manifest first.
    .undo({
        let (s3, key) = (s3.clone(), format!("{}.manifest.json", m.key));
        move |_s, ()| async move { s3.delete(&key).await.map_err(step_err) }
    })
    .await?;
    ctx.step("verify", |_s| async move {
        let (size, sha256) = s3.digest(&m.key).await.map_err(step_err)?;
        if size != m.size || sha256 != m.sha256 {
            return Err(StepError::Permanent(format!(
                "verification failed: stored {size} bytes with sha256 {sha256}, uploaded {} bytes with sha256 {}",
                m.size, m.sha256
            )));
        }
        Ok(())
    })
    .retry(RetryPolicy::network())
    .await?;
    Ok(manifest)
}

/// Streams `pg_dump | zstd` into the object. Running it again replaces the object (and first
/// aborts an upload a killed attempt left behind).
async fn dump_and_upload(s3: &S3Store, key: &str, pg: &PgAdmin) -> Result<(Stored, String), StepError> {
    s3.ensure_bucket().await.map_err(step_err)?;
    let tools = pg.client_tools().await;
    let (mut child, errors) = pg
        .spawn_tool(
            &tools,
            "pg_dump",
            // zstd below compresses; pg_dump's own zlib would cost CPU and leave zstd nothing to do.
            &["--format=custom", "--compress=0"],
            Stdio::null(),
            Stdio::piped(),
        )
        .map_err(step_err)?;
    let stdout = child.stdout.take().expect("piped stdout");
    let raw = stdout.into_owned_fd().map_err(StepError::transient)?;
    let (compressed, compressor) = compress_on_a_thread(std::fs::File::from(raw));
    let uploaded = s3.upload_stream(key, compressed, 8 << 20).await;
    // The compressor ends once pg_dump's output ends, or at once if the upload stopped reading.
    let _ = compressor.await;
    let status = child.wait().await.map_err(StepError::transient)?;
    let stderr = errors.await.unwrap_or_default();
    if !status.success() {
        // The stream ended early but looked complete: the object is not a backup.
        let _ = s3.delete(key).await;
        return Err(step_err(PgError::tool_failed("pg_dump", &stderr)));
    }
    let stored = uploaded.map_err(step_err)?;
    Ok((stored, tools.server_version))
}

/// Compressed chunks on their way from the compressing thread to the upload: with the parts
/// of the upload, what bounds the memory a backup holds.
const COMPRESSED_CHUNKS: usize = 4;
const CHUNK: usize = 1 << 20;

/// `raw` compressed with zstd (level 3, as `zstd -3`) on a blocking thread of its own, read as
/// a stream. Compression is the CPU-heavy part of a backup: on the async workers it would
/// hold up everything else the worker does meanwhile, the step's own lease renewals included
/// (a long enough stretch loses the lease), and it would not overlap the upload. The thread
/// stops when `raw` ends or the stream is dropped; a read error ends the stream with it.
fn compress_on_a_thread(raw: std::fs::File) -> (impl tokio::io::AsyncRead + Unpin, tokio::task::JoinHandle<()>) {
    use std::io::Read;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<std::io::Cursor<Vec<u8>>>>(COMPRESSED_CHUNKS);
    let compressor = tokio::task::spawn_blocking(move || {
        let mut encoder = match zstd::stream::read::Encoder::new(raw, 3) {
            Ok(e) => e,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            let mut chunk = vec![0u8; CHUNK];
            let mut filled = 0;
            while filled < CHUNK {
                match encoder.read(&mut chunk[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            if filled == 0 {
                return;
            }
            chunk.truncate(filled);
            if tx.blocking_send(Ok(std::io::Cursor::new(chunk))).is_err() {
                return; // the upload stopped
            }
        }
    });
    let chunks = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (tokio_util::io::StreamReader::new(chunks), compressor)
}

/// The input of `restore.postgres`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreInput {
    /// An S3 connection name.
    pub store: String,
    /// The backed-up database's name (to find its latest backup), unless `key` is given.
    #[serde(default)]
    pub database: Option<String>,
    /// A backup's object key; default the latest of `database`.
    #[serde(default)]
    pub key: Option<String>,
    /// Key prefix. Default `postgres`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The PostgreSQL connection name to restore into.
    pub target: String,
    /// Restore even if the target has tables.
    #[serde(default)]
    pub overwrite: bool,
}

/// The `restore.postgres` workflow.
pub fn restore_postgres(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "restore.postgres",
        "Restores a backup (the latest by default) into a database, after checking its checksum.",
        move |ctx: Ctx, input: RestoreInput| {
            let connections = connections.clone();
            async move { run_restore(ctx, connections, input).await }
        },
    )
    .guard("target")
}

async fn run_restore(ctx: Ctx, connections: Arc<Connections>, input: RestoreInput) -> Result<Manifest, WorkflowError> {
    let (pg, s3) = open(&connections, &input.target, &input.store).await?;
    let manifest = choose_backup(
        &ctx,
        &s3,
        input.key.as_deref(),
        input.database.as_deref(),
        &input.prefix,
    )
    .await?;
    verify_checksum(&ctx, &s3, &manifest).await?;
    let (s3r, inp, m, pg) = (&s3, &input, &manifest, &pg);
    ctx.step("check-target", |_s| async move {
        let tables = pg.count_tables().await.map_err(step_err)?;
        if tables > 0 && !inp.overwrite {
            return Err(StepError::Permanent(format!(
                "the target database has {tables} tables; set `overwrite: true` to restore over them"
            )));
        }
        Ok(())
    })
    .retry(RetryPolicy::network())
    .await?;
    ctx.step("restore", |_s| async move {
        restore_into(s3r, &m.key, pg, inp.overwrite).await
    })
    .retry(RetryPolicy::network())
    .await?;
    Ok(manifest)
}

/// Step `choose`: the manifest of backup `key`, or of the latest backup of `database` under
/// `prefix`.
pub(crate) async fn choose_backup(
    ctx: &Ctx,
    s3: &S3Store,
    key: Option<&str>,
    database: Option<&str>,
    prefix: &str,
) -> Result<Manifest, WorkflowError> {
    let manifest = ctx
        .step("choose", |_s| async move {
            let key = match key {
                Some(k) => k.to_string(),
                None => {
                    let db = database.ok_or_else(|| {
                        StepError::permanent(
                            "give the backup's `key`, or the `database` whose latest backup to restore",
                        )
                    })?;
                    let prefix = format!("{}/{db}/", prefix.trim_end_matches('/'));
                    let listed = s3.list(&prefix).await.map_err(step_err)?;
                    listed
                        .into_iter()
                        .map(|o| o.key)
                        .filter(|k| k.ends_with(".dump.zst"))
                        .max()
                        .ok_or_else(|| StepError::Permanent(format!("no backup under {prefix}")))?
                }
            };
            let out = s3
                .client()
                .get_object()
                .bucket(s3.bucket())
                .key(format!("{key}.manifest.json"))
                .send()
                .await
                .map_err(|e| StepError::Permanent(format!("no manifest for {key}: {e}")))?;
            let bytes = out.body.collect().await.map_err(StepError::transient)?.into_bytes();
            serde_json::from_slice::<Manifest>(&bytes)
                .map_err(|e| StepError::Permanent(format!("bad manifest for {key}: {e}")))
        })
        .retry(RetryPolicy::network())
        .await?;
    Ok(manifest)
}

/// Step `verify-checksum`: the stored object has the manifest's size and sha256.
pub(crate) async fn verify_checksum(ctx: &Ctx, s3: &S3Store, m: &Manifest) -> Result<(), WorkflowError> {
    ctx.step("verify-checksum", |_s| async move {
        let (size, sha256) = s3.digest(&m.key).await.map_err(step_err)?;
        if size != m.size || sha256 != m.sha256 {
            return Err(StepError::Permanent(format!(
                "checksum mismatch for {}: the manifest says {} bytes with sha256 {}, the store holds {size} bytes with sha256 {sha256}; refusing to restore",
                m.key, m.size, m.sha256
            )));
        }
        Ok(())
    })
    .retry(RetryPolicy::network())
    .await?;
    Ok(())
}

/// Streams the object through zstd into `pg_restore`, in one transaction: it restores all or
/// nothing, so running it again after a failure starts from the same state.
pub(crate) async fn restore_into(s3: &S3Store, key: &str, pg: &PgAdmin, overwrite: bool) -> Result<(), StepError> {
    let tools = pg.client_tools().await;
    let out = s3
        .client()
        .get_object()
        .bucket(s3.bucket())
        .key(key)
        .send()
        .await
        .map_err(|e| StepError::transient(format!("S3 GetObject failed: {e}")))?;
    let mut decompressed = ZstdDecoder::new(BufReader::new(out.body.into_async_read()));
    let mut args = vec![
        "--no-owner",
        "--no-privileges",
        "--single-transaction",
        "--exit-on-error",
    ];
    if overwrite {
        args.extend(["--clean", "--if-exists"]);
    }
    let (mut child, errors) = pg
        .spawn_tool(&tools, "pg_restore", &args, Stdio::piped(), Stdio::null())
        .map_err(step_err)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let copied = tokio::io::copy(&mut decompressed, &mut stdin).await;
    drop(stdin);
    let status = child.wait().await.map_err(StepError::transient)?;
    let stderr = errors.await.unwrap_or_default();
    if let Err(e) = copied {
        return Err(StepError::transient(format!("reading the backup failed: {e}")));
    }
    if !status.success() {
        return Err(step_err(PgError::tool_failed("pg_restore", &stderr)));
    }
    Ok(())
}
