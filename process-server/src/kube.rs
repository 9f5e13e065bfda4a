//! The process server in a cluster: targets from each server's ReplicationPolicy and its
//! Secrets, the heartbeat Lease the operator watches (docs/process-servers.md), and the
//! status fields the process server owns on each ProtectedServer (`latestRecoveryPoints`,
//! `churn`, field manager `siterecovery-process-server`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt as _};
use siterecovery_api::common::{RecoveryPointKind, RecoveryPointRef};
use siterecovery_api::policy::StorageCredential;
use siterecovery_api::server::LatestRecoveryPoints;
use siterecovery_api::{ProtectedServer, ReplicationPolicy};
use siterecovery_store::backend::{AzureConnector, BlobAuth};
use siterecovery_store::{Keyring, Store, StoreOptions};

use crate::Shared;
use crate::group::GroupSpec;
use crate::target::{Target, Targets};

/// Field manager of everything the process server writes.
pub const FIELD_MANAGER: &str = "siterecovery-process-server";
/// How long a resolved target is reused before its policy and Secrets are read again
/// (so key rotation and new credentials apply).
const TARGET_TTL: Duration = Duration::from_secs(60);

/// (namespace, policy name).
type PolicyKey = (String, String);

/// Targets read from the API: the server's policy, its credential and key Secrets.
pub struct KubeTargets {
    client: Client,
    /// This pod's name: agents assigned elsewhere are sent away.
    pod: Option<String>,
    /// Builds the blob clients; keeps one token credential per identity, so tokens
    /// outlive the per-minute re-read of policies.
    azure: AzureConnector,
    cache: Mutex<HashMap<PolicyKey, (Instant, Arc<Target>)>>,
}

impl KubeTargets {
    /// Targets for the process server `pod` (None: accept every server), reaching storage
    /// through `azure` (see [`AzureConnector::from_env`]).
    pub fn new(client: Client, pod: Option<String>, azure: AzureConnector) -> Self {
        Self { client, pod, azure, cache: Mutex::default() }
    }

    /// How the policy authenticates: its workload identity, or what its Secret holds.
    async fn auth_of(&self, ns: &str, policy_name: &str, credential: &StorageCredential) -> Result<BlobAuth, String> {
        if let Some(wi) = &credential.workload_identity {
            return Ok(BlobAuth::WorkloadIdentity { tenant_id: wi.tenant_id.clone(), client_id: wi.client_id.clone() });
        }
        let Some(r) = &credential.secret_ref else {
            return Err(format!("ReplicationPolicy {policy_name} names no storage credential"));
        };
        let secret = Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(&r.name)
            .await
            .map_err(|e| format!("reading Secret {ns}/{}: {e}", r.name))?
            .ok_or_else(|| format!("credential Secret {ns}/{} does not exist", r.name))?;
        let data: BTreeMap<String, Vec<u8>> =
            secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
        BlobAuth::from_secret_data(&data).map_err(|why| format!("credential Secret {ns}/{} {why}", r.name))
    }

