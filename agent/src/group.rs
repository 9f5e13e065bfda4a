//! The agent's part of a consistency-group round (docs/replication-protocol.md
//! "Consistency groups"): bring the process server's copy to one instant, hold it while
//! the other members get ready, and record the group point only if nothing was written
//! since that instant when the commit arrives.

use std::time::Duration;

use siterecovery_store::{PointKind, generate_point_id};
use siterecovery_wire::{GroupPrepare, GroupReady, Message, PointMarker, Settings};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;

use crate::send::Wire;
use crate::{Agent, SessionError, err};

/// How long the agent tries to reach an instant for a round (the process server waits
/// 30 s for every member).
const READY_BUDGET: Duration = Duration::from_secs(20);
/// Longest the agent waits for the process server's decision once ready.
const DECISION_TIMEOUT: Duration = Duration::from_secs(60);

/// What a round left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GroupOutcome {
    /// The group point `id` was recorded for this server.
    Point(String),
    /// No group point; a crash-consistent point of this server alone was recorded instead.
    CrashPoint(String),
    /// No point at all (no instant reached).
    Nothing,
}

impl Agent {
    /// Takes part in the round `prepare`. Every chunk sent before the marker reflects the
    /// instant held; chunks written meanwhile follow the marker.
    pub(crate) async fn group_round<W: AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<W>,
        control: &mut mpsc::UnboundedReceiver<Message>,
        prepare: GroupPrepare,
    ) -> Result<GroupOutcome, SessionError> {
        let round = prepare.round;
        let mut held = None;
        // Unlike an interval's own point, a round has one chance: keep pre-copying (a
        // freeze after each unquiet attempt) until a quiet look or the time is up.
        let began = tokio::time::Instant::now();
        let mut at = None;
        while at.is_none() && began.elapsed() < READY_BUDGET {
            at = self.precopy(wire, &|| false).await?;
            if at.is_none() {
                (at, held) = self.converge_holding(wire).await?;
            }
        }
        // Ready only once the process server holds the instant durably.
        let drained = wire.link.drain().await.map_err(err);
        let reason = match (&at, &drained) {
            (_, Err(e)) => Some(e.to_string()),
            (None, _) => Some(format!("writes never paused in {} s", READY_BUDGET.as_secs())),
            _ => None,
        };
        let ready = GroupReady { round, ready: reason.is_none(), reason: reason.clone() };
        let answered = match drained {
            Ok(()) => wire.link.send_unnumbered(&Message::GroupReady(ready)).await.map_err(err),
            Err(e) => Err(e),
        };
        let decision = match (&answered, at) {
            (Ok(()), Some(_)) => wait_decision(control, round, &mut self.pending_settings).await,
            _ => None,
        };
        let outcome = self.conclude(wire, &prepare.group, at, decision).await;
        if let Some(h) = held {
            h.release().await;
        }
        answered?;
        if let Some(r) = reason {
            tracing::info!(group = %prepare.group, round, reason = %r, "not ready for the group point");
        }
        outcome
    }

    /// Records the group point if the commit came and nothing was written since the
    /// instant `at`; else a crash point at `at` (what was sent still reflects it), and
    /// then sends what was written meanwhile.
    async fn conclude<W: AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<W>,
        group: &str,
        at: Option<jiff::Timestamp>,
        decision: Option<Message>,
    ) -> Result<GroupOutcome, SessionError> {
        let Some(at) = at else { return Ok(GroupOutcome::Nothing) };
        let since = self.tracker.take(&wire.disks, wire.chunk_size).map_err(err)?;
        let still = since.is_quiet() && self.tracker.proves_quiet();
        let seq = wire.link.next_seq();
        let (marker, outcome) = match decision {
            Some(Message::GroupCommit(c)) if still => {
                let marker = PointMarker {
                    seq,
                    id: c.id.clone(),
                    kind: PointKind::Group,
                    time: c.time,
                    group: Some(group.to_string()),
                    members: c.members,
                };
                (marker, GroupOutcome::Point(c.id))
            }
            other => {
                match other {
                    Some(Message::GroupCommit(_)) => {
                        tracing::warn!(group, "written to while the group got ready; recording a crash point instead")
                    }
                    Some(Message::GroupAbort(a)) => tracing::info!(group, reason = %a.reason, "group round aborted"),
                    _ => tracing::warn!(group, "no decision on the group round; recording a crash point instead"),
                }
                let id = generate_point_id(at, PointKind::Crash);
                let marker =
                    PointMarker { seq, id: id.clone(), kind: PointKind::Crash, time: at, group: None, members: vec![] };
                (marker, GroupOutcome::CrashPoint(id))
            }
        };
        wire.link.send(seq, &Message::Point(marker)).await.map_err(err)?;
        if !since.is_quiet() {
            self.send_pass(wire, &since, false).await?;
        }
        wire.link.drain().await.map_err(err)?;
        Ok(outcome)
    }
}

/// The commit or abort of `round` (older rounds' messages are skipped), or `None` after
/// [`DECISION_TIMEOUT`] or when the connection ended. Settings that arrive meanwhile are
/// kept in `settings` for the caller.
async fn wait_decision(
    control: &mut mpsc::UnboundedReceiver<Message>,
    round: u64,
    settings: &mut Option<Settings>,
) -> Option<Message> {
    tokio::time::timeout(DECISION_TIMEOUT, async {
        while let Some(m) = control.recv().await {
            match m {
                Message::GroupCommit(ref c) if c.round == round => return Some(m),
                Message::GroupAbort(ref a) if a.round == round => return Some(m),
                Message::Settings(new) => *settings = Some(new),
                _ => {}
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}
