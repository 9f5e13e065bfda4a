//! The pure part of the policy reconciler: from what was observed, decide the status
//! and whether a key Secret must be created.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use siterecovery_api::ReplicationPolicy;
use siterecovery_api::policy::{PolicyConditionType, ReplicationPolicyStatus};

use super::{ACTIVE_KEY, KEY_PREFIX, POLICY_LABEL};
use crate::status::{Verdict, set_condition, set_verdict};

/// What the reconciler read from the cluster.
pub struct Observed {
    /// The storage credential.
    pub credential: CredentialCheck,
    /// The data-encryption key Secret.
    pub key: KeyCheck,
    /// Names of the ProtectedServers using the policy.
    pub servers: Vec<String>,
    /// Whether the storage target answered.
    pub storage: crate::storage::Probe,
}

/// The storage credential as observed.
pub enum CredentialCheck {
    /// Workload identity: nothing to read here; the process servers' token proves it.
    WorkloadIdentity,
    /// A Secret reference and the Secret, if it exists.
    Secret {
        /// Referenced name.
        name: String,
        /// The Secret.
        secret: Option<Box<Secret>>,
    },
}

/// The key Secret as observed.
pub struct KeyCheck {
    /// Its name.
    pub name: String,
    /// The Secret, if it exists.
    pub secret: Option<Secret>,
}

/// What to do.
pub struct Decision {
    /// Create the key Secret with this name first.
    pub create_key_secret: Option<String>,
    /// Overall verdict.
    pub verdict: Verdict,
    /// The status fields the operator owns, ready for server-side apply.
    pub status: Value,
}

/// Name of the policy's key Secret: the one it names, or `<policy>-encryption`.
pub fn key_secret_name(policy: &ReplicationPolicy) -> String {
    policy.key_secret_name()
}

/// Decides the policy's status. Pure.
pub fn decide(policy: &ReplicationPolicy, observed: &Observed, now: &Time) -> Decision {
    let generation = policy.meta().generation;
    let mut status: ReplicationPolicyStatus = policy.status.clone().unwrap_or_default();
    let key = check_key(&observed.key);
    if let Err(KeyProblem::Missing) = key {
        return Decision {
            create_key_secret: Some(observed.key.name.clone()),
            verdict: Verdict::Progressing { reason: "CreatingKey", message: "creating the data-encryption key".into() },
            status: Value::Null,
        };
    }
    let credential = check_credential(&observed.credential);
    let (key_status, key_reason, key_message, active) = match &key {
        Ok(id) => {
            (True, "KeyAvailable", format!("Secret {} holds active key {id}", observed.key.name), Some(id.clone()))
        }
        Err(KeyProblem::Invalid(why)) => (False, "KeyInvalid", why.clone(), None),
        Err(KeyProblem::Missing) => unreachable!("handled above"),
    };
    use siterecovery_api::ConditionStatus::{False, True};
    set_condition(
        &mut status.conditions,
        PolicyConditionType::EncryptionKeyReady,
        key_status,
        key_reason,
        &key_message,
        generation,
        now,
    );
    use crate::storage::Probe;
    let endpoint = format!("{}/{}", policy.spec.target.endpoint, policy.spec.target.container);
    let (storage_status, storage_reason, storage_message) = match &observed.storage {
        Probe::Reachable => (True, "Reachable", format!("{endpoint} answered and accepted the credential")),
        Probe::NotChecked(why) => (siterecovery_api::ConditionStatus::Unknown, "NotChecked", why.clone()),
        Probe::Failed { message, retryable: true } => (False, "Unreachable", message.clone()),
        Probe::Failed { message, retryable: false } => (False, "Refused", message.clone()),
    };
    set_condition(
        &mut status.conditions,
        PolicyConditionType::StorageReachable,
        storage_status,
        storage_reason,
        &storage_message,
        generation,
        now,
    );
    let verdict = match (&credential, &key) {
        (Err(why), _) => Verdict::Stalled { reason: "CredentialInvalid", message: why.clone() },
        (_, Err(KeyProblem::Invalid(why))) => Verdict::Stalled { reason: "KeyInvalid", message: why.clone() },
        (Ok(_), Ok(_)) if matches!(observed.storage, Probe::Failed { retryable: false, .. }) => Verdict::Stalled {
            reason: "StorageRefused",
            message: format!("spec.target: {endpoint} refused the credential: {storage_message}"),
        },
        (Ok(_), Ok(_)) if matches!(observed.storage, Probe::Failed { retryable: true, .. }) => Verdict::Progressing {
            reason: "StorageUnreachable",
            message: format!("spec.target: {endpoint} does not answer yet: {storage_message}"),
        },
        (Ok(how), Ok(_)) => Verdict::Ready {
            reason: "PolicyReady",
            message: format!("storage credential: {how}; used by {} server(s)", observed.servers.len()),
        },
        (Ok(_), Err(KeyProblem::Missing)) => unreachable!("handled above"),
    };
    set_verdict(&mut status.conditions, &verdict, generation, now);
    let status = json!({
        "observedGeneration": generation,
        "conditions": status.conditions,
        "protectedServers": observed.servers.len(),
        "activeKeyId": active,
        "keySecretName": observed.key.name,
    });
    Decision { create_key_secret: None, verdict, status }
}

