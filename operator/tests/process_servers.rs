//! The process-server fleet against the real local API server, running in-process as the
//! Helm chart's operator ServiceAccount: the StatefulSet and headless Service appear
//! sized from the servers, servers are placed evenly and stay put, a pin is honoured,
//! servers move off a process server whose cache fills or whose heartbeat stops, the
//! operator says so in events, stays idle at rest, and removes the fleet after the last
//! server. There is no kubelet: pods never run, health comes only from the heartbeat
//! Leases, written here the way a process server writes them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use siterecovery_api::ProtectedServer;
use siterecovery_api::field_manager::{OPERATOR, PROCESS_SERVER};
use siterecovery_core::assignment::SizingLimits;
use siterecovery_e2e::fixtures::wait_event;
use siterecovery_e2e::operator::operator_client;
use siterecovery_e2e::{TestNamespace, client, install_crds, wait_for, wait_gone};
use siterecovery_operator::context::Context;
use siterecovery_operator::processserver::{
    ASSIGNMENT_MANAGER, BACKLOG_ANNOTATION, CACHE_FREE_ANNOTATION, NAME, ProcessServerConfig, pod_name, run,
};
use siterecovery_operator::telemetry::Metrics;
use siterecovery_operator::watch::Watches;

const WAIT: Duration = Duration::from_secs(30);
const PORT: u16 = 10443;

fn ps(n: u32) -> String {
    pod_name(n)
}

fn server(name: &str, pin: Option<&str>) -> ProtectedServer {
    let mut server = siterecovery_e2e::fixtures::server(name);
    server.spec.process_server = pin.map(str::to_owned);
    server
}

/// A heartbeat as the process server sends it: server-side apply of its Lease.
async fn heartbeat(leases: &Api<Lease>, ordinal: u32, cache_free: &str, renewed_secs_ago: i64) -> anyhow::Result<()> {
    let pod = ps(ordinal);
    let renew = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(renewed_secs_ago);
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": format!("sr-ps-{pod}"),
            "labels": {"app.kubernetes.io/component": "process-server"},
            "annotations": {CACHE_FREE_ANNOTATION: cache_free, BACKLOG_ANNOTATION: "0"}
        },
        "spec": {"holderIdentity": pod, "leaseDurationSeconds": 30,
                 "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()}
    });
    leases.patch(&format!("sr-ps-{pod}"), &PatchParams::apply(PROCESS_SERVER).force(), &Patch::Apply(&lease)).await?;
    Ok(())
}

async fn placement(servers: &Api<ProtectedServer>) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    Ok(servers
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|s| (s.name_any(), s.status.and_then(|st| st.process_server)))
        .collect())
}

fn per_process_server(placed: &BTreeMap<String, Option<String>>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for ps in placed.values().flatten() {
        *counts.entry(ps.clone()).or_default() += 1;
    }
    counts
}

