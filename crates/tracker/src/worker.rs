//! The thread that owns the eBPF program: it loads and attaches it, drains the ring
//! buffer into per-device bitmaps every `drain_interval`, and answers take requests.
//! Owning everything on one thread keeps the libbpf objects (which borrow each other)
//! out of the public types, and serialises takes with draining for free.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;

use libbpf_rs::skel::{OpenSkel, Skel, SkelBuilder};
use libbpf_rs::{MapCore as _, MapFlags, MapHandle, RingBufferBuilder};
use roaring::RoaringTreemap;

use crate::bpf::{TrackerSkel, TrackerSkelBuilder};
use crate::device::blocks_touched;
use crate::{DeviceDirty, DirtySet, TrackedDevice, TrackerError, TrackerOptions, pin};

/// Size of the kernel-side filters and drop counters (MAX_SLOTS in src/bpf/slots.h): the
/// most disks, or files, one tracker follows.
pub(crate) const MAX_SLOTS: usize = 64;

/// Size of one ring-buffer record (struct event in src/bpf/slots.h).
const EVENT_LEN: usize = 16;

/// A request to the worker.
pub(crate) enum Command {
    /// Drain, then hand over the dirty set and start a new one.
    Take(Sender<Result<DirtySet, TrackerError>>),
    /// Take, mark the pinned maps as cleanly suspended, and stop draining.
    Suspend(Sender<Result<DirtySet, TrackerError>>),
}

/// A tracker's end of its worker, whichever kind: what both public trackers do with it.
/// Dropping it stops the worker, which detaches the program (unless pinned).
#[derive(Debug)]
pub(crate) struct Handle {
    commands: Option<Sender<Command>>,
    worker: Option<JoinHandle<()>>,
    started: Started,
    pinned: bool,
    granularity: u64,
}

impl Handle {
    /// Sends the command `make` builds around a reply channel, and waits for the reply.
    fn request(
        &self,
        make: impl FnOnce(Sender<Result<DirtySet, TrackerError>>) -> Command,
    ) -> Result<DirtySet, TrackerError> {
        let (reply, answer) = mpsc::channel();
        let commands = self.commands.as_ref().ok_or(TrackerError::WorkerGone)?;
        commands.send(make(reply)).map_err(|_| TrackerError::WorkerGone)?;
        answer.recv().map_err(|_| TrackerError::WorkerGone)?
    }

    /// The blocks written since the previous take.
    pub(crate) fn take(&self) -> Result<DirtySet, TrackerError> {
        self.request(Command::Take)
    }

    /// The last take; the worker then stops (leaving pinned tracking recording).
    pub(crate) fn suspend(mut self) -> Result<DirtySet, TrackerError> {
        let set = self.request(Command::Suspend);
        self.finish();
        set
    }

    /// Whether it continued pinned tracking that an earlier tracker suspended (of this
    /// build, or taken over from another).
    pub(crate) fn resumed(&self) -> bool {
        matches!(self.started, Started::Resumed | Started::TakenOver)
    }

    /// Whether the program is pinned.
    pub(crate) fn pinned(&self) -> bool {
        self.pinned
    }

