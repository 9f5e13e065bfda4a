//! Certificates of the operator CA: issuing them (rcgen) and reading back what a stored
//! one says (x509-parser). No I/O: the Secrets holding them are in `ca.rs` and
//! `reconcile.rs`.
//!
//! Every key is ECDSA P-256 (rcgen's default): small, fast to generate on every rotation,
//! and accepted by rustls, Go and OpenSSL alike.

use std::net::IpAddr;
use std::time::Duration;

use jiff::Timestamp;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use x509_parser::extensions::GeneralName;

use super::error::Error;

/// Trust domain of the SPIFFE-style URI that names an agent in its client certificate.
pub use siterecovery_wire::tls::TRUST_DOMAIN;

/// Certificates start this long before they are issued, so a peer whose clock lags a
/// little does not reject a freshly rotated one.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct KeyedCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its PKCS#8 private key.
    pub key_pem: String,
}

impl std::fmt::Debug for KeyedCert {
    // Never print a private key, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedCert").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// What a stored certificate says, as far as the decisions in `decide.rs` care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Start of validity.
    pub not_before: Timestamp,
    /// End of validity.
    pub not_after: Timestamp,
    /// Subject common name.
    pub common_name: Option<String>,
    /// DNS names and IP addresses (as text) of the subjectAltName extension.
    pub dns_names: Vec<String>,
    /// URIs of the subjectAltName extension.
    pub uris: Vec<String>,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
    /// DER of the issuer name (compared with the current CA's subject after a rotation).
    pub issuer: Vec<u8>,
    /// DER of the subject name.
    pub subject: Vec<u8>,
}

/// Parses the first certificate of a PEM bundle.
pub fn parse_pem(pem: &[u8]) -> Result<CertInfo, Error> {
    let der = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| Error::Certificate("no PEM certificate found".into()))?
        .map_err(|e| Error::Certificate(format!("PEM: {e}")))?;
    parse_der(&der)
}

/// Parses one DER certificate.
pub fn parse_der(der: &[u8]) -> Result<CertInfo, Error> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| Error::Certificate(format!("X.509: {e}")))?;
    let at = |t: i64| Timestamp::from_second(t).map_err(|e| Error::Certificate(format!("validity: {e}")));
    let mut dns_names = Vec::new();
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
                GeneralName::URI(u) => uris.push((*u).to_owned()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    dns_names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        not_before: at(cert.validity().not_before.timestamp())?,
        not_after: at(cert.validity().not_after.timestamp())?,
        common_name: cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned),
        dns_names,
        uris,
        is_ca: cert.is_ca(),
        issuer: cert.issuer().as_raw().to_vec(),
        subject: cert.subject().as_raw().to_vec(),
    })
}

pub use siterecovery_wire::tls::{agent_from_certificate, agent_from_uri, agent_uri};

/// Common name of an agent's client certificate.
pub fn agent_common_name(namespace: &str, server: &str) -> String {
    format!("siterecovery-agent:{namespace}:{server}")
}

/// DNS names of the process servers of a namespace: the headless Service, and every
/// StatefulSet pod behind it (`<pod>.<service>.<ns>.svc`), plus loopback for the
/// embedded default where process servers run as local processes.
pub fn process_server_names(namespace: &str, service: &str, cluster_domain: &str) -> Vec<String> {
    let svc = format!("{service}.{namespace}.svc");
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        svc.clone(),
        format!("{svc}.{cluster_domain}"),
        format!("*.{svc}"),
        format!("*.{svc}.{cluster_domain}"),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ]
}

/// The operator's CA as stored in its Secret: the signing CA, a staged successor during
/// a rotation, and the trust bundle (signing CA, successor, and predecessors still valid).
#[derive(Clone)]
pub struct Ca {
    /// The CA that signs certificates now.
    pub current: KeyedCert,
    /// The successor, distributed in the bundle before it signs anything.
    pub next: Option<KeyedCert>,
    /// PEM of every CA certificate to trust.
    pub bundle_pem: String,
    /// What the signing CA certificate says.
    pub info: CertInfo,
    /// What the successor says.
    pub next_info: Option<CertInfo>,
    /// Every certificate of the bundle.
    pub trusted: Vec<CertInfo>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("info", &self.info).field("next_info", &self.next_info).finish_non_exhaustive()
    }
}

