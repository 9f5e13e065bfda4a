//! Agent renewal (`POST /renew` over mutual TLS) against the real local API server, with
//! a client for the Helm chart's ServiceAccount (so the chart's RBAC is proven
//! sufficient): an agent registers, then renews with the certificate it was given and
//! gets a later certificate from the operator CA (also stored in its Secret), the trust
//! bundle and a working ServiceAccount token. Refused: no certificate (401), a
//! certificate from another CA or self-signed (the TLS handshake fails), the superseded
//! certificate (403), a revoked registration (403), a server being deleted (403) or
//! gone (410); each refusal of a known server is a Warning event named after its reason.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
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
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, ServerName, UnixTime};

const WAIT: Duration = Duration::from_secs(30);
/// Holds the server in deletion so the "being deleted" answer can be observed.
const HOLD: &str = "test.siterecovery.io/hold";

fn text(secret: &Secret, key: &str) -> String {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        .unwrap_or_default()
}

/// A client certificate and key, PEM.
struct Identity<'a> {
    cert: &'a str,
    key: &'a str,
}

/// `POST <path>` over HTTPS, verifying the endpoint with `ca_pem`, presenting `identity`
/// when given; returns (status, JSON body), or the error of a refused handshake.
async fn post(
    addr: SocketAddr,
    ca_pem: &str,
    path: &str,
    body: &Value,
    identity: Option<Identity<'_>>,
) -> anyhow::Result<(u16, Value)> {
    let builder = ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(tls::root_store(ca_pem)?);
    let config = match identity {
        Some(id) => builder
            .with_client_auth_cert(tls::certificates(id.cert)?, PrivateKeyDer::from_pem_slice(id.key.as_bytes())?)?,
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut stream = TlsConnector::from(Arc::new(config)).connect(ServerName::try_from("localhost")?, tcp).await?;
    let body = serde_json::to_vec(body)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    let mut raw = Vec::new();
    // A client certificate is checked after the client's handshake completed (TLS 1.3):
    // a refusal arrives as an alert on the first read.
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

async fn renew(addr: SocketAddr, ca_pem: &str, identity: Option<Identity<'_>>) -> anyhow::Result<(u16, Value)> {
    post(addr, ca_pem, "/renew", &json!({}), identity).await
}

/// Status and reason only: a successful answer carries a token and a key.
fn outcome(result: &(u16, Value)) -> (u16, String) {
    (result.0, result.1["reason"].as_str().unwrap_or("bundle").to_owned())
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

/// The chart's RBAC, the ProtectedServer controller (it creates the agent's
/// ServiceAccount), registration's reconciler and its endpoint; returns the endpoint's
/// address and what stops them.
async fn start(admin: &Client, op_ns: &str, ns: &str) -> anyhow::Result<(SocketAddr, StopSignal)> {
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
    tokio::spawn(registration::run(ctx.clone(), config.clone(), stop.signal()));
    let endpoint = registration::RegistrationServer::bind(ctx, config).await?;
    let addr = endpoint.local_addr();
    assert!(addr.ip().is_loopback());
    tokio::spawn(endpoint.serve(stop.signal()));
    Ok((addr, stop))
}

#[tokio::test]
async fn renewal_over_mutual_tls() -> anyhow::Result<()> {
    let admin = client().await?;
    install_crds(&admin).await?;
    let op_ns = TestNamespace::create(&admin, "renew-op").await?;
    let ns = TestNamespace::create(&admin, "renew").await?;
    let (addr, _stop) = start(&admin, &op_ns.name, &ns.name).await?;
    let (ns, op_ns) = (ns.name.as_str(), op_ns.name.as_str());
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let servers: Api<ProtectedServer> = Api::namespaced(admin.clone(), ns);
    servers
        .create(&PostParams::default(), &{
            let mut s = siterecovery_e2e::fixtures::server("db-01");
            s.spec.retain_data = true;
            s
        })
        .await?;

    // Register (no client certificate: optional at the TLS layer).
    let plain = wait_for(&secrets, "sr-bootstrap-db-01-token", WAIT, "token", |s| !text(s, "token").is_empty()).await?;
    let ca_pem = text(&plain, "ca.crt");
    let request: Value = serde_json::from_str(&text(&plain, "request.json"))?;
    wait_for(&Api::<ServiceAccount>::namespaced(admin.clone(), ns), "sr-agent-db-01", WAIT, "agent SA", |_| true)
        .await?;
    let registered = post(addr, &ca_pem, "/register", &request, None).await?;
    assert_eq!(outcome(&registered), (200, "bundle".into()));
    let first: RegisterResponse = serde_json::from_value(registered.1)?;
    let first_id = || Identity { cert: &first.client_certificate, key: &first.client_key };

    // Without a certificate: 401, and nothing about any server is revealed.
    let anonymous = renew(addr, &ca_pem, None).await?;
    assert_eq!(outcome(&anonymous), (401, "ClientCertificateRequired".into()));

    // Certificates carry whole seconds: let one pass so the new notAfter is later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let renewed = renew(addr, &ca_pem, Some(first_id())).await?;
    assert_eq!(outcome(&renewed), (200, "bundle".into()));
    let second: RegisterResponse = serde_json::from_value(renewed.1)?;
    let (old, new) = (
        certs::parse_pem(first.client_certificate.as_bytes())?,
        certs::parse_pem(second.client_certificate.as_bytes())?,
    );
    assert!(new.not_after > old.not_after, "{} > {}", new.not_after, old.not_after);
    assert_eq!(new.uris, old.uris, "names the same server");
    assert_ne!(second.client_key, first.client_key, "a new key");
    let ca_bundle = text(&Api::<Secret>::namespaced(admin.clone(), op_ns).get("siterecovery-ca").await?, "ca.crt");
    assert_eq!(second.ca_bundle, ca_bundle, "the current trust bundle");
    assert_eq!(verify_client_cert(&ca_bundle, &second.client_certificate), Ok(()));
    assert_eq!(second.client_certificate_expiry_time, new.not_after.to_string());
    assert_eq!((second.namespace.as_str(), second.name.as_str()), (ns, "db-01"));

    // Stored back, so the operator's view is the agent's; expiry in status; an event.
    let stored = secrets.get("sr-agent-db-01-tls").await?;
    assert_eq!(text(&stored, "tls.crt"), second.client_certificate);
    assert_eq!(text(&stored, "tls.key"), second.client_key);
    assert_eq!(text(&stored, "ca.crt"), ca_bundle);
    wait_for(&servers, "db-01", WAIT, "renewed expiry in status", |s| {
        s.status
            .as_ref()
            .and_then(|st| st.agent.as_ref())
            .and_then(|a| a.certificate_expiry_time.as_ref())
            .is_some_and(|t| t.0 == new.not_after)
    })
    .await?;
    wait_event(&admin, ns, "db-01", "CertificateRenewed", "sr-agent-db-01-tls").await?;

    // The fresh ServiceAccount token works, and only for the agent's own server.
    let agent = agent_client(&second)?;
    assert_eq!(Api::<ProtectedServer>::namespaced(agent.clone(), ns).get("db-01").await?.name_any(), "db-01");
    assert!(Api::<Secret>::namespaced(agent.clone(), ns).get("sr-agent-db-01-tls").await.is_err());
    let expires: Timestamp = second.token_expiration_time.parse()?;
    assert!(expires > Timestamp::now());

    // The certificate renewed from is spent: a copy of it is refused, visibly.
    let replay = renew(addr, &ca_pem, Some(first_id())).await?;
    assert_eq!(outcome(&replay), (403, "CertificateSuperseded".into()));
    assert!(replay.1["message"].as_str().unwrap().contains("delete Secrets sr-bootstrap-db-01 and sr-agent-db-01-tls"));
    wait_event(&admin, ns, "db-01", "CertificateSuperseded", "renewal refused").await?;

    // Another CA's certificate, or a self-signed one: refused in the TLS handshake.
    let foreign = certs::Ca::generate(Timestamp::now(), Duration::from_secs(86400))?;
    let forged = foreign.issue_client(ns, "db-01", Timestamp::now(), Duration::from_secs(86400))?;
    let refused = renew(addr, &ca_pem, Some(Identity { cert: &forged.cert_pem, key: &forged.key_pem })).await;
    let error = refused.map(|r| outcome(&r)).expect_err("a foreign certificate is refused");
    assert!(format!("{error:#}").contains("UnknownCA"), "{error:#}");
    let own = rcgen::generate_simple_self_signed(vec!["db-01.example.com".to_owned()])?;
    let (own_cert, own_key) = (own.cert.pem(), own.signing_key.serialize_pem());
    let refused = renew(addr, &ca_pem, Some(Identity { cert: &own_cert, key: &own_key })).await;
    assert!(refused.map(|r| outcome(&r)).is_err(), "a self-signed certificate is refused");

    // Renewal goes on from the renewed certificate.
    let third =
        renew(addr, &ca_pem, Some(Identity { cert: &second.client_certificate, key: &second.client_key })).await?;
    assert_eq!(outcome(&third), (200, "bundle".into()));
    let third: RegisterResponse = serde_json::from_value(third.1)?;
    let third_id = || Identity { cert: &third.client_certificate, key: &third.client_key };

    // No token or key in events or status.
    let everything =
        format!("{:?}{}", events_for(&admin, ns, "db-01").await?, serde_json::to_string(&servers.get("db-01").await?)?);
    for secret in [&first.token, &second.token, &third.token] {
        assert!(!everything.contains(secret.as_str()), "a token leaked into events or status");
    }
    assert!(!everything.contains("PRIVATE KEY"));

    // Revoking the registration (deleting the state Secret) revokes renewal too: a
    // token bound to the new state Secret must not reach the revoked agent.
    secrets.delete("sr-bootstrap-db-01", &DeleteParams::default()).await?;
    wait_for(&secrets, "sr-bootstrap-db-01", WAIT, "a new, unused token state", |s| text(s, "used") == "false").await?;
    let revoked = renew(addr, &ca_pem, Some(third_id())).await?;
    assert_eq!(outcome(&revoked), (403, "NotRegistered".into()));
    wait_event(&admin, ns, "db-01", "NotRegistered", "renewal refused").await?;

    // A server being deleted (held by a finalizer), then gone.
    servers.patch("db-01", &PatchParams::apply("renewal-test"), &Patch::Apply(&json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer", "metadata": {"name": "db-01", "finalizers": [HOLD]}
    }))).await?;
    servers.delete("db-01", &DeleteParams::default()).await?;
    wait_for(&servers, "db-01", WAIT, "deletion under way", |s| s.metadata.deletion_timestamp.is_some()).await?;
    let deleting = renew(addr, &ca_pem, Some(third_id())).await?;
    assert_eq!(outcome(&deleting), (403, "ServerDeleting".into()));
    wait_event(&admin, ns, "db-01", "ServerDeleting", "renewal refused").await?;
    servers.patch("db-01", &PatchParams::apply("renewal-test").force(), &Patch::Apply(&json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer", "metadata": {"name": "db-01", "finalizers": []}
    }))).await?;
    wait_gone(&servers, "db-01", WAIT).await?;
    let gone = renew(addr, &ca_pem, Some(third_id())).await?;
    assert_eq!(outcome(&gone), (410, "ServerGone".into()));
    Ok(())
}
