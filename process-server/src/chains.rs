//! How each uploaded chunk slot is stored when it is not a whole chunk: a base and a
//! chain of patches (storage format 2). The uploader keeps this next to the head as
//! uploaded, in the checkpoint, so manifests can name each slot's chain; sessions read
//! it to fetch a delta's base from the store.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use siterecovery_store::{ChunkHash, ChunkRef, Manifest, PackedAt, PatchChain, chain_may_grow};
use siterecovery_wire::{Head, Slot};

/// The chain of every slot stored as one; a data slot not in here is a whole chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chains {
    map: HashMap<(String, u64), Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    chain: PatchChain,
    /// Changed bytes its patches carry (what the chain bound counts).
    patch_bytes: u64,
}

/// One chain as the checkpoint stores it.
#[derive(Serialize, Deserialize)]
pub(crate) struct ChainRecord {
    disk: String,
    index: u64,
    chain: ChunkRef,
    patch_bytes: u64,
}

impl Chains {
    /// The manifest entry of a slot holding `slot`: zeros, a whole chunk, or its chain.
    /// `None` for a slot never received.
    pub fn entry(&self, disk: &str, index: u64, slot: Slot) -> Option<ChunkRef> {
        match slot {
            Slot::Missing => None,
            Slot::Zero => Some(ChunkRef::Zero),
            Slot::Data(h) => Some(match self.chain(disk, index, &h) {
                Some(c) => ChunkRef::Chain(c.clone()),
                None => ChunkRef::Data(h),
            }),
        }
    }

    /// The chain of a slot, if that slot is stored as a chain making chunk `hash`.
    pub fn chain(&self, disk: &str, index: u64, hash: &ChunkHash) -> Option<&PatchChain> {
        self.map.get(&(disk.to_string(), index)).map(|e| &e.chain).filter(|c| c.hash == *hash)
    }

    /// Whether a patch of `new_bytes` may go on the slot now holding `base` (`None`:
    /// zeros), a chunk of `chunk_len` bytes, rather than the whole chunk.
    pub fn may_grow(&self, disk: &str, index: u64, base: Option<&ChunkHash>, new_bytes: u64, chunk_len: u64) -> bool {
        let (n, bytes) =
            match base.and_then(|b| self.map.get(&(disk.to_string(), index)).filter(|e| e.chain.hash == *b)) {
                Some(e) => (e.chain.patches.len(), e.patch_bytes),
                None => (0, 0),
            };
        chain_may_grow(n, bytes, new_bytes, chunk_len)
    }

    /// Records that a patch from `base` (the slot's content before, `None`: zeros) to
    /// `result` was stored for the slot.
    pub fn push(&mut self, disk: &str, index: u64, base: Option<ChunkHash>, result: ChunkHash, bytes: u64) {
        let key = (disk.to_string(), index);
        match self.map.get_mut(&key).filter(|e| base.is_some_and(|b| e.chain.hash == b)) {
            Some(e) => {
                if !e.chain.packed.is_empty() {
                    e.chain.packed.push(None);
                }
                e.chain.patches.push(result);
                e.chain.hash = result;
                e.patch_bytes += bytes;
            }
            None => {
                let chain = PatchChain { hash: result, base, patches: vec![result], packed: vec![] };
                self.map.insert(key, Entry { chain, patch_bytes: bytes });
            }
        }
    }

    /// Records where the patches just uploaded in packs are, for the chains that name them.
    pub fn place(&mut self, places: &Places) {
        if places.is_empty() {
            return;
        }
        for ((disk, _), e) in &mut self.map {
            place_in(&mut e.chain, disk, places);
        }
    }

    /// Records that the slot is now a whole chunk or zeros.
    pub fn clear(&mut self, disk: &str, index: u64) {
        self.map.remove(&(disk.to_string(), index));
    }

    /// Drops the chains of slots that no longer hold what they make (a disk resized or
    /// removed).
    pub fn retain_in(&mut self, head: &Head) {
        self.map.retain(|(disk, index), e| {
            head.disks
                .iter()
                .find(|d| d.id == *disk)
                .and_then(|d| d.slots.get(*index as usize))
                .is_some_and(|s| *s == Slot::Data(e.chain.hash))
        });
    }

    /// The chains of a manifest read from the store. How many bytes their patches carry
    /// is not recorded there: they count as full, so each such slot's next change is
    /// stored whole.
    pub fn of_manifest(m: &Manifest) -> Self {
        let mut out = Self::default();
        for d in &m.disks {
            for (i, c) in d.chunks.iter().enumerate() {
                if let ChunkRef::Chain(chain) = c {
                    let entry = Entry { chain: chain.clone(), patch_bytes: u64::from(m.chunk_size) };
                    out.map.insert((d.id.clone(), i as u64), entry);
                }
            }
        }
        out
    }

