//! The agent renews its own credentials (docs/agent-registration.md, "When to renew"),
//! against the real local API server and the operator's registration endpoint and
//! reconcilers (in this process, with the chart's RBAC), replicating to a process
//! server in this process that serves the namespace's certificate from the operator:
//!
//! - `siterecovery-agent renew` (for an agent.json from before `registrationUrl` with
//!   `--url`) and the background renewal of `siterecovery-agent run` replace
//!   certificate, key, CA bundle and token in place; the new token works; the running
//!   agent, not restarted, reconnects with its renewed certificate to a process server
//!   that revoked the earlier ones;
//! - a superseded certificate (a copy of the credentials after the agent renewed) is
//!   refused with `CertificateSuperseded`: `renew` exits 1 with the reason, `run` logs
//!   it, counts it in /metrics and replicates on with the certificate it has, and renews
//!   once current credentials appear on disk.
//!
//! Certificates from the operator are backdated five minutes and valid 30 days, so the
//! background renewal is brought forward with `SR_AGENT_RENEW_AFTER` (tests only).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use siterecovery_agent::AgentConfig;
use siterecovery_agent::renew::{CertFacts, RENEW_AFTER_ENV, cert_facts};
use siterecovery_api::ProtectedServer;
use siterecovery_e2e::fixtures::wait_event;
use siterecovery_e2e::{StopSignal, TestNamespace, client, fixtures, install_crds, wait_for};
use siterecovery_process_server::target::StaticTargets;
use siterecovery_process_server::{Config, ProcessServer, TlsFiles};
use support::{start_operator, text};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

mod support;

const WAIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;
const AGENT: &str = env!("CARGO_BIN_EXE_siterecovery-agent");

/// A namespace with the ProtectedServer db-01, the operator, and an agent registered
/// into `etc` by `siterecovery-agent register`.
struct World {
    admin: kube::Client,
    ns: TestNamespace,
    op_ns: TestNamespace,
    url: String,
    _stop: StopSignal,
    tmp: tempfile::TempDir,
    etc: PathBuf,
    image: PathBuf,
}

async fn world(prefix: &str) -> anyhow::Result<World> {
    let admin = client().await?;
    install_crds(&admin).await?;
    let op_ns = TestNamespace::create(&admin, &format!("{prefix}-op")).await?;
    let ns = TestNamespace::create(&admin, prefix).await?;
    let (addr, stop) = start_operator(&admin, &op_ns.name, &ns.name).await?;
    let servers: Api<ProtectedServer> = Api::namespaced(admin.clone(), &ns.name);
    servers.create(&PostParams::default(), &fixtures::server("db-01")).await?;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns.name);
    let plain = wait_for(&secrets, "sr-bootstrap-db-01-token", WAIT, "bootstrap token", |s| {
        !text(s, "token").is_empty() && !text(s, "ca.crt").is_empty()
    })
    .await?;

    let tmp = tempfile::tempdir()?;
    let ca = tmp.path().join("operator-ca.crt");
    std::fs::write(&ca, text(&plain, "ca.crt"))?;
    let image = tmp.path().join("os.img");
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&image, &data)?;
    let etc = tmp.path().join("etc");
    let url = format!("https://localhost:{}", addr.port());
    // `register` waits while the operator is not ready for the server yet (503).
    let out = tokio::process::Command::new(AGENT)
        .args(["register", "--url", &url, "--ca"])
        .arg(&ca)
        .args(["--namespace", &ns.name, "--server", "db-01", "--hostname", "db-01.example.com"])
        .args(["--machine-id", "0123456789abcdef0123456789abcdef", "--disk"])
        .arg(format!("os={}", image.display()))
        .arg("--out")
        .arg(&etc)
        .env("SR_BOOTSTRAP_TOKEN", text(&plain, "token"))
        .output()
        .await?;
    ensure!(out.status.success(), "register: {}", String::from_utf8_lossy(&out.stderr));
    Ok(World { admin, ns, op_ns, url, _stop: stop, tmp, etc, image })
}

