//! Block-write change tracking for protected disks, without a kernel module.
//!
//! An eBPF program on the kernel's block-layer tracepoints (BTF-typed: `block_bio_queue`
//! at submission, `block_rq_complete` or `block_bio_complete` at completion) reports the
//! sector range of every write, discard and write-zeroes to the tracked disks, once when
//! submitted and again when completed; [`BlockTracker::take_dirty`] turns them into
//! the set of dirty blocks since the previous call. When the kernel could not record a
//! write (ring buffer or in-flight table full) the set says so (`lost`), and the caller
//! must resynchronise that device by checksums. See docs/change-tracking.md.
//!
//! [`FileTracker`] does the same for image files on ext4, from the page cache: a second
//! program reports the blocks ext4 marks dirty, direct-I/O writes, punched holes and
//! zeroed ranges (docs/change-tracking.md "Image files").
#![deny(unsafe_code)]

mod bpf;
mod device;
mod error;
mod files;
mod pin;
mod privileges;
mod sys;
mod worker;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use device::TrackedDevice;
pub use error::TrackerError;
pub use files::{FileTracker, TrackedFile};

/// Tuning knobs; [`TrackerOptions::new`] gives the defaults for a granularity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerOptions {
    /// Tracking block size in bytes: a power of two, at least 4096 (e.g. 65536).
    pub granularity: u64,
    /// Kernel ring buffer size in bytes (a power of two, at least a page). Each write
    /// costs two 24-byte records; the default 8 MiB holds ~170,000 writes between drains.
    pub ring_buffer_bytes: u32,
    /// How often the ring buffer is drained into the dirty bitmaps between takes.
    pub drain_interval: Duration,
    /// A directory on a bpf filesystem (e.g. `/sys/fs/bpf/siterecovery/<server>`) where
    /// the program and its maps are pinned, so tracking continues while no tracker runs
    /// and the next one resumes it ([`BlockTracker::resumed`], [`BlockTracker::suspend`]).
    /// `None`: tracking ends with the tracker.
    pub pin_dir: Option<PathBuf>,
}

impl TrackerOptions {
    /// Defaults: 8 MiB ring buffer drained every 10 ms.
    pub fn new(granularity: u64) -> Self {
        Self { granularity, ring_buffer_bytes: 8 << 20, drain_interval: Duration::from_millis(10), pin_dir: None }
    }

    fn validate(&self) -> Result<(), TrackerError> {
        if self.granularity < 4096 || !self.granularity.is_power_of_two() {
            return Err(TrackerError::InvalidGranularity(self.granularity));
        }
        if self.ring_buffer_bytes < 4096 || !self.ring_buffer_bytes.is_power_of_two() {
            return Err(TrackerError::InvalidRingBuffer(self.ring_buffer_bytes));
        }
        Ok(())
    }
}

/// The blocks written on every tracked device since the previous take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    /// Tracking block size in bytes; block `i` covers bytes `[i * granularity, (i + 1) * granularity)`.
    pub granularity: u64,
    /// One entry per tracked device, in the order given to [`BlockTracker::start`].
    pub devices: Vec<DeviceDirty>,
    /// Whether any device lost writes (see [`DeviceDirty::lost`]).
    pub lost: bool,
    /// Range records the kernel delivered for the tracked disks since the previous take:
    /// two per write (at submission and at completion). A churn indicator for metrics.
    pub records: u64,
}

/// The dirty blocks of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDirty {
    /// The device as given to [`BlockTracker::start`].
    pub path: PathBuf,
    /// Sorted indexes of the blocks written, relative to the start of the device (a
    /// partition's block 0 is at its first sector).
    pub blocks: Vec<u64>,
    /// The kernel could not record every write to this device's disk since the last
    /// take: `blocks` is incomplete and the device must be resynchronised by checksums.
    pub lost: bool,
}

/// A running block-device tracker. Dropping it detaches the eBPF program (unless pinned).
#[derive(Debug)]
pub struct BlockTracker {
    devices: Vec<TrackedDevice>,
    worker: worker::Handle,
}

impl BlockTracker {
    /// Loads and attaches the eBPF program for `devices` (disks or partitions), with
    /// `granularity`-byte tracking blocks (a power of two, at least 4096).
    pub fn start(devices: &[PathBuf], granularity: u64) -> Result<Self, TrackerError> {
        Self::start_with(devices, TrackerOptions::new(granularity))
    }

    /// [`BlockTracker::start`] with explicit [`TrackerOptions`].
    pub fn start_with(devices: &[PathBuf], options: TrackerOptions) -> Result<Self, TrackerError> {
        options.validate()?;
        let devices = devices.iter().map(|p| TrackedDevice::resolve(p)).collect::<Result<Vec<_>, _>>()?;
        privileges::check()?;
        route_libbpf_logs();
        let worker = worker::spawn(devices.clone(), options)?;
        Ok(Self { devices, worker })
    }

    /// Whether the program is pinned (tracking goes on after this tracker ends).
    pub fn pinned(&self) -> bool {
        self.worker.pinned()
    }

    /// Whether this tracker continued pinned tracking that an earlier one suspended
    /// ([`BlockTracker::suspend`]): its first take then holds every write since that
    /// tracker's last take. `false` for a fresh start, and when the earlier tracker ended
    /// without suspending (its first take then reports every device `lost`).
    pub fn resumed(&self) -> bool {
        self.worker.resumed()
    }

    /// The last take of a pinned tracker: hands over the blocks written since the
    /// previous take and stops, leaving the program attached and recording into its
    /// pinned ring buffer for the next tracker to resume. Without a pin directory it is
    /// a take followed by a drop.
    pub fn suspend(self) -> Result<DirtySet, TrackerError> {
        self.worker.suspend()
    }

    /// Removes the tracking pinned under `pin_dir` (for good: the program detaches once
    /// no tracker holds it). For when a server stops being protected.
    pub fn remove_pins(pin_dir: &Path) -> Result<(), TrackerError> {
        pin::remove(pin_dir)
    }

    /// The devices being tracked, as resolved at start.
    pub fn devices(&self) -> &[TrackedDevice] {
        &self.devices
    }

    /// Tracking block size in bytes.
    pub fn granularity(&self) -> u64 {
        self.worker.granularity()
    }

    /// The blocks written since the previous call (or since start), per device in the
    /// order given. Every write whose tracepoint fired before this call is in the
    /// returned set; later ones go to the next. A write still in flight during the call
    /// is reported again when it completes, so reading a returned block never misses
    /// data that is still on its way to the disk.
    pub fn take_dirty(&self) -> Result<DirtySet, TrackerError> {
        self.worker.take()
    }

    /// Whether eBPF tracking can run here; `Err` says why not, so the agent can log
    /// it and fall back to checksum scans. Loads and attaches the program (tracking
    /// nothing) to be sure.
    pub fn probe() -> Result<(), String> {
        privileges::check().map_err(|e| e.to_string())?;
        Self::start(&[], 65536).map(drop).map_err(|e| e.to_string())
    }

    /// Whether `path` could be tracked (exists, is a block device, sysfs describes it).
    pub fn check_device(path: &Path) -> Result<TrackedDevice, TrackerError> {
        TrackedDevice::resolve(path)
    }
}

/// Sends libbpf's messages (verifier logs included) to `tracing` instead of stderr.
pub(crate) fn route_libbpf_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Warn, |level, msg| {
            let msg = msg.trim_end();
            match level {
                libbpf_rs::PrintLevel::Warn => tracing::warn!(target: "libbpf", "{msg}"),
                _ => tracing::debug!(target: "libbpf", "{msg}"),
            }
        })));
    });
}
