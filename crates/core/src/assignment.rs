//! Process servers: health from their reports, how many replicas the fleet needs, and
//! which process server each protected server replicates to.
//!
//! The operator scales the process-server Deployment to [`replicas_needed`] and places
//! servers with [`assign`]. Placement respects capacity; servers that fit nowhere are left
//! unassigned (with a reason) until a new replica comes up, rather than overloading a
//! process server whose cache would then fill and stall every server on it.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use siterecovery_api::common::format_duration;

/// Below this free cache space a process server is Warning (ASR's process-server alert).
pub const CACHE_FREE_WARNING_PERCENT: f64 = 30.0;
/// Below this free cache space a process server is Critical (ASR's process-server alert).
pub const CACHE_FREE_CRITICAL_PERCENT: f64 = 25.0;
/// Above this many bytes waiting for upload a process server is Warning.
pub const BACKLOG_WARNING_BYTES: u64 = 64 * GIB;
/// Above this many bytes waiting for upload a process server is Critical.
pub const BACKLOG_CRITICAL_BYTES: u64 = 256 * GIB;
/// A heartbeat older than this makes a process server Warning.
pub const HEARTBEAT_WARNING: Duration = Duration::from_secs(5 * 60);
/// A heartbeat older than this makes a process server Critical.
pub const HEARTBEAT_CRITICAL: Duration = Duration::from_secs(15 * 60);

const GIB: u64 = 1 << 30;

/// What a process server last reported about itself.
#[derive(Clone, Debug, PartialEq)]
pub struct ProcessServerReport {
    /// Free space of the cache volume, 0–100.
    pub cache_free_percent: f64,
    /// Bytes received from agents and not yet uploaded to storage.
    pub upload_backlog_bytes: u64,
    /// When the report was sent.
    pub last_heartbeat: Timestamp,
}

/// Health of a process server; the reasons name the metric, its value and the threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Every metric is within its thresholds.
    Healthy,
    /// Still takes servers, but new ones go to Healthy process servers first.
    Warning(Vec<String>),
    /// Takes no servers; the ones it has are moved elsewhere. Lists every finding,
    /// critical ones first.
    Critical(Vec<String>),
}

impl Health {
    /// Whether servers must be moved off this process server.
    pub fn is_critical(&self) -> bool {
        matches!(self, Health::Critical(_))
    }

    /// The findings behind a Warning or Critical (empty when Healthy).
    pub fn reasons(&self) -> &[String] {
        match self {
            Health::Healthy => &[],
            Health::Warning(r) | Health::Critical(r) => r,
        }
    }
}

/// Judges a process server from its report at `now`. A heartbeat from the future (clock
/// skew) counts as fresh.
pub fn health(report: &ProcessServerReport, now: Timestamp) -> Health {
    let mut critical = Vec::new();
    let mut warning = Vec::new();

    let free = report.cache_free_percent;
    if free.is_nan() {
        // Unknown free space is treated as none: a full cache stalls every server on it.
        critical.push("cache free space is unknown (NaN)".to_owned());
    } else if free < CACHE_FREE_CRITICAL_PERCENT {
        critical.push(format!("cache free space {free:.1}% is below {CACHE_FREE_CRITICAL_PERCENT}%"));
    } else if free < CACHE_FREE_WARNING_PERCENT {
        warning.push(format!("cache free space {free:.1}% is below {CACHE_FREE_WARNING_PERCENT}%"));
    }

    let backlog = report.upload_backlog_bytes;
    let gib = |b: u64| b as f64 / GIB as f64;
    if backlog > BACKLOG_CRITICAL_BYTES {
        critical.push(format!("upload backlog {:.1} GiB is above {} GiB", gib(backlog), BACKLOG_CRITICAL_BYTES / GIB));
    } else if backlog > BACKLOG_WARNING_BYTES {
        warning.push(format!("upload backlog {:.1} GiB is above {} GiB", gib(backlog), BACKLOG_WARNING_BYTES / GIB));
    }

    let silence = Duration::try_from(now.duration_since(report.last_heartbeat)).unwrap_or(Duration::ZERO);
    // Whole seconds are precise enough for people and keep the message stable across runs.
    let ago = format_duration(Duration::from_secs(silence.as_secs()));
    if silence > HEARTBEAT_CRITICAL {
        critical.push(format!("last heartbeat {ago} ago is older than {}", format_duration(HEARTBEAT_CRITICAL)));
    } else if silence > HEARTBEAT_WARNING {
        warning.push(format!("last heartbeat {ago} ago is older than {}", format_duration(HEARTBEAT_WARNING)));
    }

    if !critical.is_empty() {
        critical.extend(warning);
        Health::Critical(critical)
    } else if !warning.is_empty() {
        Health::Warning(warning)
    } else {
        Health::Healthy
    }
}

