//! What an API caller may make dayshift do: which workflows it may start, and which values the
//! privileged fields of their input may take. The rule: **a caller can make dayshift do only
//! what the config file names.**
//!
//! # Design notes
//! - A workflow declares its *guarded* input fields ([`crate::WorkflowDef::guard`]): those that
//!   choose a privileged target (a role whose password is set, a Secret written, a URL the new
//!   secret is sent to, a file of the infra repository, a SQL query). A guarded field given
//!   through the API must match an allow-list of the config (`policy.workflows.<glob>.inputs`),
//!   or the start is refused with 403 naming the field; without an allow-list, nothing is
//!   allowed in it. Fields that are not guarded name config entries (connections, playbooks,
//!   promotions) or carry no privilege.
//! - Who may start which workflow is `policy.workflows.<glob>.start`: roles (each role includes
//!   the weaker ones, as everywhere) and OIDC groups (`group:<name>`). Without a rule, an
//!   operator may start anything but what [`DEFAULT_UNSTARTABLE`] lists.
//! - Triggers (schedules, webhook and alert routes) are written in the config itself and are
//!   not checked here; the values they fill in from payloads are checked by the workflows
//!   (Kubernetes names, paths inside a checkout).

use std::collections::BTreeMap;

use globset::{Glob, GlobMatcher};
use serde_json::Value;

use crate::core::error::{ConfigError, Refused};
use crate::core::workflow::Guard;
use crate::identity::{Caller, Role};

/// Started only by their triggers unless a policy rule names who else may: a remediation's
/// labels choose what it restarts, scales or deletes.
pub const DEFAULT_UNSTARTABLE: &[&str] = &["remediate"];

/// Who may start a workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Starter {
    /// A caller with this role or a stronger one.
    Role(Role),
    /// An OIDC caller in this group.
    Group(String),
}

crate::message_error!(
    /// Text that names neither a role nor an OIDC group.
    InvalidStarter
);

impl std::str::FromStr for Starter {
    type Err = InvalidStarter;
    fn from_str(s: &str) -> Result<Self, InvalidStarter> {
        match s.strip_prefix("group:") {
            Some(g) if !g.is_empty() => Ok(Self::Group(g.into())),
            Some(_) => Err("group: needs a name".into()),
            None => s
                .parse::<Role>()
                .map(Self::Role)
                .map_err(|e| InvalidStarter(format!("'{s}': {e}, or group:<OIDC group>"))),
        }
    }
}

impl std::fmt::Display for Starter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Role(r) => write!(f, "{r}"),
            Self::Group(g) => write!(f, "group:{g}"),
        }
    }
}

/// The rule for the workflows a glob matches.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The glob as written (`rotate.*`).
    pub pattern: String,
    matcher: GlobMatcher,
    /// Who may start them through the API; `None`: the default.
    pub start: Option<Vec<Starter>>,
    /// Allowed values of guarded fields, by field path.
    pub inputs: BTreeMap<String, Vec<String>>,
}

impl Rule {
    /// A rule; `Err` names what is wrong with the glob or a value.
    pub fn new(
        pattern: &str,
        start: Option<Vec<Starter>>,
        inputs: BTreeMap<String, Vec<String>>,
    ) -> Result<Self, ConfigError> {
        let matcher = Glob::new(pattern)
            .map_err(|e| ConfigError(format!("policy.workflows.{pattern:?}: {e}")))?
            .compile_matcher();
        for (field, values) in &inputs {
            for v in values {
                Glob::new(v)
                    .map_err(|e| ConfigError(format!("policy.workflows.{pattern:?}.inputs.{field}: {v:?}: {e}")))?;
            }
        }
        Ok(Self {
            pattern: pattern.into(),
            matcher,
            start,
            inputs,
        })
    }
}

/// The policy: rules in config order.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub rules: Vec<Rule>,
}

impl Policy {
    fn matching<'a>(&'a self, workflow: &'a str) -> impl Iterator<Item = &'a Rule> + 'a {
        self.rules.iter().filter(move |r| r.matcher.is_match(workflow))
    }

    /// Whether `caller` may start `workflow` at all (before its input is looked at); `Err`
    /// says why not.
    pub fn may_start(&self, caller: &Caller, workflow: &str) -> Result<(), Refused> {
        let named: Vec<(&Rule, &Vec<Starter>)> = self
            .matching(workflow)
            .filter_map(|r| r.start.as_ref().map(|s| (r, s)))
            .collect();
        if named.is_empty() {
            if DEFAULT_UNSTARTABLE.contains(&workflow) {
                return Err(Refused::from(format!(
                    "{workflow} is started by its trigger only; the config's policy.workflows can name who else may"
                )));
            }
            return if caller.role >= Role::Operator {
                Ok(())
            } else {
                Err(Refused::from(format!(
                    "starting a run needs the operator role; {} has {}",
                    caller.name, caller.role
                )))
            };
        }
        let admitted = named.iter().flat_map(|(_, s)| s.iter()).any(|s| match s {
            Starter::Role(r) => caller.role >= *r && caller.role >= Role::Operator,
            Starter::Group(g) => caller.role >= Role::Operator && caller.groups.iter().any(|h| h == g),
        });
        if admitted {
            return Ok(());
        }
        let (rule, starters) = named[0];
        Err(Refused::from(format!(
            "{} may not start {workflow}: policy.workflows.{:?}.start allows {}",
            caller.name,
            rule.pattern,
            starters.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        )))
    }

    /// Whether every guarded field of `input` holds a value the config allows for `workflow`;
    /// `Err` names the first field that does not, with its value.
    pub fn check_input(&self, workflow: &str, guards: &[Guard], input: &Value) -> Result<(), Refused> {
        for guard in guards {
            let allowed: Vec<&String> = self
                .matching(workflow)
                .filter_map(|r| r.inputs.get(&guard.path))
                .flatten()
                .collect();
            for (at, value) in values_at(input, &guard.path) {
                let text = match value {
                    Value::String(s) => s.clone(),
                    Value::Null => continue,
                    other => other.to_string(),
                };
                let ok = allowed.iter().any(|a| {
                    if guard.exact {
                        **a == text
                    } else {
                        Glob::new(a).is_ok_and(|g| g.compile_matcher().is_match(&text))
                    }
                });
                if !ok {
                    let shown: String = text.chars().take(120).collect();
                    return Err(Refused(if allowed.is_empty() {
                        format!(
                            "input field {at} ({shown:?}) is a privileged target and the config allows none for {workflow} \
                             (policy.workflows.<glob>.inputs.{})",
                            guard.path
                        )
                    } else {
                        format!(
                            "input field {at} ({shown:?}) is not one the config allows for {workflow} \
                             (policy.workflows.<glob>.inputs.{}: {})",
                            guard.path,
                            allowed.iter().map(|a| a.as_str()).collect::<Vec<_>>().join(", ")
                        )
                    }));
                }
            }
        }
        Ok(())
    }
}

