//! The pure part of the RecoveryPlan reconciler: walk the groups in order and decide,
//! for the current run, which Jobs to create, which server requests to record, and
//! what the plan's status is. No client, no clock.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use siterecovery_api::plan::{
    ActionStatus, ActionTiming, FailurePolicy, GroupStatus, OperationStatus, PlanAction, PlanConditionType,
    PlanOperation, PlanOperationType as Op, PlanServerStatus, RecoveryPlan, RunState,
};
use siterecovery_api::server::ServerPhase;
use siterecovery_api::{ConditionStatus, ProtectedServer};
use siterecovery_core::lifecycle::{Event, Outcome, State, transition};

use crate::server::test_state;
use crate::status::{Verdict, set_condition, set_verdict};

/// What the reconciler knows about a Job it created for an action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobState {
    /// Still running (or pending), created at this time.
    Active(Time),
    /// Completed successfully.
    Succeeded,
    /// Failed (the message says why).
    Failed(String),
}

/// Something to do in the cluster.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Create the Job for an action.
    CreateJob {
        /// Job name.
        name: String,
        /// Group of the action.
        group: String,
        /// The action.
        action: String,
        /// `batch/v1` Job spec as written in the plan.
        spec: Value,
    },
    /// Record a request in a server's status (JSON merge patch of `status`).
    RequestServer {
        /// ProtectedServer name.
        server: String,
        /// resourceVersion the request was decided on (optimistic concurrency).
        resource_version: Option<String>,
        /// The `status` merge patch.
        status: Value,
    },
}

/// What to do for one plan.
#[derive(Debug)]
pub struct Decision {
    /// Cluster changes, in order.
    pub steps: Vec<Step>,
    /// Operator-owned status fields, for server-side apply.
    pub status: Value,
    /// kstatus verdict.
    pub verdict: Verdict,
    /// Whether the run is still going (requeue soon).
    pub running: bool,
}

/// Stable identity of a run: `runId`, or the operation name when no id is given.
pub fn run_key(op: &PlanOperation) -> String {
    op.run_id.clone().unwrap_or_else(|| format!("{:?}", op.type_).to_lowercase())
}

/// Name of the Job of an action in a run, at most 63 characters.
pub fn job_name(plan: &str, run: &str, group: &str, action: &str) -> String {
    let full = format!("{plan}-{run}-{group}-{action}");
    if full.len() <= 63 {
        return full;
    }
    let hash = full.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100000001b3));
    format!("{}-{:08x}", &full[..54].trim_end_matches('-'), hash as u32)
}

