//! `POST /renew` over mutual TLS: an agent presents its current client certificate and
//! gets a new one, the current CA bundle and a fresh ServiceAccount token. See
//! `docs/agent-registration.md` for the protocol.
//!
//! Order of a renewal: the TLS handshake verified the certificate against the operator
//! CA bundle → map it to its ProtectedServer (URI SAN) → read the server, the bootstrap
//! state and the agent certificate Secret → decide (pure, `decide::check_renewal`) →
//! mint the token → issue the certificate → store it with a `replace` carrying the
//! `resourceVersion` read → answer. Nothing is changed unless the whole bundle could be
//! built, and of concurrent renewals with one certificate exactly one wins the
//! compare-and-swap; the others re-read, find their certificate superseded and are
//! refused.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::Response;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::events::EventType;
use siterecovery_api::ProtectedServer;
use tracing::{info, warn};

use super::bootstrap;
use super::ca::load_ca;
use super::certs;
use super::decide::{self, Refusal, RenewalFacts};
use super::endpoint::{Endpoint, RegisterResponse, json_response, mint_token, refuse, unavailable};
use super::reconcile::{managed, publish_as, record_expiry};
use super::tls::{self, Peer};
use super::{PROCESS_SERVER_SERVICE, bootstrap_secret_name, client_tls_secret_name};

/// Attempts at the compare-and-swap when other writes to the certificate Secret
/// interleave (a trust-bundle update by the reconciler, say).
const ATTEMPTS: usize = 3;

type Refused = (Refusal, Option<ProtectedServer>);

/// The handler of `POST /renew`; the body is ignored (the certificate is the request).
pub(super) async fn renew(State(endpoint): State<Arc<Endpoint>>, ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    let now = Timestamp::now();
    let presented = match peer.client_cert.as_deref().map(|der| certs::parse_der(der)).transpose() {
        Ok(info) => info,
        Err(_) => return refuse(&Refusal::NotAnAgentCertificate("cannot be read".into()), ""),
    };
    let (namespace, name) = match decide::renewal_subject(presented.as_ref(), now) {
        Ok(agent) => agent,
        Err(refusal) => {
            info!(peer = %peer.addr, reason = refusal.reason(), "renewal refused");
            return refuse(&refusal, "");
        }
    };
    let Some(der) = peer.client_cert.as_deref() else { unreachable!("renewal_subject needs a certificate") };
    let state_secret = bootstrap_secret_name(&name);
    match handle(&endpoint, &namespace, &name, der, peer.addr).await {
        Ok(bundle) => json_response(StatusCode::OK, &bundle),
        Err((refusal, server)) => {
            let message = refusal.message(&state_secret);
            warn!(peer = %peer.addr, %namespace, server = %name, reason = refusal.reason(), detail = %message,
                  "renewal refused");
            if let Some(server) = server
                && !matches!(refusal, Refusal::NotReady(_))
            {
                // The refusal reason is the event reason: the recorder folds repeats of one
                // reason into a series that keeps the first note, and a superseded
                // certificate (copied credentials?) must not hide behind an earlier refusal.
                let note = format!("renewal refused: {message} (from {})", peer.addr);
                publish_as(&endpoint.ctx, &server, "Renew", EventType::Warning, refusal.reason(), note).await;
            }
            refuse(&refusal, &state_secret)
        }
    }
}

async fn handle(
    endpoint: &Endpoint,
    ns: &str,
    name: &str,
    presented: &[u8],
    peer: SocketAddr,
) -> Result<RegisterResponse, Refused> {
    let client = &endpoint.ctx.client;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let server = Api::<ProtectedServer>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| (unavailable("cannot read the ProtectedServer", e), None))?;
    let fail = |refusal: Refusal| (refusal, server.clone());
    let tls_name = client_tls_secret_name(name);
    for _ in 0..ATTEMPTS {
        let stored = bootstrap::get_state(&secrets, ns, name)
            .await
            .map_err(|e| fail(unavailable("cannot read the bootstrap token state", e)))?;
        let current =
            secrets.get_opt(&tls_name).await.map_err(|e| fail(unavailable("cannot read the agent certificate", e)))?;
        let current_der = current
            .as_ref()
            .and_then(|s| s.data.as_ref()?.get("tls.crt"))
            .and_then(|pem| tls::certificates(std::str::from_utf8(&pem.0).ok()?).ok()?.into_iter().next());
        let facts = RenewalFacts {
            server: server.as_ref(),
            state: stored.as_ref().map(|s| &s.state),
            presented_der: presented,
            current_der: current_der.as_deref(),
            managed: current.as_ref().is_some_and(managed),
            certificate_secret: &tls_name,
        };
        decide::check_renewal(&facts).map_err(&fail)?;
        let (Some(server), Some(stored), Some(current)) = (server.as_ref(), stored, current) else {
            unreachable!("checked above")
        };

        let now = Timestamp::now();
        let ca = match load_ca(client, &endpoint.config.operator_namespace).await {
            Ok(Some(ca)) => ca,
            Ok(None) => return Err(fail(Refusal::NotReady("the operator CA does not exist yet".into()))),
            Err(e) => return Err(fail(unavailable("cannot read the operator CA", e))),
        };
        // The token first: should minting fail, the agent's certificate stays current
        // and it can simply retry.
        let (service_account, minted) = mint_token(endpoint, server, &stored.secret).await.map_err(&fail)?;
        let issued = ca
            .issue_client(ns, name, now, endpoint.config.leaf_validity)
            .map_err(|e| fail(unavailable("cannot issue the agent certificate", e)))?;
        let info = certs::parse_pem(issued.cert_pem.as_bytes())
            .map_err(|e| fail(unavailable("cannot read the issued certificate", e)))?;

        let mut secret = current;
        secret.metadata.managed_fields = None;
        let data = secret.data.get_or_insert_default();
        for (key, value) in [("tls.crt", &issued.cert_pem), ("tls.key", &issued.key_pem), ("ca.crt", &ca.bundle_pem)] {
            data.insert(key.to_owned(), ByteString(value.clone().into_bytes()));
        }
        match secrets.replace(&tls_name, &PostParams::default(), &secret).await {
            Ok(_) => {}
            // Written meanwhile: re-read; if another renewal won, this one is refused.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(fail(unavailable("cannot store the renewed agent certificate", e))),
        }
        if let Err(e) = record_expiry(server, info.not_after, &endpoint.ctx).await {
            warn!(error = %e, "certificate renewed, but its expiry could not be recorded in status yet");
        }
        info!(%peer, namespace = %ns, server = %name, not_after = %info.not_after, "agent certificate renewed");
        let note = format!(
            "agent renewed from {peer}: new client certificate in {tls_name}, valid until {}; fresh ServiceAccount \
             token until {}",
            info.not_after, minted.expiration_timestamp.0
        );
        publish_as(&endpoint.ctx, server, "Renew", EventType::Normal, "CertificateRenewed", note).await;
        return Ok(RegisterResponse {
            namespace: ns.to_owned(),
            name: name.to_owned(),
            service_account,
            api_server: endpoint.config.api_server.url.clone(),
            api_server_ca: endpoint.config.api_server.ca_pem.clone(),
            token: minted.token,
            token_expiration_time: minted.expiration_timestamp.0.to_string(),
            client_certificate: issued.cert_pem,
            client_key: issued.key_pem,
            client_certificate_expiry_time: info.not_after.to_string(),
            ca_bundle: ca.bundle_pem,
            process_server: format!("{PROCESS_SERVER_SERVICE}.{ns}.svc"),
        });
    }
    Err(fail(Refusal::NotReady("the agent certificate Secret kept changing".into())))
}
