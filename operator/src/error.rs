//! Errors of the reconcilers, and what the controller does about each.

use std::time::Duration;

use kube::runtime::controller::Action;

/// A reconcile failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API refused or failed a request; usually transient.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object cannot be reconciled as written; waits for a change of it.
    #[error("{0}")]
    InvalidSpec(String),
    /// Waiting on other objects (e.g. deletion of a policy still in use); retried soon.
    #[error("{0}")]
    Blocked(String),
    /// An object we read had an unexpected shape.
    #[error("decoding: {0}")]
    Json(#[from] serde_json::Error),
    /// Adding or removing the finalizer, or the cleanup behind it, failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

/// Result of a reconcile step.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Short label for the `reason` of the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "api",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Blocked(_) => "blocked",
            Error::Json(_) => "decode",
            Error::Finalizer(_) => "finalizer",
        }
    }

    /// What the controller does next: an invalid spec waits for the user to change the
    /// object (the status already says why); anything else is retried with a delay that
    /// grows for errors unlikely to clear at once.
    pub fn action(&self) -> Action {
        match self {
            Error::InvalidSpec(_) => Action::await_change(),
            Error::Blocked(_) => Action::requeue(Duration::from_secs(5)),
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => Action::requeue(Duration::from_secs(1)),
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.action()
                }
                _ => Action::requeue(Duration::from_secs(5)),
            },
            _ => Action::requeue(Duration::from_secs(15)),
        }
    }
}
