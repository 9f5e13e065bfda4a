//! Renewal of the agent's credentials before its client certificate expires (30 days):
//! `POST /renew` at the registration endpoint, authenticated by the current client
//! certificate (mutual TLS), answered with a new certificate and key, the current trust
//! bundle and a fresh ServiceAccount token (docs/agent-registration.md). The files are
//! replaced in place (`register::write_credentials`), so the next process-server
//! connection ([`ClientTls`]) and the status reporter (which re-reads its token file)
//! use them without a restart.
//!
//! [`Renewer`] runs beside replication in `siterecovery-agent run`; `siterecovery-agent
//! renew` calls [`renew`] once. When to renew is decided by [`next_step`] and
//! [`retry_delay`], which are pure and unit-tested.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use siterecovery_wire::tls::agent_config;
use tokio::sync::watch;
use tokio_rustls::rustls::ClientConfig;

use crate::AgentConfig;
use crate::register::{self, Bundle, CredentialFiles, Identity, RegisterError};

/// Renew this many seconds after the certificate's notBefore instead of at half its
/// lifetime. For tests and drills only: the operator backdates certificates by five
/// minutes and cannot issue lifetimes short enough to watch a renewal happen.
pub const RENEW_AFTER_ENV: &str = "SR_AGENT_RENEW_AFTER";
/// First pause after a transient failure (503, endpoint unreachable); doubled per
/// failure up to [`MAX_RETRY`].
pub const FIRST_RETRY: Duration = Duration::from_secs(5);
/// Longest pause between attempts after transient failures.
pub const MAX_RETRY: Duration = Duration::from_secs(10 * 60);
/// Pause after a refusal (superseded certificate, revoked registration, …): it will not
/// go away by itself, but an hourly attempt keeps the Warning event visible, and a new
/// certificate on disk (registered again) is tried at once.
pub const REFUSED_RETRY: Duration = Duration::from_secs(3600);
/// Least time between two renewals by one agent, whatever the certificates say (a
/// certificate renewed at once again would otherwise renew in a loop).
pub const MIN_SPACING: Duration = Duration::from_secs(30);
/// How often the certificate file is looked at while waiting (a re-registration or a
/// `siterecovery-agent renew` replaces it).
const POLL: Duration = Duration::from_secs(10);

/// What the renewal decisions need to know about a client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertFacts {
    /// Serial number: tells one certificate from the next.
    pub serial: Vec<u8>,
    /// Start of validity.
    pub not_before: Timestamp,
    /// End of validity.
    pub not_after: Timestamp,
}

/// Reads serial and validity of the first certificate in `pem`.
pub fn cert_facts(pem: &str) -> Result<CertFacts, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| format!("certificate PEM: {e}"))?;
    let cert = block.parse_x509().map_err(|e| format!("certificate: {e}"))?;
    let at = |t: i64| Timestamp::from_second(t).map_err(|e| format!("certificate validity: {e}"));
    Ok(CertFacts {
        serial: cert.raw_serial().to_vec(),
        not_before: at(cert.validity().not_before.timestamp())?,
        not_after: at(cert.validity().not_after.timestamp())?,
    })
}

/// When a certificate is renewed: once half its lifetime has passed (day 15 of 30,
/// leaving five days before the operator supersedes it at day 20), or `after` past its
/// notBefore when overridden for a test.
pub fn renew_at(cert: &CertFacts, after: Option<Duration>) -> Timestamp {
    let offset = match after {
        Some(a) => SignedDuration::try_from(a).unwrap_or(SignedDuration::MAX),
        None => cert.not_after.duration_since(cert.not_before) / 2,
    };
    cert.not_before.checked_add(offset).unwrap_or(cert.not_after)
}

/// A failed attempt, remembered for the certificate it was made with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Serial of the certificate presented.
    pub serial: Vec<u8>,
    /// Failures in a row with that certificate.
    pub attempts: u32,
    /// Not before this time again.
    pub retry_at: Timestamp,
}

/// What the renewal task does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Renew now.
    Renew,
    /// Nothing to do before this time.
    Wait(Timestamp),
}

