//! Tracking that outlives the process: the program's links and maps pinned in a bpffs
//! directory keep recording writes into the ring buffer while no tracker runs (an agent
//! restarting for an upgrade), and the next tracker resumes them instead of starting
//! blind. See docs/change-tracking.md "Across restarts".
//!
//! Layout: `<pin_dir>/<program id>/{link_bio_queue, link_rq_complete, link_bio_complete,
//! events, drops, disks, seen, suspended}`, where the program id is a hash of the eBPF
//! sources (build.rs), so a tracker never resumes a different program's maps.
//! `suspended` is pinned last: a directory without it is an interrupted pinning and is
//! removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle};

use crate::TrackerError;
use crate::bpf::TrackerSkel;

/// Identity of the compiled eBPF program (build.rs).
const PROGRAM_ID: &str = env!("SITERECOVERY_TRACKER_BPF_ID");

const LINKS: [&str; 3] = ["link_bio_queue", "link_rq_complete", "link_bio_complete"];

/// The maps the user-space side of a tracker works with.
pub(crate) struct Maps {
    pub(crate) events: MapHandle,
    pub(crate) drops: MapHandle,
    pub(crate) seen: MapHandle,
    pub(crate) suspended: MapHandle,
}

impl Maps {
    /// Handles on a freshly loaded skeleton's maps.
    pub(crate) fn of(skel: &TrackerSkel<'_>) -> Result<Self, TrackerError> {
        let handle = |m| MapHandle::try_from(m).map_err(TrackerError::bpf("duplicate a map handle"));
        Ok(Self {
            events: handle(&skel.maps.events)?,
            drops: handle(&skel.maps.drops)?,
            seen: handle(&skel.maps.seen)?,
            suspended: handle(&skel.maps.suspended)?,
        })
    }

    /// Whether the tracker that owned these maps suspended cleanly after its last take.
    pub(crate) fn was_suspended(&self) -> Result<bool, TrackerError> {
        Ok(read_u64(&self.suspended, 0)? == 1)
    }

    /// Records whether this tracker has suspended (1) or runs (0).
    pub(crate) fn set_suspended(&self, suspended: bool) -> Result<(), TrackerError> {
        write_u64(&self.suspended, 0, u64::from(suspended))
    }
}

/// Reads entry `index` of an array map of `u64`s (0 when absent).
pub(crate) fn read_u64(map: &MapHandle, index: u32) -> Result<u64, TrackerError> {
    let value = map.lookup(&index.to_ne_bytes(), MapFlags::ANY).map_err(TrackerError::bpf("read a map"))?;
    Ok(value.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map_or(0, u64::from_ne_bytes))
}

/// Writes entry `index` of an array map of `u64`s.
pub(crate) fn write_u64(map: &MapHandle, index: u32, value: u64) -> Result<(), TrackerError> {
    map.update(&index.to_ne_bytes(), &value.to_ne_bytes(), MapFlags::ANY).map_err(TrackerError::bpf("write a map"))
}

/// The directory this build pins into under `pin_dir`.
pub(crate) fn dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(PROGRAM_ID)
}

/// Opens what an earlier tracker pinned for the same disks. `None` when nothing usable is
/// there (nothing pinned, an interrupted pinning, or other disks): whatever was there is
/// removed, and the caller loads the program afresh.
pub(crate) fn resume(pin_dir: &Path, slots: &BTreeMap<u32, u32>) -> Result<Option<Maps>, TrackerError> {
    remove_other_programs(pin_dir)?;
    let dir = dir(pin_dir);
    if !dir.exists() {
        return Ok(None);
    }
    match open(&dir, slots) {
        Some(maps) => Ok(Some(maps)),
        None => {
            tracing::info!(dir = %dir.display(), "removing pinned tracking that cannot be resumed");
            remove(&dir)?;
            Ok(None)
        }
    }
}

fn open(dir: &Path, slots: &BTreeMap<u32, u32>) -> Option<Maps> {
    let map = |name: &str| MapHandle::from_pinned_path(dir.join(name)).ok();
    // The marker pinned last first: without it the pinning was interrupted.
    let suspended = map("suspended")?;
    for link in LINKS {
        // Closing a pinned link's descriptor leaves it attached (the pin holds it).
        drop(Link::open(dir.join(link)).ok()?);
    }
    let disks = map("disks")?;
    let mut pinned = BTreeMap::new();
    for key in disks.keys() {
        let dev = u32::from_ne_bytes(key.as_slice().try_into().ok()?);
        let slot = disks.lookup(&key, MapFlags::ANY).ok()??;
        pinned.insert(dev, u32::from_ne_bytes(slot.as_slice().try_into().ok()?));
    }
    if &pinned != slots {
        tracing::info!(pinned = ?pinned, wanted = ?slots, "pinned tracking follows other disks");
        return None;
    }
    Some(Maps { events: map("events")?, drops: map("drops")?, seen: map("seen")?, suspended })
}

/// Pins a loaded and attached skeleton's links and maps, the `suspended` marker last.
pub(crate) fn pin(skel: &mut TrackerSkel<'_>, pin_dir: &Path) -> Result<(), TrackerError> {
    let dir = dir(pin_dir);
    if dir.exists() {
        remove(&dir)?;
    }
    std::fs::create_dir_all(&dir).map_err(|source| TrackerError::Pin { path: dir.clone(), source })?;
    let links = [&mut skel.links.on_bio_queue, &mut skel.links.on_rq_complete, &mut skel.links.on_bio_complete];
    for (name, link) in LINKS.into_iter().zip(links) {
        if let Some(link) = link {
            link.pin(dir.join(name)).map_err(TrackerError::bpf("pin a link"))?;
        }
    }
    let maps = &mut skel.maps;
    maps.events.pin(dir.join("events")).map_err(TrackerError::bpf("pin a map"))?;
    maps.drops.pin(dir.join("drops")).map_err(TrackerError::bpf("pin a map"))?;
    maps.disks.pin(dir.join("disks")).map_err(TrackerError::bpf("pin a map"))?;
    maps.seen.pin(dir.join("seen")).map_err(TrackerError::bpf("pin a map"))?;
    maps.suspended.pin(dir.join("suspended")).map_err(TrackerError::bpf("pin a map"))?;
    Ok(())
}

/// Removes the pins of programs other than this build's under `pin_dir` (an upgrade
/// leaves the previous version's behind).
fn remove_other_programs(pin_dir: &Path) -> Result<(), TrackerError> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else { return Ok(()) };
    for entry in entries.flatten() {
        if entry.file_name() != PROGRAM_ID {
            tracing::info!(dir = %entry.path().display(), "removing another program's pinned tracking");
            remove(&entry.path())?;
        }
    }
    Ok(())
}

/// Unpins everything under `dir`: the program detaches once no process holds it.
pub(crate) fn remove(dir: &Path) -> Result<(), TrackerError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(TrackerError::Pin { path: dir.to_owned(), source: e })
        }
        _ => Ok(()),
    }
}
