//! `dataplane`: the data-plane benchmark against peer tools (run by `make bench` through
//! `hack/bench-dataplane.sh`, which installs the peers, builds the image and starts
//! Azurite). Same work, same machine, same run: initial replication (agent → process
//! server → Azurite vs `restic backup` through rclone to the same Azurite), an incremental
//! after 1% churn (vs restic and `rsync --inplace --no-whole-file`), restore (vs `restic
//! restore`), RPO under sustained random writes, and the resources of agent and process
//! server. With `--blockdev` (root: the script sets up a loop device with a mounted ext4),
//! also the RPO on that block device with eBPF tracking and the convergence freeze
//! (`blockdev_*`, `rpo_blockdev_*`; the image file's RPO rows are `rpo_imagefile_*`).
//! With `--imagedev` (root: a loop device over a copy of the image), also the initial
//! replication and the incremental with the agent protecting that block device with eBPF
//! tracking (`initial_blockdev_*`, `incremental_blockdev_*`), against the peers' runs on
//! the same bytes.
//! Prints a table and writes `target/bench/results.json`; asserts nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde_json::json;
use siterecovery_bench::dataplane::compare::{Cmp, Judge, Ratio, json as results_json, table};
use siterecovery_bench::dataplane::peers::{Backup, Restic, version};
use siterecovery_bench::dataplane::phases::{self, Incremental, Ours, PeerRun, percentile, report};
use siterecovery_bench::dataplane::rig::{Rig, RigPaths};
use siterecovery_bench::dataplane::{blockdev, imagedev};
use siterecovery_bench::metrics::load_average;
use siterecovery_bench::report::{Goal, write_json};

const MIB: f64 = 1024.0 * 1024.0;

