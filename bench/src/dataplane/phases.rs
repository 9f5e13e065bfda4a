//! The benchmark's phases, each doing the same work with our data plane and with the
//! peers, one after the other on the same image: initial replication, an incremental
//! after churn, restore, and RPO under sustained writes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jiff::Timestamp;

use super::compare::{Cmp, Judge, Ratio};
use super::peers::{Backup, Restic, Timed, rsync};
use super::procs::{Proc, Usage, cpu_seconds, tcp_bytes_acked_to};
use super::rig::{Rig, acknowledged_points, point_time};
use super::workload::{Churn, PacedWriter, churn, hash_file};
use crate::report::Goal;

const MIB: f64 = 1024.0 * 1024.0;

/// Our side of a replication phase.
#[derive(Debug, Clone, Default)]
pub struct Ours {
    /// From the start of the phase (agent start; end of the churn) until the process
    /// server wrote the first point taken after it to the store.
    pub seconds: f64,
    /// Agent CPU during the phase, and its peak RSS so far.
    pub agent: Usage,
    /// Process-server CPU seconds during the phase.
    pub ps_cpu_s: f64,
    /// Azurite CPU seconds during the phase.
    pub azurite_cpu_s: Option<f64>,
    /// Bytes on the agent's TCP connection (TLS included), MiB.
    pub wire_mib: Option<f64>,
    /// Plaintext chunk bytes the process server received, MiB.
    pub received_mib: f64,
    /// Bytes the process server uploaded, MiB.
    pub uploaded_mib: f64,
    /// Replication sessions that ended in an error (the agent reconnected).
    pub sessions_failed: usize,
    /// From the start of the phase until the agent's `/metrics` first showed a chunk read
    /// after it (polled as [`Poll`] says; a chunk counts once read, hashed and
    /// compressed): in an incremental, the wait for the agent's next interval; `None` when not seen.
    pub first_read_s: Option<f64>,
    /// The last poll before [`Ours::first_read_s`] (the start of the phase if none):
    /// nothing had been read then, so the replication began after it.
    pub quiet_s: f64,
    /// From the start of the phase until the instant the point names (its quiet look);
    /// the rest of [`Ours::seconds`] is the point's marker, its acknowledgement and the
    /// process server's uploads and manifest.
    pub point_s: Option<f64>,
    /// Every poll ([`Poll`]): seconds since the start of the phase, chunks the agent had
    /// compared, MiB the process server had received (plaintext) and uploaded,
    /// each counted from the start of the phase.
    pub timeline: Vec<[f64; 4]>,
}

impl Ours {
    /// The replication itself, first chunk read → point in the store, bounded from above:
    /// from the last poll that saw no read yet (at most one poll too long: 10 ms in an
    /// incremental).
    pub fn replication_s(&self) -> Option<f64> {
        self.first_read_s.map(|_| self.seconds - self.quiet_s)
    }

    /// The point's instant → the point in the store.
    pub fn point_to_store_s(&self) -> Option<f64> {
        self.point_s.map(|p| self.seconds - p)
    }

    /// Seconds until the agent had compared `chunks` chunks (a whole pass over a disk of
    /// that many chunks, in an initial copy).
    pub fn compared_by(&self, chunks: f64) -> Option<f64> {
        self.timeline.iter().find(|s| s[1] >= chunks).map(|s| s[0])
    }

    /// Seconds until the process server had received everything it received in the phase.
    pub fn received_all_by(&self) -> Option<f64> {
        let all = self.timeline.last()?[2];
        self.timeline.iter().find(|s| s[2] >= all).map(|s| s[0])
    }

    /// Seconds until the process server had uploaded all chunk data of the phase (within
    /// 1 MiB: the manifests come last).
    pub fn uploaded_all_by(&self) -> Option<f64> {
        let all = self.timeline.last()?[3];
        self.timeline.iter().find(|s| s[3] >= all - 1.0).map(|s| s[0])
    }
}

