//! Per-server state of the process server: the journal, the head as received (what
//! agents are told at connect) and as uploaded (what the next manifest is built from),
//! and the cache budget shared by every server.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use siterecovery_store::{ChunkHash, ChunkRef, ServerRef, StoreError};
use siterecovery_wire::{DiskHead, Frame, Head, Message, Slot};
use tokio::sync::Notify;

use crate::chains::{ChainRecord, Chains};
use crate::journal::{Journal, JournalError, Position};
use crate::target::Target;

/// What the uploader has made durable in Blob storage, persisted in `checkpoint`.
#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    /// Every journal record before this position is uploaded.
    pub position: Position,
    /// Chunk size of the server (fixed once its first point exists).
    pub chunk_size: u32,
    /// Latest recovery point written.
    pub latest_point: Option<String>,
    /// Head as uploaded.
    pub head: Head,
    /// How the uploaded head's slots are stored where they are chains of patches.
    pub chains: Chains,
    /// Whether chunks already in the store may be reused without uploading them again:
    /// only when the server's latest point there reads with the current keyring. A
    /// server recreated over leftovers written under a key that is gone must not build
    /// new points on chunks nobody can decrypt.
    pub trust_store: bool,
}

#[derive(Serialize, Deserialize)]
struct CheckpointHeader {
    position: Position,
    chunk_size: u32,
    latest_point: Option<String>,
    #[serde(default)]
    trust_store: bool,
    /// Absent in checkpoints written before patches: every slot was a whole chunk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chains: Vec<ChainRecord>,
}

impl Checkpoint {
    fn path(dir: &Path) -> PathBuf {
        dir.join("checkpoint")
    }

    /// Reads the checkpoint of `dir`, if there is one.
    pub fn load(dir: &Path) -> Result<Option<Self>, StateError> {
        let path = Self::path(dir);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::Checkpoint(format!("{}: {e}", path.display()))),
        };
        let corrupt = |why: String| StateError::Checkpoint(format!("{} is corrupt: {why}", path.display()));
        if bytes.len() < 8 {
            return Err(corrupt("too short".into()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
            return Err(corrupt("checksum mismatch".into()));
        }
        let frame = Frame::decode_payload(Bytes::copy_from_slice(&body[4..])).map_err(|e| corrupt(e.to_string()))?;
        let h: CheckpointHeader = serde_json::from_slice(&frame.header).map_err(|e| corrupt(e.to_string()))?;
        let head = Head::decode(frame.body).map_err(|e| corrupt(e.to_string()))?;
        let chains = Chains::from_records(h.chains).map_err(corrupt)?;
        Ok(Some(Self {
            position: h.position,
            chunk_size: h.chunk_size,
            latest_point: h.latest_point,
            head,
            chains,
            trust_store: h.trust_store,
        }))
    }

    /// Replaces the checkpoint of `dir` atomically (write, fsync, rename, fsync dir).
    pub fn store(&self, dir: &Path) -> Result<(), StateError> {
        let header = CheckpointHeader {
            position: self.position,
            chunk_size: self.chunk_size,
            latest_point: self.latest_point.clone(),
            trust_store: self.trust_store,
            chains: self.chains.records(),
        };
        let frame = Frame {
            kind: 0,
            header: Bytes::from(serde_json::to_vec(&header).expect("serialisable")),
            body: self.head.encode(),
        };
        let mut bytes = frame.encode().to_vec();
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_be_bytes());
        let path = Self::path(dir);
        write_atomically(&path, &bytes).map_err(|e| StateError::Checkpoint(format!("writing {}: {e}", path.display())))
    }
}

/// Replaces `path` with `bytes` durably: a temporary file next to it, synced, renamed
/// over it, and the directory synced.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    fs::File::open(dir).and_then(|d| d.sync_all())
}

