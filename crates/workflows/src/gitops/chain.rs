//! `promote.chain`: one application promoted through its environments in order, each with the
//! gates the config gives it (a soak time after the previous environment became healthy, a
//! time window, an approval), each environment a `promote.image` child run.
//!
//! Started by hand with a tag, or by a push to the first environment's values (a webhook
//! route with `from: dev`): the tag is then read from that environment's values file.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveTime, TimeZone, Utc};
use dayshift_engine::{Ctx, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::promote::{ArgoApp, PromoteInput, check_tag};
use super::values;
use crate::config::{InvalidConfig, default_connection, ten_minutes};
use crate::connections::{Connections, lookup};
use crate::gates::ApprovalGate;
use crate::gates::checked_gate;

/// How one application is promoted (the config's `promotions.<application>`).
#[derive(Debug, Clone, Default)]
pub struct AppPromotion {
    /// The git connection of the infra repository.
    pub repository: String,
    /// Where ArgoCD runs.
    pub kubernetes: String,
    pub argocd_namespace: String,
    pub notify: Option<String>,
    /// In promotion order.
    pub environments: Vec<EnvPromotion>,
}

/// One environment of an application.
#[derive(Debug, Clone, Default)]
pub struct EnvPromotion {
    pub name: String,
    pub branch: String,
    pub file: String,
    pub key: Option<String>,
    pub image: Option<String>,
    /// The ArgoCD Application syncing it; no health wait without one.
    pub argocd_application: Option<String>,
    pub timeout: Duration,
    pub soak: Option<Duration>,
    pub window: Option<Window>,
    pub approval: Option<ApprovalGate>,
}

/// When promotions to an environment may happen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Days of the week (`mon` … `sun`); every day if empty.
    pub days: Vec<chrono::Weekday>,
    pub from: NaiveTime,
    pub to: NaiveTime,
    pub timezone: chrono_tz::Tz,
}

impl Window {
    /// `now` if the window is open, else when it next opens.
    pub fn next_open(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let local = now.with_timezone(&self.timezone).date_naive();
        for offset in 0..8 {
            let day = local + chrono::Days::new(offset);
            if !self.days.is_empty() && !self.days.contains(&day.weekday()) {
                continue;
            }
            let at = |t: NaiveTime| {
                self.timezone
                    .from_local_datetime(&day.and_time(t))
                    .earliest()
                    .map(|d| d.with_timezone(&Utc))
            };
            let (Some(start), Some(end)) = (at(self.from), at(self.to)) else {
                continue;
            };
            if now < start {
                return start;
            }
            if now < end {
                return now;
            }
        }
        now
    }
}

// `promotions.<application>` as the config file gives it; `check` makes the `AppPromotion` that
// `promote.chain` runs. (Its doc comment is the schema's description.)
/// One application's promotions.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PromotionConfig {
    /// The git connection of the infra repository.
    pub repository: String,
    /// The Kubernetes connection where ArgoCD runs. Default `default`.
    #[serde(default = "default_connection")]
    pub kubernetes: String,
    /// Default `argocd`.
    #[serde(default = "argocd")]
    pub argocd_namespace: String,
    /// A notice webhook (connections.notify).
    #[serde(default)]
    pub notify: Option<String>,
    /// In promotion order (dev, staging, prod).
    pub environments: Vec<EnvironmentConfig>,
}

/// One environment of an application.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EnvironmentConfig {
    pub name: String,
    /// Default `main` (a branch per environment: name it here).
    #[serde(default = "main_branch")]
    pub branch: String,
    /// The values file (a file or directory per environment: name it here).
    pub file: String,
    /// A Helm values key path (`api-gateway.image.tag`)...
    #[serde(default)]
    pub key: Option<String>,
    /// ...or a kustomization image name.
    #[serde(default)]
    pub image: Option<String>,
    /// The ArgoCD Application that syncs it.
    #[serde(default)]
    pub argocd_application: Option<String>,
    /// How long it may take to become healthy. Default 10m.
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Wait this long after the previous environment became healthy.
    #[serde(default, with = "humantime_serde::option")]
    #[schemars(with = "Option<String>")]
    pub soak: Option<Duration>,
    /// When promotions may happen.
    #[serde(default)]
    pub window: Option<WindowConfig>,
    /// Approvals required before pushing.
    #[serde(default)]
    pub approval: Option<ApprovalGate>,
}

/// A promotion window.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WindowConfig {
    /// `mon` … `sun`; every day if empty.
    #[serde(default)]
    pub days: Vec<String>,
    /// `HH:MM`.
    pub from: String,
    /// `HH:MM`.
    pub to: String,
    /// IANA time zone. Default UTC.
    #[serde(default = "utc")]
    pub timezone: String,
}

