//! S3-compatible object storage (SeaweedFS, MinIO, AWS): streaming multipart uploads with
//! bounded memory, verification by streaming digest, listings.
//!
//! # Design notes
//! - Uploads stream: one part (default 8 MiB) is in memory at a time, whatever the object size;
//!   the size and SHA-256 are computed on the way.
//! - A failed upload is aborted, so it leaves no parts behind. A worker killed mid-upload cannot
//!   abort; so an upload first aborts any earlier incomplete upload of the same key. The step
//!   that runs again after such a kill therefore leaves one object and no orphan.
//! - Checksums: the SDK's default flexible checksums (aws-chunked trailers) are rejected by many
//!   S3-compatible stores, so they are only sent when required; region and path-style
//!   addressing are always set (see CRATES.md, P7).

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::{InvalidConfig, SecretReader, SecretSource};

/// Where a bucket is and how to reach it.
#[derive(Clone)]
pub struct S3Config {
    /// e.g. `http://127.0.0.1:18333` for SeaweedFS; `None` for AWS itself.
    pub endpoint: Option<String>,
    /// Any value for stores that ignore it; required by the SDK.
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// Bucket in the path, not the host name (S3-compatible stores want it). Default true.
    pub path_style: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("path_style", &self.path_style)
            .finish_non_exhaustive()
    }
}