/// A new self-signed CA certificate and key, valid for `validity` from `now`.
pub fn new_ca_cert(now: Timestamp, validity: Duration) -> Result<KeyedCert, Error> {
    let key = KeyPair::generate()?;
    let mut params = base_params(now, validity)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, TRUST_DOMAIN);
    // A distinct name per generation keeps chain building unambiguous while an old and
    // a new CA are both trusted, and tells which CA issued a certificate.
    let mut id = [0u8; 4];
    aws_lc_rs::rand::fill(&mut id).map_err(|_| Error::Certificate("no randomness for a CA name".into()))?;
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    dn.push(DnType::CommonName, format!("siterecovery operator CA {} {id}", now.as_second()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key)?;
    Ok(KeyedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// A trust bundle of `certs` (PEM, each may itself be a bundle) in order, without
/// duplicates or certificates expired at `now`.
pub fn compose_bundle<'a>(certs: impl IntoIterator<Item = &'a str>, now: Timestamp) -> String {
    let mut bundle = String::new();
    for pem in certs.into_iter().flat_map(split_pem) {
        let valid = parse_pem(pem.as_bytes()).is_ok_and(|i| i.not_after > now);
        if valid && !bundle.contains(pem.trim()) {
            bundle.push_str(&pem);
        }
    }
    bundle
}

impl Ca {
    /// A brand-new CA (no predecessor).
    pub fn generate(now: Timestamp, validity: Duration) -> Result<Self, Error> {
        let current = new_ca_cert(now, validity)?;
        let bundle = compose_bundle([current.cert_pem.as_str()], now);
        Self::from_parts(current, None, bundle)
    }

    /// Rebuilds the CA from what its Secret stores.
    pub fn from_parts(current: KeyedCert, next: Option<KeyedCert>, bundle_pem: String) -> Result<Self, Error> {
        let info = parse_pem(current.cert_pem.as_bytes())?;
        let next_info = next.as_ref().map(|n| parse_pem(n.cert_pem.as_bytes())).transpose()?;
        if !info.is_ca || next_info.as_ref().is_some_and(|n| !n.is_ca) {
            return Err(Error::Certificate("the stored CA certificate is not a CA".into()));
        }
        let trusted = split_pem(&bundle_pem).iter().map(|p| parse_pem(p.as_bytes())).collect::<Result<_, _>>()?;
        Ok(Self { current, next, bundle_pem, info, next_info, trusted })
    }

    /// Starts a rotation: a successor joins the bundle but does not sign yet.
    pub fn stage(&self, now: Timestamp, validity: Duration) -> Result<Self, Error> {
        let next = new_ca_cert(now, validity)?;
        let bundle = compose_bundle([self.current.cert_pem.as_str(), &next.cert_pem, &self.bundle_pem], now);
        Self::from_parts(self.current.clone(), Some(next), bundle)
    }

    /// Ends a rotation: the successor signs from now on; the old CA stays trusted until
    /// it expires (certificates it signed are renewed by the new one in due course).
    pub fn promote(&self, now: Timestamp) -> Result<Self, Error> {
        let Some(next) = self.next.clone() else { return Ok(self.clone()) };
        let bundle = compose_bundle([next.cert_pem.as_str(), &self.current.cert_pem, &self.bundle_pem], now);
        Self::from_parts(next, None, bundle)
    }

    /// Subject names (DER) of every trusted CA.
    pub fn trusted_subjects(&self) -> Vec<Vec<u8>> {
        self.trusted.iter().map(|t| t.subject.clone()).collect()
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, Error> {
        let key = KeyPair::from_pem(&self.current.key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&self.current.cert_pem, key)?)
    }

    /// An agent's mTLS client certificate, naming it by common name and URI SAN.
    pub fn issue_client(
        &self,
        namespace: &str,
        server: &str,
        not_before: Timestamp,
        validity: Duration,
    ) -> Result<KeyedCert, Error> {
        let mut params = base_params(not_before, validity)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "siterecovery:agents");
        dn.push(DnType::CommonName, agent_common_name(namespace, server));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(agent_uri(namespace, server).try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    /// A serving certificate for `names` (DNS names, wildcards or IP addresses).
    pub fn issue_serving(
        &self,
        names: &[String],
        not_before: Timestamp,
        validity: Duration,
    ) -> Result<KeyedCert, Error> {
        let mut params = base_params(not_before, validity)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, TRUST_DOMAIN);
        dn.push(DnType::CommonName, names.first().cloned().unwrap_or_else(|| "siterecovery".into()));
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, Error>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<KeyedCert, Error> {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(KeyedCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Validity from `not_before - BACKDATE` to `not_before + validity`, random serial.
fn base_params(not_before: Timestamp, validity: Duration) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    let start = not_before.as_second() - BACKDATE.as_secs() as i64;
    let end = not_before.as_second().saturating_add(validity.as_secs() as i64);
    let odt =
        |s: i64| time::OffsetDateTime::from_unix_timestamp(s).map_err(|e| Error::Certificate(format!("validity: {e}")));
    params.not_before = odt(start)?;
    params.not_after = odt(end)?;
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial).map_err(|_| Error::Certificate("no randomness for a serial".into()))?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params)
}

/// Splits a PEM bundle into its certificates (each with its armour and a final newline).
pub fn split_pem(bundle: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    bundle
        .split_inclusive(END)
        .filter(|chunk| chunk.contains("-----BEGIN CERTIFICATE-----"))
        .map(|chunk| format!("{}\n", chunk.trim()))
        .collect()
}

/// PEM armour around DER (for CA certificates read from a kubeconfig).
pub fn der_to_pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
