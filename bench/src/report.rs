//! A benchmark's result rows (metric, value, unit, goal): printed as a table and
//! written as JSON for tooling and for `docs/benchmarks.md`.

use std::path::Path;

use anyhow::Context as _;
use serde_json::{Value, json};

/// The target a figure should meet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    /// The value must not exceed this.
    AtMost(f64),
    /// The value must stay strictly below this.
    Below(f64),
    /// The value must reach at least this.
    AtLeast(f64),
}

impl Goal {
    /// Whether `value` meets the goal.
    pub fn met_by(self, value: f64) -> bool {
        match self {
            Goal::AtMost(limit) => value <= limit,
            Goal::Below(limit) => value < limit,
            Goal::AtLeast(limit) => value >= limit,
        }
    }

    /// The goal as text, e.g. `<= 60`.
    pub fn text(self) -> String {
        match self {
            Goal::AtMost(limit) => format!("<= {}", number(limit)),
            Goal::Below(limit) => format!("< {}", number(limit)),
            Goal::AtLeast(limit) => format!(">= {}", number(limit)),
        }
    }

    /// The goal [`Goal::text`] wrote.
    pub fn parse(text: &str) -> Option<Self> {
        let (op, limit) = text.trim().split_once(' ')?;
        let limit: f64 = limit.trim().parse().ok()?;
        match op {
            "<=" => Some(Goal::AtMost(limit)),
            "<" => Some(Goal::Below(limit)),
            ">=" => Some(Goal::AtLeast(limit)),
            _ => None,
        }
    }
}

/// One measured figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// What was measured, as a stable snake_case key.
    pub metric: &'static str,
    /// The figure; `None` when it could not be measured (the reason is printed).
    pub value: Option<f64>,
    /// Its unit (`s`, `MiB`, `1/object/min`, …).
    pub unit: &'static str,
    /// The goal from the issue, if the figure has one.
    pub goal: Option<Goal>,
}

impl Row {
    /// A figure without a goal (context for the ones that have one).
    pub fn info(metric: &'static str, value: Option<f64>, unit: &'static str) -> Self {
        Self { metric, value, unit, goal: None }
    }

    /// A figure with a goal.
    pub fn goal(metric: &'static str, value: Option<f64>, unit: &'static str, goal: Goal) -> Self {
        Self { metric, value, unit, goal: Some(goal) }
    }

    /// Whether the goal is met; `None` without a goal, `Some(false)` when unmeasured.
    pub fn met(&self) -> Option<bool> {
        self.goal.map(|g| self.value.is_some_and(|v| g.met_by(v)))
    }
}

/// The rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.metric.to_owned(),
                r.value.map(number).unwrap_or_else(|| "n/a".into()),
                r.unit.to_owned(),
                r.goal.map(Goal::text).unwrap_or_default(),
                verdict(r.met()).into(),
            ]
        })
        .collect();
    aligned(["metric", "value", "unit", "goal", ""], &cells, &[1])
}

/// `ok`, `MISSED`, or nothing for a figure without a goal.
pub fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "ok",
        Some(false) => "MISSED",
        None => "",
    }
}

/// `header` and `rows` as columns two spaces apart, the columns `right` aligned right.
pub fn aligned<const N: usize>(header: [&str; N], rows: &[[String; N]], right: &[usize]) -> String {
    let header = header.map(String::from);
    let mut widths = [0usize; N];
    for row in std::iter::once(&header).chain(rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| if right.contains(&i) { format!("{cell:>w$}") } else { format!("{cell:<w$}") })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The JSON document: `context` (when, where, with what) and one object per row with
/// `metric`, `value`, `unit`, `goal` (text such as `"<= 60"`, or null) and `met`.
pub fn json(benchmark: &str, context: Value, rows: &[Row]) -> Value {
    let results: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "metric": r.metric,
                "value": r.value,
                "unit": r.unit,
                "goal": r.goal.map(Goal::text),
                "met": r.met(),
            })
        })
        .collect();
    json!({"benchmark": benchmark, "context": context, "results": results})
}

/// Writes `doc` pretty-printed to `path`, creating its directory.
pub fn write_json(path: &Path, doc: &Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(doc)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// A figure with at most three decimals and no trailing zeros.
pub fn number(v: f64) -> String {
    let text = format!("{v:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        vec![
            Row::goal("steady_state", Some(41.25), "s", Goal::AtMost(60.0)),
            Row::goal("reconciles_per_server", Some(1.0), "1/object/min", Goal::Below(1.0)),
            Row::goal("peak_rss", None, "MiB", Goal::AtMost(150.0)),
            Row::info("create", Some(12.0), "s"),
        ]
    }

    #[test]
    fn goals_are_judged_with_their_bound() {
        let met: Vec<_> = rows().iter().map(Row::met).collect();
        assert_eq!(met, vec![Some(true), Some(false), Some(false), None], "1.0 is not below 1; unmeasured misses");
        assert!(Goal::AtMost(60.0).met_by(60.0));
        assert!(Goal::AtLeast(2.0).met_by(2.0) && !Goal::AtLeast(2.0).met_by(1.99));
    }

    #[test]
    fn table_aligns_and_marks_missed_goals() {
        let text = table(&rows());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "metric                 value  unit          goal");
        assert_eq!(lines[1], "steady_state           41.25  s             <= 60   ok");
        assert_eq!(lines[2], "reconciles_per_server      1  1/object/min  < 1     MISSED");
        assert_eq!(lines[3], "peak_rss                 n/a  MiB           <= 150  MISSED");
        assert_eq!(lines[4], "create                    12  s");
    }

    #[test]
    fn json_rows_carry_metric_value_unit_goal() {
        let doc = json("operator-scale", json!({"servers": 1000}), &rows());
        assert_eq!(doc["benchmark"], "operator-scale");
        assert_eq!(doc["context"]["servers"], 1000);
        assert_eq!(
            doc["results"][0],
            json!({"metric": "steady_state", "value": 41.25, "unit": "s", "goal": "<= 60", "met": true})
        );
        assert_eq!(doc["results"][2]["value"], Value::Null);
        assert_eq!(doc["results"][3]["goal"], Value::Null);
    }
}
