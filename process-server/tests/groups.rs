//! Consistency groups: one recovery point across two servers at one instant.
//!
//! A writer counts i = 1, 2, … and writes i into a 4 KiB block of server `db`'s disk,
//! then into a block of server `web`'s disk, each write synchronous. At any instant of
//! that history, with `d` the value on db and `w` the value on web, w ∈ {d − 1, d}. Two
//! crash-consistent points taken at different instants break it as soon as the writer
//! moved on in between; a group point must keep it. The writer writes in bursts, so that
//! both servers are quiet at the same time now and then. Web has more to send over a
//! slow link, so in most rounds db is ready a burst earlier and must notice the writes
//! made while it held its instant: without that check in the agent this test fails.

mod support;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use siterecovery_store::{PointKind, ServerRef};
use support::*;

const MIB: u64 = 1024 * 1024;
const BLOCK: usize = 4096;
/// Group points to check (each is restored and checked for one instant).
const GROUP_POINTS: usize = 2;
/// Where the counter block lives: inside the third chunk, so zero chunks stay around it.
const OFFSET: u64 = 2 * MIB + 8192;

fn write_value(f: &std::fs::File, v: u64) {
    let block: Vec<u8> = std::iter::repeat_n(v.to_le_bytes(), BLOCK / 8).flatten().collect();
    f.write_all_at(&block, OFFSET).unwrap();
}

/// The counter in a restored disk; panics on a torn block.
fn read_value(path: &Path) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut block = vec![0u8; BLOCK];
    f.read_exact_at(&mut block, OFFSET).unwrap();
    let first = u64::from_le_bytes(block[..8].try_into().unwrap());
    assert!(block.chunks(8).all(|c| u64::from_le_bytes(c.try_into().unwrap()) == first), "torn block");
    first
}

fn add_group(targets: &Path, members: &[&str], interval_seconds: f64) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(targets).unwrap()).unwrap();
    // Slow links: web, with more to send, becomes ready later than db in most rounds.
    v["bandwidthBytesPerSecond"] = serde_json::json!(2 * MIB);
    v["consistencyGroups"] = serde_json::json!([
        {"namespace": "prod", "name": "erp", "members": members, "intervalSeconds": interval_seconds}
    ]);
    std::fs::write(targets, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_point_is_one_instant_across_servers_and_waits_for_every_member() {
    let bed = Bed::new();
    let dir = bed.dir();
    add_group(&bed.targets, &["db", "web"], 1.0);
    let ps = start_ps(dir, &bed.pki, &bed.targets, 1 << 30).await;
    let store = store_of(&bed.targets);

    let (db_img, web_img) = (dir.join("db.img"), dir.join("web.img"));
    image(&db_img, 8 * MIB);
    image(&web_img, 64 * MIB);
    let open = |p: &Path| std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DSYNC).open(p).unwrap();
    let (db_file, web_file) = (open(&db_img), open(&web_img));
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written) = (stop.clone(), written.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            let noise = vec![0x5au8; 256 * 1024];
            while !stop.load(Ordering::SeqCst) {
                for _ in 0..20 {
                    i += 1;
                    write_value(&db_file, i);
                    write_value(&web_file, i);
                }
                // More to send on web: it becomes ready later than db in most rounds, so
                // db must hold its instant (and notice when it could not).
                for k in 0..4u64 {
                    web_file.write_all_at(&noise, 8 * MIB + ((i * 7 + k * 13) % 48) * MIB).unwrap();
                }
                written.store(i, Ordering::SeqCst);
                // Mostly short pauses (each server alone finds a quiet instant), now and
                // then a long one (both can hold theirs through a round).
                std::thread::sleep(Duration::from_millis(if i.is_multiple_of(100) { 4000 } else { 150 }));
            }
        })
    };

    let agent = |server: &str, img: &Path| {
        let files = bed.pki.agent_files(&bed.pki.ca, "prod", server, server);
        let config = agent_config(&bed.pki, files, "prod", server, ps.addr, &[("sda", img)], 0.5);
        start_agent(config)
    };
    // Only db is connected: rounds cannot start, db still takes its own points.
    let db = agent("db", &db_img);
    db.wait("db's own crash points", 60, |s| s.points >= 3).await;
    assert_eq!(db.status().group_points, 0, "no group point while web is not connected");

    let web = agent("web", &web_img);
    let (db_ref, web_ref) = (ServerRef::new("prod", "db").unwrap(), ServerRef::new("prod", "web").unwrap());
    // At least 20 s of rounds, most of them while the writer is busy (so that a member
    // that did not notice writes during its hold would show), then enough group points.
    let (enough, deadline) =
        (tokio::time::Instant::now() + Duration::from_secs(20), tokio::time::Instant::now() + Duration::from_secs(240));
    let (db_points, web_points) = loop {
        let d = store.list_points(&db_ref).await.unwrap();
        let w = store.list_points(&web_ref).await.unwrap();
        let shared = d.iter().filter(|p| p.kind == PointKind::Group && w.iter().any(|q| q.id == p.id)).count();
        let now = tokio::time::Instant::now();
        if (shared >= GROUP_POINTS && now > enough) || now > deadline {
            break (d, w);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    db.stop().await;
    web.stop().await;
    let groups: Vec<_> = db_points
        .iter()
        .filter(|p| p.kind == PointKind::Group)
        .filter_map(|p| web_points.iter().find(|q| q.id == p.id).map(|q| (p, q)))
        .collect();
    let list = |ps: &[siterecovery_store::Manifest]| ps.iter().map(|p| p.id.clone()).collect::<Vec<_>>().join(" ");
    assert!(
        groups.len() >= GROUP_POINTS,
        "expected {GROUP_POINTS} group points shared by db and web, found {}\ndb: {}\nweb: {}",
        groups.len(),
        list(&db_points),
        list(&web_points)
    );
    let mut moved = 0;
    for (i, (d, w)) in groups.iter().enumerate() {
        assert_eq!((d.group.as_deref(), w.group.as_deref()), (Some("erp"), Some("erp")));
        assert_eq!(d.members, vec!["db".to_string(), "web".to_string()]);
        assert_eq!(d.time, w.time, "one instant for every member");
        let out = dir.join(format!("restore-{i}"));
        std::fs::create_dir_all(&out).unwrap();
        store.restore_point(&db_ref, d, &[("sda".into(), out.join("db"))]).await.unwrap();
        store.restore_point(&web_ref, w, &[("sda".into(), out.join("web"))]).await.unwrap();
        let (dv, wv) = (read_value(&out.join("db")), read_value(&out.join("web")));
        assert!(wv == dv || wv + 1 == dv, "group point {}: db holds {dv}, web {wv}: not one instant", d.id);
        moved += usize::from(dv > 0);
    }
    assert!(
        moved > 0,
        "the writer never got going before the group points ({} written)",
        written.load(Ordering::SeqCst)
    );

    // LatestGroupConsistent picks the newest point both members have.
    let mut candidates = db_points.clone();
    siterecovery_process_server::group::drop_partial_group_points(&store, &db_ref, &mut candidates).await.unwrap();
    let newest = candidates.iter().rev().find(|p| p.kind == PointKind::Group).expect("a whole group point");
    assert!(web_points.iter().any(|q| q.id == newest.id));
    drop(ps);
}