/// The incremental's rows against restic and rsync (`prefix`: `incremental` or
/// `incremental_blockdev`). The goal (≥ 15× faster than each) is judged on the
/// replication: from the agent's first read after the churn to the point in the store, as
/// restic's and rsync's runs are timed from their start. The time from the end of the
/// churn, which adds the wait for the agent's next interval (0 to one interval: the
/// policy's RPO setting, as a peer's schedule is), is reported beside it.
pub fn incremental_rows(
    prefix: &str,
    ours: Option<&Ours>,
    restic: (&str, Option<f64>),
    rsync: (&str, Option<f64>),
) -> Vec<Cmp> {
    let mut rows = Vec::new();
    for (peer, value) in [restic, rsync] {
        let tool = peer.split_whitespace().next().unwrap_or(peer);
        rows.push(Cmp::ours(format!("{prefix}_vs_{tool}"), "s", ours.map(|o| o.seconds)).vs(
            peer,
            value,
            Ratio::Speedup,
        ));
        rows.push(
            Cmp::ours(format!("{prefix}_replication_vs_{tool}"), "s", ours.and_then(Ours::replication_s))
                .vs(peer, value, Ratio::Speedup)
                .goal(Judge::Ratio(Goal::AtLeast(15.0))),
        );
    }
    rows.push(Cmp::ours(format!("{prefix}_wait_for_interval"), "s", ours.and_then(|o| o.first_read_s)));
    rows.push(Cmp::ours(format!("{prefix}_point_to_store"), "s", ours.and_then(Ours::point_to_store_s)));
    rows
}

/// The seed of the incremental phases' churn: the same bytes at the same offsets for the
/// image file, the block device and the peers.
pub const CHURN_SEED: u64 = 0x5eed;

/// A peer run with the Azurite CPU it caused.
#[derive(Debug, Clone, Default)]
pub struct PeerRun {
    /// The run.
    pub timed: Timed,
    /// Azurite CPU seconds during it.
    pub azurite_cpu_s: Option<f64>,
}

/// Azurite's CPU seconds so far (its pid, when known).
pub fn azurite_cpu(pid: Option<u32>) -> Option<f64> {
    cpu_seconds(pid?).ok()
}

/// Starts the agent, waits until the process server has written its first point to the
/// store, and leaves it running (its in-memory state, such as the block hashes deltas are
/// computed from, is part of what later phases measure).
/// With `perf` set, agent, process server and Azurite are sampled by `perf record` into
/// `<dir>/<name>.data` until the point is in the store.
pub async fn initial(
    rig: &mut Rig,
    azurite: Option<u32>,
    timeout: Duration,
    perf: Option<(&Path, &str)>,
) -> (Option<Ours>, Option<Proc>) {
    let started = Instant::now();
    let since = Timestamp::now();
    let mut agent = match rig.start_agent("run") {
        Ok(a) => a,
        Err(e) => return (report("ours, initial", Err(e)), None),
    };
    let recorder = perf.and_then(|(dir, name)| {
        let pids = [("agent", Some(agent.pid())), ("process-server", Some(rig.ps.pid())), ("azurite", azurite)];
        report("perf record", super::procs::PerfRecord::start(&pids, &dir.join(format!("{name}.data"))))
    });
    let baseline = Baseline { cpu_s: 0.0, wire: 0, ..Baseline::take(rig, None, azurite).await };
    let ours = follow(rig, &mut agent, since, started, baseline, azurite, timeout, Poll::Coarse).await;
    if let Some(r) = recorder {
        report("perf record", r.stop());
    }
    (report("ours, initial", ours), Some(agent))
}

/// Figures read before a phase, to subtract.
#[derive(Debug, Clone, Copy, Default)]
pub struct Baseline {
    cpu_s: f64,
    ps_cpu_s: f64,
    azurite_cpu_s: Option<f64>,
    wire: u64,
    received: f64,
    uploaded: f64,
}