/// Decides a plan. `servers` maps names to the ProtectedServers found; `jobs` maps Job
/// names of this plan to their state.
pub fn decide(
    plan: &RecoveryPlan,
    servers: &BTreeMap<String, ProtectedServer>,
    jobs: &BTreeMap<String, JobState>,
    now: &Time,
) -> Decision {
    let generation = plan.meta().generation;
    let mut conditions = plan.status.clone().unwrap_or_default().conditions;
    let Some(op) = plan.spec.operation.clone() else {
        return idle(plan, servers, conditions, now);
    };
    let run = run_key(&op);
    let previous = plan.status.as_ref().and_then(|s| s.operation.clone());
    let same_run = previous.as_ref().is_some_and(|p| p.type_ == op.type_ && p.run_id.as_deref() == Some(run.as_str()));
    if let Some(done) = previous.as_ref().filter(|p| same_run && is_terminal(p.state)) {
        return finished(plan, done, conditions, now);
    }
    let start_time = previous.as_ref().filter(|_| same_run).and_then(|p| p.start_time.clone()).unwrap_or(now.clone());

    let mut walk = Walk { plan, op: &op, run: &run, servers, jobs, now, steps: Vec::new(), waiting: None };
    let mut groups = Vec::new();
    let mut failed_groups = 0;
    // Later groups wait for a group in progress, and are skipped after a failure
    // under `onFailure: Stop`.
    let mut blocked: Option<(RunState, &str)> = None;
    for group in &plan.spec.groups {
        if let Some((state, why)) = blocked {
            groups.push(not_started(group, servers, &op, state, why));
            continue;
        }
        let status = walk.group(group);
        match status.state {
            RunState::Succeeded => {}
            RunState::Failed | RunState::PartiallySucceeded => {
                failed_groups += 1;
                if plan.spec.on_failure == FailurePolicy::Stop {
                    blocked = Some((RunState::Skipped, "an earlier group failed"));
                }
            }
            _ => blocked = Some((RunState::Pending, "waiting for an earlier group")),
        }
        groups.push(status);
    }
    let in_progress =
        groups.iter().any(|g| matches!(g.state, RunState::Running | RunState::WaitingForApproval | RunState::Pending));
    let state = match (in_progress, failed_groups) {
        (true, _) if walk.waiting.is_some() => RunState::WaitingForApproval,
        (true, _) => RunState::Running,
        (false, 0) => RunState::Succeeded,
        (false, n) if plan.spec.on_failure == FailurePolicy::Continue && n < groups.len() => {
            RunState::PartiallySucceeded
        }
        (false, _) => RunState::Failed,
    };
    let total: usize = groups.iter().map(|g| g.servers.len()).sum();
    let done = groups.iter().flat_map(|g| &g.servers).filter(|s| s.state == RunState::Succeeded).count();
    let current_group =
        groups.iter().find(|g| !matches!(g.state, RunState::Succeeded | RunState::Skipped)).map(|g| g.name.clone());
    let failures: Vec<String> = groups
        .iter()
        .flat_map(|g| {
            g.servers
                .iter()
                .map(|s| (s.name.clone(), s.state, s.message.clone()))
                .chain(g.actions.iter().map(|a| (format!("{}/{}", g.name, a.name), a.state, a.message.clone())))
        })
        .filter(|(_, st, _)| *st == RunState::Failed)
        .map(|(n, _, m)| format!("{n}: {}", m.unwrap_or_default()))
        .collect();
    let message = match state {
        RunState::Succeeded => format!("{:?} {run} succeeded for {done}/{total} servers", op.type_),
        RunState::WaitingForApproval => format!(
            "waiting for approval of {}: add it to spec.operation.approvals (kubectl siterecovery approve)",
            walk.waiting.clone().unwrap_or_default()
        ),
        RunState::Running => format!("{:?} {run}: {done}/{total} servers done", op.type_),
        _ => format!("{:?} {run} failed: {}", op.type_, failures.join("; ")),
    };
    let verdict = match state {
        RunState::Succeeded => Verdict::Ready { reason: "RunSucceeded", message: message.clone() },
        RunState::Running | RunState::WaitingForApproval => {
            Verdict::Progressing { reason: "RunInProgress", message: message.clone() }
        }
        _ => Verdict::Stalled { reason: "RunFailed", message: message.clone() },
    };
    let gate = walk.waiting.as_ref().map(|gate| format!("{gate}: {}", instructions(plan, gate)));
    set_plan_conditions(&mut conditions, &verdict, gate, generation, now);
    let terminal = !matches!(state, RunState::Running | RunState::WaitingForApproval);
    let operation = OperationStatus {
        type_: op.type_,
        run_id: Some(run.clone()),
        state,
        current_group: if terminal { None } else { current_group },
        progress: Some(format!("{done}/{total}")),
        start_time: Some(start_time),
        completion_time: if terminal {
            previous.filter(|_| same_run).and_then(|p| p.completion_time).or(Some(now.clone()))
        } else {
            None
        },
        message: Some(message),
    };
    let status = json!({
        "observedGeneration": generation,
        "conditions": conditions,
        "operation": operation,
        "groups": groups,
    });
    Decision { steps: walk.steps, status, verdict, running: !terminal }
}

/// The kstatus conditions from `verdict`, and `WaitingForApproval` from the gate waiting
/// (`<group>/<action>: instructions`), if any.
fn set_plan_conditions(
    conditions: &mut Vec<siterecovery_api::Condition<PlanConditionType>>,
    verdict: &Verdict,
    gate: Option<String>,
    generation: Option<i64>,
    now: &Time,
) {
    set_verdict(conditions, verdict, generation, now);
    let (status, reason, message) = match gate {
        Some(message) => (ConditionStatus::True, "ApprovalRequired", message),
        None => (ConditionStatus::False, "NoGate", String::new()),
    };
    set_condition(conditions, PlanConditionType::WaitingForApproval, status, reason, &message, generation, now);
}

