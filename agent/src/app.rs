//! App-consistent recovery points (docs/replication-protocol.md "Recovery points"): the
//! user's pre-hook, a freeze of the configured filesystems, pre-copy until a quiet look
//! (immediate under the freeze), the `Point` marker of kind `App`, the thaw, the
//! post-hook. Whatever fails, the filesystems are thawed and the reason is reported.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use siterecovery_store::{PointKind, generate_point_id};
use siterecovery_wire::{Message, PointMarker};
use tokio::io::AsyncWrite;
use tokio::sync::watch;

use crate::freeze::{Freeze, FreezeError, HookError, check_mount_point, run_hook};
use crate::send::Wire;
use crate::session::stopping;
use crate::{Agent, SessionError, err};

/// How the agent takes app-consistent points (`appConsistency` in agent.json). The
/// interval is the policy's `appConsistentInterval`, handed out by the process server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppConsistency {
    /// Command run before the freeze to quiesce applications (argv, no shell).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_hook: Vec<String>,
    /// Command run after the thaw, after every attempt that got as far as the pre-hook,
    /// whatever happened since (a pre-hook that failed half-way is undone too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_hook: Vec<String>,
    /// Mount points of the filesystems on the protected disks, frozen in this order.
    #[serde(default)]
    pub mount_points: Vec<PathBuf>,
    /// Longest a freeze may last: the filesystems are thawed then, point or not.
    #[serde(default = "default_freeze_timeout")]
    pub freeze_timeout_seconds: f64,
    /// Longest a hook may run before it is killed with its process group.
    #[serde(default = "default_hook_timeout")]
    pub hook_timeout_seconds: f64,
    /// Interval when the process server hands out none (standalone process servers);
    /// 0 or absent: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_seconds: Option<f64>,
}

fn default_freeze_timeout() -> f64 {
    10.0
}
fn default_hook_timeout() -> f64 {
    60.0
}

fn seconds(s: f64, default: f64) -> Duration {
    Duration::try_from_secs_f64(s).or_else(|_| Duration::try_from_secs_f64(default)).unwrap_or_default()
}

impl AppConsistency {
    fn freeze_limit(&self) -> Duration {
        seconds(self.freeze_timeout_seconds, default_freeze_timeout()).max(Duration::from_millis(100))
    }

    fn hook_limit(&self) -> Duration {
        seconds(self.hook_timeout_seconds, default_hook_timeout()).max(Duration::from_millis(100))
    }

    /// The interval of the configuration, if it turns app-consistent points on.
    pub fn interval(&self) -> Option<Duration> {
        self.interval_seconds.map(|s| seconds(s, 0.0)).filter(|d| !d.is_zero())
    }
}

/// An app-consistent attempt that produced no point, or a hook or thaw that failed
/// around one that did.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AppFailure {
    /// When.
    pub time: jiff::Timestamp,
    /// `NotConfigured`, `NotAMountPoint`, `PreHookFailed`, `PreHookTimedOut`,
    /// `FreezeFailed`, `FreezeTimedOut`, `WritesNeverPaused`, `SessionEnded`,
    /// `ShuttingDown` (no point), or `PostHookFailed`, `PostHookTimedOut`, `ThawFailed`.
    pub reason: String,
    /// What happened, and what to do.
    pub message: String,
}

/// How an app-consistent attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppOutcome {
    /// A point was acknowledged: it is this cycle's point.
    Point,
    /// No point this time; the reason is in the status.
    NoPoint,
    /// The agent is shutting down (the link may hold a partial frame: close it).
    Shutdown,
}

/// Why the frozen part ended without a marker.
enum Fail {
    App(&'static str, String),
    Session(SessionError),
    Shutdown,
}

impl Agent {
    /// Takes one app-consistent point (see the module documentation).
    pub(crate) async fn app_point<W: AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<W>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<AppOutcome, SessionError> {
        let r = self.app_attempt(wire, shutdown).await;
        if matches!(r, Ok(AppOutcome::NoPoint) | Err(_)) {
            self.update(|s| s.app_points_failed += 1);
        }
        r
    }

