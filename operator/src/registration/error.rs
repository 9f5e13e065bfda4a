//! Errors of agent registration: certificate issuance, the Secrets that keep state, and
//! the HTTPS endpoint. Refusals of a registration request are not errors: they are
//! [`super::decide::Refusal`]s, answered with an HTTP status.

use std::time::Duration;

use kube::runtime::controller::Action;

/// A failure of the certificate and token reconciliation or of the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request; usually transient.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A certificate could not be issued or read.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A Secret we own does not have the shape we wrote (edited by hand?). Says which.
    #[error("Secret {secret}: {problem}")]
    CorruptSecret {
        /// `namespace/name`.
        secret: String,
        /// What is wrong, never the content.
        problem: String,
    },
    /// TLS setup of the registration endpoint.
    #[error("TLS: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
    /// Binding or serving the registration endpoint.
    #[error("registration endpoint: {0}")]
    Io(#[from] std::io::Error),
}

impl From<siterecovery_wire::WireError> for Error {
    fn from(e: siterecovery_wire::WireError) -> Self {
        Error::Certificate(e.to_string())
    }
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Error::Certificate(e.to_string())
    }
}

impl From<rcgen::InvalidAsn1String> for Error {
    fn from(e: rcgen::InvalidAsn1String) -> Self {
        Error::Certificate(format!("name not encodable in a certificate: {e}"))
    }
}

impl Error {
    /// Retry soon for API hiccups and races, later for what needs a person.
    pub fn action(&self) -> Action {
        match self {
            Error::Kube(kube::Error::Api(s)) if s.code == 409 => Action::requeue(Duration::from_secs(1)),
            Error::CorruptSecret { .. } => Action::requeue(Duration::from_secs(300)),
            _ => Action::requeue(Duration::from_secs(15)),
        }
    }

    /// Short label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "api",
            Error::Certificate(_) => "certificate",
            Error::CorruptSecret { .. } => "corrupt_secret",
            Error::Tls(_) => "tls",
            Error::Io(_) => "io",
        }
    }
}
