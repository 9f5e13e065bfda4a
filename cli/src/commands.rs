//! Plan operations, approvals and resync requests: read the object, check the request
//! makes sense, write it with a JSON merge patch, then follow it with `--wait`.

use anyhow::bail;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use siterecovery_api::field_manager::CLI;
use siterecovery_api::plan::{PlanOperation, PlanOperationType, RecoveryPointChoice};
use siterecovery_api::{ProtectedServer, RecoveryPlan};

use crate::args::{ApproveArgs, PlanArgs, PointArgs, ResyncArgs, WaitArgs};
use crate::client::{Kube, explain};
use crate::operation::{approve_patch, check_start, choose_run_id, operation_patch, point_choice, takes_point};
use crate::wait::{Hint, Outcome, PlanRun, follow, plan_view, resync_view};

/// Patch parameters naming this tool as the field manager.
pub fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(CLI.into()), ..Default::default() }
}

/// A plan operation as the user asked for it.
pub struct Request<'a> {
    /// Plan, run id, force, wait.
    pub plan: &'a PlanArgs,
    /// What to run.
    pub type_: PlanOperationType,
    /// `--point`/`--at`.
    pub point: Option<&'a PointArgs>,
    /// Planned failover leaving the sources up.
    pub skip_source_shutdown: bool,
}

/// Resolves `--point`/`--at` for `type_`, refusing them where the API does.
pub fn resolve_point(
    type_: PlanOperationType,
    point: Option<&PointArgs>,
) -> anyhow::Result<Option<RecoveryPointChoice>> {
    let choice = match point {
        Some(p) => point_choice(p).map_err(anyhow::Error::msg)?,
        None => None,
    };
    match (type_, &choice) {
        (PlanOperationType::ChangeRecoveryPoint, None) => {
            bail!(
                "change-point needs the new point: --point latest|latest-processed|latest-app|latest-group|<id> or --at TIME"
            )
        }
        (PlanOperationType::PlannedFailover, Some(_)) => bail!(
            "--point and --at apply to unplanned failover only: a planned failover replicates the last changes \
             first and fails over with zero data loss"
        ),
        (t, Some(_)) if !takes_point(t) => bail!("{t:?} takes no recovery point"),
        _ => Ok(choice),
    }
}

/// Sets `spec.operation` of the plan and follows the run.
pub async fn plan_operation(kube: &Kube, req: Request<'_>, hint: &Hint) -> anyhow::Result<Outcome> {
    let ns = &kube.namespace;
    let name = &req.plan.plan;
    let what = format!("RecoveryPlan {name}");
    let api: Api<RecoveryPlan> = Api::namespaced(kube.client.clone(), ns);
    let recovery_point = resolve_point(req.type_, req.point)?;
    let plan = api.get(name).await.map_err(|e| explain(e, "get", &what, ns))?;
    let current = plan.spec.operation.as_ref().and_then(|o| o.run_id.as_deref());
    let run_id = choose_run_id(req.plan.run_id.as_deref(), req.type_, current, jiff::Timestamp::now())
        .map_err(anyhow::Error::msg)?;
    let op = PlanOperation {
        type_: req.type_,
        run_id: Some(run_id.clone()),
        recovery_point,
        approvals: None,
        skip_source_shutdown: req.skip_source_shutdown,
    };
    check_start(&plan, &op, req.plan.force).map_err(anyhow::Error::msg)?;
    let patch = operation_patch(&op, plan.resource_version().as_deref());
    let updated =
        api.patch(name, &patch_params(), &Patch::Merge(&patch)).await.map_err(|e| explain(e, "patch", &what, ns))?;
    let point = op.recovery_point.as_ref().map(describe_point).unwrap_or_default();
    println!("{what}: {:?} run {run_id} requested{point}", req.type_);
    let run = PlanRun { type_: req.type_, run_id, generation: updated.metadata.generation };
    follow_plan(&api, name, run, &req.plan.wait, hint).await
}

fn describe_point(p: &RecoveryPointChoice) -> String {
    match (&p.point_name, &p.point_in_time) {
        (Some(n), _) => format!(" at point {n}"),
        (_, Some(t)) => format!(" at the latest point before {}", t.0),
        _ => format!(" at the {:?} point", p.selector),
    }
}

async fn follow_plan(
    api: &Api<RecoveryPlan>,
    name: &str,
    run: PlanRun,
    wait: &WaitArgs,
    hint: &Hint,
) -> anyhow::Result<Outcome> {
    if !wait.enabled() {
        println!("follow it with: {}", hint.cmd(&format!("status {name}")));
        return Ok(Outcome::Succeeded);
    }
    follow(api, name, wait.timeout, hint, |p| plan_view(p, &run, hint)).await
}

