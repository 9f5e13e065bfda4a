//! The pure part of the fleet loop: from one namespace's ProtectedServers, the process
//! servers' heartbeat Leases and the existing StatefulSet, decide the fleet's size and
//! objects, every server's process server, and the events to publish. No client, no
//! clock: `now` is passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use siterecovery_api::ProtectedServer;
use siterecovery_core::assignment::{
    Assignment, AssignmentReason, HEARTBEAT_CRITICAL, HEARTBEAT_WARNING, Health, ProcessServerState, ServerLoad,
    assign, replicas_needed,
};

use super::config::ProcessServerConfig;
use super::fleet::{self, CACHE_VOLUME, HEALTH_ANNOTATION, NAME};
use super::lease::{LEASE_PREFIX, LeaseReport, level, read_lease, silence};

/// Everything one pass looks at, for one namespace.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    /// The namespace.
    pub namespace: &'a str,
    /// Its ProtectedServers.
    pub servers: Vec<&'a ProtectedServer>,
    /// Its process-server heartbeat Leases.
    pub leases: Vec<&'a Lease>,
    /// The fleet's StatefulSet, if it exists.
    pub stateful_set: Option<&'a StatefulSet>,
    /// Keys of the one-off announcements already made (see [`Decision::announced`]).
    pub announced: &'a BTreeSet<String>,
}

/// What to do with the fleet's objects.
#[derive(Clone, Debug, PartialEq)]
pub enum Fleet {
    /// Server-side apply both (creates them the first time).
    Apply(Box<StatefulSet>, Box<Service>),
    /// No servers are left but these process servers still upload acknowledged data:
    /// leave the fleet as it is until they are done.
    Drain(Vec<String>),
    /// No servers are left and nothing is left to upload: delete both.
    Delete,
    /// No servers and no fleet: nothing to do.
    Absent,
}

/// A Kubernetes event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Message.
    pub note: String,
}

/// One server's `status.processServer` to write (`None` removes it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusWrite {
    /// ProtectedServer name.
    pub server: String,
    /// Its process server.
    pub process_server: Option<String>,
}

/// The outcome of one pass over a namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The fleet's objects.
    pub fleet: Fleet,
    /// Replicas of the StatefulSet after this pass (0 when there is none).
    pub replicas: u32,
    /// Health of each process server of the fleet that has a Lease.
    pub health: BTreeMap<String, Health>,
    /// Where every server goes, and why (server-name order).
    pub assignments: Vec<Assignment>,
    /// Only the servers whose `status.processServer` changes.
    pub writes: Vec<StatusWrite>,
    /// Events on the StatefulSet.
    pub fleet_notices: Vec<Notice>,
    /// Events on ProtectedServers, by server name.
    pub server_notices: Vec<(String, Notice)>,
    /// One-off announcements in force after this pass (an unassigned server is announced
    /// once, not on every pass); pass them back in the next [`Observed`].
    pub announced: BTreeSet<String>,
    /// When a heartbeat crosses a health threshold if nothing else happens first.
    pub requeue_after: Option<Duration>,
}

/// Decides one namespace's fleet and assignments.
pub fn decide(observed: &Observed, config: &ProcessServerConfig, now: Timestamp) -> Decision {
    let reports: BTreeMap<u32, LeaseReport> =
        observed.leases.iter().filter_map(|l| read_lease(l, now)).map(|r| (r.ordinal, r)).collect();
    let current = observed.stateful_set.and_then(|s| s.spec.as_ref()).and_then(|s| s.replicas).unwrap_or(0);
    let current = u32::try_from(current).unwrap_or(0);

    if observed.servers.is_empty() {
        return without_servers(observed, &reports, current, now);
    }

    let sizing = size(observed, &reports, current, config, now);
    let Sizing { needed, replicas, .. } = sizing;
    let health: BTreeMap<String, Health> =
        reports.range(..replicas).map(|(_, r)| (r.process_server.clone(), r.health.clone())).collect();
    let states: Vec<ProcessServerState> = reports
        .range(..needed)
        .map(|(_, r)| ProcessServerState { name: r.process_server.clone(), health: r.health.clone() })
        .collect();
    let loads: Vec<ServerLoad> = observed
        .servers
        .iter()
        .map(|s| ServerLoad {
            name: s.name_any(),
            pinned: s.spec.process_server.clone(),
            current: current_of(s),
            churn_bytes_per_day: churn_of(s),
            consistency_group: s.spec.consistency_group.clone(),
        })
        .collect();
    let assignments = assign(&states, &loads, &config.limits);

    let facts = FleetFacts { needed, replicas, starting: states.is_empty() };
    let mut announced = BTreeSet::new();
    let (writes, server_notices) = server_changes(observed, &assignments, &facts, &mut announced);

    let claims = existing_claims(observed.stateful_set);
    let mut fleet_notices = health_notices(&previous_health(observed.stateful_set), &health, replicas);
    fleet_notices.extend(scaling_notices(observed, &sizing, current, &mut announced));
    fleet_notices.extend(cache_settings_notice(claims.as_deref(), config, observed.announced, &mut announced));

    let annotation = serde_json::to_string(&health.iter().map(|(k, v)| (k, level(v))).collect::<BTreeMap<_, _>>())
        .unwrap_or_default();
    let stateful_set = fleet::stateful_set(observed.namespace, config, replicas, annotation, claims);
    let service = fleet::service(observed.namespace, config);
    Decision {
        fleet: Fleet::Apply(Box::new(stateful_set), Box::new(service)),
        replicas,
        health,
        assignments,
        writes,
        fleet_notices,
        server_notices,
        announced,
        requeue_after: next_threshold(reports.range(..replicas).map(|(_, r)| r), now),
    }
}

