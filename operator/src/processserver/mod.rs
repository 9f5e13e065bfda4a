//! The process-server fleet (ASR's process servers, the replication gateways): per
//! namespace with ProtectedServers, a StatefulSet and headless Service sized from the
//! servers' count and churn; each process server's health from the heartbeat Lease it
//! renews; and which process server every ProtectedServer replicates to, written to its
//! `status.processServer`. The contract with the process server is in
//! `docs/process-servers.md`.
//!
//! # Why a loop and not a `Controller`
//!
//! The unit of work is a namespace: one pass sizes the fleet and places every server of
//! the namespace together, since moving one server changes where the others fit. A
//! kube-runtime `Controller` reconciles objects that exist in its store, so keyed on the
//! StatefulSet it could never create the first one, and keyed on Namespaces it would
//! need to read every namespace of the cluster. [`run`] is therefore a small loop over
//! three caches (the shared one of ProtectedServers, heartbeat Leases, fleet StatefulSets) that:
//!
//! - turns watch events into namespaces to run, only when something the pass looks at
//!   changed (a pin, an assignment, churn, a health level, a backlog emptying, the
//!   StatefulSet's generation): agents and process servers report often, and those
//!   reports alone must not trigger passes;
//! - gathers the changes of one namespace for [`ProcessServerConfig::debounce`] into one
//!   pass, and runs namespaces one at a time (a pass is a few requests);
//! - runs a namespace again when a heartbeat is due to cross a health threshold, and at
//!   least every [`ProcessServerConfig::resync`] while it has a fleet (re-applies
//!   drifted objects); a failed pass is retried with exponential backoff.
//!
//! At rest nothing runs but those timers: passes write only what changed (apply of an
//! unchanged object is a no-op the API server does not record, so it wakes nothing).
//! Until the caches show a pass's own writes, the next pass reads them from memory, so
//! a slow watch cannot make it announce the same change twice. ProtectedServers come
//! from the operator's shared watch (`Context::watches`); the loop publishes events with
//! a recorder per event (see `publish`).
//!
//! What a pass decides ([`decide`]) — size, spares for Critical process servers,
//! draining before scale-down, placement — is described in `docs/process-servers.md`.
//!
//! `status.processServer` is written with its own field manager,
//! [`ASSIGNMENT_MANAGER`], so the ProtectedServer reconciler (field manager
//! `siterecovery-operator`, which never writes that field) and this loop never take
//! fields from each other.

mod config;
mod decide;
mod fleet;
mod lease;
mod memory;
mod queue;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ObjectReference, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use siterecovery_api::ProtectedServer;
use siterecovery_api::field_manager::OPERATOR;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

pub use config::{ConfigError, DEFAULT_IMAGE, ProcessServerArgs, ProcessServerConfig, is_quantity};
pub use decide::{Decision, Fleet, Notice, Observed, StatusWrite, decide};
pub use fleet::{
    CACHE_DIR, CACHE_VOLUME, COMPONENT, FLEET_SELECTOR, HEALTH_ANNOTATION, LEASE_SELECTOR, NAME, PORT_NAME, TLS_DIR,
    ordinal, pod_name,
};
pub use lease::{BACKLOG_ANNOTATION, CACHE_FREE_ANNOTATION, LEASE_PREFIX, LeaseReport, level, read_lease};

use crate::context::Context;
use crate::error::{Error, Result};
use memory::Memory;
use queue::{Fingerprints, Queue, fingerprint};

/// Field manager of `status.processServer` (and of nothing else).
pub const ASSIGNMENT_MANAGER: &str = "siterecovery-operator-assignment";

/// `kind` label of this loop's reconcile metrics.
const KIND: &str = "ProcessServerFleet";
/// Longest wait before retrying a failed pass.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// `note` of an event is limited to 1 kB.
const MAX_NOTE: usize = 1000;

/// The caches a pass reads.
struct Stores {
    servers: Store<ProtectedServer>,
    leases: Store<Lease>,
    sets: Store<StatefulSet>,
}

impl Stores {
    /// Whether every cache holds a complete first list (before that, a missing Lease
    /// would look like a dead process server).
    fn ready(&self) -> bool {
        [
            self.servers.wait_until_ready().now_or_never(),
            self.leases.wait_until_ready().now_or_never(),
            self.sets.wait_until_ready().now_or_never(),
        ]
        .iter()
        .all(|r| matches!(r, Some(Ok(()))))
    }
}

