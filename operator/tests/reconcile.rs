//! The operator against the real local API server, running as the Helm chart's
//! ServiceAccount: policies get keys and conditions, servers get a least-privilege
//! agent identity and move through Enabling → InitialReplication → Protected from
//! reports written the way the agent and process server write them, RPO breaches are
//! raised, and deletion cleans up in the right order.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use siterecovery_api::field_manager::{AGENT, PROCESS_SERVER};
use siterecovery_api::{ConditionStatus, KstatusConditions, ProtectedServer, ReplicationPolicy, ServerPhase};
use siterecovery_e2e::fixtures::{ago, condition, events_for, policy, report, sas_secret, server};
use siterecovery_e2e::operator::{OperatorProcess, OperatorTest, client_as};
use siterecovery_e2e::{wait_for, wait_gone};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn policy_and_server_lifecycle_with_chart_rbac() -> anyhow::Result<()> {
    let t = OperatorTest::start(Path::new(env!("CARGO_BIN_EXE_siterecovery-operator")), "servers").await?;
    t.explain(scenario(&t.admin, &t.ns.name, &t.operator).await)
}

async fn scenario(admin: &Client, ns: &str, operator: &OperatorProcess) -> anyhow::Result<()> {
    let policies: Api<ReplicationPolicy> = Api::namespaced(admin.clone(), ns);
    let servers: Api<ProtectedServer> = Api::namespaced(admin.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    use siterecovery_api::policy::PolicyConditionType as PC;
    use siterecovery_api::server::ServerConditionType as SC;

    // A policy whose credential Secret is missing stalls, naming the field.
    policies.create(&PostParams::default(), &policy("gold")).await?;
    wait_for(&policies, "gold", WAIT, "Stalled: credential Secret missing", |p| {
        p.status.as_ref().and_then(|s| condition(&s.conditions, PC::STALLED)).is_some_and(|(s, _, m)| {
            s == ConditionStatus::True && m == "spec.target.credential.secretRef: Secret storage not found"
        })
    })
    .await?;
    // The data-encryption key was created meanwhile, without owner (it outlives the policy).
    let key = secrets.get("gold-encryption").await?;
    let data = key.data.clone().unwrap_or_default();
    let active = String::from_utf8(data["active"].0.clone())?;
    assert_eq!(data[&format!("key-{active}")].0.len(), 32, "a 256-bit key");
    assert!(key.metadata.owner_references.is_none());

    // Providing the Secret makes the policy Ready (credentials are re-read while broken).
    secrets.create(&PostParams::default(), &sas_secret()).await?;
    let ready = wait_for(&policies, "gold", WAIT, "Ready", |p| {
        p.status
            .as_ref()
            .and_then(|s| condition(&s.conditions, PC::READY))
            .is_some_and(|(s, _, _)| s == ConditionStatus::True)
    })
    .await?;
    let status = ready.status.clone().unwrap_or_default();
    assert_eq!(status.active_key_id.as_deref(), Some(active.as_str()));
    let storage = condition(&status.conditions, PC::StorageReachable).unwrap();
    assert_eq!((storage.0, storage.1.as_str()), (ConditionStatus::True, "Reachable"), "{storage:?}");
    assert_eq!(status.observed_generation, ready.metadata.generation);
    assert!(!serde_json::to_string(&ready)?.contains("c2VjcmV0"), "no secret in status");

    // A server gets a finalizer and a least-privilege agent identity, and waits for its agent.
    servers.create(&PostParams::default(), &server("db-01")).await?;
    let s = wait_for(&servers, "db-01", WAIT, "Enabling with finalizer", |s| {
        s.status.as_ref().and_then(|st| st.phase) == Some(ServerPhase::Enabling) && !s.finalizers().is_empty()
    })
    .await?;
    assert!(s.status.unwrap().progression.unwrap().contains("db-01.example.com"));
    let sa: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    let identity = sa.get("sr-agent-db-01").await?;
    assert_eq!(identity.owner_references()[0].name, "db-01");
    let role: Api<Role> = Api::namespaced(admin.clone(), ns);
    let rules = role.get("sr-agent-db-01").await?.rules.unwrap_or_default();
    assert!(rules.iter().all(|r| r.resource_names.as_deref() == Some(&["db-01".to_owned()][..])), "{rules:?}");
    Api::<RoleBinding>::namespaced(admin.clone(), ns).get("sr-agent-db-01").await?;

    // The agent, with its own token, reports; it can touch nothing else.
    let agent = client_as(admin, ns, "sr-agent-db-01").await?;
    let agent_servers: Api<ProtectedServer> = Api::namespaced(agent.clone(), ns);
    report(
        &agent_servers,
        "db-01",
        AGENT,
        json!({
            "agent": {"version": "0.1.0", "lastHeartbeatTime": ago(0)},
            "initialSync": {"bytesTotal": 4_294_967_296i64, "bytesDone": 1_073_741_824i64, "percent": "25%"}
        }),
    )
    .await?;
    servers.create(&PostParams::default(), &server("web-01")).await?;
    let denied = report(&agent_servers, "web-01", AGENT, json!({"agent": {"lastHeartbeatTime": ago(0)}})).await;
    assert!(denied.unwrap_err().to_string().contains("forbidden"), "an agent cannot write another server");
    let spec_change = agent_servers.patch("db-01", &PatchParams::apply(AGENT), &Patch::Apply(&server("db-01"))).await;
    assert!(spec_change.unwrap_err().to_string().contains("forbidden"), "an agent cannot change its spec");
    assert!(Api::<Secret>::namespaced(agent.clone(), ns).get("storage").await.is_err(), "nor read Secrets");

    let s = wait_for(&servers, "db-01", WAIT, "InitialReplication", |s| {
        s.status.as_ref().and_then(|st| st.phase) == Some(ServerPhase::InitialReplication)
    })
    .await?;
    assert_eq!(s.status.unwrap().progression.as_deref(), Some("initial replication: 1.0 GiB of 4.0 GiB (25%)"));

    // Copy done and a first recovery point from the process server: Protected, RPO shown.
    report(
        &agent_servers,
        "db-01",
        AGENT,
        json!({
            "agent": {"version": "0.1.0", "lastHeartbeatTime": ago(0)},
            "initialSync": {"bytesTotal": 4_294_967_296i64, "bytesDone": 4_294_967_296i64, "percent": "100%"}
        }),
    )
    .await?;
    report(
        &servers,
        "db-01",
        PROCESS_SERVER,
        json!({"latestRecoveryPoints": {
        "crashConsistent": {"id": "cc-1", "time": ago(3), "kind": "CrashConsistent"}}}),
    )
    .await?;
    let s = wait_for(&servers, "db-01", WAIT, "Protected and Ready", |s| {
        let st = s.status.clone().unwrap_or_default();
        st.phase == Some(ServerPhase::Protected)
            && condition(&st.conditions, SC::READY).is_some_and(|(s, _, _)| s == ConditionStatus::True)
    })
    .await?;
    let st = s.status.unwrap();
    let rpo = st.current_rpo_seconds.unwrap();
    assert!((3..30).contains(&rpo), "RPO {rpo}s");
    assert_eq!(condition(&st.conditions, SC::RpoWithinThreshold).unwrap().0, ConditionStatus::True);
    assert_eq!(st.initial_sync.unwrap().percent.as_deref(), Some("100%"), "the agent's fields are kept");

    // No new point for longer than the 2m threshold: breach condition, event and metric.
    report(
        &servers,
        "db-01",
        PROCESS_SERVER,
        json!({"latestRecoveryPoints": {
        "crashConsistent": {"id": "cc-2", "time": ago(200), "kind": "CrashConsistent"}}}),
    )
    .await?;
    wait_for(&servers, "db-01", WAIT, "RPO breached", |s| {
        s.status.as_ref().and_then(|st| condition(&st.conditions, SC::RpoWithinThreshold)).is_some_and(|(s, r, m)| {
            s == ConditionStatus::False && r == "RpoBreached" && m.contains("exceeds the threshold 2m")
        })
    })
    .await?;
    let events = events_for(admin, ns, "db-01").await?;
    assert!(events.iter().any(|(r, n)| r == "RpoBreached" && n.contains("exceeds")), "{events:?}");
    assert!(events.iter().any(|(r, n)| r == "Protected" && n == "InitialReplication → Protected"), "{events:?}");
    let (code, metrics) = operator.http_get("/metrics").await?;
    assert_eq!(code, 200);
    assert!(
        metrics.contains(&format!("siterecovery_server_rpo_seconds{{namespace=\"{ns}\",server=\"db-01\"}}")),
        "{metrics}"
    );
    assert!(metrics.contains("siterecovery_reconciles_total"), "{metrics}");
    assert_eq!(operator.http_get("/readyz").await?.0, 200);

    // The policy counts its servers and refuses deletion while they use it.
    wait_for(&policies, "gold", WAIT, "2 servers counted", |p| {
        p.status.as_ref().and_then(|s| s.protected_servers) == Some(2)
    })
    .await?;
    policies.delete("gold", &DeleteParams::default()).await?;
    wait_for(&policies, "gold", WAIT, "deletion blocked by servers", |p| {
        p.status
            .as_ref()
            .and_then(|s| condition(&s.conditions, PC::STALLED))
            .is_some_and(|(_, r, m)| r == "PolicyInUse" && m.contains("db-01, web-01"))
    })
    .await?;

    // Both servers have replicated data in Azurite; web-01 is to keep it.
    let data = data_store(&secrets).await?;
    for name in ["db-01", "web-01"] {
        write_point(&data, ns, name).await?;
    }
    let retain =
        json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer", "spec": {"retainData": true}});
    servers.patch("web-01", &PatchParams::apply("retention-test"), &Patch::Apply(&retain)).await?;
    wait_for(&servers, "web-01", WAIT, "retainData seen", |s| s.spec.retain_data).await?;

    // Deleting the servers removes their identities and (unless retained) their data;
    // then the policy goes too.
    for name in ["db-01", "web-01"] {
        servers.delete(name, &DeleteParams::default()).await?;
    }
    for name in ["db-01", "web-01"] {
        wait_gone(&servers, name, WAIT).await?;
        assert!(sa.get_opt(&format!("sr-agent-{name}")).await?.is_none(), "{name}'s ServiceAccount removed");
        assert!(role.get_opt(&format!("sr-agent-{name}")).await?.is_none(), "{name}'s Role removed");
    }
    wait_gone(&policies, "gold", WAIT).await?;
    assert!(secrets.get_opt("gold-encryption").await?.is_some(), "keys outlive the policy");
    let db = siterecovery_store::ServerRef::new(ns, "db-01")?;
    let web = siterecovery_store::ServerRef::new(ns, "web-01")?;
    assert!(data.list_point_ids(&db).await?.is_empty(), "db-01's points deleted with it");
    assert!(data.backend().list(&db.prefix()).await?.is_empty(), "and its chunks");
    assert_eq!(data.list_point_ids(&web).await?.len(), 1, "web-01 retained its data");
    let events = events_for(admin, ns, "db-01").await?;
    assert!(events.iter().any(|(r, n)| r == "DataDeleted" && n.contains("container dr-data")), "{events:?}");
    Ok(())
}

/// The store the policy points at (Azurite, its SAS, the operator-made key Secret).
async fn data_store(secrets: &Api<Secret>) -> anyhow::Result<siterecovery_store::Store> {
    let backend = siterecovery_store::AzureBlobBackend::with_sas(
        &siterecovery_e2e::fixtures::azurite_endpoint(),
        "dr-data",
        &siterecovery_e2e::fixtures::azurite_sas(),
    )?;
    backend.ensure_container().await?;
    let keys = secrets.get("gold-encryption").await?.data.unwrap_or_default();
    let keys = keys.into_iter().map(|(k, v)| (k, v.0)).collect();
    let keyring = siterecovery_store::Keyring::from_secret_data(&keys)?;
    Ok(siterecovery_store::Store::new(std::sync::Arc::new(backend), keyring, Default::default())?)
}

/// Replicates a small disk image of `name` as one recovery point.
async fn write_point(store: &siterecovery_store::Store, ns: &str, name: &str) -> anyhow::Result<()> {
    let dir = siterecovery_e2e::operator::TempDir::new("disk")?;
    let image = dir.0.join("os.img");
    std::fs::write(&image, format!("{name} disk contents ").repeat(10_000))?;
    let point = siterecovery_store::NewPoint {
        kind: siterecovery_store::PointKind::Crash,
        group: None,
        members: vec![],
        time: jiff::Timestamp::now(),
        id: None,
    };
    let disks = [siterecovery_store::DiskSource { id: "os".into(), path: image }];
    store.write_point(&siterecovery_store::ServerRef::new(ns, name)?, point, &disks).await?;
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_releases_the_lease() -> anyhow::Result<()> {
    let mut t = OperatorTest::start(Path::new(env!("CARGO_BIN_EXE_siterecovery-operator")), "stop").await?;
    let (admin, op_ns, operator) = (t.admin.clone(), &t.op_ns, &mut t.operator);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(admin.clone(), &op_ns.name);
    let held = wait_for(&leases, "siterecovery-operator", WAIT, "lease held", |l| {
        l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).is_some_and(|h| !h.is_empty())
    })
    .await;
    if let Err(e) = held {
        panic!("{e}\n--- operator log ---\n{}", operator.logs());
    }
    let exited = operator.terminate();
    assert!(matches!(exited, Ok(true)), "exit 0 on SIGTERM, got {exited:?}:\n{}", operator.logs());
    let lease = leases.get("siterecovery-operator").await?;
    let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    assert!(holder.is_empty(), "lease released on shutdown, holder {holder:?}");
    Ok(())
}
