//! RecoveryPlans against the real API server, with the operator running as the chart's
//! ServiceAccount: a two-group test failover with a manual gate approved mid-run, an
//! unplanned failover and commit, a refused commit, and a Job action created for a run.
//! The restore worker of the data plane is played by the test, writing its part of the
//! server status the way the worker will.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use siterecovery_api::plan::{PlanConditionType as PC, RunState};
use siterecovery_api::{ConditionStatus, KstatusConditions as _, ProtectedServer, RecoveryPlan, ServerPhase};
use siterecovery_e2e::fixtures::{condition, events_for, policy, report_protected, sas_secret, server};
use siterecovery_e2e::operator::OperatorTest;
use siterecovery_e2e::wait_for;

const WAIT: Duration = Duration::from_secs(30);

fn plan_doc(name: &str, operation: serde_json::Value) -> RecoveryPlan {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "metadata": {"name": name},
        "spec": {
            "groups": [
                {"name": "database", "servers": ["db-01"], "actions": [
                    {"name": "sign-off", "when": "After", "manualApproval": {"instructions": "Check the database."}}]},
                {"name": "web", "servers": ["web-01", "web-02"]}
            ],
            "operation": operation
        }
    }))
    .expect("valid plan")
}

/// Plays the restore worker once: completes every pending request of the given block.
async fn worker_completes(servers: &Api<ProtectedServer>, names: &[&str], block: &str) -> anyhow::Result<()> {
    for name in names {
        let s = wait_for(servers, name, WAIT, &format!("{block} requested"), |s| {
            let v = serde_json::to_value(s.status.clone().unwrap_or_default()).unwrap_or_default();
            v[block]["state"] == "Pending"
        })
        .await?;
        let requested = serde_json::to_value(s.status.unwrap_or_default())?[block].clone();
        // The worker answers with a merge patch of the block it serves: server-side apply
        // would drop the other block's fields it wrote earlier (see docs/lifecycle.md).
        let patch = json!({"status": {block: {
            "operation": requested["operation"], "run": requested["run"], "state": "Succeeded",
            "recoveryPoint": {"id": "cc-1", "time": siterecovery_e2e::fixtures::ago(1), "kind": "CrashConsistent"},
            "recoveredDisks": [format!("/srv/recovered/{name}/os.img")],
            "completionTime": siterecovery_e2e::fixtures::ago(0)
        }}});
        servers
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| anyhow::anyhow!("worker report for {name} after {requested}: {e}"))?;
    }
    Ok(())
}

fn run_state(p: &RecoveryPlan) -> Option<RunState> {
    p.status.as_ref().and_then(|s| s.operation.as_ref()).map(|o| o.state)
}

#[tokio::test]
async fn plans_drive_test_failover_failover_and_commit() -> anyhow::Result<()> {
    let t = OperatorTest::start(Path::new(env!("CARGO_BIN_EXE_siterecovery-operator")), "plan").await?;
    t.explain(scenario(&t.admin, &t.ns.name).await)
}

