//! Recent chunk contents, the bases deltas apply to (chunks made from deltas, and bases
//! read back from local copies or the store; a chunk received whole is kept as its block
//! values only), and the chaining values of
//! the 64 KiB blocks of many more chunks, from which a delta is checked without its base
//! (`siterecovery_store::tree`; 2 KiB for a 4 MiB chunk). Each has one budget for the
//! whole process server; the oldest entries go first. A miss costs a download from the
//! store, never correctness. Downloads of bases ahead of their deltas (`ahead.rs`) are
//! announced here, so a session that needs one waits for it instead of fetching it twice.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use blake3::hazmat::ChainingValue;
use bytes::Bytes;
use siterecovery_store::{ChunkHash, ServerRef};

type Key = (String, String, String, ChunkHash);

/// Default memory for block chaining values: about 30,000 chunks, 110 GiB of 4 MiB chunks.
pub const BLOCK_CV_BYTES: u64 = 64 << 20;

/// Per-entry bookkeeping counted against a budget besides the value (key, order, map).
const ENTRY_OVERHEAD: u64 = 160;

/// Chunk plaintexts by server, disk and hash, within a byte budget.
#[derive(Debug)]
pub struct RecentChunks {
    budget: u64,
    cv_budget: u64,
    inner: Mutex<Lru<Bytes>>,
    cvs: Mutex<Lru<Arc<[ChainingValue]>>>,
    fetching: Arc<Mutex<HashMap<Key, tokio::sync::watch::Receiver<Option<String>>>>>,
    /// The block chaining values of a chunk of zeros, by length (a chunk size, and the
    /// length of each disk's last chunk).
    zeros: Mutex<HashMap<u64, Arc<[ChainingValue]>>>,
    /// Chunks downloaded from the store because they were not here (delta bases, to check
    /// a delta or to store its chunk whole): counted by whoever downloads one.
    pub downloads: prometheus_client::metrics::counter::Counter,
}

/// A download of a chunk in progress; those waiting for it go on when it is dropped.
#[derive(Debug)]
pub struct Fetching {
    key: Key,
    fetching: Arc<Mutex<HashMap<Key, tokio::sync::watch::Receiver<Option<String>>>>>,
    done: tokio::sync::watch::Sender<Option<String>>,
}

impl Fetching {
    /// The download failed in a way waiting for the uploader cannot mend (the store is
    /// down or holds the chunk damaged): those waiting are told why.
    pub fn fail(self, why: String) {
        self.done.send_replace(Some(why));
    }
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.fetching.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// Values by key within a byte budget, the oldest out first.
#[derive(Debug)]
struct Lru<V> {
    map: HashMap<Key, (V, u64)>,
    order: VecDeque<Key>,
    bytes: u64,
}

impl<V> Default for Lru<V> {
    fn default() -> Self {
        Self { map: HashMap::new(), order: VecDeque::new(), bytes: 0 }
    }
}

impl<V: Clone> Lru<V> {
    /// Keeps `value`, which costs `n` bytes, dropping the oldest entries to stay within
    /// `budget`.
    fn insert(&mut self, k: Key, value: V, n: u64, budget: u64) {
        if n > budget || self.map.contains_key(&k) {
            return;
        }
        while self.bytes + n > budget {
            let Some(old) = self.order.pop_front() else { break };
            if let Some((_, m)) = self.map.remove(&old) {
                self.bytes -= m;
            }
        }
        self.bytes += n;
        self.order.push_back(k.clone());
        self.map.insert(k, (value, n));
    }

    fn get(&self, k: &Key) -> Option<V> {
        self.map.get(k).map(|(v, _)| v.clone())
    }
}

fn key(server: &ServerRef, disk: &str, hash: ChunkHash) -> Key {
    (server.namespace().to_string(), server.name().to_string(), disk.to_string(), hash)
}

impl RecentChunks {
    /// A cache of at most `budget` bytes of chunks and `cv_budget` bytes of block
    /// chaining values.
    pub fn new(budget: u64, cv_budget: u64) -> Self {
        Self {
            budget,
            cv_budget,
            inner: Mutex::default(),
            cvs: Mutex::default(),
            fetching: Arc::default(),
            zeros: Mutex::default(),
            downloads: Default::default(),
        }
    }

    /// Remembers a chunk.
    pub fn insert(&self, server: &ServerRef, disk: &str, hash: ChunkHash, plain: Bytes) {
        let n = plain.len() as u64;
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.insert(key(server, disk, hash), plain, n, self.budget);
    }