    async fn app_attempt<W: AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<W>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<AppOutcome, SessionError> {
        let Some(cfg) = self.config.app_consistency.clone() else {
            self.app_failed(
                "NotConfigured",
                "the policy asks for app-consistent points but agent.json has no appConsistency section \
                 (hooks and mount points to freeze)"
                    .into(),
            );
            return Ok(AppOutcome::NoPoint);
        };
        if let Some(e) = cfg.mount_points.iter().find_map(|m| check_mount_point(m).err()) {
            self.app_failed("NotAMountPoint", format!("appConsistency.mountPoints: {e}"));
            return Ok(AppOutcome::NoPoint);
        }
        if !cfg.pre_hook.is_empty() {
            let env = self.hook_env(&cfg, "pre");
            let r = tokio::select! {
                r = run_hook(&cfg.pre_hook, &env, cfg.hook_limit()) => Some(r),
                _ = stopping(shutdown) => None,
            };
            let failure = match &r {
                None => Some(("ShuttingDown", "the agent stopped during the pre-hook".to_owned())),
                Some(Ok(())) => None,
                Some(Err(e @ HookError::TimedOut { .. })) => Some(("PreHookTimedOut", format!("pre-hook: {e}"))),
                Some(Err(e)) => Some(("PreHookFailed", format!("pre-hook: {e}"))),
            };
            if let Some((reason, message)) = failure {
                self.app_failed(reason, message);
                self.post_hook(&cfg, None).await;
                return Ok(if r.is_none() { AppOutcome::Shutdown } else { AppOutcome::NoPoint });
            }
        }

        let limit = cfg.freeze_limit();
        let mut freeze = Freeze::start(cfg.mount_points.clone(), limit);
        let holding = freeze.holding();
        let frozen = async {
            freeze.frozen().await.map_err(|e| match e {
                FreezeError::TimedOut(_) => Fail::App("FreezeTimedOut", e.to_string()),
                FreezeError::Failed { .. } => Fail::App("FreezeFailed", e.to_string()),
            })?;
            let stop = || !holding.load(Ordering::SeqCst);
            let at = self.precopy(wire, &stop).await.map_err(Fail::Session)?;
            // Checked after the quiet look: still held then means frozen at its instant.
            if stop() {
                return Err(Fail::App(
                    "FreezeTimedOut",
                    format!(
                        "the changes did not reach the process server within the freeze limit ({limit:?}); \
                         the filesystems were thawed without a point (raise freezeTimeoutSeconds)"
                    ),
                ));
            }
            let Some(time) = at else {
                return Err(Fail::App(
                    "WritesNeverPaused",
                    "writes to the protected disks went on under the freeze: a filesystem on them is \
                     missing from appConsistency.mountPoints, or something writes to the devices directly"
                        .into(),
                ));
            };
            let id = generate_point_id(time, PointKind::App);
            let seq = wire.link.next_seq();
            let marker = PointMarker { seq, id: id.clone(), kind: PointKind::App, time, group: None, members: vec![] };
            wire.link.send(seq, &Message::Point(marker)).await.map_err(|e| Fail::Session(err(e)))?;
            Ok(id)
        };
        let result = tokio::select! {
            r = frozen => r,
            _ = stopping(shutdown) => Err(Fail::Shutdown),
        };
        // Everything the point holds was sent before its marker: thaw before the ack.
        let thaw = freeze.thaw(limit).await;
        match &thaw {
            Some(t) => tracing::info!(held = ?t.held, by_limit = t.by_limit, "filesystems thawed"),
            None => tracing::error!("the freezing thread did not report a thaw; it thaws when fsfreeze returns"),
        }
        let (outcome, point, ended) = match result {
            Ok(id) => match wire.link.drain().await {
                Ok(()) => {
                    tracing::info!(point = %id, "app-consistent recovery point acknowledged");
                    self.update(|s| {
                        s.points += 1;
                        s.last_point = Some(id.clone());
                        s.app_points += 1;
                        s.last_app_point = Some(id.clone());
                    });
                    (AppOutcome::Point, Some(id), None)
                }
                Err(e) => {
                    self.app_failed("SessionEnded", format!("point {id} was not acknowledged: {e}"));
                    (AppOutcome::NoPoint, None, Some(err(e)))
                }
            },
            Err(Fail::App(reason, message)) => {
                self.app_failed(reason, message);
                (AppOutcome::NoPoint, None, None)
            }
            Err(Fail::Session(e)) => {
                self.app_failed("SessionEnded", format!("the session ended under the freeze: {e}"));
                (AppOutcome::NoPoint, None, Some(e))
            }
            Err(Fail::Shutdown) => {
                self.app_failed("ShuttingDown", "the agent stopped under the freeze".into());
                (AppOutcome::Shutdown, None, None)
            }
        };
        match thaw {
            Some(t) if !t.errors.is_empty() => self.app_failed("ThawFailed", t.errors.join("; ")),
            _ => {}
        }
        self.post_hook(&cfg, point.as_deref()).await;
        match ended {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }

    /// Runs the post-hook, if any; its failure is reported but does not undo a point.
    async fn post_hook(&mut self, cfg: &AppConsistency, point: Option<&str>) {
        if cfg.post_hook.is_empty() {
            return;
        }
        let env = self.hook_env(cfg, "post");
        let Err(e) = run_hook(&cfg.post_hook, &env, cfg.hook_limit()).await else { return };
        let reason = if matches!(e, HookError::TimedOut { .. }) { "PostHookTimedOut" } else { "PostHookFailed" };
        let taken = point.map(|p| format!(" (point {p} was taken)")).unwrap_or_default();
        self.app_failed(reason, format!("post-hook: {e}{taken}"));
    }

    fn hook_env(&self, cfg: &AppConsistency, hook: &str) -> Vec<(&'static str, String)> {
        let mounts: Vec<String> = cfg.mount_points.iter().map(|m| m.display().to_string()).collect();
        vec![
            ("SITERECOVERY_HOOK", hook.to_owned()),
            ("SITERECOVERY_SERVER", format!("{}/{}", self.config.namespace, self.config.server)),
            ("SITERECOVERY_MOUNT_POINTS", mounts.join(":")),
        ]
    }

    fn app_failed(&self, reason: &str, message: String) {
        tracing::warn!(reason, message, "app-consistent recovery point");
        let failure = AppFailure { time: jiff::Timestamp::now(), reason: reason.to_owned(), message };
        self.update(|s| s.last_app_failure = Some(failure));
    }
}

/// Longest a convergence freeze of a crash-consistent point may last.
const CONVERGENCE_FREEZE: Duration = Duration::from_secs(2);

impl Agent {
    /// When writes never paused for a crash-consistent point: freezes the configured
    /// filesystems briefly (no hooks), sends what changed until a quiet look inside the
    /// freeze, and thaws. Returns that look's time, or `None` (no filesystems configured,
    /// the freeze failed, or the changes did not fit in the freeze).
    pub(crate) async fn converge_frozen<W: AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<W>,
    ) -> Result<Option<jiff::Timestamp>, SessionError> {
        let (at, held) = self.converge_holding(wire).await?;
        if let Some(held) = held {
            held.release().await;
        }
        Ok(at)
    }

