//! How the process-server fleet is built and sized: the operator's command-line flags
//! ([`ProcessServerArgs`], flattened into the operator's `Args`) and the validated
//! [`ProcessServerConfig`] the loop runs with.

use std::time::Duration;

use siterecovery_core::assignment::SizingLimits;

/// Default process-server image: the release matching this operator.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/siterecovery/siterecovery-process-server:", env!("CARGO_PKG_VERSION"));

/// Command-line flags (and environment variables) of the process-server fleet.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Process servers")]
pub struct ProcessServerArgs {
    /// Container image of the process servers.
    #[arg(long = "process-server-image", env = "SR_PROCESS_SERVER_IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// Image pull policy (Always, IfNotPresent, Never); the cluster default when unset.
    #[arg(long = "process-server-image-pull-policy", env = "SR_PROCESS_SERVER_IMAGE_PULL_POLICY")]
    pub image_pull_policy: Option<String>,
    /// Arguments of the process-server container: repeat the flag, one argument each
    /// (values are split at spaces, so the environment variable can list several).
    #[arg(
        long = "process-server-arg",
        env = "SR_PROCESS_SERVER_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub args: Vec<String>,
    /// Port agents replicate to.
    #[arg(long = "process-server-port", env = "SR_PROCESS_SERVER_PORT", default_value_t = 9443)]
    pub port: u16,
    /// Size of each process server's cache volume (a Kubernetes quantity). Changing it
    /// later does not resize existing volumes.
    #[arg(long = "process-server-cache-size", env = "SR_PROCESS_SERVER_CACHE_SIZE", default_value = "100Gi")]
    pub cache_size: String,
    /// StorageClass of the cache volumes; the cluster default when unset.
    #[arg(long = "process-server-storage-class", env = "SR_PROCESS_SERVER_STORAGE_CLASS")]
    pub storage_class: Option<String>,
    /// CPU request of each process server (compression and encryption are CPU-bound).
    #[arg(long = "process-server-cpu-request", env = "SR_PROCESS_SERVER_CPU_REQUEST", default_value = "1")]
    pub cpu_request: String,
    /// Memory request of each process server.
    #[arg(long = "process-server-memory-request", env = "SR_PROCESS_SERVER_MEMORY_REQUEST", default_value = "1Gi")]
    pub memory_request: String,
    /// Memory limit of each process server; an empty value sets none.
    #[arg(long = "process-server-memory-limit", env = "SR_PROCESS_SERVER_MEMORY_LIMIT", default_value = "2Gi")]
    pub memory_limit: Option<String>,
    /// ServiceAccount the process-server pods run as (it must be allowed to write their
    /// heartbeat Lease); the namespace's `default` when unset.
    #[arg(long = "process-server-service-account", env = "SR_PROCESS_SERVER_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// ClusterRole holding the process servers' permissions (the chart installs it). When
    /// set and no ServiceAccount is given, the operator creates a ServiceAccount in each
    /// namespace with servers and binds it to this ClusterRole there.
    #[arg(long = "process-server-cluster-role", env = "SR_PROCESS_SERVER_CLUSTER_ROLE")]
    pub cluster_role: Option<String>,
    /// Label the process-server pods `azure.workload.identity/use: "true"`, so the AKS
    /// workload-identity webhook projects a ServiceAccount token into them (policies whose
    /// credential is `workloadIdentity` need it).
    #[arg(
        long = "process-server-workload-identity",
        env = "SR_PROCESS_SERVER_WORKLOAD_IDENTITY",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub workload_identity: bool,
    /// Client id annotated (`azure.workload.identity/client-id`) on the ServiceAccounts the
    /// operator creates for process servers; optional, since policies name their identity.
    #[arg(long = "process-server-workload-identity-client-id", env = "SR_PROCESS_SERVER_WORKLOAD_IDENTITY_CLIENT_ID")]
    pub workload_identity_client_id: Option<String>,
    /// Protected servers one process server carries (0: no limit on the count).
    #[arg(long = "process-server-max-servers", env = "SR_PROCESS_SERVER_MAX_SERVERS", default_value_t = 100)]
    pub servers_per_process_server: u32,
    /// Daily churn one process server carries, in bytes (0: no limit on churn).
    #[arg(
        long = "process-server-max-churn-bytes-per-day",
        env = "SR_PROCESS_SERVER_MAX_CHURN",
        default_value_t = 2_000_000_000_000
    )]
    pub churn_bytes_per_day_per_process_server: u64,
    /// Most process-server replicas per namespace.
    #[arg(long = "process-server-max-replicas", env = "SR_PROCESS_SERVER_MAX_REPLICAS", default_value_t = 10)]
    pub max_replicas: u32,
}

