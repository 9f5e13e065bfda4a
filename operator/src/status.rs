//! Condition bookkeeping shared by every kind: kstatus-compatible `Ready` /
//! `Reconciling` / `Stalled`, with `lastTransitionTime` kept while a status holds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use siterecovery_api::{Condition, ConditionStatus, KstatusConditions};

/// The overall verdict of a reconcile, turned into the three kstatus conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Desired state reached.
    Ready {
        /// CamelCase reason.
        reason: &'static str,
        /// Human-readable detail.
        message: String,
    },
    /// Working on it.
    Progressing {
        /// CamelCase reason.
        reason: &'static str,
        /// What is happening.
        message: String,
    },
    /// Cannot progress without a change.
    Stalled {
        /// CamelCase reason.
        reason: &'static str,
        /// What to fix, naming the field or object.
        message: String,
    },
}

/// Sets one condition, keeping its `lastTransitionTime` when the status does not change.
pub fn set_condition<T: Copy + PartialEq>(
    conditions: &mut Vec<Condition<T>>,
    type_: T,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    let since = conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    conditions.retain(|c| c.type_ != type_);
    conditions.push(Condition {
        type_,
        status,
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: since,
        observed_generation: generation,
    });
}

/// Applies a verdict to the three kstatus conditions.
pub fn set_verdict<T: KstatusConditions>(
    conditions: &mut Vec<Condition<T>>,
    verdict: &Verdict,
    generation: Option<i64>,
    now: &Time,
) {
    use ConditionStatus::{False, True};
    let (ready, reconciling, stalled, reason, message) = match verdict {
        Verdict::Ready { reason, message } => (True, False, False, *reason, message.as_str()),
        Verdict::Progressing { reason, message } => (False, True, False, *reason, message.as_str()),
        Verdict::Stalled { reason, message } => (False, False, True, *reason, message.as_str()),
    };
    for (type_, status) in [(T::READY, ready), (T::RECONCILING, reconciling), (T::STALLED, stalled)] {
        let (reason, message) =
            if status == True || type_ == T::READY { (reason, message) } else { ("AsExpected", "") };
        set_condition(conditions, type_, status, reason, message, generation, now);
    }
}

/// Removes `null` members (recursively) from a status built with `json!`: under
/// server-side apply an omitted field is released (and removed when nobody else owns it),
/// whereas an explicit `null` would be stored and shown as `<no value>` by kubectl.
pub fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => serde_json::Value::Object(
            map.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, without_nulls(v))).collect(),
        ),
        serde_json::Value::Array(items) => serde_json::Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

/// A byte count for people: `256.0 MiB`, `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= 1024f64.powi(4) => format!("{:.1} TiB", n / 1024f64.powi(4)),
        n if n >= 1024f64.powi(3) => format!("{:.1} GiB", n / 1024f64.powi(3)),
        n if n >= 1024f64.powi(2) => format!("{:.1} MiB", n / 1024f64.powi(2)),
        n => format!("{n} B"),
    }
}

/// The current time as a Kubernetes `Time`.
pub fn now() -> Time {
    Time(jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use siterecovery_api::policy::PolicyConditionType as C;

    fn at(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    #[test]
    fn nulls_are_dropped_at_every_level() {
        let v = serde_json::json!({"a": null, "b": {"c": null, "d": 1}, "e": [{"f": null}]});
        assert_eq!(without_nulls(v), serde_json::json!({"b": {"d": 1}, "e": [{}]}));
    }

    #[test]
    fn transition_time_is_kept_while_status_holds() {
        let mut conds: Vec<siterecovery_api::Condition<C>> = Vec::new();
        let ready = Verdict::Ready { reason: "Ready", message: "ok".into() };
        set_verdict(&mut conds, &ready, Some(1), &at("2026-01-01T00:00:00Z"));
        set_verdict(&mut conds, &ready, Some(2), &at("2026-01-01T01:00:00Z"));
        let r = conds.iter().find(|c| c.type_ == C::Ready).unwrap();
        assert_eq!(r.last_transition_time, at("2026-01-01T00:00:00Z"));
        assert_eq!(r.observed_generation, Some(2));
        let stalled = Verdict::Stalled { reason: "SecretMissing", message: "spec.x: gone".into() };
        set_verdict(&mut conds, &stalled, Some(3), &at("2026-01-01T02:00:00Z"));
        let r = conds.iter().find(|c| c.type_ == C::Ready).unwrap();
        assert_eq!((r.status, r.last_transition_time.clone()), (ConditionStatus::False, at("2026-01-01T02:00:00Z")));
        let s = conds.iter().find(|c| c.type_ == C::Stalled).unwrap();
        assert_eq!(
            (s.status, s.reason.as_str(), s.message.as_str()),
            (ConditionStatus::True, "SecretMissing", "spec.x: gone")
        );
        assert_eq!(conds.len(), 3, "one condition per type");
    }
}
