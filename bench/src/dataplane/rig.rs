//! The system under test, set up as a user would: certificates from the operator's own
//! CA code, a targets file naming an Azurite container (account SAS), the release
//! process server as a child process, and release agents started per phase.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use jiff::Timestamp;
use serde_json::json;
use siterecovery_operator::registration::certs::Ca;
use siterecovery_store::backend::{DEVSTORE_ACCOUNT, DEVSTORE_KEY};
use siterecovery_store::{AccountSas, AzureBlobBackend, Keyring, ServerRef, Store, StoreOptions};

use super::procs::{Proc, Usage, free_port, scrape, value};

/// Namespace and name of the benchmark's protected server.
pub const NAMESPACE: &str = "bench";
/// See [`NAMESPACE`].
pub const SERVER: &str = "dataplane";

/// Process-server counters (`siterecovery_process_server_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PsCounters {
    /// Plaintext chunk bytes received from agents.
    pub received: f64,
    /// Bytes uploaded to Blob storage.
    pub uploaded: f64,
    /// Recovery points written to the store.
    pub points: f64,
    /// Acknowledged bytes not yet uploaded.
    pub backlog: f64,
}

/// Where things are and how to start them.
#[derive(Debug, Clone)]
pub struct RigPaths {
    /// Working directory of this run.
    pub work: PathBuf,
    /// Release agent binary.
    pub agent_bin: PathBuf,
    /// Release process-server binary.
    pub ps_bin: PathBuf,
    /// Azurite account endpoint.
    pub azurite: String,
    /// Crash-consistent interval of the agents, seconds.
    pub interval_s: f64,
    /// Chunk size for the targets file (`None`: the product default).
    pub chunk_size: Option<u32>,
    /// The disk the agent protects (an image file or a block device).
    pub disk: PathBuf,
    /// More fields of the agent's `agent.json` (e.g. `tracking`, `appConsistency`);
    /// `Null` for none.
    pub agent_extra: serde_json::Value,
}

/// A running process server and what agents need to reach it.
#[derive(Debug)]
pub struct Rig {
    /// Paths and settings.
    pub paths: RigPaths,
    /// The process server.
    pub ps: Proc,
    /// Its replication port.
    pub ps_port: u16,
    /// Its `/metrics` address.
    pub metrics: String,
    /// The store it writes (same container and key), for listing and restore.
    pub store: Store,
    /// The protected server.
    pub server: ServerRef,
    /// The agents' `/metrics` address (`metricsAddr` in their `agent.json`).
    pub agent_metrics: String,
    agent_config: PathBuf,
}

