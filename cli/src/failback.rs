//! `reprotect` and `failback`: create or update a FailbackJob. Its source (plan or
//! servers) and target are immutable; the cut-over is what these commands change.

use anyhow::bail;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use siterecovery_api::failback::CutoverMode;
use siterecovery_api::field_manager::CLI;
use siterecovery_api::{FailbackJob, ProtectedServer, RecoveryPlan};

use crate::args::{CutoverArg, FailbackArgs, FailbackSource, ReprotectArgs};
use crate::client::{Kube, explain};
use crate::table::{NONE, bytes, render, short};
use crate::wait::{FailbackGoal, Hint, Outcome, failback_view, follow};

/// A new FailbackJob back to the original location.
pub fn new_job(name: &str, source: &FailbackSource, cutover: CutoverMode) -> Value {
    let mut spec = json!({
        "target": {"location": "OriginalLocation"},
        "cutover": {"mode": cutover},
        "reEnableReplication": !source.no_re_enable,
    });
    match &source.plan {
        Some(plan) => spec["planRef"] = json!({"name": plan}),
        None => spec["servers"] = json!(source.servers),
    }
    json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "FailbackJob", "metadata": {"name": name}, "spec": spec})
}

/// The merge patch that approves the cut-over of a job.
pub fn approve_cutover_patch() -> Value {
    json!({"spec": {"cutover": {"approved": true}}})
}

/// The job name `reprotect` uses: `--name`, else the plan's or the single server's name.
pub fn job_name(name: Option<&str>, source: &FailbackSource) -> Result<String, String> {
    if let Some(n) = name {
        return Ok(n.to_owned());
    }
    match (&source.plan, source.servers.as_slice()) {
        (Some(p), _) => Ok(p.clone()),
        (None, [one]) => Ok(one.clone()),
        (None, []) => Err("say what to fail back: --plan PLAN or --server SERVER (repeatable)".into()),
        (None, _) => Err("several servers: name the FailbackJob with --name".into()),
    }
}

/// Whether an existing job fails back what `source` names (its source is immutable).
pub fn same_source(job: &FailbackJob, source: &FailbackSource) -> bool {
    match &source.plan {
        Some(p) => job.spec.plan_ref.as_ref().is_some_and(|r| &r.name == p),
        None if source.servers.is_empty() => true,
        None => {
            let mut want = source.servers.clone();
            let mut have = job.spec.servers.clone().unwrap_or_default();
            want.sort();
            have.sort();
            want == have
        }
    }
}

fn describe_source(job: &FailbackJob) -> String {
    match (&job.spec.plan_ref, &job.spec.servers) {
        (Some(p), _) => format!("plan {}", p.name),
        (None, Some(s)) => format!("servers {}", s.join(", ")),
        _ => "nothing".into(),
    }
}

/// Checks that the plan or servers a new job names exist, so a typo fails here rather
/// than as a Stalled job.
async fn check_source(kube: &Kube, source: &FailbackSource) -> anyhow::Result<()> {
    let ns = &kube.namespace;
    if let Some(plan) = &source.plan {
        Api::<RecoveryPlan>::namespaced(kube.client.clone(), ns)
            .get(plan)
            .await
            .map_err(|e| explain(e, "get", &format!("RecoveryPlan {plan}"), ns))?;
    }
    let servers: Api<ProtectedServer> = Api::namespaced(kube.client.clone(), ns);
    for s in &source.servers {
        servers.get(s).await.map_err(|e| explain(e, "get", &format!("ProtectedServer {s}"), ns))?;
    }
    Ok(())
}

/// Runs `reprotect`: creates the job (or updates its cut-over mode) and waits until
/// reverse replication is in sync.
pub async fn reprotect(kube: &Kube, args: &ReprotectArgs, hint: &Hint) -> anyhow::Result<Outcome> {
    let ns = &kube.namespace;
    let name = job_name(args.name.as_deref(), &args.source).map_err(anyhow::Error::msg)?;
    let api: Api<FailbackJob> = Api::namespaced(kube.client.clone(), ns);
    let what = format!("FailbackJob {name}");
    let mode = match args.cutover {
        CutoverArg::Manual => CutoverMode::Manual,
        CutoverArg::Automatic => CutoverMode::Automatic,
    };
    let job = match api.get_opt(&name).await.map_err(|e| explain(e, "get", &what, ns))? {
        Some(existing) => {
            if !same_source(&existing, &args.source) {
                bail!(
                    "{what} already exists for {}; a job's source cannot change: pick another --name, or delete it \
                     (kubectl delete failbackjob {name} -n {ns})",
                    describe_source(&existing)
                );
            }
            let patch = json!({"spec": {"cutover": {"mode": mode}}});
            let job = api
                .patch(&name, &PatchParams::apply(CLI), &Patch::Merge(&patch))
                .await
                .map_err(|e| explain(e, "patch", &what, ns))?;
            println!("{what} exists ({}); cut-over {mode:?}", describe_source(&job));
            job
        }
        None => {
            if args.source.plan.is_none() && args.source.servers.is_empty() {
                bail!("{what} does not exist; to create it say what to fail back: --plan PLAN or --server SERVER");
            }
            check_source(kube, &args.source).await?;
            let obj: FailbackJob = serde_json::from_value(new_job(&name, &args.source, mode))?;
            let job = api
                .create(&PostParams { field_manager: Some(CLI.into()), ..Default::default() }, &obj)
                .await
                .map_err(|e| explain(e, "create", &what, ns))?;
            println!("{what} created: reprotect {} (cut-over {mode:?})", describe_source(&job));
            job
        }
    };
    if !args.wait.enabled() {
        println!("follow it with: {}", hint.cmd(&format!("status {name}")));
        return Ok(Outcome::Succeeded);
    }
    let generation = job.metadata.generation;
    follow(&api, &name, args.wait.timeout, hint, |j| failback_view(j, generation, FailbackGoal::InSync, hint)).await
}

