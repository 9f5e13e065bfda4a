//! The peer tools, run under GNU `time` so their CPU time and peak RSS are measured the
//! same way every time: restic (its rclone backend to the same Azurite) and rsync.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context as _;
use serde_json::Value;

use siterecovery_store::backend::{DEVSTORE_ACCOUNT, DEVSTORE_KEY};

/// A finished command with its resources.
#[derive(Debug, Clone, Default)]
pub struct Timed {
    /// Wall-clock seconds (measured here).
    pub wall_s: f64,
    /// User plus system CPU seconds of the command and the children it waited for.
    pub cpu_s: f64,
    /// Largest peak RSS among them, MiB (GNU time's `%M`).
    pub peak_rss_mib: f64,
    /// Standard output.
    pub stdout: String,
}

/// Runs `cmd` under `/usr/bin/time`; fails with its stderr when it fails.
pub fn run_timed(program: &Path, args: &[&str], envs: &[(String, String)], scratch: &Path) -> anyhow::Result<Timed> {
    let report = scratch.join(format!("time-{}.txt", std::process::id()));
    let started = Instant::now();
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%U %S %M", "-o"])
        .arg(&report)
        .arg(program)
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .output()
        .with_context(|| format!("running {}", program.display()))?;
    let wall_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        out.status.success(),
        "{} {} failed ({}): {}",
        program.display(),
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    let text = std::fs::read_to_string(&report).context("reading GNU time's report")?;
    let _ = std::fs::remove_file(&report);
    let f: Vec<f64> = text.lines().last().unwrap_or("").split_whitespace().filter_map(|w| w.parse().ok()).collect();
    anyhow::ensure!(f.len() == 3, "unexpected GNU time output: {text}");
    Ok(Timed { wall_s, cpu_s: f[0] + f[1], peak_rss_mib: f[2] / 1024.0, stdout: String::from_utf8(out.stdout)? })
}

/// The first line of `program args` (a version banner).
pub fn version(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// A restic repository in an Azurite container, reached through rclone.
#[derive(Debug, Clone)]
pub struct Restic {
    /// The rclone binary restic starts.
    pub rclone: PathBuf,
    /// `rclone:az:<container>`.
    pub repo: String,
    /// restic's local cache (fresh per run, so runs do not help each other).
    pub cache: PathBuf,
    /// Scratch directory for GNU time's reports.
    pub scratch: PathBuf,
    envs: Vec<(String, String)>,
}

/// What a backup did (restic's `--json` summary).
#[derive(Debug, Clone, Default)]
pub struct Backup {
    /// Resources.
    pub timed: Timed,
    /// Bytes restic added to the repository (`data_added`; restic 0.14 counts them before
    /// compression).
    pub data_added: Option<f64>,
}

impl Restic {
    /// A repository in `container` of the Azurite at `endpoint`.
    pub fn new(rclone: &Path, endpoint: &str, container: &str, work: &Path) -> Self {
        let envs = [
            ("RESTIC_PASSWORD", "siterecovery-bench"),
            ("RCLONE_CONFIG_AZ_TYPE", "azureblob"),
            ("RCLONE_CONFIG_AZ_ACCOUNT", DEVSTORE_ACCOUNT),
            ("RCLONE_CONFIG_AZ_KEY", DEVSTORE_KEY),
            ("RCLONE_CONFIG_AZ_ENDPOINT", endpoint),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec();
        Self {
            rclone: rclone.to_path_buf(),
            repo: format!("rclone:az:{container}"),
            cache: work.join("restic-cache"),
            scratch: work.to_path_buf(),
            envs,
        }
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<Timed> {
        let rclone = format!("rclone.program={}", self.rclone.display());
        let cache = self.cache.display().to_string();
        let mut all = vec!["-o", &rclone, "-r", &self.repo, "--cache-dir", &cache];
        all.extend_from_slice(args);
        run_timed(Path::new("restic"), &all, &self.envs, &self.scratch)
    }

    /// `restic init` (not timed by callers: repository setup, not backup work).
    pub fn init(&self) -> anyhow::Result<()> {
        self.run(&["init"]).map(|_| ())
    }

    /// `restic backup <path>`; the second backup of the same path finds its parent.
    pub fn backup(&self, path: &Path) -> anyhow::Result<Backup> {
        let timed = self.run(&["backup", "--json", &path.display().to_string()])?;
        let summary = timed
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message_type"] == "summary");
        let data_added = summary.as_ref().and_then(|s| s["data_added"].as_f64());
        Ok(Backup { timed, data_added })
    }

    /// `restic restore latest --target <dir>`.
    pub fn restore_latest(&self, dir: &Path) -> anyhow::Result<Timed> {
        self.run(&["restore", "latest", "--target", &dir.display().to_string()])
    }
}

/// `rsync --inplace --no-whole-file --stats src dst` (local: rsync's delta algorithm
/// between its sender and receiver processes); returns the run and rsync's
/// "Total bytes sent".
pub fn rsync(src: &Path, dst: &Path, scratch: &Path) -> anyhow::Result<(Timed, Option<f64>)> {
    let (s, d) = (src.display().to_string(), dst.display().to_string());
    let timed = run_timed(Path::new("rsync"), &["--inplace", "--no-whole-file", "--stats", &s, &d], &[], scratch)?;
    let sent = timed
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent:"))
        .and_then(|v| v.trim().replace(',', "").parse().ok());
    Ok((timed, sent))
}