/// How big the fleet is to be.
struct Sizing<'a> {
    /// Process servers that take servers (ordinals below this).
    needed: u32,
    /// StatefulSet replicas: `needed`, plus surplus ones still uploading.
    replicas: u32,
    /// The surplus process servers still uploading.
    holding: Vec<&'a LeaseReport>,
    /// Daily churn of all servers.
    churn: u64,
}

fn size<'a>(
    observed: &Observed,
    reports: &'a BTreeMap<u32, LeaseReport>,
    current: u32,
    config: &ProcessServerConfig,
    now: Timestamp,
) -> Sizing<'a> {
    let limits = &config.limits;
    let churn: u64 = observed.servers.iter().map(|s| churn_of(s)).fold(0, u64::saturating_add);
    // A pin names a pod: keep it in the fleet (within the replica limit) so the pin holds.
    let pin_floor = observed
        .servers
        .iter()
        .filter_map(|s| s.spec.process_server.as_deref().and_then(fleet::ordinal))
        .map(|o| o.saturating_add(1).min(limits.max_replicas))
        .max()
        .unwrap_or(0);
    let base = replicas_needed(observed.servers.len(), churn, limits).max(pin_floor);
    let needed = with_spares(base, reports, limits.max_replicas);
    // Scaling down drains first: the surplus process servers take no servers, and the
    // StatefulSet shrinks only past those that have nothing left to upload.
    let holding: Vec<&LeaseReport> = if needed < current {
        reports.range(needed..current).map(|(_, r)| r).filter(|r| r.holds_data(now)).collect()
    } else {
        Vec::new()
    };
    let replicas = holding.iter().map(|r| r.ordinal + 1).max().unwrap_or(needed).max(needed);
    Sizing { needed, replicas, holding, churn }
}

/// `Scaled` when the replica count changes; `ScaleDownWaiting` once while surplus
/// process servers finish their uploads.
fn scaling_notices(
    observed: &Observed,
    sizing: &Sizing,
    current: u32,
    announced: &mut BTreeSet<String>,
) -> Vec<Notice> {
    let Sizing { needed, replicas, ref holding, churn } = *sizing;
    let mut notices = Vec::new();
    if observed.stateful_set.is_some() && current != replicas {
        let mut note = format!(
            "{current} → {replicas} process servers for {} protected servers churning {}/day",
            observed.servers.len(),
            bytes(churn)
        );
        if replicas > needed {
            note.push_str(&format!("; {} still upload their backlog before removal", names(holding)));
        }
        notices.push(normal("Scaled", note));
    }
    if replicas > needed && current > needed {
        let key = format!("drain/{needed}/{}", names(holding));
        if !observed.announced.contains(&key) {
            let note = format!("scaling down to {needed} waits for {} to upload their backlog", names(holding));
            notices.push(normal("ScaleDownWaiting", note));
        }
        announced.insert(key);
    }
    notices
}

/// A Critical process server carries nothing, so the fleet runs one more replica for each
/// Critical one among those it needs (within `max_replicas`): its servers get somewhere
/// to go, and the spare goes again once it recovers.
fn with_spares(base: u32, reports: &BTreeMap<u32, LeaseReport>, max_replicas: u32) -> u32 {
    let mut needed = base;
    loop {
        let critical = reports.range(..needed).filter(|(_, r)| r.health.is_critical()).count();
        let more = base.saturating_add(u32::try_from(critical).unwrap_or(u32::MAX)).min(max_replicas).max(base);
        if more == needed {
            return needed;
        }
        needed = more;
    }
}

