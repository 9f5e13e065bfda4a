//! `siterecovery-agent register`: trades a bootstrap token for the agent's credentials at
//! the operator's registration endpoint (`POST /register`, docs/agent-registration.md)
//! and writes them, with an `agent.json`, into a directory. The exchange and the writing
//! of the credentials are shared with renewal (`crate::renew`, `POST /renew`).

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use siterecovery_wire::tls::{provider, root_store};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::report::KubeConfig;
use crate::{AgentConfig, DiskConfig};

/// Port of process servers when the bundle names none.
pub const PROCESS_SERVER_PORT: u16 = 9443;
/// Largest answer accepted from the endpoint.
const MAX_RESPONSE: usize = 1024 * 1024;
/// The whole exchange (connect, TLS, request, answer).
const TIMEOUT: Duration = Duration::from_secs(60);

/// The registration request (`application/json`; the endpoint refuses unknown fields).
#[derive(Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterRequest {
    /// Namespace of the ProtectedServer.
    pub namespace: String,
    /// Name of the ProtectedServer.
    pub name: String,
    /// The bootstrap token (`srbt_…`).
    pub token: String,
    /// This machine's host name (must equal `spec.agent.hostname`).
    pub hostname: String,
    /// This machine's `/etc/machine-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
}

impl std::fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .field("hostname", &self.hostname)
            .field("machine_id", &self.machine_id)
            .finish()
    }
}

/// The registration answer: the agent's credentials.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    /// Namespace of the ProtectedServer.
    pub namespace: String,
    /// Name of the ProtectedServer.
    pub name: String,
    /// API server URL.
    pub api_server: String,
    /// PEM CA bundle of the API server, when it is not publicly trusted.
    #[serde(default)]
    pub api_server_ca: Option<String>,
    /// ServiceAccount token.
    pub token: String,
    /// PEM client certificate for mTLS to process servers.
    pub client_certificate: String,
    /// Its PEM private key.
    pub client_key: String,
    /// When the client certificate expires.
    #[serde(default)]
    pub client_certificate_expiry_time: Option<String>,
    /// PEM bundle of the operator CA.
    pub ca_bundle: String,
    /// DNS name (optionally with port) of the namespace's process servers.
    pub process_server: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("api_server", &self.api_server)
            .field("process_server", &self.process_server)
            .field("token", &"<redacted>")
            .field("client_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The endpoint refused, with its reason and message.
    #[error("{action} refused (HTTP {status} {reason}): {message}")]
    Refused {
        /// What was refused: `registration` or `renewal`.
        action: &'static str,
        /// HTTP status.
        status: u16,
        /// The refusal's reason (`TokenAlreadyUsed`, …).
        reason: String,
        /// What happened and what to do.
        message: String,
        /// Seconds to wait before retrying (503 `NotReady`).
        retry_after: Option<u64>,
    },
    /// Bad arguments or local files.
    #[error("{0}")]
    Local(String),
    /// Connecting, TLS or HTTP failed, or the answer was not understood.
    #[error("{0}")]
    Exchange(String),
}

impl RegisterError {
    /// Whether trying again later can help (the endpoint was not ready or unreachable).
    pub fn retryable(&self) -> bool {
        matches!(self, RegisterError::Refused { status: 503, .. } | RegisterError::Exchange(_))
    }
}

fn local(what: impl std::fmt::Display) -> RegisterError {
    RegisterError::Local(what.to_string())
}

fn exchange_error(what: impl std::fmt::Display) -> RegisterError {
    RegisterError::Exchange(what.to_string())
}

/// A client certificate and key (PEM) presented to the endpoint (mutual TLS).
#[derive(Clone, Copy)]
pub struct Identity<'a> {
    /// The certificate (chain).
    pub cert_pem: &'a str,
    /// Its private key.
    pub key_pem: &'a str,
}