/// Runs the fleet of every watched namespace (ProtectedServers from the shared watch in
/// `ctx`, whose future must be running) until `stopped` resolves (a pass in
/// progress finishes first). Never returns an error: failures are logged, counted in
/// `siterecovery_reconcile_errors_total{kind="ProcessServerFleet"}` and retried.
pub async fn run(ctx: Arc<Context>, config: ProcessServerConfig, stopped: impl Future<Output = ()> + Send) {
    let client = ctx.client.clone();
    let (leases, leases_writer) = reflector::store::<Lease>();
    let (sets, sets_writer) = reflector::store::<StatefulSet>();
    let stores = Stores { servers: ctx.servers.clone(), leases, sets };

    let mut server_prints = Fingerprints::default();
    let cached = ctx.servers.clone();
    let in_scope = config.namespace.clone();
    let server_events = ctx.watches.servers.changes().map(move |change| {
        server_prints
            .observe_change(&change, || cached.state(), server_print)
            .into_iter()
            .filter(|ns| in_scope.as_ref().is_none_or(|scope| scope == ns))
            .collect::<Vec<_>>()
    });
    let mut lease_prints = Fingerprints::default();
    let lease_events =
        watcher(scoped::<Lease>(&client, &config.namespace), watcher::Config::default().labels(LEASE_SELECTOR))
            .default_backoff()
            .reflect(leases_writer)
            .map(move |e| namespaces(e, "Lease", |ev| lease_prints.observe(ev, lease_print)));
    let mut set_prints = Fingerprints::default();
    let set_events =
        watcher(scoped::<StatefulSet>(&client, &config.namespace), watcher::Config::default().labels(FLEET_SELECTOR))
            .default_backoff()
            .reflect(sets_writer)
            .map(move |e| namespaces(e, "StatefulSet", |ev| set_prints.observe(ev, set_print)));
    let mut triggers = futures::stream::select_all([server_events.boxed(), lease_events.boxed(), set_events.boxed()]);

    tokio::pin!(stopped);
    tokio::select! {
        () = ctx.watches.servers.ready() => {}
        () = &mut stopped => return,
    }
    let mut queue = Queue::default();
    let mut failures: HashMap<String, u32> = HashMap::new();
    let mut memories: HashMap<String, Memory> = HashMap::new();
    let mut ready = false;
    info!(namespace = config.namespace.as_deref().unwrap_or("*"), "process-server fleet: watching");
    loop {
        ready = ready || stores.ready();
        let next = queue.next().filter(|_| ready);
        tokio::select! {
            () = &mut stopped => break,
            Some(changed) = triggers.next() => {
                for ns in changed {
                    queue.schedule(ns, Instant::now() + config.debounce);
                }
            }
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                for ns in queue.take_due(Instant::now()) {
                    let span = info_span!("process_servers", namespace = %ns);
                    let mut memory = memories.remove(&ns).unwrap_or_default();
                    let outcome = pass(&ctx, &config, &stores, &ns, &mut memory).instrument(span).await;
                    if !memory.is_empty() {
                        memories.insert(ns.clone(), memory);
                    }
                    let again = match outcome {
                        Ok(after) => {
                            failures.remove(&ns);
                            after
                        }
                        Err(e) => {
                            ctx.metrics.reconcile_failed(KIND, e.metric_label());
                            let n = failures.entry(ns.clone()).or_default();
                            *n = n.saturating_add(1);
                            let wait = backoff(*n);
                            warn!(namespace = %ns, error = %e, retry_in = ?wait, "process-server pass failed");
                            Some(wait)
                        }
                    };
                    if let Some(after) = again {
                        queue.schedule(ns, Instant::now() + after);
                    }
                }
            }
            else => break,
        }
    }
    info!("process-server fleet: stopped");
}

