//! The chains of patches the process server builds from this agent's deltas, as the agent
//! can follow them. The process server stores a slot's deltas as patches on the last
//! chunk it stored whole, as long as `siterecovery_store::chain_may_grow` allows (a
//! restore applies them all); a delta past that bound it must store as the whole chunk,
//! which it rebuilds from the store: a download of the base and of every patch. The agent
//! has the chunk on its own disk, so when a delta would pass the bound it reads the chunk
//! whole and sends it whole instead, and the process server reads nothing back.
//!
//! This is the agent's view, not a contract: a delta sent past a bound the process server
//! counts differently (after an agent restart, which forgets the chains) is rebuilt there
//! as before, and a chunk sent whole too early costs only its bytes.

use std::collections::HashMap;

use siterecovery_store::ChunkHash;
use siterecovery_wire::Slot;

/// Chains followed at most: past that, new ones are not (their slots then fall back to
/// the process server's rebuild). 24 bytes of key and value each, plus the map's own.
const MAX_CHAINS: usize = 1 << 18;

/// A slot's chain: the chunk its last patch makes, how many patches and their bytes.
#[derive(Debug, Clone, Copy)]
struct Chain {
    result: ChunkHash,
    patches: usize,
    bytes: u64,
}

/// Per (disk, chunk index), the chain the process server builds on the slot.
#[derive(Debug, Default)]
pub(crate) struct Chains(HashMap<(usize, u64), Chain>);

impl Chains {
    /// The patches and their bytes on the slot `key` while the process server holds
    /// `held` there: `(0, 0)` when `held` was sent whole (or is zeros).
    pub(crate) fn of(&self, key: (usize, u64), held: Slot) -> (usize, u64) {
        match (self.0.get(&key), held) {
            (Some(c), Slot::Data(h)) if c.result == h => (c.patches, c.bytes),
            _ => (0, 0),
        }
    }

    /// Whether a delta of `new_bytes` on the slot `key`, holding `held`, a chunk of `len`
    /// bytes, stays within the process server's bound.
    pub(crate) fn may_grow(&self, key: (usize, u64), held: Slot, new_bytes: u64, len: u64) -> bool {
        let (patches, bytes) = self.of(key, held);
        siterecovery_store::chain_may_grow(patches, bytes, new_bytes, len)
    }

    /// A delta from `held` to `result` covering `bytes` was sent for the slot `key`.
    pub(crate) fn delta(&mut self, key: (usize, u64), held: Slot, result: ChunkHash, bytes: u64) {
        let (patches, before) = self.of(key, held);
        if self.0.len() >= MAX_CHAINS && !self.0.contains_key(&key) {
            return;
        }
        self.0.insert(key, Chain { result, patches: patches + 1, bytes: before + bytes });
    }

    /// The slot `key` was sent whole (or as zeros): its chain, if any, ends.
    pub(crate) fn whole(&mut self, key: (usize, u64)) {
        self.0.remove(&key);
    }

    /// Forgets every chain (the chunk size changed: the slots are others).
    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_grows_with_deltas_on_its_last_result_and_ends_with_a_whole_chunk() {
        const LEN: u64 = 4 << 20;
        let h = |n: u8| ChunkHash::of(&[n]);
        let mut c = Chains::default();
        let key = (0, 7);
        assert_eq!(c.of(key, Slot::Data(h(0))), (0, 0));
        c.delta(key, Slot::Data(h(0)), h(1), 64 << 10);
        c.delta(key, Slot::Data(h(1)), h(2), 128 << 10);
        assert_eq!(c.of(key, Slot::Data(h(2))), (2, 192 << 10));
        // Held is something else (another agent's write, a process server that rebuilt it):
        // a chain of its own starts.
        assert_eq!(c.of(key, Slot::Data(h(9))), (0, 0));
        // A delta from zeros starts a chain (the process server's base `zero`).
        c.delta((0, 8), Slot::Zero, h(3), 64 << 10);
        assert_eq!(c.of((0, 8), Slot::Data(h(3))), (1, 64 << 10));

        // The bound is the process server's: patches and bytes.
        for n in 2..siterecovery_store::MAX_CHAIN_PATCHES as u8 {
            c.delta(key, Slot::Data(h(n)), h(n + 1), 64 << 10);
        }
        let last = Slot::Data(h(siterecovery_store::MAX_CHAIN_PATCHES as u8));
        assert!(!c.may_grow(key, last, 64 << 10, LEN), "{:?}", c.of(key, last));
        assert!(c.may_grow((0, 8), Slot::Data(h(3)), LEN / 2 - (64 << 10), LEN));
        assert!(!c.may_grow((0, 8), Slot::Data(h(3)), LEN / 2 - (64 << 10) + 1, LEN));
        c.whole(key);
        assert_eq!(c.of(key, last), (0, 0));
        assert!(c.may_grow(key, last, 64 << 10, LEN));
    }
}
