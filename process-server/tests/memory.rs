//! Peak memory of the process server during an initial replication: not a test of
//! behaviour (it asserts only that the copy restores bit-exact) but a reproducible
//! measurement, ignored by default because it moves a gigabyte and its figure depends on
//! the machine. The release process-server binary runs as a child (as in a pod) and an
//! in-process agent replicates an image of varied data (incompressible, half-random,
//! text-like and zero chunks) to it; the child's `VmHWM` and `VmRSS` are sampled from
//! `/proc` every 100 ms, with its upload backlog from `/metrics`.
//!
//! ```text
//! cargo test --release -p siterecovery-process-server --test memory -- --ignored --nocapture
//! ```
//!
//! Knobs (environment): `SR_MEMORY_MIB` image size (1024); `SR_MEMORY_STORE` `local`
//! (default) or `azurite` (a private Azurite on disk, started by `hack/azurite.sh`);
//! `SR_MEMORY_PS_ARGS` more process-server arguments (e.g. `--recent-chunk-bytes 0`);
//! `SR_MEMORY_PS_ENV` more environment (e.g. `MALLOC_ARENA_MAX=2`); `SR_MEMORY_WRAP` a
//! command to run the process server under (e.g. `heaptrack -o /tmp/ps`; RSS is then
//! that of the wrapper's child and not sampled; the test's SIGKILL at the end reaches only the
//! wrapper, so the process server may outlive it and heaptrack's data is incomplete: not
//! yet usable for attribution); `SR_MEMORY_PARALLELISM` uploads in flight
//! per server (the targets file's `parallelism`, default 8); `SR_MEMORY_PS_BIN` another
//! process-server binary (e.g. a copy built from an older commit, to compare).

mod support;

use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use siterecovery_store::ServerRef;
use support::*;

const MIB: u64 = 1024 * 1024;
const CHUNK: u64 = 4 * MIB;

/// Fills the image chunk by chunk, cycling through four kinds of content so both wire
/// encodings (zstd and raw) and zero chunks occur: incompressible, half random, text-like,
/// and (every eighth chunk) nothing.
fn varied_image(path: &Path, size: u64) {
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(path).unwrap();
    f.set_len(size).unwrap();
    let words: Vec<&str> = "the process server journals every frame before it acknowledges it and uploads \
                            compressed encrypted chunks to blob storage while agents keep sending"
        .split(' ')
        .collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; CHUNK as usize];
    for i in 0..size.div_ceil(CHUNK) {
        match i % 8 {
            7 => continue,
            0 | 3 | 5 => buf.chunks_mut(8).for_each(|c| c.copy_from_slice(&next().to_le_bytes()[..c.len()])),
            1 | 4 => {
                for (j, c) in buf.chunks_mut(8).enumerate() {
                    let v = if j % 512 < 256 { next() } else { (j as u64) ^ i };
                    c.copy_from_slice(&v.to_le_bytes()[..c.len()]);
                }
            }
            _ => {
                let mut at = 0;
                while at < buf.len() {
                    let w = words[(next() % words.len() as u64) as usize].as_bytes();
                    let n = w.len().min(buf.len() - at);
                    buf[at..at + n].copy_from_slice(&w[..n]);
                    at += n;
                    if at < buf.len() {
                        buf[at] = b' ';
                        at += 1;
                    }
                }
            }
        }
        let n = (size - i * CHUNK).min(CHUNK) as usize;
        f.write_all_at(&buf[..n], i * CHUNK).unwrap();
    }
    f.sync_all().unwrap();
}

/// A `kB` field of `/proc/<pid>/status`, in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?;
    let kib: f64 = line[field.len() + 1..].trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib / 1024.0)
}

