//! `install.platform`: a platform installed in phases (system, cluster core, Vault, databases,
//! ...), each phase a set of components installed as child runs of `install.component`. A
//! phase starts only when every component of the one before is installed and healthy (an
//! install waits for readiness and smoke checks before it succeeds). The run shows each phase
//! (step `phase:<name>`) and each component (child step `install:<phase>/<component>`, with
//! its own run) and where it is; a failed component stops the platform there, naming both.

use dayshift_engine::{Ctx, StepError, WorkflowDef, WorkflowError};
use serde::{Deserialize, Serialize};

use super::{ComponentInput, ComponentReport};

dayshift_engine::message_error!(
    /// What is wrong with a platform's phases.
    InvalidPlatform
);

/// The input of `install.platform`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformInput {
    /// The phases, installed in order.
    pub phases: Vec<Phase>,
}

/// One phase: components installed one after the other.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: String,
    /// Each as `install.component` takes it.
    pub components: Vec<ComponentInput>,
}

/// What `install.platform` installed, phase by phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlatformReport {
    pub phases: Vec<PhaseReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseReport {
    pub name: String,
    pub components: Vec<ComponentReport>,
}

/// What step `phase:<name>` shows while the phase runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseStart {
    /// 1-based.
    pub phase: usize,
    pub of: usize,
    pub components: Vec<String>,
}

/// The `install.platform` workflow.
pub fn install_platform() -> WorkflowDef {
    WorkflowDef::new(
        "install.platform",
        "Installs a platform phase by phase, each phase's components as install.component child runs; a phase starts when the previous one is healthy.",
        move |ctx: Ctx, input: PlatformInput| async move { install(&ctx, input).await },
    )
    .guard("phases[].components[].manifests")
    .guard("phases[].components[].namespace")
    .guard("phases[].components[].smoke[].http.url")
    .guard_exact("phases[].components[].smoke[].sql.query")
    .guard("phases[].components[].backup.workflow")
}

fn check(input: &PlatformInput) -> Result<(), InvalidPlatform> {
    if input.phases.is_empty() {
        return Err("phases: a platform needs at least one phase".into());
    }
    let mut seen = std::collections::HashSet::new();
    for (n, phase) in input.phases.iter().enumerate() {
        if phase.components.is_empty() {
            return Err(InvalidPlatform::from(format!(
                "phases[{n}] ({}): a phase needs at least one component",
                phase.name
            )));
        }
        for (m, c) in phase.components.iter().enumerate() {
            if !seen.insert(c.component.clone()) {
                return Err(InvalidPlatform::from(format!(
                    "phases[{n}].components[{m}]: component {} is in the platform twice",
                    c.component
                )));
            }
            if c.backup.is_some() || c.plan {
                return Err(InvalidPlatform::from(format!(
                    "phases[{n}].components[{m}] ({}): backup and plan are not for a platform install",
                    c.component
                )));
            }
        }
    }
    Ok(())
}

async fn install(ctx: &Ctx, input: PlatformInput) -> Result<PlatformReport, WorkflowError> {
    check(&input).map_err(WorkflowError::failed)?;
    let mut report = PlatformReport { phases: Vec::new() };
    let of = input.phases.len();
    for (n, phase) in input.phases.iter().enumerate() {
        let components: Vec<String> = phase.components.iter().map(|c| c.component.clone()).collect();
        ctx.step(format!("phase:{}", phase.name), |_s| async move {
            Ok::<_, StepError>(PhaseStart {
                phase: n + 1,
                of,
                components,
            })
        })
        .await?;
        let mut done = Vec::new();
        for c in &phase.components {
            let installed: ComponentReport = ctx
                .child_named(
                    &format!("install:{}/{}", phase.name, c.component),
                    "install.component",
                    c,
                )
                .await
                .map_err(|e| {
                    WorkflowError::failed(format!(
                        "phase {} of {of} ({}): component {} failed, so later phases were not started: {e}",
                        n + 1,
                        phase.name,
                        c.component
                    ))
                })?;
            done.push(installed);
        }
        report.phases.push(PhaseReport {
            name: phase.name.clone(),
            components: done,
        });
    }
    Ok(report)
}