impl World {
    fn read(&self, dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The certificate, key and token in `dir`.
    fn credentials(&self, dir: &Path) -> [String; 3] {
        [self.read(dir, "tls.crt"), self.read(dir, "tls.key"), self.read(dir, "token")]
    }

    /// A process server on `listen` with its own cache and store, the namespace's
    /// serving certificate from the operator and a CRL revoking `revoked` (serials),
    /// signed by the operator CA.
    async fn process_server(
        &self,
        tag: &str,
        listen: SocketAddr,
        revoked: &[Vec<u8>],
    ) -> anyhow::Result<ProcessServer> {
        let secrets: Api<Secret> = Api::namespaced(self.admin.clone(), &self.ns.name);
        let serving = wait_for(&secrets, "siterecovery-process-server-tls", WAIT, "serving certificate", |s| {
            !text(s, "tls.crt").is_empty()
        })
        .await?;
        let dir = self.tmp.path().join(tag);
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            std::fs::write(tls.join(key), text(&serving, key))?;
        }
        if !revoked.is_empty() {
            let ca = Api::<Secret>::namespaced(self.admin.clone(), &self.op_ns.name).get("siterecovery-ca").await?;
            std::fs::write(tls.join("crl.pem"), revocation_list(&ca, revoked)?)?;
        }
        use base64::Engine as _;
        let key: [u8; 32] = rand::random();
        let targets = json!({
            "backend": {"local": dir.join("store")},
            "keys": {"active": "k1", "key-k1": base64::engine::general_purpose::STANDARD.encode(key)},
            "chunkSize": MIB,
        });
        std::fs::write(dir.join("targets.json"), targets.to_string())?;
        let targets = Arc::new(StaticTargets::load(&dir.join("targets.json"))?);
        let config = Config {
            listen,
            cache_dir: dir.join("cache"),
            cache_limit: 1 << 30,
            tls: TlsFiles::in_dir(&tls),
            metrics: None,
            recent_chunk_bytes: 16 << 20,
            block_cv_bytes: siterecovery_process_server::recent::BLOCK_CV_BYTES,
            local_copy_bytes: siterecovery_process_server::DEFAULT_LOCAL_COPY_BYTES,
        };
        // A process server just dropped may hold the port for a moment.
        let mut tries = 0;
        loop {
            match siterecovery_process_server::start(config.clone(), targets.clone()).await {
                Ok(ps) => return Ok(ps),
                Err(e) if tries < 50 => {
                    tries += 1;
                    if tries == 50 {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Points `dir/agent.json` at the process server, with short intervals and metrics.
    fn configure(&self, dir: &Path, ps: SocketAddr, metrics: SocketAddr) -> anyhow::Result<PathBuf> {
        let path = dir.join("agent.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
        v["processServer"] = json!(format!("localhost:{}", ps.port()));
        v["intervalSeconds"] = json!(0.3);
        v["metricsAddr"] = json!(metrics.to_string());
        std::fs::write(&path, v.to_string())?;
        Ok(path)
    }
}

/// A CRL signed by the operator CA (from its Secret) revoking `serials`.
fn revocation_list(ca: &Secret, serials: &[Vec<u8>]) -> anyhow::Result<String> {
    let key = rcgen::KeyPair::from_pem(&text(ca, "tls.key"))?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&text(ca, "tls.crt"), key)?;
    let long_ago = rcgen::date_time_ymd(2020, 1, 1);
    let crl = rcgen::CertificateRevocationListParams {
        this_update: long_ago,
        next_update: rcgen::date_time_ymd(2100, 1, 1),
        crl_number: rcgen::SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: long_ago,
                reason_code: Some(rcgen::RevocationReason::Superseded),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    Ok(crl.signed_by(&issuer)?.pem()?)
}

fn facts(cert_pem: &str) -> CertFacts {
    cert_facts(cert_pem).expect("a certificate")
}

fn serial(cert_pem: &str) -> Vec<u8> {
    facts(cert_pem).serial
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

async fn renew(config: &Path, extra: &[&str]) -> anyhow::Result<Output> {
    let out = tokio::process::Command::new(AGENT).arg("renew").arg("--config").arg(config).args(extra).output().await?;
    Ok(out)
}

/// `siterecovery-agent run --config <config>`, logging into `log`, killed when dropped.
fn run_agent(config: &Path, log: &Path, renew_after: f64) -> anyhow::Result<tokio::process::Child> {
    let file = std::fs::File::create(log)?;
    Ok(tokio::process::Command::new(AGENT)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .env(RENEW_AFTER_ENV, format!("{renew_after:.3}"))
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true)
        .spawn()?)
}

async fn get_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").await?;
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await?;
    Ok(raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// The value of the sample `name` (with its labels), if present.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn count(metrics: &str, name: &str) -> u64 {
    sample(metrics, name).unwrap_or(0.0) as u64
}

/// Polls the agent's /metrics until `done` holds; returns them.
async fn wait_metrics(addr: SocketAddr, log: &Path, what: &str, done: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let m = get_metrics(addr).await.unwrap_or_default();
        if done(&m) {
            return Ok(m);
        }
        if tokio::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            anyhow::bail!("timed out waiting for {what}; metrics:\n{m}\nagent log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a process server refuses a TLS session with this certificate and key. With
/// TLS 1.3 its verdict on a client certificate arrives with the first read; an accepted
/// session waits for the agent's hello.
async fn refused(addr: SocketAddr, ca: &str, cert: &str, key: &str) -> anyhow::Result<Option<String>> {
    let tls = siterecovery_wire::tls::agent_config(ca, cert, key)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut stream = match TlsConnector::from(tls).connect(ServerName::try_from("localhost")?, tcp).await {
        Ok(s) => s,
        Err(e) => return Ok(Some(e.to_string())),
    };
    let mut byte = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut byte)).await {
        Err(_) => Ok(None),
        Ok(Ok(0)) => Ok(Some("closed".into())),
        Ok(Ok(_)) => Ok(None),
        Ok(Err(e)) => Ok(Some(e.to_string())),
    }
}

/// Neither a token nor a private key in `text`.
fn assert_no_secrets(text: &str, tokens: &[&str]) {
    for token in tokens {
        assert!(!token.is_empty() && !text.contains(token), "a token leaked");
    }
    assert!(!text.contains("PRIVATE KEY"), "a key leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_renews_and_replicates_with_its_new_certificate() -> anyhow::Result<()> {
    let w = world("agent-renew").await?;
    let (etc, ns) = (w.etc.as_path(), w.ns.name.as_str());
    let secrets: Api<Secret> = Api::namespaced(w.admin.clone(), ns);
    let first = w.credentials(etc);
    let config: AgentConfig = serde_json::from_str(&w.read(etc, "agent.json"))?;
    assert_eq!(config.registration_url.as_deref(), Some(w.url.as_str()), "register keeps where to renew");

    // An agent.json from before registrationUrl: `renew` says what is missing, and
    // renews with --url.
    let mut old: Value = serde_json::from_str(&w.read(etc, "agent.json"))?;
    old.as_object_mut().context("an object")?.remove("registrationUrl");
    let old_config = w.tmp.path().join("old-agent.json");
    std::fs::write(&old_config, old.to_string())?;
    let out = renew(&old_config, &[]).await?;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no registrationUrl"), "{out:?}");
    assert_eq!(w.credentials(etc), first, "nothing written");
    // Certificates carry whole seconds: let one pass so the next notAfter is later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = renew(&old_config, &["--url", &w.url]).await?;
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains(&format!("renewed {ns}/db-01; certificate valid until")), "{stdout}");

    // New certificate, key and token in the same files, as the operator stored them.
    let second = w.credentials(etc);
    assert_no_secrets(&format!("{stdout}{stderr}"), &[&first[2], &second[2]]);
    for (i, what) in ["certificate", "key", "token"].iter().enumerate() {
        assert_ne!(second[i], first[i], "a new {what}");
    }
    assert!(facts(&second[0]).not_after > facts(&first[0]).not_after);
    let stored = secrets.get("sr-agent-db-01-tls").await?;
    assert_eq!((text(&stored, "tls.crt"), text(&stored, "tls.key")), (second[0].clone(), second[1].clone()));
    assert_eq!(w.read(etc, "ca.crt"), text(&stored, "ca.crt"), "the current trust bundle");
    assert_eq!((mode(&etc.join("tls.key")), mode(&etc.join("token"))), (0o600, 0o600));
    let leftovers: Vec<_> = std::fs::read_dir(etc)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The new token is the agent's identity at the API server.
    let agent_api = siterecovery_agent::report::client(config.kube.as_ref().context("a kube section")?)?;
    Api::<ProtectedServer>::namespaced(agent_api, ns).get("db-01").await.context("the renewed token")?;

    // `run` replicates, and renews in the background (brought forward to 8 s from now).
    let ps_addr = free_addr();
    let ps = w.process_server("ps-1", ps_addr, &[]).await?;
    let metrics = free_addr();
    let agent_config = w.configure(etc, ps_addr, metrics)?;
    let age = Timestamp::now().duration_since(facts(&second[0]).not_before);
    let log = w.tmp.path().join("agent.log");
    let mut agent = run_agent(&agent_config, &log, age.as_secs_f64() + 8.0)?;
    wait_metrics(metrics, &log, "a first point", |m| count(m, "siterecovery_agent_recovery_points_total") >= 1).await?;
    wait_metrics(metrics, &log, "a renewal", |m| count(m, "siterecovery_agent_certificate_renewals_total") >= 1)
        .await?;
    let third = w.credentials(etc);
    assert_ne!(third[0], second[0], "renewed in place");
    let stored = secrets.get("sr-agent-db-01-tls").await?;
    assert_eq!(text(&stored, "tls.crt"), third[0], "as the operator stored it");
    let m = wait_metrics(metrics, &log, "the new expiry", |m| {
        let on_disk = cert_facts(&std::fs::read_to_string(etc.join("tls.crt")).unwrap_or_default());
        on_disk.is_ok_and(|c| {
            sample(m, "siterecovery_agent_certificate_expiry_timestamp_seconds") == Some(c.not_after.as_second() as f64)
        })
    })
    .await?;
    assert!(!m.contains("siterecovery_agent_certificate_renewal_failures_total{"), "{m}");

    // Another process server takes over, revoking the certificates the agent renewed
    // from; the agent, never restarted, connects with the one it renewed.
    drop(ps);
    let ps = w.process_server("ps-2", ps_addr, &[serial(&first[0]), serial(&second[0])]).await?;
    let ca = w.read(etc, "ca.crt");
    let verdict = refused(ps_addr, &ca, &second[0], &second[1]).await?;
    assert!(verdict.is_some_and(|v| v.contains("Revoked")), "the revocation list is in force");
    // The session with the old process server lives on: a grown disk makes the agent
    // reconnect (to send the new layout).
    let file = std::fs::OpenOptions::new().write(true).open(&w.image)?;
    file.set_len(5 * MIB)?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let servers = ps.shared.servers().await;
        if servers.iter().any(|s| s.received().latest_point.is_some()) {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no point at the new process server; agent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let current = w.credentials(etc);
    assert_eq!(refused(ps_addr, &ca, &current[0], &current[1]).await?, None, "the renewed certificate is accepted");

    agent.kill().await?;
    let log = std::fs::read_to_string(&log)?;
    assert!(log.contains("client certificate renewed"), "{log}");
    assert!(log.contains("connecting with the renewed client certificate"), "{log}");
    assert_no_secrets(&log, &[&first[2], &second[2], &third[2], &current[2]]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_renewal_leaves_the_agent_replicating_with_its_certificate() -> anyhow::Result<()> {
    let w = world("agent-renew-refused").await?;
    let (etc, ns) = (w.etc.as_path(), w.ns.name.as_str());

    // A copy of the credentials, as a restored backup (or a thief) holds them.
    let copy = w.tmp.path().join("copy");
    std::fs::create_dir(&copy)?;
    for name in ["tls.crt", "tls.key", "ca.crt", "token", "api-ca.crt"] {
        std::fs::copy(etc.join(name), copy.join(name))?;
    }
    let moved =
        w.read(etc, "agent.json").replace(&etc.canonicalize()?.display().to_string(), &copy.display().to_string());
    std::fs::write(copy.join("agent.json"), moved)?;
    let held = w.credentials(&copy);

    // The agent renews; the copy's certificate is superseded.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = renew(&etc.join("agent.json"), &[]).await?;
    assert!(out.status.success(), "{out:?}");
    let out = renew(&copy.join("agent.json"), &[]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr.contains("renewal refused (HTTP 403 CertificateSuperseded)"), "{stderr}");
    assert_eq!(w.credentials(&copy), held, "nothing written");
    wait_event(&w.admin, ns, "db-01", "CertificateSuperseded", "renewal refused").await?;

    // `run` with the copy: renewal is due at once and refused; replication goes on with
    // the certificate it has, and the refusal is not retried in a loop.
    let ps_addr = free_addr();
    let _ps = w.process_server("ps", ps_addr, &[]).await?;
    let metrics = free_addr();
    let config = w.configure(&copy, ps_addr, metrics)?;
    let log = w.tmp.path().join("agent.log");
    let mut agent = run_agent(&config, &log, 0.0)?;
    let superseded = "siterecovery_agent_certificate_renewal_failures_total{reason=\"CertificateSuperseded\"}";
    wait_metrics(metrics, &log, "the refusal", |m| {
        count(m, superseded) == 1 && count(m, "siterecovery_agent_certificate_renewal_refused") == 1
    })
    .await?;
    let m = wait_metrics(metrics, &log, "points after the refusal", |m| {
        count(m, "siterecovery_agent_recovery_points_total") >= 3
    })
    .await?;
    assert_eq!(count(&m, superseded), 1, "retried only after an hour: {m}");
    assert_eq!(count(&m, "siterecovery_agent_certificate_renewals_total"), 0);
    assert_eq!(
        sample(&m, "siterecovery_agent_certificate_expiry_timestamp_seconds"),
        Some(facts(&held[0]).not_after.as_second() as f64),
        "the certificate in use: {m}"
    );
    assert_eq!(w.credentials(&copy), held, "the old credentials are kept");

    // Fresh credentials appear on disk (as registering again writes them): the refusal
    // no longer holds, and they renew.
    for name in ["tls.crt", "tls.key", "ca.crt", "token"] {
        std::fs::copy(etc.join(name), copy.join(name))?;
    }
    let m = wait_metrics(metrics, &log, "a renewal with the new credentials", |m| {
        count(m, "siterecovery_agent_certificate_renewals_total") == 1
    })
    .await?;
    assert_eq!(count(&m, "siterecovery_agent_certificate_renewal_refused"), 0, "{m}");
    assert_eq!(count(&m, superseded), 1, "{m}");
    assert_ne!(w.read(&copy, "tls.crt"), w.read(etc, "tls.crt"), "renewed in place");

    agent.kill().await?;
    let log = std::fs::read_to_string(&log)?;
    assert!(log.contains("certificate renewal refused") && log.contains("CertificateSuperseded"), "{log}");
    assert_no_secrets(&log, &[&held[2], &w.read(etc, "token")]);
    Ok(())
}
