//! The ProtectedServer lifecycle as a pure state machine.
//!
//! ```text
//! Enabling → InitialReplication → Protected ⇄ Resynchronizing
//! Protected → FailingOver → FailedOver (point can still change) → Committed
//! Committed → Reprotecting → ReverseProtected → FailingBack → FailedBack → InitialReplication
//! Test failover runs beside Protected: Running → Done → CleaningUp → none.
//! ```
//!
//! Events are either *requests* (a user, plan or failback job asks for something) or
//! *observations* (the agent, process server or a restore reports progress). A request
//! that makes no sense in the current state is refused with a named [`Rejection`] the
//! reconciler surfaces as a condition message; an observation that does not apply (a
//! late or repeated report) leaves the state unchanged.

use siterecovery_api::server::{ResyncReason, ServerPhase};

/// The test-failover track, which runs beside protection without pausing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TestFailoverState {
    /// No test failover exists.
    #[default]
    None,
    /// Test copies are being materialised.
    Running,
    /// Test copies exist and await cleanup.
    Done,
    /// Test artefacts are being removed.
    CleaningUp,
}

/// Where a server is in its lifecycle: the phase plus the test-failover track.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// Main lifecycle phase.
    pub phase: ServerPhase,
    /// Test-failover track.
    pub test_failover: TestFailoverState,
}

impl State {
    /// A newly created server.
    pub const NEW: State = State { phase: ServerPhase::Enabling, test_failover: TestFailoverState::None };
}

/// Something that happens to a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    // Requests.
    /// Start a test failover.
    StartTestFailover,
    /// Remove the test failover's artefacts.
    CleanupTestFailover,
    /// Fail over; `planned` means zero data loss with the source shut down first.
    Failover {
        /// Planned (true) or unplanned (false).
        planned: bool,
    },
    /// Re-materialise a failed-over server at another recovery point.
    ChangeRecoveryPoint,
    /// Make the failover final.
    Commit,
    /// Start reverse replication to on-prem.
    Reprotect,
    /// Planned failover back to on-prem.
    Failback,
    /// Replicate forward to Azure again after failback.
    ReEnable,
    /// Resynchronise by checksum comparison.
    Resync(ResyncReason),
    /// Delete the ProtectedServer.
    Delete,
    // Observations.
    /// The agent registered with its identity.
    AgentRegistered,
    /// Every disk finished its initial copy.
    InitialSyncComplete,
    /// A resync finished.
    ResyncComplete,
    /// The failover (or change of recovery point) finished.
    FailoverComplete,
    /// The failover failed; the source side is untouched.
    FailoverFailed,
    /// Test copies are ready.
    TestFailoverComplete,
    /// Test artefacts are gone.
    TestCleanupComplete,
    /// Reverse replication reached steady state.
    ReverseSyncComplete,
    /// The failback finished; the server runs on-prem.
    FailbackComplete,
}

impl Event {
    /// Every event, for exhaustive tests and documentation.
    pub const ALL: [Event; 23] = [
        Event::StartTestFailover,
        Event::CleanupTestFailover,
        Event::Failover { planned: true },
        Event::Failover { planned: false },
        Event::ChangeRecoveryPoint,
        Event::Commit,
        Event::Reprotect,
        Event::Failback,
        Event::ReEnable,
        Event::Resync(ResyncReason::TrackingLost),
        Event::Resync(ResyncReason::DiskResized),
        Event::Resync(ResyncReason::ChecksumMismatch),
        Event::Resync(ResyncReason::Manual),
        Event::Delete,
        Event::AgentRegistered,
        Event::InitialSyncComplete,
        Event::ResyncComplete,
        Event::FailoverComplete,
        Event::FailoverFailed,
        Event::TestFailoverComplete,
        Event::TestCleanupComplete,
        Event::ReverseSyncComplete,
        Event::FailbackComplete,
    ];

    /// Whether the event is a request (refused with a reason when invalid) rather than
    /// an observation (ignored when stale).
    pub fn is_request(self) -> bool {
        matches!(
            self,
            Event::StartTestFailover
                | Event::CleanupTestFailover
                | Event::Failover { .. }
                | Event::ChangeRecoveryPoint
                | Event::Commit
                | Event::Reprotect
                | Event::Failback
                | Event::ReEnable
                | Event::Resync(_)
                | Event::Delete
        )
    }
}

