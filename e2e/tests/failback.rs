//! Lifecycle steps 5 and 6, reprotect and failback: after an unplanned failover and commit,
//! the recovered copy gets new writes; a FailbackJob replicates it back onto the original
//! on-prem disks sending only the blocks that differ, cuts over with on-prem equal to the
//! recovered copy byte for byte, and re-enables replication to Azure, which reaches
//! Protected again without a full initial copy.

use std::path::Path;
use std::time::Duration;

use anyhow::ensure;
use kube::api::{Api, PostParams};
use serde_json::json;
use siterecovery_api::plan::RunState;
use siterecovery_api::server::ServerPhase;
use siterecovery_api::{FailbackJob, ProtectedServer, RecoveryPlan};
use siterecovery_e2e::lifecycle::{World, operate, same_content, write_pattern};
use siterecovery_e2e::wait_for;

fn phase(p: &ProtectedServer) -> Option<ServerPhase> {
    p.status.as_ref().and_then(|s| s.phase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprotect_sends_only_differences_and_failback_returns_to_protected() -> anyhow::Result<()> {
    let mut w = World::start("failback", &["db-01"]).await?;
    let r = failback(&mut w).await;
    w.explain(r)
}

async fn failback(w: &mut World) -> anyhow::Result<()> {
    let servers = w.servers_api();
    wait_for(&servers, "db-01", Duration::from_secs(120), "phase Protected", |p| {
        phase(p) == Some(ServerPhase::Protected)
    })
    .await?;
    w.wait_point("db-01", None).await?;

    // The site goes down; fail over and commit.
    w.agents.clear();
    let plans: Api<RecoveryPlan> = Api::namespaced(w.t.admin.clone(), w.ns());
    let plan: RecoveryPlan = serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan", "metadata": {"name": "dr"},
        "spec": {"groups": [{"name": "all", "servers": ["db-01"]}]}
    }))?;
    plans.create(&PostParams::default(), &plan).await?;
    for (op, run) in [("UnplannedFailover", "dr-1"), ("Commit", "dr-2")] {
        operate(&plans, "dr", json!({"type": op, "runId": run, "recoveryPoint": null})).await?;
    }
    let s = wait_for(&servers, "db-01", Duration::from_secs(60), "phase Committed", |p| {
        phase(p) == Some(ServerPhase::Committed)
    })
    .await?;
    let recovered = s.status.and_then(|s| s.failover).map(|f| f.recovered_disks).unwrap_or_default();
    ensure!(recovered.len() == 2, "recovered disks {recovered:?}");

    // The recovered server runs in Azure and writes 1 MiB.
    write_pattern(Path::new(&recovered[0]), 2 * 1024 * 1024, 1024 * 1024, 77)?;

    // Fail back to the original location, cutting over as soon as it is in sync.
    let jobs: Api<FailbackJob> = Api::namespaced(w.t.admin.clone(), w.ns());
    let job: FailbackJob = serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "FailbackJob", "metadata": {"name": "home"},
        "spec": {"servers": ["db-01"], "target": {"location": "OriginalLocation"},
                 "cutover": {"mode": "Automatic"}, "reEnableReplication": true}
    }))?;
    jobs.create(&PostParams::default(), &job).await?;
    let s = wait_for(&servers, "db-01", Duration::from_secs(120), "the cut-over (FailedBack or beyond)", |p| {
        matches!(phase(p), Some(ServerPhase::FailedBack | ServerPhase::InitialReplication | ServerPhase::Protected))
    })
    .await?;
    let st = s.status.unwrap_or_default();
    let reverse = st.reverse_replication.ok_or_else(|| anyhow::anyhow!("no reverseReplication block"))?;
    let total: i64 =
        w.servers[0].disks.iter().map(|(_, p)| std::fs::metadata(p).map(|m| m.len() as i64).unwrap_or(0)).sum();
    let sent = reverse.bytes_sent.unwrap_or(-1);
    ensure!(
        sent > 0 && sent * 4 < total,
        "reprotect must send only the blocks that differ: sent {sent} of {total} bytes"
    );
    for ((disk, onprem), copy) in w.servers[0].disks.iter().zip(&recovered) {
        ensure!(
            same_content(onprem, Path::new(copy))?,
            "{disk}: on-prem differs from the recovered copy after the cut-over"
        );
    }

    // Re-enabled: the agent on-prem comes back, compares with what is stored, sends only
    // what changed in Azure, and the server is Protected again.
    let agent = w.start_agent(0).await?;
    w.agents.push(agent);
    let s = wait_for(&servers, "db-01", Duration::from_secs(180), "Protected again", |p| {
        phase(p) == Some(ServerPhase::Protected)
    })
    .await?;
    let st = s.status.unwrap_or_default();
    ensure!(st.failback.is_some_and(|f| f.state == RunState::Succeeded), "the cut-over block did not succeed");
    let log = std::fs::read_to_string(&w.agents[0].log)?;
    ensure!(!log.contains("reason=InitialCopy"), "re-enabling ran a full initial copy:\n{log}");
    Ok(())
}