fn words(var: &str) -> Vec<String> {
    std::env::var(var).unwrap_or_default().split_whitespace().map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: moves a gigabyte; run with --release --ignored --nocapture"]
async fn peak_memory_of_an_initial_replication() {
    let mib: u64 = std::env::var("SR_MEMORY_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let bed = Bed::new();
    let dir = bed.dir();
    let local = local_targets(dir, &dir.join("store"), CHUNK as u32);
    if let Some(p) = std::env::var("SR_MEMORY_PARALLELISM").ok().and_then(|v| v.parse::<usize>().ok()) {
        let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&local).unwrap()).unwrap();
        v["parallelism"] = serde_json::json!(p);
        std::fs::write(&local, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }
    let azurite;
    let targets = if std::env::var("SR_MEMORY_STORE").as_deref() == Ok("azurite") {
        azurite = Azurite::start(&dir.join("azurite"), free_port()).await;
        let t = azure_targets(&local, &azurite.endpoint(), "memory", &Azurite::sas());
        siterecovery_store::AzureBlobBackend::with_sas(&azurite.endpoint(), "memory", &Azurite::sas())
            .unwrap()
            .ensure_container()
            .await
            .unwrap();
        t
    } else {
        local
    };
    let disk = dir.join("disk0.img");
    let t0 = Instant::now();
    varied_image(&disk, mib * MIB);
    eprintln!("[memory] image of {mib} MiB written in {:.1} s", t0.elapsed().as_secs_f64());

    let (port, metrics_port) = (free_port(), free_port());
    let wrap = words("SR_MEMORY_WRAP");
    let bin =
        std::env::var("SR_MEMORY_PS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_siterecovery-process-server").into());
    let mut cmd = match wrap.split_first() {
        Some((w, rest)) => {
            let mut c = Command::new(w);
            c.args(rest).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    PsChild::configure(&mut cmd, dir, &bed.pki, &targets, port, metrics_port).args(words("SR_MEMORY_PS_ARGS"));
    for kv in words("SR_MEMORY_PS_ENV") {
        let (k, v) = kv.split_once('=').expect("SR_MEMORY_PS_ENV holds NAME=value words");
        cmd.env(k, v);
    }
    let mut ps = PsChild::run(cmd, &dir.join("ps.log"), port, metrics_port);
    ps.wait_listening(30).await;
    let pid = if wrap.is_empty() { Some(ps.guard.pid()) } else { None };
    let baseline = pid.and_then(|p| status_mib(p, "VmRSS")).unwrap_or(0.0);

    let files = bed.pki.agent_files(&bed.pki.ca, "mem", "srv", "a");
    let disks = [("disk0", disk.as_path())];
    let agent = start_agent(agent_config(&bed.pki, files, "mem", "srv", ps.addr, &disks, 1.0));
    let started = Instant::now();
    let (mut max_rss, mut max_backlog) = (0f64, 0f64);
    let mut next_print = Duration::ZERO;
    let status = loop {
        let s = agent.status();
        let backlog = metric(ps.metrics, "siterecovery_process_server_backlog_bytes").await.unwrap_or(0.0) / MIB as f64;
        let rss = pid.and_then(|p| status_mib(p, "VmRSS")).unwrap_or(0.0);
        max_rss = max_rss.max(rss);
        max_backlog = max_backlog.max(backlog);
        if started.elapsed() >= next_print {
            eprintln!(
                "[memory] {:5.1} s  sent {:5} MiB  backlog {:6.1} MiB  VmRSS {:6.1} MiB",
                started.elapsed().as_secs_f64(),
                s.payload_bytes / MIB,
                backlog,
                rss
            );
            next_print += Duration::from_secs(2);
        }
        if s.initial_copy_done && s.points >= 1 && backlog == 0.0 {
            break s;
        }
        ps.guard.assert_alive("replication");
        assert!(started.elapsed() < Duration::from_secs(1800), "no point after 30 minutes: {s:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elapsed = started.elapsed().as_secs_f64();
    let hwm = pid.and_then(|p| status_mib(p, "VmHWM")).unwrap_or(0.0);
    let rss_after = pid.and_then(|p| status_mib(p, "VmRSS")).unwrap_or(0.0);
    agent.stop().await;

    let store = store_of(&targets);
    let server = ServerRef::new("mem", "srv").unwrap();
    assert_last_point_restores(&store, &server, &status, &disks, &dir.join("restored")).await;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "[memory] {mib} MiB replicated in {elapsed:.1} s ({:.1} MiB/s), {} chunks sent; process server: \
         VmHWM {hwm:.1} MiB, largest sampled VmRSS {max_rss:.1} MiB, VmRSS at start {baseline:.1} MiB and at the end \
         {rss_after:.1} MiB; largest backlog {max_backlog:.1} MiB; load average {}",
        mib as f64 / elapsed,
        status.chunks_sent,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );
}
