use jiff::{SignedDuration, Timestamp};
use serde_json::json;

use super::*;
use crate::{DiskSize, PassStatus};

const GIB: u64 = 1 << 30;

fn t0() -> Timestamp {
    "2025-01-01T00:00:00Z".parse().unwrap()
}

fn at(secs: i64) -> Timestamp {
    t0() + SignedDuration::from_secs(secs)
}

fn agent(pass: Option<PassStatus>) -> AgentStatus {
    AgentStatus {
        tracker: "checksum-scan".into(),
        disks: vec![DiskSize { id: "disk-0".into(), size: GIB }, DiskSize { id: "disk-1".into(), size: 3 * GIB }],
        pass,
        ..Default::default()
    }
}

fn pass(id: u64, reason: &str, compared: [u64; 2], completed: Option<i64>) -> PassStatus {
    PassStatus {
        id,
        reason: reason.into(),
        message: format!("{reason} detail"),
        started: t0(),
        completed: completed.map(at),
        bytes_total: vec![GIB, 3 * GIB],
        bytes_compared: compared.to_vec(),
        bytes_resent: 7,
    }
}

fn server(phase: ServerPhase, initial: Option<SyncProgress>, resync: Option<ResyncStatus>) -> ProtectedServerStatus {
    ProtectedServerStatus { phase: Some(phase), initial_sync: initial, resync, ..Default::default() }
}

fn done_sync() -> SyncProgress {
    SyncProgress {
        bytes_total: 4 * GIB as i64,
        bytes_done: 4 * GIB as i64,
        percent: Some("100%".into()),
        start_time: Some(Time(at(-86400))),
        estimated_completion_time: None,
    }
}

