//! Change tracking for image files on ext4, from the page cache: an eBPF program
//! (src/bpf/files.bpf.c) reports each block of a tracked file that ext4 marks dirty (at
//! every buffered write, and at the first store through a mapping after the page was
//! clean), each direct-I/O write, and each hole punched or range zeroed; truncating,
//! collapsing or inserting ranges reports the file lost. See docs/change-tracking.md
//! "Image files".
//!
//! A mapped page only reports when a store faults on it, after it was clean. So each take
//! writes the file back (`sync_file_range`) after collecting its records: every page is
//! clean and write-protected again, and the next store to it reports. Pages dirtied
//! before tracking began are written back when it starts.

use std::fs::File;
use std::mem::MaybeUninit;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore as _, MapFlags};

use crate::bpf::{FilesSkel, FilesSkelBuilder};
use crate::device::kernel_dev;
use crate::worker::{self, Command, Started, Target};
use crate::{DirtySet, TrackerError, TrackerOptions, pin, privileges, sys};

/// `statfs` magic of ext4 (and ext2/ext3, which ext4 mounts).
const EXT4_MAGIC: i64 = 0xEF53;

/// Inode flags under which ext4 writes file data without marking page-cache blocks dirty
/// (include/uapi/linux/fs.h).
const FS_JOURNAL_DATA_FL: u32 = 0x0000_4000;
const FS_DAX_FL: u32 = 0x0200_0000;

/// The super-block options of the filesystem on `dev` (a `st_dev`), from mountinfo.
fn ext4_options(mountinfo: &str, dev: u64) -> impl Iterator<Item = &str> {
    let (major, minor) = crate::device::split_rdev(dev);
    let id = format!("{major}:{minor}");
    let line = mountinfo.lines().find(|l| l.split(' ').nth(2) == Some(id.as_str()));
    let supers = line.and_then(|l| l.split_once(" - ")).and_then(|(_, rest)| rest.split(' ').nth(2));
    supers.unwrap_or_default().split(',')
}

/// The mount table, to check the mount options of `path`'s filesystem.
fn read_mountinfo(path: &Path) -> Result<String, TrackerError> {
    std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| TrackerError::Untrackable {
        path: path.to_owned(),
        reason: format!("cannot read /proc/self/mountinfo ({e}) to check the mount options"),
    })
}

/// Mount options under which file data is journalled or written in place (DAX), not
/// through dirty page-cache blocks, so the program would not see it.
fn data_bypasses_buffers(option: &str) -> bool {
    option == "data=journal" || option == "dax" || option == "dax=always"
}

/// An image file being tracked, as resolved when tracking started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedFile {
    /// The path as given.
    pub path: PathBuf,
    /// `st_dev` of the filesystem holding it.
    pub dev: u64,
    /// Its inode number.
    pub ino: u64,
}

impl TrackedFile {
    /// Checks that `path` is a regular file on ext4, the filesystem whose ways of changing
    /// a file's data the program follows, whose data goes through the page cache (not
    /// journalled, not DAX), and notes its identity.
    pub fn resolve(path: &Path) -> Result<Self, TrackerError> {
        Self::resolve_in(path, &read_mountinfo(path)?)
    }

