//! What every config section has in common, whichever crate owns it: the error that names the
//! key that is wrong, and where a secret comes from. Each section's type lives with what reads
//! it (the triggers' in `triggers/`, the API's in `api/`, the workflows' in their crate); the
//! binary only composes them and reads the secrets, handing each section a [`SecretReader`].
//!
//! Imports nothing of the crate, so that every module (and the workflows crate) may use it.

/// A config value that is wrong: `key` is where (`promotions.api.environments[0].window.from`),
/// `problem` what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct InvalidConfig {
    /// The dotted path of the value.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

impl InvalidConfig {
    /// `key` is wrong because of `problem`.
    pub fn new(key: impl Into<String>, problem: impl std::fmt::Display) -> Self {
        Self {
            key: key.into(),
            problem: problem.to_string(),
        }
    }
}

/// Where a secret comes from: an environment variable or a file (e.g. a mounted Kubernetes
/// secret). Exactly one.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// The environment variable holding it.
    pub env: Option<String>,
    /// The file holding it (trailing newline ignored).
    pub file: Option<std::path::PathBuf>,
}

/// How the binary reads a [`SecretSource`] (given the key it is at, for its error).
pub type ReadSecret = dyn Fn(&SecretSource, &str) -> Result<Vec<u8>, InvalidConfig>;

/// Reads [`SecretSource`]s for the config sections that hold them; an error names the key
/// (`webhooks.github.secret`, `connections.s3.backups.access-key`). The binary provides the
/// reading: the environment and files are its business, not a trigger's or a workflow's.
#[derive(Clone, Copy)]
pub struct SecretReader<'a> {
    read: &'a ReadSecret,
}

impl std::fmt::Debug for SecretReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretReader")
    }
}

impl<'a> SecretReader<'a> {
    /// A reader that reads a source with `read` (given the source and its key).
    pub fn new(read: &'a ReadSecret) -> Self {
        Self { read }
    }

    /// The secret as bytes, as the intakes compare it (no check that it is text).
    pub fn bytes(&self, source: &SecretSource, key: &str) -> Result<Vec<u8>, InvalidConfig> {
        (self.read)(source, key)
    }

    /// The secret as text (URLs, tokens handed to clients).
    pub fn text(&self, source: &SecretSource, key: &str) -> Result<String, InvalidConfig> {
        String::from_utf8(self.bytes(source, key)?).map_err(|_| InvalidConfig::new(key, "not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_read_as_bytes_or_as_text_and_text_must_be_utf8() {
        let read = |_: &SecretSource, key: &str| {
            if key == "bad" {
                Ok(vec![0xff, 0xfe])
            } else {
                Ok(b"s3cret".to_vec())
            }
        };
        let reader = SecretReader::new(&read);
        let source = SecretSource {
            env: Some("X".into()),
            file: None,
        };
        assert_eq!(reader.bytes(&source, "bad").unwrap(), vec![0xff, 0xfe]);
        assert_eq!(reader.text(&source, "good").unwrap(), "s3cret");
        assert_eq!(reader.text(&source, "bad").unwrap_err().to_string(), "bad: not UTF-8");
    }
}
