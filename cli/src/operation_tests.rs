use serde_json::json;

use super::*;

fn plan(spec_operation: Value, status: Value) -> RecoveryPlan {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "metadata": {"name": "drill", "resourceVersion": "42"},
        "spec": {"groups": [
            {"name": "db", "servers": ["db-01"],
             "actions": [{"name": "sign-off", "when": "After", "manualApproval": {"instructions": "check"}}]},
            {"name": "app", "servers": ["app-01"],
             "actions": [{"name": "smoke", "when": "After", "job": {"spec": {}}}]}
        ], "operation": spec_operation},
        "status": status,
    }))
    .unwrap()
}

fn op(t: PlanOperationType, run: &str, point: Option<RecoveryPointChoice>) -> PlanOperation {
    PlanOperation {
        type_: t,
        run_id: Some(run.into()),
        recovery_point: point,
        approvals: None,
        skip_source_shutdown: false,
    }
}

fn point(p: Option<&str>, at: Option<&str>) -> Result<Option<RecoveryPointChoice>, String> {
    point_choice(&PointArgs { point: p.map(Into::into), at: at.map(Into::into) })
}

#[test]
fn test_failover_at_the_latest_point_nulls_every_unused_field() {
    let o = op(PlanOperationType::TestFailover, "t1", point(Some("latest"), None).unwrap());
    assert_eq!(
        operation_patch(&o, Some("42")),
        json!({
            "metadata": {"resourceVersion": "42"},
            "spec": {"operation": {
                "type": "TestFailover", "runId": "t1",
                "recoveryPoint": {"selector": "Latest", "pointName": null, "pointInTime": null},
                "approvals": null, "skipSourceShutdown": null
            }}
        })
    );
}

#[test]
fn commit_and_cleanup_remove_the_previous_point() {
    for t in [PlanOperationType::Commit, PlanOperationType::TestFailoverCleanup] {
        assert_eq!(
            operation_patch(&op(t, "c1", None), None),
            json!({"spec": {"operation": {
                "type": t, "runId": "c1", "recoveryPoint": null, "approvals": null, "skipSourceShutdown": null
            }}})
        );
    }
}

#[test]
fn planned_failover_may_keep_the_sources_running() {
    let mut o = op(PlanOperationType::PlannedFailover, "f1", None);
    o.skip_source_shutdown = true;
    assert_eq!(
        operation_patch(&o, None),
        json!({"spec": {"operation": {
            "type": "PlannedFailover", "runId": "f1", "recoveryPoint": null, "approvals": null,
            "skipSourceShutdown": true
        }}})
    );
}

#[test]
fn named_points_and_points_in_time() {
    let o = op(PlanOperationType::ChangeRecoveryPoint, "p1", point(Some("20260301T093000123Z-app"), None).unwrap());
    assert_eq!(
        operation_patch(&o, None)["spec"]["operation"]["recoveryPoint"],
        json!({"selector": "Named", "pointName": "20260301T093000123Z-app", "pointInTime": null})
    );
    let o = op(PlanOperationType::UnplannedFailover, "u1", point(None, Some("2026-03-01T10:30:00+01:00")).unwrap());
    assert_eq!(
        operation_patch(&o, None)["spec"]["operation"]["recoveryPoint"],
        json!({"selector": "PointInTime", "pointName": null, "pointInTime": "2026-03-01T09:30:00Z"})
    );
}

#[test]
fn point_keywords_map_to_selectors() {
    let sel = |s| point(Some(s), None).unwrap().unwrap().selector;
    assert_eq!(sel("latest"), RecoveryPointSelector::Latest);
    assert_eq!(sel("latest-processed"), RecoveryPointSelector::LatestProcessed);
    assert_eq!(sel("latest-app"), RecoveryPointSelector::LatestAppConsistent);
    assert_eq!(sel("latest-group"), RecoveryPointSelector::LatestGroupConsistent);
    assert_eq!(point(None, None).unwrap(), None);
    let err = point(None, Some("yesterday")).unwrap_err();
    assert!(err.contains("--at \"yesterday\" is not an RFC 3339 time"), "{err}");
    assert!(point(Some(""), None).is_err());
}