/// Why a request was refused; the reconciler shows [`Rejection::message`] in the
/// `Stalled` condition (or the plan's per-server status) and emits an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Failover needs a recovery point, which exists only once initial replication is done.
    #[error("cannot fail over while {0:?}: no recovery point exists until initial replication completes")]
    NoRecoveryPointYet(ServerPhase),
    /// A planned failover needs healthy, in-sync replication.
    #[error("a planned failover needs the server Protected (it is {0:?}); use an unplanned failover")]
    PlannedNeedsProtected(ServerPhase),
    /// Failover was requested in a phase where the server is not replicating forward.
    #[error("cannot fail over while {0:?}: the server is not replicating to the recovery site")]
    NotReplicating(ServerPhase),
    /// Failover while test copies exist would leave two copies running.
    #[error("a test failover is {0:?}; clean it up before failing over")]
    TestFailoverInProgress(TestFailoverState),
    /// Only one test failover at a time.
    #[error("a test failover is already {0:?}; clean it up before starting another")]
    TestFailoverAlreadyExists(TestFailoverState),
    /// Test failover only beside steady replication.
    #[error("test failover needs the server Protected or Resynchronizing (it is {0:?})")]
    TestFailoverNotProtected(ServerPhase),
    /// Nothing to clean up.
    #[error("there is no test failover to clean up")]
    NoTestFailover,
    /// Cleanup already running.
    #[error("the test failover is already being cleaned up")]
    CleanupAlreadyRunning,
    /// Change of point or commit only after a failover.
    #[error("{what} needs a completed failover (the server is {phase:?})")]
    NotFailedOver {
        /// The request.
        what: &'static str,
        /// The current phase.
        phase: ServerPhase,
    },
    /// Reprotect only after commit.
    #[error("reprotect needs a committed failover (the server is {0:?}); commit first")]
    NotCommitted(ServerPhase),
    /// Failback only once reverse replication is in sync.
    #[error("failback needs reverse replication in sync (the server is {0:?}); reprotect first")]
    NotReverseProtected(ServerPhase),
    /// Re-enable only after failback.
    #[error("re-enabling replication needs a completed failback (the server is {0:?})")]
    NotFailedBack(ServerPhase),
    /// Resync only while replicating forward.
    #[error("resync applies only while replicating (the server is {0:?})")]
    ResyncNotReplicating(ServerPhase),
    /// Deletion would strand a half-materialised copy.
    #[error("cannot delete while {0:?}; wait for it to finish")]
    DeleteDuringOperation(ServerPhase),
}

/// The outcome of an accepted event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The state changed (possibly only the test track).
    Moved(State),
    /// Nothing to do: a repeated request already in effect, or a stale observation.
    Unchanged,
    /// Deletion may proceed (the finalizer cleans up).
    Deleted,
}