/// One exchange with the registration endpoint.
struct Call<'a> {
    url: &'a str,
    /// `register` or `renew`.
    path: &'static str,
    /// `registration` or `renewal`, for messages.
    action: &'static str,
    /// Where the trust for the endpoint came from, for the hint on a TLS failure.
    trust: &'static str,
    ca_pem: &'a str,
    identity: Option<Identity<'a>>,
    body: Vec<u8>,
}

/// `POST <url>/register` with `request`, verifying the endpoint with `ca_pem` only.
pub async fn register(url: &str, ca_pem: &str, request: &RegisterRequest) -> Result<Bundle, RegisterError> {
    let body = serde_json::to_vec(request).map_err(local)?;
    let call = Call { url, path: "register", action: "registration", trust: "--ca", ca_pem, identity: None, body };
    exchange(call).await
}

/// `POST <url>/renew`, presenting `identity` (the current client certificate) and
/// verifying the endpoint with `ca_pem` (the operator CA bundle) only.
pub async fn renew(url: &str, ca_pem: &str, identity: Identity<'_>) -> Result<Bundle, RegisterError> {
    let call = Call {
        url,
        path: "renew",
        action: "renewal",
        trust: "the CA bundle",
        ca_pem,
        identity: Some(identity),
        body: b"{}".to_vec(),
    };
    exchange(call).await
}

async fn exchange(call: Call<'_>) -> Result<Bundle, RegisterError> {
    let url = call.url.to_owned();
    tokio::time::timeout(TIMEOUT, post(call))
        .await
        .map_err(|_| exchange_error(format!("no answer from {url} within {} s", TIMEOUT.as_secs())))?
}

async fn post(call: Call<'_>) -> Result<Bundle, RegisterError> {
    let url = call.url;
    let uri: http::Uri = url.parse().map_err(|e| local(format!("endpoint URL {url}: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(local(format!("endpoint URL {url}: registration needs https://")));
    }
    let host = uri.host().ok_or_else(|| local(format!("endpoint URL {url}: no host")))?;
    let port = uri.port_u16().unwrap_or(443);
    let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_else(|| host.to_owned());
    let path = format!("{}/{}", uri.path().trim_end_matches('/'), call.path);

    let roots = root_store(call.ca_pem).map_err(|e| local(format!("{}: {e}", call.trust)))?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(exchange_error)?
        .with_root_certificates(roots);
    let tls = match call.identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| local(format!("client certificate: {e}")))?;
            let key =
                PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).map_err(|e| local(format!("client key: {e}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| local(format!("client certificate: {e}")))?
        }
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(bare.to_owned()).map_err(|e| local(format!("endpoint host {host}: {e}")))?;
    let tcp = tokio::net::TcpStream::connect((bare, port))
        .await
        .map_err(|e| exchange_error(format!("connecting to {authority}: {e}")))?;
    let stream = TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| exchange_error(format!("TLS with {authority} (is {} the operator CA?): {e}", call.trust)))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(exchange_error)?;
    let driver = tokio::spawn(connection);

    let req = http::Request::post(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::from(call.body)))
        .map_err(local)?;
    // With TLS 1.3 the endpoint checks a client certificate after the client's side of
    // the handshake: a refused certificate surfaces here, as an alert.
    let response =
        sender.send_request(req).await.map_err(|e| exchange_error(format!("POST {url}/{}: {e}", call.path)))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    let body = Limited::new(response.into_body(), MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| exchange_error(format!("reading the answer: {e}")))?
        .to_bytes();
    driver.abort();
    interpret(call.action, status.as_u16(), retry_after, &body)
}

/// Turns the endpoint's answer to a `registration` or `renewal` (`action`) into a bundle
/// or a refusal.
pub fn interpret(
    action: &'static str,
    status: u16,
    retry_after: Option<u64>,
    body: &[u8],
) -> Result<Bundle, RegisterError> {
    if status == 200 {
        return serde_json::from_slice(body).map_err(|e| exchange_error(format!("the {action} answer: {e}")));
    }
    #[derive(Deserialize)]
    struct Refusal {
        reason: String,
        message: String,
    }
    match serde_json::from_slice::<Refusal>(body) {
        Ok(r) => Err(RegisterError::Refused { action, status, reason: r.reason, message: r.message, retry_after }),
        Err(_) => {
            let text: String = String::from_utf8_lossy(body).chars().take(200).collect();
            Err(RegisterError::Refused { action, status, reason: "Unknown".into(), message: text, retry_after })
        }
    }
}