/// What the renewal task remembers between attempts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// The last failed attempt.
    pub failure: Option<Failure>,
    /// When this process last renewed.
    pub last_renewal: Option<Timestamp>,
}

/// Decides, at `now`, about the certificate on disk. A failure only delays the
/// certificate it was made with: a new one (registered again) starts afresh.
pub fn next_step(now: Timestamp, cert: &CertFacts, after: Option<Duration>, memory: &Memory) -> Step {
    let mut due = renew_at(cert, after);
    if let Some(f) = memory.failure.as_ref().filter(|f| f.serial == cert.serial) {
        due = due.max(f.retry_at);
    }
    if let Some(last) = memory.last_renewal {
        due = due.max(last.checked_add(signed(MIN_SPACING)).unwrap_or(last));
    }
    if now >= due { Step::Renew } else { Step::Wait(due) }
}

fn signed(d: Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

/// Doubling from [`FIRST_RETRY`] with each of `attempts` failures in a row, up to
/// [`MAX_RETRY`].
pub fn backoff(attempts: u32) -> Duration {
    FIRST_RETRY.saturating_mul(1 << attempts.saturating_sub(1).min(16)).min(MAX_RETRY)
}

/// The pause after the `attempts`-th failure in a row: [`backoff`] while trying again
/// can help (at least what the endpoint's `Retry-After` asks), [`REFUSED_RETRY`] after a
/// refusal.
pub fn retry_delay(error: &RegisterError, attempts: u32) -> Duration {
    if !error.retryable() {
        return REFUSED_RETRY;
    }
    let doubled = backoff(attempts);
    let asked = match error {
        RegisterError::Refused { retry_after: Some(s), .. } => Duration::from_secs(*s).min(MAX_RETRY),
        _ => Duration::ZERO,
    };
    doubled.max(asked)
}

/// The reason of a failure, as a metric label: the endpoint's reason for a refusal
/// (`CertificateSuperseded`, `NotRegistered`, `NotReady`, …), `Unreachable` when the
/// exchange failed, `Local` for local files or settings.
pub fn failure_reason(error: &RegisterError) -> String {
    match error {
        RegisterError::Refused { reason, .. } => {
            let clean: String = reason.chars().filter(char::is_ascii_alphanumeric).take(64).collect();
            if clean.is_empty() { "Unknown".into() } else { clean }
        }
        RegisterError::Exchange(_) => "Unreachable".into(),
        RegisterError::Local(_) => "Local".into(),
    }
}

/// What renewal has done, for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct RenewalStatus {
    /// When the client certificate on disk expires.
    pub not_after: Option<Timestamp>,
    /// When it is (or was) due for renewal.
    pub renew_at: Option<Timestamp>,
    /// Successful renewals.
    pub renewals: u64,
    /// Failed attempts by reason (see [`failure_reason`]).
    pub failures: BTreeMap<String, u64>,
    /// The last attempt was refused: trying again will not help; the agent must be
    /// registered again before its certificate expires.
    pub refused: bool,
}

/// Renews now with the credentials `config` names, at `url` or the configuration's
/// `registrationUrl`, and writes the new ones in their place. Returns the new bundle.
pub async fn renew(config: &AgentConfig, url: Option<&str>) -> Result<Bundle, RegisterError> {
    let bundle = request(config, url).await?;
    store(config, &bundle)?;
    Ok(bundle)
}

/// Writes a renewed bundle into the files `config` names.
pub fn store(config: &AgentConfig, bundle: &Bundle) -> Result<(), RegisterError> {
    register::write_credentials(&CredentialFiles::of(config), bundle)
}