    async fn target_of(&self, ns: &str, policy_name: &str) -> Result<Arc<Target>, (String, String)> {
        let key = (ns.to_string(), policy_name.to_string());
        if let Some((at, t)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < TARGET_TTL
        {
            return Ok(t.clone());
        }
        let unavailable = |m: String| ("TargetUnavailable".to_string(), m);
        let policy = Api::<ReplicationPolicy>::namespaced(self.client.clone(), ns)
            .get_opt(policy_name)
            .await
            .map_err(|e| unavailable(format!("reading ReplicationPolicy {ns}/{policy_name}: {e}")))?
            .ok_or_else(|| unavailable(format!("ReplicationPolicy {ns}/{policy_name} does not exist")))?;
        let secrets = Api::<Secret>::namespaced(self.client.clone(), ns);
        let data = |s: Secret| -> BTreeMap<String, Vec<u8>> {
            s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect()
        };
        let target = &policy.spec.target;
        let auth = self.auth_of(ns, policy_name, &target.credential).await.map_err(unavailable)?;
        let backend = self
            .azure
            .backend(&target.endpoint, &target.container, &auth)
            .map_err(|e| unavailable(format!("spec.target of policy {policy_name} ({}): {e}", auth.kind())))?;
        let key_name = policy.key_secret_name();
        let keys = secrets
            .get_opt(&key_name)
            .await
            .map_err(|e| unavailable(format!("reading Secret {ns}/{key_name}: {e}")))?
            .ok_or_else(|| unavailable(format!("key Secret {ns}/{key_name} does not exist yet")))?;
        let keyring = Keyring::from_secret_data(&data(keys))
            .map_err(|e| unavailable(format!("key Secret {ns}/{key_name}: {e}")))?;
        let level = policy.spec.compression.level;
        let options = StoreOptions { zstd_level: i32::from(level), ..StoreOptions::default() };
        let store = Store::new(Arc::new(backend), keyring, options).map_err(|e| unavailable(e.to_string()))?;
        let bandwidth = policy
            .spec
            .bandwidth
            .as_ref()
            .map_or(0, |b| siterecovery_core::bandwidth::limit_at(b, jiff::Timestamp::now()));
        let t = Arc::new(Target {
            store,
            chunk_size: siterecovery_store::DEFAULT_CHUNK_SIZE,
            bandwidth_bytes_per_second: bandwidth,
            crash_interval: policy.spec.crash_consistent_interval.to_std(),
            app_interval: policy.spec.app_consistent_interval.to_std(),
            compression_level: Some(level),
        });
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (Instant::now(), t.clone()));
        Ok(t)
    }
}

#[async_trait::async_trait]
impl Targets for KubeTargets {
    async fn resolve(&self, namespace: &str, server: &str) -> Result<Arc<Target>, (String, String)> {
        let psrv = Api::<ProtectedServer>::namespaced(self.client.clone(), namespace)
            .get_opt(server)
            .await
            .map_err(|e| {
                ("TargetUnavailable".to_string(), format!("reading ProtectedServer {namespace}/{server}: {e}"))
            })?
            .ok_or_else(|| {
                ("UnknownServer".to_string(), format!("ProtectedServer {namespace}/{server} does not exist"))
            })?;
        if psrv.metadata.deletion_timestamp.is_some() {
            return Err(("ServerDeleting".into(), format!("ProtectedServer {namespace}/{server} is being deleted")));
        }
        if let Some(pod) = &self.pod {
            let assigned = psrv.status.as_ref().and_then(|s| s.process_server.clone());
            if assigned.as_deref() != Some(pod.as_str()) {
                return Err((
                    "NotAssigned".into(),
                    match assigned {
                        Some(p) => format!("{namespace}/{server} replicates to process server {p}, not {pod}"),
                        None => format!("{namespace}/{server} has no process server assigned yet; retry"),
                    },
                ));
            }
        }
        self.target_of(namespace, &psrv.spec.policy_ref.name).await
    }

    async fn group(&self, namespace: &str, server: &str) -> Result<Option<GroupSpec>, String> {
        let api = Api::<ProtectedServer>::namespaced(self.client.clone(), namespace);
        let psrv = api
            .get_opt(server)
            .await
            .map_err(|e| format!("reading ProtectedServer {namespace}/{server}: {e}"))?
            .ok_or_else(|| format!("ProtectedServer {namespace}/{server} does not exist"))?;
        let Some(name) = psrv.spec.consistency_group.clone() else { return Ok(None) };
        let selector = format!("spec.consistencyGroup={name}");
        let listed = api
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(|e| format!("listing the members of consistency group {namespace}/{name}: {e}"))?;
        let mut policies: Vec<&str> = listed.items.iter().map(|p| p.spec.policy_ref.name.as_str()).collect();
        policies.sort();
        policies.dedup();
        if policies.len() > 1 {
            return Err(format!(
                "the members of consistency group {namespace}/{name} use different policies ({}); a group needs one policy",
                policies.join(", ")
            ));
        }
        let mut members: Vec<String> =
            listed.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).map(|p| p.name_any()).collect();
        members.sort();
        let target = self.target_of(namespace, &psrv.spec.policy_ref.name).await.map_err(|(_, m)| m)?;
        let interval = target.crash_interval.unwrap_or(DEFAULT_GROUP_INTERVAL);
        Ok(Some(GroupSpec { name, members, interval }))
    }
}