/// `host:port` of the process server: the bundle's name with port 9443 unless it has one.
pub fn process_server_address(name: &str) -> String {
    let has_port = match name.rsplit_once(':') {
        // `[v6]:port` or `host:port`; a bare IPv6 address has more than one colon.
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (host.ends_with(']') || !host.contains(':')) && !host.is_empty()
        }
        None => false,
    };
    match (has_port, name.contains(':') && !name.starts_with('[')) {
        (true, _) => name.to_owned(),
        (false, true) => format!("[{name}]:{PROCESS_SERVER_PORT}"),
        (false, false) => format!("{name}:{PROCESS_SERVER_PORT}"),
    }
}

/// Where the credentials of a bundle are kept: the files `register` writes and
/// `agent.json` names, which renewal replaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialFiles {
    /// Client certificate (`tls.crt`).
    pub cert: PathBuf,
    /// Its key (`tls.key`, `0600`).
    pub key: PathBuf,
    /// Operator CA bundle (`ca.crt`).
    pub ca: PathBuf,
    /// ServiceAccount token (`token`, `0600`); not kept without a `kube` section.
    pub token: Option<PathBuf>,
    /// API server CA (`api-ca.crt`); written when the bundle carries one.
    pub api_server_ca: Option<PathBuf>,
}

impl CredentialFiles {
    /// The conventional names in a credentials directory.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            ca: dir.join("ca.crt"),
            token: Some(dir.join("token")),
            api_server_ca: Some(dir.join("api-ca.crt")),
        }
    }

    /// The files an agent configuration names.
    pub fn of(config: &AgentConfig) -> Self {
        Self {
            cert: config.client_cert.clone(),
            key: config.client_key.clone(),
            ca: config.ca_bundle.clone(),
            token: config.kube.as_ref().map(|k| k.token.clone()),
            api_server_ca: config.kube.as_ref().and_then(|k| k.api_server_ca.clone()),
        }
    }
}

/// Replaces the credential files with the bundle's. Every file is first written and
/// flushed beside its destination (keys and the token `0600` from their creation), and
/// only then are they all renamed into place and their directories synced: a crash
/// leaves either the old files or the new ones, except in the instant between two
/// renames.
pub fn write_credentials(files: &CredentialFiles, bundle: &Bundle) -> Result<(), RegisterError> {
    let mut staged = Vec::new();
    let mut stage_all = || -> Result<(), RegisterError> {
        // The trust bundle first (it only grows across a CA rotation), the certificate
        // last: a reader between two renames sees a pair that does not match and keeps
        // what it had.
        staged.push(stage(&files.ca, bundle.ca_bundle.as_bytes(), 0o644)?);
        if let (Some(path), Some(ca)) = (&files.api_server_ca, &bundle.api_server_ca) {
            staged.push(stage(path, ca.as_bytes(), 0o644)?);
        }
        if let Some(path) = &files.token {
            staged.push(stage(path, bundle.token.as_bytes(), 0o600)?);
        }
        staged.push(stage(&files.key, bundle.client_key.as_bytes(), 0o600)?);
        staged.push(stage(&files.cert, bundle.client_certificate.as_bytes(), 0o644)?);
        Ok(())
    };
    let result = stage_all();
    if let Err(e) = result {
        for s in &staged {
            let _ = std::fs::remove_file(&s.tmp);
        }
        return Err(e);
    }
    commit(staged)
}

