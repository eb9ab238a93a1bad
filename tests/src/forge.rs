//! What a git forge does: signs its webhook deliveries ([`hmac_sha256_hex`]), and serves the
//! pull-request API of GitHub, Gitea/Forgejo or GitLab ([`ForgeServer`]).
//!
//! No forge can be installed on these machines (no Debian, pip or npm package ships a Gitea,
//! Forgejo or GitLab server), so [`ForgeServer`] is an in-process stand-in for the three APIs'
//! pull-request endpoints, in the shapes each forge answers, over a real repository of a
//! [`GitServer`]: a head branch must exist there, and a merge is a real `git merge` pushed to
//! the base branch.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::GitServer;

/// The hex HMAC-SHA256 of `body` with `secret`: how git forges sign webhook deliveries
/// (GitHub's `X-Hub-Signature-256` is `sha256=` and this; Gitea's is this alone).
pub fn hmac_sha256_hex(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Which forge's API a [`ForgeServer`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeKind {
    Github,
    Gitea,
    Gitlab,
}

impl ForgeKind {
    /// Its name in dayshift's config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Github => "github",
            Self::Gitea => "gitea",
            Self::Gitlab => "gitlab",
        }
    }
}

/// One pull request as the stand-in keeps it.
#[derive(Debug, Clone)]
pub struct Pull {
    pub number: u64,
    pub head: String,
    pub base: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
    /// `open`, `merged` or `closed`.
    pub state: &'static str,
    pub merge_commit: Option<String>,
}

struct Inner {
    kind: ForgeKind,
    token: String,
    /// The bare repository.
    bare: PathBuf,
    repository: String,
    base_url: String,
    pulls: Vec<Pull>,
    /// How many requests were refused for their credentials.
    unauthorized: usize,
}

type Shared = Arc<Mutex<Inner>>;

