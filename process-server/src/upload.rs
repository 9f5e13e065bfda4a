//! The uploader of one server: reads its journal in order, uploads chunks (compressed and
//! encrypted by the store) and writes a manifest at every point marker, then records a
//! checkpoint and frees the journal. Failures are retried with backoff for as long as it
//! takes: the data stays in the cache meanwhile, and nothing acknowledged is dropped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use siterecovery_store::{ChunkHash, ChunkRef, DiskManifest, FORMAT_VERSION, Manifest, StoreError};
use siterecovery_wire::{Encoding, Message, Slot};

use crate::metrics::Metrics;
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
pub async fn run(state: Arc<ServerState>, budget: Arc<CacheBudget>, buffer: Arc<UploadBuffer>, metrics: Arc<Metrics>) {
    let mut cp = state.start.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
    let mut known: HashMap<String, HashSet<ChunkHash>> = HashMap::new();
    let mut backoff = Duration::from_millis(200);
    loop {
        match round(&state, &mut cp, &mut known, &budget, &buffer, &metrics).await {
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

/// One round: returns whether anything was done.
async fn round(
    state: &ServerState,
    cp: &mut Checkpoint,
    known: &mut HashMap<String, HashSet<ChunkHash>>,
    budget: &CacheBudget,
    buffer: &UploadBuffer,
    metrics: &Metrics,
) -> Result<bool, String> {
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
    let batch =
        tokio::task::block_in_place(|| journal.read_from(from, BATCH_RECORDS, want)).map_err(|e| e.to_string())?;
    let Some((_, end)) = batch.last() else { return Ok(false) };
    let end = *end;
    let messages: Vec<Message> =
        batch.iter().map(|(f, _)| Message::from_frame(f)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;

    // Chunks first (in parallel), then the head in journal order with points on the way.
    for disk in messages.iter().filter_map(|m| if let Message::Chunk(c, _) = m { Some(&c.disk) } else { None }) {
        if !known.contains_key(disk) {
            let set = if cp.trust_store {
                store.stored_chunks(&state.server, disk).await.map_err(|e| e.to_string())?
            } else {
                Default::default()
            };
            known.insert(disk.clone(), set);
        }
    }
    let mut todo = Vec::new();
    let mut queued: HashSet<(String, ChunkHash)> = HashSet::new();
    for m in &messages {
        if let Message::Chunk(c, body) = m
            && let Some(h) = &c.hash
        {
            let hash = ChunkHash::from_hex(h).expect("validated before journaling");
            if known.get(&c.disk).is_some_and(|k| k.contains(&hash)) || !queued.insert((c.disk.clone(), hash)) {
                continue;
            }
            todo.push((c.disk.clone(), hash, c.encoding, body.clone()));
        }
    }
    let server = &state.server;
    let uploaded: Vec<(String, ChunkHash, u64)> = futures::stream::iter(todo)
        .map(|(disk, hash, encoding, body)| async move {
            // The session checked the body decodes to the chunk: a zstd frame is sealed as
            // it came, without decompressing and compressing it again.
            let n = match encoding {
                Encoding::Raw => store.put_chunk(server, &disk, &hash, body.to_vec()).await,
                Encoding::Zstd => store.put_compressed_chunk(server, &disk, &hash, body).await,
            }
            .map_err(|e| e.to_string())?;
            Ok::<_, String>((disk, hash, n))
        })
        .buffer_unordered(store.options().parallelism)
        .try_collect()
        .await?;
    for (disk, hash, n) in uploaded {
        known.entry(disk).or_default().insert(hash);
        state.progress.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
        metrics.bytes_uploaded.inc_by(n);
        metrics.chunks_uploaded.inc();
    }

    for m in &messages {
        if let Message::Point(p) = m {
            let manifest = match manifest_of(cp, p, store.active_key_id()) {
                Ok(m) => m,
                Err(why) => {
                    // Sessions refuse such markers; one in the journal is a bug, not a reason to stall.
                    tracing::error!(server = %server, point = %p.id, %why, "recovery point skipped");
                    apply(&mut cp.head, &mut cp.latest_point, cp.chunk_size, m);
                    continue;
                }
            };
            match store.put_manifest(server, &manifest).await {
                Ok(n) => {
                    *state.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some((p.id.clone(), p.time, p.kind));
                    state.progress.bytes_uploaded.fetch_add(n, Ordering::Relaxed);
                    state.progress.points_written.fetch_add(1, Ordering::Relaxed);
                    metrics.points_written.inc();
                    tracing::info!(server = %server, point = %p.id, kind = %p.kind, "recovery point written");
                }
                // Written before a crash, after which the marker was replayed.
                Err(StoreError::PointExists { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        apply(&mut cp.head, &mut cp.latest_point, cp.chunk_size, m);
    }
    cp.position = end;
    let c = cp.clone();
    let dir = state.dir.clone();
    tokio::task::spawn_blocking(move || c.store(&dir)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    tokio::task::block_in_place(|| journal.release(end)).map_err(|e| e.to_string())?;
    let freed = batch.iter().map(|(f, _)| f.encoded_len() as u64 + 4).sum::<u64>();
    let _ = state.backlog.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(freed)));
    budget.release(freed);
    Ok(true)
}

/// The manifest of a point marker: the uploaded head at that place in the journal.
pub(crate) fn manifest_of(
    cp: &Checkpoint,
    p: &siterecovery_wire::PointMarker,
    key_id: &str,
) -> Result<Manifest, String> {
    let mut disks = Vec::with_capacity(cp.head.disks.len());
    for d in &cp.head.disks {
        let mut chunks = Vec::with_capacity(d.slots.len());
        for (i, s) in d.slots.iter().enumerate() {
            chunks.push(match s {
                Slot::Zero => ChunkRef::Zero,
                Slot::Data(h) => ChunkRef::Data(*h),
                Slot::Missing => {
                    return Err(format!(
                        "point {} names disk {} whose chunk {i} was never received; the agent must finish the initial copy first",
                        p.id, d.id
                    ));
                }
            });
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
