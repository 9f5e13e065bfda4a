//! `siterecovery-agent register` against a small local HTTPS endpoint that answers like
//! the operator's (docs/agent-registration.md): the request it receives, the files and
//! modes written, agent.json, refusals with their reason and exit status, and a
//! certificate from another CA failing the handshake.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};
use siterecovery_agent::AgentConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A CA and a serving certificate for localhost signed by it: (ca PEM, cert PEM, key PEM).
fn pki() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &Issuer::from_params(&ca, &ca_key)).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// What the endpoint saw: the request line and headers, and the body.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// Serves every connection with `status` and `body`; returns its port.
async fn endpoint(cert: &str, key: &str, status: &'static str, body: Value) -> (u16, Seen) {
    let certs = CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = ServerConfig::builder_with_provider(siterecovery_wire::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
            // Read the head, then Content-Length bytes of body.
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            let head_end = loop {
                let n = tls.read(&mut buf).await.unwrap();
                assert!(n > 0, "connection closed mid-request");
                raw.extend_from_slice(&buf[..n]);
                if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
            };
            let head = String::from_utf8(raw[..head_end].to_vec()).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .expect("a Content-Length");
            while raw.len() < head_end + len {
                let n = tls.read(&mut buf).await.unwrap();
                raw.extend_from_slice(&buf[..n]);
            }
            let request: Value = serde_json::from_slice(&raw[head_end..head_end + len]).unwrap();
            record.lock().unwrap().push((head, request));
            let body = body.to_string();
            let retry = if status.starts_with("503") { "Retry-After: 5\r\n" } else { "" };
            let answer = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n\
                 {retry}Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            tls.write_all(answer.as_bytes()).await.unwrap();
            let _ = tls.shutdown().await;
        }
    });
    (port, seen)
}

fn bundle() -> Value {
    json!({
        "namespace": "prod", "name": "db-01", "serviceAccount": "sr-agent-db-01",
        "apiServer": "https://127.0.0.1:16443", "apiServerCa": "API CA PEM\n",
        "token": "eyJ.service-account.token", "tokenExpirationTime": "2030-01-01T00:00:00Z",
        "clientCertificate": "CLIENT CERT PEM\n", "clientKey": "CLIENT KEY PEM\n",
        "clientCertificateExpiryTime": "2030-01-01T00:00:00Z", "caBundle": "OPERATOR CA PEM\n",
        "processServer": "siterecovery-process-server.prod.svc"
    })
}

