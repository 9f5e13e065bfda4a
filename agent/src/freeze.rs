//! Filesystem freezes and user hooks for app-consistent points (docs/replication-protocol.md
//! "Recovery points").
//!
//! The workspace forbids unsafe code, so the FIFREEZE and FITHAW ioctls are issued by
//! util-linux `fsfreeze` (installed wherever util-linux is) rather than by this process.
//! A freeze is held by a thread of its own, not by the async runtime: it thaws when the
//! [`Freeze`] is thawed or dropped (an error, an early return, a cancelled future on
//! SIGTERM) and, whatever the rest of the agent is doing, when its time limit is up.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The command that freezes and thaws filesystems.
const FSFREEZE: &str = "fsfreeze";
/// How much of a failed hook's output a reason quotes.
const OUTPUT_TAIL: usize = 400;

/// Why a freeze could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// `fsfreeze -f` failed on a filesystem (those frozen before it are thawed).
    #[error("freezing {mount}: {message}")]
    Failed {
        /// The mount point.
        mount: PathBuf,
        /// What fsfreeze said.
        message: String,
    },
    /// Freezing took longer than the limit (thawed as soon as it completed).
    #[error("freezing {0} did not complete within the freeze limit")]
    TimedOut(PathBuf),
}

/// How a freeze ended.
#[derive(Debug, Clone, Default)]
pub struct ThawReport {
    /// How long the first filesystem was frozen (or being frozen).
    pub held: Duration,
    /// The time limit thawed it, not the agent.
    pub by_limit: bool,
    /// Filesystems that did not thaw, with fsfreeze's message.
    pub errors: Vec<String>,
}

/// Filesystems frozen by a thread that thaws them on request, on drop, or at the limit.
#[derive(Debug)]
pub struct Freeze {
    /// Sending or dropping it thaws.
    release: Option<mpsc::Sender<()>>,
    frozen: Option<tokio::sync::oneshot::Receiver<Result<(), FreezeError>>>,
    thawed: mpsc::Receiver<ThawReport>,
    holding: Arc<AtomicBool>,
}

impl Freeze {
    /// Starts freezing `mounts` in order. They are thawed in reverse order at the latest
    /// `limit` after freezing began; a freeze that itself outlasts the limit (the kernel
    /// flushing dirty data) is undone as soon as it completes.
    pub fn start(mounts: Vec<PathBuf>, limit: Duration) -> Self {
        let (release, wait) = mpsc::channel::<()>();
        let (frozen_tx, frozen) = tokio::sync::oneshot::channel();
        let (thawed_tx, thawed) = mpsc::channel();
        let holding = Arc::new(AtomicBool::new(true));
        let flag = holding.clone();
        std::thread::spawn(move || {
            let began = Instant::now();
            let deadline = began + limit;
            let mut done: Vec<&PathBuf> = Vec::new();
            let mut result = Ok(());
            for m in &mounts {
                if let Err(message) = fsfreeze("-f", m) {
                    result = Err(FreezeError::Failed { mount: m.clone(), message });
                    break;
                }
                done.push(m);
                if Instant::now() >= deadline {
                    result = Err(FreezeError::TimedOut(m.clone()));
                    break;
                }
            }
            let ok = result.is_ok();
            let _ = frozen_tx.send(result);
            let by_limit = ok
                && matches!(
                    wait.recv_timeout(deadline.saturating_duration_since(Instant::now())),
                    Err(mpsc::RecvTimeoutError::Timeout)
                );
            // Cleared before thawing starts: a quiet look taken while it is still set
            // saw the filesystems frozen.
            flag.store(false, Ordering::SeqCst);
            let errors = done
                .iter()
                .rev()
                .filter_map(|m| fsfreeze("-u", m).err().map(|e| format!("{}: {e}", m.display())))
                .collect();
            let _ = thawed_tx.send(ThawReport { held: began.elapsed(), by_limit, errors });
        });
        Self { release: Some(release), frozen: Some(frozen), thawed, holding }
    }

    /// Waits until every filesystem is frozen.
    pub async fn frozen(&mut self) -> Result<(), FreezeError> {
        match self.frozen.take() {
            Some(rx) => rx.await.unwrap_or_else(|_| Err(FreezeError::TimedOut(PathBuf::new()))),
            None => Ok(()),
        }
    }

    /// Whether the filesystems are still held frozen (false once thawing began).
    pub fn holding(&self) -> Arc<AtomicBool> {
        self.holding.clone()
    }

    /// Thaws now and reports how the freeze went. Waits at most `patience` for the
    /// freezing thread (which may still be inside a slow `fsfreeze -f`; it thaws on its
    /// own when that returns).
    pub async fn thaw(mut self, patience: Duration) -> Option<ThawReport> {
        drop(self.release.take());
        let rx = std::mem::replace(&mut self.thawed, mpsc::channel().1);
        tokio::task::spawn_blocking(move || rx.recv_timeout(patience).ok()).await.ok().flatten()
    }
}

