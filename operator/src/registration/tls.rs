//! TLS for the registration endpoint (axum serves plain TCP; this module puts rustls in
//! front of it), and the helpers a process server uses to accept only agents with a
//! certificate from the operator CA.
//!
//! The endpoint asks for a client certificate but does not require one: `/register`
//! is reached without (the agent has none yet), `/renew` only with one. A certificate
//! that is presented must chain to the operator CA, else the handshake fails; the
//! handler sees the verified leaf in [`Peer::client_cert`].
//!
//! The provider is always aws-lc-rs, as for the operator's API client, chosen
//! explicitly so a second provider compiled into the binary can never make rustls
//! pick at random.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::server::danger::ClientCertVerifier;
use tokio_rustls::rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tracing::debug;

use super::certs::KeyedCert;
use super::error::Error;

/// A client has this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections are closed at once, so slow
/// or idle clients cannot exhaust the operator.
const MAX_HANDSHAKES: usize = 64;

pub use siterecovery_wire::tls::{ServingCert, SwappableVerifier, provider};

/// Every certificate of a PEM bundle, as DER.
pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    Ok(siterecovery_wire::tls::certificates(pem)?)
}

/// A root store of the CA bundle (the operator CA's `ca.crt`).
pub fn root_store(ca_bundle_pem: &str) -> Result<RootCertStore, Error> {
    Ok(siterecovery_wire::tls::root_store(ca_bundle_pem)?)
}

/// What a process server puts in its rustls `ServerConfig`: requires a client
/// certificate that chains to the operator CA bundle. Read the agent's identity from a
/// verified certificate with [`super::certs::agent_from_certificate`].
pub fn client_verifier(ca_bundle_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    Ok(siterecovery_wire::tls::client_verifier(ca_bundle_pem, None)?)
}

/// The certificate and key in rustls' form.
pub fn certified_key(cert: &KeyedCert) -> Result<Arc<CertifiedKey>, Error> {
    Ok(siterecovery_wire::tls::certified_key(&cert.cert_pem, &cert.key_pem)?)
}

/// The registration endpoint's client authentication: a client certificate is optional,
/// but one that is presented must chain to the operator CA bundle (with the client-auth
/// usage). Replaceable while the server runs, so a CA rotation reaches it.
pub type AgentVerifier = SwappableVerifier;

/// The endpoint's verifier of optional client certificates for `ca_bundle_pem`.
pub fn agent_verifier(ca_bundle_pem: &str) -> Result<Arc<AgentVerifier>, Error> {
    Ok(SwappableVerifier::new(optional_verifier(ca_bundle_pem)?, false))
}

/// Verifies optional client certificates against `ca_bundle_pem`.
pub fn optional_verifier(ca_bundle_pem: &str) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca_bundle_pem)?), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::Certificate(format!("client verifier: {e}")))
}

/// TLS 1.2/1.3 server configuration with `cert`, HTTP/1.1, client certificates checked
/// by `clients`. No session resumption: every connection presents (and has verified)
/// its certificate afresh, so a resumed session can never carry a certificate checked
/// against an older trust bundle; the endpoint sees a handful of requests a day.
pub fn server_config(cert: Arc<ServingCert>, clients: Arc<AgentVerifier>) -> Result<Arc<ServerConfig>, Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A listener handing axum connections whose TLS handshake completed. Handshakes run
/// in their own tasks, bounded in number and time, so one slow client delays nobody.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    /// Wraps a bound TCP listener.
    pub fn new(tcp: TcpListener, config: Arc<ServerConfig>) -> io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
        let tls = TlsAcceptor::from(config);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let acceptor = tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    accepted = tcp.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            // Out of file descriptors and the like: back off briefly.
                            debug!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, "too many TLS handshakes in progress; connection closed");
                    continue;
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, local, acceptor })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(pair) => pair,
            // The acceptor task ended (only when aborted): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The peer of a request: its address (for audit logs) and the client certificate it
/// presented, already verified against the operator CA during the handshake.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Remote address.
    pub addr: SocketAddr,
    /// The verified leaf certificate (DER), when the client sent one.
    pub client_cert: Option<Arc<CertificateDer<'static>>>,
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        // Per connection: rustls supports neither renegotiation nor post-handshake
        // authentication, so the certificate cannot change under a kept-alive connection.
        let (_, session) = stream.io().get_ref();
        let client_cert = session.peer_certificates().and_then(|chain| chain.first()).map(|c| Arc::new(c.clone()));
        Peer { addr: *stream.remote_addr(), client_cert }
    }
}
