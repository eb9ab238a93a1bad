//! Git through the `git` CLI (full protocol and auth support, nothing to build; see CRATES.md):
//! a fresh shallow clone per step, a commit, a push that reports a rejection (the branch moved)
//! apart from other failures, and a revert.
//!
//! A token never appears on a command line: it reaches git as an `http.extraHeader` through
//! the environment (`GIT_CONFIG_*`), and is kept out of error messages.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine as _;
use tokio::process::Command;

use crate::config::{InvalidConfig, SecretReader, SecretSource};

dayshift_engine::message_error!(
    /// A path that would leave the checkout it is given in.
    OutsideCheckout
);

/// A repository dayshift commits to.
#[derive(Clone, Default)]
pub struct GitConfig {
    /// `https://…`, `ssh://…`, `git://…` or a path.
    pub url: String,
    /// For https: sent as basic auth with user `x-access-token` (GitHub, Gitea, GitLab accept it).
    pub token: Option<String>,
    pub author_name: String,
    pub author_email: String,
    /// The forge hosting it, for pull requests (`forge:` in the config).
    pub forge: Option<super::forge::Forge>,
}

impl std::fmt::Debug for GitConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitConfig")
            .field("url", &self.url)
            .field("author_email", &self.author_email)
            .finish_non_exhaustive()
    }
}

/// A failed git command.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The push was refused because the branch moved on (someone else pushed first).
    #[error("the push to {branch} was rejected: the branch moved ({detail})")]
    Rejected { branch: String, detail: String },
    #[error("git {command} failed: {detail}")]
    Failed { command: String, detail: String },
}

/// What git prints when the network, the server or a lock got in the way: another attempt
/// may succeed. Matched in git's stderr (`LC_ALL=C`, see [`GitConfig::command`]).
const TRANSIENT: [&str; 15] = [
    "could not resolve host",
    "connection refused",
    "connection reset",
    "timed out",
    "the remote end hung up unexpectedly",
    "early eof",
    "rpc failed",
    "unable to connect",
    "network is unreachable",
    "temporary failure",
    "returned error: 429",
    "returned error: 5",
    "could not lock",
    "unable to create", // '….lock': File exists (another git process holds the lock)
    "index.lock",
];

impl GitError {
    /// Whether another attempt may succeed: a branch that moved, the network, a timeout or a
    /// lock held by someone else. A refused credential or permission, a branch or revision that
    /// does not exist, a conflict, a bad name: retrying changes nothing, so they are permanent
    /// (a bad token is not tried five times).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Rejected { .. } => true,
            Self::Failed { detail, .. } => {
                let detail = detail.to_ascii_lowercase();
                TRANSIENT.iter().any(|p| detail.contains(p))
            }
        }
    }
}

/// The one mapping of a git failure to a step error: transient ones are retried, the others
/// fail the step at once.
impl From<GitError> for dayshift_engine::StepError {
    fn from(e: GitError) -> Self {
        if e.is_transient() {
            Self::transient(e)
        } else {
            Self::permanent(e)
        }
    }
}

/// Refuses a branch name git would read as an option or a revision expression: every value
/// that reaches a git command line from input is either checked here or after `--`.
pub fn check_branch(branch: &str) -> Result<(), GitError> {
    let bad = branch.is_empty()
        || branch.len() > 255
        || branch.starts_with(['-', '/', '.'])
        || branch.ends_with(['/', '.'])
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains("@{")
        || branch
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c));
    if bad {
        return Err(GitError::Failed {
            command: "checkout".into(),
            detail: format!("{branch:?} is not a branch name git accepts"),
        });
    }
    Ok(())
}

/// Refuses a path that is not relative, or that goes up (`..`): what [`inside`] checks before
/// it looks at the files.
pub fn check_relative(relative: &str) -> Result<(), OutsideCheckout> {
    use std::path::Component;
    let plain = !relative.is_empty()
        && !relative.contains('\0')
        && Path::new(relative)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if !plain {
        return Err(OutsideCheckout::from(format!(
            "{relative:?} must be a path relative to the repository, without '..' or a leading '/'"
        )));
    }
    Ok(())
}

