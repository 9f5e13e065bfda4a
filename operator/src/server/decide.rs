//! The pure part of the ProtectedServer reconciler: from the object (with what the
//! agent and process server reported in its status) and its policy, decide the phase,
//! the conditions, the RPO and the events. No client, no clock.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;
use kube::runtime::events::EventType;
use serde_json::{Value, json};
use siterecovery_api::server::{ResyncReason, ServerConditionType as C, ServerPhase as P};
use siterecovery_api::{ConditionStatus, ProtectedServer, ReplicationPolicy};
use siterecovery_core::lifecycle::{Event, Outcome, State, TestFailoverState, transition};
use siterecovery_core::rpo;

use crate::status::{Verdict, set_condition, set_verdict};

/// An agent that has not reported for this long is shown as disconnected.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(300);

/// A Kubernetes event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Message.
    pub note: String,
}

/// What to do for one server.
#[derive(Debug)]
pub struct Decision {
    /// Phase after this reconcile.
    pub phase: P,
    /// kstatus verdict.
    pub verdict: Verdict,
    /// Operator-owned status fields, for server-side apply.
    pub status: Value,
    /// Events to publish.
    pub notices: Vec<Notice>,
    /// When to look again if nothing changes (RPO breach, heartbeat expiry).
    pub requeue_after: Option<Duration>,
    /// Current RPO, for the metric.
    pub rpo: Option<Duration>,
}

/// Decides a server's status. `policy` is `None` when the referenced policy is missing.
pub fn decide(server: &ProtectedServer, policy: Option<&ReplicationPolicy>, now: &Time) -> Decision {
    let generation = server.meta().generation;
    let status = server.status.clone().unwrap_or_default();
    let before = State { phase: status.phase.unwrap_or(P::Enabling), test_failover: test_state(server) };
    let mut notices = Vec::new();
    let mut rejection = None;

    let mut state = before;
    let mut resync_request = None;
    for event in events(server) {
        match transition(state, event) {
            Ok(Outcome::Moved(next)) => state = next,
            Ok(Outcome::Unchanged | Outcome::Deleted) => {}
            Err(why) => rejection = Some(format!("spec.resyncToken: {why}")),
        }
        if let Event::Resync(ResyncReason::Manual) = event {
            resync_request = server.spec.resync_token.clone();
        }
    }
    if state.phase != before.phase {
        // The reason is the new phase: events are aggregated by reason, so one reason
        // for every change would fold them into a single series.
        notices.push(Notice {
            type_: EventType::Normal,
            reason: phase_reason(state.phase),
            note: format!("{:?} → {:?}", before.phase, state.phase),
        });
    }

    let heartbeat = status.agent.as_ref().and_then(|a| a.last_heartbeat_time.clone());
    let latest = status.latest_recovery_points.as_ref().and_then(|p| p.crash_consistent.as_ref()).map(|p| p.time.0);
    let replicating = matches!(state.phase, P::Protected | P::Resynchronizing);
    let current_rpo = if replicating { rpo::current_rpo(now.0, latest) } else { None };
    let threshold = policy.and_then(|p| p.spec.rpo_threshold.to_std()).unwrap_or(Duration::from_secs(900));
    let breached = rpo::breached(current_rpo, threshold);

    let mut conditions = status.conditions.clone();
    let rpo_text = current_rpo.map(|d| siterecovery_api::common::format_duration(round_secs(d)));
    let threshold_text = siterecovery_api::common::format_duration(threshold);
    let (rpo_status, rpo_reason, rpo_message) = match (&rpo_text, breached) {
        (Some(r), true) => {
            (ConditionStatus::False, "RpoBreached", format!("RPO {r} exceeds the threshold {threshold_text}"))
        }
        (Some(r), false) => (ConditionStatus::True, "WithinThreshold", format!("RPO {r}, threshold {threshold_text}")),
        (None, _) => (ConditionStatus::Unknown, "NoRecoveryPoint", "no recovery point yet".to_owned()),
    };
    let previously_breached =
        status.conditions.iter().any(|c| c.type_ == C::RpoWithinThreshold && c.reason == "RpoBreached");
    if breached && !previously_breached {
        notices.push(Notice { type_: EventType::Warning, reason: "RpoBreached", note: rpo_message.clone() });
    } else if !breached && previously_breached && rpo_text.is_some() {
        notices.push(Notice { type_: EventType::Normal, reason: "RpoRecovered", note: rpo_message.clone() });
    }
    set_condition(&mut conditions, C::RpoWithinThreshold, rpo_status, rpo_reason, &rpo_message, generation, now);

    let agent_fresh = heartbeat.as_ref().is_some_and(|h| age(now, h) < HEARTBEAT_TIMEOUT);
    let (agent_status, agent_reason, agent_message) = match &heartbeat {
        None => (
            ConditionStatus::False,
            "NotRegistered",
            format!("waiting for the agent on {}", server.spec.agent.hostname),
        ),
        Some(h) if agent_fresh => (ConditionStatus::True, "Heartbeat", format!("last heartbeat {}", h.0)),
        Some(h) => (ConditionStatus::False, "HeartbeatMissing", format!("no heartbeat since {}", h.0)),
    };
    set_condition(&mut conditions, C::AgentConnected, agent_status, agent_reason, &agent_message, generation, now);

    let verdict = verdict(server, policy, state, rejection, breached, &rpo_message);
    set_verdict(&mut conditions, &verdict, generation, now);

    let mut fields = json!({
        "observedGeneration": generation,
        "phase": state.phase,
        "progression": progression(server, state),
        "conditions": conditions,
        "currentRpo": rpo_text,
        "currentRpoSeconds": current_rpo.map(|d| d.as_secs()),
    });
    if let Some(token) = resync_request {
        fields["resync"] = json!({"reason": ResyncReason::Manual, "requestTime": now, "token": token, "message": "requested through spec.resyncToken"});
    }

    let requeue_after = [
        latest.filter(|_| replicating && !breached).and_then(|l| rpo::breach_time(l, threshold)),
        heartbeat.as_ref().filter(|_| agent_fresh).and_then(|h| rpo::breach_time(h.0, HEARTBEAT_TIMEOUT)),
    ]
    .into_iter()
    .flatten()
    .map(|t| Duration::try_from(t.duration_since(now.0)).unwrap_or_default().max(Duration::from_secs(1)))
    .min();

    Decision { phase: state.phase, verdict, status: fields, notices, requeue_after, rpo: current_rpo }
}

