//! Change tracking: which chunks may have been written since the last look, and whether
//! nothing at all was written in between (the quiet window a crash-consistent point
//! needs, see docs/replication-protocol.md "Recovery points").

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use siterecovery_tracker::TrackerOptions;

use crate::disk::{DELTA_BLOCK, Disk};

/// What may have changed since the previous [`ChangeTracker::take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dirty {
    /// Unknown: every chunk must be compared (first look, lost events, image rewritten).
    All,
    /// These chunks, per disk in order, each with the blocks that may have been written;
    /// all empty means nothing was written.
    Chunks(Vec<BTreeMap<u64, Blocks>>),
}

/// Which [`DELTA_BLOCK`]s of a dirty chunk may have been written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocks {
    /// Unknown (a tracker without block detail, a chunk the process server lacks): read
    /// the whole chunk.
    Whole,
    /// These blocks, counted from the start of the chunk: the rest of the chunk is as the
    /// agent last read it.
    Some(BTreeSet<u32>),
}

impl Dirty {
    /// Whether nothing was written since the previous look.
    pub fn is_quiet(&self) -> bool {
        matches!(self, Dirty::Chunks(sets) if sets.iter().all(BTreeMap::is_empty))
    }
}

/// A source of change information.
pub trait ChangeTracker: Send + Sync {
    /// What may have changed since the previous call (the first call returns `All`).
    fn take(&mut self, disks: &[Disk], chunk_size: u32) -> std::io::Result<Dirty>;
    /// Whether a quiet [`Dirty`] is proof that nothing was written (else points cannot
    /// be taken without freezing).
    fn proves_quiet(&self) -> bool;
    /// Name for logs and status.
    fn name(&self) -> &'static str;
    /// Stops tracking for an agent restart, when this tracker goes on recording without
    /// the agent (eBPF pinned in a bpf filesystem): the blocks of [`EBPF_GRANULARITY`]
    /// written since the previous take, per disk, for the next agent. `None` otherwise
    /// (the next agent then compares every chunk).
    fn suspend(&mut self) -> Option<Vec<Vec<u64>>> {
        None
    }
    /// Whether this tracker continued one that a previous agent suspended, so every write
    /// since is known: then `pending` (what that agent handed over) joins the first take,
    /// which is not a full comparison. `false`: the first take compares everything.
    fn resume(&mut self, _pending: Vec<Vec<u64>>) -> bool {
        false
    }
}

/// The portable tracker for image files: the file's modification time and size. Any
/// write changes them (the kernel records a fine-grained time once the previous one was
/// observed), so a changed stamp means "compare every chunk by checksum". The kernel
/// updates the stamp *before* it copies a write's data, so one stable look is not
/// enough: after a change, one more full comparison runs once the stamp is stable, and
/// only the look after that counts as quiet (a write in flight at the change has landed
/// by then unless it outlasts a whole pass). Block devices have no such stamp: every look
/// is `All` and nothing is proven quiet; use the eBPF tracker for them.
#[derive(Debug, Default)]
pub struct StampTracker {
    last: Option<Vec<Option<(i64, i64, u64)>>>,
    settling: bool,
    block_devices: bool,
}

impl StampTracker {
    /// A tracker for `disks`.
    pub fn new(disks: &[Disk]) -> Self {
        Self { last: None, settling: false, block_devices: disks.iter().any(Disk::is_block_device) }
    }
}

impl ChangeTracker for StampTracker {
    fn take(&mut self, disks: &[Disk], _chunk_size: u32) -> std::io::Result<Dirty> {
        if self.block_devices {
            return Ok(Dirty::All);
        }
        let now: Vec<_> = disks.iter().map(|d| d.change_stamp().ok()).collect();
        let changed = self.last.as_ref() != Some(&now) || now.iter().any(Option::is_none);
        self.last = Some(now);
        if changed {
            self.settling = true;
            return Ok(Dirty::All);
        }
        if std::mem::take(&mut self.settling) {
            return Ok(Dirty::All);
        }
        Ok(Dirty::Chunks(vec![BTreeMap::new(); disks.len()]))
    }

    fn proves_quiet(&self) -> bool {
        !self.block_devices
    }

