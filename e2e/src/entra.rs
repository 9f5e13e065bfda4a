//! Blob storage behind Entra ID, on loopback, for testing the production token path:
//! Azurite over HTTPS with `--oauth basic` (it checks a bearer token's issuer, audience
//! and lifetime, not its signature), and an HTTPS stand-in for Entra ID's token endpoint
//! (`/<tenant>/oauth2/v2.0/token`) that checks the client-credentials grant, the storage
//! scope, and the client assertion (workload identity: the projected ServiceAccount
//! token) or client secret (service principal) before issuing a token.
//!
//! Both serve a certificate of a CA made for the test; clients trust it only as an
//! explicit extra root ([`OauthStorage::connector`], or `SR_STORAGE_CA_FILE` in
//! [`OauthStorage::pod_env`] for a child process).

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context as _, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use siterecovery_store::backend::{
    AzureConnector, AzureEnvironment, BlobAuth, ENV_AUTHORITY_HOST, ENV_EXTRA_CA_FILE, ENV_FEDERATED_TOKEN_FILE,
};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::operator::TempDir;

/// Directory (tenant) id the stand-in serves.
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
/// Application (client) id it issues tokens to.
pub const CLIENT_ID: &str = "6f1f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
/// The service principal's secret it accepts.
pub const CLIENT_SECRET: &str = "s3cret~value";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const SCOPE: &str = "https://storage.azure.com/.default";

/// Workload identity as a policy names it, for this tenant and client.
pub fn workload_identity() -> BlobAuth {
    BlobAuth::WorkloadIdentity { tenant_id: TENANT.into(), client_id: CLIENT_ID.into() }
}

/// The service principal with `secret`.
pub fn service_principal(secret: &str) -> BlobAuth {
    BlobAuth::ServicePrincipal { tenant_id: TENANT.into(), client_id: CLIENT_ID.into(), client_secret: secret.into() }
}