/// `relative` under `root`, refused unless it stays inside `root` (see [`Checkout::inside`]).
pub fn inside(root: &Path, relative: &str) -> Result<PathBuf, OutsideCheckout> {
    check_relative(relative)?;
    let joined = root.join(relative);
    let root = root.canonicalize().map_err(|e| format!("{}: {e}", root.display()))?;
    let mut existing = joined.as_path();
    // A dangling link counts as existing: resolving it then fails, as it must.
    while existing.symlink_metadata().is_err() {
        existing = existing.parent().unwrap_or(&root);
    }
    let resolved = existing
        .canonicalize()
        .map_err(|e| format!("{relative:?} cannot be resolved inside the repository: {e}"))?;
    if !resolved.starts_with(&root) {
        return Err(OutsideCheckout::from(format!(
            "{relative:?} leads out of the repository (through a symbolic link)"
        )));
    }
    Ok(joined)
}

/// A working copy of one branch.
pub struct Checkout {
    config: GitConfig,
    dir: PathBuf,
    pub branch: String,
    /// The branch cloned: `branch`, or the one it was started from.
    cloned: String,
    _tmp: TempDir,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl GitConfig {
    fn command(&self, dir: Option<&Path>) -> Command {
        let mut cmd = Command::new("git");
        if let Some(dir) = dir {
            cmd.current_dir(dir);
        }
        // English messages, so that `GitError::is_transient` can read them.
        cmd.env("GIT_TERMINAL_PROMPT", "0")
            .env("LC_ALL", "C")
            .env("GIT_AUTHOR_NAME", &self.author_name)
            .env("GIT_AUTHOR_EMAIL", &self.author_email)
            .env("GIT_COMMITTER_NAME", &self.author_name)
            .env("GIT_COMMITTER_EMAIL", &self.author_email)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Some(token) = &self.token {
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
            cmd.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", format!("Authorization: Basic {basic}"));
        }
        cmd
    }

    async fn run(&self, dir: Option<&Path>, args: &[&str]) -> Result<String, GitError> {
        let out = self
            .command(dir)
            .args(args)
            .output()
            .await
            .map_err(|e| GitError::Failed {
                command: args.first().copied().unwrap_or_default().to_string(),
                detail: format!("cannot run git: {e}"),
            })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
        }
        let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if let Some(token) = &self.token {
            detail = detail.replace(token.as_str(), "[redacted]");
        }
        Err(GitError::Failed {
            command: args.first().copied().unwrap_or_default().to_string(),
            detail,
        })
    }

    /// A shallow clone of `branch` into a fresh temporary directory.
    pub async fn checkout(&self, branch: &str) -> Result<Checkout, GitError> {
        check_branch(branch)?;
        let tmp = std::env::temp_dir().join(format!("dayshift-git-{}", uuid::Uuid::new_v4().simple()));
        let dir = tmp.join("repo");
        let path = dir.to_string_lossy().into_owned();
        let guard = TempDir(tmp);
        self.run(
            None,
            &[
                "clone",
                "--quiet",
                "--depth",
                "20",
                "--branch",
                branch,
                "--single-branch",
                "--",
                &self.url,
                &path,
            ],
        )
        .await?;
        Ok(Checkout {
            config: self.clone(),
            dir,
            branch: branch.to_string(),
            cloned: branch.to_string(),
            _tmp: guard,
        })
    }

    /// Whether `branch` exists on the remote.
    pub async fn branch_exists(&self, branch: &str) -> Result<bool, GitError> {
        check_branch(branch)?;
        let out = self
            .run(
                None,
                &["ls-remote", "--heads", "--", &self.url, &format!("refs/heads/{branch}")],
            )
            .await?;
        Ok(!out.is_empty())
    }

    /// A checkout of `branch`, or, when it does not exist yet and `base` is given, of `base`
    /// with `branch` started from it (the push creates it); and whether it was started here.
    pub async fn checkout_or_branch(&self, branch: &str, base: Option<&str>) -> Result<(Checkout, bool), GitError> {
        match base {
            Some(base) if !self.branch_exists(branch).await? => {
                let mut checkout = self.checkout(base).await?;
                self.run(Some(&checkout.dir), &["switch", "--quiet", "-c", branch])
                    .await?;
                checkout.branch = branch.to_string();
                Ok((checkout, true))
            }
            _ => Ok((self.checkout(branch).await?, false)),
        }
    }
}

impl Checkout {
    /// The working directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of `relative` in the work tree, refused unless it stays inside it: relative,
    /// no `..`, and no symbolic link on the way that leads out (the nearest part that exists
    /// is resolved and checked).
    pub fn inside(&self, relative: &str) -> Result<PathBuf, OutsideCheckout> {
        inside(&self.dir, relative)
    }

    /// The commit checked out.
    pub async fn head(&self) -> Result<String, GitError> {
        self.config.run(Some(&self.dir), &["rev-parse", "HEAD"]).await
    }