impl Baseline {
    /// Reads the counters now.
    pub async fn take(rig: &Rig, agent: Option<&Proc>, azurite: Option<u32>) -> Self {
        let c = rig.counters().await.unwrap_or_default();
        Self {
            cpu_s: agent.and_then(|a| cpu_seconds(a.pid()).ok()).unwrap_or(0.0),
            ps_cpu_s: rig.ps_usage().cpu_s,
            azurite_cpu_s: azurite_cpu(azurite),
            wire: tcp_bytes_acked_to(rig.ps_port).unwrap_or(0),
            received: c.received,
            uploaded: c.uploaded,
        }
    }
}

/// How often [`follow`] looks: every 50 ms for phases of seconds (an initial copy, where
/// the polls' own CPU would compete with what is measured), every 10 ms for an
/// incremental, whose replication takes a few tenths of a second and is timed from the
/// last poll before the agent's first read to the first poll that finds the point.
#[derive(Debug, Clone, Copy)]
pub enum Poll {
    /// Every 50 ms.
    Coarse,
    /// Every 10 ms.
    Fine,
}

impl Poll {
    fn every(self) -> Duration {
        match self {
            Poll::Coarse => Duration::from_millis(50),
            Poll::Fine => Duration::from_millis(10),
        }
    }
}

/// Waits until the running agent has acknowledged a point taken at or after `since` and
/// the process server has written it to the store, looking as often as `poll` says; the
/// phase's figures are the differences from `base`, its duration counted from `started`.
#[allow(clippy::too_many_arguments)]
pub async fn follow(
    rig: &mut Rig,
    agent: &mut Proc,
    since: Timestamp,
    started: Instant,
    base: Baseline,
    azurite: Option<u32>,
    timeout: Duration,
    poll: Poll,
) -> anyhow::Result<Ours> {
    let deadline = started + timeout;
    let failed_before = failed_sessions(&agent.log);
    // A fresh agent does not serve /metrics yet: it has read nothing.
    let compared_before = rig.agent_chunks_compared().await.unwrap_or(0.0);
    let mut first_read_s = None;
    let mut quiet_s = 0.0;
    let mut timeline = Vec::new();
    let mut compared = compared_before;
    let id = loop {
        compared = rig.agent_chunks_compared().await.unwrap_or(compared);
        let t = started.elapsed().as_secs_f64();
        if first_read_s.is_none() {
            if compared > compared_before {
                first_read_s = Some(t);
            } else {
                quiet_s = t;
            }
        }
        let c = rig.counters().await.unwrap_or_default();
        timeline.push([
            t,
            compared - compared_before,
            (c.received - base.received) / MIB,
            (c.uploaded - base.uploaded) / MIB,
        ]);
        let newer = acknowledged_points(&agent.log).into_iter().find(|id| point_time(id).is_some_and(|t| t >= since));
        if let Some(id) = newer {
            break id;
        }
        agent.check_alive()?;
        rig.ps.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "no recovery point after {timeout:?} ({} replication sessions ended in an error); agent log tail:\n{}",
            failed_sessions(&agent.log) - failed_before,
            super::procs::tail(&agent.log, 15)
        );
        tokio::time::sleep(poll.every()).await;
    };
    while rig.store.load_point(&rig.server, &id).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "point {id} acknowledged but not in the store after {timeout:?}");
        rig.ps.check_alive()?;
        let c = rig.counters().await.unwrap_or_default();
        let t = started.elapsed().as_secs_f64();
        timeline.push([
            t,
            compared - compared_before,
            (c.received - base.received) / MIB,
            (c.uploaded - base.uploaded) / MIB,
        ]);
        tokio::time::sleep(poll.every()).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let now = Baseline::take(rig, Some(agent), azurite).await;
    Ok(Ours {
        seconds,
        agent: Usage {
            cpu_s: now.cpu_s - base.cpu_s,
            peak_rss_mib: agent.usage().map(|u| u.peak_rss_mib).unwrap_or(0.0),
        },
        ps_cpu_s: now.ps_cpu_s - base.ps_cpu_s,
        azurite_cpu_s: base.azurite_cpu_s.zip(now.azurite_cpu_s).map(|(a, b)| b - a),
        wire_mib: Some(now.wire.saturating_sub(base.wire) as f64 / MIB),
        received_mib: (now.received - base.received) / MIB,
        uploaded_mib: (now.uploaded - base.uploaded) / MIB,
        sessions_failed: failed_sessions(&agent.log) - failed_before,
        first_read_s,
        quiet_s,
        point_s: point_time(&id).map(|t| t.duration_since(since).as_secs_f64()),
        timeline,
    })
}