    /// [`TrackedFile::resolve`] with the mount table already read (`mountinfo`).
    fn resolve_in(path: &Path, mountinfo: &str) -> Result<Self, TrackerError> {
        let io_err = |source| TrackerError::Device { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(io_err)?;
        if !meta.is_file() {
            return Err(TrackerError::NotRegularFile(path.to_owned()));
        }
        let fs = nix::sys::statfs::statfs(path).map_err(|e| io_err(e.into()))?;
        let magic = fs.filesystem_type().0 as i64;
        if magic != EXT4_MAGIC {
            return Err(TrackerError::UnsupportedFilesystem { path: path.to_owned(), magic });
        }
        let untrackable = |reason: String| TrackerError::Untrackable { path: path.to_owned(), reason };
        if let Some(opt) = ext4_options(mountinfo, meta.dev()).find(|o| data_bypasses_buffers(o)) {
            return Err(untrackable(format!("its filesystem is mounted with {opt}")));
        }
        let flags = sys::inode_flags(&File::open(path).map_err(io_err)?).map_err(io_err)?;
        if flags & (FS_JOURNAL_DATA_FL | FS_DAX_FL) != 0 {
            return Err(untrackable("it has the journalled-data (+j) or DAX (+x) attribute".into()));
        }
        Ok(Self { path: path.to_owned(), dev: meta.dev(), ino: meta.ino() })
    }

    /// Whether `path` still names this file (not a new file renamed over it).
    fn unchanged(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }

    /// The key of the program's `files` map: inode number, kernel dev_t, padding.
    fn key(&self) -> [u8; 16] {
        let mut key = [0; 16];
        key[..8].copy_from_slice(&self.ino.to_ne_bytes());
        key[8..12].copy_from_slice(&kernel_dev(self.dev).to_ne_bytes());
        key
    }
}

/// A running image-file tracker. Dropping it detaches the eBPF program, unless pinned
/// (`TrackerOptions::pin_dir`, as for [`crate::BlockTracker`]).
#[derive(Debug)]
pub struct FileTracker {
    files: Vec<TrackedFile>,
    worker: worker::Handle,
}

impl FileTracker {
    /// Loads and attaches the eBPF program for `files` (regular files on ext4), with
    /// `granularity`-byte tracking blocks (a power of two, at least 4096), and writes
    /// back what the page cache holds dirty of them.
    pub fn start(files: &[PathBuf], granularity: u64) -> Result<Self, TrackerError> {
        Self::start_with(files, TrackerOptions::new(granularity))
    }

    /// [`FileTracker::start`] with explicit [`TrackerOptions`]. With a pin directory the
    /// program and its maps are pinned there, as the block tracker's are (in a directory
    /// of their own, so both kinds can share one pin directory), and a tracker that finds
    /// pins for the same files (same inodes) resumes them.
    ///
    /// Before that, a test write to a temporary file on each files' filesystem must come
    /// back as a dirty block (see [`canary`]), or the files are refused as
    /// [`TrackerError::Untrackable`].
    pub fn start_with(files: &[PathBuf], options: TrackerOptions) -> Result<Self, TrackerError> {
        options.validate()?;
        let mountinfo = match files.first() {
            Some(first) => read_mountinfo(first)?,
            None => String::new(),
        };
        let files = files.iter().map(|p| TrackedFile::resolve_in(p, &mountinfo)).collect::<Result<Vec<_>, _>>()?;
        if files.len() > worker::MAX_SLOTS {
            return Err(TrackerError::TooManyFiles(files.len()));
        }
        privileges::check()?;
        crate::route_libbpf_logs();
        let mut checked = std::collections::BTreeSet::new();
        for f in &files {
            if checked.insert(f.dev) {
                canary(f, &mountinfo)?;
            }
        }
        Self::spawn(files, options)
    }

    fn spawn(files: Vec<TrackedFile>, options: TrackerOptions) -> Result<Self, TrackerError> {
        let tracked = files.clone();
        let worker = worker::spawn_thread("file-tracker", options, move |options, ready, inbox| {
            run(tracked, options, ready, inbox)
        })?;
        Ok(Self { files, worker })
    }

    /// Whether the program is pinned (tracking goes on after this tracker ends).
    pub fn pinned(&self) -> bool {
        self.worker.pinned()
    }

    /// Whether this tracker continued pinned tracking that an earlier one suspended, as
    /// [`crate::BlockTracker::resumed`].
    pub fn resumed(&self) -> bool {
        self.worker.resumed()
    }

    /// The last take of a pinned tracker, as [`crate::BlockTracker::suspend`] (the files
    /// are written back as at every take).
    pub fn suspend(self) -> Result<DirtySet, TrackerError> {
        self.worker.suspend()
    }

    /// The files being tracked, as resolved at start.
    pub fn files(&self) -> &[TrackedFile] {
        &self.files
    }

    /// Tracking block size in bytes.
    pub fn granularity(&self) -> u64 {
        self.worker.granularity()
    }

