//! Deltas stored as patches (storage format 2): an incremental of small scattered writes
//! uploads patch objects, not whole chunks, and restores bit-exact; a chain that reaches
//! its bound is stored whole again; and a process server SIGKILLed after acknowledging
//! deltas it had not uploaded uploads them after its restart.

mod support;

use std::path::Path;
use std::time::Duration;

use siterecovery_store::{ChunkRef, MAX_CHAIN_PATCHES, ServerRef, Store};
use siterecovery_wire::{Frame, Message};
use support::*;
use tokio::time::{Instant, sleep};

const MIB: u64 = 1024 * 1024;

/// Objects and their encoded bytes under `prefix`.
async fn objects(store: &Store, prefix: &str) -> (u64, u64) {
    let keys = store.backend().list(prefix).await.unwrap();
    let mut bytes = 0;
    for k in &keys {
        bytes += store.backend().get(k).await.unwrap().len() as u64;
    }
    (keys.len() as u64, bytes)
}

/// One 4 KiB write in each of `chunks` chunks (1 MiB apart), at a different offset each.
fn scatter(path: &Path, chunks: u64, seed: u64) {
    for i in 0..chunks {
        write_pattern(path, i * MIB + (i * 37 % 200) * 4096 + seed * 8192, 4096, seed * 100 + i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scattered_small_writes_go_up_as_patches_and_restore_bit_exact() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let ps = start_ps(dir, pki, targets, 1 << 30).await;
    let store = store_of(targets);
    let server = ServerRef::new("prod", "patchy").unwrap();
    let (chunks_prefix, patches_prefix) = (server.chunks_prefix("sda"), server.patches_prefix("sda"));

    const CHUNKS: u64 = 16;
    let a = dir.join("a.img");
    write_pattern(&a, 0, (CHUNKS * MIB) as usize, 1);
    let disks = [("sda", a.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "patchy", "patchy");
    let agent = start_agent(agent_config(pki, files, "prod", "patchy", ps.addr, &disks, 0.2));
    let s = agent.wait("the first recovery point", 60, |s| s.points >= 1).await;
    assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore-0")).await;
    let (whole_before, whole_bytes_before) = objects(&store, &chunks_prefix).await;
    assert_eq!(whole_before, CHUNKS);

    // Rounds of one 4 KiB write in every chunk: each round is 16 deltas of one 64 KiB
    // block. The first MAX_CHAIN_PATCHES rounds go up as patches, the next one whole.
    let mut deltas = s.deltas_sent;
    for round in 1..=MAX_CHAIN_PATCHES as u64 + 1 {
        scatter(&a, CHUNKS, round);
        let sent = agent.wait("the round's deltas", 60, |s| s.deltas_sent >= deltas + CHUNKS).await;
        assert_eq!(sent.deltas_sent - deltas, CHUNKS, "one delta per chunk: {sent:#?}");
        deltas = sent.deltas_sent;
        let s = agent.wait("a point after the round", 60, |s| s.points > sent.points).await;
        let point =
            assert_last_point_restores(&store, &server, &s, &disks, &dir.join(format!("restore-{round}"))).await;
        let (whole, whole_bytes) = objects(&store, &chunks_prefix).await;
        let (patches, patch_bytes) = objects(&store, &patches_prefix).await;
        if round <= MAX_CHAIN_PATCHES as u64 {
            assert_eq!(whole, whole_before, "round {round}: no whole chunk uploaded");
            assert_eq!(patches, round * CHUNKS, "round {round}: one patch per changed chunk");
            // A patch carries its 64 KiB block (part of it incompressible), never the chunk.
            assert!(patch_bytes <= round * CHUNKS * 70_000, "round {round}: {patch_bytes} bytes of patches");
            for (i, c) in point.disks[0].chunks.iter().enumerate() {
                let ChunkRef::Chain(chain) = c else { panic!("round {round}: chunk {i} is {c:?}, not a chain") };
                assert_eq!(chain.patches.len() as u64, round, "round {round}: chunk {i}");
            }
            println!(
                "round {round}: {patches} patches, {patch_bytes} bytes in all; whole chunks {whole_bytes_before} bytes"
            );
        } else {
            // The chains were full: every chunk went whole and its chain starts again.
            assert_eq!(whole, whole_before + CHUNKS, "round {round}: every chunk whole again");
            assert!(whole_bytes > whole_bytes_before);
            assert!(point.disks[0].chunks.iter().all(|c| matches!(c, ChunkRef::Data(_))), "{point:?}");
        }
    }
    agent.stop().await;
    drop(ps);
}

/// The deltas whose whole record is in a journal directory.
fn journaled_deltas(dir: &Path) -> u64 {
    let mut n = 0;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
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
            let payload = bytes::Bytes::copy_from_slice(&data[at + 4..at + 4 + len]);
            if let Ok(Message::Delta(..)) = Frame::decode_payload(payload).and_then(|f| Message::from_frame(&f)) {
                n += 1;
            }
            at = end;
        }
    }
    n
}

/// A targets file like `good` whose store is an address nobody answers: every upload
/// fails, so whatever the process server acknowledges stays in its journal.
fn unreachable_targets(dir: &Path, good: &Path) -> std::path::PathBuf {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(good).unwrap()).unwrap();
    let endpoint = format!("http://127.0.0.1:{}/devstoreaccount1", free_port());
    v["backend"] = serde_json::json!({"azure": {"endpoint": endpoint, "container": "x", "sas": "sv=2024-08-04&sig=x"}});
    let path = dir.join("targets-down.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_acknowledged_but_not_uploaded_survive_a_sigkill() {
    let bed = Bed::new();
    let (dir, pki, good) = (bed.dir(), &bed.pki, &bed.targets);
    let down = unreachable_targets(dir, good);
    let (port, metrics_port) = (free_port(), free_port());
    // Nothing reaches the store: the initial copy and the deltas after it are journaled
    // and acknowledged only (the bases of the deltas are in the recent chunks).
    let mut ps = PsChild::start(dir, pki, &down, port, metrics_port, 1 << 30, "ps-down").await;

    const CHUNKS: u64 = 8;
    let a = dir.join("a.img");
    write_pattern(&a, 0, (CHUNKS * MIB) as usize, 7);
    let disks = [("sda", a.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "pkill", "pkill");
    let agent = start_agent(agent_config(pki, files, "prod", "pkill", ps.addr, &disks, 0.2));
    let s = agent.wait("the initial copy", 60, |s| s.initial_copy_done && s.points >= 1).await;
    for round in 1..=3 {
        scatter(&a, CHUNKS, round);
        let before = s.deltas_sent + (round - 1) * CHUNKS;
        agent.wait("the deltas", 60, |s| s.deltas_sent >= before + CHUNKS).await;
    }
    // The agent counts a point once it is acknowledged, i.e. journaled and synced.
    let sent = agent.status();
    agent.wait("a point after the deltas", 60, |s| s.points > sent.points).await;
    let journal = dir.join("cache/prod/pkill/journal");
    let deadline = Instant::now() + Duration::from_secs(30);
    while journaled_deltas(&journal) < 3 * CHUNKS {
        assert!(Instant::now() < deadline, "{} deltas journaled", journaled_deltas(&journal));
        sleep(Duration::from_millis(50)).await;
    }
    ps.guard.assert_alive("holding the backlog");
    let store = store_of(good);
    let server = ServerRef::new("prod", "pkill").unwrap();
    assert!(store.list_point_ids(&server).await.unwrap().is_empty(), "nothing was uploaded before the kill");
    ps.guard.kill9();
    agent.wait("the agent to notice the lost connection", 30, |s| !s.connected).await;

    // Same cache and port, a working store: the journal drains, deltas as patches.
    let ps = PsChild::start(dir, pki, good, port, metrics_port, 1 << 30, "ps-good").await;
    let restarted = agent.wait("a reconnection", 60, |s| s.connected).await;
    let s = agent.wait("a point after the restart", 60, |s| s.points > restarted.points).await;
    let point = assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore")).await;
    let (patches, _) = objects(&store, &server.patches_prefix("sda")).await;
    assert!(patches >= 3 * CHUNKS, "the journaled deltas went up as {patches} patches");
    assert!(point.disks[0].chunks.iter().all(|c| matches!(c, ChunkRef::Chain(_))), "{point:?}");
    agent.stop().await;
    drop(ps);
}
