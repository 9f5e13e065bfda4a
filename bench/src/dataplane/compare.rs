//! Rows of a benchmark against a peer tool: our figure, the peer's figure on the same
//! work in the same run, their ratio, and the goal (on our figure or on the ratio).
//! Printed as a table and written as JSON (`target/bench/results.json`).

use serde_json::{Value, json};

use crate::report::{Goal, aligned, number, verdict};

/// How two figures compare.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ratio {
    /// Durations: the peer's over ours, "how many times faster we are".
    Speedup,
    /// Everything else: ours over the peer's.
    OursOverPeer,
}

/// What a goal judges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Judge {
    /// Our figure.
    Ours(Goal),
    /// The ratio.
    Ratio(Goal),
}

/// One compared figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Cmp {
    /// Stable snake_case key.
    pub metric: String,
    /// Unit of both figures.
    pub unit: &'static str,
    /// Our figure (`None`: not measured; the run says why).
    pub ours: Option<f64>,
    /// The peer's name and figure, when the metric has a peer.
    pub peer: Option<(String, Option<f64>)>,
    /// How the ratio is formed.
    pub ratio: Ratio,
    /// The goal, if any.
    pub goal: Option<Judge>,
}

impl Cmp {
    /// A figure of ours alone.
    pub fn ours(metric: impl Into<String>, unit: &'static str, ours: Option<f64>) -> Self {
        Self { metric: metric.into(), unit, ours, peer: None, ratio: Ratio::OursOverPeer, goal: None }
    }

    /// Beside a peer's figure.
    pub fn vs(mut self, peer: &str, value: Option<f64>, ratio: Ratio) -> Self {
        self.peer = Some((peer.to_owned(), value));
        self.ratio = ratio;
        self
    }

    /// With a goal.
    pub fn goal(mut self, judge: Judge) -> Self {
        self.goal = Some(judge);
        self
    }

    /// The ratio, when both figures exist and the divisor is not zero.
    pub fn ratio_value(&self) -> Option<f64> {
        let (ours, peer) = (self.ours?, self.peer.as_ref()?.1?);
        let (num, den) = match self.ratio {
            Ratio::Speedup => (peer, ours),
            Ratio::OursOverPeer => (ours, peer),
        };
        (den > 0.0).then(|| num / den)
    }

    /// Whether the goal is met: `None` without a goal, `Some(false)` when unmeasured.
    pub fn met(&self) -> Option<bool> {
        Some(match self.goal? {
            Judge::Ours(g) => self.ours.is_some_and(|v| g.met_by(v)),
            Judge::Ratio(g) => self.ratio_value().is_some_and(|v| g.met_by(v)),
        })
    }

    fn ratio_text(&self) -> String {
        match (self.ratio_value(), self.ratio) {
            (Some(r), Ratio::Speedup) => format!("{}x faster", number(round3(r))),
            (Some(r), Ratio::OursOverPeer) => format!("{}x", number(round3(r))),
            (None, _) if self.peer.is_some() => "n/a".into(),
            (None, _) => String::new(),
        }
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Some(Judge::Ours(g)) => g.text(),
            Some(Judge::Ratio(g)) => format!("ratio {}", g.text()),
            None => String::new(),
        }
    }
}

fn round3(v: f64) -> f64 {
    if v.abs() >= 100.0 { v.round() } else { v }
}

fn cell(v: Option<f64>) -> String {
    v.map(|v| number(round3(v))).unwrap_or_else(|| "n/a".into())
}

/// The rows as an aligned text table.
pub fn table(rows: &[Cmp]) -> String {
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.metric.clone(),
                cell(r.ours),
                r.peer.as_ref().map(|p| p.0.clone()).unwrap_or_default(),
                r.peer.as_ref().map(|p| cell(p.1)).unwrap_or_default(),
                r.ratio_text(),
                r.unit.to_owned(),
                r.goal_text(),
                verdict(r.met()).into(),
            ]
        })
        .collect();
    aligned(["metric", "ours", "peer", "peer value", "ratio", "unit", "goal", ""], &cells, &[1, 3])
}

/// The JSON document: `context` and one object per row with `metric`, `unit`, `ours`,
/// `peer`, `peer_value`, `ratio`, `ratio_kind`, `goal` and `met`.
pub fn json(benchmark: &str, context: Value, rows: &[Cmp]) -> Value {
    let results: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "metric": r.metric,
                "unit": r.unit,
                "ours": r.ours,
                "peer": r.peer.as_ref().map(|p| p.0.clone()),
                "peer_value": r.peer.as_ref().and_then(|p| p.1),
                "ratio": r.ratio_value(),
                "ratio_kind": r.peer.as_ref().map(|_| match r.ratio {
                    Ratio::Speedup => "peer/ours (times faster)",
                    Ratio::OursOverPeer => "ours/peer",
                }),
                "goal": if r.goal.is_some() { Value::String(r.goal_text()) } else { Value::Null },
                "met": r.met(),
            })
        })
        .collect();
    json!({"benchmark": benchmark, "context": context, "results": results})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speedups_and_goals_on_ratio_or_value() {
        let fast = Cmp::ours("initial", "s", Some(10.0))
            .vs("restic", Some(25.0), Ratio::Speedup)
            .goal(Judge::Ratio(Goal::AtLeast(2.0)));
        assert_eq!(fast.ratio_value(), Some(2.5));
        assert_eq!(fast.met(), Some(true));
        let bytes = Cmp::ours("wire", "MiB", Some(30.0))
            .vs("changed, zstd", Some(20.0), Ratio::OursOverPeer)
            .goal(Judge::Ratio(Goal::AtMost(1.1)));
        assert_eq!(bytes.ratio_value(), Some(1.5));
        assert_eq!(bytes.met(), Some(false));
        let rpo = Cmp::ours("rpo_p99", "s", None).goal(Judge::Ours(Goal::AtMost(10.0)));
        assert_eq!(rpo.met(), Some(false), "unmeasured misses");
        let peerless = Cmp::ours("x", "s", Some(1.0)).vs("restic", None, Ratio::Speedup);
        assert_eq!((peerless.ratio_value(), peerless.met()), (None, None));
    }

    #[test]
    fn table_and_json_carry_both_figures() {
        let rows = vec![
            Cmp::ours("initial", "s", Some(10.0))
                .vs("restic", Some(25.0), Ratio::Speedup)
                .goal(Judge::Ratio(Goal::AtLeast(2.0))),
            Cmp::ours("rpo_p99", "s", Some(12.0)).goal(Judge::Ours(Goal::AtMost(10.0))),
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("initial") && lines[1].contains("2.5x faster") && lines[1].ends_with("ok"));
        assert!(lines[2].contains("<= 10") && lines[2].ends_with("MISSED"), "{text}");
        let doc = json("dataplane", json!({}), &rows);
        assert_eq!(doc["results"][0]["peer_value"], 25.0);
        assert_eq!(doc["results"][0]["ratio"], 2.5);
        assert_eq!(doc["results"][0]["goal"], "ratio >= 2");
        assert_eq!(doc["results"][1]["met"], false);
        assert_eq!(doc["results"][1]["peer"], Value::Null);
    }
}
