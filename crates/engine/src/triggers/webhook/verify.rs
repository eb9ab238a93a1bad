//! Who sent a delivery: GitHub's, Gitea's and Forgejo's HMAC of the body, GitLab's token,
//! compared in constant time.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use crate::triggers::webhook::event::{Forge, HookError};

/// Headers, by lower-case name.
pub trait Headers {
    fn get(&self, name: &str) -> Option<&str>;
}

impl Headers for axum::http::HeaderMap {
    fn get(&self, name: &str) -> Option<&str> {
        axum::http::HeaderMap::get(self, name).and_then(|v| v.to_str().ok())
    }
}

impl Headers for Vec<(&str, &str)> {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }
}

pub(crate) type HmacSha256 = hmac::Hmac<Sha256>;

/// Checks the delivery's signature or token against `secret`.
pub fn verify(forge: Forge, headers: &dyn Headers, body: &[u8], secret: &[u8]) -> Result<(), HookError> {
    let unauthorized = |m: &str| Err(HookError::Unauthorized(m.to_string()));
    match forge {
        Forge::Gitlab => match headers.get("x-gitlab-token") {
            None => unauthorized("missing X-Gitlab-Token"),
            Some(token) if crate::identity::same(token.as_bytes(), secret) => Ok(()),
            Some(_) => unauthorized("wrong X-Gitlab-Token"),
        },
        Forge::Github | Forge::Gitea | Forge::Forgejo => {
            let (header, signature) = match forge {
                Forge::Github => (
                    "X-Hub-Signature-256",
                    headers
                        .get("x-hub-signature-256")
                        .map(|s| s.strip_prefix("sha256=").unwrap_or("")),
                ),
                Forge::Gitea => ("X-Gitea-Signature", headers.get("x-gitea-signature")),
                _ => (
                    "X-Forgejo-Signature",
                    headers
                        .get("x-forgejo-signature")
                        .or_else(|| headers.get("x-gitea-signature")),
                ),
            };
            let Some(signature) = signature else {
                return unauthorized(&format!("missing {header}"));
            };
            let Ok(expected) = hex::decode(signature.trim()) else {
                return unauthorized(&format!("{header} is not a hex HMAC-SHA256"));
            };
            let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
            mac.update(body);
            mac.verify_slice(&expected)
                .or_else(|_| unauthorized(&format!("{header} does not match the body")))
        }
    }
}