    /// Tracking block size in bytes.
    pub(crate) fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Closes the command channel and waits for the worker to end.
    fn finish(&mut self) {
        drop(self.commands.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Starts the block worker and waits until the program is attached (or failed to be).
pub(crate) fn spawn(devices: Vec<TrackedDevice>, options: TrackerOptions) -> Result<Handle, TrackerError> {
    let slots = assign_slots(&devices)?;
    spawn_thread("block-tracker", options, move |options, ready, inbox| run(devices, slots, options, ready, inbox))
}

/// Runs `body` with `options` on a thread of its own named `name`, with the receiving end
/// of the command channel, and waits until it reports that its program is attached (or
/// failed).
pub(crate) fn spawn_thread<F>(name: &str, options: TrackerOptions, body: F) -> Result<Handle, TrackerError>
where
    F: FnOnce(TrackerOptions, Sender<Result<Started, TrackerError>>, Receiver<Command>) + Send + 'static,
{
    let (pinned, granularity) = (options.pin_dir.is_some(), options.granularity);
    let (commands, inbox) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || body(options, ready_tx, inbox))
        .map_err(|_| TrackerError::WorkerGone)?;
    match ready_rx.recv() {
        Ok(Ok(started)) => Ok(Handle { commands: Some(commands), worker: Some(handle), started, pinned, granularity }),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(TrackerError::WorkerGone)
        }
    }
}

/// Gives each distinct whole disk a slot (its index in the kernel's drop counters).
fn assign_slots(devices: &[TrackedDevice]) -> Result<BTreeMap<u32, u32>, TrackerError> {
    let mut slots = BTreeMap::new();
    for d in devices {
        let next = slots.len() as u32;
        slots.entry(d.kernel_disk_dev()).or_insert(next);
    }
    if slots.len() > MAX_SLOTS {
        return Err(TrackerError::TooManyDisks(slots.len()));
    }
    Ok(slots)
}

fn run(
    devices: Vec<TrackedDevice>,
    slots: BTreeMap<u32, u32>,
    options: TrackerOptions,
    ready: Sender<Result<Started, TrackerError>>,
    inbox: Receiver<Command>,
) {
    let mut storage = MaybeUninit::uninit();
    // A skeleton loaded here must live as long as the loop: unpinned, dropping it
    // detaches the program.
    let filter = slots.iter().map(|(dev, slot)| (dev.to_ne_bytes().to_vec(), *slot)).collect();
    let loaded = setup(&options, &pin::BLOCKS, &filter, || load(&mut storage, &slots, &options), block_links);
    let prepared = loaded.and_then(|set| {
        let targets: Vec<Target> = devices.iter().map(TrackedDevice::target).collect();
        let slot_of: Vec<u32> = devices.iter().map(|d| slots[&d.kernel_disk_dev()]).collect();
        let (acc, ring) = accumulate(&set, targets, &slot_of, slots.len(), options.granularity)?;
        Ok((set, acc, ring))
    });
    let (set, acc, ring) = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(set.started)).is_err() {
        return;
    }
    tracing::debug!(devices = devices.len(), started = ?set.started, "block tracker attached");
    serve(&ring, &inbox, options.drain_interval, "block", |suspending| take(&acc, &set.maps, slots.len(), suspending));
}

/// The accumulator of a tracker set up so, fed by its ring buffer (and by the ring
/// buffer of the program it took over from, which may still hold records), with the drop
/// counters' baseline from the `seen` map. A resumed tracker's first take reports every
/// target lost when the previous owner never suspended, and one that took over, when the
/// earlier program dropped changes. The maps are marked owned again.
pub(crate) fn accumulate<S>(
    set: &Setup<S>,
    targets: Vec<Target>,
    slot_of: &[u32],
    slots: usize,
    granularity: u64,
) -> Result<(Rc<RefCell<Accumulator>>, libbpf_rs::RingBuffer<'static>), TrackerError> {
    let maps = &set.maps;
    let seen = read_seen(maps, slots)?;
    let dropped = set.earlier.as_ref().map(|e| e.dropped(slots)).transpose()?.unwrap_or(false);
    if dropped {
        tracing::warn!("the program taken over dropped changes while no tracker ran: everything is compared");
    }
    let lost = set.started == Started::ResumedUnclean || dropped;
    let acc = Accumulator::new(targets, slot_of, slots, granularity, seen, lost);
    let mut rings = vec![&maps.events];
    rings.extend(set.earlier.as_ref().map(|e| &e.maps.events));
    let fed = drain_into(&rings, acc)?;
    maps.set_suspended(false)?;
    Ok(fed)
}

/// An accumulator fed by ring buffers of `struct event` records.
fn drain_into(
    rings: &[&MapHandle],
    acc: Accumulator,
) -> Result<(Rc<RefCell<Accumulator>>, libbpf_rs::RingBuffer<'static>), TrackerError> {
    let acc = Rc::new(RefCell::new(acc));
    let mut builder = RingBufferBuilder::new();
    for events in rings {
        let sink = Rc::clone(&acc);
        builder
            .add(*events, move |data: &[u8]| {
                sink.borrow_mut().record(data);
                0
            })
            .map_err(TrackerError::bpf("set up the ring buffer"))?;
    }
    let ring = builder.build().map_err(TrackerError::bpf("set up the ring buffer"))?;
    Ok((acc, ring))
}

