//! `siterecovery-agent`: see the library documentation.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::{Args, Parser, Subcommand};
use siterecovery_agent::changes::tracker_for;
use siterecovery_agent::disk::Disk;
use siterecovery_agent::register::{self, RegisterError, RegisterRequest};
use siterecovery_agent::renew::{self, RenewalStatus, Renewer};
use siterecovery_agent::report::Reporter;
use siterecovery_agent::{Agent, AgentConfig, DiskConfig, RestartConfig};

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
    /// Renew the client certificate and token now (`run` renews by itself at half the
    /// certificate's lifetime), replacing the files agent.json names.
    Renew(RenewArgs),
    /// Stop the change tracking a stopped agent left running for its next start (the eBPF
    /// program pinned in the bpf filesystem) and remove its restart state: for a server no
    /// longer protected from this machine. The next `run` then compares every chunk.
    Untrack(UntrackArgs),
}

#[derive(Debug, Clone, Args)]
struct UntrackArgs {
    /// Agent configuration (JSON) of the server.
    #[arg(long, env = "SR_AGENT_CONFIG", default_value = "/etc/siterecovery/agent.json")]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Agent configuration (JSON).
    #[arg(long, env = "SR_AGENT_CONFIG", default_value = "/etc/siterecovery/agent.json")]
    config: PathBuf,
    /// Log as JSON.
    #[arg(long, env = "SR_LOG_JSON")]
    log_json: bool,
    /// Memory for the 64 KiB block hashes of chunks read, in MiB (33 bytes per 64 KiB:
    /// 64 MiB covers about 110 GiB of 4 MiB chunks): a changed chunk held there is read by
    /// its dirty blocks alone, others whole; 0 reads every changed chunk whole.
    #[arg(long, env = "SR_AGENT_BLOCK_CACHE_MIB", default_value_t = 64)]
    block_cache_mib: usize,
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

#[derive(Debug, Clone, Args)]
struct RenewArgs {
    /// Agent configuration (JSON) naming the credentials to renew.
    #[arg(long, env = "SR_AGENT_CONFIG", default_value = "/etc/siterecovery/agent.json")]
    config: PathBuf,
    /// The registration endpoint, for an agent.json without registrationUrl (written by
    /// an older `register`).
    #[arg(long)]
    url: Option<String>,
    /// How long to keep retrying while the operator answers 503 (not ready), in seconds;
    /// 0 answers at once (exit code 75).
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
        Some(Command::Renew(args)) => return runtime.block_on(renew_now(args)),
        Some(Command::Untrack(args)) => untrack(&args),
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
    let config = load_config(&args.config)?;
    let disks: Vec<Disk> = config.disks.iter().map(|d| Disk::open(&d.id, &d.path)).collect::<Result<_, _>>()?;
    let mut config = config;
    if config.restart.is_none() {
        config.restart = default_restart(&config, &args.config);
    }
    let pin_dir = config.restart.as_ref().map(|r| r.pin_dir.as_path());
    let ring_bytes = config.tracker_ring_buffer_mib.map(|mib| mib << 20);
    let tracker = tracker_for(config.tracking, &disks, pin_dir, ring_bytes)?;
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
    let mut agent = Agent::new(config.clone(), tracker).with_block_cache(args.block_cache_mib << 20);
    let renewal = Arc::new(Mutex::new(RenewalStatus::default()));
    if let Some(addr) = config.metrics_addr {
        let bound = siterecovery_agent::metrics::serve(addr, agent.status(), renewal.clone()).await?;
        tracing::info!(addr = %bound, "serving /metrics and /healthz");
    }
    tokio::spawn(Renewer::new(config.clone(), renewal).run(rx.clone()));
    match Reporter::new(&config, agent.status(), agent.pass_requests()) {
        Some(reporter) => {
            tracing::info!(server = %config.server, "reporting status to the Kubernetes API");
            tokio::spawn(reporter.run(rx.clone()));
        }
        None => tracing::info!("no kube section in the configuration: not reporting status"),
    }
    agent.run(rx).await
}

/// `untrack`: removes the pinned tracking and the restart state `run` would use.
fn untrack(args: &UntrackArgs) -> anyhow::Result<()> {
    let config = load_config(&args.config)?;
    let Some(restart) = config.restart.clone().or_else(|| default_restart(&config, &args.config)) else {
        println!("no bpf filesystem at /sys/fs/bpf and no restart section in the configuration: nothing is pinned");
        return Ok(());
    };
    let had_state = restart.forget()?;
    println!("removed the pinned change tracking under {}", restart.pin_dir.display());
    if had_state {
        println!("removed the restart state {}", restart.state_file.display());
    }
    Ok(())
}

/// Where tracking is pinned and the restart state kept when the configuration does not
/// say: the host's bpf filesystem at /sys/fs/bpf (when mounted there) and the
/// configuration's directory. `None` (every start compares every chunk) without a bpf
/// filesystem.
fn default_restart(config: &AgentConfig, config_file: &Path) -> Option<RestartConfig> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let bpffs = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.split_whitespace().nth(2) == Some("bpf"));
    if !bpffs {
        tracing::info!("no bpf filesystem at /sys/fs/bpf: an agent restart will compare every chunk");
        return None;
    }
    let dir = config_file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Some(RestartConfig {
        // Names on a bpf filesystem cannot contain dots (namespaces never do; servers may).
        pin_dir: PathBuf::from(format!(
            "/sys/fs/bpf/siterecovery/{}_{}",
            config.namespace,
            config.server.replace('.', "_")
        )),
        state_file: dir.join("agent-state.bin"),
    })
}

