//! `siterecovery-operator`: the configuration-server role. Elects a leader, then runs
//! one controller per custom resource; serves /metrics, /healthz and /readyz.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use siterecovery_api::{FailbackJob, ProtectedServer, RecoveryPlan, ReplicationPolicy};
use siterecovery_operator::context::Context;
use siterecovery_operator::leader::{LeaderElectionConfig, LeaderElector};
use siterecovery_operator::telemetry::{self, Health, Metrics};
use siterecovery_operator::watch::{Watches, fingerprint};
use siterecovery_operator::{failback, plan, policy, processserver, registration, server};
use tokio::sync::watch as signal_watch;
use tracing::{error, info};

/// How long components may take to finish in-flight work after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(version, about = "Site Recovery operator: orchestrates protection, failover and failback")]
struct Args {
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, env = "SR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SR_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Log format.
    #[arg(long, env = "SR_LOG_FORMAT", value_enum, default_value = "json")]
    log_format: LogFormat,
    /// Turn leader election off (a single replica only).
    #[arg(long, env = "SR_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "siterecovery-system")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "siterecovery-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Reconciles of one kind running at once.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    /// Address of the agent registration endpoint (HTTPS, `POST /register`). Loopback by default.
    #[arg(long, env = "SR_REGISTRATION_ADDR", default_value = "127.0.0.1:9444")]
    registration_addr: SocketAddr,
    /// API server URL handed to registering agents (default: the operator's own).
    #[arg(long, env = "SR_REGISTRATION_API_SERVER")]
    registration_api_server: Option<String>,
    /// Extra DNS names or IPs of the registration endpoint's certificate, comma-separated.
    #[arg(long, env = "SR_REGISTRATION_DNS_NAMES", value_delimiter = ',')]
    registration_dns_names: Vec<String>,
    /// URL agents register at, written next to each bootstrap token for the admin.
    #[arg(long, env = "SR_REGISTRATION_URL")]
    registration_url: Option<String>,
    /// Lifetime of a bootstrap token (e.g. `24h`, `90m`).
    #[arg(long, env = "SR_BOOTSTRAP_TOKEN_TTL", default_value = "24h", value_parser = registration::parse_duration)]
    bootstrap_token_ttl: Duration,
    /// The process-server fleet (image, port, cache volume, sizing).
    #[command(flatten)]
    process_servers: processserver::ProcessServerArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Json,
    Text,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fleet_config = args.process_servers.config(args.namespace.clone())?;
    // Blob storage clients (probes, data deletion): workload identity from the pod's
    // projected token, extra trusted roots from SR_STORAGE_CA_FILE.
    let azure = siterecovery_store::backend::AzureConnector::from_env()
        .map_err(|e| anyhow::anyhow!("storage client configuration: {e}"))?;
    init_tracing(args.log_format);
    let (stop_tx, stop_rx) = signal_watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };

    let metrics = Arc::new(Metrics::new());
    let health = Health::default();
    let http = tokio::spawn(telemetry::serve(args.metrics_addr, metrics.clone(), health.clone(), stopped()));

    let client = Client::try_default().await?;
    let version = client.apiserver_version().await?;
    info!(kubernetes = %version.git_version, "connected to the API server");
    health.set_ready(true);
    let api_server =
        registration::ApiServerInfo::from_config(&kube::Config::infer().await?, args.registration_api_server.clone());
    let mut registration_config = registration::RegistrationConfig::new(&args.lease_namespace, api_server);
    registration_config.watch_namespace = args.namespace.clone();
    registration_config.listen_addr = args.registration_addr;
    registration_config.serving_names.extend(args.registration_dns_names.iter().cloned());
    registration_config.registration_url = args.registration_url.clone();
    registration_config.bootstrap_token_ttl = args.bootstrap_token_ttl;
    registration_config.concurrency = args.concurrency;

    let guard = if args.no_leader_election {
        None
    } else {
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        let elector = LeaderElector::new(
            client.clone(),
            LeaderElectionConfig {
                namespace: args.lease_namespace.clone(),
                lease_name: args.lease_name.clone(),
                identity: identity.clone(),
                lease_duration: Duration::from_secs(15),
                renew_interval: Duration::from_secs(5),
            },
        );
        info!(%identity, lease = %args.lease_name, "waiting to become leader");
        tokio::select! {
            guard = elector.acquire() => Some(guard?),
            _ = stopped() => return Ok(()),
        }
    };
    info!("leading: starting controllers");

    let grace = stopped();
    let controllers = run_controllers(client, metrics, &args, registration_config, fleet_config, azure, stopped);
    // Components finish their in-flight work on shutdown, but never for longer than the
    // grace period (well inside a pod's default 30 s), so the lease is always released.
    let controllers = async move {
        tokio::select! {
            _ = controllers => {}
            _ = async { grace.await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "components still busy after the grace period; stopping anyway");
            }
        }
    };
    let result = match &guard {
        Some(g) => tokio::select! {
            _ = controllers => Ok(()),
            _ = g.lost() => Err(anyhow::anyhow!("lost the leader lease; exiting so a fresh start can compete again")),
        },
        None => {
            controllers.await;
            Ok(())
        }
    };
    if let Some(g) = guard
        && result.is_ok()
    {
        g.release().await?;
        info!("released the leader lease");
    }
    health.set_ready(false);
    let _ = http.await;
    result
}

