//! The process server (ASR's replication gateway): accepts agents over mutual TLS,
//! journals what they send durably before acknowledging it, and uploads recovery points
//! to Blob storage through `siterecovery-store`. Protocol: docs/replication-protocol.md.

pub mod ahead;
pub mod chains;
pub mod group;
pub mod journal;
pub mod kube;
pub mod metrics;
pub mod recent;
pub mod restore;
pub mod session;
pub mod state;
pub mod target;
pub mod upload;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use siterecovery_store::ServerRef;
use siterecovery_wire::tls::{ServingCert, SwappableVerifier, certified_key, client_verifier, process_server_config};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::metrics::Metrics;
use crate::state::{CacheBudget, Registry, ServerState, StateError};
use crate::target::{Target, Targets};

/// Certificate files: the serving certificate and key, the CA bundle agents' client
/// certificates must chain to, and optionally a revocation list.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `tls.crt`.
    pub cert: PathBuf,
    /// `tls.key`.
    pub key: PathBuf,
    /// `ca.crt`.
    pub ca: PathBuf,
    /// A PEM file of CRLs; revoked client certificates are refused at the handshake.
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// The conventional names in a mounted `kubernetes.io/tls` Secret directory.
    pub fn in_dir(dir: &Path) -> Self {
        let crl = dir.join("crl.pem");
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
            crl: crl.exists().then_some(crl),
        }
    }

    fn read(&self) -> anyhow::Result<(String, String, String, Option<String>)> {
        let r = |p: &Path| std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()));
        Ok((r(&self.cert)?, r(&self.key)?, r(&self.ca)?, self.crl.as_deref().map(r).transpose()?))
    }
}

/// How a process server runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address agents connect to.
    pub listen: SocketAddr,
    /// The cache volume.
    pub cache_dir: PathBuf,
    /// Bytes of unuploaded data at which sessions stop reading (backpressure).
    pub cache_limit: u64,
    /// Certificates.
    pub tls: TlsFiles,
    /// Where `/metrics` and `/healthz` are served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Memory for recently received chunks (the bases of deltas).
    pub recent_chunk_bytes: u64,
    /// Memory for the chaining values of the blocks of received chunks, which check deltas
    /// without their bases ([`recent::BLOCK_CV_BYTES`] by default; 0 turns that off).
    pub block_cv_bytes: u64,
    /// Bytes of the cache volume for local copies of what is uploaded, read back instead of
    /// downloaded (`siterecovery_store::LocalCopies`; 0: none). [`DEFAULT_LOCAL_COPY_BYTES`]
    /// by default.
    pub local_copy_bytes: u64,
}

/// Default bytes of local copies: bases of rebuilds read back from the cache volume
/// rather than the store (docs/process-servers.md, "Local copies").
pub const DEFAULT_LOCAL_COPY_BYTES: u64 = 16 << 30;

/// Where the local copies are, in the cache volume (a name no namespace can have).
const COPIES_DIR: &str = ".copies";

/// What every session and uploader shares.
pub struct Shared {
    registry: Registry,
    targets: Arc<dyn Targets>,
    cache_dir: PathBuf,
    budget: Arc<CacheBudget>,
    /// Journal bytes the uploaders may hold in memory, all servers together.
    upload_buffer: Arc<upload::UploadBuffer>,
    metrics: Arc<Metrics>,
    recent: Arc<recent::RecentChunks>,
    /// The uploaders, stopped with the process server.
    uploaders: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Consistency groups with a member connected here.
    groups: Arc<group::Groups>,
}

impl Shared {
    /// The state of a server, opened and its uploader started on first use.
    async fn open(&self, server: ServerRef, target: Arc<Target>) -> Result<Arc<ServerState>, StateError> {
        let (state, new) = self.registry.get_or_open(&self.cache_dir, server, target).await?;
        if new {
            self.budget.add(state.backlog.load(std::sync::atomic::Ordering::Relaxed));
            let task = tokio::spawn(upload::run(
                state.clone(),
                self.budget.clone(),
                self.upload_buffer.clone(),
                self.recent.clone(),
                self.metrics.clone(),
            ));
            self.uploaders.lock().unwrap_or_else(|p| p.into_inner()).push(task);
        }
        Ok(state)
    }

    /// Every server with state here.
    pub async fn servers(&self) -> Vec<Arc<ServerState>> {
        self.registry.all().await
    }

    /// Bytes acknowledged and not yet uploaded, over all servers.
    pub fn backlog(&self) -> u64 {
        self.budget.used()
    }

    /// The consistency groups with a member connected here.
    pub fn groups(&self) -> &group::Groups {
        &self.groups
    }
}

/// A running process server.
pub struct ProcessServer {
    /// Where agents connect.
    pub addr: SocketAddr,
    /// Where metrics are served.
    pub metrics_addr: Option<SocketAddr>,
    /// State shared with sessions and uploaders.
    pub shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ProcessServer {
    /// Stops accepting, and stops every uploader: an embedded process server that is
    /// dropped must not go on writing to the store (one writer per server).
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.shared.uploaders.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
    }
}

