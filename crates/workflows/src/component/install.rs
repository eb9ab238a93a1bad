//! `install.component`: a component's manifests checked, applied with server-side apply in
//! phases (CRDs, then until they are established; namespaces; everything else), waited on
//! until every workload is ready, then smoke-checked. Each phase is a journaled step, so a
//! worker killed mid-install resumes without applying completed phases again, and an install
//! that completed changes nothing when run again.

use std::sync::Arc;

use dayshift_engine::{Ctx, WorkflowDef, WorkflowError};

use super::{
    ComponentInput, ComponentReport, apply_phases, check, connect, notifier, plan_and_approve, smoke, wait_ready,
};
use crate::connections::Connections;

/// The `install.component` workflow.
pub fn install_component(connections: Arc<Connections>) -> WorkflowDef {
    WorkflowDef::new(
        "install.component",
        "Applies a component's manifests by server-side apply in phases (CRDs, namespaces, the rest), waits until its workloads are ready and runs its smoke checks.",
        move |ctx: Ctx, input: ComponentInput| {
            let connections = connections.clone();
            async move { install(&ctx, &connections, input).await }
        },
    )
    .guard("manifests")
    .guard("namespace")
    .guard("smoke[].http.url")
    .guard_exact("smoke[].sql.query")
    .guard("backup.workflow")
    .freshness("component")
}

async fn install(
    ctx: &Ctx,
    connections: &Connections,
    input: ComponentInput,
) -> Result<ComponentReport, WorkflowError> {
    if input.backup.is_some() {
        return Err(WorkflowError::failed(
            "backup: is for upgrade.component (an install has nothing to back up)",
        ));
    }
    let kube = connect(connections, &input).await?;
    let notifier = notifier(connections, &input)?;
    let (k, i) = (&kube, &input);
    let checked = check(ctx, k, i).await?;
    let plan = plan_and_approve(ctx, notifier.as_ref(), k, i, &checked, "install.component").await?;
    if i.plan {
        return Ok(ComponentReport {
            component: i.component.clone(),
            plan,
            ..ComponentReport::default()
        });
    }
    apply_phases(ctx, k, i, &checked).await?;
    wait_ready(ctx, k, i, &checked).await?;
    smoke(ctx, connections, i).await?;
    Ok(ComponentReport {
        component: i.component.clone(),
        plan,
        applied: checked.described(),
        ..ComponentReport::default()
    })
}
