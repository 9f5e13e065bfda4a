//! Real block-layer tracking on loop devices: writes at known offsets must come back as
//! exactly the blocks they touched, on the right device, once.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{G, LoopDevice, MIB, Zram, blocks, ebpf_available, open_direct, read_direct, set, write_direct};
use siterecovery_tracker::{BlockTracker, DirtySet, TrackerError, TrackerOptions};

fn dirty(set: &DirtySet, device: usize) -> BTreeSet<u64> {
    set.devices[device].blocks.iter().copied().collect()
}

#[test]
fn reports_exactly_the_written_blocks_once() {
    if !ebpf_available() {
        return;
    }
    let disk = LoopDevice::new(64 * MIB);
    let tracker = BlockTracker::start(std::slice::from_ref(&disk.path), G).unwrap();
    let f = open_direct(&disk.path);

    write_direct(&f, 0, 4096, 1); // block 0
    write_direct(&f, 5 * G + 8192, 4096, 2); // block 5
    write_direct(&f, 10 * G - 4096, 8192, 3); // spans blocks 9 and 10
    write_direct(&f, 20 * G, MIB as usize, 4); // blocks 20..=35 (split by the loop driver)
    write_direct(&f, 64 * MIB - 4096, 4096, 5); // last block, 1023

    let first = tracker.take_dirty().unwrap();
    let mut expected = set(&[0, 5, 9, 10, 1023]);
    expected.extend(20..=35);
    assert_eq!(first.devices[0].path, disk.path);
    assert_eq!(dirty(&first, 0), expected);
    assert!(!first.lost, "nothing should be lost with a handful of writes");

    let second = tracker.take_dirty().unwrap();
    assert_eq!(dirty(&second, 0), BTreeSet::new(), "a take hands over its blocks");
    assert!(!second.lost);
}

#[test]
fn each_write_is_reported_at_submission_and_again_at_completion() {
    if !ebpf_available() {
        return;
    }
    let disk = LoopDevice::new(16 * MIB);
    let tracker = BlockTracker::start(std::slice::from_ref(&disk.path), G).unwrap();
    write_direct(&open_direct(&disk.path), 2 * G, 4096, 1);
    let taken = tracker.take_dirty().unwrap();
    assert_eq!(dirty(&taken, 0), set(&[2]));
    // The completion record is what re-marks a block whose write was still in flight
    // while the agent read it; without it a take could hand over stale data.
    assert_eq!(taken.records, 2, "one record at block_bio_queue, one at block_bio_complete");
}

#[test]
fn bio_based_disks_are_tracked_too() {
    if !ebpf_available() {
        return;
    }
    let Some(zram) = Zram::new(16 * MIB) else {
        eprintln!("skipping the bio-based case: this kernel has no zram");
        return;
    };
    let tracker = BlockTracker::start(std::slice::from_ref(&zram.path), G).unwrap();
    let f = open_direct(&zram.path);
    write_direct(&f, 3 * G - 4096, 8192, 1);
    let taken = tracker.take_dirty().unwrap();
    assert_eq!(dirty(&taken, 0), set(&[2, 3]));
    // zram completes bios itself (no request): the completion record comes from
    // block_bio_complete and the range remembered at submission.
    assert_eq!(taken.records, 2);
    assert!(!taken.lost);
}

#[test]
fn writes_to_untracked_devices_are_not_reported() {
    if !ebpf_available() {
        return;
    }
    let tracked = LoopDevice::new(16 * MIB);
    let other = LoopDevice::new(16 * MIB);
    let tracker = BlockTracker::start(std::slice::from_ref(&tracked.path), G).unwrap();

    write_direct(&open_direct(&other.path), 3 * G, 4096, 7);
    write_direct(&open_direct(&tracked.path), 7 * G, 4096, 7);

    let taken = tracker.take_dirty().unwrap();
    assert_eq!(taken.devices.len(), 1);
    assert_eq!(dirty(&taken, 0), set(&[7]));
    assert_eq!(taken.records, 2, "the other device's write reached user space");
}