/// A forge's pull-request API over one repository of a [`GitServer`].
pub struct ForgeServer {
    /// The API's base URL, for `forge.api-url`.
    pub api_url: String,
    inner: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl ForgeServer {
    /// Serves `repo` of `git` as `repository` (`owner/name`, or GitLab's project path),
    /// answering requests that carry `token` the way `kind` takes it.
    pub async fn start(kind: ForgeKind, git: &GitServer, repo: &str, repository: &str, token: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let api_url = match kind {
            ForgeKind::Github => format!("{origin}/"),
            ForgeKind::Gitea => format!("{origin}/api/v1"),
            ForgeKind::Gitlab => format!("{origin}/api/v4"),
        };
        let inner = Arc::new(Mutex::new(Inner {
            kind,
            token: token.to_string(),
            bare: git.dir.join(format!("{repo}.git")),
            repository: repository.to_string(),
            base_url: format!("{origin}/{repository}"),
            pulls: Vec::new(),
            unauthorized: 0,
        }));
        let app = match kind {
            ForgeKind::Github | ForgeKind::Gitea => {
                let prefix = if kind == ForgeKind::Gitea { "/api/v1" } else { "" };
                axum::Router::new()
                    .route(
                        &format!("{prefix}/repos/{{owner}}/{{name}}/pulls"),
                        get(list_pulls).post(create_pull),
                    )
                    .route(
                        &format!("{prefix}/repos/{{owner}}/{{name}}/pulls/{{number}}"),
                        get(one_pull),
                    )
            }
            ForgeKind::Gitlab => axum::Router::new()
                .route(
                    "/api/v4/projects/{project}/merge_requests",
                    get(list_pulls_gitlab).post(create_pull_gitlab),
                )
                .route(
                    "/api/v4/projects/{project}/merge_requests/{number}",
                    get(one_pull_gitlab),
                ),
        }
        .with_state(inner.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { api_url, inner, server }
    }

    /// Every pull request, oldest first.
    pub fn pulls(&self) -> Vec<Pull> {
        self.inner.lock().unwrap().pulls.clone()
    }

    /// How many requests were refused for their credentials.
    pub fn unauthorized(&self) -> usize {
        self.inner.lock().unwrap().unauthorized
    }

    /// Merges pull request `number` as a reviewer would: a real merge commit of its head into
    /// its base, pushed to the repository. Returns the merge commit.
    pub fn merge(&self, number: u64) -> String {
        let (bare, head, base) = {
            let inner = self.inner.lock().unwrap();
            let p = inner
                .pulls
                .iter()
                .find(|p| p.number == number)
                .expect("no such pull request");
            assert_eq!(p.state, "open", "pull request {number} is {}", p.state);
            (inner.bare.clone(), p.head.clone(), p.base.clone())
        };
        let work = bare.with_extension(format!("merge-{}", crate::unique()));
        let w = work.to_str().unwrap();
        git(
            &bare,
            &["clone", "--quiet", "--branch", &base, bare.to_str().unwrap(), w],
        );
        git(&work, &["fetch", "--quiet", "origin", &head]);
        git(
            &work,
            &[
                "merge",
                "--quiet",
                "--no-ff",
                "-m",
                &format!("Merge pull request #{number} from {head}"),
                "FETCH_HEAD",
            ],
        );
        git(&work, &["push", "--quiet", "origin", &base]);
        let commit = git(&work, &["rev-parse", "HEAD"]);
        std::fs::remove_dir_all(&work).unwrap();
        let mut inner = self.inner.lock().unwrap();
        let p = inner.pulls.iter_mut().find(|p| p.number == number).unwrap();
        p.state = "merged";
        p.merge_commit = Some(commit.clone());
        commit
    }

    /// Closes pull request `number` without merging it.
    pub fn close(&self, number: u64) {
        let mut inner = self.inner.lock().unwrap();
        let p = inner
            .pulls
            .iter_mut()
            .find(|p| p.number == number)
            .expect("no such pull request");
        p.state = "closed";
    }
}

impl Drop for ForgeServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A 401 in the forge's shape, unless the request carries the token the way the forge takes it.
fn refused(inner: &mut Inner, headers: &HeaderMap) -> Option<Response> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let ok = match inner.kind {
        ForgeKind::Github => header("authorization") == format!("Bearer {}", inner.token),
        ForgeKind::Gitea => header("authorization") == format!("token {}", inner.token),
        ForgeKind::Gitlab => header("private-token") == inner.token,
    };
    if ok {
        return None;
    }
    inner.unauthorized += 1;
    let body = match inner.kind {
        ForgeKind::Github => json!({ "message": "Bad credentials", "status": "401" }),
        ForgeKind::Gitea => json!({ "message": "token is required" }),
        ForgeKind::Gitlab => json!({ "message": "401 Unauthorized" }),
    };
    Some((StatusCode::UNAUTHORIZED, axum::Json(body)).into_response())
}

fn not_found(kind: ForgeKind) -> Response {
    let body = match kind {
        ForgeKind::Gitlab => json!({ "message": "404 Not found" }),
        _ => json!({ "message": "Not Found" }),
    };
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

/// A pull request in GitHub's or Gitea's shape (the fields dayshift and their clients read).
fn github_shape(inner: &Inner, p: &Pull) -> Value {
    json!({
        "number": p.number,
        "html_url": format!("{}/pull{}/{}", inner.base_url, if inner.kind == ForgeKind::Gitea { "s" } else { "" }, p.number),
        "state": if p.state == "open" { "open" } else { "closed" },
        "title": p.title,
        "body": p.body,
        "draft": p.draft,
        "merged": p.state == "merged",
        "merged_at": if p.state == "merged" { json!("2026-12-04T10:00:00Z") } else { Value::Null },
        "merge_commit_sha": p.merge_commit,
        "head": { "ref": p.head, "label": format!("{}:{}", inner.repository.split('/').next().unwrap(), p.head) },
        "base": { "ref": p.base },
    })
}

/// A merge request in GitLab's shape.
fn gitlab_shape(inner: &Inner, p: &Pull) -> Value {
    json!({
        "iid": p.number,
        "id": 1000 + p.number,
        "web_url": format!("{}/-/merge_requests/{}", inner.base_url, p.number),
        "state": match p.state { "open" => "opened", s => s },
        "title": p.title,
        "description": p.body,
        "draft": p.draft,
        "source_branch": p.head,
        "target_branch": p.base,
        "merge_commit_sha": p.merge_commit,
        "squash_commit_sha": Value::Null,
    })
}

fn repository_is(inner: &Inner, owner: &str, name: &str) -> bool {
    inner.repository == format!("{owner}/{name}")
}

async fn list_pulls(
    State(s): State<Shared>,
    Path((owner, name)): Path<(String, String)>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut inner = s.lock().unwrap();
    if let Some(r) = refused(&mut inner, &headers) {
        return r;
    }
    if !repository_is(&inner, &owner, &name) {
        return not_found(inner.kind);
    }
    let state = q.get("state").map(String::as_str).unwrap_or("open");
    let list: Vec<Value> = inner
        .pulls
        .iter()
        .filter(|p| match state {
            "all" => true,
            "closed" => p.state != "open",
            _ => p.state == "open",
        })
        // GitHub filters by `head=owner:branch` and `base`; Gitea ignores both.
        .filter(|p| {
            inner.kind == ForgeKind::Gitea
                || q.get("head")
                    .is_none_or(|h| h.split_once(':').map(|(_, b)| b) == Some(p.head.as_str()))
        })
        .filter(|p| inner.kind == ForgeKind::Gitea || q.get("base").is_none_or(|b| *b == p.base))
        .map(|p| github_shape(&inner, p))
        .collect();
    axum::Json(Value::Array(list)).into_response()
}

async fn create_pull(
    State(s): State<Shared>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut inner = s.lock().unwrap();
    if let Some(r) = refused(&mut inner, &headers) {
        return r;
    }
    if !repository_is(&inner, &owner, &name) {
        return not_found(inner.kind);
    }
    let (head, base) = (text(&body["head"]), text(&body["base"]));
    let exists = |b: &str| !git(&inner.bare, &["branch", "--list", b]).is_empty();
    if !exists(&head) || !exists(&base) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({ "message": "Validation Failed", "errors": [{ "field": "head", "code": "invalid" }] })),
        )
            .into_response();
    }
    if inner
        .pulls
        .iter()
        .any(|p| p.state == "open" && p.head == head && p.base == base)
    {
        return match inner.kind {
            ForgeKind::Github => (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({
                    "message": "Validation Failed",
                    "errors": [{ "message": format!("A pull request already exists for {owner}:{head}.") }],
                })),
            ),
            _ => (
                StatusCode::CONFLICT,
                axum::Json(json!({ "message": "pull request already exists for these targets" })),
            ),
        }
        .into_response();
    }
    let pull = Pull {
        number: inner.pulls.len() as u64 + 1,
        head,
        base,
        title: text(&body["title"]),
        body: text(&body["body"]),
        draft: body["draft"] == true,
        state: "open",
        merge_commit: None,
    };
    let shape = github_shape(&inner, &pull);
    inner.pulls.push(pull);
    (StatusCode::CREATED, axum::Json(shape)).into_response()
}

