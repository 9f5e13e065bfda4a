//! Recovery-point retention: which points to keep and which to delete, with ASR-style
//! thinning (dense recent points, sparser older ones).
//!
//! Rules, in order of precedence:
//! 1. Pinned points (in use by a failover or test failover) are kept, whatever their age.
//! 2. The newest point and the newest app-consistent point are kept, even beyond the
//!    window, because they are what the `Latest…` and `LatestAppConsistent` selectors
//!    resolve to: a server whose replication stalled for longer than the window must still
//!    have something to fail over to.
//! 3. Points older than the window are deleted.
//! 4. Older points are thinned to one per `keep_every` bucket of their tier.
//!
//! Buckets are aligned to absolute time (Unix epoch), not to `now`, so the point kept for
//! a bucket stays the same from one run to the next. A tier only thins a bucket once the
//! whole bucket has aged past the tier's `after`: if it thinned as soon as the first
//! point crossed, the newest point of a half-aged bucket would change on every run and
//! each earlier choice would be deleted in turn. Until then the bucket's points follow
//! the previous (finer) tier. The points that survive are the same either way.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use jiff::Timestamp;
use siterecovery_api::common::RecoveryPointKind;
use siterecovery_api::policy::ThinningTier;

/// One recovery point, as much as retention needs to know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointInfo {
    /// Recovery-point id, unique per server.
    pub id: String,
    /// The instant the point captures.
    pub time: Timestamp,
    /// Its consistency; app-consistent points win their bucket.
    pub kind: RecoveryPointKind,
}

/// A thinning tier: points at least `after` old are kept one per `keep_every`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    /// Age from which the tier applies.
    pub after: Duration,
    /// Width of a bucket; one point is kept per bucket. Zero keeps every point.
    pub keep_every: Duration,
}

/// What to do with each point: ids in time order (ties by id).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPlan {
    /// Points to keep.
    pub keep: Vec<String>,
    /// Points whose manifests can be deleted.
    pub delete: Vec<String>,
}

/// A thinning tier of the policy that cannot be turned into a [`Tier`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetentionError {
    /// A duration does not parse; admission rejects these, so only code-built policies hit it.
    #[error("spec.retention.thinning[{index}].{field}: {value:?} is not a duration")]
    InvalidDuration {
        /// Position of the tier in the list.
        index: usize,
        /// `after` or `keepEvery`.
        field: &'static str,
        /// The offending text.
        value: String,
    },
}

const HOUR: Duration = Duration::from_secs(3600);

/// ASR's thinning, used when `spec.retention.thinning` is omitted: every point for 2h,
/// then one per hour, one per 2h after 24h and one per 4h after 72h.
pub fn asr_default_tiers() -> Vec<Tier> {
    vec![
        Tier { after: 2 * HOUR, keep_every: HOUR },
        Tier { after: 24 * HOUR, keep_every: 2 * HOUR },
        Tier { after: 72 * HOUR, keep_every: 4 * HOUR },
    ]
}

/// Turns the policy's `spec.retention.thinning` into tiers: omitted means
/// [`asr_default_tiers`], an empty list means no thinning (every point in the window kept).
///
/// Call it with `spec.retention.thinning.as_deref()`.
pub fn tiers_from_policy(thinning: Option<&[ThinningTier]>) -> Result<Vec<Tier>, RetentionError> {
    let Some(thinning) = thinning else {
        return Ok(asr_default_tiers());
    };
    thinning
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let parse = |field: &'static str, d: &siterecovery_api::common::Duration| {
                d.to_std().ok_or_else(|| RetentionError::InvalidDuration { index, field, value: d.0.clone() })
            };
            Ok(Tier { after: parse("after", &t.after)?, keep_every: parse("keepEvery", &t.keep_every)? })
        })
        .collect()
}

