//! When to renew, and how long to wait after a failure.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::*;

const DAY: i64 = 86_400;

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

/// A certificate like the operator's: issued at `issued`, backdated five minutes, 30 days.
fn cert(serial: u8, issued: i64) -> CertFacts {
    CertFacts { serial: vec![serial], not_before: ts(issued - 300), not_after: ts(issued + 30 * DAY) }
}

fn refused(status: u16, reason: &str) -> RegisterError {
    RegisterError::Refused { action: "renewal", status, reason: reason.into(), message: "m".into(), retry_after: None }
}

fn not_ready(retry_after: Option<u64>) -> RegisterError {
    RegisterError::Refused {
        action: "renewal",
        status: 503,
        reason: "NotReady".into(),
        message: "m".into(),
        retry_after,
    }
}

/// `next_step` with at most a failure.
fn step(now: Timestamp, cert: &CertFacts, after: Option<Duration>, failure: Option<&Failure>) -> Step {
    next_step(now, cert, after, &Memory { failure: failure.cloned(), last_renewal: None })
}

#[test]
fn renews_once_half_the_lifetime_has_passed() {
    let c = cert(1, 1_000_000);
    let half = ts(1_000_000 - 300) + SignedDuration::from_secs((30 * DAY + 300) / 2);
    assert_eq!(renew_at(&c, None), half);
    // Day 15 of 30, before the operator supersedes the certificate at day 20.
    let day = |d: i64| ts(1_000_000 + d * DAY);
    assert!(half > day(14) && half < day(15), "{half}");
    assert_eq!(step(day(1), &c, None, None), Step::Wait(half));
    assert_eq!(step(half - SignedDuration::from_secs(1), &c, None, None), Step::Wait(half));
    assert_eq!(step(half, &c, None, None), Step::Renew);
    assert_eq!(step(day(29), &c, None, None), Step::Renew);
    // An expired certificate is still tried (the endpoint answers why it refuses).
    assert_eq!(step(day(31), &c, None, None), Step::Renew);
}

#[test]
fn the_test_override_counts_from_not_before() {
    let c = cert(1, 1_000_000);
    let after = Some(Duration::from_secs(310));
    assert_eq!(renew_at(&c, after), ts(1_000_010));
    assert_eq!(step(ts(1_000_009), &c, after, None), Step::Wait(ts(1_000_010)));
    assert_eq!(step(ts(1_000_010), &c, after, None), Step::Renew);
    assert_eq!(step(ts(1_000_000), &c, Some(Duration::ZERO), None), Step::Renew);
}

#[test]
fn a_failure_delays_only_the_certificate_it_was_made_with() {
    let c = cert(1, 1_000_000);
    let due = renew_at(&c, None);
    let failure = Failure { serial: vec![1], attempts: 1, retry_at: due + SignedDuration::from_secs(5) };
    assert_eq!(step(due, &c, None, Some(&failure)), Step::Wait(failure.retry_at));
    assert_eq!(step(failure.retry_at, &c, None, Some(&failure)), Step::Renew);
    // Registered again meanwhile: the new certificate follows its own schedule.
    let fresh = cert(2, due.as_second());
    assert_eq!(step(due, &fresh, None, Some(&failure)), Step::Wait(renew_at(&fresh, None)));
    // A failure recorded before the due time does not bring renewal forward.
    let early = Failure { serial: vec![1], attempts: 1, retry_at: ts(1_000_000) };
    assert_eq!(step(ts(1_000_001), &c, None, Some(&early)), Step::Wait(due));
}

#[test]
fn a_renewal_is_not_followed_by_another_within_the_minimum_spacing() {
    // A certificate that would be due at once (an override of 0) after a renewal.
    let c = cert(2, 1_000_000);
    let renewed = ts(1_000_000);
    let memory = Memory { failure: None, last_renewal: Some(renewed) };
    let after = Some(Duration::ZERO);
    let spaced = renewed + SignedDuration::from_secs(MIN_SPACING.as_secs() as i64);
    assert_eq!(next_step(ts(1_000_001), &c, after, &memory), Step::Wait(spaced));
    assert_eq!(next_step(spaced, &c, after, &memory), Step::Renew);
    // Normally far longer than the spacing anyway.
    assert_eq!(next_step(ts(1_000_001), &c, None, &memory), Step::Wait(renew_at(&c, None)));
}

