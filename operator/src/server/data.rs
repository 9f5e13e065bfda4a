//! Deleting a server's replicated data when the server is deleted (unless
//! `spec.retainData`), through the same storage target and credential as its policy.

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::EventType;
use siterecovery_api::{ProtectedServer, ReplicationPolicy};
use siterecovery_store::{ServerRef, delete_server_data};
use tracing::info;

use super::Notice;
use crate::context::Context;
use crate::error::{Error, Result};

/// Removes the server's blobs. Returns an event to publish; an error when deletion must
/// wait (storage unreachable, credential refused), with the way out in the message.
pub async fn delete_blobs(server: &ProtectedServer, ctx: &Context) -> Result<Notice> {
    let ns = server.namespace().unwrap_or_default();
    let name = server.name_any();
    let keep_hint = "set spec.retainData: true to delete the server and keep its data";
    let Some(policy) =
        Api::<ReplicationPolicy>::namespaced(ctx.client.clone(), &ns).get_opt(&server.spec.policy_ref.name).await?
    else {
        // Without the policy nothing says where the data is; blocking forever helps no one.
        return Ok(Notice {
            type_: EventType::Warning,
            reason: "DataKept",
            note: format!(
                "ReplicationPolicy {} is gone, so its storage target is unknown: data kept",
                server.spec.policy_ref.name
            ),
        });
    };
    let target = &policy.spec.target;
    let secret = match &target.credential.secret_ref {
        Some(r) => Api::<Secret>::namespaced(ctx.client.clone(), &ns).get_opt(&r.name).await?,
        None => None,
    };
    if let (Some(r), None) = (&target.credential.secret_ref, &secret) {
        // Deleted with the namespace, or by hand: as with a missing policy, nothing can
        // reach the data any more, and blocking would hold the namespace forever.
        return Ok(Notice {
            type_: EventType::Warning,
            reason: "DataKept",
            note: format!(
                "credential Secret {} is gone, so the data cannot be deleted: kept under servers/{ns}/{name}/ in container {}",
                r.name, target.container
            ),
        });
    }
    let backend = match crate::storage::backend(&policy, secret.as_ref(), &ctx.azure) {
        Ok(backend) => backend,
        Err(crate::storage::Unavailable::NoWorkloadIdentity(why)) => {
            // The process servers may hold a token the operator lacks; blocking deletion
            // until someone fixes the operator's identity would hold the namespace.
            return Ok(Notice {
                type_: EventType::Warning,
                reason: "DataKept",
                note: format!(
                    "cannot delete the data with workload identity: {why}; data kept under servers/{ns}/{name}/ in container {}",
                    target.container
                ),
            });
        }
        Err(crate::storage::Unavailable::BadCredential(why)) => {
            return Err(Error::Blocked(format!("cannot delete the server's data: {why}; {keep_hint}")));
        }
    };
    let server_ref = ServerRef::new(ns.as_str(), name.as_str())
        .map_err(|e| Error::Blocked(format!("cannot delete the server's data: {e}; {keep_hint}")))?;
    let deleted = delete_server_data(&backend, &server_ref)
        .await
        .map_err(|e| Error::Blocked(format!("cannot delete the server's data: {e}; {keep_hint}")))?;
    info!(objects = deleted, container = %target.container, "deleted the server's replicated data");
    Ok(Notice {
        type_: EventType::Normal,
        reason: "DataDeleted",
        note: format!("deleted {deleted} object(s) of replicated data from container {}", target.container),
    })
}
