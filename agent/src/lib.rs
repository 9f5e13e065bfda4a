//! The mobility agent: copies the disks of a server to its process server, then follows
//! their changes and marks crash-consistent recovery points at the policy interval, and
//! app-consistent ones (filesystems frozen around the user's hooks) at the policy's
//! app-consistent interval (docs/replication-protocol.md).

pub mod app;
mod blockcache;
pub mod changes;
pub mod disk;
pub mod freeze;
mod group;
pub mod link;
pub mod metrics;
mod pass;
pub mod read;
pub mod register;
pub mod renew;
pub mod report;
pub mod restart;
mod send;
mod session;
pub mod tree;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use siterecovery_wire::Slot;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

pub use crate::blockcache::DEFAULT_LIMIT as DEFAULT_BLOCK_CACHE;
use crate::changes::ChangeTracker;
pub use crate::changes::chunks_of;
use crate::disk::Disk;
pub use crate::pass::{DiskSize, PassRequest, PassStatus, pass_bytes};
pub use crate::read::changed_ranges;
pub use crate::session::process_server_address;

/// One disk to protect.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskConfig {
    /// Disk id, as in the ProtectedServer's `spec.disks`.
    pub id: String,
    /// Image file or block device.
    pub path: PathBuf,
}

/// The agent's configuration (the registration bundle plus local choices).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentConfig {
    /// Namespace of the ProtectedServer.
    pub namespace: String,
    /// Name of the ProtectedServer.
    pub server: String,
    /// The disks.
    pub disks: Vec<DiskConfig>,
    /// `host:port` of the process server.
    pub process_server: String,
    /// Name the process server's certificate must carry (default: the host part).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Client certificate, key and CA bundle (PEM files).
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
    /// CA bundle that signed the process server's certificate.
    pub ca_bundle: PathBuf,
    /// Crash-consistent point interval in seconds.
    #[serde(default = "default_interval")]
    pub interval_seconds: f64,
    /// Pre-copy passes per point before giving up on this interval.
    #[serde(default = "default_passes")]
    pub max_passes: u32,
    /// zstd level on the wire (0: no compression), when the process server does not hand
    /// out the policy's `spec.compression.level` (which then wins).
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// How changes are tracked.
    #[serde(default)]
    pub tracking: changes::Tracking,
    /// The eBPF tracker's kernel ring buffer, in MiB: a power of two from 1 to 1024
    /// (default 8). Pinned, it holds what is written while no agent runs (8 MiB: 170,000
    /// block-device writes, or 1.3 GiB of buffered image-file writes); more is compared
    /// whole once. Kernel memory, charged to the agent's cgroup. A change takes effect at
    /// the next start, which then compares every chunk once.
    #[serde(rename = "trackerRingBufferMiB", default, skip_serializing_if = "Option::is_none")]
    pub tracker_ring_buffer_mib: Option<u32>,
    /// Where to serve `/metrics` and `/healthz` (e.g. `127.0.0.1:9101`); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Hooks and filesystems of app-consistent points; without it the policy's
    /// app-consistent points are reported as not configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_consistency: Option<app::AppConsistency>,
    /// The Kubernetes API the agent reports its status to; without it the agent runs
    /// standalone (replication only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube: Option<report::KubeConfig>,
    /// The operator's registration endpoint (`https://…`), where the agent renews its
    /// credentials (`POST /renew`); written by `register`, absent in older files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_url: Option<String>,
    /// Keeping change tracking across agent restarts (docs/replication-protocol.md
    /// "Agent restarts"); without it every start compares every chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartConfig>,
}

/// Where an agent keeps what the next one needs after a clean restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestartConfig {
    /// A directory on a bpf filesystem where the eBPF tracker pins itself, e.g.
    /// `/sys/fs/bpf/siterecovery/<namespace>_<server>` (a bpf filesystem refuses names
    /// with dots).
    pub pin_dir: PathBuf,
    /// The file a stopping agent writes for the next one (on a persistent, writable
    /// volume), e.g. `/etc/siterecovery/agent-state.bin`.
    pub state_file: PathBuf,
}