/// Decides which points to keep and which to delete at `now`.
///
/// `pinned` holds ids that must never be deleted (in use by a failover or test failover);
/// ids that name no point are ignored. Points in the future (clock skew between agent and
/// operator) count as age zero. The result does not depend on the order of `points`.
pub fn plan_retention(
    now: Timestamp,
    points: &[PointInfo],
    window: Duration,
    tiers: &[Tier],
    pinned: &HashSet<String>,
) -> RetentionPlan {
    let mut order: Vec<&PointInfo> = points.iter().collect();
    order.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));

    let tiers = oldest_first(tiers);

    let now_ns = now.as_nanosecond();
    let window_ns = nanos(window);
    let mut keep = vec![false; order.len()];
    // Best candidate per (tier, bucket) among the points inside the window.
    let mut winners: BTreeMap<(usize, i128), usize> = BTreeMap::new();

    for (i, p) in order.iter().enumerate() {
        let age = (now_ns - p.time.as_nanosecond()).max(0);
        if pinned.contains(&p.id) {
            keep[i] = true;
        }
        if age > window_ns {
            continue;
        }
        match placement(now_ns, p.time.as_nanosecond(), &tiers) {
            None => keep[i] = true,
            Some(slot) => {
                let best = winners.entry(slot).or_insert(i);
                if rank(p) > rank(order[*best]) {
                    *best = i;
                }
            }
        }
    }
    for &i in winners.values() {
        keep[i] = true;
    }
    // `order` is sorted ascending, so the last match is the newest.
    if let Some(i) = order.len().checked_sub(1) {
        keep[i] = true;
    }
    if let Some(i) = order.iter().rposition(|p| is_app_consistent(p.kind)) {
        keep[i] = true;
    }

    let mut plan = RetentionPlan::default();
    for (p, kept) in order.iter().zip(keep) {
        let list = if kept { &mut plan.keep } else { &mut plan.delete };
        list.push(p.id.clone());
    }
    plan
}

/// Whether a kind counts as app-consistent for retention and the `LatestAppConsistent` selector.
pub fn is_app_consistent(kind: RecoveryPointKind) -> bool {
    matches!(kind, RecoveryPointKind::AppConsistent | RecoveryPointKind::GroupAppConsistent)
}

/// Tiers by `after`, largest first, so the first tier that applies to a point is the
/// oldest one; equal `after`s go coarsest first, to give one answer whatever the input order.
fn oldest_first(tiers: &[Tier]) -> Vec<Tier> {
    let mut tiers = tiers.to_vec();
    tiers.sort_by_key(|t| std::cmp::Reverse((t.after, t.keep_every)));
    tiers
}

/// The (tier index, bucket) that thins a point at `time_ns`, or `None` when the point is
/// kept unthinned (too young for any tier, or its tier keeps every point).
///
/// `tiers` must come from [`oldest_first`].
fn placement(now_ns: i128, time_ns: i128, tiers: &[Tier]) -> Option<(usize, i128)> {
    let age = (now_ns - time_ns).max(0);
    for (index, tier) in tiers.iter().enumerate() {
        let after = nanos(tier.after);
        let every = nanos(tier.keep_every);
        if every == 0 {
            if age >= after {
                return None;
            }
            continue;
        }
        let bucket = time_ns.div_euclid(every);
        let bucket_end = (bucket + 1) * every;
        if now_ns - bucket_end >= after {
            return Some((index, bucket));
        }
    }
    None
}

/// Preference within a bucket: app-consistent first, then the newest, then the larger id
/// (only so that equal times still give one answer).
fn rank(p: &PointInfo) -> (bool, Timestamp, &str) {
    (is_app_consistent(p.kind), p.time, &p.id)
}

fn nanos(d: Duration) -> i128 {
    // A std Duration holds at most ~1.8e28 ns, well within i128.
    d.as_nanos() as i128
}

#[cfg(test)]
mod tests {
    use super::*;
    use RecoveryPointKind::*;

    const MIN: Duration = Duration::from_secs(60);
    const DAY: Duration = Duration::from_secs(86_400);

    /// 2025-01-01T00:00:00Z, a multiple of 4h since the epoch so bucket edges fall on round ages.
    fn now() -> Timestamp {
        "2025-01-01T00:00:00Z".parse().unwrap()
    }

    fn at(age: Duration) -> Timestamp {
        now() - jiff::SignedDuration::try_from(age).unwrap()
    }

