use super::*;

const NOW: &str = "2026-11-27T10:00:00Z";

fn at(s: &str) -> Time {
    Time(s.parse().unwrap())
}

fn plan(operation: Value) -> RecoveryPlan {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "metadata": {"name": "billing", "namespace": "dr", "generation": 3},
        "spec": {
            "onFailure": "Stop",
            "groups": [
                {"name": "database", "servers": ["db-01"], "actions": [
                    {"name": "check", "when": "After", "job": {"timeout": "10m", "spec": {"template": {"spec": {
                        "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}},
                    {"name": "sign-off", "when": "After", "manualApproval": {"instructions": "Check the DB."}}
                ]},
                {"name": "web", "servers": ["web-01", "web-02"]}
            ],
            "operation": operation
        }
    }))
    .unwrap()
}

fn server(name: &str, status: Value) -> (String, ProtectedServer) {
    let s = serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
        "metadata": {"name": name, "namespace": "dr", "resourceVersion": "7"},
        "spec": {"policyRef": {"name": "gold"}, "agent": {"hostname": name},
                 "disks": [{"id": "os", "path": "/dev/sda"}], "failoverTarget": {"local": {"directory": "/r"}}},
        "status": status
    }))
    .unwrap();
    (name.to_owned(), s)
}

fn protected() -> BTreeMap<String, ProtectedServer> {
    ["db-01", "web-01", "web-02"].into_iter().map(|n| server(n, json!({"phase": "Protected"}))).collect()
}

fn with_plan_state(mut p: RecoveryPlan, d: &Decision) -> RecoveryPlan {
    p.status = Some(serde_json::from_value(d.status.clone()).unwrap());
    p
}

fn test_done(run: &str) -> Value {
    json!({"phase": "Protected", "testFailover": {"operation": "TestFailover", "run": run, "state": "Succeeded",
        "recoveryPoint": {"id": "cc-9", "time": NOW, "kind": "CrashConsistent"}}})
}

fn requests(d: &Decision) -> Vec<(String, Value)> {
    d.steps
        .iter()
        .filter_map(|s| match s {
            Step::RequestServer { server, status, .. } => Some((server.clone(), status.clone())),
            _ => None,
        })
        .collect()
}

fn cond(d: &Decision, t: &str) -> (String, String) {
    let c = d.status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap();
    (c["status"].as_str().unwrap().into(), c["message"].as_str().unwrap().into())
}

#[test]
fn an_idle_plan_names_missing_servers() {
    let mut servers = protected();
    servers.remove("web-02");
    let d = decide(&plan(Value::Null), &servers, &BTreeMap::new(), &at(NOW));
    assert_eq!(
        d.verdict,
        Verdict::Stalled {
            reason: "ServerNotFound",
            message: "spec.groups[1].servers: ProtectedServer web-02 not found".into()
        }
    );
    assert!(d.steps.is_empty());
}