/// Decides what `event` does in `state`. Pure and total.
pub fn transition(state: State, event: Event) -> Result<Outcome, Rejection> {
    use ServerPhase as P;
    use TestFailoverState as T;
    let phase = state.phase;
    let moved = |phase: ServerPhase| Ok(Outcome::Moved(State { phase, ..state }));
    let test = |test_failover: TestFailoverState| Ok(Outcome::Moved(State { test_failover, ..state }));
    match event {
        Event::StartTestFailover => match (phase, state.test_failover) {
            (P::Protected | P::Resynchronizing, T::None) => test(T::Running),
            (P::Protected | P::Resynchronizing, other) => Err(Rejection::TestFailoverAlreadyExists(other)),
            (other, _) => Err(Rejection::TestFailoverNotProtected(other)),
        },
        Event::CleanupTestFailover => match state.test_failover {
            T::Running | T::Done => test(T::CleaningUp),
            T::CleaningUp => Err(Rejection::CleanupAlreadyRunning),
            T::None => Err(Rejection::NoTestFailover),
        },
        Event::Failover { planned } => match phase {
            P::FailingOver | P::FailedOver | P::Committed => Ok(Outcome::Unchanged),
            P::Enabling | P::InitialReplication => Err(Rejection::NoRecoveryPointYet(phase)),
            P::Resynchronizing if planned => Err(Rejection::PlannedNeedsProtected(phase)),
            P::Protected | P::Resynchronizing if state.test_failover != T::None => {
                Err(Rejection::TestFailoverInProgress(state.test_failover))
            }
            P::Protected | P::Resynchronizing => moved(P::FailingOver),
            P::Reprotecting | P::ReverseProtected | P::FailingBack | P::FailedBack => {
                Err(Rejection::NotReplicating(phase))
            }
        },
        Event::ChangeRecoveryPoint => match phase {
            P::FailedOver => moved(P::FailingOver),
            _ => Err(Rejection::NotFailedOver { what: "changing the recovery point", phase }),
        },
        Event::Commit => match phase {
            P::FailedOver => moved(P::Committed),
            P::Committed => Ok(Outcome::Unchanged),
            _ => Err(Rejection::NotFailedOver { what: "commit", phase }),
        },
        Event::Reprotect => match phase {
            P::Committed => moved(P::Reprotecting),
            P::Reprotecting | P::ReverseProtected => Ok(Outcome::Unchanged),
            _ => Err(Rejection::NotCommitted(phase)),
        },
        Event::Failback => match phase {
            P::ReverseProtected => moved(P::FailingBack),
            P::FailingBack | P::FailedBack => Ok(Outcome::Unchanged),
            _ => Err(Rejection::NotReverseProtected(phase)),
        },
        Event::ReEnable => match phase {
            P::FailedBack => moved(P::InitialReplication),
            _ => Err(Rejection::NotFailedBack(phase)),
        },
        Event::Resync(_) => match phase {
            P::Protected => moved(P::Resynchronizing),
            // A copy in progress compares checksums anyway; restarting it gains nothing.
            P::Resynchronizing | P::InitialReplication => Ok(Outcome::Unchanged),
            _ => Err(Rejection::ResyncNotReplicating(phase)),
        },
        Event::Delete => match phase {
            P::FailingOver | P::FailingBack => Err(Rejection::DeleteDuringOperation(phase)),
            _ => Ok(Outcome::Deleted),
        },
        Event::AgentRegistered => observe(state, P::Enabling, P::InitialReplication),
        Event::InitialSyncComplete => observe(state, P::InitialReplication, P::Protected),
        Event::ResyncComplete => observe(state, P::Resynchronizing, P::Protected),
        Event::FailoverComplete => observe(state, P::FailingOver, P::FailedOver),
        // A failed failover leaves the source side as it was: replication goes on.
        Event::FailoverFailed => observe(state, P::FailingOver, P::Protected),
        Event::ReverseSyncComplete => observe(state, P::Reprotecting, P::ReverseProtected),
        Event::FailbackComplete => observe(state, P::FailingBack, P::FailedBack),
        Event::TestFailoverComplete => match state.test_failover {
            T::Running => test(T::Done),
            _ => Ok(Outcome::Unchanged),
        },
        Event::TestCleanupComplete => match state.test_failover {
            T::CleaningUp => test(T::None),
            _ => Ok(Outcome::Unchanged),
        },
    }
}

fn observe(state: State, from: ServerPhase, to: ServerPhase) -> Result<Outcome, Rejection> {
    if state.phase == from { Ok(Outcome::Moved(State { phase: to, ..state })) } else { Ok(Outcome::Unchanged) }
}

/// Every phase, for exhaustive tests.
pub const ALL_PHASES: [ServerPhase; 11] = [
    ServerPhase::Enabling,
    ServerPhase::InitialReplication,
    ServerPhase::Protected,
    ServerPhase::Resynchronizing,
    ServerPhase::FailingOver,
    ServerPhase::FailedOver,
    ServerPhase::Committed,
    ServerPhase::Reprotecting,
    ServerPhase::ReverseProtected,
    ServerPhase::FailingBack,
    ServerPhase::FailedBack,
];

/// Every test-failover state, for exhaustive tests.
pub const ALL_TEST_STATES: [TestFailoverState; 4] =
    [TestFailoverState::None, TestFailoverState::Running, TestFailoverState::Done, TestFailoverState::CleaningUp];

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
