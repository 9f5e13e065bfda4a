//! ReplicationPolicy reconciler: checks the storage credential, makes sure a
//! data-encryption key exists, counts the servers using the policy, and refuses to let
//! a policy in use be deleted.

mod decide;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;
use siterecovery_api::ReplicationPolicy;
use siterecovery_api::field_manager::OPERATOR;
use tracing::{info, instrument};

pub use decide::{CredentialCheck, KeyCheck, Observed, decide, key_secret_name};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::status::{Verdict, now};

/// Finalizer that keeps a policy while servers still use it.
pub const FINALIZER: &str = "siterecovery.io/policy-in-use";
/// Label on key Secrets naming their policy.
pub const POLICY_LABEL: &str = "siterecovery.io/policy";
/// Secret key naming the active data-encryption key id.
pub const ACTIVE_KEY: &str = "active";
/// Prefix of the Secret keys holding the data-encryption keys (`key-<id>`).
pub const KEY_PREFIX: &str = "key-";

/// Reconciles one ReplicationPolicy (instrumentation + finalizer; the work is below).
#[instrument(skip_all, fields(policy = %policy.name_any(), namespace = policy.namespace().unwrap_or_default()))]
pub async fn reconcile(policy: Arc<ReplicationPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile("ReplicationPolicy");
    let ns = policy.namespace().unwrap_or_default();
    let api: Api<ReplicationPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, policy, |event| async {
        match event {
            Finalizer::Apply(policy) => apply(&policy, &ctx).await,
            Finalizer::Cleanup(policy) => cleanup(&policy, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Called by the controller when `reconcile` fails.
pub fn error_policy(policy: Arc<ReplicationPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, name = %policy.name_any(), namespace = policy.namespace().unwrap_or_default(), kind = "ReplicationPolicy", "reconcile failed");
    ctx.metrics.reconcile_failed("ReplicationPolicy", error.metric_label());
    error.action()
}

/// observe → decide → apply → status.
async fn apply(policy: &ReplicationPolicy, ctx: &Context) -> Result<Action> {
    let observed = observe(policy, ctx).await?;
    let decision = decide(policy, &observed, &now());
    if let Some(name) = &decision.create_key_secret {
        create_key_secret(policy, name, ctx).await?;
        // The new Secret is observed on the next pass (the controller watches Secrets).
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    publish_transition(policy, &decision.verdict, ctx).await;
    patch_status(policy, decision.status, ctx).await?;
    // Secrets are not watched (that would need list/watch on every Secret in the
    // cluster), so credentials are re-read: soon while broken, so a fix shows quickly,
    // and every few minutes otherwise (a Secret can change or be deleted under us).
    Ok(match decision.verdict {
        Verdict::Stalled { .. } => Action::requeue(Duration::from_secs(15)),
        _ => Action::requeue(Duration::from_secs(300)),
    })
}

async fn observe(policy: &ReplicationPolicy, ctx: &Context) -> Result<Observed> {
    let ns = policy.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let credential = match &policy.spec.target.credential.secret_ref {
        Some(r) => {
            CredentialCheck::Secret { name: r.name.clone(), secret: secrets.get_opt(&r.name).await?.map(Box::new) }
        }
        None => CredentialCheck::WorkloadIdentity,
    };
    let key_name = key_secret_name(policy);
    let key = KeyCheck { name: key_name.clone(), secret: secrets.get_opt(&key_name).await? };
    let servers = servers_using(policy, ctx);
    let credential_secret = match &credential {
        CredentialCheck::Secret { secret, .. } => secret.as_deref(),
        CredentialCheck::WorkloadIdentity => None,
    };
    let storage = crate::storage::probe(policy, credential_secret, &ctx.azure).await;
    Ok(Observed { credential, key, servers, storage })
}

fn servers_using(policy: &ReplicationPolicy, ctx: &Context) -> Vec<String> {
    let ns = policy.namespace();
    let mut names: Vec<String> = ctx
        .servers
        .state()
        .iter()
        .filter(|s| s.namespace() == ns && s.spec.policy_ref.name == policy.name_any())
        .map(|s| s.name_any())
        .collect();
    names.sort();
    names
}

async fn create_key_secret(policy: &ReplicationPolicy, name: &str, ctx: &Context) -> Result<()> {
    let ns = policy.namespace().unwrap_or_default();
    let secret = decide::new_key_secret(policy, name, &mut rand::rng(), &now());
    // `create`, never apply: an existing Secret holds keys that data depends on.
    // No owner reference either: the keys must outlive the policy while data is retained.
    match Api::<Secret>::namespaced(ctx.client.clone(), &ns).create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(secret = name, "created data-encryption key Secret");
            publish(policy, EventType::Normal, "KeyCreated", format!("created data-encryption key Secret {name}"), ctx)
                .await;
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn patch_status(policy: &ReplicationPolicy, status: serde_json::Value, ctx: &Context) -> Result<()> {
    let ns = policy.namespace().unwrap_or_default();
    let api: Api<ReplicationPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let status = crate::status::without_nulls(status);
    let patch = json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "ReplicationPolicy", "status": status});
    api.patch_status(&policy.name_any(), &PatchParams::apply(OPERATOR).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// Emits an event when the Ready condition changes (not on every reconcile).
async fn publish_transition(policy: &ReplicationPolicy, verdict: &Verdict, ctx: &Context) {
    let was = policy.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == siterecovery_api::policy::PolicyConditionType::Ready)
            .map(|c| c.reason.clone())
    });
    let (kind, reason, message) = match verdict {
        Verdict::Ready { reason, message } => (EventType::Normal, *reason, message),
        Verdict::Progressing { reason, message } => (EventType::Normal, *reason, message),
        Verdict::Stalled { reason, message } => (EventType::Warning, *reason, message),
    };
    if was.as_deref() != Some(reason) {
        publish(policy, kind, reason, message.clone(), ctx).await;
    }
}

async fn publish(policy: &ReplicationPolicy, type_: EventType, reason: &str, note: String, ctx: &Context) {
    let event =
        KubeEvent { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish event");
    }
}

/// Deletion: allowed once no server uses the policy. The key Secret stays (data in
/// Blob storage may still need it); its removal is the user's decision.
async fn cleanup(policy: &ReplicationPolicy, ctx: &Context) -> Result<Action> {
    let servers = servers_using(policy, ctx);
    if servers.is_empty() {
        return Ok(Action::await_change());
    }
    let message = format!(
        "deletion waits: still used by ProtectedServer {} (change their spec.policyRef or delete them)",
        servers.join(", ")
    );
    let mut status = policy.status.clone().unwrap_or_default();
    crate::status::set_verdict(
        &mut status.conditions,
        &Verdict::Stalled { reason: "PolicyInUse", message: message.clone() },
        policy.meta().generation,
        &now(),
    );
    patch_status(policy, json!({"conditions": status.conditions}), ctx).await?;
    Err(Error::Blocked(message))
}
