//! `siterecovery-agent`: see the library documentation.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use siterecovery_agent::changes::tracker_for;
use siterecovery_agent::disk::Disk;
use siterecovery_agent::register::{self, RegisterRequest};
use siterecovery_agent::report::Reporter;
use siterecovery_agent::{Agent, AgentConfig, DiskConfig};

/// Replicates this server's disks to its process server.
#[derive(Debug, Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand: `run`.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replicate (the default).
    Run(RunArgs),
    /// Register this server with the operator using its bootstrap token, and write the
    /// credentials and agent.json.
    Register(RegisterArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Agent configuration (JSON).
    #[arg(long, env = "SR_AGENT_CONFIG", default_value = "/etc/siterecovery/agent.json")]
    config: PathBuf,
    /// Log as JSON.
    #[arg(long, env = "SR_LOG_JSON")]
    log_json: bool,
}

#[derive(Debug, Clone, Args)]
struct RegisterArgs {
    /// The operator's registration endpoint, e.g. https://operator.example.com:9444.
    #[arg(long)]
    url: String,
    /// The operator CA (`ca.crt` handed out with the token): the only trust for the endpoint.
    #[arg(long)]
    ca: PathBuf,
    /// Namespace of the ProtectedServer.
    #[arg(long)]
    namespace: String,
    /// Name of the ProtectedServer.
    #[arg(long)]
    server: String,
    /// The bootstrap token (`srbt_…`); prefer the environment variable, which other users
    /// cannot read from the process list.
    #[arg(long, env = "SR_BOOTSTRAP_TOKEN", hide_env_values = true)]
    token: String,
    /// This machine's host name as in `spec.agent.hostname` (default: the kernel's).
    #[arg(long)]
    hostname: Option<String>,
    /// This machine's id (default: /etc/machine-id).
    #[arg(long)]
    machine_id: Option<String>,
    /// A disk to protect, `id=path` (repeat); may be omitted when --out has an agent.json.
    #[arg(long = "disk", value_parser = register::parse_disk)]
    disks: Vec<DiskConfig>,
    /// Directory for the credentials and agent.json.
    #[arg(long, default_value = "/etc/siterecovery")]
    out: PathBuf,
    /// How long to keep retrying while the operator is not ready for this server yet (503,
    /// e.g. its identity is being created), in seconds; 0 answers at once (exit code 75).
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::Register(args)) => return runtime.block_on(register(args)),
        Some(Command::Run(args)) => runtime.block_on(run(args)),
        None => runtime.block_on(run(cli.run)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
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
    let mut agent = Agent::new(config.clone(), tracker);
    if let Some(addr) = config.metrics_addr {
        let bound = siterecovery_agent::metrics::serve(addr, agent.status()).await?;
        tracing::info!(addr = %bound, "serving /metrics and /healthz");
    }
    match Reporter::new(&config, agent.status(), agent.pass_requests()) {
        Some(reporter) => {
            tracing::info!(server = %config.server, "reporting status to the Kubernetes API");
            tokio::spawn(reporter.run(rx.clone()));
        }
        None => tracing::info!("no kube section in the configuration: not reporting status"),
    }
    agent.run(rx).await
}

async fn register(args: RegisterArgs) -> ExitCode {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.wait);
    let mut result = try_register(args.clone()).await;
    // Not ready yet (503; nothing was consumed): retry as the endpoint asks, until --wait
    // runs out. Connection and TLS failures are reported at once (exit code 75).
    while let Err(register::RegisterError::Refused { status: 503, retry_after, .. }) = &result {
        let after = retry_after.unwrap_or(2);
        let pause = std::time::Duration::from_secs(after.clamp(1, 30));
        if std::time::Instant::now() + pause > deadline {
            break;
        }
        if let Err(e) = &result {
            eprintln!("{e}; retrying in {} s", pause.as_secs());
        }
        tokio::time::sleep(pause).await;
        result = try_register(args.clone()).await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if let register::RegisterError::Refused { retry_after: Some(s), .. } = &e
                && e.retryable()
            {
                eprintln!("the endpoint asks to retry in {s} s");
            }
            // EX_TEMPFAIL: a wrapper (systemd, a script) may retry; anything else needs a fix.
            if e.retryable() { ExitCode::from(75) } else { ExitCode::FAILURE }
        }
    }
}

async fn try_register(args: RegisterArgs) -> Result<(), register::RegisterError> {
    let local = |e: String| register::RegisterError::Local(e);
    let ca = std::fs::read_to_string(&args.ca).map_err(|e| local(format!("--ca {}: {e}", args.ca.display())))?;
    let hostname =
        args.hostname.or_else(register::local_hostname).ok_or_else(|| local("no host name: pass --hostname".into()))?;
    let request = RegisterRequest {
        namespace: args.namespace,
        name: args.server,
        token: args.token,
        hostname,
        machine_id: args.machine_id.or_else(register::local_machine_id),
    };
    let bundle = register::register(&args.url, &ca, &request).await?;
    let config = register::write_bundle(&args.out, &bundle, &args.disks)?;
    println!(
        "registered {}/{}; credentials and agent.json written to {}{}",
        bundle.namespace,
        bundle.name,
        args.out.display(),
        bundle.client_certificate_expiry_time.map(|t| format!(" (certificate valid until {t})")).unwrap_or_default()
    );
    println!("process server {}, API server {}", config.process_server, bundle.api_server);
    Ok(())
}
