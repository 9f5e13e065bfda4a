//! How the process servers and the operator authenticate to Blob storage: a SAS, a
//! service principal's client secret, or Microsoft Entra workload identity (the
//! ServiceAccount token that AKS projects into the pod, exchanged for an Entra access
//! token). The token credentials are the official `azure_identity` ones; [`AzureConnector`]
//! builds them once per identity and keeps them, so their token cache (refreshed five
//! minutes before expiry, as is the blob client's own) outlives any one backend.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::{ClientOptions, Transport, Url};
use azure_identity::{
    ClientAssertionCredentialOptions, ClientSecretCredential, ClientSecretCredentialOptions,
    WorkloadIdentityCredential, WorkloadIdentityCredentialOptions,
};

use super::sas::SECRET_SAS_TOKEN;
use super::{AzureBlobBackend, BackendError};

/// Key of the tenant (directory) id in a service-principal credential Secret.
pub const SECRET_TENANT_ID: &str = "tenantId";
/// Key of the application (client) id in a service-principal credential Secret.
pub const SECRET_CLIENT_ID: &str = "clientId";
/// Key of the client secret in a service-principal credential Secret.
pub const SECRET_CLIENT_SECRET: &str = "clientSecret";

/// Entra authority of the public cloud, used when `AZURE_AUTHORITY_HOST` is unset.
pub const PUBLIC_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// Variable the AKS workload-identity webhook sets to the projected token's path.
pub const ENV_FEDERATED_TOKEN_FILE: &str = "AZURE_FEDERATED_TOKEN_FILE";
/// Variable the AKS workload-identity webhook sets to the Entra authority.
pub const ENV_AUTHORITY_HOST: &str = "AZURE_AUTHORITY_HOST";
/// Variable naming a PEM file of extra trusted roots for storage and Entra (a private CA
/// in front of the storage account, or the emulator's in tests).
pub const ENV_EXTRA_CA_FILE: &str = "SR_STORAGE_CA_FILE";

/// One way to authenticate to a storage account.
#[derive(Clone, PartialEq, Eq)]
pub enum BlobAuth {
    /// A container or account SAS (query string, without `?`).
    Sas(String),
    /// A service principal with a client secret.
    ServicePrincipal {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The client secret.
        client_secret: String,
    },
    /// Workload identity: the pod's projected ServiceAccount token, federated with this
    /// application or managed identity.
    WorkloadIdentity {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
    },
}

impl std::fmt::Debug for BlobAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the SAS or the client secret.
        f.write_str(self.kind())
    }
}

impl BlobAuth {
    /// From a credential Secret's data: `sasToken`, or `tenantId` + `clientId` +
    /// `clientSecret`. The error names what is missing, never a value.
    pub fn from_secret_data<V: AsRef<[u8]>>(data: &BTreeMap<String, V>) -> Result<Self, String> {
        let get = |k: &str| {
            data.get(k).map(|v| String::from_utf8_lossy(v.as_ref()).trim().to_owned()).filter(|s| !s.is_empty())
        };
        if let Some(sas) = get(SECRET_SAS_TOKEN) {
            return Ok(Self::Sas(sas.trim_start_matches('?').to_owned()));
        }
        let keys = [SECRET_TENANT_ID, SECRET_CLIENT_ID, SECRET_CLIENT_SECRET];
        match keys.map(get) {
            [Some(tenant_id), Some(client_id), Some(client_secret)] => {
                Ok(Self::ServicePrincipal { tenant_id, client_id, client_secret })
            }
            [None, None, None] => Err(format!(
                "needs {SECRET_SAS_TOKEN}, or {SECRET_TENANT_ID} + {SECRET_CLIENT_ID} + {SECRET_CLIENT_SECRET}"
            )),
            values => {
                let missing: Vec<_> = keys.iter().zip(values).filter(|(_, v)| v.is_none()).map(|(k, _)| *k).collect();
                Err(format!("is missing {} for a service principal", missing.join(", ")))
            }
        }
    }

    /// What kind of credential this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Sas(_) => "SAS token",
            Self::ServicePrincipal { .. } => "service principal",
            Self::WorkloadIdentity { .. } => "workload identity",
        }
    }
}

/// What a process needs to know about Azure beyond the credential itself.
#[derive(Clone, Debug, Default)]
pub struct AzureEnvironment {
    /// Entra authority (`AZURE_AUTHORITY_HOST`); the public cloud's when `None`.
    pub authority_host: Option<String>,
    /// The projected ServiceAccount token (`AZURE_FEDERATED_TOKEN_FILE`), for workload
    /// identity.
    pub federated_token_file: Option<PathBuf>,
    /// PEM certificates trusted in addition to the system's roots, for storage and Entra
    /// alike. Never a way to turn verification off.
    pub extra_roots_pem: Option<Vec<u8>>,
}

