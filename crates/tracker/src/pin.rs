//! Tracking that outlives the process: the program's links and maps pinned in a bpffs
//! directory keep recording writes into the ring buffer while no tracker runs (an agent
//! restarting for an upgrade), and the next tracker resumes them instead of starting
//! blind. See docs/change-tracking.md "Across restarts".
//!
//! Layout: `<pin_dir>/<program id>/{link_bio_queue, link_rq_complete, link_bio_complete,
//! events, drops, disks, seen, suspended}` for the block tracker and `<pin_dir>/files-<program
//! id>/{link_…, events, drops, files, seen, suspended}` for the image-file tracker, where the
//! program id is a hash of the program's eBPF sources (build.rs), so a tracker never
//! resumes a different program's maps. `suspended` is pinned last: a directory without it
//! is an interrupted pinning and is removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle};

use crate::TrackerError;

/// What one kind of tracker pins, and where.
pub(crate) struct Kind {
    /// Its directories' names under the pin directory start with this.
    prefix: &'static str,
    /// Identity of the compiled eBPF program (build.rs).
    id: &'static str,
    /// The names its links are pinned under, in the order [`pin`] is given them.
    pub(crate) links: &'static [&'static str],
    /// The map that says what it tracks: key -> slot.
    filter: &'static str,
}

/// The block-device tracker (tracker.bpf.c).
pub(crate) const BLOCKS: Kind = Kind {
    prefix: "",
    id: env!("SITERECOVERY_TRACKER_BPF_ID"),
    links: &["link_bio_queue", "link_rq_complete", "link_bio_complete"],
    filter: "disks",
};

/// The image-file tracker (files.bpf.c).
pub(crate) const FILES: Kind = Kind {
    prefix: "files-",
    id: env!("SITERECOVERY_FILES_BPF_ID"),
    links: &[
        "link_dirty_buffer",
        "link_dio_begin",
        "link_dio_complete",
        "link_punch_hole",
        "link_zero_range",
        "link_truncate",
        "link_collapse_range",
        "link_insert_range",
    ],
    filter: "files",
};

impl Kind {
    /// The directory this build's program of this kind pins into under `pin_dir`.
    pub(crate) fn dir(&self, pin_dir: &Path) -> PathBuf {
        pin_dir.join(format!("{}{}", self.prefix, self.id))
    }

    /// Whether a directory under the pin directory holds a program of this kind.
    fn owns(&self, name: &str) -> bool {
        if self.prefix.is_empty() { !name.starts_with(FILES.prefix) } else { name.starts_with(self.prefix) }
    }
}

/// The maps the user-space side of a tracker works with.
pub(crate) struct Maps {
    pub(crate) events: MapHandle,
    pub(crate) drops: MapHandle,
    pub(crate) seen: MapHandle,
    pub(crate) suspended: MapHandle,
}

impl Maps {
    /// Handles on a freshly loaded program's maps, found by name.
    pub(crate) fn of(object: &libbpf_rs::Object) -> Result<Self, TrackerError> {
        let handle = |name: &str| {
            let map = object.maps().find(|m| m.name() == name).ok_or_else(|| no_map(name))?;
            MapHandle::try_from(&map).map_err(TrackerError::bpf("duplicate a map handle"))
        };
        Ok(Self {
            events: handle("events")?,
            drops: handle("drops")?,
            seen: handle("seen")?,
            suspended: handle("suspended")?,
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

/// Opens what an earlier tracker of `kind` pinned for the same disks or files (`filter`:
/// the key and slot of each). `None` when nothing usable is there (nothing pinned, an
/// interrupted pinning, or other disks): whatever was there is removed, and the caller
/// loads the program afresh.
pub(crate) fn resume(
    pin_dir: &Path,
    kind: &Kind,
    filter: &BTreeMap<Vec<u8>, u32>,
) -> Result<Option<Maps>, TrackerError> {
    remove_other_programs(pin_dir, kind)?;
    let dir = kind.dir(pin_dir);
    if !dir.exists() {
        return Ok(None);
    }
    match open(&dir, kind, filter) {
        Some(maps) => Ok(Some(maps)),
        None => {
            tracing::info!(dir = %dir.display(), "removing pinned tracking that cannot be resumed");
            remove(&dir)?;
            Ok(None)
        }
    }
}

fn open(dir: &Path, kind: &Kind, filter: &BTreeMap<Vec<u8>, u32>) -> Option<Maps> {
    let map = |name: &str| MapHandle::from_pinned_path(dir.join(name)).ok();
    // The marker pinned last first: without it the pinning was interrupted.
    let suspended = map("suspended")?;
    for link in kind.links {
        // Closing a pinned link's descriptor leaves it attached (the pin holds it).
        drop(Link::open(dir.join(link)).ok()?);
    }
    let tracked = map(kind.filter)?;
    let mut pinned = BTreeMap::new();
    for key in tracked.keys() {
        let slot = tracked.lookup(&key, MapFlags::ANY).ok()??;
        pinned.insert(key, u32::from_ne_bytes(slot.as_slice().try_into().ok()?));
    }
    if &pinned != filter {
        tracing::info!(dir = %dir.display(), "pinned tracking follows other disks or files");
        return None;
    }
    Some(Maps { events: map("events")?, drops: map("drops")?, seen: map("seen")?, suspended })
}

/// Pins a loaded and attached program's links (named as `kind.links`, in that order),
/// into a fresh directory; [`pin_maps`] follows.
pub(crate) fn pin_links(pin_dir: &Path, kind: &Kind, links: Vec<Option<&mut Link>>) -> Result<(), TrackerError> {
    let dir = kind.dir(pin_dir);
    if dir.exists() {
        remove(&dir)?;
    }
    std::fs::create_dir_all(&dir).map_err(|source| TrackerError::Pin { path: dir.clone(), source })?;
    for (name, link) in kind.links.iter().zip(links) {
        if let Some(link) = link {
            link.pin(dir.join(name)).map_err(TrackerError::bpf("pin a link"))?;
        }
    }
    Ok(())
}

/// Pins the program's maps after its links: `events`, `drops`, the filter, `seen`, and
/// `suspended`, the marker, last.
pub(crate) fn pin_maps(pin_dir: &Path, kind: &Kind, object: &mut libbpf_rs::Object) -> Result<(), TrackerError> {
    let dir = kind.dir(pin_dir);
    for name in ["events", "drops", kind.filter, "seen", "suspended"] {
        let mut map = object.maps_mut().find(|m| m.name() == name).ok_or_else(|| no_map(name))?;
        map.pin(dir.join(name)).map_err(TrackerError::bpf("pin a map"))?;
    }
    Ok(())
}

/// A map the program should have and has not: a build mismatch, never expected.
fn no_map(name: &str) -> TrackerError {
    let source = libbpf_rs::Error::from(std::io::Error::other(format!("the program has no map named {name}")));
    TrackerError::Bpf { stage: "find a map", source }
}

/// Removes the pins of other programs of `kind` than this build's under `pin_dir` (an
/// upgrade leaves the previous version's behind).
fn remove_other_programs(pin_dir: &Path, kind: &Kind) -> Result<(), TrackerError> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else { return Ok(()) };
    let ours = kind.dir(pin_dir);
    for entry in entries.flatten() {
        if kind.owns(&entry.file_name().to_string_lossy()) && entry.path() != ours {
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
