//! The mobility agent: copies the disks of a server to its process server, then follows
//! their changes and marks crash-consistent recovery points at the policy interval, and
//! app-consistent ones (filesystems frozen around the user's hooks) at the policy's
//! app-consistent interval (docs/replication-protocol.md).

pub mod app;
pub mod changes;
pub mod disk;
pub mod freeze;
mod group;
pub mod link;
pub mod metrics;
mod pass;
pub mod register;
pub mod renew;
pub mod report;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use siterecovery_store::{PointKind, generate_point_id};
use siterecovery_wire::{
    ChunkData, DiskInfo, Encoding, Hello, Message, PROTOCOL_VERSION, PointMarker, Resync, Slot, read_message,
};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::changes::{ChangeTracker, Dirty};
use crate::disk::{Disk, ReadChunk};
use crate::link::{Link, spawn_ack_reader};
use crate::pass::pass_message;
pub use crate::pass::{DiskSize, PassRequest, PassStatus, pass_bytes};

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
    /// zstd level on the wire (0: no compression).
    #[serde(default = "default_level")]
    pub compression_level: i32,
    /// How changes are tracked.
    #[serde(default)]
    pub tracking: changes::Tracking,
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
}

fn default_interval() -> f64 {
    300.0
}
fn default_passes() -> u32 {
    8
}
fn default_level() -> i32 {
    1
}

/// What the agent has done, for logs, status and tests.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Connected to the process server now.
    pub connected: bool,
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
    /// Block hashes of the chunks last read, with the chunk hash they describe: what a
    /// delta against the process server's copy must carry.
    blocks: std::collections::HashMap<(usize, u64), (siterecovery_store::ChunkHash, Vec<u64>)>,
    /// Set when a disk changed size: the next session's catch-up is reported as a resync.
    resized: Option<String>,
    /// Full comparison passes asked for from outside (manual resync).
    requests: PassRequest,
    /// When the next app-consistent point is due (None: at the first cycle).
    next_app: Option<Instant>,
    /// Settings from the process server received during a group round, to apply.
    pending_settings: Option<siterecovery_wire::Settings>,
}

impl Agent {
    /// An agent with a tracker.
    pub fn new(config: AgentConfig, tracker: Box<dyn ChangeTracker>) -> Self {
        let status = AgentStatus { tracker: tracker.name().to_owned(), ..Default::default() };
        Self {
            config,
            tracker,
            status: Arc::new(Mutex::new(status)),
            believed: None,
            blocks: Default::default(),
            resized: None,
            requests: PassRequest::default(),
            next_app: None,
            pending_settings: None,
        }
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
                Ok(()) => return Ok(()),
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
        Ok(())
    }

