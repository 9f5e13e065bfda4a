//! `kubectl siterecovery`: the kubectl plugin of Site Recovery for Kubernetes. It only
//! reads and edits siterecovery.io resources (and, for `register` and `points`, the
//! Secrets they name) through the Kubernetes API, so everything it does is also possible
//! with `kubectl apply`. See docs/cli.md.

mod args;
mod client;
mod commands;
mod failback;
mod operation;
mod points;
mod register;
mod status;
mod table;
mod wait;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};
use siterecovery_api::plan::PlanOperationType as Op;

use crate::args::{Cli, Command};
use crate::client::Kube;
use crate::commands::{Request, approve, plan_operation, resync};
use crate::wait::{Hint, Outcome};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completion(c) = &cli.command {
        let mut script = Vec::new();
        clap_complete::generate(c.shell, &mut Cli::command(), "kubectl-siterecovery", &mut script);
        // A closed pipe (`| head`) is not an error worth a panic.
        let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let kube = Kube::connect(&cli.global).await?;
    let hint = Hint::new(&kube.namespace, cli.global.context.as_deref());
    let plan_op = |plan, type_, point, skip_source_shutdown| Request { plan, type_, point, skip_source_shutdown };
    match &cli.command {
        Command::Status(a) => status::run(&kube, a).await.map(|()| Outcome::Succeeded),
        Command::Points(a) => points::run(&kube, a).await.map(|()| Outcome::Succeeded),
        Command::Register(a) => register::run(&kube, a).await.map(|()| Outcome::Succeeded),
        Command::TestFailover(a) => {
            plan_operation(&kube, plan_op(&a.plan, Op::TestFailover, Some(&a.point), false), &hint).await
        }
        Command::Cleanup(a) => plan_operation(&kube, plan_op(a, Op::TestFailoverCleanup, None, false), &hint).await,
        Command::Failover(a) => {
            let type_ = if a.planned { Op::PlannedFailover } else { Op::UnplannedFailover };
            plan_operation(&kube, plan_op(&a.plan, type_, Some(&a.point), a.skip_source_shutdown), &hint).await
        }
        Command::ChangePoint(a) => {
            plan_operation(&kube, plan_op(&a.plan, Op::ChangeRecoveryPoint, Some(&a.point), false), &hint).await
        }
        Command::Commit(a) => plan_operation(&kube, plan_op(a, Op::Commit, None, false), &hint).await,
        Command::Approve(a) => approve(&kube, a, &hint).await,
        Command::Reprotect(a) => failback::reprotect(&kube, a, &hint).await,
        Command::Failback(a) => failback::failback(&kube, a, &hint).await,
        Command::Resync(a) => resync(&kube, a, &hint).await,
        Command::Completion(_) => unreachable!("handled before connecting"),
    }
}