/// Observations and requests found in the object, in the order they are applied.
fn events(server: &ProtectedServer) -> Vec<Event> {
    let status = server.status.clone().unwrap_or_default();
    let mut events = Vec::new();
    if status.agent.as_ref().and_then(|a| a.last_heartbeat_time.as_ref()).is_some() {
        events.push(Event::AgentRegistered);
    }
    if status.initial_sync.as_ref().is_some_and(|s| s.bytes_total > 0 && s.bytes_done >= s.bytes_total) {
        events.push(Event::InitialSyncComplete);
    }
    match &status.resync {
        // Reported by the agent (tracking lost, resize, mismatch) or requested earlier.
        Some(r) if r.completion_time.is_none() => events.push(Event::Resync(r.reason)),
        Some(_) => events.push(Event::ResyncComplete),
        None => {}
    }
    // The restore worker's verdict on a failover the operator recorded as FailingOver.
    if status.phase == Some(P::FailingOver) {
        use siterecovery_api::plan::RunState as R;
        match status.failover.as_ref().map(|f| f.state) {
            Some(R::Succeeded) => events.push(Event::FailoverComplete),
            Some(R::Failed) => events.push(Event::FailoverFailed),
            _ => {}
        }
    }
    // The on-prem side's verdicts on reverse replication and cut-over.
    let succeeded = |w: &Option<siterecovery_api::server::FailbackWork>| {
        w.as_ref().is_some_and(|w| w.state == siterecovery_api::plan::RunState::Succeeded)
    };
    if status.phase == Some(P::Reprotecting) && succeeded(&status.reverse_replication) {
        events.push(Event::ReverseSyncComplete);
    }
    if status.phase == Some(P::FailingBack) && succeeded(&status.failback) {
        events.push(Event::FailbackComplete);
    }
    let answered = status.resync.as_ref().and_then(|r| r.token.as_ref());
    if server.spec.resync_token.is_some() && server.spec.resync_token.as_ref() != answered {
        events.push(Event::Resync(ResyncReason::Manual));
    }
    events
}

