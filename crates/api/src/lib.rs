//! Custom resources of Site Recovery for Kubernetes (`siterecovery.io/v1alpha1`) and the
//! constants every component shares. No client logic lives here: the operator, the
//! process server, the agent and the CLI all depend on this crate, never the reverse.

pub mod common;
pub mod failback;
pub mod plan;
pub mod policy;
mod schema;
pub mod server;

pub use common::{Condition, ConditionStatus, Duration, KstatusConditions, RecoveryPointRef, RecoveryPointSelector};
pub use failback::{FailbackJob, FailbackJobSpec, FailbackJobStatus};
pub use plan::{RecoveryPlan, RecoveryPlanSpec, RecoveryPlanStatus};
pub use policy::{ReplicationPolicy, ReplicationPolicySpec, ReplicationPolicyStatus};
pub use server::{ProtectedServer, ProtectedServerSpec, ProtectedServerStatus, ServerPhase};

kstatus_conditions!(
    policy::PolicyConditionType,
    server::ServerConditionType,
    plan::PlanConditionType,
    failback::FailbackConditionType
);

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every custom resource.
pub const GROUP: &str = "siterecovery.io";
/// API version of every custom resource.
pub const VERSION: &str = "v1alpha1";
/// `kubectl get siterecovery` lists every kind of this category.
pub const CATEGORY: &str = "siterecovery";

/// Server-side-apply field managers: each component owns the fields it writes.
pub mod field_manager {
    /// The operator (phase, kstatus conditions, children).
    pub const OPERATOR: &str = "siterecovery-operator";
    /// The agent (its heartbeat, disks, initial-sync progress).
    pub const AGENT: &str = "siterecovery-agent";
    /// The process server (upload progress, recovery points, churn).
    pub const PROCESS_SERVER: &str = "siterecovery-process-server";
    /// The kubectl plugin (approvals, operations).
    pub const CLI: &str = "kubectl-siterecovery";
}

/// Every CustomResourceDefinition, in the order they are installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![ReplicationPolicy::crd(), ProtectedServer::crd(), RecoveryPlan::crd(), FailbackJob::crd()]
}
