//! What the agent remembers of the chunks it read: per 64 KiB block its blake3 chaining
//! value and whether it is all zeros, so that a chunk of which the tracker names a few
//! dirty blocks is read and hashed by those blocks alone (docs/replication-protocol.md
//! "A session"). Bounded in bytes, least recently used chunks first out; a chunk not
//! held is read whole.
//!
//! Hand-written rather than a cache crate: entries are weighed by their size (a chunk of
//! 64 blocks against an all-zero chunk that holds no CVs), and an ordered map of use ticks
//! does that in a few lines.

use std::collections::{BTreeMap, HashMap};

use siterecovery_wire::Slot;

use crate::tree::Blocks;

/// Default bound of the cache: 32 bytes of CV and one of zero flag per 64 KiB, so 64 MiB
/// (with ~200 bytes per chunk) covers about 110 GiB of 4 MiB chunks read.
pub const DEFAULT_LIMIT: usize = 64 << 20;

/// Bytes an entry costs besides its blocks: about 140 in the map (key, length, slot,
/// vector headers, tick, hash table slack), 30 in the order map, 32 of allocator headers.
const ENTRY_OVERHEAD: usize = 200;

/// Which chunk: disk (in configuration order) and index.
pub(crate) type Key = (usize, u64);

/// A chunk as last read.
#[derive(Debug, Clone)]
struct Entry {
    /// Its length in bytes.
    len: u64,
    /// Zero or data with its hash.
    slot: Slot,
    /// Its blocks (none kept for an all-zero chunk).
    blocks: Option<Blocks>,
    /// When it was last used.
    tick: u64,
}

/// The bounded cache of block CVs.
#[derive(Debug)]
pub(crate) struct BlockCache {
    limit: usize,
    used: usize,
    chunk_size: u32,
    entries: HashMap<Key, Entry>,
    order: BTreeMap<u64, Key>,
    tick: u64,
}

impl BlockCache {
    /// An empty cache holding at most `limit` bytes (0: none, every chunk is read whole).
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit, used: 0, chunk_size: 0, entries: HashMap::new(), order: BTreeMap::new(), tick: 0 }
    }

    /// Forgets everything when chunks are now `chunk_size` bytes (another process server):
    /// the CVs describe chunks of the old size.
    pub(crate) fn use_chunk_size(&mut self, chunk_size: u32) {
        if self.chunk_size != chunk_size {
            self.entries.clear();
            self.order.clear();
            self.used = 0;
            self.chunk_size = chunk_size;
        }
    }

    /// Bytes held.
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// The blocks of chunk `key`, `len` bytes long, if it was last read as `slot` (what
    /// the process server holds: the base a delta applies to).
    pub(crate) fn blocks_if(&mut self, key: Key, len: u64, slot: Slot) -> Option<Blocks> {
        let entry = self.entries.get_mut(&key).filter(|e| e.len == len && e.slot == slot)?;
        self.tick += 1;
        self.order.remove(&entry.tick);
        entry.tick = self.tick;
        self.order.insert(self.tick, key);
        match &entry.blocks {
            Some(b) => Some(b.clone()),
            None => Some(Blocks::zeros(len)),
        }
    }

    /// Records chunk `key` as read: `slot`, and its blocks (ignored for a zero chunk).
    /// Returns what was recorded before, as (slot, blocks).
    pub(crate) fn insert(&mut self, key: Key, len: u64, slot: Slot, blocks: Blocks) -> Option<(Slot, Blocks)> {
        let previous = self.remove(key);
        let blocks = (slot != Slot::Zero).then_some(blocks);
        let cost = cost(&blocks);
        if cost <= self.limit {
            while self.used + cost > self.limit {
                let Some((_, oldest)) = self.order.pop_first() else { break };
                if let Some(e) = self.entries.remove(&oldest) {
                    self.used -= cost_of(&e);
                }
            }
            self.tick += 1;
            self.order.insert(self.tick, key);
            self.entries.insert(key, Entry { len, slot, blocks, tick: self.tick });
            self.used += cost;
        }
        previous
    }

    /// Forgets chunk `key`, returning what was recorded.
    fn remove(&mut self, key: Key) -> Option<(Slot, Blocks)> {
        let e = self.entries.remove(&key)?;
        self.order.remove(&e.tick);
        self.used -= cost_of(&e);
        let blocks = match e.blocks {
            Some(b) => b,
            None => Blocks::zeros(e.len),
        };
        Some((e.slot, blocks))
    }

    /// The data chunks held, least recently used first, for the next agent
    /// ([`crate::restart::Handover`]): key, length, hash and blocks.
    pub(crate) fn export(&self) -> Vec<(Key, u64, Slot, Blocks)> {
        self.order
            .values()
            .filter_map(|k| {
                let e = &self.entries[k];
                Some((*k, e.len, e.slot, e.blocks.clone()?))
            })
            .collect()
    }

    /// Takes over what [`BlockCache::export`] gave, for chunks of `chunk_size` bytes, within
    /// this cache's bound.
    pub(crate) fn import(&mut self, chunk_size: u32, entries: Vec<(Key, u64, Slot, Blocks)>) {
        self.use_chunk_size(chunk_size);
        for (key, len, slot, blocks) in entries {
            self.insert(key, len, slot, blocks);
        }
    }
}

