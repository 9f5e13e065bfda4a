//! RPO on a block device (issue #4), the realistic case beside the image file: a loop
//! device over an image holding a mounted ext4 (`hack/bench-dataplane.sh` sets it up and
//! always tears it down), protected by the release agent with the eBPF tracker and the
//! mount point configured for its convergence freeze (≤ 2 s, no hooks), its own release
//! process server and Azurite container. Random 64 KiB buffered writes go into files on
//! the mounted filesystem at a steady rate while the RPO is sampled every second, as in
//! the image-file phase ([`super::phases::rpo`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::json;

use crate::report::Goal;

use super::compare::{Cmp, Judge};
use super::phases::{self, Baseline, Ours, Poll, Rpo, follow, percentile, report};
use super::procs::{Usage, strip_ansi};
use super::rig::{Rig, RigPaths, acknowledged_points, point_time};
use super::workload::fill_files;

const MIB: f64 = 1024.0 * 1024.0;

/// What to protect and how hard to write.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The loop device (e.g. `/dev/loop3`).
    pub device: PathBuf,
    /// Where its ext4 is mounted.
    pub mount: PathBuf,
    /// Files the writer rewrites, and the size of each, MiB.
    pub files: usize,
    /// See [`Setup::files`].
    pub file_mib: u64,
    /// `fdatasync` after every write.
    pub sync: bool,
    /// Seconds of writes.
    pub seconds: u64,
    /// Bytes per second written.
    pub rate: f64,
    /// How long the initial copy may take.
    pub timeout: Duration,
}

/// The figures of one block-device run.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Initial copy of the device until its first point is in the store.
    pub initial: Option<Ours>,
    /// The RPO phase.
    pub rpo: Option<Rpo>,
    /// Seconds between consecutive acknowledged points taken while the writes ran (from
    /// the times the point ids carry).
    pub point_gaps: Vec<f64>,
    /// Convergence freezes during the RPO phase: how long each held the filesystem, s.
    pub freezes: Vec<f64>,
    /// Of those, freezes ended by their 2 s limit rather than by a point.
    pub freezes_by_limit: usize,
    /// Intervals the agent skipped during the RPO phase (no quiet look, even frozen).
    pub skipped: usize,
    /// Agent and process server over the whole block-device run.
    pub agent_total: Option<Usage>,
    /// See [`Run::agent_total`].
    pub ps_total: Option<Usage>,
    /// The device's size, MiB.
    pub device_mib: f64,
}

