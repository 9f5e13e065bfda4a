//! What every reconciler gets: dependencies only, never lifecycle state (that lives in
//! each object's status).

use std::sync::Arc;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use siterecovery_api::{ProtectedServer, ReplicationPolicy};
use siterecovery_store::backend::AzureConnector;

use crate::telemetry::Metrics;
use crate::watch::Watches;

/// Shared dependencies of the reconcilers.
pub struct Context {
    /// API client (the operator's own ServiceAccount in a cluster).
    pub client: Client,
    /// Publishes Kubernetes events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Cache of every ProtectedServer in scope (the shared watch in `watches`).
    pub servers: Store<ProtectedServer>,
    /// Cache of every ReplicationPolicy in scope (the shared watch in `watches`).
    pub policies: Store<ReplicationPolicy>,
    /// The shared watches, for the parts of the operator that follow their changes.
    pub watches: Watches,
    /// Blob clients for probing targets and deleting data (one token credential per
    /// identity, so tokens are reused across reconciles).
    pub azure: AzureConnector,
}

impl Context {
    /// Builds the context over the shared watches (whose future must be running).
    pub fn new(client: Client, metrics: Arc<Metrics>, watches: Watches, azure: AzureConnector) -> Arc<Self> {
        let reporter = Reporter { controller: siterecovery_api::field_manager::OPERATOR.into(), instance: None };
        let recorder = Recorder::new(client.clone(), reporter);
        let (servers, policies) = (watches.servers.store(), watches.policies.store());
        Arc::new(Self { client, recorder, metrics, servers, policies, watches, azure })
    }
}