    fn id(age: Duration) -> String {
        format!("p-{}", age.as_secs())
    }

    fn point(age: Duration, kind: RecoveryPointKind) -> PointInfo {
        PointInfo { id: id(age), time: at(age), kind }
    }

    /// Crash-consistent points every `step` from age 0 to `span` inclusive.
    fn series(span: Duration, step: Duration) -> Vec<PointInfo> {
        (0..=span.as_secs() / step.as_secs()).map(|k| point(step * k as u32, CrashConsistent)).collect()
    }

    fn ages(ids: &[String]) -> Vec<u64> {
        ids.iter().map(|i| i.trim_start_matches("p-").parse().unwrap()).collect()
    }

    fn plan(points: &[PointInfo], window: Duration, pinned: &[&str]) -> RetentionPlan {
        let pinned = pinned.iter().map(|s| s.to_string()).collect();
        plan_retention(now(), points, window, &asr_default_tiers(), &pinned)
    }

    #[test]
    fn defaults_thin_three_days_of_30s_points_per_tier() {
        let points = series(72 * HOUR, Duration::from_secs(30));
        let p = plan(&points, 15 * DAY, &[]);
        let kept = ages(&p.keep);
        let count = |lo: u64, hi: u64| kept.iter().filter(|&&a| a >= lo && a <= hi).count();
        // Every point of the last 2h (0..=2h inclusive, 30s apart).
        assert_eq!(count(0, 7200), 241);
        // Hourly buckets (2h, 24h]: 22 buckets, the newest point of each.
        assert_eq!(count(7201, 86_400), 22);
        // Two-hourly buckets (24h, 72h]: 24 buckets.
        assert_eq!(count(86_401, 259_200), 24);
        assert_eq!(p.keep.len() + p.delete.len(), points.len());
        // The newest point of each hourly bucket (3h, 4h] is the one at age 3h + 30s.
        assert!(kept.contains(&(3 * 3600 + 30)));
        assert!(!kept.contains(&(4 * 3600)));
    }

    #[test]
    fn app_consistent_point_wins_its_bucket() {
        let mut points = series(6 * HOUR, 5 * MIN);
        let app_age = 4 * HOUR - 20 * MIN;
        for p in &mut points {
            if p.time == at(app_age) {
                p.kind = AppConsistent;
            } else if p.time == at(5 * HOUR - 10 * MIN) {
                p.kind = GroupAppConsistent;
            }
        }
        let kept = ages(&plan(&points, DAY, &[]).keep);
        assert!(kept.contains(&app_age.as_secs()));
        assert!(kept.contains(&(5 * 3600 - 600)));
        // The crash-consistent newest of those buckets lost to them.
        assert!(!kept.contains(&(3 * 3600 + 300)));
        assert!(!kept.contains(&(4 * 3600 + 300)));
    }

    #[test]
    fn points_beyond_the_window_go_unless_pinned_or_newest() {
        let points = series(48 * HOUR, HOUR);
        let p = plan(&points, 12 * HOUR, &[&id(30 * HOUR)]);
        let kept = ages(&p.keep);
        assert!(kept.iter().all(|&a| a <= 12 * 3600 || a == 30 * 3600), "{kept:?}");
        assert!(kept.contains(&(30 * 3600)));
        assert!(ages(&p.delete).contains(&(13 * 3600)));
    }

    #[test]
    fn newest_and_newest_app_point_survive_a_stalled_server() {
        // Replication stopped 10 days ago; the window is one day.
        let mut points = series(2 * DAY, HOUR);
        for p in &mut points {
            p.time -= jiff::SignedDuration::from_hours(240);
        }
        points[30].kind = AppConsistent;
        let (newest, app) = (points[0].id.clone(), points[30].id.clone());
        let p = plan(&points, DAY, &[]);
        assert_eq!(p.keep, vec![app, newest]);
    }

