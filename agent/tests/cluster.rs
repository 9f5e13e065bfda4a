//! The agent against the real local API server and the operator's own registration
//! endpoint and ProtectedServer reconciler (run in-process with the chart's RBAC):
//! `register` trades the bootstrap token for credentials and writes agent.json; the
//! reporter, authenticated with nothing but those files, moves the server through
//! InitialReplication to Protected, answers a manual resync, owns only its own status
//! fields, and can read no other server.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use siterecovery_agent::register::{self, RegisterRequest};
use siterecovery_agent::report::Reporter;
use siterecovery_agent::{AgentStatus, DiskConfig, PassRequest, PassStatus};
use siterecovery_api::ProtectedServer;
use siterecovery_api::server::{ChangeTracker, ResyncReason, ServerPhase};
use siterecovery_e2e::{TestNamespace, client, fixtures, install_crds, wait_for};
use support::{start_operator, text};

mod support;

const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

fn phase(s: &ProtectedServer) -> Option<ServerPhase> {
    s.status.as_ref().and_then(|s| s.phase)
}

fn pass(id: u64, reason: &str, total: u64, compared: u64, done: bool) -> PassStatus {
    PassStatus {
        id,
        reason: reason.into(),
        message: format!("{reason} pass"),
        started: jiff::Timestamp::now() - jiff::SignedDuration::from_secs(10),
        completed: done.then(jiff::Timestamp::now),
        bytes_total: vec![total],
        bytes_compared: vec![compared],
        bytes_resent: compared / 2,
    }
}