/// Why an S3 operation failed. `Transient` ones are worth retrying.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("S3 {op} failed: {message}")]
    Transient { op: &'static str, message: String },
    #[error("S3 {op} failed: {message}")]
    Permanent { op: &'static str, message: String },
    #[error("reading the data to upload failed: {0}")]
    Source(#[from] std::io::Error),
}

impl S3Error {
    fn from_sdk<E: std::fmt::Debug + std::fmt::Display>(op: &'static str, e: aws_sdk_s3::error::SdkError<E>) -> Self {
        use aws_sdk_s3::error::SdkError;
        let message = match &e {
            SdkError::ServiceError(s) => format!("{} ({})", s.err(), s.raw().status().as_u16()),
            other => format!("{other}"),
        };
        let permanent = match &e {
            SdkError::ServiceError(s) => matches!(s.raw().status().as_u16(), 400 | 401 | 403 | 404),
            SdkError::ConstructionFailure(_) => true,
            _ => false,
        };
        if permanent {
            Self::Permanent { op, message }
        } else {
            Self::Transient { op, message }
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
}

/// What an upload stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stored {
    pub key: String,
    pub size: u64,
    /// Hex SHA-256 of the object's bytes.
    pub sha256: String,
    pub parts: u32,
}

/// An object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
}

/// A bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
}

/// Smallest part S3 accepts (except the last).
pub const MIN_PART: usize = 5 << 20;

/// Parts sent at once by [`S3Store::upload_stream`] while the next part is read: memory is
/// `(PARTS_IN_FLIGHT + 1) × part size`.
const PARTS_IN_FLIGHT: usize = 1;

/// The result of a part upload task.
fn joined(result: Result<Result<CompletedPart, S3Error>, tokio::task::JoinError>) -> Result<CompletedPart, S3Error> {
    result.unwrap_or_else(|e| {
        Err(S3Error::Transient {
            op: "UploadPart",
            message: format!("the part upload task ended: {e}"),
        })
    })
}

impl S3Store {
    /// A client for the bucket (no request is made).
    pub async fn new(conf: &S3Config) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(conf.region.clone()))
            .credentials_provider(Credentials::new(
                &conf.access_key,
                &conf.secret_key,
                None,
                None,
                "dayshift-config",
            ))
            .http_client(http);
        if let Some(endpoint) = &conf.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let sdk = loader.load().await;
        let s3 = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(conf.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Self {
            client: aws_sdk_s3::Client::from_conf(s3),
            bucket: conf.bucket.clone(),
        }
    }

    /// The SDK client, for operations this adapter does not wrap.
    pub fn client(&self) -> &aws_sdk_s3::Client {
        &self.client
    }

    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Creates the bucket if it does not exist. Safe to repeat.
    pub async fn ensure_bucket(&self) -> Result<(), S3Error> {
        if self.client.head_bucket().bucket(&self.bucket).send().await.is_ok() {
            return Ok(());
        }
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                // Another run may have created it meanwhile.
                if self.client.head_bucket().bucket(&self.bucket).send().await.is_ok() {
                    Ok(())
                } else {
                    Err(S3Error::from_sdk("CreateBucket", e))
                }
            }
        }
    }

    /// Incomplete multipart uploads under `prefix`: (key, upload id).
    pub async fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<(String, String)>, S3Error> {
        let out = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(prefix)
            .send()
            .await
            .map_err(|e| S3Error::from_sdk("ListMultipartUploads", e))?;
        Ok(out
            .uploads()
            .iter()
            .filter_map(|u| Some((u.key()?.to_string(), u.upload_id()?.to_string())))
            .collect())
    }

    async fn abort(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| S3Error::from_sdk("AbortMultipartUpload", e))
    }

    /// Streams `source` into `key` as a multipart upload of `part_size`-byte parts.
    ///
    /// Memory: two parts (one being sent while the next is read). Aborts earlier incomplete uploads of `key` first, and this upload if
    /// anything fails, so no parts are left behind. Safe to repeat: the object is replaced.
    pub async fn upload_stream<R: AsyncRead + Unpin>(
        &self,
        key: &str,
        mut source: R,
        part_size: usize,
    ) -> Result<Stored, S3Error> {
        let part_size = part_size.max(MIN_PART);
        for (k, id) in self.incomplete_uploads(key).await? {
            if k == key {
                tracing::info!(key, upload_id = %id, "Aborting an incomplete upload left by an earlier attempt.");
                self.abort(&k, &id).await?;
            }
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| S3Error::from_sdk("CreateMultipartUpload", e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = self.upload_parts(key, &upload_id, &mut source, part_size).await;
        match result {
            Ok(stored) => Ok(stored),
            Err(e) => {
                if let Err(abort) = self.abort(key, &upload_id).await {
                    tracing::warn!(key, error = %abort, "Could not abort a failed upload; the next attempt will.");
                }
                Err(e)
            }
        }
    }

    async fn upload_parts<R: AsyncRead + Unpin>(
        &self,
        key: &str,
        upload_id: &str,
        source: &mut R,
        part_size: usize,
    ) -> Result<Stored, S3Error> {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut parts = Vec::new();
        // Parts being sent while the next one is read; dropping the set (on an error) cancels them.
        let mut sending = tokio::task::JoinSet::new();
        let mut number = 0;
        loop {
            // Fill one part (a read may return less than asked). Exactly `part_size` bytes are
            // allocated: `read_to_end` would double the buffer to probe for the end.
            let mut buf = vec![0u8; part_size];
            let mut filled = 0;
            while filled < part_size {
                let n = source.read(&mut buf[filled..]).await?;
                if n == 0 {
                    break;
                }
                // Hashed as it comes, in small pieces: no long stretch of CPU on the async workers.
                hasher.update(&buf[filled..filled + n]);
                filled += n;
            }
            buf.truncate(filled);
            if buf.is_empty() && number > 0 {
                break;
            }
            size += buf.len() as u64;
            number += 1;
            let last = buf.len() < part_size;
            while sending.len() >= PARTS_IN_FLIGHT
                && let Some(sent) = sending.join_next().await
            {
                parts.push(joined(sent)?);
            }
            let request = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(buf));
            sending.spawn(async move {
                let out = request.send().await.map_err(|e| S3Error::from_sdk("UploadPart", e))?;
                Ok(CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(out.e_tag().map(str::to_string))
                    .build())
            });
            if last {
                break;
            }
        }
        while let Some(sent) = sending.join_next().await {
            parts.push(joined(sent)?);
        }
        parts.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts.clone()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| S3Error::from_sdk("CompleteMultipartUpload", e))?;
        Ok(Stored {
            key: key.to_string(),
            size,
            sha256: hex::encode(hasher.finalize()),
            parts: parts.len() as u32,
        })
    }

    /// Size and hex SHA-256 of an object, read as a stream.
    pub async fn digest(&self, key: &str) -> Result<(u64, String), S3Error> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| S3Error::from_sdk("GetObject", e))?;
        let mut body = out.body.into_async_read();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = body.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        Ok((size, hex::encode(hasher.finalize())))
    }

    /// Puts a small object (a manifest). Safe to repeat.
    pub async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| S3Error::from_sdk("PutObject", e))
    }

    /// Every object under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, S3Error> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| S3Error::from_sdk("ListObjectsV2", e))?;
            for o in page.contents() {
                out.push(Listed {
                    key: o.key().unwrap_or_default().to_string(),
                    size: o.size().unwrap_or_default() as u64,
                });
            }
        }
        Ok(out)
    }

    /// Deletes an object. Safe to repeat: a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| S3Error::from_sdk("DeleteObject", e))
    }
}

// `connections.s3.<name>` as the config file gives it.
/// An S3 store.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct S3ConnectionConfig {
    /// e.g. `http://seaweedfs-s3.storage:8333`; absent for AWS itself.
    pub endpoint: Option<String>,
    /// Required by the SDK; any value for stores that ignore it. Default us-east-1.
    #[serde(default = "us_east_1")]
    pub region: String,
    pub bucket: String,
    /// Bucket in the path rather than the host name. Default true.
    #[serde(default = "yes")]
    pub path_style: bool,
    pub access_key: SecretSource,
    pub secret_key: SecretSource,
}

fn us_east_1() -> String {
    "us-east-1".into()
}

fn yes() -> bool {
    true
}

impl S3ConnectionConfig {
    /// The store with its keys read; `key` is where it is in the config.
    pub fn resolve(&self, key: &str, read: SecretReader<'_>) -> Result<S3Config, InvalidConfig> {
        Ok(S3Config {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            bucket: self.bucket.clone(),
            access_key: read.text(&self.access_key, &format!("{key}.access-key"))?,
            secret_key: read.text(&self.secret_key, &format!("{key}.secret-key"))?,
            path_style: self.path_style,
        })
    }
}