/// The last server is gone: delete the fleet once nothing is left to upload.
fn without_servers(
    observed: &Observed,
    reports: &BTreeMap<u32, LeaseReport>,
    current: u32,
    now: Timestamp,
) -> Decision {
    let holding: Vec<&LeaseReport> = reports.range(..current).map(|(_, r)| r).filter(|r| r.holds_data(now)).collect();
    let (fleet, requeue_after) = match (observed.stateful_set, holding.is_empty()) {
        (None, _) => (Fleet::Absent, None),
        (Some(_), true) => (Fleet::Delete, None),
        (Some(_), false) => (
            Fleet::Drain(holding.iter().map(|r| r.process_server.clone()).collect()),
            next_threshold(holding.iter().copied(), now),
        ),
    };
    Decision {
        fleet,
        replicas: current,
        health: BTreeMap::new(),
        assignments: Vec::new(),
        writes: Vec::new(),
        fleet_notices: Vec::new(),
        server_notices: Vec::new(),
        announced: BTreeSet::new(),
        requeue_after,
    }
}

/// Facts about the fleet that server events mention.
struct FleetFacts {
    needed: u32,
    replicas: u32,
    /// No process server of the fleet has reported yet.
    starting: bool,
}

/// The status writes and events for the servers whose process server changes.
fn server_changes(
    observed: &Observed,
    assignments: &[Assignment],
    facts: &FleetFacts,
    announced: &mut BTreeSet<String>,
) -> (Vec<StatusWrite>, Vec<(String, Notice)>) {
    let current: BTreeMap<String, Option<String>> =
        observed.servers.iter().map(|s| (s.name_any(), current_of(s))).collect();
    let pinned: BTreeSet<String> =
        observed.servers.iter().filter(|s| s.spec.process_server.is_some()).map(|s| s.name_any()).collect();
    let mut writes = Vec::new();
    let mut notices = Vec::new();
    for a in assignments {
        let was = current.get(&a.server).cloned().flatten();
        if was != a.process_server {
            writes.push(StatusWrite { server: a.server.clone(), process_server: a.process_server.clone() });
        }
        let notice = match (&a.process_server, &was) {
            (Some(to), Some(from)) if to == from => None,
            (Some(to), None) if a.reason == AssignmentReason::Pinned => {
                Some(normal("ProcessServerAssigned", format!("assigned to {to} (pinned by spec.processServer)")))
            }
            (Some(to), None) => Some(normal("ProcessServerAssigned", format!("assigned to {to}"))),
            (Some(to), Some(from)) => Some(moved(from, to, &a.reason, facts)),
            (None, _) => {
                // Announced once per kind of cause, not on every pass: the reasons carry
                // figures (heartbeat ages, percentages) that change all the time.
                let cause = match () {
                    _ if facts.starting => "starting",
                    _ if pinned.contains(&a.server) => "pin",
                    _ => "no-room",
                };
                let key = format!("unassigned/{}/{cause}", a.server);
                let first = was.is_some() || !observed.announced.contains(&key);
                announced.insert(key);
                first.then(|| unassigned(was.as_deref(), &a.reason, facts))
            }
        };
        if let Some(n) = notice {
            notices.push((a.server.clone(), n));
        }
    }
    (writes, notices)
}

fn moved(from: &str, to: &str, reason: &AssignmentReason, facts: &FleetFacts) -> Notice {
    let why = match reason {
        AssignmentReason::Pinned => "pinned by spec.processServer".to_owned(),
        // Core sees a draining process server as gone; say what really happens.
        _ if fleet::ordinal(from).is_some_and(|o| o >= facts.needed) => {
            format!("process server {from} is drained before the fleet scales down to {}", facts.needed)
        }
        AssignmentReason::Reassigned { why, .. } => why.clone(),
        _ => "rebalanced".to_owned(),
    };
    normal("ProcessServerReassigned", format!("moved from {from} to {to}: {why}"))
}

fn unassigned(was: Option<&str>, reason: &AssignmentReason, facts: &FleetFacts) -> Notice {
    let why = match reason {
        _ if facts.starting && facts.replicas > 0 => format!(
            "waiting for the first process server to report: none of the {} replicas of StatefulSet {NAME} has a \
             heartbeat Lease yet",
            facts.replicas
        ),
        AssignmentReason::Unassigned { why } => why.clone(),
        other => format!("{other:?}"),
    };
    let note = match was {
        Some(from) => format!("no longer replicates through {from}: {why}"),
        None => format!("no process server: {why}"),
    };
    Notice { type_: EventType::Warning, reason: "ProcessServerUnassigned", note }
}

fn normal(reason: &'static str, note: String) -> Notice {
    Notice { type_: EventType::Normal, reason, note }
}