#[test]
fn reads_are_not_writes_but_discard_and_write_zeroes_are() {
    if !ebpf_available() {
        return;
    }
    let disk = LoopDevice::new(16 * MIB);
    let tracker = BlockTracker::start(std::slice::from_ref(&disk.path), G).unwrap();
    let f = open_direct(&disk.path);
    let mut backing = vec![0u8; 2 * G as usize];
    let skew = (4096 - backing.as_ptr() as usize % 4096) % 4096;
    f.read_exact_at(&mut backing[skew..skew + G as usize], 4 * G).unwrap();
    assert_eq!(dirty(&tracker.take_dirty().unwrap(), 0), BTreeSet::new());

    let blkdiscard = |args: &[&str]| {
        let out = Command::new("blkdiscard").args(args).arg(&disk.path).output().expect("blkdiscard");
        assert!(out.status.success(), "blkdiscard {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    blkdiscard(&["-o", &(2 * MIB).to_string(), "-l", &(2 * G).to_string()]);
    assert_eq!(dirty(&tracker.take_dirty().unwrap(), 0), set(&[32, 33]));
    blkdiscard(&["-z", "-o", &(4 * MIB).to_string(), "-l", &G.to_string()]);
    assert_eq!(dirty(&tracker.take_dirty().unwrap(), 0), set(&[64]));
}

#[test]
fn buffered_writes_count_once_synced() {
    if !ebpf_available() {
        return;
    }
    let disk = LoopDevice::new(16 * MIB);
    let tracker = BlockTracker::start(std::slice::from_ref(&disk.path), G).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&disk.path).unwrap();
    f.write_all_at(&[9u8; 4096], 12 * G + 4096).unwrap();
    f.flush().unwrap();
    f.sync_all().unwrap();
    assert_eq!(dirty(&tracker.take_dirty().unwrap(), 0), set(&[12]));
}

#[test]
fn a_write_during_take_is_never_lost() {
    if !ebpf_available() {
        return;
    }
    let disk = LoopDevice::new(64 * MIB);
    let tracker = BlockTracker::start(std::slice::from_ref(&disk.path), G).unwrap();
    let stop = AtomicBool::new(false);
    let blocks_on_disk = 64 * MIB / G;

    let (written, seen) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let f = open_direct(&disk.path);
            let mut written = BTreeSet::new();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            while !stop.load(Ordering::Relaxed) {
                // xorshift: a spread of blocks, and offsets inside them.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let offset = (x % (64 * MIB / 4096 - 1)) * 4096;
                let len = if x & 1 == 0 { 4096 } else { 8192 };
                write_direct(&f, offset, len, x as u8);
                written.extend(blocks(offset, len as u64));
            }
            written
        });
        let mut seen = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut takes = 0;
        while Instant::now() < deadline {
            let taken = tracker.take_dirty().unwrap();
            assert!(!taken.lost, "the tracker dropped writes under a light load");
            seen.extend(taken.devices[0].blocks.iter().copied());
            takes += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let written = writer.join().unwrap();
        seen.extend(tracker.take_dirty().unwrap().devices[0].blocks.iter().copied());
        assert!(takes > 10, "only {takes} takes raced the writer");
        (written, seen)
    });

    let missing: Vec<_> = written.difference(&seen).collect();
    assert!(missing.is_empty(), "writes lost between takes: {missing:?}");
    let extra: Vec<_> = seen.difference(&written).collect();
    assert!(extra.is_empty(), "blocks reported that were never written: {extra:?}");
    assert!(seen.iter().all(|&b| b < blocks_on_disk));
}

#[test]
fn partition_writes_map_to_partition_relative_blocks() {
    if !ebpf_available() {
        return;
    }
    let mut disk = LoopDevice::new(64 * MIB);
    // 1 MiB + 4 KiB: deliberately not aligned to the tracking block.
    let start_sectors = 2056;
    let part = disk.add_partition(start_sectors, 16384); // 8 MiB
    let start = start_sectors * 512;
    let tracker = BlockTracker::start(&[part.clone(), disk.path.clone()], G).unwrap();
    assert!(tracker.devices()[0].is_partition());
    assert_eq!(tracker.devices()[0].start_sector, start_sectors);
    assert_eq!(tracker.devices()[0].disk, tracker.devices()[1].dev);

    let p = open_direct(&part);
    let d = open_direct(&disk.path);
    write_direct(&p, 0, 4096, 1); // partition block 0
    write_direct(&p, G - 4096, 8192, 2); // partition blocks 0 and 1
    write_direct(&d, start + 3 * G, 4096, 3); // through the disk, inside the partition: block 3
    write_direct(&d, 40 * MIB, 4096, 4); // outside the partition

    let taken = tracker.take_dirty().unwrap();
    assert_eq!(taken.devices[0].path, part);
    assert_eq!(dirty(&taken, 0), set(&[0, 1, 3]));
    let mut on_disk = blocks(start, 4096);
    on_disk.extend(blocks(start + G - 4096, 8192));
    on_disk.extend(blocks(start + 3 * G, 4096));
    on_disk.extend(blocks(40 * MIB, 4096));
    assert_eq!(dirty(&taken, 1), on_disk);
}

