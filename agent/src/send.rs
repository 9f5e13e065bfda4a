//! What a session sends: comparison passes that read chunks and send those that differ
//! from what the process server holds (whole or as deltas), and the pre-copy that repeats
//! them until a look finds nothing written (docs/replication-protocol.md "A session",
//! "Recovery points").

use futures::StreamExt as _;
use siterecovery_store::ChunkHash;
use siterecovery_wire::{ChunkData, ChunkDelta, Encoding, Message, Slot};
use tokio::io::AsyncWrite;

use crate::changes::{self, Dirty};
use crate::disk::Disk;
use crate::link::Link;
use crate::pass::{PassStatus, pass_bytes};
use crate::read::{self, Body, Found, Plan, changed_ranges};
use crate::tree::Blocks;
use crate::{Agent, SessionError, err};

/// One session's connection and disks, and what it believes the process server holds:
/// what every step of a session (passes, points, group rounds) works on.
pub(crate) struct Wire<W> {
    /// The sending half of the connection.
    pub(crate) link: Link<W>,
    /// The protected disks, in configuration order.
    pub(crate) disks: Vec<Disk>,
    /// Their sizes, as the hello announced them.
    pub(crate) sizes: Vec<u64>,
    /// The process server's chunk size (from the welcome).
    pub(crate) chunk_size: u32,
    /// Per disk and chunk, what was sent: the welcome's head, then every chunk sent since.
    pub(crate) sent: Vec<Vec<Slot>>,
}