impl AzureEnvironment {
    /// From the variables the AKS workload-identity webhook injects
    /// (`AZURE_AUTHORITY_HOST`, `AZURE_FEDERATED_TOKEN_FILE`) and `SR_STORAGE_CA_FILE`.
    pub fn from_env() -> Result<Self, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let extra_roots_pem = match var(ENV_EXTRA_CA_FILE) {
            Some(path) => Some(std::fs::read(&path).map_err(|e| format!("{ENV_EXTRA_CA_FILE}={path}: {e}"))?),
            None => None,
        };
        Ok(Self {
            authority_host: var(ENV_AUTHORITY_HOST),
            federated_token_file: var(ENV_FEDERATED_TOKEN_FILE).map(PathBuf::from),
            extra_roots_pem,
        })
    }
}

/// A cached credential and its version (a hash of the client secret; empty for workload
/// identity), keyed by identity.
type Versioned = (String, Arc<dyn TokenCredential>);

/// Builds blob backends for any [`BlobAuth`], sharing one HTTP client and one token
/// credential per identity across them.
pub struct AzureConnector {
    env: AzureEnvironment,
    transport: Option<Transport>,
    credentials: Mutex<HashMap<String, Versioned>>,
}

impl std::fmt::Debug for AzureConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureConnector").field("env", &self.env).finish_non_exhaustive()
    }
}

impl AzureConnector {
    /// A connector for `env`. Fails when the extra roots do not parse or the authority is
    /// not an https URL.
    pub fn new(env: AzureEnvironment) -> Result<Self, String> {
        if let Some(host) = &env.authority_host {
            let url = Url::parse(host).map_err(|e| format!("authority host {host}: {e}"))?;
            if url.scheme() != "https" {
                return Err(format!("authority host {host} must use https"));
            }
        }
        let transport = match &env.extra_roots_pem {
            Some(pem) => Some(transport_with_roots(pem)?),
            None => None,
        };
        Ok(Self { env, transport, credentials: Mutex::default() })
    }

    /// A connector for this process's environment ([`AzureEnvironment::from_env`]).
    pub fn from_env() -> Result<Self, String> {
        Self::new(AzureEnvironment::from_env()?)
    }

    /// The environment it was built with.
    pub fn environment(&self) -> &AzureEnvironment {
        &self.env
    }

    /// Whether this process can use workload identity: the projected token's path is known.
    pub fn has_workload_identity(&self) -> bool {
        self.env.federated_token_file.is_some()
    }

    /// The container `container` under `endpoint`, authenticated with `auth`.
    pub fn backend(&self, endpoint: &str, container: &str, auth: &BlobAuth) -> Result<AzureBlobBackend, BackendError> {
        let connect_error = |message: String| BackendError::Failed {
            op: "connect",
            key: endpoint.to_string(),
            message,
            retryable: false,
        };
        let mut url = Url::parse(&format!("{}/{container}", endpoint.trim_end_matches('/')))
            .map_err(|e| connect_error(e.to_string()))?;
        let credential = match auth {
            BlobAuth::Sas(sas) => {
                url.set_query(Some(sas.trim_start_matches('?')));
                None
            }
            _ => Some(self.credential(auth).map_err(connect_error)?),
        };
        AzureBlobBackend::with_options(url, credential, self.client_options())
    }

    /// The token credential for `auth` (none for a SAS), created on first use and then
    /// reused, so its cached token is too. A rotated client secret replaces the identity's
    /// credential rather than adding one.
    pub fn credential(&self, auth: &BlobAuth) -> Result<Arc<dyn TokenCredential>, String> {
        let (identity, version) = match auth {
            BlobAuth::Sas(_) => return Err("a SAS is not a token credential".into()),
            BlobAuth::ServicePrincipal { tenant_id, client_id, client_secret } => {
                // The secret is kept only as a hash, to notice a rotation.
                (format!("sp/{tenant_id}/{client_id}"), blake3::hash(client_secret.as_bytes()).to_hex().to_string())
            }
            BlobAuth::WorkloadIdentity { tenant_id, client_id } => {
                (format!("wi/{tenant_id}/{client_id}"), String::new())
            }
        };
        let mut cache = self.credentials.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((v, c)) = cache.get(&identity)
            && *v == version
        {
            return Ok(c.clone());
        }
        let credential = self.new_credential(auth)?;
        cache.insert(identity, (version, credential.clone()));
        Ok(credential)
    }

