//! `ReplicationPolicy`: how often recovery points are taken, how long they are kept,
//! how data is compressed, encrypted and throttled, and where it is stored.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Condition, Duration, LocalObjectReference};

/// Desired replication settings shared by every server that references the policy.
///
/// A failback (reverse-replication) policy is derived from it automatically.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "siterecovery.io",
    version = "v1alpha1",
    kind = "ReplicationPolicy",
    namespaced,
    status = "ReplicationPolicyStatus",
    shortname = "rpol",
    category = "siterecovery",
    printcolumn = r#"{"name":"CRASH","type":"string","jsonPath":".spec.crashConsistentInterval","description":"Crash-consistent point interval"}"#,
    printcolumn = r#"{"name":"APP","type":"string","jsonPath":".spec.appConsistentInterval","description":"App-consistent point interval (0s: off)"}"#,
    printcolumn = r#"{"name":"RETENTION","type":"string","jsonPath":".spec.retention.window"}"#,
    printcolumn = r#"{"name":"RPO-ALERT","type":"string","jsonPath":".spec.rpoThreshold"}"#,
    printcolumn = r#"{"name":"SERVERS","type":"integer","jsonPath":".status.protectedServers"}"#,
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("duration(self.crashConsistentInterval) >= duration('1s') && duration(self.crashConsistentInterval) <= duration('1h')")
        .message("spec.crashConsistentInterval must be between 1s and 1h")
        .field_path(".crashConsistentInterval"),
    validation = Rule::new("duration(self.appConsistentInterval) <= duration('12h')")
        .message("spec.appConsistentInterval must be at most 12h (0s turns app-consistent points off)")
        .field_path(".appConsistentInterval"),
    validation = Rule::new("duration(self.appConsistentInterval) == duration('0s') || duration(self.appConsistentInterval) >= duration(self.crashConsistentInterval)")
        .message("spec.appConsistentInterval must be 0s or at least spec.crashConsistentInterval")
        .field_path(".appConsistentInterval"),
    validation = Rule::new("duration(self.retention.window) >= duration(self.crashConsistentInterval)")
        .message("spec.retention.window must cover at least one spec.crashConsistentInterval")
        .field_path(".retention.window"),
    validation = Rule::new("duration(self.rpoThreshold) >= duration(self.crashConsistentInterval)")
        .message("spec.rpoThreshold must be at least spec.crashConsistentInterval, or the RPO alert would always fire")
        .field_path(".rpoThreshold"),
    validation = Rule::new("!has(self.retention.thinning) || self.retention.thinning.all(t, duration(t.keepEvery) >= duration(self.crashConsistentInterval))")
        .message("spec.retention.thinning[].keepEvery must be at least spec.crashConsistentInterval")
        .field_path(".retention.thinning"),
)]
pub struct ReplicationPolicySpec {
    /// Raise the `RpoWithinThreshold=False` condition, an event and the RPO alert when a
    /// server's current RPO exceeds this (ASR default: 15m).
    pub rpo_threshold: Duration,
    /// How often a crash-consistent recovery point is taken (1s–1h). ASR fixes 5m.
    pub crash_consistent_interval: Duration,
    /// How often an app-consistent point is taken (filesystems frozen around the
    /// pre/post hooks), at most 12h; `0s` turns them off.
    #[serde(default = "default_app_interval")]
    pub app_consistent_interval: Duration,
    /// How long recovery points are kept, and how older ones are thinned.
    pub retention: Retention,
    /// Compression of replicated data: agents compress what they send with it (CPU on the
    /// protected servers), the process server stores their frames as they came (then
    /// encrypts them) and compresses what it makes itself with it too. A change reaches
    /// connected agents within about a minute.
    #[serde(default)]
    pub compression: Compression,
    /// Where the data-encryption keys come from. Data is always encrypted at rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Upload bandwidth limits per process server, with time windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
    /// Where replicated data and recovery points are stored.
    pub target: TargetStorage,
}

fn default_app_interval() -> Duration {
    Duration("0s".into())
}

/// Retention of recovery points (ASR keeps up to 15 days).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("duration(self.window) <= duration('360h')")
        .message("spec.retention.window must be at most 360h (15 days)")
        .field_path(".window"),
    validation = Rule::new("!has(self.thinning) || self.thinning.all(t, duration(t.after) < duration(self.window))")
        .message("spec.retention.thinning[].after must be shorter than spec.retention.window")
        .field_path(".thinning"),
    validation = Rule::new("!has(self.thinning) || self.thinning.all(a, self.thinning.all(b, !(duration(a.after) < duration(b.after)) || duration(a.keepEvery) <= duration(b.keepEvery)))")
        .message("spec.retention.thinning[].keepEvery must not shrink as points get older")
        .field_path(".thinning"),
)]
pub struct Retention {
    /// Points older than this are deleted (with their data, once no kept point needs it).
    pub window: Duration,
    /// Thinning tiers: points older than `after` are kept only one per `keepEvery`.
    /// Omitted: ASR's tiers (every point for 2h, then hourly, then every 2h after 24h,
    /// then every 4h after 72h). Empty list: no thinning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["after".into()]))]
    pub thinning: Option<Vec<ThinningTier>>,
}

/// One thinning tier of [`Retention`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ThinningTier {
    /// Age from which this tier applies.
    pub after: Duration,
    /// Keep one point per this span of time among points older than `after`.
    pub keep_every: Duration,
}

