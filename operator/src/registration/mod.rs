//! Agent registration security: ASR's vault registration key and configuration-server
//! passphrase, done the Kubernetes way (protocol and threat model in
//! `docs/agent-registration.md`).
//!
//! - **Operator CA** (`ca.rs`): an ECDSA P-256 CA in the Secret `siterecovery-ca` of the
//!   operator's namespace, created when absent, valid 5 years. A year before it expires
//!   a successor is staged into the trust bundle (`ca.crt`), signs 60 days later, and
//!   the old CA stays trusted until it expires.
//! - **Certificates** (`reconcile.rs`): per ProtectedServer an mTLS client certificate
//!   in `sr-agent-<server>-tls`, and per namespace the process servers' serving
//!   certificate in `siterecovery-process-server-tls`; 30 days, re-issued with a third of
//!   their lifetime left. The decisions are pure (`decide.rs`).
//! - **Bootstrap tokens** (`bootstrap.rs`, `token.rs`): single-use, expiring, stored as
//!   a hash in `sr-bootstrap-<server>`; the plaintext is handed to the admin once in
//!   `sr-bootstrap-<server>-token`, deleted when used or expired.
//! - **`POST /register`** (`endpoint.rs`, `tls.rs`): HTTPS, exchanges a token for the
//!   agent's bundle (ServiceAccount token bound to the state Secret, client certificate
//!   and key, CA bundle, API server URL), exactly once.
//! - **`POST /renew`** (`renewal.rs`): the same endpoint, authenticated by the agent's
//!   current client certificate (mutual TLS): a new certificate (also stored in
//!   `sr-agent-<server>-tls`), the current CA bundle and a fresh ServiceAccount token.

mod bootstrap;
pub mod ca;
pub mod certs;
pub mod decide;
mod endpoint;
mod error;
mod reconcile;
mod renewal;
pub mod tls;
pub mod token;

#[cfg(test)]
mod certs_tests;
#[cfg(test)]
mod decide_tests;

use std::net::SocketAddr;
use std::time::Duration;

pub use endpoint::{RegisterResponse, RegistrationServer, serve_registration};
pub use error::Error;
pub use reconcile::run;

/// The CA Secret, in the operator's namespace.
pub const CA_SECRET: &str = "siterecovery-ca";
/// The process servers' headless Service, in each namespace with ProtectedServers.
pub const PROCESS_SERVER_SERVICE: &str = "siterecovery-process-server";
/// The process servers' serving certificate Secret, one per namespace.
pub const PROCESS_SERVER_TLS_SECRET: &str = "siterecovery-process-server-tls";
/// Field manager of what registration writes into ProtectedServer status
/// (`status.agent.certificateExpiryTime`), distinct from the server reconciler's so the
/// two applies do not remove each other's fields.
pub const FIELD_MANAGER: &str = "siterecovery-operator-registration";
/// Secret type of the bootstrap-token state.
pub const BOOTSTRAP_STATE_TYPE: &str = "siterecovery.io/bootstrap-token-state";
/// Secret type of the plaintext handed to the admin.
pub const BOOTSTRAP_TOKEN_TYPE: &str = "siterecovery.io/bootstrap-token";

/// Object names have at most 253 characters; keep room for prefix and suffix.
fn short(server: &str) -> String {
    server.chars().take(230).collect()
}

/// The agent's client certificate Secret.
pub fn client_tls_secret_name(server: &str) -> String {
    format!("sr-agent-{}-tls", short(server))
}

/// The bootstrap-token state Secret (hash, expiry, used).
pub fn bootstrap_secret_name(server: &str) -> String {
    format!("sr-bootstrap-{}", short(server))
}

/// The Secret holding the plaintext token for the admin, until it is used or expires.
pub fn bootstrap_token_secret_name(server: &str) -> String {
    format!("sr-bootstrap-{}-token", short(server))
}

/// Where agents reach the Kubernetes API, handed to them in the registration bundle.
#[derive(Clone, Debug, Default)]
pub struct ApiServerInfo {
    /// API server URL as seen from the protected servers.
    pub url: String,
    /// PEM CA bundle to verify it with; absent when it has a publicly trusted certificate.
    pub ca_pem: Option<String>,
}

