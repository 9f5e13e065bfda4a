//! What the benchmarks read from the operator process: counters from its Prometheus
//! `/metrics` text, and memory figures from `/proc/<pid>/status`.
//!
//! The reader is written here rather than taken from a crate: `prometheus-client` only
//! encodes, and summing a few counter series needs a dozen lines, not a full
//! OpenMetrics parser.

use anyhow::Context as _;

/// One sample of a metric family: its label pairs (in exposition order) and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// `(name, value)` label pairs.
    pub labels: Vec<(String, String)>,
    /// The sample's value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Every sample of `metric` (the full sample name, e.g. `siterecovery_reconciles_total`)
/// in an OpenMetrics / Prometheus text exposition. Label values holding `,` or `"` are
/// not expected in the operator's series (kinds, reasons, namespaces, names).
pub fn samples(text: &str, metric: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(metric)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(inner) => {
                    let (labels, value) = inner.split_once('}')?;
                    (parse_labels(labels), value)
                }
                None if rest.starts_with(' ') => (Vec::new(), rest),
                None => return None, // another family sharing the prefix
            };
            let value = value.split_whitespace().next()?.parse().ok()?;
            Some(Sample { labels, value })
        })
        .collect()
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((name.trim().to_owned(), value.trim().trim_matches('"').to_owned()))
        })
        .collect()
}

/// Sum of the samples of `metric` whose label `label` equals `value`.
pub fn sum_where(text: &str, metric: &str, label: &str, value: &str) -> f64 {
    samples(text, metric).iter().filter(|s| s.label(label) == Some(value)).map(|s| s.value).sum()
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM` is the peak resident set, `VmRSS` the
/// current one), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_kib(&text, field).with_context(|| format!("no {field} in {path}"))
}

fn parse_status_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse().ok())
}

/// The machine's load averages (`/proc/loadavg`, first three fields), to tell whether
/// other work competed with a run.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = "\
# HELP siterecovery_reconciles Reconciles started, by kind.
# TYPE siterecovery_reconciles counter
siterecovery_reconciles_total{kind=\"ProtectedServer\"} 2041
siterecovery_reconciles_total{kind=\"ReplicationPolicy\"} 37
siterecovery_reconciles_total_extra{kind=\"ProtectedServer\"} 5
siterecovery_reconcile_errors_total{kind=\"ProtectedServer\",reason=\"Kube\"} 3
siterecovery_servers 7
# EOF
";

    #[test]
    fn reads_counter_samples_by_label() {
        let m = "siterecovery_reconciles_total";
        assert_eq!(sum_where(EXPOSITION, m, "kind", "ProtectedServer"), 2041.0);
        assert_eq!(sum_where(EXPOSITION, m, "kind", "ReplicationPolicy"), 37.0);
        assert_eq!(sum_where(EXPOSITION, m, "kind", "RecoveryPlan"), 0.0, "an absent series counts as zero");
        let errors = samples(EXPOSITION, "siterecovery_reconcile_errors_total");
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].label("kind"), errors[0].label("reason")), (Some("ProtectedServer"), Some("Kube")));
        assert_eq!(samples(EXPOSITION, "siterecovery_servers"), vec![Sample { labels: vec![], value: 7.0 }]);
    }

    #[test]
    fn reads_kib_fields_of_proc_status() {
        let status = "Name:\tsiterecovery-op\nVmPeak:\t  812344 kB\nVmHWM:\t   61236 kB\nVmRSS:\t   58000 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(61236));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(58000));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
        assert!(proc_status_kib(std::process::id(), "VmHWM").unwrap() > 0, "our own peak RSS");
    }
}
