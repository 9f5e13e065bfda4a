//! Where a protected server's recovery points go: a [`Store`] (backend + keyring) and the
//! chunk size. Resolved per server when its agent connects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use serde::Deserialize;

use crate::group::GroupSpec;
use siterecovery_store::{
    AzureBlobBackend, BlobBackend, DEFAULT_CHUNK_SIZE, Keyring, LocalBackend, Store, StoreOptions,
};

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

/// Targets from a file (standalone process servers, tests): one store for every server.
///
/// ```json
/// {"backend": {"azure": {"endpoint": "https://acct.blob.core.windows.net", "container": "dr", "sas": "sv=…"}},
///  "keys": {"active": "k1", "key-k1": "<base64 of 32 bytes>"},
///  "chunkSize": 4194304, "bandwidthBytesPerSecond": 0}
/// ```
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
    /// An Azure Blob container reached with a SAS token.
    Azure {
        /// Account endpoint.
        endpoint: String,
        /// Container.
        container: String,
        /// SAS query string, without the leading `?`.
        sas: String,
    },
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
            BackendSpec::Azure { endpoint, container, sas } => {
                Arc::new(AzureBlobBackend::with_sas(&endpoint, &container, &sas)?)
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
