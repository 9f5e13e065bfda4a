//! Reading a dirty chunk: whole, or, when the tracker named its dirty 64 KiB blocks and
//! the agent holds the CVs of the chunk as the process server has it, only those blocks,
//! the chunk's new hash following from the CVs (docs/replication-protocol.md "A session").

use siterecovery_wire::Slot;

use crate::changes;
use crate::disk::{DELTA_BLOCK, Disk};
use crate::tree::{self, Blocks};

/// How to read a dirty chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Read it whole.
    Whole,
    /// Read only the blocks `which` (sorted); `before` are the chunk's blocks as last
    /// read, which is what the process server holds.
    Blocks {
        /// The dirty blocks.
        which: Vec<u32>,
        /// The chunk's blocks before.
        before: Blocks,
    },
}

impl Plan {
    /// The plan for a chunk of `len` bytes whose dirty blocks are `dirty`: its dirty blocks
    /// alone when they are at most half of it and `cached` gives its blocks as the process
    /// server holds them, else whole.
    pub fn for_chunk(dirty: &changes::Blocks, len: u64, cached: impl FnOnce() -> Option<Blocks>) -> Plan {
        let changes::Blocks::Some(set) = dirty else { return Plan::Whole };
        let count = len.div_ceil(DELTA_BLOCK as u64);
        let bytes: u64 = set.iter().map(|&b| block_len(b, len)).sum();
        if set.is_empty() || set.iter().any(|&b| u64::from(b) >= count) || bytes * 2 > len {
            return Plan::Whole;
        }
        match cached() {
            Some(before) if before.cvs.len() as u64 == count => {
                Plan::Blocks { which: set.iter().copied().collect(), before }
            }
            _ => Plan::Whole,
        }
    }

    /// The bytes this plan reads of a chunk of `len` bytes.
    pub fn bytes(&self, len: u64) -> u64 {
        match self {
            Plan::Whole => len,
            Plan::Blocks { which, .. } => which.iter().map(|&b| block_len(b, len)).sum(),
        }
    }
}

/// What a read found.
#[derive(Debug)]
pub struct Found {
    /// Chunk index.
    pub index: u64,
    /// What the chunk holds now.
    pub slot: Slot,
    /// Its blocks now.
    pub blocks: Blocks,
    /// Bytes read from the disk.
    pub bytes_read: u64,
    /// What to send from.
    pub body: Body,
}

/// The bytes a read gives to send.
#[derive(Debug)]
pub enum Body {
    /// The whole chunk, and zstd-compressed when that is smaller.
    Whole {
        /// The plaintext: empty for a chunk of zeros, and for one that is compressed or
        /// not sent and could not be sent as a delta (see [`read`]).
        data: Vec<u8>,
        /// The compressed plaintext.
        packed: Option<Vec<u8>>,
    },
    /// Blocks read whose CVs differ from before: their `[offset, length]` ranges in the
    /// chunk, adjacent blocks merged, and their bytes in order.
    Changed {
        /// The ranges.
        ranges: Vec<[u32; 2]>,
        /// Their bytes.
        bytes: Vec<u8>,
        /// Their bytes compressed, when that is smaller.
        packed: Option<Vec<u8>>,
    },
}

