//! Loop devices and direct writes for the tracker's integration tests. The tests need
//! root and eBPF; without them they say why and return early. Set
//! SITERECOVERY_REQUIRE_EBPF=1 to turn such a skip into a failure (for machines that
//! must really run them).
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use siterecovery_tracker::BlockTracker;

pub const G: u64 = 65536;
pub const MIB: u64 = 1 << 20;

/// Whether the tracker can run here; prints why not and whether that is fatal.
pub fn ebpf_available() -> bool {
    let reason = match BlockTracker::probe() {
        Ok(()) if !is_root() => "the tests set up loop devices, which needs root".to_string(),
        Ok(()) if which("losetup") => return true,
        Ok(()) => "losetup is not installed".to_string(),
        Err(reason) => reason,
    };
    if std::env::var_os("SITERECOVERY_REQUIRE_EBPF").is_some_and(|v| v == "1") {
        panic!("SITERECOVERY_REQUIRE_EBPF=1 but eBPF tracking cannot run here: {reason}");
    }
    eprintln!("skipping: eBPF block tracking cannot run here: {reason}");
    false
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().nth(1));
    euid == Some("0")
}

fn which(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loop device over a sparse image file, detached (and the image removed) on drop,
/// also when the test panics.
pub struct LoopDevice {
    pub path: PathBuf,
    partitioned: bool,
    _dir: tempfile::TempDir,
}

impl LoopDevice {
    pub fn new(size: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        File::create(&image).and_then(|f| f.set_len(size)).expect("create image");
        // -P: detaching then also drops partitions, even ones added by hand.
        let path = PathBuf::from(run(Command::new("losetup").args(["--find", "--show", "--partscan"]).arg(&image)));
        Self { path, partitioned: false, _dir: dir }
    }

    /// Adds partition 1 at `start` sectors, `len` sectors long, through BLKPG (addpart):
    /// this kernel has no partition-table parsers built in, so `losetup -P` on an
    /// sfdisk-made image would not show partitions. Returns the partition's path.
    pub fn add_partition(&mut self, start: u64, len: u64) -> PathBuf {
        self.partitioned = true;
        run(Command::new("addpart").arg(&self.path).args(["1", &start.to_string(), &len.to_string()]));
        let part = PathBuf::from(format!("{}p1", self.path.display()));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !part.exists() {
            assert!(Instant::now() < deadline, "{} never appeared", part.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        part
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.partitioned {
            let _ = Command::new("delpart").arg(&self.path).arg("1").status();
        }
        let status = Command::new("losetup").arg("-d").arg(&self.path).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("could not detach {}", self.path.display());
        }
    }
}

/// Opens a block device for O_DIRECT writes, so each write reaches the block layer
/// before it returns.
pub fn open_direct(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Writes `len` bytes of `byte` at `offset` (both multiples of 4096) with O_DIRECT.
pub fn write_direct(file: &File, offset: u64, len: usize, byte: u8) {
    // O_DIRECT needs a buffer aligned to the logical block size: carve an aligned
    // window out of a larger allocation.
    let mut backing = vec![byte; len + 4096];
    let skew = (4096 - backing.as_ptr() as usize % 4096) % 4096;
    let buf = &mut backing[skew..skew + len];
    file.write_all_at(buf, offset).unwrap_or_else(|e| panic!("O_DIRECT write of {len} bytes at {offset}: {e}"));
}

/// The `G`-sized blocks that bytes `[offset, offset + len)` touch.
pub fn blocks(offset: u64, len: u64) -> BTreeSet<u64> {
    (offset / G..=(offset + len - 1) / G).collect()
}

pub fn set(blocks: &[u64]) -> BTreeSet<u64> {
    blocks.iter().copied().collect()
}

/// A zram disk (bio-based, unlike loop devices which are blk-mq), added through
/// zram-control and removed on drop. `None` when this kernel has no zram.
pub struct Zram {
    pub path: PathBuf,
    id: String,
}

impl Zram {
    pub fn new(size: u64) -> Option<Self> {
        let id = std::fs::read_to_string("/sys/class/zram-control/hot_add").ok()?;
        let id = id.trim().to_string();
        let zram = Self { path: PathBuf::from(format!("/dev/zram{id}")), id };
        std::fs::write(format!("/sys/block/zram{}/disksize", zram.id), size.to_string()).expect("set zram disksize");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !zram.path.exists() {
            assert!(Instant::now() < deadline, "{} never appeared", zram.path.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(zram)
    }
}

impl Drop for Zram {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("/sys/block/zram{}/reset", self.id), "1");
        let _ = std::fs::write("/sys/class/zram-control/hot_remove", &self.id);
    }
}

/// Reads the first `len` bytes of a device with O_DIRECT, bypassing any page cache
/// that could be stale.
pub fn read_direct(path: &Path, len: u64) -> Vec<u8> {
    let mut backing = vec![0u8; len as usize + 4096];
    let skew = (4096 - backing.as_ptr() as usize % 4096) % 4096;
    open_direct(path).read_exact_at(&mut backing[skew..skew + len as usize], 0).expect("O_DIRECT read");
    backing.drain(..skew);
    backing.truncate(len as usize);
    backing
}

/// A private bpf filesystem mounted on a temporary directory, unmounted on drop (which
/// also releases whatever stayed pinned in it).
pub struct BpfFs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl BpfFs {
    pub fn mount() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()));
        Self { path: dir.path().to_owned(), _dir: dir }
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if !Command::new("umount").arg(&self.path).status().is_ok_and(|s| s.success()) {
            eprintln!("could not unmount {}", self.path.display());
        }
    }
}
