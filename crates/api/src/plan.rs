//! `RecoveryPlan`: ordered groups of servers recovered together, with actions and
//! manual gates between them, and the operation to run on them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, RecoveryPointRef, RecoveryPointSelector};
use crate::server::ServerPhase;

/// A recovery plan. Groups run in order; the servers of one group in parallel.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "siterecovery.io",
    version = "v1alpha1",
    kind = "RecoveryPlan",
    namespaced,
    status = "RecoveryPlanStatus",
    shortname = "rplan",
    category = "siterecovery",
    printcolumn = r#"{"name":"OPERATION","type":"string","jsonPath":".status.operation.type"}"#,
    printcolumn = r#"{"name":"STATE","type":"string","jsonPath":".status.operation.state"}"#,
    printcolumn = r#"{"name":"GROUP","type":"string","jsonPath":".status.operation.currentGroup","description":"Group being recovered"}"#,
    printcolumn = r#"{"name":"SERVERS","type":"string","jsonPath":".status.operation.progress","description":"Servers done / total"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.groups.all(g, g.servers.all(s, self.groups.filter(h, s in h.servers).size() == 1))")
        .message("spec.groups[].servers: a server may appear in only one group of a plan")
        .field_path(".groups"),
    validation = Rule::new("!has(self.operation) || !has(self.operation.approvals) || self.operation.approvals.all(a, self.groups.exists(g, has(g.actions) && g.actions.exists(x, g.name + '/' + x.name == a && has(x.manualApproval))))")
        .message("spec.operation.approvals[] must name manual-approval actions of this plan as <group>/<action>")
        .field_path(".operation.approvals"),
)]
pub struct RecoveryPlanSpec {
    /// Groups in recovery order (ASR allows up to 7; we allow 8).
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub groups: Vec<RecoveryGroup>,
    /// The operation to run. Set it (with a new `runId` to repeat one) to start a run;
    /// remove it to leave the plan idle. Runs are recorded in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<PlanOperation>,
    /// Whether a server that fails stops the run or lets the other servers and groups go on.
    #[serde(default)]
    pub on_failure: FailurePolicy,
}

/// A group of servers recovered in parallel.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryGroup {
    /// Group name, unique in the plan.
    #[schemars(length(min = 1, max = 31), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// ProtectedServers (names, same namespace) in this group.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 63)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub servers: Vec<String>,
    /// Actions before and after the group's servers are recovered, in list order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub actions: Option<Vec<PlanAction>>,
}

/// A pre or post action: a Kubernetes Job or a manual-approval gate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.job) != has(self.manualApproval)")
    .message("spec.groups[].actions[] needs exactly one of job or manualApproval"))]
pub struct PlanAction {
    /// Action name, unique in the group.
    #[schemars(length(min = 1, max = 31), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Run before or after the group's servers are recovered.
    pub when: ActionTiming,
    /// Which operations run this action; every operation except cleanup when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 6))]
    pub operations: Vec<PlanOperationType>,
    /// A Job to create and wait for. `spec.template` is a pod template; the API server
    /// validates it when the operator dry-runs the Job on every plan change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobAction>,
    /// Stop until `spec.operation.approvals` contains `<group>/<action>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_approval: Option<ManualApproval>,
}

/// A Job action.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobAction {
    /// The Job's spec (as in `batch/v1` Job `.spec`).
    #[schemars(schema_with = "crate::schema::preserve_unknown_object")]
    pub spec: serde_json::Value,
    /// Fail the action when the Job has not succeeded by then.
    #[serde(default = "default_action_timeout")]
    pub timeout: crate::common::Duration,
}

fn default_action_timeout() -> crate::common::Duration {
    "30m".into()
}

/// A manual gate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManualApproval {
    /// What the operator on duty must check before approving.
    #[schemars(length(min = 1, max = 1024))]
    pub instructions: String,
}

/// When an action runs relative to its group.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ActionTiming {
    /// Before the group's servers are recovered.
    Before,
    /// After every server of the group is recovered.
    After,
}

