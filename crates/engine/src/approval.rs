//! Approval gates: a run waits until enough of the people a gate names have approved.
//!
//! # Design notes
//! An approval is only worth something if it cannot be faked. So:
//! - the decision's identity is the authenticated caller the engine recorded with the signal
//!   (`token:<name>` for an API token, `oidc:<name>` for an OpenID Connect user), never a field
//!   of a payload; a token and an OIDC user can never share an identity;
//! - the signal names the engine owns ([`APPROVAL_SIGNAL`], [`RESOLVED_SIGNAL`] and anything
//!   under [`RESERVED_SIGNAL_PREFIX`]) cannot be sent through the generic signal route: only
//!   [`crate::Engine::decide`] sends approvals, with the caller it authenticated;
//! - whoever started the run through the API, and the author the trigger names, made the change
//!   and may not approve it;
//! - [`may_decide`] is the one rule: the gate applies it to every decision it receives, and
//!   the API and the console apply it before a decision is even sent.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::core::error::{ConfigError, Refused};
use serde::{Deserialize, Serialize};

/// The signal an approval gate waits for. Sent only by [`crate::Engine::decide`].
pub const APPROVAL_SIGNAL: &str = "approval";
/// The signal the Alertmanager intake sends when an alert that started a run resolves.
pub const RESOLVED_SIGNAL: &str = "resolved";
/// Signal names under this prefix are the engine's, like the two above.
pub const RESERVED_SIGNAL_PREFIX: &str = "dayshift.";

/// Whether `name` is a signal only the engine may send.
pub fn is_reserved_signal(name: &str) -> bool {
    name == APPROVAL_SIGNAL || name == RESOLVED_SIGNAL || name.starts_with(RESERVED_SIGNAL_PREFIX)
}

/// Who may approve: one API token, one OpenID Connect user, or any member of an OIDC group.
/// Written `token:<name>`, `oidc:<name>` or `group:<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Approver {
    /// The API token of this name (`dayshift tokens create NAME`).
    Token(String),
    /// The OpenID Connect user of this name (the configured username claim).
    Oidc(String),
    /// Any OpenID Connect user whose groups claim holds this value.
    Group(String),
}

crate::message_error!(
    /// Text that is not an approver: the text, and what an approver looks like.
    InvalidApprover
);

impl FromStr for Approver {
    type Err = InvalidApprover;
    fn from_str(s: &str) -> Result<Self, InvalidApprover> {
        let (kind, name) = s.split_once(':').unwrap_or(("", s));
        if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
            return Err(InvalidApprover(format!(
                "approver '{s}': the name after the kind must be 1 to 200 printable characters"
            )));
        }
        match kind {
            "token" => Ok(Self::Token(name.into())),
            "oidc" => Ok(Self::Oidc(name.into())),
            "group" => Ok(Self::Group(name.into())),
            _ => Err(InvalidApprover(format!(
                "approver '{s}' must say what it is: token:{name} (an API token's name), oidc:{name} \
                 (an OpenID Connect user) or group:{name} (an OpenID Connect group)"
            ))),
        }
    }
}

impl fmt::Display for Approver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Token(n) => write!(f, "token:{n}"),
            Self::Oidc(n) => write!(f, "oidc:{n}"),
            Self::Group(n) => write!(f, "group:{n}"),
        }
    }
}

impl Serialize for Approver {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Approver {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl schemars::JsonSchema for Approver {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Approver".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^(token|oidc|group):.+$",
            "description": "token:<API token name>, oidc:<OpenID Connect user> or group:<OpenID Connect group>"
        })
    }
}

/// Who must approve, and how many of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalGate {
    /// Who may approve: `token:<API token name>`, `oidc:<OIDC user>` or `group:<OIDC group>`.
    /// A decision counts as the identity that made it, authenticated by the API.
    pub approvers: Vec<Approver>,
    /// Distinct approvals needed. Default 1.
    #[serde(default = "one")]
    pub required: usize,
    /// How long to wait. Default 72h.
    #[serde(default = "three_days", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

fn one() -> usize {
    1
}
fn three_days() -> Duration {
    Duration::from_secs(3 * 86400)
}

impl ApprovalGate {
    /// The approvers, for messages: `token:alice, group:leads`.
    pub fn approver_list(&self) -> String {
        self.approvers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// What is wrong with the gate, if anything: nobody to approve, or a quorum that the named
    /// approvers can never meet.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.approvers.is_empty() {
            return Err(ConfigError::from("an approval gate must name at least one approver"));
        }
        if self.required == 0 {
            return Err(ConfigError::from("an approval gate must require at least one approval"));
        }
        let groups = self.approvers.iter().any(|a| matches!(a, Approver::Group(_)));
        if !groups && self.required > self.approvers.len() {
            return Err(ConfigError::from(format!(
                "an approval gate requires {} approvals but names only {} approver(s)",
                self.required,
                self.approvers.len()
            )));
        }
        Ok(())
    }
}

