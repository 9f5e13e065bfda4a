//! Real page-cache tracking of image files on ext4: buffered, mapped and direct writes,
//! punched holes and truncation must come back as the blocks they touched (or `lost`),
//! and a copy kept up to date from the dirty sets alone must equal the file.
// Mapping a file for the writable-mapping cases needs mmap.
#![allow(unsafe_code)]

mod common;

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{BpfFs, G, LoopDevice, MIB, blocks, ebpf_available, open_direct, set, write_direct};
use siterecovery_tracker::{BlockTracker, DirtySet, FileTracker, TrackerError, TrackerOptions};

fn dirty(set: &DirtySet) -> BTreeSet<u64> {
    set.devices[0].blocks.iter().copied().collect()
}

/// A directory on the filesystem holding the build (ext4 on these machines: /tmp may be
/// a tmpfs, which the tracker refuses); `None`, saying why, where eBPF tracking cannot run
/// or that filesystem is not ext4.
fn ext4_dir() -> Option<tempfile::TempDir> {
    if !ebpf_available() {
        return None;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let kind = nix::sys::statfs::statfs(dir.path()).expect("statfs").filesystem_type();
    if kind != nix::sys::statfs::EXT4_SUPER_MAGIC {
        eprintln!("skipping: {} is not on ext4", dir.path().display());
        return None;
    }
    Some(dir)
}

/// An image of `size` bytes, written through so that no page of it starts dirty.
fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    let f = File::create(&path).expect("create image");
    f.write_all_at(&vec![0x5a; size as usize], 0).expect("fill image");
    f.sync_all().expect("sync image");
    path
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(path).expect("open image")
}

#[test]
fn buffered_writes_are_reported_once_and_again_after_each_take() {
    let Some(dir) = ext4_dir() else { return };
    let path = image(dir.path(), "a.img", 16 * MIB);
    let tracker = FileTracker::start(std::slice::from_ref(&path), G).unwrap();
    let f = open_rw(&path);

    f.write_all_at(&[1; 4096], 0).unwrap(); // block 0
    f.write_all_at(&[2; 100], 5 * G + 10).unwrap(); // block 5
    f.write_all_at(&[3; 8192], 10 * G - 4096).unwrap(); // blocks 9 and 10
    let first = tracker.take_dirty().unwrap();
    assert_eq!(first.devices[0].path, path);
    assert_eq!(dirty(&first), set(&[0, 5, 9, 10]));
    assert!(!first.lost);
    assert_eq!(dirty(&tracker.take_dirty().unwrap()), BTreeSet::new(), "a take hands over its blocks");

    // The take wrote the pages back: writing one again reports it again, though the
    // kernel only reports a page when it goes from clean to dirty.
    f.write_all_at(&[4; 10], 5 * G + 20).unwrap();
    f.write_all_at(&[5; 10], 5 * G + 30).unwrap();
    assert_eq!(dirty(&tracker.take_dirty().unwrap()), set(&[5]));
    f.write_all_at(&[6; 10], 5 * G + 40).unwrap();
    assert_eq!(dirty(&tracker.take_dirty().unwrap()), set(&[5]));
}

#[test]
fn pages_dirty_before_tracking_report_their_next_write() {
    let Some(dir) = ext4_dir() else { return };
    let path = image(dir.path(), "b.img", 4 * MIB);
    let f = open_rw(&path);
    f.write_all_at(&[1; 4096], 3 * G).unwrap(); // dirty, never written back
    let tracker = FileTracker::start(std::slice::from_ref(&path), G).unwrap();
    let _ = tracker.take_dirty().unwrap();
    f.write_all_at(&[2; 4096], 3 * G).unwrap();
    assert_eq!(dirty(&tracker.take_dirty().unwrap()), set(&[3]));
}