/// Runs `failback`: approves the cut-over of an existing job, or creates one that cuts
/// over as soon as it is in sync; waits until the servers are back on-prem.
pub async fn failback(kube: &Kube, args: &FailbackArgs, hint: &Hint) -> anyhow::Result<Outcome> {
    let ns = &kube.namespace;
    let name = &args.job;
    let what = format!("FailbackJob {name}");
    let api: Api<FailbackJob> = Api::namespaced(kube.client.clone(), ns);
    let job = match api.get_opt(name).await.map_err(|e| explain(e, "get", &what, ns))? {
        Some(existing) => {
            if (args.source.plan.is_some() || !args.source.servers.is_empty()) && !same_source(&existing, &args.source)
            {
                bail!("{what} fails back {}, not what --plan/--server name", describe_source(&existing));
            }
            let job = api
                .patch(name, &PatchParams::apply(CLI), &Patch::Merge(&approve_cutover_patch()))
                .await
                .map_err(|e| explain(e, "patch", &what, ns))?;
            println!("{what}: cut-over approved");
            job
        }
        None => {
            if args.source.plan.is_none() && args.source.servers.is_empty() {
                bail!(
                    "{what} not found in namespace {ns}; start with {} or create it with --plan PLAN or --server SERVER",
                    hint.cmd(&format!("reprotect --plan PLAN --name {name}"))
                );
            }
            check_source(kube, &args.source).await?;
            let obj: FailbackJob = serde_json::from_value(new_job(name, &args.source, CutoverMode::Automatic))?;
            let job = api
                .create(&PostParams { field_manager: Some(CLI.into()), ..Default::default() }, &obj)
                .await
                .map_err(|e| explain(e, "create", &what, ns))?;
            println!("{what} created: fail back {} (cut-over Automatic)", describe_source(&job));
            job
        }
    };
    if !args.wait.enabled() {
        println!("follow it with: {}", hint.cmd(&format!("status {name}")));
        return Ok(Outcome::Succeeded);
    }
    let generation = job.metadata.generation;
    follow(&api, name, args.wait.timeout, hint, |j| failback_view(j, generation, FailbackGoal::Done, hint)).await
}

/// Per-server lines of a job for `status JOB`.
pub fn failback_detail(j: &FailbackJob) -> String {
    let Some(st) = &j.status else { return String::new() };
    if st.servers.is_empty() {
        return String::new();
    }
    let rows: Vec<Vec<String>> = st
        .servers
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format!("{:?}", s.step),
                format!("{:?}", s.state),
                s.progress.as_ref().and_then(|p| p.percent.clone()).unwrap_or_else(|| NONE.into()),
                s.bytes_sent.map(|b| bytes(b.max(0) as u64)).unwrap_or_else(|| NONE.into()),
                short(s.message.as_deref().unwrap_or_default(), 100),
            ]
        })
        .collect();
    format!("\n{}", render(&["SERVER", "STEP", "STATE", "PROGRESS", "SENT", "MESSAGE"], &rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(plan: Option<&str>, servers: &[&str]) -> FailbackSource {
        FailbackSource {
            plan: plan.map(Into::into),
            servers: servers.iter().map(|s| s.to_string()).collect(),
            no_re_enable: false,
        }
    }

    #[test]
    fn a_new_job_fails_back_to_the_original_location() {
        assert_eq!(
            new_job("dr", &source(Some("dr"), &[]), CutoverMode::Manual),
            json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "FailbackJob", "metadata": {"name": "dr"},
                   "spec": {"planRef": {"name": "dr"}, "target": {"location": "OriginalLocation"},
                            "cutover": {"mode": "Manual"}, "reEnableReplication": true}})
        );
        let mut s = source(None, &["db-01", "app-01"]);
        s.no_re_enable = true;
        let job = new_job("two", &s, CutoverMode::Automatic);
        assert_eq!(job["spec"]["servers"], json!(["db-01", "app-01"]));
        assert_eq!(job["spec"]["cutover"], json!({"mode": "Automatic"}));
        assert_eq!(job["spec"]["reEnableReplication"], json!(false));
        serde_json::from_value::<FailbackJob>(job).unwrap();
        assert_eq!(approve_cutover_patch(), json!({"spec": {"cutover": {"approved": true}}}));
    }

    #[test]
    fn job_names_default_to_the_plan_or_the_single_server() {
        assert_eq!(job_name(None, &source(Some("dr"), &[])).unwrap(), "dr");
        assert_eq!(job_name(None, &source(None, &["db-01"])).unwrap(), "db-01");
        assert_eq!(job_name(Some("x"), &source(None, &["a", "b"])).unwrap(), "x");
        assert!(job_name(None, &source(None, &["a", "b"])).unwrap_err().contains("--name"));
        assert!(job_name(None, &source(None, &[])).unwrap_err().contains("--plan PLAN or --server"));
    }

    #[test]
    fn an_existing_jobs_source_must_match() {
        let job: FailbackJob =
            serde_json::from_value(new_job("j", &source(None, &["a", "b"]), CutoverMode::Manual)).unwrap();
        assert!(same_source(&job, &source(None, &["b", "a"])));
        assert!(same_source(&job, &source(None, &[])));
        assert!(!same_source(&job, &source(None, &["a"])));
        assert!(!same_source(&job, &source(Some("a"), &[])));
    }
}