/// Runs every controller until `stopped` resolves (each finishes its reconciles first).
async fn run_controllers<F, Fut>(
    client: Client,
    metrics: Arc<Metrics>,
    args: &Args,
    registration_config: registration::RegistrationConfig,
    fleet_config: processserver::ProcessServerConfig,
    azure: siterecovery_store::backend::AzureConnector,
    stopped: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    // One watch per kind for everything below (see `watch`).
    let (watches, run_watches) = Watches::new(&client, args.namespace.as_deref());
    let ctx = Context::new(client.clone(), metrics.clone(), watches.clone(), azure);
    let store = ctx.servers.clone();
    let config = ControllerConfig::default().concurrency(args.concurrency).debounce(Duration::from_millis(500));

    // A policy change concerns every server using it, but only a change of what a
    // server's status is derived from (its spec, its readiness, its existence): a new
    // server count in the policy's status must not re-reconcile all its servers.
    let by_policy = store.clone();
    let server_controller = Controller::for_shared_stream(watches.servers.applied(None), store.clone())
        .with_config(config.clone())
        .watches_shared_stream(watches.policies.touched(Some(policy_print)), move |policy: Arc<ReplicationPolicy>| {
            let (ns, name) = (policy.namespace(), policy.name_any());
            by_policy
                .state()
                .iter()
                .filter(|s| s.namespace() == ns && s.spec.policy_ref.name == name)
                .map(|s| ObjectRef::from_obj(s.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stopped())
        .run(server::reconcile, server::error_policy, ctx.clone())
        .for_each(|_| async {});

    // A server that starts or stops using a policy changes its count and its deletion;
    // its status reports do not concern the policy.
    let policy_controller = Controller::for_shared_stream(watches.policies.applied(None), ctx.policies.clone())
        .with_config(config)
        .watches_shared_stream(watches.servers.touched(Some(uses_policy)), |server: Arc<ProtectedServer>| {
            let ns = server.namespace().unwrap_or_default();
            Some(ObjectRef::<ReplicationPolicy>::new(&server.spec.policy_ref.name).within(&ns))
        })
        .graceful_shutdown_on(stopped())
        .run(policy::reconcile, policy::error_policy, ctx.clone())
        .for_each(|_| async {});

    // Plans run Jobs and follow their servers' progress.
    let plans: Api<RecoveryPlan> = scoped(&client, &args.namespace);
    let plan_controller = Controller::new(plans, watcher::Config::default()).with_config(config_for_plans(args));
    let plan_store = plan_controller.store();
    let plan_store_for_jobs = plan_store.clone();
    let plan_controller = plan_controller
        .owns(scoped::<Job>(&client, &args.namespace), watcher::Config::default().labels(plan::PLAN_LABEL))
        .watches_shared_stream(watches.servers.touched(None), move |s: Arc<ProtectedServer>| {
            let (ns, name) = (s.namespace(), s.name_any());
            plan_store
                .state()
                .iter()
                .filter(|p| p.namespace() == ns && p.spec.groups.iter().any(|g| g.servers.contains(&name)))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stopped())
        .run(plan::reconcile, plan::error_policy, ctx.clone())
        .for_each(|_| async {});

    // Failback jobs follow their servers (by name, or through their plan).
    let jobs: Api<FailbackJob> = scoped(&client, &args.namespace);
    let failback_controller = Controller::new(jobs, watcher::Config::default()).with_config(config_for_plans(args));
    let job_store = failback_controller.store();
    let plans_for_jobs = plan_store_for_jobs.clone();
    let failback_controller = failback_controller
        .watches_shared_stream(watches.servers.touched(None), move |s: Arc<ProtectedServer>| {
            let (ns, name) = (s.namespace(), s.name_any());
            let plans = plans_for_jobs.state();
            job_store
                .state()
                .iter()
                .filter(|j| j.namespace() == ns)
                .filter(|j| match (&j.spec.servers, &j.spec.plan_ref) {
                    (Some(servers), _) => servers.contains(&name),
                    (None, Some(plan)) => plans.iter().any(|p| {
                        p.name_any() == plan.name
                            && p.namespace() == ns
                            && p.spec.groups.iter().any(|g| g.servers.contains(&name))
                    }),
                    _ => false,
                })
                .map(|j| ObjectRef::from_obj(j.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(stopped())
        .run(failback::reconcile, failback::error_policy, ctx.clone())
        .for_each(|_| async {});

    // Process servers: a StatefulSet and headless Service per namespace with servers,
    // health from their heartbeat Leases, and every server's status.processServer.
    let process_servers = processserver::run(ctx.clone(), fleet_config, stopped());

    // Agent certificates, bootstrap tokens and the registration endpoint (leader only).
    let registration_run = registration::run(ctx.clone(), registration_config.clone(), stopped());
    let registration_endpoint = async {
        if let Err(e) = registration::serve_registration(ctx.clone(), registration_config, stopped()).await {
            error!(error = %e, "agent registration endpoint stopped");
        }
    };

    let phase_counts = count_phases(store, metrics, stopped());
    // The watches run until the components using them have stopped.
    let stop_watching = stopped();
    let watching = async move {
        tokio::select! {
            () = run_watches => {}
            () = stop_watching => {}
        }
    };
    // Nothing that reads the shared caches starts before they hold their first list
    // (see `watch` on why the stores' own readiness must not be awaited first).
    let watched = ctx.watches.clone();
    let components = async move {
        watched.ready().await;
        tokio::join!(
            logged("ProtectedServer controller", server_controller),
            logged("ReplicationPolicy controller", policy_controller),
            logged("RecoveryPlan controller", plan_controller),
            logged("FailbackJob controller", failback_controller),
            logged("registration controller", registration_run),
            logged("registration endpoint", registration_endpoint),
            logged("process-server fleet", process_servers),
            logged("phase counter", phase_counts),
        );
    };
    tokio::join!(logged("shared watches", watching), components);
}

/// What a server's status is derived from in its policy: the spec and whether the
/// policy is Ready.
fn policy_print(policy: &ReplicationPolicy) -> u64 {
    let ready = policy.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == siterecovery_api::policy::PolicyConditionType::Ready
                && c.status == siterecovery_api::ConditionStatus::True
        })
    });
    fingerprint((policy.metadata.generation, ready, policy.metadata.deletion_timestamp.is_some()))
}

/// What a policy looks at in a server: which policy it uses, and whether it is going.
fn uses_policy(server: &ProtectedServer) -> u64 {
    fingerprint((&server.spec.policy_ref.name, server.metadata.deletion_timestamp.is_some()))
}

/// Runs `part` and logs when it has stopped, so a slow shutdown names what it waits for.
async fn logged(name: &'static str, part: impl std::future::Future<Output = ()>) {
    part.await;
    info!(part = name, "stopped");
}

fn config_for_plans(args: &Args) -> ControllerConfig {
    ControllerConfig::default().concurrency(args.concurrency).debounce(Duration::from_millis(200))
}

/// Publishes the number of servers per phase every 15 s.
async fn count_phases(
    store: kube::runtime::reflector::Store<ProtectedServer>,
    metrics: Arc<Metrics>,
    stopped: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stopped);
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {}
        }
        let mut counts: BTreeMap<String, i64> =
            siterecovery_core::lifecycle::ALL_PHASES.iter().map(|p| (format!("{p:?}"), 0)).collect();
        for s in store.state() {
            let phase = s.status.as_ref().and_then(|st| st.phase).map(|p| format!("{p:?}"));
            *counts.entry(phase.unwrap_or_else(|| "Enabling".into())).or_default() += 1;
        }
        for (phase, count) in counts {
            metrics.set_phase_count(&phase, count);
        }
    }
}

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn default_identity() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| format!("siterecovery-operator-{}", std::process::id()))
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