async fn scenario(admin: &Client, ns: &str) -> anyhow::Result<()> {
    let servers: Api<ProtectedServer> = Api::namespaced(admin.clone(), ns);
    let plans: Api<RecoveryPlan> = Api::namespaced(admin.clone(), ns);
    Api::namespaced(admin.clone(), ns).create(&PostParams::default(), &sas_secret()).await?;
    Api::namespaced(admin.clone(), ns).create(&PostParams::default(), &policy("gold")).await?;
    let names = ["db-01", "web-01", "web-02"];
    for name in names {
        servers.create(&PostParams::default(), &server(name)).await?;
    }
    for name in names {
        wait_for(&servers, name, WAIT, "Enabling", |s| s.status.as_ref().and_then(|st| st.phase).is_some()).await?;
        report_protected(&servers, name).await?;
        wait_for(&servers, name, WAIT, "Protected", |s| {
            s.status.as_ref().and_then(|st| st.phase) == Some(ServerPhase::Protected)
        })
        .await?;
    }

    // A refused request: commit with nothing failed over names the reason per server.
    plans.create(&PostParams::default(), &plan_doc("refused", json!({"type": "Commit"}))).await?;
    let refused = wait_for(&plans, "refused", WAIT, "run failed", |p| run_state(p) == Some(RunState::Failed)).await?;
    let st = refused.status.unwrap();
    assert_eq!(
        st.groups[0].servers[0].message.as_deref(),
        Some("commit needs a completed failover (the server is Protected)")
    );
    assert_eq!(st.groups[1].state, RunState::Skipped);
    assert_eq!(condition(&st.conditions, PC::STALLED).unwrap().0, ConditionStatus::True);

    // Test failover: group 1, then the gate, then group 2 — replication never pauses.
    plans
        .create(&PostParams::default(), &plan_doc("billing", json!({"type": "TestFailover", "runId": "drill-1"})))
        .await?;
    worker_completes(&servers, &["db-01"], "testFailover").await?;
    let waiting = wait_for(&plans, "billing", WAIT, "waiting for approval", |p| {
        run_state(p) == Some(RunState::WaitingForApproval)
    })
    .await?;
    let gate = condition(&waiting.status.clone().unwrap().conditions, PC::WaitingForApproval).unwrap();
    assert_eq!((gate.0, gate.2.as_str()), (ConditionStatus::True, "database/sign-off: Check the database."));
    for web in ["web-01", "web-02"] {
        let s = servers.get(web).await?;
        assert!(s.status.unwrap().test_failover.is_none(), "{web} must wait for the gate");
    }
    let approve = json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "spec": {"operation": {"type": "TestFailover", "runId": "drill-1", "approvals": ["database/sign-off"]}}});
    plans.patch("billing", &PatchParams::apply("kubectl-siterecovery"), &Patch::Apply(&approve)).await?;
    worker_completes(&servers, &["web-01", "web-02"], "testFailover").await?;
    let done =
        wait_for(&plans, "billing", WAIT, "test failover succeeded", |p| run_state(p) == Some(RunState::Succeeded))
            .await?;
    let st = done.status.unwrap();
    assert_eq!(st.operation.as_ref().unwrap().progress.as_deref(), Some("3/3"));
    assert_eq!(condition(&st.conditions, PC::READY).unwrap().0, ConditionStatus::True);
    for name in names {
        assert_eq!(
            servers.get(name).await?.status.unwrap().phase,
            Some(ServerPhase::Protected),
            "{name} kept replicating"
        );
    }
    let events = events_for(admin, ns, "billing").await?;
    assert!(events.iter().any(|(r, _)| r == "WaitingForApproval"), "{events:?}");
    assert!(events.iter().any(|(r, _)| r == "RunSucceeded"), "{events:?}");

    // Cleanup, then an unplanned failover of the whole plan, then commit.
    for (op, run) in [("TestFailoverCleanup", "drill-1"), ("UnplannedFailover", "dr-1")] {
        let mut spec = json!({"type": op, "runId": run, "approvals": ["database/sign-off"]});
        if op == "UnplannedFailover" {
            spec["recoveryPoint"] = json!({"selector": "LatestAppConsistent"});
        }
        let patch =
            json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan", "spec": {"operation": spec}});
        plans.patch("billing", &PatchParams::apply("kubectl-siterecovery").force(), &Patch::Apply(&patch)).await?;
        let block = if op == "UnplannedFailover" { "failover" } else { "testFailover" };
        worker_completes(&servers, &["db-01"], block).await?;
        worker_completes(&servers, &["web-01", "web-02"], block).await?;
        wait_for(&plans, "billing", WAIT, &format!("{op} succeeded"), |p| {
            run_state(p) == Some(RunState::Succeeded)
                && p.status.as_ref().and_then(|s| s.operation.as_ref()).and_then(|o| o.run_id.as_deref()) == Some(run)
        })
        .await?;
    }
    for name in names {
        let s = wait_for(&servers, name, WAIT, "FailedOver", |s| {
            s.status.as_ref().and_then(|st| st.phase) == Some(ServerPhase::FailedOver)
        })
        .await?;
        let failover = s.status.unwrap().failover.unwrap();
        assert_eq!(
            failover.recovery_point_choice.unwrap().selector,
            siterecovery_api::RecoveryPointSelector::LatestAppConsistent
        );
    }
    let patch = json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "spec": {"operation": {"type": "Commit", "runId": "dr-1", "approvals": ["database/sign-off"]}}});
    plans.patch("billing", &PatchParams::apply("kubectl-siterecovery").force(), &Patch::Apply(&patch)).await?;
    wait_for(&plans, "billing", WAIT, "commit succeeded", |p| {
        run_state(p) == Some(RunState::Succeeded)
            && p.status.as_ref().and_then(|s| s.operation.as_ref()).map(|o| o.type_)
                == Some(siterecovery_api::plan::PlanOperationType::Commit)
    })
    .await?;
    for name in names {
        assert_eq!(servers.get(name).await?.status.unwrap().phase, Some(ServerPhase::Committed), "{name}");
    }
    Ok(())
}