/// Writes the credentials into `out` (`tls.crt`, `tls.key`, `ca.crt`, `token`,
/// `api-ca.crt`) and `agent.json`. Keys and the token are written `0600`. An existing
/// `agent.json` keeps its local choices (interval, tracking, …); `disks` replaces its
/// disks unless empty. `registration_url` is where the agent renews later. Returns the
/// configuration written.
pub fn write_bundle(
    out: &Path,
    bundle: &Bundle,
    disks: &[DiskConfig],
    registration_url: Option<&str>,
) -> Result<AgentConfig, RegisterError> {
    if !out.exists() {
        std::fs::create_dir_all(out).map_err(|e| local(format!("creating {}: {e}", out.display())))?;
        std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| local(format!("{}: {e}", out.display())))?;
    }
    let out = out.canonicalize().map_err(|e| local(format!("{}: {e}", out.display())))?;
    let config_path = out.join("agent.json");
    let previous: Option<AgentConfig> = match std::fs::read_to_string(&config_path) {
        Ok(text) => Some(serde_json::from_str(&text).map_err(|e| local(format!("{}: {e}", config_path.display())))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(local(format!("{}: {e}", config_path.display()))),
    };
    let disks = match (&previous, disks.is_empty()) {
        (Some(p), true) => p.disks.clone(),
        (None, true) => return Err(local("name at least one disk (--disk id=/dev/sdX)")),
        (_, false) => disks.to_vec(),
    };

    let files = CredentialFiles {
        api_server_ca: bundle.api_server_ca.as_ref().map(|_| out.join("api-ca.crt")),
        ..CredentialFiles::in_dir(&out)
    };
    write_credentials(&files, bundle)?;
    let kube = KubeConfig {
        api_server: bundle.api_server.clone(),
        token: out.join("token"),
        api_server_ca: files.api_server_ca.clone(),
    };
    let registration_url =
        registration_url.map(str::to_owned).or_else(|| previous.as_ref().and_then(|p| p.registration_url.clone()));
    let config = match previous {
        Some(p) => AgentConfig {
            namespace: bundle.namespace.clone(),
            server: bundle.name.clone(),
            disks,
            process_server: process_server_address(&bundle.process_server),
            client_cert: files.cert,
            client_key: files.key,
            ca_bundle: files.ca,
            kube: Some(kube),
            registration_url,
            ..p
        },
        None => AgentConfig {
            kube: Some(kube),
            registration_url,
            ..AgentConfig::new(
                &bundle.namespace,
                &bundle.name,
                disks,
                process_server_address(&bundle.process_server),
                (files.cert, files.key, files.ca),
            )
        },
    };
    let mut json = serde_json::to_vec_pretty(&config).map_err(local)?;
    json.push(b'\n');
    commit(vec![stage(&config_path, &json, 0o644)?])?;
    Ok(config)
}

/// Checks that every credential file can be replaced (a temporary file can be created
/// beside it), before asking for new credentials: renewing into a read-only mount would
/// only supersede the certificate in use.
pub fn check_writable(files: &CredentialFiles) -> Result<(), RegisterError> {
    let paths =
        [Some(&files.ca), files.api_server_ca.as_ref(), files.token.as_ref(), Some(&files.key), Some(&files.cert)];
    for path in paths.into_iter().flatten() {
        let probe = stage(path, b"", 0o600)?;
        let _ = std::fs::remove_file(&probe.tmp);
    }
    Ok(())
}

/// A file written and flushed beside its destination, not yet renamed into place.
struct Staged {
    tmp: PathBuf,
    path: PathBuf,
}

/// Writes `data` to a temporary file beside `path`, with `mode` from its creation (a key
/// is never readable by others, not even briefly), and flushes it to disk.
fn stage(path: &Path, data: &[u8], mode: u32) -> Result<Staged, RegisterError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The umask may have narrowed the mode; the rename keeps this one.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(Staged { tmp, path: path.to_owned() }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(local(format!("writing {}: {e}", path.display())))
        }
    }
}