/// The format of a server's cache this process server writes and reads: 2, deltas
/// journaled as deltas; 3, chains in the checkpoint whose patches are in packs (storage
/// format 3). Kept in `<cache>/<namespace>/<server>/FORMAT`. A process server refuses a
/// cache of a newer format, whose records or chains it would misread (a downgrade with
/// a backlog); a cache without the file predates it and is read as it is.
pub const CACHE_FORMAT: u32 = 3;

/// Checks the format of the cache in `dir` and records this process server's.
fn adopt_cache_format(dir: &Path) -> Result<(), StateError> {
    let path = dir.join("FORMAT");
    let bad = |why: String| StateError::Format(format!("{}: {why}", path.display()));
    match fs::read_to_string(&path) {
        Ok(text) => {
            let n: u32 = text.trim().parse().map_err(|_| bad(format!("not a format number: {text:?}")))?;
            if n > CACHE_FORMAT {
                return Err(bad(format!(
                    "the cache is format {n}, written by a newer process server; this one reads formats up to \
                     {CACHE_FORMAT}. Run the newer version until the backlog is uploaded, or remove the cache \
                     (the agent then sends again what the store lacks)"
                )));
            }
            if n == CACHE_FORMAT {
                return Ok(());
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(bad(e.to_string())),
    }
    write_atomically(&path, format!("{CACHE_FORMAT}\n").as_bytes()).map_err(|e| bad(e.to_string()))
}

/// A failure of a server's state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The checkpoint could not be read or written.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The cache was written in a format this process server does not read.
    #[error("cache format: {0}")]
    Format(String),
    /// The store failed while recovering the head from the latest point.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Applies one journal message to a head. Messages were validated before they were
/// journaled, so an out-of-range chunk cannot occur; it is ignored defensively.
pub fn apply(head: &mut Head, latest: &mut Option<String>, chunk_size: u32, m: &Message) {
    match m {
        Message::Chunk(c, _) => {
            if let Some(slot) = head.disk_mut(&c.disk).and_then(|d| d.slots.get_mut(c.index as usize)) {
                *slot = match &c.hash {
                    None => Slot::Zero,
                    Some(h) => Slot::Data(siterecovery_store::ChunkHash::from_hex(h).expect("validated")),
                };
            }
        }
        Message::Delta(d, _) => {
            if let Some(slot) = head.disk_mut(&d.disk).and_then(|x| x.slots.get_mut(d.index as usize)) {
                *slot = Slot::Data(siterecovery_store::ChunkHash::from_hex(&d.hash).expect("validated"));
            }
        }
        Message::Layout(l) => {
            head.adopt(&l.disks, chunk_size);
        }
        Message::Point(p) => *latest = Some(p.id.clone()),
        _ => {}
    }
}

/// The head as received: what the agent is told it need not send again.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// Head after every journaled message.
    pub head: Head,
    /// Latest point marker journaled.
    pub latest_point: Option<String>,
}

/// Progress counters of one server (for metrics and status).
#[derive(Debug, Default)]
pub struct Progress {
    /// Plaintext bytes received: whole chunks, and the ranges deltas change (churn).
    pub bytes_received: AtomicU64,
    /// Bytes uploaded (sealed chunks and manifests).
    pub bytes_uploaded: AtomicU64,
    /// Recovery points written.
    pub points_written: AtomicU64,
}

/// One protected server on this process server.
pub struct ServerState {
    /// Namespace and name.
    pub server: ServerRef,
    /// Its cache directory.
    pub dir: PathBuf,
    /// Where its data goes.
    pub target: Arc<Target>,
    /// Its journal.
    pub journal: Journal,
    /// Chunk size of the server.
    pub chunk_size: u32,
    /// Head as received.
    pub received: Mutex<Received>,
    /// One agent session at a time: a new session cancels the old one and takes this.
    pub session: tokio::sync::Mutex<()>,
    /// Cancels the current session (a newer connection of the same agent arrived).
    pub cancel_session: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// Wakes the uploader.
    pub kick: Notify,
    /// Uploader's state at start (read once by the uploader).
    pub start: Mutex<Option<Checkpoint>>,
    /// The chains of the head as uploaded, published by the uploader after each round:
    /// where a delta's base is in the store.
    pub uploaded: Mutex<Chains>,
    /// Counters.
    pub progress: Progress,
    /// Journal bytes not uploaded yet.
    pub backlog: AtomicU64,
    /// The latest recovery point in the store: id, time and kind.
    pub latest: Mutex<Option<(String, jiff::Timestamp, siterecovery_store::PointKind)>>,
}

impl std::fmt::Debug for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerState").field("server", &self.server.to_string()).finish()
    }
}

