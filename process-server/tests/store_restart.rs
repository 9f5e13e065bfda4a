//! The blob store itself restarted under load (issue #4): a real Azurite, SIGKILLed while
//! the process server uploads an initial copy of a few hundred MiB and started again a few
//! seconds later on the same port over the same data directory. What a user cares about:
//! no point the agent was told is safe is lost, the uploads resume and drain, and the last
//! point restores equal to the source byte for byte.

mod support;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use siterecovery_store::{AzureBlobBackend, ChunkHash, ChunkRef, ServerRef, Store};
use support::*;
use tokio::time::{Instant, sleep};

const MIB: u64 = 1024 * 1024;
const SIZE: u64 = 256 * MIB;

/// Rewrites 16 random 64 KiB blocks of `path` (fsynced).
fn scribble(path: &Path, round: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut x = round.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..16 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % (SIZE / (64 * 1024));
        let body: Vec<u8> = (0..64 * 1024).map(|i| (i as u64 ^ x ^ round) as u8).collect();
        f.write_all_at(&body, block * 64 * 1024).unwrap();
    }
    f.sync_all().unwrap();
}

/// Changes the disk and waits for a point after each change, until `stop`; returns every
/// point id the agent reported as acknowledged on the way (polled every 10 ms).
async fn churn(agent: Arc<RunningAgent>, disk: std::path::PathBuf, stop: Arc<AtomicBool>) -> BTreeSet<String> {
    let mut acked = BTreeSet::new();
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let before = agent.status().points;
        let d = disk.clone();
        tokio::task::spawn_blocking(move || scribble(&d, round)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = agent.status();
            acked.extend(s.last_point.clone());
            if s.points > before || stop.load(Ordering::Relaxed) {
                break;
            }
            assert!(Instant::now() < deadline, "no point within 60 s of change {round}: {s:#?}");
            sleep(Duration::from_millis(10)).await;
        }
    }
    acked
}

/// The chunks each point names that the store does not hold.
async fn missing_chunks(store: &Store, server: &ServerRef, ids: &BTreeSet<String>) -> Vec<String> {
    let mut stored: HashMap<String, HashSet<ChunkHash>> = HashMap::new();
    let mut missing = Vec::new();
    for id in ids {
        let m = store.load_point(server, id).await.unwrap_or_else(|e| panic!("acknowledged point {id}: {e}"));
        for d in &m.disks {
            if !stored.contains_key(&d.id) {
                stored.insert(d.id.clone(), store.stored_chunks(server, &d.id).await.unwrap());
            }
            let have = &stored[&d.id];
            for (i, c) in d.chunks.iter().enumerate() {
                if let ChunkRef::Data(h) = c
                    && !have.contains(h)
                {
                    missing.push(format!("point {id} disk {} chunk {i} ({})", d.id, h.to_hex()));
                }
            }
        }
    }
    missing
}

/// Bytes of the files under `dir`, recursively.
fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => tree_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Azurite keeps its blob index in memory and saves it every 5 s (LokiJS
/// `autosaveInterval: 5000` in its `LokiBlobMetadataStore`), so a SIGKILL loses the blobs
/// it acknowledged since its last save. Blob storage never loses an acknowledged write,
/// and the process server rightly frees its cache once an upload round is acknowledged,
/// so the test keeps that emulator artefact out: it stops the process server (SIGSTOP)
/// with uploads in flight, lets Azurite save for 6 s, kills Azurite under the open
/// requests, and lets the process server go on (SIGCONT) against a store that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azurite_killed_mid_upload_and_restarted_loses_nothing_acknowledged() {
    let bed = Bed::new();
    let dir = bed.dir();
    let azurite = Azurite::start(&dir.join("azurite"), free_port()).await;
    let sas = Azurite::sas();
    let container = "dr-restart";
    AzureBlobBackend::with_sas(&azurite.endpoint(), container, &sas).unwrap().ensure_container().await.unwrap();
    let targets = azure_targets(&bed.targets, &azurite.endpoint(), container, &sas);
    let mut ps = PsChild::start(dir, &bed.pki, &targets, free_port(), free_port(), 1 << 30, "ps").await;

    let a = dir.join("a.img");
    write_pattern(&a, 0, SIZE as usize, 7);
    let disks = [("sda", a.as_path())];
    let files = bed.pki.agent_files(&bed.pki.ca, "prod", "blobkill", "blobkill");
    let agent = Arc::new(start_agent(agent_config(&bed.pki, files, "prod", "blobkill", ps.addr, &disks, 0.5)));
    let server = ServerRef::new("prod", "blobkill").unwrap();

    // Once Azurite holds 16 MiB of chunks, with more acknowledged to the agent waiting.
    let blobs = azurite.dir.join("data");
    let deadline = Instant::now() + Duration::from_secs(180);
    let backlog = loop {
        let backlog = metric(ps.metrics, "siterecovery_process_server_backlog_bytes").await.unwrap_or(0.0);
        if tree_bytes(&blobs) >= 16 * MIB && backlog >= 16.0 * MIB as f64 {
            break backlog;
        }
        ps.guard.assert_alive("uploading");
        assert!(Instant::now() < deadline, "no upload under way; Azurite log:\n{}", azurite.tail());
        sleep(Duration::from_millis(5)).await;
    };
    ps.guard.signal("STOP");
    sleep(Duration::from_secs(6)).await;
    azurite.kill9();
    ps.guard.signal("CONT");
    eprintln!("Azurite killed with {} MiB acknowledged to the agent and not uploaded", backlog as u64 / MIB);

    // Points keep coming (each acknowledged once journaled) during the outage and after.
    let first = agent.wait("the initial copy's point", 180, |s| s.points >= 1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(churn(agent.clone(), a.clone(), stop.clone()));
    // Down for a few seconds, and at least until the agent was told a point taken after
    // the changes began is safe (it is then only in the process server's cache).
    sleep(Duration::from_secs(3)).await;
    let during = agent.wait("a point acknowledged while the store is down", 60, |s| s.points > first.points).await;
    assert!(azurite.pid().is_none(), "Azurite came back by itself");
    azurite.restart().await;
    let restarted = Instant::now();

    // Changes go on for a while after the restart, then stop; the next point after that
    // is the disk as it stays.
    sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = writer.await.unwrap();
    let last = agent.status().points;
    let s = agent.wait("two points after the writes stopped", 60, |s| s.points >= last + 2).await;
    acked.extend(first.last_point.clone());
    acked.extend(s.last_point.clone());
    acked.extend(during.last_point.clone());

    // The uploads resume and drain: the last point reaches the store.
    let store = store_of(&targets);
    wait_point(&store, &server, s.last_point.as_deref().unwrap(), 300).await;
    eprintln!("drained {:?} after the restart; {} points acknowledged", restarted.elapsed(), acked.len());

    // Every point the agent was told is safe is in the store, with every chunk it names.
    let ids: BTreeSet<String> = store.list_point_ids(&server).await.unwrap().into_iter().collect();
    let lost: Vec<&String> = acked.difference(&ids).collect();
    assert!(lost.is_empty(), "acknowledged points missing from the store after the restart: {lost:?}");
    let missing = missing_chunks(&store, &server, &acked).await;
    assert!(
        missing.is_empty(),
        "{} chunks named by acknowledged points are not in the store, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore")).await;
    Arc::try_unwrap(agent).ok().expect("the writer is done").stop().await;
    ps.guard.assert_alive("after the drain");
}

