//! `POST /register` over HTTPS: exchanges a bootstrap token for the agent's bundle,
//! once. See `docs/agent-registration.md` for the protocol.
//!
//! Order of a registration: validate the body → read the ProtectedServer and the token
//! state → decide (pure, `decide::check_registration`) → collect the bundle (client
//! certificate, a ServiceAccount token bound to the state Secret) → mark the token used
//! with the `resourceVersion` it was read at → answer. Nothing is consumed unless the
//! whole bundle could be built, and of concurrent requests with one token exactly one
//! wins the compare-and-swap; the others re-read and are refused with 409.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec, TokenRequestStatus};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use kube::runtime::events::EventType;
use serde::{Deserialize, Serialize};
use siterecovery_api::ProtectedServer;
use tokio::net::TcpListener;
use tracing::{info, warn};

use super::bootstrap::{self, Stored};
use super::ca::{ensure_ca, load_ca};
use super::certs::{self, Ca};
use super::decide::{self, Refusal, RegisterRequest};
use super::error::Error;
use super::reconcile::publish;
use super::tls::{self, AgentVerifier, Peer, ServingCert, TlsListener};
use super::token::{BootstrapToken, Usage};
use super::{PROCESS_SERVER_SERVICE, RegistrationConfig, bootstrap_secret_name, client_tls_secret_name};
use crate::context::Context;
use crate::server::identity;

/// Largest accepted request body; a registration is a few hundred bytes.
const MAX_BODY: usize = 16 * 1024;
/// Attempts at the compare-and-swap when other writes to the state Secret interleave.
const ATTEMPTS: usize = 3;

/// What a successful registration returns: everything the agent needs to talk to the
/// API server and to its process server. `Debug` redacts the token and key.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    /// Namespace of the ProtectedServer.
    pub namespace: String,
    /// Name of the ProtectedServer.
    pub name: String,
    /// The agent's ServiceAccount.
    pub service_account: String,
    /// API server URL.
    pub api_server: String,
    /// PEM CA bundle of the API server, when it is not publicly trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_server_ca: Option<String>,
    /// ServiceAccount token, bound to the bootstrap state Secret (deleting that Secret
    /// revokes it).
    pub token: String,
    /// When the token expires.
    pub token_expiration_time: String,
    /// PEM client certificate for mTLS to process servers.
    pub client_certificate: String,
    /// Its PEM private key.
    pub client_key: String,
    /// When the client certificate expires.
    pub client_certificate_expiry_time: String,
    /// PEM bundle of the operator CA: verifies process servers (and this endpoint).
    pub ca_bundle: String,
    /// DNS name of the namespace's process servers.
    pub process_server: String,
}

impl std::fmt::Debug for RegisterResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterResponse")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("api_server", &self.api_server)
            .field("token", &"<redacted>")
            .field("client_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The JSON body of a request.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Body {
    namespace: String,
    name: String,
    token: String,
    hostname: String,
    #[serde(default)]
    machine_id: Option<String>,
}

pub(super) struct Endpoint {
    pub(super) ctx: Arc<Context>,
    pub(super) config: RegistrationConfig,
}

/// The registration endpoint, bound and ready to serve.
pub struct RegistrationServer {
    listener: TlsListener,
    endpoint: Arc<Endpoint>,
    serving: Arc<ServingCert>,
    serving_issuer: Vec<u8>,
    serving_renew_at: Timestamp,
    clients: Arc<AgentVerifier>,
    trusted_bundle: String,
}