/// Runs the block-device benchmark with a rig of its own under `work/blockdev`.
pub async fn run(base: &RigPaths, container: &str, setup: &Setup) -> anyhow::Result<Run> {
    let work = base.work.join("blockdev");
    std::fs::create_dir_all(&work)?;
    let mut out = Run { device_mib: device_bytes(&setup.device)? as f64 / MIB, ..Run::default() };
    eprintln!(
        "[dataplane] block device {} ({:.0} MiB), ext4 on {}: writing {} files of {} MiB",
        setup.device.display(),
        out.device_mib,
        setup.mount.display(),
        setup.files,
        setup.file_mib
    );
    let files = fill_files(&setup.mount, setup.files, setup.file_mib << 20, 0xb10c)?;
    let paths = RigPaths {
        work: work.clone(),
        disk: setup.device.clone(),
        agent_extra: json!({"tracking": "ebpf", "appConsistency": {"mountPoints": [setup.mount]}}),
        ..base.clone()
    };
    let mut rig = Rig::start(paths, container).await?;
    let mut agent = rig.start_agent("blockdev")?;

    let (since, started) = (Timestamp::now(), Instant::now());
    let base_figures = Baseline::take(&rig, None, None).await;
    out.initial = report(
        "block device, initial copy",
        follow(&mut rig, &mut agent, since, started, base_figures, None, setup.timeout, Poll::Coarse).await,
    );
    if out.initial.is_some() {
        let lines_before = log_lines(&agent.log).len();
        let points_before = acknowledged_points(&agent.log).len();
        let how = if setup.sync { "fdatasync after each write" } else { "buffered" };
        eprintln!(
            "[dataplane] block device RPO: {:.0} MB/s into files on ext4 ({how}) for {} s",
            setup.rate / 1e6,
            setup.seconds
        );
        out.rpo = report(
            "block device, rpo",
            phases::rpo(&mut rig, &mut agent, &files, setup.sync, setup.seconds, setup.rate).await,
        );
        let lines = log_lines(&agent.log);
        let phase = &lines[lines_before.min(lines.len())..];
        for l in phase.iter().filter(|l| l.contains("convergence freeze released")) {
            if let Some(held) = field(l, "held").and_then(parse_debug_duration) {
                out.freezes.push(held);
            }
            out.freezes_by_limit += usize::from(field(l, "by_limit") == Some("true"));
        }
        out.skipped = phase.iter().filter(|l| l.contains("no recovery point this interval")).count();
        let points = out.rpo.as_ref().map_or(0, |r| r.points);
        let times: Vec<Timestamp> = acknowledged_points(&agent.log)
            .iter()
            .skip(points_before)
            .take(points)
            .filter_map(|id| point_time(id))
            .collect();
        out.point_gaps = times.windows(2).map(|w| w[1].duration_since(w[0]).as_secs_f64()).collect();
    }
    out.agent_total = agent.stop(Duration::from_secs(20)).await;
    out.ps_total = Some(rig.ps_usage());
    let _ = rig.ps.stop(Duration::from_secs(20)).await;
    for f in &files {
        let _ = std::fs::remove_file(f);
    }
    Ok(out)
}

/// The table rows of a block-device run (`None`: not run or failed; every row n/a).
pub fn rows(run: Option<&Run>) -> Vec<Cmp> {
    let rpo = run.and_then(|r| r.rpo.as_ref());
    let acked = |p: f64| rpo.and_then(|r| percentile(&r.acked, p));
    let freezes = run.map(|r| r.freezes.as_slice()).unwrap_or_default();
    let gaps = run.map(|r| r.point_gaps.as_slice()).unwrap_or_default();
    vec![
        Cmp::ours("blockdev_initial", "s", run.and_then(|r| r.initial.as_ref()).map(|o| o.seconds)),
        Cmp::ours("rpo_blockdev_p99", "s", acked(99.0)).goal(Judge::Ours(Goal::AtMost(10.0))),
        Cmp::ours("rpo_blockdev_p50", "s", acked(50.0)),
        Cmp::ours("rpo_blockdev_max", "s", acked(100.0)),
        Cmp::ours("rpo_blockdev_stored_p99", "s", rpo.and_then(|r| percentile(&r.stored, 99.0))),
        Cmp::ours("rpo_blockdev_points_during_writes", "points", rpo.map(|r| r.points as f64)),
        Cmp::ours("rpo_blockdev_point_gap_max", "s", percentile(gaps, 100.0)),
        Cmp::ours("rpo_blockdev_skipped_intervals", "intervals", run.map(|r| r.skipped as f64)),
        Cmp::ours("rpo_blockdev_freezes", "freezes", run.map(|r| r.freezes.len() as f64)),
        Cmp::ours("rpo_blockdev_freeze_p50", "s", percentile(freezes, 50.0)),
        Cmp::ours("rpo_blockdev_freeze_max", "s", percentile(freezes, 100.0)),
        Cmp::ours("rpo_blockdev_freezes_by_limit", "freezes", run.map(|r| r.freezes_by_limit as f64)),
        Cmp::ours("rpo_blockdev_write_rate", "MiB/s", rpo.map(|r| r.written_mib_s)),
        Cmp::ours("rpo_blockdev_catch_up_after_writes", "s", rpo.and_then(|r| r.catch_up_s)),
        Cmp::ours("rpo_blockdev_max_ps_backlog", "MiB", rpo.map(|r| r.max_backlog_mib)),
        Cmp::ours("rpo_blockdev_sessions_failed", "sessions", rpo.map(|r| r.sessions_failed as f64)),
        Cmp::ours("rpo_blockdev_cpu_agent", "s", rpo.map(|r| r.agent.cpu_s)),
        Cmp::ours("rpo_blockdev_cpu_ps", "s", rpo.map(|r| r.ps.cpu_s)),
        Cmp::ours("blockdev_agent_peak_rss", "MiB", run.and_then(|r| r.agent_total).map(|u| u.peak_rss_mib)),
        Cmp::ours("blockdev_ps_peak_rss", "MiB", run.and_then(|r| r.ps_total).map(|u| u.peak_rss_mib)),
        Cmp::ours("blockdev_agent_cpu_total", "s", run.and_then(|r| r.agent_total).map(|u| u.cpu_s)),
        Cmp::ours("blockdev_ps_cpu_total", "s", run.and_then(|r| r.ps_total).map(|u| u.cpu_s)),
    ]
}

