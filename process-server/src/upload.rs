//! The uploader of one server: reads its journal in order, uploads chunks and, for deltas,
//! patches (compressed and encrypted by the store; storage format 2), writes a manifest at
//! every point marker, then records a checkpoint and frees the journal. Failures are retried with backoff for as long as it
//! takes: the data stays in the cache meanwhile, and nothing acknowledged is dropped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use siterecovery_store::{
    ChunkHash, DiskManifest, FORMAT_VERSION, Manifest, PackedAt, PatchBytes, PatchData, StoreError,
};
use siterecovery_wire::{ChunkDelta, Encoding, Message, Slot};

use crate::chains::{Chains, Places, place_in_manifest};
use crate::metrics::Metrics;
use crate::recent::RecentChunks;
use crate::session::{decode, patched};
use crate::state::{CacheBudget, Checkpoint, ServerState, apply};

/// Records per round; a round ends with a checkpoint.
const BATCH_RECORDS: usize = 256;

/// Journal bytes the uploaders of all servers together may hold in memory: a round reads
/// its records only once it holds that many bytes of this budget. Without it every
/// uploader read up to 256 MiB per round, so memory grew with the number of servers
/// that had a backlog (docs/process-servers.md, "Memory").
pub const UPLOAD_BUFFER_BYTES: u64 = 128 * 1024 * 1024;

/// The share of [`UPLOAD_BUFFER_BYTES`] one round asks for: two rounds' worth of uploads
/// in flight (`parallelism` chunks at a time), at least 16 MiB, at most the whole buffer.
pub fn round_bytes(parallelism: usize, chunk_size: u32, buffer: u64) -> u64 {
    (2 * parallelism as u64 * u64::from(chunk_size)).max(16 << 20).min(buffer)
}

/// The journal bytes uploaders hold in memory, shared by all of them (fair: rounds are
/// served in the order they asked).
#[derive(Debug)]
pub struct UploadBuffer {
    bytes: u64,
    permits: Arc<tokio::sync::Semaphore>,
}

impl UploadBuffer {
    /// A buffer of `bytes` (at least 1 MiB).
    pub fn new(bytes: u64) -> Self {
        let bytes = bytes.clamp(1 << 20, u64::from(u32::MAX));
        Self { bytes, permits: Arc::new(tokio::sync::Semaphore::new(bytes as usize)) }
    }

    async fn acquire(&self, n: u64) -> tokio::sync::OwnedSemaphorePermit {
        let n = n.min(self.bytes).min(u64::from(u32::MAX)) as u32;
        self.permits.clone().acquire_many_owned(n).await.expect("the semaphore is never closed")
    }
}

