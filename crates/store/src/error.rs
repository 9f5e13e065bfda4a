//! Errors of the blob store. Every variant names the object or file it is about, and
//! [`StoreError::is_retryable`] tells a caller whether trying again can help.

use crate::backend::BackendError;

/// Everything that can go wrong reading or writing the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage backend failed (network, service, local filesystem).
    #[error(transparent)]
    Backend(#[from] BackendError),

    /// An object was read but failed its integrity check: bad header, AEAD tag mismatch,
    /// undecodable compression, or a content hash that does not match its name.
    #[error("object {object} is corrupt: {reason}")]
    Corrupt {
        /// Object key inside the container.
        object: String,
        /// What check failed.
        reason: String,
    },

    /// An object is encrypted with a key id that is not in the keyring.
    #[error("object {object} is encrypted with key {key_id:?}, which is not in the keyring")]
    UnknownKey {
        /// Object key inside the container.
        object: String,
        /// Key id from the object header.
        key_id: String,
    },

    /// A recovery point does not exist (its manifest is missing).
    #[error("recovery point {point} of server {server} not found")]
    PointNotFound {
        /// `<namespace>/<server>`.
        server: String,
        /// Point id.
        point: String,
    },

    /// A recovery point with this id exists already (manifests are never overwritten).
    #[error("recovery point {point} of server {server} already exists")]
    PointExists {
        /// `<namespace>/<server>`.
        server: String,
        /// Point id.
        point: String,
    },

    /// A name (namespace, server, disk, point or key id) is not allowed in the layout.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// Which kind of name.
        what: &'static str,
        /// The rejected value.
        value: String,
        /// Why.
        reason: &'static str,
    },

    /// The keyring (from the encryption-key Secret) is unusable.
    #[error("invalid keyring: {0}")]
    InvalidKeyring(String),

    /// A caller-supplied argument is inconsistent (e.g. a disk listed twice).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A local file (disk image, restore target) could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The local path.
        path: String,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A worker task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// Whether the same call may succeed if retried (transient backend failures only).
    /// Corruption, unknown keys and invalid input never heal by themselves.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Backend(e) => e.is_retryable(),
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        StoreError::Io { op, path: path.display().to_string(), source }
    }

    pub(crate) fn corrupt(object: &str, reason: impl Into<String>) -> Self {
        StoreError::Corrupt { object: object.to_string(), reason: reason.into() }
    }
}

/// Result alias of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