/// Sessions an agent log reports as ended in an error.
pub fn failed_sessions(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains("replication session ended")).count()
}

/// A restic backup of the image, with Azurite's CPU.
pub fn restic_backup(restic: &Restic, disk: &Path, azurite: Option<u32>) -> anyhow::Result<(PeerRun, Backup)> {
    let az = azurite_cpu(azurite);
    let b = restic.backup(disk)?;
    let run = PeerRun { timed: b.timed.clone(), azurite_cpu_s: az.zip(azurite_cpu(azurite)).map(|(a, b)| b - a) };
    Ok((run, b))
}

/// The incremental phase's peer figures and workload.
#[derive(Debug, Clone, Default)]
pub struct Incremental {
    /// What the churn wrote.
    pub churn: Churn,
    /// Ours.
    pub ours: Option<Ours>,
    /// restic's second backup.
    pub restic: Option<(PeerRun, Backup)>,
    /// rsync of the image onto its pre-churn copy, and rsync's bytes sent.
    pub rsync: Option<(Timed, Option<f64>)>,
    /// BLAKE3 of the churned image (to check that another phase churned the same bytes).
    pub churned: Option<blake3::Hash>,
}

/// Copies the image for rsync, churns `fraction` of it, then replicates the change with
/// our agent, restic and rsync in turn.
pub async fn incremental(
    rig: &mut Rig,
    restic: &Restic,
    fraction: f64,
    azurite: Option<u32>,
    agent: Option<&mut Proc>,
    timeout: Duration,
) -> anyhow::Result<Incremental> {
    let disk = rig.disk();
    let copy = rig.paths.work.join("rsync-copy.img");
    std::fs::copy(&disk, &copy)?;
    // As `cp -p` would: rsync's quick check then sees the churn as a newer file.
    std::fs::File::options().write(true).open(&copy)?.set_modified(std::fs::metadata(&disk)?.modified()?)?;
    let base = Baseline::take(rig, agent.as_deref(), azurite).await;
    let mut out = Incremental { churn: churn(&disk, fraction, CHURN_SEED)?, ..Default::default() };
    let (since, started) = (Timestamp::now(), Instant::now());
    eprintln!(
        "[dataplane] churn: {} blocks of 64 KiB ({:.1} MiB, {:.1} MiB zstd -3) in {} of the image's 4 MiB regions",
        out.churn.blocks,
        out.churn.bytes as f64 / MIB,
        out.churn.zstd_bytes as f64 / MIB,
        out.churn.regions_4mib
    );
    if let Some(agent) = agent {
        out.ours =
            report("ours, incremental", follow(rig, agent, since, started, base, azurite, timeout, Poll::Fine).await);
    }
    out.restic = report("restic, incremental", restic_backup(restic, &disk, azurite));
    out.rsync = report("rsync, incremental", rsync(&disk, &copy, &rig.paths.work));
    let _ = std::fs::remove_file(&copy);
    out.churned = report("hashing the churned image", hash_file(&disk).map_err(Into::into));
    Ok(out)
}