#[test]
fn a_test_failover_runs_groups_in_order_with_job_and_gate() {
    let op = json!({"type": "TestFailover", "runId": "drill-1"});
    let run = "billing/drill-1";
    let jobs = BTreeMap::new();

    // 1. Only the first group's server is asked; the web group waits.
    let p = plan(op.clone());
    let d = decide(&p, &protected(), &jobs, &at(NOW));
    let r = requests(&d);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, "db-01");
    assert_eq!(r[0].1["testFailover"]["operation"], "TestFailover");
    assert_eq!(r[0].1["testFailover"]["run"], run);
    assert_eq!(r[0].1["testFailover"]["state"], "Pending");
    assert!(r[0].1.get("phase").is_none(), "test failover never touches the phase");
    assert_eq!(d.status["groups"][1]["state"], "Pending");
    assert_eq!(d.status["operation"]["state"], "Running");

    // 2. The server's test copy is ready: the post-action Job is created.
    let mut servers = protected();
    servers.insert("db-01".into(), server("db-01", test_done(run)).1);
    let p = with_plan_state(plan(op.clone()), &d);
    let d = decide(&p, &servers, &jobs, &at(NOW));
    let job = job_name("billing", "drill-1", "database", "check");
    assert!(matches!(&d.steps[..], [Step::CreateJob { name, .. }] if *name == job), "{:?}", d.steps);

    // 3. Job done: the gate waits, with its instructions in the condition.
    let jobs = BTreeMap::from([(job.clone(), JobState::Succeeded)]);
    let p = with_plan_state(plan(op.clone()), &d);
    let d = decide(&p, &servers, &jobs, &at(NOW));
    assert!(d.steps.is_empty());
    assert_eq!(d.status["operation"]["state"], "WaitingForApproval");
    assert_eq!(cond(&d, "WaitingForApproval"), ("True".into(), "database/sign-off: Check the DB.".into()));
    assert!(d.status["operation"]["message"].as_str().unwrap().contains("spec.operation.approvals"));

    // 4. Approved: the web group's two servers are asked at once.
    let mut approved = op.clone();
    approved["approvals"] = json!(["database/sign-off"]);
    let p = with_plan_state(plan(approved.clone()), &d);
    let d = decide(&p, &servers, &jobs, &at(NOW));
    let asked: Vec<String> = requests(&d).into_iter().map(|(s, _)| s).collect();
    assert_eq!(asked, ["web-01", "web-02"]);
    assert_eq!(cond(&d, "WaitingForApproval").0, "False");

    // 5. Both done: the run succeeded, Ready.
    servers.insert("web-01".into(), server("web-01", test_done(run)).1);
    servers.insert("web-02".into(), server("web-02", test_done(run)).1);
    let p = with_plan_state(plan(approved), &d);
    let d = decide(&p, &servers, &jobs, &at(NOW));
    assert_eq!(d.status["operation"]["state"], "Succeeded");
    assert_eq!(d.status["operation"]["progress"], "3/3");
    assert!(matches!(d.verdict, Verdict::Ready { .. }));
    assert!(!d.running);
    assert_eq!(d.status["groups"][0]["servers"][0]["recoveryPoint"]["id"], "cc-9");
}

#[test]
fn an_invalid_request_fails_the_server_and_stops_the_plan() {
    let p = plan(json!({"type": "Commit"}));
    let d = decide(&p, &protected(), &BTreeMap::new(), &at(NOW));
    assert!(requests(&d).is_empty());
    let db = &d.status["groups"][0]["servers"][0];
    assert_eq!(db["state"], "Failed");
    assert_eq!(db["message"], "commit needs a completed failover (the server is Protected)");
    assert_eq!(d.status["groups"][1]["state"], "Skipped");
    assert_eq!(d.status["operation"]["state"], "Failed");
    assert!(
        matches!(&d.verdict, Verdict::Stalled { message, .. } if message.contains("db-01: commit needs a completed failover"))
    );
}

#[test]
fn an_unplanned_failover_records_phase_and_choice() {
    let p = plan(
        json!({"type": "UnplannedFailover", "runId": "dr-1", "recoveryPoint": {"selector": "LatestAppConsistent"}}),
    );
    let d = decide(&p, &protected(), &BTreeMap::new(), &at(NOW));
    let r = requests(&d);
    assert_eq!(r[0].1["phase"], "FailingOver");
    assert_eq!(r[0].1["failover"]["recoveryPointChoice"]["selector"], "LatestAppConsistent");
    assert_eq!(r[0].1["failover"]["operation"], "UnplannedFailover");
    assert!(matches!(&d.steps[0], Step::RequestServer { resource_version: Some(v), .. } if v == "7"));
}

#[test]
fn commit_completes_without_a_worker() {
    let servers: BTreeMap<_, _> =
        ["db-01", "web-01", "web-02"].into_iter().map(|n| server(n, json!({"phase": "FailedOver"}))).collect();
    let d = decide(&plan(json!({"type": "Commit"})), &servers, &BTreeMap::new(), &at(NOW));
    assert_eq!(requests(&d)[0].1, json!({"phase": "Committed"}));
    // The Job and the gate apply to Commit too (no operations filter): they run after the commit.
    assert_eq!(d.status["groups"][0]["servers"][0]["state"], "Succeeded");
}