/// What the gate shows while the run waits (journaled as step `request-approval`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub approvers: Vec<Approver>,
    pub required: usize,
    /// The author of the change as its trigger names it (a commit author, a caller).
    pub requested_by: Option<String>,
    /// Who started the run through the API (`token:<name>`, `oidc:<name>`), if someone did.
    #[serde(default)]
    pub started_by: Option<String>,
    pub since: String,
    /// What the run will do once approved, as its workflow plans it (a workflow file's steps
    /// after the gate), shown to the approvers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<serde_json::Value>,
}

/// Who decides: the authenticated identity the engine recorded with the decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decider {
    /// `token:<name>` or `oidc:<name>`.
    pub identity: String,
    /// The caller's OIDC groups (none for a token).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// How a decision was taken into account (journaled per decision, steps `decision:<n>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counted {
    /// The authenticated identity that decided.
    pub by: String,
    pub approve: bool,
    pub comment: Option<String>,
    /// Why it did not count, if it did not.
    pub ignored: Option<String>,
}

/// What the approval signal carries. Written by the engine only (the generic signal route
/// refuses the name), from the caller it authenticated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DecisionSignal {
    pub approve: bool,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The bare name of an identity (`token:alice` → `alice`).
fn bare(identity: &str) -> &str {
    identity
        .split_once(':')
        .filter(|(kind, _)| matches!(*kind, "token" | "oidc" | "git" | "api"))
        .map_or(identity, |(_, name)| name)
}

/// Whether `decider` made the change: it started the run, or the trigger names it as the
/// author. An author a forge names (a login, an email) has no namespace, so any identity with
/// that bare name counts as the author: refusing one approval too many is the safe side.
fn is_author(request: &ApprovalRequest, decider: &Decider) -> bool {
    let me = decider.identity.as_str();
    let started = request.started_by.as_deref().is_some_and(|s| s == me);
    let named = request
        .requested_by
        .as_deref()
        .is_some_and(|r| r == me || bare(r).eq_ignore_ascii_case(bare(me)));
    started || named
}

/// Whether `decider` is one of the gate's approvers.
fn is_approver(request: &ApprovalRequest, decider: &Decider) -> bool {
    request.approvers.iter().any(|a| match a {
        Approver::Token(n) => decider.identity.strip_prefix("token:") == Some(n.as_str()),
        Approver::Oidc(n) => decider.identity.strip_prefix("oidc:") == Some(n.as_str()),
        Approver::Group(g) => decider.identity.starts_with("oidc:") && decider.groups.iter().any(|h| h == g),
    })
}

/// The one rule for whether a decision counts: `decider` must be one of the approvers, must
/// not have made the change, and may approve only once (`approved` are the identities whose
/// approvals counted so far). `Err` says why not, naming the identity.
pub fn may_decide(
    request: &ApprovalRequest,
    approved: &[String],
    decider: &Decider,
    approve: bool,
) -> Result<(), Refused> {
    let me = &decider.identity;
    if !is_approver(request, decider) {
        return Err(Refused::from(format!("{me} is not one of the approvers")));
    }
    if is_author(request, decider) {
        return Err(Refused::from(format!("{me} made the change and may not approve it")));
    }
    if approve && approved.iter().any(|a| a == me) {
        return Err(Refused::from(format!("{me} has approved already")));
    }
    Ok(())
}

/// An approval a run waits for, read from its journal: what the gate asked, the decisions so
/// far, and the identities whose approvals counted.
#[derive(Debug, Clone)]
pub struct PendingApproval {
    pub request: ApprovalRequest,
    pub decisions: Vec<Counted>,
    pub approved: Vec<String>,
    /// The wait itself (when it began, its deadline).
    pub wait: crate::core::model::StepView,
}

impl PendingApproval {
    /// The approval `run` waits for now, if it waits at a gate.
    pub fn of(run: &crate::core::model::RunView) -> Option<Self> {
        use crate::core::model::{StepKind, StepStatus};
        let wait = run
            .steps
            .iter()
            .rev()
            .find(|s| s.kind == StepKind::Signal && s.name == APPROVAL_SIGNAL)?;
        if wait.status != StepStatus::Waiting || run.status.is_terminal() {
            return None;
        }
        let request = run
            .steps
            .iter()
            .rev()
            .find(|s| s.name == "request-approval" && s.kind == StepKind::Step && s.seq < wait.seq)
            .and_then(|s| serde_json::from_value::<ApprovalRequest>(s.output.clone()?).ok())?;
        let decisions: Vec<Counted> = run
            .steps
            .iter()
            .filter(|s| s.name.starts_with("decision:") && s.kind == StepKind::Step)
            .filter_map(|s| serde_json::from_value(s.output.clone()?).ok())
            .collect();
        let approved = decisions
            .iter()
            .filter(|d| d.approve && d.ignored.is_none())
            .map(|d| d.by.clone())
            .collect();
        Some(Self {
            request,
            decisions,
            approved,
            wait: wait.clone(),
        })
    }

