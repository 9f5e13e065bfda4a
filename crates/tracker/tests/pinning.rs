//! Tracking across tracker restarts: pinned in a bpf filesystem, the program keeps
//! recording while no tracker runs, and the next tracker resumes it — exactly when the
//! previous one suspended cleanly, and reporting the devices lost when it did not.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::{BpfFs, G, LoopDevice, MIB, ebpf_available, open_direct, set, write_direct};
use siterecovery_tracker::{BlockTracker, DirtySet, TrackerOptions};

fn dirty(set: &DirtySet) -> BTreeSet<u64> {
    set.devices[0].blocks.iter().copied().collect()
}

fn pinned(devices: &[PathBuf], pin_dir: &std::path::Path) -> BlockTracker {
    let options = TrackerOptions { pin_dir: Some(pin_dir.to_owned()), ..TrackerOptions::new(G) };
    BlockTracker::start_with(devices, options).unwrap()
}

#[test]
fn writes_made_between_trackers_reach_the_next_one() {
    if !ebpf_available() {
        return;
    }
    let bpffs = BpfFs::mount();
    let pins = bpffs.path.join("server");
    let disk = LoopDevice::new(16 * MIB);
    let devices = std::slice::from_ref(&disk.path);
    let f = open_direct(&disk.path);

    let first = pinned(devices, &pins);
    assert!(!first.resumed(), "nothing was pinned yet");
    write_direct(&f, 3 * G, 4096, 1);
    let last = first.suspend().unwrap();
    assert_eq!(dirty(&last), set(&[3]));

    // No tracker runs: the pinned program records into the ring buffer.
    write_direct(&f, 7 * G, 4096, 2);

    let second = pinned(devices, &pins);
    assert!(second.resumed(), "the first tracker suspended cleanly");
    write_direct(&f, 9 * G, 4096, 3);
    let taken = second.take_dirty().unwrap();
    assert_eq!(dirty(&taken), set(&[7, 9]), "the write made while no tracker ran, then the new one");
    assert!(!taken.lost);

    // Ended without suspending (as a killed agent would): what it drained is gone.
    write_direct(&f, 11 * G, 4096, 4);
    std::thread::sleep(std::time::Duration::from_millis(50)); // let it drain block 11
    drop(second);
    let third = pinned(devices, &pins);
    assert!(!third.resumed(), "the second tracker never suspended");
    let taken = third.take_dirty().unwrap();
    assert!(taken.lost && taken.devices[0].lost, "the devices must be resynchronised");
    let again = third.take_dirty().unwrap();
    assert!(!again.lost, "lost is reported once");
    drop(third);

    BlockTracker::remove_pins(&pins).unwrap();
    assert!(!pins.exists());
    let fresh = pinned(devices, &pins);
    assert!(!fresh.resumed(), "removed pins start afresh");
}

#[test]
fn pins_of_other_disks_or_programs_are_not_resumed() {
    if !ebpf_available() {
        return;
    }
    let bpffs = BpfFs::mount();
    let pins = bpffs.path.join("server");
    let (a, b) = (LoopDevice::new(16 * MIB), LoopDevice::new(16 * MIB));
    pinned(std::slice::from_ref(&a.path), &pins).suspend().unwrap();

    // Another program's directory (an older agent's) is removed.
    std::fs::create_dir_all(pins.join("0123456789abcdef")).unwrap();
    let other = pinned(std::slice::from_ref(&b.path), &pins);
    assert!(!other.resumed(), "the pins followed another disk");
    assert!(!pins.join("0123456789abcdef").exists(), "another program's pins are removed");
    write_direct(&open_direct(&b.path), 5 * G, 4096, 1);
    write_direct(&open_direct(&a.path), 6 * G, 4096, 1);
    let taken = other.take_dirty().unwrap();
    assert_eq!(dirty(&taken), set(&[5]), "only the disk now tracked");
    assert!(!taken.lost);
}
