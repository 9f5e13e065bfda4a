//! Reports the agent's state into its ProtectedServer's `status` (docs/lifecycle.md
//! "Status is shared; each writer owns its fields"): `agent` (version, heartbeat),
//! `disks`, `initialSync` and `resync`, by server-side apply with the field manager
//! `siterecovery-agent` and the agent's own ServiceAccount token.
//!
//! The reporter only reads [`crate::AgentStatus`]; replication never waits for it, and a
//! failed report is logged and retried. What to write is decided by [`Memory`], which is
//! pure and unit-tested.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use siterecovery_api::ProtectedServer;
use siterecovery_api::server::{
    AgentStatus as ApiAgentStatus, ChangeTracker, DiskStatus, ProtectedServerStatus, ResyncReason, ResyncStatus,
    ServerPhase, SyncProgress,
};
use tokio::sync::watch;

use crate::{AgentConfig, AgentStatus, PassRequest, PassStatus};

/// The field manager of everything the agent writes (`siterecovery-agent`).
pub const FIELD_MANAGER: &str = siterecovery_api::field_manager::AGENT;
/// Report interval while a comparison pass runs.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(3);
/// Report interval otherwise (the heartbeat).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Where the agent's Kubernetes API is and how it authenticates: the files `register`
/// writes from the registration bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeConfig {
    /// API server URL.
    pub api_server: String,
    /// File holding the ServiceAccount token (re-read about every minute, so a renewed
    /// token is picked up without a restart).
    pub token: PathBuf,
    /// PEM CA bundle of the API server; absent when it is publicly trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_server_ca: Option<PathBuf>,
}

/// Why a report failed (the next one retries).
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The kube section cannot be turned into a client.
    #[error("Kubernetes client from the agent configuration: {0}")]
    Config(String),
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// A client for the agent's API server. The token and the CA file are given to kube as
/// files, so it re-reads both (rotation) and the token never passes through this code.
pub fn client(config: &KubeConfig) -> Result<kube::Client, ReportError> {
    let url = config.api_server.parse().map_err(|e| ReportError::Config(format!("apiServer: {e}")))?;
    let mut c = kube::Config::new(url);
    c.auth_info.token_file = Some(config.token.display().to_string());
    c.root_cert_file = config.api_server_ca.clone();
    c.connect_timeout = Some(Duration::from_secs(10));
    c.read_timeout = Some(Duration::from_secs(30));
    kube::Client::try_from(c).map_err(|e| ReportError::Config(e.to_string()))
}

/// Which comparison pass is the server's initial sync.
#[derive(Debug, Clone, PartialEq)]
enum Initial {
    /// The first pass with an id above `after` (none yet).
    Pending { after: u64, start: Option<Time> },
    /// Pass `id` (replaced by a later pass if it never completes).
    Pass { after: u64, id: u64, start: Time },
    /// Complete: bytesDone = bytesTotal from now on.
    Done { start: Option<Time> },
}

/// A manual resync the agent was asked for in `status.resync` and is serving.
#[derive(Debug, Clone, PartialEq)]
struct Manual {
    token: String,
    request_time: Time,
    message: Option<String>,
    /// Passes up to this id started before the request.
    after: u64,
}

/// What the reporter remembers between reports; decides the fields to apply.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    initial: Option<Initial>,
    phase: Option<ServerPhase>,
    /// The resync record last written, and the pass it describes.
    resync: Option<(ResyncStatus, Option<u64>)>,
    manual: Option<Manual>,
}

fn complete(s: &Option<SyncProgress>) -> bool {
    s.as_ref().is_some_and(|s| s.bytes_total > 0 && s.bytes_done >= s.bytes_total)
}

fn time(t: jiff::Timestamp) -> Time {
    Time(t)
}

impl Memory {
    /// Whether the server was read once (nothing is written before: what is already in
    /// the status decides whether the next pass is the initial sync).
    pub fn primed(&self) -> bool {
        self.initial.is_some()
    }