fn load_config(path: &Path) -> anyhow::Result<AgentConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let config: AgentConfig = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    config.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(config)
}

async fn register(args: RegisterArgs) -> ExitCode {
    let wait = args.wait;
    exit_code(retrying(wait, || try_register(args.clone())).await)
}

async fn renew_now(args: RenewArgs) -> ExitCode {
    let config = match load_config(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = retrying(args.wait, || async {
        let bundle = renew::renew(&config, args.url.as_deref()).await?;
        let expiry = renew::cert_facts(&bundle.client_certificate).map(|c| c.not_after.to_string());
        println!(
            "renewed {}/{}; certificate valid until {}, written to {} (with its key, the CA bundle and the token)",
            config.namespace,
            config.server,
            expiry.unwrap_or_else(|e| e),
            config.client_cert.display(),
        );
        Ok(())
    })
    .await;
    exit_code(result)
}

/// Runs `attempt`, and again while the endpoint is not ready yet (503; nothing was
/// consumed), as it asks, until `wait` seconds run out. Connection and TLS failures
/// are reported at once.
async fn retrying<F, Fut>(wait: u64, mut attempt: F) -> Result<(), RegisterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), RegisterError>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    let mut result = attempt().await;
    while let Err(e @ RegisterError::Refused { status: 503, retry_after, .. }) = &result {
        let pause = std::time::Duration::from_secs(retry_after.unwrap_or(2).clamp(1, 30));
        if std::time::Instant::now() + pause > deadline {
            break;
        }
        eprintln!("{e}; retrying in {} s", pause.as_secs());
        tokio::time::sleep(pause).await;
        result = attempt().await;
    }
    result
}

/// 0 on success; 75 (EX_TEMPFAIL) when a wrapper (systemd, a script) may retry; 1 when
/// something needs a fix.
fn exit_code(result: Result<(), RegisterError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            if let RegisterError::Refused { retry_after: Some(s), .. } = &e
                && e.retryable()
            {
                eprintln!("the endpoint asks to retry in {s} s");
            }
            if e.retryable() { ExitCode::from(75) } else { ExitCode::FAILURE }
        }
    }
}

async fn try_register(args: RegisterArgs) -> Result<(), RegisterError> {
    let local = |e: String| RegisterError::Local(e);
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
    let config = register::write_bundle(&args.out, &bundle, &args.disks, Some(&args.url))?;
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