/// A test CA and a serving certificate for 127.0.0.1 signed by it, as PEM files.
pub struct Pki {
    /// The CA certificate (the extra root clients are given).
    pub ca: PathBuf,
    /// The serving certificate and its key.
    pub cert: PathBuf,
    /// The serving key.
    pub key: PathBuf,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl Pki {
    /// Generates them into `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: a leaf named like its issuer looks self-signed to OpenSSL (curl).
        ca.distinguished_name.push(DnType::CommonName, "siterecovery test CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        let cert = leaf.signed_by(&key, &Issuer::from_params(&ca, &ca_key))?;
        let (ca_path, cert_path, key_path) = (dir.join("ca.pem"), dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&ca_path, ca_cert.pem())?;
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(Self {
            ca: ca_path,
            cert: cert_path,
            key: key_path,
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca).unwrap_or_default()
    }
}

/// Azurite over HTTPS with `--oauth basic`, on a free port and a state directory of its
/// own, started and stopped by `hack/azurite.sh`.
pub struct HttpsAzurite {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: PathBuf,
    tls: [(&'static str, PathBuf); 3],
}

impl HttpsAzurite {
    /// Starts it (installing Azurite from npm when missing) and waits until it answers.
    pub fn start(dir: &Path, pki: &Pki) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let tls = [
            ("SR_AZURITE_CERT", pki.cert.clone()),
            ("SR_AZURITE_KEY", pki.key.clone()),
            ("SR_AZURITE_CA", pki.ca.clone()),
        ];
        let a = Self { port, dir: dir.join("azurite"), tls };
        let out = a.script("up").output().context("running hack/azurite.sh")?;
        ensure!(out.status.success(), "hack/azurite.sh up failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(a)
    }

    /// The account endpoint (Azurite's development account, path-style, https).
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}/devstoreaccount1", self.port)
    }

    fn script(&self, verb: &str) -> Command {
        let mut cmd = Command::new(crate::repo_root().join("hack/azurite.sh"));
        cmd.arg(verb)
            .env("SR_AZURITE_PORT", self.port.to_string())
            .env("SR_AZURITE_DIR", &self.dir)
            .env("SR_AZURITE_OAUTH", "basic")
            .envs(self.tls.iter().map(|(k, v)| (*k, v.as_os_str())));
        cmd
    }
}

impl Drop for HttpsAzurite {
    fn drop(&mut self) {
        let _ = self.script("down").output();
    }
}

/// How the Entra stand-in answers, and what it saw.
#[derive(Debug, Default)]
pub struct EntraState {
    /// The projected ServiceAccount token a workload-identity request must present.
    pub assertion: String,
    /// `expires_in` of issued access tokens, in seconds.
    pub expires_in: i64,
    /// Offset of issued tokens' `exp` claim from now (negative: already expired, which
    /// storage refuses).
    pub exp_offset: i64,
    /// `aud` of issued tokens.
    pub audience: String,
    /// Tokens issued, by grant: `assertion` (workload identity) or `secret`.
    pub issued: HashMap<&'static str, usize>,
    /// Why requests were refused.
    pub refused: Vec<String>,
}

/// The stand-in for Entra ID's token endpoint (HTTPS on loopback).
#[derive(Clone)]
pub struct Entra {
    addr: SocketAddr,
    state: Arc<Mutex<EntraState>>,
}

impl Entra {
    /// Serves with `pki`'s certificate; workload-identity requests must present
    /// `assertion`.
    pub async fn start(pki: &Pki, assertion: &str) -> anyhow::Result<Self> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key_der.clone()));
        let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![pki.cert_der.clone()], key)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let state = Arc::new(Mutex::new(EntraState {
            assertion: assertion.to_owned(),
            expires_in: 3599,
            exp_offset: 3600,
            audience: "https://storage.azure.com".into(),
            ..Default::default()
        }));
        let entra = Self { addr: listener.local_addr()?, state };
        let server = entra.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, server) = (acceptor.clone(), server.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
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
                });
            }
        });
        Ok(entra)
    }

    /// Its authority host, as `AZURE_AUTHORITY_HOST` would name it.
    pub fn authority(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Its state, to change how it answers or read what it saw.
    pub fn state(&self) -> MutexGuard<'_, EntraState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entra's answer to a token request: a client-credentials grant for the storage
    /// scope, by our client, with the projected token as a jwt-bearer assertion or with
    /// the right secret; otherwise `invalid_client` with an AADSTS code, as Entra says it.
    fn answer(&self, path: &str, form: &HashMap<String, String>) -> (&'static str, serde_json::Value) {
        let mut s = self.state();
        let get = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
        let refuse = |s: &mut EntraState, code: u32, why: String| {
            s.refused.push(why.clone());
            let description = format!("AADSTS{code}: {why}");
            (
                "401 Unauthorized",
                serde_json::json!({"error": "invalid_client", "error_description": description, "error_codes": [code]}),
            )
        };
        if path != format!("/{TENANT}/oauth2/v2.0/token") {
            return refuse(&mut s, 90002, format!("unexpected path {path}"));
        }
        if get("grant_type") != "client_credentials" || get("scope") != SCOPE || get("client_id") != CLIENT_ID {
            let grant = (get("grant_type"), get("scope"), get("client_id"));
            return refuse(&mut s, 900144, format!("unexpected grant, scope or client {grant:?}"));
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
        let expires_in = s.expires_in;
        let body = serde_json::json!({"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in, "access_token": jwt});
        ("200 OK", body)
    }
}

/// Reads one HTTP/1.1 request: its path and its urlencoded form body.
async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Option<(String, HashMap<String, String>)> {
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

/// Everything together: the CA, HTTPS Azurite, the Entra stand-in, and a projected
/// ServiceAccount token file as the AKS webhook mounts it.
pub struct OauthStorage {
    /// Azurite (declared before `dir`: fields drop in order, and stopping it needs the pid
    /// file in `dir`).
    pub azurite: HttpsAzurite,
    /// The test CA.
    pub pki: Pki,
    /// The Entra stand-in.
    pub entra: Entra,
    /// The projected token (`AZURE_FEDERATED_TOKEN_FILE`).
    pub token_file: PathBuf,
    /// Scratch directory (certificates, Azurite's state, the token file); removed last.
    pub dir: TempDir,
}

impl OauthStorage {
    /// Starts it all.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = TempDir::new("oauth-storage")?;
        let pki = Pki::new(&dir.0)?;
        let azurite = HttpsAzurite::start(&dir.0, &pki)?;
        // What the kubelet projects: a ServiceAccount JWT for audience api://AzureADTokenExchange.
        let claims =
            r#"{"aud":["api://AzureADTokenExchange"],"sub":"system:serviceaccount:dr:siterecovery-process-server"}"#;
        let sa_token = format!("eyJhbGciOiJSUzI1NiJ9.{}.c2ln", URL_SAFE_NO_PAD.encode(claims));
        let token_file = dir.0.join("azure-identity-token");
        std::fs::write(&token_file, &sa_token)?;
        let entra = Entra::start(&pki, &sa_token).await?;
        Ok(Self { azurite, pki, entra, token_file, dir })
    }

    /// The environment a pod with workload identity has, trusting the test CA.
    pub fn environment(&self) -> AzureEnvironment {
        AzureEnvironment {
            authority_host: Some(self.entra.authority()),
            federated_token_file: Some(self.token_file.clone()),
            extra_roots_pem: Some(self.pki.ca_pem()),
        }
    }

    /// A connector with [`Self::environment`].
    pub fn connector(&self) -> AzureConnector {
        AzureConnector::new(self.environment()).expect("the test environment is valid")
    }

    /// The same environment as variables, for a child process (what the AKS webhook
    /// injects, plus `SR_STORAGE_CA_FILE`).
    pub fn pod_env(&self) -> Vec<(String, OsString)> {
        vec![
            (ENV_AUTHORITY_HOST.to_owned(), self.entra.authority().into()),
            (ENV_FEDERATED_TOKEN_FILE.to_owned(), self.token_file.clone().into()),
            (ENV_EXTRA_CA_FILE.to_owned(), self.pki.ca.clone().into()),
        ]
    }
}