    /// Takes in the server's status as read now; returns a full comparison pass to
    /// request from the agent (reason, message), if the status asks for one.
    pub fn observe(&mut self, server: &ProtectedServerStatus, agent: &AgentStatus) -> Option<(String, String)> {
        self.phase = server.phase;
        let latest = agent.pass.as_ref().map_or(0, |p| p.id);
        let mut request = None;
        match &self.initial {
            None if complete(&server.initial_sync) => {
                self.initial =
                    Some(Initial::Done { start: server.initial_sync.as_ref().and_then(|s| s.start_time.clone()) });
            }
            None => {
                let start = server.initial_sync.as_ref().and_then(|s| s.start_time.clone());
                self.initial = Some(Initial::Pending { after: 0, start });
            }
            // Forward replication re-enabled after a failback: the operator removed
            // initialSync and waits for a checksum pass over every disk.
            Some(Initial::Done { .. })
                if server.initial_sync.is_none() && server.phase == Some(ServerPhase::InitialReplication) =>
            {
                self.initial = Some(Initial::Pending { after: latest, start: None });
                request =
                    Some(("InitialCopy".to_owned(), "forward replication re-enabled: comparing every chunk".into()));
            }
            Some(_) => {}
        }
        if self.resync.is_none()
            && let Some(r) = &server.resync
        {
            // Written by an earlier run of the agent (or the operator): keep asserting it,
            // a manual request's token answered stays answered.
            self.resync = Some((r.clone(), None));
        }
        if let Some(r) = &server.resync
            && r.reason == ResyncReason::Manual
            && r.completion_time.is_none()
            && let Some(token) = &r.token
            && self.manual.as_ref().is_none_or(|m| &m.token != token)
            && self
                .resync
                .as_ref()
                .is_none_or(|(ours, _)| ours.token.as_ref() != Some(token) || ours.completion_time.is_none())
        {
            self.manual = Some(Manual {
                token: token.clone(),
                request_time: r.request_time.clone(),
                message: r.message.clone(),
                after: latest,
            });
            self.resync = Some((r.clone(), None));
            request = Some(("Manual".to_owned(), r.message.clone().unwrap_or_else(|| "requested".into())));
        }
        request
    }

    /// The status fields the agent owns, as of `agent` at `now`. `sizes` are the disks'
    /// sizes when the agent has not opened them yet.
    pub fn fields(&mut self, agent: &AgentStatus, sizes: &[(String, u64)], now: jiff::Timestamp) -> Value {
        let disks: Vec<(String, u64)> = if agent.disks.is_empty() {
            sizes.to_vec()
        } else {
            agent.disks.iter().map(|d| (d.id.clone(), d.size)).collect()
        };
        let total: u64 = disks.iter().map(|d| d.1).sum();
        let pass = agent.pass.as_ref();
        let initial = self.initial_sync(pass, total, now);
        self.track_resync(pass);
        let tracker = if agent.tracker == "ebpf" { ChangeTracker::Ebpf } else { ChangeTracker::ChecksumScan };
        let disks: Vec<DiskStatus> = disks
            .iter()
            .enumerate()
            .map(|(d, (id, size))| DiskStatus {
                id: id.clone(),
                size_bytes: Some(*size as i64),
                tracker: Some(tracker),
                sync: pass.filter(|p| p.bytes_total.len() == disks.len()).map(|p| {
                    let (t, c) = (p.bytes_total[d], p.bytes_compared[d]);
                    progress(t, if p.completed.is_some() { t } else { c }, p, now)
                }),
            })
            .collect();
        // Reported once the agent tried an app-consistent point; the last failure only
        // while no point came after it.
        let app_consistency =
            (agent.app_points + agent.app_points_failed > 0).then(|| siterecovery_api::server::AppConsistencyStatus {
                points: agent.app_points as i64,
                failures: agent.app_points_failed as i64,
                last_failure: agent
                    .last_app_failure
                    .as_ref()
                    .filter(|f| agent.last_app_point.as_ref().is_none_or(|p| point_after(p, f.time)))
                    .map(|f| siterecovery_api::server::AppConsistencyFailure {
                        time: time(f.time),
                        reason: f.reason.clone(),
                        message: f.message.clone(),
                    }),
            });
        let agent_status = ApiAgentStatus {
            version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            last_heartbeat_time: Some(time(now)),
            certificate_expiry_time: None,
            app_consistency,
        };
        let mut status = json!({ "agent": agent_status, "disks": disks });
        if let Some(i) = initial {
            status["initialSync"] = json!(i);
        }
        if let Some((r, _)) = &self.resync {
            status["resync"] = json!(r);
        }
        status
    }