/// Renames staged files into place, in order, then syncs their directories so the
/// renames survive a crash.
fn commit(staged: Vec<Staged>) -> Result<(), RegisterError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut result = Ok(());
    for s in &staged {
        if result.is_ok() {
            result = std::fs::rename(&s.tmp, &s.path).map_err(|e| local(format!("writing {}: {e}", s.path.display())));
            let dir = s.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !dirs.iter().any(|d| d == dir) {
                dirs.push(dir.to_owned());
            }
        }
        if result.is_err() {
            let _ = std::fs::remove_file(&s.tmp);
        }
    }
    result?;
    for dir in dirs {
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| local(format!("syncing {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// This machine's host name (`/proc/sys/kernel/hostname`).
pub fn local_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty())
}

/// This machine's id (`/etc/machine-id`), when it has one.
pub fn local_machine_id() -> Option<String> {
    std::fs::read_to_string("/etc/machine-id").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty())
}

/// Parses `--disk id=/dev/sdb`.
pub fn parse_disk(arg: &str) -> Result<DiskConfig, String> {
    match arg.split_once('=') {
        Some((id, path)) if !id.is_empty() && !path.is_empty() => {
            Ok(DiskConfig { id: id.to_owned(), path: PathBuf::from(path) })
        }
        _ => Err(format!("expected id=path, e.g. disk-0=/dev/sdb, got {arg:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_server_gets_the_default_port_unless_it_names_one() {
        assert_eq!(process_server_address("ps.prod.svc"), "ps.prod.svc:9443");
        assert_eq!(process_server_address("ps.prod.svc:10443"), "ps.prod.svc:10443");
        assert_eq!(process_server_address("127.0.0.1"), "127.0.0.1:9443");
        assert_eq!(process_server_address("::1"), "[::1]:9443");
        assert_eq!(process_server_address("[::1]"), "[::1]:9443");
        assert_eq!(process_server_address("[::1]:9000"), "[::1]:9000");
    }

    #[test]
    fn refusals_carry_reason_message_and_retry_hint() {
        let body = br#"{"reason":"TokenAlreadyUsed","message":"used at 10:00 by db-01"}"#;
        match interpret("registration", 409, None, body) {
            Err(e @ RegisterError::Refused { status: 409, .. }) => {
                assert_eq!(e.to_string(), "registration refused (HTTP 409 TokenAlreadyUsed): used at 10:00 by db-01");
                assert!(!e.retryable());
            }
            other => panic!("{other:?}"),
        }
        let e = interpret("renewal", 503, Some(5), br#"{"reason":"NotReady","message":"try again"}"#).unwrap_err();
        assert!(e.retryable());
        assert!(matches!(e, RegisterError::Refused { retry_after: Some(5), .. }));
        let e = interpret("renewal", 502, None, b"<html>bad gateway</html>").unwrap_err();
        assert!(e.to_string().starts_with("renewal refused"), "{e}");
        assert!(e.to_string().contains("HTTP 502 Unknown"), "{e}");
    }

    #[test]
    fn disks_parse_as_id_equals_path() {
        let d = parse_disk("disk-0=/dev/sdb").unwrap();
        assert_eq!((d.id.as_str(), d.path.as_path()), ("disk-0", Path::new("/dev/sdb")));
        assert!(parse_disk("/dev/sdb").is_err());
        assert!(parse_disk("=/dev/sdb").is_err());
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let request = RegisterRequest {
            namespace: "prod".into(),
            name: "db-01".into(),
            token: "srbt_secret".into(),
            hostname: "db-01".into(),
            machine_id: None,
        };
        assert!(!format!("{request:?}").contains("srbt_secret"));
        let bundle: Bundle = serde_json::from_value(serde_json::json!({
            "namespace": "prod", "name": "db-01", "apiServer": "https://k", "token": "eyJsecret",
            "clientCertificate": "C", "clientKey": "KEYSECRET", "caBundle": "B", "processServer": "ps",
        }))
        .unwrap();
        let text = format!("{bundle:?}");
        assert!(!text.contains("eyJsecret") && !text.contains("KEYSECRET"), "{text}");
    }
}
