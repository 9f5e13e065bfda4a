//! Unit tests of the pure decisions: certificate issue and rotation, CA rotation,
//! token hashing, and every way a registration is refused.

use std::time::Duration;

use http::StatusCode;
use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use siterecovery_api::ProtectedServer;

use super::certs::CertInfo;
use super::decide::*;
use super::token::{BootstrapState, BootstrapToken, TOKEN_PREFIX, Usage, hash_token, verify_token};

const DAY: i64 = 24 * 3600;

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn days(d: i64) -> SignedDuration {
    SignedDuration::from_secs(d * DAY)
}

fn cert(not_before: &str, lifetime_days: i64, issuer: &[u8], uris: &[&str]) -> CertInfo {
    let not_before = at(not_before);
    CertInfo {
        not_before,
        not_after: not_before + days(lifetime_days),
        common_name: None,
        dns_names: vec![],
        uris: uris.iter().map(|u| u.to_string()).collect(),
        is_ca: false,
        issuer: issuer.to_vec(),
        subject: b"leaf".to_vec(),
    }
}

#[test]
fn a_30_day_certificate_is_renewed_after_20_days() {
    let c = cert("2026-01-01T00:00:00Z", 30, b"ca", &[]);
    assert_eq!(renew_at(c.not_before, c.not_after), at("2026-01-21T00:00:00Z"));
}

#[test]
fn leaf_decisions() {
    let trusted = [b"ca-1".to_vec(), b"ca-2".to_vec()];
    let uris = ["spiffe://siterecovery.io/ns/a/protectedserver/db".to_owned()];
    let wanted = Wanted { trusted_issuers: &trusted, uris: &uris, dns_names: &[] };
    let good = cert("2026-01-01T00:00:00Z", 30, b"ca-1", &[uris[0].as_str()]);
    let day = |d: i64| at("2026-01-01T00:00:00Z") + days(d);

    assert_eq!(leaf_decision(None, true, &wanted, day(0)), CertDecision::Issue(IssueReason::Missing));
    assert_eq!(leaf_decision(Some(Err(())), true, &wanted, day(0)), CertDecision::Issue(IssueReason::Unreadable));
    let renew_at = day(20);
    assert_eq!(leaf_decision(Some(Ok(&good)), true, &wanted, day(1)), CertDecision::Keep { renew_at });
    assert_eq!(
        leaf_decision(Some(Ok(&good)), true, &wanted, day(20) - SignedDuration::from_secs(1)),
        CertDecision::Keep { renew_at },
        "still a third of the lifetime left"
    );
    assert_eq!(leaf_decision(Some(Ok(&good)), true, &wanted, day(20)), CertDecision::Issue(IssueReason::NearExpiry));
    assert_eq!(leaf_decision(Some(Ok(&good)), true, &wanted, day(45)), CertDecision::Issue(IssueReason::NearExpiry));
    // During a CA rotation the old issuer stays trusted: only the bundle is refreshed.
    let by_old_ca = cert("2026-01-01T00:00:00Z", 30, b"ca-2", &[uris[0].as_str()]);
    assert_eq!(leaf_decision(Some(Ok(&by_old_ca)), false, &wanted, day(1)), CertDecision::UpdateBundle { renew_at });
    let foreign = cert("2026-01-01T00:00:00Z", 30, b"someone-else", &[uris[0].as_str()]);
    assert_eq!(
        leaf_decision(Some(Ok(&foreign)), true, &wanted, day(1)),
        CertDecision::Issue(IssueReason::UntrustedIssuer)
    );
    let renamed = cert("2026-01-01T00:00:00Z", 30, b"ca-1", &["spiffe://siterecovery.io/ns/a/protectedserver/web"]);
    assert_eq!(
        leaf_decision(Some(Ok(&renamed)), true, &wanted, day(1)),
        CertDecision::Issue(IssueReason::NamesChanged)
    );
    assert_eq!(IssueReason::Missing.event_reason(), "CertificateIssued");
    assert_eq!(IssueReason::NearExpiry.event_reason(), "CertificateRotated");
}

