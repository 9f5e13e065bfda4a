//! ProtectedServer reconciler: issues the agent's identity, drives the lifecycle from
//! what the agent and process server report, computes the RPO, and cleans up on delete.

mod data;
mod decide;
pub mod identity;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Event as KubeEvent;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use siterecovery_api::ProtectedServer;
use siterecovery_api::field_manager::OPERATOR;
use siterecovery_api::server::ServerPhase;
use tracing::{info, instrument, warn};

pub use decide::{Decision, HEARTBEAT_TIMEOUT, Notice, decide, test_state};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::status::now;

/// Finalizer that removes what a server owns outside Kubernetes garbage collection.
pub const FINALIZER: &str = "siterecovery.io/cleanup";

/// Reconciles one ProtectedServer (instrumentation + finalizer; the work is below).
#[instrument(skip_all, fields(server = %server.name_any(), namespace = server.namespace().unwrap_or_default()))]
pub async fn reconcile(server: Arc<ProtectedServer>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("ProtectedServer");
    let ns = server.namespace().unwrap_or_default();
    let api: Api<ProtectedServer> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, server, |event| async {
        match event {
            Finalizer::Apply(server) => apply(&server, &ctx).await,
            Finalizer::Cleanup(server) => cleanup(&server, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Called by the controller when `reconcile` fails.
pub fn error_policy(server: Arc<ProtectedServer>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, name = %server.name_any(), namespace = server.namespace().unwrap_or_default(), kind = "ProtectedServer", "reconcile failed");
    ctx.metrics.reconcile_failed("ProtectedServer", error.metric_label());
    error.action()
}

/// observe → decide → apply → status.
async fn apply(server: &ProtectedServer, ctx: &Context) -> Result<Action> {
    let ns = server.namespace().unwrap_or_default();
    // From the shared cache, not a GET per reconcile (one per server and report while
    // servers enrol, measured by `make bench`). Policy changes that matter to a server
    // re-reconcile it, so the cache being a moment behind costs nothing lasting; before
    // the first list is complete, a missing policy would be reported as missing.
    ctx.watches.policies.ready().await;
    let policy = ctx.policies.get(&ObjectRef::new(&server.spec.policy_ref.name).within(&ns));
    // The identity is applied once per generation: re-applying it on every status report
    // cost three writes per reconcile while servers enrol (measured by `make bench`).
    let new_generation = server.status.as_ref().and_then(|s| s.observed_generation) != server.meta().generation;
    if new_generation {
        apply_identity(server, ctx).await?;
    }
    let decision = decide(server, policy.as_deref(), &now());
    for notice in &decision.notices {
        publish(server, notice, ctx).await;
    }
    if decision.phase != server.status.as_ref().and_then(|s| s.phase).unwrap_or(ServerPhase::Enabling) {
        info!(phase = ?decision.phase, "phase changed");
    }
    match decision.rpo {
        Some(rpo) => ctx.metrics.set_server_rpo(&ns, &server.name_any(), rpo.as_secs_f64()),
        None => ctx.metrics.forget_server(&ns, &server.name_any()),
    }
    let status = crate::status::without_nulls(decision.status);
    if unchanged(server, &status) {
        return Ok(requeue(&decision.verdict, decision.requeue_after));
    }
    // resourceVersion makes the apply conditional: a RecoveryPlan may have recorded a
    // request (a new phase) since we read the object; then we retry on fresh data.
    let patch = json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
        "metadata": {"resourceVersion": server.resource_version()},
        "status": status,
    });
    Api::<ProtectedServer>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&server.name_any(), &PatchParams::apply(OPERATOR).force(), &Patch::Apply(&patch))
        .await?;
    Ok(requeue(&decision.verdict, decision.requeue_after))
}

fn requeue(verdict: &crate::status::Verdict, after: Option<Duration>) -> Action {
    match verdict {
        crate::status::Verdict::Stalled { .. } => Action::await_change(),
        _ => Action::requeue(after.unwrap_or(Duration::from_secs(300))),
    }
}

