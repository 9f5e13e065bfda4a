//! Lifecycle step 4, unplanned failover: the policy asks for app-consistent points (the
//! agent runs the application's pre/post hooks around them), the site goes down (agents
//! stop), a plan fails over to the latest app-consistent point, changes to an earlier point
//! once, then commits. The recovered disks equal the chosen point byte for byte each time,
//! and the app-consistent one holds what the pre-hook wrote.

use std::path::Path;
use std::time::Duration;

use anyhow::ensure;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use siterecovery_api::plan::RunState;
use siterecovery_api::server::ServerPhase;
use siterecovery_api::{ProtectedServer, RecoveryPlan, ReplicationPolicy};
use siterecovery_e2e::lifecycle::{World, operate, same_content, write_pattern};
use siterecovery_e2e::wait_for;

/// Checks the failed-over disks of server `i` equal its point, and returns the point id.
async fn check_recovered(w: &World, i: usize) -> anyhow::Result<String> {
    let s = &w.servers[i];
    let status = w.servers_api().get(&s.name).await?.status.unwrap_or_default();
    let f = status.failover.ok_or_else(|| anyhow::anyhow!("{}: no failover block", s.name))?;
    let point = f.recovery_point.ok_or_else(|| anyhow::anyhow!("{}: failover without recovery point", s.name))?;
    let (_, restored) = w.restore(i, &point.id).await?;
    ensure!(f.recovered_disks.len() == restored.len(), "{}: recovered {:?}", s.name, f.recovered_disks);
    for ((disk, copy), recovered) in restored.iter().zip(&f.recovered_disks) {
        ensure!(
            same_content(copy, Path::new(recovered))?,
            "{}/{disk}: the recovered disk differs from point {}",
            s.name,
            point.id
        );
    }
    Ok(point.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplanned_failover_change_point_and_commit() -> anyhow::Result<()> {
    let mut w = World::start("failover", &["db-01"]).await?;
    let r = failover(&mut w).await;
    w.explain(r)
}

async fn failover(w: &mut World) -> anyhow::Result<()> {
    let servers = w.servers_api();
    wait_for(&servers, "db-01", Duration::from_secs(120), "phase Protected", |p: &ProtectedServer| {
        p.status.as_ref().and_then(|s| s.phase) == Some(ServerPhase::Protected)
    })
    .await?;
    // Two generations of data, each with its own point.
    let first = w.wait_point("db-01", None).await?;
    write_pattern(&w.servers[0].disks[0].1, MIB_2, 300_000, 42)?;
    let second = w.wait_point("db-01", Some(&first)).await?;

    // App-consistent points: the policy's interval, the application's hooks on the server.
    // The pre-hook flushes the "application" (writes a marker into its disk).
    let policies: Api<ReplicationPolicy> = Api::namespaced(w.t.admin.clone(), w.ns());
    let pp = PatchParams::default();
    policies.patch("gold", &pp, &Patch::Merge(&json!({"spec": {"appConsistentInterval": "10s"}}))).await?;
    let os = w.servers[0].disks[0].1.clone();
    let flush = format!("printf FLUSHED-BY-PRE-HOOK | dd of={} bs=1 seek={MARKER_AT} conv=notrunc", os.display());
    // The hooks live on the server: restart its agent with them. The policy change itself
    // reaches the running session (settings from the process server, within about a minute).
    w.agents.clear();
    let config = w.dir.0.join("agent-db-01").join("agent.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&config)?)?;
    c["appConsistency"] = json!({"preHook": ["sh", "-c", flush], "postHook": ["true"]});
    std::fs::write(&config, serde_json::to_vec_pretty(&c)?)?;
    let agent = w.start_agent(0).await?;
    w.agents.push(agent);
    let app =
        wait_for(&servers, "db-01", Duration::from_secs(120), "an app-consistent point", |p: &ProtectedServer| {
            p.status
                .as_ref()
                .and_then(|s| s.latest_recovery_points.as_ref())
                .and_then(|l| l.app_consistent.as_ref())
                .is_some_and(|a| a.id.as_str() > second.as_str())
        })
        .await?;
    let app = app.status.and_then(|s| s.latest_recovery_points).and_then(|l| l.app_consistent).expect("waited for");
    // Newer crash-consistent points follow: the failover must still pick the app one.
    write_pattern(&os, MIB_2 + 400_000, 100_000, 43)?;
    let newer = w.wait_point("db-01", Some(&app.id)).await?;

    // The site goes down.
    w.agents.clear();
    let plans: Api<RecoveryPlan> = Api::namespaced(w.t.admin.clone(), w.ns());
    let plan: RecoveryPlan = serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "metadata": {"name": "dr"},
        "spec": {"groups": [{"name": "all", "servers": ["db-01"]}]}
    }))?;
    plans.create(&PostParams::default(), &plan).await?;

    operate(
        &plans,
        "dr",
        json!({"type": "UnplannedFailover", "runId": "dr-1", "recoveryPoint": {"selector": "LatestAppConsistent"}}),
    )
    .await?;
    let s = wait_for(&servers, "db-01", Duration::from_secs(60), "phase FailedOver", |p: &ProtectedServer| {
        p.status.as_ref().and_then(|s| s.phase) == Some(ServerPhase::FailedOver)
    })
    .await?;
    let chosen = check_recovered(w, 0).await?;
    ensure!(chosen >= app.id && chosen < newer, "failed over to {chosen}, not the latest app-consistent point");
    let store = w.store().await?;
    let server = siterecovery_store::ServerRef::new(w.ns(), "db-01")?;
    let m = store.load_point(&server, &chosen).await?;
    ensure!(m.kind == siterecovery_store::PointKind::App, "{chosen} is a {:?} point", m.kind);
    let (_, restored) = w.restore(0, &chosen).await?;
    let disk = std::fs::read(&restored[0].1)?;
    ensure!(
        disk[MARKER_AT as usize..].starts_with(b"FLUSHED-BY-PRE-HOOK"),
        "the app-consistent point lacks what the pre-hook wrote"
    );
    ensure!(s.status.and_then(|s| s.failover).is_some_and(|f| f.state == RunState::Succeeded));

    // Change the recovery point once, to the first one.
    operate(&plans, "dr", json!({"type": "ChangeRecoveryPoint", "runId": "dr-2", "recoveryPoint": {"selector": "Named", "pointName": first}})).await?;
    wait_for(&servers, "db-01", Duration::from_secs(60), "FailedOver at the first point", |p: &ProtectedServer| {
        let st = p.status.as_ref();
        st.and_then(|s| s.phase) == Some(ServerPhase::FailedOver)
            && st
                .and_then(|s| s.failover.as_ref())
                .and_then(|f| f.recovery_point.as_ref())
                .is_some_and(|rp| rp.id == first)
    })
    .await?;
    ensure!(check_recovered(w, 0).await? == first);

    // Commit makes it final.
    // A merge patch keeps fields it does not name: clear the previous recovery point.
    operate(&plans, "dr", json!({"type": "Commit", "runId": "dr-3", "recoveryPoint": null})).await?;
    wait_for(&servers, "db-01", Duration::from_secs(60), "phase Committed", |p: &ProtectedServer| {
        p.status.as_ref().and_then(|s| s.phase) == Some(ServerPhase::Committed)
    })
    .await?;
    Ok(())
}

const MIB_2: u64 = 2 * 1024 * 1024;
/// Where the pre-hook writes its marker in the `os` disk.
const MARKER_AT: u64 = 5 * 1024 * 1024;
