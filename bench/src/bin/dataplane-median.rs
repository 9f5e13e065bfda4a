//! Merges several `results.json` of the `dataplane` binary into one: medians of the
//! figures and of the runs' ratios, goals judged on them (`hack/bench-dataplane.sh` with
//! `BENCH_DP_REPEAT`; docs/benchmarks.md).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use siterecovery_bench::dataplane::median;
use siterecovery_bench::report::write_json;

/// Merge data-plane benchmark runs.
#[derive(Debug, Parser)]
struct Args {
    /// Where to write the merged results.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// The runs' results files.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runs = args
        .runs
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<serde_json::Value>>>()?;
    let doc = median::merge(&runs)?;
    print!("{}", median::table(&doc));
    write_json(&args.out, &doc)?;
    eprintln!("[dataplane] medians of {} runs written to {}", runs.len(), args.out.display());
    Ok(())
}
