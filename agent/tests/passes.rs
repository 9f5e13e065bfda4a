//! What the agent tells its reporter about comparison passes, with a real process server
//! in this process: the initial copy counts every byte compared and sent, a requested
//! (manual) pass compares everything and resends nothing, and a disk that grows is
//! reported as a `DiskResized` pass. All the while its status reports fail (no API
//! server): replication does not depend on them.

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