#[tokio::test]
async fn a_registered_agent_reports_its_way_to_protected() -> anyhow::Result<()> {
    let admin = client().await?;
    install_crds(&admin).await?;
    let op_ns = TestNamespace::create(&admin, "agent-op").await?;
    let ns_guard = TestNamespace::create(&admin, "agent").await?;
    let ns = ns_guard.name.as_str();
    let (addr, _stop) = start_operator(&admin, &op_ns.name, ns).await?;
    let servers: Api<ProtectedServer> = Api::namespaced(admin.clone(), ns);
    servers.create(&PostParams::default(), &fixtures::server("db-01")).await?;
    servers.create(&PostParams::default(), &fixtures::server("db-02")).await?;

    // The admin hands the token and the CA over; the agent registers with them.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let plain = wait_for(&secrets, "sr-bootstrap-db-01-token", WAIT, "bootstrap token", |s| {
        s.data.as_ref().is_some_and(|d| d.contains_key("token") && d.contains_key("ca.crt"))
    })
    .await?;
    let request = RegisterRequest {
        namespace: ns.to_owned(),
        name: "db-01".into(),
        token: text(&plain, "token"),
        hostname: "db-01.example.com".into(),
        machine_id: None,
    };
    let url = format!("https://localhost:{}", addr.port());
    let mut tries = 0;
    let bundle = loop {
        match register::register(&url, &text(&plain, "ca.crt"), &request).await {
            Ok(b) => break b,
            // NotReady until the agent's ServiceAccount and certificate exist.
            Err(e) if e.retryable() && tries < 30 => tries += 1,
            Err(e) => anyhow::bail!("registration: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("os.img");
    std::fs::File::create(&image)?.set_len(8 * MIB)?;
    let config = register::write_bundle(
        &dir.path().join("etc"),
        &bundle,
        &[DiskConfig { id: "os".into(), path: image }],
        Some(&url),
    )?;
    let kube = config.kube.clone().expect("a kube section");
    assert!(kube.api_server_ca.as_ref().is_some_and(|p| p.exists()), "the API server's CA was written");
    wait_for(&servers, "db-01", WAIT, "certificate expiry from registration", |s| {
        s.status.as_ref().and_then(|s| s.agent.as_ref()).is_some_and(|a| a.certificate_expiry_time.is_some())
    })
    .await?;

    // The reporter, from agent.json alone.
    let status = Arc::new(Mutex::new(AgentStatus { tracker: "checksum-scan".into(), ..Default::default() }));
    let requests = PassRequest::default();
    let mut reporter = Reporter::new(&config, status.clone(), requests.clone()).expect("kube section");
    let snapshot = |s: &Arc<Mutex<AgentStatus>>| s.lock().unwrap().clone();

    // Start: heartbeat, disks, an initial sync at 0 %; the operator sees the agent.
    reporter.report(&snapshot(&status)).await?;
    let s =
        wait_for(&servers, "db-01", WAIT, "InitialReplication", |s| phase(s) == Some(ServerPhase::InitialReplication))
            .await?;
    let st = s.status.clone().unwrap();
    let agent = st.agent.clone().unwrap();
    assert_eq!(agent.version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert!(agent.last_heartbeat_time.is_some());
    assert!(agent.certificate_expiry_time.is_some(), "the operator's field survives the agent's apply");
    assert_eq!(st.disks.len(), 1);
    assert_eq!(
        (st.disks[0].size_bytes, st.disks[0].tracker),
        (Some(8 * MIB as i64), Some(ChangeTracker::ChecksumScan))
    );
    let sync = st.initial_sync.clone().unwrap();
    assert_eq!((sync.bytes_total, sync.bytes_done), (8 * MIB as i64, 0));

    // Progress, then the first full pass completes: Protected.
    status.lock().unwrap().pass = Some(pass(1, "InitialCopy", 8 * MIB, 2 * MIB, false));
    reporter.report(&snapshot(&status)).await?;
    let s = servers.get("db-01").await?;
    let sync = s.status.unwrap().initial_sync.unwrap();
    assert_eq!((sync.bytes_done, sync.percent.as_deref()), (2 * MIB as i64, Some("25%")));
    assert!(sync.estimated_completion_time.is_some());
    status.lock().unwrap().pass = Some(pass(1, "InitialCopy", 8 * MIB, 8 * MIB, true));
    reporter.report(&snapshot(&status)).await?;
    wait_for(&servers, "db-01", WAIT, "Protected", |s| phase(s) == Some(ServerPhase::Protected)).await?;

    // The agent owns its fields only, on the status subresource.
    let s = servers.get("db-01").await?;
    let mine: Vec<_> = s
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some("siterecovery-agent"))
        .collect();
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!((mine[0].operation.as_deref(), mine[0].subresource.as_deref()), (Some("Apply"), Some("status")));
    let fields = serde_json::to_value(&mine[0].fields_v1)?;
    let owned = &fields["f:status"];
    for f in ["f:agent", "f:disks", "f:initialSync"] {
        assert!(owned.get(f).is_some(), "{f} in {owned}");
    }
    assert!(owned["f:agent"].get("f:version").is_some() && owned["f:agent"].get("f:lastHeartbeatTime").is_some());
    for f in ["f:phase", "f:conditions", "f:latestRecoveryPoints"] {
        assert!(owned.get(f).is_none(), "{f} is not the agent's: {owned}");
    }
    assert!(owned["f:agent"].get("f:certificateExpiryTime").is_none(), "{owned}");

    // Its token reads its own server and nothing else.
    let agent_client = siterecovery_agent::report::client(&kube)?;
    let other = Api::<ProtectedServer>::namespaced(agent_client.clone(), ns).get("db-02").await;
    assert!(matches!(other, Err(kube::Error::Api(ref e)) if e.code == 403), "{other:?}");
    let patch = json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
        "status": {"agent": {"version": "forged"}}});
    let forged = Api::<ProtectedServer>::namespaced(agent_client, ns)
        .patch_status("db-02", &PatchParams::apply("siterecovery-agent").force(), &Patch::Apply(&patch))
        .await;
    assert!(matches!(forged, Err(kube::Error::Api(ref e)) if e.code == 403), "{forged:?}");

    // A manual resync: the operator records the request, the reporter asks the agent for a
    // full pass and answers with the request's token when it is done.
    let spec = json!({"spec": {"resyncToken": "r1"}});
    servers.patch("db-01", &PatchParams::default(), &Patch::Merge(&spec)).await?;
    wait_for(&servers, "db-01", WAIT, "Resynchronizing", |s| phase(s) == Some(ServerPhase::Resynchronizing)).await?;
    reporter.report(&snapshot(&status)).await?;
    assert!(requests.is_pending(), "the agent was asked for a full pass");
    status.lock().unwrap().pass = Some(pass(2, "Manual", 8 * MIB, 8 * MIB, true));
    reporter.report(&snapshot(&status)).await?;
    let s = wait_for(&servers, "db-01", WAIT, "Protected again", |s| phase(s) == Some(ServerPhase::Protected)).await?;
    let resync = s.status.unwrap().resync.unwrap();
    assert_eq!((resync.reason, resync.token.as_deref()), (ResyncReason::Manual, Some("r1")));
    assert!(resync.completion_time.is_some());
    assert_eq!(resync.bytes_resent, Some(4 * MIB as i64));
    Ok(())
}