fn is_terminal(state: RunState) -> bool {
    matches!(state, RunState::Succeeded | RunState::Failed | RunState::PartiallySucceeded)
}

/// A run that ended is never resumed, whatever its servers do later (a failed Commit
/// must not commit once the servers happen to be failed over): a new `runId` starts a
/// new run.
fn finished(
    plan: &RecoveryPlan,
    done: &OperationStatus,
    mut conditions: Vec<siterecovery_api::Condition<PlanConditionType>>,
    now: &Time,
) -> Decision {
    let generation = plan.meta().generation;
    let message = done.message.clone().unwrap_or_default();
    let verdict = match done.state {
        RunState::Succeeded => Verdict::Ready { reason: "RunSucceeded", message },
        _ => Verdict::Stalled { reason: "RunFailed", message },
    };
    set_plan_conditions(&mut conditions, &verdict, None, generation, now);
    let groups = plan.status.as_ref().map(|s| s.groups.clone()).unwrap_or_default();
    let status =
        json!({"observedGeneration": generation, "conditions": conditions, "operation": done, "groups": groups});
    Decision { steps: Vec::new(), status, verdict, running: false }
}

fn idle(
    plan: &RecoveryPlan,
    servers: &BTreeMap<String, ProtectedServer>,
    mut conditions: Vec<siterecovery_api::Condition<PlanConditionType>>,
    now: &Time,
) -> Decision {
    let missing: Vec<String> = plan
        .spec
        .groups
        .iter()
        .enumerate()
        .flat_map(|(i, g)| {
            g.servers
                .iter()
                .filter(|s| !servers.contains_key(*s))
                .map(move |s| format!("spec.groups[{i}].servers: ProtectedServer {s} not found"))
        })
        .collect();
    let verdict = if missing.is_empty() {
        let count: usize = plan.spec.groups.iter().map(|g| g.servers.len()).sum();
        Verdict::Ready {
            reason: "Idle",
            message: format!("{} groups, {count} servers; no operation requested", plan.spec.groups.len()),
        }
    } else {
        Verdict::Stalled { reason: "ServerNotFound", message: missing.join("; ") }
    };
    let generation = plan.meta().generation;
    set_plan_conditions(&mut conditions, &verdict, None, generation, now);
    let status = json!({"observedGeneration": generation, "conditions": conditions});
    Decision { steps: Vec::new(), status, verdict, running: false }
}

fn instructions(plan: &RecoveryPlan, gate: &str) -> String {
    plan.spec
        .groups
        .iter()
        .flat_map(|g| g.actions.iter().flatten().map(move |a| (format!("{}/{}", g.name, a.name), a)))
        .find(|(n, _)| n == gate)
        .and_then(|(_, a)| a.manual_approval.as_ref().map(|m| m.instructions.clone()))
        .unwrap_or_default()
}

fn not_started(
    group: &siterecovery_api::plan::RecoveryGroup,
    servers: &BTreeMap<String, ProtectedServer>,
    op: &PlanOperation,
    state: RunState,
    why: &str,
) -> GroupStatus {
    GroupStatus {
        name: group.name.clone(),
        state,
        actions: applicable(group, op.type_)
            .map(|a| ActionStatus { name: a.name.clone(), state, job_name: None, message: None })
            .collect(),
        servers: group
            .servers
            .iter()
            .map(|s| PlanServerStatus {
                name: s.clone(),
                state,
                phase: servers.get(s).and_then(|s| s.status.as_ref()).and_then(|st| st.phase),
                recovery_point: None,
                message: Some(why.to_owned()),
            })
            .collect(),
    }
}

/// Actions of a group that run for this operation (all but cleanup when unspecified).
fn applicable(group: &siterecovery_api::plan::RecoveryGroup, op: Op) -> impl Iterator<Item = &PlanAction> {
    group.actions.iter().flatten().filter(move |a| {
        if a.operations.is_empty() { op != Op::TestFailoverCleanup } else { a.operations.contains(&op) }
    })
}

struct Walk<'a> {
    plan: &'a RecoveryPlan,
    op: &'a PlanOperation,
    run: &'a str,
    servers: &'a BTreeMap<String, ProtectedServer>,
    jobs: &'a BTreeMap<String, JobState>,
    now: &'a Time,
    steps: Vec<Step>,
    waiting: Option<String>,
}

