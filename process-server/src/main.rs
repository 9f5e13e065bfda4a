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
    /// Log as JSON.
    #[arg(long, env = "SR_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
