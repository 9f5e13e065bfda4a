//! `status`: tables of servers, plans and failback jobs; one object in detail; or their
//! status as JSON/YAML. Rows are built by pure functions of the objects and the time.

use anyhow::bail;
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use siterecovery_api::common::{Condition, KstatusConditions};
use siterecovery_api::plan::RunState;
use siterecovery_api::{ConditionStatus, FailbackJob, ProtectedServer, RecoveryPlan, RecoveryPointRef};

use crate::args::{Output, StatusArgs};
use crate::client::{Kube, explain};
use crate::table::{NONE, age_at, render, short};

/// Column headers of the server table.
pub const SERVER_HEADERS: [&str; 7] =
    ["NAME", "PHASE", "RPO", "LAST POINT", "PROCESS SERVER", "INITIAL SYNC", "CONDITION"];
/// Column headers of the plan table.
pub const PLAN_HEADERS: [&str; 7] = ["NAME", "OPERATION", "RUN", "STATE", "CURRENT GROUP", "PROGRESS", "MESSAGE"];
/// Column headers of the failback-job table.
pub const FAILBACK_HEADERS: [&str; 6] = ["NAME", "STEP", "STATE", "PROGRESS", "TARGET", "MESSAGE"];

const MESSAGE_WIDTH: usize = 100;

fn or_none(s: Option<impl ToString>) -> String {
    s.map(|s| s.to_string()).filter(|s| !s.is_empty()).unwrap_or_else(|| NONE.to_owned())
}

fn debug_or_none(v: Option<impl std::fmt::Debug>) -> String {
    v.map(|v| format!("{v:?}")).unwrap_or_else(|| NONE.to_owned())
}

/// The message of a kind's conditions when it is not Ready: Stalled's, else Ready's.
pub fn not_ready_message<T: KstatusConditions>(conditions: &[Condition<T>]) -> String {
    let find = |t: T| conditions.iter().find(|c| c.type_ == t);
    if find(T::READY).is_some_and(|c| c.status == ConditionStatus::True) {
        return String::new();
    }
    let stalled = find(T::STALLED).filter(|c| c.status == ConditionStatus::True);
    stalled.or(find(T::READY)).map(|c| short(&c.message, MESSAGE_WIDTH)).unwrap_or_default()
}

/// `<id> (<age>)` of a recovery point.
pub fn point_cell(p: Option<&RecoveryPointRef>, now: jiff::Timestamp) -> String {
    p.map(|p| format!("{} ({})", p.id, age_at(p.time.0, now))).unwrap_or_else(|| NONE.to_owned())
}

/// One row of the server table.
pub fn server_row(s: &ProtectedServer, now: jiff::Timestamp) -> Vec<String> {
    let st = s.status.clone().unwrap_or_default();
    let sync = st.initial_sync.as_ref().map(|p| {
        p.percent.clone().unwrap_or_else(|| {
            if p.bytes_total > 0 { format!("{}%", p.bytes_done * 100 / p.bytes_total) } else { "0%".into() }
        })
    });
    vec![
        s.name_any(),
        debug_or_none(st.phase),
        or_none(st.current_rpo),
        point_cell(st.latest_recovery_points.as_ref().and_then(|p| p.crash_consistent.as_ref()), now),
        or_none(st.process_server),
        or_none(sync),
        not_ready_message(&st.conditions),
    ]
}

/// One row of the plan table.
pub fn plan_row(p: &RecoveryPlan) -> Vec<String> {
    let st = p.status.clone().unwrap_or_default();
    let op = st.operation.as_ref();
    if let Some(requested) = &p.spec.operation {
        // The operator's run key: the run id, or the operation's name without one.
        let run = requested.run_id.clone().unwrap_or_else(|| format!("{:?}", requested.type_).to_lowercase());
        if op.is_none_or(|o| o.type_ != requested.type_ || o.run_id.as_deref() != Some(run.as_str())) {
            let (n, t) = (p.name_any(), requested.type_);
            let none = || NONE.to_owned();
            return vec![n, format!("{t:?}"), run, "Requested".into(), none(), none(), "not started yet".into()];
        }
    }
    let message = match op {
        Some(o) if o.state != RunState::Succeeded => short(o.message.as_deref().unwrap_or_default(), MESSAGE_WIDTH),
        Some(_) => String::new(),
        None => not_ready_message(&st.conditions),
    };
    vec![
        p.name_any(),
        debug_or_none(op.map(|o| o.type_)),
        or_none(op.and_then(|o| o.run_id.clone())),
        debug_or_none(op.map(|o| o.state)),
        or_none(op.and_then(|o| o.current_group.clone())),
        or_none(op.and_then(|o| o.progress.clone())),
        message,
    ]
}

