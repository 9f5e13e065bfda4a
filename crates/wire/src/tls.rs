//! Mutual TLS between agents and process servers, and the agent identity carried in
//! client certificates (issued by the operator CA, see docs/agent-registration.md).
//!
//! The provider is always aws-lc-rs, chosen explicitly so a second provider compiled
//! into a binary can never make rustls pick at random.

use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::extensions::GeneralName;

use crate::WireError;

/// Trust domain of the SPIFFE-style URIs in agent certificates.
pub const TRUST_DOMAIN: &str = "siterecovery.io";
/// ALPN protocol name of the replication protocol.
pub const ALPN: &[u8] = b"siterecovery-replication/1";

/// The crypto provider of every TLS configuration here.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider())
}

/// Every certificate of a PEM bundle, as DER.
pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, WireError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WireError::Tls(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(WireError::Tls("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// A root store of a CA bundle (the operator CA's `ca.crt`).
pub fn root_store(ca_bundle_pem: &str) -> Result<RootCertStore, WireError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_bundle_pem)? {
        roots.add(cert).map_err(|e| WireError::Tls(format!("CA bundle: {e}")))?;
    }
    Ok(roots)
}

/// A certificate chain and its private key, in rustls' form.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, WireError> {
    let chain = certificates(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| WireError::Tls(format!("private key PEM: {e}")))?;
    let signer = tokio_rustls::rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| WireError::Tls(format!("private key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// Revocation lists (PEM, any number of `X509 CRL` blocks).
pub fn revocation_lists(pem: &str) -> Result<Vec<CertificateRevocationListDer<'static>>, WireError> {
    CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WireError::Tls(format!("CRL PEM: {e}")))
}

/// A client verifier that requires a certificate chaining to `ca_bundle_pem`, not
/// listed in any of `crls`.
pub fn client_verifier(ca_bundle_pem: &str, crls_pem: Option<&str>) -> Result<Arc<dyn ClientCertVerifier>, WireError> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca_bundle_pem)?), provider());
    if let Some(crls) = crls_pem {
        builder = builder.with_crls(revocation_lists(crls)?);
    }
    builder.build().map_err(|e| WireError::Tls(format!("client verifier: {e}")))
}

/// A serving certificate that can be replaced while the server runs (rotation).
#[derive(Debug)]
pub struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ServingCert {
    /// Starts with `key`.
    pub fn new(key: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self(RwLock::new(key)))
    }

    /// New handshakes use `key` from now on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = key;
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone())
    }
}

/// A client verifier that can be replaced while the server runs (CA rotation, a new
/// revocation list).
#[derive(Debug)]
pub struct SwappableVerifier {
    current: RwLock<Arc<dyn ClientCertVerifier>>,
    mandatory: bool,
}

impl SwappableVerifier {
    /// Starts with `verifier`; `mandatory` says whether a client certificate is required.
    pub fn new(verifier: Arc<dyn ClientCertVerifier>, mandatory: bool) -> Arc<Self> {
        Arc::new(Self { current: RwLock::new(verifier), mandatory })
    }

    /// New handshakes use `verifier` from now on.
    pub fn replace(&self, verifier: Arc<dyn ClientCertVerifier>) {
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = verifier;
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

impl ClientCertVerifier for SwappableVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    // The hints cannot be borrowed out of the lock. An empty list is allowed and tells
    // the client to send whatever certificate it has; the chain is verified below.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, tokio_rustls::rustls::Error> {
        self.current().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The process server's TLS configuration: TLS 1.3 only, the replication ALPN, a
/// client certificate required and checked by `clients`.
pub fn process_server_config(
    cert: Arc<ServingCert>,
    clients: Arc<SwappableVerifier>,
) -> Result<Arc<ServerConfig>, WireError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])
        .map_err(|e| WireError::Tls(e.to_string()))?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The agent's TLS configuration: trusts `ca_bundle_pem` for the process server and
/// presents its client certificate.
pub fn agent_config(ca_bundle_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<ClientConfig>, WireError> {
    let chain = certificates(cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| WireError::Tls(format!("private key PEM: {e}")))?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])
        .map_err(|e| WireError::Tls(e.to_string()))?
        .with_root_certificates(root_store(ca_bundle_pem)?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| WireError::Tls(format!("client certificate: {e}")))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The URI that names an agent in its client certificate.
pub fn agent_uri(namespace: &str, server: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/protectedserver/{server}")
}

/// The (namespace, ProtectedServer) an agent URI names, if it is one.
pub fn agent_from_uri(uri: &str) -> Option<(String, String)> {
    let rest = uri.strip_prefix(&format!("spiffe://{TRUST_DOMAIN}/ns/"))?;
    let (ns, server) = rest.split_once("/protectedserver/")?;
    let valid = |s: &str| !s.is_empty() && !s.contains('/');
    (valid(ns) && valid(server)).then(|| (ns.to_owned(), server.to_owned()))
}

/// URI subject alternative names of a certificate (DER).
pub fn certificate_uris(der: &[u8]) -> Result<Vec<String>, WireError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| WireError::Tls(format!("certificate: {e}")))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push((*u).to_owned());
            }
        }
    }
    Ok(uris)
}

/// The agent a client certificate (DER) was issued to, read from its URI SAN. Call only
/// after the chain was verified against the operator CA.
pub fn agent_from_certificate(der: &[u8]) -> Option<(String, String)> {
    certificate_uris(der).ok()?.iter().find_map(|u| agent_from_uri(u))
}
