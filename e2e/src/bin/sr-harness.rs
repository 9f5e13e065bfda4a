//! `sr-harness`: the parts of the test harness `make demo` uses from the shell.
//!
//! - `run-pods`: plays the kubelet for the pods of a namespace (see `siterecovery_e2e::pods`)
//!   until SIGTERM, writing the port mapping to a JSON file as pods start;
//! - `azurite-sas`: prints an account SAS for Azurite's well-known development account.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use siterecovery_e2e::pods::{PodRunner, bin_dir};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the pods matching a selector as local processes.
    RunPods {
        /// Namespace of the pods.
        #[arg(long)]
        namespace: String,
        /// Label selector.
        #[arg(long)]
        selector: String,
        /// Extra environment for every process, `NAME=value`.
        #[arg(long = "env")]
        env: Vec<String>,
        /// Where to write `{pod: {containerPort: loopbackPort}}`.
        #[arg(long)]
        ports_file: PathBuf,
        /// Directory of the binaries (default: this build's target directory).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
    },
    /// Prints an account SAS for Azurite's development account, valid for a day.
    AzuriteSas,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::AzuriteSas => println!("{}", siterecovery_e2e::fixtures::azurite_sas()),
        Cmd::RunPods { namespace, selector, env, ports_file, bin_dir: dir } => {
            let env = env
                .iter()
                .map(|e| e.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| anyhow::anyhow!("--env takes NAME=value"))?;
            let client = siterecovery_e2e::client().await?;
            let runner = PodRunner::start(client, &namespace, &selector, dir.unwrap_or_else(bin_dir), env)?;
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let mut reported = Vec::new();
            loop {
                let ports = serde_json::to_vec_pretty(&runner.ports())?;
                std::fs::write(&ports_file, &ports)?;
                for f in runner.failures().into_iter().skip(reported.len()) {
                    eprintln!("[run-pods] {f}");
                    reported.push(f);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = term.recv() => break,
                    _ = tokio::signal::ctrl_c() => break,
                }
            }
        }
    }
    Ok(())
}
