//! Several runs of the data-plane benchmark (`BENCH_DP_REPEAT`) made into one result: per
//! metric the median of our figure, of the peer's and of the runs' ratios, the goal judged
//! on those medians, and in how many runs it was met. The ratio's median is taken over
//! the runs' own ratios: each run measures us and the peer on the same machine within
//! minutes, so what drifts between runs (this machine's speed did by a third within an
//! hour) cancels out of it.

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::report::{Goal, aligned, number, verdict};

/// The merged document of `runs` (each a `results.json` of the `dataplane` binary): one
/// row per metric of the first run, with `runs` (that measured our figure), `runs_met`
/// and the ranges of the figures beside the medians; the context keeps every run's.
pub fn merge(runs: &[Value]) -> anyhow::Result<Value> {
    anyhow::ensure!(!runs.is_empty(), "no runs to merge");
    let first = runs[0]["results"].as_array().context("the first run has no results")?;
    let rows: Vec<Value> = first.iter().map(|row| merged(row, runs)).collect();
    let contexts: Vec<Value> = runs.iter().map(|r| r["context"].clone()).collect();
    Ok(json!({
        "benchmark": "dataplane",
        "context": {"merged": "median of the runs' figures and of their ratios", "runs": contexts},
        "results": rows,
    }))
}

/// `row` of the first run, merged with the same metric's rows in all of `runs`.
fn merged(row: &Value, runs: &[Value]) -> Value {
    let metric = &row["metric"];
    let same: Vec<&Value> =
        runs.iter().filter_map(|r| r["results"].as_array()?.iter().find(|x| &x["metric"] == metric)).collect();
    let figures = |key: &str| -> Vec<f64> { same.iter().filter_map(|x| x[key].as_f64()).collect() };
    let (ours, peer, ratio) = (median(figures("ours")), median(figures("peer_value")), median(figures("ratio")));
    let goal = row["goal"].as_str();
    let met = goal.map(|g| {
        let (on, g) = match g.strip_prefix("ratio ") {
            Some(g) => (ratio, g),
            None => (ours, g),
        };
        Goal::parse(g).zip(on).is_some_and(|(g, v)| g.met_by(v))
    });
    json!({
        "metric": metric,
        "unit": row["unit"],
        "ours": ours,
        "ours_range": range(&figures("ours")),
        "peer": row["peer"],
        "peer_value": peer,
        "ratio": ratio,
        "ratio_range": range(&figures("ratio")),
        "ratio_kind": row["ratio_kind"],
        "goal": row["goal"],
        "met": met,
        "runs": figures("ours").len(),
        "runs_met": goal.map(|_| same.iter().filter(|x| x["met"] == Value::Bool(true)).count()),
    })
}

/// The median (the mean of the middle two of an even count).
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The lowest and highest of `v`.
fn range(v: &[f64]) -> Option<[f64; 2]> {
    let lo = v.iter().copied().reduce(f64::min)?;
    Some([lo, v.iter().copied().fold(lo, f64::max)])
}

/// The merged rows as a table: medians, the ratios' range, the goal judged on the
/// medians, and the runs that met it.
pub fn table(doc: &Value) -> String {
    let no_rows = Vec::new();
    let rows = doc["results"].as_array().unwrap_or(&no_rows);
    let cell = |v: &Value| v.as_f64().map(number).unwrap_or_default();
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let span = r["ratio_range"].as_array().map(|a| format!("{}–{}", cell(&a[0]), cell(&a[1])));
            let runs = match r["runs_met"].as_u64() {
                Some(k) => format!("{k}/{} runs", r["runs"]),
                None => format!("{} runs", r["runs"]),
            };
            [
                r["metric"].as_str().unwrap_or_default().to_owned(),
                cell(&r["ours"]),
                cell(&r["peer_value"]),
                r["ratio"].as_f64().map(|x| format!("{}x", number(x))).unwrap_or_default(),
                span.unwrap_or_default(),
                r["unit"].as_str().unwrap_or_default().to_owned(),
                r["goal"].as_str().map(|g| format!("{g}: {}", verdict(r["met"].as_bool()))).unwrap_or_default(),
                runs,
            ]
        })
        .collect();
    aligned(["metric (medians)", "ours", "peer", "ratio", "ratios", "unit", "goal", ""], &cells, &[1, 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(initial: f64, restic: f64, rpo: Option<f64>) -> Value {
        let ratio = restic / initial;
        json!({"context": {"date": "d"}, "results": [
            {"metric": "initial", "unit": "s", "ours": initial, "peer": "restic", "peer_value": restic,
             "ratio": ratio, "ratio_kind": "peer/ours (times faster)", "goal": "ratio >= 2", "met": ratio >= 2.0},
            {"metric": "rpo_p99", "unit": "s", "ours": rpo, "peer": null, "peer_value": null, "ratio": null,
             "ratio_kind": null, "goal": "<= 10", "met": rpo.is_some_and(|r| r <= 10.0)},
        ]})
    }

    #[test]
    fn goals_are_judged_on_the_median_of_the_runs_ratios() {
        // Ratios 1.8, 2.2, 2.5: the median meets 2×, as two runs of three did.
        let doc = merge(&[run(5.0, 9.0, Some(5.0)), run(5.0, 11.0, None), run(4.0, 10.0, Some(12.0))]).unwrap();
        let initial = &doc["results"][0];
        assert_eq!(initial["ratio"].as_f64(), Some(2.2));
        assert_eq!(initial["ours"].as_f64(), Some(5.0));
        assert_eq!(initial["met"], json!(true));
        assert_eq!((initial["runs"].clone(), initial["runs_met"].clone()), (json!(3), json!(2)));
        assert_eq!(initial["ratio_range"], json!([1.8, 2.5]));
        // A figure measured in two runs of three: the median of those two.
        let rpo = &doc["results"][1];
        assert_eq!((rpo["ours"].as_f64(), rpo["met"].clone()), (Some(8.5), json!(true)));
        assert_eq!((rpo["runs"].clone(), rpo["runs_met"].clone()), (json!(2), json!(1)));
        let text = table(&doc);
        assert!(text.contains("ratio >= 2: ok") && text.contains("2/3 runs"), "{text}");
        assert_eq!(doc["context"]["runs"].as_array().map(Vec::len), Some(3));
    }

    #[test]
    fn goal_text_parses_back() {
        for g in [Goal::AtMost(10.0), Goal::Below(0.5), Goal::AtLeast(2.0)] {
            assert_eq!(Goal::parse(&g.text()), Some(g));
        }
        assert_eq!(Goal::parse("about 3"), None);
    }
}
