//! Exhaustive tests of the lifecycle: every phase × test-failover state × event is
//! checked against the table below, written independently of `transition`.

use super::*;
use ServerPhase as P;
use TestFailoverState as T;

/// Which test-failover states a row applies to.
#[derive(Clone, Copy)]
enum Tf {
    Any,
    Only(TestFailoverState),
}

/// Expected outcome of a row.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    Phase(ServerPhase),
    Test(TestFailoverState),
    Unchanged,
    Deleted,
}

/// Every accepted combination. Requests not listed must be rejected; observations not
/// listed must leave the state unchanged.
fn table() -> Vec<(ServerPhase, Tf, Event, Want)> {
    use Event as E;
    use Want::*;
    let none = Tf::Only(T::None);
    let mut rows = vec![
        // Forward replication.
        (P::Enabling, Tf::Any, E::AgentRegistered, Phase(P::InitialReplication)),
        (P::InitialReplication, Tf::Any, E::InitialSyncComplete, Phase(P::Protected)),
        (P::Resynchronizing, Tf::Any, E::ResyncComplete, Phase(P::Protected)),
        (P::Protected, Tf::Any, E::Resync(ResyncReason::TrackingLost), Phase(P::Resynchronizing)),
        (P::Protected, Tf::Any, E::Resync(ResyncReason::DiskResized), Phase(P::Resynchronizing)),
        (P::Protected, Tf::Any, E::Resync(ResyncReason::ChecksumMismatch), Phase(P::Resynchronizing)),
        (P::Protected, Tf::Any, E::Resync(ResyncReason::Manual), Phase(P::Resynchronizing)),
        // Failover.
        (P::Protected, none, E::Failover { planned: true }, Phase(P::FailingOver)),
        (P::Protected, none, E::Failover { planned: false }, Phase(P::FailingOver)),
        (P::Resynchronizing, none, E::Failover { planned: false }, Phase(P::FailingOver)),
        (P::FailingOver, Tf::Any, E::FailoverComplete, Phase(P::FailedOver)),
        (P::FailingOver, Tf::Any, E::FailoverFailed, Phase(P::Protected)),
        (P::FailedOver, Tf::Any, E::ChangeRecoveryPoint, Phase(P::FailingOver)),
        (P::FailedOver, Tf::Any, E::Commit, Phase(P::Committed)),
        // Return.
        (P::Committed, Tf::Any, E::Reprotect, Phase(P::Reprotecting)),
        (P::Reprotecting, Tf::Any, E::ReverseSyncComplete, Phase(P::ReverseProtected)),
        (P::ReverseProtected, Tf::Any, E::Failback, Phase(P::FailingBack)),
        (P::FailingBack, Tf::Any, E::FailbackComplete, Phase(P::FailedBack)),
        (P::FailedBack, Tf::Any, E::ReEnable, Phase(P::InitialReplication)),
        // Test failover beside protection.
        (P::Protected, none, E::StartTestFailover, Test(T::Running)),
        (P::Resynchronizing, none, E::StartTestFailover, Test(T::Running)),
    ];
    // Repeated requests already in effect are accepted without change.
    for phase in [P::FailingOver, P::FailedOver, P::Committed] {
        rows.push((phase, Tf::Any, E::Failover { planned: true }, Unchanged));
        rows.push((phase, Tf::Any, E::Failover { planned: false }, Unchanged));
    }
    rows.push((P::Committed, Tf::Any, E::Commit, Unchanged));
    rows.push((P::Reprotecting, Tf::Any, E::Reprotect, Unchanged));
    rows.push((P::ReverseProtected, Tf::Any, E::Reprotect, Unchanged));
    rows.push((P::FailingBack, Tf::Any, E::Failback, Unchanged));
    rows.push((P::FailedBack, Tf::Any, E::Failback, Unchanged));
    for reason in
        [ResyncReason::TrackingLost, ResyncReason::DiskResized, ResyncReason::ChecksumMismatch, ResyncReason::Manual]
    {
        rows.push((P::Resynchronizing, Tf::Any, E::Resync(reason), Unchanged));
        rows.push((P::InitialReplication, Tf::Any, E::Resync(reason), Unchanged));
    }
    // The test track, in any phase.
    for phase in ALL_PHASES {
        rows.push((phase, Tf::Only(T::Running), E::CleanupTestFailover, Test(T::CleaningUp)));
        rows.push((phase, Tf::Only(T::Done), E::CleanupTestFailover, Test(T::CleaningUp)));
        rows.push((phase, Tf::Only(T::Running), E::TestFailoverComplete, Test(T::Done)));
        rows.push((phase, Tf::Only(T::CleaningUp), E::TestCleanupComplete, Test(T::None)));
        if !matches!(phase, P::FailingOver | P::FailingBack) {
            rows.push((phase, Tf::Any, E::Delete, Deleted));
        }
    }
    rows
}