impl Agent {
    /// Pre-copy: sends what changed until a look finds nothing written since the previous
    /// one, and returns that look's time (everything sent reflects that instant); `None`
    /// after `maxPasses` passes without such a look, or once `stop` holds.
    pub(crate) async fn precopy<W: AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<W>,
        stop: &(impl Fn() -> bool + Sync),
    ) -> Result<Option<jiff::Timestamp>, SessionError> {
        for _ in 0..self.config.max_passes.max(1) {
            if stop() {
                return Ok(None);
            }
            let now_sizes: Vec<u64> = wire.disks.iter().map(Disk::size).collect::<Result<_, _>>().map_err(err)?;
            if now_sizes != wire.sizes {
                let changed: Vec<String> = wire
                    .disks
                    .iter()
                    .zip(wire.sizes.iter().zip(&now_sizes))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(d, (a, b))| format!("disk {} changed size from {a} to {b} bytes", d.id))
                    .collect();
                self.resized = Some(changed.join("; "));
                self.believed = Some(std::mem::take(&mut wire.sent));
                wire.link.drain().await.map_err(err)?;
                return Err(err("a disk changed size; reconnecting to send the new layout"));
            }
            let at = jiff::Timestamp::now();
            let dirty = self.tracker.take(&wire.disks, wire.chunk_size).map_err(err)?;
            if dirty.is_quiet() && self.tracker.proves_quiet() {
                return Ok(Some(at));
            }
            self.send_pass(wire, &dirty, false).await?;
        }
        Ok(None)
    }

    /// Starts reporting a comparison pass over the chunks `which` names.
    pub(crate) fn begin_pass(&self, reason: &str, message: String, which: &Dirty, sizes: &[u64], chunk_size: u32) {
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

    /// Marks the current comparison pass complete.
    pub(crate) fn end_pass(&self) {
        self.update(|s| {
            if let Some(p) = &mut s.pass {
                p.completed = Some(jiff::Timestamp::now());
            }
        });
    }

    /// Reads the chunks `which` names, and sends those that differ from `sent`; `counted`
    /// adds them to the current [`PassStatus`]. A chunk whose dirty blocks are known and
    /// whose blocks as the process server holds it are cached is read by those blocks.
    pub(crate) async fn send_pass<W: AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<W>,
        which: &Dirty,
        counted: bool,
    ) -> Result<(), SessionError> {
        static WHOLE: changes::Blocks = changes::Blocks::Whole;
        let level = self.level;
        let chunk_size = wire.chunk_size;
        self.cache.use_chunk_size(chunk_size);
        let read_budget = 2 * chunk_size;
        let budget = std::sync::Arc::new(tokio::sync::Semaphore::new(read_budget as usize));
        for (d, disk) in wire.disks.iter().enumerate() {
            let size = wire.sizes[d];
            let count = size.div_ceil(u64::from(chunk_size));
            let len_of = |index: u64| (size - index * u64::from(chunk_size)).min(u64::from(chunk_size));
            let dirty: Vec<(u64, &changes::Blocks)> = match which {
                Dirty::All => (0..count).map(|i| (i, &WHOLE)).collect(),
                Dirty::Chunks(sets) => {
                    sets.get(d).into_iter().flatten().map(|(&i, b)| (i, b)).filter(|&(i, _)| i < count).collect()
                }
            };
            // Planned a batch at a time: a plan holds a copy of the chunk's cached blocks.
            for batch in dirty.chunks(PLAN_BATCH) {
                let plans: Vec<(u64, Plan, Slot)> = batch
                    .iter()
                    .map(|&(i, blocks)| {
                        let held = wire.sent[d][i as usize];
                        (i, Plan::for_chunk(blocks, len_of(i), || self.cache.blocks_if((d, i), len_of(i), held)), held)
                    })
                    .collect();
                let mut reads = futures::stream::iter(plans)
                    .map(|(index, plan, held)| {
                        let disk = disk.clone();
                        let budget = budget.clone();
                        let cost = plan.bytes(len_of(index)).clamp(1, u64::from(read_budget)) as u32;
                        async move {
                            // Held until the read is sent: what was read and not yet sent stays
                            // within the budget.
                            let permit = budget.acquire_many_owned(cost).await.map_err(err)?;
                            let found = tokio::task::spawn_blocking(move || {
                                read::read(&disk, index, chunk_size, size, plan, level, held)
                            })
                            .await
                            .map_err(err)?
                            .map_err(err)?;
                            Ok::<_, SessionError>((permit, found))
                        }
                    })
                    .buffered(READS_IN_FLIGHT);
                while let Some(r) = reads.next().await {
                    let (_permit, found) = r?;
                    let len = len_of(found.index) as u32;
                    self.send_found(&mut wire.link, &mut wire.sent[d], (d, &disk.id), len, found, counted).await?;
                }
            }
        }
        let cached = self.cache.used() as u64;
        self.update(|s| s.block_cache_bytes = cached);
        Ok(())
    }

    /// Records what a read of a chunk of disk `d` (`len` bytes) found, and sends it unless
    /// `sent` (what the process server holds of that disk) has it already.
    async fn send_found<W: AsyncWrite + Unpin>(
        &mut self,
        link: &mut Link<W>,
        sent: &mut [Slot],
        (d, disk): (usize, &str),
        len: u32,
        found: Found,
        counted: bool,
    ) -> Result<(), SessionError> {
        self.update(|s| {
            s.chunks_compared += 1;
            s.bytes_read += found.bytes_read;
            if matches!(found.body, Body::Changed { .. }) {
                s.chunks_read_partly += 1;
            }
            if let Some(p) = s.pass.as_mut().filter(|_| counted)
                && let Some(b) = p.bytes_compared.get_mut(d)
            {
                *b += u64::from(len);
            }
        });
        let i = found.index as usize;
        let previous = self.cache.insert((d, found.index), u64::from(len), found.slot, found.blocks.clone());
        if sent[i] == found.slot {
            return Ok(());
        }
        let seq = link.next_seq();
        let slot = found.slot;
        let (message, payload) = message(seq, disk, len, sent[i], found, previous, self.level)?;
        if matches!(message, Message::Delta(..)) {
            self.update(|s| s.deltas_sent += 1);
        }
        link.send(seq, &message).await.map_err(err)?;
        sent[i] = slot;
        self.update(|s| {
            s.chunks_sent += 1;
            s.payload_bytes += payload;
            if let Some(p) = s.pass.as_mut().filter(|_| counted) {
                p.bytes_resent += payload;
            }
        });
        Ok(())
    }
}