#[tokio::test]
async fn job_actions_are_created_and_owned_by_the_plan() -> anyhow::Result<()> {
    let t = OperatorTest::start(Path::new(env!("CARGO_BIN_EXE_siterecovery-operator")), "job").await?;
    let (admin, ns, operator) = (&t.admin, &t.ns, &t.operator);
    let plans: Api<RecoveryPlan> = Api::namespaced(admin.clone(), &ns.name);
    let plan: RecoveryPlan = serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan", "metadata": {"name": "smoke"},
        "spec": {"groups": [{"name": "app", "servers": ["app-01"], "actions": [{"name": "prepare", "when": "Before",
            "job": {"spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "image": "registry.example.com/prepare:1"}]}}}}}]}],
            "operation": {"type": "TestFailover", "runId": "t1"}}
    }))?;
    plans.create(&PostParams::default(), &plan).await?;
    let jobs: Api<Job> = Api::namespaced(admin.clone(), &ns.name);
    let job = wait_for(&jobs, "smoke-t1-app-prepare", WAIT, "Job created", |_| true).await;
    if let Err(e) = &job {
        eprintln!("{e}\n--- operator log ---\n{}", operator.logs());
    }
    let job = job?;
    assert_eq!(job.owner_references()[0].name, "smoke");
    let p = wait_for(&plans, "smoke", WAIT, "action running", |p| {
        p.status.as_ref().is_some_and(|s| {
            s.groups.first().is_some_and(|g| g.actions.first().is_some_and(|a| a.state == RunState::Running))
        })
    })
    .await?;
    // The server's part waits for the Before action.
    assert_eq!(p.status.unwrap().groups[0].servers[0].state, RunState::Pending);

    // A Job spec the API server would refuse stalls the plan before anything runs.
    let mut bad = plan.clone();
    bad.metadata.name = Some("broken".into());
    bad.spec.groups[0].actions.as_mut().unwrap()[0].job.as_mut().unwrap().spec =
        json!({"template": {"spec": {"restartPolicy": "Always", "containers": [{"name": "c"}]}}});
    plans.create(&PostParams::default(), &bad).await?;
    let stalled = wait_for(&plans, "broken", WAIT, "Stalled on the Job spec", |p| {
        p.status
            .as_ref()
            .and_then(|s| condition(&s.conditions, PC::STALLED))
            .is_some_and(|(s, r, _)| s == ConditionStatus::True && r == "InvalidJob")
    })
    .await?;
    let message = condition(&stalled.status.unwrap().conditions, PC::STALLED).unwrap().2;
    assert!(message.starts_with("spec.groups[0].actions[0].job.spec: "), "{message}");
    assert!(message.contains("image") && message.contains("restartPolicy"), "{message}");
    assert!(jobs.get_opt("broken-t1-app-prepare").await?.is_none(), "no Job for an invalid plan");
    Ok(())
}
