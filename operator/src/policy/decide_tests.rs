use super::*;
use siterecovery_api::ConditionStatus;

fn policy(secret_ref: bool) -> ReplicationPolicy {
    let credential = if secret_ref {
        json!({"secretRef": {"name": "storage"}})
    } else {
        json!({"workloadIdentity": {"clientId": "6f1f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b", "tenantId": "72f988bf-86f1-41af-91ab-2d7cd011db47"}})
    };
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ReplicationPolicy",
        "metadata": {"name": "gold", "namespace": "dr", "generation": 4},
        "spec": {
            "rpoThreshold": "5m", "crashConsistentInterval": "30s", "retention": {"window": "24h"},
            "target": {"endpoint": "https://a.blob.core.windows.net", "container": "dr", "credential": credential}
        }
    }))
    .unwrap()
}

fn secret(pairs: &[(&str, &[u8])]) -> Secret {
    Secret {
        data: Some(pairs.iter().map(|(k, v)| (k.to_string(), ByteString(v.to_vec()))).collect()),
        ..Default::default()
    }
}

fn now() -> Time {
    Time("2026-11-27T10:00:00Z".parse().unwrap())
}

fn valid_key(p: &ReplicationPolicy) -> KeyCheck {
    let name = key_secret_name(p);
    KeyCheck { secret: Some(new_key_secret(p, &name, &mut rand::rng(), &now())), name }
}

fn condition(d: &Decision, type_: &str) -> (String, String, String) {
    let c = d.status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == type_).unwrap();
    (c["status"].as_str().unwrap().into(), c["reason"].as_str().unwrap().into(), c["message"].as_str().unwrap().into())
}

#[test]
fn a_missing_key_secret_is_created_first() {
    let p = policy(false);
    let observed = Observed {
        credential: CredentialCheck::WorkloadIdentity,
        key: KeyCheck { name: key_secret_name(&p), secret: None },
        servers: vec![],
        storage: crate::storage::Probe::Reachable,
    };
    let d = decide(&p, &observed, &now());
    assert_eq!(d.create_key_secret.as_deref(), Some("gold-encryption"));
}

#[test]
fn generated_keys_are_valid_and_random() {
    let p = policy(false);
    let a = valid_key(&p);
    let b = valid_key(&p);
    assert!(matches!(check_key(&a), Ok(id) if id.starts_with("20261127-")));
    let data = |k: &KeyCheck| k.secret.as_ref().unwrap().data.clone().unwrap();
    let key_of = |k: &KeyCheck| data(k).into_iter().find(|(n, _)| n.starts_with(KEY_PREFIX)).unwrap().1;
    assert_ne!(key_of(&a), key_of(&b), "two keys must differ");
    assert_eq!(key_of(&a).0.len(), 32);
}

#[test]
fn ready_with_sas_and_key_counts_servers() {
    let p = policy(true);
    let observed = Observed {
        credential: CredentialCheck::Secret {
            name: "storage".into(),
            secret: Some(Box::new(secret(&[("sasToken", b"sv=2024-11-04&ss=b&sig=abc")]))),
        },
        key: valid_key(&p),
        servers: vec!["db-01".into(), "web-01".into()],
        storage: crate::storage::Probe::Reachable,
    };
    let d = decide(&p, &observed, &now());
    assert!(matches!(d.verdict, Verdict::Ready { .. }), "{:?}", d.verdict);
    assert_eq!(d.status["protectedServers"], 2);
    assert_eq!(d.status["observedGeneration"], 4);
    assert!(d.status["activeKeyId"].as_str().unwrap().starts_with("20261127-"));
    let (status, _, message) = condition(&d, "Ready");
    assert_eq!(status, "True");
    assert!(message.contains("SAS token") && message.contains("2 server"), "{message}");
    assert!(!d.status.to_string().contains("sig=abc"), "credentials never reach status");
    assert_eq!(condition(&d, "EncryptionKeyReady").0, "True");
}

