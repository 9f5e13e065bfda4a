//! `ProtectedServer`: one physical or virtual Linux server under protection.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, LocalObjectReference, RecoveryPointRef};

/// Desired protection of one server.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "siterecovery.io",
    version = "v1alpha1",
    kind = "ProtectedServer",
    namespaced,
    status = "ProtectedServerStatus",
    shortname = "psrv",
    category = "siterecovery",
    printcolumn = r#"{"name":"PHASE","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"RPO","type":"string","jsonPath":".status.currentRpo","description":"Age of the latest recovery point"}"#,
    printcolumn = r#"{"name":"LAST-POINT","type":"date","jsonPath":".status.latestRecoveryPoints.crashConsistent.time"}"#,
    printcolumn = r#"{"name":"PROCESS-SERVER","type":"string","jsonPath":".status.processServer"}"#,
    printcolumn = r#"{"name":"SYNC","type":"string","priority":1,"jsonPath":".status.initialSync.percent","description":"Initial-sync progress"}"#,
    printcolumn = r#"{"name":"POLICY","type":"string","priority":1,"jsonPath":".spec.policyRef.name"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    selectable = ".spec.policyRef.name",
    selectable = ".spec.consistencyGroup"
)]
#[serde(rename_all = "camelCase")]
pub struct ProtectedServerSpec {
    /// The ReplicationPolicy this server is replicated with.
    pub policy_ref: LocalObjectReference,
    /// Identity of the mobility agent running on the server.
    pub agent: AgentIdentity,
    /// Disks to protect. Disks may be added; an id once set cannot be removed or renamed
    /// (disable protection of the server instead).
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(
        merge_strategy = ListMerge::Map(vec!["id".into()]),
        validation = Rule::new("oldSelf.all(o, self.exists(d, d.id == o.id))")
            .message("spec.disks[].id cannot be removed or renamed once set; disable protection instead")
    )]
    pub disks: Vec<ProtectedDisk>,
    /// Pin the server to this process server (its pod name) instead of letting the
    /// operator balance the load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub process_server: Option<String>,
    /// Servers sharing a consistency group get recovery points that are consistent
    /// across all of them (multi-tier applications).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub consistency_group: Option<String>,
    /// Where the server is recovered on failover and test failover.
    pub failover_target: FailoverTarget,
    /// Keep the server's replicated data and recovery points in Blob storage when this
    /// object is deleted.
    #[serde(default, skip_serializing_if = "crate::common::is_false")]
    pub retain_data: bool,
    /// Change this token (any new value) to request a resynchronisation by checksum
    /// comparison; status reports it with reason `Manual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub resync_token: Option<String>,
}

/// Identity of the agent; the operator issues its ServiceAccount and mTLS certificate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(oldSelf.machineId) || (has(self.machineId) && self.machineId == oldSelf.machineId)")
    .message("spec.agent.machineId is immutable once set")
    .field_path(".machineId"))]
pub struct AgentIdentity {
    /// Host name the agent reports; checked at registration.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub hostname: String,
    /// `/etc/machine-id` of the server; when set, a different machine cannot register as it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 32, max = 32), regex(pattern = r"^[0-9a-f]{32}$"))]
    pub machine_id: Option<String>,
    /// The Kubernetes node when the agent runs from the DaemonSet rather than on a
    /// standalone server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: Option<String>,
}

/// One protected disk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProtectedDisk {
    /// Stable id of the disk inside this server (names blobs and recovered disks).
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub id: String,
    /// Block device or image file on the server; prefer `/dev/disk/by-id/...` paths.
    #[schemars(length(min = 2, max = 1024), regex(pattern = r"^/[^\x00]*$"))]
    pub path: String,
}

/// Where a server is recovered; exactly one target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.local), has(self.kubevirt), has(self.azure)].filter(x, x).size() == 1")
    .message("spec.failoverTarget needs exactly one of local, kubevirt or azure"))]
pub struct FailoverTarget {
    /// Image files or block devices on a recovery host (the embedded default, and the
    /// on-prem side of failback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalTarget>,
    /// A KubeVirt VirtualMachine with one DataVolume per disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubevirt: Option<KubevirtTarget>,
    /// An Azure VM with managed disks, created through Azure Resource Manager. Today only
    /// the data stage runs: each disk becomes a fixed-VHD page blob in the policy's
    /// container (listed in `status.failover.recoveredDisks`); the managed disks and the VM
    /// are not created yet (docs/lifecycle.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureTarget>,
}

/// Recovery to local image files or block devices.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalTarget {
    /// Directory on the recovery host; each disk becomes `<directory>/<server>/<disk-id>.img`.
    #[schemars(length(min = 2, max = 1024), regex(pattern = r"^/[^\x00]*$"))]
    pub directory: String,
    /// Node that runs the restore; any node when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: Option<String>,
}

