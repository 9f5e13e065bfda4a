//! Child processes of the tests: the process-server binary on fixed ports (so a restart
//! keeps them), and what the tests read from its `/metrics`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, sleep};

use super::Pki;

/// A child process whose output goes to a log file; SIGKILLed and reaped when dropped,
/// so a failing test leaves nothing running.
pub struct ChildGuard {
    child: Option<Child>,
    pub log: PathBuf,
}

impl ChildGuard {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let program = format!("{:?}", cmd.get_program());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {program}: {e}"));
        Self { child: Some(child), log }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` (a name `kill` knows: `STOP`, `CONT`, …) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("child was killed").id();
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().unwrap();
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// The process id (panics if the child was killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child was killed").id()
    }

    /// Whether the process still runs (panics with its log if it exited).
    pub fn assert_alive(&mut self, what: &str) {
        let c = self.child.as_mut().expect("child was killed");
        if let Some(status) = c.try_wait().unwrap() {
            panic!("{what}: the child exited with {status}; its log ends with:\n{}", self.tail());
        }
    }

    /// The end of the child's output, for failure messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let from = text.len().saturating_sub(4000);
        String::from_utf8_lossy(&text[from..]).into_owned()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A process server binary run as a child, on fixed ports so a restart keeps them.
pub struct PsChild {
    pub guard: ChildGuard,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl PsChild {
    /// Starts the binary and waits until it listens.
    pub async fn start(
        dir: &Path,
        pki: &Pki,
        targets: &Path,
        port: u16,
        metrics_port: u16,
        limit: u64,
        tag: &str,
    ) -> Self {
        let mut ps = Self::spawn(dir, pki, targets, port, metrics_port, limit, tag);
        ps.wait_listening(30).await;
        ps
    }

    /// Starts the binary.
    pub fn spawn(dir: &Path, pki: &Pki, targets: &Path, port: u16, metrics_port: u16, limit: u64, tag: &str) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_siterecovery-process-server"));
        Self::configure(&mut cmd, dir, pki, targets, port, metrics_port)
            .arg("--cache-limit-bytes")
            .arg(limit.to_string());
        Self::run(cmd, &dir.join(format!("{tag}.log")), port, metrics_port)
    }

    /// Adds a test process server's arguments to `cmd`: its ports on loopback, its cache in
    /// `dir`, the PKI's serving certificate, the targets file; and `RUST_LOG=info`.
    pub fn configure<'c>(
        cmd: &'c mut Command,
        dir: &Path,
        pki: &Pki,
        targets: &Path,
        port: u16,
        metrics_port: u16,
    ) -> &'c mut Command {
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--metrics")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .arg("--tls-dir")
            .arg(pki.ps_tls())
            .arg("--targets")
            .arg(targets)
            .env("RUST_LOG", "info")
    }

    /// Runs `cmd` (a process server listening on `port`), its output going to `log`.
    pub fn run(cmd: Command, log: &Path, port: u16, metrics_port: u16) -> Self {
        Self {
            guard: ChildGuard::spawn(cmd, log.to_owned()),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            metrics: format!("127.0.0.1:{metrics_port}").parse().unwrap(),
        }
    }

    /// Waits until the process server listens, or panics after `secs` with its log.
    pub async fn wait_listening(&mut self, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let log = std::fs::read_to_string(&self.guard.log).unwrap_or_default();
            if log.contains("listening on") {
                return;
            }
            self.guard.assert_alive("process server start");
            assert!(
                Instant::now() < deadline,
                "the process server did not listen within {secs} s; log:\n{}",
                self.guard.tail()
            );
            sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Value of one Prometheus sample from `GET /metrics`, if the server answers.
pub async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr)).await.ok()?.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await.ok()?.ok()?;
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