impl ServerState {
    /// Opens a server's cache: the checkpoint (or, without one, the latest recovery point
    /// in the store), then the journal after it, replayed into the received head.
    pub async fn open(cache: &Path, server: ServerRef, target: Arc<Target>) -> Result<Self, StateError> {
        let dir = cache.join(server.namespace()).join(server.name());
        fs::create_dir_all(&dir).map_err(|e| StateError::Checkpoint(format!("creating {}: {e}", dir.display())))?;
        adopt_cache_format(&dir)?;
        let (checkpoint, latest) = match Checkpoint::load(&dir)? {
            Some(c) => (c, None),
            None => match tokio::time::timeout(std::time::Duration::from_secs(10), from_latest_point(&target, &server))
                .await
            {
                Ok(Ok(found)) => found,
                // The store is down or its latest point unreadable: start empty rather than
                // refuse the agent. Its data is then compared against nothing and sent
                // again, and uploaded again (nothing stored is trusted).
                Ok(Err(e)) => {
                    tracing::warn!(server = %server, error = %e, "cannot read the latest recovery point; starting from an empty head");
                    (Checkpoint { chunk_size: target.chunk_size, ..Default::default() }, None)
                }
                Err(_) => {
                    tracing::warn!(server = %server, "the store did not answer within 10 s; starting from an empty head");
                    (Checkpoint { chunk_size: target.chunk_size, ..Default::default() }, None)
                }
            },
        };
        let journal_dir = dir.join("journal");
        let journal = tokio::task::block_in_place(|| Journal::open(&journal_dir))?;
        let mut received = Received { head: checkpoint.head.clone(), latest_point: checkpoint.latest_point.clone() };
        let mut pos = checkpoint.position;
        loop {
            // Small batches: a large backlog is replayed without holding it in memory.
            let batch = tokio::task::block_in_place(|| journal.read_from(pos, 64, REPLAY_BATCH_BYTES))?;
            let Some((_, last)) = batch.last() else { break };
            pos = *last;
            for (frame, _) in &batch {
                if let Ok(m) = Message::from_frame(frame) {
                    apply(&mut received.head, &mut received.latest_point, checkpoint.chunk_size, &m);
                }
            }
        }
        let backlog = journal.bytes_after(checkpoint.position);
        Ok(Self {
            server,
            dir,
            target,
            journal,
            chunk_size: checkpoint.chunk_size,
            received: Mutex::new(received),
            session: tokio::sync::Mutex::new(()),
            cancel_session: Mutex::new(None),
            kick: Notify::new(),
            uploaded: Mutex::new(checkpoint.chains.clone()),
            start: Mutex::new(Some(checkpoint)),
            progress: Progress::default(),
            backlog: AtomicU64::new(backlog),
            latest: Mutex::new(latest),
        })
    }

    /// The latest recovery point written to the store by this process server (or found
    /// there when it took the server over).
    pub fn latest_written(&self) -> Option<(String, jiff::Timestamp, siterecovery_store::PointKind)> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where chunk `hash` of slot `index` of `disk` is in the store, as far as the
    /// uploader got: its chain, or else the whole chunk (which may not be uploaded yet).
    pub fn stored_as(&self, disk: &str, index: u64, hash: ChunkHash) -> ChunkRef {
        let chains = self.uploaded.lock().unwrap_or_else(|p| p.into_inner());
        chains.chain(disk, index, &hash).map_or(ChunkRef::Data(hash), |c| ChunkRef::Chain(c.clone()))
    }

