//! The processes under test (agent, process server) and what the benchmark reads from
//! outside them: CPU time and peak RSS from `/proc`, TCP bytes from `ss`, Prometheus text
//! from `/metrics`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::metrics::proc_status_kib;

/// A child process whose stdout and stderr go to a log file.
#[derive(Debug)]
pub struct Proc {
    /// Name for messages.
    pub name: String,
    /// The child.
    pub child: std::process::Child,
    /// Its log.
    pub log: PathBuf,
}

/// Resources a process used.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User plus system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set (`VmHWM`), MiB.
    pub peak_rss_mib: f64,
}

impl Proc {
    /// Starts `bin args…` with plain-text logs into `log`: `info`, or what `BENCH_DP_LOG`
    /// says (a `RUST_LOG` filter, e.g. `info,siterecovery_process_server::upload=debug`).
    pub fn spawn(name: &str, bin: &Path, args: &[&str], log: &Path) -> anyhow::Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", std::env::var("BENCH_DP_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self { name: name.into(), child, log: log.to_path_buf() })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU time and peak RSS so far (read while it runs).
    pub fn usage(&self) -> anyhow::Result<Usage> {
        Ok(Usage {
            cpu_s: cpu_seconds(self.pid())?,
            peak_rss_mib: proc_status_kib(self.pid(), "VmHWM")? as f64 / 1024.0,
        })
    }

    /// Fails with the log's tail when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited ({status}); last log lines:\n{}", self.name, tail(&self.log, 30));
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the usage read just before.
    pub async fn stop(mut self, grace: Duration) -> Option<Usage> {
        let usage = self.usage().ok();
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return usage;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("[dataplane] {} did not stop within {grace:?}; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
        usage
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `perf record` of the whole machine (software `cpu-clock` events, so it also works on
/// VMs without hardware counters) while some processes work, stopped with SIGINT so it
/// writes its file. System-wide because `-p` missed the threads the processes start
/// (tokio's blocking pool); the processes' pids go to `<out>.pids` (`name pid` lines) so
/// a report can keep their samples (`perf report --pid`).
#[derive(Debug)]
pub struct PerfRecord(std::process::Child);

impl PerfRecord {
    /// Samples every CPU at 499 Hz into `out`; `pids` names the processes of interest.
    /// `BENCH_DP_PERF_CALL_GRAPH=1` records call graphs too (`-g`: which code path a
    /// kernel symbol such as a page fault came from; user frames are partial without frame
    /// pointers).
    pub fn start(pids: &[(&str, Option<u32>)], out: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let names: String = pids.iter().filter_map(|(n, p)| Some(format!("{n} {}\n", (*p)?))).collect();
        std::fs::write(out.with_extension("pids"), names)?;
        let log = File::create(out.with_extension("log"))?;
        let graph = std::env::var("BENCH_DP_PERF_CALL_GRAPH").is_ok_and(|v| v == "1");
        let child = Command::new("perf")
            .args(["record", "-q", "-a"])
            .args(graph.then_some("-g"))
            .args(["-e", "cpu-clock", "-F", "499", "-o"])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting perf record (Debian package linux-perf)")?;
        Ok(Self(child))
    }

    /// SIGINT, then waits for perf to write its file (at most 30 s).
    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill").arg("-INT").arg(self.0.id().to_string()).status();
        for _ in 0..300 {
            if let Some(status) = self.0.try_wait()? {
                // perf ends by re-raising the SIGINT once its file is written.
                use std::os::unix::process::ExitStatusExt as _;
                anyhow::ensure!(status.success() || status.signal() == Some(2), "perf record exited ({status})");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        anyhow::bail!("perf record did not stop within 30 s")
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// User plus system CPU seconds of `pid` (`/proc/<pid>/stat` fields 14 and 15, in the
/// kernel's USER_HZ ticks of 1/100 s on Linux).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat_cpu(&text).with_context(|| format!("parsing {path}"))
}

fn parse_stat_cpu(text: &str) -> Option<f64> {
    // The command name is in parentheses and may hold spaces: count from the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so fields 14 and 15 are at 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Bytes the kernel saw acknowledged on established TCP connections to local port
/// `port` (`ss -ti`'s `bytes_acked`): the wire bytes an agent sent, TLS included.
pub fn tcp_bytes_acked_to(port: u16) -> anyhow::Result<u64> {
    let out = Command::new("ss")
        .args(["-tinH", "state", "established", "dst", &format!("127.0.0.1:{port}")])
        .output()
        .context("running ss")?;
    anyhow::ensure!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(parse_bytes_acked(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_bytes_acked(text: &str) -> u64 {
    text.split_whitespace().filter_map(|w| w.strip_prefix("bytes_acked:")?.parse::<u64>().ok()).sum()
}

/// A free loopback port (bound and released; good enough for a benchmark's children).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `GET /metrics` from `addr` (plain HTTP/1.0; the answer's body).
pub async fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connecting to /metrics timed out")??;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.context("reading /metrics")??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    anyhow::ensure!(head.starts_with("HTTP/1.") && head.contains(" 200"), "{}", head.lines().next().unwrap_or(""));
    Ok(body.to_owned())
}

/// A sample without labels (`name value`), or 0 when absent.
pub fn value(text: &str, name: &str) -> f64 {
    crate::metrics::samples(text, name).iter().map(|s| s.value).sum()
}

/// Strips ANSI escape sequences (in case a log is coloured anyway).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_past_a_command_with_spaces() {
        let stat = "4242 (tokio worker) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 130 0 0 20 0 8 0 1 2 3";
        assert_eq!(parse_stat_cpu(stat), Some(3.8));
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }

    #[test]
    fn sums_bytes_acked_of_connections() {
        let ss = "ESTAB 0 0 127.0.0.1:5000 127.0.0.1:9443\n\t cubic bytes_sent:1200 bytes_acked:1100 bytes_received:50\n\
                  ESTAB 0 0 127.0.0.1:5001 127.0.0.1:9443\n\t cubic bytes_acked:900 segs_out:3\n";
        assert_eq!(parse_bytes_acked(ss), 2000);
    }

    #[test]
    fn strips_colour() {
        assert_eq!(strip_ansi("\u{1b}[3mpoint\u{1b}[0m\u{1b}[2m=\u{1b}[0mx"), "point=x");
    }
}