#[test]
fn first_start_reports_the_initial_copy_until_the_pass_completes() {
    let mut m = Memory::default();
    assert!(!m.primed());
    assert_eq!(m.observe(&server(ServerPhase::InitialReplication, None, None), &agent(None)), None);
    assert!(m.primed());

    let f = m.fields(&agent(None), &[], at(0));
    assert_eq!(f["initialSync"], json!({"bytesTotal": 4 * GIB, "bytesDone": 0, "percent": "0%"}));
    assert_eq!(f["agent"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(f["agent"]["lastHeartbeatTime"], "2025-01-01T00:00:00Z");
    assert!(f["agent"].get("certificateExpiryTime").is_none(), "owned by the operator");
    assert!(f.get("resync").is_none());

    // A quarter compared after 10 s: 30 s to go.
    let running = agent(Some(pass(1, "InitialCopy", [GIB, 0], None)));
    let f = m.fields(&running, &[], at(10));
    assert_eq!(f["initialSync"]["bytesDone"], GIB);
    assert_eq!(f["initialSync"]["percent"], "25%");
    assert_eq!(f["initialSync"]["startTime"], "2025-01-01T00:00:00Z");
    assert_eq!(f["initialSync"]["estimatedCompletionTime"], "2025-01-01T00:00:40Z");
    assert_eq!(
        f["disks"][0],
        json!({"id": "disk-0", "sizeBytes": GIB, "tracker": "ChecksumScan",
        "sync": {"bytesTotal": GIB, "bytesDone": GIB, "percent": "100%", "startTime": "2025-01-01T00:00:00Z"}})
    );
    assert_eq!(f["disks"][1]["sync"]["bytesDone"], 0);

    let finished = agent(Some(pass(1, "InitialCopy", [GIB, 3 * GIB], Some(40))));
    let f = m.fields(&finished, &[], at(41));
    assert_eq!(
        f["initialSync"],
        json!({"bytesTotal": 4 * GIB, "bytesDone": 4 * GIB, "percent": "100%",
        "startTime": "2025-01-01T00:00:00Z"})
    );
    assert!(f.get("resync").is_none(), "the initial copy is not a resync");

    // The next pass (tracking lost later) is a resync; the initial sync stays complete.
    m.observe(&server(ServerPhase::Protected, Some(done_sync()), None), &finished);
    let f = m.fields(&agent(Some(pass(2, "TrackingLost", [0, 0], None))), &[], at(100));
    assert_eq!(f["initialSync"]["percent"], "100%");
    assert_eq!(f["resync"]["reason"], "TrackingLost");
}

#[test]
fn before_the_first_session_disks_are_sized_by_the_reporter() {
    let mut m = Memory::default();
    let idle = AgentStatus { tracker: "ebpf".into(), ..Default::default() };
    m.observe(&ProtectedServerStatus::default(), &idle);
    let f = m.fields(&idle, &[("disk-0".into(), 2 * GIB)], at(0));
    assert_eq!(f["disks"], json!([{"id": "disk-0", "sizeBytes": 2 * GIB, "tracker": "Ebpf"}]));
    assert_eq!(f["initialSync"]["bytesTotal"], 2 * GIB);
}

#[test]
fn an_interrupted_initial_copy_resumes_with_its_start_time() {
    let mut m = Memory::default();
    let earlier = SyncProgress {
        bytes_total: 4 * GIB as i64,
        bytes_done: GIB as i64,
        start_time: Some(Time(at(-3600))),
        ..Default::default()
    };
    m.observe(&server(ServerPhase::InitialReplication, Some(earlier), None), &agent(None));
    let f = m.fields(&agent(Some(pass(1, "AgentStarted", [GIB, GIB], None))), &[], at(10));
    assert_eq!(f["initialSync"]["startTime"], "2024-12-31T23:00:00Z");
    assert_eq!(f["initialSync"]["bytesDone"], 2 * GIB);
    assert!(f.get("resync").is_none(), "resuming the initial copy is no resync");
    // Its session dropped: the next session's pass carries on.
    let f = m.fields(&agent(Some(pass(2, "AgentStarted", [GIB, 3 * GIB], Some(20)))), &[], at(20));
    assert_eq!(f["initialSync"]["percent"], "100%");
    assert_eq!(f["initialSync"]["startTime"], "2024-12-31T23:00:00Z");
}

#[test]
fn an_agent_restart_after_the_initial_sync_is_a_tracking_lost_resync() {
    let mut m = Memory::default();
    let running = agent(Some(pass(1, "AgentStarted", [GIB, 0], None)));
    m.observe(&server(ServerPhase::Protected, Some(done_sync()), None), &running);
    let f = m.fields(&running, &[], at(5));
    assert_eq!(f["initialSync"]["startTime"], "2024-12-31T00:00:00Z");
    assert_eq!(f["initialSync"]["bytesDone"], 4 * GIB);
    assert_eq!(
        f["resync"],
        json!({"reason": "TrackingLost", "message": "AgentStarted detail", "requestTime": "2025-01-01T00:00:00Z",
            "bytesResent": 7})
    );
    let f = m.fields(&agent(Some(pass(1, "AgentStarted", [GIB, 3 * GIB], Some(9)))), &[], at(10));
    assert_eq!(f["resync"]["completionTime"], "2025-01-01T00:00:09Z");
}

#[test]
fn a_resize_is_reported_as_disk_resized() {
    let mut m = Memory::default();
    m.observe(&server(ServerPhase::Resynchronizing, Some(done_sync()), None), &agent(None));
    let f = m.fields(&agent(Some(pass(3, "DiskResized", [GIB, 0], None))), &[], at(5));
    assert_eq!(f["resync"]["reason"], "DiskResized");
    assert_eq!(f["resync"]["message"], "DiskResized detail");
}

#[test]
fn no_new_resync_is_reported_unless_replicating_forward() {
    let mut m = Memory::default();
    m.observe(&server(ServerPhase::FailedOver, Some(done_sync()), None), &agent(None));
    let f = m.fields(&agent(Some(pass(1, "AgentStarted", [0, 0], None))), &[], at(5));
    assert!(f.get("resync").is_none(), "{f}");
}

#[test]
fn a_manual_request_is_served_and_answered_with_its_token() {
    let mut m = Memory::default();
    let request = ResyncStatus {
        reason: ResyncReason::Manual,
        message: Some("requested through spec.resyncToken".into()),
        request_time: Time(at(-5)),
        completion_time: None,
        bytes_resent: None,
        token: Some("r1".into()),
    };
    let previous = agent(Some(pass(1, "AgentStarted", [GIB, 3 * GIB], Some(-60))));
    let asked = m.observe(&server(ServerPhase::Resynchronizing, Some(done_sync()), Some(request.clone())), &previous);
    assert_eq!(asked, Some(("Manual".to_owned(), "requested through spec.resyncToken".to_owned())));
    // Asked once only, while it is being served.
    assert_eq!(
        m.observe(&server(ServerPhase::Resynchronizing, Some(done_sync()), Some(request.clone())), &previous),
        None
    );

    // Until the pass starts, the request is kept as the operator wrote it.
    let f = m.fields(&previous, &[], at(0));
    assert_eq!(f["resync"]["token"], "r1");
    assert!(f["resync"].get("completionTime").is_none());

    let f = m.fields(&agent(Some(pass(2, "Manual", [GIB, 3 * GIB], Some(30)))), &[], at(31));
    assert_eq!(
        f["resync"],
        json!({"reason": "Manual", "message": "requested through spec.resyncToken", "requestTime": "2024-12-31T23:59:55Z",
            "completionTime": "2025-01-01T00:00:30Z", "bytesResent": 7, "token": "r1"})
    );
    let answered: ResyncStatus = serde_json::from_value(f["resync"].clone()).unwrap();
    let done = agent(Some(pass(2, "Manual", [GIB, 3 * GIB], Some(30))));
    assert_eq!(m.observe(&server(ServerPhase::Resynchronizing, Some(done_sync()), Some(answered)), &done), None);
}

#[test]
fn re_enabled_replication_waits_for_a_new_full_pass() {
    let mut m = Memory::default();
    let done = agent(Some(pass(1, "InitialCopy", [GIB, 3 * GIB], Some(10))));
    m.observe(&server(ServerPhase::InitialReplication, None, None), &done);
    assert_eq!(m.fields(&done, &[], at(11))["initialSync"]["percent"], "100%");
    // After a failback the operator removes initialSync and waits for a checksum pass.
    let asked = m.observe(&server(ServerPhase::InitialReplication, None, None), &done);
    assert_eq!(asked.map(|a| a.0).as_deref(), Some("InitialCopy"));
    assert_eq!(m.fields(&done, &[], at(12))["initialSync"]["bytesDone"], 0);
    let f = m.fields(&agent(Some(pass(2, "InitialCopy", [GIB, 3 * GIB], Some(20)))), &[], at(21));
    assert_eq!(f["initialSync"]["percent"], "100%");
    assert!(f.get("resync").is_none());
}

#[test]
fn kube_section_is_camel_case_and_optional() {
    let k: KubeConfig = serde_json::from_value(json!({"apiServer": "https://127.0.0.1:6443", "token": "/etc/sr/token",
        "apiServerCa": "/etc/sr/api-ca.crt"}))
    .unwrap();
    assert_eq!(k.api_server_ca.as_deref(), Some(std::path::Path::new("/etc/sr/api-ca.crt")));
    assert!(serde_json::from_value::<KubeConfig>(json!({"apiServer": "x", "token": "t", "tokn": 1})).is_err());
}

#[test]
fn app_consistency_reports_the_last_failure_until_a_point_follows_it() {
    let mut m = Memory::default();
    let quiet = m.fields(&agent(None), &[], at(0));
    assert!(quiet["agent"].get("appConsistency").is_none(), "nothing to say before any attempt");
    let mut a = agent(None);
    a.app_points_failed = 1;
    a.last_app_failure = Some(crate::app::AppFailure {
        time: at(100),
        reason: "PreHookFailed".into(),
        message: "db-quiesce exited with 1".into(),
    });
    let f = m.fields(&a, &[], at(101));
    assert_eq!(f["agent"]["appConsistency"]["failures"], 1);
    assert_eq!(f["agent"]["appConsistency"]["lastFailure"]["reason"], "PreHookFailed");
    // A point taken after the failure clears it from the status.
    a.app_points = 1;
    a.last_app_point = Some(generate_point_id_for_test(at(200)));
    let f = m.fields(&a, &[], at(201));
    assert_eq!(f["agent"]["appConsistency"]["points"], 1);
    assert!(f["agent"]["appConsistency"].get("lastFailure").is_none());
}

fn generate_point_id_for_test(t: Timestamp) -> String {
    siterecovery_store::generate_point_id(t, siterecovery_store::PointKind::App)
}