/// The test-failover track, read from the request/execution block in status.
pub fn test_state(server: &ProtectedServer) -> TestFailoverState {
    use siterecovery_api::plan::{PlanOperationType as Op, RunState as R};
    match server.status.as_ref().and_then(|s| s.test_failover.as_ref()) {
        None => TestFailoverState::None,
        Some(t) => match (t.operation, t.state) {
            (Op::TestFailoverCleanup, R::Succeeded) => TestFailoverState::None,
            (Op::TestFailoverCleanup, _) => TestFailoverState::CleaningUp,
            // A failed test failover may have left artefacts: it still needs a cleanup.
            (_, R::Succeeded | R::Failed | R::PartiallySucceeded) => TestFailoverState::Done,
            _ => TestFailoverState::Running,
        },
    }
}

fn verdict(
    server: &ProtectedServer,
    policy: Option<&ReplicationPolicy>,
    state: State,
    rejection: Option<String>,
    breached: bool,
    rpo_message: &str,
) -> Verdict {
    let policy_name = &server.spec.policy_ref.name;
    let Some(policy) = policy else {
        return Verdict::Stalled {
            reason: "PolicyNotFound",
            message: format!("spec.policyRef: ReplicationPolicy {policy_name} not found"),
        };
    };
    if let Some(message) = rejection {
        return Verdict::Stalled { reason: "InvalidRequest", message };
    }
    let policy_ready = policy.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == siterecovery_api::policy::PolicyConditionType::Ready && c.status == ConditionStatus::True
        })
    });
    if !policy_ready {
        return Verdict::Progressing {
            reason: "PolicyNotReady",
            message: format!("waiting for ReplicationPolicy {policy_name} to be Ready"),
        };
    }
    let message = progression(server, state);
    match state.phase {
        P::Protected if breached => Verdict::Progressing { reason: "RpoBreached", message: rpo_message.to_owned() },
        P::Protected => Verdict::Ready { reason: "Protected", message: rpo_message.to_owned() },
        P::FailedOver | P::Committed | P::ReverseProtected => {
            Verdict::Ready { reason: phase_reason(state.phase), message }
        }
        _ => Verdict::Progressing { reason: phase_reason(state.phase), message },
    }
}

fn phase_reason(phase: P) -> &'static str {
    match phase {
        P::Enabling => "Enabling",
        P::InitialReplication => "InitialReplication",
        P::Protected => "Protected",
        P::Resynchronizing => "Resynchronizing",
        P::FailingOver => "FailingOver",
        P::FailedOver => "FailedOver",
        P::Committed => "Committed",
        P::Reprotecting => "Reprotecting",
        P::ReverseProtected => "ReverseProtected",
        P::FailingBack => "FailingBack",
        P::FailedBack => "FailedBack",
    }
}

/// One line on what the phase is doing.
fn progression(server: &ProtectedServer, state: State) -> String {
    let status = server.status.clone().unwrap_or_default();
    let copy = |what: &str| match &status.initial_sync {
        Some(s) if s.bytes_total > 0 => format!(
            "{what}: {} of {} ({}%)",
            bytes(s.bytes_done),
            bytes(s.bytes_total),
            s.bytes_done.saturating_mul(100) / s.bytes_total
        ),
        _ => format!("{what}: waiting for the agent's first report"),
    };
    let disks = server.spec.disks.len();
    match state.phase {
        P::Enabling => format!("waiting for the agent on {} to register", server.spec.agent.hostname),
        P::InitialReplication => copy("initial replication"),
        P::Resynchronizing => {
            let reason = status.resync.as_ref().map(|r| format!("{:?}", r.reason)).unwrap_or_default();
            format!("resynchronizing ({reason}): sending only blocks that differ")
        }
        P::Protected => format!("replicating {disks} disk(s)"),
        // The azure target stops after the data stage (docs/lifecycle.md): say so, so
        // nobody reads FailedOver as a running VM.
        P::FailedOver | P::Committed if server.spec.failover_target.azure.is_some() => {
            let vhds = status.failover.as_ref().map_or(0, |f| f.recovered_disks.len());
            format!(
                "{:?}: {vhds} disk(s) ready as VHD page blobs (status.failover.recoveredDisks); no Azure VM was \
                 created: the Azure Resource Manager stage is not implemented",
                state.phase
            )
        }
        other => format!("{other:?}"),
    }
}

fn age(now: &Time, then: &Time) -> Duration {
    Duration::try_from(now.0.duration_since(then.0)).unwrap_or_default()
}

fn round_secs(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

fn bytes(n: i64) -> String {
    crate::status::human_bytes(u64::try_from(n).unwrap_or(0))
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
