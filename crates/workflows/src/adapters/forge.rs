//! The pull-request API of the forge that hosts a git connection's repository: GitHub,
//! Gitea/Forgejo (one API) or GitLab (merge requests). Three calls, each answered in the
//! forge's own shapes: find the open pull request from a branch to a base, open one, read one.
//!
//! The token is the connection's (or the forge's own, when given): sent the way each forge
//! takes it, never in a URL, an error or an output.

use serde_json::{Value, json};

use super::endpoint::{Endpoint, EndpointError, Request};
use crate::config::{InvalidConfig, SecretReader, SecretSource};

/// Which API the forge speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ForgeKind {
    Github,
    /// Gitea and Forgejo (the same API).
    Gitea,
    Forgejo,
    Gitlab,
}

// `connections.git.<name>.forge` as the config file gives it.
/// The forge hosting the repository, for opening pull (merge) requests.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ForgeConfig {
    /// `github`, `gitea`, `forgejo` or `gitlab`.
    pub kind: ForgeKind,
    /// The API's base URL. Default: `https://api.github.com` for github; for the others, the
    /// clone URL's scheme and host with `/api/v1` (Gitea, Forgejo) or `/api/v4` (GitLab).
    #[serde(default)]
    pub api_url: Option<String>,
    /// `owner/name` (GitHub, Gitea, Forgejo) or the project's path (GitLab:
    /// `group/subgroup/project`). Default: the clone URL's path without `.git`.
    #[serde(default)]
    pub repository: Option<String>,
    /// Where the API token is. Default: the connection's `token`.
    #[serde(default)]
    pub token: Option<SecretSource>,
}

impl ForgeConfig {
    /// The forge, its token read; `key` is where it is in the config, `clone_url` and
    /// `git_token` the connection's.
    pub fn resolve(
        &self,
        key: &str,
        clone_url: &str,
        git_token: Option<&str>,
        read: SecretReader<'_>,
    ) -> Result<Forge, InvalidConfig> {
        let clone = url::Url::parse(clone_url).ok();
        let api = match (&self.api_url, self.kind, &clone) {
            (Some(api), _, _) => api.clone(),
            (None, ForgeKind::Github, _) => "https://api.github.com".into(),
            (None, kind, Some(u)) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                let version = if kind == ForgeKind::Gitlab { "v4" } else { "v1" };
                format!("{}/api/{version}", u.origin().ascii_serialization())
            }
            (None, _, _) => {
                return Err(InvalidConfig::new(
                    format!("{key}.api-url"),
                    "is needed: the clone URL is not an http(s) URL to find the API from",
                ));
            }
        };
        let mut base = url::Url::parse(&api)
            .map_err(|e| InvalidConfig::new(format!("{key}.api-url"), format!("not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() || base.query().is_some() {
            return Err(InvalidConfig::new(
                format!("{key}.api-url"),
                "must be an http:// or https:// URL with a host and no query",
            ));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let repository = match (&self.repository, &clone) {
            (Some(r), _) => r.clone(),
            (None, Some(u)) => u.path().trim_matches('/').trim_end_matches(".git").to_string(),
            (None, None) => String::new(),
        };
        let parts: Vec<&str> = repository.split('/').collect();
        let shape_ok = parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        }) && if self.kind == ForgeKind::Gitlab {
            parts.len() >= 2
        } else {
            parts.len() == 2
        };
        if !shape_ok {
            return Err(InvalidConfig::new(
                format!("{key}.repository"),
                format!(
                    "{repository:?} is not {}",
                    if self.kind == ForgeKind::Gitlab {
                        "a GitLab project path (group/project)"
                    } else {
                        "owner/name"
                    }
                ),
            ));
        }
        let token = match &self.token {
            Some(src) => Some(read.text(src, &format!("{key}.token"))?.trim().to_string()),
            None => git_token.map(str::to_string),
        };
        let Some(token) = token else {
            return Err(InvalidConfig::new(
                format!("{key}.token"),
                "is needed: give the forge a token, or the connection one",
            ));
        };
        let (secret, plain) = match self.kind {
            ForgeKind::Github => (
                vec![("authorization".to_string(), format!("Bearer {token}"))],
                vec![
                    ("accept".to_string(), "application/vnd.github+json".to_string()),
                    ("x-github-api-version".to_string(), "2022-11-28".to_string()),
                ],
            ),
            ForgeKind::Gitea | ForgeKind::Forgejo => {
                (vec![("authorization".to_string(), format!("token {token}"))], vec![])
            }
            ForgeKind::Gitlab => (vec![("private-token".to_string(), token)], vec![]),
        };
        Ok(Forge {
            kind: self.kind,
            repository,
            api: Endpoint::new(base, secret, plain),
        })
    }
}

