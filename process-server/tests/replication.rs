//! Agent → process server → store → restore, with both binaries' libraries in this
//! process and the process server's real TLS, journal and uploader.

mod support;

use std::time::Duration;

use siterecovery_store::ServerRef;
use support::*;

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_copy_then_changes_restore_bit_exact() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let ps = start_ps(dir, pki, targets, 1 << 30).await;
    let store = store_of(targets);

    // An odd-sized disk full of data, and a sparse one with a little data.
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    write_pattern(&a, 0, (10 * MIB + 12_345) as usize, 1);
    image(&b, 32 * MIB);
    write_pattern(&b, 20 * MIB + 100, 70_000, 2);
    let disks = [("sda", a.as_path()), ("sdb", b.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "db-01", "db-01");
    let agent = start_agent(agent_config(pki, files, "prod", "db-01", ps.addr, &disks, 0.2));

    let s = agent.wait("the first recovery point", 60, |s| s.points >= 1).await;
    assert!(s.initial_copy_done);
    assert_eq!(s.last_resync_reason.as_deref(), Some("InitialCopy"));
    // 11 data chunks of sda, 1 of sdb (the sparse chunks are zero and carry no body).
    let server = ServerRef::new("prod", "db-01").unwrap();
    let point = wait_point(&store, &server, s.last_point.as_deref().unwrap(), 30).await;
    assert_eq!(point.disks.len(), 2);
    assert_eq!(point.disks[0].size, 10 * MIB + 12_345);
    assert_restores_equal(&store, &server, &point, &disks, &dir.join("restore-1")).await;

    // A small write: only its chunk goes again.
    let sent_before = s.chunks_sent;
    write_pattern(&a, 3 * MIB + 10, 5000, 3);
    let s = agent.wait("the change sent", 60, |s| s.chunks_sent > sent_before).await;
    let points_before = s.points;
    let s = agent.wait("a point after the change", 60, |s| s.points > points_before).await;
    assert_eq!(s.chunks_sent - sent_before, 1, "only the changed chunk is resent: {s:#?}");
    assert_eq!(s.deltas_sent, 1, "as a delta: {s:#?}");
    let _point = assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore-2")).await;

    // Writes into a zero chunk of the sparse disk and across two delta blocks of sda:
    // deltas again, carrying only the 64 KiB blocks written.
    let (sent_before, payload_before) = (s.chunks_sent, s.payload_bytes);
    write_pattern(&b, 5 * MIB + 4096, 1000, 4);
    write_pattern(&a, 7 * MIB + 65_000, 2000, 5);
    let s = agent.wait("both changes sent", 60, |s| s.chunks_sent >= sent_before + 2).await;
    let points_before = s.points;
    let s = agent.wait("a point after them", 60, |s| s.points > points_before).await;
    assert_eq!(s.deltas_sent, 3, "{s:#?}");
    assert_eq!(s.payload_bytes - payload_before, 3 * 64 * 1024, "one block of sdb, two of sda: {s:#?}");
    assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore-3")).await;
    agent.stop().await;
    drop(ps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_resumes_without_resending() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let ps = start_ps(dir, pki, targets, 1 << 30).await;
    let a = dir.join("a.img");
    write_pattern(&a, 0, (24 * MIB) as usize, 7);
    let disks = [("sda", a.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "app", "app");
    let config = agent_config(pki, files, "prod", "app", ps.addr, &disks, 0.2);

    // Stop the first agent in the middle of its initial copy, once the process server
    // has journaled some of it (all of which it makes durable and keeps).
    let first = start_agent(config.clone());
    let received = || async {
        let servers = ps.shared.servers().await;
        servers.first().map_or(0, |s| s.progress.bytes_received.load(std::sync::atomic::Ordering::Relaxed))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while received().await < 8 * MIB {
        assert!(tokio::time::Instant::now() < deadline, "the process server never received 8 MiB");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.task.abort();
    let kept = received().await / MIB;

    let second = start_agent(config);
    let s = second.wait("a recovery point", 60, |s| s.points >= 1).await;
    assert_eq!(s.last_resync_reason.as_deref(), Some("AgentStarted"), "{s:#?}");
    assert!(
        s.chunks_sent <= 24 - kept,
        "the restart resends only what the process server lacks: it had {kept} chunks, the agent sent {}",
        s.chunks_sent
    );
    let store = store_of(targets);
    let server = ServerRef::new("prod", "app").unwrap();
    assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore")).await;
    second.stop().await;
    drop(ps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_grows_is_replicated_at_its_new_size() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let ps = start_ps(dir, pki, targets, 1 << 30).await;
    let a = dir.join("a.img");
    write_pattern(&a, 0, (3 * MIB + 500) as usize, 9);
    let disks = [("sda", a.as_path())];
    let files = pki.agent_files(&pki.ca, "prod", "grow", "grow");
    let agent = start_agent(agent_config(pki, files, "prod", "grow", ps.addr, &disks, 0.2));
    agent.wait("a first point", 60, |s| s.points >= 1).await;

    write_pattern(&a, 5 * MIB, 4096, 10);
    let store = store_of(targets);
    let server = ServerRef::new("prod", "grow").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let point = loop {
        let s = agent.status();
        if let Some(id) = &s.last_point
            && let Ok(m) = store.load_point(&server, id).await
            && m.disks[0].size == 5 * MIB + 4096
        {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "no point at the new size: {s:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_restores_equal(&store, &server, &point, &disks, &dir.join("restore")).await;
    agent.stop().await;
    drop(ps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificates_are_refused() {
    let bed = Bed::new();
    let (dir, pki, targets) = (bed.dir(), &bed.pki, &bed.targets);
    let ps = start_ps(dir, pki, targets, 1 << 30).await;
    let a = dir.join("a.img");
    write_pattern(&a, 0, MIB as usize, 1);
    let disks = [("sda", a.as_path())];

    // A certificate from another CA fails the handshake.
    let other = siterecovery_operator::registration::certs::Ca::generate(jiff::Timestamp::now(), DAY).unwrap();
    let files = pki.agent_files(&other, "prod", "db", "foreign");
    let agent = start_agent(agent_config(pki, files, "prod", "db", ps.addr, &disks, 0.2));
    let s = agent.wait("a refusal", 30, |s| s.last_error.is_some()).await;
    assert!(!s.initial_copy_done && s.chunks_sent == 0, "{s:#?}");
    agent.stop().await;

    // A valid certificate for another server: the session is refused by name.
    let files = pki.agent_files(&pki.ca, "prod", "web", "other-server");
    let agent = start_agent(agent_config(pki, files, "prod", "db", ps.addr, &disks, 0.2));
    let s = agent.wait("a refusal", 30, |s| s.last_error.is_some()).await;
    let e = s.last_error.clone().unwrap();
    assert!(e.contains("IdentityMismatch") && e.contains("prod/web"), "{e}");
    assert_eq!(s.chunks_sent, 0);
    agent.stop().await;
    drop(ps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_recreated_with_a_new_key_never_reuses_chunks_it_cannot_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pki = Pki::new(dir);
    let a = dir.join("a.img");
    write_pattern(&a, 0, (5 * MIB + 99) as usize, 21);
    let disks = [("sda", a.as_path())];
    let server = ServerRef::new("prod", "again").unwrap();

    // The first life of the server, under a key that is then lost with its Secret.
    let first = dir.join("first");
    std::fs::create_dir_all(&first).unwrap();
    let old_targets = local_targets(&first, &dir.join("store"), MIB as u32);
    let ps = start_ps(&first, &pki, &old_targets, 1 << 30).await;
    let files = pki.agent_files(&pki.ca, "prod", "again", "again-1");
    let agent = start_agent(agent_config(&pki, files, "prod", "again", ps.addr, &disks, 0.2));
    agent.wait("a point in the first life", 60, |s| s.points >= 1).await;
    agent.stop().await;
    drop(ps);

    // Recreated: same name and container, a new key, a new process server (no cache).
    let second = dir.join("second");
    std::fs::create_dir_all(&second).unwrap();
    let new_targets = local_targets(&second, &dir.join("store"), MIB as u32);
    let ps = start_ps(&second, &pki, &new_targets, 1 << 30).await;
    let files = pki.agent_files(&pki.ca, "prod", "again", "again-2");
    let agent = start_agent(agent_config(&pki, files, "prod", "again", ps.addr, &disks, 0.2));
    let s = agent.wait("a point in the second life", 60, |s| s.points >= 1).await;
    let store = store_of(&new_targets);
    assert_last_point_restores(&store, &server, &s, &disks, &dir.join("restore")).await;
    agent.stop().await;
    drop(ps);
}