/// Events for every change of a process server's health level since the last pass.
fn health_notices(
    previous: &BTreeMap<String, String>,
    health: &BTreeMap<String, Health>,
    replicas: u32,
) -> Vec<Notice> {
    let mut notices = Vec::new();
    for (ps, h) in health {
        let was = previous.get(ps).map(String::as_str);
        if was == Some(level(h)) {
            continue;
        }
        let reasons = h.reasons().join("; ");
        notices.push(match (h, was) {
            (Health::Healthy, None) => normal("ProcessServerRegistered", format!("{ps} joined the fleet: Healthy")),
            (Health::Healthy, Some(_)) => normal("ProcessServerHealthy", format!("{ps} is Healthy again")),
            (Health::Warning(_), _) => Notice {
                type_: EventType::Warning,
                reason: "ProcessServerWarning",
                note: format!("{ps} is Warning: {reasons}; new servers go to Healthy process servers first"),
            },
            (Health::Critical(_), _) => Notice {
                type_: EventType::Warning,
                reason: "ProcessServerCritical",
                note: format!("{ps} is Critical: {reasons}; its servers move to other process servers"),
            },
        });
    }
    for ps in previous.keys().filter(|ps| !health.contains_key(*ps)) {
        // Gone below the replica count means lost; above it, scaled away (see `Scaled`).
        if fleet::ordinal(ps).is_some_and(|o| o < replicas) {
            notices.push(Notice {
                type_: EventType::Warning,
                reason: "ProcessServerLost",
                note: format!("{ps} no longer reports: its heartbeat Lease {LEASE_PREFIX}{ps} is gone"),
            });
        }
    }
    notices
}

fn previous_health(stateful_set: Option<&StatefulSet>) -> BTreeMap<String, String> {
    stateful_set
        .and_then(|s| s.annotations().get(HEALTH_ANNOTATION))
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_default()
}

fn existing_claims(
    stateful_set: Option<&StatefulSet>,
) -> Option<Vec<k8s_openapi::api::core::v1::PersistentVolumeClaim>> {
    stateful_set.and_then(|s| s.spec.as_ref()).and_then(|s| s.volume_claim_templates.clone())
}

/// The cache settings of an existing fleet cannot change (Kubernetes forbids editing
/// claim templates): say so once when the flags ask for something else.
fn cache_settings_notice(
    claims: Option<&[k8s_openapi::api::core::v1::PersistentVolumeClaim]>,
    config: &ProcessServerConfig,
    before: &BTreeSet<String>,
    announced: &mut BTreeSet<String>,
) -> Option<Notice> {
    let claim = claims?.iter().find(|c| c.metadata.name.as_deref() == Some(CACHE_VOLUME))?;
    let (size, class) = fleet::cache_settings(claim);
    let size_differs = size.as_deref() != Some(config.cache_size.as_str());
    let class_differs = config.storage_class.is_some() && class != config.storage_class;
    if !size_differs && !class_differs {
        return None;
    }
    let key = format!("cache-settings/{}/{}", config.cache_size, config.storage_class.as_deref().unwrap_or_default());
    let first = !before.contains(&key);
    announced.insert(key);
    let note = format!(
        "existing cache volumes keep size {} and StorageClass {} (configured: {}, {}): claim templates of a \
         StatefulSet cannot change; expand the PVCs, or delete the StatefulSet with --cascade=orphan to recreate it",
        size.as_deref().unwrap_or("unset"),
        class.as_deref().unwrap_or("default"),
        config.cache_size,
        config.storage_class.as_deref().unwrap_or("default"),
    );
    first.then_some(Notice { type_: EventType::Warning, reason: "CacheSettingsNotApplied", note })
}

/// Time until the first heartbeat of `reports` crosses the Warning or Critical age (plus
/// a second, as health compares strictly).
fn next_threshold<'a>(reports: impl Iterator<Item = &'a LeaseReport>, now: Timestamp) -> Option<Duration> {
    reports
        .filter_map(|r| r.heartbeat)
        .flat_map(|h| [HEARTBEAT_WARNING, HEARTBEAT_CRITICAL].map(|t| t.saturating_sub(silence(now, h))))
        .filter(|left| !left.is_zero())
        .min()
        .map(|left| left + Duration::from_secs(1))
}

fn current_of(server: &ProtectedServer) -> Option<String> {
    server.status.as_ref().and_then(|s| s.process_server.clone())
}

fn churn_of(server: &ProtectedServer) -> u64 {
    let bytes = server.status.as_ref().and_then(|s| s.churn.as_ref()).map(|c| c.bytes_last_24h).unwrap_or(0);
    u64::try_from(bytes).unwrap_or(0)
}

fn names(reports: &[&LeaseReport]) -> String {
    reports.iter().map(|r| r.process_server.as_str()).collect::<Vec<_>>().join(", ")
}

fn bytes(n: u64) -> String {
    crate::status::human_bytes(n)
}

#[cfg(test)]
#[path = "decide_tests.rs"]
mod tests;
