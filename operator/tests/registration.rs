//! Agent registration against the real local API server, run in-process with a client
//! for the Helm chart's ServiceAccount (so the chart's RBAC is proven sufficient): the
//! operator CA is created once and reused; agent certificates chain to it, name their
//! server and are rotated near expiry; a bootstrap token registers exactly once over
//! HTTPS and yields a working ServiceAccount token; used, expired, wrong and
//! wrong-host tokens are refused with their HTTP status, reason and an event.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::Controller;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use siterecovery_api::ProtectedServer;
use siterecovery_e2e::fixtures::{events_for, wait_event};
use siterecovery_e2e::operator::operator_client;
use siterecovery_e2e::{StopSignal, TestNamespace, client, install_crds, wait_for, wait_gone};
use siterecovery_operator::context::Context;
use siterecovery_operator::registration::{self, ApiServerInfo, RegisterResponse, RegistrationConfig, certs, tls};
use siterecovery_operator::server;
use siterecovery_operator::telemetry::Metrics;
use siterecovery_operator::watch::Watches;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::{ServerName, UnixTime};

const WAIT: Duration = Duration::from_secs(30);

fn text(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default()
}

fn has_keys(keys: &'static [&'static str]) -> impl Fn(&Secret) -> bool {
    move |s| keys.iter().all(|k| s.data.as_ref().is_some_and(|d| d.contains_key(*k)))
}