#[test]
fn ca_rotation_is_staged_then_promoted() {
    let year = Duration::from_secs(365 * DAY as u64);
    let stage_for = Duration::from_secs(60 * DAY as u64);
    let mut ca = cert("2026-01-01T00:00:00Z", 5 * 365, b"", &[]);
    ca.is_ca = true;
    let rotate_at = ca.not_after - days(365);
    assert_eq!(ca_decision(None, None, year, stage_for, at("2026-01-01T00:00:00Z")), CaDecision::Create);
    assert_eq!(
        ca_decision(Some(&ca), None, year, stage_for, at("2027-01-01T00:00:00Z")),
        CaDecision::Keep { until: rotate_at }
    );
    assert_eq!(ca_decision(Some(&ca), None, year, stage_for, rotate_at), CaDecision::Stage);
    let next = cert("2030-01-01T00:00:00Z", 5 * 365, b"", &[]);
    let promote_at = next.not_before + days(60);
    assert_eq!(
        ca_decision(Some(&ca), Some(&next), year, stage_for, next.not_before + days(1)),
        CaDecision::Keep { until: promote_at }
    );
    assert_eq!(ca_decision(Some(&ca), Some(&next), year, stage_for, promote_at), CaDecision::Promote);
    // Staged too late (operator down for a year): never sign with an expired CA.
    let late = cert("2030-12-30T00:00:00Z", 5 * 365, b"", &[]);
    assert_eq!(ca_decision(Some(&ca), Some(&late), year, stage_for, ca.not_after), CaDecision::Promote);
}

#[test]
fn next_check_is_the_earliest_deadline_ahead_within_resync() {
    let now = at("2026-01-01T00:00:00Z");
    let resync = Duration::from_secs(600);
    let in_secs = |s: i64| Some(now + SignedDuration::from_secs(s));
    assert_eq!(next_check(now, &[in_secs(120), in_secs(60), None], resync), Duration::from_secs(60));
    assert_eq!(next_check(now, &[in_secs(-5), in_secs(7200)], resync), resync, "past deadlines are ignored");
    assert_eq!(next_check(now, &[], resync), resync);
    assert_eq!(
        next_check(now, &[Some(now + SignedDuration::from_millis(10))], resync),
        Duration::from_secs(1),
        "never a busy loop"
    );
}

#[test]
fn tokens_are_random_hashed_and_bound_to_their_server() {
    let a = BootstrapToken::generate();
    let b = BootstrapToken::generate();
    assert_ne!(a, b);
    assert!(a.expose().starts_with(TOKEN_PREFIX) && a.expose().len() == TOKEN_PREFIX.len() + 43, "256 bits");
    assert_eq!(format!("{a:?}"), "BootstrapToken(<redacted>)");
    let hash = hash_token("ns", "db-01", &a);
    assert!(hash.starts_with("sha256:") && hash.len() == 7 + 64);
    assert!(!hash.contains(a.expose()));
    assert_eq!(hash, hash_token("ns", "db-01", &a), "deterministic");
    assert!(verify_token("ns", "db-01", &a, &hash));
    assert!(!verify_token("ns", "db-01", &b, &hash), "another token");
    assert!(!verify_token("ns", "db-02", &a, &hash), "another server");
    assert!(!verify_token("other", "db-01", &a, &hash), "another namespace");
    assert!(!verify_token("ns", "db-01", &a, "sha256:"), "truncated hash");
}

#[test]
fn bootstrap_state_round_trips_through_secret_data() {
    let now = at("2026-01-01T00:00:00Z");
    let mut state = BootstrapState::new("sha256:00".into(), now, Duration::from_secs(DAY as u64));
    assert_eq!(state.expires_at, at("2026-01-02T00:00:00Z"));
    assert_eq!(BootstrapState::from_data(&state.to_data()), Ok(state.clone()));
    assert_eq!(String::from_utf8(state.to_data()["used"].0.clone()).unwrap(), "false");
    state.used = Some(Usage { at: now, hostname: "db-01".into(), machine_id: Some("ab".repeat(16)) });
    assert_eq!(BootstrapState::from_data(&state.to_data()), Ok(state.clone()));
    let mut data = state.to_data();
    data.remove("expiresAt");
    assert_eq!(BootstrapState::from_data(&data), Err("expiresAt missing".into()));
    let mut data = state.to_data();
    data.insert("used".into(), k8s_openapi::ByteString(b"maybe".to_vec()));
    assert!(BootstrapState::from_data(&data).unwrap_err().contains("not true or false"));
}

