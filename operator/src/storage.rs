//! The operator's own access to a policy's Blob storage target: checking it is
//! reachable, and deleting a server's data. Replication itself never goes through here.

use k8s_openapi::api::core::v1::Secret;
use siterecovery_api::ReplicationPolicy;
use siterecovery_store::AzureBlobBackend;
use siterecovery_store::backend::{AzureConnector, BlobAuth};

/// Why the operator cannot reach a target by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// Workload identity, but the operator's pod has no projected token (the process
    /// servers may well have theirs); the message says how to give it one.
    NoWorkloadIdentity(String),
    /// The credential Secret is missing or holds neither a SAS nor a whole service
    /// principal, or the target does not parse.
    BadCredential(String),
}

impl Unavailable {
    /// The explanation.
    pub fn message(&self) -> &str {
        match self {
            Self::NoWorkloadIdentity(m) | Self::BadCredential(m) => m,
        }
    }
}

/// How the policy authenticates, from its spec and (for a `secretRef`) its Secret.
pub fn auth(policy: &ReplicationPolicy, secret: Option<&Secret>) -> Result<BlobAuth, Unavailable> {
    let credential = &policy.spec.target.credential;
    if let Some(wi) = &credential.workload_identity {
        return Ok(BlobAuth::WorkloadIdentity { tenant_id: wi.tenant_id.clone(), client_id: wi.client_id.clone() });
    }
    let name = credential.secret_ref.as_ref().map_or("", |r| r.name.as_str());
    let data = secret
        .and_then(|s| s.data.as_ref())
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default();
    BlobAuth::from_secret_data(&data).map_err(|why| Unavailable::BadCredential(format!("Secret {name} {why}")))
}

/// A client for the policy's container, authenticated as the policy says: its SAS or
/// service principal (from `secret`), or workload identity through the operator's own
/// projected token.
pub fn backend(
    policy: &ReplicationPolicy,
    secret: Option<&Secret>,
    azure: &AzureConnector,
) -> Result<AzureBlobBackend, Unavailable> {
    let auth = auth(policy, secret)?;
    if matches!(auth, BlobAuth::WorkloadIdentity { .. }) && !azure.has_workload_identity() {
        return Err(Unavailable::NoWorkloadIdentity(
            "the operator's pod has no workload-identity token (AZURE_FEDERATED_TOKEN_FILE is unset): set the chart's \
             workloadIdentity.enabled and federate the operator's ServiceAccount with the same identity"
                .into(),
        ));
    }
    let target = &policy.spec.target;
    azure
        .backend(&target.endpoint, &target.container, &auth)
        .map_err(|e| Unavailable::BadCredential(format!("spec.target: {e}")))
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
pub async fn probe(policy: &ReplicationPolicy, secret: Option<&Secret>, azure: &AzureConnector) -> Probe {
    match backend(policy, secret, azure) {
        Err(Unavailable::NoWorkloadIdentity(why)) => {
            Probe::NotChecked(format!("workload identity is checked by the process servers: {why}"))
        }
        Err(Unavailable::BadCredential(why)) => Probe::NotChecked(why),
        Ok(backend) => match backend.ensure_container().await {
            Ok(()) => Probe::Reachable,
            Err(e) => Probe::Failed { retryable: e.is_retryable(), message: e.to_string() },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use siterecovery_store::backend::AzureEnvironment;

    fn policy(credential: serde_json::Value) -> ReplicationPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "siterecovery.io/v1alpha1", "kind": "ReplicationPolicy",
            "metadata": {"name": "p", "namespace": "dr"},
            "spec": {"rpoThreshold": "5m", "crashConsistentInterval": "30s", "retention": {"window": "24h"}, "target": {"endpoint": "https://acct.blob.core.windows.net", "container": "dr", "credential": credential}}
        }))
        .unwrap()
    }

    fn secret(pairs: &[(&str, &str)]) -> Secret {
        let data = pairs.iter().map(|(k, v)| (k.to_string(), k8s_openapi::ByteString(v.as_bytes().to_vec())));
        Secret { data: Some(data.collect()), ..Default::default() }
    }

    #[test]
    fn every_credential_of_the_policy_is_usable() {
        let wi = policy(serde_json::json!({"workloadIdentity": {"clientId": "c", "tenantId": "t"}}));
        assert_eq!(auth(&wi, None), Ok(BlobAuth::WorkloadIdentity { tenant_id: "t".into(), client_id: "c".into() }));
        let by_secret = policy(serde_json::json!({"secretRef": {"name": "cred"}}));
        let sp = secret(&[("tenantId", "t"), ("clientId", "c"), ("clientSecret", "s")]);
        assert_eq!(auth(&by_secret, Some(&sp)).unwrap().kind(), "service principal");
        let err = auth(&by_secret, Some(&secret(&[("clientId", "c")]))).unwrap_err();
        assert_eq!(err.message(), "Secret cred is missing tenantId, clientSecret for a service principal");
    }

    #[test]
    fn workload_identity_without_the_operator_s_token_is_not_checked_and_says_why() {
        let wi = policy(serde_json::json!({"workloadIdentity": {"clientId": "c", "tenantId": "t"}}));
        let azure = AzureConnector::new(AzureEnvironment::default()).unwrap();
        let err = backend(&wi, None, &azure).unwrap_err();
        assert!(matches!(err, Unavailable::NoWorkloadIdentity(_)), "{err:?}");
        assert!(err.message().contains("workloadIdentity.enabled"), "{err:?}");
        // With a projected token the operator builds the client itself.
        let env = AzureEnvironment {
            federated_token_file: Some("/var/run/secrets/azure/tokens/t".into()),
            ..Default::default()
        };
        let err = backend(&wi, None, &AzureConnector::new(env).unwrap()).err();
        assert!(!matches!(err, Some(Unavailable::NoWorkloadIdentity(_))), "{err:?}");
    }
}