/// The values at `path` in `input`, each with where it is (`secrets[1].namespace`).
fn values_at<'a>(input: &'a Value, path: &str) -> Vec<(String, &'a Value)> {
    let mut found = vec![(String::new(), input)];
    for part in path.split('.') {
        let (name, each) = match part.strip_suffix("[]") {
            Some(n) => (n, true),
            None => (part, false),
        };
        let mut next = Vec::new();
        for (at, v) in found {
            let Some(child) = v.get(name) else { continue };
            let here = if at.is_empty() {
                name.to_string()
            } else {
                format!("{at}.{name}")
            };
            if each {
                if let Value::Array(items) = child {
                    for (i, item) in items.iter().enumerate() {
                        next.push((format!("{here}[{i}]"), item));
                    }
                }
            } else {
                next.push((here, child));
            }
        }
        found = next;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caller(role: Role, groups: &[&str]) -> Caller {
        Caller {
            name: "token:op".into(),
            role,
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    fn policy(start: Option<&[&str]>, inputs: &[(&str, &[&str])]) -> Policy {
        Policy {
            rules: vec![
                Rule::new(
                    "rotate.*",
                    start.map(|s| s.iter().map(|x| x.parse().unwrap()).collect()),
                    inputs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.iter().map(|x| x.to_string()).collect()))
                        .collect(),
                )
                .unwrap(),
            ],
        }
    }

    #[test]
    fn guarded_fields_take_only_allowed_values_and_name_the_field() {
        let p = policy(None, &[("role", &["app_*"]), ("secrets[].namespace", &["shop"])]);
        let guards = [
            Guard {
                path: "role".into(),
                exact: false,
            },
            Guard {
                path: "secrets[].namespace".into(),
                exact: false,
            },
            Guard {
                path: "check.url".into(),
                exact: false,
            },
        ];
        let ok = json!({ "role": "app_shop", "secrets": [{ "namespace": "shop", "name": "db" }] });
        assert!(p.check_input("rotate.postgres-password", &guards, &ok).is_ok());
        let superuser = json!({ "role": "postgres" });
        let e = p
            .check_input("rotate.postgres-password", &guards, &superuser)
            .unwrap_err();
        assert!(
            e.contains("input field role (\"postgres\")") && e.contains("app_*"),
            "{e}"
        );
        let elsewhere =
            json!({ "role": "app_x", "secrets": [{ "namespace": "shop" }, { "namespace": "kube-system" }] });
        let e = p
            .check_input("rotate.postgres-password", &guards, &elsewhere)
            .unwrap_err();
        assert!(e.contains("secrets[1].namespace"), "{e}");
        let exfiltrate = json!({ "role": "app_x", "check": { "url": "https://evil.example/" } });
        let e = p.check_input("rotate.kv-secret", &guards, &exfiltrate).unwrap_err();
        assert!(e.contains("check.url") && e.contains("allows none"), "{e}");
    }

    #[test]
    fn exact_fields_are_not_globs() {
        let p = policy(None, &[("checks[].query", &["select count(*) from orders"])]);
        let guards = [Guard {
            path: "checks[].query".into(),
            exact: true,
        }];
        let same = json!({ "checks": [{ "query": "select count(*) from orders" }] });
        assert!(p.check_input("rotate.x", &guards, &same).is_ok());
        let sneaky = json!({ "checks": [{ "query": "select count(1) from pg_shadow; --) from orders" }] });
        assert!(p.check_input("rotate.x", &guards, &sneaky).is_err());
    }

    #[test]
    fn start_rules_name_roles_and_groups() {
        let p = policy(Some(&["admin", "group:dba"]), &[]);
        assert!(p.may_start(&caller(Role::Admin, &[]), "rotate.kv-secret").is_ok());
        assert!(
            p.may_start(&caller(Role::Operator, &["dba"]), "rotate.kv-secret")
                .is_ok()
        );
        let e = p
            .may_start(&caller(Role::Operator, &["dev"]), "rotate.kv-secret")
            .unwrap_err();
        assert!(
            e.contains("policy.workflows.\"rotate.*\".start allows admin, group:dba"),
            "{e}"
        );
        // No rule: operators may, viewers may not, remediate is its trigger's.
        assert!(p.may_start(&caller(Role::Operator, &[]), "backup.postgres").is_ok());
        assert!(p.may_start(&caller(Role::Viewer, &[]), "backup.postgres").is_err());
        assert!(p.may_start(&caller(Role::Admin, &[]), "remediate").is_err());
    }
}
