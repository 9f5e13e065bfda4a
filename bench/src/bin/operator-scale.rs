//! `operator-scale`: how the operator copes with a large estate, against the cluster in
//! `KUBECONFIG` (`make bench` starts a private one).
//!
//! It runs the operator binary (a release build) as the Helm chart's ServiceAccount,
//! creates policies and servers spread across them, plays every agent and the process
//! server, and measures the time until every server is `Protected` with `Ready=True`,
//! the reconciles per object while nothing changes (a hot loop shows here), and the
//! operator's peak resident memory. Prints a table and writes
//! `target/bench/operator-scale.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use siterecovery_api::policy::PolicyConditionType;
use siterecovery_api::{ConditionStatus, ProtectedServer, ReplicationPolicy};
use siterecovery_bench::fleet::{self, bounded, wait_all};
use siterecovery_bench::metrics::{load_average, proc_status_kib, samples, sum_where};
use siterecovery_bench::oplog;
use siterecovery_bench::report::{self, Goal, Row};
use siterecovery_e2e::operator::OperatorProcess;
use siterecovery_e2e::{TestNamespace, fixtures, install_crds, repo_root};
use tokio::time::Instant;

const RECONCILES: &str = "siterecovery_reconciles_total";
const ERRORS: &str = "siterecovery_reconcile_errors_total";

#[derive(Parser, Debug)]
#[command(about = "Scale benchmark of the operator: steady state, reconciles at rest, peak RSS")]
struct Args {
    /// The operator binary (default: target/release/siterecovery-operator).
    #[arg(long)]
    operator_bin: Option<PathBuf>,
    /// ProtectedServers to create.
    #[arg(long, default_value_t = 1000)]
    servers: usize,
    /// ReplicationPolicies the servers are spread across.
    #[arg(long, default_value_t = 10)]
    policies: usize,
    /// Creations and reports in flight at once.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    /// Seconds between reaching the steady state and opening the window at rest.
    #[arg(long, default_value_t = 10)]
    settle: u64,
    /// Length of the window at rest, in seconds.
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// Give up waiting on a stage after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// The policies' RPO alert threshold (long enough that no alert fires mid-run).
    #[arg(long, default_value = "15m")]
    rpo_threshold: String,
    /// Where to write the JSON results (default: target/bench/operator-scale.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// What a run measured; `None` for a stage it did not reach.
#[derive(Debug, Default)]
struct Figures {
    create: Option<f64>,
    enrol: Option<f64>,
    report: Option<f64>,
    steady_state: Option<f64>,
    end_to_end: Option<f64>,
    onboarding_reconciles: Option<f64>,
    server_reconciles_at_rest: Option<f64>,
    policy_reconciles_at_rest: Option<f64>,
    server_writes_at_rest: Option<f64>,
    cluster_writes_at_rest: Option<f64>,
    errors_at_rest: Option<f64>,
    errors_total: Option<f64>,
    peak_rss: Option<f64>,
    rss_at_rest: Option<f64>,
    teardown: Option<f64>,
    errors_by_reason: BTreeMap<String, f64>,
    heartbeats_expired_in_window: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = args.operator_bin.clone().unwrap_or_else(|| repo_root().join("target/release/siterecovery-operator"));
    ensure!(
        binary.exists(),
        "{} not found: build it with `cargo build --release -p siterecovery-operator`",
        binary.display()
    );
    let out = args.out.clone().unwrap_or_else(|| repo_root().join("target/bench/operator-scale.json"));
    let load_before = load_average();
    let source = source_revision();

    let admin = siterecovery_e2e::client().await?;
    install_crds(&admin).await?;
    let op_ns = TestNamespace::create(&admin, "bench-op").await?;
    let ns = TestNamespace::create(&admin, "bench").await?;
    let operator = OperatorProcess::start(&admin, &binary, &op_ns.name, &ns.name).await?;
    eprintln!(
        "[bench] operator pid {} in {}, watching {}; log {}",
        operator.pid(),
        op_ns.name,
        ns.name,
        operator.log.display()
    );

    let mut figures = Figures::default();
    let outcome = run(&admin, &ns.name, &operator, &args, &mut figures).await;
    let log_copy = out.with_file_name("operator-scale.operator.log");
    std::fs::create_dir_all(log_copy.parent().expect("a file has a directory"))?;
    std::fs::copy(&operator.log, &log_copy)
        .with_context(|| format!("keeping the operator log as {}", log_copy.display()))?;
    drop(operator);
    delete_namespaces(&admin, [&op_ns.name, &ns.name]).await;

