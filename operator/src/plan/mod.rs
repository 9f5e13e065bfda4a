//! RecoveryPlan reconciler: runs the requested operation group by group (servers of a
//! group in parallel), with pre/post Jobs and manual-approval gates, and records each
//! server's request in that server's status for the lifecycle and the restore worker.

mod decide;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use siterecovery_api::field_manager::OPERATOR;
use siterecovery_api::{ProtectedServer, RecoveryPlan};
use tracing::{info, instrument, warn};

pub use decide::{Decision, JobState, Step, decide, job_name, run_key};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::status::{Verdict, now};

/// Label on Jobs naming their plan.
pub const PLAN_LABEL: &str = "siterecovery.io/recovery-plan";

/// Reconciles one RecoveryPlan. No finalizer: Jobs are owned (garbage-collected) and
/// the requests in server statuses belong to the servers.
#[instrument(skip_all, fields(plan = %plan.name_any(), namespace = plan.namespace().unwrap_or_default()))]
pub async fn reconcile(plan: Arc<RecoveryPlan>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("RecoveryPlan");
    let ns = plan.namespace().unwrap_or_default();
    let servers: BTreeMap<String, ProtectedServer> = ctx
        .servers
        .state()
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(ns.as_str()))
        .map(|s| (s.name_any(), s.as_ref().clone()))
        .collect();
    let new_generation = plan.status.as_ref().and_then(|s| s.observed_generation) != plan.meta().generation;
    let was_invalid = plan.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == siterecovery_api::plan::PlanConditionType::Stalled && c.reason == "InvalidJob")
    });
    if (new_generation || was_invalid)
        && let Some(problem) = dry_run_jobs(&plan, &ctx).await?
    {
        return reject(&plan, &ctx, problem).await;
    }
    let jobs = observe_jobs(&plan, &ctx).await?;
    let decision = decide(&plan, &servers, &jobs, &now());
    for step in &decision.steps {
        apply_step(&plan, step, &ctx).await?;
    }
    publish_transition(&plan, &decision, &ctx).await;
    let patch = json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan", "status": decision.status});
    Api::<RecoveryPlan>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&plan.name_any(), &PatchParams::apply(OPERATOR).force(), &Patch::Apply(&patch))
        .await?;
    // Server and Job changes trigger reconciles through watches; the requeue only
    // bounds Job timeouts and recovers from missed events.
    Ok(Action::requeue(if decision.running { Duration::from_secs(10) } else { Duration::from_secs(300) }))
}

/// Called by the controller when `reconcile` fails.
pub fn error_policy(plan: Arc<RecoveryPlan>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, name = %plan.name_any(), namespace = plan.namespace().unwrap_or_default(), kind = "RecoveryPlan", "reconcile failed");
    ctx.metrics.reconcile_failed("RecoveryPlan", error.metric_label());
    error.action()
}

/// Job specs are kept as written in the CRD (the pod schema is too large to inline), so
/// each new generation of the plan has every Job action checked by a server-side dry
/// run; the first refusal is returned with the action named.
async fn dry_run_jobs(plan: &RecoveryPlan, ctx: &Context) -> Result<Option<String>> {
    let ns = plan.namespace().unwrap_or_default();
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    for (g, group) in plan.spec.groups.iter().enumerate() {
        for (a, action) in group.actions.iter().flatten().enumerate() {
            let Some(job) = &action.job else { continue };
            let field = format!("spec.groups[{g}].actions[{a}].job.spec");
            let spec: JobSpec = match serde_json::from_value(job.spec.clone()) {
                Ok(spec) => spec,
                Err(e) => return Ok(Some(format!("{field}: not a Job spec: {e}"))),
            };
            let probe = Job {
                metadata: ObjectMeta { name: Some(format!("{}-dry-run", plan.name_any())), ..Default::default() },
                spec: Some(spec),
                ..Default::default()
            };
            match api.create(&PostParams { dry_run: true, ..Default::default() }, &probe).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                    return Ok(Some(format!("{field}: {}", s.message)));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(None)
}

/// Stalls the plan with the reason, and waits for the user to change it.
async fn reject(plan: &RecoveryPlan, ctx: &Context, message: String) -> Result<Action> {
    let generation = plan.meta().generation;
    let mut conditions = plan.status.clone().unwrap_or_default().conditions;
    let verdict = Verdict::Stalled { reason: "InvalidJob", message: message.clone() };
    crate::status::set_verdict(&mut conditions, &verdict, generation, &now());
    let patch = json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
        "status": {"observedGeneration": generation, "conditions": conditions}});
    Api::<RecoveryPlan>::namespaced(ctx.client.clone(), &plan.namespace().unwrap_or_default())
        .patch_status(&plan.name_any(), &PatchParams::apply(OPERATOR).force(), &Patch::Apply(&patch))
        .await?;
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "InvalidJob".into(),
        note: Some(message.clone()),
        action: "Validate".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &plan.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
    Err(Error::InvalidSpec(message))
}

