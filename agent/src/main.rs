//! `siterecovery-agent`: see the library documentation.

use std::path::PathBuf;

use clap::Parser;
use siterecovery_agent::changes::tracker_for;
use siterecovery_agent::disk::Disk;
use siterecovery_agent::{Agent, AgentConfig};

/// Replicates this server's disks to its process server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Agent configuration (JSON).
    #[arg(long, env = "SR_AGENT_CONFIG", default_value = "/etc/siterecovery/agent.json")]
    config: PathBuf,
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
    let text =
        std::fs::read_to_string(&args.config).map_err(|e| anyhow::anyhow!("reading {}: {e}", args.config.display()))?;
    let config: AgentConfig =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let disks: Vec<Disk> = config.disks.iter().map(|d| Disk::open(&d.id, &d.path)).collect::<Result<_, _>>()?;
    let tracker = tracker_for(config.tracking, &disks)?;
    tracing::info!(tracker = tracker.name(), disks = disks.len(), "tracking changes");
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    let mut agent = Agent::new(config, tracker);
    agent.run(rx).await
}
