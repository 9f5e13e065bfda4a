//! Azure Blob Storage through the official `azure_storage_blob` 1.x crate: block blobs in
//! one container. Authentication is either an Entra ID [`TokenCredential`] (production:
//! workload identity; the SDK requires https for it) or a SAS in the container URL
//! (tests against Azurite, or an operator-issued SAS).

use std::num::NonZero;
use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::{ClientOptions, StatusCode, Url};
use azure_storage_blob::models::{
    BlobClientDownloadOptions, BlobContainerClientListBlobsOptions, BlockBlobClientUploadOptions, HttpRange,
    StorageErrorCode,
};
use azure_storage_blob::{BlobClient, BlobContainerClient, BlobContainerClientOptions};
use bytes::Bytes;
use futures::TryStreamExt as _;

use super::{BackendError, BlobBackend};

/// One container of a storage account.
pub struct AzureBlobBackend {
    client: BlobContainerClient,
    /// Container URL without its query, for messages: the query may hold a SAS.
    display_url: String,
}

impl std::fmt::Debug for AzureBlobBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureBlobBackend").field("container", &self.display_url).finish()
    }
}

impl AzureBlobBackend {
    /// `container_url` is e.g. `https://acct.blob.core.windows.net/replica` or, for
    /// Azurite, `http://127.0.0.1:10000/devstoreaccount1/replica`, with a SAS as its query
    /// when no credential is given.
    pub fn new(container_url: Url, credential: Option<Arc<dyn TokenCredential>>) -> Result<Self, BackendError> {
        Self::with_options(container_url, credential, ClientOptions::default())
    }

    /// As [`Self::new`], with the SDK's client options (an HTTP client that trusts an
    /// extra root, see [`super::AzureConnector`]).
    pub fn with_options(
        container_url: Url,
        credential: Option<Arc<dyn TokenCredential>>,
        client_options: ClientOptions,
    ) -> Result<Self, BackendError> {
        let mut display = container_url.clone();
        display.set_query(None);
        let display_url = display.to_string();
        let options = BlobContainerClientOptions { client_options, ..Default::default() };
        let client = BlobContainerClient::new(container_url, credential, Some(options))
            .map_err(|e| failed("connect", &display_url, &e))?;
        Ok(Self { client, display_url })
    }

    /// Container `container` under the account endpoint `account_url`
    /// (e.g. `http://127.0.0.1:10000/devstoreaccount1`), authenticated by a SAS query
    /// string such as [`super::AccountSas::sign`] returns.
    pub fn with_sas(account_url: &str, container: &str, sas: &str) -> Result<Self, BackendError> {
        let mut url = Url::parse(&format!("{}/{container}", account_url.trim_end_matches('/'))).map_err(|e| {
            BackendError::Failed {
                op: "connect",
                key: account_url.to_string(),
                message: e.to_string(),
                retryable: false,
            }
        })?;
        url.set_query(Some(sas.trim_start_matches('?')));
        Self::new(url, None)
    }

    /// Creates the container unless it exists.
    pub async fn ensure_container(&self) -> Result<(), BackendError> {
        match self.client.create(None).await {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e).as_deref() == Some(StorageErrorCode::ContainerAlreadyExists.as_ref()) => Ok(()),
            Err(e) => Err(failed("create container", &self.display_url, &e)),
        }
    }

    /// The blob `name` in this container, of any type (`crate::page_blob` makes page
    /// blobs of it).
    pub fn blob_client(&self, name: &str) -> BlobClient {
        self.client.blob_client(name)
    }

    /// Deletes the container and everything in it (test cleanup, decommissioning).
    pub async fn delete_container(&self) -> Result<(), BackendError> {
        match self.client.delete(None).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(failed("delete container", &self.display_url, &e)),
        }
    }
}

fn error_code(e: &azure_core::Error) -> Option<String> {
    match e.kind() {
        ErrorKind::HttpResponse { error_code, .. } => error_code.clone(),
        _ => None,
    }
}

pub(crate) fn failed(op: &'static str, key: &str, e: &azure_core::Error) -> BackendError {
    let message = match (e.http_status(), error_code(e)) {
        // Authentication failures carry the reason (expired token, wrong audience) only
        // in the service's message; other codes speak for themselves.
        (Some(status @ (StatusCode::Unauthorized | StatusCode::Forbidden)), Some(code)) => {
            format!("HTTP {} {code}: {}", u16::from(status), service_reason(&describe(e)))
        }
        (Some(status), Some(code)) => format!("HTTP {} {code}", u16::from(status)),
        _ => describe(e),
    };
    BackendError::Failed { op, key: key.to_string(), message, retryable: is_retryable(e) }
}