impl ProcessServerArgs {
    /// Validates the flags into the fleet's configuration; `namespace` is the operator's
    /// watch namespace (`None`: every namespace).
    pub fn config(&self, namespace: Option<String>) -> Result<ProcessServerConfig, ConfigError> {
        let flag = |name: &'static str, value: &str| -> Result<String, ConfigError> {
            if is_quantity(value) { Ok(value.to_owned()) } else { Err(ConfigError::Quantity(name, value.to_owned())) }
        };
        if self.image.trim().is_empty() {
            return Err(ConfigError::Invalid("--process-server-image must not be empty".into()));
        }
        if self.port == 0 {
            return Err(ConfigError::Invalid("--process-server-port must be 1-65535".into()));
        }
        if self.max_replicas == 0 {
            return Err(ConfigError::Invalid("--process-server-max-replicas must be at least 1".into()));
        }
        if let Some(p) = &self.image_pull_policy
            && !["Always", "IfNotPresent", "Never"].contains(&p.as_str())
        {
            return Err(ConfigError::Invalid(format!(
                "--process-server-image-pull-policy {p:?} is not Always, IfNotPresent or Never"
            )));
        }
        Ok(ProcessServerConfig {
            image: self.image.clone(),
            image_pull_policy: self.image_pull_policy.clone(),
            args: self.args.iter().filter(|a| !a.is_empty()).cloned().collect(),
            port: self.port,
            cache_size: flag("--process-server-cache-size", &self.cache_size)?,
            storage_class: self.storage_class.clone().filter(|s| !s.is_empty()),
            cpu_request: flag("--process-server-cpu-request", &self.cpu_request)?,
            memory_request: flag("--process-server-memory-request", &self.memory_request)?,
            memory_limit: match self.memory_limit.as_deref() {
                None | Some("") => None,
                Some(m) => Some(flag("--process-server-memory-limit", m)?),
            },
            service_account: self.service_account.clone().filter(|s| !s.is_empty()),
            cluster_role: self.cluster_role.clone().filter(|s| !s.is_empty()),
            workload_identity: self.workload_identity,
            workload_identity_client_id: self.workload_identity_client_id.clone().filter(|s| !s.trim().is_empty()),
            limits: SizingLimits {
                servers_per_process_server: self.servers_per_process_server,
                churn_bytes_per_day_per_process_server: self.churn_bytes_per_day_per_process_server,
                max_replicas: self.max_replicas,
            },
            namespace,
            debounce: Duration::from_millis(500),
            resync: Duration::from_secs(300),
        })
    }
}

/// A flag value the operator refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a Kubernetes quantity.
    #[error("{0} {1:?} is not a Kubernetes quantity (like 500m, 2, 1Gi, 100G)")]
    Quantity(&'static str, String),
    /// Any other invalid value; the message names the flag.
    #[error("{0}")]
    Invalid(String),
}

/// What the fleet is built from; see [`ProcessServerArgs`] for each field's meaning.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessServerConfig {
    /// Container image.
    pub image: String,
    /// Image pull policy.
    pub image_pull_policy: Option<String>,
    /// Container arguments.
    pub args: Vec<String>,
    /// Replication port.
    pub port: u16,
    /// Cache volume size (quantity).
    pub cache_size: String,
    /// Cache StorageClass.
    pub storage_class: Option<String>,
    /// CPU request (quantity).
    pub cpu_request: String,
    /// Memory request (quantity).
    pub memory_request: String,
    /// Memory limit (quantity).
    pub memory_limit: Option<String>,
    /// Pods' ServiceAccount, managed by the user.
    pub service_account: Option<String>,
    /// ClusterRole to bind an operator-managed ServiceAccount to, per namespace.
    pub cluster_role: Option<String>,
    /// Whether the pods get the workload-identity webhook's label.
    pub workload_identity: bool,
    /// Client id annotated on operator-managed ServiceAccounts.
    pub workload_identity_client_id: Option<String>,
    /// Sizing limits for [`siterecovery_core::assignment`].
    pub limits: SizingLimits,
    /// Only this namespace (`None`: all).
    pub namespace: Option<String>,
    /// How long a namespace's changes are gathered before one pass handles them all.
    pub debounce: Duration,
    /// Longest time between two passes over a namespace with a fleet, even when nothing
    /// changed (re-applies drifted objects, e.g. a deleted Service).
    pub resync: Duration,
}

