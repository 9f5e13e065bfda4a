//! Where a protected server's recovery points go: a [`Store`] (backend + keyring) and the
//! chunk size. Resolved per server when its agent connects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;

use crate::group::GroupSpec;
use siterecovery_store::backend::{AzureConnector, BlobAuth};
use siterecovery_store::{BlobBackend, DEFAULT_CHUNK_SIZE, Keyring, LocalBackend, Store, StoreOptions};

/// The destination of one server's data.
#[derive(Debug, Clone)]
pub struct Target {
    /// Store of the server's policy.
    pub store: Store,
    /// Chunk size for a server that has no point yet.
    pub chunk_size: u32,
    /// Bytes per second agents may send (0: unlimited).
    pub bandwidth_bytes_per_second: u64,
    /// Crash-consistent interval of the policy, handed to agents.
    pub crash_interval: Option<std::time::Duration>,
    /// App-consistent interval of the policy (zero: off), handed to agents.
    pub app_interval: Option<std::time::Duration>,
    /// zstd level of the policy, handed to agents (what they send) and used by `store`
    /// (what the process server compresses itself).
    pub compression_level: Option<u8>,
}

/// Decides, for an authenticated agent, where its data goes, or why it may not connect.
#[async_trait::async_trait]
pub trait Targets: Send + Sync + 'static {
    /// The target of `namespace/server`, or a refusal `(reason, message)`.
    async fn resolve(&self, namespace: &str, server: &str) -> Result<Arc<Target>, (String, String)>;

    /// The consistency group of `namespace/server`, with every member, if it has one.
    async fn group(&self, _namespace: &str, _server: &str) -> Result<Option<GroupSpec>, String> {
        Ok(None)
    }
}

/// Targets whose stores keep local copies of what they upload and read them back from
/// there (one budget for all of them; `siterecovery_store::LocalCopies`).
pub struct WithCopies {
    inner: Arc<dyn Targets>,
    copies: Arc<siterecovery_store::LocalCopies>,
}

impl WithCopies {
    /// `inner`'s targets, their stores with `copies`.
    pub fn new(inner: Arc<dyn Targets>, copies: Arc<siterecovery_store::LocalCopies>) -> Self {
        Self { inner, copies }
    }
}

#[async_trait::async_trait]
impl Targets for WithCopies {
    async fn resolve(&self, namespace: &str, server: &str) -> Result<Arc<Target>, (String, String)> {
        let t = self.inner.resolve(namespace, server).await?;
        Ok(Arc::new(Target { store: t.store.clone().with_copies(self.copies.clone()), ..(*t).clone() }))
    }

    async fn group(&self, namespace: &str, server: &str) -> Result<Option<GroupSpec>, String> {
        self.inner.group(namespace, server).await
    }
}

/// Targets from a file (standalone process servers, tests): one store for every server.
///
/// ```json
/// {"backend": {"azure": {"endpoint": "https://acct.blob.core.windows.net", "container": "dr", "sas": "sv=…"}},
///  "keys": {"active": "k1", "key-k1": "<base64 of 32 bytes>"},
///  "chunkSize": 4194304, "bandwidthBytesPerSecond": 0, "compressionLevel": 1}
/// ```
/// Instead of `sas`, an Azure backend may name `"servicePrincipal": {"tenantId", "clientId",
/// "clientSecret"}` or `"workloadIdentity": {"tenantId", "clientId"}` (the token file and
/// authority come from `AZURE_FEDERATED_TOKEN_FILE` and `AZURE_AUTHORITY_HOST`).
/// `{"backend": {"local": "/path"}}` keeps objects in a directory.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TargetsFile {
    /// Where objects go.
    pub backend: BackendSpec,
    /// The keyring, in the form of the policy's key Secret (values base64).
    pub keys: BTreeMap<String, String>,
    /// Chunk size for new servers.
    #[serde(default)]
    pub chunk_size: Option<u32>,
    /// Bandwidth limit handed to agents.
    #[serde(default)]
    pub bandwidth_bytes_per_second: u64,
    /// zstd level (1–19) handed to agents and used for what the process server compresses
    /// itself; unset, agents keep their own (`compressionLevel` in agent.json) and the
    /// process server uses 1.
    #[serde(default)]
    pub compression_level: Option<u8>,
    /// Uploads in flight per server.
    #[serde(default)]
    pub parallelism: Option<usize>,
    /// Consistency groups (the API's `spec.consistencyGroup` of standalone servers).
    #[serde(default)]
    pub consistency_groups: Vec<GroupEntry>,
}

