//! Workload identity end to end through the operator binary: its pod environment is what
//! the AKS webhook injects (`AZURE_FEDERATED_TOKEN_FILE`, `AZURE_AUTHORITY_HOST`) plus the
//! test CA in `SR_STORAGE_CA_FILE`; storage is Azurite over HTTPS with `--oauth basic`,
//! and Entra ID's token endpoint a loopback stand-in that checks the client assertion is
//! the projected token (`siterecovery_e2e::entra`). A policy with `workloadIdentity`
//! gets its container checked (StorageReachable), and deleting a server deletes its
//! blobs with the token the operator exchanged.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use siterecovery_api::policy::PolicyConditionType as PC;
use siterecovery_api::{ConditionStatus, ProtectedServer, ReplicationPolicy};
use siterecovery_e2e::entra::{CLIENT_ID, OauthStorage, TENANT, workload_identity};
use siterecovery_e2e::fixtures::{condition, events_for, server, wait_event};
use siterecovery_e2e::operator::OperatorTest;
use siterecovery_e2e::{wait_for, wait_gone};
use siterecovery_store::{DiskSource, Keyring, NewPoint, PointKind, ServerRef, Store};

const WAIT: Duration = Duration::from_secs(60);
const CONTAINER: &str = "dr-wi";

#[tokio::test]
async fn the_operator_checks_the_target_and_deletes_data_with_workload_identity() -> anyhow::Result<()> {
    let storage = OauthStorage::start().await?;
    let binary = Path::new(env!("CARGO_BIN_EXE_siterecovery-operator"));
    let t = OperatorTest::start_with_env(binary, "wi", &storage.pod_env()).await?;
    let result = scenario(&t, &storage).await;
    if result.is_err() {
        eprintln!("entra: {:?}", *storage.entra.state());
    }
    t.explain(result)
}

async fn scenario(t: &OperatorTest, storage: &OauthStorage) -> anyhow::Result<()> {
    let ns = &t.ns.name;
    let policies: Api<ReplicationPolicy> = Api::namespaced(t.admin.clone(), ns);
    let servers: Api<ProtectedServer> = Api::namespaced(t.admin.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(t.admin.clone(), ns);

    let policy: ReplicationPolicy = serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ReplicationPolicy",
        "metadata": {"name": "gold"},
        "spec": {
            "rpoThreshold": "2m", "crashConsistentInterval": "5s", "retention": {"window": "24h"},
            "target": {"endpoint": storage.azurite.endpoint(), "container": CONTAINER,
                       "credential": {"workloadIdentity": {"clientId": CLIENT_ID, "tenantId": TENANT}}}
        }
    }))?;
    policies.create(&PostParams::default(), &policy).await?;
    // The operator creates the container itself: only a token it got for the projected
    // ServiceAccount token lets it.
    wait_for(&policies, "gold", WAIT, "StorageReachable with workload identity", |p| {
        p.status
            .as_ref()
            .and_then(|s| condition(&s.conditions, PC::StorageReachable))
            .is_some_and(|(s, r, _)| s == ConditionStatus::True && r == "Reachable")
    })
    .await?;
    assert!(storage.entra.state().issued.get("assertion").is_some_and(|n| *n >= 1));

    // A server with replicated data (written as a process server would, same identity).
    servers.create(&PostParams::default(), &server("db-01")).await?;
    wait_for(&servers, "db-01", WAIT, "the cleanup finalizer", |s| {
        s.metadata.finalizers.as_ref().is_some_and(|f| f.iter().any(|f| f == "siterecovery.io/cleanup"))
    })
    .await?;
    let keys = secrets.get("gold-encryption").await?.data.unwrap_or_default();
    let keyring = Keyring::from_secret_data(&keys.into_iter().map(|(k, v)| (k, v.0)).collect())?;
    let backend = storage.connector().backend(&storage.azurite.endpoint(), CONTAINER, &workload_identity())?;
    let store = Store::new(Arc::new(backend), keyring, Default::default())?;
    let db = ServerRef::new(ns.as_str(), "db-01")?;
    let dir = siterecovery_e2e::operator::TempDir::new("wi-disk")?;
    let image = dir.0.join("os.img");
    std::fs::write(&image, "db-01 disk contents ".repeat(10_000))?;
    let point =
        NewPoint { kind: PointKind::Crash, group: None, members: vec![], time: jiff::Timestamp::now(), id: None };
    store.write_point(&db, point, &[DiskSource { id: "os".into(), path: image }]).await?;
    assert_eq!(store.list_point_ids(&db).await?.len(), 1);

    servers.delete("db-01", &DeleteParams::default()).await?;
    wait_gone(&servers, "db-01", WAIT).await?;
    assert!(store.list_point_ids(&db).await?.is_empty(), "points deleted with the server");
    assert!(store.backend().list(&db.prefix()).await?.is_empty(), "and its chunks");
    wait_event(&t.admin, ns, "db-01", "DataDeleted", &format!("container {CONTAINER}")).await?;
    let events = events_for(&t.admin, ns, "db-01").await?;
    assert!(!events.iter().any(|(r, _)| r == "DataKept"), "{events:?}");
    assert_eq!(storage.entra.state().refused, Vec::<String>::new());
    Ok(())
}
