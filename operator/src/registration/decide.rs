//! Pure decisions of agent registration: when to issue or rotate a certificate, when to
//! rotate the CA, and whether a registration or renewal request is accepted (and if
//! not, which HTTP status and reason answer it). No client, no clock: `now` is an argument.

use std::time::Duration;

use http::StatusCode;
use jiff::{SignedDuration, Timestamp};
use siterecovery_api::ProtectedServer;

use super::certs::CertInfo;
use super::token::{BootstrapState, BootstrapToken, TOKEN_PREFIX, verify_token};

/// What to do about one leaf certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertDecision {
    /// It is fine until `renew_at`.
    Keep {
        /// When it enters the last third of its lifetime.
        renew_at: Timestamp,
    },
    /// It is fine until `renew_at`, but its Secret's `ca.crt` is not the current trust
    /// bundle (a CA rotation is under way): rewrite that key only.
    UpdateBundle {
        /// As for `Keep`.
        renew_at: Timestamp,
    },
    /// Issue a new one (first issue or rotation), for this reason.
    Issue(IssueReason),
}

/// Why a certificate is (re-)issued; the `reason` of the event that says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueReason {
    /// There is none yet.
    Missing,
    /// The Secret does not hold a readable certificate.
    Unreadable,
    /// Issued by a CA that is no longer trusted (the CA Secret was replaced).
    UntrustedIssuer,
    /// Names differ from what it must name.
    NamesChanged,
    /// Within the last third of its lifetime: rotation.
    NearExpiry,
}

impl IssueReason {
    /// Event reason: `CertificateIssued` for a first issue, else `CertificateRotated`.
    pub fn event_reason(self) -> &'static str {
        match self {
            IssueReason::Missing => "CertificateIssued",
            _ => "CertificateRotated",
        }
    }

    /// One line for the event note and logs.
    pub fn describe(self) -> &'static str {
        match self {
            IssueReason::Missing => "no certificate yet",
            IssueReason::Unreadable => "the stored certificate is unreadable",
            IssueReason::UntrustedIssuer => "the stored certificate was issued by a CA no longer trusted",
            IssueReason::NamesChanged => "the stored certificate names something else",
            IssueReason::NearExpiry => "the certificate is within a third of its lifetime of expiry",
        }
    }
}

/// When a certificate valid from `not_before` to `not_after` is renewed: with a third of
/// its lifetime left (10 days of 30), so a failing rotation has days of retries before
/// anything breaks.
pub fn renew_at(not_before: Timestamp, not_after: Timestamp) -> Timestamp {
    let lifetime = not_after.duration_since(not_before);
    not_after.checked_sub(lifetime / 3).unwrap_or(not_before)
}

/// What a leaf certificate must look like.
#[derive(Clone, Debug, Default)]
pub struct Wanted<'a> {
    /// Subject names (DER) of the CAs whose certificates are still trusted.
    pub trusted_issuers: &'a [Vec<u8>],
    /// URIs it must name (exactly).
    pub uris: &'a [String],
    /// DNS names and IP addresses it must name (exactly).
    pub dns_names: &'a [String],
}

/// Decides about a stored leaf certificate. `existing` is `None` when there is none and
/// `Some(Err)` when the Secret holds something unreadable; `bundle_current` says whether
/// the Secret's `ca.crt` is the current trust bundle.
pub fn leaf_decision(
    existing: Option<Result<&CertInfo, ()>>,
    bundle_current: bool,
    wanted: &Wanted<'_>,
    now: Timestamp,
) -> CertDecision {
    let cert = match existing {
        None => return CertDecision::Issue(IssueReason::Missing),
        Some(Err(())) => return CertDecision::Issue(IssueReason::Unreadable),
        Some(Ok(cert)) => cert,
    };
    if !wanted.trusted_issuers.contains(&cert.issuer) {
        return CertDecision::Issue(IssueReason::UntrustedIssuer);
    }
    if !same_set(&cert.uris, wanted.uris) || !same_set(&cert.dns_names, wanted.dns_names) {
        return CertDecision::Issue(IssueReason::NamesChanged);
    }
    let renew_at = renew_at(cert.not_before, cert.not_after);
    if now >= renew_at {
        CertDecision::Issue(IssueReason::NearExpiry)
    } else if !bundle_current {
        CertDecision::UpdateBundle { renew_at }
    } else {
        CertDecision::Keep { renew_at }
    }
}