impl AgentConfig {
    /// The configuration of `namespace/server` replicating `disks` to `process_server`
    /// (`host:port`) with the client certificate, key and CA bundle `tls`; everything else
    /// at its default, as a configuration file that names nothing more would read.
    pub fn new(
        namespace: &str,
        server: &str,
        disks: Vec<DiskConfig>,
        process_server: String,
        tls: (PathBuf, PathBuf, PathBuf),
    ) -> Self {
        Self {
            namespace: namespace.to_owned(),
            server: server.to_owned(),
            disks,
            process_server,
            tls_server_name: None,
            client_cert: tls.0,
            client_key: tls.1,
            ca_bundle: tls.2,
            interval_seconds: default_interval(),
            max_passes: default_passes(),
            compression_level: default_level(),
            tracking: Default::default(),
            tracker_ring_buffer_mib: None,
            metrics_addr: None,
            app_consistency: None,
            kube: None,
            registration_url: None,
            restart: None,
        }
    }

    /// Checks what serde cannot: `trackerRingBufferMiB`.
    pub fn validate(&self) -> anyhow::Result<()> {
        if let Some(mib) = self.tracker_ring_buffer_mib
            && !(mib.is_power_of_two() && mib <= 1024)
        {
            anyhow::bail!("trackerRingBufferMiB must be a power of two from 1 to 1024, not {mib}");
        }
        Ok(())
    }
}

impl RestartConfig {
    /// Stops keeping tracking across restarts: unpins the tracker's program (it detaches
    /// once no tracker holds it) and removes the state file. Returns whether there was
    /// a state file.
    pub fn forget(&self) -> anyhow::Result<bool> {
        siterecovery_tracker::BlockTracker::remove_pins(&self.pin_dir)?;
        match std::fs::remove_file(&self.state_file) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(anyhow::anyhow!("removing {}: {e}", self.state_file.display())),
        }
    }
}

fn default_interval() -> f64 {
    300.0
}
fn default_passes() -> u32 {
    8
}
fn default_level() -> i32 {
    siterecovery_store::DEFAULT_ZSTD_LEVEL
}

/// What the agent has done, for logs, status and tests.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Connected to the process server now.
    pub connected: bool,
    /// This process continued from the state a cleanly stopped agent left (its first
    /// pass read only what changed, not every chunk).
    pub resumed_from_handover: bool,
    /// Every disk was copied once.
    pub initial_copy_done: bool,
    /// Latest recovery point acknowledged by the process server.
    pub last_point: Option<String>,
    /// Points marked.
    pub points: u64,
    /// Intervals whose point was skipped because writes never paused.
    pub points_skipped: u64,
    /// App-consistent points acknowledged (also counted in `points`).
    pub app_points: u64,
    /// Consistency-group points acknowledged (also counted in `points`).
    pub group_points: u64,
    /// Latest app-consistent point acknowledged.
    pub last_app_point: Option<String>,
    /// App-consistent attempts that produced no point.
    pub app_points_failed: u64,
    /// The last app-consistent attempt that failed, or whose hooks or thaw did.
    pub last_app_failure: Option<app::AppFailure>,
    /// Chunks sent (whole or as deltas).
    pub chunks_sent: u64,
    /// Of those, chunks sent as deltas.
    pub deltas_sent: u64,
    /// Plaintext bytes sent (whole chunks and delta ranges, before compression).
    pub payload_bytes: u64,
    /// Bytes sent on the wire.
    pub bytes_sent: u64,
    /// Chunks read and compared.
    pub chunks_compared: u64,
    /// Of those, chunks read by their dirty 64 KiB blocks alone.
    pub chunks_read_partly: u64,
    /// Bytes read from the disks.
    pub bytes_read: u64,
    /// Memory held by the block CVs of chunks read (bounded by the block cache setting).
    pub block_cache_bytes: u64,
    /// Why the last resync ran.
    pub last_resync_reason: Option<String>,
    /// The process server (pod) the operator assigned this server to, as last read from
    /// its status; `None` without a `kube` section.
    #[serde(skip)]
    pub assigned_process_server: Option<String>,
    /// Last connection error.
    pub last_error: Option<String>,
    /// Change tracker in use (`ebpf`, `checksum-scan`).
    pub tracker: String,
    /// The protected disks and their sizes as last opened (empty before the first session).
    pub disks: Vec<DiskSize>,
    /// The current or last comparison pass (initial copy or resync).
    pub pass: Option<PassStatus>,
}