/// How much one process server may carry, and how far the fleet may scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizingLimits {
    /// Protected servers per process server; 0 means no limit on the count.
    pub servers_per_process_server: u32,
    /// Daily churn (changed bytes per day) per process server; 0 means no limit on churn.
    pub churn_bytes_per_day_per_process_server: u64,
    /// Most replicas the operator may run (at least one is always run).
    pub max_replicas: u32,
}

impl Default for SizingLimits {
    /// 100 servers and 2 TB of daily churn per process server (ASR's sizing figures),
    /// up to 10 replicas.
    fn default() -> Self {
        Self {
            servers_per_process_server: 100,
            churn_bytes_per_day_per_process_server: 2_000_000_000_000,
            max_replicas: 10,
        }
    }
}

impl SizingLimits {
    /// Whether a process server already carrying `count` servers and `churn` bytes per day
    /// can take one more server churning `extra`.
    fn fits(&self, load: Load, extra: u64) -> bool {
        // An empty process server takes any one server: one that churns more than a whole
        // process server's budget would otherwise never be protected, however far we scale.
        if load.count == 0 {
            return true;
        }
        let count_ok = self.servers_per_process_server == 0 || load.count < u64::from(self.servers_per_process_server);
        let churn_ok = self.churn_bytes_per_day_per_process_server == 0
            || load.churn.saturating_add(extra) <= self.churn_bytes_per_day_per_process_server;
        count_ok && churn_ok
    }
}

/// Replicas needed for `servers` protected servers churning `churn_bytes_per_day` in total:
/// enough for both the server count and the churn, at least 1, at most `limits.max_replicas`.
pub fn replicas_needed(servers: usize, churn_bytes_per_day: u64, limits: &SizingLimits) -> u32 {
    let by_count = match limits.servers_per_process_server {
        0 => 1,
        per => (servers as u64).div_ceil(u64::from(per)),
    };
    let by_churn = match limits.churn_bytes_per_day_per_process_server {
        0 => 1,
        per => churn_bytes_per_day.div_ceil(per),
    };
    let needed = u32::try_from(by_count.max(by_churn)).unwrap_or(u32::MAX);
    needed.min(limits.max_replicas).max(1)
}

/// A process server as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessServerState {
    /// Pod name, as written in `spec.processServer` and `status.processServer`.
    pub name: String,
    /// Its health from [`health`].
    pub health: Health,
}

/// A protected server as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerLoad {
    /// ProtectedServer name.
    pub name: String,
    /// `spec.processServer`: the user's pin, if any.
    pub pinned: Option<String>,
    /// `status.processServer`: where it replicates today, if anywhere.
    pub current: Option<String>,
    /// Changed bytes over the last 24 hours.
    pub churn_bytes_per_day: u64,
    /// `spec.consistencyGroup`: servers of one group are placed together (one process
    /// server coordinates the group's points).
    pub consistency_group: Option<String>,
}

/// Why a server ended up where it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssignmentReason {
    /// The user pinned it there.
    Pinned,
    /// It stays where it was.
    Kept,
    /// It had no process server and got one.
    Assigned,
    /// It moved away from `from` because of `why`.
    Reassigned {
        /// Its previous process server.
        from: String,
        /// What was wrong with it.
        why: String,
    },
    /// It has no process server; `why` says what to fix.
    Unassigned {
        /// Human-readable cause.
        why: String,
    },
}

/// Where one server replicates to, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// ProtectedServer name.
    pub server: String,
    /// The chosen process server; `None` when unassigned.
    pub process_server: Option<String>,
    /// Why.
    pub reason: AssignmentReason,
}

#[derive(Clone, Copy, Debug, Default)]
struct Load {
    churn: u64,
    count: u64,
}

/// Name of the unit standing for a consistency group during placement (`:` is never part
/// of a Kubernetes name).
const GROUP_UNIT: &str = "group:";