#[test]
fn credential_problems_stall_with_the_field_named() {
    let p = policy(true);
    let cases: Vec<(Option<Box<Secret>>, &str)> = vec![
        (None, "spec.target.credential.secretRef: Secret storage not found"),
        (Some(Box::new(secret(&[("sasToken", b"not-a-sas")]))), "is not a SAS token"),
        (
            Some(Box::new(secret(&[("tenantId", b"t"), ("clientId", b"c")]))),
            "missing clientSecret for a service principal",
        ),
        (Some(Box::new(secret(&[("other", b"x")]))), "needs sasToken, or tenantId + clientId + clientSecret"),
    ];
    for (secret, expect) in cases {
        let observed = Observed {
            credential: CredentialCheck::Secret { name: "storage".into(), secret },
            key: valid_key(&p),
            servers: vec![],
            storage: crate::storage::Probe::NotChecked("no SAS".into()),
        };
        let d = decide(&p, &observed, &now());
        match &d.verdict {
            Verdict::Stalled { reason, message } => {
                assert_eq!(*reason, "CredentialInvalid");
                assert!(message.contains(expect), "{message:?} lacks {expect:?}");
            }
            other => panic!("expected Stalled, got {other:?}"),
        }
        let (status, reason, _) = condition(&d, "Stalled");
        assert_eq!((status.as_str(), reason.as_str()), ("True", "CredentialInvalid"));
        assert_eq!(condition(&d, "Ready").0, ConditionStatus::False.to_string_lossy());
    }
}

#[test]
fn a_malformed_key_secret_stalls() {
    let p = policy(false);
    for (pairs, expect) in [
        (vec![("active", b"k1".as_slice()), ("key-k1", b"short".as_slice())], "must hold 32 bytes"),
        (vec![("active", b"k1".as_slice())], "`key-k1` is missing"),
        (vec![("key-k1", [0u8; 32].as_slice())], "no `active` entry"),
    ] {
        let observed = Observed {
            credential: CredentialCheck::WorkloadIdentity,
            key: KeyCheck { name: "gold-encryption".into(), secret: Some(secret(&pairs)) },
            servers: vec![],
            storage: crate::storage::Probe::NotChecked("no SAS".into()),
        };
        let d = decide(&p, &observed, &now());
        assert!(
            matches!(&d.verdict, Verdict::Stalled { reason: "KeyInvalid", message } if message.contains(expect)),
            "{:?}",
            d.verdict
        );
        assert_eq!(condition(&d, "EncryptionKeyReady").0, "False");
    }
}

trait Lossy {
    fn to_string_lossy(&self) -> String;
}
impl Lossy for ConditionStatus {
    fn to_string_lossy(&self) -> String {
        serde_json::to_value(self).unwrap().as_str().unwrap().to_owned()
    }
}

#[test]
fn storage_problems_show_in_the_condition_and_the_verdict() {
    let p = policy(true);
    let observed = |storage| Observed {
        credential: CredentialCheck::Secret {
            name: "storage".into(),
            secret: Some(Box::new(secret(&[("sasToken", b"sv=2024-11-04&ss=b&sig=abc")]))),
        },
        key: valid_key(&p),
        servers: vec![],
        storage,
    };
    use crate::storage::Probe;
    let d = decide(&p, &observed(Probe::Reachable), &now());
    assert_eq!(condition(&d, "StorageReachable").0, "True");
    let refused = Probe::Failed { message: "403 AuthorizationFailure".into(), retryable: false };
    let d = decide(&p, &observed(refused), &now());
    assert!(
        matches!(&d.verdict, Verdict::Stalled { reason: "StorageRefused", message } if message.starts_with("spec.target: https://a.blob.core.windows.net/dr refused"))
    );
    assert_eq!(condition(&d, "StorageReachable").1, "Refused");
    let down = Probe::Failed { message: "connection refused".into(), retryable: true };
    let d = decide(&p, &observed(down), &now());
    assert!(matches!(&d.verdict, Verdict::Progressing { reason: "StorageUnreachable", .. }));
    assert_eq!(condition(&d, "StorageReachable").1, "Unreachable");
}