    fn name(&self) -> &'static str {
        "checksum-scan"
    }
}

/// The eBPF tracker (`siterecovery-tracker`, docs/change-tracking.md): for block devices,
/// writes followed in the kernel's block layer; for image files on ext4, the blocks the
/// page cache marks dirty, direct-I/O writes and punched holes. A quiet look proves that
/// nothing was written to any protected disk since the previous one. The first look after
/// start is `All` (writes before the tracker ran are unknown), and so is a look after lost
/// events.
#[derive(Debug)]
pub struct EbpfTracker {
    /// `None` once suspended.
    tracker: Option<Kernel>,
    started: bool,
    /// Blocks a previous agent handed over, for the first take.
    pending: Vec<Vec<u64>>,
}

/// The kernel side of an [`EbpfTracker`].
#[derive(Debug)]
enum Kernel {
    Blocks(siterecovery_tracker::BlockTracker),
    Files(siterecovery_tracker::FileTracker),
}

impl Kernel {
    fn take_dirty(&self) -> Result<siterecovery_tracker::DirtySet, siterecovery_tracker::TrackerError> {
        match self {
            Kernel::Blocks(t) => t.take_dirty(),
            Kernel::Files(t) => t.take_dirty(),
        }
    }

    /// Whether it was pinned, and its last take.
    fn suspend(self) -> (bool, Result<siterecovery_tracker::DirtySet, siterecovery_tracker::TrackerError>) {
        match self {
            Kernel::Blocks(t) => (t.pinned(), t.suspend()),
            Kernel::Files(t) => (t.pinned(), t.suspend()),
        }
    }

    /// Whether it continued what an earlier tracker suspended, for `disks` disks.
    fn resumed(&self, disks: usize) -> bool {
        match self {
            Kernel::Blocks(t) => t.resumed() && t.devices().len() == disks,
            Kernel::Files(t) => t.resumed() && t.files().len() == disks,
        }
    }
}

fn start_blocks(paths: &[PathBuf], options: TrackerOptions) -> Result<Kernel, siterecovery_tracker::TrackerError> {
    siterecovery_tracker::BlockTracker::start_with(paths, options).map(Kernel::Blocks)
}

fn start_files(paths: &[PathBuf], options: TrackerOptions) -> Result<Kernel, siterecovery_tracker::TrackerError> {
    siterecovery_tracker::FileTracker::start_with(paths, options).map(Kernel::Files)
}

/// Tracking block size: writes are recorded at this granularity.
pub const EBPF_GRANULARITY: u64 = 64 * 1024;

impl EbpfTracker {
    /// Attaches to the devices of `disks` (block devices or partitions).
    pub fn start(disks: &[Disk]) -> Result<Self, siterecovery_tracker::TrackerError> {
        Self::start_pinned(disks, None)
    }

    /// Attaches to the image files of `disks` (regular files on ext4).
    pub fn start_files(disks: &[Disk]) -> Result<Self, siterecovery_tracker::TrackerError> {
        Self::start_files_pinned(disks, None)
    }

    /// [`EbpfTracker::start_files`], pinned under `pin_dir` when given, as
    /// [`EbpfTracker::start_pinned`].
    pub fn start_files_pinned(
        disks: &[Disk],
        pin_dir: Option<&Path>,
    ) -> Result<Self, siterecovery_tracker::TrackerError> {
        Self::start_kind(disks, pin_dir, None, start_files)
    }

    /// [`EbpfTracker::start`], pinned under `pin_dir` (a directory on a bpf filesystem) when
    /// given, so tracking goes on while the agent restarts (docs/change-tracking.md
    /// "Across restarts"). When pinning fails, tracking runs unpinned (and says so).
    pub fn start_pinned(disks: &[Disk], pin_dir: Option<&Path>) -> Result<Self, siterecovery_tracker::TrackerError> {
        Self::start_kind(disks, pin_dir, None, start_blocks)
    }