impl RegistrationServer {
    /// Ensures the CA, issues the endpoint's serving certificate for
    /// `config.serving_names`, and binds `config.listen_addr`.
    pub async fn bind(ctx: Arc<Context>, config: RegistrationConfig) -> Result<Self, Error> {
        let now = Timestamp::now();
        let ca = ensure_ca(&ctx.client, &config, now).await?;
        let (key, info) = serving_cert(&ca, &config, now)?;
        let serving = ServingCert::new(key);
        let clients = tls::agent_verifier(&ca.bundle_pem)?;
        let tcp = TcpListener::bind(config.listen_addr).await?;
        let listener = TlsListener::new(tcp, tls::server_config(serving.clone(), clients.clone())?)?;
        info!(addr = %listener_addr(&listener), "agent registration endpoint listening (HTTPS)");
        Ok(Self {
            listener,
            endpoint: Arc::new(Endpoint { ctx, config }),
            serving,
            serving_issuer: info.issuer,
            serving_renew_at: decide::renew_at(info.not_before, info.not_after),
            clients,
            trusted_bundle: ca.bundle_pem,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        listener_addr(&self.listener)
    }

    /// Serves until `stopped` resolves; renews its own certificate as it goes.
    pub async fn serve(self, stopped: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let refresher = tokio::spawn(refresh_tls(
            self.endpoint.clone(),
            Refreshed {
                serving: self.serving.clone(),
                issuer: self.serving_issuer,
                renew: self.serving_renew_at,
                clients: self.clients.clone(),
                bundle: self.trusted_bundle,
            },
        ));
        let app = Router::new()
            .route("/register", post(register))
            .route("/renew", post(super::renewal::renew))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(self.endpoint);
        let result = axum::serve(self.listener, app.into_make_service_with_connect_info::<Peer>())
            .with_graceful_shutdown(stopped)
            .await;
        refresher.abort();
        Ok(result?)
    }
}

/// Binds and serves the registration endpoint until `stopped` resolves.
pub async fn serve_registration(
    ctx: Arc<Context>,
    config: RegistrationConfig,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    RegistrationServer::bind(ctx, config).await?.serve(stopped).await
}

fn listener_addr(listener: &TlsListener) -> SocketAddr {
    axum::serve::Listener::local_addr(listener).unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn serving_cert(
    ca: &Ca,
    config: &RegistrationConfig,
    now: Timestamp,
) -> Result<(Arc<tokio_rustls::rustls::sign::CertifiedKey>, certs::CertInfo), Error> {
    let issued = ca.issue_serving(&config.serving_names, now, config.leaf_validity)?;
    Ok((tls::certified_key(&issued)?, certs::parse_pem(issued.cert_pem.as_bytes())?))
}

/// What the endpoint's TLS currently uses, kept up to date by [`refresh_tls`].
struct Refreshed {
    serving: Arc<ServingCert>,
    issuer: Vec<u8>,
    renew: Timestamp,
    clients: Arc<AgentVerifier>,
    bundle: String,
}

/// Re-issues the endpoint's certificate when it enters its last third or the signing
/// CA changed (it lives in memory only, nobody else needs it), and trusts client
/// certificates of every CA in the current bundle (a CA rotation stages a new one).
async fn refresh_tls(endpoint: Arc<Endpoint>, mut tls: Refreshed) {
    loop {
        tokio::time::sleep(Duration::from_secs(300)).await;
        let now = Timestamp::now();
        let ca = match load_ca(&endpoint.ctx.client, &endpoint.config.operator_namespace).await {
            Ok(Some(ca)) => ca,
            Ok(None) => continue,
            Err(e) => {
                warn!(error = %e, "cannot read the CA to renew the registration endpoint's certificate");
                continue;
            }
        };
        if ca.bundle_pem != tls.bundle {
            match tls::optional_verifier(&ca.bundle_pem).map(|v| tls.clients.replace(v)) {
                Ok(()) => {
                    tls.bundle.clone_from(&ca.bundle_pem);
                    info!("registration endpoint trusts the new CA bundle for client certificates");
                }
                Err(e) => warn!(error = %e, "cannot load the new CA bundle for client certificates"),
            }
        }
        if now < tls.renew && ca.info.subject == tls.issuer {
            continue;
        }
        match serving_cert(&ca, &endpoint.config, now) {
            Ok((key, info)) => {
                tls.serving.replace(key);
                (tls.issuer, tls.renew) = (info.issuer, decide::renew_at(info.not_before, info.not_after));
                info!(not_after = %info.not_after, "registration endpoint certificate renewed");
            }
            Err(e) => warn!(error = %e, "cannot renew the registration endpoint's certificate"),
        }
    }
}

async fn register(
    State(endpoint): State<Arc<Endpoint>>,
    ConnectInfo(Peer { addr: peer, .. }): ConnectInfo<Peer>,
    body: Bytes,
) -> Response {
    let req = match parse(&body) {
        Ok(req) => req,
        Err(refusal) => {
            info!(%peer, reason = refusal.reason(), "registration refused");
            return refuse(&refusal, "");
        }
    };
    let state_secret = bootstrap_secret_name(&req.name);
    match handle(&endpoint, &req, peer).await {
        Ok(bundle) => json_response(StatusCode::OK, &bundle),
        Err((refusal, server)) => {
            let message = refusal.message(&state_secret);
            warn!(%peer, namespace = %req.namespace, server = %req.name, hostname = %req.hostname,
                  reason = refusal.reason(), detail = %message, "registration refused");
            if let Some(server) = server
                && !matches!(refusal, Refusal::NotReady(_))
            {
                // The reason is the refusal's own: events with one reason fold into a single
                // series that keeps its first note, which would hide a different refusal.
                let note = format!("registration refused: {message} (from {peer}, hostname {:?})", req.hostname);
                publish(&endpoint.ctx, &server, EventType::Warning, refusal.reason(), note).await;
            }
            refuse(&refusal, &state_secret)
        }
    }
}

fn parse(body: &[u8]) -> Result<RegisterRequest, Refusal> {
    // serde's message names the field and position, never the value.
    let body: Body = serde_json::from_slice(body).map_err(|e| Refusal::Malformed(format!("body: {e}")))?;
    let req = RegisterRequest {
        namespace: body.namespace,
        name: body.name,
        token: BootstrapToken::from_plaintext(body.token),
        hostname: body.hostname,
        machine_id: body.machine_id,
    };
    decide::validate(&req)?;
    Ok(req)
}

pub(super) fn refuse(refusal: &Refusal, state_secret: &str) -> Response {
    let body = serde_json::json!({"reason": refusal.reason(), "message": refusal.message(state_secret)});
    let mut response = json_response(refusal.status(), &body);
    if matches!(refusal, Refusal::NotReady(_)) {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

/// A JSON answer that no proxy or client may cache (it may carry credentials).
pub(super) fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    (status, headers, bytes).into_response()
}

type Refused = (Refusal, Option<ProtectedServer>);

pub(super) fn unavailable(what: &str, e: impl std::fmt::Display) -> Refusal {
    warn!(error = %e, "{what}");
    Refusal::NotReady(format!("{what} (the Kubernetes API failed)"))
}

async fn handle(endpoint: &Endpoint, req: &RegisterRequest, peer: SocketAddr) -> Result<RegisterResponse, Refused> {
    let client = &endpoint.ctx.client;
    let servers: Api<ProtectedServer> = Api::namespaced(client.clone(), &req.namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &req.namespace);
    let server =
        servers.get_opt(&req.name).await.map_err(|e| (unavailable("cannot read the ProtectedServer", e), None))?;
    let fail = |refusal: Refusal| (refusal, server.clone());
    for _ in 0..ATTEMPTS {
        let stored = bootstrap::get_state(&secrets, &req.namespace, &req.name)
            .await
            .map_err(|e| fail(unavailable("cannot read the bootstrap token state", e)))?;
        let now = Timestamp::now();
        decide::check_registration(server.as_ref(), stored.as_ref().map(|s| &s.state), req, now).map_err(&fail)?;
        let (Some(server), Some(stored)) = (server.as_ref(), stored) else { unreachable!("checked above") };
        let mut bundle = collect_bundle(endpoint, server, &stored).await.map_err(&fail)?;
        let usage = Usage { at: now, hostname: req.hostname.to_ascii_lowercase(), machine_id: req.machine_id.clone() };
        let won = bootstrap::mark_used(&secrets, &stored, usage)
            .await
            .map_err(|e| fail(unavailable("cannot mark the bootstrap token used", e)))?;
        if !won {
            continue; // Another write came first: re-read; a used token is refused above.
        }
        if let Err(e) = bootstrap::delete_plaintext(&secrets, &req.name).await {
            warn!(error = %e, "token used, but its plaintext Secret could not be deleted yet (retried by the reconciler)");
        }
        info!(%peer, namespace = %req.namespace, server = %req.name, hostname = %req.hostname, "agent registered");
        let note = format!(
            "agent on {} registered from {peer}; bootstrap token consumed, client certificate valid until {}",
            req.hostname, bundle.client_certificate_expiry_time
        );
        publish(&endpoint.ctx, server, EventType::Normal, "AgentRegistered", note).await;
        bundle.namespace.clone_from(&req.namespace);
        return Ok(bundle);
    }
    Err(fail(Refusal::NotReady("the bootstrap token state kept changing".into())))
}

/// Everything the agent gets, read or minted before the token is consumed.
async fn collect_bundle(
    endpoint: &Endpoint,
    server: &ProtectedServer,
    stored: &Stored,
) -> Result<RegisterResponse, Refusal> {
    let (ns, name) = (server.namespace().unwrap_or_default(), server.name_any());
    let client = &endpoint.ctx.client;
    let tls_name = client_tls_secret_name(&name);
    let tls = Api::<Secret>::namespaced(client.clone(), &ns)
        .get_opt(&tls_name)
        .await
        .map_err(|e| unavailable("cannot read the agent certificate", e))?;
    let data = tls.and_then(|s| s.data).unwrap_or_default();
    let text = |k: &str| data.get(k).and_then(|v| String::from_utf8(v.0.clone()).ok());
    let (Some(cert), Some(key), Some(ca_bundle)) = (text("tls.crt"), text("tls.key"), text("ca.crt")) else {
        return Err(Refusal::NotReady(format!("the agent certificate (Secret {tls_name}) is not issued yet")));
    };
    let expiry = certs::parse_pem(cert.as_bytes()).map(|i| i.not_after.to_string()).unwrap_or_default();

    let (service_account, minted) = mint_token(endpoint, server, &stored.secret).await?;
    Ok(RegisterResponse {
        namespace: ns.clone(),
        name,
        service_account,
        api_server: endpoint.config.api_server.url.clone(),
        api_server_ca: endpoint.config.api_server.ca_pem.clone(),
        token: minted.token,
        token_expiration_time: minted.expiration_timestamp.0.to_string(),
        client_certificate: cert,
        client_key: key,
        client_certificate_expiry_time: expiry,
        ca_bundle,
        process_server: format!("{PROCESS_SERVER_SERVICE}.{ns}.svc"),
    })
}

/// A ServiceAccount token for the server's agent, bound to `state` (the bootstrap state
/// Secret: deleting it revokes the token); returns the ServiceAccount's name and it.
pub(super) async fn mint_token(
    endpoint: &Endpoint,
    server: &ProtectedServer,
    state: &Secret,
) -> Result<(String, TokenRequestStatus), Refusal> {
    let ns = server.namespace().unwrap_or_default();
    let service_account = identity::agent_name(server);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(endpoint.config.agent_token_ttl.as_secs() as i64),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Secret".into()),
                name: state.metadata.name.clone(),
                uid: state.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let minted = Api::<ServiceAccount>::namespaced(endpoint.ctx.client.clone(), &ns)
        .create_token_request(&service_account, &PostParams::default(), &request)
        .await;
    match minted {
        Ok(response) => {
            Ok((service_account, response.status.ok_or_else(|| unavailable("TokenRequest", "answer without status"))?))
        }
        Err(kube::Error::Api(s)) if s.code == 404 => {
            Err(Refusal::NotReady(format!("the agent ServiceAccount {service_account} is not created yet")))
        }
        Err(e) => Err(unavailable("cannot mint the agent's ServiceAccount token", e)),
    }
}