/// Compression settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Compression {
    /// Algorithm.
    #[serde(default)]
    pub algorithm: CompressionAlgorithm,
    /// zstd level (1 fastest – 19 smallest). Higher levels send and store less for more
    /// CPU on the protected servers (docs/api.md, "Compression").
    #[serde(default = "default_zstd_level")]
    #[schemars(range(min = 1, max = 19))]
    pub level: u8,
}

impl Default for Compression {
    fn default() -> Self {
        Self { algorithm: CompressionAlgorithm::default(), level: default_zstd_level() }
    }
}

fn default_zstd_level() -> u8 {
    1
}

/// Compression algorithm.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum CompressionAlgorithm {
    /// Zstandard.
    #[default]
    Zstd,
    /// Store uncompressed (already-compressed or encrypted guest data).
    None,
}

/// Encryption-key settings (AES-256-GCM with key ids, so rotated keys stay readable).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Encryption {
    /// Secret holding the data-encryption keys (`key-<id>` entries plus `active`).
    /// When absent the operator creates `<policy>-encryption` with a random 256-bit key.
    pub key_secret_ref: LocalObjectReference,
}

/// Upload bandwidth limit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    /// Limit outside every window, in megabits per second; 0 means unlimited.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub limit_mbps: u32,
    /// IANA time zone the windows are written in.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z_]+(/[A-Za-z0-9_+-]+)*$"))]
    pub time_zone: String,
    /// Time windows with their own limit; the first matching window wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub windows: Vec<BandwidthWindow>,
}

fn default_time_zone() -> String {
    "UTC".into()
}

/// A weekly time window with its own bandwidth limit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.start != self.end")
    .message("spec.bandwidth.windows[].end must differ from start")
    .field_path(".end"))]
pub struct BandwidthWindow {
    /// Days the window applies to; empty means every day.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub days: Vec<Weekday>,
    /// Start time `HH:MM` (24-hour clock).
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// End time `HH:MM`; a window may cross midnight.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub end: String,
    /// Limit in megabits per second inside the window; 0 means unlimited.
    #[schemars(range(min = 0, max = 100000))]
    pub limit_mbps: u32,
}

/// Day of the week.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[allow(missing_docs)]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// Azure Blob Storage target.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.endpoint.startsWith('https://') || self.endpoint.matches('^http://(127\\\\.[0-9]+\\\\.[0-9]+\\\\.[0-9]+|localhost|\\\\[::1\\\\])(:[0-9]+)?(/.*)?$')")
        .message("spec.target.endpoint must use https; plain http is allowed only for a loopback emulator")
        .field_path(".endpoint"),
    validation = Rule::new("!self.container.contains('--')")
        .message("spec.target.container must not contain consecutive hyphens")
        .field_path(".container"),
)]
pub struct TargetStorage {
    /// Blob service endpoint, e.g. `https://<account>.blob.core.windows.net`
    /// (or `http://127.0.0.1:10000/devstoreaccount1` for Azurite).
    #[schemars(length(min = 8, max = 512), regex(pattern = r"^https?://[^\s]+$"))]
    pub endpoint: String,
    /// Container that holds this policy's data.
    #[schemars(length(min = 3, max = 63), regex(pattern = r"^[a-z0-9][a-z0-9-]*[a-z0-9]$"))]
    pub container: String,
    /// How the process servers authenticate to the storage account.
    pub credential: StorageCredential,
}

/// Exactly one way to authenticate to Blob storage.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretRef) != has(self.workloadIdentity)")
    .message("spec.target.credential needs exactly one of secretRef or workloadIdentity"))]
pub struct StorageCredential {
    /// A Secret with `sasToken` (a container or account SAS), or a service principal
    /// (`tenantId`, `clientId`, `clientSecret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,
    /// Microsoft Entra workload identity federated with the process servers' ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<WorkloadIdentity>,
}

/// Microsoft Entra workload identity.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadIdentity {
    /// Application (client) id of the managed identity or app registration.
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$"))]
    pub client_id: String,
    /// Directory (tenant) id.
    #[schemars(regex(pattern = r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$"))]
    pub tenant_id: String,
}

/// Observed state of a policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationPolicyStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: Ready, Reconciling, Stalled, StorageReachable, EncryptionKeyReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition<PolicyConditionType>>,
    /// Number of ProtectedServers referencing this policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_servers: Option<i32>,
    /// Id of the key new data is encrypted with (never the key itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_key_id: Option<String>,
    /// Name of the Secret holding the data-encryption keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_name: Option<String>,
    /// When the storage target was last reached successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_storage_check_time: Option<Time>,
}

/// Condition types of a ReplicationPolicy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PolicyConditionType {
    /// The policy can be used by servers.
    Ready,
    /// The operator is still acting on the latest spec.
    Reconciling,
    /// The operator cannot make progress without a change (message says what to fix).
    Stalled,
    /// The credential Secret exists and is well formed, and the container is reachable.
    StorageReachable,
    /// The data-encryption key Secret exists and holds an active key.
    EncryptionKeyReady,
}

impl ReplicationPolicy {
    /// Name of the policy's key Secret: the one it names, or `<policy>-encryption`.
    pub fn key_secret_name(&self) -> String {
        self.spec
            .encryption
            .as_ref()
            .map(|e| e.key_secret_ref.name.clone())
            .unwrap_or_else(|| format!("{}-encryption", kube::ResourceExt::name_any(self)))
    }
}