    /// Starts `start` (block devices or image files) on `disks`, pinned under `pin_dir`
    /// when given, with a ring buffer of `ring_bytes` (the default when `None`).
    fn start_kind(
        disks: &[Disk],
        pin_dir: Option<&Path>,
        ring_bytes: Option<u32>,
        start: fn(&[PathBuf], TrackerOptions) -> Result<Kernel, siterecovery_tracker::TrackerError>,
    ) -> Result<Self, siterecovery_tracker::TrackerError> {
        let paths: Vec<_> = disks.iter().map(|d| d.path.clone()).collect();
        let mut options = TrackerOptions::new(EBPF_GRANULARITY);
        if let Some(bytes) = ring_bytes {
            options.ring_buffer_bytes = bytes;
        }
        let pinned = TrackerOptions { pin_dir: pin_dir.map(Path::to_owned), ..options.clone() };
        let tracker = match start(&paths, pinned) {
            Err(e) if pin_dir.is_some() => {
                let t = start(&paths, options)?;
                tracing::warn!(error = %e, "could not pin the change tracker: an agent restart will compare every chunk");
                t
            }
            r => r?,
        };
        Ok(Self { tracker: Some(tracker), started: false, pending: Vec::new() })
    }

    fn tracker(&self) -> std::io::Result<&Kernel> {
        self.tracker.as_ref().ok_or_else(|| std::io::Error::other("the change tracker was suspended"))
    }
}

impl ChangeTracker for EbpfTracker {
    fn take(&mut self, disks: &[Disk], chunk_size: u32) -> std::io::Result<Dirty> {
        let mut set = self.tracker()?.take_dirty().map_err(std::io::Error::other)?;
        if !std::mem::replace(&mut self.started, true) {
            return Ok(Dirty::All);
        }
        for (device, handed) in set.devices.iter_mut().zip(std::mem::take(&mut self.pending)) {
            device.blocks.extend(handed);
        }
        if set.lost {
            tracing::warn!("the kernel dropped write records; comparing every chunk by checksum");
            return Ok(Dirty::All);
        }
        if set.devices.len() != disks.len() {
            return Ok(Dirty::All);
        }
        Ok(Dirty::Chunks(
            set.devices.iter().map(|d| chunks_of(d.blocks.iter().copied(), set.granularity, chunk_size)).collect(),
        ))
    }

    fn proves_quiet(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn suspend(&mut self) -> Option<Vec<Vec<u64>>> {
        let (pinned, suspended) = self.tracker.take()?.suspend();
        match suspended {
            Ok(set) if pinned && !set.lost && self.started => {
                let mut blocks: Vec<Vec<u64>> = set.devices.into_iter().map(|d| d.blocks).collect();
                for (b, handed) in blocks.iter_mut().zip(std::mem::take(&mut self.pending)) {
                    b.extend(handed);
                }
                Some(blocks)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "could not suspend change tracking; the next agent compares every chunk");
                None
            }
        }
    }

    fn resume(&mut self, pending: Vec<Vec<u64>>) -> bool {
        let resumed = self.tracker.as_ref().is_some_and(|t| t.resumed(pending.len()));
        if resumed {
            self.started = true;
            self.pending = pending;
        }
        resumed
    }
}

/// Turns dirty blocks of `block_size` bytes (as a tracker reports them, counted from the
/// start of the disk) into dirty chunks and the [`DELTA_BLOCK`]s of each they touch.
pub fn chunks_of(blocks: impl IntoIterator<Item = u64>, block_size: u64, chunk_size: u32) -> BTreeMap<u64, Blocks> {
    let (cs, db) = (u64::from(chunk_size), DELTA_BLOCK as u64);
    let mut out: BTreeMap<u64, Blocks> = BTreeMap::new();
    for b in blocks {
        let (start, end) = (b * block_size, (b + 1) * block_size);
        for chunk in start / cs..end.div_ceil(cs) {
            let base = chunk * cs;
            let (from, to) = (start.max(base) - base, end.min(base + cs) - base);
            let Blocks::Some(set) = out.entry(chunk).or_insert_with(|| Blocks::Some(BTreeSet::new())) else {
                continue;
            };
            set.extend((from / db..to.div_ceil(db)).map(|i| i as u32));
        }
    }
    out
}

/// How the agent tracks changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tracking {
    /// eBPF when it works here and every disk is a block device, or every disk an image
    /// file on ext4; else checksum scans.
    #[default]
    Auto,
    /// eBPF, or fail.
    Ebpf,
    /// Checksum scans (image files: modification time tells when to scan).
    Scan,
}