/// Places every server on a process server, returned in server-name order (names are
/// unique: they are ProtectedServer names in one namespace).
///
/// The servers of a consistency group are placed as one unit, with their churn summed:
/// the unit follows the pin of its first pinned member (by name), else stays where most
/// members are (the first in name order on a tie); members elsewhere move there. Every
/// other server is placed by [`place`]'s rules.
pub fn assign(
    process_servers: &[ProcessServerState],
    servers: &[ServerLoad],
    limits: &SizingLimits,
) -> Vec<Assignment> {
    let mut units: Vec<ServerLoad> = Vec::new();
    let mut groups: BTreeMap<&str, Vec<&ServerLoad>> = BTreeMap::new();
    for s in servers {
        match s.consistency_group.as_deref() {
            Some(g) => groups.entry(g).or_default().push(s),
            None => units.push(s.clone()),
        }
    }
    let mut sizes = BTreeMap::new();
    for (g, members) in groups.iter_mut() {
        members.sort_by(|a, b| a.name.cmp(&b.name));
        let mut votes: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (i, m) in members.iter().enumerate() {
            if let Some(c) = m.current.as_deref() {
                let v = votes.entry(c).or_insert((0, i));
                v.0 += 1;
            }
        }
        // Most members, then the first member's: a stable choice.
        let current = votes.iter().max_by_key(|(_, (n, first))| (*n, std::cmp::Reverse(*first))).map(|(c, _)| c);
        let name = format!("{GROUP_UNIT}{g}");
        sizes.insert(name.clone(), members.len() as u64);
        units.push(ServerLoad {
            name,
            pinned: members.iter().find_map(|m| m.pinned.clone()),
            current: current.map(|c| (*c).to_owned()),
            churn_bytes_per_day: members.iter().fold(0u64, |t, m| t.saturating_add(m.churn_bytes_per_day)),
            consistency_group: Some((*g).to_owned()),
        });
    }
    let mut out = Vec::new();
    for a in place(process_servers, &units, &sizes, limits) {
        match a.server.strip_prefix(GROUP_UNIT) {
            Some(g) => out.extend(groups[g].iter().map(|m| member_assignment(m, g, &a))),
            None => out.push(a),
        }
    }
    out.sort_by(|a, b| a.server.cmp(&b.server));
    out
}

/// A member's placement from its group's.
fn member_assignment(m: &ServerLoad, group: &str, unit: &Assignment) -> Assignment {
    let reason = match (&unit.process_server, &unit.reason) {
        (Some(ps), AssignmentReason::Pinned) if m.pinned.as_deref() == Some(ps.as_str()) => AssignmentReason::Pinned,
        (Some(ps), _) if m.current.as_deref() == Some(ps.as_str()) => AssignmentReason::Kept,
        (Some(ps), unit_reason) => match (&m.current, unit_reason) {
            (None, _) => AssignmentReason::Assigned,
            (Some(from), AssignmentReason::Reassigned { why, .. }) => {
                AssignmentReason::Reassigned { from: from.clone(), why: why.clone() }
            }
            (Some(from), _) => AssignmentReason::Reassigned {
                from: from.clone(),
                why: format!("consistency group {group} replicates to {ps}"),
            },
        },
        (None, AssignmentReason::Unassigned { why }) => {
            AssignmentReason::Unassigned { why: format!("consistency group {group}: {why}") }
        }
        (None, other) => other.clone(),
    };
    Assignment { server: m.name.clone(), process_server: unit.process_server.clone(), reason }
}

