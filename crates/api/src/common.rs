//! Types shared by several custom resources: durations, references,
//! kstatus-compatible conditions and recovery-point identities.

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// Pattern of a [`Duration`]: one or more `<integer><unit>` terms, units `ms`, `s`, `m`, `h`.
///
/// It is the subset of Go's `time.ParseDuration` syntax that CEL's `duration()` also
/// parses, so admission rules can compare durations across fields.
pub const DURATION_PATTERN: &str = r"^([0-9]{1,6}(ms|s|m|h))+$";

/// Pattern of a DNS-1123 label (names of disks, groups, actions).
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A span of time written the Kubernetes way (`30s`, `5m`, `1h30m`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(transparent)]
pub struct Duration(pub String);

impl Duration {
    /// Parses the duration; `None` when it does not match [`DURATION_PATTERN`].
    ///
    /// The API server has already rejected malformed values at admission, so `None`
    /// only shows up for objects built in code.
    pub fn to_std(&self) -> Option<std::time::Duration> {
        parse_duration(&self.0)
    }

    /// Formats a duration with the largest exact units (`90s` → `1m30s`).
    pub fn from_std(d: std::time::Duration) -> Self {
        Self(format_duration(d))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Duration {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl JsonSchema for Duration {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
        })
    }
}

/// Parses `1h30m`, `500ms`, `5s` (integers only, units ms/s/m/h).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    if s.is_empty() {
        return None;
    }
    let mut total = std::time::Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (std::time::Duration::from_millis(1), 2)
        } else if rest.starts_with('s') {
            (std::time::Duration::from_secs(1), 1)
        } else if rest.starts_with('m') {
            (std::time::Duration::from_secs(60), 1)
        } else if rest.starts_with('h') {
            (std::time::Duration::from_secs(3600), 1)
        } else {
            return None;
        };
        total += unit.checked_mul(u32::try_from(value).ok()?)?;
        rest = &rest[len..];
    }
    Some(total)
}

/// Formats a duration as `1h2m3s`; sub-second durations as `250ms`; zero as `0s`.
pub fn format_duration(d: std::time::Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return if d.subsec_millis() > 0 { format!("{}ms", d.subsec_millis()) } else { "0s".to_owned() };
    }
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// A reference to an object of a known kind in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct LocalObjectReference {
    /// Name of the referenced object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key in a Secret of the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The status of a condition, as in every Kubernetes API.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell yet.
    Unknown,
}

/// One kstatus-compatible condition; `T` is the kind's enum of condition types.
///
/// Lists of conditions are map-lists keyed on `type`, so every writer (operator,
/// agent, process server) can own its own conditions with server-side apply.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition<T> {
    /// Type of the condition.
    #[serde(rename = "type")]
    pub type_: T,
    /// Whether the condition holds.
    pub status: ConditionStatus,
    /// Machine-readable, CamelCase reason for the last transition.
    #[schemars(length(max = 1024), regex(pattern = r"^([A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?)?$"))]
    pub reason: String,
    /// Human-readable detail; names the offending field or object when something is wrong.
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When the status last changed; kept while the status stays the same.
    pub last_transition_time: Time,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The kstatus condition types every kind's condition enum has, so status code can be
/// written once for all kinds.
pub trait KstatusConditions: Copy + PartialEq + std::fmt::Debug {
    /// `Ready`: the object is in its desired state.
    const READY: Self;
    /// `Reconciling`: the controller is working towards the desired state.
    const RECONCILING: Self;
    /// `Stalled`: no progress without a change; the message says what to fix.
    const STALLED: Self;
}

/// Implements [`KstatusConditions`] for a condition enum with `Ready`, `Reconciling`, `Stalled`.
#[macro_export]
macro_rules! kstatus_conditions {
    ($($t:ty),*) => {$(
        impl $crate::common::KstatusConditions for $t {
            const READY: Self = <$t>::Ready;
            const RECONCILING: Self = <$t>::Reconciling;
            const STALLED: Self = <$t>::Stalled;
        }
    )*};
}

/// Kind of a recovery point, from weakest to strongest consistency guarantee.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RecoveryPointKind {
    /// Every disk of the server reflects one single instant.
    CrashConsistent,
    /// Filesystems were frozen around the application's pre/post hooks.
    AppConsistent,
    /// One crash-consistent instant across every server of a consistency group.
    GroupConsistent,
    /// App-consistent across every server of a consistency group.
    GroupAppConsistent,
}

/// Identity of one recovery point, as shown in status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPointRef {
    /// Recovery-point id, unique per server (the manifest name in the blob store).
    #[schemars(length(min = 1, max = 128))]
    pub id: String,
    /// The instant the point captures.
    pub time: Time,
    /// Its consistency.
    pub kind: RecoveryPointKind,
}

/// How to pick a recovery point for failover, test failover or a change of point.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RecoveryPointSelector {
    /// Process every pending change first, then fail over to the result (lowest RPO, slower).
    #[default]
    Latest,
    /// The latest point already processed and uploaded (fastest, RTO first).
    LatestProcessed,
    /// The latest app-consistent point.
    LatestAppConsistent,
    /// The latest point shared by every server of the consistency group.
    LatestGroupConsistent,
    /// The point named in `pointName`.
    Named,
    /// The latest point at or before `pointInTime`.
    PointInTime,
}

/// Default for `serde(default)` on booleans that default to false, for readability.
pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_durations() {
        let s = std::time::Duration::from_secs;
        assert_eq!(parse_duration("5s"), Some(s(5)));
        assert_eq!(parse_duration("1h30m"), Some(s(5400)));
        assert_eq!(parse_duration("250ms"), Some(std::time::Duration::from_millis(250)));
        assert_eq!(parse_duration("360h"), Some(s(360 * 3600)));
        for bad in ["", "5", "s", "1.5h", "5d", "-5s", "5 s"] {
            assert_eq!(parse_duration(bad), None, "{bad:?} must not parse");
        }
    }

    #[test]
    fn formats_round_trip() {
        for text in ["0s", "5s", "1m30s", "2h", "1h0m1s", "250ms"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(parse_duration(&format_duration(d)), Some(d));
        }
        assert_eq!(format_duration(std::time::Duration::from_secs(90)), "1m30s");
    }
}
