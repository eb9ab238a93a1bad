//! What a git forge does to the webhook deliveries it sends: signs them.

/// The hex HMAC-SHA256 of `body` with `secret`: how git forges sign webhook deliveries
/// (GitHub's `X-Hub-Signature-256` is `sha256=` and this; Gitea's is this alone).
pub fn hmac_sha256_hex(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}
