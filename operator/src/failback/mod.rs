//! FailbackJob reconciler: the three-phase return to on-prem (reprotect, cut-over,
//! re-enable), recorded as lifecycle requests in each server's status and carried out
//! by the on-prem agent (master-target role) and the restore worker.

mod decide;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use siterecovery_api::field_manager::OPERATOR;
use siterecovery_api::{FailbackJob, ProtectedServer, RecoveryPlan};
use tracing::{instrument, warn};

pub use decide::{Decision, decide};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::plan::{Step, record_request};
use crate::status::{Verdict, now};

/// Reconciles one FailbackJob. No finalizer: it owns nothing outside the servers'
/// status, and deleting a job mid-way leaves each server in a valid phase.
#[instrument(skip_all, fields(job = %job.name_any(), namespace = job.namespace().unwrap_or_default()))]
pub async fn reconcile(job: Arc<FailbackJob>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("FailbackJob");
    let ns = job.namespace().unwrap_or_default();
    let order = match (&job.spec.servers, &job.spec.plan_ref) {
        (Some(servers), _) => servers.clone(),
        (None, Some(plan)) => {
            let plan = Api::<RecoveryPlan>::namespaced(ctx.client.clone(), &ns).get_opt(&plan.name).await?;
            match plan {
                Some(p) => p.spec.groups.iter().flat_map(|g| g.servers.clone()).collect(),
                None => {
                    return stall(
                        &job,
                        &ctx,
                        format!(
                            "spec.planRef: RecoveryPlan {} not found",
                            job.spec.plan_ref.as_ref().map(|p| p.name.as_str()).unwrap_or_default()
                        ),
                    )
                    .await;
                }
            }
        }
        (None, None) => unreachable!("admission requires servers or planRef"),
    };
    let servers: BTreeMap<String, ProtectedServer> = ctx
        .servers
        .state()
        .iter()
        .filter(|s| s.namespace().as_deref() == Some(ns.as_str()) && order.contains(&s.name_any()))
        .map(|s| (s.name_any(), s.as_ref().clone()))
        .collect();
    let decision = decide(&job, &order, &servers, &now());
    for step in &decision.steps {
        if let Step::RequestServer { server, resource_version, status } = step {
            record_request(&ctx, &ns, server, resource_version.as_deref(), status).await?;
        }
    }
    publish_transition(&job, &decision.verdict, &ctx).await;
    patch_status(&job, decision.status, &ctx).await?;
    Ok(Action::requeue(if decision.running { Duration::from_secs(10) } else { Duration::from_secs(300) }))
}

/// Called by the controller when `reconcile` fails.
pub fn error_policy(job: Arc<FailbackJob>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, name = %job.name_any(), namespace = job.namespace().unwrap_or_default(), kind = "FailbackJob", "reconcile failed");
    ctx.metrics.reconcile_failed("FailbackJob", error.metric_label());
    error.action()
}

async fn stall(job: &FailbackJob, ctx: &Context, message: String) -> Result<Action> {
    let mut conditions = job.status.clone().unwrap_or_default().conditions;
    let verdict = Verdict::Stalled { reason: "PlanNotFound", message };
    crate::status::set_verdict(&mut conditions, &verdict, job.meta().generation, &now());
    publish_transition(job, &verdict, ctx).await;
    patch_status(job, json!({"observedGeneration": job.meta().generation, "conditions": conditions}), ctx).await?;
    Ok(Action::requeue(Duration::from_secs(30)))
}

async fn patch_status(job: &FailbackJob, status: serde_json::Value, ctx: &Context) -> Result<()> {
    let ns = job.namespace().unwrap_or_default();
    let patch = json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "FailbackJob", "status": status});
    Api::<FailbackJob>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&job.name_any(), &PatchParams::apply(OPERATOR).force(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// One event per change of the Ready reason or message.
async fn publish_transition(job: &FailbackJob, verdict: &Verdict, ctx: &Context) {
    let (type_, reason, message) = match verdict {
        Verdict::Ready { reason, message } => (EventType::Normal, *reason, message),
        Verdict::Progressing { reason, message } => (EventType::Normal, *reason, message),
        Verdict::Stalled { reason, message } => (EventType::Warning, *reason, message),
    };
    let before = job.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == siterecovery_api::failback::FailbackConditionType::Ready)
            .map(|c| (c.reason.clone(), c.message.clone()))
    });
    if before == Some((reason.to_owned(), message.clone())) {
        return;
    }
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(message.clone()),
        action: "Failback".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}
