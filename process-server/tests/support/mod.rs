//! Shared set-up of the replication tests: certificates from the operator's own CA code,
//! a targets file, disk images, an in-process or child-process process server and an
//! in-process agent.
#![allow(dead_code, missing_docs)]

mod azurite;
mod child;
// Each test file uses some of these.
#[allow(unused_imports)]
pub use azurite::Azurite;
#[allow(unused_imports)]
pub use child::{ChildGuard, PsChild, metric};

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use siterecovery_agent::changes::StampTracker;
use siterecovery_agent::disk::Disk;
use siterecovery_agent::{Agent, AgentConfig, AgentStatus, DiskConfig};
use siterecovery_operator::registration::certs::Ca;
use siterecovery_process_server::target::StaticTargets;
use siterecovery_process_server::{Config, ProcessServer, TlsFiles};
use siterecovery_store::{AzureBlobBackend, BlobBackend, LocalBackend, Manifest, ServerRef, Store, StoreOptions};

pub const DAY: Duration = Duration::from_secs(86_400);

/// A CA, the process server's certificate and agents' certificates, as files.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl Pki {
    pub fn new(dir: &Path) -> Self {
        let ca = Ca::generate(Timestamp::now(), DAY * 365).unwrap();
        let ps = ca.issue_serving(&["localhost".into(), "127.0.0.1".into()], Timestamp::now(), DAY).unwrap();
        let tls = dir.join("ps-tls");
        std::fs::create_dir_all(&tls).unwrap();
        std::fs::write(tls.join("tls.crt"), &ps.cert_pem).unwrap();
        std::fs::write(tls.join("tls.key"), &ps.key_pem).unwrap();
        std::fs::write(tls.join("ca.crt"), &ca.bundle_pem).unwrap();
        Self { dir: dir.to_path_buf(), ca }
    }

    pub fn ps_tls(&self) -> PathBuf {
        self.dir.join("ps-tls")
    }

    /// Writes an agent certificate for `ns/server` signed by `ca`; returns (cert, key, ca bundle) paths.
    pub fn agent_files(&self, ca: &Ca, ns: &str, server: &str, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
        let c = ca.issue_client(ns, server, Timestamp::now(), DAY).unwrap();
        let base = self.dir.join(format!("agent-{tag}"));
        std::fs::create_dir_all(&base).unwrap();
        let (cert, key, bundle) = (base.join("tls.crt"), base.join("tls.key"), base.join("ca.crt"));
        std::fs::write(&cert, &c.cert_pem).unwrap();
        std::fs::write(&key, &c.key_pem).unwrap();
        std::fs::write(&bundle, &self.ca.bundle_pem).unwrap();
        (cert, key, bundle)
    }
}

/// A targets file keeping objects in `store_dir`, with a fresh key.
pub fn local_targets(dir: &Path, store_dir: &Path, chunk_size: u32) -> PathBuf {
    use base64::Engine as _;
    let key: [u8; 32] = rand::random();
    let json = serde_json::json!({
        "backend": {"local": store_dir},
        "keys": {"active": "k1", "key-k1": base64::engine::general_purpose::STANDARD.encode(key)},
        "chunkSize": chunk_size,
    });
    let path = dir.join("targets.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    path
}

/// A targets file with the keys and chunk size of `local` (a [`local_targets`] file) whose
/// backend is the Azure container `container` at `endpoint`, reached with `sas`; written
/// beside `local` as `targets-<container>.json`.
pub fn azure_targets(local: &Path, endpoint: &str, container: &str, sas: &str) -> PathBuf {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(local).unwrap()).unwrap();
    v["backend"] = serde_json::json!({"azure": {"endpoint": endpoint, "container": container, "sas": sas}});
    let path = local.with_file_name(format!("targets-{container}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    path
}

/// The store a targets file names (local directory or Azure container), for reading back
/// and restoring.
pub fn store_of(targets: &Path) -> Store {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(targets).unwrap()).unwrap();
    let backend: Arc<dyn BlobBackend> = match v["backend"]["local"].as_str() {
        Some(dir) => Arc::new(LocalBackend::new(dir).unwrap()),
        None => {
            let a = &v["backend"]["azure"];
            let s = |k: &str| a[k].as_str().unwrap_or_else(|| panic!("backend.azure.{k} in {}", targets.display()));
            Arc::new(AzureBlobBackend::with_sas(s("endpoint"), s("container"), s("sas")).unwrap())
        }
    };
    let mut data = std::collections::BTreeMap::new();
    use base64::Engine as _;
    data.insert("active".to_string(), b"k1".to_vec());
    data.insert(
        "key-k1".to_string(),
        base64::engine::general_purpose::STANDARD.decode(v["keys"]["key-k1"].as_str().unwrap()).unwrap(),
    );
    let keyring = siterecovery_store::Keyring::from_secret_data(&data).unwrap();
    Store::new(backend, keyring, StoreOptions::default()).unwrap()
}

pub fn ps_config(dir: &Path, pki: &Pki, cache_limit: u64) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        cache_dir: dir.join("cache"),
        cache_limit,
        tls: TlsFiles::in_dir(&pki.ps_tls()),
        metrics: Some("127.0.0.1:0".parse().unwrap()),
        recent_chunk_bytes: 64 << 20,
        block_cv_bytes: siterecovery_process_server::recent::BLOCK_CV_BYTES,
        local_copy_bytes: siterecovery_process_server::DEFAULT_LOCAL_COPY_BYTES,
    }
}