/// The worker's loop: drains `ring` every `interval` and answers each command with
/// `take(suspending)` after a last drain. Returns after a suspension, or when the
/// tracker is dropped (its worker then drops the skeleton, which detaches the program
/// unless it is pinned).
pub(crate) fn serve(
    ring: &libbpf_rs::RingBuffer<'_>,
    inbox: &Receiver<Command>,
    interval: std::time::Duration,
    what: &str,
    mut take: impl FnMut(bool) -> Result<DirtySet, TrackerError>,
) {
    loop {
        let command = inbox.recv_timeout(interval);
        let drained = ring.consume().map_err(TrackerError::bpf("drain the ring buffer"));
        match command {
            Ok(Command::Take(reply)) => {
                let _ = reply.send(drained.and_then(|()| take(false)));
            }
            Ok(Command::Suspend(reply)) => {
                let _ = reply.send(drained.and_then(|()| take(true)));
                break;
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Err(e) = drained {
                    tracing::warn!(error = %e, tracker = what, "the change tracker could not drain its ring buffer");
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
}

/// Hands over the dirty set and records the drop counters it saw (in the `seen` map).
/// `suspending`: the last take; the maps are marked cleanly suspended, and later changes
/// wait in the ring buffer for the tracker that resumes the pins.
pub(crate) fn take(
    acc: &RefCell<Accumulator>,
    maps: &pin::Maps,
    slots: usize,
    suspending: bool,
) -> Result<DirtySet, TrackerError> {
    let drops = read_drops(&maps.drops, slots)?;
    let set = acc.borrow_mut().take(&drops);
    for (slot, &n) in acc.borrow().seen_drops.iter().enumerate() {
        pin::write_u64(&maps.seen, slot as u32, n)?;
    }
    if suspending {
        maps.set_suspended(true)?;
    }
    Ok(set)
}

/// How a tracker began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Started {
    /// The program was loaded and attached by this tracker.
    Fresh,
    /// Pinned tracking left by a tracker that suspended after its last take: every write
    /// since that take is in this tracker's sets.
    Resumed,
    /// Pinned tracking whose previous owner ended without suspending (killed): what it
    /// had drained but not handed out is gone, so the first take reports every device lost.
    ResumedUnclean,
    /// Pinned tracking of another build (an upgrade) that suspended cleanly, taken over
    /// (`pin::Earlier::hand_over`): every write since its last take is in this tracker's
    /// sets.
    TakenOver,
}

/// A tracker's program, as [`setup`] found or loaded it.
pub(crate) struct Setup<S> {
    /// The program this tracker loaded (`None`: resumed pins). It must live as long as
    /// the tracker: unpinned, dropping it detaches the program.
    pub(crate) _skel: Option<S>,
    pub(crate) maps: pin::Maps,
    pub(crate) started: Started,
    /// The program taken over, now detached; its ring buffer is read until the end.
    pub(crate) earlier: Option<pin::Earlier>,
}

/// Resumes the pinned tracking of `kind` when `options.pin_dir` holds this build's for the
/// same disks or files (`filter`), else loads and attaches the program (`load`) and, when
/// asked, pins it (the links `links` names, in `kind.links` order, and the maps) and takes
/// over from another build's pins of the same disks or files, if any.
pub(crate) fn setup<'obj, S: Skel<'obj>>(
    options: &TrackerOptions,
    kind: &pin::Kind,
    filter: &BTreeMap<Vec<u8>, u32>,
    load: impl FnOnce() -> Result<S, TrackerError>,
    links: fn(&mut S) -> Vec<Option<&mut libbpf_rs::Link>>,
) -> Result<Setup<S>, TrackerError> {
    let mut earlier = None;
    if let Some(pin_dir) = &options.pin_dir {
        match pin::find(pin_dir, kind, filter, options.ring_buffer_bytes)? {
            pin::Pinned::Ours(maps) => {
                let started = if maps.was_suspended()? { Started::Resumed } else { Started::ResumedUnclean };
                return Ok(Setup { _skel: None, maps, started, earlier: None });
            }
            pin::Pinned::Earlier(e) => earlier = Some(e),
            pin::Pinned::Nothing => {}
        }
    }
    // Attached before the earlier program is detached: no write falls between them.
    let attached = load().and_then(|mut skel| {
        if let Some(pin_dir) = &options.pin_dir {
            pin::pin_links(pin_dir, kind, links(&mut skel))?;
            pin::pin_maps(pin_dir, kind, skel.object_mut())?;
        }
        let maps = pin::Maps::of(skel.object())?;
        Ok((skel, maps))
    });
    let (skel, maps) = match attached {
        Ok(a) => a,
        // This build's program cannot run here (the agent falls back to checksum scans):
        // the earlier one would record for nobody.
        Err(e) => {
            if let Some(earlier) = earlier {
                earlier.remove()?;
            }
            return Err(e);
        }
    };
    let mut started = Started::Fresh;
    if let Some(mut e) = earlier.take() {
        match e.hand_over(&maps) {
            Ok(()) => (started, earlier) = (Started::TakenOver, Some(e)),
            // Starting blind costs one compare of everything; failing to start costs more.
            Err(error) => {
                tracing::warn!(%error, "could not take over another build's pinned tracking: starting afresh");
                e.remove()?;
            }
        }
    }
    Ok(Setup { _skel: Some(skel), maps, started, earlier })
}

/// The block program's links, in [`pin::BLOCKS`]' order.
fn block_links<'a>(skel: &'a mut TrackerSkel<'_>) -> Vec<Option<&'a mut libbpf_rs::Link>> {
    let l = &mut skel.links;
    vec![l.on_bio_queue.as_mut(), l.on_rq_complete.as_mut(), l.on_bio_complete.as_mut()]
}

fn load<'obj>(
    storage: &'obj mut MaybeUninit<libbpf_rs::OpenObject>,
    slots: &BTreeMap<u32, u32>,
    options: &TrackerOptions,
) -> Result<TrackerSkel<'obj>, TrackerError> {
    let mut open = TrackerSkelBuilder::default().open(storage).map_err(TrackerError::bpf("open the eBPF object"))?;
    open.maps.events.set_max_entries(options.ring_buffer_bytes).map_err(TrackerError::bpf("size the ring buffer"))?;
    let mut skel = open.load().map_err(TrackerError::bpf("load the eBPF program"))?;
    // Fill the disk filter before attaching so no write to a tracked disk is missed.
    for (dev, slot) in slots {
        skel.maps
            .disks
            .update(&dev.to_ne_bytes(), &slot.to_ne_bytes(), MapFlags::ANY)
            .map_err(TrackerError::bpf("fill the disk filter"))?;
    }
    skel.attach().map_err(TrackerError::bpf("attach to the block tracepoints"))?;
    Ok(skel)
}

/// Reads the drop counters (cumulative since load) of slots `0..slots`.
pub(crate) fn read_drops(drops: &MapHandle, slots: usize) -> Result<Vec<u64>, TrackerError> {
    (0..slots as u32).map(|slot| pin::read_u64(drops, slot)).collect()
}

/// The drop counters as of the previous take (kept in the `seen` map, which a resumed
/// tracker inherits).
fn read_seen(maps: &pin::Maps, slots: usize) -> Result<Vec<u64>, TrackerError> {
    read_drops(&maps.seen, slots)
}

/// What a tracked device or file is to the accumulator: a window of its slot's sectors.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The device or file as given.
    pub(crate) path: PathBuf,
    /// Its first sector in what the kernel reports (0 but for a partition).
    pub(crate) start: u64,
    /// The sector after its last one (`u64::MAX`: unbounded, it may grow while tracked).
    pub(crate) end: u64,
}