/// A failure that ends a session (the agent reconnects).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SessionError(String);

fn err(e: impl std::fmt::Display) -> SessionError {
    SessionError(e.to_string())
}

/// The agent.
pub struct Agent {
    config: AgentConfig,
    tracker: Box<dyn ChangeTracker>,
    status: Arc<Mutex<AgentStatus>>,
    /// What this process believes the process server holds, per disk (kept across
    /// reconnections; only differences from the head are then resent).
    believed: Option<Vec<Vec<Slot>>>,
    /// Block CVs of the chunks last read (bounded), with what the chunk was: what finds
    /// the changed blocks of a delta, and hashes a chunk read by its dirty blocks.
    cache: blockcache::BlockCache,
    /// Set when a disk changed size: the next session's catch-up is reported as a resync.
    resized: Option<String>,
    /// Full comparison passes asked for from outside (manual resync).
    requests: PassRequest,
    /// When the next app-consistent point is due (None: at the first cycle).
    next_app: Option<Instant>,
    /// Settings from the process server received during a group round, to apply.
    pending_settings: Option<siterecovery_wire::Settings>,
    /// The process server's chunk size as of the last welcome (what `believed` counts in).
    chunk_size: Option<u32>,
    /// The zstd level of what is sent: the policy's as the process server last handed it,
    /// else `compressionLevel` of agent.json.
    level: i32,
    /// The process server said this server is not protected (any more): tracking is no
    /// longer kept across restarts.
    forgotten: bool,
}

impl Agent {
    /// An agent with a tracker.
    pub fn new(config: AgentConfig, tracker: Box<dyn ChangeTracker>) -> Self {
        let status = AgentStatus { tracker: tracker.name().to_owned(), ..Default::default() };
        Self {
            level: config.compression_level,
            config,
            tracker,
            status: Arc::new(Mutex::new(status)),
            believed: None,
            cache: blockcache::BlockCache::new(blockcache::DEFAULT_LIMIT),
            resized: None,
            requests: PassRequest::default(),
            next_app: None,
            pending_settings: None,
            chunk_size: None,
            forgotten: false,
        }
    }

    /// Bounds the memory of the block CVs kept to read changed chunks by their dirty
    /// blocks (default [`DEFAULT_BLOCK_CACHE`]; 0 reads every changed chunk whole).
    pub fn with_block_cache(mut self, bytes: usize) -> Self {
        self.cache = blockcache::BlockCache::new(bytes);
        self
    }

    /// Handle to request a full comparison pass (e.g. a manual resync from the status).
    pub fn pass_requests(&self) -> PassRequest {
        self.requests.clone()
    }

    /// Shared status, updated as the agent works.
    pub fn status(&self) -> Arc<Mutex<AgentStatus>> {
        self.status.clone()
    }

