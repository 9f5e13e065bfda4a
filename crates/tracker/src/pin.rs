//! Tracking that outlives the process: the program's links and maps pinned in a bpffs
//! directory keep recording writes into the ring buffer while no tracker runs (an agent
//! restarting, or being upgraded), and the next tracker resumes them, or takes over from
//! them, instead of starting blind. See docs/change-tracking.md "Across restarts".
//!
//! Layout: `<pin_dir>/blocks-v<MAPS_VERSION>-<program id>/{link_bio_queue, link_rq_complete,
//! link_bio_complete, events, drops, disks, inflight, seen, suspended}` for the block
//! tracker and `<pin_dir>/files-v<MAPS_VERSION>-<program id>/{link_…, events, drops, files,
//! inflight, seen, suspended}` for the image-file tracker, where the program id is a hash of
//! the program's eBPF sources (build.rs). The same build resumes its own pins. Another
//! build (an upgrade) whose maps have the same [`MAPS_VERSION`] is taken over: this
//! build's program is attached beside it, its writes in flight are copied over, it is
//! detached, and what its ring buffer holds is read as this tracker's own. Pins of any
//! other version are removed (a blind start). `suspended` is pinned last: a directory
//! without it is an interrupted pinning and is removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle};

use crate::TrackerError;

/// Version of what the pinned maps hold and mean: their names, key and value layouts
/// (`struct event`, the filter keys, the in-flight entries) and the counters' use. A
/// tracker takes over an earlier build's pins only when it is the same. Raise it with any
/// such change to src/bpf/.
pub(crate) const MAPS_VERSION: u32 = 1;

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
    prefix: "blocks-",
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
        pin_dir.join(format!("{}{}", self.versioned(), self.id))
    }

    /// The start of the names of its directories whose maps this build reads.
    fn versioned(&self) -> String {
        format!("{}v{MAPS_VERSION}-", self.prefix)
    }

    /// Whether a directory under the pin directory holds a program of this kind: named
    /// with its prefix, or, for block devices, by the program id alone (builds before
    /// [`MAPS_VERSION`] 1).
    fn owns(&self, name: &str) -> bool {
        name.starts_with(self.prefix)
            || (self.prefix == BLOCKS.prefix && name.len() == 16 && name.bytes().all(|b| b.is_ascii_hexdigit()))
    }
}

/// The maps the user-space side of a tracker works with.
pub(crate) struct Maps {
    pub(crate) events: MapHandle,
    pub(crate) drops: MapHandle,
    pub(crate) inflight: MapHandle,
    pub(crate) seen: MapHandle,
    pub(crate) suspended: MapHandle,
    /// The pinned links of a resumed program, held open so that it stays attached as
    /// long as the tracker runs even if its pins are removed (a server no longer
    /// protected; `untrack` run beside a running agent). Empty for a program this tracker
    /// loaded: its skeleton holds them.
    links: Vec<Link>,
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
            inflight: handle("inflight")?,
            seen: handle("seen")?,
            suspended: handle("suspended")?,
            links: Vec::new(),
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

/// What an earlier tracker of a kind left pinned for the same disks or files.
pub(crate) enum Pinned {
    /// This build's program: resume it.
    Ours(Maps),
    /// Another build's program whose maps this build reads ([`MAPS_VERSION`]), suspended
    /// cleanly after its last take: take over from it.
    Earlier(Earlier),
    /// Nothing usable: load the program afresh.
    Nothing,
}

/// Another build's pinned program to take over from (an upgrade).
pub(crate) struct Earlier {
    dir: PathBuf,
    pub(crate) maps: Maps,
}

impl Earlier {
    /// Once this build's program is attached and pinned (its maps `to`): copies the
    /// earlier program's writes in flight, so that their completions are reported by
    /// the new one, then unpins the earlier program, which detaches it. Both record
    /// every write in between, so none falls between them. What its ring buffer holds
    /// is the caller's to read.
    pub(crate) fn hand_over(&mut self, to: &Maps) -> Result<(), TrackerError> {
        for key in self.maps.inflight.keys() {
            // Completed since it was listed: the earlier program reported it.
            let Some(value) =
                self.maps.inflight.lookup(&key, MapFlags::ANY).map_err(TrackerError::bpf("read a map"))?
            else {
                continue;
            };
            to.inflight.update(&key, &value, MapFlags::ANY).map_err(TrackerError::bpf("write a map"))?;
        }
        tracing::info!(dir = %self.dir.display(), "taking over pinned tracking from another build of the agent");
        self.maps.links.clear();
        remove(&self.dir)
    }