    /// The full id of `rev`.
    pub async fn rev_parse(&self, rev: &str) -> Result<String, GitError> {
        self.config
            .run(Some(&self.dir), &["rev-parse", "--verify", "--end-of-options", rev])
            .await
    }

    /// The full message of commit `rev`.
    pub async fn message(&self, rev: &str) -> Result<String, GitError> {
        self.config
            .run(
                Some(&self.dir),
                &["log", "-1", "--format=%B", "--end-of-options", rev, "--"],
            )
            .await
    }

    /// The messages of the last `n` commits, newest first, with their ids.
    pub async fn recent(&self, n: usize) -> Result<Vec<(String, String)>, GitError> {
        let out = self
            .config
            .run(Some(&self.dir), &["log", &format!("-{n}"), "--format=%H%x00%B%x1e"])
            .await?;
        Ok(out
            .split('\u{1e}')
            .filter_map(|c| c.trim().split_once('\0'))
            .map(|(id, msg)| (id.trim().to_string(), msg.trim().to_string()))
            .collect())
    }

    /// Commits `files` (paths relative to the work tree) with `message`; returns the commit.
    pub async fn commit(&self, files: &[&str], message: &str) -> Result<String, GitError> {
        let mut add = vec!["add", "--"];
        add.extend_from_slice(files);
        self.config.run(Some(&self.dir), &add).await?;
        self.config
            .run(Some(&self.dir), &["commit", "--quiet", "--no-verify", "-m", message])
            .await?;
        self.head().await
    }

    /// Commits every change in the work tree (additions and deletions) with `message`; `None`
    /// when there is nothing to commit.
    pub async fn commit_all(&self, message: &str) -> Result<Option<String>, GitError> {
        self.config.run(Some(&self.dir), &["add", "-A"]).await?;
        let status = self.config.run(Some(&self.dir), &["status", "--porcelain"]).await?;
        if status.is_empty() {
            return Ok(None);
        }
        self.config
            .run(Some(&self.dir), &["commit", "--quiet", "--no-verify", "-m", message])
            .await?;
        self.head().await.map(Some)
    }

    /// `git revert` of `commit` with `message`; returns the new commit.
    pub async fn revert(&self, commit: &str, message: &str) -> Result<String, GitError> {
        self.config
            .run(
                Some(&self.dir),
                &["revert", "--no-edit", "--no-commit", "--end-of-options", commit],
            )
            .await?;
        self.config
            .run(Some(&self.dir), &["commit", "--quiet", "--no-verify", "-m", message])
            .await?;
        self.head().await
    }

    /// Makes sure `commit` is in the checkout's history, fetching the whole history of the
    /// branch when the shallow clone does not reach it. A commit that is not on the branch at
    /// all is an error that says so.
    pub async fn reach(&self, commit: &str) -> Result<(), GitError> {
        let present = |c: &str| {
            let c = format!("{c}^{{commit}}");
            async move {
                self.config
                    .run(Some(&self.dir), &["cat-file", "-e", "--end-of-options", &c])
                    .await
                    .is_ok()
            }
        };
        let shallow = self
            .config
            .run(Some(&self.dir), &["rev-parse", "--is-shallow-repository"])
            .await?;
        if shallow == "true" && !present(commit).await {
            self.config
                .run(Some(&self.dir), &["fetch", "--quiet", "--unshallow", "origin"])
                .await?;
        }
        let on_branch = self
            .config
            .run(
                Some(&self.dir),
                &["merge-base", "--is-ancestor", "--end-of-options", commit, "HEAD"],
            )
            .await
            .is_ok();
        if !on_branch {
            return Err(GitError::Failed {
                command: "revert".into(),
                detail: format!("{commit} is not a commit of {}", self.cloned),
            });
        }
        Ok(())
    }

