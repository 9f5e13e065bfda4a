//! What the agent's tests share: a process server in this process keeping a local store,
//! with certificates from the operator's CA code; and, for the tests against the real
//! local API server, the operator's ProtectedServer reconciler, registration's reconciler
//! and its HTTPS endpoint, run in this process with the chart's RBAC.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use siterecovery_agent::{AgentConfig, DiskConfig};
use siterecovery_operator::registration::certs::Ca;
use siterecovery_process_server::target::{StaticTargets, Targets};
use siterecovery_process_server::{Config, ProcessServer, TlsFiles};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::controller::Controller;
use siterecovery_e2e::StopSignal;
use siterecovery_e2e::operator::operator_client;
use siterecovery_operator::context::Context;
use siterecovery_operator::registration::{self as operator_registration, ApiServerInfo, RegistrationConfig};
use siterecovery_operator::server;
use siterecovery_operator::telemetry::Metrics;
use siterecovery_operator::watch::Watches;

/// A process server for `prod/db-01` keeping a local store under `dir` (`store/`, with
/// chunks of `chunk_size`), its targets as `targets` wraps them; the agent's certificate,
/// key and CA bundle are in `tls`.
pub struct LocalPs {
    pub ps: ProcessServer,
    pub tls: PathBuf,
    /// The store's encryption key (key id `k1`).
    pub key: [u8; 32],
}

impl LocalPs {
    pub async fn start(dir: &Path, chunk_size: u64, targets: impl FnOnce(StaticTargets) -> Arc<dyn Targets>) -> Self {
        const DAY: Duration = Duration::from_secs(86_400);
        let ca = Ca::generate(Timestamp::now(), DAY * 365).unwrap();
        let ps_cert = ca.issue_serving(&["localhost".into()], Timestamp::now(), DAY).unwrap();
        let agent_cert = ca.issue_client("prod", "db-01", Timestamp::now(), DAY).unwrap();
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        for (name, pem) in [
            ("tls.crt", &ps_cert.cert_pem),
            ("tls.key", &ps_cert.key_pem),
            ("ca.crt", &ca.bundle_pem),
            ("agent.crt", &agent_cert.cert_pem),
            ("agent.key", &agent_cert.key_pem),
        ] {
            std::fs::write(tls.join(name), pem).unwrap();
        }
        use base64::Engine as _;
        let key: [u8; 32] = rand::random();
        let file = serde_json::json!({
            "backend": {"local": dir.join("store")},
            "keys": {"active": "k1", "key-k1": base64::engine::general_purpose::STANDARD.encode(key)},
            "chunkSize": chunk_size,
        });
        std::fs::write(dir.join("targets.json"), file.to_string()).unwrap();
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            cache_dir: dir.join("cache"),
            cache_limit: 1 << 30,
            tls: TlsFiles::in_dir(&tls),
            metrics: None,
            recent_chunk_bytes: 64 << 20,
            block_cv_bytes: siterecovery_process_server::recent::BLOCK_CV_BYTES,
            local_copy_bytes: siterecovery_process_server::DEFAULT_LOCAL_COPY_BYTES,
        };
        let loaded = StaticTargets::load(&dir.join("targets.json")).unwrap();
        let ps = siterecovery_process_server::start(config, targets(loaded)).await.unwrap();
        Self { ps, tls, key }
    }

    /// An agent configuration for `prod/db-01` with `disks`, replicating to this process
    /// server every 0.2 s, with nothing else configured.
    pub fn agent_config(&self, disks: Vec<DiskConfig>) -> AgentConfig {
        let tls = (self.tls.join("agent.crt"), self.tls.join("agent.key"), self.tls.join("ca.crt"));
        let address = format!("localhost:{}", self.ps.addr.port());
        AgentConfig { interval_seconds: 0.2, ..AgentConfig::new("prod", "db-01", disks, address, tls) }
    }
}

/// The ProtectedServer reconciler, registration's reconciler and its HTTPS endpoint for
/// the servers of `ns`; returns the endpoint's address and what stops them.
pub async fn start_operator(admin: &kube::Client, op_ns: &str, ns: &str) -> anyhow::Result<(SocketAddr, StopSignal)> {
    let client = operator_client(admin, op_ns).await?;
    let stop = StopSignal::new();
    let (watches, run_watches) = Watches::new(&client, Some(ns));
    let watching = stop.signal();
    tokio::spawn(async move {
        tokio::select! {
            () = run_watches => {}
            () = watching => {}
        }
    });
    let azure = siterecovery_store::backend::AzureConnector::new(Default::default()).map_err(anyhow::Error::msg)?;
    let ctx = Context::new(client.clone(), Arc::new(Metrics::new()), watches.clone(), azure);
    watches.ready().await;
    tokio::spawn(
        Controller::for_shared_stream(watches.servers.applied(None), ctx.servers.clone())
            .graceful_shutdown_on(stop.signal())
            .run(server::reconcile, server::error_policy, ctx.clone())
            .for_each(|_| async {}),
    );
    let mut config = RegistrationConfig::new(op_ns, ApiServerInfo::from_config(&kube::Config::infer().await?, None));
    config.watch_namespace = Some(ns.to_owned());
    config.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    config.resync = Duration::from_secs(1);
    tokio::spawn(operator_registration::run(ctx.clone(), config.clone(), stop.signal()));
    let endpoint = operator_registration::RegistrationServer::bind(ctx.clone(), config).await?;
    let addr = endpoint.local_addr();
    tokio::spawn(endpoint.serve(stop.signal()));
    Ok((addr, stop))
}

/// A Secret's value as text (empty when absent).
pub fn text(secret: &Secret, key: &str) -> String {
    let data = secret.data.as_ref().and_then(|d| d.get(key));
    data.map(|v| String::from_utf8_lossy(&v.0).into_owned()).unwrap_or_default()
}
