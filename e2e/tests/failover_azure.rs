//! Failover to the `azure` target, data stage: a plan's test failover and failover turn
//! each disk into a fixed-VHD page blob in the policy's container (Azurite), equal to the
//! chosen recovery point byte for byte; the status names the blobs and says that the
//! managed disks and the VM are not created; cleanup deletes the test blobs, and a change
//! of recovery point replaces the failover's blobs.

use std::time::Duration;

use anyhow::ensure;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use siterecovery_api::server::{FailoverStatus, ServerPhase};
use siterecovery_api::{ProtectedServer, RecoveryPlan};
use siterecovery_e2e::fixtures::{azurite_endpoint, azurite_sas};
use siterecovery_e2e::lifecycle::{World, operate, write_pattern};
use siterecovery_e2e::wait_for;
use siterecovery_store::vhd::{DISK_TYPE_FIXED, FOOTER_LEN, parse_footer, vhd_data_size};
use siterecovery_store::{AzureBlobBackend, BlobBackend};

const CONTAINER: &str = "dr-data";

fn container() -> anyhow::Result<AzureBlobBackend> {
    Ok(AzureBlobBackend::with_sas(&azurite_endpoint(), CONTAINER, &azurite_sas())?)
}

/// The blob name behind a `recoveredDisks` URL of the policy's container.
fn blob_name(url: &str) -> anyhow::Result<String> {
    let prefix = format!("{}/{CONTAINER}/", azurite_endpoint().trim_end_matches('/'));
    url.strip_prefix(&prefix).map(str::to_string).ok_or_else(|| anyhow::anyhow!("{url} is not in {prefix}"))
}