/// `POST /renew` with the credentials `config` names, once it is sure it can replace
/// them; writes nothing.
pub async fn request(config: &AgentConfig, url: Option<&str>) -> Result<Bundle, RegisterError> {
    let url = url.or(config.registration_url.as_deref()).ok_or_else(|| {
        RegisterError::Local(
            "agent.json has no registrationUrl (written by an older register): add the operator's \
             registration endpoint, e.g. \"registrationUrl\": \"https://operator.example.com:9444\""
                .into(),
        )
    })?;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| RegisterError::Local(format!("reading {}: {e}", p.display())))
    };
    let (ca, cert, key) = (read(&config.ca_bundle)?, read(&config.client_cert)?, read(&config.client_key)?);
    register::check_writable(&CredentialFiles::of(config))?;
    let bundle = register::renew(url, &ca, Identity { cert_pem: &cert, key_pem: &key }).await?;
    if (bundle.namespace.as_str(), bundle.name.as_str()) != (config.namespace.as_str(), config.server.as_str()) {
        return Err(RegisterError::Exchange(format!(
            "the renewal answer names {}/{}, not {}/{}: nothing written",
            bundle.namespace, bundle.name, config.namespace, config.server
        )));
    }
    Ok(bundle)
}

/// The background renewal of `siterecovery-agent run`.
pub struct Renewer {
    config: AgentConfig,
    after: Option<Duration>,
    status: Arc<Mutex<RenewalStatus>>,
    memory: Memory,
    /// A renewal whose answer could not be written (a full disk, say), with the serial
    /// it was renewed from: the certificate on disk is superseded by it, so it is written
    /// again rather than lost.
    unwritten: Option<(Vec<u8>, Bundle)>,
}

impl Renewer {
    /// A renewer for the credentials `config` names, reporting into `status`; reads
    /// [`RENEW_AFTER_ENV`].
    pub fn new(config: AgentConfig, status: Arc<Mutex<RenewalStatus>>) -> Self {
        let after = std::env::var(RENEW_AFTER_ENV).ok().and_then(|v| {
            let seconds = v.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0);
            if seconds.is_none() {
                tracing::warn!(value = %v, "{RENEW_AFTER_ENV} is not a number of seconds; ignored");
            }
            seconds.map(Duration::from_secs_f64)
        });
        if let Some(a) = after {
            tracing::warn!(after = ?a, "{RENEW_AFTER_ENV} is set: renewing that long after notBefore (tests only)");
        }
        Self { config, after, status, memory: Memory::default(), unwritten: None }
    }

    fn update(&self, f: impl FnOnce(&mut RenewalStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Renews whenever due until `shutdown` turns true. Never ends replication: every
    /// failure is logged, counted and retried, and the old certificate stays in use
    /// until a renewal succeeds.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        if self.config.registration_url.is_none() {
            tracing::warn!(
                "agent.json has no registrationUrl: the client certificate cannot be renewed automatically \
                 (add it, or register again)"
            );
        }
        while !*shutdown.borrow() {
            let now = Timestamp::now();
            let until = match std::fs::read_to_string(&self.config.client_cert).map_err(|e| e.to_string()) {
                Ok(pem) => match cert_facts(&pem) {
                    Ok(cert) => {
                        let step = next_step(now, &cert, self.after, &self.memory);
                        // A refusal concerns the certificate it was made with: once another is
                        // on disk (registered again, renewed by `renew`), it no longer holds.
                        let refused_this = self.memory.failure.as_ref().is_some_and(|f| f.serial == cert.serial);
                        self.update(|s| {
                            s.not_after = Some(cert.not_after);
                            s.renew_at = Some(renew_at(&cert, self.after));
                            s.refused &= refused_this;
                        });
                        match step {
                            Step::Renew => {
                                self.attempt(&cert).await;
                                continue;
                            }
                            Step::Wait(t) => t,
                        }
                    }
                    Err(e) => {
                        let file = self.config.client_cert.display();
                        tracing::warn!(%file, error = %e, "cannot read the client certificate's validity");
                        now
                    }
                },
                Err(e) => {
                    let file = self.config.client_cert.display();
                    tracing::warn!(%file, error = %e, "cannot read the client certificate");
                    now
                }
            };
            let pause = if until > now { until.duration_since(now).unsigned_abs().min(POLL) } else { POLL };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                changed = shutdown.changed() => if changed.is_err() { return },
            }
        }
    }

    /// One renewal with `cert` (the certificate on disk).
    async fn attempt(&mut self, cert: &CertFacts) {
        let server = format!("{}/{}", self.config.namespace, self.config.server);
        let result = match self.unwritten.take().filter(|(serial, _)| *serial == cert.serial) {
            Some((_, bundle)) => Ok(bundle),
            None => request(&self.config, None).await,
        };
        let result = result.and_then(|bundle| match store(&self.config, &bundle) {
            Ok(()) => Ok(bundle),
            Err(e) => {
                self.unwritten = Some((cert.serial.clone(), bundle));
                Err(e)
            }
        });
        let e = match result {
            Ok(bundle) => {
                let expiry =
                    cert_facts(&bundle.client_certificate).map(|c| c.not_after.to_string()).unwrap_or_default();
                tracing::info!(%server, previous_expiry = %cert.not_after, new_expiry = %expiry,
                    "client certificate renewed; the next process-server connection uses it");
                self.update(|s| {
                    s.renewals += 1;
                    s.refused = false;
                });
                self.memory = Memory { failure: None, last_renewal: Some(Timestamp::now()) };
                return;
            }
            Err(e) => e,
        };
        let previous = self.memory.failure.take().filter(|f| f.serial == cert.serial);
        let attempts = previous.map_or(0, |f| f.attempts) + 1;
        let reason = failure_reason(&e);
        // Errors carry the endpoint's reason and message or a local cause, never a key
        // or a token.
        let (delay, refused) = if self.unwritten.is_some() {
            let delay = backoff(attempts);
            tracing::error!(%server, error = %e, retry_in = ?delay,
                "renewed, but the new credentials could not be written; the certificate on disk is \
                 superseded: retrying the write");
            (delay, false)
        } else if e.retryable() {
            let delay = retry_delay(&e, attempts);
            tracing::warn!(%server, %reason, error = %e, retry_in = ?delay, expires = %cert.not_after,
                "certificate renewal failed; retrying");
            (delay, false)
        } else {
            let delay = retry_delay(&e, attempts);
            tracing::error!(%server, %reason, error = %e, retry_in = ?delay, expires = %cert.not_after,
                "certificate renewal refused; replication goes on with the current certificate until it \
                 expires: register this server again with a new bootstrap token");
            (delay, true)
        };
        self.update(|s| {
            *s.failures.entry(reason).or_default() += 1;
            s.refused = refused;
        });
        let retry_at = Timestamp::now().checked_add(signed(delay)).unwrap_or(cert.not_after);
        self.memory.failure = Some(Failure { serial: cert.serial.clone(), attempts, retry_at });
    }
}