    let rows = rows(&figures);
    let context = json!({
        "date": jiff::Timestamp::now().to_string(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": mem_total_gib(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "servers": args.servers, "policies": args.policies, "in_flight": args.in_flight,
        "settle_s": args.settle, "window_s": args.window, "rpo_threshold": args.rpo_threshold,
        "operator_bin": binary.display().to_string(),
        "source": source,
        "reconcile_errors_by_kind_reason": figures.errors_by_reason,
        "heartbeats_expired_in_window": figures.heartbeats_expired_in_window,
        "outcome": outcome.as_ref().map(|()| "completed".to_owned()).unwrap_or_else(|e| format!("{e:#}")),
    });
    println!("\noperator scale: {} servers across {} policies\n", args.servers, args.policies);
    print!("{}", report::table(&rows));
    println!("\nload average before/after: {load_before} / {}", load_average());
    for (series, count) in &figures.errors_by_reason {
        println!("reconcile errors {series}: {count}");
    }
    println!("{}", oplog::summary(&std::fs::read_to_string(&log_copy).unwrap_or_default(), 8));
    report::write_json(&out, &report::json("operator-scale", context, &rows))?;
    println!("wrote {} (operator log: {})", out.display(), log_copy.display());
    outcome
}

/// The measurement itself; fills `figures` as it goes so a failed stage still reports
/// the ones before it.
async fn run(
    admin: &Client,
    ns: &str,
    operator: &OperatorProcess,
    args: &Args,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.timeout);
    let servers: Api<ProtectedServer> = Api::namespaced(admin.clone(), ns);
    let policies: Api<ReplicationPolicy> = Api::namespaced(admin.clone(), ns);
    let n = args.servers;

    // Policies Ready also proves the operator leads and its controllers run.
    Api::<Secret>::namespaced(admin.clone(), ns).create(&PostParams::default(), &fixtures::sas_secret()).await?;
    for i in 0..args.policies {
        policies.create(&PostParams::default(), &fleet::policy(&fleet::policy_name(i), &args.rpo_threshold)?).await?;
    }
    for i in 0..args.policies {
        siterecovery_e2e::wait_for(&policies, &fleet::policy_name(i), timeout, "Ready", |p| {
            p.status
                .as_ref()
                .and_then(|s| fixtures::condition(&s.conditions, PolicyConditionType::Ready))
                .is_some_and(|(s, _, _)| s == ConditionStatus::True)
        })
        .await?;
    }
    let baseline = scrape(operator).await?;

    eprintln!("[bench] creating {n} servers, {} in flight", args.in_flight);
    let created = Instant::now();
    let policy_count = args.policies.max(1);
    figures.create = Some(
        bounded(n, args.in_flight, |i| {
            let servers = servers.clone();
            async move {
                let server = fleet::server(&fleet::server_name(i), &fleet::policy_name(i % policy_count));
                servers.create(&PostParams::default(), &server).await?;
                Ok(())
            }
        })
        .await?
        .as_secs_f64(),
    );
    // The agents report once their identity exists, as real agents would.
    figures.enrol = Some(wait_all(servers.clone(), n, created, timeout, fleet::enrolled).await?.as_secs_f64());

    eprintln!("[bench] reporting initial sync done and a recovery point for every server");
    let reported = Instant::now();
    figures.report = Some(
        bounded(n, args.in_flight, |i| {
            let servers = servers.clone();
            async move { fixtures::report_protected(&servers, &fleet::server_name(i)).await }
        })
        .await?
        .as_secs_f64(),
    );
    let steady = wait_all(servers.clone(), n, reported, timeout, fleet::protected_and_ready).await?;
    figures.steady_state = Some(steady.as_secs_f64());
    figures.end_to_end = Some(created.elapsed().as_secs_f64());
    let at_steady = scrape(operator).await?;
    figures.onboarding_reconciles = Some(kind_delta(&baseline, &at_steady, "ProtectedServer") / n as f64);
    eprintln!(
        "[bench] steady state after {:.1}s; settling {}s, then {}s at rest",
        steady.as_secs_f64(),
        args.settle,
        args.window
    );

    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let window = Duration::from_secs(args.window);
    let heartbeats_expire = reported + siterecovery_operator::server::HEARTBEAT_TIMEOUT;
    figures.heartbeats_expired_in_window = Instant::now() + window > heartbeats_expire;
    if figures.heartbeats_expired_in_window {
        eprintln!("[bench] warning: agent heartbeats expire inside the window; its reconciles include those expiries");
    }
    let per_minute = 60.0 / window.as_secs_f64();
    let (before, revision_before) = (scrape(operator).await?, cluster_revision(&servers).await?);
    let writes = fleet::count_writes(admin.clone(), ns, Instant::now() + window).await?;
    let (after, revision_after) = (scrape(operator).await?, cluster_revision(&servers).await?);
    figures.server_reconciles_at_rest = Some(kind_delta(&before, &after, "ProtectedServer") / n as f64 * per_minute);
    figures.policy_reconciles_at_rest =
        Some(kind_delta(&before, &after, "ReplicationPolicy") / policy_count as f64 * per_minute);
    figures.server_writes_at_rest = Some(writes as f64 / n as f64 * per_minute);
    figures.cluster_writes_at_rest = Some(revision_after.saturating_sub(revision_before) as f64 * per_minute);
    figures.errors_at_rest = Some(total(&after, ERRORS) - total(&before, ERRORS));
    figures.errors_total = Some(total(&after, ERRORS));
    figures.errors_by_reason = samples(&after, ERRORS)
        .into_iter()
        .map(|s| (format!("{}/{}", s.label("kind").unwrap_or("?"), s.label("reason").unwrap_or("?")), s.value))
        .collect();
    figures.peak_rss = Some(proc_status_kib(operator.pid(), "VmHWM")? as f64 / 1024.0);
    figures.rss_at_rest = Some(proc_status_kib(operator.pid(), "VmRSS")? as f64 / 1024.0);

