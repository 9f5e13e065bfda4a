use super::*;

const NOW: &str = "2026-11-27T12:00:00Z";

fn at(s: &str) -> Time {
    Time(s.parse().unwrap())
}

fn job(cutover: Value, target: Value) -> FailbackJob {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "FailbackJob",
        "metadata": {"name": "home", "namespace": "dr", "generation": 1},
        "spec": {"servers": ["db-01", "web-01"], "target": target, "cutover": cutover, "reEnableReplication": true}
    }))
    .unwrap()
}

fn original() -> Value {
    json!({"location": "OriginalLocation"})
}

fn servers(phase: &str) -> BTreeMap<String, ProtectedServer> {
    ["db-01", "web-01"]
        .into_iter()
        .map(|n| {
            let s = serde_json::from_value(json!({
                "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
                "metadata": {"name": n, "namespace": "dr", "resourceVersion": "9"},
                "spec": {"policyRef": {"name": "gold"}, "agent": {"hostname": n},
                         "disks": [{"id": "os", "path": "/dev/sda"}], "failoverTarget": {"local": {"directory": "/r"}}},
                "status": {"phase": phase}
            }))
            .unwrap();
            (n.to_owned(), s)
        })
        .collect()
}

fn order() -> Vec<String> {
    vec!["db-01".into(), "web-01".into()]
}

fn requests(d: &Decision) -> Vec<Value> {
    d.steps
        .iter()
        .map(|step| match step {
            Step::RequestServer { status, .. } => status.clone(),
            Step::CreateJob { .. } => panic!("a failback creates no Job"),
        })
        .collect()
}

fn advance(j: FailbackJob, d: &Decision) -> FailbackJob {
    let mut j = j;
    j.status = Some(serde_json::from_value(d.status.clone()).unwrap());
    j
}

#[test]
fn refuses_to_start_unless_every_server_is_committed() {
    let mut s = servers("Committed");
    s.insert("web-01".into(), servers("FailedOver").remove("web-01").unwrap());
    let d = decide(&job(json!({"mode": "Automatic"}), original()), &order(), &s, &at(NOW));
    assert!(d.steps.is_empty(), "nothing moves when one server is not ready");
    assert_eq!(
        d.verdict,
        Verdict::Stalled {
            reason: "NotFailedOver",
            message: "web-01 is FailedOver: failback needs a failover that was committed".into()
        }
    );
}

#[test]
fn the_three_steps_in_order() {
    let j = job(json!({"mode": "Manual"}), original());
    // Reprotect every server.
    let d = decide(&j, &order(), &servers("Committed"), &at(NOW));
    let r = requests(&d);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["phase"], "Reprotecting");
    assert_eq!(r[0]["reverseReplication"]["location"], "OriginalLocation");
    assert_eq!(r[0]["reverseReplication"]["state"], "Pending");
    assert_eq!(d.status["step"], "Reprotect");

    // In sync, Manual mode: wait for approval.
    let j = advance(j, &d);
    let d = decide(&j, &order(), &servers("ReverseProtected"), &at(NOW));
    assert!(d.steps.is_empty());
    assert_eq!(d.status["state"], "WaitingForApproval");
    let cut =
        d.status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "WaitingForCutover").unwrap().clone();
    assert_eq!(cut["status"], "True");

    // Approved: cut over every server at once.
    let mut j = advance(j, &d);
    j.spec.cutover.approved = true;
    let d = decide(&j, &order(), &servers("ReverseProtected"), &at(NOW));
    let r = requests(&d);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0]["phase"], "FailingBack");
    assert_eq!(r[0]["failback"]["failbackJob"], "home");

    // Back on-prem: re-enable forward replication, resetting the initial-sync figures.
    let j = advance(j, &d);
    let d = decide(&j, &order(), &servers("FailedBack"), &at(NOW));
    let r = requests(&d);
    assert_eq!(r[0], json!({"phase": "InitialReplication", "initialSync": null}));
    assert_eq!(d.status["step"], "ReEnable");

    // Protected again: done.
    let j = advance(j, &d);
    let d = decide(&j, &order(), &servers("Protected"), &at(NOW));
    assert!(d.steps.is_empty());
    assert_eq!(d.status["state"], "Succeeded");
    assert_eq!(d.status["progress"], "2/2");
    assert!(matches!(d.verdict, Verdict::Ready { .. }));
    let steps = d.status["steps"].as_array().unwrap();
    assert!(steps.iter().all(|s| s["state"] == "Succeeded"), "{steps:?}");
}

#[test]
fn automatic_cutover_waits_for_every_server_to_be_in_sync() {
    let j = job(json!({"mode": "Automatic"}), original());
    let mut s = servers("ReverseProtected");
    s.insert("web-01".into(), servers("Reprotecting").remove("web-01").unwrap());
    let d = decide(&j, &order(), &s, &at(NOW));
    assert!(requests(&d).iter().all(|r| r["phase"] != "FailingBack"), "no cut-over before all are in sync");
    let d = decide(&j, &order(), &servers("ReverseProtected"), &at(NOW));
    assert_eq!(requests(&d).len(), 2);
}

#[test]
fn an_alternate_target_travels_with_the_request() {
    let target = json!({"location": "AlternateLocation", "alternate": [
        {"server": "db-01", "agent": {"hostname": "db-02"}, "disks": [{"id": "os", "path": "/dev/sdb"}]},
        {"server": "web-01", "agent": {"hostname": "web-02"}, "disks": [{"id": "os", "path": "/dev/sdc"}]}]});
    let d = decide(&job(json!({"mode": "Automatic"}), target), &order(), &servers("Committed"), &at(NOW));
    let r = requests(&d);
    assert_eq!(r[0]["reverseReplication"]["alternate"]["agent"]["hostname"], "db-02");
    assert_eq!(r[1]["reverseReplication"]["alternate"]["disks"][0]["path"], "/dev/sdc");
}
