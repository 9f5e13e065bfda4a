//! Lifecycle step 2, churn: while a writer changes both servers' disks (bursts of 64 KiB
//! writes with pauses, as applications write), recovery points keep advancing, the RPO
//! the operator reports stays within the policy's threshold, and the two servers, one
//! consistency group, get group points: the same point id on both, whole in the store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::ensure;
use siterecovery_api::ProtectedServer;
use siterecovery_api::server::ServerPhase;
use siterecovery_e2e::lifecycle::{World, write_pattern};
use siterecovery_e2e::wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_advance_and_rpo_stays_within_threshold_under_writes() -> anyhow::Result<()> {
    let w = World::start_grouped("churn", &["db-01", "app-01"], Some("erp")).await?;
    let r = churn(&w).await;
    w.explain(r)
}

async fn churn(w: &World) -> anyhow::Result<()> {
    let servers = w.servers_api();
    for s in &w.servers {
        wait_for(&servers, &s.name, Duration::from_secs(120), "phase Protected", |p: &ProtectedServer| {
            p.status.as_ref().and_then(|s| s.phase) == Some(ServerPhase::Protected)
        })
        .await?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let disks: Vec<_> = w.servers.iter().map(|s| s.disks[0].1.clone()).collect();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..16 {
                    n += 1;
                    for d in &disks {
                        // 64 KiB-aligned blocks spread over the first 6 MiB.
                        let at = (n * 7919 % 96) * 65536;
                        write_pattern(d, at, 65536, n)?;
                    }
                }
                // Now and then a longer lull, in which every server can reach a quiet
                // instant at once (where eBPF is unavailable, the checksum tracker of
                // image files needs two full comparisons without a write).
                std::thread::sleep(Duration::from_millis(if n.is_multiple_of(16 * 5) { 4000 } else { 700 }));
            }
            Ok(n)
        })
    };
    let threshold = 120; // fixtures::policy: rpoThreshold 2m
    let mut first: Vec<Option<String>> = vec![None; w.servers.len()];
    let mut worst = 0i64;
    for _ in 0..30 {
        for (i, s) in w.servers.iter().enumerate() {
            let st = servers.get(&s.name).await?.status.unwrap_or_default();
            let rpo = st.current_rpo_seconds.unwrap_or(0);
            worst = worst.max(rpo);
            ensure!(rpo <= threshold, "{}: RPO {rpo}s above the {threshold}s threshold", s.name);
            let id = st.latest_recovery_points.and_then(|l| l.crash_consistent).map(|c| c.id);
            if first[i].is_none() {
                first[i] = id;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Group points: the process server reports one only once every member has it.
    let group_point = |p: &ProtectedServer| {
        p.status.as_ref().and_then(|s| s.latest_recovery_points.as_ref()).and_then(|l| l.group_consistent.clone())
    };
    let first_group =
        wait_for(&servers, &w.servers[0].name, Duration::from_secs(90), "a group point", |p| group_point(p).is_some())
            .await?;
    let group = group_point(&first_group).expect("waited for");
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    for (i, s) in w.servers.iter().enumerate() {
        // Uploaded in order: once a member reports this group point or a newer one, it is stored.
        wait_for(&servers, &s.name, Duration::from_secs(60), "the group point in status", |p| {
            group_point(p).is_some_and(|g| g.id >= group.id)
        })
        .await?;
        let (m, _) = w.restore(i, &group.id).await?;
        ensure!(
            m.kind == siterecovery_store::PointKind::Group
                && m.group.as_deref() == Some("erp")
                && m.members == ["app-01", "db-01"]
                // Status times have whole seconds.
                && m.time.as_second() == group.time.0.as_second(),
            "{}: group point {} is {:?} of {:?} with {:?} at {}",
            s.name,
            group.id,
            m.kind,
            m.group,
            m.members,
            m.time
        );
    }
    ensure!(writes > 100, "the writer barely ran ({writes} writes)");
    // Points advanced during the churn, and the latest one restores.
    for (i, s) in w.servers.iter().enumerate() {
        let latest = w.wait_point(&s.name, first[i].as_deref()).await?;
        let (m, _) = w.restore(i, &latest).await?;
        ensure!(m.disks.len() == 2, "{}: {m:?}", s.name);
    }
    eprintln!("churn: {writes} writes per disk, worst RPO {worst}s");
    Ok(())
}