/// Places every unit (a server, or a consistency group with `sizes[name]` members) on a
/// process server, in name order.
///
/// In order: pins are honoured whenever the pinned process server exists and is not
/// Critical, even beyond capacity (the user asked for it); servers stay on their current
/// process server while it exists, is not Critical and has room (checked in name order,
/// so the same servers move every time); the rest go, largest churn first, to the
/// least-loaded (churn, then count) non-Critical process server with room, Healthy before
/// Warning. A server squeezed off a full process server stays there when no other has room,
/// since moving it to nowhere would stop its replication.
fn place(
    process_servers: &[ProcessServerState],
    servers: &[ServerLoad],
    sizes: &BTreeMap<String, u64>,
    limits: &SizingLimits,
) -> Vec<Assignment> {
    let size = |s: &ServerLoad| sizes.get(&s.name).copied().unwrap_or(1);
    let by_name: BTreeMap<&str, &ProcessServerState> = process_servers.iter().map(|p| (p.name.as_str(), p)).collect();
    let mut loads: BTreeMap<&str, Load> = by_name.keys().map(|n| (*n, Load::default())).collect();
    let mut sorted: Vec<&ServerLoad> = servers.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));

    let mut done: BTreeMap<&str, Assignment> = BTreeMap::new();
    let mut waiting: Vec<(&ServerLoad, Option<Displaced>)> = Vec::new();

    for s in sorted.iter().filter(|s| s.pinned.is_some()) {
        let pin = s.pinned.as_deref().unwrap_or_default();
        let assignment = match by_name.get(pin) {
            None => unassigned(s, format!("pinned process server {pin} does not exist")),
            Some(ps) if ps.health.is_critical() => {
                unassigned(s, format!("pinned process server {pin} is Critical{}", detail(&ps.health)))
            }
            Some(_) => {
                add(&mut loads, pin, s.churn_bytes_per_day, size(s));
                placed(s, pin, AssignmentReason::Pinned)
            }
        };
        done.insert(&s.name, assignment);
    }

    for s in sorted.iter().filter(|s| s.pinned.is_none()) {
        let Some(current) = s.current.as_deref() else {
            waiting.push((s, None));
            continue;
        };
        let displaced = match by_name.get(current) {
            None => Displaced::Missing,
            Some(ps) if ps.health.is_critical() => Displaced::Critical(detail(&ps.health)),
            Some(_) if !limits.fits(loads[current], s.churn_bytes_per_day) => Displaced::Full,
            Some(_) => {
                add(&mut loads, current, s.churn_bytes_per_day, size(s));
                done.insert(&s.name, placed(s, current, AssignmentReason::Kept));
                continue;
            }
        };
        waiting.push((s, Some(displaced)));
    }

    // Largest first: placing big servers while every process server still has room
    // balances churn better than placing them in name order.
    waiting.sort_by(|(a, _), (b, _)| b.churn_bytes_per_day.cmp(&a.churn_bytes_per_day).then(a.name.cmp(&b.name)));
    for (s, displaced) in waiting {
        let target = by_name
            .values()
            .filter(|ps| !ps.health.is_critical() && limits.fits(loads[ps.name.as_str()], s.churn_bytes_per_day))
            .min_by_key(|ps| {
                let load = loads[ps.name.as_str()];
                (matches!(ps.health, Health::Warning(_)), load.churn, load.count, ps.name.as_str())
            })
            .map(|ps| ps.name.as_str());
        let from = s.current.as_deref().unwrap_or_default();
        let (chosen, reason) = match (target, displaced) {
            (Some(to), None) => (Some(to), AssignmentReason::Assigned),
            (Some(to), Some(d)) => {
                (Some(to), AssignmentReason::Reassigned { from: from.to_owned(), why: d.describe(from) })
            }
            // Nowhere better to go: staying over capacity beats not replicating at all.
            (None, Some(Displaced::Full)) => (Some(from), AssignmentReason::Kept),
            (None, Some(d)) => (
                None,
                AssignmentReason::Unassigned {
                    why: format!("{}, and no other process server has room", d.describe(from)),
                },
            ),
            (None, None) => (None, AssignmentReason::Unassigned { why: no_room(process_servers) }),
        };
        if let Some(ps) = chosen {
            add(&mut loads, ps, s.churn_bytes_per_day, size(s));
        }
        done.insert(&s.name, Assignment { server: s.name.clone(), process_server: chosen.map(str::to_owned), reason });
    }

    done.into_values().collect()
}

/// Why a server cannot stay on its current process server.
enum Displaced {
    Missing,
    /// Carries [`detail`] of the process server's health.
    Critical(String),
    Full,
}

impl Displaced {
    fn describe(&self, from: &str) -> String {
        match self {
            Displaced::Missing => format!("process server {from} no longer exists"),
            Displaced::Critical(reasons) => format!("process server {from} is Critical{reasons}"),
            Displaced::Full => format!("process server {from} is over capacity"),
        }
    }
}

/// `": reason; reason"` to append to "is Critical", or nothing when no reason was given.
fn detail(health: &Health) -> String {
    match health.reasons() {
        [] => String::new(),
        reasons => format!(": {}", reasons.join("; ")),
    }
}

fn add<'a>(loads: &mut BTreeMap<&'a str, Load>, ps: &'a str, churn: u64, servers: u64) {
    let load = loads.entry(ps).or_default();
    load.churn = load.churn.saturating_add(churn);
    load.count += servers;
}

fn placed(s: &ServerLoad, ps: &str, reason: AssignmentReason) -> Assignment {
    Assignment { server: s.name.clone(), process_server: Some(ps.to_owned()), reason }
}

fn unassigned(s: &ServerLoad, why: String) -> Assignment {
    Assignment { server: s.name.clone(), process_server: None, reason: AssignmentReason::Unassigned { why } }
}

fn no_room(process_servers: &[ProcessServerState]) -> String {
    let critical = process_servers.iter().filter(|p| p.health.is_critical()).count();
    match process_servers.len() {
        0 => "there are no process servers".to_owned(),
        n if n == critical => format!("all {n} process servers are Critical"),
        n => format!("no process server has room ({n} total, {critical} Critical, the rest full)"),
    }
}

#[cfg(test)]
#[path = "assignment_tests.rs"]
mod tests;
