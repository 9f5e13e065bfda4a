//! Lifecycle step 7, deletion: deleting a protected server removes its identity (agent
//! ServiceAccount, certificate and bootstrap Secrets) and its blobs; with `retainData`
//! the blobs stay.

use std::time::Duration;

use anyhow::ensure;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use siterecovery_e2e::lifecycle::World;
use siterecovery_e2e::wait_gone;
use siterecovery_store::ServerRef;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_servers_removes_identities_and_blobs_unless_retained() -> anyhow::Result<()> {
    let mut w = World::start("delete", &["db-01", "app-01"]).await?;
    let r = delete(&mut w).await;
    w.explain(r)
}

async fn delete(w: &mut World) -> anyhow::Result<()> {
    let servers = w.servers_api();
    for s in &w.servers {
        w.wait_point(&s.name, None).await?;
    }
    servers
        .patch("app-01", &PatchParams::default(), &Patch::Merge(&serde_json::json!({"spec": {"retainData": true}})))
        .await?;
    w.agents.clear();
    let store = w.store().await?;
    for s in ["db-01", "app-01"] {
        servers.delete(s, &DeleteParams::default()).await?;
    }
    for s in ["db-01", "app-01"] {
        wait_gone(&servers, s, Duration::from_secs(90)).await?;
    }
    let secrets: Api<Secret> = Api::namespaced(w.t.admin.clone(), w.ns());
    let left: Vec<String> = secrets
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .filter(|n| n.starts_with("sr-agent-") || n.starts_with("sr-bootstrap-"))
        .collect();
    ensure!(left.is_empty(), "identity Secrets left behind: {left:?}");
    let accounts: Api<ServiceAccount> = Api::namespaced(w.t.admin.clone(), w.ns());
    let sa: Vec<String> = accounts
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .filter(|n| n.starts_with("sr-agent-"))
        .collect();
    ensure!(sa.is_empty(), "agent ServiceAccounts left behind: {sa:?}");
    let gone = store.list_point_ids(&ServerRef::new(w.ns(), "db-01")?).await?;
    ensure!(gone.is_empty(), "db-01's points are still stored: {gone:?}");
    let kept = store.list_point_ids(&ServerRef::new(w.ns(), "app-01")?).await?;
    ensure!(!kept.is_empty(), "app-01 retains its data, but its points are gone");
    Ok(())
}