/// The run's context for the results file: settings and every sample.
pub fn context(setup: Option<&Setup>, run: Option<&Run>) -> serde_json::Value {
    json!({
        "device": setup.map(|s| &s.device), "mount": setup.map(|s| &s.mount),
        "device_mib": run.map(|r| r.device_mib),
        "files": setup.map(|s| s.files), "file_mib": setup.map(|s| s.file_mib),
        "fdatasync_each_write": setup.map(|s| s.sync),
        "seconds": setup.map(|s| s.seconds), "rate_mb_s": setup.map(|s| s.rate / 1e6),
        "tracker": "ebpf", "convergence_freeze": "mount point in appConsistency.mountPoints",
        "acked_samples": run.and_then(|r| r.rpo.as_ref()).map(|r| &r.acked),
        "stored_samples": run.and_then(|r| r.rpo.as_ref()).map(|r| &r.stored),
        "point_gaps": run.map(|r| &r.point_gaps),
        "freezes_held_s": run.map(|r| &r.freezes),
    })
}

/// Size of a block device (or file), from the end of it.
fn device_bytes(path: &Path) -> std::io::Result<u64> {
    use std::io::Seek as _;
    std::fs::File::open(path)?.seek(std::io::SeekFrom::End(0))
}

fn log_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log).unwrap_or_default().lines().map(strip_ansi).collect()
}

/// The value of `name=value` in a plain-text tracing line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=");
    let at = line.match_indices(&key).find(|(i, _)| *i == 0 || line.as_bytes()[i - 1] == b' ')?.0;
    line[at + key.len()..].split_whitespace().next()
}

/// Seconds of a `Duration`'s `Debug` text as tracing logs it (`Some(412.3ms)`, `1.2s`,
/// `850µs`); `None` for `None` or anything else.
fn parse_debug_duration(text: &str) -> Option<f64> {
    let t = text.strip_prefix("Some(").and_then(|t| t.strip_suffix(')')).unwrap_or(text);
    for (unit, per_second) in [("ns", 1e9), ("µs", 1e6), ("us", 1e6), ("ms", 1e3), ("s", 1.0)] {
        if let Some(n) = t.strip_suffix(unit) {
            return n.parse::<f64>().ok().map(|v| v / per_second);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_freeze_lines() {
        let l = "2026-11-28T01:00:00Z  INFO siterecovery_agent::app: convergence freeze released held=Some(412.5ms) by_limit=false";
        assert_eq!(field(l, "held"), Some("Some(412.5ms)"));
        assert_eq!(field(l, "by_limit"), Some("false"));
        assert_eq!(field(l, "limit"), None, "whole names only");
        assert_eq!(parse_debug_duration("Some(412.5ms)"), Some(0.4125));
        assert_eq!(parse_debug_duration("2.000417s"), Some(2.000417));
        assert_eq!(parse_debug_duration("850µs"), Some(0.00085));
        assert_eq!(parse_debug_duration("None"), None);
    }
}
