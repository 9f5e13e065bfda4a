//! Plan operations as JSON merge patches of `spec.operation` (pure: no client, no clock).
//!
//! A merge patch merges objects key by key, so a field the new operation does not use is
//! sent as `null`: otherwise a `pointName` or the approvals of the previous run would
//! survive into the new one (and admission would refuse the mix).

use kube::ResourceExt;
use serde_json::{Map, Value, json};
use siterecovery_api::RecoveryPlan;
use siterecovery_api::RecoveryPointSelector;
use siterecovery_api::plan::{PlanOperation, PlanOperationType, RecoveryPointChoice, RunState};

use crate::args::PointArgs;

/// Parses `--point`/`--at` into a choice; `None` when neither is given.
pub fn point_choice(args: &PointArgs) -> Result<Option<RecoveryPointChoice>, String> {
    let choice = |selector| RecoveryPointChoice { selector, point_name: None, point_in_time: None };
    if let Some(at) = &args.at {
        let time: jiff::Timestamp = at.parse().map_err(|e| {
            format!("--at {at:?} is not an RFC 3339 time like 2026-03-01T09:30:00Z or 2026-03-01T10:30:00+01:00 ({e})")
        })?;
        return Ok(Some(RecoveryPointChoice {
            point_in_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(time)),
            ..choice(RecoveryPointSelector::PointInTime)
        }));
    }
    let Some(point) = args.point.as_deref() else { return Ok(None) };
    Ok(Some(match point {
        "latest" => choice(RecoveryPointSelector::Latest),
        "latest-processed" => choice(RecoveryPointSelector::LatestProcessed),
        "latest-app" | "latest-app-consistent" => choice(RecoveryPointSelector::LatestAppConsistent),
        "latest-group" | "latest-group-consistent" => choice(RecoveryPointSelector::LatestGroupConsistent),
        "" => {
            return Err(
                "--point needs a value: latest, latest-processed, latest-app, latest-group or a point id".into()
            );
        }
        name if name.len() > 128 => return Err(format!("--point {name:?} is longer than 128 characters")),
        name => RecoveryPointChoice { point_name: Some(name.to_owned()), ..choice(RecoveryPointSelector::Named) },
    }))
}

/// Whether an operation takes a recovery point (as admission checks it).
pub fn takes_point(t: PlanOperationType) -> bool {
    matches!(
        t,
        PlanOperationType::TestFailover | PlanOperationType::UnplannedFailover | PlanOperationType::ChangeRecoveryPoint
    )
}

/// `<type-lowercase>-<yyyymmdd-hhmmss>` in UTC, e.g. `testfailover-20260301-093000`.
pub fn generate_run_id(t: PlanOperationType, now: jiff::Timestamp) -> String {
    format!("{}-{}", format!("{t:?}").to_lowercase(), now.strftime("%Y%m%d-%H%M%S"))
}

/// Checks a `--run-id` against the API's pattern (a DNS label of at most 63 characters).
pub fn validate_run_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("--run-id {id:?}: use 1-63 lowercase letters, digits and '-', starting and ending alphanumeric"))
    }
}

/// The run id to use: `requested`, or a generated one that differs from the plan's current
/// `spec.operation.runId` (two runs started in the same second must not share an id: the
/// operator never resumes a finished run).
pub fn choose_run_id(
    requested: Option<&str>,
    t: PlanOperationType,
    current: Option<&str>,
    now: jiff::Timestamp,
) -> Result<String, String> {
    if let Some(id) = requested {
        validate_run_id(id)?;
        return Ok(id.to_owned());
    }
    let base = generate_run_id(t, now);
    if current != Some(base.as_str()) {
        return Ok(base);
    }
    Ok((2..).map(|n| format!("{base}-{n}")).find(|id| current != Some(id.as_str())).expect("an unused suffix"))
}