/// Dirty blocks since the last take, per tracked device.
pub(crate) struct Accumulator {
    granularity: u64,
    targets: Vec<Target>,
    /// For each slot, the tracked devices on that disk (indexes into `targets`).
    by_slot: Vec<Vec<usize>>,
    dirty: Vec<RoaringTreemap>,
    /// Drop counters as of the last take.
    seen_drops: Vec<u64>,
    /// Records that did not parse: a layout mismatch with struct event, never expected.
    malformed: u64,
    /// Records received since the last take.
    records: u64,
    /// Report every device lost at the next take (resumed after an unclean end).
    lost: bool,
}

impl Accumulator {
    /// `slot_of[i]`: the slot (below `slots`) whose records concern `targets[i]`.
    pub(crate) fn new(
        targets: Vec<Target>,
        slot_of: &[u32],
        slots: usize,
        granularity: u64,
        seen: Vec<u64>,
        lost: bool,
    ) -> Self {
        let mut by_slot = vec![Vec::new(); slots];
        for (i, &slot) in slot_of.iter().enumerate() {
            by_slot[slot as usize].push(i);
        }
        Self {
            granularity,
            dirty: vec![RoaringTreemap::new(); targets.len()],
            targets,
            by_slot,
            seen_drops: seen,
            malformed: 0,
            lost,
            records: 0,
        }
    }