/// Data-plane benchmark against restic and rsync.
#[derive(Debug, Parser)]
struct Args {
    /// The ext4 image to replicate (copied; the copy is written to).
    #[arg(long)]
    image: PathBuf,
    /// Azurite account endpoint, e.g. http://127.0.0.1:10041/devstoreaccount1.
    #[arg(long)]
    azurite: String,
    /// Azurite's pid, to report the CPU it spends for each tool.
    #[arg(long)]
    azurite_pid: Option<u32>,
    /// rclone binary for restic's rclone backend.
    #[arg(long)]
    rclone: PathBuf,
    /// Release agent binary.
    #[arg(long, default_value = "target/release/siterecovery-agent")]
    agent_bin: PathBuf,
    /// Release process-server binary.
    #[arg(long, default_value = "target/release/siterecovery-process-server")]
    ps_bin: PathBuf,
    /// Working directory (emptied first).
    #[arg(long, default_value = "target/bench/dataplane")]
    work: PathBuf,
    /// Results file.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// Share of the image the incremental phase rewrites, in percent.
    #[arg(long, default_value_t = 1.0)]
    churn_percent: f64,
    /// Duration of the sustained writes of the RPO phase.
    #[arg(long, env = "BENCH_RPO_SECONDS", default_value_t = 120)]
    rpo_seconds: u64,
    /// Rate of those writes, MB/s (10^6 bytes).
    #[arg(long, env = "BENCH_RPO_RATE_MB", default_value_t = 20.0)]
    rpo_rate_mb: f64,
    /// Crash-consistent point interval of the agents, seconds.
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
    /// How long one of our replication phases may take before it counts as failed.
    #[arg(long, env = "BENCH_PHASE_TIMEOUT_SECONDS", default_value_t = 1200)]
    phase_timeout: u64,
    /// What source the agent and process server were built from (default: `git describe
    /// --always --dirty` of the working tree).
    #[arg(long)]
    source: Option<String>,
    /// Chunk size of the targets file (default: the product's).
    #[arg(long)]
    chunk_size: Option<u32>,
    /// Which phases to run: `image` (initial, incremental, restore and RPO on the image
    /// file, against the peers), `imagedev` (initial and incremental on a loop device over
    /// a copy of the image, eBPF tracking) and `blockdev` (RPO on a loop device with eBPF).
    #[arg(long, env = "BENCH_DP_PHASES", value_delimiter = ',', default_value = "image,imagedev,blockdev")]
    phases: Vec<String>,
    /// Loop device over a copy of `--image`, for the `imagedev` phase (written to;
    /// hack/bench-dataplane.sh sets one up as root); without it that phase is reported as
    /// not measured.
    #[arg(long)]
    imagedev: Option<PathBuf>,
    /// Seconds between the `imagedev` phase's first point and its churn.
    #[arg(long, default_value_t = 10.0)]
    imagedev_settle: f64,
    /// Directory for `perf record` profiles of the initial replications (agent, process
    /// server and Azurite; `perf` from Debian's linux-perf).
    #[arg(long, env = "BENCH_DP_PERF_DIR")]
    perf: Option<PathBuf>,
    /// Loop device holding a mounted ext4, for the `blockdev` phase (hack/bench-dataplane.sh
    /// sets one up as root); without it that phase is reported as not measured.
    #[arg(long, requires = "blockdev_mount")]
    blockdev: Option<PathBuf>,
    /// Where the loop device's ext4 is mounted.
    #[arg(long)]
    blockdev_mount: Option<PathBuf>,
    /// Files the `blockdev` phase writes into, and their size in MiB.
    #[arg(long, default_value_t = 8)]
    blockdev_files: usize,
    /// See `--blockdev-files`.
    #[arg(long, default_value_t = 48)]
    blockdev_file_mib: u64,
    /// The `blockdev` phase's writer calls `fdatasync` after every write (a database's
    /// pattern: writes reach the device at once, so only the convergence freeze gives the
    /// agent a quiet instant) instead of leaving them to the kernel's writeback.
    #[arg(long)]
    blockdev_sync: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for p in &args.phases {
        anyhow::ensure!(
            matches!(p.as_str(), "image" | "imagedev" | "blockdev"),
            "unknown phase {p:?} (image, imagedev, blockdev)"
        );
    }
    let load_before = load_average();
    let work = std::path::absolute(&args.work)?;
    if work.exists() {
        std::fs::remove_dir_all(&work)?;
    }
    std::fs::create_dir_all(&work)?;
    let stamp = jiff::Timestamp::now().as_second();
    let paths = RigPaths {
        work: work.clone(),
        agent_bin: std::path::absolute(&args.agent_bin)?,
        ps_bin: std::path::absolute(&args.ps_bin)?,
        azurite: args.azurite.clone(),
        interval_s: args.interval,
        chunk_size: args.chunk_size,
        disk: work.join("disk.img"),
        agent_extra: serde_json::Value::Null,
    };
    let has = |phase: &str| args.phases.iter().any(|p| p == phase);
    let (mut rows, image, mut peers) = if has("image") {
        image_phases(&args, paths.clone(), stamp).await?
    } else {
        (Vec::new(), serde_json::Value::Null, None)
    };

    let dev_setup = match &args.imagedev {
        Some(device) if has("imagedev") => Some(imagedev::Setup {
            device: device.clone(),
            fraction: args.churn_percent / 100.0,
            timeout: Duration::from_secs(args.phase_timeout),
            settle: Duration::from_secs_f64(args.imagedev_settle),
            perf: args.perf.clone(),
        }),
        _ => {
            if has("imagedev") {
                eprintln!(
                    "[dataplane] imagedev phase skipped: no --imagedev (it needs root; see hack/bench-dataplane.sh)"
                );
            }
            None
        }
    };
    let dev = match &dev_setup {
        Some(s) => {
            let run = report(
                "block device (image copy)",
                imagedev::run(&paths, &format!("sr-bench-{stamp}-dev"), s, args.azurite_pid).await,
            );
            if peers.is_none() {
                // Without the image phase, the peers run here on the same bytes.
                let restic = Restic::new(&args.rclone, &args.azurite, &format!("restic-bench-{stamp}-dev"), &work);
                peers = report("restic init", restic.init()).and_then(|()| {
                    let fraction = args.churn_percent / 100.0;
                    report("peers", phases::peers_only(&restic, &args.image, &work, fraction, args.azurite_pid))
                });
            }
            run
        }
        None => None,
    };
    if has("imagedev") {
        let p = peers.as_ref();
        let peer_view = imagedev::Peers { restic_initial: p.and_then(|p| p.0.as_ref()), incremental: p.map(|p| &p.1) };
        rows.extend(imagedev::rows(dev.as_ref(), peer_view));
    }