async fn one_pull(
    State(s): State<Shared>,
    Path((owner, name, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
) -> Response {
    let mut inner = s.lock().unwrap();
    if let Some(r) = refused(&mut inner, &headers) {
        return r;
    }
    match inner.pulls.iter().find(|p| p.number == number) {
        Some(p) if repository_is(&inner, &owner, &name) => axum::Json(github_shape(&inner, p)).into_response(),
        _ => not_found(inner.kind),
    }
}

async fn list_pulls_gitlab(
    State(s): State<Shared>,
    Path(project): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut inner = s.lock().unwrap();
    if let Some(r) = refused(&mut inner, &headers) {
        return r;
    }
    if project != inner.repository {
        return not_found(inner.kind);
    }
    let list: Vec<Value> = inner
        .pulls
        .iter()
        .filter(|p| match q.get("state").map(String::as_str) {
            Some("opened") => p.state == "open",
            Some(s) if s != "all" => p.state == s,
            _ => true,
        })
        .filter(|p| q.get("source_branch").is_none_or(|b| *b == p.head))
        .filter(|p| q.get("target_branch").is_none_or(|b| *b == p.base))
        .map(|p| gitlab_shape(&inner, p))
        .collect();
    axum::Json(Value::Array(list)).into_response()
}

async fn create_pull_gitlab(
    State(s): State<Shared>,
    Path(project): Path<String>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut inner = s.lock().unwrap();
    if let Some(r) = refused(&mut inner, &headers) {
        return r;
    }
    if project != inner.repository {
        return not_found(inner.kind);
    }
    let (head, base) = (text(&body["source_branch"]), text(&body["target_branch"]));
    let exists = |b: &str| !git(&inner.bare, &["branch", "--list", b]).is_empty();
    if !exists(&head) || !exists(&base) {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({ "message": ["Source branch does not exist"] })),
        )
            .into_response();
    }
    if let Some(p) = inner
        .pulls
        .iter()
        .find(|p| p.state == "open" && p.head == head && p.base == base)
    {
        return (
            StatusCode::CONFLICT,
            axum::Json(json!({
                "message": [format!("Another open merge request already exists for this source branch: !{}", p.number)],
            })),
        )
            .into_response();
    }
    let title = text(&body["title"]);
    let pull = Pull {
        number: inner.pulls.len() as u64 + 1,
        head,
        base,
        draft: title.starts_with("Draft:"),
        title,
        body: text(&body["description"]),
        state: "open",
        merge_commit: None,
    };
    let shape = gitlab_shape(&inner, &pull);
    inner.pulls.push(pull);
    (StatusCode::CREATED, axum::Json(shape)).into_response()
}

async fn one_pull_gitlab(
    State(s): State<Shared>,
    Path((project, number)): Path<(String, u64)>,
    headers: HeaderMap,
) -> Response {
    let mut inner = s.lock().unwrap();
    if let Some(r) = refused(&mut inner, &headers) {
        return r;
    }
    match inner.pulls.iter().find(|p| p.number == number) {
        Some(p) if project == inner.repository => axum::Json(gitlab_shape(&inner, p)).into_response(),
        _ => not_found(inner.kind),
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Runs git in `dir`; its trimmed stdout. Panics with stderr on failure.
fn git(dir: &std::path::Path, args: &[&str]) -> String {
    crate::git_server::git(dir, args)
}