    /// [`Self::converge_frozen`], leaving the filesystems frozen (until the returned
    /// freeze is released, or its 2 s limit) when the look succeeded: a group round holds
    /// the instant while the other members get ready.
    pub(crate) async fn converge_holding<W: AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<W>,
    ) -> Result<(Option<jiff::Timestamp>, Option<HeldFreeze>), SessionError> {
        let mounts = match &self.config.app_consistency {
            Some(a) if !a.mount_points.is_empty() => a.mount_points.clone(),
            _ => return Ok((None, None)),
        };
        if let Some(bad) = mounts.iter().find_map(|m| check_mount_point(m).err()) {
            tracing::warn!(problem = %bad, "cannot freeze to converge a crash-consistent point");
            return Ok((None, None));
        }
        let limit = CONVERGENCE_FREEZE
            .min(self.config.app_consistency.as_ref().map_or(CONVERGENCE_FREEZE, |a| a.freeze_limit()));
        let mut freeze = Freeze::start(mounts, limit);
        let holding = freeze.holding();
        let result = match freeze.frozen().await {
            Ok(()) => {
                let stop = || !holding.load(Ordering::SeqCst);
                let at = self.precopy(wire, &stop).await;
                // Still held after the quiet look: the look saw the filesystems frozen.
                at.map(|t| t.filter(|_| !stop()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "convergence freeze failed");
                Ok(None)
            }
        };
        let held = HeldFreeze { freeze, limit };
        match result {
            Ok(Some(at)) => Ok((Some(at), Some(held))),
            other => {
                held.release().await;
                other.map(|at| (at, None))
            }
        }
    }
}

/// Filesystems frozen to converge, until released.
pub(crate) struct HeldFreeze {
    freeze: Freeze,
    limit: Duration,
}

impl HeldFreeze {
    /// Thaws, logging how long the freeze lasted.
    pub(crate) async fn release(self) {
        let thaw = self.freeze.thaw(self.limit).await;
        tracing::info!(
            held = ?thaw.as_ref().map(|t| t.held), by_limit = thaw.as_ref().is_some_and(|t| t.by_limit),
            "convergence freeze released"
        );
    }
}
