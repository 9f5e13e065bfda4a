//! Proof that a crash-consistent recovery point is one instant across every disk of a
//! server, with the eBPF trackers on real loop devices and on image files (root only;
//! skipped with a message elsewhere unless SITERECOVERY_REQUIRE_EBPF=1).
//!
//! A writer counts i = 1, 2, … and writes i to slot `i % SLOTS` of disk A, then to the
//! same slot of disk B, each write filling a 4 KiB block with the value (synchronous,
//! O_DSYNC, on loop devices; buffered on image files). Any instant of that history satisfies, with `a` the largest value on A and
//! `b` the largest on B: every slot j of A holds the largest v ≤ a with v % SLOTS == j
//! (likewise B with b), no block is torn, and b ∈ {a − 1, a}. A point read at different
//! instants for different chunks or disks breaks one of these.

mod support;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use siterecovery_agent::Agent;
use siterecovery_agent::changes::EbpfTracker;
use siterecovery_agent::disk::Disk;
use siterecovery_store::ServerRef;
use support::*;

const MIB: u64 = 1024 * 1024;
const SLOTS: u64 = 64;
const SLOT_STRIDE: u64 = 128 * 1024;
const BLOCK: usize = 4096;

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

fn required() -> bool {
    std::env::var("SITERECOVERY_REQUIRE_EBPF").is_ok_and(|v| v == "1")
}