/// Adds gates to the current run's approvals and follows the run.
pub async fn approve(kube: &Kube, args: &ApproveArgs, hint: &Hint) -> anyhow::Result<Outcome> {
    let ns = &kube.namespace;
    let name = &args.plan;
    let what = format!("RecoveryPlan {name}");
    let api: Api<RecoveryPlan> = Api::namespaced(kube.client.clone(), ns);
    let plan = api.get(name).await.map_err(|e| explain(e, "get", &what, ns))?;
    let patch = approve_patch(&plan, &args.gates).map_err(anyhow::Error::msg)?;
    let op = plan.spec.operation.clone().expect("approve_patch checked the operation");
    // The operator's run key: the run id, or the operation's name when there is none.
    let run_id = op.run_id.clone().unwrap_or_else(|| format!("{:?}", op.type_).to_lowercase());
    let generation = match patch {
        Some(patch) => {
            let updated = api
                .patch(name, &patch_params(), &Patch::Merge(&patch))
                .await
                .map_err(|e| explain(e, "patch", &what, ns))?;
            println!("{what}: approved {} for {:?} run {run_id}", args.gates.join(", "), op.type_);
            updated.metadata.generation
        }
        None => {
            println!("{what}: {} already approved for {:?} run {run_id}", args.gates.join(", "), op.type_);
            plan.metadata.generation
        }
    };
    let run = PlanRun { type_: op.type_, run_id, generation };
    follow_plan(&api, name, run, &args.wait, hint).await
}

/// `manual-<yyyymmdd-hhmmss>` (UTC).
pub fn resync_token(now: jiff::Timestamp) -> String {
    format!("manual-{}", now.strftime("%Y%m%d-%H%M%S"))
}

/// The merge patch requesting a resync with `token`.
pub fn resync_patch(token: &str) -> serde_json::Value {
    json!({"spec": {"resyncToken": token}})
}

/// Sets `spec.resyncToken` and follows the resync.
pub async fn resync(kube: &Kube, args: &ResyncArgs, hint: &Hint) -> anyhow::Result<Outcome> {
    let ns = &kube.namespace;
    let name = &args.server;
    let what = format!("ProtectedServer {name}");
    let api: Api<ProtectedServer> = Api::namespaced(kube.client.clone(), ns);
    let server = api.get(name).await.map_err(|e| explain(e, "get", &what, ns))?;
    let token = args.token.clone().unwrap_or_else(|| resync_token(jiff::Timestamp::now()));
    if token.is_empty() || token.chars().count() > 63 {
        bail!("--token must be 1 to 63 characters");
    }
    if server.spec.resync_token.as_deref() == Some(token.as_str()) {
        bail!("{what} already has resyncToken {token:?}; a resync is requested by a new value: choose another --token");
    }
    api.patch(name, &patch_params(), &Patch::Merge(&resync_patch(&token)))
        .await
        .map_err(|e| explain(e, "patch", &what, ns))?;
    println!("{what}: resync requested (token {token})");
    if !args.wait.enabled() {
        println!("follow it with: {}", hint.cmd(&format!("status {name}")));
        return Ok(Outcome::Succeeded);
    }
    follow(&api, name, args.wait.timeout, hint, |s| resync_view(s, &token)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_refused_where_the_api_refuses_them() {
        let p = PointArgs { point: Some("latest-app".into()), at: None };
        let err = resolve_point(PlanOperationType::PlannedFailover, Some(&p)).unwrap_err().to_string();
        assert!(err.starts_with("--point and --at apply to unplanned failover only"), "{err}");
        let err = resolve_point(PlanOperationType::ChangeRecoveryPoint, Some(&PointArgs::default())).unwrap_err();
        assert!(err.to_string().starts_with("change-point needs the new point"));
        assert!(resolve_point(PlanOperationType::UnplannedFailover, Some(&p)).unwrap().is_some());
        assert_eq!(resolve_point(PlanOperationType::TestFailover, None).unwrap(), None);
    }

    #[test]
    fn resync_requests_set_a_new_token() {
        let now: jiff::Timestamp = "2026-03-01T09:30:05Z".parse().unwrap();
        assert_eq!(resync_token(now), "manual-20260301-093005");
        assert_eq!(resync_patch("manual-1"), json!({"spec": {"resyncToken": "manual-1"}}));
    }
}
