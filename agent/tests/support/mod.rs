//! What the agent's tests against the real local API server share: the operator's
//! ProtectedServer reconciler, registration's reconciler and its HTTPS endpoint, run in
//! this process with the chart's RBAC.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
