//! What the agent tells its reporter about comparison passes, with a real process server
//! in this process: the initial copy counts every byte compared and sent, a requested
//! (manual) pass compares everything and resends nothing, and a disk that grows is
//! reported as a `DiskResized` pass. All the while its status reports fail (no API
//! server): replication does not depend on them. Also: the policy's compression level, as
//! the process server hands it, wins over agent.json's.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use siterecovery_agent::changes::StampTracker;
use siterecovery_agent::disk::Disk;
use siterecovery_agent::report::{KubeConfig, Reporter};
use siterecovery_agent::{Agent, AgentConfig, AgentStatus, DiskConfig};

mod support;

use support::LocalPs;

const MIB: u64 = 1 << 20;

fn write_data(path: &Path, offset: u64, len: usize, seed: u64) {
    use std::os::unix::fs::FileExt as _;
    let mut x = seed | 1;
    let buf: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).unwrap();
    f.write_all_at(&buf, offset).unwrap();
    f.sync_all().unwrap();
}

async fn wait(status: &std::sync::Mutex<AgentStatus>, what: &str, f: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = status.lock().unwrap().clone();
        if f(&s) {
            return s;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_are_counted_for_the_status_report() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    let local = LocalPs::start(dir, MIB, |t| Arc::new(t)).await;
    let image = dir.join("os.img");
    let size = 3 * MIB + 1000;
    write_data(&image, 0, size as usize, 7);
    let config = AgentConfig {
        // An API server that is not there: reporting fails, replication must not mind.
        kube: Some(KubeConfig {
            api_server: "https://127.0.0.1:1".into(),
            token: dir.join("no-token"),
            api_server_ca: None,
        }),
        ..local.agent_config(vec![DiskConfig { id: "os".into(), path: image.clone() }])
    };
    let disks = vec![Disk::open("os", &image).unwrap()];
    let mut agent = Agent::new(config.clone(), Box::new(StampTracker::new(&disks)));
    let status = agent.status();
    let requests = agent.pass_requests();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let reporter = Reporter::new(&config, status.clone(), requests.clone()).expect("a kube section");
    let reporting = tokio::spawn(reporter.run(rx.clone()));
    let task = tokio::spawn(async move { agent.run(rx).await });

    // The initial copy: every byte compared and sent, complete once acknowledged.
    let s = wait(&status, "the initial copy", |s| s.pass.as_ref().is_some_and(|p| p.completed.is_some())).await;
    let p = s.pass.unwrap();
    assert_eq!((p.id, p.reason.as_str()), (1, "InitialCopy"));
    assert_eq!((p.bytes_total.clone(), p.bytes_compared.clone(), p.bytes_resent), (vec![size], vec![size], size));
    assert_eq!(s.disks.iter().map(|d| (d.id.as_str(), d.size)).collect::<Vec<_>>(), vec![("os", size)]);
    assert_eq!(s.tracker, "checksum-scan");

    // A requested pass compares everything and finds nothing to resend.
    requests.request("Manual", "requested through spec.resyncToken");
    let s =
        wait(&status, "the manual pass", |s| s.pass.as_ref().is_some_and(|p| p.id == 2 && p.completed.is_some())).await;
    let p = s.pass.unwrap();
    assert_eq!(p.reason, "Manual");
    assert_eq!((p.bytes_compared.clone(), p.bytes_resent), (vec![size], 0));
    assert!(!requests.is_pending());

    // The disk grows: the next session's catch-up is a DiskResized pass.
    let grown = 4 * MIB + 1000;
    write_data(&image, size, (grown - size) as usize, 9);
    let s = wait(&status, "the resize pass", |s| {
        s.pass.as_ref().is_some_and(|p| p.reason == "DiskResized" && p.completed.is_some())
    })
    .await;
    let p = s.pass.unwrap();
    assert!(p.message.contains("disk os changed size from 3146728 to 4195304 bytes"), "{}", p.message);
    assert!(p.bytes_resent > 0 && p.bytes_resent <= 2 * MIB, "the last old chunk and the new one: {p:#?}");
    assert_eq!(s.disks[0].size, grown);

    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
    tokio::time::timeout(Duration::from_secs(5), reporting).await.expect("the reporter stops").unwrap();
    drop(local);
}

/// Text-like bytes (words from a small vocabulary, in random order): zstd compresses them
/// better at each higher level, so the level used shows in the stored size.
fn words(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "replica ", "volume ", "kernel ", "point ", "azure ", "block ", "server ", "restore ", "the ", "of ", "and ",
        "chunk ", "write ", "cache ", "policy ", "agent\n",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % 16) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policys_compression_level_wins_over_the_agents_own() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The policy (here the standalone targets file) says 19; agent.json keeps its default, 1.
    let local = LocalPs::start(dir, MIB, |_| {
        let path = dir.join("targets.json");
        let mut file: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        file["compressionLevel"] = 19.into();
        Arc::new(
            siterecovery_process_server::target::StaticTargets::new(serde_json::from_value(file).unwrap()).unwrap(),
        )
    })
    .await;
    let image = dir.join("os.img");
    let data = words(3 * MIB as usize, 11);
    std::fs::write(&image, &data).unwrap();
    let config = local.agent_config(vec![DiskConfig { id: "os".into(), path: image.clone() }]);
    assert_eq!(config.compression_level, 1);
    let disks = vec![Disk::open("os", &image).unwrap()];
    let mut agent = Agent::new(config, Box::new(StampTracker::new(&disks)));
    let status = agent.status();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move { agent.run(rx).await });
    wait(&status, "the first point", |s| s.points > 0).await;
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), task).await;

    // The process server stores each chunk's frame as the agent sent it: header, nonce
    // and tag (36 bytes with key id "k1") around the level-19 frame.
    let chunks = dir.join("store/servers/prod/db-01/disks/os/chunks");
    let stored: Vec<u64> = std::fs::read_dir(&chunks).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).collect();
    assert_eq!(stored.len(), 3, "{stored:?}");
    let at = |level| {
        data.chunks(MIB as usize).map(|c| zstd::bulk::compress(c, level).unwrap().len() as u64 + 36).sum::<u64>()
    };
    let (fastest, asked) = (at(1), at(19));
    assert!(asked < fastest * 9 / 10, "the content tells the levels apart: {asked} against {fastest}");
    assert_eq!(stored.iter().sum::<u64>(), asked, "stored {stored:?}; at level 1 it would be {fastest} bytes");
    drop(local);
}
