//! The production token path to Blob storage, for real: Azurite over HTTPS with
//! `--oauth basic` (it checks a bearer token's issuer, audience and lifetime, not its
//! signature), and a loopback HTTPS stand-in for Entra ID's token endpoint
//! (`/<tenant>/oauth2/v2.0/token`) that checks the client-credentials grant, the scope,
//! and the client assertion (workload identity) or client secret (service principal).
//! So the `azure_identity` credentials, the SDK's bearer policy and our connector are what
//! run. The test CA is an explicit extra root of this client only.
//!
//! Starts its own Azurite through `hack/azurite.sh` (installed from npm when missing).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use siterecovery_store::backend::{AzureConnector, AzureEnvironment, BlobAuth};
use siterecovery_store::{AzureBlobBackend, BlobBackend, ServerRef};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT_ID: &str = "6f1f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
const CLIENT_SECRET: &str = "s3cret~value";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const SCOPE: &str = "https://storage.azure.com/.default";

/// A test CA and a serving certificate for 127.0.0.1 signed by it, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a leaf named like its issuer looks self-signed to OpenSSL (curl).
        ca.distinguished_name.push(DnType::CommonName, "siterecovery test CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        let cert = leaf.signed_by(&key, &Issuer::from_params(&ca, &ca_key)).unwrap();
        let (ca_path, cert_path, key_path) = (dir.join("ca.pem"), dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        Self { ca: ca_path, cert: cert_path, key: key_path, cert_der: cert.der().clone(), key_der: key.serialize_der() }
    }

    fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca).unwrap()
    }
}

/// Azurite over HTTPS with `--oauth basic`, on a port and state directory of its own.
struct Azurite {
    port: u16,
    dir: PathBuf,
    pki_env: [(&'static str, PathBuf); 3],
}

impl Azurite {
    fn start(dir: &Path, pki: &Pki) -> Self {
        let a = Self {
            port: free_port(),
            dir: dir.join("azurite"),
            pki_env: [
                ("SR_AZURITE_CERT", pki.cert.clone()),
                ("SR_AZURITE_KEY", pki.key.clone()),
                ("SR_AZURITE_CA", pki.ca.clone()),
            ],
        };
        let out = a.script("up").output().unwrap();
        assert!(out.status.success(), "hack/azurite.sh up failed: {}", String::from_utf8_lossy(&out.stderr));
        a
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}/devstoreaccount1", self.port)
    }

    fn script(&self, verb: &str) -> Command {
        let mut cmd = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/azurite.sh"));
        cmd.arg(verb)
            .env("SR_AZURITE_PORT", self.port.to_string())
            .env("SR_AZURITE_DIR", &self.dir)
            .env("SR_AZURITE_OAUTH", "basic")
            .envs(self.pki_env.iter().map(|(k, v)| (*k, v.as_os_str())));
        cmd
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.script("down").output();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How the stand-in for Entra ID answers, and what it saw.
#[derive(Default)]
struct EntraState {
    /// The projected ServiceAccount token a workload-identity request must present.
    assertion: String,
    /// Lifetime of issued access tokens, in seconds (`expires_in`), and the offset of
    /// their `exp` claim from now (negative: already expired, which Azurite refuses).
    expires_in: i64,
    exp_offset: i64,
    /// Audience of issued tokens.
    audience: String,
    /// Accepted requests, by grant kind (`assertion` or `secret`).
    issued: HashMap<&'static str, usize>,
    /// Why requests were refused.
    refused: Vec<String>,
}

#[derive(Clone)]
struct Entra {
    addr: SocketAddr,
    state: Arc<Mutex<EntraState>>,
}

impl Entra {
    async fn start(pki: &Pki, assertion: &str) -> Self {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone()));
        let config =
            ServerConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![pki.cert_der.clone()], key)
                .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let state = Arc::new(Mutex::new(EntraState {
            assertion: assertion.to_owned(),
            expires_in: 3599,
            exp_offset: 3600,
            audience: "https://storage.azure.com".into(),
            ..Default::default()
        }));
        let entra = Self { addr: listener.local_addr().unwrap(), state };
        let server = entra.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let (acceptor, server) = (acceptor.clone(), server.clone());
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let (status, body) = match read_request(&mut tls).await {
                            Some((path, form)) => server.answer(&path, &form),
                            None => ("400 Bad Request", serde_json::json!({"error": "invalid_request"})),
                        };
                        let body = body.to_string();
                        let head = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = tls.write_all(head.as_bytes()).await;
                        let _ = tls.write_all(body.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        entra
    }

    fn authority(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, EntraState> {
        self.state.lock().unwrap()
    }

    /// Entra's answer to a token request: a client-credentials grant for the storage
    /// scope, by our client, with the projected token as a jwt-bearer assertion or with
    /// the right secret.
    fn answer(&self, path: &str, form: &HashMap<String, String>) -> (&'static str, serde_json::Value) {
        let mut s = self.state();
        let get = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
        let refuse = |s: &mut EntraState, code: u32, why: String| {
            s.refused.push(why.clone());
            let body = serde_json::json!({"error": "invalid_client", "error_description": format!("AADSTS{code}: {why}"), "error_codes": [code]});
            ("401 Unauthorized", body)
        };
        if path != format!("/{TENANT}/oauth2/v2.0/token") {
            return refuse(&mut s, 90002, format!("unexpected path {path}"));
        }
        if get("grant_type") != "client_credentials" || get("scope") != SCOPE || get("client_id") != CLIENT_ID {
            return refuse(&mut s, 900144, format!("unexpected grant {form:?}"));
        }
        let kind = if form.contains_key("client_assertion") {
            if get("client_assertion_type") != ASSERTION_TYPE || get("client_assertion") != s.assertion {
                return refuse(&mut s, 700211, "the client assertion is not the projected token".into());
            }
            "assertion"
        } else if get("client_secret") == CLIENT_SECRET {
            "secret"
        } else {
            return refuse(&mut s, 7000215, "Invalid client secret provided.".into());
        };
        *s.issued.entry(kind).or_default() += 1;
        let now = jiff::Timestamp::now().as_second();
        let claims = serde_json::json!({
            "aud": s.audience, "iss": format!("https://sts.windows.net/{TENANT}/"),
            "iat": now - 60, "nbf": now - 60, "exp": now + s.exp_offset,
            "appid": CLIENT_ID, "oid": CLIENT_ID, "tid": TENANT,
        });
        let jwt = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(b"unsigned: azurite does not check signatures")
        );
        let body = serde_json::json!({"token_type": "Bearer", "expires_in": s.expires_in, "ext_expires_in": s.expires_in, "access_token": jwt});
        ("200 OK", body)
    }
}

/// Reads one HTTP/1.1 request: its path and its urlencoded form body.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<(String, HashMap<String, String>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let path = head.split_whitespace().nth(1)?.to_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let form = url::form_urlencoded::parse(&buf[head_end..head_end + length]).into_owned().collect();
    Some((path, form))
}

