//! The pure part of the FailbackJob reconciler: reprotect every server, cut over when
//! all are in sync (and approved, in Manual mode), then re-enable forward replication.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use siterecovery_api::failback::{
    CutoverMode, FailbackConditionType, FailbackJob, FailbackServerStatus, FailbackStep, StepStatus,
};
use siterecovery_api::plan::RunState;
use siterecovery_api::server::ServerPhase as P;
use siterecovery_api::{ConditionStatus, ProtectedServer};
use siterecovery_core::lifecycle::{Event, Outcome, State, transition};

use crate::plan::Step;
use crate::server::test_state;
use crate::status::{Verdict, set_condition, set_verdict};

/// What to do for one FailbackJob.
#[derive(Debug)]
pub struct Decision {
    /// Server requests to record (only [`Step::RequestServer`]).
    pub steps: Vec<Step>,
    /// Operator-owned status fields, for server-side apply.
    pub status: Value,
    /// kstatus verdict.
    pub verdict: Verdict,
    /// Whether work is still going on.
    pub running: bool,
}

/// Where one server stands in the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Not failed over and committed (and the job never moved it): cannot start.
    Invalid,
    /// Reverse replication requested or syncing.
    Reprotecting,
    /// In sync, ready for cut-over.
    InSync,
    /// Cut-over in progress.
    CuttingOver,
    /// Running on-prem; forward replication not re-enabled yet.
    Back,
    /// Forward replication re-enabled and catching up.
    ReEnabling,
    /// Protected to Azure again.
    Done,
}