    /// Whether the earlier program dropped changes since its owner's last take (slots
    /// `0..slots`); read after [`Earlier::hand_over`], when it records no more.
    pub(crate) fn dropped(&self, slots: usize) -> Result<bool, TrackerError> {
        (0..slots as u32).try_fold(false, |any, slot| {
            Ok(any || read_u64(&self.maps.drops, slot)? != read_u64(&self.maps.seen, slot)?)
        })
    }

    /// Gives up taking over: unpins it.
    pub(crate) fn remove(self) -> Result<(), TrackerError> {
        remove(&self.dir)
    }
}

/// Finds what earlier trackers of `kind` pinned for the same disks or files (`filter`:
/// the key and slot of each) with a ring buffer of `ring_bytes`, and removes everything
/// else of that kind: interrupted pinnings, other disks, another ring size, other versions
/// of the maps.
pub(crate) fn find(
    pin_dir: &Path,
    kind: &Kind,
    filter: &BTreeMap<Vec<u8>, u32>,
    ring_bytes: u32,
) -> Result<Pinned, TrackerError> {
    let ours = kind.dir(pin_dir);
    let mut earlier = None;
    for entry in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
        let (name, path) = (entry.file_name().to_string_lossy().into_owned(), entry.path());
        if !kind.owns(&name) || path == ours {
            continue;
        }
        if earlier.is_none()
            && name.starts_with(&kind.versioned())
            && let Some(maps) = open(&path, kind, filter, ring_bytes)
            && maps.was_suspended()?
        {
            earlier = Some(Earlier { dir: path, maps });
            continue;
        }
        tracing::info!(dir = %path.display(), "removing another program's pinned tracking");
        remove(&path)?;
    }
    if ours.exists() {
        if let Some(maps) = open(&ours, kind, filter, ring_bytes) {
            // A take-over that ended before it unpinned the earlier program: this
            // build's never suspended, so its first take reports everything lost.
            if let Some(e) = earlier {
                e.remove()?;
            }
            return Ok(Pinned::Ours(maps));
        }
        tracing::info!(dir = %ours.display(), "removing pinned tracking that cannot be resumed");
        remove(&ours)?;
    }
    Ok(earlier.map_or(Pinned::Nothing, Pinned::Earlier))
}

fn open(dir: &Path, kind: &Kind, filter: &BTreeMap<Vec<u8>, u32>, ring_bytes: u32) -> Option<Maps> {
    let map = |name: &str| MapHandle::from_pinned_path(dir.join(name)).ok();
    // The marker pinned last first: without it the pinning was interrupted.
    let suspended = map("suspended")?;
    let links = kind.links.iter().map(|link| Link::open(dir.join(link)).ok()).collect::<Option<Vec<_>>>()?;
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
    let events = map("events")?;
    if events.max_entries() != ring_bytes {
        tracing::info!(dir = %dir.display(), pinned = events.max_entries(), wanted = ring_bytes, "pinned tracking has a ring buffer of another size");
        return None;
    }
    Some(Maps { events, drops: map("drops")?, inflight: map("inflight")?, seen: map("seen")?, suspended, links })
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

/// Pins the program's maps after its links: `events`, `drops`, the filter, `inflight`,
/// `seen`, and `suspended`, the marker, last.
pub(crate) fn pin_maps(pin_dir: &Path, kind: &Kind, object: &mut libbpf_rs::Object) -> Result<(), TrackerError> {
    let dir = kind.dir(pin_dir);
    for name in ["events", "drops", kind.filter, "inflight", "seen", "suspended"] {
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

/// Unpins everything under `dir`: the program detaches once no process holds it.
pub(crate) fn remove(dir: &Path) -> Result<(), TrackerError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(TrackerError::Pin { path: dir.to_owned(), source: e })
        }
        _ => Ok(()),
    }
}