/// Everything a test needs: the CA, Azurite, the Entra stand-in, a projected token.
struct World {
    dir: tempfile::TempDir,
    pki: Pki,
    azurite: Azurite,
    entra: Entra,
    token_file: PathBuf,
}

impl World {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(dir.path());
        let azurite = Azurite::start(dir.path(), &pki);
        // What the kubelet projects: a ServiceAccount JWT for audience api://AzureADTokenExchange.
        let sa_token = format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(
                r#"{"aud":["api://AzureADTokenExchange"],"sub":"system:serviceaccount:dr:siterecovery-process-server"}"#
            )
        );
        let token_file = dir.path().join("azure-identity-token");
        std::fs::write(&token_file, &sa_token).unwrap();
        let entra = Entra::start(&pki, &sa_token).await;
        Self { dir, pki, azurite, entra, token_file }
    }

    /// A connector as a process-server pod has it: the webhook's variables and the test
    /// CA as its one extra root.
    fn connector(&self) -> AzureConnector {
        AzureConnector::new(AzureEnvironment {
            authority_host: Some(self.entra.authority()),
            federated_token_file: Some(self.token_file.clone()),
            extra_roots_pem: Some(self.pki.ca_pem()),
        })
        .unwrap()
    }

    fn backend(&self, connector: &AzureConnector, container: &str, auth: &BlobAuth) -> AzureBlobBackend {
        connector.backend(&self.azurite.endpoint(), container, auth).unwrap()
    }
}

fn workload_identity() -> BlobAuth {
    BlobAuth::WorkloadIdentity { tenant_id: TENANT.into(), client_id: CLIENT_ID.into() }
}

fn service_principal(secret: &str) -> BlobAuth {
    BlobAuth::ServicePrincipal { tenant_id: TENANT.into(), client_id: CLIENT_ID.into(), client_secret: secret.into() }
}

