//! Consistency groups (docs/replication-protocol.md "Consistency groups"): one recovery
//! point across every server of a group, at one instant, by a two-phase round.
//!
//! 1. The coordinator sends `GroupPrepare` to every member's session. Each agent brings
//!    the copy here to an instant at which nothing was being written (a quiet look,
//!    forced by a short freeze when writes never pause), waits until all of it is
//!    durable, and answers `GroupReady`; it then holds that instant.
//! 2. Once every member is ready, the coordinator picks the time of the last answer `T`
//!    and sends `GroupCommit` with one point id. Every agent held its instant from
//!    before its answer until after the commit reached it, so the disks of all members
//!    were unchanged across `T`. An agent that finds a write since its instant when the
//!    commit arrives records a crash point instead; the group point is then not whole.
//!
//! A member that is not connected, not ready in time, or not ready at all aborts the
//! round (`GroupAbort`); members keep taking their own crash-consistent points.
//! A group point is whole when every member listed in it has a point with its id; only
//! whole points are reported in status and chosen by `LatestGroupConsistent`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use siterecovery_store::{PointKind, generate_point_id};
use siterecovery_wire::{GroupAbort, GroupCommit, GroupPrepare, GroupReady, Message};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::target::Targets;

/// A consistency group as the process server needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    /// Group name (`spec.consistencyGroup`).
    pub name: String,
    /// Every server of the group (names in the namespace), sorted.
    pub members: Vec<String>,
    /// How often a round starts.
    pub interval: Duration,
}

/// How long members have to become ready after a prepare.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Whole group points remembered per group (for status).
const REMEMBERED: usize = 64;

/// (namespace, group name).
type Key = (String, String);

/// Every group with a connected member.
#[derive(Default)]
pub struct Groups {
    groups: Mutex<HashMap<Key, Arc<Group>>>,
}

/// One group: its connected members and its rounds.
pub struct Group {
    key: Key,
    spec: Mutex<GroupSpec>,
    /// Connected members: server → (session id, the session's outbox).
    members: Mutex<BTreeMap<String, (u64, mpsc::UnboundedSender<Message>)>>,
    readies: mpsc::UnboundedSender<(String, GroupReady)>,
    journaled: Mutex<Journaled>,
    next_session: std::sync::atomic::AtomicU64,
}

/// Group points seen journaled: point id → members that journaled it, and the whole
/// points, newest last.
#[derive(Default)]
struct Journaled(BTreeMap<String, BTreeSet<String>>, Vec<String>);

/// A session's membership; leaving the group when dropped.
pub struct Member {
    group: Arc<Group>,
    server: String,
    session: u64,
    /// Messages for the agent (prepare, commit, abort).
    pub outbox: mpsc::UnboundedReceiver<Message>,
}

impl Groups {
    /// Joins `server` to the group `spec` of `namespace`, starting the group's rounds when
    /// it is the first connected member. `targets` is asked for the group again before
    /// every round (members added or removed, interval changed).
    pub fn join(
        self: &Arc<Self>,
        namespace: &str,
        spec: GroupSpec,
        server: &str,
        targets: Arc<dyn Targets>,
        metrics: Arc<Metrics>,
    ) -> Member {
        let key = (namespace.to_string(), spec.name.clone());
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let group = match groups.get(&key) {
            Some(g) => {
                *g.spec.lock().unwrap_or_else(|p| p.into_inner()) = spec;
                g.clone()
            }
            None => {
                let (readies, ready_rx) = mpsc::unbounded_channel();
                let g = Arc::new(Group {
                    key: key.clone(),
                    spec: Mutex::new(spec),
                    members: Mutex::default(),
                    readies,
                    journaled: Mutex::default(),
                    next_session: Default::default(),
                });
                groups.insert(key, g.clone());
                tokio::spawn(rounds(Arc::downgrade(self), Arc::downgrade(&g), ready_rx, targets, metrics));
                g
            }
        };
        let (tx, outbox) = mpsc::unbounded_channel();
        let session = group.next_session.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        group.members.lock().unwrap_or_else(|p| p.into_inner()).insert(server.to_string(), (session, tx));
        Member { group, server: server.to_string(), session, outbox }
    }