    let setup = match (&args.blockdev, &args.blockdev_mount) {
        (Some(device), Some(mount)) if has("blockdev") => Some(blockdev::Setup {
            device: device.clone(),
            mount: std::path::absolute(mount)?,
            files: args.blockdev_files,
            file_mib: args.blockdev_file_mib,
            sync: args.blockdev_sync,
            seconds: args.rpo_seconds,
            rate: args.rpo_rate_mb * 1e6,
            timeout: Duration::from_secs(args.phase_timeout),
        }),
        _ => {
            if has("blockdev") {
                eprintln!(
                    "[dataplane] block device phase skipped: no --blockdev (it needs root; see hack/bench-dataplane.sh)"
                );
            }
            None
        }
    };
    let blk = match &setup {
        Some(s) => report("block device", blockdev::run(&paths, &format!("sr-bench-{stamp}-blk"), s).await),
        None => None,
    };
    // Only when asked for, as the other phases' rows: a phase not selected is no goal missed.
    if has("blockdev") {
        rows.extend(blockdev::rows(blk.as_ref()));
    }

    let context = json!({
        "date": jiff::Timestamp::now().to_string(),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "source": args.source.clone().unwrap_or_else(git_describe),
        "phases": args.phases,
        "chunk_size": args.chunk_size.unwrap_or(siterecovery_store::DEFAULT_CHUNK_SIZE),
        "interval_seconds": args.interval,
        "image_file": image,
        "imagedev": imagedev::context(dev_setup.as_ref(), dev.as_ref()),
        "blockdev": blockdev::context(setup.as_ref(), blk.as_ref()),
    });
    print!("{}", table(&rows));
    write_json(&args.out, &results_json("dataplane", context, &rows))?;
    eprintln!("[dataplane] results written to {}", args.out.display());
    Ok(())
}

/// The peers' initial backup and incremental runs, for the `imagedev` phase's rows.
type PeerRuns = (Option<(PeerRun, Backup)>, Incremental);