/// Starts a process server: loads certificates, resumes the uploads of every server with
/// data in the cache, and accepts agents.
pub async fn start(config: Config, targets: Arc<dyn Targets>) -> anyhow::Result<ProcessServer> {
    let (cert, key, ca, crl) = config.tls.read()?;
    let serving = ServingCert::new(certified_key(&cert, &key)?);
    let clients = SwappableVerifier::new(client_verifier(&ca, crl.as_deref())?, true);
    let tls = TlsAcceptor::from(process_server_config(serving.clone(), clients.clone())?);
    std::fs::create_dir_all(&config.cache_dir)
        .map_err(|e| anyhow::anyhow!("creating cache {}: {e}", config.cache_dir.display()))?;

    let recent = Arc::new(recent::RecentChunks::new(config.recent_chunk_bytes, config.block_cv_bytes));
    let mut metrics = Metrics { base_downloads: recent.downloads.clone(), ..Metrics::default() };
    // Copies are a cache: without them everything works, reading back from the store.
    let dir = config.cache_dir.join(COPIES_DIR);
    let copies = (config.local_copy_bytes > 0)
        .then(|| siterecovery_store::LocalCopies::open(&dir, config.local_copy_bytes, config.cache_limit))
        .transpose()
        .unwrap_or_else(|e| {
            tracing::warn!(dir = %dir.display(), error = %e, "no local copies: chunks are read back from the store");
            None
        });
    let targets: Arc<dyn Targets> = match copies {
        Some(copies) => {
            metrics.copies(&copies);
            Arc::new(target::WithCopies::new(targets, Arc::new(copies)))
        }
        None => targets,
    };
    let metrics = Arc::new(metrics);
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let metrics_addr = match config.metrics {
        Some(addr) => Some(metrics::serve(addr, registry).await?),
        None => None,
    };
    let shared = Arc::new(Shared {
        registry: Registry::default(),
        targets,
        cache_dir: config.cache_dir.clone(),
        budget: Arc::new(CacheBudget::new(config.cache_limit)),
        upload_buffer: Arc::new(upload::UploadBuffer::new(upload::UPLOAD_BUFFER_BYTES)),
        metrics: metrics.clone(),
        recent,
        uploaders: Default::default(),
        groups: Default::default(),
    });
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, cache = %config.cache_dir.display(), "process server listening");
    let mut tasks = Vec::new();
    // Resuming reads each cached server's store; a store outage must not delay serving.
    let s = shared.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = resume(&s).await {
            tracing::error!(error = %e, "resuming cached uploads failed");
        }
    }));
    let s = shared.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let (tls, s) = (tls.clone(), s.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                    Ok(Ok(stream)) => session::serve(s, stream, peer).await,
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    }));
    // Rotated certificates and a new revocation list apply to new connections.
    let files = config.tls.clone();
    tasks.push(tokio::spawn(async move {
        let mut last = files.read().ok();
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let Ok(now) = files.read() else { continue };
            if last.as_ref() == Some(&now) {
                continue;
            }
            let (cert, key, ca, crl) = &now;
            match (certified_key(cert, key), client_verifier(ca, crl.as_deref())) {
                (Ok(k), Ok(v)) => {
                    serving.replace(k);
                    clients.replace(v);
                    tracing::info!("certificates reloaded");
                    last = Some(now);
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, "certificates changed but do not load; keeping the old ones")
                }
            }
        }
    }));
    let s = shared.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            s.metrics.backlog_bytes.set(s.backlog() as i64);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }));
    Ok(ProcessServer { addr, metrics_addr, shared, tasks })
}

/// Starts the uploaders of every server that has data in the cache, before any agent
/// connects: acknowledged data goes up after a restart even if its agent never returns.
async fn resume(shared: &Shared) -> anyhow::Result<()> {
    let Ok(namespaces) = std::fs::read_dir(&shared.cache_dir) else { return Ok(()) };
    for ns in namespaces.flatten() {
        let Ok(servers) = std::fs::read_dir(ns.path()) else { continue };
        for srv in servers.flatten() {
            let (Some(n), Some(s)) =
                (ns.file_name().to_str().map(String::from), srv.file_name().to_str().map(String::from))
            else {
                continue;
            };
            let Ok(server) = ServerRef::new(&n, &s) else { continue };
            match shared.targets.resolve(&n, &s).await {
                Ok(target) => match shared.open(server, target).await {
                    Ok(state) => {
                        tracing::info!(server = %state.server, backlog = state.backlog.load(std::sync::atomic::Ordering::Relaxed), "resuming uploads from the cache")
                    }
                    // One unreadable cache must not keep the others (and new agents) waiting.
                    Err(e) => {
                        tracing::error!(namespace = %n, server = %s, error = %e, "cannot resume this server's cache")
                    }
                },
                Err((reason, message)) => {
                    tracing::warn!(namespace = %n, server = %s, %reason, %message, "cached data cannot be uploaded now")
                }
            }
        }
    }
    Ok(())
}