    fn update(&self, f: impl FnOnce(&mut AgentStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Replicates until `shutdown` turns true, reconnecting after failures.
    pub async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        // Re-read at every connection: a renewed certificate is used without a restart.
        let mut tls = renew::ClientTls::load(&self.config)?;
        if let Some(a) = &self.config.app_consistency {
            let mounts = a.mount_points.clone();
            let thawed = tokio::task::spawn_blocking(move || freeze::thaw_leftovers(&mounts)).await.unwrap_or_default();
            for m in thawed {
                tracing::warn!(mount = %m.display(), "thawed a filesystem left frozen (an agent killed during an app-consistent point?)");
            }
        }
        self.take_over();
        let mut backoff = Duration::from_millis(250);
        while !*shutdown.borrow() {
            let result = self.session(TlsConnector::from(tls.current()), shutdown.clone()).await;
            // A session that got as far as the welcome was a success until it broke:
            // reconnect promptly, as after the first failure.
            if self.status.lock().unwrap_or_else(|p| p.into_inner()).connected {
                backoff = Duration::from_millis(250);
            }
            self.update(|s| s.connected = false);
            match result {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "replication session ended");
                    self.update(|s| s.last_error = Some(e.to_string()));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
        self.hand_over();
        Ok(())
    }

    /// What is protected, as a handover records it.
    fn protected(&self, chunk_size: u32) -> Option<restart::Protected> {
        let disks = self.config.disks.iter().map(|d| {
            let size = Disk::open(&d.id, &d.path).and_then(|disk| disk.size()).ok()?;
            Some((d.id.clone(), d.path.clone(), size))
        });
        Some(restart::Protected {
            namespace: self.config.namespace.clone(),
            server: self.config.server.clone(),
            chunk_size,
            disks: disks.collect::<Option<_>>()?,
        })
    }

    /// At start: resumes from what a cleanly stopped agent left, when the tracker
    /// continued its tracking; the first pass then reads only what changed.
    fn take_over(&mut self) {
        let Some(restart) = &self.config.restart else { return };
        let handover = match restart::Handover::take(&restart.state_file) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "not resuming from the previous agent's state; comparing every chunk");
                return;
            }
        };
        if self.protected(handover.protected.chunk_size).as_ref() != Some(&handover.protected) {
            tracing::info!("the previous agent protected other disks or sizes; comparing every chunk");
            return;
        }
        let blocks: usize = handover.dirty_blocks.iter().map(Vec::len).sum();
        if handover.granularity != changes::EBPF_GRANULARITY || !self.tracker.resume(handover.dirty_blocks) {
            tracing::info!("change tracking did not continue across the restart; comparing every chunk");
            return;
        }
        // The block values the previous agent held: a chunk's next change is read by its
        // dirty blocks too (the cache hands out only those of the chunk as it is held).
        let cached: Vec<_> =
            handover.cached.into_iter().map(|c| ((c.disk, c.index), c.len, Slot::Data(c.hash), c.blocks)).collect();
        let chunks = cached.len();
        tracing::info!(saved = %handover.saved, blocks, chunks, "resuming from the previous agent: only what changed is read");
        self.cache.import(handover.protected.chunk_size, cached);
        self.chunk_size = Some(handover.protected.chunk_size);
        self.believed = Some(handover.believed);
        self.update(|s| s.resumed_from_handover = true);
    }

    /// At a clean stop: leaves the next agent what it believes the process server holds
    /// and the writes since, when everything taken from the tracker was sent and the
    /// tracker goes on recording without the agent.
    fn hand_over(&mut self) {
        let Some(restart) = self.config.restart.clone() else { return };
        if self.forgotten {
            return;
        }
        let (Some(believed), Some(chunk_size)) = (self.believed.take(), self.chunk_size) else {
            tracing::info!("stopping in the middle of a pass: the next agent compares every chunk");
            return;
        };
        let Some(dirty_blocks) = self.tracker.suspend() else { return };
        let Some(protected) = self.protected(chunk_size) else { return };
        let cached = self
            .cache
            .export()
            .into_iter()
            .filter_map(|((disk, index), len, slot, blocks)| match slot {
                Slot::Data(hash) => Some(restart::Cached { disk, index, len, hash, blocks }),
                _ => None,
            })
            .collect();
        let handover = restart::Handover {
            protected,
            believed,
            dirty_blocks,
            granularity: changes::EBPF_GRANULARITY,
            saved: jiff::Timestamp::now(),
            cached,
        };
        match handover.save(&restart.state_file) {
            Ok(()) => tracing::info!(
                file = %restart.state_file.display(),
                blocks = handover.dirty_blocks.iter().map(Vec::len).sum::<usize>(),
                "handed over to the next agent"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "could not save the state for the next agent; it will compare every chunk")
            }
        }
    }
}