fn ebpf_available() -> bool {
    let required = required();
    let why = if !Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0")) {
        Some("not root".to_string())
    } else {
        siterecovery_tracker_probe().err()
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

fn siterecovery_tracker_probe() -> Result<(), String> {
    siterecovery_agent::changes::ebpf_probe()
}

/// The value slot `j` holds when `top` is the largest value written.
fn expected(top: u64, j: u64) -> u64 {
    if top < j || (top == 0) {
        return 0;
    }
    top - ((top - j) % SLOTS)
}

/// Reads every slot of a restored disk; panics on a torn block.
fn slots(path: &Path) -> Vec<u64> {
    let f = std::fs::File::open(path).unwrap();
    (0..SLOTS)
        .map(|j| {
            let mut buf = vec![0u8; BLOCK];
            f.read_exact_at(&mut buf, j * SLOT_STRIDE).unwrap();
            let first = u64::from_le_bytes(buf[..8].try_into().unwrap());
            assert!(
                buf.chunks(8).all(|w| u64::from_le_bytes(w.try_into().unwrap()) == first),
                "slot {j} of {} is torn",
                path.display()
            );
            first
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_consistent_points_are_one_instant_across_disks() {
    if !ebpf_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (ia, ib) = (dir.join("a.img"), dir.join("b.img"));
    image(&ia, 8 * MIB);
    image(&ib, 8 * MIB);
    let (la, lb) = (Loop::attach(&ia), Loop::attach(&ib));
    let writer = Writer { flags: libc::O_DSYNC, burst: 20, pause: Duration::from_millis(60) };
    prove_points(dir, [la.0.clone(), lb.0.clone()], |d| EbpfTracker::start(d).unwrap(), writer).await;
}

/// The same proof on image files followed in the page cache, written without syncing:
/// the agent reads what the page cache holds. The writer never pauses for more than the
/// 3 ms between two writes (as the benchmark's 20 MB/s of 64 KiB writes): there is no
/// filesystem to freeze, so the points come from the pre-copy converging between writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_consistent_points_are_one_instant_across_image_files() {
    if !ebpf_available() {
        return;
    }
    // On the build's filesystem (ext4 here): /tmp may be a tmpfs, which is not tracked.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path();
    let (ia, ib) = (dir.join("a.img"), dir.join("b.img"));
    image(&ia, 8 * MIB);
    image(&ib, 8 * MIB);
    let disks = [Disk::open("a", &ia).unwrap(), Disk::open("b", &ib).unwrap()];
    if let Err(e) = EbpfTracker::start_files(&disks) {
        assert!(!required(), "image-file tracking is required here but unavailable: {e}");
        eprintln!("skipping: image-file tracking unavailable here ({e})");
        return;
    }
    let writer = Writer { flags: 0, burst: 1, pause: Duration::from_millis(3) };
    prove_points(dir, [ia, ib], |d| EbpfTracker::start_files(d).unwrap(), writer).await;
}

/// How the writer writes: `burst` values (each to A, then B), then a `pause`, with the
/// disks opened with `flags` besides write.
#[derive(Clone, Copy)]
struct Writer {
    flags: i32,
    burst: u64,
    pause: Duration,
}

/// Protects disks `paths` (ids a and b) with the tracker `start` makes while the
/// writer counts into them as `how` says, and checks four points taken during the writes.
async fn prove_points(dir: &Path, paths: [PathBuf; 2], start: fn(&[Disk]) -> EbpfTracker, how: Writer) {
    let pki = Pki::new(dir);
    let targets = local_targets(dir, &dir.join("store"), MIB as u32);
    let ps = start_ps(dir, &pki, &targets, 1 << 30).await;
    let store = store_of(&targets);
    let server = ServerRef::new("prod", "pair").unwrap();
    let [pa, pb] = paths;
    let disks = [("a", pa.as_path()), ("b", pb.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "pair", "pair");
    let config = agent_config(&pki, files, "prod", "pair", ps.addr, &disks, 0.25);
    let opened: Vec<Disk> = config.disks.iter().map(|d| Disk::open(&d.id, &d.path).unwrap()).collect();
    let mut agent = Agent::new(config, Box::new(start(&opened)));
    let status = agent.status();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move { agent.run(rx).await });

    // The writer: bursts of writes with short pauses (a point needs a moment without
    // writes, however short; see docs/replication-protocol.md).
    let done = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (done, written) = (done.clone(), written.clone());
        std::thread::spawn(move || {
            let open = |p: &Path| std::fs::OpenOptions::new().write(true).custom_flags(how.flags).open(p).unwrap();
            let (fa, fb) = (open(&pa), open(&pb));
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) {
                for _ in 0..how.burst {
                    i += 1;
                    let block: Vec<u8> = i.to_le_bytes().iter().copied().cycle().take(BLOCK).collect();
                    let at = (i % SLOTS) * SLOT_STRIDE;
                    fa.write_all_at(&block, at).unwrap();
                    fb.write_all_at(&block, at).unwrap();
                }
                written.store(i, Ordering::Relaxed);
                std::thread::sleep(how.pause);
            }
        })
    };

    // Collect the points acknowledged while the writer runs, from once it went round
    // every slot: points are acknowledged within a fraction of a second, so four points
    // collected from its first write could all predate that on a slow machine.
    let mut points: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while points.len() < 4 {
        let s = status.lock().unwrap().clone();
        if let Some(p) = s.last_point.clone()
            && written.load(Ordering::Relaxed) > SLOTS
            && points.last() != Some(&p)
        {
            points.push(p);
        }
        assert!(tokio::time::Instant::now() < deadline, "too few points while writing: {points:?}, status {s:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;

    let mut nontrivial = 0;
    for id in &points {
        let m = wait_point(&store, &server, id, 30).await;
        let out = dir.join(format!("restore-{id}"));
        std::fs::create_dir_all(&out).unwrap();
        let targets = vec![("a".to_string(), out.join("a")), ("b".to_string(), out.join("b"))];
        store.restore_point(&server, &m, &targets).await.unwrap();
        let (sa, sb) = (slots(&out.join("a")), slots(&out.join("b")));
        let (a, b) = (*sa.iter().max().unwrap(), *sb.iter().max().unwrap());
        for j in 0..SLOTS {
            assert_eq!(sa[j as usize], expected(a, j), "point {id}: disk a slot {j} is not from the instant a={a}");
            assert_eq!(sb[j as usize], expected(b, j), "point {id}: disk b slot {j} is not from the instant b={b}");
        }
        assert!(b == a || b + 1 == a, "point {id}: disk b is at {b} but disk a at {a}: not one instant");
        if a > SLOTS {
            nontrivial += 1;
        }
        eprintln!("point {id}: a={a} b={b}");
    }
    assert!(nontrivial >= 2, "points must fall inside the writing, not before it: {points:?}");
    drop(ps);
}
