//! With the eBPF tracker on a loop device, an incremental after scattered 64 KiB writes
//! reads those blocks and nothing else of the chunks they fall in, and the point it ends
//! in restores equal to the device (root only; skipped with a message elsewhere unless
//! SITERECOVERY_REQUIRE_EBPF=1). An ignored run measures the same against whole-chunk
//! reads on a 2 GiB device.

use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngExt as _;
use siterecovery_agent::changes::EbpfTracker;
use siterecovery_agent::disk::Disk;
use siterecovery_agent::{Agent, AgentConfig, AgentStatus, DiskConfig, RestartConfig};
use siterecovery_process_server::group::GroupSpec;
use siterecovery_process_server::target::{StaticTargets, Target, Targets};
use siterecovery_store::{LocalBackend, ServerRef, Store, StoreOptions};

mod support;

use support::LocalPs;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BLOCK: u64 = 64 * KIB;
const CHUNK: u64 = 4 * MIB;

struct Loop(PathBuf);

impl Loop {
    fn attach(image: &Path) -> Self {
        let out = Command::new("losetup").args(["--find", "--show"]).arg(image).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Self(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn ebpf_available() -> bool {
    let required = std::env::var("SITERECOVERY_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    let why = if !Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0")) {
        Some("not root".to_string())
    } else {
        siterecovery_agent::changes::ebpf_probe().err()
    };
    match why {
        None => true,
        Some(why) if required => panic!("eBPF tracking is required here but unavailable: {why}"),
        Some(why) => {
            eprintln!("skipping: eBPF block tracking unavailable here ({why})");
            false
        }
    }
}

/// Random bytes, half of every 4 KiB compressible (as disks are).
fn content(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut rng = rand::rng();
    for page in buf.chunks_mut(4096) {
        let half = page.len().min(2048);
        rng.fill(&mut page[..half]);
    }
    buf
}

/// A process server with a local store and 4 MiB chunks, and an agent with the eBPF
/// tracker protecting `device`, whose block cache holds `cache` bytes.
/// The process server's targets, which know the server until it is deleted.
struct Deletable {
    targets: StaticTargets,
    deleted: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl Targets for Deletable {
    async fn resolve(&self, namespace: &str, server: &str) -> Result<Arc<Target>, (String, String)> {
        if self.deleted.load(Ordering::SeqCst) {
            return Err(("UnknownServer".into(), format!("ProtectedServer {namespace}/{server} does not exist")));
        }
        self.targets.resolve(namespace, server).await
    }

    async fn group(&self, namespace: &str, server: &str) -> Result<Option<GroupSpec>, String> {
        self.targets.group(namespace, server).await
    }
}

struct Bed {
    store: Store,
    /// Set: the process server refuses the server as unknown (its ProtectedServer deleted).
    deleted: Arc<AtomicBool>,
    server: ServerRef,
    config: AgentConfig,
    cache: usize,
    status: Arc<Mutex<AgentStatus>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _ps: LocalPs,
}

impl Bed {
    async fn start(dir: &Path, device: &Path, cache: usize) -> Self {
        Self::start_with(dir, device, cache, None).await
    }

    /// [`Bed::start`] with the agent keeping its tracking across restarts as `restart` says.
    async fn start_with(dir: &Path, device: &Path, cache: usize, restart: Option<RestartConfig>) -> Self {
        let deleted = Arc::new(AtomicBool::new(false));
        let flag = deleted.clone();
        let local = LocalPs::start(dir, CHUNK, |targets| Arc::new(Deletable { targets, deleted: flag })).await;
        let keys = std::collections::BTreeMap::from([
            ("active".to_string(), b"k1".to_vec()),
            ("key-k1".to_string(), local.key.to_vec()),
        ]);
        let keyring = siterecovery_store::Keyring::from_secret_data(&keys).unwrap();
        let backend = Arc::new(LocalBackend::new(dir.join("store")).unwrap());
        let store = Store::new(backend, keyring, StoreOptions::default()).unwrap();
        let config = AgentConfig {
            restart,
            ..local.agent_config(vec![DiskConfig { id: "data".into(), path: device.to_path_buf() }])
        };
        let (status, stop, task) = spawn_agent(&config, cache);
        let server = ServerRef::new("prod", "db-01").unwrap();
        Self { store, deleted, server, config, cache, status, stop, task, _ps: local }
    }

    /// Starts a new agent process, as after a restart (the previous one must be stopped).
    fn start_agent(&mut self) {
        (self.status, self.stop, self.task) = spawn_agent(&self.config, self.cache);
    }

    /// Ends the agent without letting it stop cleanly, as SIGKILL would.
    async fn kill_agent(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    /// Waits until the agent's last point is in the store and restores it; it must equal
    /// `image` (the loop device's backing file).
    async fn restored_equals(&self, last: &AgentStatus, image: &Path, out: &Path) {
        let (store, server) = (&self.store, &self.server);
        let id = last.last_point.clone().expect("a point");
        // The process server uploads a point after acknowledging it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let point = loop {
            match store.load_point(server, &id).await {
                Ok(p) => break p,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "point {id} never reached the store: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        store.restore_point(server, &point, &[("data".to_string(), out.to_owned())]).await.unwrap();
        let (a, b) = (std::fs::read(image).unwrap(), std::fs::read(out).unwrap());
        assert_eq!(a.len(), b.len());
        assert!(
            a == b,
            "the restored point differs from the device at byte {:?}",
            a.iter().zip(&b).position(|(x, y)| x != y)
        );
    }

    fn status(&self) -> AgentStatus {
        self.status.lock().unwrap().clone()
    }

    async fn wait(&self, what: &str, secs: u64, f: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {s:#?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for two more points than `before` (the second surely after what was written
    /// before this call) and returns the status then.
    async fn next_points(&self, before: &AgentStatus) -> AgentStatus {
        self.wait("two more points", 120, |s| s.points >= before.points + 2).await
    }

    /// Stops the agent; the process server runs on (it uploads points after acknowledging
    /// them) as long as the bed is kept.
    async fn stop_agent(&mut self) -> AgentStatus {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(20), &mut self.task).await;
        self.status()
    }
}

type AgentTask = tokio::task::JoinHandle<anyhow::Result<()>>;

/// An agent with the eBPF tracker of its disks' kind (pinned as `config.restart` says) and a block cache of
/// `cache` bytes, running until told to stop.
fn spawn_agent(
    config: &AgentConfig,
    cache: usize,
) -> (Arc<Mutex<AgentStatus>>, tokio::sync::watch::Sender<bool>, AgentTask) {
    let disks: Vec<Disk> = config.disks.iter().map(|d| Disk::open(&d.id, &d.path).unwrap()).collect();
    let pin_dir = config.restart.as_ref().map(|r| r.pin_dir.as_path());
    let tracker = if disks[0].is_block_device() {
        EbpfTracker::start_pinned(&disks, pin_dir)
    } else {
        EbpfTracker::start_files_pinned(&disks, pin_dir)
    };
    let tracker = Box::new(tracker.unwrap());
    let mut agent = Agent::new(config.clone(), tracker).with_block_cache(cache);
    let status = agent.status();
    let (stop, rx) = tokio::sync::watch::channel(false);
    (status, stop, tokio::spawn(async move { agent.run(rx).await }))
}

/// Writes `blocks` (64 KiB block indexes of the device) with new content, one write each,
/// and flushes them to the device.
fn write_blocks(device: &Path, blocks: &[u64]) {
    let f = std::fs::OpenOptions::new().write(true).open(device).unwrap();
    for &b in blocks {
        f.write_all_at(&content(BLOCK as usize), b * BLOCK).unwrap();
    }
    f.sync_all().unwrap();
}

/// A loop device over a 64 MiB image in `dir`: 48 MiB of data, then zeros; 16 chunks.
fn small_device(dir: &Path) -> (PathBuf, Loop) {
    let image = dir.join("data.img");
    std::fs::write(&image, content(48 * MIB as usize)).unwrap();
    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(64 * MIB).unwrap();
    let device = Loop::attach(&image);
    (image, device)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_reads_only_the_blocks_written() {
    if !ebpf_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (image, device) = small_device(dir);
    let mut bed = Bed::start(dir, &device.0, siterecovery_agent::DEFAULT_BLOCK_CACHE).await;
    let copied = bed.wait("the initial copy and a point", 120, |s| s.initial_copy_done && s.points > 0).await;
    assert_eq!(copied.bytes_read, 64 * MIB, "the initial copy reads the device once");

    // Scattered writes: single blocks in eight data chunks, two adjacent blocks in
    // another, one block in a zero chunk, and a block rewritten with what it holds.
    let blocks: Vec<u64> = vec![1, 70, 135, 200, 266, 330, 395, 460, 520, 521, 900];
    write_blocks(&device.0, &blocks);
    let same = {
        let f = std::fs::File::open(&image).unwrap();
        let mut buf = vec![0u8; BLOCK as usize];
        f.read_exact_at(&mut buf, 600 * BLOCK).unwrap();
        buf
    };
    let f = std::fs::OpenOptions::new().write(true).open(&device.0).unwrap();
    f.write_all_at(&same, 600 * BLOCK).unwrap();
    f.sync_all().unwrap();
    let written = (blocks.len() as u64 + 1) * BLOCK;

    let after = bed.next_points(&copied).await;
    let read = after.bytes_read - copied.bytes_read;
    eprintln!("{} blocks written ({written} bytes): {read} bytes read, status {after:#?}", blocks.len() + 1);
    // A write in flight at a look is reported again by the next one: at most twice.
    assert!(read >= written && read <= 2 * written, "read {read} bytes for {written} written");
    assert!(after.chunks_read_partly - copied.chunks_read_partly >= 10, "{after:#?}");
    // One delta per chunk written but the one rewritten unchanged (more when a look fell
    // between two writes to one chunk), carrying the blocks changed.
    let deltas = after.deltas_sent - copied.deltas_sent;
    assert!((10..=20).contains(&deltas), "{deltas} deltas");
    assert_eq!(after.chunks_sent - copied.chunks_sent, deltas, "nothing sent whole");
    let payload = after.payload_bytes - copied.payload_bytes;
    assert!(payload >= written - BLOCK && payload <= 2 * written, "{payload} bytes sent");
    assert!(after.block_cache_bytes > 0 && after.block_cache_bytes <= siterecovery_agent::DEFAULT_BLOCK_CACHE as u64);

    let last = bed.stop_agent().await;
    bed.restored_equals(&last, &image, &dir.join("restored")).await;
}

/// A private bpf filesystem, unmounted (releasing what stayed pinned) on drop.
struct BpfFs(tempfile::TempDir);

impl BpfFs {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()).status().unwrap();
        assert!(status.success(), "mounting a bpf filesystem");
        Self(dir)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// A clean restart (an upgrade, a rollout) compares nothing: the stopping agent hands
/// over what it believes the process server holds, the pinned tracker records the writes
/// made while no agent runs, and the next agent reads only the blocks they touched. After
/// a kill there is no handover and the next agent compares every chunk. Both restore equal
/// to the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_reads_only_what_changed_while_stopped() {
    if !ebpf_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (image, device) = small_device(tmp.path());
    clean_restart(tmp.path(), &image, &device.0, 64 * MIB).await;
}

/// The same on an image file followed in the page cache (its hole of 16 MiB is not read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_of_an_image_file_reads_only_what_changed_while_stopped() {
    if !ebpf_available() {
        return;
    }
    // On the build's filesystem (ext4 here): /tmp may be a tmpfs, which is not tracked.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let image = tmp.path().join("data.img");
    std::fs::write(&image, content(48 * MIB as usize)).unwrap();
    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(64 * MIB).unwrap();
    clean_restart(tmp.path(), &image, &image, 48 * MIB).await;
}

/// Protects `disk` (whose content is `image`'s), stops the agent cleanly, writes three
/// blocks, and checks the next agent reads only those; the same across an upgrade (the
/// pins renamed to another build's); then kills one and checks the next compares
/// everything (`full` bytes read).
async fn clean_restart(dir: &Path, image: &Path, disk: &Path, full: u64) {
    let bpffs = BpfFs::mount();
    let restart = RestartConfig { pin_dir: bpffs.0.path().join("prod_db-01"), state_file: dir.join("agent-state.bin") };
    let mut bed = Bed::start_with(dir, disk, siterecovery_agent::DEFAULT_BLOCK_CACHE, Some(restart.clone())).await;
    bed.wait("the initial copy and a point", 120, |s| s.initial_copy_done && s.points > 0).await;
    assert!(!bed.status().resumed_from_handover);

    bed.stop_agent().await;
    assert!(restart.state_file.exists(), "a cleanly stopped agent leaves its state");
    // Written while no agent runs: three chunks.
    write_blocks(disk, &[3, 300, 700]);

    bed.start_agent();
    let after = bed.wait("two points after the restart", 120, |s| s.points >= 2).await;
    assert!(after.resumed_from_handover, "{after:#?}");
    assert!(!restart.state_file.exists(), "a state is used once");
    assert_eq!(after.last_resync_reason, None, "no comparison of every chunk");
    // The block values came with the handover: the three blocks are read alone (a write in
    // flight at a look is read again at the next).
    assert!(after.bytes_read >= 3 * BLOCK && after.bytes_read <= 6 * BLOCK, "read {} bytes", after.bytes_read);
    assert!(after.chunks_read_partly >= 3, "{after:#?}");
    let last = bed.stop_agent().await;
    bed.restored_equals(&last, image, &dir.join("restored")).await;

    // An upgrade: the pins become another build's (another program id, the same maps
    // version), which the next agent takes over.
    let pins: Vec<_> = std::fs::read_dir(&restart.pin_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(pins.len(), 1, "{pins:?}");
    let name = pins[0].file_name().unwrap().to_string_lossy().into_owned();
    let (version, _) = name.rsplit_once('-').unwrap();
    std::fs::rename(&pins[0], restart.pin_dir.join(format!("{version}-00000000000000ff"))).unwrap();
    write_blocks(disk, &[9, 500]);
    bed.start_agent();
    let after = bed.wait("two points after the upgrade", 120, |s| s.points >= 2).await;
    assert!(after.resumed_from_handover, "{after:#?}");
    assert_eq!(after.last_resync_reason, None, "an upgrade compares nothing");
    assert!(after.bytes_read >= 2 * BLOCK && after.bytes_read <= 4 * BLOCK, "read {} bytes", after.bytes_read);
    let last = bed.stop_agent().await;
    bed.restored_equals(&last, image, &dir.join("restored-after-upgrade")).await;

    // Killed: no handover, and the pinned tracker was never suspended.
    bed.start_agent();
    bed.wait("a point", 120, |s| s.points >= 1).await;
    bed.kill_agent().await;
    assert!(!restart.state_file.exists());
    write_blocks(disk, &[5]);
    bed.start_agent();
    let after = bed.wait("a point after the kill", 120, |s| s.points >= 1).await;
    assert!(!after.resumed_from_handover);
    assert_eq!(after.last_resync_reason.as_deref(), Some("AgentStarted"));
    assert_eq!(after.bytes_read, full, "every chunk compared");
    let last = bed.stop_agent().await;
    bed.restored_equals(&last, image, &dir.join("restored-after-kill")).await;
}

/// A server no longer protected leaves nothing in the kernel: refused as unknown, the
/// agent unpins its tracking, which goes on in the process (protected again, it replicates
/// the writes made meanwhile without comparing everything), and it leaves no restart state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_no_longer_protected_leaves_nothing_pinned() {
    if !ebpf_available() {
        return;
    }
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (dir, image) = (tmp.path(), tmp.path().join("data.img"));
    std::fs::write(&image, content(16 * MIB as usize)).unwrap();
    let bpffs = BpfFs::mount();
    let restart = RestartConfig { pin_dir: bpffs.0.path().join("prod_db-01"), state_file: dir.join("agent-state.bin") };
    let pinned = || std::fs::read_dir(&restart.pin_dir).map(|d| d.count()).unwrap_or(0);
    let mut bed = Bed::start_with(dir, &image, siterecovery_agent::DEFAULT_BLOCK_CACHE, Some(restart.clone())).await;
    bed.wait("the initial copy and a point", 120, |s| s.initial_copy_done && s.points > 0).await;
    bed.stop_agent().await;
    assert!(restart.state_file.exists() && pinned() == 1, "a clean stop keeps tracking pinned");

    // The ProtectedServer is deleted; the next agent resumes the pins, then is refused.
    bed.deleted.store(true, Ordering::SeqCst);
    bed.start_agent();
    let refused = |s: &AgentStatus| s.last_error.as_deref().is_some_and(|e| e.contains("UnknownServer"));
    let status = bed.wait("the refusal", 60, refused).await;
    assert!(status.last_error.unwrap().contains("does not exist"), "the process server's reason is shown");
    assert_eq!(pinned(), 0, "tracking is no longer pinned");
    write_blocks(&image, &[3, 200]);

    // Protected again: tracking went on in the process.
    bed.deleted.store(false, Ordering::SeqCst);
    let after = bed.wait("a point once protected again", 120, |s| s.points >= 1).await;
    assert_eq!(after.last_resync_reason, None, "no comparison of every chunk");
    let last = bed.stop_agent().await;
    assert!(!restart.state_file.exists(), "no restart state is left for the next agent");
    assert_eq!(pinned(), 0, "nothing stays attached once the agent ended");
    bed.restored_equals(&last, &image, &dir.join("restored")).await;
}

/// The case on a 2 GiB device: 328 random 64 KiB writes, then the incremental,
/// with the block cache and without (every dirty chunk read whole, and sent whole: no
/// block CVs to find the changed blocks). Prints bytes read and sent, how long after the
/// writes' flush every dirty chunk was read and the next point was acknowledged (that
/// includes the process server's work: a delta's base not in its memory is read from the
/// store). `RUST_LOG` shows the agent's and process server's logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: cargo test -p siterecovery-agent --test dirty_blocks -- --ignored --nocapture"]
async fn measure_an_incremental_after_random_writes() {
    if !ebpf_available() {
        return;
    }
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let size = 2048 * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("data.img");
    {
        let f = std::fs::File::create(&image).unwrap();
        for at in (0..size).step_by(64 * MIB as usize) {
            f.write_all_at(&content(64 * MIB as usize), at).unwrap();
        }
    }
    let mut rng = rand::rng();
    let blocks: Vec<u64> = (0..328).map(|_| rng.random_range(0..size / BLOCK)).collect();
    let chunks: std::collections::BTreeSet<u64> = blocks.iter().map(|b| b * BLOCK / CHUNK).collect();
    for (name, cache) in [("dirty blocks", siterecovery_agent::DEFAULT_BLOCK_CACHE), ("whole chunks", 0)] {
        let dir = tmp.path().join(name.replace(' ', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        let device = Loop::attach(&image);
        let mut bed = Bed::start(&dir, &device.0, cache).await;
        let copied = bed.wait("the initial copy and a point", 900, |s| s.initial_copy_done && s.points > 0).await;
        // Deltas need their bases at the process server: wait until the copy is uploaded.
        let id = copied.last_point.clone().unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(900);
        while bed.store.load_point(&bed.server, &id).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "point {id} never reached the store");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let before = bed.status();
        write_blocks(&device.0, &blocks);
        let start = Instant::now();
        let compared = before.chunks_compared + chunks.len() as u64;
        let read = bed.wait("the dirty chunks read", 900, |s| s.chunks_compared >= compared).await;
        let reading = start.elapsed();
        let after = bed.wait("a point after the reads", 900, |s| s.points > read.points).await;
        let point = start.elapsed();
        eprintln!(
            "{name}: {} writes in {} chunks; read {:.1} MiB, sent {:.1} MiB, {} chunks read partly; \
             every dirty chunk read {:.2} s after the flush, the next point {:.2} s after it",
            blocks.len(),
            chunks.len(),
            (after.bytes_read - before.bytes_read) as f64 / MIB as f64,
            (after.payload_bytes - before.payload_bytes) as f64 / MIB as f64,
            after.chunks_read_partly - before.chunks_read_partly,
            reading.as_secs_f64(),
            point.as_secs_f64(),
        );
        bed.stop_agent().await;
    }
}

/// Points taken while a writer never stops for long are still one instant when chunks
/// are read by their dirty blocks: the writer counts i = 1, 2, … into 4 KiB slot
/// `i % 64` (eight slots per 4 MiB chunk, 512 KiB apart, each write synchronous), so
/// every instant has every slot j at the largest v ≤ top with v % 64 == j, untorn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_read_by_dirty_blocks_are_one_instant() {
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const SLOTS: u64 = 64;
    const STRIDE: u64 = 512 * KIB;
    const PAGE: usize = 4096;
    if !ebpf_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = dir.join("slots.img");
    std::fs::File::create(&image).unwrap().set_len(SLOTS * STRIDE).unwrap();
    let device = Loop::attach(&image);
    let mut bed = Bed::start(dir, &device.0, siterecovery_agent::DEFAULT_BLOCK_CACHE).await;
    let copied = bed.wait("the initial copy and a point", 120, |s| s.initial_copy_done && s.points > 0).await;

    let done = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (path, done, written) = (device.0.clone(), done.clone(), written.clone());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).custom_flags(nix::libc::O_DSYNC).open(path).unwrap();
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                for _ in 0..20 {
                    i += 1;
                    let page: Vec<u8> = i.to_le_bytes().iter().copied().cycle().take(PAGE).collect();
                    f.write_all_at(&page, (i % SLOTS) * STRIDE).unwrap();
                }
                written.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(60));
            }
        })
    };
    let mut points: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while points.len() < 4 {
        let s = bed.status();
        if let Some(p) = s.last_point.clone()
            && s.points > copied.points
            && written.load(Ordering::Relaxed) > 0
            && points.last() != Some(&p)
        {
            points.push(p);
        }
        assert!(tokio::time::Instant::now() < deadline, "too few points while writing: {points:?}, {s:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let last = bed.stop_agent().await;
    assert!(last.chunks_read_partly > 0, "no chunk was read by its dirty blocks: {last:#?}");

    let mut within = 0;
    for id in &points {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let point = loop {
            match bed.store.load_point(&bed.server, id).await {
                Ok(p) => break p,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "point {id} never reached the store: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let out = dir.join(format!("restore-{id}"));
        bed.store.restore_point(&bed.server, &point, &[("data".to_string(), out.clone())]).await.unwrap();
        let f = std::fs::File::open(&out).unwrap();
        let slots: Vec<u64> = (0..SLOTS)
            .map(|j| {
                let mut buf = vec![0u8; PAGE];
                f.read_exact_at(&mut buf, j * STRIDE).unwrap();
                let first = u64::from_le_bytes(buf[..8].try_into().unwrap());
                assert!(buf.chunks(8).all(|w| w == &first.to_le_bytes()[..]), "point {id}: slot {j} is torn");
                first
            })
            .collect();
        let top = *slots.iter().max().unwrap();
        for (j, &v) in slots.iter().enumerate() {
            let j = j as u64;
            let expected = if top < j { 0 } else { top - (top - j) % SLOTS };
            assert_eq!(v, expected, "point {id}: slot {j} is not from the instant the top was {top}");
        }
        within += usize::from(top > SLOTS);
    }
    assert!(within >= 2, "points must fall inside the writing: {points:?}");
}