/// The peers' part of the initial and incremental phases alone, on a copy of `image` in
/// `work` (for runs without the `image` phase): restic's first backup, then the same
/// churn as [`incremental`], restic's second backup and rsync.
pub fn peers_only(
    restic: &Restic,
    image: &Path,
    work: &Path,
    fraction: f64,
    azurite: Option<u32>,
) -> anyhow::Result<(Option<(PeerRun, Backup)>, Incremental)> {
    let disk = work.join("disk.img");
    std::fs::copy(image, &disk)?;
    eprintln!("[dataplane] peers: restic backup of a copy of the image");
    let initial = report("restic, initial", restic_backup(restic, &disk, azurite));
    let copy = work.join("rsync-copy.img");
    std::fs::copy(&disk, &copy)?;
    std::fs::File::options().write(true).open(&copy)?.set_modified(std::fs::metadata(&disk)?.modified()?)?;
    let mut out = Incremental { churn: churn(&disk, fraction, CHURN_SEED)?, ..Default::default() };
    eprintln!("[dataplane] peers: restic backup and rsync after the churn");
    out.restic = report("restic, incremental", restic_backup(restic, &disk, azurite));
    out.rsync = report("rsync, incremental", rsync(&disk, &copy, work));
    out.churned = report("hashing the churned image", hash_file(&disk).map_err(Into::into));
    for f in [&disk, &copy] {
        let _ = std::fs::remove_file(f);
    }
    Ok((initial, out))
}

/// A restore: rate and whether the bytes match.
#[derive(Debug, Clone, Default)]
pub struct Restore {
    /// MiB of the image per second.
    pub mib_per_s: f64,
    /// The restored image hashes like the source.
    pub exact: bool,
    /// Wall seconds.
    pub seconds: f64,
}

/// Restores the latest point (ours) and the latest snapshot (restic) and compares each
/// with the file holding the content it was taken from (`None` for ours: no point to
/// restore).
pub async fn restore(
    rig: &Rig,
    restic: &Restic,
    ours_source: Option<&Path>,
    restic_source: &Path,
) -> anyhow::Result<(Option<Restore>, Option<(Restore, Timed)>)> {
    let disk = rig.disk();
    let size = std::fs::metadata(&disk)?.len() as f64 / MIB;
    let ours = async {
        let source = ours_source.ok_or_else(|| anyhow::anyhow!("skipped: no complete replication to restore"))?;
        let expected = hash_file(source)?;
        let id = rig
            .store
            .list_point_ids(&rig.server)
            .await?
            .into_iter()
            .max()
            .ok_or_else(|| anyhow::anyhow!("no point"))?;
        let manifest = rig.store.load_point(&rig.server, &id).await?;
        let target = rig.paths.work.join("restored.img");
        let started = Instant::now();
        rig.store.restore_point(&rig.server, &manifest, &[("disk0".into(), target.clone())]).await?;
        let seconds = started.elapsed().as_secs_f64();
        let exact = hash_file(&target)? == expected;
        std::fs::remove_file(&target)?;
        anyhow::Ok(Restore { mib_per_s: size / seconds, exact, seconds })
    };
    let ours = report("ours, restore", ours.await);
    let peer = (|| {
        let expected = hash_file(restic_source)?;
        let dir = rig.paths.work.join("restic-restore");
        let timed = restic.restore_latest(&dir)?;
        let restored: PathBuf = dir.join(disk.strip_prefix("/")?);
        let exact = hash_file(&restored)? == expected;
        std::fs::remove_dir_all(&dir)?;
        anyhow::Ok((Restore { mib_per_s: size / timed.wall_s, exact, seconds: timed.wall_s }, timed))
    })();
    Ok((ours, report("restic, restore", peer)))
}

