//! Where objects are kept. The store needs only five operations, so the same code runs on
//! a local directory (tests, on-prem) and on Azure Blob Storage.

pub(crate) mod azure;
mod credential;
mod local;
mod sas;

pub use azure::AzureBlobBackend;
pub use credential::{
    AzureConnector, AzureEnvironment, BlobAuth, ENV_AUTHORITY_HOST, ENV_EXTRA_CA_FILE, ENV_FEDERATED_TOKEN_FILE,
    PUBLIC_AUTHORITY_HOST, SECRET_CLIENT_ID, SECRET_CLIENT_SECRET, SECRET_TENANT_ID,
};
pub use local::LocalBackend;
pub use sas::{AccountSas, DEVSTORE_ACCOUNT, DEVSTORE_KEY, SECRET_SAS_TOKEN, sas_token};

use bytes::Bytes;

/// A flat key → bytes object store. Keys are `/`-separated relative names.
#[async_trait::async_trait]
pub trait BlobBackend: Send + Sync + std::fmt::Debug {
    /// Stores `data` under `key`, replacing any previous object. Atomic: a reader sees
    /// either the old or the new object, never a partial one.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError>;
    /// Stores `data` under `key` unless an object is there already: `Ok(false)`, and
    /// nothing is written. One request, so two writers of the same key cannot both
    /// succeed, and a writer spends no extra round trip asking first.
    async fn create(&self, key: &str, data: Bytes) -> Result<bool, BackendError>;
    /// Reads a whole object; [`BackendError::NotFound`] when it does not exist.
    async fn get(&self, key: &str) -> Result<Bytes, BackendError>;
    /// Reads `len` bytes of an object from `offset` (fewer when it ends sooner);
    /// [`BackendError::NotFound`] when it does not exist. By default the whole object is
    /// read and cut.
    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        let all = self.get(key).await?;
        let start = (offset as usize).min(all.len());
        Ok(all.slice(start..start.saturating_add(len as usize).min(all.len())))
    }
    /// Every key starting with `prefix`, in lexicographic order.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError>;
    /// Deletes an object; deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> Result<(), BackendError>;
    /// Whether an object exists.
    async fn exists(&self, key: &str) -> Result<bool, BackendError>;
    /// The Azure Blob container behind this backend, for what only Azure has (page blobs:
    /// restore to a fixed VHD, `crate::page_blob`); `None` for other backends.
    fn as_azure(&self) -> Option<&AzureBlobBackend> {
        None
    }
}

/// A backend failure, naming the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The object does not exist.
    #[error("object {key} not found")]
    NotFound {
        /// Object key.
        key: String,
    },
    /// The operation failed.
    #[error("{op} {key}: {message}")]
    Failed {
        /// `put`, `get`, `list`, `delete` or `exists`.
        op: &'static str,
        /// Object key or prefix.
        key: String,
        /// The backend's explanation (status code and error code for Azure).
        message: String,
        /// Whether retrying can help (timeouts, throttling, 5xx, connection errors).
        retryable: bool,
    },
}

impl BackendError {
    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, BackendError::Failed { retryable: true, .. })
    }
}