fn same_set(a: &[String], b: &[String]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// What to do about the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaDecision {
    /// No CA Secret: create one.
    Create,
    /// Nothing to do before `until`.
    Keep {
        /// When to look again (start or end of a rotation).
        until: Timestamp,
    },
    /// Start a rotation: generate a successor and add it to the trust bundle, without
    /// signing with it yet.
    Stage,
    /// End a rotation: the successor has been in every bundle long enough; it signs
    /// from now on, and the old CA stays in the bundle until it expires.
    Promote,
}

/// Decides about the CA. A rotation starts `rotate_before` the signing CA's expiry (a
/// year of five by default) and the successor signs only after `stage_for` (two leaf
/// lifetimes), by when every leaf Secret — and every agent that renewed — holds a
/// bundle that trusts it. The old CA stays trusted until it expires, so certificates
/// it signed keep working until they are renewed.
pub fn ca_decision(
    current: Option<&CertInfo>,
    next: Option<&CertInfo>,
    rotate_before: Duration,
    stage_for: Duration,
    now: Timestamp,
) -> CaDecision {
    let Some(current) = current else { return CaDecision::Create };
    if let Some(next) = next {
        let promote_at = next.not_before.checked_add(SignedDuration::from_secs(stage_for.as_secs() as i64));
        let promote_at = promote_at.unwrap_or(next.not_before);
        // Never keep signing with an expired CA, whatever the staging period says.
        return if now >= promote_at || now >= current.not_after {
            CaDecision::Promote
        } else {
            CaDecision::Keep { until: promote_at }
        };
    }
    let margin = SignedDuration::from_secs(rotate_before.as_secs() as i64);
    let rotate_at = current.not_after.checked_sub(margin).unwrap_or(current.not_before);
    if now >= rotate_at { CaDecision::Stage } else { CaDecision::Keep { until: rotate_at } }
}

/// How long until the next check: the earliest deadline ahead, at most `resync`, at
/// least a second.
pub fn next_check(now: Timestamp, deadlines: &[Option<Timestamp>], resync: Duration) -> Duration {
    deadlines
        .iter()
        .flatten()
        .filter(|d| **d > now)
        .map(|d| d.duration_since(now).unsigned_abs())
        .min()
        .unwrap_or(resync)
        .clamp(Duration::from_secs(1), resync.max(Duration::from_secs(1)))
}

/// A registration request, as parsed from the body of `POST /register`.
#[derive(Clone, Debug)]
pub struct RegisterRequest {
    /// Namespace of the ProtectedServer.
    pub namespace: String,
    /// Name of the ProtectedServer.
    pub name: String,
    /// The bootstrap token (redacted in `Debug`).
    pub token: BootstrapToken,
    /// Host name of the machine the agent runs on.
    pub hostname: String,
    /// Its `/etc/machine-id`, if it has one.
    pub machine_id: Option<String>,
}

/// Why a registration is refused. Every message is safe to return to the caller and
/// to put in an event: none contains a token or key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The body is not a valid request; says what is wrong.
    Malformed(String),
    /// Unknown server, no token issued, or a token that does not match: the same answer
    /// for all three, so a caller learns nothing about which servers exist.
    InvalidToken,
    /// The token was used already.
    AlreadyUsed {
        /// When.
        at: Timestamp,
        /// By which host.
        hostname: String,
    },
    /// The token expired unused.
    Expired {
        /// When.
        at: Timestamp,
    },
    /// The presented host name is not `spec.agent.hostname`.
    HostnameMismatch {
        /// What the agent presented.
        presented: String,
        /// What the spec says.
        expected: String,
    },
    /// `spec.agent.machineId` is set and the request carries another one, or none.
    MachineIdMismatch,
    /// The ProtectedServer is being deleted.
    ServerDeleting,
    /// Something the bundle needs is not issued yet (certificate, ServiceAccount); retry.
    NotReady(String),
    /// Renewal: the connection carried no client certificate.
    ClientCertificateRequired,
    /// Renewal: a certificate from the operator CA that names no agent, or has expired.
    NotAnAgentCertificate(String),
    /// Renewal: the ProtectedServer the certificate names does not exist (any more).
    ServerGone,
    /// Renewal: no registration is active (the state Secret was deleted to revoke the
    /// agent or to issue a new token, and the new token is not used yet).
    NotRegistered,
    /// Renewal: the presented certificate is not the server's current one (renewed or
    /// re-issued since): a copy of old credentials, or an agent whose answer was lost.
    CertificateSuperseded {
        /// The agent certificate Secret, to delete when the agent is to be revoked.
        certificate_secret: String,
    },
    /// Renewal: the agent certificate Secret was not created by the operator (bring your
    /// own), so the operator does not overwrite it.
    CertificateNotManaged {
        /// The Secret.
        certificate_secret: String,
    },
}

