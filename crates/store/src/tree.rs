//! A chunk's blake3 hash from the chaining values (CVs) of its 64 KiB blocks, so that a
//! chunk of which a few blocks changed is hashed from those blocks alone: the agent reads
//! only them, and the process server checks a delta without its base
//! (docs/replication-protocol.md "A session").
//!
//! The result is exactly `blake3::hash(chunk)` ([`ChunkHash::of`]): blake3 hashes its
//! input as a left-balanced binary tree over 1 KiB chunks, in which every 64 KiB block
//! that starts at a multiple of 64 KiB is a complete subtree (64 is a power of two). The
//! root follows from the blocks' CVs by merging them along the same splits `blake3::hash`
//! makes ([`left_subtree_len`]), which always fall on block boundaries once an input is
//! longer than one block.

use crate::ChunkHash;
use blake3::hazmat::{ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root};

/// Size of the blocks whose CVs are kept (the delta block).
pub const BLOCK: usize = 64 * 1024;

/// The CV of block `index` of a chunk, `data` being its bytes (a whole block, or fewer
/// for the last block of a chunk; never empty).
pub fn block_cv(data: &[u8], index: usize) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset((index * BLOCK) as u64);
    hasher.update(data);
    hasher.finalize_non_root()
}

/// The blake3 hash of a chunk of `len` bytes from the CVs of its blocks; `None` unless
/// there is one CV per block and more than one block (a chunk of one block is the root
/// itself: hash its bytes).
pub fn chunk_hash(cvs: &[ChainingValue], len: u64) -> Option<ChunkHash> {
    if len <= BLOCK as u64 || cvs.len() as u64 != len.div_ceil(BLOCK as u64) {
        return None;
    }
    let (left, right, split) = halves(cvs, len);
    let root = merge_subtrees_root(&subtree(left, split), &subtree(right, len - split), Mode::Hash);
    Some(ChunkHash(*root.as_bytes()))
}

/// The CV of the subtree over `cvs`, `len` bytes long.
fn subtree(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let (left, right, split) = halves(cvs, len);
    merge_subtrees_non_root(&subtree(left, split), &subtree(right, len - split), Mode::Hash)
}

/// Splits a subtree of `len` bytes (more than one block) where blake3 does.
fn halves(cvs: &[ChainingValue], len: u64) -> (&[ChainingValue], &[ChainingValue], u64) {
    let split = left_subtree_len(len);
    let (left, right) = cvs.split_at((split / BLOCK as u64) as usize);
    (left, right, split)
}

/// The CVs of every block of `chunk`, in order.
pub fn block_cvs(chunk: &[u8]) -> Vec<ChainingValue> {
    chunk.chunks(BLOCK).enumerate().map(|(i, b)| block_cv(b, i)).collect()
}

/// The CVs of every block of a chunk of `len` zeros (the base of a delta to a slot that
/// held zeros), without a chunk-sized buffer.
pub fn zero_block_cvs(len: u64) -> Vec<ChainingValue> {
    let blocks = len.div_ceil(BLOCK as u64) as usize;
    (0..blocks).map(|i| zero_block_cv(i, (len - (i * BLOCK) as u64).min(BLOCK as u64) as usize)).collect()
}

/// The CV of block `index` of a chunk when that block is `len` zeros (a whole block, or
/// the shorter last one). Whole blocks' are hashed once per process: free space is most of
/// many disks, and a zero block costs a lookup instead of a hash.
pub fn zero_block_cv(index: usize, len: usize) -> ChainingValue {
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    static WHOLE: std::sync::Mutex<Vec<ChainingValue>> = std::sync::Mutex::new(Vec::new());
    if len != BLOCK {
        return block_cv(&ZEROS[..len], index);
    }
    let mut whole = WHOLE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    while whole.len() <= index {
        let i = whole.len();
        whole.push(block_cv(&ZEROS, i));
    }
    whole[index]
}

/// Whether `bytes` are all zeros (16 bytes at a time, which compiles to vector compares:
/// a byte at a time is ten times slower, and a disk is read through this whole).
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(16);
    words.by_ref().all(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0) && words.remainder().iter().all(|&b| b == 0)
}

/// `len` deterministic pseudo-random bytes (blake3's output stream keyed by `seed`): test
/// and benchmark data that neither compresses nor repeats from block to block.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0; len];
    blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_hash_from_block_cvs_is_blake3_of_the_chunk() {
        let data = pseudo_random(4 * 1024 * 1024 + 5000, 7);
        for len in [BLOCK + 1, 2 * BLOCK, 3 * BLOCK - 7, 1024 * 1024 + 4096, 4 * 1024 * 1024, data.len()] {
            let chunk = &data[..len];
            assert_eq!(chunk_hash(&block_cvs(chunk), len as u64), Some(ChunkHash::of(chunk)), "length {len}");
        }
        assert_eq!(chunk_hash(&block_cvs(&data[..BLOCK]), BLOCK as u64), None, "one block is hashed directly");
    }

    #[test]
    fn zero_block_cvs_are_those_of_a_chunk_of_zeros() {
        for len in [1, BLOCK, BLOCK + 1, 3 * BLOCK - 7, 4 * 1024 * 1024] {
            assert_eq!(zero_block_cvs(len as u64), block_cvs(&vec![0; len]), "length {len}");
        }
    }

    #[test]
    fn is_zero_sees_one_byte_anywhere() {
        for len in [0, 1, 15, 16, 17, 100, BLOCK] {
            let mut bytes = vec![0u8; len];
            assert!(is_zero(&bytes), "{len} zeros");
            for at in (0..len).filter(|&at| at < 40 || at + 40 >= len) {
                bytes[at] = 1;
                assert!(!is_zero(&bytes), "a 1 at {at} of {len}");
                bytes[at] = 0;
            }
        }
    }
}