/// Refuses to start `op` when that would abandon a run that has not finished, or would
/// repeat a run id that already ran (the operator would not run it again).
pub fn check_start(plan: &RecoveryPlan, op: &PlanOperation, force: bool) -> Result<(), String> {
    let name = plan.name_any();
    let status = plan.status.as_ref().and_then(|s| s.operation.as_ref());
    let run = op.run_id.as_deref().unwrap_or_default();
    if let Some(st) = status
        && st.run_id.as_deref() == Some(run)
        && st.type_ == op.type_
        && matches!(st.state, RunState::Succeeded | RunState::Failed | RunState::PartiallySucceeded)
    {
        return Err(format!(
            "RecoveryPlan {name} already ran {:?} {run} ({:?}); a run is never repeated: choose another --run-id \
             or leave it out to generate one",
            op.type_, st.state
        ));
    }
    if force {
        return Ok(());
    }
    if let (Some(spec), Some(st)) = (plan.spec.operation.as_ref(), status)
        && matches!(st.state, RunState::Pending | RunState::Running | RunState::WaitingForApproval)
        && (spec.type_, spec.run_id.as_deref()) != (op.type_, Some(run))
    {
        return Err(format!(
            "RecoveryPlan {name} is still running {:?} {} ({:?}{}); wait for it to end \
             (kubectl siterecovery status {name}) or pass --force to replace it",
            st.type_,
            st.run_id.as_deref().unwrap_or("-"),
            st.state,
            st.current_group.as_deref().map(|g| format!(", group {g}")).unwrap_or_default(),
        ));
    }
    Ok(())
}

/// The merge patch that sets `spec.operation` to `op`, every unused field nulled.
/// `resource_version` makes the write conditional on the plan read by [`check_start`].
pub fn operation_patch(op: &PlanOperation, resource_version: Option<&str>) -> Value {
    let mut o = Map::new();
    o.insert("type".into(), json!(op.type_));
    o.insert("runId".into(), json!(op.run_id));
    o.insert(
        "recoveryPoint".into(),
        match &op.recovery_point {
            None => Value::Null,
            Some(p) => json!({
                "selector": p.selector,
                "pointName": p.point_name,
                "pointInTime": p.point_in_time,
            }),
        },
    );
    o.insert("approvals".into(), op.approvals.as_ref().map_or(Value::Null, |a| json!(a)));
    o.insert("skipSourceShutdown".into(), if op.skip_source_shutdown { json!(true) } else { Value::Null });
    with_resource_version(json!({"spec": {"operation": o}}), resource_version)
}

/// Manual gates of the plan, as `<group>/<action>`.
pub fn manual_gates(plan: &RecoveryPlan) -> Vec<String> {
    plan.spec
        .groups
        .iter()
        .flat_map(|g| {
            g.actions.iter().flatten().filter(|a| a.manual_approval.is_some()).map(|a| format!("{}/{}", g.name, a.name))
        })
        .collect()
}

/// The merge patch adding `gates` to the current run's approvals, keeping its type and
/// run id; conditional on the plan's `resourceVersion` so concurrent approvals are not lost.
/// `Ok(None)` when every gate is already approved.
pub fn approve_patch(plan: &RecoveryPlan, gates: &[String]) -> Result<Option<Value>, String> {
    let name = plan.name_any();
    let Some(op) = plan.spec.operation.as_ref() else {
        return Err(format!(
            "RecoveryPlan {name} has no operation: approvals belong to a run; start one first \
             (e.g. kubectl siterecovery test-failover {name})"
        ));
    };
    let known = manual_gates(plan);
    for gate in gates {
        if !known.contains(gate) {
            return Err(if known.is_empty() {
                format!("RecoveryPlan {name} has no manual-approval actions, so there is nothing to approve")
            } else {
                format!("{gate:?} is not a manual gate of RecoveryPlan {name}; its gates are: {}", known.join(", "))
            });
        }
    }
    let mut approvals = op.approvals.clone().unwrap_or_default();
    let before = approvals.len();
    for gate in gates {
        if !approvals.contains(gate) {
            approvals.push(gate.clone());
        }
    }
    if approvals.len() == before {
        return Ok(None);
    }
    let patch = json!({"spec": {"operation": {"approvals": approvals}}});
    Ok(Some(with_resource_version(patch, plan.resource_version().as_deref())))
}

/// Adds `metadata.resourceVersion` to a merge patch: the API server then refuses it with
/// 409 Conflict when the object changed since it was read.
pub fn with_resource_version(mut patch: Value, resource_version: Option<&str>) -> Value {
    if let Some(rv) = resource_version {
        patch["metadata"] = json!({"resourceVersion": rv});
    }
    patch
}

#[cfg(test)]
#[path = "operation_tests.rs"]
mod tests;