/// The operation a plan runs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum PlanOperationType {
    /// Recover copies into an isolated network while replication goes on.
    TestFailover,
    /// Remove everything a test failover created.
    TestFailoverCleanup,
    /// Stop the source, replicate the last changes, fail over with zero data loss.
    PlannedFailover,
    /// The site is down: fail over to the selected recovery point.
    UnplannedFailover,
    /// After a failover, re-materialise at another recovery point.
    ChangeRecoveryPoint,
    /// Make a failover final and release older recovery points.
    Commit,
}

/// The requested operation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.recoveryPoint) || self.type in ['TestFailover', 'UnplannedFailover', 'ChangeRecoveryPoint']")
        .message("spec.operation.recoveryPoint applies only to TestFailover, UnplannedFailover and ChangeRecoveryPoint")
        .field_path(".recoveryPoint"),
)]
pub struct PlanOperation {
    /// What to run.
    #[serde(rename = "type")]
    pub type_: PlanOperationType,
    /// Identifies this run; change it to run the same operation again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub run_id: Option<String>,
    /// Which recovery point to use; `Latest` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<RecoveryPointChoice>,
    /// Manual gates approved for this run, as `<group>/<action>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(length(min = 3, max = 63)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub approvals: Option<Vec<String>>,
    /// PlannedFailover only: leave the source servers running (for a drill on a site
    /// that stays up). By default the agents quiesce the sources first.
    #[serde(default, skip_serializing_if = "crate::common::is_false")]
    pub skip_source_shutdown: bool,
}

/// A recovery-point choice.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("(self.selector == 'Named') == has(self.pointName)")
        .message("spec.operation.recoveryPoint.pointName is required with selector Named and allowed only with it")
        .field_path(".pointName"),
    validation = Rule::new("(self.selector == 'PointInTime') == has(self.pointInTime)")
        .message("spec.operation.recoveryPoint.pointInTime is required with selector PointInTime and allowed only with it")
        .field_path(".pointInTime"),
)]
pub struct RecoveryPointChoice {
    /// How to choose.
    pub selector: RecoveryPointSelector,
    /// Recovery-point id (`kubectl siterecovery points <server>` lists them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub point_name: Option<String>,
    /// Use the latest point at or before this instant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_in_time: Option<Time>,
}

/// What a failing server does to the rest of the run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum FailurePolicy {
    /// Stop after the current group; later groups do not start.
    #[default]
    Stop,
    /// Recover every server that can be recovered; report the failures.
    Continue,
}

/// Observed state of a plan.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: Ready, Reconciling, Stalled, WaitingForApproval.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition<PlanConditionType>>,
    /// The current or last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationStatus>,
    /// Per-group state of the current or last run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub groups: Vec<GroupStatus>,
}

/// Condition types of a RecoveryPlan.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PlanConditionType {
    /// The last requested run succeeded (or the plan is idle and valid).
    Ready,
    /// A run is in progress.
    Reconciling,
    /// The run cannot go on without a change (invalid transition, failed server).
    Stalled,
    /// A manual gate is waiting; the message names it.
    WaitingForApproval,
}

/// State of a run or of one of its parts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunState {
    /// Not started.
    Pending,
    /// In progress.
    Running,
    /// Stopped at a manual gate.
    WaitingForApproval,
    /// Done.
    Succeeded,
    /// Done with failures (some servers recovered under `onFailure: Continue`).
    PartiallySucceeded,
    /// Failed.
    Failed,
    /// Not run because an earlier part failed.
    Skipped,
}

/// The current or last run of the plan.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    /// Operation.
    #[serde(rename = "type")]
    pub type_: PlanOperationType,
    /// `spec.operation.runId` of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// Overall state.
    pub state: RunState,
    /// Group being processed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_group: Option<String>,
    /// `done/total` servers, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// When the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Summary or the reason it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// State of one group in a run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// Group name.
    pub name: String,
    /// Group state.
    pub state: RunState,
    /// Actions of the group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ActionStatus>,
    /// Servers of the group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<PlanServerStatus>,
}

/// State of one action in a run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionStatus {
    /// Action name.
    pub name: String,
    /// Action state.
    pub state: RunState,
    /// The Job created for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// Detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// State of one server in a run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanServerStatus {
    /// ProtectedServer name.
    pub name: String,
    /// State of this server's part of the run.
    pub state: RunState,
    /// The server's lifecycle phase as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ServerPhase>,
    /// Recovery point used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<RecoveryPointRef>,
    /// Detail, e.g. why it cannot fail over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
