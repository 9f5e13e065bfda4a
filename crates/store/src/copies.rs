//! Local copies of the data objects a store writes (chunks, patches, packs), kept in a
//! directory within a byte budget, so that reading them back does not go to the backend.
//! A process server reads back what it wrote when it rebuilds a chunk whose chain of
//! patches is full (its base and patches) or checks a delta against a base no longer in
//! memory: with copies on its cache volume that costs no request, no egress and no wait
//! on the service (docs/process-servers.md, "Local copies").
//!
//! A copy holds the object's sealed bytes as uploaded: encrypted at rest with the policy's
//! key like the object itself, and authenticated when opened. A copy that does not open
//! (damaged on disk, or sealed with a key the store no longer has) is dropped and the
//! object read from the backend instead: a copy can cost a request, never a wrong or
//! missing chunk. Objects are named by their content, so a copy stays right even after
//! the object was deleted from the backend (it is only never asked for again).
//!
//! Copies are a cache, not state: the directory is emptied when opened, files are written
//! without fsync (into a temporary name, then renamed, so a reader never sees half of
//! one), and the oldest go first when the budget is reached. A copy is not written when
//! the filesystem would be left with less free space than the reserve the caller names
//! (a process server's journal limit), so copies never take room the journal needs.

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Local copies of data objects within a budget (see the module).
#[derive(Debug)]
pub struct LocalCopies {
    dir: PathBuf,
    budget: u64,
    reserve: u64,
    held: Mutex<Held>,
    /// Reads answered from a copy.
    pub hits: Counter,
    /// Copies not written: too large for the budget, the filesystem short of free space
    /// beyond the reserve, or a write that failed.
    pub skipped: Counter,
    /// Copies dropped because they did not open.
    pub dropped: Counter,
    /// Bytes held in copies.
    pub held_bytes: Gauge,
}

/// The copies there are, oldest first, and their bytes.
#[derive(Debug, Default)]
struct Held {
    sizes: HashMap<String, (u64, u64)>,
    order: VecDeque<(String, u64)>,
    bytes: u64,
    generation: u64,
}

