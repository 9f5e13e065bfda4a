//! Lifecycle step 3, test failover of a RecoveryPlan: two groups, a manual gate the test
//! approves; the process server's restore worker materialises each server's disks on its
//! local target, byte for byte equal to the chosen recovery point, while replication goes
//! on; cleanup removes every test disk.

use std::path::Path;
use std::time::Duration;

use anyhow::ensure;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use siterecovery_api::plan::RunState;
use siterecovery_api::server::ServerPhase;
use siterecovery_api::{ProtectedServer, RecoveryPlan};
use siterecovery_e2e::lifecycle::{World, same_content};
use siterecovery_e2e::wait_for;

async fn run(plan: &Api<RecoveryPlan>, operation: serde_json::Value) -> anyhow::Result<()> {
    plan.patch("drill", &PatchParams::default(), &Patch::Merge(&json!({"spec": {"operation": operation}}))).await?;
    Ok(())
}

fn run_state(p: &RecoveryPlan, run_id: &str) -> Option<RunState> {
    let op = p.status.as_ref()?.operation.as_ref()?;
    (op.run_id.as_deref() == Some(run_id)).then_some(op.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_recovers_test_copies_and_cleans_them_up() -> anyhow::Result<()> {
    let w = World::start("tfo", &["db-01", "app-01"]).await?;
    let r = drill(&w).await;
    w.explain(r)
}

async fn drill(w: &World) -> anyhow::Result<()> {
    let servers = w.servers_api();
    for s in &w.servers {
        wait_for(&servers, &s.name, Duration::from_secs(120), "phase Protected", |p: &ProtectedServer| {
            p.status.as_ref().and_then(|s| s.phase) == Some(ServerPhase::Protected)
        })
        .await?;
    }
    let plans: Api<RecoveryPlan> = Api::namespaced(w.t.admin.clone(), w.ns());
    let plan: RecoveryPlan = serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "metadata": {"name": "drill"},
        "spec": {"groups": [
            {"name": "database", "servers": ["db-01"],
             "actions": [{"name": "dba-sign-off", "when": "After", "manualApproval": {"instructions": "check the database"}}]},
            {"name": "app", "servers": ["app-01"]}
        ]}
    }))?;
    plans.create(&PostParams::default(), &plan).await?;

    // The run stops at the gate after the database group; the app group waits.
    run(&plans, json!({"type": "TestFailover", "runId": "drill-1"})).await?;
    wait_for(&plans, "drill", Duration::from_secs(120), "the manual gate", |p: &RecoveryPlan| {
        run_state(p, "drill-1") == Some(RunState::WaitingForApproval)
    })
    .await?;
    let app = servers.get("app-01").await?;
    ensure!(app.status.and_then(|s| s.test_failover).is_none(), "the app group started before the gate was approved");
    run(&plans, json!({"type": "TestFailover", "runId": "drill-1", "approvals": ["database/dba-sign-off"]})).await?;
    wait_for(&plans, "drill", Duration::from_secs(180), "the test failover to succeed", |p: &RecoveryPlan| {
        run_state(p, "drill-1") == Some(RunState::Succeeded)
    })
    .await?;

    // Each test copy equals the recovery point it names, restored independently.
    let mut recovered = Vec::new();
    for (i, s) in w.servers.iter().enumerate() {
        let status = servers.get(&s.name).await?.status.unwrap_or_default();
        ensure!(
            status.phase == Some(ServerPhase::Protected),
            "{}: replication must go on during a test failover",
            s.name
        );
        let tf = status.test_failover.ok_or_else(|| anyhow::anyhow!("{}: no testFailover block", s.name))?;
        let point =
            tf.recovery_point.ok_or_else(|| anyhow::anyhow!("{}: no recovery point in testFailover", s.name))?;
        ensure!(tf.recovered_disks.len() == 2, "{}: recovered {:?}", s.name, tf.recovered_disks);
        let (_, restored) = w.restore(i, &point.id).await?;
        for ((disk, copy), test_copy) in restored.iter().zip(&tf.recovered_disks) {
            ensure!(test_copy.ends_with(&format!("{disk}.img")), "{test_copy}");
            ensure!(
                same_content(copy, Path::new(test_copy))?,
                "{}/{disk}: the test copy differs from point {}",
                s.name,
                point.id
            );
        }
        recovered.extend(tf.recovered_disks);
    }

    // Replication continues: a new point arrives after the drill.
    let last = servers
        .get("db-01")
        .await?
        .status
        .and_then(|s| s.latest_recovery_points)
        .and_then(|l| l.crash_consistent)
        .map(|c| c.id);
    siterecovery_e2e::lifecycle::write_pattern(&w.servers[0].disks[0].1, 4096, 10_000, 99)?;
    w.wait_point("db-01", last.as_deref()).await?;

    // Cleanup removes every test artefact.
    run(&plans, json!({"type": "TestFailoverCleanup", "runId": "drill-1-cleanup"})).await?;
    wait_for(&plans, "drill", Duration::from_secs(120), "the cleanup to succeed", |p: &RecoveryPlan| {
        run_state(p, "drill-1-cleanup") == Some(RunState::Succeeded)
    })
    .await?;
    for path in &recovered {
        ensure!(!Path::new(path).exists(), "{path} is still there after cleanup");
    }
    Ok(())
}