impl Refusal {
    /// HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::Malformed(_) => StatusCode::BAD_REQUEST,
            Refusal::InvalidToken => StatusCode::UNAUTHORIZED,
            Refusal::AlreadyUsed { .. } => StatusCode::CONFLICT,
            Refusal::Expired { .. } => StatusCode::GONE,
            Refusal::HostnameMismatch { .. }
            | Refusal::MachineIdMismatch
            | Refusal::ServerDeleting
            | Refusal::NotAnAgentCertificate(_)
            | Refusal::NotRegistered
            | Refusal::CertificateSuperseded { .. }
            | Refusal::CertificateNotManaged { .. } => StatusCode::FORBIDDEN,
            Refusal::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::ClientCertificateRequired => StatusCode::UNAUTHORIZED,
            Refusal::ServerGone => StatusCode::GONE,
        }
    }

    /// CamelCase reason, in the answer's body and in the event.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "MalformedRequest",
            Refusal::InvalidToken => "InvalidToken",
            Refusal::AlreadyUsed { .. } => "TokenAlreadyUsed",
            Refusal::Expired { .. } => "TokenExpired",
            Refusal::HostnameMismatch { .. } => "HostnameMismatch",
            Refusal::MachineIdMismatch => "MachineIdMismatch",
            Refusal::ServerDeleting => "ServerDeleting",
            Refusal::NotReady(_) => "NotReady",
            Refusal::ClientCertificateRequired => "ClientCertificateRequired",
            Refusal::NotAnAgentCertificate(_) => "NotAnAgentCertificate",
            Refusal::ServerGone => "ServerGone",
            Refusal::NotRegistered => "NotRegistered",
            Refusal::CertificateSuperseded { .. } => "CertificateSuperseded",
            Refusal::CertificateNotManaged { .. } => "CertificateNotManaged",
        }
    }

    /// What happened and what to do, for a person. `state_secret` names the Secret to
    /// delete for a new token.
    pub fn message(&self, state_secret: &str) -> String {
        match self {
            Refusal::Malformed(why) => format!("malformed registration request: {why}"),
            Refusal::InvalidToken => "the bootstrap token is not valid for this ProtectedServer".into(),
            Refusal::AlreadyUsed { at, hostname } => format!(
                "the bootstrap token was already used at {at} by {hostname}; delete Secret {state_secret} \
                 to issue a new one (this revokes the registered agent's token)"
            ),
            Refusal::Expired { at } => {
                format!("the bootstrap token expired at {at}; delete Secret {state_secret} to issue a new one")
            }
            Refusal::HostnameMismatch { presented, expected } => {
                format!("hostname {presented:?} does not match spec.agent.hostname {expected:?}")
            }
            Refusal::MachineIdMismatch => "machineId does not match spec.agent.machineId".into(),
            Refusal::ServerDeleting => "the ProtectedServer is being deleted".into(),
            Refusal::NotReady(what) => format!("{what}; retry shortly"),
            Refusal::ClientCertificateRequired => {
                "renewal needs the agent's current client certificate (mutual TLS)".into()
            }
            Refusal::NotAnAgentCertificate(why) => format!("the client certificate {why}"),
            Refusal::ServerGone => "the ProtectedServer named by the client certificate does not exist".into(),
            Refusal::NotRegistered => format!(
                "no agent registration is active for this server (Secret {state_secret} was deleted or its \
                 new token is not used yet); register again with the new bootstrap token"
            ),
            Refusal::CertificateSuperseded { certificate_secret } => format!(
                "the client certificate is not the server's current one (renewed or re-issued since); register \
                 again with a new bootstrap token. If this agent did not renew it, its credentials may have \
                 been copied: delete Secrets {state_secret} and {certificate_secret} to revoke them"
            ),
            Refusal::CertificateNotManaged { certificate_secret } => format!(
                "Secret {certificate_secret} was not created by the operator, which therefore does not renew it"
            ),
        }
    }
}

/// Checks the shape of a request before anything is looked up.
pub fn validate(req: &RegisterRequest) -> Result<(), Refusal> {
    let dns_label = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.'])
    };
    if !dns_label(&req.namespace, 63) || req.namespace.contains('.') {
        return Err(Refusal::Malformed("namespace is not a valid namespace name".into()));
    }
    if !dns_label(&req.name, 253) {
        return Err(Refusal::Malformed("name is not a valid object name".into()));
    }
    if !dns_label(&req.hostname.to_ascii_lowercase(), 253) {
        return Err(Refusal::Malformed("hostname is not a valid host name".into()));
    }
    let token = req.token.expose();
    if !token.starts_with(TOKEN_PREFIX) || token.len() > 128 {
        return Err(Refusal::Malformed(format!("token is not a bootstrap token (they start with {TOKEN_PREFIX})")));
    }
    if let Some(m) = &req.machine_id
        && (m.len() != 32 || !m.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(Refusal::Malformed("machineId is not 32 hexadecimal digits (/etc/machine-id)".into()));
    }
    Ok(())
}