/// Rounds of a group whose policy's interval is unknown.
const DEFAULT_GROUP_INTERVAL: Duration = Duration::from_secs(300);

/// Free space of the cache volume, in percent.
pub fn cache_free_percent(dir: &std::path::Path) -> Option<f64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    let total = s.blocks() as f64;
    (total > 0.0).then(|| 100.0 * s.blocks_available() as f64 / total)
}

/// Renews the heartbeat Lease `sr-ps-<pod>` every 10 s, with the cache's free space and
/// the upload backlog in its annotations.
pub async fn heartbeat(client: Client, namespace: String, pod: String, cache_dir: PathBuf, shared: Arc<Shared>) {
    let leases = Api::<Lease>::namespaced(client.clone(), &namespace);
    let name = format!("sr-ps-{pod}");
    let owner = Api::<Pod>::namespaced(client, &namespace).get_opt(&pod).await.ok().flatten().map(|p| OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
        ..Default::default()
    });
    loop {
        let free = cache_free_percent(&cache_dir).unwrap_or(0.0);
        let mut lease = Lease::default();
        lease.metadata.name = Some(name.clone());
        lease.metadata.labels =
            Some([("app.kubernetes.io/component".to_string(), "process-server".to_string())].into());
        lease.metadata.annotations = Some(
            [
                ("siterecovery.io/cache-free-percent".to_string(), format!("{free:.1}")),
                ("siterecovery.io/upload-backlog-bytes".to_string(), shared.backlog().to_string()),
            ]
            .into(),
        );
        lease.metadata.owner_references = owner.clone().map(|o| vec![o]);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(pod.clone()),
            renew_time: Some(MicroTime(jiff::Timestamp::now())),
            lease_duration_seconds: Some(30),
            ..Default::default()
        });
        let result = match leases.get_opt(&name).await {
            Ok(Some(old)) => {
                lease.metadata.resource_version = old.metadata.resource_version;
                leases
                    .replace(
                        &name,
                        &PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
                        &lease,
                    )
                    .await
                    .map(drop)
            }
            Ok(None) => leases
                .create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &lease)
                .await
                .map(drop),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, lease = %name, "heartbeat not written; retrying");
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Writes each server's latest recovery point and churn to its status, at most every
/// 2 s per server and whenever a new point was written.
pub async fn report_status(client: Client, shared: Arc<Shared>) {
    let mut last: HashMap<String, Reported> = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for state in shared.servers().await {
            let Some((id, time, kind)) = state.latest_written() else { continue };
            let key = state.server.to_string();
            let received = state.progress.bytes_received.load(std::sync::atomic::Ordering::Relaxed);
            let api = Api::<ProtectedServer>::namespaced(client.clone(), state.server.namespace());
            if !last.contains_key(&key) {
                // An apply that leaves out a field this manager set removes it: start from
                // what an earlier run reported.
                let status = match api.get_opt(state.server.name()).await {
                    Ok(p) => p.and_then(|p| p.status).and_then(|s| s.latest_recovery_points).unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(server = %state.server, error = %e, "status not read; retrying");
                        continue;
                    }
                };
                let mut r = Reported::new(received);
                r.app = status.app_consistent;
                r.group = status.group_consistent;
                last.insert(key.clone(), r);
            }
            let r = last.get_mut(&key).expect("inserted");
            r.sample(received);
            if r.point.as_deref() == Some(id.as_str()) && r.at.elapsed() < Duration::from_secs(30) {
                continue;
            }
            let (rate, day) = r.churn(received);
            let newest = point_ref(id.clone(), time, kind);
            match kind {
                siterecovery_store::PointKind::App => r.app = Some(newest.clone()),
                // Only a whole group point (every member has it) is the group's point.
                siterecovery_store::PointKind::Group if group_point_whole(&shared, &state, &id).await => {
                    r.group = Some(newest.clone())
                }
                siterecovery_store::PointKind::Group | siterecovery_store::PointKind::Crash => {}
            }
            let points = LatestRecoveryPoints {
                // Every point is at least crash-consistent (the RPO is measured from it).
                crash_consistent: Some(newest),
                app_consistent: r.app.clone(),
                group_consistent: r.group.clone(),
                count: None,
            };
            let patch = serde_json::json!({
                "apiVersion": "siterecovery.io/v1alpha1",
                "kind": "ProtectedServer",
                "status": {
                    "latestRecoveryPoints": points,
                    "churn": {"bytesPerSecond": rate, "bytesLast24h": day},
                }
            });
            let pp = PatchParams::apply(FIELD_MANAGER).force();
            match api.patch_status(state.server.name(), &pp, &Patch::Apply(&patch)).await {
                Ok(_) => {
                    r.point = Some(id);
                    r.at = Instant::now();
                    r.bytes_at_report = received;
                }
                Err(e) => tracing::warn!(server = %state.server, error = %e, "status not written; retrying"),
            }
        }
    }
}