fn argocd() -> String {
    "argocd".into()
}
fn main_branch() -> String {
    "main".into()
}
fn utc() -> String {
    "UTC".into()
}

impl PromotionConfig {
    /// `promotions.<app>` checked, as `promote.chain` takes it; an error names the key.
    pub fn check(&self, app: &str) -> Result<AppPromotion, InvalidConfig> {
        if self.environments.is_empty() {
            return Err(InvalidConfig::new(
                format!("promotions.{app}.environments"),
                "give at least one",
            ));
        }
        let environments = self
            .environments
            .iter()
            .enumerate()
            .map(|(n, e)| e.check(&format!("promotions.{app}.environments[{n}]")))
            .collect::<Result<_, _>>()?;
        Ok(AppPromotion {
            repository: self.repository.clone(),
            kubernetes: self.kubernetes.clone(),
            argocd_namespace: self.argocd_namespace.clone(),
            notify: self.notify.clone(),
            environments,
        })
    }
}

impl EnvironmentConfig {
    fn check(&self, key: &str) -> Result<EnvPromotion, InvalidConfig> {
        if self.key.is_some() == self.image.is_some() {
            return Err(InvalidConfig::new(key, "give exactly one of `key` and `image`"));
        }
        Ok(EnvPromotion {
            name: self.name.clone(),
            branch: self.branch.clone(),
            file: self.file.clone(),
            key: self.key.clone(),
            image: self.image.clone(),
            argocd_application: self.argocd_application.clone(),
            timeout: self.timeout,
            soak: self.soak,
            window: self
                .window
                .as_ref()
                .map(|w| w.check(&format!("{key}.window")))
                .transpose()?,
            approval: self
                .approval
                .as_ref()
                .map(|a| checked_gate(a, &format!("{key}.approval")))
                .transpose()?,
        })
    }
}