#[test]
fn transient_failures_back_off_doubling_up_to_a_cap() {
    let unreachable = RegisterError::Exchange("connecting: refused".into());
    let delays: Vec<u64> = (1..=9).map(|n| retry_delay(&unreachable, n).as_secs()).collect();
    assert_eq!(delays, vec![5, 10, 20, 40, 80, 160, 320, 600, 600]);
    assert_eq!(retry_delay(&unreachable, u32::MAX), MAX_RETRY);
    assert_eq!(backoff(1), FIRST_RETRY);
    assert_eq!(backoff(0), FIRST_RETRY);
    assert_eq!(retry_delay(&not_ready(None), 1), FIRST_RETRY);
    // The endpoint's Retry-After is honoured when longer, within the cap.
    assert_eq!(retry_delay(&not_ready(Some(30)), 1).as_secs(), 30);
    assert_eq!(retry_delay(&not_ready(Some(3)), 2).as_secs(), 10);
    assert_eq!(retry_delay(&not_ready(Some(86_400)), 1), MAX_RETRY);
}

#[test]
fn refusals_wait_an_hour_and_are_labelled_by_reason() {
    for (status, reason) in [(403, "CertificateSuperseded"), (403, "NotRegistered"), (410, "ServerGone")] {
        let e = refused(status, reason);
        assert_eq!(retry_delay(&e, 1), REFUSED_RETRY);
        assert_eq!(failure_reason(&e), reason);
    }
    assert_eq!(retry_delay(&RegisterError::Local("no registrationUrl".into()), 1), REFUSED_RETRY);
    assert_eq!(failure_reason(&RegisterError::Local("x".into())), "Local");
    assert_eq!(failure_reason(&RegisterError::Exchange("x".into())), "Unreachable");
    assert_eq!(failure_reason(&not_ready(None)), "NotReady");
    // A label value never carries what a misbehaving endpoint sent.
    assert_eq!(failure_reason(&refused(403, "Bad\"} 1\nx")), "Bad1x");
    assert_eq!(failure_reason(&refused(403, "\"")), "Unknown");
}

#[test]
fn validity_and_serial_are_read_from_the_certificate() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["db-01".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2026, 11, 1);
    params.not_after = rcgen::date_time_ymd(2026, 12, 1);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&[0x12, 0x34]));
    let pem = params.self_signed(&key).unwrap().pem();
    let facts = cert_facts(&pem).unwrap();
    assert_eq!(facts.not_before, "2026-11-01T00:00:00Z".parse::<Timestamp>().unwrap());
    assert_eq!(facts.not_after, "2026-12-01T00:00:00Z".parse::<Timestamp>().unwrap());
    assert_eq!(facts.serial, vec![0x12, 0x34]);
    assert_eq!(renew_at(&facts, None), "2026-11-16T00:00:00Z".parse::<Timestamp>().unwrap());
    assert!(cert_facts("not a certificate").is_err());
}

#[tokio::test]
async fn nothing_is_asked_for_that_could_not_be_kept() {
    // The token's directory does not exist (a read-only mount fails the same way): the
    // endpoint is never contacted, so the certificate in use is not superseded.
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["db-01".to_owned()]).unwrap().self_signed(&key).unwrap();
    for (name, pem) in [("tls.crt", cert.pem()), ("ca.crt", cert.pem()), ("tls.key", key.serialize_pem())] {
        std::fs::write(dir.path().join(name), pem).unwrap();
    }
    let config: crate::AgentConfig = serde_json::from_value(serde_json::json!({
        "namespace": "prod", "server": "db-01", "disks": [], "processServer": "localhost:9443",
        "clientCert": dir.path().join("tls.crt"), "clientKey": dir.path().join("tls.key"),
        "caBundle": dir.path().join("ca.crt"),
        "kube": {"apiServer": "https://127.0.0.1:1", "token": dir.path().join("gone/token")},
        "registrationUrl": "https://127.0.0.1:1",
    }))
    .unwrap();
    match renew(&config, None).await {
        Err(RegisterError::Local(m)) => assert!(m.contains("gone/token"), "{m}"),
        other => panic!("expected a local error before any exchange: {other:?}"),
    }
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names.len(), 3, "no temporary file left: {names:?}");
}
