//! Git repositories a test owns ([`GitServer`]), served by `git daemon` on loopback, with
//! helpers to seed, read and race them.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{free_port, unique};

/// Bare git repositories on disk, served on loopback by `git daemon` (pushes allowed).
pub struct GitServer {
    pub dir: PathBuf,
    port: u16,
    daemon: Child,
}

impl GitServer {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("dayshift-git-server-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        // git-daemon itself, not `git daemon`: the `git` wrapper would leave the daemon running
        // when it is killed.
        let exec_path = std::process::Command::new("git")
            .arg("--exec-path")
            .output()
            .expect("git is missing: run `scripts/services.sh up`");
        let daemon_bin = PathBuf::from(String::from_utf8_lossy(&exec_path.stdout).trim()).join("git-daemon");
        let daemon = Command::new(daemon_bin)
            .args([
                "--reuseaddr",
                "--export-all",
                "--enable=receive-pack",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", dir.display()))
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("git is missing: run `scripts/services.sh up`");
        // Ready when the port accepts connections.
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self { dir, port, daemon }
    }

    /// The URL dayshift clones.
    pub fn url(&self, repo: &str) -> String {
        format!("git://127.0.0.1:{}/{repo}.git", self.port)
    }

    fn bare(&self, repo: &str) -> PathBuf {
        self.dir.join(format!("{repo}.git"))
    }

    /// A new repository whose branch `branch` holds `files` (path, content) in one commit.
    pub fn create(&self, repo: &str, branch: &str, files: &[(&str, &str)]) {
        let bare = self.bare(repo);
        git(
            &self.dir,
            &[
                "init",
                "--quiet",
                "--bare",
                "--initial-branch",
                branch,
                bare.to_str().unwrap(),
            ],
        );
        let work = self.dir.join(format!("{repo}-seed"));
        git(
            &self.dir,
            &["clone", "--quiet", bare.to_str().unwrap(), work.to_str().unwrap()],
        );
        git(&work, &["checkout", "--quiet", "-b", branch]);
        for (path, content) in files {
            let file = work.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, content).unwrap();
        }
        git(&work, &["add", "."]);
        git(&work, &["commit", "--quiet", "-m", "seed"]);
        git(&work, &["push", "--quiet", "origin", branch]);
        std::fs::remove_dir_all(work).unwrap();
    }

    /// The tip of `branch`.
    pub fn head(&self, repo: &str, branch: &str) -> String {
        git(&self.bare(repo), &["rev-parse", branch])
    }

    /// The tree (every file's content) at the tip of `branch`: equal for two commits that hold
    /// the same files, as a commit and the revert of the commit after it do.
    pub fn tree(&self, repo: &str, branch: &str) -> String {
        git(&self.bare(repo), &["rev-parse", &format!("{branch}^{{tree}}")])
    }

    /// `path` at the tip of `branch`.
    pub fn read(&self, repo: &str, branch: &str, path: &str) -> String {
        git(&self.bare(repo), &["show", &format!("{branch}:{path}")])
    }

    /// `git log` of `branch`: (commit, author email, full message), newest first.
    pub fn log(&self, repo: &str, branch: &str) -> Vec<(String, String, String)> {
        git(&self.bare(repo), &["log", "--format=%H%x00%ae%x00%B%x1e", branch])
            .split('\u{1e}')
            .filter_map(|c| {
                let mut parts = c.trim().splitn(3, '\0');
                Some((
                    parts.next()?.to_string(),
                    parts.next()?.to_string(),
                    parts.next()?.trim().to_string(),
                ))
            })
            .collect()
    }

    /// The diff `git show` prints for `commit`, without its header.
    pub fn diff(&self, repo: &str, commit: &str) -> String {
        git(&self.bare(repo), &["show", "--format=", "--unified=0", commit])
    }

    /// Another writer commits `content` to `path` on `branch` and pushes.
    pub fn push_other(&self, repo: &str, branch: &str, path: &str, content: &str) {
        self.push_changes(repo, branch, &[(path, Some(content))]);
    }

    /// Another writer commits `changes` (each a path and its new content, or `None` to delete
    /// it) to `branch` in one commit, and pushes.
    pub fn push_changes(&self, repo: &str, branch: &str, changes: &[(&str, Option<&str>)]) {
        let work = self.dir.join(format!("{repo}-other-{}", unique()));
        git(
            &self.dir,
            &[
                "clone",
                "--quiet",
                "--branch",
                branch,
                self.bare(repo).to_str().unwrap(),
                work.to_str().unwrap(),
            ],
        );
        for (path, content) in changes {
            let file = work.join(path);
            match content {
                Some(c) => {
                    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                    std::fs::write(file, c).unwrap();
                }
                None => std::fs::remove_file(file).unwrap(),
            }
        }
        git(&work, &["add", "-A", "."]);
        git(
            &work,
            &[
                "-c",
                "user.email=other@acme.io",
                "-c",
                "user.name=Other",
                "commit",
                "--quiet",
                "-m",
                "another writer",
            ],
        );
        git(&work, &["push", "--quiet", "origin", branch]);
        std::fs::remove_dir_all(work).unwrap();
    }

    /// Makes the next push to `repo` race with another writer, for certain: the push waits in
    /// the repository's pre-receive hook until [`GitServer::push_other`] has moved the branch,
    /// so its update is then refused. Returns once that push is waiting.
    pub async fn race_next_push(&self, repo: &str, branch: &str, path: &str, content: &str) {
        let bare = self.bare(repo);
        let hook = bare.join("hooks/pre-receive");
        std::fs::write(
            &hook,
            "#!/bin/sh\ncat >/dev/null\nif mkdir \"$GIT_DIR/first-push\" 2>/dev/null; then\n  touch \"$GIT_DIR/first-push-waiting\"\n  while [ ! -f \"$GIT_DIR/other-pushed\" ]; do sleep 0.02; done\nfi\nexit 0\n",
        )
        .unwrap();
        let mut perms = std::fs::metadata(&hook).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&hook, perms).unwrap();
        let waiting = bare.join("first-push-waiting");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !waiting.exists() {
            assert!(tokio::time::Instant::now() < deadline, "no push arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.push_other(repo, branch, path, content);
        std::fs::write(bare.join("other-pushed"), "").unwrap();
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.daemon.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs git in `dir`; its trimmed stdout. Panics with stderr on failure.
pub(crate) fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Seed")
        .env("GIT_AUTHOR_EMAIL", "seed@acme.io")
        .env("GIT_COMMITTER_NAME", "Seed")
        .env("GIT_COMMITTER_EMAIL", "seed@acme.io")
        .output()
        .expect("git is missing: run `scripts/services.sh up`");
    assert!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
