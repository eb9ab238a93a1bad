//! Notices to a chat channel through an incoming webhook that takes Slack's message shape
//! (`{"text": …}`): Mattermost, Slack, Rocket.Chat, Discord's `/slack` endpoint.
//!
//! The webhook URL is a credential (whoever has it can post), so it never appears in errors.

use serde::Serialize;

use crate::config::{InvalidConfig, SecretReader, SecretSource};

/// Why a notice did not go out.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("the notice webhook could not be reached: {0}")]
    Unreachable(String),
    #[error("the notice webhook answered {status}: {body}")]
    Refused { status: u16, body: String },
}

impl NotifyError {
    /// Whether sending again may work (network trouble, throttling, a server error).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) => true,
            Self::Refused { status, .. } => *status == 429 || *status >= 500,
        }
    }
}

/// A chat webhook.
#[derive(Clone)]
pub struct Notifier {
    url: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Message<'a> {
    username: &'a str,
    text: &'a str,
}

impl Notifier {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            http: super::http::client(),
        }
    }

    /// Posts `text` (Markdown) as user `dayshift`.
    pub async fn send(&self, text: &str) -> Result<(), NotifyError> {
        let response = self
            .http
            .post(&self.url)
            .json(&Message {
                username: "dayshift",
                text,
            })
            .send()
            .await
            .map_err(|e| NotifyError::Unreachable(e.without_url().to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        Err(NotifyError::Refused {
            status: status.as_u16(),
            body: body.chars().take(300).collect(),
        })
    }
}

// `connections.notify.<name>` as the config file gives it.
/// A chat webhook.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NotifyConnectionConfig {
    /// Where the incoming-webhook URL is (it is a credential: whoever has it can post).
    pub url: SecretSource,
}

impl NotifyConnectionConfig {
    /// The webhook URL, read and checked; `key` is where it is in the config.
    pub fn resolve(&self, key: &str, read: SecretReader<'_>) -> Result<String, InvalidConfig> {
        let key = format!("{key}.url");
        let url = read.text(&self.url, &key)?.trim().to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(InvalidConfig::new(key, "must start with http:// or https://"));
        }
        Ok(url)
    }
}