    // Deleting the estate runs every server's cleanup through the operator's finalizer.
    eprintln!("[bench] deleting the servers");
    let deleting = Instant::now();
    servers.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    while !servers.list_metadata(&ListParams::default().limit(1)).await?.items.is_empty() {
        ensure!(deleting.elapsed() < timeout, "servers still exist {timeout:?} after deleting them");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    figures.teardown = Some(deleting.elapsed().as_secs_f64());
    policies.delete_collection(&DeleteParams::default(), &ListParams::default()).await?;
    while !policies.list_metadata(&ListParams::default().limit(1)).await?.items.is_empty() {
        ensure!(deleting.elapsed() < 2 * timeout, "policies still exist after their servers went");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

fn rows(f: &Figures) -> Vec<Row> {
    vec![
        Row::info("create_servers", f.create, "s"),
        Row::info("enrol_all_servers", f.enrol, "s"),
        Row::info("report_all_servers", f.report, "s"),
        Row::goal("steady_state", f.steady_state, "s", Goal::AtMost(60.0)),
        Row::info("end_to_end", f.end_to_end, "s"),
        Row::info("onboarding_reconciles_per_server", f.onboarding_reconciles, "1/object"),
        Row::goal("server_reconciles_at_rest", f.server_reconciles_at_rest, "1/object/min", Goal::Below(1.0)),
        Row::goal("policy_reconciles_at_rest", f.policy_reconciles_at_rest, "1/object/min", Goal::Below(1.0)),
        Row::info("server_writes_at_rest", f.server_writes_at_rest, "1/object/min"),
        Row::info("cluster_writes_at_rest", f.cluster_writes_at_rest, "1/min"),
        Row::info("reconcile_errors_at_rest", f.errors_at_rest, "count"),
        Row::info("reconcile_errors_total", f.errors_total, "count"),
        Row::goal("peak_rss", f.peak_rss, "MiB", Goal::AtMost(150.0)),
        Row::info("rss_at_rest", f.rss_at_rest, "MiB"),
        Row::info("delete_all_servers", f.teardown, "s"),
    ]
}

async fn scrape(operator: &OperatorProcess) -> anyhow::Result<String> {
    let (status, body) = operator.http_get("/metrics").await?;
    ensure!(status == 200, "GET /metrics answered {status}");
    Ok(body)
}

fn kind_delta(before: &str, after: &str, kind: &str) -> f64 {
    sum_where(after, RECONCILES, "kind", kind) - sum_where(before, RECONCILES, "kind", kind)
}

fn total(text: &str, metric: &str) -> f64 {
    samples(text, metric).iter().map(|s| s.value).sum()
}

/// The cluster's current resourceVersion (the etcd revision: it grows by one per write
/// anywhere in the cluster).
async fn cluster_revision(api: &Api<ProtectedServer>) -> anyhow::Result<u64> {
    let list = api.list_metadata(&ListParams::default().limit(1)).await?;
    list.metadata.resource_version.as_deref().unwrap_or_default().parse().context("a numeric resourceVersion")
}

/// Deletes the run's namespaces (the namespace controller finishes the job), so a run
/// against a long-lived cluster leaves nothing behind. After a failed run, servers still
/// holding the operator's finalizer keep their namespace Terminating; a private
/// `make bench` cluster is removed anyway.
async fn delete_namespaces(admin: &Client, names: [&str; 2]) {
    let api: Api<Namespace> = Api::all(admin.clone());
    for name in names {
        let _ = api.delete(name, &DeleteParams::background()).await;
    }
}

fn mem_total_gib() -> f64 {
    let kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().trim_end_matches("kB").trim().to_owned()))
        })
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0
}

/// The commit the operator was built from, and whether operator sources had local
/// changes (other work in progress in the same tree changes what is measured).
fn source_revision() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(repo_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    match git(&["status", "--porcelain", "--", "operator", "crates"]) {
        Some(changes) if !changes.is_empty() => {
            format!("{head} + {} uncommitted change(s) in operator/ and crates/", changes.lines().count())
        }
        _ => head,
    }
}
