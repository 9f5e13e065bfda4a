//! Faults of the data plane: a process server or an agent killed (SIGKILL) in the middle
//! of a copy, a store that refuses uploads, garbage on the wire and a damaged object in
//! the store. Each test asserts what a user cares about: nothing acknowledged is lost,
//! what is restored equals the source byte for byte, and damage is reported by name.

mod support;

use std::collections::BTreeSet;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use siterecovery_store::{ChunkHash, ChunkRef, PointKind, ServerRef};
use siterecovery_wire::{
    ChunkData, DiskInfo, Encoding, Frame, Hello, Message, PROTOCOL_VERSION, PointMarker, WireError, read_message,
    write_message,
};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, sleep};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------
// Child processes, ports, journals and metrics.
// ---------------------------------------------------------------------------------------

/// Fills `len` bytes at `offset` with data zstd cannot shrink (chunks go raw on the wire,
/// so the wire and journal sizes are predictable).
fn write_random(path: &Path, offset: u64, len: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.extend_from_slice(&x.to_le_bytes());
    }
    buf.truncate(len);
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).unwrap();
    f.write_all_at(&buf, offset).unwrap();
    f.sync_all().unwrap();
}

fn journal_dir(dir: &Path, ns: &str, server: &str) -> PathBuf {
    dir.join("cache").join(ns).join(server).join("journal")
}

/// Bytes in a journal directory.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|it| it.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// The chunks whose whole record is in a journal (disk id, index): what a restarted
/// process server holds. A torn record at the end is what a restart cuts off.
fn journaled_chunks(dir: &Path) -> BTreeSet<(String, u64)> {
    let mut out = BTreeSet::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    for path in files {
        let data = std::fs::read(&path).unwrap();
        let mut at = 0usize;
        while at + 4 <= data.len() {
            let len = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
            let end = at + 4 + len + 4;
            if end > data.len() {
                break;
            }
            let payload = Bytes::copy_from_slice(&data[at + 4..at + 4 + len]);
            let crc = u32::from_be_bytes(data[end - 4..end].try_into().unwrap());
            if crc32fast::hash(&data[at..at + 4 + len]) != crc {
                break;
            }
            if let Ok(Message::Chunk(c, _)) = Frame::decode_payload(payload).and_then(|f| Message::from_frame(&f)) {
                out.insert((c.disk, c.index));
            }
            at = end;
        }
    }
    out
}

/// Waits until the agent's session ended (it noticed the process server is gone).
async fn wait_disconnected(agent: &RunningAgent) -> siterecovery_agent::AgentStatus {
    agent.wait("the agent to notice the lost connection", 30, |s| !s.connected).await
}

// ---------------------------------------------------------------------------------------
// 1. Process server SIGKILLed in the middle of an initial copy.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_server_killed_mid_initial_copy_keeps_what_it_acknowledged() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let (port, metrics_port) = (free_port(), free_port());
    let mut ps = PsChild::start(dir, pki, targets, port, metrics_port, 1 << 30, "ps-1").await;

    const CHUNKS: u64 = 24;
    let a = dir.join("a.img");
    write_random(&a, 0, (CHUNKS * MIB) as usize, 11);
    let disks = [("sda", a.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "pskill", "pskill");
    let agent = start_agent(agent_config(pki, files, "prod", "pskill", ps.addr, &disks, 0.2));

    // Kill -9 once part of the copy is journaled.
    let journal = journal_dir(dir, "prod", "pskill");
    let deadline = Instant::now() + Duration::from_secs(60);
    while dir_bytes(&journal) < 6 * MIB {
        ps.guard.assert_alive("initial copy");
        assert!(
            Instant::now() < deadline,
            "the journal never reached 6 MiB: {:#?}\n{}",
            agent.status(),
            ps.guard.tail()
        );
        sleep(Duration::from_millis(5)).await;
    }
    ps.guard.kill9();
    let at_kill = wait_disconnected(&agent).await;
    let held = journaled_chunks(&journal);
    assert!(
        !held.is_empty() && (held.len() as u64) < CHUNKS,
        "the kill must land inside the copy: {} of {CHUNKS} chunks journaled",
        held.len()
    );
    assert!(!at_kill.initial_copy_done && at_kill.points == 0, "{at_kill:#?}");

    // Same cache, same port: the agent reconnects by itself and sends only what is missing.
    let ps = PsChild::start(dir, pki, targets, port, metrics_port, 1 << 30, "ps-2").await;
    let s = agent.wait("a recovery point after the restart", 60, |s| s.points >= 1).await;
    let resent = s.chunks_sent - at_kill.chunks_sent;
    assert!(
        resent <= CHUNKS - held.len() as u64,
        "the restarted process server kept {} journaled chunks, yet the agent resent {resent} of {CHUNKS}",
        held.len()
    );
    assert!(s.chunks_sent < 2 * CHUNKS, "{s:#?}");
    let store = store_of(targets);
    let server = ServerRef::new("prod", "pskill").unwrap();
    assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore")).await;
    agent.stop().await;
    drop(ps);
}