impl ApiServerInfo {
    /// From the operator's own client configuration, with the URL overridden when the
    /// operator reaches the API server by an in-cluster address agents cannot use.
    pub fn from_config(config: &kube::Config, url: Option<String>) -> Self {
        let ca_pem = config
            .root_cert
            .as_ref()
            .map(|ders| ders.iter().map(|d| certs::der_to_pem("CERTIFICATE", d)).collect::<String>())
            .filter(|p| !p.is_empty());
        let url = url.unwrap_or_else(|| config.cluster_url.to_string().trim_end_matches('/').to_owned());
        Self { url, ca_pem }
    }
}

/// Settings of registration: where things live, lifetimes, the endpoint.
#[derive(Clone, Debug)]
pub struct RegistrationConfig {
    /// The operator's namespace, home of the CA Secret.
    pub operator_namespace: String,
    /// Issue certificates and tokens only for ProtectedServers of this namespace.
    pub watch_namespace: Option<String>,
    /// Address of `POST /register`; loopback by default, exposed on purpose only.
    pub listen_addr: SocketAddr,
    /// DNS names and IP addresses of the endpoint's serving certificate.
    pub serving_names: Vec<String>,
    /// The URL agents register at, written next to the token for the admin when known.
    pub registration_url: Option<String>,
    /// The API server, as handed to agents.
    pub api_server: ApiServerInfo,
    /// Lifetime of a bootstrap token.
    pub bootstrap_token_ttl: Duration,
    /// Requested lifetime of the agent's ServiceAccount token (the API server may cap it).
    pub agent_token_ttl: Duration,
    /// Lifetime of client and serving certificates.
    pub leaf_validity: Duration,
    /// Lifetime of the CA.
    pub ca_validity: Duration,
    /// A CA rotation starts this long before the signing CA expires.
    pub ca_rotate_before: Duration,
    /// How long a new CA is only distributed (in every trust bundle) before it signs.
    pub ca_stage_for: Duration,
    /// Cluster DNS domain, for the process servers' names.
    pub cluster_domain: String,
    /// Every server is re-checked at least this often (catches Secrets edited or
    /// deleted by hand; rotations are scheduled precisely anyway).
    pub resync: Duration,
    /// Servers reconciled at once. Bounded: hundreds of servers applied together would
    /// otherwise send hundreds of concurrent requests, which the API server answers
    /// with 429 (measured by `make bench`).
    pub concurrency: u16,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

impl RegistrationConfig {
    /// Defaults: 24 h tokens, 30-day certificates, a 5-year CA rotated a year before
    /// expiry, the endpoint on `127.0.0.1:9444`.
    pub fn new(operator_namespace: impl Into<String>, api_server: ApiServerInfo) -> Self {
        let operator_namespace = operator_namespace.into();
        let serving_names = vec![
            "localhost".into(),
            "127.0.0.1".into(),
            format!("siterecovery-operator.{operator_namespace}.svc"),
            format!("siterecovery-operator.{operator_namespace}.svc.cluster.local"),
        ];
        Self {
            operator_namespace,
            watch_namespace: None,
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 9444)),
            serving_names,
            registration_url: None,
            api_server,
            bootstrap_token_ttl: DAY,
            agent_token_ttl: 30 * DAY,
            leaf_validity: 30 * DAY,
            ca_validity: 5 * 365 * DAY,
            ca_rotate_before: 365 * DAY,
            ca_stage_for: 60 * DAY,
            cluster_domain: "cluster.local".into(),
            resync: Duration::from_secs(600),
            concurrency: 8,
        }
    }
}

/// Parses a duration flag such as `24h`, `90m` or `7d` (for clap's `value_parser`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = text.trim().parse().map_err(|e| format!("{text:?} is not a duration: {e}"))?;
    let d = d.unsigned_abs();
    if d.is_zero() { Err(format!("{text:?}: must be longer than zero")) } else { Ok(d) }
}