enum KeyProblem {
    Missing,
    Invalid(String),
}

/// The active key id, when the Secret is well formed.
fn check_key(key: &KeyCheck) -> Result<String, KeyProblem> {
    let secret = key.secret.as_ref().ok_or(KeyProblem::Missing)?;
    let data = secret.data.clone().unwrap_or_default();
    let name = &key.name;
    let active = data
        .get(ACTIVE_KEY)
        .and_then(|v| String::from_utf8(v.0.clone()).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            KeyProblem::Invalid(format!("key Secret {name} has no `{ACTIVE_KEY}` entry naming the key id"))
        })?;
    let entry = format!("{KEY_PREFIX}{active}");
    match data.get(&entry) {
        Some(bytes) if bytes.0.len() == 32 => Ok(active),
        Some(bytes) => Err(KeyProblem::Invalid(format!(
            "key Secret {name}: `{entry}` must hold 32 bytes (AES-256), it holds {}",
            bytes.0.len()
        ))),
        None => Err(KeyProblem::Invalid(format!(
            "key Secret {name}: `{ACTIVE_KEY}` names {active} but `{entry}` is missing"
        ))),
    }
}

/// How the storage credential authenticates, or what is wrong with it (never the value).
fn check_credential(credential: &CredentialCheck) -> Result<&'static str, String> {
    let (name, secret) = match credential {
        CredentialCheck::WorkloadIdentity => return Ok("workload identity"),
        CredentialCheck::Secret { name, secret } => (name, secret),
    };
    let field = "spec.target.credential.secretRef";
    let secret = secret.as_deref().ok_or_else(|| format!("{field}: Secret {name} not found"))?;
    let data = secret.data.clone().unwrap_or_default();
    let has = |k: &str| data.get(k).is_some_and(|v| !v.0.iter().all(u8::is_ascii_whitespace));
    if has("sasToken") {
        let sas = String::from_utf8_lossy(&data["sasToken"].0).into_owned();
        if !sas.contains("sig=") {
            return Err(format!("{field}: Secret {name} key sasToken is not a SAS token (no `sig=` parameter)"));
        }
        return Ok("SAS token");
    }
    let sp = ["tenantId", "clientId", "clientSecret"];
    match sp.iter().filter(|k| !has(k)).copied().collect::<Vec<_>>() {
        missing if missing.is_empty() => Ok("service principal"),
        missing if missing.len() < sp.len() => {
            Err(format!("{field}: Secret {name} is missing {} for a service principal", missing.join(", ")))
        }
        _ => Err(format!("{field}: Secret {name} needs sasToken, or tenantId + clientId + clientSecret")),
    }
}

/// A new key Secret with one random 256-bit key, active.
pub fn new_key_secret(policy: &ReplicationPolicy, name: &str, rng: &mut impl rand::Rng, now: &Time) -> Secret {
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    let id = format!("{}-{:04x}", now.0.strftime("%Y%m%d"), rng.next_u32() & 0xffff);
    let mut data = BTreeMap::new();
    data.insert(ACTIVE_KEY.to_owned(), ByteString(id.clone().into_bytes()));
    data.insert(format!("{KEY_PREFIX}{id}"), ByteString(key.to_vec()));
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: policy.namespace(),
            labels: Some(BTreeMap::from([
                (POLICY_LABEL.to_owned(), policy.name_any()),
                ("app.kubernetes.io/managed-by".to_owned(), "siterecovery-operator".to_owned()),
            ])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