fn expected(state: State, event: Event) -> Option<Want> {
    table()
        .into_iter()
        .find(|(p, tf, e, _)| {
            *p == state.phase
                && *e == event
                && matches!(tf, Tf::Any | Tf::Only(_))
                && match tf {
                    Tf::Any => true,
                    Tf::Only(t) => *t == state.test_failover,
                }
        })
        .map(|(_, _, _, want)| want)
}

#[test]
fn every_state_and_event_matches_the_table() {
    let mut checked = 0;
    for phase in ALL_PHASES {
        for test_failover in ALL_TEST_STATES {
            let state = State { phase, test_failover };
            for event in Event::ALL {
                let got = transition(state, event);
                let want = expected(state, event);
                let label = format!("{state:?} + {event:?}");
                match (want, got) {
                    (Some(Want::Phase(p)), Ok(Outcome::Moved(s))) => {
                        assert_eq!(s, State { phase: p, test_failover }, "{label}")
                    }
                    (Some(Want::Test(t)), Ok(Outcome::Moved(s))) => {
                        assert_eq!(s, State { phase, test_failover: t }, "{label}")
                    }
                    (Some(Want::Unchanged), Ok(Outcome::Unchanged)) | (Some(Want::Deleted), Ok(Outcome::Deleted)) => {}
                    (None, Err(rejection)) if event.is_request() => {
                        assert!(!rejection.to_string().is_empty(), "{label}: empty reason")
                    }
                    (None, Ok(Outcome::Unchanged)) if !event.is_request() => {}
                    (want, got) => panic!("{label}: expected {want:?}, got {got:?}"),
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, ALL_PHASES.len() * ALL_TEST_STATES.len() * Event::ALL.len());
}

#[test]
fn a_server_goes_all_the_way_round() {
    let mut state = State::NEW;
    for event in [
        Event::AgentRegistered,
        Event::InitialSyncComplete,
        Event::Resync(ResyncReason::TrackingLost),
        Event::ResyncComplete,
        Event::StartTestFailover,
        Event::TestFailoverComplete,
        Event::CleanupTestFailover,
        Event::TestCleanupComplete,
        Event::Failover { planned: false },
        Event::FailoverComplete,
        Event::ChangeRecoveryPoint,
        Event::FailoverComplete,
        Event::Commit,
        Event::Reprotect,
        Event::ReverseSyncComplete,
        Event::Failback,
        Event::FailbackComplete,
        Event::ReEnable,
        Event::InitialSyncComplete,
    ] {
        match transition(state, event) {
            Ok(Outcome::Moved(next)) => state = next,
            other => panic!("{state:?} + {event:?} gave {other:?}"),
        }
    }
    assert_eq!(state, State { phase: P::Protected, test_failover: T::None });
}

#[test]
fn invalid_requests_name_the_problem() {
    let protected = State { phase: P::Protected, test_failover: T::None };
    let msg = |s: State, e: Event| transition(s, e).unwrap_err().to_string();
    assert_eq!(msg(protected, Event::Commit), "commit needs a completed failover (the server is Protected)");
    assert!(msg(protected, Event::Failback).contains("reprotect first"));
    assert!(msg(State { phase: P::FailedOver, ..protected }, Event::Reprotect).contains("commit first"));
    assert!(
        msg(State { test_failover: T::Running, ..protected }, Event::StartTestFailover).contains("already Running")
    );
    assert!(
        msg(State { test_failover: T::Done, ..protected }, Event::Failover { planned: false }).contains("clean it up")
    );
    assert!(
        msg(State { phase: P::FailingOver, ..protected }, Event::Delete).contains("cannot delete while FailingOver")
    );
    assert!(
        msg(State { phase: P::InitialReplication, ..protected }, Event::Failover { planned: false })
            .contains("no recovery point")
    );
    assert!(
        msg(State { phase: P::Resynchronizing, ..protected }, Event::Failover { planned: true })
            .contains("unplanned failover")
    );
}

#[test]
fn replication_never_pauses_for_a_test_failover() {
    let mut state = State { phase: P::Protected, test_failover: T::None };
    for event in
        [Event::StartTestFailover, Event::TestFailoverComplete, Event::CleanupTestFailover, Event::TestCleanupComplete]
    {
        if let Ok(Outcome::Moved(next)) = transition(state, event) {
            assert_eq!(next.phase, P::Protected, "{event:?} touched the phase");
            state = next;
        }
    }
    assert_eq!(state.test_failover, T::None);
}