/// One row of the failback-job table.
pub fn failback_row(j: &FailbackJob) -> Vec<String> {
    let st = j.status.clone().unwrap_or_default();
    vec![
        j.name_any(),
        debug_or_none(st.step),
        debug_or_none(st.state),
        or_none(st.progress),
        format!("{:?}", j.spec.target.location),
        not_ready_message(&st.conditions),
    ]
}

/// The rows of a plan's current run: one per group action and server.
pub fn plan_detail_rows(p: &RecoveryPlan) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for g in p.status.iter().flat_map(|s| &s.groups) {
        for a in &g.actions {
            rows.push(vec![
                g.name.clone(),
                format!("action/{}", a.name),
                format!("{:?}", a.state),
                NONE.into(),
                NONE.into(),
                short(a.message.as_deref().unwrap_or_default(), MESSAGE_WIDTH),
            ]);
        }
        for s in &g.servers {
            rows.push(vec![
                g.name.clone(),
                s.name.clone(),
                format!("{:?}", s.state),
                debug_or_none(s.phase),
                or_none(s.recovery_point.as_ref().map(|p| p.id.clone())),
                short(s.message.as_deref().unwrap_or_default(), MESSAGE_WIDTH),
            ]);
        }
    }
    rows
}

/// Runs `status`.
pub async fn run(kube: &Kube, args: &StatusArgs) -> anyhow::Result<()> {
    let ns = kube.namespace.as_str();
    let (servers, plans, jobs): (Api<ProtectedServer>, Api<RecoveryPlan>, Api<FailbackJob>) = if args.all_namespaces {
        (Api::all(kube.client.clone()), Api::all(kube.client.clone()), Api::all(kube.client.clone()))
    } else {
        let c = &kube.client;
        (Api::namespaced(c.clone(), ns), Api::namespaced(c.clone(), ns), Api::namespaced(c.clone(), ns))
    };
    let now = jiff::Timestamp::now();
    let Some(name) = &args.name else {
        let lp = ListParams::default();
        let where_ = if args.all_namespaces { "all namespaces".to_owned() } else { ns.to_owned() };
        let s = servers.list(&lp).await.map_err(|e| explain(e, "list", "ProtectedServers", &where_))?.items;
        let p = plans.list(&lp).await.map_err(|e| explain(e, "list", "RecoveryPlans", &where_))?.items;
        let j = jobs.list(&lp).await.map_err(|e| explain(e, "list", "FailbackJobs", &where_))?.items;
        if args.output != Output::Table {
            let all: Vec<Value> =
                s.iter().map(status_doc).chain(p.iter().map(status_doc)).chain(j.iter().map(status_doc)).collect();
            return print_doc(&Value::Array(all), args.output);
        }
        if s.is_empty() && p.is_empty() && j.is_empty() {
            eprintln!("No ProtectedServers, RecoveryPlans or FailbackJobs in {where_}.");
            return Ok(());
        }
        print!("{}", tables(&s, &p, &j, args.all_namespaces, now));
        return Ok(());
    };
    if let Some(s) =
        servers.get_opt(name).await.map_err(|e| explain(e, "get", &format!("ProtectedServer {name}"), ns))?
    {
        return show_server(&s, args.output, now);
    }
    if let Some(p) = plans.get_opt(name).await.map_err(|e| explain(e, "get", &format!("RecoveryPlan {name}"), ns))? {
        if args.output != Output::Table {
            return print_doc(&Value::Array(vec![status_doc(&p)]), args.output);
        }
        let members: Vec<String> = p.spec.groups.iter().flat_map(|g| g.servers.clone()).collect();
        let list =
            servers.list(&ListParams::default()).await.map_err(|e| explain(e, "list", "ProtectedServers", ns))?;
        let members: Vec<ProtectedServer> =
            list.items.into_iter().filter(|s| members.contains(&s.name_any())).collect();
        print!("{}", render(&PLAN_HEADERS, &[plan_row(&p)]));
        let detail = plan_detail_rows(&p);
        if !detail.is_empty() {
            println!();
            print!("{}", render(&["GROUP", "ITEM", "STATE", "PHASE", "POINT", "MESSAGE"], &detail));
        }
        if !members.is_empty() {
            println!();
            print!("{}", render(&SERVER_HEADERS, &members.iter().map(|s| server_row(s, now)).collect::<Vec<_>>()));
        }
        return Ok(());
    }
    if let Some(j) = jobs.get_opt(name).await.map_err(|e| explain(e, "get", &format!("FailbackJob {name}"), ns))? {
        if args.output != Output::Table {
            return print_doc(&Value::Array(vec![status_doc(&j)]), args.output);
        }
        print!("{}", render(&FAILBACK_HEADERS, &[failback_row(&j)]));
        print!("{}", crate::failback::failback_detail(&j));
        return Ok(());
    }
    bail!(
        "no ProtectedServer, RecoveryPlan or FailbackJob named {name} in namespace {ns} (kubectl get siterecovery -n {ns} lists them)"
    )
}