thread_local! {
    /// Each reading thread's compression context and its level: made once, not per body
    /// (a tracked incremental compresses hundreds of small ones).
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// `bytes` zstd-compressed at `level` (0: not), when that makes them smaller.
pub fn compress(bytes: &[u8], level: i32) -> Option<Vec<u8>> {
    if level <= 0 {
        return None;
    }
    COMPRESSOR
        .with_borrow_mut(|c| {
            if c.as_ref().is_none_or(|(l, _)| *l != level) {
                *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
            }
            c.as_mut()?.1.compress(bytes).ok()
        })
        .filter(|z| z.len() < bytes.len())
}

/// Reads chunk `index` of a disk of `size` bytes as `plan` says, and compresses what will
/// be sent at `level` (0: not), here, in the reading task, so that chunks are compressed
/// in parallel. A chunk read whole that is what the process server holds (`held`) will
/// not be sent, as in most of a resync or of the checksum tracker's settling pass: it is
/// neither compressed nor copied. The plaintext of one that will be sent is kept only when
/// it may go as a delta (the process server holds something of it) or uncompressed.
pub fn read(
    disk: &Disk,
    index: u64,
    chunk_size: u32,
    size: u64,
    plan: Plan,
    level: i32,
    held: Slot,
) -> std::io::Result<Found> {
    let len = (size.saturating_sub(index * u64::from(chunk_size))).min(u64::from(chunk_size));
    if let Plan::Blocks { which, before } = plan
        && let Some(found) = read_blocks(disk, index, chunk_size, size, len, &which, before, level)?
    {
        return Ok(found);
    }
    let chunk = disk.read_chunk(index, chunk_size, size, |bytes, slot| {
        if slot == held {
            return (Vec::new(), None);
        }
        let packed = compress(bytes, level);
        let plain = packed.is_none() || held != Slot::Missing;
        (if plain { bytes.to_vec() } else { Vec::new() }, packed)
    })?;
    Ok(Found {
        index,
        slot: chunk.slot,
        blocks: chunk.blocks,
        bytes_read: chunk.bytes_read,
        body: Body::Whole { data: chunk.data, packed: chunk.packed },
    })
}

/// Reads the blocks `which` of a chunk of `len` bytes whose blocks were `before`, and
/// compresses those that changed at `level`; `None` for a chunk of one block, whose hash
/// needs all of it.
#[allow(clippy::too_many_arguments)]
fn read_blocks(
    disk: &Disk,
    index: u64,
    chunk_size: u32,
    size: u64,
    len: u64,
    which: &[u32],
    mut blocks: Blocks,
    level: i32,
) -> std::io::Result<Option<Found>> {
    if len <= DELTA_BLOCK as u64 {
        return Ok(None);
    }
    let (mut changed, mut bytes, mut bytes_read) = (Vec::new(), Vec::new(), 0u64);
    disk.read_blocks(index, chunk_size, size, which, |b, data| {
        let i = b as usize;
        let (cv, zero) = tree::block(data, i);
        if cv != blocks.cvs[i] {
            changed.push(i);
            bytes.extend_from_slice(data);
        }
        blocks.cvs[i] = cv;
        blocks.zero[i] = zero;
        bytes_read += data.len() as u64;
    })?;
    let Some(slot) = blocks.slot(len, None) else { return Ok(None) };
    let ranges = ranges(changed, len as u32);
    let packed = compress(&bytes, level);
    Ok(Some(Found { index, slot, blocks, bytes_read, body: Body::Changed { ranges, bytes, packed } }))
}

/// Length of block `b` of a chunk of `len` bytes.
fn block_len(b: u32, len: u64) -> u64 {
    (len.saturating_sub(u64::from(b) * DELTA_BLOCK as u64)).min(DELTA_BLOCK as u64)
}

/// The `[offset, length]` ranges of the blocks `which` (ascending) of a chunk of `len`
/// bytes, adjacent blocks merged.
pub fn ranges(which: impl IntoIterator<Item = usize>, len: u32) -> Vec<[u32; 2]> {
    let block = DELTA_BLOCK as u32;
    let mut out: Vec<[u32; 2]> = Vec::new();
    for i in which {
        let off = i as u32 * block;
        let n = block.min(len - off);
        match out.last_mut() {
            Some(last) if last[0] + last[1] == off => last[1] += n,
            _ => out.push([off, n]),
        }
    }
    out
}

/// The ranges of a chunk of `len` bytes whose blocks differ between `before` and `after`
/// (per-block CVs or zero flags).
pub fn changed_ranges<T: PartialEq>(before: &[T], after: &[T], len: u32) -> Vec<[u32; 2]> {
    ranges(before.iter().zip(after).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i), len)
}

#[cfg(test)]
#[path = "read_tests.rs"]
mod tests;
