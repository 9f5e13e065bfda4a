use super::*;

fn server(status: Value) -> ProtectedServer {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
        "metadata": {"name": "db-01", "namespace": "dr", "generation": 2},
        "spec": {
            "policyRef": {"name": "gold"},
            "agent": {"hostname": "db-01.corp.example.com"},
            "disks": [{"id": "os", "path": "/dev/sda"}],
            "failoverTarget": {"local": {"directory": "/srv/recovered"}}
        },
        "status": status
    }))
    .unwrap()
}

fn policy(ready: bool) -> ReplicationPolicy {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ReplicationPolicy",
        "metadata": {"name": "gold", "namespace": "dr"},
        "spec": {
            "rpoThreshold": "5m", "crashConsistentInterval": "30s", "retention": {"window": "24h"},
            "target": {"endpoint": "https://a.blob.core.windows.net", "container": "dr",
                       "credential": {"secretRef": {"name": "s"}}}
        },
        "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}, "reason": "x",
                                    "message": "", "lastTransitionTime": "2026-11-27T00:00:00Z"}]}
    }))
    .unwrap()
}

fn at(s: &str) -> Time {
    Time(s.parse().unwrap())
}

const NOW: &str = "2026-11-27T10:00:00Z";

fn cond(d: &Decision, t: &str) -> (String, String, String) {
    let c = d.status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == t).unwrap();
    (c["status"].as_str().unwrap().into(), c["reason"].as_str().unwrap().into(), c["message"].as_str().unwrap().into())
}

#[test]
fn a_new_server_waits_for_its_agent() {
    let d = decide(&server(json!(null)), Some(&policy(true)), &at(NOW));
    assert_eq!(d.phase, P::Enabling);
    assert_eq!(d.status["phase"], "Enabling");
    assert!(
        matches!(&d.verdict, Verdict::Progressing { reason: "Enabling", message } if message.contains("db-01.corp.example.com"))
    );
    assert_eq!(cond(&d, "AgentConnected").1, "NotRegistered");
    assert_eq!(cond(&d, "Reconciling").0, "True");
}

#[test]
fn a_missing_policy_stalls_naming_the_field() {
    let d = decide(&server(json!(null)), None, &at(NOW));
    assert_eq!(
        d.verdict,
        Verdict::Stalled {
            reason: "PolicyNotFound",
            message: "spec.policyRef: ReplicationPolicy gold not found".into()
        }
    );
    assert_eq!(cond(&d, "Stalled").0, "True");
}

#[test]
fn agent_registration_and_initial_sync_progress() {
    let d = decide(
        &server(json!({"phase": "Enabling", "agent": {"lastHeartbeatTime": "2026-11-27T09:59:50Z"},
                       "initialSync": {"bytesTotal": 1073741824, "bytesDone": 268435456}})),
        Some(&policy(true)),
        &at(NOW),
    );
    assert_eq!(d.phase, P::InitialReplication);
    assert_eq!(d.status["progression"], "initial replication: 256.0 MiB of 1.0 GiB (25%)");
    assert!(d.notices.iter().any(|n| n.reason == "InitialReplication" && n.note == "Enabling → InitialReplication"));
    assert_eq!(cond(&d, "AgentConnected").0, "True");
    // Look again when the heartbeat would go stale.
    assert_eq!(d.requeue_after, Some(Duration::from_secs(290)));
}

#[test]
fn protected_with_rpo_within_threshold_is_ready() {
    let d = decide(
        &server(json!({"phase": "InitialReplication", "agent": {"lastHeartbeatTime": "2026-11-27T09:59:59Z"},
                       "initialSync": {"bytesTotal": 10, "bytesDone": 10},
                       "latestRecoveryPoints": {"crashConsistent": {"id": "p1", "time": "2026-11-27T09:59:48Z", "kind": "CrashConsistent"}}})),
        Some(&policy(true)),
        &at(NOW),
    );
    assert_eq!(d.phase, P::Protected);
    assert_eq!(d.status["currentRpo"], "12s");
    assert_eq!(d.status["currentRpoSeconds"], 12);
    assert!(matches!(d.verdict, Verdict::Ready { .. }));
    assert_eq!(
        cond(&d, "RpoWithinThreshold"),
        ("True".into(), "WithinThreshold".into(), "RPO 12s, threshold 5m".into())
    );
    // Requeued exactly when the RPO would cross 5m without a new point.
    assert_eq!(d.requeue_after, Some(Duration::from_secs(288)));
}

