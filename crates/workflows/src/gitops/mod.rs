//! GitOps: promotions are commits to the infra repository that ArgoCD syncs, never patches to
//! what ArgoCD manages.

pub mod chain;
pub mod preview;
pub mod promote;
pub mod values;