/// Regression: with the store down, a delta whose base is no longer in the process
/// server's memory made the session wait for the store client's retries (a minute per
/// delta) before refusing it, so the agent got no ack and no point for that long. The
/// read is now bounded: the delta is refused within seconds, the agent sends the chunk
/// whole, and its point is acknowledged while the store is still down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_whose_base_is_only_in_a_down_store_falls_back_to_the_whole_chunk() {
    let bed = Bed::new();
    let dir = bed.dir();
    let azurite = Azurite::start(&dir.join("azurite"), free_port()).await;
    let sas = Azurite::sas();
    AzureBlobBackend::with_sas(&azurite.endpoint(), "dr-base", &sas).unwrap().ensure_container().await.unwrap();
    let targets = azure_targets(&bed.targets, &azurite.endpoint(), "dr-base", &sas);
    // No chunk and no block values kept in memory and no local copies: every delta's base
    // is read from the store (as on a process server that takes over a server from another).
    let config = siterecovery_process_server::Config {
        recent_chunk_bytes: 0,
        block_cv_bytes: 0,
        local_copy_bytes: 0,
        ..ps_config(dir, &bed.pki, 1 << 30)
    };
    let loaded = siterecovery_process_server::target::StaticTargets::load(&targets).unwrap();
    let ps = siterecovery_process_server::start(config, Arc::new(loaded)).await.unwrap();

    let a = dir.join("a.img");
    write_pattern(&a, 0, (8 * MIB) as usize, 17);
    let disks = [("sda", a.as_path())];
    let files = bed.pki.agent_files(&bed.pki.ca, "prod", "base", "base");
    let agent = start_agent(agent_config(&bed.pki, files, "prod", "base", ps.addr, &disks, 0.2));
    let server = ServerRef::new("prod", "base").unwrap();
    let store = store_of(&targets);
    let first = agent.wait("the first point", 60, |s| s.points >= 1).await;
    wait_point(&store, &server, first.last_point.as_deref().unwrap(), 60).await;
    // Azurite saves what it was sent every 5 s: let it save the first point before the kill.
    sleep(Duration::from_secs(6)).await;
    azurite.kill9();

    // 64 KiB of chunk 2 change: the agent sends a delta against the stored chunk.
    let before = agent.status();
    write_pattern(&a, 2 * MIB + 64 * 1024, 64 * 1024, 18);
    // The change went as a delta first, then as the whole chunk (counted in chunks_sent
    // both times); then a point. (A point whose quiet look came before the write may end
    // meanwhile: points alone say nothing about this change.)
    let sent = agent
        .wait("the change as a delta, then as the whole chunk", 45, |s| {
            s.deltas_sent > before.deltas_sent && s.chunks_sent > before.chunks_sent + 1
        })
        .await;
    let s = agent.wait("a point while the store is down", 45, |s| s.points > sent.points).await;

    azurite.restart().await;
    wait_point(&store, &server, s.last_point.as_deref().unwrap(), 180).await;
    assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore")).await;
    agent.stop().await;
    drop(ps);
}