/// The agent's TLS client configuration for process servers, rebuilt from its files
/// when they change (a renewal, a re-registration); a set that does not load (caught
/// between two renames, say) leaves the last good one in use.
pub struct ClientTls {
    files: [PathBuf; 3],
    /// The file contents the configuration was built from.
    loaded: [String; 3],
    config: Arc<ClientConfig>,
}

impl ClientTls {
    /// Loads the CA bundle, client certificate and key `config` names.
    pub fn load(config: &AgentConfig) -> anyhow::Result<Self> {
        let files = [config.ca_bundle.clone(), config.client_cert.clone(), config.client_key.clone()];
        let loaded = read_all(&files)?;
        let tls = agent_config(&loaded[0], &loaded[1], &loaded[2])?;
        Ok(Self { files, loaded, config: tls })
    }

    /// The configuration for the next connection, from the files as they are now.
    pub fn current(&mut self) -> Arc<ClientConfig> {
        match read_all(&self.files) {
            Ok(now) if now != self.loaded => match agent_config(&now[0], &now[1], &now[2]) {
                Ok(tls) => {
                    tracing::info!(cert = %self.files[1].display(), "connecting with the renewed client certificate");
                    self.config = tls;
                    self.loaded = now;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "credential files changed but do not load; keeping the last good ones")
                }
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "keeping the last good credentials"),
        }
        self.config.clone()
    }
}

fn read_all(files: &[PathBuf; 3]) -> anyhow::Result<[String; 3]> {
    let r = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()));
    Ok([r(&files[0])?, r(&files[1])?, r(&files[2])?])
}

#[cfg(test)]
#[path = "renew_tests.rs"]
mod tests;