/// A resolved forge. `Debug` shows the API URL and repository only.
#[derive(Clone)]
pub struct Forge {
    kind: ForgeKind,
    repository: String,
    api: Endpoint,
}

impl std::fmt::Debug for Forge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forge")
            .field("kind", &self.kind)
            .field("api", &self.api.base().as_str())
            .field("repository", &self.repository)
            .finish_non_exhaustive()
    }
}

/// A pull request (a merge request on GitLab) as dayshift reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PullRequest {
    /// GitHub's and Gitea's `number`, GitLab's `iid`.
    pub number: u64,
    pub url: String,
    /// `open`, `merged` or `closed` (closed without merging).
    pub state: &'static str,
    /// The commit the merge made on the base branch, once merged.
    pub merge_commit: Option<String>,
}

impl Forge {
    /// The URL of `segments` below the API's base (each one percent-encoded whole, `/` included,
    /// as GitLab's project path must be).
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> url::Url {
        let mut url = self.api.base().clone();
        {
            let mut p = url.path_segments_mut().expect("an http(s) URL has a path");
            p.pop_if_empty();
            for s in segments {
                p.push(s);
            }
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// The path to the repository's pull requests, and the name of their number.
    fn pulls(&self) -> Vec<&str> {
        match self.kind {
            ForgeKind::Gitlab => vec!["projects", self.repository.as_str(), "merge_requests"],
            _ => {
                let (owner, name) = self.repository.split_once('/').unwrap_or_default();
                vec!["repos", owner, name, "pulls"]
            }
        }
    }

    async fn call(
        &self,
        method: &str,
        url: url::Url,
        body: Option<Value>,
        expect: &[u16],
    ) -> Result<Value, EndpointError> {
        let req = Request {
            method: method.into(),
            body,
            expect: expect.to_vec(),
            ..Request::default()
        };
        self.api.send_to(url, &req).await
    }

    fn read(&self, v: &Value) -> Result<PullRequest, EndpointError> {
        let number = match self.kind {
            ForgeKind::Gitlab => v["iid"].as_u64(),
            _ => v["number"].as_u64(),
        };
        let url = match self.kind {
            ForgeKind::Gitlab => v["web_url"].as_str(),
            _ => v["html_url"].as_str(),
        };
        let (Some(number), Some(url)) = (number, url) else {
            return Err(EndpointError::Refused(format!(
                "the forge's answer is not a pull request: {}",
                v.to_string().chars().take(200).collect::<String>()
            )));
        };
        let state = match self.kind {
            ForgeKind::Gitlab => match v["state"].as_str() {
                Some("merged") => "merged",
                Some("opened") | Some("locked") => "open",
                _ => "closed",
            },
            _ if v["merged"] == true || v["merged_at"].is_string() => "merged",
            _ if v["state"] == "open" => "open",
            _ => "closed",
        };
        let merge_commit = ["merge_commit_sha", "squash_commit_sha"]
            .iter()
            .find_map(|k| v[*k].as_str().filter(|_| state == "merged").map(str::to_string));
        Ok(PullRequest {
            number,
            url: url.to_string(),
            state,
            merge_commit,
        })
    }

    /// The open pull request from `head` to `base`, if there is one.
    pub async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, EndpointError> {
        let pulls = self.pulls();
        let owner = self.repository.split('/').next().unwrap_or_default();
        let head_ref = format!("{owner}:{head}");
        // GitHub and GitLab filter by branch; Gitea lists the open ones, read page by page.
        for page in 1..=20u32 {
            let page_text = page.to_string();
            let query: Vec<(&str, &str)> = match self.kind {
                ForgeKind::Github => vec![("state", "open"), ("head", &head_ref), ("base", base)],
                ForgeKind::Gitlab => vec![("state", "opened"), ("source_branch", head), ("target_branch", base)],
                _ => vec![("state", "open"), ("limit", "50"), ("page", &page_text)],
            };
            let answer = self.call("GET", self.url(&pulls, &query), None, &[200]).await?;
            let list = answer["json"].as_array().cloned().unwrap_or_default();
            let found = list.iter().find(|p| match self.kind {
                ForgeKind::Gitlab => p["source_branch"] == head && p["target_branch"] == base,
                _ => p["head"]["ref"] == head && p["base"]["ref"] == base,
            });
            if let Some(p) = found {
                return self.read(p).map(Some);
            }
            if matches!(self.kind, ForgeKind::Github | ForgeKind::Gitlab) || list.len() < 50 {
                break;
            }
        }
        Ok(None)
    }

    /// Opens a pull request from `head` to `base`: the one already open between them, if any
    /// (a repeat, or another writer's), so it is opened once. Returns it and whether this call
    /// opened it.
    pub async fn open(
        &self,
        head: &str,
        base: &str,
        title: &str,
        body: &str,
        draft: bool,
    ) -> Result<(PullRequest, bool), EndpointError> {
        if let Some(pr) = self.find_open(head, base).await? {
            return Ok((pr, false));
        }
        let request = match self.kind {
            ForgeKind::Github => json!({ "title": title, "head": head, "base": base, "body": body, "draft": draft }),
            ForgeKind::Gitlab => json!({
                "source_branch": head, "target_branch": base, "description": body,
                "title": if draft { format!("Draft: {title}") } else { title.to_string() },
            }),
            _ => json!({
                "head": head, "base": base, "body": body,
                "title": if draft { format!("WIP: {title}") } else { title.to_string() },
            }),
        };
        // 422 (GitHub) and 409 (Gitea, GitLab) say one is open already: opened meanwhile.
        let answer = self
            .call(
                "POST",
                self.url(&self.pulls(), &[]),
                Some(request),
                &[200, 201, 409, 422],
            )
            .await?;
        if answer["status"] == 200 || answer["status"] == 201 {
            return Ok((self.read(&answer["json"])?, true));
        }
        match self.find_open(head, base).await? {
            Some(pr) => Ok((pr, false)),
            None => Err(EndpointError::Status {
                what: format!("opening a pull request from {head} to {base}"),
                status: answer["status"].as_u64().unwrap_or_default() as u16,
                expected: "201".into(),
                body: answer["json"]["message"]
                    .as_str()
                    .or(answer["json"]["errors"][0]["message"].as_str())
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect(),
            }),
        }
    }

    /// Pull request `number`.
    pub async fn get(&self, number: u64) -> Result<PullRequest, EndpointError> {
        let n = number.to_string();
        let mut segments = self.pulls();
        segments.push(&n);
        let answer = self.call("GET", self.url(&segments, &[]), None, &[200]).await?;
        self.read(&answer["json"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forge(
        kind: ForgeKind,
        clone: &str,
        api: Option<&str>,
        repository: Option<&str>,
    ) -> Result<Forge, InvalidConfig> {
        let none = |_: &SecretSource, key: &str| Err(InvalidConfig::new(key, "no secrets here"));
        ForgeConfig {
            kind,
            api_url: api.map(str::to_string),
            repository: repository.map(str::to_string),
            token: None,
        }
        .resolve(
            "connections.git.infra.forge",
            clone,
            Some("t0ken"),
            SecretReader::new(&none),
        )
    }

    #[test]
    fn the_api_and_the_repository_are_found_from_the_clone_url() {
        let gh = forge(ForgeKind::Github, "https://github.com/acme/infra.git", None, None).unwrap();
        assert_eq!(
            gh.url(&gh.pulls(), &[]).as_str(),
            "https://api.github.com/repos/acme/infra/pulls"
        );
        let gitea = forge(ForgeKind::Forgejo, "https://git.acme.io/acme/infra.git", None, None).unwrap();
        assert_eq!(
            gitea.url(&gitea.pulls(), &[]).as_str(),
            "https://git.acme.io/api/v1/repos/acme/infra/pulls"
        );
        // GitLab's project path is one segment, its slashes encoded.
        let gl = forge(
            ForgeKind::Gitlab,
            "https://gitlab.acme.io/platform/gitops/infra.git",
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            gl.url(&gl.pulls(), &[("state", "opened")]).as_str(),
            "https://gitlab.acme.io/api/v4/projects/platform%2Fgitops%2Finfra/merge_requests?state=opened"
        );
        assert!(!format!("{gl:?}").contains("t0ken"));
    }

    #[test]
    fn a_repository_that_is_not_one_or_a_url_without_an_api_is_refused_where_it_is() {
        let e = forge(
            ForgeKind::Github,
            "https://github.com/acme/infra.git",
            None,
            Some("acme/../x"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("connections.git.infra.forge.repository"), "{e}");
        let e = forge(
            ForgeKind::Gitea,
            "git://git.acme.io/acme/infra.git",
            None,
            Some("acme/infra"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("connections.git.infra.forge.api-url"), "{e}");
        let e = forge(ForgeKind::Gitlab, "https://gitlab.acme.io/infra.git", None, None).unwrap_err();
        assert!(e.to_string().contains("GitLab project path"), "{e}");
    }
}