/// RPO under sustained writes.
#[derive(Debug, Clone, Default)]
pub struct Rpo {
    /// `now − time of the latest acknowledged point`, sampled every second.
    pub acked: Vec<f64>,
    /// The same against the latest point in the store.
    pub stored: Vec<f64>,
    /// Points acknowledged while the writes ran.
    pub points: usize,
    /// MiB/s actually written.
    pub written_mib_s: f64,
    /// Seconds from the end of the writes until a point taken after it was acknowledged.
    pub catch_up_s: Option<f64>,
    /// Agent resources (CPU during the phase, peak RSS so far).
    pub agent: Usage,
    /// Process-server resources (CPU during the phase, peak RSS so far).
    pub ps: Usage,
    /// Largest process-server backlog seen, MiB.
    pub max_backlog_mib: f64,
    /// Replication sessions that ended in an error.
    pub sessions_failed: usize,
}

/// With the agent running, writes `rate` bytes/s at random into `files` (the protected
/// image itself, or files on a filesystem of the protected device; `fdatasync` after each
/// write with `sync`) for `seconds` while sampling the RPO every second.
pub async fn rpo(
    rig: &mut Rig,
    agent: &mut Proc,
    files: &[PathBuf],
    sync: bool,
    seconds: u64,
    rate: f64,
) -> anyhow::Result<Rpo> {
    let mut out = Rpo::default();
    let log = agent.log.clone();
    let cpu_before = cpu_seconds(agent.pid())?;
    let ps_cpu_before = rig.ps_usage().cpu_s;
    let failed_before = failed_sessions(&log);
    let before = acknowledged_points(&log).len();
    let writer = PacedWriter::over(files, rate, 0xfeed, sync)?;
    let writes_started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    for _ in 0..seconds {
        tick.tick().await;
        let now = Timestamp::now();
        let age = |id: Option<&String>| id.and_then(|id| point_time(id)).map(|t| now.duration_since(t).as_secs_f64());
        if let Some(a) = age(acknowledged_points(&log).last()) {
            out.acked.push(a);
        }
        let stored = rig.store.list_point_ids(&rig.server).await.unwrap_or_default();
        if let Some(a) = age(stored.iter().max()) {
            out.stored.push(a);
        }
        if let Ok(c) = rig.counters().await {
            out.max_backlog_mib = out.max_backlog_mib.max(c.backlog / MIB);
        }
        agent.check_alive()?;
    }
    let written = writer.stop()?;
    let writes_ended = Timestamp::now();
    out.written_mib_s = written as f64 / MIB / writes_started.elapsed().as_secs_f64();
    out.points = acknowledged_points(&log).len() - before;
    let wait_from = Instant::now();
    while wait_from.elapsed() < Duration::from_secs(300) {
        let latest = acknowledged_points(&log).last().and_then(|id| point_time(id));
        if latest.is_some_and(|t| t >= writes_ended) {
            out.catch_up_s = Some(wait_from.elapsed().as_secs_f64());
            break;
        }
        agent.check_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out.agent = Usage { cpu_s: cpu_seconds(agent.pid())? - cpu_before, ..agent.usage()? };
    let ps = rig.ps_usage();
    out.ps = Usage { cpu_s: ps.cpu_s - ps_cpu_before, ..ps };
    out.sessions_failed = failed_sessions(&log) - failed_before;
    Ok(out)
}

/// Prints a failed step's error and turns it into `None`: one broken step must not hide
/// the figures of the others.
pub fn report<T>(what: &str, r: anyhow::Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("[dataplane] {what} FAILED: {e:#}");
            None
        }
    }
}

/// Nearest-rank percentile `p` (0–100) of `samples`.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    Some(s[rank.min(s.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=120).map(f64::from).collect();
        assert_eq!(percentile(&s, 99.0), Some(119.0));
        assert_eq!(percentile(&s, 50.0), Some(60.0));
        assert_eq!(percentile(&s, 100.0), Some(120.0));
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        assert_eq!(percentile(&[], 99.0), None);
    }
}