async fn observe_jobs(plan: &RecoveryPlan, ctx: &Context) -> Result<BTreeMap<String, JobState>> {
    let ns = plan.namespace().unwrap_or_default();
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let list = api.list(&ListParams::default().labels(&format!("{PLAN_LABEL}={}", plan.name_any()))).await?;
    Ok(list.items.into_iter().map(|job| (job.name_any(), job_state(&job))).collect())
}

fn job_state(job: &Job) -> JobState {
    let status = job.status.clone().unwrap_or_default();
    let condition = |t: &str| status.conditions.iter().flatten().find(|c| c.type_ == t && c.status == "True").cloned();
    if condition("Complete").is_some() || status.succeeded.unwrap_or(0) > 0 {
        JobState::Succeeded
    } else if let Some(c) = condition("Failed") {
        JobState::Failed(c.message.or(c.reason).unwrap_or_else(|| "failed".into()))
    } else {
        JobState::Active(job.metadata.creation_timestamp.clone().unwrap_or_else(now))
    }
}

async fn apply_step(plan: &RecoveryPlan, step: &Step, ctx: &Context) -> Result<()> {
    let ns = plan.namespace().unwrap_or_default();
    match step {
        Step::CreateJob { name, group, action, spec } => {
            let spec: JobSpec = serde_json::from_value(spec.clone()).map_err(|e| {
                Error::InvalidSpec(format!("spec.groups[{group}].actions[{action}].job.spec is not a Job spec: {e}"))
            })?;
            let job = Job {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(BTreeMap::from([
                        (PLAN_LABEL.to_owned(), plan.name_any()),
                        ("siterecovery.io/group".to_owned(), group.clone()),
                        ("siterecovery.io/action".to_owned(), action.clone()),
                    ])),
                    owner_references: plan.controller_owner_ref(&()).map(|o| vec![o]),
                    ..Default::default()
                },
                spec: Some(spec),
                ..Default::default()
            };
            match Api::<Job>::namespaced(ctx.client.clone(), &ns).create(&PostParams::default(), &job).await {
                Ok(_) => info!(job = %name, "created action Job"),
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(kube::Error::Api(s)) if s.code == 422 => {
                    return Err(Error::InvalidSpec(format!(
                        "spec.groups[{group}].actions[{action}].job: the API server refused the Job: {}",
                        s.message
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Step::RequestServer { server, resource_version, status } => {
            record_request(ctx, &ns, server, resource_version.as_deref(), status).await?;
        }
    }
    Ok(())
}

/// Records a request (a lifecycle transition decided with `siterecovery_core`) in a
/// server's status: a merge patch conditional on the resourceVersion the decision was
/// made on, so a concurrent change yields 409 and a fresh decision, never a lost one.
pub(crate) async fn record_request(
    ctx: &Context,
    ns: &str,
    server: &str,
    resource_version: Option<&str>,
    status: &serde_json::Value,
) -> Result<()> {
    let patch = json!({"metadata": {"resourceVersion": resource_version}, "status": status});
    Api::<ProtectedServer>::namespaced(ctx.client.clone(), ns)
        .patch_status(server, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    info!(%server, request = %status, "recorded request");
    Ok(())
}

/// One event per change of the run's verdict or gate.
async fn publish_transition(plan: &RecoveryPlan, decision: &Decision, ctx: &Context) {
    let before =
        plan.status.as_ref().and_then(|s| s.operation.as_ref()).map(|o| (o.run_id.clone(), o.state, o.message.clone()));
    let after = decision
        .status
        .get("operation")
        .cloned()
        .and_then(|o| serde_json::from_value::<siterecovery_api::plan::OperationStatus>(o).ok());
    let Some(after) = after else { return };
    if before == Some((after.run_id.clone(), after.state, after.message.clone())) {
        return;
    }
    let (type_, reason) = match &decision.verdict {
        Verdict::Stalled { .. } => (EventType::Warning, "RunFailed"),
        Verdict::Ready { .. } => (EventType::Normal, "RunSucceeded"),
        Verdict::Progressing { .. } if after.state == siterecovery_api::plan::RunState::WaitingForApproval => {
            (EventType::Normal, "WaitingForApproval")
        }
        Verdict::Progressing { .. } => (EventType::Normal, "RunProgress"),
    };
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: after.message,
        action: format!("{:?}", after.type_),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &plan.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}