    /// A chunk, if it is still here.
    pub fn get(&self, server: &ServerRef, disk: &str, hash: &ChunkHash) -> Option<Bytes> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).get(&key(server, disk, *hash))
    }

    /// Remembers the block chaining values of a chunk.
    pub fn insert_cvs(&self, server: &ServerRef, disk: &str, hash: ChunkHash, cvs: Arc<[ChainingValue]>) {
        let n = cvs.len() as u64 * 32 + ENTRY_OVERHEAD;
        let mut g = self.cvs.lock().unwrap_or_else(|p| p.into_inner());
        g.insert(key(server, disk, hash), cvs, n, self.cv_budget);
    }

    /// The block chaining values of a chunk, if they are still here.
    pub fn cvs(&self, server: &ServerRef, disk: &str, hash: &ChunkHash) -> Option<Arc<[ChainingValue]>> {
        self.cvs.lock().unwrap_or_else(|p| p.into_inner()).get(&key(server, disk, *hash))
    }

    /// The block chaining values of a chunk of `len` zeros, the base of a delta to a slot
    /// that held zeros; `None` when chaining values are turned off. Computed once per
    /// length (blocking: a chunk's worth of hashing).
    pub fn zero_cvs(&self, len: u64) -> Option<Arc<[ChainingValue]>> {
        if self.cv_budget == 0 {
            return None;
        }
        let mut zeros = self.zeros.lock().unwrap_or_else(|p| p.into_inner());
        Some(zeros.entry(len).or_insert_with(|| siterecovery_store::tree::zero_block_cvs(len).into()).clone())
    }

    /// Whether a delta's base must be downloaded: neither it nor its block chaining values
    /// are here, and nobody downloads it yet.
    pub fn needs_fetch(&self, server: &ServerRef, disk: &str, hash: &ChunkHash) -> bool {
        let k = key(server, disk, *hash);
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).get(&k).is_none()
            && self.cvs.lock().unwrap_or_else(|p| p.into_inner()).get(&k).is_none()
            && !self.fetching.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&k)
    }

    /// Announces a download of a chunk that is neither here nor being downloaded; `None`
    /// otherwise. The download inserts the chunk, then drops what this returns.
    pub fn begin_fetch(&self, server: &ServerRef, disk: &str, hash: ChunkHash) -> Option<Fetching> {
        let k = key(server, disk, hash);
        if self.inner.lock().unwrap_or_else(|p| p.into_inner()).map.contains_key(&k) {
            return None;
        }
        let mut f = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        if f.contains_key(&k) {
            return None;
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        f.insert(k.clone(), rx);
        Some(Fetching { key: k, fetching: self.fetching.clone(), done: tx })
    }

    /// Waits for a download of this chunk announced with [`Self::begin_fetch`], if one is
    /// in progress; returns why it failed if it said so ([`Fetching::fail`]).
    pub async fn wait_fetch(&self, server: &ServerRef, disk: &str, hash: &ChunkHash) -> Option<String> {
        let rx = self.fetching.lock().unwrap_or_else(|p| p.into_inner()).get(&key(server, disk, *hash)).cloned();
        let mut rx = rx?;
        // Ends when the download's `Fetching` is dropped (its sender goes with it).
        while rx.changed().await.is_ok() {}
        rx.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_waits_for_a_base_being_fetched_instead_of_fetching_it_again() {
        let recent = Arc::new(RecentChunks::new(1 << 20, 0));
        let server = ServerRef::new("ns", "s").unwrap();
        let h = ChunkHash::of(b"base");
        let fetching = recent.begin_fetch(&server, "sda", h).expect("nobody fetches it yet");
        assert!(recent.begin_fetch(&server, "sda", h).is_none(), "one download at a time");
        let waiter = {
            let (recent, server) = (recent.clone(), server.clone());
            tokio::spawn(async move {
                recent.wait_fetch(&server, "sda", &h).await;
                recent.get(&server, "sda", &h)
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "it waits while the download runs");
        recent.insert(&server, "sda", h, Bytes::from_static(b"base"));
        drop(fetching);
        assert_eq!(waiter.await.unwrap(), Some(Bytes::from_static(b"base")));
        assert!(recent.begin_fetch(&server, "sda", h).is_none(), "it is here now");
        assert_eq!(recent.wait_fetch(&server, "sda", &h).await, None);

        // A download that fails says why to those waiting.
        let other = ChunkHash::of(b"other");
        let fetching = recent.begin_fetch(&server, "sda", other).unwrap();
        let waiter = {
            let (recent, server) = (recent.clone(), server.clone());
            tokio::spawn(async move { recent.wait_fetch(&server, "sda", &other).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        fetching.fail("the store is down".into());
        assert_eq!(waiter.await.unwrap().as_deref(), Some("the store is down"));
        assert!(recent.needs_fetch(&server, "sda", &other), "a failed download can be tried again");
    }
}
