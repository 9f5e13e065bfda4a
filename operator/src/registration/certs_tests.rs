//! Unit tests of certificate issuance: what the certificates name, how long they last,
//! who trusts them, and CA rotation.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use tokio_rustls::rustls::pki_types::UnixTime;

use super::certs::*;
use super::tls;

const DAY: u64 = 24 * 3600;

/// Now, whole seconds (certificates carry no fractions).
fn now_s() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap()
}

fn verify(ca_bundle: &str, client_cert_pem: &str, at: Timestamp) -> Result<(), String> {
    let verifier = tls::client_verifier(ca_bundle).map_err(|e| e.to_string())?;
    let chain = tls::certificates(client_cert_pem).map_err(|e| e.to_string())?;
    let now = UnixTime::since_unix_epoch(Duration::from_secs(at.as_second() as u64));
    verifier.verify_client_cert(&chain[0], &[], now).map(|_| ()).map_err(|e| e.to_string())
}

#[test]
fn an_agent_certificate_names_its_server_and_lasts_30_days() {
    let now = now_s();
    let ca = Ca::generate(now, Duration::from_secs(5 * 365 * DAY)).unwrap();
    assert!(ca.info.is_ca);
    assert_eq!(ca.info.not_after.duration_since(now), SignedDuration::from_secs(5 * 365 * DAY as i64));
    let issued = ca.issue_client("prod", "db-01", now, Duration::from_secs(30 * DAY)).unwrap();
    assert!(issued.key_pem.contains("BEGIN PRIVATE KEY"));
    assert!(!format!("{issued:?}").contains("PRIVATE KEY"), "Debug redacts the key");
    let info = parse_pem(issued.cert_pem.as_bytes()).unwrap();
    assert_eq!(info.common_name.as_deref(), Some("siterecovery-agent:prod:db-01"));
    assert_eq!(info.uris, vec!["spiffe://siterecovery.io/ns/prod/protectedserver/db-01".to_owned()]);
    assert!(!info.is_ca);
    assert_eq!(info.issuer, ca.info.subject);
    assert_eq!(info.not_after.duration_since(now), SignedDuration::from_secs(30 * DAY as i64));
    assert!(info.not_before < now, "backdated for clock skew");

    let der = tls::certificates(&issued.cert_pem).unwrap();
    assert_eq!(agent_from_certificate(&der[0]), Some(("prod".into(), "db-01".into())));
    assert_eq!(verify(&ca.bundle_pem, &issued.cert_pem, now), Ok(()));
    let expired = verify(&ca.bundle_pem, &issued.cert_pem, now + SignedDuration::from_secs(31 * DAY as i64));
    assert!(expired.unwrap_err().contains("expired"));
}

#[test]
fn a_certificate_from_another_ca_is_rejected() {
    let now = now_s();
    let ours = Ca::generate(now, Duration::from_secs(365 * DAY)).unwrap();
    let theirs = Ca::generate(now, Duration::from_secs(365 * DAY)).unwrap();
    let forged = theirs.issue_client("prod", "db-01", now, Duration::from_secs(30 * DAY)).unwrap();
    let err = verify(&ours.bundle_pem, &forged.cert_pem, now).unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    // A serving certificate from our CA is not a client certificate either.
    let serving = ours.issue_serving(&["localhost".into()], now, Duration::from_secs(DAY)).unwrap();
    assert!(verify(&ours.bundle_pem, &serving.cert_pem, now).is_err());
}

