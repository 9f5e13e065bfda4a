//! App-consistent recovery points on a real ext4 filesystem: a loop device, mounted, its
//! writes followed with eBPF, frozen with `fsfreeze` around hooks that leave markers in it
//! (root only; skipped with a message elsewhere unless SITERECOVERY_REQUIRE_EBPF=1).
//!
//! What a user relies on: the point restores to a filesystem that needs no journal
//! recovery and holds what the pre-hook wrote but not what the post-hook wrote; the
//! filesystem is writable again right after; a failing or hanging hook gives no point, a
//! reason, and never leaves the filesystem frozen.

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use siterecovery_agent::app::AppConsistency;
use siterecovery_agent::changes::EbpfTracker;
use siterecovery_agent::disk::Disk;
use siterecovery_agent::freeze::Freeze;
use siterecovery_agent::{Agent, AgentStatus};
use siterecovery_store::ServerRef;
use support::*;

const MIB: u64 = 1024 * 1024;

/// One test at a time: each freezes a filesystem and attaches eBPF programs.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// An ext4 filesystem on a loop device, mounted; thawed, unmounted and detached on drop.
struct Fs {
    device: PathBuf,
    mount: PathBuf,
}

impl Fs {
    fn new(dir: &Path, size: u64) -> Self {
        let image = dir.join("fs.img");
        image_file(&image, size);
        let out = run("losetup", &["--find", "--show", image.to_str().unwrap()]);
        let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let mount = dir.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        let fs = Self { device, mount };
        run("mkfs.ext4", &["-q", fs.device.to_str().unwrap()]);
        run("mount", &[fs.device.to_str().unwrap(), fs.mount.to_str().unwrap()]);
        fs
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mount.join(name)
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        // A failed test must not leave a frozen filesystem behind (umount would hang).
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mount).output();
        if !Command::new("umount").arg(&self.mount).status().is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

fn image_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

fn root_with_ebpf(need_ebpf: bool) -> bool {
    let required = std::env::var("SITERECOVERY_REQUIRE_EBPF").is_ok_and(|v| v == "1");
    let why = if !Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0")) {
        Some("not root".to_string())
    } else if need_ebpf {
        siterecovery_agent::changes::ebpf_probe().err()
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if required => panic!("eBPF tracking is required here but unavailable: {why}"),
        Some(why) => {
            eprintln!("skipping: needs root and eBPF block tracking ({why})");
            false
        }
    }
}

/// Whether a new file can be written and synced on `fs` within `within` (a frozen
/// filesystem blocks the writer until it is thawed).
fn writable_within(fs: &Fs, within: Duration) -> bool {
    let path = fs.path("probe");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"probe").unwrap();
        f.sync_all().unwrap();
        let _ = tx.send(());
    });
    rx.recv_timeout(within).is_ok()
}

/// The in-process process server and an agent protecting `fs` with eBPF and `app`.
struct Setup {
    _ps: siterecovery_process_server::ProcessServer,
    store: siterecovery_store::Store,
    server: ServerRef,
    agent: RunningAgent,
}

