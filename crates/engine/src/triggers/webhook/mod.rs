//! Git webhooks: GitHub, Gitea, Forgejo and GitLab deliveries start the runs their routes name,
//! once per event.
//!
//! # Design notes
//! - **Authentication** before anything else: GitHub signs the body (`X-Hub-Signature-256:
//!   sha256=<hex>`), Gitea and Forgejo too (`X-Gitea-Signature` / `X-Forgejo-Signature`: bare
//!   hex), GitLab sends a shared token (`X-Gitlab-Token`). Both are compared in constant time.
//! - **One model of events** for all forges: push to a branch, tag (pushed or created), branch or
//!   tag deleted, pull/merge request opened, reopened, synchronized (new commits), closed, merged.
//! - **Once per event**: what the senders really do is redeliver with the same id (GitHub), with
//!   a new id (Gitea's "Redeliver", GitLab's retries), and announce one tag twice (GitHub: `push`
//!   and `create`). So runs are started with an idempotency key made of the route and the
//!   event's *identity*: push = repository, ref, before, after; tag = repository, tag; deletion =
//!   repository, ref; pull request = repository, number, action, head commit.
//! - **Loop protection**: a push whose every commit is authored by dayshift's own identity
//!   (`bot-emails` and the git connections' `author-email`) was made by dayshift and starts
//!   nothing. The `Dayshift-Run: <id>` trailer names the run that made such a commit; from any
//!   other author it means nothing, or anyone could write it to silence a route.
//!
//! The files: [`event`] the event model, [`verify`] signatures and tokens, [`parse`] each
//! forge's payload, [`routes`] what starts what, [`delivery`] a delivery from verification to
//! its recorded outcome, [`config`] the config file's `webhooks:` and its checks.

pub mod config;
pub mod delivery;
pub mod event;
pub mod parse;
pub mod routes;
pub mod verify;

pub use config::{ForgeConfig, WebhooksConfig};
pub use delivery::{DeliveryOutcome, Outcome, StartedByRoute, receive};
pub use event::{CONTEXT_FIELDS, Commit, EventKind, Forge, GitEvent, HookError, Parsed, PullRequest};
pub use parse::parse;
pub use routes::{Pattern, PushWatch, WebhookRoute, Webhooks};
pub use verify::{Headers, verify};

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::{KeyInit, Mac};
    use verify::HmacSha256;

    /// The test vector in GitHub's "Validating webhook deliveries".
    #[test]
    fn githubs_published_signature_vector_verifies() {
        let secret = b"It's a Secret to Everybody";
        let body = b"Hello, World!";
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let headers = vec![("X-Hub-Signature-256", sig)];
        assert_eq!(verify(Forge::Github, &headers, body, secret), Ok(()));
        let tampered = vec![(
            "X-Hub-Signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e18",
        )];
        assert!(verify(Forge::Github, &tampered, body, secret).is_err());
        assert!(verify(Forge::Github, &Vec::new(), body, secret).is_err());
    }

    #[test]
    fn gitea_signs_with_bare_hex_and_gitlab_with_a_token() {
        let secret = b"s3cret";
        let body = br#"{"a":1}"#;
        let mut mac = HmacSha256::new_from_slice(secret).unwrap();
        mac.update(body);
        let hexsig = hex::encode(mac.finalize().into_bytes());
        assert!(
            verify(
                Forge::Gitea,
                &vec![("X-Gitea-Signature", hexsig.as_str())],
                body,
                secret
            )
            .is_ok()
        );
        assert!(
            verify(
                Forge::Forgejo,
                &vec![("X-Forgejo-Signature", hexsig.as_str())],
                body,
                secret
            )
            .is_ok()
        );
        let prefixed = format!("sha256={hexsig}");
        assert!(
            verify(
                Forge::Gitea,
                &vec![("X-Gitea-Signature", prefixed.as_str())],
                body,
                secret
            )
            .is_err()
        );
        assert!(verify(Forge::Gitlab, &vec![("X-Gitlab-Token", "s3cret")], body, secret).is_ok());
        assert!(verify(Forge::Gitlab, &vec![("X-Gitlab-Token", "s3creT")], body, secret).is_err());
    }

    #[test]
    fn globs_do_not_cross_slashes_unless_asked() {
        let p: Pattern = "apps/*".parse().unwrap();
        assert!(p.is_match("apps/web") && !p.is_match("apps/web/values.yaml"));
        let p: Pattern = "apps/**".parse().unwrap();
        assert!(p.is_match("apps/web/values.yaml"));
        assert!("release/[".parse::<Pattern>().is_err());
    }
}