/// The three tables, each only when it has rows, separated by blank lines.
pub fn tables(
    servers: &[ProtectedServer],
    plans: &[RecoveryPlan],
    jobs: &[FailbackJob],
    with_namespace: bool,
    now: jiff::Timestamp,
) -> String {
    fn section<K: Resource>(items: &[K], headers: &[&str], row: impl Fn(&K) -> Vec<String>, ns: bool) -> String {
        if items.is_empty() {
            return String::new();
        }
        let mut h = headers.to_vec();
        if ns {
            h.insert(0, "NAMESPACE");
        }
        let rows: Vec<Vec<String>> = items
            .iter()
            .map(|i| {
                let mut r = row(i);
                if ns {
                    r.insert(0, i.meta().namespace.clone().unwrap_or_default());
                }
                r
            })
            .collect();
        render(&h, &rows)
    }
    [
        section(servers, &SERVER_HEADERS, |s| server_row(s, now), with_namespace),
        section(plans, &PLAN_HEADERS, plan_row, with_namespace),
        section(jobs, &FAILBACK_HEADERS, failback_row, with_namespace),
    ]
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect::<Vec<_>>()
    .join("\n")
}

fn show_server(s: &ProtectedServer, output: Output, now: jiff::Timestamp) -> anyhow::Result<()> {
    if output != Output::Table {
        return print_doc(&Value::Array(vec![status_doc(s)]), output);
    }
    print!("{}", render(&SERVER_HEADERS, &[server_row(s, now)]));
    let st = s.status.clone().unwrap_or_default();
    if let Some(p) = &st.progression {
        println!("\nProgression: {p}");
    }
    if let Some(points) = &st.latest_recovery_points {
        println!("\nLatest recovery points ({} retained):", or_none(points.count));
        for (label, p) in [
            ("crash-consistent", &points.crash_consistent),
            ("app-consistent", &points.app_consistent),
            ("group-consistent", &points.group_consistent),
        ] {
            println!("  {label:<17} {}", point_cell(p.as_ref(), now));
        }
    }
    if let Some(r) = &st.resync {
        let state = if r.completion_time.is_some() { "done" } else { "running" };
        println!(
            "\nResync: {:?}, {state}{}",
            r.reason,
            r.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
        );
    }
    for (label, f) in [("Test failover", &st.test_failover), ("Failover", &st.failover)] {
        if let Some(f) = f {
            println!(
                "\n{label}: {:?} {:?}{}{}",
                f.operation,
                f.state,
                f.recovery_point.as_ref().map(|p| format!(" at {}", p.id)).unwrap_or_default(),
                f.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default()
            );
            for d in &f.recovered_disks {
                println!("  {d}");
            }
        }
    }
    if !st.conditions.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = st
            .conditions
            .iter()
            .map(|c| {
                vec![
                    format!("{:?}", c.type_),
                    format!("{:?}", c.status),
                    c.reason.clone(),
                    age_at(c.last_transition_time.0, now),
                    short(&c.message, MESSAGE_WIDTH),
                ]
            })
            .collect();
        print!("{}", render(&["CONDITION", "STATUS", "REASON", "AGE", "MESSAGE"], &rows));
    }
    Ok(())
}

/// `{kind, namespace, name, status}` of an object, for `-o json|yaml`.
pub fn status_doc<K>(obj: &K) -> Value
where
    K: Resource<DynamicType = ()> + serde::Serialize,
{
    let full = serde_json::to_value(obj).unwrap_or_default();
    json!({
        "kind": K::kind(&()),
        "namespace": obj.meta().namespace,
        "name": obj.meta().name,
        "status": full.get("status").cloned().unwrap_or(Value::Null),
    })
}

/// Prints a document as JSON or YAML.
pub fn print_doc(doc: &Value, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Yaml => print!("{}", serde_yaml::to_string(doc)?),
        _ => println!("{}", serde_json::to_string_pretty(doc)?),
    }
    Ok(())
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