pub async fn start_ps(dir: &Path, pki: &Pki, targets: &Path, cache_limit: u64) -> ProcessServer {
    let t = Arc::new(StaticTargets::load(targets).unwrap());
    siterecovery_process_server::start(ps_config(dir, pki, cache_limit), t).await.unwrap()
}

/// Writes `len` bytes of varied, partly compressible content at `offset`.
pub fn write_pattern(path: &Path, offset: u64, len: usize, seed: u64) {
    let mut buf = vec![0u8; len];
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    for (i, b) in buf.iter_mut().enumerate() {
        if i % 4096 < 2048 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        } else {
            *b = (i / 4096) as u8 ^ seed as u8;
        }
    }
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).unwrap();
    f.write_all_at(&buf, offset).unwrap();
    f.sync_all().unwrap();
}

/// A sparse image of `size` bytes.
pub fn image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

pub struct RunningAgent {
    pub status: Arc<Mutex<AgentStatus>>,
    pub stop: tokio::sync::watch::Sender<bool>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningAgent {
    pub fn status(&self) -> AgentStatus {
        self.status.lock().unwrap().clone()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(20), self.task).await;
    }

    /// Waits until `f` holds for the status, or panics after `secs` with the status.
    pub async fn wait(&self, what: &str, secs: u64, f: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; agent status: {s:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn agent_config(
    pki: &Pki,
    files: (PathBuf, PathBuf, PathBuf),
    ns: &str,
    server: &str,
    addr: std::net::SocketAddr,
    disks: &[(&str, &Path)],
    interval: f64,
) -> AgentConfig {
    let _ = pki;
    let disks = disks.iter().map(|(id, p)| DiskConfig { id: id.to_string(), path: p.to_path_buf() }).collect();
    let address = format!("localhost:{}", addr.port());
    AgentConfig { interval_seconds: interval, ..AgentConfig::new(ns, server, disks, address, files) }
}

pub fn start_agent(config: AgentConfig) -> RunningAgent {
    let disks: Vec<Disk> = config.disks.iter().map(|d| Disk::open(&d.id, &d.path).unwrap()).collect();
    let mut agent = Agent::new(config, Box::new(StampTracker::new(&disks)));
    let status = agent.status();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move { agent.run(rx).await });
    RunningAgent { status, stop, task }
}

/// Waits until the store holds a point of `server` named `id`, and returns it.
pub async fn wait_point(store: &Store, server: &ServerRef, id: &str, secs: u64) -> Manifest {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(m) = store.load_point(server, id).await {
            return m;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("point {id} of {server} never reached the store");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Restores every disk of `point` into `out` and asserts each equals its source.
pub async fn assert_restores_equal(
    store: &Store,
    server: &ServerRef,
    point: &Manifest,
    disks: &[(&str, &Path)],
    out: &Path,
) {
    std::fs::create_dir_all(out).unwrap();
    let targets: Vec<(String, PathBuf)> = disks.iter().map(|(id, _)| (id.to_string(), out.join(id))).collect();
    store.restore_point(server, point, &targets).await.unwrap();
    for (id, src) in disks {
        let a = std::fs::read(src).unwrap();
        let b = std::fs::read(out.join(id)).unwrap();
        assert_eq!(a.len(), b.len(), "disk {id}: restored size differs");
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("disk {id}: restored copy differs from the source at byte {i}");
        }
    }
}

/// A test's scratch directory, certificates and a targets file for a local store with
/// 1 MiB chunks: what most replication tests start from.
pub struct Bed {
    tmp: tempfile::TempDir,
    /// The CA and the process server's certificate.
    pub pki: Pki,
    /// The targets file.
    pub targets: PathBuf,
}

impl Bed {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new(tmp.path());
        let targets = local_targets(tmp.path(), &tmp.path().join("store"), MIB as u32);
        Self { tmp, pki, targets }
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }
}

const MIB: u64 = 1024 * 1024;

/// Waits for the point the agent last acknowledged (`last_point` of its status) to reach
/// the store, and asserts it restores equal to the sources; returns its manifest.
pub async fn assert_last_point_restores(
    store: &Store,
    server: &ServerRef,
    status: &AgentStatus,
    disks: &[(&str, &Path)],
    out: &Path,
) -> Manifest {
    let id = status.last_point.as_deref().expect("the agent acknowledged a point");
    let point = wait_point(store, server, id, 30).await;
    assert_restores_equal(store, server, &point, disks, out).await;
    point
}

/// A port nobody listens on right now (bound, read and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