    /// The received state, locked.
    pub fn received(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Journal bytes read at a time when a server's state is opened (the records are only
/// applied to the head, then dropped).
const REPLAY_BATCH_BYTES: u64 = 16 << 20;

/// Without a checkpoint (a new server, or its cache volume was lost and it moved here):
/// start from the latest recovery point in the store, so only differences are resent.
type Latest = Option<(String, jiff::Timestamp, siterecovery_store::PointKind)>;

async fn from_latest_point(target: &Target, server: &ServerRef) -> Result<(Checkpoint, Latest), StateError> {
    let ids = target.store.list_point_ids(server).await?;
    let Some(latest) = ids.last() else {
        return Ok((Checkpoint { chunk_size: target.chunk_size, ..Default::default() }, None));
    };
    let m = match target.store.load_point(server, latest).await {
        Ok(m) => m,
        Err(e @ (StoreError::UnknownKey { .. } | StoreError::Corrupt { .. })) => {
            tracing::warn!(server = %server, error = %e, "the latest stored point is unreadable with the current keys: starting empty, uploading everything again");
            return Ok((Checkpoint { chunk_size: target.chunk_size, ..Default::default() }, None));
        }
        Err(e) => return Err(e.into()),
    };
    let disks = m
        .disks
        .iter()
        .map(|d| DiskHead {
            id: d.id.clone(),
            size: d.size,
            slots: d
                .chunks
                .iter()
                .map(|c| match c {
                    ChunkRef::Zero => Slot::Zero,
                    ChunkRef::Data(h) => Slot::Data(*h),
                    ChunkRef::Chain(c) => Slot::Data(c.hash),
                })
                .collect(),
        })
        .collect();
    tracing::info!(server = %server, point = %m.id, "no cache for this server; starting from its latest recovery point");
    let latest = Some((m.id.clone(), m.time, m.kind));
    Ok((
        Checkpoint {
            position: Position::default(),
            chunk_size: m.chunk_size,
            latest_point: Some(m.id.clone()),
            head: Head { disks },
            chains: Chains::of_manifest(&m),
            trust_store: true,
        },
        latest,
    ))
}

/// Bytes acknowledged to agents and not yet uploaded, over all servers, against a limit:
/// sessions stop reading from their agents while it is exceeded (backpressure).
#[derive(Debug)]
pub struct CacheBudget {
    /// Limit in bytes.
    pub limit: u64,
    used: AtomicU64,
    freed: Notify,
}

impl CacheBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self { limit, used: AtomicU64::new(0), freed: Notify::new() }
    }

    /// Bytes in use.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Counts `n` more bytes.
    pub fn add(&self, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    /// Returns `n` bytes and wakes waiting sessions.
    pub fn release(&self, n: u64) {
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
        self.freed.notify_waiters();
    }

    /// Whether the cache is at its limit (a session would wait).
    pub fn is_full(&self) -> bool {
        self.used() >= self.limit
    }

    /// Waits until the cache is below its limit. Returns whether it had to wait.
    pub async fn wait_for_room(&self) -> bool {
        let mut waited = false;
        while self.used() >= self.limit {
            waited = true;
            let freed = self.freed.notified();
            if self.used() < self.limit {
                break;
            }
            let _ = tokio::time::timeout(std::time::Duration::from_millis(500), freed).await;
        }
        waited
    }
}

/// Every server with state on this process server.
#[derive(Debug, Default)]
pub struct Registry {
    servers: tokio::sync::Mutex<HashMap<(String, String), Arc<ServerState>>>,
}

impl Registry {
    /// The state of a server, opened on first use (the caller starts its uploader).
    pub async fn get_or_open(
        &self,
        cache: &Path,
        server: ServerRef,
        target: Arc<Target>,
    ) -> Result<(Arc<ServerState>, bool), StateError> {
        let key = (server.namespace().to_string(), server.name().to_string());
        let mut map = self.servers.lock().await;
        if let Some(s) = map.get(&key) {
            return Ok((s.clone(), false));
        }
        let state = Arc::new(ServerState::open(cache, server, target).await?);
        map.insert(key, state.clone());
        Ok((state, true))
    }