impl Default for ProcessServerConfig {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_owned(),
            image_pull_policy: None,
            args: Vec::new(),
            port: 9443,
            cache_size: "100Gi".into(),
            storage_class: None,
            cpu_request: "1".into(),
            memory_request: "1Gi".into(),
            memory_limit: Some("2Gi".into()),
            service_account: None,
            cluster_role: None,
            workload_identity: false,
            workload_identity_client_id: None,
            limits: SizingLimits::default(),
            namespace: None,
            debounce: Duration::from_millis(500),
            resync: Duration::from_secs(300),
        }
    }
}

/// Whether `s` is a Kubernetes quantity: a non-negative decimal number with an optional
/// binary (`Ki`…`Ei`), decimal (`m`, `k`, `M`…`E`) or exponent (`e3`) suffix. Hand-written
/// because the check is this small and k8s-openapi's `Quantity` does not parse.
pub fn is_quantity(s: &str) -> bool {
    let digits_end = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty()
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit())
        && !number.ends_with('.');
    let suffix_ok =
        matches!(suffix, "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "m" | "k" | "M" | "G" | "T" | "P" | "E")
            || suffix
                .strip_prefix(['e', 'E'])
                .is_some_and(|e| !e.is_empty() && e.trim_start_matches(['+', '-']).chars().all(|c| c.is_ascii_digit()));
    number_ok && suffix_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ps: ProcessServerArgs,
    }

    fn parse(args: &[&str]) -> ProcessServerArgs {
        Cli::try_parse_from(std::iter::once("operator").chain(args.iter().copied())).unwrap().ps
    }

    #[test]
    fn defaults_are_asr_sizing_and_port_9443() {
        let config = parse(&[]).config(None).unwrap();
        assert_eq!(config.port, 9443);
        assert_eq!(config.limits, SizingLimits::default());
        assert_eq!(config.cache_size, "100Gi");
        assert!(config.image.ends_with(env!("CARGO_PKG_VERSION")));
    }

    #[test]
    fn flags_reach_the_config() {
        let config = parse(&[
            "--process-server-port=10443",
            "--process-server-arg=--log-format",
            "--process-server-arg=json",
            "--process-server-cache-size=20Gi",
            "--process-server-storage-class=fast",
            "--process-server-max-servers=2",
            "--process-server-max-replicas=4",
        ])
        .config(Some("dr".into()))
        .unwrap();
        assert_eq!(config.port, 10443);
        assert_eq!(config.args, ["--log-format", "json"]);
        assert_eq!(config.storage_class.as_deref(), Some("fast"));
        assert_eq!((config.limits.servers_per_process_server, config.limits.max_replicas), (2, 4));
        assert_eq!(config.namespace.as_deref(), Some("dr"));
        assert!(!config.workload_identity);
        let config = parse(&[
            "--process-server-workload-identity=true",
            "--process-server-workload-identity-client-id=6f1f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
        ])
        .config(None)
        .unwrap();
        assert!(config.workload_identity);
        assert_eq!(config.workload_identity_client_id.as_deref(), Some("6f1f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b"));
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        let err = parse(&["--process-server-cache-size=lots"]).config(None).unwrap_err().to_string();
        assert!(err.contains("--process-server-cache-size \"lots\""), "{err}");
        let err = parse(&["--process-server-max-replicas=0"]).config(None).unwrap_err().to_string();
        assert!(err.contains("--process-server-max-replicas"), "{err}");
        let err = parse(&["--process-server-image-pull-policy=Sometimes"]).config(None).unwrap_err().to_string();
        assert!(err.contains("Sometimes"), "{err}");
    }

    #[test]
    fn quantities() {
        for ok in ["1", "500m", "1.5", "1Gi", "100G", "2e3", "0.5Ti"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "Gi", "1GB", "1..5", "-1", "1 Gi", "1e", ".", "1."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
