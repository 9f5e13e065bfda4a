//! The heartbeat contract between a process server and the operator (see
//! `docs/process-servers.md`): each process server renews a `coordination.k8s.io/v1`
//! Lease named `sr-ps-<pod>`, labelled `app.kubernetes.io/component=process-server`,
//! whose `spec.renewTime` is its heartbeat and whose annotations carry its cache free
//! space and upload backlog. Reading one gives the process server's health.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use siterecovery_core::assignment::{HEARTBEAT_CRITICAL, Health, ProcessServerReport, health};

use super::fleet;

/// Heartbeat Leases are named `sr-ps-<pod>`.
pub const LEASE_PREFIX: &str = "sr-ps-";
/// Lease annotation: free space of the cache volume, 0–100.
pub const CACHE_FREE_ANNOTATION: &str = "siterecovery.io/cache-free-percent";
/// Lease annotation: bytes acknowledged to agents and not yet uploaded.
pub const BACKLOG_ANNOTATION: &str = "siterecovery.io/upload-backlog-bytes";

/// What a process server's Lease says.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseReport {
    /// Pod name.
    pub process_server: String,
    /// Its ordinal in the StatefulSet.
    pub ordinal: u32,
    /// Health at `now`; a Lease that breaks the contract (annotation missing or not a
    /// number, no renewTime) is Critical, naming what is wrong.
    pub health: Health,
    /// `spec.renewTime`.
    pub heartbeat: Option<Timestamp>,
    /// Upload backlog, if readable.
    pub backlog: Option<u64>,
}

impl LeaseReport {
    /// Whether the process server still has acknowledged data to upload and is alive to
    /// do it; such a process server is not removed. An unreadable backlog counts as data.
    pub fn holds_data(&self, now: Timestamp) -> bool {
        let alive = self.heartbeat.is_some_and(|h| silence(now, h) <= HEARTBEAT_CRITICAL);
        alive && self.backlog != Some(0)
    }
}

/// Reads a heartbeat Lease; `None` when it is not named after a pod of this fleet.
pub fn read_lease(lease: &Lease, now: Timestamp) -> Option<LeaseReport> {
    let pod = lease.metadata.name.as_deref()?.strip_prefix(LEASE_PREFIX)?;
    let ordinal = fleet::ordinal(pod)?;
    let annotations = lease.annotations();
    let mut problems = Vec::new();
    let mut number = |key: &str| -> Option<f64> {
        match annotations.get(key).map(|v| (v, v.trim().parse::<f64>())) {
            Some((_, Ok(n))) if n.is_finite() && n >= 0.0 => Some(n),
            Some((v, _)) => {
                problems.push(format!("annotation {key} is {v:?}, not a non-negative number"));
                None
            }
            None => {
                problems.push(format!("annotation {key} is missing"));
                None
            }
        }
    };
    let cache_free = number(CACHE_FREE_ANNOTATION);
    let backlog = number(BACKLOG_ANNOTATION).map(|b| b as u64);
    let heartbeat = lease.spec.as_ref().and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
    if heartbeat.is_none() {
        problems.push("spec.renewTime is not set (no heartbeat yet)".to_owned());
    }
    // Judge what could be read; a broken contract then makes it Critical on top.
    let report = ProcessServerReport {
        cache_free_percent: cache_free.unwrap_or(100.0),
        upload_backlog_bytes: backlog.unwrap_or(0),
        last_heartbeat: heartbeat.unwrap_or(now),
    };
    let judged = health(&report, now);
    let health = if problems.is_empty() {
        judged
    } else {
        problems.extend(judged.reasons().iter().cloned());
        Health::Critical(problems)
    };
    Some(LeaseReport { process_server: pod.to_owned(), ordinal, health, heartbeat, backlog })
}

/// `Healthy`, `Warning` or `Critical`.
pub fn level(health: &Health) -> &'static str {
    match health {
        Health::Healthy => "Healthy",
        Health::Warning(_) => "Warning",
        Health::Critical(_) => "Critical",
    }
}

pub(super) fn silence(now: Timestamp, heartbeat: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(heartbeat)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn now() -> Timestamp {
        "2026-11-27T10:00:00Z".parse().unwrap()
    }

    fn lease(name: &str, annotations: serde_json::Value, renew: Option<&str>) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"renewTime": renew}
        }))
        .unwrap()
    }

    #[test]
    fn a_good_report_is_judged_by_the_core_thresholds() {
        let l = lease(
            "sr-ps-siterecovery-process-server-2",
            json!({CACHE_FREE_ANNOTATION: "28.5", BACKLOG_ANNOTATION: "1024"}),
            Some("2026-11-27T09:59:50.000000Z"),
        );
        let r = read_lease(&l, now()).unwrap();
        assert_eq!((r.process_server.as_str(), r.ordinal), ("siterecovery-process-server-2", 2));
        assert_eq!(r.health, Health::Warning(vec!["cache free space 28.5% is below 30%".into()]));
        assert_eq!(r.backlog, Some(1024));
        assert!(r.holds_data(now()));
    }

    #[test]
    fn a_lease_that_breaks_the_contract_is_critical_naming_the_problem() {
        let l = lease("sr-ps-siterecovery-process-server-0", json!({CACHE_FREE_ANNOTATION: "plenty"}), None);
        let r = read_lease(&l, now()).unwrap();
        assert_eq!(
            r.health,
            Health::Critical(vec![
                format!("annotation {CACHE_FREE_ANNOTATION} is \"plenty\", not a non-negative number"),
                format!("annotation {BACKLOG_ANNOTATION} is missing"),
                "spec.renewTime is not set (no heartbeat yet)".to_owned(),
            ])
        );
        assert!(!r.holds_data(now()), "never heard from: nothing to wait for");
    }

    #[test]
    fn leases_of_other_pods_are_not_read() {
        for name in ["sr-ps-someone-else-0", "sr-ps-siterecovery-process-server-01", "siterecovery-process-server-0"] {
            assert!(read_lease(&lease(name, json!({}), None), now()).is_none(), "{name}");
        }
    }
}