#[test]
fn mapped_direct_and_hole_punching_writes_are_reported() {
    let Some(dir) = ext4_dir() else { return };
    let path = image(dir.path(), "c.img", 16 * MIB);
    let tracker = FileTracker::start(std::slice::from_ref(&path), G).unwrap();

    // Stores through one shared mapping, held by another process across takes: only
    // the first store to a clean page faults, so the take must make the page clean again.
    let mut mapper = Command::new("python3")
        .args(["-c", "import mmap,os,sys\nm=mmap.mmap(os.open(sys.argv[1],os.O_RDWR),0)\nfor l in sys.stdin:\n    o=int(l)\n    m[o:o+8]=b'x'*8\n    print('ok',flush=True)"])
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut answers = std::io::BufReader::new(mapper.stdout.take().unwrap());
    let mut poke = |offset: u64| {
        writeln!(mapper.stdin.as_mut().unwrap(), "{offset}").unwrap();
        let mut line = String::new();
        answers.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ok", "the mapping process failed");
    };
    // The fault marks every block of the page's folio, which may be a large one (up to
    // 2 MiB here): the stored-to block and no more than its folio.
    let in_folio = |set: &DirtySet| {
        let got = dirty(set);
        assert!(got.contains(&7), "the mapped store's block: {got:?}");
        assert!(got.iter().all(|&b| b < 2 * MIB / G), "blocks outside the folio: {got:?}");
    };
    poke(7 * G + 100);
    in_folio(&tracker.take_dirty().unwrap());
    poke(7 * G + 200);
    in_folio(&tracker.take_dirty().unwrap());
    poke(7 * G + 300);
    in_folio(&tracker.take_dirty().unwrap());
    drop(mapper.stdin.take());
    assert!(mapper.wait().unwrap().success());

    write_direct(&open_direct(&path), 12 * G, 2 * G as usize, 9);
    let taken = tracker.take_dirty().unwrap();
    assert_eq!(dirty(&taken), blocks(12 * G, 2 * G));
    assert_eq!(taken.records, 2, "one record when the direct write begins, one when it completes");

    let fallocate = |mode: &str, offset: u64, len: u64| {
        let status = Command::new("fallocate")
            .args([mode, "-o", &offset.to_string(), "-l", &len.to_string()])
            .arg(&path)
            .status()
            .expect("fallocate");
        assert!(status.success());
    };
    fallocate("-p", 20 * G, G);
    fallocate("-z", 30 * G, 4096);
    let taken = tracker.take_dirty().unwrap();
    assert_eq!(dirty(&taken), set(&[20, 30]));
    assert!(!taken.lost);

    // Reads are not writes.
    let mut buf = vec![0; MIB as usize];
    File::open(&path).unwrap().read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(dirty(&tracker.take_dirty().unwrap()), BTreeSet::new());
}

#[test]
fn truncation_and_replacement_are_reported_lost() {
    let Some(dir) = ext4_dir() else { return };
    let path = image(dir.path(), "d.img", 4 * MIB);
    let other = image(dir.path(), "other.img", 4 * MIB);
    let tracker = FileTracker::start(&[path.clone(), other.clone()], G).unwrap();

    open_rw(&other).write_all_at(&[1; 10], G).unwrap();
    let taken = tracker.take_dirty().unwrap();
    assert_eq!(taken.devices[0].blocks, Vec::<u64>::new(), "another file's writes are its own");
    assert_eq!(taken.devices[1].blocks, vec![1]);

    open_rw(&path).set_len(2 * MIB).unwrap();
    let taken = tracker.take_dirty().unwrap();
    assert!(taken.devices[0].lost && taken.lost, "a shrunk file must be compared whole");
    assert!(!taken.devices[1].lost);
    assert!(!tracker.take_dirty().unwrap().lost, "the loss is reported once");

    let replacement = image(dir.path(), "new.img", 4 * MIB);
    std::fs::rename(&replacement, &path).unwrap();
    assert!(tracker.take_dirty().unwrap().devices[0].lost, "a file renamed over the tracked one");
}

#[test]
fn what_cannot_be_tracked_is_refused_with_a_clear_error() {
    let Some(dir) = ext4_dir() else { return };
    let err = FileTracker::start(&[dir.path().to_owned()], G).unwrap_err();
    assert!(matches!(err, TrackerError::NotRegularFile(_)), "{err}");
    let shm = tempfile::NamedTempFile::new_in("/dev/shm").expect("a file on tmpfs");
    let err = FileTracker::start(&[shm.path().to_owned()], G).unwrap_err();
    assert!(matches!(err, TrackerError::UnsupportedFilesystem { .. }), "{err}");
    assert!(err.to_string().contains("ext4"), "{err}");
    // Journalled data is written without marking page-cache blocks dirty.
    let journalled = image(dir.path(), "j.img", MIB);
    let chattr = Command::new("chattr").arg("+j").arg(&journalled).stderr(std::process::Stdio::null()).status();
    if chattr.is_ok_and(|s| s.success()) {
        let err = FileTracker::start(&[journalled], G).unwrap_err();
        assert!(matches!(err, TrackerError::Untrackable { .. }), "{err}");
        assert!(err.to_string().contains("journalled"), "{err}");
    } else {
        eprintln!("not checked: chattr +j is not allowed here (it needs CAP_SYS_RESOURCE)");
    }
    let err = FileTracker::start(&[dir.path().join("missing")], G).unwrap_err();
    assert!(matches!(err, TrackerError::Device { .. }), "{err}");
}

