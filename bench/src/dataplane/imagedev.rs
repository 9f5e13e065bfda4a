//! Initial replication and incremental with the agent protecting a **block device**, as
//! on a real server: a loop device over a copy of the benchmark's image
//! (`hack/bench-dataplane.sh` sets it up as root and always detaches it), tracked with
//! eBPF, with its own release process server and Azurite container. The churn is the
//! image-file phase's (same seed, so the same bytes at the same offsets), written to the
//! device and fsynced so it reaches the block layer; the peers' figures are those of the
//! same bytes (the `image` phase's runs, or [`super::phases::peers_only`]).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::json;

use crate::report::Goal;

use super::compare::{Cmp, Judge, Ratio};
use super::peers::Backup;
use super::phases::{self, Baseline, CHURN_SEED, Incremental, Ours, PeerRun, Poll, follow, report};
use super::procs::Usage;
use super::rig::{Rig, RigPaths};
use super::workload::{Churn, byte_len, churn, hash_file};

const MIB: f64 = 1024.0 * 1024.0;
/// The product's chunk size, MiB (the benchmark's default).
const CHUNK_MIB: f64 = siterecovery_store::DEFAULT_CHUNK_SIZE as f64 / MIB;

/// The device and the phase's settings.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The loop device over the image's copy (e.g. `/dev/loop4`).
    pub device: PathBuf,
    /// Share of the device the churn rewrites (0.01: 1 %).
    pub fraction: f64,
    /// How long one replication may take.
    pub timeout: Duration,
    /// Pause between the first point and the churn, so the initial copy's uploads and
    /// settling are over, as they are in the image-file phase (whose churn follows
    /// restic's backup).
    pub settle: Duration,
    /// `perf record` the initial replication into this directory.
    pub perf: Option<PathBuf>,
}

/// The figures of one run.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Size of the device, MiB.
    pub device_mib: f64,
    /// Agent start → first point in the store.
    pub initial: Option<Ours>,
    /// End of the churn → first point taken after it in the store.
    pub incremental: Option<Ours>,
    /// What the churn wrote.
    pub churn: Churn,
    /// BLAKE3 of the device after the churn.
    pub churned: Option<blake3::Hash>,
    /// Agent and process server over the whole run.
    pub agent_total: Option<Usage>,
    /// See [`Run::agent_total`].
    pub ps_total: Option<Usage>,
}

/// Runs the phase with a rig of its own under `work/imagedev`.
pub async fn run(base: &RigPaths, container: &str, setup: &Setup, azurite: Option<u32>) -> anyhow::Result<Run> {
    let work = base.work.join("imagedev");
    std::fs::create_dir_all(&work)?;
    let size = byte_len(&mut std::fs::File::open(&setup.device)?)?;
    let mut out = Run { device_mib: size as f64 / MIB, ..Run::default() };
    eprintln!(
        "[dataplane] block device {} ({:.0} MiB, a copy of the image): initial replication with eBPF tracking",
        setup.device.display(),
        out.device_mib
    );
    let paths = RigPaths {
        work: work.clone(),
        disk: setup.device.clone(),
        agent_extra: json!({"tracking": "ebpf"}),
        ..base.clone()
    };
    let mut rig = Rig::start(paths, container).await?;
    let perf = setup.perf.as_deref().map(|d| (d, "initial-blockdev"));
    let (initial, agent) = phases::initial(&mut rig, azurite, setup.timeout, perf).await;
    out.initial = initial;
    let Some(mut agent) = agent.filter(|_| out.initial.is_some()) else {
        let _ = rig.ps.stop(Duration::from_secs(20)).await;
        anyhow::bail!("no first point on the block device: the incremental is not measured");
    };
    tokio::time::sleep(setup.settle).await;

    let base_figures = Baseline::take(&rig, Some(&agent), azurite).await;
    out.churn = churn(&setup.device, setup.fraction, CHURN_SEED)?;
    let (since, started) = (Timestamp::now(), Instant::now());
    eprintln!(
        "[dataplane] block device churn: {} blocks of 64 KiB ({:.1} MiB), fsynced",
        out.churn.blocks,
        out.churn.bytes as f64 / MIB
    );
    out.incremental = report(
        "block device, incremental",
        follow(&mut rig, &mut agent, since, started, base_figures, azurite, setup.timeout, Poll::Fine).await,
    );
    out.churned = report("hashing the churned device", hash_file(&setup.device).map_err(Into::into));
    out.agent_total = agent.stop(Duration::from_secs(20)).await;
    out.ps_total = Some(rig.ps_usage());
    let _ = rig.ps.stop(Duration::from_secs(20)).await;
    Ok(out)
}

/// The peers' runs on the same bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peers<'a> {
    /// restic's first backup of the image.
    pub restic_initial: Option<&'a (PeerRun, Backup)>,
    /// restic's second backup and rsync after the same churn.
    pub incremental: Option<&'a Incremental>,
}