/// Checks every VHD a block names against its recovery point restored independently.
async fn check_vhds(w: &World, block: &FailoverStatus) -> anyhow::Result<Vec<String>> {
    let point = block.recovery_point.as_ref().ok_or_else(|| anyhow::anyhow!("no recovery point in {block:?}"))?;
    let message = block.message.as_deref().unwrap_or_default();
    ensure!(message.contains("not implemented"), "the message says the VM is not created: {message}");
    let (_, restored) = w.restore(0, &point.id).await?;
    ensure!(block.recovered_disks.len() == restored.len(), "recovered {:?}", block.recovered_disks);
    let c = container()?;
    let mut names = Vec::new();
    for ((disk, copy), url) in restored.iter().zip(&block.recovered_disks) {
        ensure!(message.contains(url.as_str()), "the message names {url}: {message}");
        let name = blob_name(url)?;
        ensure!(name.ends_with(&format!("/{}/{disk}.vhd", point.id)), "{name}");
        let vhd = c.get(&name).await?;
        let source = std::fs::read(copy)?;
        let data = vhd_data_size(source.len() as u64) as usize;
        ensure!(vhd.len() == data + FOOTER_LEN, "{name}: {} bytes for a {}-byte disk", vhd.len(), source.len());
        ensure!(vhd[..source.len()] == source[..], "{name} differs from point {}", point.id);
        ensure!(vhd[source.len()..data].iter().all(|&b| b == 0), "{name}: padding is not zero");
        let footer = parse_footer(&vhd[data..]).map_err(anyhow::Error::msg)?;
        ensure!(footer.disk_type == DISK_TYPE_FIXED && footer.current_size == data as u64, "{footer:?}");
        names.push(name);
    }
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_target_recovers_disks_as_fixed_vhd_page_blobs() -> anyhow::Result<()> {
    let mut w = World::start("azfo", &["db-01"]).await?;
    let r = drill(&mut w).await;
    w.explain(r)
}

async fn drill(w: &mut World) -> anyhow::Result<()> {
    let servers = w.servers_api();
    let azure = json!({
        "subscriptionId": "00000000-0000-0000-0000-000000000000", "resourceGroup": "dr-rg",
        "location": "westeurope", "vmSize": "Standard_D2s_v5",
        "subnetId": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/net/providers/Microsoft.Network/virtualNetworks/v/subnets/s"
    });
    let target = json!({"spec": {"failoverTarget": {"local": null, "azure": azure}}});
    servers.patch("db-01", &PatchParams::default(), &Patch::Merge(&target)).await?;
    wait_for(&servers, "db-01", Duration::from_secs(120), "phase Protected", |p: &ProtectedServer| {
        p.status.as_ref().and_then(|s| s.phase) == Some(ServerPhase::Protected)
    })
    .await?;
    let first = w.wait_point("db-01", None).await?;
    let plans: Api<RecoveryPlan> = Api::namespaced(w.t.admin.clone(), w.ns());
    let plan: RecoveryPlan = serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "metadata": {"name": "dr"},
        "spec": {"groups": [{"name": "all", "servers": ["db-01"]}]}
    }))?;
    plans.create(&PostParams::default(), &plan).await?;

    // Test failover: VHDs under test-failover/, equal to the point; cleanup deletes them.
    operate(&plans, "dr", json!({"type": "TestFailover", "runId": "drill-1"})).await?;
    let status = servers.get("db-01").await?.status.unwrap_or_default();
    ensure!(status.phase == Some(ServerPhase::Protected), "replication goes on during a test failover");
    let tf = status.test_failover.ok_or_else(|| anyhow::anyhow!("no testFailover block"))?;
    let test_blobs = check_vhds(w, &tf).await?;
    ensure!(test_blobs.iter().all(|n| n.contains("/test-failover/")), "{test_blobs:?}");
    operate(&plans, "dr", json!({"type": "TestFailoverCleanup", "runId": "drill-1-cleanup"})).await?;
    let c = container()?;
    for name in &test_blobs {
        ensure!(!c.exists(name).await?, "{name} is still there after cleanup");
    }

    // Unplanned failover to the latest point, then back to the first one: the VHDs of the
    // superseded point are deleted, the new ones equal the first point.
    write_pattern(&w.servers[0].disks[0].1, 2 * 1024 * 1024, 300_000, 42)?;
    w.wait_point("db-01", Some(&first)).await?;
    w.agents.clear();
    operate(
        &plans,
        "dr",
        json!({"type": "UnplannedFailover", "runId": "dr-1", "recoveryPoint": {"selector": "LatestProcessed"}}),
    )
    .await?;
    wait_for(&servers, "db-01", Duration::from_secs(60), "phase FailedOver", |p: &ProtectedServer| {
        p.status.as_ref().and_then(|s| s.phase) == Some(ServerPhase::FailedOver)
    })
    .await?;
    // FailedOver here means the disks are ready, and the status says no VM exists.
    let s = wait_for(&servers, "db-01", Duration::from_secs(60), "the azure progression", |p: &ProtectedServer| {
        p.status.as_ref().and_then(|s| s.progression.as_deref()).is_some_and(|m| m.contains("no Azure VM was created"))
    })
    .await?;
    let f = s.status.and_then(|s| s.failover).ok_or_else(|| anyhow::anyhow!("no failover block"))?;
    let latest = check_vhds(w, &f).await?;
    ensure!(latest.iter().all(|n| n.contains("/failover/")), "{latest:?}");
    operate(
        &plans,
        "dr",
        json!({"type": "ChangeRecoveryPoint", "runId": "dr-2", "recoveryPoint": {"selector": "Named", "pointName": first}}),
    )
    .await?;
    let s =
        wait_for(&servers, "db-01", Duration::from_secs(60), "FailedOver at the first point", |p: &ProtectedServer| {
            let st = p.status.as_ref();
            st.and_then(|s| s.phase) == Some(ServerPhase::FailedOver)
                && st
                    .and_then(|s| s.failover.as_ref())
                    .and_then(|f| f.recovery_point.as_ref())
                    .is_some_and(|rp| rp.id == first)
        })
        .await?;
    let f = s.status.and_then(|s| s.failover).ok_or_else(|| anyhow::anyhow!("no failover block"))?;
    check_vhds(w, &f).await?;
    for name in &latest {
        ensure!(!c.exists(name).await?, "{name} of the superseded point is still there");
    }
    Ok(())
}