impl Drop for Freeze {
    /// Thaws (the freezing thread does) and waits a little for it, so that a process
    /// exiting right after (SIGTERM) does not leave a filesystem frozen.
    fn drop(&mut self) {
        if self.release.take().is_some() {
            let _ = self.thawed.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// Runs `fsfreeze <flag> <mount>`; the error is what it printed.
fn fsfreeze(flag: &str, mount: &Path) -> Result<(), String> {
    let out = std::process::Command::new(FSFREEZE)
        .arg(flag)
        .arg(mount)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {FSFREEZE}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    Err(if text.is_empty() { format!("{FSFREEZE} {flag} exited with {}", out.status) } else { text })
}

/// Thaws filesystems a killed agent may have left frozen (nothing happens to a
/// filesystem that is not frozen). Returns those that were.
pub fn thaw_leftovers(mounts: &[PathBuf]) -> Vec<PathBuf> {
    mounts.iter().filter(|m| fsfreeze("-u", m).is_ok()).cloned().collect()
}

/// Checks `path` is the root of a mounted filesystem: freezing any other directory would
/// freeze the filesystem that contains it (often `/`).
pub fn check_mount_point(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", path.display()));
    }
    let parent = std::fs::metadata(path.join("..")).map_err(|e| format!("{}/..: {e}", path.display()))?;
    if meta.dev() == parent.dev() && meta.ino() != parent.ino() {
        return Err(format!("{} is not a mount point", path.display()));
    }
    Ok(())
}

/// Why a hook did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// It could not be started.
    #[error("could not start {command}: {message}")]
    Spawn {
        /// argv\[0].
        command: String,
        /// The error.
        message: String,
    },
    /// It exited unsuccessfully.
    #[error("{command} {status}{output}")]
    Failed {
        /// argv\[0].
        command: String,
        /// Exit status.
        status: String,
        /// The end of what it printed (stderr, else stdout), prefixed with ": ".
        output: String,
    },
    /// It ran longer than allowed and was killed with its process group.
    #[error("{command} ran longer than {limit:?} and was killed")]
    TimedOut {
        /// argv\[0].
        command: String,
        /// The limit.
        limit: Duration,
    },
}

/// Kills a hook's process group unless it exited (a hook cancelled on SIGTERM, or timed
/// out, leaves no process behind, its children included).
struct Group(Option<i32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Runs a hook (`argv`, no shell) in a process group of its own, with `env` added, for
/// at most `limit`.
pub async fn run_hook(argv: &[String], env: &[(&str, String)], limit: Duration) -> Result<(), HookError> {
    let command = argv.first().cloned().unwrap_or_default();
    let child = tokio::process::Command::new(&command)
        .args(&argv[1.min(argv.len())..])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HookError::Spawn { command: command.clone(), message: e.to_string() })?;
    let mut group = Group(child.id().and_then(|p| i32::try_from(p).ok()));
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Err(_) => return Err(HookError::TimedOut { command, limit }),
        Ok(Err(e)) => return Err(HookError::Spawn { command, message: e.to_string() }),
        Ok(Ok(out)) => out,
    };
    // It exited and its output is closed: what it left running in the background is the
    // hook's business.
    group.0 = None;
    if out.status.success() {
        return Ok(());
    }
    let text = if out.stderr.iter().any(|b| !b.is_ascii_whitespace()) { &out.stderr } else { &out.stdout };
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    let tail = match text.char_indices().rev().nth(OUTPUT_TAIL) {
        Some((i, _)) => format!("…{}", &text[i..]),
        None => text.to_owned(),
    };
    let output = if tail.is_empty() { String::new() } else { format!(": {tail}") };
    Err(HookError::Failed { command, status: out.status.to_string(), output })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn only_mount_points_are_frozen() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(check_mount_point(Path::new("/")).is_ok());
        let e = check_mount_point(tmp.path()).unwrap_err();
        assert!(e.ends_with("is not a mount point"), "{e}");
        assert!(check_mount_point(&tmp.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn a_failed_hook_says_how_and_quotes_its_output() {
        let e = run_hook(&sh("echo quiesce refused >&2; exit 3"), &[], Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(e.to_string(), "/bin/sh exit status: 3: quiesce refused");
        let env = [("SITERECOVERY_HOOK", "pre".to_owned())];
        run_hook(&sh("test \"$SITERECOVERY_HOOK\" = pre"), &env, Duration::from_secs(10)).await.unwrap();
        let e = run_hook(&["/nonexistent/hook".to_owned()], &[], Duration::from_secs(10)).await.unwrap_err();
        assert!(matches!(e, HookError::Spawn { .. }), "{e}");
    }

    #[tokio::test]
    async fn a_hook_over_its_limit_is_killed_with_its_children() {
        let tmp = tempfile::tempdir().unwrap();
        let pid = tmp.path().join("pid");
        let script = format!("sleep 600 & echo $! > {}; wait", pid.display());
        let e = run_hook(&sh(&script), &[], Duration::from_millis(500)).await.unwrap_err();
        assert!(matches!(e, HookError::TimedOut { .. }), "{e}");
        let pid = std::fs::read_to_string(&pid).unwrap().trim().to_owned();
        let stat = format!("/proc/{pid}/stat");
        let gone = || {
            std::fs::read_to_string(&stat)
                .map_or(true, |s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        };
        for _ in 0..100 {
            if gone() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the hook's child {pid} survived");
    }
}