impl LocalCopies {
    /// Copies in `dir` (emptied first: what was there is not trusted across restarts),
    /// at most `budget` bytes, written only while the filesystem keeps `reserve` bytes free
    /// besides.
    pub fn open(dir: &Path, budget: u64, reserve: u64) -> std::io::Result<Self> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            budget,
            reserve,
            held: Mutex::default(),
            hits: Counter::default(),
            skipped: Counter::default(),
            dropped: Counter::default(),
            held_bytes: Gauge::default(),
        })
    }

    /// Bytes held in copies now.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file of object `key`: named by a hash of the key (keys have slashes, and a
    /// name says nothing of the server it belongs to).
    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(blake3::hash(key.as_bytes()).to_hex().as_str())
    }

    /// Keeps a copy of object `key`, whose sealed bytes are `data`, making room by dropping
    /// the oldest copies. Blocking.
    pub fn keep(&self, key: &str, data: &[u8]) {
        let len = data.len() as u64;
        if len > self.budget || !self.room_for(len) {
            self.skipped.inc();
            return;
        }
        let path = self.path(key);
        let tmp = path.with_extension("tmp");
        let written = std::fs::File::create(&tmp).and_then(|mut f| f.write_all(data)).and_then(|()| {
            self.forget(key);
            std::fs::rename(&tmp, &path)
        });
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(key, error = %e, "no local copy of this object");
            self.skipped.inc();
            return;
        }
        let mut doomed = Vec::new();
        {
            let mut held = self.lock();
            held.generation += 1;
            let generation = held.generation;
            held.sizes.insert(key.to_string(), (len, generation));
            held.order.push_back((key.to_string(), generation));
            held.bytes += len;
            while held.bytes > self.budget {
                let Some((oldest, g)) = held.order.pop_front() else { break };
                if held.sizes.get(&oldest).is_some_and(|&(_, hg)| hg == g) {
                    let (n, _) = held.sizes.remove(&oldest).expect("just looked");
                    held.bytes -= n;
                    doomed.push(oldest);
                }
            }
            self.held_bytes.set(held.bytes as i64);
        }
        for key in doomed {
            let _ = std::fs::remove_file(self.path(&key));
        }
    }

    /// Whether the filesystem has `len` bytes free beyond the reserve.
    fn room_for(&self, len: u64) -> bool {
        match nix::sys::statvfs::statvfs(&self.dir) {
            Ok(s) => {
                let free = s.blocks_available().saturating_mul(s.fragment_size());
                free >= self.reserve.saturating_add(len)
            }
            Err(_) => false,
        }
    }

    /// The copy of object `key`, or of `len` bytes of it from `offset`; `None` when there
    /// is none (or it is shorter). Blocking.
    pub fn read(&self, key: &str, range: Option<(u64, u64)>) -> Option<Vec<u8>> {
        let path = self.path(key);
        let data = match range {
            None => std::fs::read(path).ok()?,
            Some((offset, len)) => {
                let mut buf = vec![0u8; usize::try_from(len).ok()?];
                std::fs::File::open(path).ok()?.read_exact_at(&mut buf, offset).ok()?;
                buf
            }
        };
        self.hits.inc();
        Some(data)
    }

    /// Drops the copy of object `key` that did not open; the next read goes to the backend.
    pub fn drop_damaged(&self, key: &str) {
        self.dropped.inc();
        self.forget(key);
    }

    /// Drops the copy of object `key`, if any (the object was deleted).
    pub fn forget(&self, key: &str) {
        let removed = {
            let mut held = self.lock();
            let removed = held.sizes.remove(key).map(|(n, _)| held.bytes -= n).is_some();
            self.held_bytes.set(held.bytes as i64);
            removed
        };
        if removed {
            let _ = std::fs::remove_file(self.path(key));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_read_whole_or_in_part_and_the_oldest_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let copies = LocalCopies::open(&dir.path().join("copies"), 10, 0).unwrap();
        copies.keep("servers/a/b/chunks/1", b"0123456");
        assert_eq!(copies.read("servers/a/b/chunks/1", None).as_deref(), Some(&b"0123456"[..]));
        assert_eq!(copies.read("servers/a/b/chunks/1", Some((2, 3))).as_deref(), Some(&b"234"[..]));
        assert_eq!(copies.read("servers/a/b/chunks/1", Some((5, 3))), None, "past the end: no copy");
        copies.keep("servers/a/b/chunks/2", b"abcd");
        assert_eq!(copies.read("servers/a/b/chunks/1", None), None, "the oldest made room");
        assert_eq!(copies.read("servers/a/b/chunks/2", None).as_deref(), Some(&b"abcd"[..]));
        assert_eq!(copies.bytes(), 4);
        copies.keep("servers/a/b/chunks/3", b"this is more than ten bytes");
        assert_eq!(copies.skipped.get(), 1, "larger than the budget");
        copies.forget("servers/a/b/chunks/2");
        assert_eq!((copies.read("servers/a/b/chunks/2", None), copies.bytes()), (None, 0));
        assert_eq!(copies.hits.get(), 3);
    }

    #[test]
    fn a_copy_kept_again_is_not_dropped_for_its_older_self() {
        let dir = tempfile::tempdir().unwrap();
        let copies = LocalCopies::open(dir.path(), 8, 0).unwrap();
        copies.keep("a", b"1234");
        copies.keep("a", b"1234");
        copies.keep("b", b"5678");
        assert_eq!(copies.read("a", None).as_deref(), Some(&b"1234"[..]));
        assert_eq!(copies.bytes(), 8);
    }

    #[test]
    fn no_copy_when_the_filesystem_would_keep_less_than_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let copies = LocalCopies::open(dir.path(), 1 << 20, u64::MAX / 2).unwrap();
        copies.keep("a", b"1234");
        assert_eq!((copies.read("a", None), copies.skipped.get()), (None, 1));
    }

    #[test]
    fn opening_empties_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let copies = LocalCopies::open(dir.path(), 1 << 20, 0).unwrap();
        copies.keep("a", b"1234");
        let again = LocalCopies::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(again.read("a", None), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
