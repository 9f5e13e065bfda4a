//! What every reconciler gets: dependencies only, never lifecycle state (that lives in
//! each object's status).

use std::sync::Arc;

use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use siterecovery_api::ProtectedServer;
use siterecovery_store::backend::AzureConnector;

use crate::telemetry::Metrics;

/// Shared dependencies of the reconcilers.
pub struct Context {
    /// API client (the operator's own ServiceAccount in a cluster).
    pub client: Client,
    /// Publishes Kubernetes events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Cache of every ProtectedServer, kept by the server controller's watch.
    pub servers: Store<ProtectedServer>,
    /// Blob clients for probing targets and deleting data (one token credential per
    /// identity, so tokens are reused across reconciles).
    pub azure: AzureConnector,
}

impl Context {
    /// Builds the context; `servers` comes from the ProtectedServer controller.
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        servers: Store<ProtectedServer>,
        azure: AzureConnector,
    ) -> Arc<Self> {
        let reporter = Reporter { controller: siterecovery_api::field_manager::OPERATOR.into(), instance: None };
        let recorder = Recorder::new(client.clone(), reporter);
        Arc::new(Self { client, recorder, metrics, servers, azure })
    }
}