/// Runs the uploader of `state` until the process ends.
pub async fn run(
    state: Arc<ServerState>,
    budget: Arc<CacheBudget>,
    buffer: Arc<UploadBuffer>,
    recent: Arc<RecentChunks>,
    metrics: Arc<Metrics>,
) {
    let mut cp = state.start.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
    let mut known: HashMap<String, HashSet<ChunkHash>> = HashMap::new();
    let mut backoff = Duration::from_millis(200);
    let up = Uploader { state: &state, recent: &recent, metrics: &metrics };
    loop {
        match up.round(&mut cp, &mut known, &budget, &buffer).await {
            Ok(true) => backoff = Duration::from_millis(200),
            Ok(false) => {
                // Nothing to do: wait for the session to journal more.
                let _ = tokio::time::timeout(Duration::from_secs(1), state.kick.notified()).await;
            }
            Err(e) => {
                metrics.upload_errors.inc();
                tracing::warn!(server = %state.server, error = %e, retry_in = ?backoff, "upload failed; retrying (data stays in the cache)");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// What to store for a journal record.
enum Job {
    /// A whole chunk.
    Whole(Whole),
    /// A delta, stored as the patch from its base to its result.
    Patch { delta: ChunkDelta, base: Option<ChunkHash>, hash: ChunkHash, body: Bytes },
}

/// A whole chunk to upload: as an agent sent it, or rebuilt from a delta.
struct Whole {
    disk: String,
    hash: ChunkHash,
    encoding: Encoding,
    body: Bytes,
}

/// What rebuilding the chunk of a delta gave.
enum Rebuilt {
    /// The chunk, checked against the delta's hash.
    Chunk(Bytes),
    /// The base is damaged or missing in the store (why): no retry will help.
    BaseUnusable(String),
}

/// What one uploader works with.
struct Uploader<'a> {
    state: &'a Arc<ServerState>,
    recent: &'a Arc<RecentChunks>,
    metrics: &'a Metrics,
}

impl Uploader<'_> {
    /// One round: returns whether anything was done. The records are walked in journal
    /// order on a copy of the checkpoint, deciding for each chunk or delta what to
    /// upload (a delta goes as a patch while its slot's chain may grow, else whole);
    /// the uploads run in parallel, then the points' manifests in order, then the copy
    /// becomes the checkpoint. A failure leaves the checkpoint as it was, and the round
    /// is done again from the same place (uploads and manifests are idempotent).
    async fn round(
        &self,
        cp: &mut Checkpoint,
        known: &mut HashMap<String, HashSet<ChunkHash>>,
        budget: &CacheBudget,
        buffer: &UploadBuffer,
    ) -> Result<bool, String> {
        let state = self.state;
        let journal = &state.journal;
        let from = cp.position;
        if journal.durable() <= from {
            return Ok(false);
        }
        let store = &state.target.store;
        // Held until the round's uploads are done: what was read stays in memory until then.
        // A round may read one record past its share (the last one it starts).
        let want = round_bytes(store.options().parallelism, state.chunk_size, buffer.bytes);
        let _held = buffer.acquire(want).await;
        let began = std::time::Instant::now();
        let batch =
            tokio::task::block_in_place(|| journal.read_from(from, BATCH_RECORDS, want)).map_err(|e| e.to_string())?;
        let Some((_, end)) = batch.last() else { return Ok(false) };
        let end = *end;
        let messages: Vec<Message> =
            batch.iter().map(|(f, _)| Message::from_frame(f)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;

        for m in &messages {
            let disk = match m {
                Message::Chunk(c, _) => &c.disk,
                Message::Delta(d, _) => &d.disk,
                _ => continue,
            };
            if !known.contains_key(disk) {
                let set = if cp.trust_store {
                    store.stored_chunks(&state.server, disk).await.map_err(|e| e.to_string())?
                } else {
                    Default::default()
                };
                known.insert(disk.clone(), set);
            }
        }
        let mut bases = self.bases_to_download(&messages, cp, known);
        self.download_bases(&mut bases);
        let mut work = cp.clone();
        let mut jobs = Vec::new();
        let mut rebuilt_bytes = 0u64;
        // Where the walk's time goes (the round's debug line): rebuilds, and uploads of
        // rebuilt chunks made before the walk ends.
        let (mut rebuilds, mut rebuilding, mut waves) = (0usize, Duration::ZERO, Duration::ZERO);
        // Whole chunks queued this round: each goes up once.
        let mut queued: HashSet<(String, ChunkHash)> = HashSet::new();
        let mut manifests = Vec::new();
        // Where this round's patches went: filled into its manifests once uploaded.
        let mut places = Places::new();
        for m in &messages {
            match m {
                Message::Chunk(c, body) => {
                    if let Some(hash) = c.hash.as_deref().and_then(ChunkHash::from_hex)
                        && !stored(known, &queued, &c.disk, hash)
                    {
                        queued.insert((c.disk.clone(), hash));
                        let (disk, encoding, body) = (c.disk.clone(), c.encoding, body.clone());
                        jobs.push(Job::Whole(Whole { disk, hash, encoding, body }));
                    }
                    work.chains.clear(&c.disk, c.index);
                }
                Message::Delta(d, body) => {
                    let hash = ChunkHash::from_hex(&d.hash).expect("validated before journaling");
                    let base = d.base.as_deref().and_then(ChunkHash::from_hex);
                    if stored(known, &queued, &d.disk, hash) {
                        // The result is stored whole already (e.g. a change undone).
                        work.chains.clear(&d.disk, d.index);
                    } else if work.chains.may_grow(&d.disk, d.index, base.as_ref(), d.covered(), u64::from(d.len)) {
                        work.chains.push(&d.disk, d.index, base, hash, d.covered());
                        jobs.push(Job::Patch { delta: d.clone(), base, hash, body: body.clone() });
                    } else {
                        let t = std::time::Instant::now();
                        let rebuilt = self.whole_of(&mut work, d, base, body, &mut jobs, known, &mut places).await?;
                        (rebuilds, rebuilding) = (rebuilds + 1, rebuilding + t.elapsed());
                        bases.done += 1;
                        self.download_bases(&mut bases);
                        match rebuilt {
                            Rebuilt::Chunk(plain) => {
                                rebuilt_bytes += plain.len() as u64;
                                queued.insert((d.disk.clone(), hash));
                                let disk = d.disk.clone();
                                jobs.push(Job::Whole(Whole { disk, hash, encoding: Encoding::Raw, body: plain }));
                                work.chains.clear(&d.disk, d.index);
                            }
                            // Waiting would stall this server's replication for good over
                            // one chunk that cannot be restored anyway: the patch goes on
                            // the chain past its bound, and a restore names what is broken.
                            Rebuilt::BaseUnusable(why) => {
                                tracing::error!(server = %state.server, disk = %d.disk, index = d.index, %why, "storing a change as a patch past its chain's bound: its base cannot be read from the store");
                                work.chains.push(&d.disk, d.index, base, hash, d.covered());
                                jobs.push(Job::Patch { delta: d.clone(), base, hash, body: body.clone() });
                            }
                        }
                    }
                }
                Message::Point(p) => match manifest_of(&work, p, store.active_key_id()) {
                    Ok(manifest) => manifests.push((p, manifest)),
                    // Sessions refuse such markers; one in the journal is a bug, not a reason to stall.
                    Err(why) => tracing::error!(server = %state.server, point = %p.id, %why, "recovery point skipped"),
                },
                _ => {}
            }
            apply(&mut work.head, &mut work.latest_point, cp.chunk_size, m);
            if let Message::Layout(_) = m {
                work.chains.retain_in(&work.head);
            }
            // Chunks rebuilt from deltas are memory beyond the journal's share: upload
            // them once they make one wave of parallel uploads.
            let wave = store.options().parallelism as u64 * u64::from(state.chunk_size);
            if rebuilt_bytes >= wave {
                let t = std::time::Instant::now();
                self.upload(std::mem::take(&mut jobs), known, &mut work.chains, &mut places).await?;
                rebuilt_bytes = 0;
                waves += t.elapsed();
            }
        }
        let (started, read) = (std::time::Instant::now(), messages.len());
        let planned = began.elapsed();
        self.upload(jobs, known, &mut work.chains, &mut places).await?;
        let uploaded = started.elapsed();

        let points = manifests.len();
        for (p, mut manifest) in manifests {
            place_in_manifest(&mut manifest, &places);
            match store.put_manifest(&state.server, &manifest).await {
                Ok(n) => {
                    *state.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some((p.id.clone(), p.time, p.kind));
                    state.progress.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
                    state.progress.points_written.fetch_add(1, Ordering::Relaxed);
                    self.metrics.points_written.inc();
                    tracing::info!(server = %state.server, point = %p.id, kind = %p.kind, "recovery point written");
                }
                // Written before a crash, after which the marker was replayed.
                Err(StoreError::PointExists { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        work.position = end;
        let manifested = started.elapsed();
        let c = work.clone();
        let dir = state.dir.clone();
        tokio::task::spawn_blocking(move || c.store(&dir))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        tracing::debug!(server = %state.server, records = read, points, rebuilds, ?rebuilding, ?waves, ?planned, ?uploaded, ?manifested, total = ?started.elapsed(), "upload round");
        *state.uploaded.lock().unwrap_or_else(|p| p.into_inner()) = work.chains.clone();
        *cp = work;
        tokio::task::block_in_place(|| journal.release(end)).map_err(|e| e.to_string())?;
        let freed = batch.iter().map(|(f, _)| f.encoded_len() as u64 + 4).sum::<u64>();
        let _ = state.backlog.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(freed)));
        budget.release(freed);
        Ok(true)
    }

    /// The bases this round will download from the store, in its order: of the deltas it
    /// will store whole (their chains full), those whose bases it does not make itself.
    /// The decisions are the round's own (below) for each slot's first record of the
    /// round; a slot's later records depend on what the round does with its first.
    fn bases_to_download(
        &self,
        messages: &[Message],
        cp: &Checkpoint,
        known: &HashMap<String, HashSet<ChunkHash>>,
    ) -> Bases {
        let (mut seen, mut queued) = (HashSet::new(), HashSet::new());
        let mut bases = Bases::default();
        for m in messages {
            let d = match m {
                Message::Delta(d, _) => d,
                Message::Chunk(c, _) => {
                    seen.insert((c.disk.as_str(), c.index));
                    if let Some(hash) = c.hash.as_deref().and_then(ChunkHash::from_hex) {
                        queued.insert((c.disk.clone(), hash));
                    }
                    continue;
                }
                Message::Layout(_) => break,
                _ => continue,
            };
            if !seen.insert((d.disk.as_str(), d.index)) {
                continue;
            }
            let Some(base) = d.base.as_deref().and_then(ChunkHash::from_hex) else { continue };
            let hash = ChunkHash::from_hex(&d.hash).expect("validated before journaling");
            if stored(known, &queued, &d.disk, hash)
                || cp.chains.may_grow(&d.disk, d.index, Some(&base), d.covered(), u64::from(d.len))
            {
                continue;
            }
            bases.queue.push_back((d.disk.clone(), d.index, base, d.len as usize));
        }
        bases
    }

    /// Keeps [`BASES_AHEAD`] downloads of `bases` ahead of the round's rebuilds, so it
    /// finds them in the recent chunks rather than downloading one after the other (not
    /// more: Azurite, on one thread, failed many more at once at the connection).
    fn download_bases(&self, bases: &mut Bases) {
        while bases.started < bases.done + BASES_AHEAD
            && let Some((disk, index, base, len)) = bases.queue.pop_front()
        {
            // Not when it is in memory or being downloaded already.
            if crate::ahead::download(self.state, self.recent, &disk, index, base, len) {
                bases.started += 1;
            }
        }
    }

    /// The whole chunk a delta makes, for a slot whose chain may not grow: its base from
    /// the recent chunks, or else from the store as `work` says it is stored there (after
    /// uploading the jobs queued so far, which that may name). `Err` is worth retrying;
    /// a base the store holds damaged or not at all is [`Rebuilt::BaseUnusable`].
    #[allow(clippy::too_many_arguments)]
    async fn whole_of(
        &self,
        work: &mut Checkpoint,
        d: &ChunkDelta,
        base: Option<ChunkHash>,
        body: &Bytes,
        jobs: &mut Vec<Job>,
        known: &mut HashMap<String, HashSet<ChunkHash>>,
        places: &mut Places,
    ) -> Result<Rebuilt, String> {
        let state = self.state;
        let len = d.len as usize;
        let base_plain = match base {
            None => Bytes::from(vec![0u8; len]),
            Some(h) => match self.recent.get(&state.server, &d.disk, &h) {
                Some(b) => b,
                // Being downloaded (`download_bases`, or a session's read-ahead).
                None if self.recent.wait_fetch(&state.server, &d.disk, &h).await.is_none()
                    && let Some(b) = self.recent.get(&state.server, &d.disk, &h) =>
                {
                    b
                }
                None => {
                    self.upload(std::mem::take(jobs), known, &mut work.chains, places).await?;
                    let entry = work.chains.entry(&d.disk, d.index, Slot::Data(h)).expect("a data slot");
                    self.recent.downloads.inc();
                    match state.target.store.fetch_chunk(&state.server, &d.disk, &entry, len).await {
                        Ok((plain, _)) => Bytes::from(plain),
                        Err(e) if e.is_retryable() => {
                            return Err(format!("base of chunk {} of disk {}: {e}", d.index, d.disk));
                        }
                        Err(e) => return Ok(Rebuilt::BaseUnusable(e.to_string())),
                    }
                }
            },
        };
        let (ranges, covered, encoding, body) = (d.ranges.clone(), d.covered() as usize, d.encoding, body.clone());
        let plain = tokio::task::spawn_blocking(move || -> Result<Bytes, String> {
            let bytes = decode(&body, encoding, covered)?;
            Ok(Bytes::from(patched(&base_plain, &ranges, &bytes)))
        })
        .await
        .map_err(|e| e.to_string())??;
        let hash = ChunkHash::from_hex(&d.hash).expect("validated before journaling");
        let p = plain.clone();
        if tokio::task::spawn_blocking(move || ChunkHash::of(&p)).await.map_err(|e| e.to_string())? != hash {
            return Ok(Rebuilt::BaseUnusable("the delta does not make its chunk on the stored base".into()));
        }
        self.recent.insert(&state.server, &d.disk, hash, plain.clone());
        Ok(Rebuilt::Chunk(plain))
    }

    /// Uploads `jobs`, `parallelism` uploads at a time: each whole chunk alone, the patches
    /// of each disk together in one pack (format 3; one request instead of one per patch).
    /// Whole chunks become known as stored; where each patch went is recorded in `chains`
    /// and added to `places`.
    async fn upload(
        &self,
        jobs: Vec<Job>,
        known: &mut HashMap<String, HashSet<ChunkHash>>,
        chains: &mut Chains,
        places: &mut Places,
    ) -> Result<(), String> {
        let (store, server) = (&self.state.target.store, &self.state.server);
        let mut uploads = Vec::new();
        let mut packs: HashMap<String, Vec<PackedPatch>> = HashMap::new();
        for job in jobs {
            match job {
                Job::Whole(whole) => uploads.push(Upload::Whole(whole)),
                Job::Patch { delta, base, hash, body } => {
                    packs.entry(delta.disk.clone()).or_default().push((delta, base, hash, body));
                }
            }
        }
        uploads.extend(packs.into_iter().map(|(disk, patches)| Upload::Pack { disk, patches }));
        // Largest first: the round ends with its slowest upload, and a large one started
        // last would leave the other slots idle while it runs alone.
        uploads.sort_by_key(|u| std::cmp::Reverse(u.bytes()));
        let done: Vec<Uploaded> = futures::stream::iter(uploads)
            .map(|upload| async move {
                match upload {
                    // The session checked the body decodes to the chunk: a zstd frame is
                    // sealed as it came, without decompressing and compressing it again.
                    Upload::Whole(Whole { disk, hash, encoding, body }) => {
                        let n = match encoding {
                            Encoding::Raw => store.put_chunk(server, &disk, &hash, body).await,
                            Encoding::Zstd => store.put_compressed_chunk(server, &disk, &hash, body).await,
                        }
                        .map_err(|e| e.to_string())?;
                        Ok::<_, String>(Uploaded::Whole { disk, hash, n })
                    }
                    Upload::Pack { disk, patches } => {
                        let named: Vec<(ChunkHash, Option<ChunkHash>)> =
                            patches.iter().map(|(_, base, hash, _)| (*hash, *base)).collect();
                        // The session checked each body decodes to its ranges: a zstd
                        // frame is stored as it came.
                        let data = patches
                            .into_iter()
                            .map(|(delta, base, hash, body)| {
                                let data = match delta.encoding {
                                    Encoding::Raw => PatchBytes::Plain(body),
                                    Encoding::Zstd => PatchBytes::Zstd(body),
                                };
                                PatchData { result: hash, base, ranges: delta.ranges, data }
                            })
                            .collect();
                        let (at, n) = store.put_patch_pack(server, &disk, data).await.map_err(|e| e.to_string())?;
                        Ok(Uploaded::Pack { disk, named, at, n })
                    }
                }
            })
            .buffer_unordered(store.options().parallelism)
            .try_collect()
            .await?;
        let mut new = Places::new();
        for d in done {
            let n = match d {
                Uploaded::Whole { disk, hash, n } => {
                    known.entry(disk).or_default().insert(hash);
                    self.metrics.chunks_uploaded.inc();
                    n
                }
                Uploaded::Pack { disk, named, at, n } => {
                    self.metrics.patches_uploaded.inc_by(named.len() as u64);
                    self.metrics.packs_uploaded.inc();
                    new.extend(named.into_iter().zip(at).map(|((hash, base), at)| ((disk.clone(), hash, base), at)));
                    n
                }
            };
            self.state.progress.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
            self.metrics.bytes_uploaded.inc_by(n);
        }
        chains.place(&new);
        places.extend(new);
        Ok(())
    }
}

/// Whether chunk `h` of `disk` is stored whole already, or queued whole in this round.
fn stored(
    known: &HashMap<String, HashSet<ChunkHash>>,
    queued: &HashSet<(String, ChunkHash)>,
    disk: &str,
    h: ChunkHash,
) -> bool {
    known.get(disk).is_some_and(|k| k.contains(&h)) || queued.contains(&(disk.to_string(), h))
}

/// Base downloads the round's rebuilds start ahead of themselves.
const BASES_AHEAD: usize = 3;

/// The bases a round downloads ahead of its rebuilds: those still to start, how many
/// started, how many rebuilds are done.
#[derive(Default)]
struct Bases {
    queue: std::collections::VecDeque<(String, u64, ChunkHash, usize)>,
    started: usize,
    done: usize,
}

/// One upload of a round: a whole chunk, or the patches of one disk in a pack.
enum Upload {
    Whole(Whole),
    Pack { disk: String, patches: Vec<PackedPatch> },
}

impl Upload {
    /// The bytes it sends, about (before sealing).
    fn bytes(&self) -> usize {
        match self {
            Upload::Whole(w) => w.body.len(),
            Upload::Pack { patches, .. } => patches.iter().map(|(.., body)| body.len()).sum(),
        }
    }
}

/// A delta to store as a patch in a pack: the delta, its base, its result, its body.
type PackedPatch = (ChunkDelta, Option<ChunkHash>, ChunkHash, Bytes);

/// What one upload stored.
enum Uploaded {
    Whole { disk: String, hash: ChunkHash, n: u64 },
    Pack { disk: String, named: Vec<(ChunkHash, Option<ChunkHash>)>, at: Vec<PackedAt>, n: u64 },
}

/// The manifest of a point marker: the uploaded head at that place in the journal, each
/// slot a whole chunk, zeros, or its chain of patches.
pub(crate) fn manifest_of(
    cp: &Checkpoint,
    p: &siterecovery_wire::PointMarker,
    key_id: &str,
) -> Result<Manifest, String> {
    let mut disks = Vec::with_capacity(cp.head.disks.len());
    for d in &cp.head.disks {
        let mut chunks = Vec::with_capacity(d.slots.len());
        for (i, s) in d.slots.iter().enumerate() {
            chunks.push(cp.chains.entry(&d.id, i as u64, *s).ok_or_else(|| {
                format!(
                    "point {} names disk {} whose chunk {i} was never received; the agent must finish the initial copy first",
                    p.id, d.id
                )
            })?);
        }
        disks.push(DiskManifest { id: d.id.clone(), size: d.size, chunks });
    }
    Ok(Manifest {
        format: FORMAT_VERSION,
        id: p.id.clone(),
        kind: p.kind,
        group: p.group.clone(),
        members: p.members.clone(),
        time: p.time,
        key_id: key_id.to_string(),
        chunk_size: cp.chunk_size,
        disks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_asks_for_two_rounds_of_uploads_within_the_buffer() {
        let mib = 1u64 << 20;
        assert_eq!(round_bytes(8, 4 << 20, UPLOAD_BUFFER_BYTES), 64 * mib, "defaults: two rounds fit");
        assert_eq!(round_bytes(1, 4 << 20, UPLOAD_BUFFER_BYTES), 16 * mib, "at least 16 MiB");
        assert_eq!(round_bytes(8, 64 << 20, UPLOAD_BUFFER_BYTES), UPLOAD_BUFFER_BYTES, "at most the buffer");
    }

    #[tokio::test]
    async fn rounds_wait_for_the_buffer_and_get_it_in_turn() {
        let buffer = UploadBuffer::new(64 << 20);
        let first = buffer.acquire(48 << 20).await;
        let second = tokio::time::timeout(Duration::from_millis(50), buffer.acquire(32 << 20)).await;
        assert!(second.is_err(), "a round waits while the buffer is held");
        drop(first);
        let _second = buffer.acquire(32 << 20).await;
        // Asking for more than the buffer is asking for all of it: it waits for the rest.
        let whole = tokio::time::timeout(Duration::from_millis(50), buffer.acquire(1 << 40)).await;
        assert!(whole.is_err(), "the second round still holds half");
    }
}