/// Recovery as a KubeVirt virtual machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KubevirtTarget {
    /// Namespace of the VirtualMachine and DataVolumes; the server's namespace when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub namespace: Option<String>,
    /// StorageClass of the DataVolumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
    /// Virtual CPUs.
    #[schemars(range(min = 1, max = 512))]
    pub cpu: u32,
    /// Memory as a Kubernetes quantity (`8Gi`).
    #[schemars(regex(pattern = r"^[0-9]+(Ki|Mi|Gi|Ti)$"))]
    pub memory: String,
    /// Multus network (namespace/name) for production failover; the pod network when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub network: Option<String>,
    /// Network for test failover, isolated from production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub test_network: Option<String>,
}

/// Recovery as an Azure virtual machine.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureTarget {
    /// Subscription id.
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$"))]
    pub subscription_id: String,
    /// Resource group of the recovered VM and disks.
    #[schemars(length(min = 1, max = 90), regex(pattern = r"^[-\w._()]+$"))]
    pub resource_group: String,
    /// Azure region, e.g. `westeurope`.
    #[schemars(length(min = 2, max = 64), regex(pattern = r"^[a-z0-9]+$"))]
    pub location: String,
    /// VM size, e.g. `Standard_D4s_v5`.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^(Standard|Basic)_[A-Za-z0-9_]+$"))]
    pub vm_size: String,
    /// Subnet resource id for production failover.
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^/subscriptions/.+/subnets/[^/]+$"))]
    pub subnet_id: String,
    /// Subnet resource id for test failover, isolated from production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512), regex(pattern = r"^/subscriptions/.+/subnets/[^/]+$"))]
    pub test_subnet_id: Option<String>,
    /// Managed disk SKU.
    #[serde(default)]
    pub disk_sku: AzureDiskSku,
    /// Name of the recovered VM; the server's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub vm_name: Option<String>,
}

/// Azure managed disk SKU.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[allow(non_camel_case_types, missing_docs)]
pub enum AzureDiskSku {
    Standard_LRS,
    #[default]
    StandardSSD_LRS,
    Premium_LRS,
    PremiumV2_LRS,
}

/// Lifecycle phase of a protected server (see `docs/lifecycle.md`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ServerPhase {
    /// Identity and certificates are being issued; waiting for the agent to register.
    Enabling,
    /// The first full copy of every disk is in progress.
    InitialReplication,
    /// Changes replicate continuously and recovery points are taken.
    Protected,
    /// Tracking was lost or data diverged; differing blocks are being re-sent.
    Resynchronizing,
    /// Disks are being materialised at the chosen recovery point on the target.
    FailingOver,
    /// Running on the target; the recovery point can still be changed.
    FailedOver,
    /// Failover is final; older recovery points are released.
    Committed,
    /// Reverse replication from the failed-over copy to on-prem is starting or syncing.
    Reprotecting,
    /// Reverse replication is in steady state; ready to fail back.
    ReverseProtected,
    /// Planned failover back to on-prem is in progress.
    FailingBack,
    /// Running on-prem again; forward replication is being re-enabled.
    FailedBack,
}

/// Observed state of a protected server. The operator owns `phase` and the kstatus
/// conditions; the agent and process server report their parts with their own field
/// managers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProtectedServerStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ServerPhase>,
    /// One line on what the current phase is doing (`copying disk-0: 42%`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progression: Option<String>,
    /// Conditions: Ready, Reconciling, Stalled, AgentConnected, Replicating, RpoWithinThreshold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition<ServerConditionType>>,
    /// Initial replication progress over all disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_sync: Option<SyncProgress>,
    /// Per-disk state reported by the agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["id".into()]))]
    pub disks: Vec<DiskStatus>,
    /// Age of the latest recovery point, e.g. `12s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_rpo: Option<String>,
    /// Same, in seconds, for tooling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_rpo_seconds: Option<i64>,
    /// Data change rate on the server's protected disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub churn: Option<Churn>,
    /// Newest recovery point of each kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_recovery_points: Option<LatestRecoveryPoints>,
    /// Process server (pod name) the agent replicates to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_server: Option<String>,
    /// Why the server is (or was last) resynchronising.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncStatus>,
    /// What the agent last reported about itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentStatus>,
    /// The current or last failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverStatus>,
    /// The current or last test failover (runs beside protection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<FailoverStatus>,
    /// Reverse replication to on-prem during a failback (reprotect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_replication: Option<FailbackWork>,
    /// The planned failover back to on-prem (cut-over) during a failback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<FailbackWork>,
}

/// One step of a failback for one server: requested by the operator for a FailbackJob,
/// carried out by the agent on the on-prem side (master-target role) and the restore
/// worker, which report `state`, progress and completion.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailbackWork {
    /// FailbackJob that asked for it.
    pub failback_job: String,
    /// `Pending` (requested), `Running`, `Succeeded` or `Failed`.
    pub state: crate::plan::RunState,
    /// Original location, or the alternate on-prem server and disks to write to.
    pub location: crate::failback::FailbackLocation,
    /// The alternate target, with `location: AlternateLocation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alternate: Option<crate::failback::AlternateTarget>,
    /// Bytes compared and sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<SyncProgress>,
    /// Bytes found different and sent to on-prem (only differing blocks move).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<i64>,
    /// Why it failed, or what it is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}