    /// Every server, for reporting.
    pub async fn all(&self) -> Vec<Arc<ServerState>> {
        self.servers.lock().await.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use siterecovery_wire::DiskInfo;

    #[test]
    fn a_checkpoint_keeps_its_chains_and_one_without_them_reads_as_whole_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let h = |i: u8| ChunkHash::of(&[i]);
        let mut head = Head::default();
        head.adopt(&[DiskInfo { id: "sda".into(), size: 3 << 20 }], 1 << 20);
        head.disks[0].slots = vec![Slot::Zero, Slot::Data(h(1)), Slot::Data(h(3))];
        let mut chains = Chains::default();
        chains.push("sda", 2, Some(h(2)), h(3), 4096);
        let cp = Checkpoint {
            position: Position { segment: 3, offset: 77 },
            chunk_size: 1 << 20,
            latest_point: Some("p".into()),
            head,
            chains,
            trust_store: true,
        };
        cp.store(dir.path()).unwrap();
        let back = Checkpoint::load(dir.path()).unwrap().unwrap();
        assert_eq!((back.position, &back.head, &back.chains), (cp.position, &cp.head, &cp.chains));
        assert_eq!(back.chains.entry("sda", 1, back.head.disks[0].slots[1]), Some(ChunkRef::Data(h(1))));
        assert!(matches!(back.chains.entry("sda", 2, back.head.disks[0].slots[2]), Some(ChunkRef::Chain(_))));

        // Written before patches existed: no chains field, every data slot whole.
        let old = Checkpoint { chains: Chains::default(), ..cp };
        old.store(dir.path()).unwrap();
        let text = std::fs::read(dir.path().join("checkpoint")).unwrap();
        assert!(!String::from_utf8_lossy(&text).contains("chains"), "no field for no chains");
        assert!(Checkpoint::load(dir.path()).unwrap().unwrap().chains.is_empty());
    }

    #[test]
    fn a_cache_of_a_newer_format_is_refused_and_an_older_one_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let format = dir.path().join("FORMAT");
        // A cache from before the marker (a checkpoint, no FORMAT) is read and marked.
        std::fs::write(dir.path().join("checkpoint"), b"x").unwrap();
        adopt_cache_format(dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(&format).unwrap(), format!("{CACHE_FORMAT}\n"));
        adopt_cache_format(dir.path()).unwrap();
        std::fs::write(&format, "2\n").unwrap();
        adopt_cache_format(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&format).unwrap(),
            format!("{CACHE_FORMAT}\n"),
            "an older one is taken over"
        );

        std::fs::write(&format, format!("{}\n", CACHE_FORMAT + 1)).unwrap();
        let err = adopt_cache_format(dir.path()).unwrap_err().to_string();
        assert!(err.contains("newer process server") && err.contains(&format.display().to_string()), "{err}");
        std::fs::write(&format, "three").unwrap();
        let err = adopt_cache_format(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a format number"), "{err}");
    }

    #[test]
    fn a_delta_sets_its_slot_to_its_result() {
        let mut head = Head::default();
        head.adopt(&[DiskInfo { id: "sda".into(), size: 2 << 20 }], 1 << 20);
        let hash = ChunkHash::of(b"x");
        let d = siterecovery_wire::ChunkDelta {
            seq: 1,
            disk: "sda".into(),
            index: 1,
            len: 1 << 20,
            base: None,
            hash: hash.to_hex(),
            ranges: vec![[0, 1]],
            encoding: siterecovery_wire::Encoding::Raw,
        };
        let mut latest = None;
        apply(&mut head, &mut latest, 1 << 20, &Message::Delta(d, Bytes::from_static(b"x")));
        assert_eq!(head.disks[0].slots, vec![Slot::Missing, Slot::Data(hash)]);
    }
}
