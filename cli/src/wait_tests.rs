use serde_json::{Value, json};

use super::*;

fn hint() -> Hint {
    Hint::new("prod", None)
}

fn plan(generation: i64, status: Value) -> RecoveryPlan {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "metadata": {"name": "drill", "namespace": "prod", "generation": generation},
        "spec": {"groups": [
            {"name": "db", "servers": ["db-01"],
             "actions": [{"name": "sign-off", "when": "After", "manualApproval": {"instructions": "check the database"}}]},
            {"name": "app", "servers": ["app-01"]}
        ], "operation": {"type": "TestFailover", "runId": "t1"}},
        "status": status,
    }))
    .unwrap()
}

fn run() -> PlanRun {
    PlanRun { type_: PlanOperationType::TestFailover, run_id: "t1".into(), generation: Some(3) }
}

#[test]
fn an_older_run_or_generation_is_not_taken_for_ours() {
    let other =
        plan(3, json!({"observedGeneration": 3, "operation": {"type": "Commit", "runId": "c0", "state": "Succeeded"}}));
    assert_eq!(
        plan_view(&other, &run(), &hint()),
        View::Progress("TestFailover t1: waiting for the operator to start the run".into())
    );
    let stale = plan(
        3,
        json!({"observedGeneration": 2, "operation": {"type": "TestFailover", "runId": "t1", "state": "WaitingForApproval"}}),
    );
    assert!(matches!(plan_view(&stale, &run(), &hint()), View::Progress(_)));
}

#[test]
fn progress_names_the_group_and_the_busy_servers() {
    let p = plan(
        3,
        json!({"observedGeneration": 3,
               "operation": {"type": "TestFailover", "runId": "t1", "state": "Running", "currentGroup": "app", "progress": "1/2"},
               "groups": [{"name": "db", "state": "Succeeded", "servers": [{"name": "db-01", "state": "Succeeded"}]},
                          {"name": "app", "state": "Running", "servers": [{"name": "app-01", "state": "Running", "message": "restoring"}]}]}),
    );
    assert_eq!(
        plan_view(&p, &run(), &hint()),
        View::Progress("TestFailover t1: Running, group app, 1/2 servers done: app-01 Running (restoring)".into())
    );
}

#[test]
fn a_gate_stops_with_the_exact_approve_command() {
    let p = plan(
        3,
        json!({"observedGeneration": 3,
               "operation": {"type": "TestFailover", "runId": "t1", "state": "WaitingForApproval", "currentGroup": "db"},
               "groups": [{"name": "db", "state": "WaitingForApproval",
                           "actions": [{"name": "sign-off", "state": "WaitingForApproval"}]}]}),
    );
    let View::End(outcome, text) = plan_view(&p, &run(), &Hint::new("prod", Some("dr-site"))) else { panic!() };
    assert_eq!(outcome, Outcome::Gate);
    assert_eq!(
        text,
        "TestFailover t1 of RecoveryPlan drill is waiting for approval of db/sign-off: check the database\n  \
         approve with: kubectl siterecovery approve drill db/sign-off -n prod --context dr-site"
    );
    assert_eq!(outcome.exit_code(), 3);
}

#[test]
fn the_end_of_a_run_sets_the_exit_code() {
    let ok = plan(
        3,
        json!({"observedGeneration": 3, "operation": {"type": "TestFailover", "runId": "t1", "state": "Succeeded", "message": "2/2"}}),
    );
    assert_eq!(
        plan_view(&ok, &run(), &hint()),
        View::End(Outcome::Succeeded, "TestFailover t1 of RecoveryPlan drill succeeded: 2/2".into())
    );
    let failed = plan(
        3,
        json!({"observedGeneration": 3,
               "operation": {"type": "TestFailover", "runId": "t1", "state": "PartiallySucceeded", "message": "1 failed"},
               "groups": [{"name": "app", "state": "Failed", "servers": [{"name": "app-01", "state": "Failed", "message": "disk os: no point"}]}]}),
    );
    let View::End(outcome, text) = plan_view(&failed, &run(), &hint()) else { panic!() };
    assert_eq!((outcome, outcome.exit_code()), (Outcome::Failed, 1));
    assert_eq!(
        text,
        "TestFailover t1 of RecoveryPlan drill partially succeeded: 1 failed\n  app/app-01: disk os: no point\n  \
         details: kubectl siterecovery status drill -n prod"
    );
    assert_eq!(Outcome::TimedOut.exit_code(), 2);
    assert_eq!(Outcome::Succeeded.exit_code(), 0);
}

fn job(cutover: &str, status: Value) -> FailbackJob {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "FailbackJob",
        "metadata": {"name": "home", "namespace": "prod", "generation": 1},
        "spec": {"planRef": {"name": "dr"}, "target": {"location": "OriginalLocation"}, "cutover": {"mode": cutover}},
        "status": status,
    }))
    .unwrap()
}

#[test]
fn reprotect_ends_in_sync_and_failback_ends_back_on_prem() {
    let waiting = job("Manual", json!({"observedGeneration": 1, "step": "Reprotect", "state": "WaitingForApproval"}));
    let View::End(o, text) = failback_view(&waiting, Some(1), FailbackGoal::InSync, &hint()) else { panic!() };
    assert_eq!(o, Outcome::Succeeded);
    assert!(text.ends_with("cut over to on-prem with: kubectl siterecovery failback home -n prod"), "{text}");
    let View::End(o, _) = failback_view(&waiting, Some(1), FailbackGoal::Done, &hint()) else { panic!() };
    assert_eq!(o, Outcome::Gate);

    let running = job(
        "Manual",
        json!({"observedGeneration": 1, "step": "Reprotect", "state": "Running", "progress": "0/1",
               "servers": [{"name": "db-01", "step": "Reprotect", "state": "Running",
                            "progress": {"bytesTotal": 10, "bytesDone": 4, "percent": "40%"}}]}),
    );
    assert_eq!(
        failback_view(&running, Some(1), FailbackGoal::InSync, &hint()),
        View::Progress("FailbackJob home: Reprotect Running, 0/1 servers done: db-01 Running 40%".into())
    );
    let refused = job(
        "Manual",
        json!({"observedGeneration": 1, "state": "Failed",
               "conditions": [{"type": "Stalled", "status": "True", "reason": "NotFailedOver",
                               "message": "db-01 is Protected: failback needs a failover that was committed",
                               "lastTransitionTime": "2026-03-01T09:00:00Z"}]}),
    );
    let View::End(o, text) = failback_view(&refused, Some(1), FailbackGoal::Done, &hint()) else { panic!() };
    assert_eq!(o, Outcome::Failed);
    assert!(
        text.starts_with("FailbackJob home failed: db-01 is Protected: failback needs a failover that was committed")
    );
    assert!(matches!(failback_view(&refused, Some(2), FailbackGoal::Done, &hint()), View::Progress(_)), "stale");
}