#[test]
fn process_server_certificates_name_the_headless_service_and_its_pods() {
    let now = now_s();
    let ca = Ca::generate(now, Duration::from_secs(365 * DAY)).unwrap();
    let names = process_server_names("prod", "siterecovery-process-server", "cluster.local");
    let issued = ca.issue_serving(&names, now, Duration::from_secs(30 * DAY)).unwrap();
    let info = parse_pem(issued.cert_pem.as_bytes()).unwrap();
    for n in [
        "siterecovery-process-server.prod.svc",
        "*.siterecovery-process-server.prod.svc",
        "*.siterecovery-process-server.prod.svc.cluster.local",
        "127.0.0.1",
        "::1",
    ] {
        assert!(info.dns_names.contains(&n.to_owned()), "{n} in {:?}", info.dns_names);
    }
    let mut sorted = info.dns_names.clone();
    sorted.sort();
    let mut wanted = names.clone();
    wanted.sort();
    assert_eq!(sorted, wanted, "read back exactly as issued, so no spurious re-issue");
}

#[test]
fn ca_rotation_keeps_the_old_ca_trusted_until_it_expires() {
    let start = Timestamp::now() - SignedDuration::from_secs(4 * 365 * DAY as i64);
    let old = Ca::generate(start, Duration::from_secs(5 * 365 * DAY)).unwrap();
    let now = now_s();
    let by_old = old.issue_client("prod", "db-01", now, Duration::from_secs(30 * DAY)).unwrap();

    let staged = old.stage(now, Duration::from_secs(5 * 365 * DAY)).unwrap();
    assert_eq!(staged.info.subject, old.info.subject, "the old CA still signs while the new one is distributed");
    assert_eq!(split_pem(&staged.bundle_pem).len(), 2);
    let promoted = staged.promote(now).unwrap();
    assert_eq!(Some(promoted.info.subject.clone()), staged.next_info.map(|n| n.subject));
    assert!(promoted.next.is_none());
    let by_new = promoted.issue_client("prod", "db-01", now, Duration::from_secs(30 * DAY)).unwrap();
    assert_eq!(verify(&promoted.bundle_pem, &by_old.cert_pem, now), Ok(()), "old certificates keep working");
    assert_eq!(verify(&promoted.bundle_pem, &by_new.cert_pem, now), Ok(()));
    assert_eq!(
        verify(&staged.bundle_pem, &by_new.cert_pem, now),
        Ok(()),
        "holders of the staged bundle trust the new CA"
    );

    // After the old CA expired, it leaves the bundle at the next rotation.
    let much_later = old.info.not_after + SignedDuration::from_secs(DAY as i64);
    assert_eq!(split_pem(&compose_bundle([promoted.bundle_pem.as_str()], much_later)).len(), 1);
}

#[test]
fn stored_ca_is_reloaded_and_signs() {
    let now = now_s();
    let ca = Ca::generate(now, Duration::from_secs(365 * DAY)).unwrap();
    let reloaded = Ca::from_parts(ca.current.clone(), None, ca.bundle_pem.clone()).unwrap();
    let issued = reloaded.issue_client("a", "b", now, Duration::from_secs(DAY)).unwrap();
    assert_eq!(verify(&ca.bundle_pem, &issued.cert_pem, now), Ok(()));
    let leaf = ca.issue_serving(&["x".into()], now, Duration::from_secs(DAY)).unwrap();
    assert!(Ca::from_parts(leaf, None, ca.bundle_pem.clone()).unwrap_err().to_string().contains("not a CA"));
}

#[test]
fn agent_uris_parse_strictly() {
    assert_eq!(agent_from_uri(&agent_uri("ns", "db")), Some(("ns".into(), "db".into())));
    assert_eq!(agent_from_uri("spiffe://siterecovery.io/ns/a/b/protectedserver/db"), None);
    assert_eq!(agent_from_uri("spiffe://evil.example/ns/a/protectedserver/db"), None);
    assert_eq!(agent_from_uri("spiffe://siterecovery.io/ns//protectedserver/db"), None);
}

#[test]
fn der_round_trips_through_pem() {
    let now = now_s();
    let ca = Ca::generate(now, Duration::from_secs(DAY)).unwrap();
    let der = tls::certificates(&ca.current.cert_pem).unwrap();
    assert_eq!(der_to_pem("CERTIFICATE", &der[0]).trim(), ca.current.cert_pem.trim());
}
