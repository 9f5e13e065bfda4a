//! Invalid objects are rejected by the API server at admission (OpenAPI + CEL), with a
//! message that names the offending field. One row per validation rule; each starts from
//! the valid sample in `examples/` and breaks exactly one thing.

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use siterecovery_e2e::{FIELD_MANAGER, TestNamespace, client, example, install_crds};

/// One edit of a valid sample.
enum Edit {
    Set(&'static str, Value),
    Remove(&'static str),
}
use Edit::{Remove, Set};

/// A row: the sample kind, the edits, and fragments the rejection message must contain
/// (the field path first).
struct Case {
    kind: &'static str,
    edits: Vec<Edit>,
    expect: &'static [&'static str],
}

fn case(kind: &'static str, edits: Vec<Edit>, expect: &'static [&'static str]) -> Case {
    Case { kind, edits, expect }
}

const POLICY: &str = "ReplicationPolicy";
const SERVER: &str = "ProtectedServer";
const PLAN: &str = "RecoveryPlan";
const FAILBACK: &str = "FailbackJob";

/// Objects rejected on create.
fn create_cases() -> Vec<Case> {
    vec![
        // ReplicationPolicy: OpenAPI.
        case(
            POLICY,
            vec![Set("/spec/crashConsistentInterval", json!("5x"))],
            &["spec.crashConsistentInterval", "should match"],
        ),
        case(POLICY, vec![Remove("/spec/target")], &["spec.target", "Required value"]),
        case(
            POLICY,
            vec![Set("/spec/compression/level", json!(25))],
            &["spec.compression.level", "less than or equal to 19"],
        ),
        case(
            POLICY,
            vec![Set("/spec/compression/algorithm", json!("Gzip"))],
            &["spec.compression.algorithm", "Unsupported value"],
        ),
        case(
            POLICY,
            vec![Set("/spec/bandwidth/windows/0/start", json!("25:00"))],
            &["spec.bandwidth.windows[0].start", "should match"],
        ),
        case(
            POLICY,
            vec![Set("/spec/bandwidth/windows/0/days", json!(["Mon", "Funday"]))],
            &["spec.bandwidth.windows[0].days[1]", "Unsupported value"],
        ),
        case(
            POLICY,
            vec![Set("/spec/bandwidth/windows/0/days", json!(["Mon", "Mon"]))],
            &["spec.bandwidth.windows[0].days[1]", "Duplicate value"],
        ),
        case(
            POLICY,
            vec![Set("/spec/target/container", json!("Bad_Name"))],
            &["spec.target.container", "should match"],
        ),
        case(
            POLICY,
            vec![Set("/spec/target/credential/workloadIdentity/clientId", json!("not-a-uuid"))],
            &["spec.target.credential.workloadIdentity.clientId", "should match"],
        ),
        case(
            POLICY,
            vec![Set("/spec/retention/thinning/1/after", json!("2h"))],
            &["spec.retention.thinning[1]", "Duplicate value"],
        ),
        // ReplicationPolicy: CEL.
        case(
            POLICY,
            vec![Set("/spec/crashConsistentInterval", json!("2h"))],
            &["spec.crashConsistentInterval", "between 1s and 1h"],
        ),
        case(
            POLICY,
            vec![Set("/spec/appConsistentInterval", json!("13h"))],
            &["spec.appConsistentInterval", "at most 12h"],
        ),
        case(
            POLICY,
            vec![Set("/spec/appConsistentInterval", json!("10s"))],
            &["spec.appConsistentInterval", "at least spec.crashConsistentInterval"],
        ),
        case(
            POLICY,
            vec![Set("/spec/retention/window", json!("10s")), Remove("/spec/retention/thinning")],
            &["spec.retention.window", "must cover"],
        ),
        case(POLICY, vec![Set("/spec/retention/window", json!("400h"))], &["spec.retention.window", "at most 360h"]),
        case(POLICY, vec![Set("/spec/rpoThreshold", json!("10s"))], &["spec.rpoThreshold", "would always fire"]),
        case(
            POLICY,
            vec![Set("/spec/retention/thinning/2/after", json!("96h"))],
            &["spec.retention.thinning", "shorter than spec.retention.window"],
        ),
        case(
            POLICY,
            vec![Set("/spec/retention/thinning/2/keepEvery", json!("30m"))],
            &["spec.retention.thinning", "must not shrink"],
        ),
        case(
            POLICY,
            vec![Set("/spec/retention/thinning/0/keepEvery", json!("10s"))],
            &["spec.retention.thinning", "keepEvery must be at least spec.crashConsistentInterval"],
        ),
        case(
            POLICY,
            vec![Set("/spec/bandwidth/windows/0/end", json!("08:00"))],
            &["spec.bandwidth.windows[0].end", "must differ from start"],
        ),
        case(
            POLICY,
            vec![Set("/spec/target/endpoint", json!("http://contosodr.blob.core.windows.net"))],
            &["spec.target.endpoint", "must use https"],
        ),
        case(
            POLICY,
            vec![Set("/spec/target/container", json!("dr--gold"))],
            &["spec.target.container", "consecutive hyphens"],
        ),
        case(
            POLICY,
            vec![Set("/spec/target/credential/secretRef", json!({"name": "sas"}))],
            &["spec.target.credential", "exactly one of secretRef or workloadIdentity"],
        ),
        case(
            POLICY,
            vec![Set("/spec/target/credential", json!({}))],
            &["spec.target.credential", "exactly one of secretRef or workloadIdentity"],
        ),
        // ProtectedServer.
        case(SERVER, vec![Set("/spec/disks", json!([]))], &["spec.disks", "at least 1 items"]),
        case(SERVER, vec![Set("/spec/disks/0/id", json!("Disk_0"))], &["spec.disks[0].id", "should match"]),
        case(SERVER, vec![Set("/spec/disks/1/id", json!("os"))], &["spec.disks[1]", "Duplicate value"]),
        case(SERVER, vec![Set("/spec/disks/0/path", json!("dev/sda"))], &["spec.disks[0].path", "should match"]),
        case(SERVER, vec![Set("/spec/agent/machineId", json!("XYZ"))], &["spec.agent.machineId", "at least 32 chars"]),
        case(
            SERVER,
            vec![Set("/spec/agent/machineId", json!("4C4C4544004D3510804BB4C04F4E3232"))],
            &["spec.agent.machineId", "should match"],
        ),
        case(SERVER, vec![Remove("/spec/policyRef")], &["spec.policyRef", "Required value"]),
        case(SERVER, vec![Set("/spec/consistencyGroup", json!("Billing"))], &["spec.consistencyGroup", "should match"]),
        case(
            SERVER,
            vec![Set("/spec/failoverTarget/local", json!({"directory": "/srv/recovered"}))],
            &["spec.failoverTarget", "exactly one of local, kubevirt or azure"],
        ),
        case(
            SERVER,
            vec![Set("/spec/failoverTarget", json!({}))],
            &["spec.failoverTarget", "exactly one of local, kubevirt or azure"],
        ),
        case(
            SERVER,
            vec![Set("/spec/failoverTarget/azure/subscriptionId", json!("prod"))],
            &["spec.failoverTarget.azure.subscriptionId", "should match"],
        ),
        case(
            SERVER,
            vec![Set("/spec/failoverTarget/azure/diskSku", json!("Ultra"))],
            &["spec.failoverTarget.azure.diskSku", "Unsupported value"],
        ),
        // RecoveryPlan.
        case(PLAN, vec![Set("/spec/groups", json!([]))], &["spec.groups", "at least 1 items"]),
        case(PLAN, vec![Set("/spec/groups/1/name", json!("database"))], &["spec.groups[1]", "Duplicate value"]),
        case(PLAN, vec![Set("/spec/groups/1/servers", json!(["web-01", "db-01"]))], &["spec.groups", "only one group"]),
        case(
            PLAN,
            vec![Set("/spec/groups/0/actions/1/job", json!({"spec": {}}))],
            &["spec.groups[0].actions[1]", "exactly one of job or manualApproval"],
        ),
        case(
            PLAN,
            vec![Set("/spec/groups/0/actions/0/when", json!("During"))],
            &["spec.groups[0].actions[0].when", "Unsupported value"],
        ),
        case(
            PLAN,
            vec![Set("/spec/operation", json!({"type": "Failover"}))],
            &["spec.operation.type", "Unsupported value"],
        ),
        case(
            PLAN,
            vec![Set("/spec/operation", json!({"type": "TestFailover", "recoveryPoint": {"selector": "Named"}}))],
            &["spec.operation.recoveryPoint.pointName", "required with selector Named"],
        ),
        case(
            PLAN,
            vec![Set(
                "/spec/operation",
                json!({"type": "TestFailover", "recoveryPoint": {"selector": "Latest", "pointName": "cc-1"}}),
            )],
            &["spec.operation.recoveryPoint.pointName", "allowed only with it"],
        ),
        case(
            PLAN,
            vec![Set(
                "/spec/operation",
                json!({"type": "UnplannedFailover", "recoveryPoint": {"selector": "PointInTime"}}),
            )],
            &["spec.operation.recoveryPoint.pointInTime", "required with selector PointInTime"],
        ),
        case(
            PLAN,
            vec![Set("/spec/operation", json!({"type": "Commit", "recoveryPoint": {"selector": "Latest"}}))],
            &["spec.operation.recoveryPoint", "applies only to"],
        ),
        case(
            PLAN,
            vec![Set("/spec/operation", json!({"type": "TestFailover", "approvals": ["web/dba-sign-off"]}))],
            &["spec.operation.approvals", "must name manual-approval actions"],
        ),
        case(
            PLAN,
            vec![Set("/spec/operation", json!({"type": "TestFailover", "runId": "Drill 1"}))],
            &["spec.operation.runId", "should match"],
        ),
        // FailbackJob.
        case(FAILBACK, vec![Set("/spec/servers", json!(["db-01"]))], &["spec", "exactly one of servers or planRef"]),
        case(FAILBACK, vec![Remove("/spec/planRef")], &["spec", "exactly one of servers or planRef"]),
        case(
            FAILBACK,
            vec![Set("/spec/target/location", json!("AlternateLocation"))],
            &["spec.target.alternate", "required with location AlternateLocation"],
        ),
        case(
            FAILBACK,
            vec![Set(
                "/spec/target/alternate",
                json!([{"server": "db-01", "agent": {"hostname": "db-02"}, "disks": [{"id": "os", "path": "/dev/sdb"}]}]),
            )],
            &["spec.target.alternate", "allowed only with it"],
        ),
        case(
            FAILBACK,
            vec![
                Remove("/spec/planRef"),
                Set("/spec/servers", json!(["db-01"])),
                Set(
                    "/spec/target",
                    json!({"location": "AlternateLocation", "alternate": [{"server": "web-01", "agent": {"hostname": "web-02"}, "disks": [{"id": "os", "path": "/dev/sdb"}]}]}),
                ),
            ],
            &["spec.target.alternate", "must be one of spec.servers"],
        ),
        case(FAILBACK, vec![Set("/spec/cutover/mode", json!("Later"))], &["spec.cutover.mode", "Unsupported value"]),
    ]
}

/// Changes rejected on update (immutability, transition rules): valid sample first,
/// then the edited one.
fn update_cases() -> Vec<Case> {
    vec![
        case(
            SERVER,
            vec![Set("/spec/disks", json!([{"id": "os", "path": "/dev/sda"}]))],
            &["spec.disks", "cannot be removed or renamed"],
        ),
        case(SERVER, vec![Set("/spec/disks/1/id", json!("data2"))], &["spec.disks", "cannot be removed or renamed"]),
        case(
            SERVER,
            vec![Set("/spec/agent/machineId", json!("00000000000000000000000000000000"))],
            &["spec.agent.machineId", "immutable"],
        ),
        case(SERVER, vec![Remove("/spec/agent/machineId")], &["spec.agent.machineId", "immutable"]),
        case(
            FAILBACK,
            vec![
                Set("/spec/target/location", json!("AlternateLocation")),
                Set(
                    "/spec/target/alternate",
                    json!([{"server": "db-01", "agent": {"hostname": "db-02"}, "disks": [{"id": "os", "path": "/dev/sdb"}]}]),
                ),
            ],
            &["spec.target", "immutable"],
        ),
        case(FAILBACK, vec![Set("/spec/planRef/name", json!("other"))], &["spec.planRef", "immutable"]),
        case(FAILBACK, vec![Remove("/spec/planRef"), Set("/spec/servers", json!(["db-01"]))], &["spec", "immutable"]),
    ]
}

fn apply_edits(mut doc: Value, edits: &[Edit], name: &str) -> Value {
    doc["metadata"] = json!({"name": name});
    for edit in edits {
        let (path, value) = match edit {
            Set(p, v) => (*p, Some(v.clone())),
            Remove(p) => (*p, None),
        };
        let (parent, key) = path.rsplit_once('/').expect("pointer has a parent");
        let target = doc.pointer_mut(parent).unwrap_or_else(|| panic!("{parent} not in the sample"));
        match (target, value) {
            (Value::Object(map), Some(v)) => {
                map.insert(key.to_owned(), v);
            }
            (Value::Object(map), None) => {
                map.remove(key);
            }
            (Value::Array(items), Some(v)) => items[key.parse::<usize>().expect("index")] = v,
            (Value::Array(items), None) => {
                items.remove(key.parse::<usize>().expect("index"));
            }
            (other, _) => panic!("cannot edit {path} in {other}"),
        }
    }
    doc
}

fn api(client: &kube::Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(siterecovery_api::GROUP, siterecovery_api::VERSION, kind);
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

fn check_rejection(
    label: &str,
    result: Result<DynamicObject, kube::Error>,
    expect: &[&str],
    failures: &mut Vec<String>,
) {
    match result {
        Ok(_) => failures.push(format!("{label}: accepted, expected rejection naming {expect:?}")),
        Err(err) => {
            let message = err.to_string();
            if !expect.iter().all(|e| message.contains(e)) {
                failures.push(format!("{label}: message {message:?} lacks {expect:?}"));
            }
        }
    }
}

#[tokio::test]
async fn invalid_objects_are_rejected_with_the_field_named() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&client, "validation").await?;
    let cases = create_cases();
    assert!(cases.len() >= 25, "at least 25 rules are exercised");
    let mut failures = Vec::new();
    // Every sample itself must be valid, or the rows below prove nothing.
    for kind in [POLICY, SERVER, PLAN, FAILBACK] {
        let doc = apply_edits(example(kind)?, &[], &format!("valid-{}", kind.to_lowercase()));
        api(&client, &ns.name, kind).create(&PostParams::default(), &serde_json::from_value(doc)?).await?;
    }
    for (i, c) in cases.iter().enumerate() {
        let doc = apply_edits(example(c.kind)?, &c.edits, &format!("bad-{i}"));
        let result = api(&client, &ns.name, c.kind).create(&PostParams::default(), &serde_json::from_value(doc)?).await;
        check_rejection(&format!("create row {i} ({})", c.kind), result, c.expect, &mut failures);
    }
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn immutable_fields_are_rejected_on_update() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&client, "immutable").await?;
    let mut failures = Vec::new();
    let cases = update_cases();
    for (i, c) in cases.iter().enumerate() {
        let name = format!("upd-{i}");
        let api = api(&client, &ns.name, c.kind);
        // Created by the same field manager that then edits it, so that leaving a field
        // out of the second apply removes it (server-side apply semantics).
        let valid = apply_edits(example(c.kind)?, &[], &name);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(&name, &params, &Patch::Apply(&valid)).await?;
        let changed = apply_edits(valid, &c.edits, &name);
        let result = api.patch(&name, &params, &Patch::Apply(&changed)).await;
        check_rejection(&format!("update row {i} ({})", c.kind), result, c.expect, &mut failures);
    }
    // Adding a disk is allowed: protection grows with the server.
    let api = api(&client, &ns.name, SERVER);
    let mut grown = apply_edits(example(SERVER)?, &[], "upd-0");
    grown["spec"]["disks"].as_array_mut().expect("disks").push(json!({"id": "logs", "path": "/dev/sdc"}));
    let after = api.patch("upd-0", &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&grown)).await?;
    let ids: Vec<_> = after.data["spec"]["disks"].as_array().into_iter().flatten().map(|d| d["id"].clone()).collect();
    assert_eq!(ids, [json!("os"), json!("data"), json!("logs")], "a disk can be added to a protected server");
    assert!(failures.is_empty(), "{} of {} rows failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    Ok(())
}