// ---------------------------------------------------------------------------------------
// 2. Process server SIGKILLed while a change is being sent.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_server_killed_mid_delta_then_next_point_has_the_change() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let (port, metrics_port) = (free_port(), free_port());
    let mut ps = PsChild::start(dir, pki, targets, port, metrics_port, 1 << 30, "ps-1").await;

    let a = dir.join("a.img");
    write_random(&a, 0, (16 * MIB) as usize, 21);
    let original = std::fs::read(&a).unwrap();
    let disks = [("sda", a.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "delta", "delta");
    let agent = start_agent(agent_config(pki, files, "prod", "delta", ps.addr, &disks, 0.2));
    let first = agent.wait("the first point", 60, |s| s.points >= 1).await;
    let first_point = first.last_point.clone().unwrap();

    // Rewrite 12 of 16 chunks, and kill as soon as the agent starts sending them.
    let before = agent.status().chunks_sent;
    write_random(&a, 2 * MIB + 17, (12 * MIB) as usize, 22);
    agent.wait("the change being sent", 30, |s| s.chunks_sent > before).await;
    ps.guard.kill9();
    wait_disconnected(&agent).await;

    let ps = PsChild::start(dir, pki, targets, port, metrics_port, 1 << 30, "ps-2").await;
    let restarted = agent.wait("a reconnection", 60, |s| s.connected).await;
    let s = agent.wait("a point after the restart", 60, |s| s.points > restarted.points).await;
    let store = store_of(targets);
    let server = ServerRef::new("prod", "delta").unwrap();
    assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore-new")).await;

    // The point from before the kill still restores the original content.
    let old = wait_point(&store, &server, &first_point, 30).await;
    let out = dir.join("restore-old");
    std::fs::create_dir_all(&out).unwrap();
    store.restore_point(&server, &old, &[("sda".into(), out.join("sda"))]).await.unwrap();
    assert!(std::fs::read(out.join("sda")).unwrap() == original, "the first point no longer restores the original");
    agent.stop().await;
    drop(ps);
}

/// Every restart of the process server costs a healthy agent at most a few seconds: its
/// reconnection delay starts over after a session that worked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_promptly_after_each_process_server_restart() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let (port, metrics_port) = (free_port(), free_port());
    let mut ps = PsChild::start(dir, pki, targets, port, metrics_port, 1 << 30, "ps-0").await;
    let a = dir.join("a.img");
    write_random(&a, 0, (2 * MIB) as usize, 71);
    let disks = [("sda", a.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "flap", "flap");
    let agent = start_agent(agent_config(pki, files, "prod", "flap", ps.addr, &disks, 0.2));
    agent.wait("a first point", 60, |s| s.points >= 1).await;
    for round in 1..=4 {
        // A healthy session: it made a point since it connected.
        let points = agent.status().points;
        agent.wait("a point in this session", 30, |s| s.points > points).await;
        ps.guard.kill9();
        wait_disconnected(&agent).await;
        ps = PsChild::start(dir, pki, targets, port, metrics_port, 1 << 30, &format!("ps-{round}")).await;
        let since = Instant::now();
        agent.wait(&format!("reconnection {round} within 5 s"), 5, |s| s.connected).await;
        eprintln!("restart {round}: reconnected after {:?}", since.elapsed());
    }
    agent.stop().await;
    drop(ps);
}

