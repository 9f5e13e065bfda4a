//! Writes one YAML file per CustomResourceDefinition, generated from the Rust types.
//!
//! `crdgen --out crds --out charts/siterecovery/crds` regenerates them (`make generate`);
//! `crdgen --check ...` exits non-zero, naming the stale files, when the committed YAML
//! differs from what the types generate.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use siterecovery_operator::crdgen;

#[derive(Parser)]
#[command(about = "Generate the siterecovery.io CRD manifests")]
struct Args {
    /// Directory to write to (repeatable).
    #[arg(long = "out", required = true)]
    out: Vec<PathBuf>,
    /// Compare instead of writing; fail when a file is missing or differs.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.check {
        let mut stale = Vec::new();
        for dir in &args.out {
            stale.extend(crdgen::stale_files(dir)?);
        }
        if !stale.is_empty() {
            bail!("generated CRDs are stale (run `make generate`): {}", stale.join(", "));
        }
        return Ok(());
    }
    for dir in &args.out {
        std::fs::create_dir_all(dir)?;
        for (file, yaml) in crdgen::render_all()? {
            let path = dir.join(file);
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}