    fn new_credential(&self, auth: &BlobAuth) -> Result<Arc<dyn TokenCredential>, String> {
        match auth {
            BlobAuth::Sas(_) => Err("a SAS is not a token credential".into()),
            BlobAuth::ServicePrincipal { tenant_id, client_id, client_secret } => {
                let options = ClientSecretCredentialOptions { client_options: self.entra_options() };
                let c = ClientSecretCredential::new(
                    tenant_id,
                    client_id.clone(),
                    Secret::new(client_secret.clone()),
                    Some(options),
                )
                .map_err(|e| format!("service principal {client_id}: {e}"))?;
                Ok(c)
            }
            BlobAuth::WorkloadIdentity { tenant_id, client_id } => {
                let token_file = self.env.federated_token_file.clone().ok_or_else(|| {
                    format!(
                        "workload identity: {ENV_FEDERATED_TOKEN_FILE} is not set in this pod, so it has no projected \
                         ServiceAccount token; label the pod azure.workload.identity/use=true (the chart's \
                         workloadIdentity.enabled) on a cluster with the workload-identity webhook"
                    )
                })?;
                let options = WorkloadIdentityCredentialOptions {
                    credential_options: ClientAssertionCredentialOptions { client_options: self.entra_options() },
                    client_id: Some(client_id.clone()),
                    tenant_id: Some(tenant_id.clone()),
                    token_file_path: Some(token_file),
                };
                let c = WorkloadIdentityCredential::new(Some(options))
                    .map_err(|e| format!("workload identity {client_id}: {e}"))?;
                Ok(c)
            }
        }
    }

    /// Options of the Entra token requests: the authority, and the shared client.
    fn entra_options(&self) -> ClientOptions {
        let mut custom = CustomConfiguration::default();
        custom.authority_host = self.env.authority_host.clone().unwrap_or_else(|| PUBLIC_AUTHORITY_HOST.to_owned());
        ClientOptions {
            transport: self.transport.clone(),
            cloud: Some(Arc::new(CloudConfiguration::Custom(custom))),
            ..Default::default()
        }
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions { transport: self.transport.clone(), ..Default::default() }
    }
}

/// An HTTP client that trusts `pem`'s certificates besides the system's roots. The
/// timeouts and redirect policy are those of the SDK's default client.
fn transport_with_roots(pem: &[u8]) -> Result<Transport, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| format!("extra CA certificates: {e}"))?;
    if certs.is_empty() {
        return Err("extra CA certificates: no PEM certificate found".into());
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .tls_certs_merge(certs)
        .build()
        .map_err(|e| format!("HTTP client with extra CA certificates: {e}"))?;
    Ok(Transport::new(Arc::new(client)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<u8>> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn secret_data_is_a_sas_or_a_whole_service_principal() {
        assert_eq!(
            BlobAuth::from_secret_data(&data(&[("sasToken", "?sv=1&sig=x\n")])),
            Ok(BlobAuth::Sas("sv=1&sig=x".into()))
        );
        let sp = BlobAuth::from_secret_data(&data(&[("tenantId", "t"), ("clientId", "c"), ("clientSecret", "s")]));
        assert_eq!(
            sp,
            Ok(BlobAuth::ServicePrincipal { tenant_id: "t".into(), client_id: "c".into(), client_secret: "s".into() })
        );
        let err = BlobAuth::from_secret_data(&data(&[("tenantId", "t"), ("clientSecret", " ")])).unwrap_err();
        assert_eq!(err, "is missing clientId, clientSecret for a service principal");
        let err = BlobAuth::from_secret_data(&data(&[("other", "x")])).unwrap_err();
        assert!(err.contains("needs sasToken, or tenantId + clientId + clientSecret"), "{err}");
        assert_eq!(format!("{:?}", sp.unwrap()), "service principal", "Debug never shows the secret");
    }

    #[test]
    fn workload_identity_without_a_projected_token_says_how_to_get_one() {
        let connector = AzureConnector::new(AzureEnvironment::default()).unwrap();
        let auth = BlobAuth::WorkloadIdentity { tenant_id: "t".into(), client_id: "c".into() };
        let err = connector.backend("https://acct.blob.core.windows.net", "dr", &auth).unwrap_err().to_string();
        assert!(err.contains("AZURE_FEDERATED_TOKEN_FILE is not set"), "{err}");
        assert!(err.contains("azure.workload.identity/use=true"), "{err}");
    }

    #[test]
    fn an_http_authority_or_a_bad_ca_file_is_refused() {
        let env = AzureEnvironment { authority_host: Some("http://login.example".into()), ..Default::default() };
        assert!(AzureConnector::new(env).unwrap_err().contains("must use https"));
        let env = AzureEnvironment { extra_roots_pem: Some(b"not a certificate".to_vec()), ..Default::default() };
        assert!(AzureConnector::new(env).unwrap_err().contains("extra CA certificates"));
    }

    #[test]
    fn credentials_are_shared_per_identity() {
        let connector = AzureConnector::new(AzureEnvironment::default()).unwrap();
        let sp = |secret: &str| BlobAuth::ServicePrincipal {
            tenant_id: "t".into(),
            client_id: "c".into(),
            client_secret: secret.into(),
        };
        let a = connector.credential(&sp("s1")).unwrap();
        let b = connector.credential(&sp("s1")).unwrap();
        let c = connector.credential(&sp("s2")).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the same identity reuses its credential and token cache");
        assert!(!Arc::ptr_eq(&a, &c), "a rotated secret gets a new credential");
        assert_eq!(connector.credentials.lock().unwrap().len(), 1, "which replaces the old one");
    }
}