    /// Whether `id` is a whole point of a group in `namespace` (every member journaled it)
    /// as far as this process server saw.
    pub fn is_whole(&self, namespace: &str, id: &str) -> bool {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        groups
            .iter()
            .filter(|((ns, _), _)| ns == namespace)
            .any(|(_, g)| g.journaled.lock().unwrap_or_else(|p| p.into_inner()).1.iter().any(|w| w == id))
    }
}

impl Member {
    /// The agent answered a prepare.
    pub fn ready(&self, r: GroupReady) {
        let _ = self.group.readies.send((self.server.clone(), r));
    }

    /// The agent's group point `id` (listing `members`) is journaled.
    pub fn journaled(&self, id: &str, members: &[String]) {
        let mut j = self.group.journaled.lock().unwrap_or_else(|p| p.into_inner());
        let Journaled(by_id, whole) = &mut *j;
        let got = by_id.entry(id.to_string()).or_default();
        got.insert(self.server.clone());
        if !members.is_empty() && members.iter().all(|m| got.contains(m)) {
            by_id.remove(id);
            whole.push(id.to_string());
            if whole.len() > REMEMBERED {
                whole.remove(0);
            }
            tracing::info!(namespace = %self.group.key.0, group = %self.group.key.1, point = %id, "group recovery point whole");
        }
        // Points that can no longer become whole (a member recorded a crash point).
        while by_id.len() > REMEMBERED {
            let oldest = by_id.keys().next().cloned().expect("not empty");
            by_id.remove(&oldest);
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut members = self.group.members.lock().unwrap_or_else(|p| p.into_inner());
        // A reconnected agent replaced this session already: leave its entry alone.
        if members.get(&self.server).is_some_and(|(s, _)| *s == self.session) {
            members.remove(&self.server);
        }
    }
}

/// Runs the rounds of a group while any member is connected.
async fn rounds(
    groups: Weak<Groups>,
    group: Weak<Group>,
    mut readies: mpsc::UnboundedReceiver<(String, GroupReady)>,
    targets: Arc<dyn Targets>,
    metrics: Arc<Metrics>,
) {
    let mut round = 0u64;
    let mut last_skip = None::<String>;
    loop {
        let interval = match group.upgrade() {
            Some(g) => g.spec.lock().unwrap_or_else(|p| p.into_inner()).interval,
            None => return,
        };
        tokio::time::sleep(interval.max(Duration::from_secs(1))).await;
        let (Some(g), Some(all)) = (group.upgrade(), groups.upgrade()) else { return };
        let connected: Vec<String> = g.members.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        let Some(first) = connected.first() else {
            // No member left: the group ends (the next member to connect starts it anew).
            let mut map = all.groups.lock().unwrap_or_else(|p| p.into_inner());
            if g.members.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                map.remove(&g.key);
                return;
            }
            continue;
        };
        match targets.group(&g.key.0, first).await {
            Ok(Some(spec)) if spec.name == g.key.1 => *g.spec.lock().unwrap_or_else(|p| p.into_inner()) = spec,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(namespace = %g.key.0, group = %g.key.1, error = %e, "group membership not refreshed")
            }
        }
        let members = g.spec.lock().unwrap_or_else(|p| p.into_inner()).members.clone();
        let missing: Vec<&String> = members.iter().filter(|m| !connected.contains(m)).collect();
        if !missing.is_empty() {
            let why = format!("members not connected: {}", join(&missing));
            if last_skip.as_ref() != Some(&why) {
                tracing::warn!(namespace = %g.key.0, group = %g.key.1, reason = %why, "no group round");
            }
            last_skip = Some(why);
            metrics.group_rounds.get_or_create(&result(&g.key, "MemberNotConnected")).inc();
            continue;
        }
        last_skip = None;
        round += 1;
        let outcome = run_round(&g, &members, round, &mut readies).await;
        let label = match &outcome {
            Ok(_) => "Committed",
            Err((reason, _)) => reason,
        };
        metrics.group_rounds.get_or_create(&result(&g.key, label)).inc();
        let decision = match outcome {
            Ok(time) => Message::GroupCommit(GroupCommit {
                round,
                id: generate_point_id(time, PointKind::Group),
                time,
                members: members.clone(),
            }),
            Err((reason, message)) => {
                tracing::info!(namespace = %g.key.0, group = %g.key.1, round, reason, %message, "group round aborted");
                Message::GroupAbort(GroupAbort { round, reason: format!("{reason}: {message}") })
            }
        };
        for (_, tx) in g.members.lock().unwrap_or_else(|p| p.into_inner()).values() {
            let _ = tx.send(decision.clone());
        }
    }
}

