//! `FailbackJob`: the three-phase return from the recovery site to on-prem.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, LocalObjectReference};
use crate::plan::RunState;
use crate::server::{AgentIdentity, ProtectedDisk, SyncProgress};

/// Fail servers back to on-prem: reprotect (reverse replication sending only the blocks
/// that differ), planned failover to on-prem with zero data loss, then re-enable forward
/// replication. Source and target are fixed at creation; create a new job to change them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "siterecovery.io",
    version = "v1alpha1",
    kind = "FailbackJob",
    namespaced,
    status = "FailbackJobStatus",
    shortname = "fbj",
    category = "siterecovery",
    printcolumn = r#"{"name":"STEP","type":"string","jsonPath":".status.step"}"#,
    printcolumn = r#"{"name":"STATE","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"TARGET","type":"string","jsonPath":".spec.target.location"}"#,
    printcolumn = r#"{"name":"SERVERS","type":"string","jsonPath":".status.progress","description":"Servers done / total"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("has(self.servers) != has(self.planRef)")
        .message("spec needs exactly one of servers or planRef"),
    validation = Rule::new("has(self.servers) == has(oldSelf.servers) && has(self.planRef) == has(oldSelf.planRef)")
        .message("spec.servers and spec.planRef are immutable; create a new FailbackJob"),
    validation = Rule::new("!has(self.target.alternate) || !has(self.servers) || self.target.alternate.all(a, a.server in self.servers)")
        .message("spec.target.alternate[].server must be one of spec.servers")
        .field_path(".target.alternate"),
)]
pub struct FailbackJobSpec {
    /// ProtectedServers to fail back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100), inner(length(min = 1, max = 63)))]
    #[x_kube(
        merge_strategy = ListMerge::Set,
        validation = Rule::new("self == oldSelf").message("spec.servers is immutable; create a new FailbackJob")
    )]
    pub servers: Option<Vec<String>>,
    /// Fail back every server of this RecoveryPlan, in the plan's group order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.planRef is immutable; create a new FailbackJob"))]
    pub plan_ref: Option<LocalObjectReference>,
    /// Where the servers come back to.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.target is immutable; create a new FailbackJob"))]
    pub target: FailbackTarget,
    /// When the planned failover to on-prem (the cut-over) starts.
    #[serde(default)]
    pub cutover: Cutover,
    /// Re-enable forward replication to Azure once back on-prem (without a full copy).
    #[serde(default = "default_true")]
    pub re_enable_replication: bool,
}

fn default_true() -> bool {
    true
}

/// Where failed-back servers land.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.location == 'AlternateLocation') == has(self.alternate)")
    .message("spec.target.alternate is required with location AlternateLocation and allowed only with it")
    .field_path(".alternate"))]
pub struct FailbackTarget {
    /// Original disks of the original servers, or other on-prem servers.
    pub location: FailbackLocation,
    /// Per-server alternate targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 100))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["server".into()]))]
    pub alternate: Option<Vec<AlternateTarget>>,
}

/// Failback location.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FailbackLocation {
    /// Back onto the disks the server was protected from; only differing blocks move.
    OriginalLocation,
    /// Onto another on-prem server (the original is lost); a full copy.
    AlternateLocation,
}

/// An alternate on-prem target for one server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AlternateTarget {
    /// ProtectedServer this target is for.
    #[schemars(length(min = 1, max = 63))]
    pub server: String,
    /// Agent (master-target role) on the alternate server that writes the disks.
    pub agent: AgentIdentity,
    /// Destination of each protected disk, by disk id.
    #[schemars(length(min = 1, max = 64))]
    pub disks: Vec<ProtectedDisk>,
}

/// Cut-over control.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Cutover {
    /// `Automatic`: fail over to on-prem as soon as reverse replication is in sync.
    /// `Manual`: wait in `ReverseProtected` until `approved` is true (a maintenance window).
    #[serde(default)]
    pub mode: CutoverMode,
    /// Start the cut-over (Manual mode).
    #[serde(default, skip_serializing_if = "crate::common::is_false")]
    pub approved: bool,
}

/// Cut-over mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum CutoverMode {
    /// Cut over as soon as in sync.
    Automatic,
    /// Wait for approval.
    #[default]
    Manual,
}

/// The three steps of a failback.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum FailbackStep {
    /// Reverse replication from the failed-over copy to on-prem.
    Reprotect,
    /// Planned failover to on-prem, zero data loss.
    FailoverToOnPrem,
    /// Forward replication to Azure again.
    ReEnable,
}

/// Observed state of a failback job.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailbackJobStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: Ready, Reconciling, Stalled, WaitingForCutover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition<FailbackConditionType>>,
    /// Step in progress (or the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<FailbackStep>,
    /// Overall state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<RunState>,
    /// `done/total` servers in the current step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Each step's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["step".into()]))]
    pub steps: Vec<StepStatus>,
    /// Each server's state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub servers: Vec<FailbackServerStatus>,
}

/// Condition types of a FailbackJob.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum FailbackConditionType {
    /// Every step succeeded.
    Ready,
    /// A step is in progress.
    Reconciling,
    /// The job cannot go on (e.g. a server is not failed over and committed).
    Stalled,
    /// Reverse replication is in sync; waiting for `spec.cutover.approved`.
    WaitingForCutover,
}

/// State of one step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    /// The step.
    pub step: FailbackStep,
    /// Its state.
    pub state: RunState,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// State of one server in the job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailbackServerStatus {
    /// ProtectedServer name.
    pub name: String,
    /// Step the server is in.
    pub step: FailbackStep,
    /// State within that step.
    pub state: RunState,
    /// Reverse-replication progress (bytes compared and sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<SyncProgress>,
    /// Bytes found different and sent back to on-prem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<i64>,
    /// Detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