    /// The blocks written since the previous call (or since start), per file in the order
    /// given, as [`crate::BlockTracker::take_dirty`]. Before it returns, each file with
    /// blocks in the set is written back, so a later write to them is in the next set. A
    /// file that was truncated, had ranges collapsed or inserted, was replaced by another
    /// under its path, or could not be written back is `lost`.
    pub fn take_dirty(&self) -> Result<DirtySet, TrackerError> {
        self.worker.take()
    }
}

fn run(
    files: Vec<TrackedFile>,
    options: TrackerOptions,
    ready: Sender<Result<Started, TrackerError>>,
    inbox: Receiver<Command>,
) {
    let mut storage = MaybeUninit::uninit();
    let filter = files.iter().enumerate().map(|(slot, f)| (f.key().to_vec(), slot as u32)).collect();
    // A skeleton loaded here must live as long as the loop: unpinned, dropping it
    // detaches the program.
    let loaded = worker::setup(&options, &pin::FILES, &filter, || load(&mut storage, &files, &options), file_links);
    let prepared = loaded.and_then(|set| {
        let opened = open_and_write_back(&files)?;
        let targets = files.iter().map(|f| Target { path: f.path.clone(), start: 0, end: u64::MAX }).collect();
        let slot_of: Vec<u32> = (0..files.len() as u32).collect();
        let (acc, ring) = worker::accumulate(&set, targets, &slot_of, files.len(), options.granularity)?;
        Ok((set, opened, acc, ring))
    });
    let (set, opened, acc, ring) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(set.started)).is_err() {
        return;
    }
    tracing::debug!(files = files.len(), started = ?set.started, "image-file tracker attached");
    // Files found replaced under their path (warned about once).
    let mut replaced = vec![false; files.len()];
    worker::serve(&ring, &inbox, options.drain_interval, "image-file", |suspending| {
        let mut taken = worker::take(&acc, &set.maps, files.len(), suspending)?;
        for (i, device) in taken.devices.iter_mut().enumerate() {
            let file = &files[i];
            if !file.unchanged() {
                if !std::mem::replace(&mut replaced[i], true) {
                    tracing::warn!(path = %file.path.display(), "a tracked image file was replaced by another under its path: it is compared whole at every look until tracking restarts");
                }
                device.lost = true;
            }
            if device.blocks.is_empty() && !device.lost {
                continue;
            }
            if let Err(e) = sys::write_back(&opened[i]) {
                tracing::warn!(path = %file.path.display(), error = %e, "could not write back a tracked image file: it is reported lost, to be compared whole");
                device.lost = true;
            }
        }
        taken.lost = taken.devices.iter().any(|d| d.lost);
        Ok(taken)
    });
}

/// The file program's links, in [`pin::FILES`]' order.
fn file_links<'a>(skel: &'a mut FilesSkel<'_>) -> Vec<Option<&'a mut libbpf_rs::Link>> {
    let l = &mut skel.links;
    vec![
        l.on_dirty_buffer.as_mut(),
        l.on_dio_begin.as_mut(),
        l.on_dio_complete.as_mut(),
        l.on_punch_hole.as_mut(),
        l.on_zero_range.as_mut(),
        l.on_truncate.as_mut(),
        l.on_collapse_range.as_mut(),
        l.on_insert_range.as_mut(),
    ]
}

/// Loads the program, fills the file filter, attaches.
fn load<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    files: &[TrackedFile],
    options: &TrackerOptions,
) -> Result<FilesSkel<'obj>, TrackerError> {
    let mut open = FilesSkelBuilder::default().open(storage).map_err(TrackerError::bpf("open the eBPF object"))?;
    open.maps.events.set_max_entries(options.ring_buffer_bytes).map_err(TrackerError::bpf("size the ring buffer"))?;
    if let Some(rodata) = open.maps.rodata_data.as_deref_mut() {
        rodata.page_shift = page_size().trailing_zeros();
    }
    let mut skel = open.load().map_err(TrackerError::bpf("load the eBPF program"))?;
    // Fill the filter before attaching so no change to a tracked file is missed.
    for (slot, file) in files.iter().enumerate() {
        skel.maps
            .files
            .update(&file.key(), &(slot as u32).to_ne_bytes(), MapFlags::ANY)
            .map_err(TrackerError::bpf("fill the file filter"))?;
    }
    skel.attach().map_err(TrackerError::bpf("attach to the page-cache tracepoints"))?;
    Ok(skel)
}

