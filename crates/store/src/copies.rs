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
//! Copies are a cache, not state: files are written without fsync (into a temporary name,
//! then renamed, so a reader never sees half of one), and the oldest go first when the
//! budget is reached. They outlive a restart of the process (which is when its memory
//! holds no base at all): opening takes up the copies in the directory, oldest first by
//! modification time, and removes what is not a copy (a temporary file left by a crash).
//! A copy left damaged by a crash fails to open like any other, and is dropped then. A copy is not written when
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
    writes: std::sync::atomic::AtomicU64,
    /// Reads answered from a copy (those that then did not open are counted in
    /// `dropped` too).
    pub hits: Counter,
    /// Copies not written: too large for the budget, the filesystem short of free space
    /// beyond the reserve, or a write that failed.
    pub skipped: Counter,
    /// Copies dropped because they did not open.
    pub dropped: Counter,
    /// Bytes held in copies.
    pub held_bytes: Gauge,
}

/// The copies there are by file name, oldest first, and their bytes. A name kept again
/// gets a new generation, so that its older place in the order does not drop it.
#[derive(Debug, Default)]
struct Held {
    sizes: HashMap<String, (u64, u64)>,
    order: VecDeque<(String, u64)>,
    bytes: u64,
    generation: u64,
}

impl Held {
    /// Adds copy `name` of `len` bytes as the newest (replacing an older copy of that
    /// name); drops the oldest beyond `budget` and gives their names.
    fn add(&mut self, name: String, len: u64, budget: u64) -> Vec<String> {
        self.generation += 1;
        if let Some((old, _)) = self.sizes.insert(name.clone(), (len, self.generation)) {
            self.bytes -= old;
        }
        self.order.push_back((name, self.generation));
        self.bytes += len;
        let mut doomed = Vec::new();
        while self.bytes > budget {
            let Some((oldest, g)) = self.order.pop_front() else { break };
            if self.sizes.get(&oldest).is_some_and(|&(_, held)| held == g) {
                let (n, _) = self.sizes.remove(&oldest).expect("just looked");
                self.bytes -= n;
                doomed.push(oldest);
            }
        }
        doomed
    }
}

impl LocalCopies {
    /// Copies in `dir`, at most `budget` bytes (the oldest of those there beyond it are
    /// removed), written only while the filesystem keeps `reserve` bytes free besides.
    pub fn open(dir: &Path, budget: u64, reserve: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_str().unwrap_or_default().to_string();
            let meta = entry.metadata()?;
            if meta.is_file() && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                found.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), name, meta.len()));
            } else if meta.is_dir() {
                std::fs::remove_dir_all(entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        found.sort();
        let mut held = Held::default();
        for (_, name, len) in found {
            for old in held.add(name, len, budget) {
                std::fs::remove_file(dir.join(old))?;
            }
        }
        let copies = Self {
            dir: dir.to_path_buf(),
            budget,
            reserve,
            held_bytes: Gauge::default(),
            hits: Counter::default(),
            skipped: Counter::default(),
            dropped: Counter::default(),
            held: Mutex::new(held),
            writes: std::sync::atomic::AtomicU64::new(0),
        };
        copies.held_bytes.set(copies.bytes() as i64);
        Ok(copies)
    }

    /// Bytes held in copies now.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file name of object `key`'s copy: a hash of the key (keys have slashes, and a
    /// name says nothing of the server it belongs to).
    fn name(key: &str) -> String {
        blake3::hash(key.as_bytes()).to_hex().to_string()
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(Self::name(key))
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
        // Its own temporary name: two writers of one object (two uploads of the same
        // chunk) never write into the same file.
        let n = self.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("{n}.tmp"));
        // The rename replaces an older copy of the same object at once.
        let written =
            std::fs::File::create(&tmp).and_then(|mut f| f.write_all(data)).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(key, error = %e, "no local copy of this object");
            self.skipped.inc();
            return;
        }
        let doomed = {
            let mut held = self.lock();
            let doomed = held.add(Self::name(key), len, self.budget);
            self.held_bytes.set(held.bytes as i64);
            doomed
        };
        for name in doomed {
            let _ = std::fs::remove_file(self.dir.join(name));
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
            let removed = held.sizes.remove(&Self::name(key)).map(|(n, _)| held.bytes -= n).is_some();
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
    fn writers_of_one_object_at_once_leave_one_whole_copy() {
        let dir = tempfile::tempdir().unwrap();
        let copies = LocalCopies::open(dir.path(), 1 << 30, 0).unwrap();
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let copies = &copies;
                s.spawn(move || copies.keep("a", &vec![i; 1 << 20]));
            }
        });
        let copy = copies.read("a", None).unwrap();
        assert!(copy.len() == 1 << 20 && copy.iter().all(|&b| b == copy[0]), "one writer's bytes, whole");
        assert_eq!(copies.bytes(), 1 << 20);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn no_copy_when_the_filesystem_would_keep_less_than_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let copies = LocalCopies::open(dir.path(), 1 << 20, u64::MAX / 2).unwrap();
        copies.keep("a", b"1234");
        assert_eq!((copies.read("a", None), copies.skipped.get()), (None, 1));
    }

    #[test]
    fn copies_outlive_a_restart_within_the_budget_and_a_crash_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let copies = LocalCopies::open(dir.path(), 1 << 20, 0).unwrap();
        copies.keep("a", b"1234");
        std::thread::sleep(std::time::Duration::from_millis(20));
        copies.keep("b", b"5678");
        std::fs::write(dir.path().join(format!("{}.7.tmp", LocalCopies::name("c"))), b"half").unwrap();
        std::fs::create_dir(dir.path().join("stray")).unwrap();
        let again = LocalCopies::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!((again.read("a", None).as_deref(), again.bytes()), (Some(&b"1234"[..]), 8));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "only the copies are left");
        // A smaller budget keeps the newest.
        let small = LocalCopies::open(dir.path(), 6, 0).unwrap();
        assert_eq!((small.read("a", None), small.read("b", None).as_deref()), (None, Some(&b"5678"[..])));
        assert_eq!((small.bytes(), small.held_bytes.get()), (4, 4));
    }
}