    async fn session(&mut self, tls: TlsConnector, mut shutdown: watch::Receiver<bool>) -> Result<(), SessionError> {
        let c = &self.config;
        let disks: Vec<Disk> =
            c.disks.iter().map(|d| Disk::open(&d.id, &d.path)).collect::<Result<_, _>>().map_err(err)?;
        let sizes: Vec<u64> = disks.iter().map(Disk::size).collect::<Result<_, _>>().map_err(err)?;
        let assigned = self.status.lock().unwrap_or_else(|p| p.into_inner()).assigned_process_server.clone();
        let address = process_server_address(&c.process_server, assigned.as_deref());
        let host = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h);
        let name = c.tls_server_name.clone().unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
        let name = ServerName::try_from(name).map_err(|e| err(format!("process server name: {e}")))?;
        let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(&address))
            .await
            .map_err(|_| err(format!("connecting to {address} timed out")))?
            .map_err(|e| err(format!("connecting to {address}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let stream = tls.connect(name, tcp).await.map_err(|e| err(format!("TLS with {}: {e}", c.process_server)))?;
        let (mut rd, wr) = tokio::io::split(stream);

        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            namespace: c.namespace.clone(),
            server: c.server.clone(),
            disks: disks.iter().zip(&sizes).map(|(d, &size)| DiskInfo { id: d.id.clone(), size }).collect(),
            agent: env!("CARGO_PKG_VERSION").to_string(),
            features: [siterecovery_wire::FEATURE_GROUP_POINTS, siterecovery_wire::FEATURE_SETTINGS]
                .map(String::from)
                .to_vec(),
        };
        let mut link_wr = Some(wr);
        {
            use tokio::io::AsyncWriteExt as _;
            let w = link_wr.as_mut().expect("set");
            siterecovery_wire::write_message(w, &Message::Hello(hello)).await.map_err(err)?;
            w.flush().await.map_err(err)?;
        }
        let welcome = tokio::time::timeout(Duration::from_secs(60), read_message(&mut rd))
            .await
            .map_err(|_| err("no welcome from the process server within 60 s"))?
            .map_err(err)?;
        let Some(Message::Welcome(welcome, head)) = welcome else {
            return Err(err("the process server did not answer the hello with a welcome"));
        };
        if head.disks.len() != disks.len()
            || head.disks.iter().zip(&disks).zip(&sizes).any(|((h, d), &s)| h.id != d.id || h.size != s)
        {
            return Err(err("the process server's head does not match the disks sent in the hello"));
        }
        let chunk_size = welcome.chunk_size;
        tracing::info!(
            process_server = %c.process_server, chunk_size, latest_point = ?welcome.latest_point,
            tracker = self.tracker.name(), "connected to the process server"
        );
        self.update(|s| {
            s.connected = true;
            s.last_error = None;
            s.disks = disks.iter().zip(&sizes).map(|(d, &size)| DiskSize { id: d.id.clone(), size }).collect();
        });
        let (acks, mut control) = spawn_ack_reader(rd);
        let mut control_closed = false;
        let mut link = Link::new(link_wr.take().expect("set"), acks, welcome.bandwidth_bytes_per_second);

        // What to compare first: everything on a first look (initial copy, agent restart,
        // lost tracking); otherwise what changed plus what the process server lacks of
        // what this process sent before (unacknowledged when the connection dropped).
        let held: Vec<Vec<Slot>> = head.disks.iter().map(|d| d.slots.clone()).collect();
        let first = self.tracker.take(&disks, chunk_size).map_err(err)?;
        let believed = self.believed.take();
        let compare: Dirty = match (&first, &believed) {
            (Dirty::Chunks(sets), Some(b)) if b.len() == held.len() => Dirty::Chunks(
                sets.iter()
                    .zip(b.iter().zip(&held))
                    .map(|(set, (b, h))| {
                        let mut s = set.clone();
                        s.extend((0..h.len()).filter(|&i| b.get(i) != Some(&h[i])).map(|i| i as u64));
                        s
                    })
                    .collect(),
            ),
            _ => Dirty::All,
        };
        let mut sent = held;
        let resized = self.resized.clone();
        let counted = compare == Dirty::All || resized.is_some();
        if compare == Dirty::All {
            let reason = if sent.iter().all(|d| d.iter().all(|s| *s == Slot::Missing)) {
                "InitialCopy"
            } else if believed.is_none() {
                "AgentStarted"
            } else {
                "TrackingLost"
            };
            tracing::info!(reason, "comparing every chunk with the process server's copy");
            self.update(|s| s.last_resync_reason = Some(reason.into()));
            let seq = link.next_seq();
            link.send(seq, &Message::Resync(Resync { seq, reason: reason.into() })).await.map_err(err)?;
            match resized {
                Some(message) => self.begin_pass("DiskResized", message, &compare, &sizes, chunk_size),
                None => self.begin_pass(reason, pass_message(reason), &compare, &sizes, chunk_size),
            }
        } else if let Some(message) = resized {
            self.begin_pass("DiskResized", message, &compare, &sizes, chunk_size);
        }
        self.send_pass(&mut link, &disks, &sizes, chunk_size, &mut sent, &compare, counted).await?;
        if counted {
            // A pass is complete when the process server holds all of it durably.
            link.drain().await.map_err(err)?;
            self.end_pass();
            self.resized = None;
        }
        self.update(|s| s.initial_copy_done = true);

        // The policy's intervals, as the process server hands them, win over local config.
        let (mut interval, mut app_interval) = self.intervals(welcome.crash_interval_ms, welcome.app_interval_ms);
        loop {
            // Until this cycle's pass is sent, what the tracker hands out exists only here:
            // a failure now must make the next session compare everything.
            self.believed = None;
            // Pre-copy: send what changed until a look finds nothing written since the
            // previous one; everything sent then reflects that instant.
            if let Some((reason, message)) = self.requests.take() {
                tracing::info!(reason, message, "comparing every chunk with the process server's copy");
                self.begin_pass(&reason, message.clone(), &Dirty::All, &sizes, chunk_size);
                let seq = link.next_seq();
                let mut pass =
                    link.send(seq, &Message::Resync(Resync { seq, reason: reason.clone() })).await.map_err(err);
                if pass.is_ok() {
                    pass = self.send_pass(&mut link, &disks, &sizes, chunk_size, &mut sent, &Dirty::All, true).await;
                }
                if pass.is_ok() {
                    pass = link.drain().await.map_err(err);
                }
                if pass.is_err() {
                    // Asked for once, done once: the next session runs it again.
                    self.requests.request(&reason, &message);
                }
                pass?;
                self.end_pass();
            }
            let mut app = None;
            if let Some(every) = app_interval
                && self.next_app.is_none_or(|t| Instant::now() >= t)
            {
                self.next_app = Some(Instant::now() + every);
                let r = self.app_point(&mut link, &disks, &sizes, chunk_size, &mut sent, &mut shutdown).await?;
                if r == app::AppOutcome::Shutdown {
                    // The link may end in a partial frame: nothing more is sent on it.
                    link.close().await;
                    return Ok(());
                }
                app = Some(r);
            }
            // An app-consistent point is this cycle's point (every point is at least
            // crash-consistent).
            let mut point = match app {
                Some(app::AppOutcome::Point) => None,
                _ => self.precopy(&mut link, &disks, &sizes, chunk_size, &mut sent, &|| false).await?,
            };
            // Writes never paused: a short freeze of the configured filesystems forces
            // convergence (docs/replication-protocol.md).
            if point.is_none() && app != Some(app::AppOutcome::Point) {
                point = self.converge_frozen(&mut link, &disks, &sizes, chunk_size, &mut sent).await?;
            }
            match point {
                Some(time) => {
                    let id = generate_point_id(time, PointKind::Crash);
                    let seq = link.next_seq();
                    let marker =
                        PointMarker { seq, id: id.clone(), kind: PointKind::Crash, time, group: None, members: vec![] };
                    link.send(seq, &Message::Point(marker)).await.map_err(err)?;
                    link.drain().await.map_err(err)?;
                    tracing::info!(point = %id, "crash-consistent recovery point acknowledged");
                    self.update(|s| {
                        s.points += 1;
                        s.last_point = Some(id);
                    });
                }
                None if app == Some(app::AppOutcome::Point) => {}
                None => {
                    tracing::warn!(
                        passes = self.config.max_passes,
                        "writes never paused; no recovery point this interval"
                    );
                    self.update(|s| s.points_skipped += 1);
                }
            }
            let bytes = link.bytes_sent;
            self.update(|s| s.bytes_sent = bytes);
            self.believed = Some(sent.clone());
            // Until the next point is due, take part in the group rounds the process
            // server starts; a group point counts as this interval's point.
            let mut due = tokio::time::Instant::now() + interval;
            loop {
                let prepare = tokio::select! {
                    Some(new) = async { self.pending_settings.take() } => {
                        tracing::info!(settings = ?new, "the policy changed");
                        (interval, app_interval) = self.intervals(new.crash_interval_ms, new.app_interval_ms);
                        link.set_rate(new.bandwidth_bytes_per_second);
                        due = due.min(tokio::time::Instant::now() + interval);
                        continue;
                    }
                    _ = tokio::time::sleep_until(due) => break,
                    m = control.recv(), if !control_closed => match m {
                        Some(Message::GroupPrepare(p)) => p,
                        Some(Message::Settings(new)) => {
                            self.pending_settings = Some(new);
                            continue;
                        }
                        Some(_) => continue, // the decision of a round given up on
                        None => { control_closed = true; continue }
                    },
                    _ = stopping(&mut shutdown) => {
                        let r = tokio::time::timeout(Duration::from_secs(10), link.drain()).await;
                        link.close().await;
                        return match r {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err(err(e)),
                            Err(_) => Err(err("shutting down with unacknowledged data (it is resent on restart)")),
                        };
                    }
                };
                self.believed = None;
                let outcome =
                    self.group_round(&mut link, &mut control, &disks, &sizes, chunk_size, &mut sent, prepare).await?;
                self.believed = Some(sent.clone());
                let (id, grouped) = match outcome {
                    group::GroupOutcome::Point(id) => (id, true),
                    group::GroupOutcome::CrashPoint(id) => (id, false),
                    group::GroupOutcome::Nothing => continue,
                };
                if grouped {
                    tracing::info!(point = %id, "group recovery point acknowledged");
                    due = tokio::time::Instant::now() + interval;
                }
                self.update(|s| {
                    s.points += 1;
                    s.group_points += u64::from(grouped);
                    s.last_point = Some(id);
                });
            }
        }
    }

    /// The crash- and app-consistent intervals: the policy's as the process server hands
    /// them (`None`: unknown, the agent's own configuration applies).
    fn intervals(&self, crash_ms: Option<u64>, app_ms: Option<u64>) -> (Duration, Option<Duration>) {
        let crash = crash_ms
            .map(Duration::from_millis)
            .unwrap_or_else(|| Duration::from_secs_f64(self.config.interval_seconds))
            .max(Duration::from_millis(100));
        let app = match app_ms {
            Some(ms) => Some(Duration::from_millis(ms)).filter(|d| !d.is_zero()),
            None => self.config.app_consistency.as_ref().and_then(app::AppConsistency::interval),
        }
        .map(|d| d.max(Duration::from_secs(1)));
        (crash, app)
    }

    /// Pre-copy: sends what changed until a look finds nothing written since the previous
    /// one, and returns that look's time (everything sent reflects that instant); `None`
    /// after `maxPasses` passes without such a look, or once `stop` holds.
    async fn precopy<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        link: &mut Link<W>,
        disks: &[Disk],
        sizes: &[u64],
        chunk_size: u32,
        sent: &mut Vec<Vec<Slot>>,
        stop: &(impl Fn() -> bool + Sync),
    ) -> Result<Option<jiff::Timestamp>, SessionError> {
        for _ in 0..self.config.max_passes.max(1) {
            if stop() {
                return Ok(None);
            }
            let now_sizes: Vec<u64> = disks.iter().map(Disk::size).collect::<Result<_, _>>().map_err(err)?;
            if now_sizes != sizes {
                let changed: Vec<String> = disks
                    .iter()
                    .zip(sizes.iter().zip(&now_sizes))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(d, (a, b))| format!("disk {} changed size from {a} to {b} bytes", d.id))
                    .collect();
                self.resized = Some(changed.join("; "));
                self.believed = Some(std::mem::take(sent));
                link.drain().await.map_err(err)?;
                return Err(err("a disk changed size; reconnecting to send the new layout"));
            }
            let at = jiff::Timestamp::now();
            let dirty = self.tracker.take(disks, chunk_size).map_err(err)?;
            if dirty.is_quiet() && self.tracker.proves_quiet() {
                return Ok(Some(at));
            }
            self.send_pass(link, disks, sizes, chunk_size, sent, &dirty, false).await?;
        }
        Ok(None)
    }

    /// Starts reporting a comparison pass over the chunks `which` names.
    fn begin_pass(&self, reason: &str, message: String, which: &Dirty, sizes: &[u64], chunk_size: u32) {
        let bytes_total = pass_bytes(which, sizes, chunk_size);
        self.update(|s| {
            let id = s.pass.as_ref().map_or(1, |p| p.id + 1);
            s.pass = Some(PassStatus {
                id,
                reason: reason.to_owned(),
                message,
                started: jiff::Timestamp::now(),
                completed: None,
                bytes_compared: vec![0; bytes_total.len()],
                bytes_total,
                bytes_resent: 0,
            });
        });
    }

    fn end_pass(&self) {
        self.update(|s| {
            if let Some(p) = &mut s.pass {
                p.completed = Some(jiff::Timestamp::now());
            }
        });
    }

    /// Reads the chunks `which` names, and sends those that differ from `sent`; `counted`
    /// adds them to the current [`PassStatus`].
    #[allow(clippy::too_many_arguments)]
    async fn send_pass<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        link: &mut Link<W>,
        disks: &[Disk],
        sizes: &[u64],
        chunk_size: u32,
        sent: &mut [Vec<Slot>],
        which: &Dirty,
        counted: bool,
    ) -> Result<(), SessionError> {
        let level = self.config.compression_level;
        for (d, disk) in disks.iter().enumerate() {
            let size = sizes[d];
            let count = size.div_ceil(u64::from(chunk_size));
            let indexes: Vec<u64> = match which {
                Dirty::All => (0..count).collect(),
                Dirty::Chunks(sets) => {
                    sets.get(d).map(|s| s.iter().copied().filter(|&i| i < count).collect()).unwrap_or_default()
                }
            };
            let mut reads = futures::stream::iter(indexes)
                .map(|index| {
                    let disk = disk.clone();
                    tokio::task::spawn_blocking(move || -> std::io::Result<(ReadChunk, Option<Vec<u8>>)> {
                        let chunk = disk.read_chunk(index, chunk_size, size)?;
                        let packed = match (&chunk.slot, level) {
                            (Slot::Data(_), l) if l > 0 => {
                                zstd::bulk::compress(&chunk.data, l).ok().filter(|z| z.len() < chunk.data.len())
                            }
                            _ => None,
                        };
                        Ok((chunk, packed))
                    })
                })
                .buffered(2);
            while let Some(r) = reads.next().await {
                let (chunk, packed) = r.map_err(err)?.map_err(err)?;
                let len = ((size - chunk.index * u64::from(chunk_size)).min(u64::from(chunk_size))) as u32;
                self.update(|s| {
                    s.chunks_compared += 1;
                    if let Some(p) = s.pass.as_mut().filter(|_| counted)
                        && let Some(b) = p.bytes_compared.get_mut(d)
                    {
                        *b += u64::from(len);
                    }
                });
                let i = chunk.index as usize;
                let previous = match chunk.slot {
                    Slot::Data(h) => self.blocks.insert((d, chunk.index), (h, chunk.blocks.clone())),
                    _ => self.blocks.remove(&(d, chunk.index)),
                };
                if sent[d][i] == chunk.slot {
                    continue;
                }
                let seq = link.next_seq();
                let delta = match (sent[d][i], chunk.slot) {
                    (Slot::Data(old), Slot::Data(_)) => previous
                        .filter(|(h, b)| *h == old && b.len() == chunk.blocks.len())
                        .map(|(_, b)| (Some(old), b)),
                    (Slot::Zero, Slot::Data(_)) => Some((None, vec![0; chunk.blocks.len()])),
                    _ => None,
                }
                .map(|(base, before)| (base, changed_ranges(&before, &chunk.blocks, len)))
                .filter(|(_, ranges)| ranges.iter().map(|r| u64::from(r[1])).sum::<u64>() * 2 <= u64::from(len));
                let payload;
                let message = match (chunk.slot, delta) {
                    (Slot::Data(h), Some((base, ranges))) => {
                        let mut bytes = Vec::new();
                        for &[off, n] in &ranges {
                            bytes.extend_from_slice(&chunk.data[off as usize..(off + n) as usize]);
                        }
                        payload = bytes.len() as u64;
                        let (encoding, body) = pack(bytes, level);
                        self.update(|s| s.deltas_sent += 1);
                        Message::Delta(
                            siterecovery_wire::ChunkDelta {
                                seq,
                                disk: disk.id.clone(),
                                index: chunk.index,
                                len,
                                base: base.map(|b| b.to_hex()),
                                hash: h.to_hex(),
                                ranges,
                                encoding,
                            },
                            body,
                        )
                    }
                    (slot, _) => {
                        let (hash, encoding, body) = match (slot, packed) {
                            (Slot::Data(h), Some(z)) => (Some(h.to_hex()), Encoding::Zstd, bytes::Bytes::from(z)),
                            (Slot::Data(h), None) => (Some(h.to_hex()), Encoding::Raw, bytes::Bytes::from(chunk.data)),
                            _ => (None, Encoding::Raw, bytes::Bytes::new()),
                        };
                        payload = if hash.is_some() { u64::from(len) } else { 0 };
                        Message::Chunk(
                            ChunkData { seq, disk: disk.id.clone(), index: chunk.index, len, hash, encoding },
                            body,
                        )
                    }
                };
                link.send(seq, &message).await.map_err(err)?;
                sent[d][i] = chunk.slot;
                self.update(|s| {
                    s.chunks_sent += 1;
                    s.payload_bytes += payload;
                    if let Some(p) = s.pass.as_mut().filter(|_| counted) {
                        p.bytes_resent += payload;
                    }
                });
            }
        }
        Ok(())
    }
}