/// Chunks planned at once (see [`Plan`]): bounds the copies of cached blocks in flight.
const PLAN_BATCH: usize = 64;

/// Reads at once, within a budget of two whole chunks' bytes: two chunks read whole, or
/// up to this many chunks read by their dirty blocks. Each read waits for the device, and
/// a tracked incremental is hundreds of small reads: two at a time left it idle.
const READS_IN_FLIGHT: usize = 16;

/// The message that brings the process server's copy of a chunk, `held`, to what `found`
/// read, and its plaintext payload: a delta when the base is known and at most half the
/// chunk changed, else the whole chunk. `previous` are the chunk's blocks as last read.
fn message(
    seq: u64,
    disk: &str,
    len: u32,
    held: Slot,
    found: Found,
    previous: Option<(Slot, Blocks)>,
    level: i32,
) -> Result<(Message, u64), SessionError> {
    let at_most_half = |ranges: &[[u32; 2]]| ranges.iter().map(|r| u64::from(r[1])).sum::<u64>() * 2 <= u64::from(len);
    let whole = |hash: Option<ChunkHash>, encoding, body: Vec<u8>| {
        let payload = if hash.is_some() { u64::from(len) } else { 0 };
        let hash = hash.map(|h| h.to_hex());
        let chunk = ChunkData { seq, disk: disk.to_owned(), index: found.index, len, hash, encoding };
        (Message::Chunk(chunk, bytes::Bytes::from(body)), payload)
    };
    let delta =
        |base: Option<ChunkHash>, hash: ChunkHash, ranges: Vec<[u32; 2]>, bytes: Vec<u8>, packed: Option<Vec<u8>>| {
            let payload = bytes.len() as u64;
            let (encoding, body) = match packed.or_else(|| read::compress(&bytes, level)) {
                Some(z) => (Encoding::Zstd, bytes::Bytes::from(z)),
                None => (Encoding::Raw, bytes::Bytes::from(bytes)),
            };
            let base = base.map(|b| b.to_hex());
            let delta = ChunkDelta {
                seq,
                disk: disk.to_owned(),
                index: found.index,
                len,
                base,
                hash: hash.to_hex(),
                ranges,
                encoding,
            };
            (Message::Delta(delta, body), payload)
        };
    // What a delta applies to: `Some(None)` for a zero chunk.
    let base = match held {
        Slot::Data(h) => Some(Some(h)),
        Slot::Zero => Some(None),
        Slot::Missing => None,
    };
    let (data, packed) = match found.body {
        Body::Changed { ranges, bytes, packed } => {
            // Read by blocks only against the blocks of what the process server holds, and
            // only when at most half the chunk was dirty.
            return match (found.slot, base) {
                (Slot::Zero, _) => Ok(whole(None, Encoding::Raw, Vec::new())),
                (Slot::Data(h), Some(base)) if at_most_half(&ranges) => Ok(delta(base, h, ranges, bytes, packed)),
                _ => Err(err("a chunk read by its dirty blocks has no base on the process server")),
            };
        }
        Body::Whole { data, packed } => (data, packed),
    };
    let Slot::Data(hash) = found.slot else { return Ok(whole(None, Encoding::Raw, Vec::new())) };
    let ranges = match (base, previous) {
        (Some(Some(old)), Some((Slot::Data(p), before))) if p == old && before.cvs.len() == found.blocks.cvs.len() => {
            Some(changed_ranges(&before.cvs, &found.blocks.cvs, len))
        }
        (Some(None), _) => Some(changed_ranges(&vec![true; found.blocks.zero.len()], &found.blocks.zero, len)),
        _ => None,
    }
    .filter(|r| at_most_half(r));
    Ok(match (ranges, packed) {
        (Some(ranges), _) => {
            let mut bytes = Vec::new();
            for &[off, n] in &ranges {
                bytes.extend_from_slice(&data[off as usize..(off + n) as usize]);
            }
            delta(base.flatten(), hash, ranges, bytes, None)
        }
        (None, Some(z)) => whole(Some(hash), Encoding::Zstd, z),
        (None, None) => whole(Some(hash), Encoding::Raw, data),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::BLOCK;

    const LEN: u32 = 8 * BLOCK as u32;

    fn chunk(seed: u8) -> Vec<u8> {
        (0..LEN as usize).map(|i| (i as u8).wrapping_mul(seed) | 1).collect()
    }

    fn whole(data: Vec<u8>) -> Found {
        let blocks = Blocks::of(&data);
        let slot = blocks.slot(u64::from(LEN), Some(&data)).unwrap();
        Found { index: 3, slot, blocks, bytes_read: u64::from(LEN), body: Body::Whole { data, packed: None } }
    }

    fn ranges(m: &Message) -> Option<(Option<String>, Vec<[u32; 2]>)> {
        match m {
            Message::Delta(d, _) => Some((d.base.clone(), d.ranges.clone())),
            _ => None,
        }
    }

    #[test]
    fn a_chunk_read_whole_goes_as_a_delta_against_the_blocks_last_read() {
        let old = chunk(3);
        let before = whole(old.clone());
        let Slot::Data(old_hash) = before.slot else { panic!("data") };
        let mut new = old.clone();
        new[2 * BLOCK + 7] ^= 1;
        new[3 * BLOCK] ^= 1;
        let (m, payload) =
            message(1, "d", LEN, before.slot, whole(new.clone()), Some((before.slot, before.blocks.clone())), 0)
                .unwrap();
        assert_eq!(ranges(&m), Some((Some(old_hash.to_hex()), vec![[2 * BLOCK as u32, 2 * BLOCK as u32]])));
        assert_eq!(payload, 2 * BLOCK as u64);
        // Without the blocks last read (not cached), or against another base: whole.
        let (m, payload) = message(1, "d", LEN, before.slot, whole(new.clone()), None, 0).unwrap();
        assert!(matches!(m, Message::Chunk(..)) && payload == u64::from(LEN));
        let other = whole(chunk(5));
        let (m, _) = message(1, "d", LEN, other.slot, whole(new), Some((before.slot, before.blocks)), 0).unwrap();
        assert!(matches!(m, Message::Chunk(..)));
        // More than half changed: whole.
        let before = whole(old.clone());
        let mut most = old;
        most[..5 * BLOCK].fill(9);
        let (m, _) = message(1, "d", LEN, before.slot, whole(most), Some((before.slot, before.blocks)), 0).unwrap();
        assert!(matches!(m, Message::Chunk(..)));
    }

    #[test]
    fn a_zero_chunk_is_the_base_of_its_non_zero_blocks_and_a_chunk_read_by_blocks_keeps_its_ranges() {
        let mut data = vec![0u8; LEN as usize];
        data[5 * BLOCK..6 * BLOCK].fill(4);
        let (m, _) = message(1, "d", LEN, Slot::Zero, whole(data.clone()), None, 0).unwrap();
        assert_eq!(ranges(&m), Some((None, vec![[5 * BLOCK as u32, BLOCK as u32]])));

        let found = whole(data);
        let changed = Found {
            body: Body::Changed { ranges: vec![[5 * BLOCK as u32, BLOCK as u32]], bytes: vec![4; BLOCK], packed: None },
            ..found
        };
        let (m, payload) = message(1, "d", LEN, Slot::Zero, changed, None, 0).unwrap();
        assert_eq!(ranges(&m), Some((None, vec![[5 * BLOCK as u32, BLOCK as u32]])));
        assert_eq!(payload, BLOCK as u64);
        // A chunk read by its blocks that became all zeros goes as a zero chunk.
        let zero = Found {
            index: 3,
            slot: Slot::Zero,
            blocks: Blocks::of(&vec![0; LEN as usize]),
            bytes_read: BLOCK as u64,
            body: Body::Changed { ranges: vec![[0, BLOCK as u32]], bytes: vec![0; BLOCK], packed: None },
        };
        let (m, payload) = message(1, "d", LEN, whole(chunk(3)).slot, zero, None, 0).unwrap();
        assert!(matches!(&m, Message::Chunk(c, _) if c.hash.is_none()) && payload == 0);
    }
}