/// Timeouts, throttling, 5xx and connection errors; also when getting a token failed for
/// one of those reasons (Entra unreachable), which the credential wraps in its own error.
fn is_retryable(e: &azure_core::Error) -> bool {
    match e.kind() {
        ErrorKind::Connection | ErrorKind::Io => true,
        ErrorKind::HttpResponse { status, .. } => {
            *status == StatusCode::RequestTimeout || *status == StatusCode::TooManyRequests || u16::from(*status) >= 500
        }
        _ => std::error::Error::source(e).and_then(|s| s.downcast_ref::<azure_core::Error>()).is_some_and(is_retryable),
    }
}

/// The reason in a storage error body: `AuthenticationErrorDetail` (expired token, wrong
/// audience), else the first sentence of `Message`; the whole text when neither is there.
fn service_reason(text: &str) -> String {
    let between = |open: &str, close: &str| {
        let start = text.find(open)? + open.len();
        let len = text[start..].find(close)?;
        Some(text[start..start + len].trim().to_owned())
    };
    if let Some(detail) = between("<AuthenticationErrorDetail>", "</AuthenticationErrorDetail>") {
        return detail;
    }
    match between("<Message>", "</Message>") {
        Some(message) => message.split(" RequestId:").next().unwrap_or_default().trim().to_owned(),
        None => text.to_owned(),
    }
}

/// The error and its causes on one line: the SDK wraps the reason (Entra's AADSTS code,
/// a TLS failure) in errors of its own whose text alone says little.
fn describe(e: &azure_core::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        let generic = text.starts_with("non-transport error occurred") || text.starts_with("retry policy expired");
        if !text.is_empty() && !generic && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

pub(crate) fn is_not_found(e: &azure_core::Error) -> bool {
    e.http_status() == Some(StatusCode::NotFound)
}

impl AzureBlobBackend {
    /// One Get Blob of an object, or of `range` of it.
    async fn download(&self, key: &str, range: Option<HttpRange>) -> Result<Bytes, BackendError> {
        let options = BlobClientDownloadOptions {
            parallel: Some(NonZero::<usize>::MIN),
            partition_size: Some(ONE_REQUEST),
            range,
            ..Default::default()
        };
        let result = match self.client.blob_client(key).download(Some(options)).await {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => return Err(BackendError::NotFound { key: key.to_string() }),
            Err(e) => return Err(failed("get", key, &e)),
        };
        result.body.collect().await.map_err(|e| failed("get", key, &e))
    }
}

/// Every object the store writes (a chunk of at most 64 MiB sealed, a patch, a manifest)
/// goes up in one Put Blob and comes down in one Get Blob. The SDK's default splits what
/// passes 4 MiB into staged blocks and ranges (an incompressible 4 MiB chunk, sealed, took
/// three requests to write and two to read), and looks up the CPU count for each call.
const ONE_REQUEST: NonZero<usize> = NonZero::new(256 << 20).expect("not zero");

/// Upload options that put an object in one request.
fn one_request<'a>() -> BlockBlobClientUploadOptions<'a> {
    BlockBlobClientUploadOptions {
        parallel: Some(NonZero::<usize>::MIN),
        partition_size: Some(NonZero::new(ONE_REQUEST.get() as u64).expect("not zero")),
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl BlobBackend for AzureBlobBackend {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        let blob = self.client.blob_client(key);
        blob.upload(data.into(), Some(one_request())).await.map(|_| ()).map_err(|e| failed("put", key, &e))
    }

    async fn create(&self, key: &str, data: Bytes) -> Result<bool, BackendError> {
        // `If-None-Match: *`: the service refuses to overwrite (409 BlobAlreadyExists;
        // 412 from some emulators).
        let options = BlockBlobClientUploadOptions { if_none_match: Some("*".into()), ..one_request() };
        match self.client.blob_client(key).upload(data.into(), Some(options)).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.http_status(), Some(StatusCode::Conflict | StatusCode::PreconditionFailed)) => {
                Ok(false)
            }
            Err(e) => Err(failed("create", key, &e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        self.download(key, None).await
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.download(key, Some((offset..offset + len).into())).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let options = BlobContainerClientListBlobsOptions { prefix: Some(prefix.to_string()), ..Default::default() };
        let mut pager = self.client.list_blobs(Some(options)).map_err(|e| failed("list", prefix, &e))?;
        let mut out = Vec::new();
        loop {
            match pager.try_next().await {
                Ok(Some(item)) => out.extend(item.name),
                Ok(None) => break,
                // A container that does not exist (yet) holds nothing.
                Err(e) if is_not_found(&e) => break,
                Err(e) => return Err(failed("list", prefix, &e)),
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        match self.client.blob_client(key).delete(None).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(failed("delete", key, &e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        self.client.blob_client(key).exists().await.map_err(|e| failed("exists", key, &e))
    }

    fn as_azure(&self) -> Option<&AzureBlobBackend> {
        Some(self)
    }
}