/// A shared, writable mapping of a whole file, unmapped on drop.
struct Mapping {
    at: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(file: &File, len: usize) -> Self {
        use std::os::fd::AsRawFd;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: maps a file this test keeps open; no Rust object aliases the region.
        let at = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        assert_ne!(at, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        Self { at: at.cast(), len }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped for `len` bytes while `self` lives, and the
        // `&mut self` borrow makes this the only slice over it.
        unsafe { std::slice::from_raw_parts_mut(self.at, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no slice over it outlives `self`.
        unsafe { libc::munmap(self.at.cast(), self.len) };
    }
}

/// What the agent relies on: a copy updated only from the blocks each take reports,
/// read after the take, equals the file once the writers stop (buffered writes and stores
/// through a mapping), however the writes and the takes interleave.
#[test]
fn a_copy_kept_from_the_dirty_sets_equals_the_file() {
    let Some(dir) = ext4_dir() else { return };
    let size = 32 * MIB;
    let path = image(dir.path(), "e.img", size);
    let mut copy = std::fs::read(&path).unwrap();
    let tracker = FileTracker::start(std::slice::from_ref(&path), G).unwrap();
    let reader = File::open(&path).unwrap();
    let refresh = |copy: &mut Vec<u8>, set: &DirtySet| {
        assert!(!set.lost, "nothing should be lost under a light load");
        for &b in &set.devices[0].blocks {
            let at = (b * G) as usize;
            reader.read_exact_at(&mut copy[at..at + G as usize], b * G).unwrap();
        }
    };
    let stop = AtomicBool::new(false);
    let takes = std::thread::scope(|s| {
        s.spawn(|| {
            let f = open_rw(&path);
            let mut x: u64 = 0x2545_F491_4F6C_DD1D;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 1 + (x >> 40) % 9000;
                let offset = x % (size - len);
                f.write_all_at(&vec![x as u8; len as usize], offset).unwrap();
            }
        });
        // Stores through a shared mapping of the same file, racing the takes too.
        s.spawn(|| {
            let f = open_rw(&path);
            let mut map = Mapping::new(&f, size as usize);
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 1 + (x >> 40) % 300;
                let offset = (x % (size - len)) as usize;
                map.bytes()[offset..offset + len as usize].fill(x as u8);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut takes = 0;
        while Instant::now() < deadline {
            refresh(&mut copy, &tracker.take_dirty().unwrap());
            takes += 1;
        }
        stop.store(true, Ordering::Relaxed);
        takes
    });
    refresh(&mut copy, &tracker.take_dirty().unwrap());
    assert!(takes > 10, "only {takes} takes raced the writer");
    let file = std::fs::read(&path).unwrap();
    let differ: Vec<u64> = (0..size / G)
        .filter(|&b| copy[(b * G) as usize..((b + 1) * G) as usize] != file[(b * G) as usize..((b + 1) * G) as usize])
        .collect();
    assert!(differ.is_empty(), "blocks changed without being reported: {differ:?}");
}

fn pinned_files(files: &[PathBuf], pin_dir: &Path) -> FileTracker {
    let options = TrackerOptions { pin_dir: Some(pin_dir.to_owned()), ..TrackerOptions::new(G) };
    FileTracker::start_with(files, options).unwrap()
}

fn pinned_device(device: &Path, pin_dir: &Path) -> BlockTracker {
    let options = TrackerOptions { pin_dir: Some(pin_dir.to_owned()), ..TrackerOptions::new(G) };
    BlockTracker::start_with(&[device.to_owned()], options).unwrap()
}

/// As for block devices (tests/pinning.rs): pinned, image-file tracking goes on while no
/// tracker runs, is taken over by another build's tracker, and both kinds share one pin
/// directory without removing each other's.
#[test]
fn image_file_tracking_pinned_reaches_the_next_tracker() {
    let Some(dir) = ext4_dir() else { return };
    let bpffs = BpfFs::mount();
    let pins = bpffs.path.join("server");
    let path = image(dir.path(), "p.img", 4 * MIB);
    let files = std::slice::from_ref(&path);
    let disk = LoopDevice::new(4 * MIB);
    let f = open_rw(&path);

    let (first, device) = (pinned_files(files, &pins), pinned_device(&disk.path, &pins));
    assert!(!first.resumed() && first.pinned());
    f.write_all_at(&[1; 10], 3 * G).unwrap();
    assert_eq!(dirty(&first.suspend().unwrap()), set(&[3]));
    write_direct(&open_direct(&disk.path), 2 * G, 4096, 1);
    assert_eq!(dirty(&device.suspend().unwrap()), set(&[2]));

    // No tracker runs: the pinned programs record into their ring buffers.
    f.write_all_at(&[2; 10], 7 * G).unwrap();
    write_direct(&open_direct(&disk.path), 5 * G, 4096, 2);

    let (second, device) = (pinned_files(files, &pins), pinned_device(&disk.path, &pins));
    assert!(second.resumed() && device.resumed(), "both suspended cleanly, neither removed the other's pins");
    f.write_all_at(&[3; 10], 9 * G).unwrap();
    let taken = second.take_dirty().unwrap();
    assert_eq!(dirty(&taken), set(&[7, 9]), "the write made while no tracker ran, then the new one");
    assert!(!taken.lost);
    assert_eq!(dirty(&device.take_dirty().unwrap()), set(&[5]));
    drop(device);

    // An upgrade: the pins become another build's (same maps version, another program
    // id), which the next tracker takes over.
    assert!(dirty(&second.suspend().unwrap()).is_empty());
    let ours = std::fs::read_dir(&pins).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap());
    let ours: Vec<String> = ours.filter(|n| n.starts_with("files-")).collect();
    let (version, _) = ours[0].rsplit_once('-').unwrap();
    std::fs::rename(pins.join(&ours[0]), pins.join(format!("{version}-00000000000000ff"))).unwrap();
    f.write_all_at(&[4; 10], 11 * G).unwrap();
    let upgraded = pinned_files(files, &pins);
    assert!(upgraded.resumed(), "taken over");
    assert!(!pins.join(format!("{version}-00000000000000ff")).exists() && pins.join(&ours[0]).exists());
    let taken = upgraded.take_dirty().unwrap();
    assert_eq!(dirty(&taken), set(&[11]), "the write the earlier program recorded");
    assert!(!taken.lost);

    // Ended without suspending (as a killed agent would): the next take reports it lost.
    drop(upgraded);
    let third = pinned_files(files, &pins);
    assert!(!third.resumed());
    assert!(third.take_dirty().unwrap().lost, "the file must be compared whole");
    drop(third);

    // Another file under the same pins: not resumed.
    let other = image(dir.path(), "q.img", MIB);
    assert!(!pinned_files(std::slice::from_ref(&other), &pins).resumed());
}

/// An image seen through a read-only bind mount (as in an agent container): the test write
/// goes to /var/tmp or /tmp when one is on the same filesystem, and writes made through
/// the writable path are tracked through the read-only one.
#[test]
fn an_image_under_a_read_only_mount_is_tracked() {
    let Some(dir) = ext4_dir() else { return };
    let (source, view) = (dir.path().join("rw"), dir.path().join("ro"));
    std::fs::create_dir_all(&source).unwrap();
    std::fs::create_dir_all(&view).unwrap();
    let path = image(&source, "r.img", MIB);
    let run = |args: &[&str]| assert!(Command::new("mount").args(args).status().unwrap().success(), "mount {args:?}");
    run(&["--bind", source.to_str().unwrap(), view.to_str().unwrap()]);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(view.clone());
    run(&["-o", "remount,ro,bind", view.to_str().unwrap()]);

    let scratch_on_same_fs = ["/var/tmp", "/tmp"].iter().any(|d| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(d).is_ok_and(|m| m.dev() == std::fs::metadata(&path).unwrap().dev())
    });
    match FileTracker::start(&[view.join("r.img")], G) {
        Ok(tracker) => {
            assert!(scratch_on_same_fs);
            open_rw(&path).write_all_at(&[1; 10], 3 * G).unwrap();
            assert_eq!(dirty(&tracker.take_dirty().unwrap()), set(&[3]));
        }
        Err(e) => {
            assert!(!scratch_on_same_fs, "{e}");
            assert!(matches!(e, TrackerError::Untrackable { .. }) && e.to_string().contains("test file"), "{e}");
        }
    }
}

/// Records the ring buffer had no room for make the file `lost`, once.
#[test]
fn a_full_ring_buffer_reports_the_file_lost() {
    let Some(dir) = ext4_dir() else { return };
    let path = image(dir.path(), "full.img", 4 * MIB);
    let options = TrackerOptions {
        // One page holds ~170 records; drain too rarely to keep up.
        ring_buffer_bytes: 4096,
        drain_interval: Duration::from_secs(3600),
        ..TrackerOptions::new(G)
    };
    let tracker = FileTracker::start_with(std::slice::from_ref(&path), options).unwrap();
    // 1 MiB of buffered writes: 256 dirty blocks, a record each.
    open_rw(&path).write_all_at(&vec![7; MIB as usize], 0).unwrap();
    let taken = tracker.take_dirty().unwrap();
    assert!(taken.lost && taken.devices[0].lost, "overflow went unnoticed");
    open_rw(&path).write_all_at(&[1; 10], 40 * G).unwrap();
    let next = tracker.take_dirty().unwrap();
    assert!(!next.lost, "the loss is reported once");
    assert_eq!(dirty(&next), set(&[40]));
}