fn server(machine_id: Option<&str>) -> ProtectedServer {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
        "metadata": {"name": "db-01", "namespace": "ns"},
        "spec": {
            "policyRef": {"name": "gold"},
            "agent": {"hostname": "db-01.example.com", "machineId": machine_id},
            "disks": [{"id": "os", "path": "/dev/sda"}],
            "failoverTarget": {"local": {"directory": "/srv"}}
        }
    }))
    .unwrap()
}

struct Case {
    token: BootstrapToken,
    state: BootstrapState,
    now: Timestamp,
}

fn case() -> Case {
    let token = BootstrapToken::generate();
    let now = at("2026-01-01T12:00:00Z");
    let state = BootstrapState::new(
        hash_token("ns", "db-01", &token),
        at("2026-01-01T00:00:00Z"),
        Duration::from_secs(DAY as u64),
    );
    Case { token, state, now }
}

fn request(token: &BootstrapToken, hostname: &str, machine_id: Option<&str>) -> RegisterRequest {
    RegisterRequest {
        namespace: "ns".into(),
        name: "db-01".into(),
        token: token.clone(),
        hostname: hostname.into(),
        machine_id: machine_id.map(Into::into),
    }
}

#[test]
fn a_valid_token_from_the_right_machine_registers() {
    let c = case();
    let req = request(&c.token, "db-01.example.com", None);
    assert_eq!(check_registration(Some(&server(None)), Some(&c.state), &req, c.now), Ok(()));
    let req = request(&c.token, "DB-01.Example.com", None);
    assert_eq!(check_registration(Some(&server(None)), Some(&c.state), &req, c.now), Ok(()), "host names ignore case");
    let id = "0123456789abcdef0123456789abcdef";
    let req = request(&c.token, "db-01.example.com", Some(id));
    assert_eq!(check_registration(Some(&server(Some(id))), Some(&c.state), &req, c.now), Ok(()));
}

#[test]
fn refusals_carry_status_and_reason() {
    let c = case();
    let s = server(None);
    let ok = request(&c.token, "db-01.example.com", None);
    let check = |server: Option<&ProtectedServer>, state: Option<&BootstrapState>, req: &RegisterRequest, now| {
        let r = check_registration(server, state, req, now).unwrap_err();
        (r.status(), r.reason())
    };
    let invalid = (StatusCode::UNAUTHORIZED, "InvalidToken");
    assert_eq!(check(None, Some(&c.state), &ok, c.now), invalid, "unknown server");
    assert_eq!(check(Some(&s), None, &ok, c.now), invalid, "no token issued");
    let wrong = request(&BootstrapToken::generate(), "db-01.example.com", None);
    assert_eq!(check(Some(&s), Some(&c.state), &wrong, c.now), invalid, "mismatching token");

    let mut used = c.state.clone();
    used.used = Some(Usage { at: c.now, hostname: "db-01.example.com".into(), machine_id: None });
    assert_eq!(check(Some(&s), Some(&used), &ok, c.now), (StatusCode::CONFLICT, "TokenAlreadyUsed"));
    let later = c.state.expires_at + days(1);
    assert_eq!(
        check(Some(&s), Some(&used), &ok, later),
        (StatusCode::CONFLICT, "TokenAlreadyUsed"),
        "used wins over expired"
    );
    assert_eq!(check(Some(&s), Some(&c.state), &ok, c.state.expires_at), (StatusCode::GONE, "TokenExpired"));
    // The state of a token is revealed only to a caller holding it.
    assert_eq!(check(Some(&s), Some(&used), &wrong, c.now), invalid);
    assert_eq!(check(Some(&s), Some(&c.state), &wrong, later), invalid);

    let elsewhere = request(&c.token, "web-01.example.com", None);
    assert_eq!(check(Some(&s), Some(&c.state), &elsewhere, c.now), (StatusCode::FORBIDDEN, "HostnameMismatch"));
    let pinned = server(Some("0123456789abcdef0123456789abcdef"));
    let other_machine = request(&c.token, "db-01.example.com", Some("ffffffffffffffffffffffffffffffff"));
    assert_eq!(
        check(Some(&pinned), Some(&c.state), &other_machine, c.now),
        (StatusCode::FORBIDDEN, "MachineIdMismatch")
    );
    assert_eq!(
        check(Some(&pinned), Some(&c.state), &ok, c.now),
        (StatusCode::FORBIDDEN, "MachineIdMismatch"),
        "missing"
    );
    let mut deleting = s.clone();
    deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(c.now));
    assert_eq!(check(Some(&deleting), Some(&c.state), &ok, c.now), (StatusCode::FORBIDDEN, "ServerDeleting"));
}