    /// Marks the blocks that one ring-buffer record touches on every tracked device of
    /// its disk (a disk and its partitions may all be tracked).
    pub(crate) fn record(&mut self, data: &[u8]) {
        self.records += 1;
        let Some(event) = parse_event(data) else {
            self.malformed += 1;
            return;
        };
        let Some(devices) = self.by_slot.get(event.slot as usize) else {
            self.malformed += 1;
            return;
        };
        for &i in devices {
            let t = &self.targets[i];
            let touched = blocks_touched(t.start, t.end, event.sector, u64::from(event.nr_sectors), self.granularity);
            if let Some((first, last)) = touched {
                self.dirty[i].insert_range(first..=last);
            }
        }
    }

    /// Hands over the blocks gathered so far and starts afresh. `drops` are the
    /// cumulative kernel drop counters per slot; any increase since the previous take
    /// marks that disk's devices as lost.
    pub(crate) fn take(&mut self, drops: &[u64]) -> DirtySet {
        let mut lost_slots = vec![self.malformed > 0 || std::mem::take(&mut self.lost); self.by_slot.len()];
        for (slot, (&now, seen)) in drops.iter().zip(self.seen_drops.iter_mut()).enumerate() {
            if now != *seen {
                tracing::warn!(slot, dropped = now - *seen, "block tracker dropped writes");
                lost_slots[slot] = true;
                *seen = now;
            }
        }
        self.malformed = 0;
        let mut devices = Vec::with_capacity(self.targets.len());
        for (slot, members) in self.by_slot.iter().enumerate() {
            for &i in members {
                devices.push((i, lost_slots[slot]));
            }
        }
        devices.sort_unstable();
        let devices: Vec<DeviceDirty> = devices
            .into_iter()
            .map(|(i, lost)| DeviceDirty {
                path: self.targets[i].path.clone(),
                blocks: std::mem::take(&mut self.dirty[i]).iter().collect(),
                lost,
            })
            .collect();
        DirtySet {
            granularity: self.granularity,
            lost: devices.iter().any(|d| d.lost),
            devices,
            records: std::mem::take(&mut self.records),
        }
    }
}

/// One ring-buffer record (struct event in src/bpf/slots.h: u32 slot, u32 nr_sectors,
/// u64 sector, native endian).
struct Event {
    slot: u32,
    nr_sectors: u32,
    sector: u64,
}

fn parse_event(data: &[u8]) -> Option<Event> {
    let data: &[u8; EVENT_LEN] = data.get(..EVENT_LEN)?.try_into().ok()?;
    let (slot, rest) = data.split_at(4);
    let (nr_sectors, sector) = rest.split_at(4);
    Some(Event {
        slot: u32::from_ne_bytes(slot.try_into().ok()?),
        nr_sectors: u32::from_ne_bytes(nr_sectors.try_into().ok()?),
        sector: u64::from_ne_bytes(sector.try_into().ok()?),
    })
}