#[test]
fn an_rpo_breach_raises_a_condition_and_one_event() {
    let s = server(json!({"phase": "Protected", "agent": {"lastHeartbeatTime": "2026-11-27T09:59:59Z"},
                          "latestRecoveryPoints": {"crashConsistent": {"id": "p1", "time": "2026-11-27T09:52:48Z", "kind": "CrashConsistent"}}}));
    let d = decide(&s, Some(&policy(true)), &at(NOW));
    assert_eq!(cond(&d, "RpoWithinThreshold").0, "False");
    assert_eq!(cond(&d, "RpoWithinThreshold").2, "RPO 7m12s exceeds the threshold 5m");
    assert!(matches!(d.verdict, Verdict::Progressing { reason: "RpoBreached", .. }));
    assert_eq!(d.notices.iter().filter(|n| n.reason == "RpoBreached").count(), 1);
    // The next reconcile, with the condition already recorded, does not repeat the event.
    let mut again = s.clone();
    again.status.as_mut().unwrap().conditions = serde_json::from_value(d.status["conditions"].clone()).unwrap();
    let d2 = decide(&again, Some(&policy(true)), &at(NOW));
    assert!(d2.notices.iter().all(|n| n.reason != "RpoBreached"));
}

#[test]
fn manual_resync_is_requested_once_per_token() {
    let mut s = server(json!({"phase": "Protected", "agent": {"lastHeartbeatTime": "2026-11-27T09:59:59Z"}}));
    s.spec.resync_token = Some("r1".into());
    let d = decide(&s, Some(&policy(true)), &at(NOW));
    assert_eq!(d.phase, P::Resynchronizing);
    assert_eq!(d.status["resync"]["reason"], "Manual");
    assert_eq!(d.status["resync"]["token"], "r1");
    // Once the agent completes it, the same token does not start another.
    s.status.as_mut().unwrap().phase = Some(P::Resynchronizing);
    s.status.as_mut().unwrap().resync = serde_json::from_value(json!({"reason": "Manual", "token": "r1",
        "requestTime": NOW, "completionTime": NOW}))
    .unwrap();
    let d = decide(&s, Some(&policy(true)), &at(NOW));
    assert_eq!(d.phase, P::Protected);
    assert!(d.status.get("resync").is_none());
}

#[test]
fn a_resync_request_after_failover_is_refused_with_the_reason() {
    let mut s = server(json!({"phase": "FailedOver"}));
    s.spec.resync_token = Some("r2".into());
    let d = decide(&s, Some(&policy(true)), &at(NOW));
    assert_eq!(d.phase, P::FailedOver);
    assert!(matches!(&d.verdict, Verdict::Stalled { reason: "InvalidRequest", message }
        if message == "spec.resyncToken: resync applies only while replicating (the server is FailedOver)"));
}

#[test]
fn failed_over_to_azure_says_no_vm_was_created() {
    let mut s = server(json!({"phase": "FailedOver", "failover": {"operation": "UnplannedFailover",
        "state": "Succeeded", "recoveredDisks": ["https://a.blob.core.windows.net/dr/recovered/dr/db-01/failover/p/os.vhd"]}}));
    s.spec.failover_target = serde_json::from_value(json!({"azure": {
        "subscriptionId": "00000000-0000-0000-0000-000000000000", "resourceGroup": "rg", "location": "westeurope",
        "vmSize": "Standard_D2s_v5", "subnetId": "/subscriptions/x/resourceGroups/n/providers/v/subnets/s"}}))
    .unwrap();
    let d = decide(&s, Some(&policy(true)), &at(NOW));
    assert_eq!(d.phase, P::FailedOver);
    let expected = "FailedOver: 1 disk(s) ready as VHD page blobs (status.failover.recoveredDisks); no Azure VM \
                    was created: the Azure Resource Manager stage is not implemented";
    assert_eq!(d.status["progression"], expected);
    assert!(matches!(&d.verdict, Verdict::Ready { reason: "FailedOver", message } if message == expected));
}

#[test]
fn tracking_lost_reported_by_the_agent_starts_a_resync() {
    let s = server(json!({"phase": "Protected", "agent": {"lastHeartbeatTime": "2026-11-27T09:59:59Z"},
                          "resync": {"reason": "TrackingLost", "requestTime": NOW, "message": "agent restarted after a crash"}}));
    let d = decide(&s, Some(&policy(true)), &at(NOW));
    assert_eq!(d.phase, P::Resynchronizing);
    assert_eq!(d.status["progression"], "resynchronizing (TrackingLost): sending only blocks that differ");
}

#[test]
fn a_policy_not_ready_keeps_the_server_reconciling() {
    let d = decide(&server(json!(null)), Some(&policy(false)), &at(NOW));
    assert!(matches!(&d.verdict, Verdict::Progressing { reason: "PolicyNotReady", .. }));
}