impl Rig {
    /// Writes certificates and configs, creates the container, starts the process server
    /// and waits for its `/metrics`.
    pub async fn start(paths: RigPaths, container: &str) -> anyhow::Result<Self> {
        let work = &paths.work;
        let day = Duration::from_secs(86_400);
        let ca = Ca::generate(Timestamp::now(), day * 30)?;
        let ps_tls = work.join("pki/ps");
        let agent_tls = work.join("pki/agent");
        std::fs::create_dir_all(&ps_tls)?;
        std::fs::create_dir_all(&agent_tls)?;
        let serving = ca.issue_serving(&["localhost".into(), "127.0.0.1".into()], Timestamp::now(), day)?;
        std::fs::write(ps_tls.join("tls.crt"), &serving.cert_pem)?;
        std::fs::write(ps_tls.join("tls.key"), &serving.key_pem)?;
        std::fs::write(ps_tls.join("ca.crt"), &ca.bundle_pem)?;
        let client = ca.issue_client(NAMESPACE, SERVER, Timestamp::now(), day)?;
        std::fs::write(agent_tls.join("tls.crt"), &client.cert_pem)?;
        std::fs::write(agent_tls.join("tls.key"), &client.key_pem)?;
        std::fs::write(agent_tls.join("ca.crt"), &ca.bundle_pem)?;

        let key = *blake3::hash(format!("{}-{:?}", std::process::id(), Timestamp::now()).as_bytes()).as_bytes();
        let sas = AccountSas::full_access(DEVSTORE_ACCOUNT, Timestamp::now() + jiff::SignedDuration::from_hours(24))
            .sign(DEVSTORE_KEY)
            .map_err(|e| anyhow::anyhow!("signing the SAS: {e}"))?;
        let backend = AzureBlobBackend::with_sas(&paths.azurite, container, &sas)?;
        backend.ensure_container().await.with_context(|| format!("creating container {container}"))?;
        let mut targets = json!({
            "backend": {"azure": {"endpoint": paths.azurite, "container": container, "sas": sas}},
            "keys": {"active": "k1", "key-k1": base64::engine::general_purpose::STANDARD.encode(key)},
        });
        if let Some(cs) = paths.chunk_size {
            targets["chunkSize"] = json!(cs);
        }
        let targets_path = work.join("targets.json");
        std::fs::write(&targets_path, serde_json::to_vec_pretty(&targets)?)?;
        let keyring = Keyring::new("k1", [("k1".to_string(), key)])?;
        let mut options = StoreOptions::default();
        if let Some(cs) = paths.chunk_size {
            options.chunk_size = cs;
        }
        let store = Store::new(Arc::new(backend), keyring, options)?;

        let ps_port = free_port()?;
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let listen = format!("127.0.0.1:{ps_port}");
        let cache = work.join("ps-cache");
        let args = [
            "--listen",
            &listen,
            "--cache-dir",
            &cache.display().to_string(),
            "--tls-dir",
            &ps_tls.display().to_string(),
            "--targets",
            &targets_path.display().to_string(),
            "--metrics",
            &metrics,
        ]
        .map(|s| s.to_owned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut ps = Proc::spawn("process server", &paths.ps_bin, &args, &work.join("process-server.log"))?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while scrape(&metrics).await.is_err() {
            ps.check_alive()?;
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "process server /metrics never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let agent_config = work.join("agent.json");
        let agent_metrics = format!("127.0.0.1:{}", free_port()?);
        let mut config = json!({
            "namespace": NAMESPACE,
            "server": SERVER,
            "disks": [{"id": "disk0", "path": paths.disk}],
            "processServer": format!("127.0.0.1:{ps_port}"),
            "tlsServerName": "localhost",
            "clientCert": agent_tls.join("tls.crt"),
            "clientKey": agent_tls.join("tls.key"),
            "caBundle": agent_tls.join("ca.crt"),
            "intervalSeconds": paths.interval_s,
            "maxPasses": 8,
            "compressionLevel": 1,
            "metricsAddr": agent_metrics,
        });
        if let (Some(config), Some(extra)) = (config.as_object_mut(), paths.agent_extra.as_object()) {
            config.extend(extra.clone());
        }
        std::fs::write(&agent_config, serde_json::to_vec_pretty(&config)?)?;
        let server = ServerRef::new(NAMESPACE, SERVER)?;
        Ok(Self { paths, ps, ps_port, metrics, store, server, agent_metrics, agent_config })
    }

    /// The disk the agent protects.
    pub fn disk(&self) -> PathBuf {
        self.paths.disk.clone()
    }

    /// Starts an agent logging to `agent-<tag>.log`.
    pub fn start_agent(&self, tag: &str) -> anyhow::Result<Proc> {
        let config = self.agent_config.display().to_string();
        Proc::spawn(
            &format!("agent ({tag})"),
            &self.paths.agent_bin,
            &["--config", &config],
            &self.paths.work.join(format!("agent-{tag}.log")),
        )
    }

    /// The process server's counters now.
    pub async fn counters(&self) -> anyhow::Result<PsCounters> {
        let text = scrape(&self.metrics).await?;
        let p = "siterecovery_process_server_";
        Ok(PsCounters {
            received: value(&text, &format!("{p}received_bytes_total")),
            uploaded: value(&text, &format!("{p}uploaded_bytes_total")),
            points: value(&text, &format!("{p}recovery_points_total")),
            backlog: value(&text, &format!("{p}backlog_bytes")),
        })
    }

    /// Chunks the running agent has read and compared so far
    /// (`siterecovery_agent_chunks_compared_total`; it counts a chunk once read, hashed and
    /// compressed): an increase tells that a pass is under way.
    pub async fn agent_chunks_compared(&self) -> anyhow::Result<f64> {
        let text = scrape(&self.agent_metrics).await?;
        Ok(value(&text, "siterecovery_agent_chunks_compared_total"))
    }

    /// Waits until the process server has written `points` recovery points to the store
    /// (polling `/metrics` every 100 ms); fails if the agent or process server exits or
    /// after `timeout`.
    pub async fn wait_points(&mut self, agent: &mut Proc, points: f64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.counters().await?.points >= points {
                return Ok(());
            }
            agent.check_alive()?;
            self.ps.check_alive()?;
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no recovery point {points} in the store after {timeout:?}; agent log tail:\n{}",
                super::procs::tail(&agent.log, 15)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Process-server resources so far.
    pub fn ps_usage(&self) -> Usage {
        self.ps.usage().unwrap_or_default()
    }
}

/// The instant a point id (`20261127T101500123Z-crash`) names.
pub fn point_time(id: &str) -> Option<Timestamp> {
    let (stamp, _) = id.split_once('Z')?;
    let (secs, millis) = stamp.split_at(stamp.len().checked_sub(3)?);
    let dt = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%S", secs).ok()?;
    let t = dt.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp();
    t.checked_add(jiff::SignedDuration::from_millis(millis.parse().ok()?)).ok()
}

/// Point ids an agent log reports as acknowledged, in order.
pub fn acknowledged_points(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(super::procs::strip_ansi)
        .filter(|l| l.contains("crash-consistent recovery point acknowledged"))
        .filter_map(|l| {
            let rest = &l[l.find("point=")? + 6..];
            Some(rest.split_whitespace().next()?.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_ids_name_their_time() {
        let t = point_time("20261127T101500123Z-crash").unwrap();
        assert_eq!(t.to_string(), "2026-11-27T10:15:00.123Z");
        let id = siterecovery_store::generate_point_id(t, siterecovery_store::PointKind::Crash);
        assert_eq!(point_time(&id), Some(t), "round trip with the store's own id format");
        assert_eq!(point_time("garbage"), None);
    }
}