    fn initial_sync(&mut self, pass: Option<&PassStatus>, total: u64, now: jiff::Timestamp) -> Option<SyncProgress> {
        let state = self.initial.clone()?;
        let next = match (state, pass) {
            (Initial::Pending { after, start }, Some(p)) if p.id > after => {
                Initial::Pass { after, id: p.id, start: start.unwrap_or_else(|| time(p.started)) }
            }
            // A pass that ended with its session is replaced by the next session's.
            (Initial::Pass { after, id, start }, Some(p)) if p.id > id => Initial::Pass { after, id: p.id, start },
            (other, _) => other,
        };
        let next = match next {
            Initial::Pass { id, start, .. } if pass.is_some_and(|p| p.id == id && p.completed.is_some()) => {
                Initial::Done { start: Some(start) }
            }
            other => other,
        };
        self.initial = Some(next.clone());
        match next {
            Initial::Pending { start, .. } => (total > 0 || start.is_some()).then(|| SyncProgress {
                bytes_total: total as i64,
                bytes_done: 0,
                percent: Some("0%".into()),
                start_time: start,
                estimated_completion_time: None,
            }),
            Initial::Pass { start, .. } => {
                let p = pass.expect("a pass is current");
                let done = p.bytes_compared.iter().sum::<u64>().min(total);
                let mut s = progress(total, done, p, now);
                s.start_time = Some(start);
                Some(s)
            }
            Initial::Done { start } => Some(SyncProgress {
                bytes_total: total as i64,
                bytes_done: total as i64,
                percent: Some("100%".into()),
                start_time: start,
                estimated_completion_time: None,
            }),
        }
    }

    /// Records a resync for the latest pass when it is not the initial sync.
    fn track_resync(&mut self, pass: Option<&PassStatus>) {
        let Some(p) = pass else { return };
        let initial = match &self.initial {
            Some(Initial::Pass { id, .. }) => *id == p.id,
            Some(Initial::Done { .. }) | None => false,
            Some(Initial::Pending { after, .. }) => p.id > *after,
        };
        if initial {
            return;
        }
        let bytes_resent = Some(p.bytes_resent as i64);
        let completion_time = p.completed.map(time);
        if let Some(m) = &self.manual
            && p.id > m.after
            && p.reason == "Manual"
        {
            let record = ResyncStatus {
                reason: ResyncReason::Manual,
                message: m.message.clone(),
                request_time: m.request_time.clone(),
                completion_time,
                bytes_resent,
                token: Some(m.token.clone()),
            };
            if p.completed.is_some() {
                self.manual = None;
            }
            self.resync = Some((record, Some(p.id)));
            return;
        }
        if self.manual.is_some() {
            // The manual request stays as the operator wrote it until its pass starts.
            return;
        }
        let described = self.resync.as_ref().and_then(|(_, id)| *id);
        let same = described == Some(p.id);
        // A new resync is reported only while replicating forward: elsewhere the operator
        // would refuse it as a lifecycle event.
        let replicating = matches!(self.phase, Some(ServerPhase::Protected | ServerPhase::Resynchronizing));
        if p.reason == "Manual" || !(same || replicating) {
            return;
        }
        let reason = match p.reason.as_str() {
            "DiskResized" => ResyncReason::DiskResized,
            "ChecksumMismatch" => ResyncReason::ChecksumMismatch,
            _ => ResyncReason::TrackingLost,
        };
        let record = ResyncStatus {
            reason,
            message: Some(p.message.clone()),
            request_time: time(p.started),
            completion_time,
            bytes_resent,
            token: None,
        };
        self.resync = Some((record, Some(p.id)));
    }
}

/// `done` of `total` bytes, with the percentage and, while running, an estimated
/// completion at the pass's average rate.
fn progress(total: u64, done: u64, p: &PassStatus, now: jiff::Timestamp) -> SyncProgress {
    let percent = done.saturating_mul(100).checked_div(total).unwrap_or(100);
    let elapsed = now.duration_since(p.started).as_secs_f64();
    let eta = (p.completed.is_none() && done > 0 && done < total && elapsed > 0.0)
        .then(|| (total - done) as f64 * elapsed / done as f64)
        .and_then(|secs| jiff::SignedDuration::try_from_secs_f64(secs).ok())
        .and_then(|d| now.checked_add(d).ok())
        .map(time);
    SyncProgress {
        bytes_total: total as i64,
        bytes_done: done as i64,
        percent: Some(format!("{percent}%")),
        start_time: Some(time(p.started)),
        estimated_completion_time: eta,
    }
}