/// One pass over a namespace: observe (from the caches) → decide → apply → assign →
/// publish. Returns when to run it again if nothing changes, `None` when it has no fleet.
async fn pass(
    ctx: &Context,
    config: &ProcessServerConfig,
    stores: &Stores,
    ns: &str,
    memory: &mut Memory,
) -> Result<Option<Duration>> {
    let _timer = ctx.metrics.reconcile(KIND);
    let servers = memory.servers(stores.servers.state_filter(|s| s.namespace().as_deref() == Some(ns)));
    let leases = stores.leases.state_filter(|l| l.namespace().as_deref() == Some(ns));
    let set = memory.stateful_set(stores.sets.get(&ObjectRef::new(NAME).within(ns)));
    let observed = Observed {
        namespace: ns,
        servers: servers.iter().map(AsRef::as_ref).collect(),
        leases: leases.iter().map(AsRef::as_ref).collect(),
        stateful_set: set.as_deref(),
        announced: &memory.announced,
    };
    let decision = decide(&observed, config, Timestamp::now());

    let set_ref = match apply_fleet(ctx, config, ns, &decision, set.as_deref()).await? {
        Applied::Set(applied) => {
            let reference = applied.object_ref(&());
            memory.set = Some((set.as_ref().and_then(|s| s.metadata.resource_version.clone()), Arc::new(*applied)));
            Some(reference)
        }
        Applied::Kept => set.as_ref().map(|s| s.object_ref(&())),
        Applied::Nothing => {
            memory.set = None;
            None
        }
    };
    if let Some(reference) = &set_ref {
        for notice in &decision.fleet_notices {
            publish(ctx, notice, "ManageProcessServers", reference).await;
        }
    }
    let api: Api<ProtectedServer> = Api::namespaced(ctx.client.clone(), ns);
    for write in &decision.writes {
        write_assignment(&api, write).await?;
        let before = servers.iter().find(|s| s.name_any() == write.server).and_then(|s| s.resource_version());
        memory.assignments.insert(write.server.clone(), (before, write.process_server.clone()));
    }
    for (name, notice) in &decision.server_notices {
        if let Some(server) = servers.iter().find(|s| &s.name_any() == name) {
            publish(ctx, notice, "AssignProcessServer", &server.object_ref(&())).await;
        }
    }
    if !decision.writes.is_empty() {
        let moved: Vec<String> = decision
            .writes
            .iter()
            .map(|w| format!("{}→{}", w.server, w.process_server.as_deref().unwrap_or("-")))
            .collect();
        info!(assignments = %moved.join(", "), "assigned servers");
    }
    memory.announced = decision.announced;
    Ok(match decision.fleet {
        Fleet::Apply(..) | Fleet::Drain(_) => {
            Some(decision.requeue_after.map_or(config.resync, |after| after.min(config.resync)))
        }
        Fleet::Delete | Fleet::Absent => None,
    })
}

/// What [`apply_fleet`] did.
enum Applied {
    /// Applied the StatefulSet (and Service); the API server's answer.
    Set(Box<StatefulSet>),
    /// Left the existing fleet as it is.
    Kept,
    /// Deleted it, or there was none.
    Nothing,
}

/// Applies, keeps or deletes the StatefulSet and Service.
async fn apply_fleet(
    ctx: &Context,
    config: &ProcessServerConfig,
    ns: &str,
    decision: &Decision,
    existing: Option<&StatefulSet>,
) -> Result<Applied> {
    let params = PatchParams::apply(OPERATOR).force();
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    match &decision.fleet {
        Fleet::Apply(set, service) => {
            if let Some((account, binding)) = fleet::identity(ns, config) {
                apply_identity(ctx, ns, &account, &binding).await?;
            }
            services.patch(NAME, &params, &Patch::Apply(service.as_ref())).await?;
            let applied = sets.patch(NAME, &params, &Patch::Apply(set.as_ref())).await?;
            let before = existing.and_then(|s| s.spec.as_ref()).and_then(|s| s.replicas);
            if before != Some(i32::try_from(decision.replicas).unwrap_or(i32::MAX)) {
                info!(replicas = decision.replicas, before = ?before, "process-server StatefulSet applied");
            }
            Ok(Applied::Set(Box::new(applied)))
        }
        Fleet::Drain(holding) => {
            debug!(holding = %holding.join(", "), "no servers left; waiting for uploads before removing the fleet");
            Ok(Applied::Kept)
        }
        Fleet::Delete => {
            ignore_not_found(sets.delete(NAME, &DeleteParams::background()).await.map(|_| ()))?;
            ignore_not_found(services.delete(NAME, &DeleteParams::background()).await.map(|_| ()))?;
            if fleet::identity(ns, config).is_some() {
                let dp = DeleteParams::background();
                ignore_not_found(
                    Api::<RoleBinding>::namespaced(ctx.client.clone(), ns).delete(NAME, &dp).await.map(|_| ()),
                )?;
                ignore_not_found(
                    Api::<ServiceAccount>::namespaced(ctx.client.clone(), ns).delete(NAME, &dp).await.map(|_| ()),
                )?;
            }
            info!("no servers left and nothing to upload: process-server fleet removed (cache volumes are kept)");
            Ok(Applied::Nothing)
        }
        Fleet::Absent => Ok(Applied::Nothing),
    }
}