/// Prepares every member and waits for their answers: the instant of the point, or why
/// there is none.
async fn run_round(
    g: &Group,
    members: &[String],
    round: u64,
    readies: &mut mpsc::UnboundedReceiver<(String, GroupReady)>,
) -> Result<jiff::Timestamp, (&'static str, String)> {
    // Answers to earlier rounds arrive late: drop them.
    while readies.try_recv().is_ok() {}
    let prepare = Message::GroupPrepare(GroupPrepare { group: g.key.1.clone(), round });
    {
        let connected = g.members.lock().unwrap_or_else(|p| p.into_inner());
        for m in members {
            let sent = connected.get(m).is_some_and(|(_, tx)| tx.send(prepare.clone()).is_ok());
            if !sent {
                return Err(("MemberNotConnected", format!("{m} disconnected")));
            }
        }
    }
    let mut waiting: BTreeSet<&String> = members.iter().collect();
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while !waiting.is_empty() {
        let answer = tokio::time::timeout_at(deadline, readies.recv()).await;
        let (server, r) = match answer {
            Ok(Some(a)) => a,
            Ok(None) => return Err(("Stopped", "the process server is stopping".into())),
            Err(_) => {
                let late: Vec<&&String> = waiting.iter().collect();
                return Err(("NotReadyInTime", format!("no answer within {READY_TIMEOUT:?} from {}", join(&late))));
            }
        };
        if r.round != round {
            continue;
        }
        if !r.ready {
            let why = r.reason.unwrap_or_else(|| "no reason given".into());
            return Err(("MemberNotReady", format!("{server}: {why}")));
        }
        waiting.remove(&server);
    }
    Ok(jiff::Timestamp::now())
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn result((namespace, group): &Key, label: &str) -> crate::metrics::GroupRoundLabels {
    crate::metrics::GroupRoundLabels { group: format!("{namespace}/{group}"), result: label.to_string() }
}

/// Whether the group point `p` of `server` is whole in `store`: every member it lists has
/// a point with its id.
pub async fn whole_in_store(
    store: &siterecovery_store::Store,
    server: &siterecovery_store::ServerRef,
    p: &siterecovery_store::Manifest,
) -> Result<bool, String> {
    if p.kind != PointKind::Group || p.members.is_empty() {
        return Ok(false);
    }
    for m in p.members.iter().filter(|m| m.as_str() != server.name()) {
        let other = siterecovery_store::ServerRef::new(server.namespace(), m).map_err(|e| e.to_string())?;
        if !store.backend().exists(&other.point_key(&p.id)).await.map_err(|e| e.to_string())? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Drops from `points` (one server's, oldest first) the group points newer than its
/// newest whole one ([`whole_in_store`]). What remains lets `LatestGroupConsistent` pick a
/// whole point.
pub async fn drop_partial_group_points(
    store: &siterecovery_store::Store,
    server: &siterecovery_store::ServerRef,
    points: &mut Vec<siterecovery_store::Manifest>,
) -> Result<(), String> {
    let mut partial = BTreeSet::new();
    for p in points.iter().rev().filter(|p| p.kind == PointKind::Group) {
        if whole_in_store(store, server, p).await? {
            break;
        }
        partial.insert(p.id.clone());
    }
    points.retain(|p| !partial.contains(&p.id));
    Ok(())
}
