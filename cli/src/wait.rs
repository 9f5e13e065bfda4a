//! `--wait`: follow a plan run, a failback job or a resync until it ends, stops at a
//! manual gate, or the timeout passes. What each poll shows is a pure function of the
//! object ([`plan_view`], [`failback_view`], [`resync_view`]).

use std::io::IsTerminal as _;
use std::time::Duration;

use kube::api::Api;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use siterecovery_api::failback::{FailbackConditionType, FailbackStep};
use siterecovery_api::plan::{PlanConditionType, PlanOperationType, RunState};
use siterecovery_api::{ConditionStatus, FailbackJob, ProtectedServer, RecoveryPlan};

/// How a followed operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded (or reached what was waited for).
    Succeeded,
    /// It failed or partially succeeded.
    Failed,
    /// `--timeout` passed first; the operation goes on.
    TimedOut,
    /// It stopped at a manual gate.
    Gate,
}

impl Outcome {
    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Succeeded => 0,
            Outcome::Failed => 1,
            Outcome::TimedOut => 2,
            Outcome::Gate => 3,
        }
    }
}

/// What one look at the object shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// Still going: a one-line summary.
    Progress(String),
    /// Over (for this command): the outcome and what to tell the user.
    End(Outcome, String),
}

/// How to spell a follow-up command: `-n <ns>` and `--context` as given.
#[derive(Debug, Clone)]
pub struct Hint {
    /// ` -n <ns>[ --context <c>]`, appended to printed commands.
    pub suffix: String,
}

impl Hint {
    /// For namespace `ns` and the optional context.
    pub fn new(ns: &str, context: Option<&str>) -> Self {
        let mut suffix = format!(" -n {ns}");
        if let Some(c) = context {
            suffix.push_str(&format!(" --context {c}"));
        }
        Self { suffix }
    }

    /// `kubectl siterecovery <args> -n <ns>`.
    pub fn cmd(&self, args: &str) -> String {
        format!("kubectl siterecovery {args}{}", self.suffix)
    }
}

/// The run a plan command waits for.
#[derive(Debug, Clone)]
pub struct PlanRun {
    /// Operation type.
    pub type_: PlanOperationType,
    /// Run id.
    pub run_id: String,
    /// `metadata.generation` after the request was recorded; older status is stale.
    pub generation: Option<i64>,
}

fn stale(observed: Option<i64>, wanted: Option<i64>) -> bool {
    matches!((observed, wanted), (Some(o), Some(w)) if o < w) || (observed.is_none() && wanted.is_some())
}

/// What a plan shows about `run`.
pub fn plan_view(p: &RecoveryPlan, run: &PlanRun, hint: &Hint) -> View {
    let name = p.name_any();
    let st = p.status.clone().unwrap_or_default();
    let label = format!("{:?} {}", run.type_, run.run_id);
    let current = st.operation.as_ref().filter(|o| o.type_ == run.type_ && o.run_id.as_deref() == Some(&run.run_id));
    let Some(op) = current.filter(|_| !stale(st.observed_generation, run.generation)) else {
        return View::Progress(format!("{label}: waiting for the operator to start the run"));
    };
    let message = op.message.clone().unwrap_or_default();
    match op.state {
        RunState::Succeeded => {
            View::End(Outcome::Succeeded, format!("{label} of RecoveryPlan {name} succeeded: {message}"))
        }
        RunState::Failed | RunState::PartiallySucceeded | RunState::Skipped => {
            let mut text = format!("{label} of RecoveryPlan {name} {}: {message}", state_word(op.state));
            for g in &st.groups {
                for s in g.servers.iter().filter(|s| s.state == RunState::Failed) {
                    text.push_str(&format!("\n  {}/{}: {}", g.name, s.name, s.message.as_deref().unwrap_or("failed")));
                }
                for a in g.actions.iter().filter(|a| a.state == RunState::Failed) {
                    text.push_str(&format!("\n  {}/{}: {}", g.name, a.name, a.message.as_deref().unwrap_or("failed")));
                }
            }
            text.push_str(&format!("\n  details: {}", hint.cmd(&format!("status {name}"))));
            View::End(Outcome::Failed, text)
        }
        RunState::WaitingForApproval => {
            let (gate, instructions) = waiting_gate(p);
            View::End(
                Outcome::Gate,
                format!(
                    "{label} of RecoveryPlan {name} is waiting for approval of {gate}{}\n  approve with: {}",
                    if instructions.is_empty() { String::new() } else { format!(": {instructions}") },
                    hint.cmd(&format!("approve {name} {gate}"))
                ),
            )
        }
        RunState::Pending | RunState::Running => {
            let mut line = format!("{label}: {:?}", op.state);
            if let Some(g) = &op.current_group {
                line.push_str(&format!(", group {g}"));
            }
            if let Some(progress) = &op.progress {
                line.push_str(&format!(", {progress} servers done"));
            }
            let busy: Vec<String> = st
                .groups
                .iter()
                .filter(|g| Some(&g.name) == op.current_group.as_ref())
                .flat_map(|g| {
                    let actions = g
                        .actions
                        .iter()
                        .filter(|a| a.state == RunState::Running)
                        .map(|a| format!("{} {:?}", a.name, a.state));
                    let servers = g.servers.iter().filter(|s| s.state != RunState::Succeeded).map(|s| {
                        format!(
                            "{} {:?}{}",
                            s.name,
                            s.state,
                            s.message.as_deref().map(|m| format!(" ({m})")).unwrap_or_default()
                        )
                    });
                    actions.chain(servers).collect::<Vec<_>>()
                })
                .collect();
            if !busy.is_empty() {
                line.push_str(&format!(": {}", busy.join(", ")));
            }
            View::Progress(line)
        }
    }
}

