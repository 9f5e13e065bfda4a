//! Helpers shared by the local and Azurite tests: deterministic disk images and stores.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use siterecovery_store::{BlobBackend, DiskSource, Keyring, NewPoint, PointKind, Store, StoreOptions};

/// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A sparse image of `size` bytes: random data in the given `(offset, len, seed)` extents,
/// holes (zeros) elsewhere.
pub fn make_image(path: &Path, size: u64, extents: &[(u64, usize, u64)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for &(offset, len, seed) in extents {
        f.write_all_at(&noise(seed, len), offset).unwrap();
    }
}

/// Overwrites `len` bytes at `offset` with fresh noise.
pub fn scribble(path: &Path, offset: u64, len: usize, seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&noise(seed, len), offset).unwrap();
}

/// blake3 of a whole file.
pub fn file_hash(path: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).unwrap()).unwrap();
    h.finalize()
}

/// A keyring with keys `k1` and `k2` (+ more ids) and the given active one.
pub fn keyring(active: &str, ids: &[&str]) -> Keyring {
    Keyring::new(active, ids.iter().map(|id| (id.to_string(), key_of(id)))).unwrap()
}

/// Fixed key material per id.
pub fn key_of(id: &str) -> [u8; 32] {
    *blake3::hash(id.as_bytes()).as_bytes()
}

/// A store with small chunks so tests see many of them.
pub fn store(backend: Arc<dyn BlobBackend>, keys: Keyring, chunk_size: u32) -> Store {
    Store::new(backend, keys, StoreOptions { chunk_size, parallelism: 4, zstd_level: 3 }).unwrap()
}

/// A crash point at `secs` after the epoch of 2026-11-27.
pub fn crash_point(secs: i64) -> NewPoint {
    let base: jiff::Timestamp = "2026-11-27T00:00:00Z".parse().unwrap();
    NewPoint {
        kind: PointKind::Crash,
        group: None,
        members: vec![],
        time: base + jiff::SignedDuration::from_secs(secs),
        id: None,
    }
}

/// One disk source.
pub fn disk(id: &str, path: &Path) -> DiskSource {
    DiskSource { id: id.to_string(), path: path.to_path_buf() }
}
