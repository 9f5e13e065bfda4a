//! Recovery point objective: how much data a failover now would lose.

use std::time::Duration;

use jiff::Timestamp;

/// RPO of a server: the age of its newest recovery point at `now`; `None` before the
/// first point exists. A point stamped in the future (clock skew) counts as age zero.
pub fn current_rpo(now: Timestamp, latest_point: Option<Timestamp>) -> Option<Duration> {
    let latest = latest_point?;
    let age = now.duration_since(latest);
    Some(Duration::try_from(age).unwrap_or(Duration::ZERO))
}

/// Whether an RPO is above the policy's alert threshold. No point yet is not a breach
/// during initial replication; the caller decides that from the phase.
pub fn breached(rpo: Option<Duration>, threshold: Duration) -> bool {
    rpo.is_some_and(|rpo| rpo > threshold)
}

/// When the RPO will cross `threshold` if no new point arrives: the reconciler requeues
/// then, so a breach is reported on time without polling.
pub fn breach_time(latest_point: Timestamp, threshold: Duration) -> Option<Timestamp> {
    latest_point.checked_add(jiff::SignedDuration::try_from(threshold).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn rpo_is_the_age_of_the_latest_point() {
        let now = ts("2026-11-27T10:00:30Z");
        assert_eq!(current_rpo(now, Some(ts("2026-11-27T10:00:18Z"))), Some(Duration::from_secs(12)));
        assert_eq!(current_rpo(now, None), None);
        assert_eq!(current_rpo(now, Some(ts("2026-11-27T10:01:00Z"))), Some(Duration::ZERO), "clock skew");
    }

    #[test]
    fn breach_is_strictly_above_threshold() {
        let threshold = Duration::from_secs(300);
        assert!(!breached(Some(Duration::from_secs(300)), threshold));
        assert!(breached(Some(Duration::from_secs(301)), threshold));
        assert!(!breached(None, threshold));
        assert_eq!(breach_time(ts("2026-11-27T10:00:00Z"), threshold), Some(ts("2026-11-27T10:05:00Z")));
    }
}