#[test]
fn a_full_ring_buffer_is_reported_as_lost() {
    if !ebpf_available() {
        return;
    }
    let disk = LoopDevice::new(16 * MIB);
    let options = TrackerOptions {
        // One page holds ~170 records; drain too rarely to keep up.
        ring_buffer_bytes: 4096,
        drain_interval: Duration::from_secs(3600),
        ..TrackerOptions::new(G)
    };
    let tracker = BlockTracker::start_with(std::slice::from_ref(&disk.path), options).unwrap();
    let f = open_direct(&disk.path);
    for i in 0..400 {
        write_direct(&f, (i % 256) * 4096, 4096, i as u8);
    }
    let taken = tracker.take_dirty().unwrap();
    assert!(taken.lost && taken.devices[0].lost, "overflow went unnoticed");

    // Once reported, the loss is not reported again; new writes are tracked again.
    write_direct(&f, 100 * G, 4096, 1);
    let next = tracker.take_dirty().unwrap();
    assert!(!next.lost);
    assert_eq!(dirty(&next, 0), set(&[100]));
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<BlockTracker>();

    let err = BlockTracker::start(&[], 1000).unwrap_err();
    assert!(matches!(err, TrackerError::InvalidGranularity(1000)));
    assert!(err.to_string().contains("power of two"), "{err}");

    let err = BlockTracker::start(&[PathBuf::from("/dev/null")], G).unwrap_err();
    assert!(matches!(err, TrackerError::NotBlockDevice(_)), "{err}");

    let missing = PathBuf::from("/dev/no-such-disk");
    let err = BlockTracker::start(&[missing], G).unwrap_err();
    assert!(err.to_string().contains("/dev/no-such-disk"), "{err}");
}

#[test]
fn every_block_a_filesystem_changes_is_reported() {
    if !ebpf_available() {
        return;
    }
    let disk = LoopDevice::new(64 * MIB);
    let mkfs = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk.path).status();
    if !mkfs.is_ok_and(|s| s.success()) {
        eprintln!("skipping: mkfs.ext4 is not available");
        return;
    }
    let before = read_direct(&disk.path, 64 * MIB);
    let tracker = BlockTracker::start(std::slice::from_ref(&disk.path), G).unwrap();

    let mnt = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount").arg(&disk.path).arg(mnt.path()).status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("skipping: cannot mount ext4 here");
        return;
    }
    let churn = || -> std::io::Result<()> {
        for i in 0..20u8 {
            std::fs::write(mnt.path().join(format!("f{i}")), vec![i; 37_000 * (i as usize + 1)])?;
        }
        for i in (0..20).step_by(3) {
            std::fs::remove_file(mnt.path().join(format!("f{i}")))?;
        }
        std::fs::create_dir(mnt.path().join("d"))?;
        std::fs::write(mnt.path().join("d/last"), b"tail")
    };
    let result = churn();
    let unmounted = Command::new("umount").arg(mnt.path()).status();
    result.unwrap();
    assert!(unmounted.is_ok_and(|s| s.success()), "umount failed");

    let after = read_direct(&disk.path, 64 * MIB);
    let taken = tracker.take_dirty().unwrap();
    assert!(!taken.lost);
    let reported = dirty(&taken, 0);
    let changed: BTreeSet<u64> = (0..before.len() / G as usize)
        .filter(|&b| {
            let r = b * G as usize..(b + 1) * G as usize;
            before[r.clone()] != after[r]
        })
        .map(|b| b as u64)
        .collect();
    assert!(changed.len() > 10, "the churn changed only {} blocks", changed.len());
    let missed: Vec<_> = changed.difference(&reported).collect();
    assert!(missed.is_empty(), "changed blocks not reported: {missed:?}");
}
