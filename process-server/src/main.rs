//! `siterecovery-process-server`: see the library documentation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
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
    /// Where every server's data goes (JSON, see the `target` module).
    #[arg(long, env = "SR_TARGETS")]
    targets: PathBuf,
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if args.log_json {
        tracing_subscriber::fmt().with_env_filter(filter).json().init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let targets = Arc::new(StaticTargets::load(&args.targets)?);
    let config = Config {
        listen: args.listen,
        cache_dir: args.cache_dir,
        cache_limit: args.cache_limit_bytes,
        tls: TlsFiles::in_dir(&args.tls_dir),
        metrics: Some(args.metrics),
        recent_chunk_bytes: args.recent_chunk_bytes,
    };
    let ps = start(config, targets).await?;
    println!("listening on {}", ps.addr);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping; acknowledged data stays in the cache and is uploaded after restart");
    Ok(())
}