#[test]
fn refusal_messages_say_what_to_do_and_never_carry_the_token() {
    let c = case();
    let refusals = [
        Refusal::InvalidToken,
        Refusal::AlreadyUsed { at: c.now, hostname: "db-01".into() },
        Refusal::Expired { at: c.now },
        Refusal::HostnameMismatch { presented: "web".into(), expected: "db-01.example.com".into() },
        Refusal::MachineIdMismatch,
        Refusal::ServerDeleting,
        Refusal::NotReady("the agent ServiceAccount sr-agent-db-01 is not created yet".into()),
        Refusal::Malformed("hostname is not a valid host name".into()),
    ];
    for r in &refusals {
        let m = r.message("sr-bootstrap-db-01");
        assert!(!m.contains(c.token.expose()) && !m.contains(TOKEN_PREFIX), "{m}");
    }
    assert!(refusals[1].message("sr-bootstrap-db-01").contains("delete Secret sr-bootstrap-db-01"));
    assert!(refusals[2].message("sr-bootstrap-db-01").contains("expired at 2026-01-01T12:00:00Z"));
    assert_eq!(refusals[3].message(""), "hostname \"web\" does not match spec.agent.hostname \"db-01.example.com\"");
    assert_eq!(refusals[6].status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[test]
fn malformed_requests_are_refused_before_any_lookup() {
    let token = BootstrapToken::generate();
    let ok = request(&token, "db-01.example.com", None);
    assert_eq!(validate(&ok), Ok(()));
    let bad = |f: &dyn Fn(&mut RegisterRequest)| {
        let mut r = ok.clone();
        f(&mut r);
        validate(&r).unwrap_err()
    };
    assert!(matches!(bad(&|r| r.namespace = "a.b".into()), Refusal::Malformed(m) if m.contains("namespace")));
    assert!(matches!(bad(&|r| r.name = "../etc".into()), Refusal::Malformed(m) if m.contains("name")));
    assert!(matches!(bad(&|r| r.hostname = String::new()), Refusal::Malformed(m) if m.contains("hostname")));
    assert!(
        matches!(bad(&|r| r.token = BootstrapToken::from_plaintext("hunter2")), Refusal::Malformed(m) if m.contains("srbt_"))
    );
    assert!(matches!(bad(&|r| r.machine_id = Some("xyz".into())), Refusal::Malformed(m) if m.contains("machineId")));
    assert_eq!(bad(&|r| r.hostname = "x".repeat(300)).status(), StatusCode::BAD_REQUEST);
}

#[test]
fn durations_parse_like_flags() {
    assert_eq!(super::parse_duration("24h"), Ok(Duration::from_secs(DAY as u64)));
    assert_eq!(super::parse_duration("90m"), Ok(Duration::from_secs(5400)));
    assert!(super::parse_duration("0s").is_err());
    assert!(super::parse_duration("soon").is_err());
}

fn agent_cert(uris: &[&str], not_after: &str) -> CertInfo {
    let mut c = cert("2026-01-01T00:00:00Z", 30, b"ca", uris);
    c.not_after = at(not_after);
    c
}

#[test]
fn a_renewal_is_for_the_agent_its_certificate_names() {
    let now = at("2026-01-15T00:00:00Z");
    let agent = agent_cert(&["spiffe://siterecovery.io/ns/ns/protectedserver/db-01"], "2026-01-31T00:00:00Z");
    assert_eq!(renewal_subject(Some(&agent), now), Ok(("ns".into(), "db-01".into())));
    let refused = |c: Option<&CertInfo>, now| {
        let r = renewal_subject(c, now).unwrap_err();
        (r.status(), r.reason())
    };
    assert_eq!(refused(None, now), (StatusCode::UNAUTHORIZED, "ClientCertificateRequired"));
    let no_agent = agent_cert(&["spiffe://example.org/workload"], "2026-01-31T00:00:00Z");
    assert_eq!(refused(Some(&no_agent), now), (StatusCode::FORBIDDEN, "NotAnAgentCertificate"));
    let malformed = agent_cert(&["spiffe://siterecovery.io/ns/ns/protectedserver/a/b"], "2026-01-31T00:00:00Z");
    assert_eq!(refused(Some(&malformed), now), (StatusCode::FORBIDDEN, "NotAnAgentCertificate"));
    // Verified at the handshake, expired by the time a kept-alive connection asks.
    assert_eq!(refused(Some(&agent), at("2026-01-31T00:00:00Z")), (StatusCode::FORBIDDEN, "NotAnAgentCertificate"));
}

#[test]
fn renewal_needs_a_live_server_an_active_registration_and_the_current_certificate() {
    let c = case();
    let s = server(None);
    let mut used = c.state.clone();
    used.used = Some(Usage { at: c.now, hostname: "db-01.example.com".into(), machine_id: None });
    let ok = RenewalFacts {
        server: Some(&s),
        state: Some(&used),
        presented_der: b"cert-1",
        current_der: Some(b"cert-1"),
        managed: true,
        certificate_secret: "sr-agent-db-01-tls",
    };
    assert_eq!(check_renewal(&ok), Ok(()));
    fn refusal<'a>(mut facts: RenewalFacts<'a>, f: impl FnOnce(&mut RenewalFacts<'a>)) -> (StatusCode, &'static str) {
        f(&mut facts);
        let r = check_renewal(&facts).unwrap_err();
        (r.status(), r.reason())
    }
    assert_eq!(refusal(ok, |f| f.server = None), (StatusCode::GONE, "ServerGone"));
    let mut deleting = s.clone();
    deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(c.now));
    assert_eq!(refusal(ok, |f| f.server = Some(&deleting)), (StatusCode::FORBIDDEN, "ServerDeleting"));
    // The state Secret was deleted (revocation), or replaced by one whose token is unused.
    assert_eq!(refusal(ok, |f| f.state = None), (StatusCode::FORBIDDEN, "NotRegistered"));
    assert_eq!(refusal(ok, |f| f.state = Some(&c.state)), (StatusCode::FORBIDDEN, "NotRegistered"));
    // Renewed already (a copy of the old credentials), or re-issued by the operator.
    assert_eq!(refusal(ok, |f| f.current_der = Some(b"cert-2")), (StatusCode::FORBIDDEN, "CertificateSuperseded"));
    assert_eq!(refusal(ok, |f| f.current_der = None), (StatusCode::FORBIDDEN, "CertificateSuperseded"));
    assert_eq!(refusal(ok, |f| f.managed = false), (StatusCode::FORBIDDEN, "CertificateNotManaged"));
}

#[test]
fn renewal_refusals_say_how_to_revoke() {
    let superseded = Refusal::CertificateSuperseded { certificate_secret: "sr-agent-db-01-tls".into() };
    let m = superseded.message("sr-bootstrap-db-01");
    assert!(m.contains("delete Secrets sr-bootstrap-db-01 and sr-agent-db-01-tls"), "{m}");
    assert!(Refusal::NotRegistered.message("sr-bootstrap-db-01").contains("Secret sr-bootstrap-db-01 was deleted"));
    assert!(Refusal::ClientCertificateRequired.message("").contains("mutual TLS"));
}
