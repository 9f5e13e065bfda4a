//! Resolves a device path to what the kernel reports in the block tracepoints: the
//! whole disk's dev_t and absolute 512-byte sectors. A partition is a window of its
//! disk, found in sysfs (`start` and `size`, in sectors), so partition-relative blocks
//! are computed here in user space.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::TrackerError;

/// The tracepoints count in 512-byte sectors whatever the device's logical block size.
pub(crate) const SECTOR: u64 = 512;

/// A block device being tracked, as resolved when tracking started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedDevice {
    /// The path as given (a symlink such as /dev/disk/by-id/… is kept as is).
    pub path: PathBuf,
    /// `(major, minor)` of the device itself.
    pub dev: (u32, u32),
    /// `(major, minor)` of the whole disk (the same as `dev` unless a partition).
    pub disk: (u32, u32),
    /// First sector of the device on its disk (0 for a whole disk).
    pub start_sector: u64,
    /// Size in sectors when tracking started.
    pub size_sectors: u64,
}

impl TrackedDevice {
    /// Looks the device up in /dev and /sys/dev/block.
    pub fn resolve(path: &Path) -> Result<Self, TrackerError> {
        let io_err = |source| TrackerError::Device { path: path.to_owned(), source };
        let meta = fs::metadata(path).map_err(io_err)?;
        if !meta.file_type().is_block_device() {
            return Err(TrackerError::NotBlockDevice(path.to_owned()));
        }
        let dev = split_rdev(meta.rdev());
        let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
        let sys = fs::canonicalize(&sys).map_err(|e| sysfs_err(path, &sys, e.to_string()))?;
        let size_sectors = read_u64(path, &sys.join("size"))?;
        if sys.join("partition").exists() {
            let start_sector = read_u64(path, &sys.join("start"))?;
            let parent = sys.parent().unwrap_or(&sys).join("dev");
            let disk = parse_dev(&read_string(path, &parent)?)
                .ok_or_else(|| sysfs_err(path, &parent, "not MAJOR:MINOR".into()))?;
            Ok(Self { path: path.to_owned(), dev, disk, start_sector, size_sectors })
        } else {
            Ok(Self { path: path.to_owned(), dev, disk: dev, start_sector: 0, size_sectors })
        }
    }

    /// Whether this is a partition of a larger disk.
    pub fn is_partition(&self) -> bool {
        self.dev != self.disk
    }

    /// The disk's dev_t in the kernel's internal encoding (MKDEV), as the tracepoints see it.
    pub(crate) fn kernel_disk_dev(&self) -> u32 {
        mkdev(self.disk)
    }

    /// The window of its disk's sectors this device covers, for the accumulator.
    pub(crate) fn target(&self) -> crate::worker::Target {
        // A whole disk is not clipped at its end: it may grow (losetup -c) while tracked.
        let end = if self.is_partition() { self.start_sector.saturating_add(self.size_sectors) } else { u64::MAX };
        crate::worker::Target { path: self.path.clone(), start: self.start_sector, end }
    }
}

/// Blocks (of `granularity` bytes, counted from `start`) touched by the sector range
/// `[sector, sector + nr_sectors)` clipped to `[start, end)`; inclusive.
pub(crate) fn blocks_touched(
    start: u64,
    end: u64,
    sector: u64,
    nr_sectors: u64,
    granularity: u64,
) -> Option<(u64, u64)> {
    let lo = sector.max(start);
    let hi = sector.saturating_add(nr_sectors).min(end);
    if nr_sectors == 0 || lo >= hi {
        return None;
    }
    let per_block = granularity / SECTOR;
    Some(((lo - start) / per_block, (hi - 1 - start) / per_block))
}

/// The kernel's internal dev_t encoding (MKDEV) of `(major, minor)`.
fn mkdev((major, minor): (u32, u32)) -> u32 {
    (major << 20) | minor
}

/// A `st_dev` or `st_rdev` as the kernel encodes it internally (what tracepoints see).
pub(crate) fn kernel_dev(dev: u64) -> u32 {
    mkdev(split_rdev(dev))
}

/// glibc's `gnu_dev_major`/`gnu_dev_minor` split of `st_rdev`.
pub(crate) fn split_rdev(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

fn parse_dev(s: &str) -> Option<(u32, u32)> {
    let (major, minor) = s.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn read_string(device: &Path, path: &Path) -> Result<String, TrackerError> {
    fs::read_to_string(path).map_err(|e| sysfs_err(device, path, e.to_string()))
}

fn read_u64(device: &Path, path: &Path) -> Result<u64, TrackerError> {
    read_string(device, path)?
        .trim()
        .parse()
        .map_err(|e: std::num::ParseIntError| sysfs_err(device, path, e.to_string()))
}

fn sysfs_err(device: &Path, path: &Path, reason: String) -> TrackerError {
    TrackerError::Sysfs { device: device.to_owned(), path: path.to_owned(), reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 65536; // 128 sectors per block

    #[test]
    fn a_write_inside_one_block_marks_it() {
        assert_eq!(blocks_touched(0, u64::MAX, 8, 8, G), Some((0, 0)));
        assert_eq!(blocks_touched(0, u64::MAX, 128, 128, G), Some((1, 1)));
    }

    #[test]
    fn a_write_across_a_boundary_marks_both_blocks() {
        assert_eq!(blocks_touched(0, u64::MAX, 120, 16, G), Some((0, 1)));
        assert_eq!(blocks_touched(0, u64::MAX, 0, 1280, G), Some((0, 9)));
    }

    #[test]
    fn partition_blocks_count_from_the_partition_start() {
        // Partition at sector 2056 (1 MiB + 4 KiB), 16384 sectors long.
        let (start, end) = (2056, 2056 + 16384);
        assert_eq!(blocks_touched(start, end, 2056, 8, G), Some((0, 0)));
        assert_eq!(blocks_touched(start, end, 2056 + 120, 16, G), Some((0, 1)));
        // A disk write straddling the partition start only marks the part inside.
        assert_eq!(blocks_touched(start, end, 2000, 100, G), Some((0, 0)));
        // Writes outside the window are not the partition's.
        assert_eq!(blocks_touched(start, end, 0, 2056, G), None);
        assert_eq!(blocks_touched(start, end, end, 8, G), None);
        // A write running past the end is clipped to the last block.
        assert_eq!(blocks_touched(start, end, end - 8, 64, G), Some((127, 127)));
    }

    #[test]
    fn empty_ranges_mark_nothing() {
        assert_eq!(blocks_touched(0, u64::MAX, 100, 0, G), None);
    }

    #[test]
    fn rdev_split_matches_glibc() {
        assert_eq!(split_rdev(0x0703), (7, 3));
        assert_eq!(split_rdev(0x10300), (259, 0));
        // Large minors (loop devices past 255) use the high bits.
        assert_eq!(split_rdev((259 << 8) | (0x12 << 20) | 0x34), (259, 0x1234));
        assert_eq!(parse_dev("259:1\n"), Some((259, 1)));
        assert_eq!(parse_dev("garbage"), None);
    }
}