impl Walk<'_> {
    fn group(&mut self, group: &siterecovery_api::plan::RecoveryGroup) -> GroupStatus {
        let mut actions = Vec::new();
        let mut state = RunState::Succeeded;
        let before: Vec<&PlanAction> =
            applicable(group, self.op.type_).filter(|a| a.when == ActionTiming::Before).collect();
        let after: Vec<&PlanAction> =
            applicable(group, self.op.type_).filter(|a| a.when == ActionTiming::After).collect();
        let mut proceed = self.actions(group, &before, &mut actions, &mut state);
        let mut servers = Vec::new();
        for name in &group.servers {
            let s = if proceed { self.server(name) } else { self.pending_server(name) };
            servers.push(s);
        }
        let server_states: Vec<RunState> = servers.iter().map(|s| s.state).collect();
        if server_states.iter().any(|s| matches!(s, RunState::Running | RunState::Pending)) {
            proceed = false;
            if state == RunState::Succeeded {
                state = RunState::Running;
            }
        }
        let server_failures = server_states.iter().filter(|s| **s == RunState::Failed).count();
        if proceed && server_failures > 0 && self.plan.spec.on_failure == FailurePolicy::Stop {
            proceed = false;
            state = RunState::Failed;
        }
        if proceed {
            proceed = self.actions(group, &after, &mut actions, &mut state);
        } else {
            for a in &after {
                actions.push(ActionStatus {
                    name: a.name.clone(),
                    state: RunState::Pending,
                    job_name: None,
                    message: None,
                });
            }
        }
        if proceed && server_failures > 0 {
            state = if server_failures == servers.len() { RunState::Failed } else { RunState::PartiallySucceeded };
        }
        GroupStatus { name: group.name.clone(), state, actions, servers }
    }

    /// Runs actions in order; returns whether the group may go on past them.
    fn actions(
        &mut self,
        group: &siterecovery_api::plan::RecoveryGroup,
        list: &[&PlanAction],
        out: &mut Vec<ActionStatus>,
        group_state: &mut RunState,
    ) -> bool {
        let mut proceed = true;
        for action in list {
            if !proceed {
                out.push(ActionStatus {
                    name: action.name.clone(),
                    state: RunState::Pending,
                    job_name: None,
                    message: None,
                });
                continue;
            }
            let gate = format!("{}/{}", group.name, action.name);
            let status = if action.manual_approval.is_some() {
                if self.op.approvals.iter().flatten().any(|a| *a == gate) {
                    ActionStatus {
                        name: action.name.clone(),
                        state: RunState::Succeeded,
                        job_name: None,
                        message: Some("approved".into()),
                    }
                } else {
                    self.waiting.get_or_insert(gate);
                    ActionStatus {
                        name: action.name.clone(),
                        state: RunState::WaitingForApproval,
                        job_name: None,
                        message: None,
                    }
                }
            } else {
                self.job(group, action)
            };
            match status.state {
                RunState::Succeeded => {}
                RunState::Failed => {
                    proceed = false;
                    *group_state = RunState::Failed;
                }
                RunState::WaitingForApproval => {
                    proceed = false;
                    *group_state = RunState::WaitingForApproval;
                }
                _ => {
                    proceed = false;
                    *group_state = RunState::Running;
                }
            }
            out.push(status);
        }
        proceed
    }

    fn job(&mut self, group: &siterecovery_api::plan::RecoveryGroup, action: &PlanAction) -> ActionStatus {
        let name = job_name(&self.plan.name_any(), self.run, &group.name, &action.name);
        let job = action.job.as_ref().expect("validated at admission: job or manualApproval");
        let (state, message) = match self.jobs.get(&name) {
            None => {
                self.steps.push(Step::CreateJob {
                    name: name.clone(),
                    group: group.name.clone(),
                    action: action.name.clone(),
                    spec: job.spec.clone(),
                });
                (RunState::Running, Some("Job created".to_owned()))
            }
            Some(JobState::Succeeded) => (RunState::Succeeded, None),
            Some(JobState::Failed(why)) => (RunState::Failed, Some(format!("Job {name} failed: {why}"))),
            Some(JobState::Active(created)) => {
                let limit = job.timeout.to_std().unwrap_or(std::time::Duration::from_secs(1800));
                let age = std::time::Duration::try_from(self.now.0.duration_since(created.0)).unwrap_or_default();
                if age > limit {
                    (RunState::Failed, Some(format!("Job {name} did not finish within {}", job.timeout)))
                } else {
                    (RunState::Running, None)
                }
            }
        };
        ActionStatus { name: action.name.clone(), state, job_name: Some(name), message }
    }

    fn pending_server(&self, name: &str) -> PlanServerStatus {
        PlanServerStatus {
            name: name.to_owned(),
            state: RunState::Pending,
            phase: self.servers.get(name).and_then(|s| s.status.as_ref()).and_then(|st| st.phase),
            recovery_point: None,
            message: None,
        }
    }

    /// The state of one server's part of the run; records a request when it is due.
    fn server(&mut self, name: &str) -> PlanServerStatus {
        let mut out = self.pending_server(name);
        let Some(server) = self.servers.get(name) else {
            out.state = RunState::Failed;
            out.message = Some(format!("ProtectedServer {name} not found"));
            return out;
        };
        let status = server.status.clone().unwrap_or_default();
        let phase = status.phase.unwrap_or(ServerPhase::Enabling);
        let run = format!("{}/{}", self.plan.name_any(), self.run);
        let test_op = matches!(self.op.type_, Op::TestFailover | Op::TestFailoverCleanup);
        let block = if test_op { status.test_failover.as_ref() } else { status.failover.as_ref() };
        let ours = block.filter(|b| b.operation == self.op.type_ && b.run.as_deref() == Some(run.as_str()));
        if let Some(b) = ours {
            out.recovery_point = b.recovery_point.clone();
            out.message = b.message.clone();
            out.state = match b.state {
                RunState::Pending | RunState::Running => RunState::Running,
                // The worker is done, the server reaches FailedOver at its next reconcile:
                // only then may the next operation (a commit) follow.
                RunState::Succeeded if !test_op && phase == ServerPhase::FailingOver => RunState::Running,
                other => other,
            };
            return out;
        }
        // Commit needs no worker: the phase change is the whole operation.
        if self.op.type_ == Op::Commit && phase == ServerPhase::Committed {
            out.state = RunState::Succeeded;
            return out;
        }
        let event = match self.op.type_ {
            Op::TestFailover => Event::StartTestFailover,
            Op::TestFailoverCleanup => Event::CleanupTestFailover,
            Op::PlannedFailover => Event::Failover { planned: true },
            Op::UnplannedFailover => Event::Failover { planned: false },
            Op::ChangeRecoveryPoint => Event::ChangeRecoveryPoint,
            Op::Commit => Event::Commit,
        };
        match transition(State { phase, test_failover: test_state(server) }, event) {
            Err(why) => {
                out.state = RunState::Failed;
                out.message = Some(why.to_string());
            }
            Ok(Outcome::Unchanged | Outcome::Deleted) => {
                out.state = RunState::Succeeded;
                out.message = Some(format!("already {phase:?}"));
            }
            Ok(Outcome::Moved(next)) => {
                self.steps.push(Step::RequestServer {
                    server: name.to_owned(),
                    resource_version: server.resource_version(),
                    status: self.request(next, phase, &run),
                });
                out.state = if self.op.type_ == Op::Commit { RunState::Succeeded } else { RunState::Running };
                out.message = Some("requested".into());
            }
        }
        out
    }

    /// The status merge patch that records the request.
    fn request(&self, next: State, phase: ServerPhase, run: &str) -> Value {
        let block = json!({
            "operation": self.op.type_,
            "run": run,
            "recoveryPointChoice": self.op.recovery_point,
            "state": RunState::Pending,
            "message": null,
            "recoveryPoint": null,
            "progress": null,
            "startTime": self.now,
            "completionTime": null,
        });
        match self.op.type_ {
            Op::TestFailover => {
                let mut b = block;
                b["recoveredDisks"] = Value::Null;
                json!({"testFailover": b})
            }
            // Cleanup keeps recoveredDisks: the worker needs to know what to remove.
            Op::TestFailoverCleanup => json!({"testFailover": block}),
            Op::Commit => json!({"phase": next.phase}),
            _ if next.phase != phase => {
                let mut b = block;
                b["recoveredDisks"] = Value::Null;
                json!({"phase": next.phase, "failover": b})
            }
            _ => json!({"failover": block}),
        }
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