/// Writes two recovery points through `backend` and restores the second bit-exact.
async fn points_round_trip(backend: Arc<dyn BlobBackend>, dir: &Path) {
    let server = ServerRef::new("dr", "web-1").unwrap();
    let src = dir.join("sda.img");
    let size = 3 * 1024 * 1024 + 5;
    make_image(&src, size, &[(0, 1 << 20, 21), (size - 700, 700, 22)]);
    let store = store(backend, keyring("k1", &["k1"]), 512 * 1024);
    let first = store.write_point(&server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    assert!(first.chunks_uploaded >= 2, "{first:?}");
    scribble(&src, 2 << 20, 4096, 23);
    store.write_point(&server, crash_point(5), &[disk("sda", &src)]).await.unwrap();
    let points = store.list_points(&server).await.unwrap();
    assert_eq!(points.len(), 2, "both manifests are listed back");
    let out = dir.join("restored.img");
    store.restore_disk(&server, &points[1], "sda", &out).await.unwrap();
    assert_eq!(file_hash(&out), file_hash(&src), "restore is bit-exact");
}

#[tokio::test]
async fn workload_identity_exchanges_the_projected_token_and_reads_and_writes_points() {
    let w = World::new().await;
    let connector = w.connector();
    let backend = Arc::new(w.backend(&connector, "wi-points", &workload_identity()));
    backend.ensure_container().await.unwrap();
    points_round_trip(backend.clone(), w.dir.path()).await;
    {
        let s = w.entra.state();
        assert_eq!(s.refused, Vec::<String>::new());
        assert_eq!(s.issued.get("assertion"), Some(&1), "one token, cached by the SDK for every request");
    }
    // A backend built again for the same identity (the process server re-reads its policy
    // every minute) reuses the credential and its token.
    let again = w.backend(&connector, "wi-points", &workload_identity());
    assert!(again.exists("nothing-here").await.is_ok());
    assert_eq!(w.entra.state().issued.get("assertion"), Some(&1));

    // A token inside its last five minutes is refreshed before each use, not used to expiry.
    w.entra.state().expires_in = 120;
    let short = w.connector();
    let b = w.backend(&short, "wi-points", &workload_identity());
    for i in 0..3 {
        b.put(&format!("refresh/{i}"), Bytes::from_static(b"x")).await.unwrap();
    }
    // One token before, then at least one per request: each was inside its refresh window.
    assert!(w.entra.state().issued["assertion"] > 3, "a token about to expire is replaced before use");
}

#[tokio::test]
async fn a_service_principal_secret_gets_a_token_and_reads_and_writes_points() {
    let w = World::new().await;
    let connector = w.connector();
    let backend = Arc::new(w.backend(&connector, "sp-points", &service_principal(CLIENT_SECRET)));
    backend.ensure_container().await.unwrap();
    points_round_trip(backend, w.dir.path()).await;
    assert_eq!(w.entra.state().issued.get("secret"), Some(&1));
}

#[tokio::test]
async fn refused_expired_or_misaddressed_tokens_fail_with_the_reason_and_no_retry() {
    let w = World::new().await;
    let connector = w.connector();
    w.backend(&connector, "refusals", &service_principal(CLIENT_SECRET)).ensure_container().await.unwrap();

    let wrong = w.backend(&connector, "refusals", &service_principal("not-the-secret"));
    let err = wrong.put("x", Bytes::from_static(b"x")).await.unwrap_err();
    eprintln!("wrong client secret: {err}");
    assert!(err.to_string().contains("AADSTS7000215"), "Entra's reason is kept: {err}");
    assert!(!err.is_retryable(), "{err}");

    // The projected token is not what Entra federates with.
    std::fs::write(&w.token_file, "some-other-token").unwrap();
    let err = w.backend(&w.connector(), "refusals", &workload_identity()).get("x").await.unwrap_err();
    eprintln!("wrong projected token: {err}");
    assert!(err.to_string().contains("AADSTS700211"), "{err}");
    assert!(!err.is_retryable(), "{err}");

    // Entra hands out a token that storage finds expired.
    w.entra.state().exp_offset = -60;
    let expired = w.backend(&w.connector(), "refusals", &service_principal(CLIENT_SECRET));
    let err = expired.put("x", Bytes::from_static(b"x")).await.unwrap_err();
    eprintln!("expired token: {err}");
    assert!(
        err.to_string().contains("AuthenticationFailed: Lifetime validation failed. The token is expired."),
        "{err}"
    );
    assert!(!err.is_retryable(), "{err}");

    // A token for another resource.
    w.entra.state().exp_offset = 3600;
    w.entra.state().audience = "https://management.azure.com".into();
    let other = w.backend(&w.connector(), "refusals", &service_principal(CLIENT_SECRET));
    let err = other.list("").await.unwrap_err();
    eprintln!("token for another audience: {err}");
    assert!(err.to_string().contains("AuthenticationFailed") && err.to_string().contains("audience"), "{err}");
}

#[tokio::test]
async fn the_test_ca_is_trusted_only_where_it_is_given() {
    let w = World::new().await;
    // The same process without the extra root: the emulator's certificate is refused.
    let plain = AzureConnector::new(AzureEnvironment {
        authority_host: Some(w.entra.authority()),
        federated_token_file: Some(w.token_file.clone()),
        extra_roots_pem: None,
    })
    .unwrap();
    let err = w.backend(&plain, "ca-check", &workload_identity()).exists("x").await.unwrap_err();
    eprintln!("without the test CA: {err}");
    let chain = format!("{err:?}");
    assert!(chain.to_lowercase().contains("certificate") || chain.contains("connect"), "{chain}");
    assert_eq!(w.entra.state().issued.len(), 0, "no token was handed to a server it could not verify");
}
