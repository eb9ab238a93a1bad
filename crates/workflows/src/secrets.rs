//! Generating secrets, and handing a password to PostgreSQL without the plaintext.

use base64::Engine as _;
use hmac::{KeyInit, Mac};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How a secret is generated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Generator {
    /// Characters. Default 32.
    pub length: usize,
    /// `alphanumeric` (default; safe in URLs, connection strings and config files), `urlsafe`
    /// (adds `-` and `_`), or the characters to draw from.
    pub alphabet: String,
}

impl Default for Generator {
    fn default() -> Self {
        Self {
            length: 32,
            alphabet: "alphanumeric".into(),
        }
    }
}

const ALPHANUMERIC: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

impl Generator {
    fn chars(&self) -> Vec<char> {
        let set = match self.alphabet.as_str() {
            "alphanumeric" => ALPHANUMERIC.to_string(),
            "urlsafe" => format!("{ALPHANUMERIC}-_"),
            custom => custom.to_string(),
        };
        let mut chars: Vec<char> = set.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        chars
    }

    /// Refuses generators that would make weak or unusable secrets.
    pub fn check(&self) -> Result<(), GeneratorError> {
        if !(16..=1024).contains(&self.length) {
            return Err(GeneratorError::Length(self.length));
        }
        let chars = self.chars();
        if chars.len() < 10 {
            return Err(GeneratorError::NarrowAlphabet(chars.len()));
        }
        if chars.iter().any(|c| c.is_control()) {
            return Err(GeneratorError::ControlCharacters);
        }
        Ok(())
    }

    /// A new secret, each character drawn uniformly by the operating system's CSPRNG (through
    /// `rand`'s thread-local ChaCha generator, seeded and reseeded from it).
    pub fn generate(&self) -> String {
        let chars = self.chars();
        let mut rng = rand::rng();
        (0..self.length)
            .map(|_| chars[rng.random_range(0..chars.len())])
            .collect()
    }
}

/// Why a generator would make weak or unusable secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeneratorError {
    /// Too short to resist guessing, or too long for the systems that store it.
    #[error("generator.length must be 16 to 1024, not {0}")]
    Length(usize),
    /// Too few different characters to draw from.
    #[error("generator.alphabet must have at least 10 different characters, not {0}")]
    NarrowAlphabet(usize),
    /// Characters that configs and shells mangle.
    #[error("generator.alphabet must not contain control characters")]
    ControlCharacters,
}

/// The SCRAM-SHA-256 verifier of `password`, as PostgreSQL stores it in `pg_authid`
/// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, RFC 5802/7677). Handing this to
/// `ALTER ROLE … PASSWORD` sets the password without its plaintext ever reaching the server, its
/// logs or `pg_stat_statements` (what `psql`'s `\password` does).
pub fn scram_sha_256(password: &str, salt: &[u8], iterations: u32) -> String {
    type HmacSha256 = hmac::Hmac<Sha256>;
    let hmac = |key: &[u8], data: &[u8]| {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(data);
        mac.finalize().into_bytes()
    };
    // PBKDF2-HMAC-SHA256, one block (the output is one hash long).
    let mut first = salt.to_vec();
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password.as_bytes(), &first);
    let mut salted = u;
    for _ in 1..iterations {
        u = hmac(password.as_bytes(), &u);
        for (s, x) in salted.iter_mut().zip(u.iter()) {
            *s ^= x;
        }
    }
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = Sha256::digest(client_key);
    let server_key = hmac(&salted, b"Server Key");
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        b64.encode(salt),
        b64.encode(stored_key),
        b64.encode(server_key)
    )
}

/// [`scram_sha_256`] with a fresh random salt and PostgreSQL's default 4096 iterations.
pub fn scram_verifier(password: &str) -> String {
    let salt: [u8; 16] = rand::rng().random();
    scram_sha_256(password, &salt, 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_have_the_length_and_alphabet_asked_for() {
        let g = Generator {
            length: 40,
            alphabet: "abcdefghij".into(),
        };
        g.check().unwrap();
        let a = g.generate();
        assert_eq!(a.chars().count(), 40);
        assert!(a.chars().all(|c| "abcdefghij".contains(c)), "{a}");
        assert_ne!(a, g.generate());
        assert!(
            Generator::default()
                .generate()
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        );
    }

    #[test]
    fn weak_generators_are_refused() {
        let short = Generator {
            length: 8,
            ..Generator::default()
        };
        assert!(
            short
                .check()
                .unwrap_err()
                .to_string()
                .contains("length must be 16 to 1024")
        );
        let narrow = Generator {
            alphabet: "aaab".into(),
            ..Generator::default()
        };
        assert!(
            narrow
                .check()
                .unwrap_err()
                .to_string()
                .contains("at least 10 different characters")
        );
    }
}
