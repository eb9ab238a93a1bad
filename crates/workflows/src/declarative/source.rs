//! Workflow files kept in a git repository (`workflows.git`): where they are, and reading them
//! at a branch's tip. [`crate::file_sync`] keeps an engine's workflows in sync with them.
//!
//! The repository is read with a token of its own (`workflows.git.token`): `serve` holds no
//! other credential, so it should be one that can only read.

use std::time::Duration;

use serde::Deserialize;

use crate::adapters::git::{GitConfig, check_branch, check_relative};
use crate::config::{InvalidConfig, SecretReader, SecretSource};

// `workflows.git` as the config file gives it.
/// A git repository of workflow files, kept in sync.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GitSourceConfig {
    /// `https://…`, `ssh://…` or `git://…`.
    pub url: String,
    /// The branch whose tip is loaded. Default `main`.
    #[serde(default = "main")]
    pub branch: String,
    /// The directory of the workflow files in the repository. Default: its root.
    #[serde(default)]
    pub path: Option<String>,
    /// Where an https token is (one that can only read the repository).
    #[serde(default)]
    pub token: Option<SecretSource>,
    /// The repository's name in the forge's push webhooks (`owner/name`; GitLab: the project's
    /// path), so that a push to the branch refreshes at once. Default: the URL's path without
    /// `.git`.
    #[serde(default)]
    pub repository: Option<String>,
    /// How often the branch is checked. Default `5m`; at least `1s`.
    #[serde(default = "five_minutes", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub refresh: Duration,
}

fn main() -> String {
    "main".into()
}

fn five_minutes() -> Duration {
    Duration::from_secs(300)
}

impl GitSourceConfig {
    /// The repository's name in the forge's push webhooks.
    pub fn repository_name(&self) -> String {
        self.repository.clone().unwrap_or_else(|| {
            let path = url::Url::parse(&self.url)
                .map(|u| u.path().to_string())
                .unwrap_or_default();
            path.trim_matches('/').trim_end_matches(".git").to_string()
        })
    }

    /// The source, its token read; `key` is where it is in the config.
    pub fn resolve(&self, key: &str, read: SecretReader<'_>) -> Result<GitSource, InvalidConfig> {
        check_branch(&self.branch).map_err(|e| InvalidConfig::new(format!("{key}.branch"), e.to_string()))?;
        let path = self.path.clone().unwrap_or_else(|| ".".into());
        check_relative(&path).map_err(|e| InvalidConfig::new(format!("{key}.path"), e.to_string()))?;
        if self.refresh < Duration::from_secs(1) {
            return Err(InvalidConfig::new(format!("{key}.refresh"), "must be at least 1s"));
        }
        let token = match &self.token {
            Some(src) => Some(read.text(src, &format!("{key}.token"))?.trim().to_string()),
            None => None,
        };
        Ok(GitSource {
            git: GitConfig {
                url: self.url.clone(),
                token,
                author_name: "dayshift".into(),
                author_email: "dayshift@localhost".into(),
                forge: None,
            },
            branch: self.branch.clone(),
            path,
            refresh: self.refresh,
        })
    }
}

/// A resolved [`GitSourceConfig`].
#[derive(Debug, Clone)]
pub struct GitSource {
    git: GitConfig,
    pub branch: String,
    path: String,
    /// How often the branch is checked.
    pub refresh: Duration,
}

/// The workflow files of one commit.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub commit: String,
    /// Each file's name (the repository, branch and path: what errors and versions show) and text.
    pub files: Vec<(String, String)>,
}

impl GitSource {
    /// Where the files are, for messages: `<url>#<branch>`.
    pub fn name(&self) -> String {
        format!("{}#{}", self.git.url, self.branch)
    }

    /// The workflow files (`*.yaml`, `*.yml`) at the branch's tip, in name order.
    pub async fn fetch(&self) -> Result<Fetched, String> {
        let checkout = self
            .git
            .checkout(&self.branch)
            .await
            .map_err(|e| format!("workflows.git: {e}"))?;
        let commit = checkout.head().await.map_err(|e| format!("workflows.git: {e}"))?;
        let dir = checkout
            .inside(&self.path)
            .map_err(|e| format!("workflows.git.path: {e}"))?;
        let entries = std::fs::read_dir(&dir).map_err(|e| {
            format!(
                "workflows.git.path: {} on {} of {}: {e}",
                self.path, self.branch, self.git.url
            )
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
            .collect();
        names.sort();
        let mut files = Vec::new();
        for name in names {
            let relative = if self.path == "." {
                name.clone()
            } else {
                format!("{}/{name}", self.path.trim_end_matches('/'))
            };
            // A file that is a link out of the checkout is refused, not read.
            let file = checkout.inside(&relative).map_err(|e| format!("workflows.git: {e}"))?;
            let text = std::fs::read_to_string(&file).map_err(|e| format!("workflows.git: {relative}: {e}"))?;
            files.push((format!("{}#{}:{relative}", self.git.url, self.branch), text));
        }
        Ok(Fetched { commit, files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(yaml: &str) -> Result<GitSource, InvalidConfig> {
        let config: GitSourceConfig = serde_saphyr::from_str(yaml).unwrap();
        let none = |_: &SecretSource, key: &str| Err(InvalidConfig::new(key, "no secrets here"));
        config.resolve("workflows.git", SecretReader::new(&none))
    }

    #[test]
    fn a_branch_git_would_misread_a_path_out_of_the_repository_or_a_busy_refresh_is_refused_where_it_is() {
        let url = "url: https://git.acme.io/platform/workflows.git\n";
        let ok = resolve(url).unwrap();
        assert_eq!(ok.name(), "https://git.acme.io/platform/workflows.git#main");
        for (extra, key) in [
            ("branch: --upload-pack=x\n", "workflows.git.branch"),
            ("path: ../../etc\n", "workflows.git.path"),
            ("path: /etc\n", "workflows.git.path"),
            ("refresh: 10ms\n", "workflows.git.refresh"),
        ] {
            let e = resolve(&format!("{url}{extra}")).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn the_repository_in_push_webhooks_defaults_to_the_url_s_path() {
        let config: GitSourceConfig =
            serde_saphyr::from_str("url: https://gitlab.acme.io/platform/gitops/workflows.git\n").unwrap();
        assert_eq!(config.repository_name(), "platform/gitops/workflows");
    }
}