/// A consistency group of a [`TargetsFile`].
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupEntry {
    /// Namespace of the members.
    pub namespace: String,
    /// Group name.
    pub name: String,
    /// Server names.
    pub members: Vec<String>,
    /// Seconds between rounds.
    pub interval_seconds: f64,
}

/// A storage backend.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum BackendSpec {
    /// A local directory.
    Local(PathBuf),
    /// An Azure Blob container reached with one of a SAS token, a service principal or
    /// workload identity.
    #[serde(rename_all = "camelCase")]
    Azure {
        /// Account endpoint.
        endpoint: String,
        /// Container.
        container: String,
        /// SAS query string, without the leading `?`.
        #[serde(default)]
        sas: Option<String>,
        /// A service principal with a client secret.
        #[serde(default)]
        service_principal: Option<ServicePrincipal>,
        /// Workload identity (an Entra application federated with this pod's ServiceAccount).
        #[serde(default)]
        workload_identity: Option<Identity>,
    },
}

/// An Entra application and its directory.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identity {
    /// Directory (tenant) id.
    pub tenant_id: String,
    /// Application (client) id.
    pub client_id: String,
}

/// A service principal with a client secret.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePrincipal {
    /// Directory (tenant) id.
    pub tenant_id: String,
    /// Application (client) id.
    pub client_id: String,
    /// The client secret.
    pub client_secret: String,
}

impl std::fmt::Debug for ServicePrincipal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePrincipal")
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// Exactly one of the three credentials of an Azure backend.
fn azure_auth(
    sas: Option<String>,
    service_principal: Option<ServicePrincipal>,
    workload_identity: Option<Identity>,
) -> anyhow::Result<BlobAuth> {
    match (sas, service_principal, workload_identity) {
        (Some(sas), None, None) => Ok(BlobAuth::Sas(sas)),
        (None, Some(sp), None) => Ok(BlobAuth::ServicePrincipal {
            tenant_id: sp.tenant_id,
            client_id: sp.client_id,
            client_secret: sp.client_secret,
        }),
        (None, None, Some(wi)) => Ok(BlobAuth::WorkloadIdentity { tenant_id: wi.tenant_id, client_id: wi.client_id }),
        _ => Err(anyhow::anyhow!("backend.azure needs exactly one of sas, servicePrincipal or workloadIdentity")),
    }
}

/// A [`TargetsFile`] loaded: the same target for every server.
#[derive(Debug)]
pub struct StaticTargets(Arc<Target>, Vec<GroupEntry>);

impl StaticTargets {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let file: TargetsFile = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::new(file)
    }

    /// From an already parsed file.
    pub fn new(file: TargetsFile) -> anyhow::Result<Self> {
        let backend: Arc<dyn BlobBackend> = match file.backend {
            BackendSpec::Local(dir) => Arc::new(LocalBackend::new(dir)?),
            BackendSpec::Azure { endpoint, container, sas, service_principal, workload_identity } => {
                let auth = azure_auth(sas, service_principal, workload_identity)?;
                let azure = AzureConnector::from_env().map_err(|e| anyhow::anyhow!(e))?;
                Arc::new(azure.backend(&endpoint, &container, &auth)?)
            }
        };
        let mut data = BTreeMap::new();
        for (k, v) in file.keys {
            let bytes = if k == siterecovery_store::SECRET_ACTIVE {
                v.into_bytes()
            } else {
                base64::engine::general_purpose::STANDARD
                    .decode(v.trim())
                    .map_err(|e| anyhow::anyhow!("keys.{k}: not base64: {e}"))?
            };
            data.insert(k, bytes);
        }
        let keyring = Keyring::from_secret_data(&data)?;
        let mut options = StoreOptions::default();
        if let Some(level) = file.compression_level {
            anyhow::ensure!((1..=19).contains(&level), "compressionLevel must be from 1 to 19, not {level}");
            options.zstd_level = i32::from(level);
        }
        if let Some(p) = file.parallelism {
            options.parallelism = p.max(1);
        }
        let chunk_size = file.chunk_size.unwrap_or(DEFAULT_CHUNK_SIZE);
        options.chunk_size = chunk_size;
        let store = Store::new(backend, keyring, options)?;
        let groups = file.consistency_groups;
        for g in &groups {
            siterecovery_store::validate_segment("consistency group", &g.name)?;
            anyhow::ensure!(
                g.interval_seconds.is_finite() && g.interval_seconds > 0.0,
                "consistency group {}: intervalSeconds must be positive",
                g.name
            );
        }
        Ok(Self(
            Arc::new(Target {
                store,
                chunk_size,
                bandwidth_bytes_per_second: file.bandwidth_bytes_per_second,
                crash_interval: None,
                app_interval: None,
                compression_level: file.compression_level,
            }),
            groups,
        ))
    }
}