#[test]
fn a_job_past_its_timeout_fails_the_group() {
    let run = "billing/drill-1";
    let mut servers = protected();
    servers.insert("db-01".into(), server("db-01", test_done(run)).1);
    let job = job_name("billing", "drill-1", "database", "check");
    let jobs = BTreeMap::from([(job.clone(), JobState::Active(at("2026-11-27T09:45:00Z")))]);
    let d = decide(&plan(json!({"type": "TestFailover", "runId": "drill-1"})), &servers, &jobs, &at(NOW));
    let action = &d.status["groups"][0]["actions"][0];
    assert_eq!(action["state"], "Failed");
    assert_eq!(action["message"], format!("Job {job} did not finish within 10m"));
    assert_eq!(d.status["operation"]["state"], "Failed");
}

#[test]
fn cleanup_skips_actions_without_an_operations_list() {
    let run = "billing/drill-1";
    let servers: BTreeMap<_, _> =
        ["db-01", "web-01", "web-02"].into_iter().map(|n| server(n, test_done(run))).collect();
    let d =
        decide(&plan(json!({"type": "TestFailoverCleanup", "runId": "drill-1"})), &servers, &BTreeMap::new(), &at(NOW));
    // Groups still go in order, but no Job or gate of the test failover stands in the way.
    assert!(d.steps.iter().all(|s| matches!(s, Step::RequestServer { .. })), "{:?}", d.steps);
    let r = requests(&d);
    assert_eq!(r.len(), 1);
    assert!(r.iter().all(|(_, s)| s["testFailover"]["operation"] == "TestFailoverCleanup"));
    assert!(r.iter().all(|(_, s)| s["testFailover"].get("recoveredDisks").is_none()), "cleanup keeps recoveredDisks");
}

#[test]
fn job_names_fit_in_63_characters() {
    let long = job_name(&"p".repeat(40), "run-with-a-long-id", "group-name", "action-name");
    assert!(long.len() <= 63, "{long}");
    assert_ne!(long, job_name(&"p".repeat(40), "run-with-a-long-id", "group-name", "action-nam2"));
    assert_eq!(job_name("billing", "drill-1", "database", "check"), "billing-drill-1-database-check");
}

#[test]
fn a_finished_run_is_never_resumed() {
    // A Commit that failed while the servers were Protected...
    let p = plan(json!({"type": "Commit"}));
    let d = decide(&p, &protected(), &BTreeMap::new(), &at(NOW));
    assert_eq!(d.status["operation"]["state"], "Failed");
    // ...does not commit them later, once they happen to be failed over.
    let failed_over: BTreeMap<_, _> =
        ["db-01", "web-01", "web-02"].into_iter().map(|n| server(n, json!({"phase": "FailedOver"}))).collect();
    let d = decide(&with_plan_state(p, &d), &failed_over, &BTreeMap::new(), &at(NOW));
    assert!(d.steps.is_empty(), "{:?}", d.steps);
    assert_eq!(d.status["operation"]["state"], "Failed");
}

#[test]
fn a_failover_is_done_only_once_the_server_is_failed_over() {
    let p = plan(json!({"type": "UnplannedFailover", "runId": "dr-1"}));
    let block = |phase: &str| {
        json!({"phase": phase, "failover": {"operation": "UnplannedFailover", "run": "billing/dr-1", "state": "Succeeded",
            "recoveryPoint": {"id": "cc-9", "time": NOW, "kind": "CrashConsistent"}}})
    };
    // The worker finished, the server reconciler has not moved the phase yet: a commit
    // issued now would be refused, so the run is not over.
    let servers: BTreeMap<_, _> = [server("db-01", block("FailingOver"))].into_iter().collect();
    let d = decide(&p, &servers, &BTreeMap::new(), &at(NOW));
    assert_eq!(d.status["groups"][0]["servers"][0]["state"], "Running");
    let servers: BTreeMap<_, _> = [server("db-01", block("FailedOver"))].into_iter().collect();
    let d = decide(&p, &servers, &BTreeMap::new(), &at(NOW));
    assert_eq!(d.status["groups"][0]["servers"][0]["state"], "Succeeded");
}
