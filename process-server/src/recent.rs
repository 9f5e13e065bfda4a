//! Recently received chunk contents, the bases deltas apply to. One budget for the
//! whole process server; the oldest entries go first. A miss costs a download from the
//! store, never correctness.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use siterecovery_store::{ChunkHash, ServerRef};

type Key = (String, String, String, ChunkHash);

/// Chunk plaintexts by server, disk and hash, within a byte budget.
#[derive(Debug)]
pub struct RecentChunks {
    budget: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Key, Bytes>,
    order: VecDeque<Key>,
    bytes: u64,
}

fn key(server: &ServerRef, disk: &str, hash: ChunkHash) -> Key {
    (server.namespace().to_string(), server.name().to_string(), disk.to_string(), hash)
}

impl RecentChunks {
    /// A cache of at most `budget` bytes.
    pub fn new(budget: u64) -> Self {
        Self { budget, inner: Mutex::default() }
    }

    /// Remembers a chunk.
    pub fn insert(&self, server: &ServerRef, disk: &str, hash: ChunkHash, plain: Bytes) {
        let n = plain.len() as u64;
        if n > self.budget {
            return;
        }
        let k = key(server, disk, hash);
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.map.contains_key(&k) {
            return;
        }
        while g.bytes + n > self.budget {
            let Some(old) = g.order.pop_front() else { break };
            if let Some(b) = g.map.remove(&old) {
                g.bytes -= b.len() as u64;
            }
        }
        g.bytes += n;
        g.order.push_back(k.clone());
        g.map.insert(k, plain);
    }

    /// A chunk, if it is still here.
    pub fn get(&self, server: &ServerRef, disk: &str, hash: &ChunkHash) -> Option<Bytes> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.map.get(&key(server, disk, *hash)).cloned()
    }
}
