//! Tracking across tracker restarts: pinned in a bpf filesystem, the program keeps
//! recording while no tracker runs, and the next tracker resumes it — exactly when the
//! previous one suspended cleanly, and reporting the devices lost when it did not.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use common::{BpfFs, G, LoopDevice, MIB, ebpf_available, open_direct, set, write_direct};
use libbpf_rs::MapCore as _;
use siterecovery_tracker::{BlockTracker, DirtySet, TrackerOptions};

fn dirty(set: &DirtySet) -> BTreeSet<u64> {
    set.devices[0].blocks.iter().copied().collect()
}

fn pinned(devices: &[PathBuf], pin_dir: &std::path::Path) -> BlockTracker {
    let options = TrackerOptions { pin_dir: Some(pin_dir.to_owned()), ..TrackerOptions::new(G) };
    BlockTracker::start_with(devices, options).unwrap()
}

/// A private bpf filesystem, the pin directory in it, and one loop device opened for
/// direct writes; `None` where eBPF tracking cannot run.
struct Setup {
    bpffs: BpfFs,
    pins: PathBuf,
    disk: LoopDevice,
    f: std::fs::File,
}

impl Setup {
    fn new() -> Option<Self> {
        if !ebpf_available() {
            return None;
        }
        let bpffs = BpfFs::mount();
        let pins = bpffs.path.join("server");
        let disk = LoopDevice::new(16 * MIB);
        let f = open_direct(&disk.path);
        Some(Self { bpffs, pins, disk, f })
    }
}

#[test]
fn writes_made_between_trackers_reach_the_next_one() {
    let Some(Setup { bpffs: _bpffs, pins, disk, f }) = Setup::new() else { return };
    let devices = std::slice::from_ref(&disk.path);

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

/// The one directory under `pins`, by name.
fn only_pin(pins: &std::path::Path) -> String {
    let names: Vec<String> =
        std::fs::read_dir(pins).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    names.into_iter().next().unwrap()
}

#[test]
fn another_build_with_the_same_maps_is_taken_over() {
    let Some(Setup { bpffs: _bpffs, pins, disk, f }) = Setup::new() else { return };
    let devices = std::slice::from_ref(&disk.path);

    let first = pinned(devices, &pins);
    write_direct(&f, 3 * G, 4096, 1);
    assert_eq!(dirty(&first.suspend().unwrap()), set(&[3]));

    // Make the pins another build's (an agent before an upgrade): same maps version,
    // another program id. A bio in flight in it must be finished by the next program.
    let ours = only_pin(&pins);
    let (version, _) = ours.rsplit_once('-').unwrap();
    let earlier = pins.join(format!("{version}-00000000000000ff"));
    std::fs::rename(pins.join(&ours), &earlier).unwrap();
    let in_flight = libbpf_rs::MapHandle::from_pinned_path(earlier.join("inflight")).unwrap();
    let (bio, entry) = (0xdead_b10c_u64.to_ne_bytes(), [7u8; 16]);
    in_flight.update(&bio, &entry, libbpf_rs::MapFlags::ANY).unwrap();
    drop(in_flight);

    write_direct(&f, 7 * G, 4096, 2); // no tracker runs: the earlier program records it
    let second = pinned(devices, &pins);
    assert!(second.resumed(), "taken over: the earlier tracker suspended cleanly");
    assert!(!earlier.exists(), "the earlier program is unpinned (detached)");
    assert_eq!(only_pin(&pins), ours, "this build's program is pinned instead");
    let copied = libbpf_rs::MapHandle::from_pinned_path(pins.join(&ours).join("inflight")).unwrap();
    assert_eq!(copied.lookup(&bio, libbpf_rs::MapFlags::ANY).unwrap(), Some(entry.to_vec()), "in-flight write copied");
    write_direct(&f, 9 * G, 4096, 3);
    let taken = second.take_dirty().unwrap();
    assert_eq!(dirty(&taken), set(&[7, 9]), "the write the earlier program recorded, then the new one's");
    assert!(!taken.lost, "nothing to compare whole");
    write_direct(&f, 11 * G, 4096, 4);
    assert_eq!(dirty(&second.take_dirty().unwrap()), set(&[11]));
    second.suspend().unwrap();

    // Maps of another version are not read: removed, and the next tracker starts blind.
    std::fs::rename(pins.join(&ours), pins.join("blocks-v0-00000000000000ff")).unwrap();
    write_direct(&f, 13 * G, 4096, 5);
    let third = pinned(devices, &pins);
    assert!(!third.resumed(), "another maps version is not taken over");
    assert_eq!(only_pin(&pins), ours);
}

#[test]
fn a_resumed_tracker_keeps_tracking_when_its_pins_are_removed() {
    let Some(Setup { bpffs: _bpffs, pins, disk, f }) = Setup::new() else { return };
    let devices = std::slice::from_ref(&disk.path);
    pinned(devices, &pins).suspend().unwrap();
    let resumed = pinned(devices, &pins);
    assert!(resumed.resumed());
    // As when the server is no longer protected: the pins go, the running tracker stays.
    BlockTracker::remove_pins(&pins).unwrap();
    write_direct(&f, 5 * G, 4096, 1);
    assert_eq!(dirty(&resumed.take_dirty().unwrap()), set(&[5]), "still attached: the tracker holds its links");
    drop(resumed);
    assert!(!pinned(devices, &pins).resumed(), "nothing was left pinned");
}

#[test]
fn a_ring_buffer_of_another_size_is_not_resumed() {
    let Some(Setup { bpffs: _bpffs, pins, disk, f }) = Setup::new() else { return };
    let devices = std::slice::from_ref(&disk.path);
    pinned(devices, &pins).suspend().unwrap();
    // The ring buffer's size changed in the configuration: pinned afresh at the new size.
    let bigger = TrackerOptions { pin_dir: Some(pins.clone()), ring_buffer_bytes: 16 << 20, ..TrackerOptions::new(G) };
    let first = BlockTracker::start_with(devices, bigger.clone()).unwrap();
    assert!(!first.resumed(), "a ring of another size is not resumed");
    first.suspend().unwrap();
    write_direct(&f, 4 * G, 4096, 1);
    let second = BlockTracker::start_with(devices, bigger).unwrap();
    assert!(second.resumed(), "the same size is");
    assert_eq!(dirty(&second.take_dirty().unwrap()), set(&[4]));
}