#[test]
fn run_ids_name_the_operation_and_the_utc_time() {
    let now: jiff::Timestamp = "2026-03-01T09:30:05.9Z".parse().unwrap();
    assert_eq!(generate_run_id(PlanOperationType::TestFailover, now), "testfailover-20260301-093005");
    assert_eq!(generate_run_id(PlanOperationType::TestFailoverCleanup, now), "testfailovercleanup-20260301-093005");
    let t = PlanOperationType::Commit;
    assert_eq!(choose_run_id(None, t, None, now).unwrap(), "commit-20260301-093005");
    assert_eq!(choose_run_id(None, t, Some("commit-20260301-093005"), now).unwrap(), "commit-20260301-093005-2");
    assert_eq!(choose_run_id(Some("mine"), t, Some("mine"), now).unwrap(), "mine");
    for bad in ["", "Upper", "-x", "x-", "a_b", &"x".repeat(64)] {
        assert!(choose_run_id(Some(bad), t, None, now).is_err(), "{bad:?}");
    }
    for id in [generate_run_id(PlanOperationType::TestFailoverCleanup, now), "a".into(), "a-1".into()] {
        validate_run_id(&id).unwrap();
    }
}

#[test]
fn approving_appends_to_the_current_runs_approvals() {
    let p = plan(json!({"type": "TestFailover", "runId": "t1", "approvals": []}), json!({}));
    assert_eq!(
        approve_patch(&p, &["db/sign-off".into()]).unwrap(),
        Some(json!({"metadata": {"resourceVersion": "42"}, "spec": {"operation": {"approvals": ["db/sign-off"]}}}))
    );
    let p = plan(json!({"type": "TestFailover", "runId": "t1", "approvals": ["db/sign-off"]}), json!({}));
    assert_eq!(approve_patch(&p, &["db/sign-off".into()]).unwrap(), None, "already approved");
}

#[test]
fn approving_names_the_gates_when_it_cannot() {
    let p = plan(json!({"type": "TestFailover", "runId": "t1"}), json!({}));
    let err = approve_patch(&p, &["app/smoke".into()]).unwrap_err();
    assert_eq!(err, "\"app/smoke\" is not a manual gate of RecoveryPlan drill; its gates are: db/sign-off");
    let p = plan(Value::Null, json!({}));
    let err = approve_patch(&p, &["db/sign-off".into()]).unwrap_err();
    assert!(err.starts_with("RecoveryPlan drill has no operation"), "{err}");
}

#[test]
fn a_running_run_is_replaced_only_with_force() {
    let running = plan(
        json!({"type": "TestFailover", "runId": "t1"}),
        json!({"operation": {"type": "TestFailover", "runId": "t1", "state": "WaitingForApproval", "currentGroup": "db"}}),
    );
    let new = op(PlanOperationType::UnplannedFailover, "u1", None);
    let err = check_start(&running, &new, false).unwrap_err();
    assert!(err.contains("still running TestFailover t1 (WaitingForApproval, group db)"), "{err}");
    assert!(err.contains("--force"), "{err}");
    check_start(&running, &new, true).unwrap();
    // Re-sending the same run is harmless.
    check_start(&running, &op(PlanOperationType::TestFailover, "t1", None), false).unwrap();
}

#[test]
fn a_finished_run_id_is_not_reused() {
    let done = plan(
        json!({"type": "Commit", "runId": "c1"}),
        json!({"operation": {"type": "Commit", "runId": "c1", "state": "Failed"}}),
    );
    let err = check_start(&done, &op(PlanOperationType::Commit, "c1", None), true).unwrap_err();
    assert!(err.contains("already ran Commit c1 (Failed)"), "{err}");
    check_start(&done, &op(PlanOperationType::Commit, "c2", None), false).unwrap();
}