    /// Whether `caller` may decide now ([`may_decide`]), and as whom.
    pub fn may_decide(&self, caller: &crate::identity::Caller, approve: bool) -> Result<(), Refused> {
        let decider = Decider {
            identity: caller.name.clone(),
            groups: caller.groups.clone(),
        };
        may_decide(&self.request, &self.approved, &decider, approve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(approvers: &[&str], requested_by: Option<&str>, started_by: Option<&str>) -> ApprovalRequest {
        ApprovalRequest {
            approvers: approvers.iter().map(|a| a.parse().unwrap()).collect(),
            required: 1,
            requested_by: requested_by.map(str::to_string),
            started_by: started_by.map(str::to_string),
            since: String::new(),
            plan: None,
        }
    }

    fn who(identity: &str, groups: &[&str]) -> Decider {
        Decider {
            identity: identity.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    #[test]
    fn a_token_and_an_oidc_user_of_one_name_are_different_approvers() {
        let r = request(&["token:alice"], None, None);
        assert!(may_decide(&r, &[], &who("token:alice", &[]), true).is_ok());
        assert_eq!(
            may_decide(&r, &[], &who("oidc:alice", &[]), true),
            Err("oidc:alice is not one of the approvers".into())
        );
        let r = request(&["oidc:alice"], None, None);
        assert!(may_decide(&r, &[], &who("token:alice", &[]), true).is_err());
    }

    #[test]
    fn a_group_admits_oidc_users_of_that_group_only() {
        let r = request(&["group:platform-leads"], None, None);
        assert!(may_decide(&r, &[], &who("oidc:carol", &["platform-leads"]), true).is_ok());
        assert!(may_decide(&r, &[], &who("oidc:dave", &["developers"]), true).is_err());
        // A token carries no groups, whatever it is named.
        assert!(may_decide(&r, &[], &who("token:platform-leads", &["platform-leads"]), true).is_err());
    }

    #[test]
    fn whoever_started_or_authored_the_change_may_not_approve_it() {
        let r = request(&["token:bob", "token:alice"], None, Some("token:bob"));
        assert_eq!(
            may_decide(&r, &[], &who("token:bob", &[]), true),
            Err("token:bob made the change and may not approve it".into())
        );
        // A commit author named by a forge has no namespace: any identity of that name is it.
        let r = request(&["token:alice", "oidc:alice"], Some("Alice"), None);
        assert!(may_decide(&r, &[], &who("token:alice", &[]), true).is_err());
        assert!(may_decide(&r, &[], &who("oidc:alice", &[]), true).is_err());
    }

    #[test]
    fn one_identity_approves_once() {
        let r = request(&["token:alice", "token:bob"], None, None);
        let approved = vec!["token:alice".to_string()];
        assert_eq!(
            may_decide(&r, &approved, &who("token:alice", &[]), true),
            Err("token:alice has approved already".into())
        );
        assert!(may_decide(&r, &approved, &who("token:bob", &[]), true).is_ok());
    }

    #[test]
    fn approvers_must_say_what_they_are() {
        let e = "alice".parse::<Approver>().unwrap_err();
        assert!(e.contains("token:alice"), "{e}");
        assert!("group:".parse::<Approver>().is_err());
        assert_eq!("oidc:a@b.io".parse::<Approver>().unwrap().to_string(), "oidc:a@b.io");
    }

    #[test]
    fn a_quorum_the_approvers_cannot_meet_is_refused() {
        let gate = |approvers: &[&str], required| ApprovalGate {
            approvers: approvers.iter().map(|a| a.parse().unwrap()).collect(),
            required,
            timeout: Duration::from_secs(60),
        };
        assert!(gate(&["token:a"], 2).check().is_err());
        assert!(gate(&["token:a", "token:b"], 2).check().is_ok());
        assert!(gate(&["group:leads"], 3).check().is_ok());
        assert!(gate(&[], 1).check().is_err());
    }

    #[test]
    fn engine_signals_are_reserved() {
        assert!(is_reserved_signal("approval"));
        assert!(is_reserved_signal("resolved"));
        assert!(is_reserved_signal("dayshift.anything"));
        assert!(!is_reserved_signal("go-ahead"));
    }
}
