//! The operator's own access to a policy's Blob storage target: checking it is
//! reachable, and deleting a server's data. Replication itself never goes through here.

use k8s_openapi::api::core::v1::Secret;
use siterecovery_api::ReplicationPolicy;
use siterecovery_store::AzureBlobBackend;

/// Why the operator cannot reach a target by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// Workload identity: the operator holds no token for it (the process servers do).
    WorkloadIdentity,
    /// The credential Secret is missing or has no SAS token.
    NoSas(String),
}

/// A client for the policy's container, authenticated with the SAS in `secret`.
pub fn backend(policy: &ReplicationPolicy, secret: Option<&Secret>) -> Result<AzureBlobBackend, Unavailable> {
    let target = &policy.spec.target;
    let Some(secret_ref) = &target.credential.secret_ref else {
        return Err(Unavailable::WorkloadIdentity);
    };
    let sas = secret
        .and_then(|s| s.data.as_ref())
        .and_then(|d| siterecovery_store::sas_token(&d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect()))
        .ok_or_else(|| Unavailable::NoSas(format!("Secret {} has no sasToken", secret_ref.name)))?;
    AzureBlobBackend::with_sas(&target.endpoint, &target.container, &sas)
        .map_err(|e| Unavailable::NoSas(format!("spec.target: {e}")))
}

/// Result of probing a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The container exists (or was created) and the credential is accepted.
    Reachable,
    /// Not checked, and why.
    NotChecked(String),
    /// The request failed; `retryable` tells a network blip from a refusal.
    Failed {
        /// What the service said (never the credential).
        message: String,
        /// Whether trying again may help.
        retryable: bool,
    },
}

/// Makes sure the policy's container exists, which also proves the endpoint answers
/// and the credential may write there.
pub async fn probe(policy: &ReplicationPolicy, secret: Option<&Secret>) -> Probe {
    match backend(policy, secret) {
        Err(Unavailable::WorkloadIdentity) => {
            Probe::NotChecked("workload identity: checked by the process servers, not the operator".into())
        }
        Err(Unavailable::NoSas(why)) => Probe::NotChecked(why),
        Ok(backend) => match backend.ensure_container().await {
            Ok(()) => Probe::Reachable,
            Err(e) => Probe::Failed { retryable: e.is_retryable(), message: e.to_string() },
        },
    }
}