/// Decides a FailbackJob. `servers` maps names (in failback order) to the servers found.
pub fn decide(
    job: &FailbackJob,
    order: &[String],
    servers: &BTreeMap<String, ProtectedServer>,
    now: &Time,
) -> Decision {
    let generation = job.meta().generation;
    let previous = job.status.clone().unwrap_or_default();
    let started = !previous.servers.is_empty();
    let reached_re_enable =
        |name: &str| previous.servers.iter().any(|s| s.name == name && s.step == FailbackStep::ReEnable);
    let mut stages = Vec::new();
    let mut problems = Vec::new();
    for name in order {
        let Some(server) = servers.get(name) else {
            problems.push(format!("ProtectedServer {name} not found"));
            stages.push((name.clone(), Stage::Invalid, None));
            continue;
        };
        let phase = server.status.as_ref().and_then(|s| s.phase).unwrap_or(P::Enabling);
        let stage = match phase {
            P::Committed | P::Reprotecting => Stage::Reprotecting,
            P::ReverseProtected => Stage::InSync,
            P::FailingBack => Stage::CuttingOver,
            P::FailedBack => Stage::Back,
            P::InitialReplication | P::Resynchronizing if reached_re_enable(name) => Stage::ReEnabling,
            P::Protected if reached_re_enable(name) => Stage::Done,
            other => {
                problems.push(format!("{name} is {other:?}: failback needs a failover that was committed"));
                Stage::Invalid
            }
        };
        stages.push((name.clone(), stage, Some(server)));
    }
    let mut conditions = previous.conditions.clone();
    if !problems.is_empty() && !started {
        // Refuse to start at all: a partial failback would split the application.
        let verdict = Verdict::Stalled { reason: "NotFailedOver", message: problems.join("; ") };
        set_verdict(&mut conditions, &verdict, generation, now);
        let status = json!({"observedGeneration": generation, "conditions": conditions, "state": RunState::Failed});
        return Decision { steps: Vec::new(), status, verdict, running: false };
    }

    let all = |pred: fn(Stage) -> bool| stages.iter().all(|(_, s, _)| pred(*s));
    let in_sync = all(|s| !matches!(s, Stage::Reprotecting | Stage::Invalid));
    let approved = job.spec.cutover.mode == CutoverMode::Automatic || job.spec.cutover.approved;
    let mut steps = Vec::new();
    let mut per_server = Vec::new();
    for (name, stage, server) in &stages {
        let Some(server) = server else { continue };
        let (step, state, request) = match stage {
            Stage::Invalid => (FailbackStep::Reprotect, RunState::Failed, None),
            Stage::Reprotecting => (FailbackStep::Reprotect, RunState::Running, Some(Event::Reprotect)),
            Stage::InSync if in_sync && approved => {
                (FailbackStep::FailoverToOnPrem, RunState::Running, Some(Event::Failback))
            }
            Stage::InSync => (FailbackStep::Reprotect, RunState::Succeeded, None),
            Stage::CuttingOver => (FailbackStep::FailoverToOnPrem, RunState::Running, None),
            Stage::Back if job.spec.re_enable_replication => {
                (FailbackStep::ReEnable, RunState::Running, Some(Event::ReEnable))
            }
            Stage::Back => (FailbackStep::FailoverToOnPrem, RunState::Succeeded, None),
            Stage::ReEnabling => (FailbackStep::ReEnable, RunState::Running, None),
            Stage::Done => (FailbackStep::ReEnable, RunState::Succeeded, None),
        };
        let status = server.status.clone().unwrap_or_default();
        let work = match step {
            FailbackStep::Reprotect => status.reverse_replication.clone(),
            _ => status.failback.clone(),
        };
        let mut message = work.as_ref().and_then(|w| w.message.clone());
        if let Some(event) = request {
            let phase = status.phase.unwrap_or(P::Enabling);
            match transition(State { phase, test_failover: test_state(server) }, event) {
                Ok(Outcome::Moved(next)) => {
                    steps.push(Step::RequestServer {
                        server: name.clone(),
                        resource_version: server.resource_version(),
                        status: request_patch(job, server, event, next.phase, now),
                    });
                    message = Some("requested".into());
                }
                Ok(_) => {}
                Err(why) => message = Some(why.to_string()),
            }
        }
        per_server.push(FailbackServerStatus {
            name: name.clone(),
            step,
            state,
            progress: work.as_ref().and_then(|w| w.progress.clone()),
            bytes_sent: work.as_ref().and_then(|w| w.bytes_sent),
            message,
        });
    }

    let count =
        |step: FailbackStep, st: RunState| per_server.iter().filter(|s| s.step == step && s.state == st).count();
    let total = per_server.len();
    let reprotected = stages.iter().filter(|(_, s, _)| !matches!(s, Stage::Reprotecting | Stage::Invalid)).count();
    let back = stages.iter().filter(|(_, s, _)| matches!(s, Stage::Back | Stage::ReEnabling | Stage::Done)).count();
    let done = if job.spec.re_enable_replication { count(FailbackStep::ReEnable, RunState::Succeeded) } else { back };
    let step_state = |finished: usize, started: bool| match (finished == total, started) {
        (true, _) => RunState::Succeeded,
        (false, true) => RunState::Running,
        (false, false) => RunState::Pending,
    };
    let cutover_started =
        stages.iter().any(|(_, s, _)| !matches!(s, Stage::Reprotecting | Stage::InSync | Stage::Invalid));
    let mut step_list = vec![
        step_status(&previous.steps, FailbackStep::Reprotect, step_state(reprotected, true), now),
        step_status(
            &previous.steps,
            FailbackStep::FailoverToOnPrem,
            step_state(back, cutover_started || (in_sync && approved)),
            now,
        ),
    ];
    if job.spec.re_enable_replication {
        let re = stages.iter().any(|(_, s, _)| matches!(s, Stage::ReEnabling | Stage::Done | Stage::Back));
        step_list.push(step_status(&previous.steps, FailbackStep::ReEnable, step_state(done, re), now));
    }
    let failed = per_server.iter().any(|s| s.state == RunState::Failed);
    let waiting_cutover = in_sync && !approved && back == 0;
    let current = step_list.iter().find(|s| s.state != RunState::Succeeded).map(|s| s.step).unwrap_or(
        if job.spec.re_enable_replication { FailbackStep::ReEnable } else { FailbackStep::FailoverToOnPrem },
    );
    let (state, verdict) = if failed {
        let msg = per_server
            .iter()
            .filter(|s| s.state == RunState::Failed)
            .map(|s| format!("{}: {}", s.name, s.message.clone().unwrap_or_default()))
            .chain(problems.iter().cloned())
            .collect::<Vec<_>>()
            .join("; ");
        (RunState::Failed, Verdict::Stalled { reason: "ServerFailed", message: msg })
    } else if done == total {
        (
            RunState::Succeeded,
            Verdict::Ready { reason: "FailedBack", message: format!("{total} server(s) back on-prem") },
        )
    } else if waiting_cutover {
        let msg = "reverse replication is in sync; set spec.cutover.approved to fail over to on-prem".to_owned();
        (RunState::WaitingForApproval, Verdict::Progressing { reason: "WaitingForCutover", message: msg })
    } else {
        let msg = format!("{current:?}: {done}/{total} servers done");
        (RunState::Running, Verdict::Progressing { reason: "InProgress", message: msg })
    };
    set_verdict(&mut conditions, &verdict, generation, now);
    let (cut_status, cut_reason) = if waiting_cutover {
        (ConditionStatus::True, "AwaitingApproval")
    } else {
        (ConditionStatus::False, "NotWaiting")
    };
    let cut_message = if waiting_cutover { "set spec.cutover.approved: true to start the cut-over" } else { "" };
    set_condition(
        &mut conditions,
        FailbackConditionType::WaitingForCutover,
        cut_status,
        cut_reason,
        cut_message,
        generation,
        now,
    );
    let progress = match current {
        FailbackStep::Reprotect => reprotected,
        FailbackStep::FailoverToOnPrem => back,
        FailbackStep::ReEnable => done,
    };
    let status = json!({
        "observedGeneration": generation,
        "conditions": conditions,
        "step": current,
        "state": state,
        "progress": format!("{progress}/{total}"),
        "steps": step_list,
        "servers": per_server,
    });
    let running = matches!(state, RunState::Running | RunState::WaitingForApproval);
    Decision { steps, status, verdict, running }
}

fn step_status(previous: &[StepStatus], step: FailbackStep, state: RunState, now: &Time) -> StepStatus {
    let before = previous.iter().find(|s| s.step == step);
    let start_time =
        before.and_then(|s| s.start_time.clone()).or_else(|| (state != RunState::Pending).then(|| now.clone()));
    let completion_time =
        before.and_then(|s| s.completion_time.clone()).or_else(|| (state == RunState::Succeeded).then(|| now.clone()));
    StepStatus { step, state, start_time, completion_time, message: None }
}

/// The status merge patch recording a failback request on a server.
fn request_patch(job: &FailbackJob, server: &ProtectedServer, event: Event, next: P, now: &Time) -> Value {
    let alternate = job
        .spec
        .target
        .alternate
        .iter()
        .flatten()
        .find(|a| a.server == server.name_any())
        .map(|a| serde_json::to_value(a).unwrap_or_default());
    let work = json!({
        "failbackJob": job.name_any(),
        "state": RunState::Pending,
        "location": job.spec.target.location,
        "alternate": alternate,
        "progress": null,
        "bytesSent": null,
        "message": null,
        "startTime": now,
        "completionTime": null,
    });
    match event {
        Event::Reprotect => json!({"phase": next, "reverseReplication": work}),
        Event::Failback => json!({"phase": next, "failback": work}),
        // Forward replication starts over from a checksum comparison (only differing
        // blocks are sent), so the old initial-sync figures no longer apply.
        _ => json!({"phase": next, "initialSync": null}),
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