/// Condition types of a ProtectedServer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ServerConditionType {
    /// Protected with a recovery point within the RPO threshold (or, after failover,
    /// running on the target).
    Ready,
    /// The operator is still acting on the latest spec or request.
    Reconciling,
    /// No progress is possible without a change; the message says what to fix.
    Stalled,
    /// The agent registered and sent a heartbeat recently.
    AgentConnected,
    /// Data flows agent → process server → storage.
    Replicating,
    /// The current RPO is within the policy's threshold.
    RpoWithinThreshold,
}

/// Progress of a long copy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncProgress {
    /// Bytes to copy (allocated, non-zero regions).
    pub bytes_total: i64,
    /// Bytes copied and acknowledged durable by the process server.
    pub bytes_done: i64,
    /// `bytesDone / bytesTotal`, formatted like `42%` for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<String>,
    /// When the copy started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// Estimated completion at the current rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_completion_time: Option<Time>,
}

/// Per-disk status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    /// Disk id from spec.
    pub id: String,
    /// Current size of the device in bytes (a disk that grows is tracked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// How changes are tracked on this disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracker: Option<ChangeTracker>,
    /// Copy progress of this disk during initial replication or resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncProgress>,
}

/// Change-tracking mechanism.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ChangeTracker {
    /// Kernel tracepoints followed with eBPF: the block layer for block devices (into a
    /// persisted dirty bitmap), the page cache for image files on ext4.
    Ebpf,
    /// Periodic checksum comparison (image files, hosts without eBPF).
    ChecksumScan,
}

/// Data change rate.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Churn {
    /// Average over the last minute.
    pub bytes_per_second: i64,
    /// Changed bytes over the last 24 hours (ASR sizes process servers by this).
    pub bytes_last_24h: i64,
}

/// Newest recovery point of each kind.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatestRecoveryPoints {
    /// Newest crash-consistent point (every point is at least crash-consistent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_consistent: Option<RecoveryPointRef>,
    /// Newest app-consistent point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_consistent: Option<RecoveryPointRef>,
    /// Newest point shared by the whole consistency group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_consistent: Option<RecoveryPointRef>,
    /// Number of retained recovery points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i32>,
}

/// Why a resync happens.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ResyncReason {
    /// Change tracking stopped (agent crash, reboot, lost eBPF events).
    TrackingLost,
    /// A protected disk changed size.
    DiskResized,
    /// A stored block did not match the source.
    ChecksumMismatch,
    /// Requested through `spec.resyncToken`.
    Manual,
}

/// A resynchronisation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResyncStatus {
    /// Why.
    pub reason: ResyncReason,
    /// Detail (which disk, which event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When it was requested.
    pub request_time: Time,
    /// When it finished; absent while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Bytes found different and re-sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_resent: Option<i64>,
    /// The `spec.resyncToken` value this resync answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// What the agent reports about itself.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Last heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    /// When the current client certificate expires (rotated before that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expiry_time: Option<Time>,
    /// App-consistent points as the agent sees them: why the last attempt failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_consistency: Option<AppConsistencyStatus>,
}

/// The agent's app-consistent points (filesystems frozen around the user's hooks).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppConsistencyStatus {
    /// Attempts that produced a point since the agent started.
    #[serde(default)]
    pub points: i64,
    /// Attempts that produced none since the agent started.
    #[serde(default)]
    pub failures: i64,
    /// The last failure, while it is newer than the last point.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<AppConsistencyFailure>,
}

/// Why an app-consistent attempt produced no point.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppConsistencyFailure {
    /// When.
    pub time: Time,
    /// `PreHookFailed`, `PreHookTimedOut`, `FreezeFailed`, `FreezeTimedOut`, `NotAMountPoint`,
    /// `NotConfigured`, `WritesNeverPaused`, `SessionEnded`, or a post-hook/thaw problem.
    pub reason: String,
    /// What happened, and what to do.
    pub message: String,
}

/// A failover or test failover of one server: the request (written by the operator when
/// a RecoveryPlan asks for it) and its execution (written by the restore worker of the
/// data plane). See `docs/lifecycle.md` for the protocol.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverStatus {
    /// What was requested: TestFailover, TestFailoverCleanup, PlannedFailover,
    /// UnplannedFailover or ChangeRecoveryPoint.
    pub operation: crate::plan::PlanOperationType,
    /// The plan run that asked for it (`<plan>/<runId>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// How the recovery point is to be chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_choice: Option<crate::plan::RecoveryPointChoice>,
    /// `Pending` (requested), `Running`, `Succeeded` or `Failed` (set by the worker).
    pub state: crate::plan::RunState,
    /// Why it failed, or what it is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Point the disks were (or are being) materialised at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<RecoveryPointRef>,
    /// Progress of the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<SyncProgress>,
    /// Where the recovered disks or VM are (paths, VM name or resource id).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recovered_disks: Vec<String>,
    /// When it was requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
}
