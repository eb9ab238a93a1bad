//! The S3 adapter against a real SeaweedFS (started by scripts/services.sh).

use dayshift_tests::{s3_test_config, unique};
use dayshift_workflows::adapters::s3::S3Store;
use sha2::{Digest, Sha256};
use tokio::io::AsyncRead;

/// The shared test bucket, and a key prefix of this test's own (a bucket per test would use up
/// SeaweedFS's volumes).
async fn store() -> (S3Store, String) {
    let store = S3Store::new(&s3_test_config(None)).await;
    store.ensure_bucket().await.expect("create bucket");
    (store, format!("t-{}/", unique()))
}

/// `len` bytes of a repeatable pseudo-random stream.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A reader that fails after `ok` bytes, like a dump that dies half-way.
struct FailsAfter {
    data: std::io::Cursor<Vec<u8>>,
    ok: u64,
}

impl AsyncRead for FailsAfter {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.data.position() >= self.ok {
            return std::task::Poll::Ready(Err(std::io::Error::other("pg_dump exited with status 1")));
        }
        std::pin::Pin::new(&mut self.data).poll_read(cx, buf)
    }
}

#[tokio::test]
async fn a_stream_is_uploaded_in_parts_and_verified_by_its_digest() {
    let (s3, p) = store().await;
    let key = format!("{p}pg/main/dump.zst");
    let bytes = data(21 * 1024 * 1024 + 123, 7);
    let expected = hex::encode(Sha256::digest(&bytes));
    let stored = s3
        .upload_stream(&key, std::io::Cursor::new(bytes.clone()), 8 << 20)
        .await
        .unwrap();
    assert_eq!(
        (stored.size, stored.sha256.as_str(), stored.parts),
        (bytes.len() as u64, expected.as_str(), 3)
    );
    assert_eq!(s3.digest(&key).await.unwrap(), (bytes.len() as u64, expected));
    assert!(s3.incomplete_uploads(&p).await.unwrap().is_empty());
    // Repeating the upload (a step that runs again) replaces the object: still one.
    s3.upload_stream(&key, std::io::Cursor::new(bytes), 8 << 20)
        .await
        .unwrap();
    assert_eq!(s3.list(&p).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_upload_is_aborted_and_leaves_nothing() {
    let (s3, p) = store().await;
    let source = FailsAfter {
        data: std::io::Cursor::new(data(20 << 20, 3)),
        ok: 12 << 20,
    };
    let err = s3
        .upload_stream(&format!("{p}pg/main/broken.zst"), source, 5 << 20)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pg_dump exited"), "{err}");
    assert!(
        s3.incomplete_uploads(&p).await.unwrap().is_empty(),
        "parts were left behind"
    );
    assert!(s3.list(&p).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_upload_left_by_a_killed_worker_is_aborted_by_the_next_attempt() {
    let (s3, p) = store().await;
    let key = format!("{p}pg/main/x.zst");
    // What a worker killed mid-upload leaves: a started upload with a part, never completed.
    let started = s3
        .client()
        .create_multipart_upload()
        .bucket(s3.bucket())
        .key(&key)
        .send()
        .await
        .unwrap();
    let upload_id = started.upload_id().unwrap().to_string();
    s3.client()
        .upload_part()
        .bucket(s3.bucket())
        .key(&key)
        .upload_id(&upload_id)
        .part_number(1)
        .body(data(5 << 20, 1).into())
        .send()
        .await
        .unwrap();
    assert_eq!(s3.incomplete_uploads(&p).await.unwrap().len(), 1);
    let stored = s3
        .upload_stream(&key, std::io::Cursor::new(data(1 << 20, 9)), 5 << 20)
        .await
        .unwrap();
    assert_eq!(stored.size, 1 << 20);
    assert!(
        s3.incomplete_uploads(&p).await.unwrap().is_empty(),
        "the orphan is still there"
    );
}

#[tokio::test]
async fn wrong_credentials_are_a_permanent_error() {
    let s3 = S3Store::new(&s3_test_config(Some("not-the-secret"))).await;
    let err = s3.put(&format!("t-{}/k", unique()), b"v".to_vec()).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
}