/// `POST /register` over HTTPS, verifying the endpoint with `ca_pem` (the bundle the
/// admin hands out with the token); returns (status, JSON body).
async fn register(addr: SocketAddr, ca_pem: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
    let config = ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(tls::root_store(ca_pem)?)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut stream = TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost")?, tcp).await?;
    let body = serde_json::to_vec(body)?;
    let head = format!(
        "POST /register HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw).await
        && raw.is_empty()
    {
        return Err(e.into());
    }
    let raw = String::from_utf8(raw)?;
    let status = raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP body")?;
    assert!(head.to_ascii_lowercase().contains("cache-control: no-store"), "{head}");
    Ok((status, serde_json::from_str(body).with_context(|| format!("body {body:?}"))?))
}

fn verify_client_cert(ca_bundle: &str, cert_pem: &str) -> Result<(), String> {
    let verifier = tls::client_verifier(ca_bundle).map_err(|e| e.to_string())?;
    let chain = tls::certificates(cert_pem).map_err(|e| e.to_string())?;
    verifier.verify_client_cert(&chain[0], &[], UnixTime::now()).map(|_| ()).map_err(|e| e.to_string())
}

/// A kube client as the agent would build it from its bundle.
fn agent_client(bundle: &RegisterResponse) -> anyhow::Result<Client> {
    let mut config = kube::Config::new(bundle.api_server.parse()?);
    if let Some(ca) = &bundle.api_server_ca {
        config.root_cert = Some(tls::certificates(ca)?.into_iter().map(|c| c.to_vec()).collect());
    }
    config.auth_info.token = Some(bundle.token.clone().into());
    Ok(Client::try_from(config)?)
}

struct Operator {
    ctx: Arc<Context>,
    config: RegistrationConfig,
    addr: SocketAddr,
    run_stop: StopSignal,
    _stop: StopSignal,
}

/// The chart's ServiceAccount and RBAC, the ProtectedServer controller (it issues the
/// agent's ServiceAccount), registration's reconciler and its HTTPS endpoint.
async fn start(admin: &Client, op_ns: &str, ns: &str) -> anyhow::Result<Operator> {
    let client = operator_client(admin, op_ns).await?;
    let stop = StopSignal::new();
    let (watches, run_watches) = Watches::new(&client, Some(ns));
    let watching = stop.signal();
    tokio::spawn(async move {
        tokio::select! {
            () = run_watches => {}
            () = watching => {}
        }
    });
    let ctx = Context::new(
        client.clone(),
        Arc::new(Metrics::new()),
        watches.clone(),
        siterecovery_store::backend::AzureConnector::new(Default::default()).map_err(anyhow::Error::msg)?,
    );
    watches.ready().await;
    tokio::spawn(
        Controller::for_shared_stream(watches.servers.applied(None), ctx.servers.clone())
            .graceful_shutdown_on(stop.signal())
            .run(server::reconcile, server::error_policy, ctx.clone())
            .for_each(|_| async {}),
    );
    let mut config = RegistrationConfig::new(op_ns, ApiServerInfo::from_config(&kube::Config::infer().await?, None));
    config.watch_namespace = Some(ns.to_owned());
    config.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.resync = Duration::from_secs(1);
    let run_stop = StopSignal::new();
    tokio::spawn(registration::run(ctx.clone(), config.clone(), run_stop.signal()));
    let endpoint = registration::RegistrationServer::bind(ctx.clone(), config.clone()).await?;
    let addr = endpoint.local_addr();
    assert!(addr.ip().is_loopback());
    tokio::spawn(endpoint.serve(stop.signal()));
    Ok(Operator { ctx, config, addr, run_stop, _stop: stop })
}

#[tokio::test]
async fn registration_with_chart_rbac() -> anyhow::Result<()> {
    let admin = client().await?;
    install_crds(&admin).await?;
    let op_ns = TestNamespace::create(&admin, "reg-op").await?;
    let ns = TestNamespace::create(&admin, "reg").await?;
    let mut operator = start(&admin, &op_ns.name, &ns.name).await?;
    let (ns, op_ns) = (ns.name.as_str(), op_ns.name.as_str());
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let ca_secrets: Api<Secret> = Api::namespaced(admin.clone(), op_ns);
    let servers: Api<ProtectedServer> = Api::namespaced(admin.clone(), ns);
    servers.create(&PostParams::default(), &siterecovery_e2e::fixtures::server("db-01")).await?;

    // The CA is created in the operator's namespace.
    let ca_secret =
        wait_for(&ca_secrets, "siterecovery-ca", WAIT, "CA", has_keys(&["tls.crt", "tls.key", "ca.crt"])).await?;
    let bundle = text(&ca_secret, "ca.crt");
    let ca_info = certs::parse_pem(text(&ca_secret, "tls.crt").as_bytes())?;
    assert!(ca_info.is_ca);
    let ca_years = ca_info.not_after.duration_since(ca_info.not_before).as_hours() / 24 / 365;
    assert_eq!(ca_years, 5, "a 5-year CA");

    // The agent's client certificate chains to it and names the server.
    let tls_secret = wait_for(
        &secrets,
        "sr-agent-db-01-tls",
        WAIT,
        "agent certificate",
        has_keys(&["tls.crt", "tls.key", "ca.crt"]),
    )
    .await?;
    assert_eq!(tls_secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(tls_secret.owner_references()[0].name, "db-01");
    assert_eq!(text(&tls_secret, "ca.crt"), bundle);
    let cert_pem = text(&tls_secret, "tls.crt");
    assert_eq!(verify_client_cert(&bundle, &cert_pem), Ok(()));
    let info = certs::parse_pem(cert_pem.as_bytes())?;
    assert_eq!(info.uris, vec![format!("spiffe://siterecovery.io/ns/{ns}/protectedserver/db-01")]);
    assert_eq!(info.common_name, Some(format!("siterecovery-agent:{ns}:db-01")));
    let days = info.not_after.duration_since(Timestamp::now()).as_hours() / 24;
    assert!((29..=30).contains(&days), "valid ~30 days, got {days}");
    wait_for(&servers, "db-01", WAIT, "certificate expiry in status", |s| {
        s.status
            .as_ref()
            .and_then(|st| st.agent.as_ref())
            .and_then(|a| a.certificate_expiry_time.as_ref())
            .is_some_and(|t| t.0 == info.not_after)
    })
    .await?;
    wait_event(&admin, ns, "db-01", "CertificateIssued", "sr-agent-db-01-tls").await?;

    // A client certificate from any other CA fails verification.
    let foreign = certs::Ca::generate(Timestamp::now(), Duration::from_secs(86400))?;
    let forged = foreign.issue_client(ns, "db-01", Timestamp::now(), Duration::from_secs(86400))?;
    assert!(verify_client_cert(&bundle, &forged.cert_pem).unwrap_err().contains("UnknownIssuer"));

    // The process servers' serving certificate names the headless Service and its pods.
    let ps = wait_for(
        &secrets,
        "siterecovery-process-server-tls",
        WAIT,
        "process-server certificate",
        has_keys(&["tls.crt"]),
    )
    .await?;
    let ps_info = certs::parse_pem(text(&ps, "tls.crt").as_bytes())?;
    for name in [format!("siterecovery-process-server.{ns}.svc"), format!("*.siterecovery-process-server.{ns}.svc")] {
        assert!(ps_info.dns_names.contains(&name), "{name} in {:?}", ps_info.dns_names);
    }

    // A bootstrap token: only its hash in the state, the plaintext for the admin.
    let state = wait_for(&secrets, "sr-bootstrap-db-01", WAIT, "token state", has_keys(&["tokenHash"])).await?;
    let plain = wait_for(&secrets, "sr-bootstrap-db-01-token", WAIT, "token", has_keys(&["token"])).await?;
    let token = text(&plain, "token");
    assert!(token.starts_with("srbt_"));
    assert!(!serde_json::to_string(&state)?.contains(&token), "no plaintext in the state");
    assert_eq!(text(&state, "used"), "false");
    let expires: Timestamp = text(&state, "expiresAt").parse()?;
    let ttl = expires.duration_since(Timestamp::now());
    assert!(ttl > SignedDuration::from_hours(23) && ttl <= SignedDuration::from_hours(24), "24h, got {ttl}");
    assert_eq!(text(&plain, "ca.crt"), bundle);
    let admin_ca = text(&plain, "ca.crt");
    let request: Value = serde_json::from_str(&text(&plain, "request.json"))?;
    assert_eq!(request["hostname"], "db-01.example.com");
    wait_event(&admin, ns, "db-01", "BootstrapTokenIssued", "sr-bootstrap-db-01-token").await?;

    // Refused: the wrong host (403), the wrong token (401); neither consumes the token.
    let mut wrong_host = request.clone();
    wrong_host["hostname"] = json!("web-07.example.com");
    let (code, body) = register(operator.addr, &admin_ca, &wrong_host).await?;
    assert_eq!((code, body["reason"].as_str()), (403, Some("HostnameMismatch")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("spec.agent.hostname"), "{body}");
    wait_event(&admin, ns, "db-01", "HostnameMismatch", "registration refused").await?;
    let mut wrong_token = request.clone();
    wrong_token["token"] = json!("srbt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let (code, body) = register(operator.addr, &admin_ca, &wrong_token).await?;
    assert_eq!((code, body["reason"].as_str()), (401, Some("InvalidToken")), "{body}");
    let (code, body) = register(operator.addr, &admin_ca, &json!({"namespace": ns})).await?;
    assert_eq!((code, body["reason"].as_str()), (400, Some("MalformedRequest")), "{body}");
    assert_eq!(text(&secrets.get("sr-bootstrap-db-01").await?, "used"), "false");

    // Four concurrent registrations with the one token: exactly one succeeds.
    wait_for(&Api::<ServiceAccount>::namespaced(admin.clone(), ns), "sr-agent-db-01", WAIT, "agent SA", |_| true)
        .await?;
    let attempts = (0..4).map(|_| register(operator.addr, &admin_ca, &request));
    let results: Vec<(u16, Value)> = futures::future::try_join_all(attempts).await?;
    // Only status and reason in failure messages: a bundle carries a token and a key.
    let outcomes: Vec<(u16, String)> =
        results.iter().map(|(c, b)| (*c, b["reason"].as_str().unwrap_or("bundle").to_owned())).collect();
    assert_eq!(outcomes.iter().filter(|(c, _)| *c == 200).count(), 1, "{outcomes:?}");
    let refused = outcomes.iter().filter(|(c, r)| *c == 409 && r == "TokenAlreadyUsed").count();
    assert_eq!(refused, 3, "{outcomes:?}");
    let (_, ok) = results.iter().find(|(c, _)| *c == 200).unwrap();
    let bundle_resp: RegisterResponse = serde_json::from_value(ok.clone())?;
    assert_eq!(bundle_resp.client_certificate, cert_pem);
    assert_eq!(bundle_resp.ca_bundle, bundle);
    assert_eq!(bundle_resp.service_account, "sr-agent-db-01");
    assert!(bundle_resp.client_key.contains("PRIVATE KEY"));

    // The ServiceAccount token works: the agent reads its server, and nothing else.
    let agent = agent_client(&bundle_resp)?;
    let mine = Api::<ProtectedServer>::namespaced(agent.clone(), ns).get("db-01").await?;
    assert_eq!(mine.spec.agent.hostname, "db-01.example.com");
    assert!(Api::<Secret>::namespaced(agent.clone(), ns).get("sr-agent-db-01-tls").await.is_err());

    // Used: marked so, plaintext gone, event; a second use is refused with 409.
    let used = secrets.get("sr-bootstrap-db-01").await?;
    assert_eq!((text(&used, "used"), text(&used, "usedByHostname")), ("true".into(), "db-01.example.com".into()));
    wait_gone(&secrets, "sr-bootstrap-db-01-token", WAIT).await?;
    wait_event(&admin, ns, "db-01", "AgentRegistered", "bootstrap token consumed").await?;
    let (code, body) = register(operator.addr, &admin_ca, &request).await?;
    assert_eq!((code, body["reason"].as_str()), (409, Some("TokenAlreadyUsed")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("already used"), "{body}");

    // No token or key in events or status.
    let everything =
        format!("{:?}{}", events_for(&admin, ns, "db-01").await?, serde_json::to_string(&servers.get("db-01").await?)?);
    for secret in [&token, &bundle_resp.token] {
        assert!(!everything.contains(secret.as_str()), "a token leaked into events or status");
    }
    assert!(!everything.contains("PRIVATE KEY"));

    // Deleting the state Secret revokes the agent's token (it is bound to it).
    secrets.delete("sr-bootstrap-db-01", &DeleteParams::default()).await?;
    let mut revoked = false;
    for _ in 0..50 {
        if Api::<ProtectedServer>::namespaced(agent.clone(), ns).get("db-01").await.is_err() {
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(revoked, "a token bound to a deleted Secret is rejected");
    wait_for(&secrets, "sr-bootstrap-db-01-token", WAIT, "a new token for re-registration", has_keys(&["token"]))
        .await?;

    rotation(&admin, &operator, ns, op_ns).await?;
    expiry(&admin, &operator, ns).await?;
    ca_reused(&admin, &mut operator, ns, op_ns, &ca_secret).await?;
    Ok(())
}

/// A certificate within a third of its lifetime of expiry is replaced.
async fn rotation(admin: &Client, operator: &Operator, ns: &str, op_ns: &str) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let ca = registration::ca::load_ca(admin, op_ns).await?.context("CA")?;
    let issued_25_days_ago = Timestamp::now() - SignedDuration::from_hours(25 * 24);
    let old = ca.issue_client(ns, "db-01", issued_25_days_ago, operator.config.leaf_validity)?;
    let mut secret = secrets.get("sr-agent-db-01-tls").await?;
    let data = secret.data.get_or_insert_default();
    data.insert("tls.crt".into(), ByteString(old.cert_pem.clone().into_bytes()));
    data.insert("tls.key".into(), ByteString(old.key_pem.into_bytes()));
    secret.metadata.managed_fields = None;
    secrets.replace("sr-agent-db-01-tls", &PostParams::default(), &secret).await?;
    let rotated = wait_for(&secrets, "sr-agent-db-01-tls", WAIT, "rotated certificate", |s| {
        certs::parse_pem(text(s, "tls.crt").as_bytes())
            .is_ok_and(|i| i.not_after.duration_since(Timestamp::now()) > SignedDuration::from_hours(29 * 24))
    })
    .await?;
    assert_ne!(text(&rotated, "tls.crt"), old.cert_pem);
    assert_eq!(verify_client_cert(&ca.bundle_pem, &text(&rotated, "tls.crt")), Ok(()));
    wait_event(admin, ns, "db-01", "CertificateRotated", "within a third of its lifetime").await
}

/// An expired token is refused with 410 and its plaintext removed.
async fn expiry(admin: &Client, operator: &Operator, ns: &str) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let servers: Api<ProtectedServer> = Api::namespaced(admin.clone(), ns);
    servers.create(&PostParams::default(), &siterecovery_e2e::fixtures::server("web-01")).await?;
    let plain = wait_for(&secrets, "sr-bootstrap-web-01-token", WAIT, "token", has_keys(&["token"])).await?;
    let request: Value = serde_json::from_str(&text(&plain, "request.json"))?;
    // As if its 24 hours had passed.
    let mut state = secrets.get("sr-bootstrap-web-01").await?;
    let an_hour_ago = (Timestamp::now() - SignedDuration::from_hours(1)).to_string();
    state.data.get_or_insert_default().insert("expiresAt".into(), ByteString(an_hour_ago.into_bytes()));
    state.metadata.managed_fields = None;
    secrets.replace("sr-bootstrap-web-01", &PostParams::default(), &state).await?;
    let (code, body) = register(operator.addr, &text(&plain, "ca.crt"), &request).await?;
    assert_eq!((code, body["reason"].as_str()), (410, Some("TokenExpired")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("delete Secret sr-bootstrap-web-01"), "{body}");
    wait_event(admin, ns, "web-01", "TokenExpired", "registration refused").await?;
    wait_gone(&secrets, "sr-bootstrap-web-01-token", WAIT).await?;
    wait_event(admin, ns, "web-01", "BootstrapTokenExpired", "expired unused").await
}

/// A restarted reconciler reuses the CA and keeps valid certificates.
async fn ca_reused(
    admin: &Client,
    operator: &mut Operator,
    ns: &str,
    op_ns: &str,
    first: &Secret,
) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let agent_cert = secrets.get("sr-agent-db-01-tls").await?;
    operator.run_stop = StopSignal::new(); // the old one stops its reconciler on drop
    secrets.delete("siterecovery-process-server-tls", &DeleteParams::default()).await?;
    tokio::spawn(registration::run(operator.ctx.clone(), operator.config.clone(), operator.run_stop.signal()));
    wait_for(
        &secrets,
        "siterecovery-process-server-tls",
        WAIT,
        "re-issued by the new reconciler",
        has_keys(&["tls.crt"]),
    )
    .await?;
    let ca = Api::<Secret>::namespaced(admin.clone(), op_ns).get("siterecovery-ca").await?;
    assert_eq!(ca.metadata.uid, first.metadata.uid, "created once");
    assert_eq!(text(&ca, "tls.key"), text(first, "tls.key"), "reused, not regenerated");
    assert_eq!(ca.resource_version(), first.resource_version(), "never rewritten");
    let again = secrets.get("sr-agent-db-01-tls").await?;
    assert_eq!(again.resource_version(), agent_cert.resource_version(), "a valid certificate is kept");
    Ok(())
}
