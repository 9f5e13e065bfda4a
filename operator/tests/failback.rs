//! FailbackJobs against the real API server, with the operator as the chart's
//! ServiceAccount: refused before failover and commit; then reprotect → manual cut-over
//! approval → failover to on-prem → re-enable, with the on-prem agent and restore
//! worker played by the test the way they will report.

use std::path::Path;
use std::time::Duration;

use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use siterecovery_api::failback::{FailbackConditionType as FC, FailbackStep};
use siterecovery_api::plan::RunState;
use siterecovery_api::{ConditionStatus, FailbackJob, KstatusConditions as _, ProtectedServer, ServerPhase};
use siterecovery_e2e::fixtures::{ago, condition, policy, report_protected, sas_secret, server};
use siterecovery_e2e::operator::OperatorTest;
use siterecovery_e2e::wait_for;

const WAIT: Duration = Duration::from_secs(30);

fn job(servers: &[&str]) -> FailbackJob {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "FailbackJob", "metadata": {"name": "home"},
        "spec": {"servers": servers, "target": {"location": "OriginalLocation"}, "cutover": {"mode": "Manual"}}
    }))
    .expect("valid job")
}

fn phase_is(phase: ServerPhase) -> impl Fn(&ProtectedServer) -> bool {
    move |s| s.status.as_ref().and_then(|st| st.phase) == Some(phase)
}

/// The on-prem side completes a requested block (reverseReplication or failback).
async fn on_prem_completes(
    servers: &Api<ProtectedServer>,
    name: &str,
    block: &str,
    bytes_sent: i64,
) -> anyhow::Result<()> {
    wait_for(servers, name, WAIT, &format!("{block} requested"), |s| {
        serde_json::to_value(s.status.clone().unwrap_or_default()).unwrap_or_default()[block]["state"] == "Pending"
    })
    .await?;
    let patch = json!({"status": {block: {"state": "Succeeded", "bytesSent": bytes_sent, "completionTime": ago(0)}}});
    servers.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(())
}

/// Moves a Protected server to Committed the way a plan and the restore worker would.
async fn fail_over_and_commit(servers: &Api<ProtectedServer>, name: &str) -> anyhow::Result<()> {
    let failover = json!({"status": {"phase": "FailingOver", "failover": {
        "operation": "UnplannedFailover", "run": "manual/dr", "state": "Succeeded", "completionTime": ago(0)}}});
    servers.patch_status(name, &PatchParams::default(), &Patch::Merge(&failover)).await?;
    wait_for(servers, name, WAIT, "FailedOver", phase_is(ServerPhase::FailedOver)).await?;
    let commit = json!({"status": {"phase": "Committed"}});
    servers.patch_status(name, &PatchParams::default(), &Patch::Merge(&commit)).await?;
    Ok(())
}

#[tokio::test]
async fn failback_reprotects_cuts_over_on_approval_and_re_enables() -> anyhow::Result<()> {
    let t = OperatorTest::start(Path::new(env!("CARGO_BIN_EXE_siterecovery-operator")), "failback").await?;
    t.explain(scenario(&t.admin, &t.ns.name).await)
}

async fn scenario(admin: &Client, ns: &str) -> anyhow::Result<()> {
    let servers: Api<ProtectedServer> = Api::namespaced(admin.clone(), ns);
    let jobs: Api<FailbackJob> = Api::namespaced(admin.clone(), ns);
    Api::namespaced(admin.clone(), ns).create(&PostParams::default(), &sas_secret()).await?;
    Api::namespaced(admin.clone(), ns).create(&PostParams::default(), &policy("gold")).await?;
    let names = ["db-01", "web-01"];
    for name in names {
        servers.create(&PostParams::default(), &server(name)).await?;
        wait_for(&servers, name, WAIT, "Enabling", |s| s.status.as_ref().and_then(|st| st.phase).is_some()).await?;
        report_protected(&servers, name).await?;
        wait_for(&servers, name, WAIT, "Protected", phase_is(ServerPhase::Protected)).await?;
    }

    // Failback before failover is refused, naming the server and its phase.
    jobs.create(&PostParams::default(), &job(&names)).await?;
    wait_for(&jobs, "home", WAIT, "refused", |j| {
        j.status.as_ref().and_then(|s| condition(&s.conditions, FC::STALLED)).is_some_and(|(s, r, m)| {
            s == ConditionStatus::True && r == "NotFailedOver" && m.contains("db-01 is Protected")
        })
    })
    .await?;
    assert_eq!(servers.get("db-01").await?.status.unwrap().phase, Some(ServerPhase::Protected), "nothing moved");

    // Once both are failed over and committed, reprotect starts for both.
    for name in names {
        fail_over_and_commit(&servers, name).await?;
    }
    for name in names {
        wait_for(&servers, name, WAIT, "Reprotecting", phase_is(ServerPhase::Reprotecting)).await?;
        on_prem_completes(&servers, name, "reverseReplication", 65_536).await?;
        wait_for(&servers, name, WAIT, "ReverseProtected", phase_is(ServerPhase::ReverseProtected)).await?;
    }
    let waiting = wait_for(&jobs, "home", WAIT, "waiting for cut-over", |j| {
        j.status.as_ref().and_then(|s| s.state) == Some(RunState::WaitingForApproval)
    })
    .await?;
    let st = waiting.status.unwrap();
    assert_eq!(condition(&st.conditions, FC::WaitingForCutover).unwrap().0, ConditionStatus::True);
    assert!(st.servers.iter().all(|s| s.bytes_sent == Some(65_536)), "{:?}", st.servers);

    // Approve the cut-over (a maintenance window): failover to on-prem, then re-enable.
    let approve = json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "FailbackJob",
        "spec": {"cutover": {"mode": "Manual", "approved": true}}});
    jobs.patch("home", &PatchParams::apply("kubectl-siterecovery"), &Patch::Apply(&approve)).await?;
    for name in names {
        on_prem_completes(&servers, name, "failback", 0).await?;
    }
    for name in names {
        let s = wait_for(&servers, name, WAIT, "re-enabled", phase_is(ServerPhase::InitialReplication)).await?;
        assert!(s.status.unwrap().initial_sync.is_none(), "{name}: initial-sync figures reset for the re-enable");
        report_protected(&servers, name).await?;
        wait_for(&servers, name, WAIT, "Protected again", phase_is(ServerPhase::Protected)).await?;
    }
    let done = wait_for(&jobs, "home", WAIT, "succeeded", |j| {
        j.status.as_ref().and_then(|s| s.state) == Some(RunState::Succeeded)
    })
    .await?;
    let st = done.status.unwrap();
    assert_eq!(st.progress.as_deref(), Some("2/2"));
    assert_eq!(st.step, Some(FailbackStep::ReEnable));
    assert!(st.steps.iter().all(|s| s.state == RunState::Succeeded && s.completion_time.is_some()), "{:?}", st.steps);
    assert_eq!(condition(&st.conditions, FC::READY).unwrap().0, ConditionStatus::True);
    Ok(())
}