/// Runs `siterecovery-agent register` against the endpoint on `port`.
async fn register(port: u16, ca: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_siterecovery-agent"));
    cmd.args(["register", "--url", &format!("https://localhost:{port}"), "--ca"])
        .arg(ca)
        .args(["--namespace", "prod", "--server", "db-01", "--hostname", "db-01.example.com"])
        .args(["--machine-id", "0123456789abcdef0123456789abcdef", "--out"])
        .arg(out)
        .args(extra)
        .env("SR_BOOTSTRAP_TOKEN", "srbt_secret-bootstrap-token");
    cmd.output().await.unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn register_writes_the_credentials_and_agent_json() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki();
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, &ca).unwrap();
    let (port, seen) = endpoint(&cert, &key, "200 OK", bundle()).await;
    let out = dir.path().join("etc");

    let run = register(port, &ca_path, &out, &["--disk", "disk-0=/dev/sdb", "--disk", "disk-1=/dev/sdc"]).await;
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{run:?}");
    assert!(stdout.contains("registered prod/db-01"), "{stdout}");
    assert!(!stdout.contains("eyJ") && !stdout.contains("srbt_"), "no secret printed: {stdout}");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let (head, request) = &seen[0];
    assert!(head.starts_with("POST /register HTTP/1.1\r\n"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    assert_eq!(
        request,
        &json!({"namespace": "prod", "name": "db-01", "token": "srbt_secret-bootstrap-token",
            "hostname": "db-01.example.com", "machineId": "0123456789abcdef0123456789abcdef"})
    );

    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap();
    assert_eq!(read("tls.crt"), "CLIENT CERT PEM\n");
    assert_eq!(read("tls.key"), "CLIENT KEY PEM\n");
    assert_eq!(read("ca.crt"), "OPERATOR CA PEM\n");
    assert_eq!(read("token"), "eyJ.service-account.token");
    assert_eq!(read("api-ca.crt"), "API CA PEM\n");
    assert_eq!(mode(&out.join("tls.key")), 0o600);
    assert_eq!(mode(&out.join("token")), 0o600);
    assert_eq!(mode(&out), 0o700);

    let config: AgentConfig = serde_json::from_str(&read("agent.json")).unwrap();
    let out = out.canonicalize().unwrap();
    assert_eq!((config.namespace.as_str(), config.server.as_str()), ("prod", "db-01"));
    assert_eq!(config.process_server, "siterecovery-process-server.prod.svc:9443");
    assert_eq!(config.client_cert, out.join("tls.crt"));
    assert_eq!(config.client_key, out.join("tls.key"));
    assert_eq!(config.ca_bundle, out.join("ca.crt"));
    assert_eq!(config.registration_url, Some(format!("https://localhost:{port}")), "where to renew");
    let disks: Vec<(&str, &Path)> = config.disks.iter().map(|d| (d.id.as_str(), d.path.as_path())).collect();
    assert_eq!(disks, vec![("disk-0", Path::new("/dev/sdb")), ("disk-1", Path::new("/dev/sdc"))]);
    let kube = config.kube.expect("a kube section");
    assert_eq!(kube.api_server, "https://127.0.0.1:16443");
    assert_eq!(kube.token, out.join("token"));
    assert_eq!(kube.api_server_ca, Some(out.join("api-ca.crt")));
    let raw: Value = serde_json::from_str(&read("agent.json")).unwrap();
    assert!(raw["kube"]["apiServerCa"].is_string(), "camelCase: {raw}");

    // Registering again (a new token) keeps local choices and the disks when none are named.
    let mut edited = raw.clone();
    edited["intervalSeconds"] = json!(30.0);
    std::fs::write(out.join("agent.json"), edited.to_string()).unwrap();
    let run = register(port, &ca_path, &out, &[]).await;
    assert!(run.status.success(), "{run:?}");
    let again: AgentConfig = serde_json::from_str(&read("agent.json")).unwrap();
    assert_eq!(again.interval_seconds, 30.0);
    assert_eq!(again.disks.len(), 2);
}

#[tokio::test]
async fn refusals_print_reason_and_message_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki();
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, &ca).unwrap();
    let refusal = json!({"reason": "TokenAlreadyUsed", "message": "the token was used at 10:00 by db-01"});
    let (port, _) = endpoint(&cert, &key, "409 Conflict", refusal).await;
    let out = dir.path().join("etc");
    let run = register(port, &ca_path, &out, &["--disk", "disk-0=/dev/sdb"]).await;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(stderr.contains("HTTP 409 TokenAlreadyUsed"), "{stderr}");
    assert!(stderr.contains("the token was used at 10:00 by db-01"), "{stderr}");
    assert!(!out.join("agent.json").exists(), "nothing written on a refusal");

    // Not ready yet: a distinct exit status, so a wrapper knows to retry.
    let (port, _) =
        endpoint(&cert, &key, "503 Service Unavailable", json!({"reason": "NotReady", "message": "wait"})).await;
    let run = register(port, &ca_path, &out, &["--disk", "disk-0=/dev/sdb", "--wait", "0"]).await;
    assert_eq!(run.status.code(), Some(75), "{run:?}");
    assert!(String::from_utf8_lossy(&run.stderr).contains("retry in 5 s"));
}

#[tokio::test]
async fn an_endpoint_with_a_certificate_from_another_ca_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = pki();
    let (other_ca, _, _) = pki();
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, &other_ca).unwrap();
    let (port, seen) = endpoint(&cert, &key, "200 OK", bundle()).await;
    let run = register(port, &ca_path, &dir.path().join("etc"), &["--disk", "disk-0=/dev/sdb"]).await;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(stderr.contains("TLS with localhost"), "{stderr}");
    assert!(seen.lock().unwrap().is_empty(), "the token never left the machine");
}