/// Reports an agent's status to its ProtectedServer until shutdown.
pub struct Reporter {
    namespace: String,
    name: String,
    kube: KubeConfig,
    disks: Vec<crate::DiskConfig>,
    status: Arc<Mutex<AgentStatus>>,
    requests: PassRequest,
    api: Option<Api<ProtectedServer>>,
    memory: Memory,
}

impl Reporter {
    /// A reporter for the agent configured by `config` (which must have a `kube` section).
    pub fn new(config: &AgentConfig, status: Arc<Mutex<AgentStatus>>, requests: PassRequest) -> Option<Self> {
        Some(Self {
            namespace: config.namespace.clone(),
            name: config.server.clone(),
            kube: config.kube.clone()?,
            disks: config.disks.clone(),
            status,
            requests,
            api: None,
            memory: Memory::default(),
        })
    }

    /// Reports at start, every [`PROGRESS_INTERVAL`] while a pass runs, when a pass starts
    /// or ends, and every [`HEARTBEAT_INTERVAL`]; failures back off up to 30 s.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut next: Option<Instant> = None;
        let mut reported_pass = None;
        let mut backoff = Duration::from_secs(2);
        let mut failing = false;
        while !*shutdown.borrow() {
            let snapshot = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let key = snapshot.pass.as_ref().map(|p| (p.id, p.completed.is_some()));
            let now = Instant::now();
            // A pass that starts or ends is reported at once, unless reports are failing
            // (then the backoff decides).
            let changed = key != reported_pass && self.memory.primed() && !failing;
            if next.is_none_or(|t| now >= t) || changed {
                match self.report(&snapshot).await {
                    Ok(()) => {
                        backoff = Duration::from_secs(2);
                        failing = false;
                        reported_pass = key;
                        let running = snapshot.pass.as_ref().is_some_and(|p| p.completed.is_none());
                        next = Some(now + if running { PROGRESS_INTERVAL } else { HEARTBEAT_INTERVAL });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, server = %self.name, "status report failed");
                        if matches!(e, ReportError::Config(_)) {
                            self.api = None;
                        }
                        next = Some(now + backoff);
                        failing = true;
                        backoff = (backoff * 2).min(HEARTBEAT_INTERVAL);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Reads the server, then applies the agent's fields of its status.
    pub async fn report(&mut self, agent: &AgentStatus) -> Result<(), ReportError> {
        let api = match &self.api {
            Some(api) => api.clone(),
            None => {
                let api = Api::<ProtectedServer>::namespaced(client(&self.kube)?, &self.namespace);
                self.api = Some(api.clone());
                api
            }
        };
        let server = api.get_status(&self.name).await?;
        // The process server this server is assigned to: the next connection goes there.
        let assigned = server.status.as_ref().and_then(|s| s.process_server.clone());
        self.status.lock().unwrap_or_else(|p| p.into_inner()).assigned_process_server = assigned;
        if let Some((reason, message)) = self.memory.observe(&server.status.unwrap_or_default(), agent) {
            tracing::info!(reason, message, "the status asks for a comparison of every chunk");
            self.requests.request(&reason, &message);
        }
        // Before the first session the agent has not opened its disks: size them here.
        let sizes: Vec<(String, u64)> = if agent.disks.is_empty() {
            let size = |d: &crate::DiskConfig| crate::disk::Disk::open(&d.id, &d.path).and_then(|d| d.size());
            self.disks.iter().map(|d| (d.id.clone(), size(d).unwrap_or(0))).collect()
        } else {
            Vec::new()
        };
        let status = self.memory.fields(agent, &sizes, jiff::Timestamp::now());
        let patch = json!({
            "apiVersion": format!("{}/v1alpha1", siterecovery_api::GROUP),
            "kind": "ProtectedServer",
            "metadata": { "name": self.name, "namespace": self.namespace },
            "status": status,
        });
        // force: the agent owns these fields; a manual resync request is answered with the
        // operator's own values for the fields both write (reason, time, token).
        api.patch_status(&self.name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
        tracing::debug!(server = %self.name, "status reported");
        Ok(())
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;

/// Whether the failure at `failed` came after point `point` (point ids start with their
/// UTC time to the millisecond, `yyyymmddThhmmssmmmZ`).
fn point_after(point: &str, failed: jiff::Timestamp) -> bool {
    let stamp = format!("{}{:03}Z", failed.strftime("%Y%m%dT%H%M%S"), failed.subsec_millisecond());
    stamp.as_str() > point.get(..stamp.len()).unwrap_or(point)
}