/// The tracker `mode` asks for, for `disks`.
/// `pin_dir`: where the eBPF tracker pins itself to outlive the agent (see
/// [`EbpfTracker::start_pinned`]); `ring_bytes`: its ring buffer (the default when `None`).
pub fn tracker_for(
    mode: Tracking,
    disks: &[Disk],
    pin_dir: Option<&Path>,
    ring_bytes: Option<u32>,
) -> anyhow::Result<Box<dyn ChangeTracker>> {
    let all_devices = !disks.is_empty() && disks.iter().all(Disk::is_block_device);
    let all_files = !disks.is_empty() && !disks.iter().any(Disk::is_block_device);
    let ebpf = || {
        let start = if all_devices { start_blocks } else { start_files };
        EbpfTracker::start_kind(disks, pin_dir, ring_bytes, start)
    };
    match mode {
        Tracking::Scan => Ok(Box::new(StampTracker::new(disks))),
        Tracking::Ebpf if !all_devices && !all_files => {
            anyhow::bail!("eBPF tracking follows either block devices or image files: a server's disks cannot mix both")
        }
        Tracking::Ebpf => Ok(Box::new(ebpf()?)),
        Tracking::Auto if all_devices || all_files => match ebpf() {
            Ok(t) => Ok(Box::new(t)),
            Err(e) if all_devices => {
                tracing::warn!(error = %e, "eBPF change tracking unavailable; falling back to checksum scans, which cannot prove a quiet instant on block devices (no crash-consistent points)");
                Ok(Box::new(StampTracker::new(disks)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "eBPF change tracking of image files unavailable; falling back to checksum scans, which compare whole files and take points only once writes pause");
                Ok(Box::new(StampTracker::new(disks)))
            }
        },
        Tracking::Auto => Ok(Box::new(StampTracker::new(disks))),
    }
}

/// Whether eBPF tracking can run here, and why not.
pub fn ebpf_probe() -> Result<(), String> {
    siterecovery_tracker::BlockTracker::probe()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_blocks_become_chunks_and_their_delta_blocks() {
        const KIB: u64 = 1024;
        let some = |b: &[u32]| Blocks::Some(b.iter().copied().collect());
        // 64 KiB tracking, 1 MiB chunks: block 17 is chunk 1's block 1.
        let got = chunks_of([0, 1, 17, 31, 32], 64 * KIB, 1024 * 1024);
        assert_eq!(got, BTreeMap::from([(0, some(&[0, 1])), (1, some(&[1, 15])), (2, some(&[0]))]));
        // Coarser tracking marks every delta block it covers, across a chunk boundary.
        let got = chunks_of([1], 256 * KIB, 384 * 1024);
        assert_eq!(got, BTreeMap::from([(0, some(&[4, 5])), (1, some(&[0, 1]))]));
        // Finer tracking marks the delta block it falls in; a chunk size that is not a
        // multiple of 64 KiB ends in a short block.
        let got = chunks_of([0, 1, 24, 30], 4 * KIB, 100 * 1024);
        assert_eq!(got, BTreeMap::from([(0, some(&[0, 1])), (1, some(&[0]))]));
    }

    #[test]
    fn the_ring_buffer_size_is_checked_and_named() {
        let config = |mib: serde_json::Value| -> crate::AgentConfig {
            serde_json::from_value(serde_json::json!({
                "namespace": "prod", "server": "db-01", "disks": [], "processServer": "localhost:9443",
                "clientCert": "tls.crt", "clientKey": "tls.key", "caBundle": "ca.crt",
                "trackerRingBufferMiB": mib,
            }))
            .unwrap()
        };
        for good in [1, 8, 64, 1024] {
            let c = config(good.into());
            assert_eq!(c.tracker_ring_buffer_mib, Some(good));
            c.validate().unwrap();
        }
        for bad in [0, 3, 2048] {
            let e = config(bad.into()).validate().unwrap_err().to_string();
            assert!(e.contains("trackerRingBufferMiB") && e.contains(&bad.to_string()), "{e}");
        }
    }
}
