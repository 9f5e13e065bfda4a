//! Command-line arguments of `kubectl siterecovery`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

const PLAN_NOTE: &str = "\
Operations run through RecoveryPlans: the API has no per-server failover. For a single
server, make a plan with one group (kubectl apply -f -):

  apiVersion: siterecovery.io/v1alpha1
  kind: RecoveryPlan
  metadata: {name: db-01}
  spec:
    groups: [{name: all, servers: [db-01]}]";

const EXIT_CODES: &str = "\
Exit codes with --wait: 0 succeeded, 1 failed or partially succeeded (or an error),
2 timed out (--timeout), 3 stopped at a manual gate (the approve command is printed).";

/// Disaster recovery of Linux servers to Azure, from kubectl: status, recovery points,
/// agent registration, test failover, failover, commit, reprotect and failback.
///
/// Everything it does is a read or an edit of siterecovery.io resources, so it is also
/// possible with `kubectl apply`.
#[derive(Debug, Parser)]
#[command(name = "kubectl-siterecovery", bin_name = "kubectl siterecovery", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Connection settings, as kubectl's.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where to connect, as kubectl's flags.
#[derive(Debug, Args, Clone, Default)]
pub struct Global {
    /// Namespace of the objects (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// kubeconfig context (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tables of ProtectedServers, RecoveryPlans and FailbackJobs, or one of them in detail.
    Status(StatusArgs),
    /// Every retained recovery point of a server, read from the blob store.
    Points(PointsArgs),
    /// Fetch a server's bootstrap token and print the agent's registration command.
    Register(RegisterArgs),
    /// Recover test copies of a plan's servers in an isolated network; replication goes on.
    #[command(after_help = PLAN_NOTE)]
    TestFailover(TestFailoverArgs),
    /// Remove everything the last test failover of a plan created.
    #[command(after_help = PLAN_NOTE)]
    Cleanup(PlanArgs),
    /// Fail a plan's servers over: unplanned (site down) by default, or --planned.
    #[command(after_help = PLAN_NOTE)]
    Failover(FailoverArgs),
    /// After a failover, re-materialise the servers at another recovery point.
    #[command(after_help = PLAN_NOTE)]
    ChangePoint(ChangePointArgs),
    /// Make a failover final and release older recovery points.
    #[command(after_help = PLAN_NOTE)]
    Commit(PlanArgs),
    /// Approve a manual gate of the plan's current run (`<group>/<action>`).
    Approve(ApproveArgs),
    /// Start the return to on-prem: a FailbackJob that reverse-replicates committed
    /// servers, then waits for `failback` to cut over (or cuts over itself with
    /// --cutover automatic).
    Reprotect(ReprotectArgs),
    /// Cut a FailbackJob over to on-prem (approve it), or create one that goes all the way.
    Failback(FailbackArgs),
    /// Request a resynchronisation of a server by checksum comparison.
    Resync(ResyncArgs),
    /// Print a shell completion script.
    Completion(CompletionArgs),
}

/// Output format of `status` and `points`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Tables.
    #[default]
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A ProtectedServer, RecoveryPlan or FailbackJob (in that order of lookup); all when absent.
    pub name: Option<String>,
    /// Output format; json and yaml print the objects' status.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
    /// List every namespace.
    #[arg(short = 'A', long, conflicts_with = "name")]
    pub all_namespaces: bool,
}

/// `points`.
#[derive(Debug, Args)]
pub struct PointsArgs {
    /// The ProtectedServer.
    pub server: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

/// `register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The ProtectedServer whose agent registers.
    pub server: String,
    /// Directory to write `token` (0600), `ca.crt`, `request.json` and `register.sh` into.
    #[arg(long)]
    pub out: PathBuf,
    /// Registration endpoint, when the token Secret names none (`registrationURL`).
    #[arg(long)]
    pub url: Option<String>,
}

/// Following a long operation.
#[derive(Debug, Args, Clone)]
pub struct WaitArgs {
    /// Follow the operation until it ends or stops at a manual gate (the default).
    #[arg(long, overrides_with = "no_wait")]
    pub wait: bool,
    /// Return as soon as the request is recorded.
    #[arg(long, overrides_with = "wait")]
    pub no_wait: bool,
    /// Give up waiting after this long (`90s`, `30m`, `1h30m`); exit code 2.
    #[arg(long, default_value = "30m", value_parser = parse_timeout)]
    pub timeout: Duration,
}