    #[test]
    fn pinned_point_is_kept_inside_a_thinned_bucket() {
        let points = series(6 * HOUR, 5 * MIN);
        let pin = id(3 * HOUR + 40 * MIN);
        let p = plan(&points, DAY, &[&pin]);
        assert!(p.keep.contains(&pin));
        // The bucket's own keeper is still kept, so unpinning later deletes only the pin.
        assert!(p.keep.contains(&id(3 * HOUR + 5 * MIN)));
    }

    #[test]
    fn empty_input_and_no_thinning() {
        assert_eq!(plan(&[], DAY, &["x"]), RetentionPlan::default());
        let points = series(10 * HOUR, 10 * MIN);
        let all = plan_retention(now(), &points, DAY, &[], &HashSet::new());
        assert!(all.delete.is_empty());
        assert_eq!(all.keep.len(), points.len());
    }

    #[test]
    fn future_points_and_duplicate_times_are_deterministic() {
        let mut points = series(5 * HOUR, 30 * MIN);
        points.push(PointInfo {
            id: "future".into(),
            time: now() + jiff::SignedDuration::from_mins(3),
            kind: CrashConsistent,
        });
        points.push(PointInfo { id: "twin-a".into(), time: at(3 * HOUR + 30 * MIN), kind: CrashConsistent });
        let forward = plan(&points, DAY, &[]);
        points.reverse();
        assert_eq!(plan(&points, DAY, &[]), forward);
        assert_eq!(forward.keep.last().map(String::as_str), Some("future"));
        // Of the two points at 3h30m, the larger id wins the tie; the other goes.
        assert!(forward.keep.contains(&"twin-a".to_string()));
        assert!(forward.delete.contains(&id(3 * HOUR + 30 * MIN)));
    }

    #[test]
    fn kept_points_stay_kept_while_they_stay_in_their_bucket() {
        let step = Duration::from_secs(30);
        let tiers = asr_default_tiers();
        let sorted = oldest_first(&tiers);
        let mut points = series(72 * HOUR, step);
        let mut clock = now();
        let mut prev = plan_retention(clock, &points, 15 * DAY, &tiers, &HashSet::new());
        let mut deleted_total = 0;
        // Advance 7 minutes at a time for two days, adding new points as the agent would.
        for _ in 0..(48 * 60 / 7) {
            points.retain(|p| prev.keep.contains(&p.id));
            let before = clock;
            clock += jiff::SignedDuration::from_mins(7);
            let mut t = before + jiff::SignedDuration::from_secs(30);
            while t <= clock {
                points.push(PointInfo { id: format!("n-{}", t.as_second()), time: t, kind: CrashConsistent });
                t += jiff::SignedDuration::from_secs(30);
            }
            let next = plan_retention(clock, &points, 15 * DAY, &tiers, &HashSet::new());
            for gone in &next.delete {
                let p = points.iter().find(|p| &p.id == gone).unwrap();
                let was = placement(before.as_nanosecond(), p.time.as_nanosecond(), &sorted);
                let is = placement(clock.as_nanosecond(), p.time.as_nanosecond(), &sorted);
                assert_ne!(was, is, "{gone} deleted at {clock} while still in its bucket");
            }
            deleted_total += next.delete.len();
            // Re-running at the same instant changes nothing.
            points.retain(|p| next.keep.contains(&p.id));
            assert!(plan_retention(clock, &points, 15 * DAY, &tiers, &HashSet::new()).delete.is_empty());
            prev = next;
        }
        assert!(deleted_total > 0, "the test must exercise thinning");
    }

    #[test]
    fn policy_tiers_convert() {
        assert_eq!(tiers_from_policy(None), Ok(asr_default_tiers()));
        assert_eq!(tiers_from_policy(Some(&[])), Ok(vec![]));
        let tier = |after: &str, every: &str| ThinningTier { after: after.into(), keep_every: every.into() };
        assert_eq!(
            tiers_from_policy(Some(&[tier("6h", "30m")])),
            Ok(vec![Tier { after: 6 * HOUR, keep_every: 30 * MIN }])
        );
        let err = tiers_from_policy(Some(&[tier("6h", "30m"), tier("1d", "1h")])).unwrap_err();
        assert_eq!(err.to_string(), "spec.retention.thinning[1].after: \"1d\" is not a duration");
    }
}
