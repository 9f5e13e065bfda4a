use serde_json::json;

use super::*;

fn now() -> jiff::Timestamp {
    "2026-03-01T10:00:00Z".parse().unwrap()
}

fn server(name: &str, status: Value) -> ProtectedServer {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
        "metadata": {"name": name, "namespace": "prod"},
        "spec": {"policyRef": {"name": "gold"}, "agent": {"hostname": "db-01"},
                 "disks": [{"id": "os", "path": "/dev/sda"}], "failoverTarget": {"local": {"directory": "/srv"}}},
        "status": status,
    }))
    .unwrap()
}

fn cond(t: &str, status: &str, message: &str) -> Value {
    json!({"type": t, "status": status, "reason": "R", "message": message, "lastTransitionTime": "2026-03-01T09:00:00Z"})
}

#[test]
fn server_rows_show_phase_rpo_point_and_why_not_ready() {
    let healthy = server(
        "db-01",
        json!({
            "phase": "Protected", "currentRpo": "12s", "processServer": "siterecovery-process-server-0",
            "initialSync": {"bytesTotal": 100, "bytesDone": 100, "percent": "100%"},
            "latestRecoveryPoints": {"crashConsistent":
                {"id": "20260301T095948000Z-crash", "time": "2026-03-01T09:59:48Z", "kind": "CrashConsistent"}},
            "conditions": [cond("Ready", "True", "protected")],
        }),
    );
    let syncing = server(
        "app-01",
        json!({
            "phase": "InitialReplication",
            "initialSync": {"bytesTotal": 400, "bytesDone": 100},
            "conditions": [cond("Ready", "False", "initial copy 25%"), cond("Stalled", "False", "")],
        }),
    );
    let stalled = server(
        "web-01",
        json!({"conditions": [cond("Ready", "False", "x"), cond("Stalled", "True", "policy gold not found")]}),
    );
    let fresh = server("new-01", json!(null));
    let out = tables(&[healthy, syncing, stalled, fresh], &[], &[], false, now());
    assert_eq!(
        out,
        "\
NAME     PHASE                RPO   LAST POINT                        PROCESS SERVER                  INITIAL SYNC   CONDITION
db-01    Protected            12s   20260301T095948000Z-crash (12s)   siterecovery-process-server-0   100%
app-01   InitialReplication   -     -                                 -                               25%            initial copy 25%
web-01   -                    -     -                                 -                               -              policy gold not found
new-01   -                    -     -                                 -                               -
"
    );
}

fn plan(name: &str, status: Value) -> RecoveryPlan {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "metadata": {"name": name, "namespace": "prod"},
        "spec": {"groups": [{"name": "db", "servers": ["db-01"]}]},
        "status": status,
    }))
    .unwrap()
}

#[test]
fn plan_rows_show_the_run_and_a_message_unless_it_succeeded() {
    let waiting = plan(
        "drill",
        json!({"operation": {"type": "TestFailover", "runId": "t1", "state": "WaitingForApproval", "currentGroup": "db",
                             "progress": "1/2", "message": "waiting for approval of db/sign-off"},
               "groups": [{"name": "db", "state": "WaitingForApproval",
                           "actions": [{"name": "sign-off", "state": "WaitingForApproval"}],
                           "servers": [{"name": "db-01", "state": "Succeeded", "phase": "Protected",
                                        "recoveryPoint": {"id": "p1", "time": "2026-03-01T09:00:00Z", "kind": "CrashConsistent"}}]}]}),
    );
    let done = plan(
        "dr",
        json!({"operation": {"type": "Commit", "runId": "c1", "state": "Succeeded", "progress": "2/2", "message": "ok"}}),
    );
    let idle = plan(
        "idle",
        json!({"conditions": [cond("Ready", "False", "x"), cond("Stalled", "True", "ProtectedServer db-01 not found")]}),
    );
    assert_eq!(
        tables(&[], &[waiting.clone(), done, idle], &[], false, now()),
        "\
NAME    OPERATION      RUN   STATE                CURRENT GROUP   PROGRESS   MESSAGE
drill   TestFailover   t1    WaitingForApproval   db              1/2        waiting for approval of db/sign-off
dr      Commit         c1    Succeeded            -               2/2
idle    -              -     -                    -               -          ProtectedServer db-01 not found
"
    );
    assert_eq!(
        plan_detail_rows(&waiting),
        vec![
            vec!["db", "action/sign-off", "WaitingForApproval", "-", "-", ""],
            vec!["db", "db-01", "Succeeded", "Protected", "p1", ""],
        ]
    );
}

#[test]
fn failback_rows_and_namespaces() {
    let job: FailbackJob = serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "FailbackJob",
        "metadata": {"name": "home", "namespace": "prod"},
        "spec": {"planRef": {"name": "dr"}, "target": {"location": "OriginalLocation"}},
        "status": {"step": "Reprotect", "state": "WaitingForApproval", "progress": "2/2",
                   "conditions": [cond("Ready", "False", "reverse replication is in sync")]},
    }))
    .unwrap();
    assert_eq!(
        tables(&[], &[], &[job], true, now()),
        "\
NAMESPACE   NAME   STEP        STATE                PROGRESS   TARGET             MESSAGE
prod        home   Reprotect   WaitingForApproval   2/2        OriginalLocation   reverse replication is in sync
"
    );
}

#[test]
fn json_output_carries_kind_name_and_status() {
    let s = server("db-01", json!({"phase": "Protected"}));
    assert_eq!(
        status_doc(&s),
        json!({"kind": "ProtectedServer", "namespace": "prod", "name": "db-01", "status": {"phase": "Protected"}})
    );
}