/// Decides a registration: the token must match the stored hash, be unused and
/// unexpired, and the machine must be the one the spec names. The hash is checked
/// first, so nothing about the token's state is revealed to a caller without it.
pub fn check_registration(
    server: Option<&ProtectedServer>,
    state: Option<&BootstrapState>,
    req: &RegisterRequest,
    now: Timestamp,
) -> Result<(), Refusal> {
    let (Some(server), Some(state)) = (server, state) else { return Err(Refusal::InvalidToken) };
    if !verify_token(&req.namespace, &req.name, &req.token, &state.token_hash) {
        return Err(Refusal::InvalidToken);
    }
    if let Some(used) = &state.used {
        return Err(Refusal::AlreadyUsed { at: used.at, hostname: used.hostname.clone() });
    }
    if state.expired(now) {
        return Err(Refusal::Expired { at: state.expires_at });
    }
    if server.metadata.deletion_timestamp.is_some() {
        return Err(Refusal::ServerDeleting);
    }
    let expected = &server.spec.agent.hostname;
    if !req.hostname.eq_ignore_ascii_case(expected) {
        return Err(Refusal::HostnameMismatch { presented: req.hostname.clone(), expected: expected.clone() });
    }
    if let Some(expected) = &server.spec.agent.machine_id
        && req.machine_id.as_deref().map(str::to_ascii_lowercase).as_deref() != Some(expected.as_str())
    {
        return Err(Refusal::MachineIdMismatch);
    }
    Ok(())
}

/// The agent a verified client certificate names, or why it cannot renew: no
/// certificate, one that names no ProtectedServer (a serving certificate of the same
/// CA never gets here: it lacks the client-auth usage), or one that expired after the
/// connection was made.
pub fn renewal_subject(presented: Option<&CertInfo>, now: Timestamp) -> Result<(String, String), Refusal> {
    let cert = presented.ok_or(Refusal::ClientCertificateRequired)?;
    let Some(agent) = cert.uris.iter().find_map(|u| super::certs::agent_from_uri(u)) else {
        return Err(Refusal::NotAnAgentCertificate("names no ProtectedServer".into()));
    };
    if cert.not_after <= now {
        return Err(Refusal::NotAnAgentCertificate(format!("expired at {}", cert.not_after)));
    }
    Ok(agent)
}

/// What a renewal is decided on, read just before (the certificate itself was verified
/// against the CA by TLS and mapped by [`renewal_subject`]).
#[derive(Clone, Copy, Debug)]
pub struct RenewalFacts<'a> {
    /// The ProtectedServer the certificate names, if it exists.
    pub server: Option<&'a ProtectedServer>,
    /// Its bootstrap-token state, if any.
    pub state: Option<&'a BootstrapState>,
    /// DER of the presented leaf certificate.
    pub presented_der: &'a [u8],
    /// DER of the certificate in the agent certificate Secret, if readable.
    pub current_der: Option<&'a [u8]>,
    /// Whether that Secret carries the operator's `managed-by` label.
    pub managed: bool,
    /// Its name, for messages.
    pub certificate_secret: &'a str,
}

/// Decides a renewal. The server must exist and not be going away; a registration must
/// be active (the state Secret the agent's token is bound to was used: deleting it
/// revokes renewal too, not only the token); and the presented certificate must be the
/// one the operator holds now. The last makes a certificate renew at most once: after
/// the agent renews, a copy of its old credentials is refused (and the refusal is an
/// event), and deleting the certificate Secret revokes it for renewal.
pub fn check_renewal(facts: &RenewalFacts<'_>) -> Result<(), Refusal> {
    let server = facts.server.ok_or(Refusal::ServerGone)?;
    if server.metadata.deletion_timestamp.is_some() {
        return Err(Refusal::ServerDeleting);
    }
    if facts.state.is_none_or(|s| s.used.is_none()) {
        return Err(Refusal::NotRegistered);
    }
    let certificate_secret = facts.certificate_secret.to_owned();
    if !facts.managed {
        return Err(Refusal::CertificateNotManaged { certificate_secret });
    }
    if facts.current_der != Some(facts.presented_der) {
        return Err(Refusal::CertificateSuperseded { certificate_secret });
    }
    Ok(())
}