/// Checks that writes to files on `file`'s filesystem reach the program: tracks an unnamed
/// temporary file (`O_TMPFILE`) in its directory (or in /var/tmp or /tmp when on the same
/// filesystem), writes a block to it, and expects that block back. Its data is written as the tracked files' is, so this catches what the
/// checks of [`TrackedFile::resolve`] cannot: a kernel whose ext4 no longer marks buffers
/// dirty (buffered I/O moved to iomap), a device number the program sees otherwise than
/// `stat` (a stacking filesystem), a tracepoint that never fires. Without it those would
/// report nothing, and nothing written would ever be sent.
fn canary(file: &TrackedFile, mountinfo: &str) -> Result<(), TrackerError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let untrackable = |reason: String| TrackerError::Untrackable { path: file.path.clone(), reason };
    // Its directory, else a usual scratch directory on the same filesystem (the images'
    // directory may be mounted read-only in the agent's container).
    let parent = file.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut failures = Vec::new();
    let mut made = None;
    for dir in [parent, Path::new("/var/tmp"), Path::new("/tmp")] {
        if dir != parent && !std::fs::metadata(dir).is_ok_and(|m| m.dev() == file.dev) {
            continue;
        }
        match std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).open(dir) {
            Ok(f) => {
                made = Some(f);
                break;
            }
            Err(e) => failures.push(format!("{}: {e}", dir.display())),
        }
    }
    let tmp = made.ok_or_else(|| {
        untrackable(format!("no test file could be made on its filesystem to check tracking ({})", failures.join("; ")))
    })?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", tmp.as_raw_fd()));
    // One record comes back: a small ring buffer does.
    let options = TrackerOptions { ring_buffer_bytes: 64 * 1024, ..TrackerOptions::new(4096) };
    let tracker = FileTracker::spawn(vec![TrackedFile::resolve_in(&path, mountinfo)?], options)?;
    tmp.write_all_at(&[0x5a; 4096], 4096).map_err(|e| untrackable(format!("the test write failed ({e})")))?;
    let set = tracker.take_dirty()?;
    if set.devices[0].blocks != [1] || set.lost {
        return Err(untrackable(format!(
            "a test write to a file beside it was not reported (got blocks {:?}): this kernel's ext4 changes data in a way the tracker does not follow",
            set.devices[0].blocks
        )));
    }
    Ok(())
}

/// Opens each file and writes back its dirty pages, which were dirtied before the
/// program attached and would not report their next write.
fn open_and_write_back(files: &[TrackedFile]) -> Result<Vec<File>, TrackerError> {
    files
        .iter()
        .map(|f| {
            let io_err = |source| TrackerError::Device { path: f.path.clone(), source };
            let file = File::open(&f.path).map_err(io_err)?;
            sys::write_back(&file).map_err(io_err)?;
            Ok(file)
        })
        .collect()
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().map_or(4096, |n| n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_come_from_the_files_filesystem() {
        let info = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,data=ordered\n\
                    40 27 7:3 / /mnt rw - ext4 /dev/loop3 rw,data=journal\n";
        let vda = 254u64 << 8;
        let loop3 = (7u64 << 8) | 3;
        assert_eq!(ext4_options(info, vda).collect::<Vec<_>>(), ["rw", "discard", "data=ordered"]);
        assert!(!ext4_options(info, vda).any(data_bypasses_buffers));
        assert!(ext4_options(info, loop3).any(data_bypasses_buffers));
        assert_eq!(ext4_options(info, 99).collect::<Vec<_>>(), [""]);
        assert!(data_bypasses_buffers("dax=always") && !data_bypasses_buffers("dax=never"));
    }
}