#[async_trait::async_trait]
impl Targets for StaticTargets {
    async fn resolve(&self, _namespace: &str, _server: &str) -> Result<Arc<Target>, (String, String)> {
        Ok(self.0.clone())
    }

    async fn group(&self, namespace: &str, server: &str) -> Result<Option<GroupSpec>, String> {
        let entry = self.1.iter().find(|g| g.namespace == namespace && g.members.iter().any(|m| m == server));
        Ok(entry.map(|g| {
            let mut members = g.members.clone();
            members.sort();
            members.dedup();
            GroupSpec {
                name: g.name.clone(),
                members,
                interval: std::time::Duration::from_secs_f64(g.interval_seconds),
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(json: serde_json::Value) -> anyhow::Result<BlobAuth> {
        match serde_json::from_value::<BackendSpec>(json)? {
            BackendSpec::Azure { sas, service_principal, workload_identity, .. } => {
                azure_auth(sas, service_principal, workload_identity)
            }
            BackendSpec::Local(_) => Err(anyhow::anyhow!("local")),
        }
    }

    #[test]
    fn an_azure_backend_takes_exactly_one_credential() {
        let at = serde_json::json!({"endpoint": "https://acct.blob.core.windows.net", "container": "dr"});
        let with = |k: &str, v: serde_json::Value| {
            let mut a = at.clone();
            a[k] = v;
            serde_json::json!({ "azure": a })
        };
        let wi = with("workloadIdentity", serde_json::json!({"tenantId": "t", "clientId": "c"}));
        assert_eq!(backend(wi).unwrap(), BlobAuth::WorkloadIdentity { tenant_id: "t".into(), client_id: "c".into() });
        let sp = with("servicePrincipal", serde_json::json!({"tenantId": "t", "clientId": "c", "clientSecret": "s"}));
        assert_eq!(backend(sp).unwrap().kind(), "service principal");
        assert_eq!(backend(with("sas", "sv=1&sig=x".into())).unwrap(), BlobAuth::Sas("sv=1&sig=x".into()));
        let err = backend(serde_json::json!({ "azure": at })).unwrap_err().to_string();
        assert!(err.contains("exactly one of sas, servicePrincipal or workloadIdentity"), "{err}");
    }

    #[test]
    fn a_compression_level_is_handed_out_and_a_bad_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = |level: serde_json::Value| {
            let json = serde_json::json!({
                "backend": {"local": dir.path()},
                "keys": {"active": "k1", "key-k1": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="},
                "compressionLevel": level,
            });
            StaticTargets::new(serde_json::from_value(json).unwrap())
        };
        assert_eq!(file(serde_json::Value::Null).unwrap().0.compression_level, None);
        let nine = file(9.into()).unwrap();
        assert_eq!((nine.0.compression_level, nine.0.store.options().zstd_level), (Some(9), 9));
        let err = file(20.into()).unwrap_err().to_string();
        assert!(err.contains("compressionLevel must be from 1 to 19, not 20"), "{err}");
    }
}