/// The table rows (`run` `None`: not run or failed; every figure of ours n/a).
pub fn rows(run: Option<&Run>, peers: Peers<'_>) -> Vec<Cmp> {
    let init = run.and_then(|r| r.initial.as_ref());
    let inc = run.and_then(|r| r.incremental.as_ref());
    let ri = peers.restic_initial;
    let pi = peers.incremental;
    let size = run.map_or(0.0, |r| r.device_mib);
    let same = match (run.and_then(|r| r.churned), pi.and_then(|p| p.churned)) {
        (Some(a), Some(b)) => Some(if a == b { 1.0 } else { 0.0 }),
        _ => None,
    };
    let changed_zstd = run.filter(|r| r.churn.bytes > 0).map(|r| r.churn.zstd_bytes as f64 / MIB);
    let mut rows = vec![
        Cmp::ours("initial_blockdev_vs_restic", "s", init.map(|o| o.seconds))
            .vs("restic backup (image file)", ri.map(|r| r.0.timed.wall_s), Ratio::Speedup)
            .goal(Judge::Ratio(Goal::AtLeast(2.0))),
        Cmp::ours("initial_blockdev_throughput", "MiB/s", init.map(|o| size / o.seconds)),
        Cmp::ours("initial_blockdev_startup", "s", init.and_then(|o| o.first_read_s)),
        Cmp::ours("initial_blockdev_first_pass", "s", init.and_then(|o| o.compared_by(size / CHUNK_MIB))),
        Cmp::ours("initial_blockdev_ps_received_all", "s", init.and_then(Ours::received_all_by)),
        Cmp::ours("initial_blockdev_ps_uploaded_all", "s", init.and_then(Ours::uploaded_all_by)),
        Cmp::ours("initial_blockdev_point_to_store", "s", init.and_then(Ours::point_to_store_s)),
        Cmp::ours("initial_blockdev_cpu_agent_plus_ps", "s", init.map(|o| o.agent.cpu_s + o.ps_cpu_s)).vs(
            "restic+rclone",
            ri.map(|r| r.0.timed.cpu_s),
            Ratio::OursOverPeer,
        ),
        Cmp::ours("initial_blockdev_cpu_agent", "s", init.map(|o| o.agent.cpu_s)),
        Cmp::ours("initial_blockdev_cpu_ps", "s", init.map(|o| o.ps_cpu_s)),
        Cmp::ours("initial_blockdev_cpu_azurite", "s", init.and_then(|o| o.azurite_cpu_s)).vs(
            "restic backup",
            ri.and_then(|r| r.0.azurite_cpu_s),
            Ratio::OursOverPeer,
        ),
        Cmp::ours("initial_blockdev_wire", "MiB", init.and_then(|o| o.wire_mib)),
        Cmp::ours("initial_blockdev_uploaded", "MiB", init.map(|o| o.uploaded_mib)),
    ];
    rows.extend(phases::incremental_rows(
        "incremental_blockdev",
        inc,
        ("restic backup (image file)", pi.and_then(|p| p.restic.as_ref()).map(|r| r.0.timed.wall_s)),
        ("rsync --inplace (image file)", pi.and_then(|p| p.rsync.as_ref()).map(|r| r.0.wall_s)),
    ));
    rows.extend([
        Cmp::ours("incremental_blockdev_wire", "MiB", inc.and_then(|o| o.wire_mib))
            .vs("changed bytes, zstd -3", changed_zstd, Ratio::OursOverPeer)
            .goal(Judge::Ratio(Goal::AtMost(1.1))),
        Cmp::ours("incremental_blockdev_ps_received_plaintext", "MiB", inc.map(|o| o.received_mib)),
        Cmp::ours("incremental_blockdev_uploaded", "MiB", inc.map(|o| o.uploaded_mib)),
        Cmp::ours("incremental_blockdev_cpu_agent", "s", inc.map(|o| o.agent.cpu_s)),
        Cmp::ours("incremental_blockdev_cpu_ps", "s", inc.map(|o| o.ps_cpu_s)),
        Cmp::ours("incremental_blockdev_sessions_failed", "sessions", inc.map(|o| o.sessions_failed as f64)),
        Cmp::ours("incremental_blockdev_same_bytes_as_peers", "1=yes", same),
        Cmp::ours("imagedev_agent_peak_rss", "MiB", run.and_then(|r| r.agent_total).map(|u| u.peak_rss_mib)),
        Cmp::ours("imagedev_ps_peak_rss", "MiB", run.and_then(|r| r.ps_total).map(|u| u.peak_rss_mib)),
    ]);
    rows
}

/// The run's context for the results file.
pub fn context(setup: Option<&Setup>, run: Option<&Run>) -> serde_json::Value {
    json!({
        "device": setup.map(|s| &s.device),
        "device_mib": run.map(|r| r.device_mib),
        "tracker": "ebpf",
        "settle_before_churn_s": setup.map(|s| s.settle.as_secs_f64()),
        "churn": run.map(|r| json!({"blocks_64k": r.churn.blocks, "bytes": r.churn.bytes,
                                     "zstd3_bytes": r.churn.zstd_bytes, "regions_4mib_touched": r.churn.regions_4mib})),
        "churned_blake3": run.and_then(|r| r.churned).map(|h| h.to_hex().to_string()),
        "initial_timeline": run.and_then(|r| r.initial.as_ref()).map(|o| &o.timeline),
        "incremental_timeline": run.and_then(|r| r.incremental.as_ref()).map(|o| &o.timeline),
    })
}