/// Returns once `shutdown` is true (at once if it already is).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // The borrow `wait_for` returns must not live across an await (it is not Send).
    let _ = shutdown.wait_for(|v| *v).await;
}

/// Where to connect: the configured `host:port`, except that a process-server Service
/// name (`siterecovery-process-server.<ns>.svc…`, as the registration bundle gives) is
/// narrowed to the pod the server is assigned to (`<pod>.siterecovery-process-server…`,
/// a name its serving certificate carries), so the agent follows reassignments.
pub fn process_server_address(configured: &str, assigned: Option<&str>) -> String {
    let (host, port) = configured.rsplit_once(':').unwrap_or((configured, "9443"));
    let valid_pod = |p: &str| {
        !p.is_empty() && p.len() <= 63 && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    match assigned {
        Some(pod) if host.starts_with("siterecovery-process-server.") && valid_pod(pod) => {
            format!("{pod}.{host}:{port}")
        }
        _ => configured.to_string(),
    }
}

/// The `[offset, length]` ranges of a chunk of `len` bytes whose delta blocks differ,
/// adjacent blocks merged.
pub fn changed_ranges(before: &[u64], after: &[u64], len: u32) -> Vec<[u32; 2]> {
    let block = disk::DELTA_BLOCK as u32;
    let mut out: Vec<[u32; 2]> = Vec::new();
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        if a == b {
            continue;
        }
        let off = i as u32 * block;
        let n = block.min(len - off);
        match out.last_mut() {
            Some(last) if last[0] + last[1] == off => last[1] += n,
            _ => out.push([off, n]),
        }
    }
    out
}