/// Whether the group point `id` of `state`'s server is whole: seen whole by this process
/// server's coordinator, or (after a restart, uploads from the cache) in the store.
async fn group_point_whole(shared: &Shared, state: &crate::state::ServerState, id: &str) -> bool {
    if shared.groups().is_whole(state.server.namespace(), id) {
        return true;
    }
    let store = &state.target.store;
    match store.load_point(&state.server, id).await {
        Ok(m) => crate::group::whole_in_store(store, &state.server, &m).await.unwrap_or(false),
        Err(_) => false,
    }
}

/// A point as the status shows it.
fn point_ref(id: String, time: jiff::Timestamp, kind: siterecovery_store::PointKind) -> RecoveryPointRef {
    let kind = match kind {
        siterecovery_store::PointKind::Crash => RecoveryPointKind::CrashConsistent,
        siterecovery_store::PointKind::App => RecoveryPointKind::AppConsistent,
        siterecovery_store::PointKind::Group => RecoveryPointKind::GroupConsistent,
    };
    RecoveryPointRef { id, time: Time(time), kind }
}

/// What was last reported for a server, and samples of its received bytes for the churn.
struct Reported {
    /// Newest app- and group-consistent points reported (kept in every apply).
    app: Option<RecoveryPointRef>,
    group: Option<RecoveryPointRef>,
    point: Option<String>,
    at: Instant,
    bytes_at_report: u64,
    /// (when, cumulative bytes received), one sample every 5 minutes, 24 h kept.
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Reported {
    fn new(received: u64) -> Self {
        Self {
            app: None,
            group: None,
            point: None,
            at: Instant::now(),
            bytes_at_report: received,
            samples: [(Instant::now(), received)].into(),
        }
    }

    fn sample(&mut self, received: u64) {
        if self.samples.back().is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(300)) {
            self.samples.push_back((Instant::now(), received));
        }
        while self.samples.front().is_some_and(|(t, _)| t.elapsed() > Duration::from_secs(86_400)) {
            self.samples.pop_front();
        }
    }

    /// Bytes per second since the last report, and bytes over the last 24 h (or since
    /// this process server started, when that is shorter).
    fn churn(&self, received: u64) -> (i64, i64) {
        let rate = received.saturating_sub(self.bytes_at_report) as f64 / self.at.elapsed().as_secs_f64().max(1.0);
        let day = received.saturating_sub(self.samples.front().map_or(received, |(_, b)| *b));
        (rate as i64, day as i64)
    }
}