// ---------------------------------------------------------------------------------------
// 3. Uploads failing: backpressure bounds the cache; a restart with a working store drains it.
// ---------------------------------------------------------------------------------------

/// A targets file like `local` but whose backend is Azure at `endpoint`.
fn azure_targets(dir: &Path, local: &Path, endpoint: &str) -> PathBuf {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(local).unwrap()).unwrap();
    v["backend"] = serde_json::json!({"azure": {"endpoint": endpoint, "container": "x", "sas": "sv=2024-08-04&sig=x"}});
    let path = dir.join("targets-azure.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    path
}

/// An HTTP server that answers every request `404 Not Found`: listing finds an empty
/// (missing) container, and every upload fails.
async fn refusing_blob_service() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { continue };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 64 * 1024];
                loop {
                    // Read one request (headers, then a Content-Length body), answer it.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                    let body_len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + body_len {
                        match s.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    buf.drain(..head_end + body_len);
                    let answer =
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nx-ms-error-code: ContainerNotFound\r\n\r\n";
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

const LIMIT: u64 = 4 * MIB;
const BP_CHUNKS: u64 = 32;

/// An agent held back by a process server whose store at `endpoint` fails every upload.
struct Stalled {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pki: Pki,
    good: PathBuf,
    ps: PsChild,
    agent: RunningAgent,
    disks_path: PathBuf,
    journal: PathBuf,
}

/// The journal may exceed the limit by the frame that crossed it (and the layout record).
const BOUND: u64 = LIMIT + MIB + 64 * 1024;

/// Starts a process server with a cache limit of [`LIMIT`] whose store fails, an agent
/// with [`BP_CHUNKS`] MiB to copy, and waits until the journal is full and the agent
/// has sent nothing for 2 s, checking the bound all along.
async fn stall_on(endpoint: &str) -> Stalled {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let pki = Pki::new(&dir);
    let good = local_targets(&dir, &dir.join("store"), MIB as u32);
    let bad = azure_targets(&dir, &good, endpoint);
    let (port, metrics_port) = (free_port(), free_port());
    let mut ps = PsChild::start(&dir, &pki, &bad, port, metrics_port, LIMIT, "ps-broken").await;

    let a = dir.join("a.img");
    write_random(&a, 0, (BP_CHUNKS * MIB) as usize, 31);
    let files = pki.agent_files(&pki.ca, "prod", "bp", "bp");
    let agent = start_agent(agent_config(&pki, files, "prod", "bp", ps.addr, &[("sda", a.as_path())], 0.2));

    let journal = journal_dir(&dir, "prod", "bp");
    let deadline = Instant::now() + Duration::from_secs(30);
    while dir_bytes(&journal) < LIMIT {
        ps.guard.assert_alive("filling the cache");
        assert!(
            Instant::now() < deadline,
            "the journal never reached the limit ({} bytes): {:#?}\n{}",
            dir_bytes(&journal),
            agent.status(),
            ps.guard.tail()
        );
        sleep(Duration::from_millis(20)).await;
    }
    let mut last = agent.status().chunks_sent;
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stable_since.elapsed() < Duration::from_secs(2) {
        let used = dir_bytes(&journal);
        assert!(used <= BOUND, "the journal grew to {used} bytes with a cache limit of {LIMIT}");
        let now = agent.status().chunks_sent;
        if now != last {
            (last, stable_since) = (now, Instant::now());
        }
        assert!(Instant::now() < deadline, "the agent never stalled: {:#?}", agent.status());
        sleep(Duration::from_millis(50)).await;
    }
    let stalled = agent.status();
    assert!(stalled.chunks_sent < BP_CHUNKS && stalled.points == 0, "the agent was not held back: {stalled:#?}");
    ps.guard.assert_alive("stalled on a failing store");
    Stalled { _tmp: tmp, dir, pki, good, ps, agent, disks_path: a, journal }
}

impl Stalled {
    /// Restarts the process server with a working store on the same cache: the backlog
    /// drains, the copy completes and its point restores bit-exact.
    async fn recover(mut self) {
        self.ps.guard.kill9();
        let (port, metrics_port) = (self.ps.addr.port(), self.ps.metrics.port());
        let ps = PsChild::start(&self.dir, &self.pki, &self.good, port, metrics_port, LIMIT, "ps-good").await;
        let s = self.agent.wait("a point once uploads work", 60, |s| s.points >= 1).await;
        let store = store_of(&self.good);
        let server = ServerRef::new("prod", "bp").unwrap();
        let point = wait_point(&store, &server, s.last_point.as_deref().unwrap(), 30).await;
        let disks = [("sda", self.disks_path.as_path())];
        assert_restores_equal(&store, &server, &point, &disks, &self.dir.join("restore")).await;
        self.agent.stop().await;
        drop(ps);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_uploads_hold_the_agent_back_then_drain() {
    let blob = refusing_blob_service().await;
    let mut t = stall_on(&format!("http://{blob}/devstoreaccount1")).await;
    let errors = metric(t.ps.metrics, "siterecovery_process_server_upload_errors_total").await;
    assert!(errors.is_some_and(|e| e > 0.0), "upload errors: {errors:?}");
    let waits = metric(t.ps.metrics, "siterecovery_process_server_backpressure_waits_total").await;
    assert!(waits.is_some_and(|w| w > 0.0), "backpressure waits: {waits:?}; log:\n{}", t.ps.guard.tail());
    let backlog = metric(t.ps.metrics, "siterecovery_process_server_backlog_bytes").await;
    assert!(backlog.is_some_and(|b| b >= LIMIT as f64 && b <= BOUND as f64), "backlog: {backlog:?}");
    sleep(Duration::from_secs(1)).await;
    t.ps.guard.assert_alive("still stalled");
    assert!(dir_bytes(&t.journal) <= BOUND);
    t.recover().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_neither_refuses_a_new_server_nor_keeps_a_restart_down() {
    let down = format!("http://127.0.0.1:{}/devstoreaccount1", free_port());
    // A new server (nothing in the store can be read) still gets to fill the cache.
    let mut t = stall_on(&down).await;

    // Restarted during the outage with a cache but no checkpoint (a server whose first
    // upload never succeeded; whether a round that held only the layout record wrote a
    // checkpoint depends on timing, so it is removed), it serves at once and stays up.
    t.ps.guard.kill9();
    let _ = std::fs::remove_file(t.dir.join("cache/prod/bp/checkpoint"));
    let (port, metrics_port) = (t.ps.addr.port(), t.ps.metrics.port());
    let targets = t.dir.join("targets-azure.json");
    t.ps = PsChild::spawn(&t.dir, &t.pki, &targets, port, metrics_port, LIMIT, "ps-outage");
    t.ps.wait_listening(5).await;
    sleep(Duration::from_secs(2)).await;
    t.ps.guard.assert_alive("a restart during a store outage");
    t.recover().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_volume_that_cannot_hold_local_copies_replicates_without_them() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    // Where the copies' directory would be, a file: copies cannot be kept.
    std::fs::create_dir_all(dir.join("cache")).unwrap();
    std::fs::write(dir.join("cache/.copies"), b"not a directory").unwrap();
    let ps = start_ps(dir, pki, targets, 1 << 30).await;
    let a = dir.join("a.img");
    write_random(&a, 0, (2 * MIB) as usize, 7);
    let disks = [("sda", a.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "nocopy", "nocopy");
    let agent = start_agent(agent_config(pki, files, "prod", "nocopy", ps.addr, &disks, 0.2));
    let s = agent.wait("a point", 60, |s| s.points >= 1).await;
    let store = store_of(targets);
    let server = ServerRef::new("prod", "nocopy").unwrap();
    let point = wait_point(&store, &server, s.last_point.as_deref().unwrap(), 30).await;
    assert_restores_equal(&store, &server, &point, &disks, &dir.join("restore")).await;
    let held = metric(ps.metrics_addr.unwrap(), "siterecovery_process_server_local_copy_bytes").await;
    assert_eq!(held, Some(0.0), "no copies kept");
    assert!(!dir.join("cache/.copies").is_dir(), "the file in the way is left alone");
    agent.stop().await;
    drop(ps);
}

// ---------------------------------------------------------------------------------------
// 4. Garbage and truncated frames.
// ---------------------------------------------------------------------------------------

type Raw = TlsStream<tokio::net::TcpStream>;

async fn connect_raw(addr: SocketAddr, files: &(PathBuf, PathBuf, PathBuf)) -> Raw {
    let r = |p: &PathBuf| std::fs::read_to_string(p).unwrap();
    let config = siterecovery_wire::tls::agent_config(&r(&files.2), &r(&files.0), &r(&files.1)).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(config).connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap()
}

/// Reads until the process server ends the session; returns its refusal.
async fn refusal(s: &mut Raw, what: &str) -> (String, String) {
    let read = async {
        loop {
            match read_message(s).await {
                Ok(Some(Message::Ack(_))) => continue,
                Err(WireError::Refused { reason, message }) => return (reason, message),
                other => panic!("{what}: expected a refusal, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.unwrap_or_else(|_| panic!("{what}: no refusal"))
}

async fn hello(s: &mut Raw, server: &str, size: u64) {
    let h = Hello {
        protocol: PROTOCOL_VERSION,
        namespace: "prod".into(),
        server: server.into(),
        disks: vec![DiskInfo { id: "sda".into(), size }],
        agent: "fault-test".into(),
        features: vec![],
    };
    write_message(s, &Message::Hello(h)).await.unwrap();
    s.flush().await.unwrap();
    match read_message(s).await {
        Ok(Some(Message::Welcome(w, _))) => assert_eq!(w.chunk_size, MIB as u32),
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// Waits for the ack of `seq`.
async fn acked(s: &mut Raw, seq: u64) {
    let read = async {
        loop {
            match read_message(s).await {
                Ok(Some(Message::Ack(a))) if a.seq >= seq => return,
                Ok(Some(Message::Ack(_))) => continue,
                other => panic!("expected the ack of {seq}, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.unwrap_or_else(|_| panic!("no ack of {seq}"));
}

fn chunk(seq: u64, index: u64, hash_of: &[u8], body: Vec<u8>) -> Message {
    let c = ChunkData {
        seq,
        disk: "sda".into(),
        index,
        len: body.len() as u32,
        hash: Some(ChunkHash::of(hash_of).to_hex()),
        encoding: Encoding::Raw,
    };
    Message::Chunk(c, Bytes::from(body))
}

fn point(seq: u64) -> Message {
    let time = jiff::Timestamp::now();
    let id = siterecovery_store::generate_point_id(time, PointKind::Crash);
    Message::Point(PointMarker { seq, id, kind: PointKind::Crash, time, group: None, members: vec![] })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_frames_are_refused_and_leave_no_point() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let ps = start_ps(dir, pki, targets, 1 << 30).await;
    let store = store_of(targets);
    let server = ServerRef::new("prod", "raw").unwrap();
    let files = pki.agent_files(&pki.ca, "prod", "raw", "raw");
    let a = dir.join("a.img");
    write_random(&a, 0, (2 * MIB) as usize, 41);
    let src = std::fs::read(&a).unwrap();
    let (c0, c1) = (src[..MIB as usize].to_vec(), src[MIB as usize..].to_vec());

    // (a) Random bytes instead of a hello.
    let mut s = connect_raw(ps.addr, &files).await;
    let garbage: Vec<u8> = (0..128).flat_map(|_| rand::random::<[u8; 32]>()).collect();
    s.write_all(&garbage).await.unwrap();
    s.shutdown().await.unwrap();
    let (reason, _) = refusal(&mut s, "random bytes").await;
    assert_eq!(reason, "ProtocolError");

    // (b) A length prefix beyond MAX_FRAME after a valid hello.
    let mut s = connect_raw(ps.addr, &files).await;
    hello(&mut s, "raw", 2 * MIB).await;
    let huge = (siterecovery_wire::MAX_FRAME as u32 + 1).to_be_bytes();
    s.write_all(&huge).await.unwrap();
    s.write_all(&[3u8; 64]).await.unwrap();
    s.flush().await.unwrap();
    let (reason, message) = refusal(&mut s, "an oversized frame").await;
    assert_eq!(reason, "ProtocolError");
    assert!(message.contains("exceeds the limit"), "{message}");

    // (c) Every chunk, then half a point marker and a close: the chunks are kept, the
    // torn marker is not a point.
    let mut s = connect_raw(ps.addr, &files).await;
    hello(&mut s, "raw", 2 * MIB).await;
    // One frame at a time, each acknowledged before the next, so that this case does not
    // depend on how the session interleaves acks and reads (see the split-frame test).
    for (seq, index, body) in [(1, 0, &c0), (2, 1, &c1)] {
        write_message(&mut s, &chunk(seq, index, body, body.clone())).await.unwrap();
        s.flush().await.unwrap();
        acked(&mut s, seq).await;
    }
    let torn = point(3);
    let marker = torn.to_frame().encode();
    s.write_all(&marker[..marker.len() / 2]).await.unwrap();
    s.shutdown().await.unwrap();
    let (reason, message) = refusal(&mut s, "a truncated frame").await;
    assert_eq!(reason, "ProtocolError");
    assert!(message.contains("middle of a frame"), "{message}");

    // Half a chunk frame too.
    let mut s = connect_raw(ps.addr, &files).await;
    hello(&mut s, "raw", 2 * MIB).await;
    let half = chunk(1, 0, &c1, c1.clone()).to_frame();
    let bytes = half.encode();
    s.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
    s.shutdown().await.unwrap();
    let (reason, _) = refusal(&mut s, "half a chunk").await;
    assert_eq!(reason, "ProtocolError");

    // (d) A chunk whose body does not hash to its claim, followed by a point. The claim
    // is the hash of what chunk 0 will hold when the real agent runs: were the bad chunk
    // kept, that agent would skip chunk 0 and the point would restore garbage.
    let next0: Vec<u8> = src[MIB as usize..].iter().map(|b| b ^ 0x5a).collect();
    let mut s = connect_raw(ps.addr, &files).await;
    hello(&mut s, "raw", 2 * MIB).await;
    write_message(&mut s, &chunk(1, 0, &next0, c1.clone())).await.unwrap();
    let after_bad = point(2);
    write_message(&mut s, &after_bad).await.unwrap();
    s.flush().await.unwrap();
    let (reason, message) = refusal(&mut s, "a chunk that does not hash to its claim").await;
    assert_eq!(reason, "ChecksumMismatch", "{message}");

    // Nothing of these sessions is a recovery point.
    let state = ps.shared.servers().await.into_iter().find(|s| s.server == server).expect("server state");
    assert_eq!(state.received().latest_point, None, "a torn or refused marker was journaled");
    sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.list_point_ids(&server).await.unwrap(), Vec::<String>::new());

    // A well-behaved agent still replicates: it finds chunk 1 held and sends chunk 0.
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    f.write_all_at(&next0, 0).unwrap();
    f.sync_all().unwrap();
    let disks = [("sda", a.as_path())];
    let agent = start_agent(agent_config(pki, files, "prod", "raw", ps.addr, &disks, 0.2));
    let s = agent.wait("a point from a well-behaved agent", 60, |s| s.points >= 1).await;
    assert_eq!(s.chunks_sent, 1, "only the changed chunk goes: {s:#?}");
    assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore")).await;
    agent.stop().await;
    let ids = store.list_point_ids(&server).await.unwrap();
    for m in [torn, after_bad] {
        let Message::Point(p) = m else { unreachable!() };
        assert!(!ids.contains(&p.id), "the raw sessions' marker {} became a point", p.id);
    }
    drop(ps);
}

/// A frame that arrives in two parts, with an ack due in between, is still read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_split_around_an_ack_is_read_whole() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let ps = start_ps(dir, pki, targets, 1 << 30).await;
    let files = pki.agent_files(&pki.ca, "prod", "split", "split");
    let a = dir.join("a.img");
    write_random(&a, 0, (2 * MIB) as usize, 45);
    let src = std::fs::read(&a).unwrap();
    let (c0, c1) = (src[..MIB as usize].to_vec(), src[MIB as usize..].to_vec());

    let mut s = connect_raw(ps.addr, &files).await;
    hello(&mut s, "split", 2 * MIB).await;
    let first = chunk(1, 0, &c0, c0.clone()).to_frame().encode();
    let second = chunk(2, 1, &c1, c1.clone()).to_frame().encode();
    let half = second.len() / 2;
    s.write_all(&first).await.unwrap();
    s.write_all(&second[..half]).await.unwrap();
    s.flush().await.unwrap();
    // The ack of chunk 1 is sent while the process server is reading chunk 2.
    match tokio::time::timeout(Duration::from_secs(10), read_message(&mut s)).await {
        Ok(Ok(Some(Message::Ack(a)))) => assert_eq!(a.seq, 1),
        other => panic!("expected the ack of chunk 1, got {other:?}"),
    }
    // (Write errors are ignored: with the bug, the process server has hung up by now and
    // its refusal below says why.)
    let marker = point(3);
    let _ = s.write_all(&second[half..]).await;
    let _ = write_message(&mut s, &marker).await;
    let _ = s.flush().await;
    let read = async {
        loop {
            match read_message(&mut s).await {
                Ok(Some(Message::Ack(a))) if a.seq >= 3 => return,
                Ok(Some(Message::Ack(_))) => continue,
                Err(WireError::Refused { reason, message }) => {
                    panic!("the process server lost its place in the stream: {reason}: {message}")
                }
                other => panic!("expected acks, got {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("the point was never acknowledged");
    let Message::Point(p) = marker else { unreachable!() };
    let server = ServerRef::new("prod", "split").unwrap();
    let state = ps.shared.servers().await.into_iter().find(|s| s.server == server).expect("server state");
    assert_eq!(state.received().latest_point.as_deref(), Some(p.id.as_str()));
    let store = store_of(targets);
    let point = wait_point(&store, &server, &p.id, 30).await;
    assert_restores_equal(&store, &server, &point, &[("sda", a.as_path())], &dir.join("restore")).await;
    drop(ps);
}

// ---------------------------------------------------------------------------------------
// 5. A flipped byte in a stored chunk.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_fails_the_restore_by_name_and_is_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(dir);
    let store_dir = dir.join("store");
    let targets = local_targets(dir, &store_dir, MIB as u32);
    let ps = start_ps(dir, &pki, &targets, 1 << 30).await;
    let a = dir.join("a.img");
    write_random(&a, 0, (4 * MIB) as usize, 51);
    let disks = [("sda", a.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "rot", "rot");
    let agent = start_agent(agent_config(&pki, files, "prod", "rot", ps.addr, &disks, 0.2));
    let s = agent.wait("a point", 60, |s| s.points >= 1).await;
    agent.stop().await;
    let store = store_of(&targets);
    let server = ServerRef::new("prod", "rot").unwrap();
    let point = wait_point(&store, &server, s.last_point.as_deref().unwrap(), 30).await;

    let ChunkRef::Data(hash) = point.disks[0].chunks[2] else { panic!("chunk 2 is data") };
    let key = server.chunk_key("sda", &hash);
    let path = store_dir.join(&key);
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    let mut b = [0u8; 1];
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    f.write_all(&[b[0] ^ 0x01]).unwrap();
    f.sync_all().unwrap();

    let out = dir.join("restore");
    std::fs::create_dir_all(&out).unwrap();
    let target = out.join("sda");
    let e = store.restore_point(&server, &point, &[("sda".into(), target.clone())]).await.unwrap_err();
    assert!(e.to_string().contains(&format!("object {key} is corrupt")), "{e}");
    let restored = std::fs::read(&target).unwrap();
    let region = &restored[2 * MIB as usize..3 * MIB as usize];
    assert!(region.iter().all(|&b| b == 0), "bytes of the damaged chunk reached the restore target");
    drop(ps);
}

// ---------------------------------------------------------------------------------------
// 6. Agent SIGKILLed in the middle of an initial copy.
// ---------------------------------------------------------------------------------------

fn agent_binary() -> PathBuf {
    // Beside this package's own binary: the same target directory, whatever it is.
    let path = Path::new(env!("CARGO_BIN_EXE_siterecovery-process-server")).with_file_name("siterecovery-agent");
    assert!(path.exists(), "{} is missing: run `cargo build -p siterecovery-agent` before this test", path.display());
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_initial_copy_resumes_without_resending_everything() {
    let bin = agent_binary();
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let ps = start_ps(dir, pki, targets, 1 << 30).await;
    const SIZE: u64 = 24 * MIB;
    let a = dir.join("a.img");
    write_random(&a, 0, SIZE as usize, 61);
    let disks = [("sda", a.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "akill", "akill");
    let config = agent_config(pki, files, "prod", "akill", ps.addr, &disks, 0.2);
    let config_path = dir.join("agent.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let run = |tag: &str| {
        let mut cmd = Command::new(&bin);
        cmd.arg("--config").arg(&config_path).env("RUST_LOG", "info");
        ChildGuard::spawn(cmd, dir.join(format!("{tag}.log")))
    };
    let received = || async {
        let servers = ps.shared.servers().await;
        servers.first().map_or(0, |s| s.progress.bytes_received.load(Ordering::Relaxed))
    };

    let mut first = run("agent-1");
    let deadline = Instant::now() + Duration::from_secs(60);
    while received().await < 6 * MIB {
        first.assert_alive("initial copy");
        assert!(Instant::now() < deadline, "the process server never received 6 MiB; agent log:\n{}", first.tail());
        sleep(Duration::from_millis(5)).await;
    }
    first.kill9();
    // The dead agent's session ends at a torn frame; what it journaled stays.
    sleep(Duration::from_millis(500)).await;
    let kept = received().await;
    assert!(kept < SIZE, "the kill must land inside the copy ({kept} bytes received)");

    let mut second = run("agent-2");
    let store = store_of(targets);
    let server = ServerRef::new("prod", "akill").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        if let Some(id) = store.list_point_ids(&server).await.unwrap().pop() {
            break id;
        }
        second.assert_alive("resumed copy");
        assert!(Instant::now() < deadline, "no recovery point after the restart; agent log:\n{}", second.tail());
        sleep(Duration::from_millis(50)).await;
    };
    let point = wait_point(&store, &server, &id, 30).await;
    assert_restores_equal(&store, &server, &point, &disks, &dir.join("restore")).await;
    let total = received().await;
    assert!(total < 2 * SIZE, "{total} bytes received for a {SIZE}-byte disk");
    assert!(
        total - kept <= SIZE - kept / MIB * MIB,
        "the restarted agent resent {} bytes though the process server held {kept}",
        total - kept
    );
    drop(second);
    drop(ps);
}