impl WaitArgs {
    /// Whether to follow the operation.
    pub fn enabled(&self) -> bool {
        !self.no_wait
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    siterecovery_api::common::parse_duration(s)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a duration like 90s, 30m or 1h30m"))
}

/// A plan operation without a recovery point.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The RecoveryPlan.
    pub plan: String,
    /// Id of this run (default: `<operation>-<yyyymmdd-hhmmss>`, UTC).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Replace a run that has not finished yet.
    #[arg(long)]
    pub force: bool,
    /// Waiting.
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Which recovery point to use.
#[derive(Debug, Args, Clone, Default)]
pub struct PointArgs {
    /// `latest` (process pending changes first), `latest-processed` (fastest),
    /// `latest-app`, `latest-group`, or a point id from `kubectl siterecovery points`.
    #[arg(long, value_name = "POINT")]
    pub point: Option<String>,
    /// The latest point at or before this instant (RFC 3339, e.g. 2026-03-01T09:30:00Z).
    #[arg(long, value_name = "TIME", conflicts_with = "point")]
    pub at: Option<String>,
}

/// `test-failover`.
#[derive(Debug, Args)]
pub struct TestFailoverArgs {
    /// The plan.
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Recovery point.
    #[command(flatten)]
    pub point: PointArgs,
}

/// `failover`.
#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// The plan.
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Planned failover: stop the sources, replicate the last changes, zero data loss.
    #[arg(long)]
    pub planned: bool,
    /// With --planned: leave the source servers running (a drill on a site that stays up).
    #[arg(long, requires = "planned")]
    pub skip_source_shutdown: bool,
    /// Recovery point (unplanned failover only).
    #[command(flatten)]
    pub point: PointArgs,
}

/// `change-point`.
#[derive(Debug, Args)]
pub struct ChangePointArgs {
    /// The plan.
    #[command(flatten)]
    pub plan: PlanArgs,
    /// The new recovery point (required: --point or --at).
    #[command(flatten)]
    pub point: PointArgs,
}

/// `approve`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
    /// The RecoveryPlan.
    pub plan: String,
    /// Manual gates to approve, as `<group>/<action>`.
    #[arg(required = true, value_name = "GROUP/ACTION")]
    pub gates: Vec<String>,
    /// Waiting.
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// When a FailbackJob cuts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum CutoverArg {
    /// Wait for `kubectl siterecovery failback JOB`.
    #[default]
    Manual,
    /// As soon as reverse replication is in sync.
    Automatic,
}

/// What a new FailbackJob fails back.
#[derive(Debug, Args, Clone, Default)]
pub struct FailbackSource {
    /// Every server of this RecoveryPlan, in the plan's group order.
    #[arg(long, conflicts_with = "servers")]
    pub plan: Option<String>,
    /// These ProtectedServers (repeat the flag).
    #[arg(long = "server", value_name = "SERVER")]
    pub servers: Vec<String>,
    /// Stay on-prem without forward replication afterwards.
    #[arg(long)]
    pub no_re_enable: bool,
}

/// `reprotect`.
#[derive(Debug, Args)]
pub struct ReprotectArgs {
    /// Name of the FailbackJob (default: the plan's name, or the single server's).
    #[arg(long)]
    pub name: Option<String>,
    /// What to fail back.
    #[command(flatten)]
    pub source: FailbackSource,
    /// When to cut over to on-prem.
    #[arg(long, value_enum, default_value_t)]
    pub cutover: CutoverArg,
    /// Waiting (until reverse replication is in sync).
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `failback`.
#[derive(Debug, Args)]
pub struct FailbackArgs {
    /// The FailbackJob; created (cutting over as soon as in sync) with --plan or --server.
    pub job: String,
    /// What to fail back, when the job does not exist yet.
    #[command(flatten)]
    pub source: FailbackSource,
    /// Waiting.
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `resync`.
#[derive(Debug, Args)]
pub struct ResyncArgs {
    /// The ProtectedServer.
    pub server: String,
    /// Token recorded in `spec.resyncToken` (default: `manual-<yyyymmdd-hhmmss>`).
    #[arg(long)]
    pub token: Option<String>,
    /// Waiting (until the agent reports the resync done).
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// `completion`.
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// Shell.
    pub shell: clap_complete::Shell,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn waiting_is_the_default_and_no_wait_turns_it_off() {
        let cli = Cli::try_parse_from(["k", "commit", "p"]).unwrap();
        let Command::Commit(a) = cli.command else { panic!() };
        assert!(a.wait.enabled());
        assert_eq!(a.wait.timeout, Duration::from_secs(1800));
        let cli = Cli::try_parse_from(["k", "commit", "p", "--no-wait", "--timeout", "90s"]).unwrap();
        let Command::Commit(a) = cli.command else { panic!() };
        assert!(!a.wait.enabled());
        assert_eq!(a.wait.timeout, Duration::from_secs(90));
        assert!(Cli::try_parse_from(["k", "commit", "p", "--timeout", "soon"]).is_err());
    }

    #[test]
    fn point_and_at_exclude_each_other_and_planned_takes_no_shutdown_skip_alone() {
        assert!(Cli::try_parse_from(["k", "test-failover", "p", "--point", "latest", "--at", "x"]).is_err());
        assert!(Cli::try_parse_from(["k", "failover", "p", "--skip-source-shutdown"]).is_err());
        assert!(
            Cli::try_parse_from(["k", "-n", "prod", "failover", "p", "--planned", "--skip-source-shutdown"]).is_ok()
        );
    }
}