fn state_word(s: RunState) -> &'static str {
    match s {
        RunState::PartiallySucceeded => "partially succeeded",
        RunState::Skipped => "was skipped",
        _ => "failed",
    }
}

/// The gate a plan waits at (`<group>/<action>`) and its instructions: from the group
/// status, else from the `WaitingForApproval` condition (`<gate>: <instructions>`).
fn waiting_gate(p: &RecoveryPlan) -> (String, String) {
    let st = p.status.clone().unwrap_or_default();
    let instructions_of = |gate: &str| {
        p.spec
            .groups
            .iter()
            .flat_map(|g| g.actions.iter().flatten().map(move |a| (format!("{}/{}", g.name, a.name), a)))
            .find(|(n, _)| n == gate)
            .and_then(|(_, a)| a.manual_approval.as_ref().map(|m| m.instructions.clone()))
            .unwrap_or_default()
    };
    let from_groups = st.groups.iter().find_map(|g| {
        g.actions.iter().find(|a| a.state == RunState::WaitingForApproval).map(|a| format!("{}/{}", g.name, a.name))
    });
    if let Some(gate) = from_groups {
        let instructions = instructions_of(&gate);
        return (gate, instructions);
    }
    let cond = st
        .conditions
        .iter()
        .find(|c| c.type_ == PlanConditionType::WaitingForApproval && c.status == ConditionStatus::True);
    match cond.map(|c| c.message.clone()) {
        Some(m) => match m.split_once(": ") {
            Some((gate, instructions)) => (gate.to_owned(), instructions.to_owned()),
            None => (m, String::new()),
        },
        None => ("<group>/<action>".into(), String::new()),
    }
}

/// What a failback command waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailbackGoal {
    /// `reprotect`: reverse replication in sync (or further).
    InSync,
    /// `failback`: every step done.
    Done,
}

/// What a FailbackJob shows, for `goal`; `generation` is the job's after the request.
pub fn failback_view(j: &FailbackJob, generation: Option<i64>, goal: FailbackGoal, hint: &Hint) -> View {
    let name = j.name_any();
    let st = j.status.clone().unwrap_or_default();
    if stale(st.observed_generation, generation) {
        return View::Progress(format!("FailbackJob {name}: waiting for the operator"));
    }
    let stalled = st.conditions.iter().find(|c| {
        c.type_ == FailbackConditionType::Stalled && c.status == ConditionStatus::True && !c.message.is_empty()
    });
    let details = format!("\n  details: {}", hint.cmd(&format!("status {name}")));
    match (st.state, stalled) {
        (Some(RunState::Failed), s) | (None, s @ Some(_)) => {
            let why = s.map(|c| c.message.clone()).unwrap_or_else(|| "failed".into());
            View::End(Outcome::Failed, format!("FailbackJob {name} failed: {why}{details}"))
        }
        (Some(RunState::Succeeded), _) => {
            View::End(Outcome::Succeeded, format!("FailbackJob {name} succeeded: the servers are back on-prem"))
        }
        (Some(RunState::WaitingForApproval), _) if goal == FailbackGoal::InSync => View::End(
            Outcome::Succeeded,
            format!(
                "FailbackJob {name}: reverse replication is in sync\n  cut over to on-prem with: {}",
                hint.cmd(&format!("failback {name}"))
            ),
        ),
        (Some(RunState::WaitingForApproval), _) => View::End(
            Outcome::Gate,
            format!(
                "FailbackJob {name} is waiting for cut-over approval\n  approve with: {}",
                hint.cmd(&format!("failback {name}"))
            ),
        ),
        _ if goal == FailbackGoal::InSync && st.step.is_some_and(|s| s != FailbackStep::Reprotect) => View::End(
            Outcome::Succeeded,
            format!(
                "FailbackJob {name}: reverse replication is in sync and the cut-over has started (cutover: Automatic)"
            ),
        ),
        (state, _) => {
            let mut line = format!(
                "FailbackJob {name}: {} {}",
                st.step.map(|s| format!("{s:?}")).unwrap_or_else(|| "starting".into()),
                state.map(|s| format!("{s:?}")).unwrap_or_default()
            );
            if let Some(p) = &st.progress {
                line.push_str(&format!(", {p} servers done"));
            }
            let busy: Vec<String> = st
                .servers
                .iter()
                .filter(|s| s.state != RunState::Succeeded)
                .map(|s| {
                    let pct = s.progress.as_ref().and_then(|p| p.percent.clone());
                    format!("{} {:?}{}", s.name, s.state, pct.map(|p| format!(" {p}")).unwrap_or_default())
                })
                .collect();
            if !busy.is_empty() {
                line.push_str(&format!(": {}", busy.join(", ")));
            }
            View::Progress(line)
        }
    }
}