    /// Pushes the branch. A rejection because the remote branch moved is
    /// [`GitError::Rejected`]; never forced.
    pub async fn push(&self) -> Result<(), GitError> {
        let refspec = format!("HEAD:refs/heads/{}", self.branch);
        match self
            .config
            .run(Some(&self.dir), &["push", "--quiet", "origin", &refspec])
            .await
        {
            Ok(_) => Ok(()),
            Err(GitError::Failed { detail, .. })
                if [
                    "[rejected]",
                    "fetch first",
                    "non-fast-forward",
                    "cannot lock ref",
                    "failed to update ref",
                ]
                .iter()
                .any(|p| detail.contains(p)) =>
            {
                Err(GitError::Rejected {
                    branch: self.branch.clone(),
                    detail: detail.lines().last().unwrap_or_default().to_string(),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches the branch and moves the work tree to its tip, dropping local commits.
    pub async fn reset_to_remote(&self) -> Result<(), GitError> {
        self.config
            .run(
                Some(&self.dir),
                &[
                    "fetch",
                    "--quiet",
                    "--depth",
                    "20",
                    "--end-of-options",
                    "origin",
                    &format!("refs/heads/{}", self.branch),
                ],
            )
            .await?;
        self.config
            .run(Some(&self.dir), &["reset", "--quiet", "--hard", "FETCH_HEAD"])
            .await?;
        Ok(())
    }
}

// `connections.git.<name>` as the config file gives it.
/// A git repository dayshift commits to.
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GitConnectionConfig {
    /// `https://…`, `ssh://…` (keys from the usual ssh setup) or `git://…`.
    pub url: String,
    /// Where an https token is (sent as basic auth, user `x-access-token`).
    #[serde(default)]
    pub token: Option<SecretSource>,
    /// Default `dayshift`.
    #[serde(default = "dayshift_name")]
    pub author_name: String,
    /// Default `dayshift@localhost`; list it in webhooks.bot-emails too.
    #[serde(default = "dayshift_email")]
    pub author_email: String,
    /// The forge that hosts it, for the `git.pull-request` and `git.wait-merged` actions.
    #[serde(default)]
    pub forge: Option<super::forge::ForgeConfig>,
}

fn dayshift_name() -> String {
    "dayshift".into()
}

fn dayshift_email() -> String {
    "dayshift@localhost".into()
}

impl GitConnectionConfig {
    /// The repository with its token read; `key` is where it is in the config.
    pub fn resolve(&self, key: &str, read: SecretReader<'_>) -> Result<GitConfig, InvalidConfig> {
        let token = match &self.token {
            Some(src) => Some(read.text(src, &format!("{key}.token"))?.trim().to_string()),
            None => None,
        };
        let forge = match &self.forge {
            Some(f) => Some(f.resolve(&format!("{key}.forge"), &self.url, token.as_deref(), read)?),
            None => None,
        };
        Ok(GitConfig {
            url: self.url.clone(),
            token,
            author_name: self.author_name.clone(),
            author_email: self.author_email.clone(),
            forge,
        })
    }
}

#[cfg(test)]
mod tests {
    use dayshift_engine::StepError;

    use super::GitError;

    fn failed(detail: &str) -> GitError {
        GitError::Failed {
            command: "clone".into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn network_timeouts_locks_and_a_moved_branch_are_retried() {
        for detail in [
            "fatal: unable to access 'https://git.acme.io/infra.git/': Could not resolve host: git.acme.io",
            "fatal: unable to access 'https://git.acme.io/infra.git/': Failed to connect to git.acme.io port 443: Connection refused",
            "fatal: the remote end hung up unexpectedly",
            "error: RPC failed; HTTP 502 curl 22 The requested URL returned error: 502",
            "fatal: Unable to create '/tmp/repo/.git/index.lock': File exists.",
            "fatal: unable to access 'https://git.acme.io/infra.git/': Operation timed out after 30000 milliseconds",
        ] {
            assert!(
                matches!(StepError::from(failed(detail)), StepError::Transient(_)),
                "{detail}"
            );
        }
        let moved = GitError::Rejected {
            branch: "main".into(),
            detail: "! [rejected] HEAD -> main (fetch first)".into(),
        };
        assert!(matches!(StepError::from(moved), StepError::Transient(_)));
    }

    #[test]
    fn credentials_permissions_missing_refs_and_conflicts_fail_at_once() {
        for detail in [
            "remote: Invalid username or password.\nfatal: Authentication failed for 'https://git.acme.io/infra.git/'",
            "fatal: could not read Username for 'https://git.acme.io': terminal prompts disabled",
            "fatal: unable to access 'https://git.acme.io/infra.git/': The requested URL returned error: 403",
            "git@git.acme.io: Permission denied (publickey).",
            "warning: Could not find remote branch nope to clone.\nfatal: Remote branch nope not found in upstream origin",
            "fatal: bad revision 'deadbeef'",
            "error: could not revert 1234567... promote\nCONFLICT (content): Merge conflict in envs/prod/values.yaml",
        ] {
            let e = StepError::from(failed(detail));
            assert!(matches!(e, StepError::Permanent(_)), "{detail}");
            assert_eq!(e.to_string(), format!("git clone failed: {detail}"));
        }
    }
}