    /// The checkpoint's form.
    pub(crate) fn records(&self) -> Vec<ChainRecord> {
        let mut out: Vec<ChainRecord> = self
            .map
            .iter()
            .map(|((disk, index), e)| ChainRecord {
                disk: disk.clone(),
                index: *index,
                chain: ChunkRef::Chain(e.chain.clone()),
                patch_bytes: e.patch_bytes,
            })
            .collect();
        out.sort_by(|a, b| (&a.disk, a.index).cmp(&(&b.disk, b.index)));
        out
    }

    /// From the checkpoint's form; records that are not chains are refused.
    pub(crate) fn from_records(records: Vec<ChainRecord>) -> Result<Self, String> {
        let mut out = Self::default();
        for r in records {
            let ChunkRef::Chain(chain) = r.chain else {
                return Err(format!("chunk {} of disk {} is recorded as a chain but is none", r.index, r.disk));
            };
            out.map.insert((r.disk, r.index), Entry { chain, patch_bytes: r.patch_bytes });
        }
        Ok(out)
    }

    /// Number of slots stored as chains.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no slot is stored as a chain.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Where patches stored in packs are, by disk, result and base (what names a patch).
pub type Places = HashMap<(String, ChunkHash, Option<ChunkHash>), PackedAt>;

/// Fills in where the patches of `chain` (of `disk`) that `places` knows are.
pub fn place_in(chain: &mut PatchChain, disk: &str, places: &Places) {
    let found: Vec<(usize, PackedAt)> = chain
        .steps()
        .enumerate()
        .filter(|&(i, _)| chain.packed_at(i).is_none())
        .filter_map(|(i, (before, after))| places.get(&(disk.to_string(), after, before)).map(|at| (i, *at)))
        .collect();
    if found.is_empty() {
        return;
    }
    chain.packed.resize(chain.patches.len(), None);
    for (i, at) in found {
        chain.packed[i] = Some(at);
    }
}

/// Fills in where the patches named by the chains of manifest `m` are.
pub fn place_in_manifest(m: &mut Manifest, places: &Places) {
    if places.is_empty() {
        return;
    }
    for d in &mut m.disks {
        for c in &mut d.chunks {
            if let ChunkRef::Chain(chain) = c {
                place_in(chain, &d.id, places);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use siterecovery_store::MAX_CHAIN_PATCHES;
    use siterecovery_wire::DiskHead;

    #[test]
    fn a_chain_grows_patch_by_patch_until_its_bound_and_restarts_whole() {
        let h = |i: u8| ChunkHash::of(&[i]);
        let len = 4u64 << 20;
        let mut c = Chains::default();
        let mut slot = h(0);
        assert!(c.may_grow("sda", 3, Some(&slot), 64 << 10, len), "a whole chunk takes a first patch");
        for i in 1..=MAX_CHAIN_PATCHES as u8 {
            assert!(c.may_grow("sda", 3, Some(&slot), 64 << 10, len));
            c.push("sda", 3, Some(slot), h(i), 64 << 10);
            slot = h(i);
        }
        let chain = c.chain("sda", 3, &slot).unwrap();
        assert_eq!((chain.base, chain.patches.len()), (Some(h(0)), MAX_CHAIN_PATCHES));
        assert_eq!(c.entry("sda", 3, Slot::Data(slot)), Some(ChunkRef::Chain(chain.clone())));
        assert!(!c.may_grow("sda", 3, Some(&slot), 64 << 10, len), "the ninth change is stored whole");
        c.clear("sda", 3);
        assert_eq!(c.entry("sda", 3, Slot::Data(slot)), Some(ChunkRef::Data(slot)));

        // Half the chunk in patches is the other bound; a zero slot starts a chain on zeros.
        c.push("sda", 4, None, h(50), len / 2);
        assert_eq!(c.chain("sda", 4, &h(50)).unwrap().base, None);
        assert!(!c.may_grow("sda", 4, Some(&h(50)), 1, len));

        // Records round-trip; a resize drops the chains of slots that went.
        let back = Chains::from_records(c.records()).unwrap();
        assert_eq!(back, c);
        let head = Head { disks: vec![DiskHead { id: "sda".into(), size: 4 * len, slots: vec![Slot::Zero; 4] }] };
        let mut resized = back;
        resized.retain_in(&head);
        assert!(resized.is_empty());
    }
}
