//! What the agent knows of a chunk it read: per 64 KiB block its chaining value (CV) and
//! whether it is all zeros, from which the chunk's hash follows
//! (`siterecovery_store::tree`), so a chunk of which a few blocks changed is hashed by
//! reading only those blocks (docs/replication-protocol.md "A session").

use blake3::hazmat::ChainingValue;
use siterecovery_store::ChunkHash;
pub use siterecovery_store::tree::{BLOCK, block_cv, chunk_hash};
use siterecovery_store::tree::{is_zero, zero_block_cv};
use siterecovery_wire::Slot;

/// What a read of a whole chunk tells: per block its CV and whether it is all zeros, and
/// what the chunk is (zero, or data with its blake3 hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocks {
    /// CV of every block, in order.
    pub cvs: Vec<ChainingValue>,
    /// Whether each block is all zeros.
    pub zero: Vec<bool>,
}

impl Blocks {
    /// Hashes every block of `chunk` (a block of zeros is looked up, not hashed).
    pub fn of(chunk: &[u8]) -> Self {
        let (cvs, zero) = chunk.chunks(BLOCK).enumerate().map(|(i, b)| block(b, i)).unzip();
        Self { cvs, zero }
    }

    /// The blocks of a chunk of `len` zeros, without hashing.
    pub fn zeros(len: u64) -> Self {
        let cvs = siterecovery_store::tree::zero_block_cvs(len);
        Self { zero: vec![true; cvs.len()], cvs }
    }

    /// The chunk these blocks make, `len` bytes long: zero when every block is, else its
    /// hash (`data` is the chunk's bytes, needed only for a chunk of one block).
    pub fn slot(&self, len: u64, data: Option<&[u8]>) -> Option<Slot> {
        if self.zero.iter().all(|&z| z) {
            return Some(Slot::Zero);
        }
        match chunk_hash(&self.cvs, len) {
            Some(h) => Some(Slot::Data(h)),
            None => data.filter(|d| d.len() as u64 == len).map(|d| Slot::Data(ChunkHash::of(d))),
        }
    }
}

/// Block `index` of a chunk, `bytes` long: its CV and whether it is all zeros.
pub fn block(bytes: &[u8], index: usize) -> (ChainingValue, bool) {
    if is_zero(bytes) { (zero_block_cv(index, bytes.len()), true) } else { (block_cv(bytes, index), false) }
}

#[cfg(test)]
mod tests {
    use super::*;

    use siterecovery_store::tree::pseudo_random as bytes;

    #[test]
    fn chunk_hash_from_block_cvs_is_blake3_of_the_chunk() {
        const KIB: usize = 1024;
        const MIB: usize = 1024 * KIB;
        let lens = [
            BLOCK + 1,
            BLOCK + 1024,
            2 * BLOCK,
            2 * BLOCK + 1,
            3 * BLOCK,
            3 * BLOCK - 7,
            5 * BLOCK + 100,
            7 * BLOCK,
            MIB,
            MIB + 4096,
            MIB + BLOCK + 1,
            3 * MIB + 1000,
            4 * MIB - 1000,
            4 * MIB - 1,
            4 * MIB,
            4 * MIB + 1,
            8 * MIB,
        ];
        for (n, &len) in lens.iter().enumerate() {
            let data = bytes(len, n as u64 + 3);
            let blocks = Blocks::of(&data);
            let expected = ChunkHash::of(&data);
            assert_eq!(chunk_hash(&blocks.cvs, len as u64), Some(expected), "length {len}");
            assert_eq!(blocks.slot(len as u64, None), Some(Slot::Data(expected)), "length {len}");
        }
    }

    #[test]
    fn a_chunk_of_one_block_is_hashed_directly() {
        for len in [1, 1000, 1024, 1025, 4096, BLOCK - 1, BLOCK] {
            let data = bytes(len, 9);
            let blocks = Blocks::of(&data);
            assert_eq!(blocks.cvs.len(), 1);
            assert_eq!(chunk_hash(&blocks.cvs, len as u64), None, "length {len}");
            assert_eq!(blocks.slot(len as u64, None), None, "length {len}: needs the bytes");
            assert_eq!(blocks.slot(len as u64, Some(&data)), Some(Slot::Data(ChunkHash::of(&data))));
        }
    }

    #[test]
    fn one_changed_block_changes_only_its_cv_and_the_hash_follows() {
        let len = 4 * 1024 * 1024 - 1000;
        let mut data = bytes(len, 5);
        let before = Blocks::of(&data);
        data[17 * BLOCK + 5] ^= 0xff;
        let after = Blocks::of(&data);
        let differ: Vec<usize> = (0..before.cvs.len()).filter(|&i| before.cvs[i] != after.cvs[i]).collect();
        assert_eq!(differ, vec![17]);
        // The same bytes at another block index have another CV: CVs depend on position.
        assert_ne!(block_cv(&data[..BLOCK], 0), block_cv(&data[..BLOCK], 1));
        let mut cvs = before.cvs.clone();
        cvs[17] = block_cv(&data[17 * BLOCK..18 * BLOCK], 17);
        assert_eq!(chunk_hash(&cvs, len as u64), Some(ChunkHash::of(&data)));
    }

    #[test]
    fn zero_blocks_and_zero_chunks_are_recognised() {
        let mut data = vec![0u8; 3 * BLOCK + 10];
        let blocks = Blocks::of(&data);
        assert_eq!(blocks.zero, vec![true; 4]);
        assert_eq!(blocks.slot(data.len() as u64, None), Some(Slot::Zero));
        data[BLOCK + 1] = 1;
        let blocks = Blocks::of(&data);
        assert_eq!(blocks.zero, vec![true, false, true, true]);
        assert_eq!(blocks.slot(data.len() as u64, None), Some(Slot::Data(ChunkHash::of(&data))));
        assert_eq!(Blocks::of(&[0u8; 100]).slot(100, None), Some(Slot::Zero));
    }
}
