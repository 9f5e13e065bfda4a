//! What a session reads ahead of the frame it is handling: frames up to a byte budget
//! (a whole chunk or two, or many small deltas), and for each queued delta whose base is
//! not in memory, that base from the store. Deltas are handled one after the other, in
//! order; without this every base that is not among the recent chunks was a store round
//! trip in series (most of an incremental's time on the process server once chunks are
//! many times the recent-chunk budget).
//!
//! Each queued delta is also decoded and, when the block values of the base it names are
//! known, checked from them, [`CHECKS_AHEAD`] at a time: an incremental is hundreds of
//! small deltas, and checking them one after the other, each in a blocking task the
//! session waited for, made the process server the slowest step of the replication. The
//! session still checks in order that the base a delta names is the chunk it holds.

use std::sync::Arc;

use blake3::hazmat::ChainingValue;
use bytes::Bytes;
use siterecovery_store::{BackendError, ChunkHash, ServerRef, StoreError};
use siterecovery_wire::{ChunkDelta, Frame, Message, WireError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::recent::RecentChunks;
use crate::state::ServerState;

/// Bases of queued deltas downloaded at once, per session. They go into the recent
/// chunks; a queued delta holds its slot until it is handled, so at most this many
/// bases wait there for their delta.
pub const BASES_AHEAD: usize = 8;

/// Deltas decoded and checked at once, per session (each in a blocking task).
pub const CHECKS_AHEAD: usize = 4;

/// A queued delta's body decoded and, when the block values of its base were known,
/// checked: the hash it produces and its blocks' new values (`None`: not checked).
pub type Checked = Result<(Bytes, Option<(ChunkHash, Arc<[ChainingValue]>)>), String>;

/// The read-ahead of one session.
#[derive(Debug)]
pub struct Ahead {
    bytes: Arc<Semaphore>,
    budget: u32,
    slots: Arc<Semaphore>,
    checks: Arc<Semaphore>,
}

/// A frame read ahead; what it holds of the budget is given back when it is dropped.
#[derive(Debug)]
pub struct Queued {
    /// The frame.
    pub frame: Frame,
    /// Its message, parsed once here for the read-ahead and the session.
    pub message: Result<Message, WireError>,
    /// For a delta, its decoding and check (see [`Checked`]).
    pub checked: Option<JoinHandle<Checked>>,
    _bytes: OwnedSemaphorePermit,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Ahead {
    /// Frames of up to `budget` bytes together, with what deltas decode to, may be queued
    /// or being handled (each frame counts at most the whole budget, so a large one is
    /// never refused).
    pub fn new(budget: u32) -> Self {
        let budget = budget.max(1);
        Self {
            bytes: Arc::new(Semaphore::new(budget as usize)),
            budget,
            slots: Arc::new(Semaphore::new(BASES_AHEAD)),
            checks: Arc::new(Semaphore::new(CHECKS_AHEAD)),
        }
    }

    /// Waits until `frame` fits in the budget; for a delta, starts its check and, when its
    /// base is neither in `recent` nor being downloaded, the download of that base.
    pub async fn admit(&self, state: &Arc<ServerState>, recent: &Arc<RecentChunks>, frame: Frame) -> Queued {
        let message = Message::from_frame(&frame);
        // A delta is held decoded too, once checked.
        let decoded = match &message {
            Ok(Message::Delta(d, _)) => d.covered(),
            _ => 0,
        };
        let cost = (frame.encoded_len() as u64 + decoded).clamp(1, u64::from(self.budget)) as u32;
        let bytes = self.bytes.clone().acquire_many_owned(cost).await.expect("the semaphore is never closed");
        let (slot, checked) = match &message {
            Ok(Message::Delta(d, body)) => {
                (self.fetch_base(state, recent, d).await, Some(self.check(&state.server, recent, d, body).await))
            }
            _ => (None, None),
        };
        Queued { frame, message, checked, _bytes: bytes, _slot: slot }
    }

    /// Decodes delta `d` and checks it from the block values of the base it names, if
    /// they are known (a base of zeros: computed from its length), in a blocking task,
    /// once one of the [`CHECKS_AHEAD`] is free.
    async fn check(
        &self,
        server: &ServerRef,
        recent: &Arc<RecentChunks>,
        d: &ChunkDelta,
        body: &Bytes,
    ) -> JoinHandle<Checked> {
        let known = d.base.as_deref().map(|h| ChunkHash::from_hex(h).and_then(|h| recent.cvs(server, &d.disk, &h)));
        let permit = self.checks.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (recent, ranges, len) = (recent.clone(), d.ranges.clone(), u64::from(d.len));
        let (covered, encoding, body) = (d.covered() as usize, d.encoding, body.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let bytes = crate::session::decode(&body, encoding, covered)?;
            let before = known.unwrap_or_else(|| recent.zero_cvs(len));
            let checked = before.and_then(|before| crate::session::check_by_blocks(&before, len, &ranges, &bytes));
            Ok((bytes, checked))
        })
    }

    /// For a delta whose base must come from the store: waits for a slot (one of the
    /// [`BASES_AHEAD`] queued deltas before it is handled), then starts the download.
    async fn fetch_base(
        &self,
        state: &Arc<ServerState>,
        recent: &Arc<RecentChunks>,
        d: &ChunkDelta,
    ) -> Option<OwnedSemaphorePermit> {
        let base = ChunkHash::from_hex(d.base.as_deref()?)?;
        if !recent.needs_fetch(&state.server, &d.disk, &base) {
            return None;
        }
        // The slot first: a download announced but waiting for a slot would hold up the
        // session, which waits for announced downloads and frees slots.
        let slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        download(state, recent, &d.disk, d.index, base, d.len as usize).then_some(slot)
    }
}

/// Starts downloading chunk `base` of slot `index` of `disk` (`len` bytes) from the store
/// into `recent`, where the uploader has it (whole, or as its chain), unless it is in
/// `recent` or being downloaded already; returns whether it started. Those who need it wait
/// with `RecentChunks::wait_fetch`. Not uploaded yet is a miss here, which they handle as
/// without the download (they wait for the uploader).
pub(crate) fn download(
    state: &Arc<ServerState>,
    recent: &Arc<RecentChunks>,
    disk: &str,
    index: u64,
    base: ChunkHash,
    len: usize,
) -> bool {
    let Some(fetching) = recent.begin_fetch(&state.server, disk, base) else { return false };
    recent.downloads.inc();
    let (state, recent, disk) = (state.clone(), recent.clone(), disk.to_string());
    tokio::spawn(async move {
        let stored = state.stored_as(&disk, index, base);
        let get = state.target.store.fetch_chunk(&state.server, &disk, &stored, len);
        let timeout = crate::session::BASE_FETCH_TIMEOUT;
        match tokio::time::timeout(timeout, get).await {
            Ok(Ok((plain, _))) => recent.insert(&state.server, &disk, base, Bytes::from(plain)),
            Ok(Err(StoreError::Backend(BackendError::NotFound { .. }))) => {}
            Ok(Err(e)) => fetching.fail(e.to_string()),
            Err(_) => fetching.fail(format!("the store did not answer within {timeout:?}")),
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use siterecovery_store::tree::{self, pseudo_random as bytes};
    use siterecovery_wire::Encoding;

    use super::*;
    use crate::session::patched;

    const B: usize = tree::BLOCK;

    /// A delta of chunk 0 of disk `sda` (`len` bytes) from `base` (`None`: zeros).
    fn delta(base: Option<&[u8]>, len: usize, ranges: Vec<[u32; 2]>, changed: &[u8]) -> ChunkDelta {
        let before = base.map_or_else(|| vec![0u8; len], <[u8]>::to_vec);
        ChunkDelta {
            seq: 1,
            disk: "sda".into(),
            index: 0,
            len: len as u32,
            base: base.map(|b| ChunkHash::of(b).to_hex()),
            hash: ChunkHash::of(&patched(&before, &ranges, changed)).to_hex(),
            ranges,
            encoding: Encoding::Zstd,
        }
    }

    #[tokio::test]
    async fn a_delta_read_ahead_is_checked_from_the_values_of_the_base_it_names_when_they_are_known() {
        let recent = Arc::new(RecentChunks::new(1 << 20, 1 << 20));
        let server = ServerRef::new("ns", "s").unwrap();
        let ahead = Ahead::new(1 << 20);
        let len = 8 * B;
        let base = bytes(len, 1);
        let changed = bytes(2 * B, 2);
        let body = Bytes::from(zstd::bulk::compress(&changed, 1).unwrap());
        let ranges = vec![[B as u32, B as u32], [5 * B as u32, B as u32]];
        let check = |d: ChunkDelta, body: Bytes| {
            let (ahead, server, recent) = (&ahead, &server, &recent);
            async move { ahead.check(server, recent, &d, &body).await.await.unwrap() }
        };

        // Its base's values are not known yet: decoded, not checked (the session does it).
        let d = delta(Some(&base), len, ranges.clone(), &changed);
        let (decoded, checked) = check(d.clone(), body.clone()).await.unwrap();
        assert_eq!(&decoded[..], &changed[..]);
        assert!(checked.is_none());

        // Known: checked, giving the hash the delta claims and the result's values.
        recent.insert_cvs(&server, "sda", ChunkHash::of(&base), tree::block_cvs(&base).into());
        let (_, checked) = check(d.clone(), body.clone()).await.unwrap();
        let (hash, cvs) = checked.expect("checked from the base's values");
        let result = patched(&base, &ranges, &changed);
        assert_eq!(hash.to_hex(), d.hash);
        assert_eq!(&*cvs, &tree::block_cvs(&result)[..]);

        // A base of zeros is always known.
        let z = delta(None, len, ranges.clone(), &changed);
        let (_, checked) = check(z.clone(), body.clone()).await.unwrap();
        assert_eq!(checked.expect("zeros").0.to_hex(), z.hash);

        // A body that does not decode is an error, named.
        let err = check(d, Bytes::from_static(b"not zstd")).await.unwrap_err();
        assert!(err.contains("zstd"), "{err}");
    }
}