/// The phases on the image file, against restic and rsync: their rows and context, and
/// the peers' runs.
async fn image_phases(
    args: &Args,
    paths: RigPaths,
    stamp: i64,
) -> anyhow::Result<(Vec<Cmp>, serde_json::Value, Option<PeerRuns>)> {
    let work = paths.work.clone();
    let disk = paths.disk.clone();
    std::fs::copy(&args.image, &disk)?;
    // A disk at rest: the copy's dirty pages are written out before anyone reads it, not
    // during the first tool's run (the image-file tracker writes back a file's dirty pages
    // when it starts).
    std::fs::File::open(&disk)?.sync_all()?;
    let size_mib = std::fs::metadata(&disk)?.len() as f64 / MIB;
    let mut rig = Rig::start(paths, &format!("sr-bench-{stamp}")).await?;
    let restic = Restic::new(&args.rclone, &args.azurite, &format!("restic-bench-{stamp}"), &work);
    restic.init()?;
    let az = args.azurite_pid;

    eprintln!("[dataplane] initial replication: agent → process server → Azurite");
    let timeout = Duration::from_secs(args.phase_timeout);
    let perf = args.perf.as_deref().map(|d| (d, "initial-image"));
    let (initial, mut agent) = phases::initial(&mut rig, az, timeout, perf).await;
    // Without a complete first point, our later phases would measure against a partial
    // copy: they are skipped (reported as n/a), the peers still run.
    if initial.is_none() {
        agent = None;
    }
    eprintln!("[dataplane] initial replication: restic backup");
    let restic_initial = report("restic, initial", phases::restic_backup(&restic, &disk, az));
    eprintln!("[dataplane] incremental after {}% churn", args.churn_percent);
    let fraction = args.churn_percent / 100.0;
    let inc =
        report("incremental", phases::incremental(&mut rig, &restic, fraction, az, agent.as_mut(), timeout).await)
            .unwrap_or_default();
    eprintln!("[dataplane] restore");
    // Each tool's latest copy holds the churned image if its incremental completed, else
    // the base image.
    let changed = rig.disk();
    let ours_source = match (&initial, &inc.ours) {
        (Some(_), Some(_)) => Some(changed.as_path()),
        (Some(_), None) => Some(args.image.as_path()),
        _ => None,
    };
    let restic_source = if inc.restic.is_some() { changed.as_path() } else { args.image.as_path() };
    let (restore, restic_restore) =
        report("restore", phases::restore(&rig, &restic, ours_source, restic_source).await).unwrap_or_default();
    eprintln!("[dataplane] RPO: {} MB/s of random writes for {} s", args.rpo_rate_mb, args.rpo_seconds);
    let rpo = match agent.as_mut() {
        Some(a) => report(
            "rpo",
            phases::rpo(&mut rig, a, std::slice::from_ref(&disk), false, args.rpo_seconds, args.rpo_rate_mb * 1e6)
                .await,
        ),
        None => None,
    };
    let agent_final = match agent {
        Some(a) => a.stop(Duration::from_secs(20)).await,
        None => None,
    };
    let ps_final = rig.ps_usage();
    let ps_log = rig.ps.log.clone();
    let _ = rig.ps.stop(Duration::from_secs(20)).await;

    let mut rows = Vec::new();
    let ri = restic_initial.as_ref();
    let ours_initial_cpu = initial.as_ref().map(|o| o.agent.cpu_s + o.ps_cpu_s);
    rows.push(
        Cmp::ours("initial_replication", "s", initial.as_ref().map(|o| o.seconds))
            .vs("restic backup", ri.map(|r| r.0.timed.wall_s), Ratio::Speedup)
            .goal(Judge::Ratio(Goal::AtLeast(2.0))),
    );
    rows.push(Cmp::ours("initial_throughput", "MiB/s", initial.as_ref().map(|o| size_mib / o.seconds)).vs(
        "restic backup",
        ri.map(|r| size_mib / r.0.timed.wall_s),
        Ratio::OursOverPeer,
    ));
    rows.push(Cmp::ours("initial_cpu_agent_plus_ps", "s", ours_initial_cpu).vs(
        "restic+rclone",
        ri.map(|r| r.0.timed.cpu_s),
        Ratio::OursOverPeer,
    ));
    rows.push(Cmp::ours("initial_startup", "s", initial.as_ref().and_then(|o| o.first_read_s)));
    let chunk_mib = f64::from(args.chunk_size.unwrap_or(siterecovery_store::DEFAULT_CHUNK_SIZE)) / MIB;
    let whole_pass = (size_mib / chunk_mib).ceil();
    rows.push(Cmp::ours("initial_first_pass", "s", initial.as_ref().and_then(|o| o.compared_by(whole_pass))));
    rows.push(Cmp::ours("initial_second_pass", "s", initial.as_ref().and_then(|o| o.compared_by(2.0 * whole_pass))));
    rows.push(Cmp::ours("initial_ps_received_all", "s", initial.as_ref().and_then(Ours::received_all_by)));
    rows.push(Cmp::ours("initial_ps_uploaded_all", "s", initial.as_ref().and_then(Ours::uploaded_all_by)));
    rows.push(Cmp::ours("initial_point_to_store", "s", initial.as_ref().and_then(Ours::point_to_store_s)));
    rows.push(Cmp::ours("initial_cpu_agent", "s", initial.as_ref().map(|o| o.agent.cpu_s)));
    rows.push(Cmp::ours("initial_cpu_ps", "s", initial.as_ref().map(|o| o.ps_cpu_s)));
    rows.push(Cmp::ours("initial_cpu_azurite", "s", initial.as_ref().and_then(|o| o.azurite_cpu_s)).vs(
        "restic backup",
        ri.and_then(|r| r.0.azurite_cpu_s),
        Ratio::OursOverPeer,
    ));
    rows.push(Cmp::ours("initial_wire", "MiB", initial.as_ref().and_then(|o| o.wire_mib)));
    rows.push(Cmp::ours("initial_sessions_failed", "sessions", initial.as_ref().map(|o| o.sessions_failed as f64)));
    rows.push(Cmp::ours("initial_uploaded", "MiB", initial.as_ref().map(|o| o.uploaded_mib)).vs(
        "restic data_added (pre-compression)",
        ri.and_then(|r| r.1.data_added.map(|b| b / MIB)),
        Ratio::OursOverPeer,
    ));
    rows.push(Cmp::ours("agent_peak_rss_initial", "MiB", initial.as_ref().map(|o| o.agent.peak_rss_mib)).vs(
        "restic+rclone peak",
        ri.map(|r| r.0.timed.peak_rss_mib),
        Ratio::OursOverPeer,
    ));

    let io = inc.ours.as_ref();
    let ir = inc.restic.as_ref();
    let changed_zstd = inc.churn.zstd_bytes as f64 / MIB;
    rows.extend(phases::incremental_rows(
        "incremental",
        io,
        ("restic backup", ir.map(|r| r.0.timed.wall_s)),
        ("rsync --inplace", inc.rsync.as_ref().map(|r| r.0.wall_s)),
    ));
    rows.push(
        Cmp::ours("incremental_wire", "MiB", io.and_then(|o| o.wire_mib))
            .vs("changed bytes, zstd -3", (inc.churn.bytes > 0).then_some(changed_zstd), Ratio::OursOverPeer)
            .goal(Judge::Ratio(Goal::AtMost(1.1))),
    );
    rows.push(Cmp::ours("incremental_wire_vs_rsync", "MiB", io.and_then(|o| o.wire_mib)).vs(
        "rsync bytes sent",
        inc.rsync.as_ref().and_then(|r| r.1.map(|b| b / MIB)),
        Ratio::OursOverPeer,
    ));
    rows.push(Cmp::ours("incremental_changed_raw", "MiB", Some(inc.churn.bytes as f64 / MIB)));
    rows.push(Cmp::ours("incremental_ps_received_plaintext", "MiB", io.map(|o| o.received_mib)));
    rows.push(Cmp::ours("incremental_uploaded", "MiB", io.map(|o| o.uploaded_mib)));
    rows.push(Cmp::ours("incremental_cpu_agent_plus_ps", "s", io.map(|o| o.agent.cpu_s + o.ps_cpu_s)).vs(
        "restic+rclone",
        ir.map(|r| r.0.timed.cpu_s),
        Ratio::OursOverPeer,
    ));
    rows.push(Cmp::ours("incremental_cpu_agent_plus_ps_vs_rsync", "s", io.map(|o| o.agent.cpu_s + o.ps_cpu_s)).vs(
        "rsync",
        inc.rsync.as_ref().map(|r| r.0.cpu_s),
        Ratio::OursOverPeer,
    ));
    rows.push(Cmp::ours("incremental_cpu_agent", "s", io.map(|o| o.agent.cpu_s)));
    rows.push(Cmp::ours("incremental_sessions_failed", "sessions", io.map(|o| o.sessions_failed as f64)));
    rows.push(Cmp::ours("incremental_cpu_ps", "s", io.map(|o| o.ps_cpu_s)));

    let rr = restic_restore.as_ref();
    rows.push(
        Cmp::ours("restore_throughput", "MiB/s", restore.as_ref().map(|r| r.mib_per_s))
            .vs("restic restore", rr.map(|r| r.0.mib_per_s), Ratio::OursOverPeer)
            .goal(Judge::Ours(Goal::AtLeast(200.0))),
    );
    let exact = |r: Option<bool>| r.map(|e| if e { 1.0 } else { 0.0 });
    rows.push(
        Cmp::ours("restore_bit_exact", "1=yes", exact(restore.as_ref().map(|r| r.exact)))
            .vs("restic restore", exact(rr.map(|r| r.0.exact)), Ratio::OursOverPeer)
            .goal(Judge::Ours(Goal::AtLeast(1.0))),
    );

    let rp = rpo.as_ref();
    rows.push(
        Cmp::ours("rpo_imagefile_p99", "s", rp.and_then(|r| percentile(&r.acked, 99.0)))
            .goal(Judge::Ours(Goal::AtMost(10.0))),
    );
    rows.push(Cmp::ours("rpo_imagefile_p50", "s", rp.and_then(|r| percentile(&r.acked, 50.0))));
    rows.push(Cmp::ours("rpo_imagefile_max", "s", rp.and_then(|r| percentile(&r.acked, 100.0))));
    rows.push(Cmp::ours("rpo_imagefile_stored_p99", "s", rp.and_then(|r| percentile(&r.stored, 99.0))));
    rows.push(Cmp::ours("rpo_imagefile_points_during_writes", "points", rp.map(|r| r.points as f64)));
    rows.push(Cmp::ours("rpo_imagefile_write_rate", "MiB/s", rp.map(|r| r.written_mib_s)));
    rows.push(Cmp::ours("rpo_imagefile_catch_up_after_writes", "s", rp.and_then(|r| r.catch_up_s)));
    rows.push(Cmp::ours("rpo_imagefile_max_ps_backlog", "MiB", rp.map(|r| r.max_backlog_mib)));
    rows.push(Cmp::ours("rpo_imagefile_cpu_agent", "s", rp.map(|r| r.agent.cpu_s)));
    rows.push(Cmp::ours("rpo_imagefile_cpu_ps", "s", rp.map(|r| r.ps.cpu_s)));
    rows.push(Cmp::ours("rpo_imagefile_sessions_failed", "sessions", rp.map(|r| r.sessions_failed as f64)));

    let agent_peak = agent_final.map(|u| u.peak_rss_mib);
    rows.push(Cmp::ours("agent_peak_rss", "MiB", agent_peak));
    rows.push(Cmp::ours("ps_peak_rss", "MiB", Some(ps_final.peak_rss_mib)));
    rows.push(Cmp::ours("agent_cpu_total", "s", agent_final.map(|u| u.cpu_s)));
    rows.push(Cmp::ours("ps_cpu_total", "s", Some(ps_final.cpu_s)));

    let context = json!({
        "image": {"path": args.image, "size_mib": size_mib},
        "churn": {"percent": args.churn_percent, "blocks_64k": inc.churn.blocks, "bytes": inc.churn.bytes,
                  "zstd3_bytes": inc.churn.zstd_bytes, "regions_4mib_touched": inc.churn.regions_4mib},
        "initial_timeline": initial.as_ref().map(|o| &o.timeline),
        "incremental_timeline": io.map(|o| &o.timeline),
        "rpo": {"seconds": args.rpo_seconds, "rate_mb_s": args.rpo_rate_mb,
                "acked_samples": rp.map(|r| r.acked.clone()), "stored_samples": rp.map(|r| r.stored.clone())},
        "versions": {
            "restic": version(Path::new("restic"), &["version"]),
            "rsync": version(Path::new("rsync"), &["--version"]),
            "rclone": version(&args.rclone, &["version"]),
        },
        "logs": {"work": work, "process_server": ps_log},
    });
    Ok((rows, context, Some((restic_initial, inc))))
}

/// Cores, memory and CPU model.
fn machine() -> serde_json::Value {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|m| m.trim_start_matches([' ', '\t', ':']));
    json!({"cores": cores, "memory_gib": (mem_kib / 1024.0 / 1024.0).round(), "cpu": model})
}

/// `git describe --always --dirty`, to tie figures to the source.
fn git_describe() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
