//! `siterecovery-process-server`: see the library documentation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use siterecovery_process_server::kube::{KubeTargets, heartbeat, report_status};
use siterecovery_process_server::target::StaticTargets;
use siterecovery_process_server::{Config, TlsFiles, start};

/// The replication gateway between agents and Blob storage.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address agents connect to.
    #[arg(long, env = "SR_LISTEN", default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// The cache volume.
    #[arg(long, env = "SR_CACHE_DIR", default_value = "/var/cache/siterecovery")]
    cache_dir: PathBuf,
    /// Unuploaded bytes at which agents are slowed down (backpressure).
    #[arg(long, env = "SR_CACHE_LIMIT_BYTES", default_value_t = 8 << 30)]
    cache_limit_bytes: u64,
    /// Directory with tls.crt, tls.key, ca.crt and optionally crl.pem.
    #[arg(long, env = "SR_TLS_DIR", default_value = "/etc/siterecovery/tls")]
    tls_dir: PathBuf,
    /// Port to listen on, overriding the port of --listen (set by the operator's pods).
    #[arg(long, env = "SR_LISTEN_PORT")]
    port: Option<u16>,
    /// Where every server's data goes (JSON, see the `target` module). Without it, the
    /// process server runs in a cluster: targets come from each server's policy and its
    /// Secrets, and it keeps its heartbeat Lease and reports status.
    #[arg(long, env = "SR_TARGETS")]
    targets: Option<PathBuf>,
    /// This pod's name (from the downward API); agents assigned elsewhere are refused.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// This pod's namespace (from the downward API).
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// Address of /metrics and /healthz.
    #[arg(long, env = "SR_METRICS", default_value = "0.0.0.0:9090")]
    metrics: SocketAddr,
    /// Memory for recently received chunks, the bases deltas apply to.
    #[arg(long, env = "SR_RECENT_CHUNK_BYTES", default_value_t = 256 << 20)]
    recent_chunk_bytes: u64,
    /// Memory for the chaining values of the 64 KiB blocks of received chunks, which check
    /// deltas without their bases (2 KiB for a 4 MiB chunk).
    #[arg(long, env = "SR_BLOCK_CV_BYTES", default_value_t = siterecovery_process_server::recent::BLOCK_CV_BYTES)]
    block_cv_bytes: u64,
    /// Bytes of the cache volume for local copies of the chunks and patches uploaded, read
    /// back instead of downloading them (0: none). Copies never take the room the journal
    /// may need (--cache-limit-bytes stays free besides).
    #[arg(long, env = "SR_LOCAL_COPY_BYTES", default_value_t = siterecovery_process_server::DEFAULT_LOCAL_COPY_BYTES)]
    local_copy_bytes: u64,
    /// Log as JSON.
    #[arg(long, env = "SR_LOG_JSON")]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    fixed_mmap_threshold();
    run()
}

/// glibc's malloc serves a large allocation with its own mapping, given back when freed,
/// but it raises that threshold to the size of every mapped block that is freed (up to 32
/// MiB): after the first chunk buffer is freed, chunk buffers (4 MiB) come from the
/// per-thread arenas instead (up to 8 per core), whose freed holes are rarely returned:
/// peak RSS 700 MiB during a 1 GiB initial copy (docs/benchmarks.md, "Process-server
/// memory"). Mapping every buffer of 1 MiB or more instead (383 MiB) made each chunk
/// buffer a fresh mapping, faulted in and zeroed: a fifth of the process server's CPU.
/// So the threshold is fixed above a chunk (16 MiB: chunk buffers are reused from the
/// heap) and the arenas are two (their holes stay few): 398 MiB peak in the same copy,
/// and 20–45 % less CPU (docs/benchmarks.md, 2026-11-28 08:10). A fixed threshold also
/// fixes the trim threshold, at 128 KiB: every buffer freed at the top of a heap went back
/// to the kernel and the next one was faulted in and zeroed again, so up to 32 MiB of
/// free heap top is kept (docs/benchmarks.md, 2026-11-29 03:35). glibc reads these
/// settings from the environment only at start, and `mallopt` is not reachable without
/// `unsafe`, so the process starts itself again once with them set. A threshold already
/// in the environment is kept with whatever else is there (an operator's choice; any
/// value, even empty, turns this off); on other C libraries the variables mean nothing
/// and cost one exec.
fn fixed_mmap_threshold() {
    const VAR: &str = "MALLOC_MMAP_THRESHOLD_";
    const ARENAS: &str = "MALLOC_ARENA_MAX";
    const TRIM: &str = "MALLOC_TRIM_THRESHOLD_";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else { return };
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1)).env(VAR, "16777216");
    if std::env::var_os(ARENAS).is_none() {
        cmd.env(ARENAS, "2");
    }
    if std::env::var_os(TRIM).is_none() {
        cmd.env(TRIM, "33554432");
    }
    let err = cmd.exec();
    // Only reached if the exec failed: run as is.
    eprintln!("could not restart with {VAR} set ({err}); continuing with glibc's moving threshold");
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    // The Azure SDK logs every failed attempt at info; its retries are ours to report.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,typespec_client_core=warn,azure_core=warn".into());
    if args.log_json {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let mut listen = args.listen;
    if let Some(port) = args.port {
        listen.set_port(port);
    }
    let config = Config {
        listen,
        cache_dir: args.cache_dir.clone(),
        cache_limit: args.cache_limit_bytes,
        tls: TlsFiles::in_dir(&args.tls_dir),
        metrics: Some(args.metrics),
        recent_chunk_bytes: args.recent_chunk_bytes,
        block_cv_bytes: args.block_cv_bytes,
        local_copy_bytes: args.local_copy_bytes,
    };
    let ps = match &args.targets {
        Some(path) => start(config, Arc::new(StaticTargets::load(path)?)).await?,
        None => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| anyhow::anyhow!("no --targets file and no Kubernetes API to read policies from: {e}"))?;
            let azure = siterecovery_store::backend::AzureConnector::from_env()
                .map_err(|e| anyhow::anyhow!("storage client configuration: {e}"))?;
            let targets = Arc::new(KubeTargets::new(client.clone(), args.pod_name.clone(), azure));
            let ps = start(config, targets.clone()).await?;
            if let (Some(pod), Some(ns)) = (args.pod_name.clone(), args.pod_namespace.clone()) {
                tokio::spawn(heartbeat(
                    client.clone(),
                    ns.clone(),
                    pod.clone(),
                    args.cache_dir.clone(),
                    ps.shared.clone(),
                ));
                tokio::spawn(siterecovery_process_server::restore::run(
                    client.clone(),
                    ns,
                    Some(pod),
                    targets,
                    ps.shared.clone(),
                ));
            } else {
                tracing::warn!(
                    "POD_NAME or POD_NAMESPACE unset: no heartbeat Lease, the operator will see this process server as lost"
                );
            }
            tokio::spawn(report_status(client, ps.shared.clone()));
            ps
        }
    };
    println!("listening on {}", ps.addr);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping; acknowledged data stays in the cache and is uploaded after restart");
    Ok(())
}