fn cost(blocks: &Option<Blocks>) -> usize {
    ENTRY_OVERHEAD + blocks.as_ref().map_or(0, |b| b.cvs.len() * (32 + 1))
}

fn cost_of(e: &Entry) -> usize {
    cost(&e.blocks)
}

#[cfg(test)]
mod tests {
    use siterecovery_store::ChunkHash;

    use super::*;
    use crate::tree;

    fn data_blocks(n: usize, seed: u8) -> (Slot, Blocks) {
        let chunk: Vec<u8> = (0..n * tree::BLOCK).map(|i| (i as u8).wrapping_mul(seed) | 1).collect();
        (Slot::Data(ChunkHash::of(&chunk)), Blocks::of(&chunk))
    }

    #[test]
    fn the_least_recently_used_chunks_go_first_and_the_bound_holds() {
        let per = ENTRY_OVERHEAD + 4 * 33;
        let mut cache = BlockCache::new(3 * per);
        cache.use_chunk_size(4 * tree::BLOCK as u32);
        let len = 4 * tree::BLOCK as u64;
        let (slot, blocks) = data_blocks(4, 3);
        for i in 0..3 {
            cache.insert((0, i), len, slot, blocks.clone());
        }
        assert_eq!(cache.used(), 3 * per);
        // Chunk 0 used again: chunk 1 is the one to go.
        assert_eq!(cache.blocks_if((0, 0), len, slot), Some(blocks.clone()));
        cache.insert((0, 3), len, slot, blocks.clone());
        assert_eq!(cache.used(), 3 * per);
        assert!(cache.blocks_if((0, 1), len, slot).is_none());
        assert!(cache.blocks_if((0, 0), len, slot).is_some());
        // Another base, another length: not usable.
        assert!(cache.blocks_if((0, 0), len, Slot::Zero).is_none());
        assert!(cache.blocks_if((0, 0), len - 1, slot).is_none());
        // Another chunk size forgets everything.
        cache.use_chunk_size(8 * tree::BLOCK as u32);
        assert!(cache.blocks_if((0, 0), len, slot).is_none());
        assert_eq!(cache.used(), 0);
    }

    #[test]
    fn a_zero_chunk_costs_no_cvs_and_gives_the_cvs_of_zero_blocks() {
        let mut cache = BlockCache::new(1 << 20);
        let len = 2 * tree::BLOCK as u64 + 100;
        let zero = vec![0u8; len as usize];
        cache.insert((1, 7), len, Slot::Zero, Blocks::of(&zero));
        assert_eq!(cache.used(), ENTRY_OVERHEAD);
        assert_eq!(cache.blocks_if((1, 7), len, Slot::Zero), Some(Blocks::of(&zero)));
        // Replacing it returns what was there.
        let (slot, blocks) = data_blocks(2, 5);
        let before = cache.insert((1, 7), len, slot, blocks);
        assert_eq!(before, Some((Slot::Zero, Blocks::of(&zero))));
    }

    #[test]
    fn no_limit_no_cache() {
        let mut cache = BlockCache::new(0);
        let (slot, blocks) = data_blocks(1, 1);
        cache.insert((0, 0), tree::BLOCK as u64, slot, blocks);
        assert!(cache.blocks_if((0, 0), tree::BLOCK as u64, slot).is_none());
        assert_eq!(cache.used(), 0);
    }
}
