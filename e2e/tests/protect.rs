//! Lifecycle step 1, protect: two servers with two disks each (one of an odd size, one
//! sparse) under a policy with a 5 s crash-consistent interval. Everything runs for real:
//! the operator as the chart's ServiceAccount, its process-server StatefulSet's pod as a
//! local process with the pod's own ServiceAccount (`siterecovery_e2e::pods`), the agents
//! as local processes with the certificates the operator issued, Azurite as Blob storage.
//! Recovery points reach the servers' status and restore bit-exact.

use anyhow::ensure;
use siterecovery_e2e::lifecycle::{World, same_content};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_replicate_and_their_points_restore_bit_exact() -> anyhow::Result<()> {
    let w = World::start("protect", &["db-01", "app-01"]).await?;
    let r = async {
        for (i, s) in w.servers.iter().enumerate() {
            let id = w.wait_point(&s.name, None).await?;
            let (m, restored) = w.restore(i, &id).await?;
            ensure!(m.disks.len() == 2 && m.disks[0].size == s.disks_size(0)?, "{}: manifest {m:?}", s.name);
            for ((disk, src), (_, copy)) in s.disks.iter().zip(&restored) {
                ensure!(same_content(src, copy)?, "{}/{disk}: the restored point differs from the source", s.name);
            }
        }
        Ok(())
    }
    .await;
    w.explain(r)
}
