//! What the agent tells its reporter about comparison passes, with a real process server
//! in this process: the initial copy counts every byte compared and sent, a requested
//! (manual) pass compares everything and resends nothing, and a disk that grows is
//! reported as a `DiskResized` pass. All the while its status reports fail (no API
//! server): replication does not depend on them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use siterecovery_agent::changes::StampTracker;
use siterecovery_agent::disk::Disk;
use siterecovery_agent::report::{KubeConfig, Reporter};
use siterecovery_agent::{Agent, AgentConfig, AgentStatus, DiskConfig};
use siterecovery_operator::registration::certs::Ca;
use siterecovery_process_server::target::StaticTargets;
use siterecovery_process_server::{Config, TlsFiles};

const MIB: u64 = 1 << 20;
const DAY: Duration = Duration::from_secs(86_400);

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

    // Certificates from the operator's CA code; a process server keeping a local store.
    let ca = Ca::generate(Timestamp::now(), DAY * 365).unwrap();
    let ps_cert = ca.issue_serving(&["localhost".into()], Timestamp::now(), DAY).unwrap();
    let agent_cert = ca.issue_client("prod", "db-01", Timestamp::now(), DAY).unwrap();
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    for (name, pem) in [
        ("tls.crt", &ps_cert.cert_pem),
        ("tls.key", &ps_cert.key_pem),
        ("ca.crt", &ca.bundle_pem),
        ("agent.crt", &agent_cert.cert_pem),
        ("agent.key", &agent_cert.key_pem),
    ] {
        std::fs::write(tls.join(name), pem).unwrap();
    }
    use base64::Engine as _;
    let key: [u8; 32] = rand::random();
    let targets = serde_json::json!({
        "backend": {"local": dir.join("store")},
        "keys": {"active": "k1", "key-k1": base64::engine::general_purpose::STANDARD.encode(key)},
        "chunkSize": MIB,
    });
    std::fs::write(dir.join("targets.json"), targets.to_string()).unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cache_dir: dir.join("cache"),
        cache_limit: 1 << 30,
        tls: TlsFiles::in_dir(&tls),
        metrics: None,
        recent_chunk_bytes: 64 << 20,
        block_cv_bytes: siterecovery_process_server::recent::BLOCK_CV_BYTES,
    };
    let targets = Arc::new(StaticTargets::load(&dir.join("targets.json")).unwrap());
    let ps = siterecovery_process_server::start(config, targets).await.unwrap();

    let image = dir.join("os.img");
    let size = 3 * MIB + 1000;
    write_data(&image, 0, size as usize, 7);
    let config = AgentConfig {
        namespace: "prod".into(),
        server: "db-01".into(),
        disks: vec![DiskConfig { id: "os".into(), path: image.clone() }],
        process_server: format!("localhost:{}", ps.addr.port()),
        tls_server_name: None,
        client_cert: tls.join("agent.crt"),
        client_key: tls.join("agent.key"),
        ca_bundle: tls.join("ca.crt"),
        interval_seconds: 0.2,
        max_passes: 8,
        compression_level: 1,
        tracking: Default::default(),
        metrics_addr: None,
        app_consistency: None,
        // An API server that is not there: reporting fails, replication must not mind.
        kube: Some(KubeConfig {
            api_server: "https://127.0.0.1:1".into(),
            token: dir.join("no-token"),
            api_server_ca: None,
        }),
        registration_url: None,
        restart: None,
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
    drop(ps);
}