/// What a server shows about the resync requested with `token`.
pub fn resync_view(s: &ProtectedServer, token: &str) -> View {
    let name = s.name_any();
    let st = s.status.clone().unwrap_or_default();
    match st.resync.as_ref().filter(|r| r.token.as_deref() == Some(token)) {
        None => View::Progress(format!("{name}: waiting for the agent to start the resync")),
        Some(r) if r.completion_time.is_some() => View::End(
            Outcome::Succeeded,
            format!(
                "resync of {name} done{}",
                r.bytes_resent
                    .map(|b| format!(": {} re-sent", crate::table::bytes(b.max(0) as u64)))
                    .unwrap_or_default()
            ),
        ),
        Some(r) => {
            let pct: Vec<String> = st
                .disks
                .iter()
                .filter_map(|d| d.sync.as_ref().and_then(|p| p.percent.clone()).map(|p| format!("{} {p}", d.id)))
                .collect();
            let detail = if pct.is_empty() { r.message.clone().unwrap_or_default() } else { pct.join(", ") };
            View::Progress(format!("{name}: resynchronising ({:?}) {detail}", r.reason).trim_end().to_owned())
        }
    }
}

/// Polls `name` every second, showing each new [`View::Progress`] (a spinner on a
/// terminal, plain lines otherwise), until `view` ends it or `timeout` passes.
pub async fn follow<K, F>(api: &Api<K>, name: &str, timeout: Duration, hint: &Hint, view: F) -> anyhow::Result<Outcome>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
    F: Fn(&K) -> View,
{
    let kind = K::kind(&());
    let deadline = tokio::time::Instant::now() + timeout;
    let mut display = Display::new();
    loop {
        let obj = api.get_opt(name).await.map_err(|e| anyhow::anyhow!("reading {kind} {name}: {e}"))?;
        let Some(obj) = obj else {
            display.finish();
            anyhow::bail!("{kind} {name} was deleted while waiting for it");
        };
        match view(&obj) {
            View::End(outcome, text) => {
                display.finish();
                println!("{text}");
                return Ok(outcome);
            }
            View::Progress(line) => display.show(&line),
        }
        if tokio::time::Instant::now() >= deadline {
            display.finish();
            println!(
                "timed out after {}; it goes on in the cluster: {}",
                siterecovery_api::common::format_duration(timeout),
                hint.cmd(&format!("status {name}"))
            );
            return Ok(Outcome::TimedOut);
        }
        tokio::time::sleep(Duration::from_secs(1).min(deadline - tokio::time::Instant::now())).await;
    }
}

/// A spinner on a terminal, plain lines (each change once) otherwise.
struct Display {
    bar: Option<indicatif::ProgressBar>,
    last: String,
}

impl Display {
    fn new() -> Self {
        let bar = std::io::stdout().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stdout());
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {wide_msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self { bar, last: String::new() }
    }

    fn show(&mut self, line: &str) {
        if line == self.last {
            return;
        }
        self.last = line.to_owned();
        match &self.bar {
            Some(bar) => bar.set_message(line.to_owned()),
            None => println!("{line}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
#[path = "wait_tests.rs"]
mod tests;
