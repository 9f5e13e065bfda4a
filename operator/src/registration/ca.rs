//! The operator CA's Secret (`siterecovery-ca`, type `kubernetes.io/tls`):
//!
//! | key        | content                                                     |
//! |------------|-------------------------------------------------------------|
//! | `tls.crt`  | the CA certificate that signs now                           |
//! | `tls.key`  | its private key (PKCS#8)                                    |
//! | `ca.crt`   | the trust bundle handed out with every certificate          |
//! | `next.crt` | during a rotation: the successor, trusted but not signing   |
//! | `next.key` | its private key                                             |
//!
//! Created with `create` only, so two replicas racing cannot overwrite each other's
//! key; rotated with a `replace` carrying the `resourceVersion` read. A CA Secret the
//! operator did not create (bring your own CA) is used as is and never rotated: a
//! warning is logged when it nears its expiry.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use super::certs::{Ca, KeyedCert};
use super::decide::{CaDecision, ca_decision};
use super::error::Error;
use super::{CA_SECRET, RegistrationConfig};

const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const OPERATOR: &str = "siterecovery-operator";

/// Returns the CA, creating it when absent and moving a rotation along when due.
pub async fn ensure_ca(client: &Client, config: &RegistrationConfig, now: Timestamp) -> Result<Ca, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &config.operator_namespace);
    let secret = match api.get_opt(CA_SECRET).await? {
        Some(secret) => secret,
        None => {
            let ca = Ca::generate(now, config.ca_validity)?;
            match api.create(&PostParams::default(), &ca_secret(&ca, None)).await {
                Ok(_) => {
                    info!(namespace = %config.operator_namespace, not_after = %ca.info.not_after, "created the operator CA");
                    return Ok(ca);
                }
                // Another replica created it first: use theirs.
                Err(kube::Error::Api(s)) if s.code == 409 => api.get(CA_SECRET).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let ca = from_secret(&secret, &config.operator_namespace)?;
    let decision =
        ca_decision(Some(&ca.info), ca.next_info.as_ref(), config.ca_rotate_before, config.ca_stage_for, now);
    let rotated = match decision {
        CaDecision::Keep { .. } | CaDecision::Create => return Ok(ca),
        _ if !managed(&secret) => {
            warn!(not_after = %ca.info.not_after, "the CA in Secret {CA_SECRET} was not created by the operator \
                  and expires soon: replace it (the operator rotates only CAs it created)");
            return Ok(ca);
        }
        CaDecision::Stage => ca.stage(now, config.ca_validity)?,
        CaDecision::Promote => ca.promote(now)?,
    };
    match api.replace(CA_SECRET, &PostParams::default(), &ca_secret(&rotated, Some(&secret))).await {
        Ok(_) => {
            info!(step = ?decision, not_after = %rotated.info.not_after, "rotating the operator CA");
            Ok(rotated)
        }
        // Changed meanwhile (the other replica rotated): take what is there now.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            from_secret(&api.get(CA_SECRET).await?, &config.operator_namespace)
        }
        Err(e) => Err(e.into()),
    }
}

/// The CA as stored, without changing anything (`None` before it is created).
pub async fn load_ca(client: &Client, namespace: &str) -> Result<Option<Ca>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    api.get_opt(CA_SECRET).await?.map(|s| from_secret(&s, namespace)).transpose()
}

/// Reads the CA from its Secret; the error names the Secret and the key at fault.
pub fn from_secret(secret: &Secret, namespace: &str) -> Result<Ca, Error> {
    let corrupt = |problem: String| Error::CorruptSecret { secret: format!("{namespace}/{CA_SECRET}"), problem };
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| -> Result<Option<String>, Error> {
        data.get(key)
            .map(|v| String::from_utf8(v.0.clone()).map_err(|_| corrupt(format!("{key} is not PEM text"))))
            .transpose()
    };
    let required = |key: &str| text(key)?.ok_or_else(|| corrupt(format!("{key} missing")));
    let current = KeyedCert { cert_pem: required("tls.crt")?, key_pem: required("tls.key")? };
    let next = match (text("next.crt")?, text("next.key")?) {
        (Some(cert_pem), Some(key_pem)) => Some(KeyedCert { cert_pem, key_pem }),
        _ => None,
    };
    let bundle = text("ca.crt")?.unwrap_or_else(|| current.cert_pem.clone());
    Ca::from_parts(current, next, bundle).map_err(|e| corrupt(e.to_string()))
}

fn managed(secret: &Secret) -> bool {
    secret.labels().get(MANAGED_BY).is_some_and(|v| v == OPERATOR)
}

/// The CA's Secret; `previous` carries the `resourceVersion` for a compare-and-swap
/// replace and keeps its labels and annotations.
fn ca_secret(ca: &Ca, previous: Option<&Secret>) -> Secret {
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_owned(), ByteString(v.as_bytes().to_vec()));
    };
    put("tls.crt", &ca.current.cert_pem);
    put("tls.key", &ca.current.key_pem);
    put("ca.crt", &ca.bundle_pem);
    if let Some(next) = &ca.next {
        put("next.crt", &next.cert_pem);
        put("next.key", &next.key_pem);
    }
    let mut metadata = previous.map(|p| p.metadata.clone()).unwrap_or_else(|| ObjectMeta {
        name: Some(CA_SECRET.to_owned()),
        labels: Some(BTreeMap::from([
            (MANAGED_BY.to_owned(), OPERATOR.to_owned()),
            ("app.kubernetes.io/component".to_owned(), "ca".to_owned()),
        ])),
        ..Default::default()
    });
    metadata.managed_fields = None;
    metadata
        .annotations
        .get_or_insert_default()
        .insert("siterecovery.io/not-after".into(), ca.info.not_after.to_string());
    Secret { metadata, data: Some(data), type_: Some("kubernetes.io/tls".into()), ..Default::default() }
}
