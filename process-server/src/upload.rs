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
const BATCH_BYTES: u64 = 256 * 1024 * 1024;

/// Runs the uploader of `state` until the process ends.
pub async fn run(state: Arc<ServerState>, budget: Arc<CacheBudget>, metrics: Arc<Metrics>) {
    let mut cp = state.start.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
    let mut known: HashMap<String, HashSet<ChunkHash>> = HashMap::new();
    let mut backoff = Duration::from_millis(200);
    loop {
        match round(&state, &mut cp, &mut known, &budget, &metrics).await {
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
    metrics: &Metrics,
) -> Result<bool, String> {
    let journal = &state.journal;
    let from = cp.position;
    let batch = tokio::task::block_in_place(|| journal.read_from(from, BATCH_RECORDS, BATCH_BYTES))
        .map_err(|e| e.to_string())?;
    let Some((_, end)) = batch.last() else { return Ok(false) };
    let end = *end;
    let messages: Vec<Message> =
        batch.iter().map(|(f, _)| Message::from_frame(f)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;

    // Chunks first (in parallel), then the head in journal order with points on the way.
    let store = &state.target.store;
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