/// Applies the process servers' ServiceAccount and RoleBinding (to the chart's ClusterRole:
/// the operator needs only `bind` on that one ClusterRole, not the permissions in it).
async fn apply_identity(ctx: &Context, ns: &str, account: &ServiceAccount, binding: &RoleBinding) -> Result<()> {
    let params = PatchParams::apply(OPERATOR).force();
    let mut account = serde_json::to_value(account)?;
    account["apiVersion"] = json!("v1");
    account["kind"] = json!("ServiceAccount");
    Api::<ServiceAccount>::namespaced(ctx.client.clone(), ns).patch(NAME, &params, &Patch::Apply(&account)).await?;
    let mut binding = serde_json::to_value(binding)?;
    binding["apiVersion"] = json!("rbac.authorization.k8s.io/v1");
    binding["kind"] = json!("RoleBinding");
    Api::<RoleBinding>::namespaced(ctx.client.clone(), ns).patch(NAME, &params, &Patch::Apply(&binding)).await?;
    Ok(())
}

/// Writes one server's `status.processServer`.
async fn write_assignment(api: &Api<ProtectedServer>, write: &StatusWrite) -> Result<()> {
    let result = match &write.process_server {
        Some(ps) => {
            let patch = json!({
                "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
                "status": {"processServer": ps}
            });
            api.patch_status(&write.server, &PatchParams::apply(ASSIGNMENT_MANAGER).force(), &Patch::Apply(&patch))
                .await
        }
        // Leaving the field out of an apply only gives up our ownership: a value another
        // writer set would stay. A merge patch removes it whoever set it.
        None => {
            let params = PatchParams { field_manager: Some(ASSIGNMENT_MANAGER.to_owned()), ..Default::default() };
            api.patch_status(&write.server, &params, &Patch::Merge(json!({"status": {"processServer": null}}))).await
        }
    };
    // A server deleted since the cache was read needs no assignment.
    ignore_not_found(result.map(|_| ()))
}

/// Publishes one event on `reference` (the note cut to the API's 1 kB limit); failures are
/// logged, never fatal.
async fn publish(ctx: &Context, notice: &Notice, action: &str, reference: &ObjectReference) {
    let mut note = notice.note.clone();
    if note.len() > MAX_NOTE {
        let cut = (0..MAX_NOTE).rev().find(|i| note.is_char_boundary(*i)).unwrap_or(0);
        note.truncate(cut);
        note.push('…');
    }
    let event = KubeEvent {
        type_: notice.type_,
        reason: notice.reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    // A fresh recorder per event: `Recorder` folds events with the same reason and object
    // into one series and keeps the first note, which would report the first process
    // server's trouble for the second. This loop already publishes only on changes.
    let reporter = Reporter { controller: OPERATOR.into(), instance: None };
    let recorder = Recorder::new(ctx.client.clone(), reporter);
    if let Err(e) = recorder.publish(&event, reference).await {
        warn!(error = %e, reason = notice.reason, "could not publish event");
    }
}

/// What a pass looks at in a ProtectedServer.
fn server_print(s: &ProtectedServer) -> u64 {
    let status = s.status.as_ref();
    fingerprint((
        &s.spec.process_server,
        status.and_then(|st| st.process_server.as_ref()),
        status.and_then(|st| st.churn.as_ref()).map(|c| c.bytes_last_24h),
        s.metadata.deletion_timestamp.is_some(),
    ))
}

/// What a pass looks at in a heartbeat Lease: its health level now, and whether it
/// still holds data (a draining process server finishing its upload). Renewals alone
/// change neither; heartbeat ages crossing a threshold are found by timers instead.
fn lease_print(l: &Lease) -> u64 {
    let report = read_lease(l, Timestamp::now());
    fingerprint(report.map(|r| (level(&r.health), r.holds_data(Timestamp::now()))))
}

/// What a pass looks at in the StatefulSet: its spec (someone scaled or edited it) and
/// the health levels recorded on it.
fn set_print(s: &StatefulSet) -> u64 {
    fingerprint((s.metadata.generation, s.annotations().get(HEALTH_ANNOTATION)))
}

/// The namespaces a watch event concerns; watch errors are logged (the watcher retries
/// with backoff).
fn namespaces<K>(
    event: std::result::Result<watcher::Event<K>, watcher::Error>,
    kind: &'static str,
    observe: impl FnOnce(&watcher::Event<K>) -> Vec<String>,
) -> Vec<String> {
    match event {
        Ok(e) => observe(&e),
        Err(e) => {
            warn!(error = %e, kind, "process-server fleet: watch failed; retrying");
            Vec::new()
        }
    }
}

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// 1 s after the first failure, doubling up to [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    let secs = 1u64.checked_shl(failures.saturating_sub(1)).unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

fn ignore_not_found(result: std::result::Result<(), kube::Error>) -> Result<()> {
    match result {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => Ok(other.map_err(Error::from)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let waits: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    }
}
