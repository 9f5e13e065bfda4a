//! Errors of the tracker. Every message says what the operator or the agent should do;
//! most of them mean "fall back to checksum scans" (see [`crate::BlockTracker::probe`]).

use std::path::PathBuf;

/// Why tracking could not start or a dirty set could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The tracking block size is unusable.
    #[error("tracking granularity {0} bytes is invalid: use a power of two of at least 4096 bytes (e.g. 65536)")]
    InvalidGranularity(u64),

    /// The ring buffer size is unusable.
    #[error("ring buffer size {0} bytes is invalid: use a power of two of at least one page (4096 bytes)")]
    InvalidRingBuffer(u32),

    /// A device path could not be examined.
    #[error("cannot examine {path}: {source}; check that the device exists")]
    Device {
        /// The device as given.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },

    /// A path exists but is not a block device.
    #[error("{0} is not a block device: pass a disk or partition such as /dev/sda or /dev/sda2")]
    NotBlockDevice(PathBuf),

    /// An image-file path exists but is not a regular file.
    #[error("{0} is not a regular file: image-file tracking follows files; block devices have a tracker of their own")]
    NotRegularFile(PathBuf),

    /// An image file lives on a filesystem whose ways of changing data are not followed.
    #[error(
        "{path} is on a filesystem with statfs magic {magic:#x}, not ext4: image-file tracking follows ext4 only; fall back to checksum scans"
    )]
    UnsupportedFilesystem {
        /// The file as given.
        path: PathBuf,
        /// The filesystem's `f_type`.
        magic: i64,
    },

    /// An image file whose data changes without going through page-cache buffers.
    #[error("{path} cannot be tracked from the page cache: {reason}; fall back to checksum scans")]
    Untrackable {
        /// The file as given.
        path: PathBuf,
        /// Why not.
        reason: String,
    },

    /// More image files than the kernel-side filter holds.
    #[error(
        "{0} image files requested but the tracker follows at most {max}: split them over several trackers",
        max = crate::worker::MAX_SLOTS
    )]
    TooManyFiles(usize),

    /// sysfs did not describe a block device the way the tracker expects.
    #[error("cannot read {path} for {device}: {reason}; is /sys mounted?")]
    Sysfs {
        /// The device as given.
        device: PathBuf,
        /// The sysfs file that could not be used.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// More whole disks than the kernel-side filter holds.
    #[error(
        "{0} distinct disks requested but the tracker follows at most {max}: split them over several trackers",
        max = crate::worker::MAX_SLOTS
    )]
    TooManyDisks(usize),

    /// The process lacks the capabilities eBPF tracking needs.
    #[error(
        "eBPF tracking needs root or CAP_BPF+CAP_PERFMON (CAP_SYS_ADMIN on kernels before 5.8): run the agent as root or grant these capabilities, or fall back to checksum scans"
    )]
    Permission,

    /// The kernel does not expose BTF, which the tp_btf programs need.
    #[error(
        "the kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing): eBPF tracking needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (5.15 or later); fall back to checksum scans"
    )]
    NoBtf,

    /// libbpf could not open, load or attach the program, or use one of its maps.
    #[error(
        "eBPF tracker failed to {stage}: {source}; the kernel may be too old (5.15+ with BTF needed) or lack CONFIG_BPF_EVENTS; fall back to checksum scans"
    )]
    Bpf {
        /// What the tracker was doing.
        stage: &'static str,
        /// libbpf's error.
        source: libbpf_rs::Error,
    },

    /// The pin directory could not be created or cleared.
    #[error(
        "cannot use the pin directory {path}: {source}; it must be on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf), writable by root, and its names there free of dots"
    )]
    Pin {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },

    /// The thread that owns the eBPF program is gone.
    #[error("the tracking thread stopped unexpectedly: restart the tracker and resynchronise the disks by checksums")]
    WorkerGone,
}

impl TrackerError {
    pub(crate) fn bpf(stage: &'static str) -> impl FnOnce(libbpf_rs::Error) -> Self {
        move |source| {
            if source.kind() == libbpf_rs::ErrorKind::PermissionDenied {
                Self::Permission
            } else {
                Self::Bpf { stage, source }
            }
        }
    }
}