async fn protect(dir: &Path, fs: &Fs, app: AppConsistency) -> Setup {
    let pki = Pki::new(dir);
    let targets = local_targets(dir, &dir.join("store"), MIB as u32);
    let ps = start_ps(dir, &pki, &targets, 1 << 30).await;
    let files = pki.agent_files(&pki.ca, "prod", "db", "db");
    let mut config = agent_config(&pki, files, "prod", "db", ps.addr, &[("fs", fs.device.as_path())], 0.5);
    config.app_consistency = Some(app);
    let opened: Vec<Disk> = config.disks.iter().map(|d| Disk::open(&d.id, &d.path).unwrap()).collect();
    let mut agent = Agent::new(config, Box::new(EbpfTracker::start(&opened).unwrap()));
    let status = agent.status();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move { agent.run(rx).await });
    Setup {
        _ps: ps,
        store: store_of(&targets),
        server: ServerRef::new("prod", "db").unwrap(),
        agent: RunningAgent { status, stop, task },
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

fn hooks(fs: &Fs, pre: &str) -> AppConsistency {
    AppConsistency {
        pre_hook: sh(pre),
        post_hook: sh(&format!("echo post > {}", fs.path("post-hook").display())),
        mount_points: vec![fs.mount.clone()],
        freeze_timeout_seconds: 10.0,
        hook_timeout_seconds: 10.0,
        interval_seconds: Some(2.0),
    }
}

fn failure(s: &AgentStatus) -> Option<(&str, &str)> {
    s.last_app_failure.as_ref().map(|f| (f.reason.as_str(), f.message.as_str()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_point_is_the_frozen_filesystem_between_the_hooks() {
    let _serial = SERIAL.lock().await;
    if !root_with_ebpf(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fs = Fs::new(dir, 64 * MIB);
    let pre = format!("echo pre > {}", fs.path("pre-hook").display());
    let setup = protect(dir, &fs, hooks(&fs, &pre)).await;

    // A writer appending to a file on the filesystem the whole time.
    let done = Arc::new(AtomicBool::new(false));
    let appended = Arc::new(AtomicU64::new(0));
    let writer = {
        let (path, done, appended) = (fs.path("log"), done.clone(), appended.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                n += 1;
                writeln!(f, "{n:0>4095}").unwrap();
                if n.is_multiple_of(16) {
                    f.sync_data().unwrap();
                }
                appended.store(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let s = setup.agent.wait("an app-consistent point", 120, |s| s.app_points >= 1).await;
    let id = s.last_app_point.clone().unwrap();
    assert!(id.ends_with("-app"), "point id {id}");
    assert!(writable_within(&fs, Duration::from_secs(1)), "the filesystem is still frozen after the point");
    let before = appended.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(appended.load(Ordering::Relaxed) > before, "the writer did not resume after the thaw");
    setup.agent.wait("the post-hook", 20, |_| fs.path("post-hook").exists()).await;
    done.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let s = setup.agent.status();
    assert_eq!(s.app_points_failed, 0, "app-consistent attempts failed: {s:#?}");
    setup.agent.stop().await;

    let manifest = wait_point(&setup.store, &setup.server, &id, 30).await;
    assert_eq!(manifest.kind, siterecovery_store::PointKind::App);
    let restored = dir.join("restored.img");
    setup.store.restore_point(&setup.server, &manifest, &[("fs".to_string(), restored.clone())]).await.unwrap();
    let img = restored.to_str().unwrap();
    // The freeze flushed the journal: the filesystem is clean as it stands.
    let check = Command::new("fsck.ext4").args(["-n", img]).output().unwrap();
    let text = String::from_utf8_lossy(&check.stdout).to_string() + &String::from_utf8_lossy(&check.stderr);
    assert!(check.status.success() && text.contains("clean"), "fsck.ext4 -n: {:?}\n{text}", check.status);
    assert!(!text.contains("recovery"), "the restored filesystem needs journal recovery:\n{text}");
    let full = Command::new("fsck.ext4").args(["-f", "-n", img]).output().unwrap();
    assert!(full.status.success(), "fsck.ext4 -f -n: {:?}\n{}", full.status, String::from_utf8_lossy(&full.stdout));
    let cat = |name: &str| run("debugfs", &["-R", &format!("cat /{name}"), img]).stdout;
    assert_eq!(cat("pre-hook"), b"pre\n", "the pre-hook's write is missing from the app point");
    assert!(cat("post-hook").is_empty(), "the post-hook's write is in the app point");
    assert!(!cat("log").is_empty(), "the writer's file is empty in the point");
    assert_eq!(std::fs::read(fs.path("post-hook")).unwrap(), b"post\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_pre_hook_gives_no_app_point_and_no_freeze() {
    let _serial = SERIAL.lock().await;
    if !root_with_ebpf(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fs = Fs::new(dir, 32 * MIB);
    let setup = protect(dir, &fs, hooks(&fs, "echo 'database refused to quiesce' >&2; exit 1")).await;

    let s = setup.agent.wait("a pre-hook failure", 90, |s| s.app_points_failed >= 1).await;
    let (reason, message) = failure(&s).unwrap();
    assert_eq!(reason, "PreHookFailed", "{message}");
    assert!(message.contains("database refused to quiesce") && message.contains("exit status: 1"), "{message}");
    assert_eq!((s.app_points, s.app_points_failed), (0, 1));
    assert!(writable_within(&fs, Duration::from_secs(1)), "the filesystem was left frozen");
    // The post-hook undoes whatever the pre-hook did before failing.
    setup.agent.wait("the post-hook", 20, |_| fs.path("post-hook").exists()).await;
    // Crash-consistent points go on.
    let s = setup.agent.wait("a crash-consistent point", 30, |s| s.points >= 1).await;
    assert!(s.last_point.as_deref().is_some_and(|p| p.ends_with("-crash")), "{s:#?}");
    assert_eq!(s.app_points, 0);
    setup.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_pre_hook_is_killed_and_nothing_stays_frozen() {
    let _serial = SERIAL.lock().await;
    if !root_with_ebpf(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fs = Fs::new(dir, 32 * MIB);
    let pid_file = dir.join("hook.pid");
    let mut app = hooks(&fs, &format!("sleep 600 & echo $! > {}; wait", pid_file.display()));
    app.hook_timeout_seconds = 2.0;
    let setup = protect(dir, &fs, app).await;

    let s = setup.agent.wait("a pre-hook time-out", 90, |s| s.app_points_failed >= 1).await;
    let (reason, message) = failure(&s).unwrap();
    assert_eq!(reason, "PreHookTimedOut", "{message}");
    assert!(message.contains("was killed"), "{message}");
    assert_eq!(s.app_points, 0);
    assert!(writable_within(&fs, Duration::from_secs(1)), "the filesystem was left frozen");
    // The hook's child went with it (its whole process group is killed).
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
    let stat = format!("/proc/{pid}/stat");
    let gone = || {
        std::fs::read_to_string(&stat)
            .map_or(true, |s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !gone() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone(), "the hook's child {pid} still runs");
    setup.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_never_outlasts_its_limit() {
    let _serial = SERIAL.lock().await;
    if !root_with_ebpf(false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fs = Fs::new(tmp.path(), 32 * MIB);
    let started = std::time::Instant::now();
    let mut freeze = Freeze::start(vec![fs.mount.clone()], Duration::from_secs(1));
    freeze.frozen().await.unwrap();
    // Frozen: a write waits...
    assert!(!writable_within(&fs, Duration::from_millis(300)), "the filesystem is not frozen");
    // ...until the limit thaws it, though nobody thawed or dropped the freeze.
    assert!(writable_within(&fs, Duration::from_secs(3)), "the freeze outlasted its limit");
    assert!(started.elapsed() < Duration::from_secs(4));
    let report = freeze.thaw(Duration::from_secs(5)).await.unwrap();
    assert!(report.by_limit && report.errors.is_empty(), "{report:?}");

    // A freeze dropped without a thaw (an error path, a cancelled future) thaws at once.
    let mut freeze = Freeze::start(vec![fs.mount.clone()], Duration::from_secs(60));
    freeze.frozen().await.unwrap();
    drop(freeze);
    assert!(writable_within(&fs, Duration::from_secs(1)), "dropping the freeze did not thaw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_points_converge_with_a_short_freeze_when_writes_never_pause() {
    let _serial = SERIAL.lock().await;
    if !root_with_ebpf(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let fs = Fs::new(dir, 64 * MIB);
    // Mount points configured, app-consistent points off: only the convergence freeze.
    let app = AppConsistency { interval_seconds: None, pre_hook: vec![], post_hook: vec![], ..hooks(&fs, "true") };
    let setup = protect(dir, &fs, app).await;
    // A writer that never pauses: random 64 KiB writes into a file, synced each time.
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (path, done) = (fs.path("data"), done.clone());
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path).unwrap();
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                n += 1;
                let block = vec![(n % 251) as u8; 65536];
                f.write_all_at(&block, (n * 7919 % 256) * 65536).unwrap();
                f.sync_data().unwrap();
            }
        })
    };
    let s = setup.agent.wait("three crash-consistent points under constant writes", 120, |s| s.points >= 3).await;
    assert!(writable_within(&fs, Duration::from_secs(1)), "the filesystem is still frozen");
    done.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    setup.agent.stop().await;
    let id = s.last_point.clone().unwrap();
    let manifest = wait_point(&setup.store, &setup.server, &id, 30).await;
    let restored = dir.join("restored.img");
    setup.store.restore_point(&setup.server, &manifest, &[("fs".to_string(), restored.clone())]).await.unwrap();
    let check = Command::new("fsck.ext4").args(["-f", "-n", restored.to_str().unwrap()]).output().unwrap();
    assert!(
        check.status.success(),
        "fsck.ext4 -f -n on the converged point: {}",
        String::from_utf8_lossy(&check.stdout)
    );
}