/// Whether every field the operator owns already has the value it would apply (then the
/// apply is skipped: a request per reconcile saved while agents report).
fn unchanged(server: &ProtectedServer, status: &serde_json::Value) -> bool {
    const OWNED: [&str; 7] =
        ["observedGeneration", "phase", "progression", "conditions", "currentRpo", "currentRpoSeconds", "resync"];
    let current = server.status.as_ref().and_then(|s| serde_json::to_value(s).ok()).unwrap_or_default();
    OWNED.iter().all(|k| match (status.get(*k), current.get(*k)) {
        // `resync` is shared with the agent: only a new request of ours counts.
        (None, _) if *k == "resync" => true,
        (new, old) => new == old,
    })
}

/// Server-side applies the agent's ServiceAccount, Role and RoleBinding. The account and
/// the Role go together (two round trips instead of three while servers enrol); the
/// binding only after the Role exists, since the API server checks the operator may
/// grant what the Role holds (RBAC escalation check) and answers 404 for a missing Role.
async fn apply_identity(server: &ProtectedServer, ctx: &Context) -> Result<()> {
    let ns = server.namespace().unwrap_or_default();
    let name = identity::agent_name(server);
    let params = PatchParams::apply(OPERATOR).force();
    let account = Patch::Apply(typed(identity::service_account(server), "v1", "ServiceAccount")?);
    let role = Patch::Apply(typed(identity::role(server), "rbac.authorization.k8s.io/v1", "Role")?);
    let binding = Patch::Apply(typed(identity::role_binding(server), "rbac.authorization.k8s.io/v1", "RoleBinding")?);
    let accounts = Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns);
    let roles = Api::<Role>::namespaced(ctx.client.clone(), &ns);
    tokio::try_join!(accounts.patch(&name, &params, &account), roles.patch(&name, &params, &role))?;
    Api::<RoleBinding>::namespaced(ctx.client.clone(), &ns).patch(&name, &params, &binding).await?;
    Ok(())
}

/// Server-side apply needs apiVersion and kind in the body.
fn typed(obj: impl serde::Serialize, api_version: &str, kind: &str) -> Result<serde_json::Value> {
    let mut value = serde_json::to_value(obj)?;
    value["apiVersion"] = json!(api_version);
    value["kind"] = json!(kind);
    Ok(value)
}

async fn publish(server: &ProtectedServer, notice: &Notice, ctx: &Context) {
    let event = KubeEvent {
        type_: notice.type_,
        reason: notice.reason.into(),
        note: Some(notice.note.clone()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &server.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}

/// Deletion. Refused in the middle of a failover or failback (the lifecycle says why);
/// otherwise the identity goes (also garbage-collected through owner references, but
/// deleting it first revokes the agent at once). Tolerates objects never created.
async fn cleanup(server: &ProtectedServer, ctx: &Context) -> Result<Action> {
    use siterecovery_core::lifecycle::{Event, State, TestFailoverState, transition};
    let phase = server.status.as_ref().and_then(|s| s.phase).unwrap_or(ServerPhase::Enabling);
    if let Err(why) = transition(State { phase, test_failover: TestFailoverState::None }, Event::Delete) {
        let notice = Notice {
            type_: kube::runtime::events::EventType::Warning,
            reason: "DeletionDeferred",
            note: why.to_string(),
        };
        publish(server, &notice, ctx).await;
        return Err(Error::Blocked(why.to_string()));
    }
    // Data first: if storage refuses, the identity stays and deletion is retried.
    if !server.spec.retain_data {
        let notice = data::delete_blobs(server, ctx).await?;
        publish(server, &notice, ctx).await;
    }
    let ns = server.namespace().unwrap_or_default();
    let name = identity::agent_name(server);
    let dp = DeleteParams::background();
    ignore_not_found(Api::<RoleBinding>::namespaced(ctx.client.clone(), &ns).delete(&name, &dp).await.map(|_| ()))?;
    ignore_not_found(Api::<Role>::namespaced(ctx.client.clone(), &ns).delete(&name, &dp).await.map(|_| ()))?;
    ignore_not_found(Api::<ServiceAccount>::namespaced(ctx.client.clone(), &ns).delete(&name, &dp).await.map(|_| ()))?;
    ctx.metrics.forget_server(&ns, &server.name_any());
    info!(retain_data = server.spec.retain_data, "identity removed");
    Ok(Action::await_change())
}

fn ignore_not_found(result: std::result::Result<(), kube::Error>) -> Result<()> {
    match result {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => Ok(other?),
    }
}