/// Polls `check` every 200 ms until it returns `Some`, or fails after `WAIT` with `what`
/// and the last value seen.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(Option<T>, String)>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (found, seen) = check().await?;
        if let Some(v) = found {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("timed out waiting for {what}; last seen: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_placement<P>(
    servers: &Api<ProtectedServer>,
    what: &str,
    done: P,
) -> anyhow::Result<BTreeMap<String, Option<String>>>
where
    P: Fn(&BTreeMap<String, Option<String>>) -> bool,
{
    eventually(what, || async {
        let placed = placement(servers).await?;
        Ok((done(&placed).then(|| placed.clone()), format!("{placed:?}")))
    })
    .await
}

/// When the operator last changed its fields of the StatefulSet (the controller
/// manager's status updates do not count).
fn our_apply(set: &StatefulSet) -> Option<String> {
    set.managed_fields()
        .iter()
        .find(|m| m.manager.as_deref() == Some(OPERATOR))
        .and_then(|m| m.time.as_ref())
        .map(|t| t.0.to_string())
}

fn passes(metrics: &Metrics) -> u64 {
    metrics
        .render()
        .lines()
        .find(|l| l.starts_with("siterecovery_reconciles_total{kind=\"ProcessServerFleet\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn process_server_fleet_with_chart_rbac() -> anyhow::Result<()> {
    let admin = client().await?;
    install_crds(&admin).await?;
    let op_ns = TestNamespace::create(&admin, "op-ps").await?;
    let ns = TestNamespace::create(&admin, "fleet").await?;

    // The chart's RBAC, and a client that holds nothing else.
    let operator = operator_client(&admin, &op_ns.name).await?;
    let metrics = Arc::new(Metrics::new());
    let (watches, run_watches) = Watches::new(&operator, Some(&ns.name));
    let watching = tokio::spawn(run_watches);
    let ctx = Context::new(
        operator,
        metrics.clone(),
        watches,
        siterecovery_store::backend::AzureConnector::new(Default::default()).map_err(anyhow::Error::msg)?,
    );
    let config = ProcessServerConfig {
        port: PORT,
        cache_size: "1Gi".into(),
        limits: SizingLimits { servers_per_process_server: 2, max_replicas: 4, ..SizingLimits::default() },
        namespace: Some(ns.name.clone()),
        debounce: Duration::from_millis(200),
        cluster_role: Some(format!("{}-process-server", op_ns.name)),
        ..ProcessServerConfig::default()
    };
    let (stop, stopped) = futures::channel::oneshot::channel::<()>();
    let fleet = tokio::spawn(run(ctx, config, async move {
        let _ = stopped.await;
    }));

    let result = scenario(&admin, &ns.name, &metrics).await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), fleet).await??;
    watching.abort();
    result
}

async fn scenario(admin: &Client, ns: &str, metrics: &Metrics) -> anyhow::Result<()> {
    let servers: Api<ProtectedServer> = Api::namespaced(admin.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(admin.clone(), ns);
    let services: Api<Service> = Api::namespaced(admin.clone(), ns);

    // Three servers at two per process server: two replicas, the port, a cache volume,
    // and a headless Service; no owner (they serve every server of the namespace).
    for name in ["s1", "s2", "s3"] {
        servers.create(&PostParams::default(), &server(name, None)).await?;
    }
    let set =
        wait_for(&sets, NAME, WAIT, "2 replicas", |s| s.spec.as_ref().and_then(|s| s.replicas) == Some(2)).await?;
    assert!(set.metadata.owner_references.is_none());
    assert_eq!(set.labels()["app.kubernetes.io/managed-by"], "siterecovery-operator");
    let pod = set.spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(pod.containers[0].ports.clone().unwrap()[0].container_port, i32::from(PORT));
    assert_eq!(pod.containers[0].security_context.clone().unwrap().read_only_root_filesystem, Some(true));
    let claim = &set.spec.clone().unwrap().volume_claim_templates.unwrap()[0];
    let requests = claim.spec.clone().unwrap().resources.unwrap().requests.unwrap();
    assert_eq!(requests["storage"].0, "1Gi");
    let service = services.get(NAME).await?.spec.unwrap();
    assert_eq!(service.cluster_ip.as_deref(), Some("None"));
    // The pods run as an operator-managed ServiceAccount bound to the chart's ClusterRole.
    assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), ns).get(NAME).await?;
    let binding = Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ns).get(NAME).await?;
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert!(binding.role_ref.name.ends_with("-process-server"), "{}", binding.role_ref.name);
    assert_eq!(service.ports.unwrap()[0].port, i32::from(PORT));
    // No process server has reported yet: nobody is assigned, and each server says why.
    wait_event(admin, ns, "s1", "ProcessServerUnassigned", "waiting for the first process server to report").await?;
    assert!(placement(&servers).await?.values().all(Option::is_none));

    // Two process servers report: the three servers spread over both.
    heartbeat(&leases, 0, "80", 0).await?;
    heartbeat(&leases, 1, "80", 0).await?;
    wait_placement(&servers, "s1-s3 spread over 2 process servers", |p| {
        p.values().all(Option::is_some)
            && per_process_server(p).values().copied().max() == Some(2)
            && per_process_server(p).len() == 2
    })
    .await?;
    wait_event(admin, ns, "s1", "ProcessServerAssigned", "assigned to siterecovery-process-server-").await?;
    wait_event(admin, ns, NAME, "ProcessServerRegistered", &format!("{} joined the fleet: Healthy", ps(1))).await?;
    let s1 = servers.get("s1").await?;
    assert!(
        s1.managed_fields().iter().any(|m| m.manager.as_deref() == Some(ASSIGNMENT_MANAGER)),
        "status.processServer has its own field manager"
    );
    // The ProtectedServer reconciler applies its own status fields (forced, under
    // `siterecovery-operator`): the assignment is not its to remove.
    let theirs = json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
                        "status": {"phase": "Enabling", "progression": "waiting for the agent"}});
    servers.patch_status("s1", &PatchParams::apply(OPERATOR).force(), &Patch::Apply(&theirs)).await?;
    let assigned = s1.status.and_then(|s| s.process_server);
    let after = servers.get("s1").await?.status.unwrap_or_default();
    assert_eq!((after.phase.is_some(), after.process_server), (true, assigned));

    // At rest: no passes beyond the ones our own writes cause, nothing rewritten.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, applied) = (passes(metrics), our_apply(&sets.get(NAME).await?));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(before > 0, "passes are counted");
    assert!(passes(metrics) <= before + 1, "idle passes: {} → {}", before, passes(metrics));
    assert_eq!(our_apply(&sets.get(NAME).await?), applied, "the StatefulSet is not rewritten at rest");

    // A fourth server joins the less loaded process server; the others stay (sticky).
    servers.create(&PostParams::default(), &server("s4", None)).await?;
    let placed = wait_placement(&servers, "s4 placed", |p| p["s4"].is_some()).await?;
    assert_eq!(per_process_server(&placed).values().copied().collect::<Vec<_>>(), [2, 2], "{placed:?}");
    // A fifth, pinned to process server 1, goes there although it is full; five servers
    // need three replicas.
    servers.create(&PostParams::default(), &server("s5", Some(&ps(1)))).await?;
    let pinned = wait_placement(&servers, "s5 placed", |p| p["s5"].is_some()).await?;
    assert_eq!(pinned["s5"].as_deref(), Some(ps(1).as_str()), "pin honoured");
    for name in ["s1", "s2", "s3", "s4"] {
        assert_eq!(pinned[name], placed[name], "{name} stays where it was");
    }
    wait_event(admin, ns, "s5", "ProcessServerAssigned", "(pinned by spec.processServer)").await?;
    wait_for(&sets, NAME, WAIT, "3 replicas", |s| s.spec.as_ref().and_then(|s| s.replicas) == Some(3)).await?;

    // The third process server reports: the server the pin squeezed off process server 1
    // moves there; process server 0 keeps its two.
    heartbeat(&leases, 2, "80", 0).await?;
    let squeezed: Vec<String> = pinned
        .iter()
        .filter(|(s, p)| *s != "s5" && p.as_deref() == Some(ps(1).as_str()))
        .map(|(s, _)| s.clone())
        .collect();
    let placed = wait_placement(&servers, "one server off the over-full ps-1", |p| {
        squeezed.iter().filter(|s| p[*s].as_deref() == Some(ps(2).as_str())).count() == 1
    })
    .await?;
    let on_zero: Vec<String> =
        placed.iter().filter(|(_, p)| p.as_deref() == Some(ps(0).as_str())).map(|(s, _)| s.clone()).collect();
    assert_eq!(on_zero.len(), 2, "{placed:?}");
    let moved = squeezed.iter().find(|s| placed[*s].as_deref() == Some(ps(2).as_str())).unwrap();
    wait_event(admin, ns, moved, "ProcessServerReassigned", "is over capacity").await?;

    // The cache of process server 0 fills (Critical): one of its servers moves to
    // process server 2, the last with room; the other cannot be placed, and says so.
    heartbeat(&leases, 0, "10", 0).await?;
    let placed = wait_placement(&servers, "servers off Critical ps-0", |p| {
        on_zero.iter().all(|s| p[s].as_deref() != Some(ps(0).as_str()))
    })
    .await?;
    let (first, second) = (&on_zero[0], &on_zero[1]);
    assert_eq!(placed[first].as_deref(), Some(ps(2).as_str()), "{placed:?}");
    assert_eq!(placed[second], None, "{placed:?}");
    wait_event(admin, ns, first, "ProcessServerReassigned", "is Critical: cache free space 10.0% is below 25%").await?;
    wait_event(admin, ns, second, "ProcessServerUnassigned", "and no other process server has room").await?;
    wait_event(admin, ns, NAME, "ProcessServerCritical", &format!("{} is Critical: cache free space 10.0%", ps(0)))
        .await?;
    // A spare replaces the Critical one's capacity (within the 4-replica limit); once it
    // reports, the unplaced server goes there.
    wait_for(&sets, NAME, WAIT, "a spare", |s| s.spec.as_ref().and_then(|s| s.replicas) == Some(4)).await?;
    heartbeat(&leases, 3, "80", 0).await?;
    wait_placement(&servers, "the spare takes the unplaced server", |p| p[second].as_deref() == Some(ps(3).as_str()))
        .await?;

    // Process server 0 recovers: the spare is drained (its server moves back) and goes.
    heartbeat(&leases, 0, "80", 0).await?;
    wait_event(admin, ns, NAME, "ProcessServerHealthy", &format!("{} is Healthy again", ps(0))).await?;
    wait_placement(&servers, "spare drained", |p| p[second].as_deref() == Some(ps(0).as_str())).await?;
    wait_event(admin, ns, second, "ProcessServerReassigned", "is drained before the fleet scales down to 3").await?;
    wait_for(&sets, NAME, WAIT, "spare removed", |s| s.spec.as_ref().and_then(|s| s.replicas) == Some(3)).await?;
    wait_event(admin, ns, NAME, "Scaled", "4 → 3 process servers").await?;

    // Process server 2 stops reporting (last heartbeat 20 minutes ago): its servers move.
    let on_two: Vec<String> = placement(&servers)
        .await?
        .into_iter()
        .filter(|(_, p)| p.as_deref() == Some(ps(2).as_str()))
        .map(|(s, _)| s)
        .collect();
    assert_eq!(on_two.len(), 2, "{on_two:?}");
    heartbeat(&leases, 2, "80", 20 * 60).await?;
    wait_placement(&servers, "servers off silent ps-2", |p| {
        on_two.iter().all(|s| p[s].as_ref().is_some_and(|ps2| *ps2 != ps(2)))
    })
    .await?;
    wait_event(admin, ns, &on_two[0], "ProcessServerReassigned", "last heartbeat 20m").await?;
    wait_event(admin, ns, NAME, "ProcessServerCritical", "is older than 15m").await?;

    // The last server gone and nothing left to upload, the fleet goes.
    for name in ["s1", "s2", "s3", "s4", "s5"] {
        servers.delete(name, &DeleteParams::default()).await?;
    }
    wait_gone(&sets, NAME, WAIT).await?;
    wait_gone(&services, NAME, WAIT).await?;
    wait_gone(&Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), ns), NAME, WAIT).await?;
    Ok(())
}