/// zstd-compresses a body when that makes it smaller.
fn pack(bytes: Vec<u8>, level: i32) -> (Encoding, bytes::Bytes) {
    if level > 0
        && let Ok(z) = zstd::bulk::compress(&bytes, level)
        && z.len() < bytes.len()
    {
        return (Encoding::Zstd, bytes::Bytes::from(z));
    }
    (Encoding::Raw, bytes::Bytes::from(bytes))
}

/// Turns a set of dirty byte ranges into chunk indexes (for trackers that report blocks).
pub fn chunks_of(blocks: impl IntoIterator<Item = u64>, block_size: u64, chunk_size: u32) -> BTreeSet<u64> {
    blocks.into_iter().map(|b| b * block_size / u64::from(chunk_size)).collect()
}

#[cfg(test)]
mod address_tests {
    use super::process_server_address as addr;

    #[test]
    fn a_service_name_narrows_to_the_assigned_pod() {
        let svc = "siterecovery-process-server.prod.svc:9443";
        assert_eq!(
            addr(svc, Some("siterecovery-process-server-1")),
            "siterecovery-process-server-1.siterecovery-process-server.prod.svc:9443"
        );
        assert_eq!(addr(svc, None), svc);
        assert_eq!(addr("localhost:4000", Some("siterecovery-process-server-1")), "localhost:4000");
        assert_eq!(addr(svc, Some("Bad.Name")), svc);
    }
}