impl WindowConfig {
    fn check(&self, key: &str) -> Result<Window, InvalidConfig> {
        let time = |t: &str, k: &str| {
            NaiveTime::parse_from_str(t, "%H:%M")
                .map_err(|_| InvalidConfig::new(format!("{key}.{k}"), format!("{t:?} is not HH:MM")))
        };
        let days = self
            .days
            .iter()
            .map(|d| {
                d.parse::<chrono::Weekday>()
                    .map_err(|_| InvalidConfig::new(format!("{key}.days"), format!("{d:?} is not a day (mon … sun)")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Window {
            days,
            from: time(&self.from, "from")?,
            to: time(&self.to, "to")?,
            timezone: self.timezone.parse().map_err(|_| {
                InvalidConfig::new(
                    format!("{key}.timezone"),
                    format!("{:?} is not an IANA time zone", self.timezone),
                )
            })?,
        })
    }
}

/// The input of `promote.chain`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteChainInput {
    /// The application (the config's `promotions.<application>`).
    pub application: String,
    /// The tag to promote; default the one in `from`'s values.
    #[serde(default)]
    pub tag: Option<String>,
    /// The environment the tag comes from; the chain promotes to the ones after it. Default:
    /// promote to every environment.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub source_commit: Option<String>,
    /// Who made the change (may not approve it).
    #[serde(default)]
    pub requested_by: Option<String>,
}

/// What `resolve` decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainPlan {
    pub tag: String,
    pub environments: Vec<String>,
}

/// How each application is promoted, by application (the config's `promotions:`).
pub type Promotions = BTreeMap<String, AppPromotion>;

/// The `promote.chain` workflow, with the promotions it may run.
pub fn promote_chain(connections: Arc<Connections>, promotions: Arc<Promotions>) -> WorkflowDef {
    WorkflowDef::new(
        "promote.chain",
        "Promotes an application's tag through its environments in order, with each environment's gates (soak, window, approval).",
        move |ctx: Ctx, input: PromoteChainInput| {
            let (connections, promotions) = (connections.clone(), promotions.clone());
            async move { chain(&ctx, &connections, &promotions, input).await }
        },
    )
}

async fn chain(
    ctx: &Ctx,
    connections: &Connections,
    promotions: &Promotions,
    input: PromoteChainInput,
) -> Result<Value, WorkflowError> {
    let app = lookup(
        promotions,
        &input.application,
        "no promotions configured for application",
        "promotions",
    )
    .map_err(WorkflowError::failed)?
    .clone();
    let (a, i) = (&app, &input);
    let plan: ChainPlan = ctx
        .step("resolve", |_s| async move { resolve(connections, a, i).await })
        .await?;
    let mut promoted = Vec::new();
    for (n, name) in plan.environments.iter().enumerate() {
        let env = app
            .environments
            .iter()
            .find(|e| &e.name == name)
            .ok_or_else(|| WorkflowError::failed(format!("environment {name} is no longer configured")))?;
        // The soak starts when the previous environment became healthy: its child run ended.
        if let Some(soak) = env.soak
            && (n > 0 || input.from.is_some())
        {
            ctx.sleep(format!("soak:{name}"), soak).await?;
        }
        if let Some(window) = &env.window {
            let wait_ms: u64 = ctx
                .step(format!("window:{name}"), |_s| async move {
                    let now = Utc::now();
                    Ok::<_, StepError>((window.next_open(now) - now).num_milliseconds().max(0) as u64)
                })
                .await?;
            if wait_ms > 0 {
                ctx.sleep(format!("wait-window:{name}"), Duration::from_millis(wait_ms))
                    .await?;
            }
        }
        let child = PromoteInput {
            repository: app.repository.clone(),
            application: input.application.clone(),
            environment: name.clone(),
            tag: plan.tag.clone(),
            branch: env.branch.clone(),
            file: env.file.clone(),
            key: env.key.clone(),
            image: env.image.clone(),
            source_commit: input.source_commit.clone(),
            argocd: env.argocd_application.as_ref().map(|name| ArgoApp {
                kubernetes: app.kubernetes.clone(),
                namespace: app.argocd_namespace.clone(),
                name: name.clone(),
            }),
            timeout: env.timeout,
            notify: app.notify.clone(),
            approval: env.approval.clone(),
            requested_by: input.requested_by.clone(),
        };
        let _: Value = ctx.child("promote.image", child).await?;
        promoted.push(name.clone());
    }
    Ok(json!({ "application": input.application, "tag": plan.tag, "promoted": promoted }))
}

/// The tag and the environments to promote to.
async fn resolve(
    connections: &Connections,
    app: &AppPromotion,
    input: &PromoteChainInput,
) -> Result<ChainPlan, StepError> {
    let names: Vec<String> = app.environments.iter().map(|e| e.name.clone()).collect();
    let (source, targets) = match &input.from {
        Some(from) => {
            let at = names.iter().position(|n| n == from).ok_or_else(|| {
                StepError::Permanent(format!(
                    "{} has no environment {from} (it has {})",
                    input.application,
                    names.join(", ")
                ))
            })?;
            (Some(&app.environments[at]), names[at + 1..].to_vec())
        }
        None => (None, names.clone()),
    };
    let tag = match (&input.tag, source) {
        (Some(tag), _) => tag.clone(),
        (None, Some(env)) => {
            let git = connections.git(&app.repository).map_err(StepError::permanent)?;
            let checkout = git.checkout(&env.branch).await?;
            let text = std::fs::read_to_string(checkout.dir().join(&env.file))
                .map_err(|e| StepError::Permanent(format!("{} on {}: {e}", env.file, env.branch)))?;
            let path = match (&env.key, &env.image) {
                (Some(k), _) => k.clone(),
                (None, Some(image)) => format!("images.[name={image}].newTag"),
                _ => return Err(StepError::permanent("the environment names neither key nor image")),
            };
            values::get(&text, &path).map_err(|e| StepError::Permanent(format!("{}: {e}", env.file)))?
        }
        (None, None) => {
            return Err(StepError::permanent(
                "give the `tag`, or `from`: the environment to take it from",
            ));
        }
    };
    check_tag(&tag).map_err(StepError::permanent)?;
    if targets.is_empty() {
        return Err(StepError::Permanent(format!(
            "{} is the last environment of {}: nothing to promote to",
            input.from.as_deref().unwrap_or_default(),
            input.application
        )));
    }
    Ok(ChainPlan {
        tag,
        environments: targets,
    })
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveTime, TimeZone, Utc, Weekday};

    use super::Window;

    #[test]
    fn a_window_opens_on_its_days_and_hours_in_its_time_zone() {
        let w = Window {
            days: vec![Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu],
            from: NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
            to: NaiveTime::from_hms_opt(16, 0, 0).unwrap(),
            timezone: chrono_tz::Europe::Berlin,
        };
        // Tuesday 2026-11-17 10:00 Berlin (09:00 UTC): open.
        let inside = Utc.with_ymd_and_hms(2026, 11, 17, 9, 0, 0).unwrap();
        assert_eq!(w.next_open(inside), inside);
        // Tuesday 17:00 Berlin: Wednesday 09:00 Berlin = 08:00 UTC.
        let evening = Utc.with_ymd_and_hms(2026, 11, 17, 16, 0, 0).unwrap();
        assert_eq!(
            w.next_open(evening),
            Utc.with_ymd_and_hms(2026, 11, 18, 8, 0, 0).unwrap()
        );
        // Friday noon: Monday 09:00 Berlin.
        let friday = Utc.with_ymd_and_hms(2026, 11, 20, 11, 0, 0).unwrap();
        assert_eq!(
            w.next_open(friday),
            Utc.with_ymd_and_hms(2026, 11, 23, 8, 0, 0).unwrap()
        );
    }
}
