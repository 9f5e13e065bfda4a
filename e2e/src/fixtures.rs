//! Objects and reports shared by the tests that drive the operator: a policy and
//! servers as a user writes them, and status reports as the agent, process server and
//! restore worker write them (server-side apply under their own field managers).

use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use siterecovery_api::{ConditionStatus, KstatusConditions, ProtectedServer, ReplicationPolicy};

/// The Azurite account endpoint `make test` starts (`SR_AZURITE_ENDPOINT`).
pub fn azurite_endpoint() -> String {
    std::env::var("SR_AZURITE_ENDPOINT").expect(
        "SR_AZURITE_ENDPOINT is not set: these tests need Azurite; run `make test` \
         (or `hack/azurite.sh up && eval \"$(hack/azurite.sh env)\"`)",
    )
}

/// A valid policy named `name` storing in Azurite through the `storage` Secret (2m RPO alert).
pub fn policy(name: &str) -> ReplicationPolicy {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ReplicationPolicy",
        "metadata": {"name": name},
        "spec": {
            "rpoThreshold": "2m", "crashConsistentInterval": "5s", "retention": {"window": "24h"},
            "target": {"endpoint": azurite_endpoint(), "container": "dr-data",
                       "credential": {"secretRef": {"name": "storage"}}}
        }
    }))
    .expect("valid policy")
}

/// An account SAS for Azurite's well-known account, valid for a day.
pub fn azurite_sas() -> String {
    use siterecovery_store::backend::{DEVSTORE_ACCOUNT, DEVSTORE_KEY};
    let expiry = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24);
    siterecovery_store::AccountSas::full_access(DEVSTORE_ACCOUNT, expiry).sign(DEVSTORE_KEY).expect("signing a SAS")
}

/// The `storage` credential Secret with a working Azurite SAS.
pub fn sas_secret() -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(json!({"metadata": {"name": "storage"}, "stringData": {"sasToken": azurite_sas()}}))
        .expect("valid Secret")
}

/// A server named `name` with one disk, using policy `gold`, recovered locally.
pub fn server(name: &str) -> ProtectedServer {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
        "metadata": {"name": name},
        "spec": {
            "policyRef": {"name": "gold"},
            "agent": {"hostname": format!("{name}.example.com")},
            "disks": [{"id": "os", "path": "/dev/loop0"}],
            "failoverTarget": {"local": {"directory": "/srv/recovered"}}
        }
    }))
    .expect("valid server")
}

/// A status report: server-side apply on the status subresource under `manager`.
pub async fn report(
    api: &Api<ProtectedServer>,
    name: &str,
    manager: &str,
    status: serde_json::Value,
) -> anyhow::Result<()> {
    let patch = json!({"apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer", "status": status});
    api.patch_status(name, &PatchParams::apply(manager).force(), &Patch::Apply(&patch)).await?;
    Ok(())
}

/// The agent and process server report a finished initial copy and a fresh point.
pub async fn report_protected(api: &Api<ProtectedServer>, name: &str) -> anyhow::Result<()> {
    use siterecovery_api::field_manager::{AGENT, PROCESS_SERVER};
    report(
        api,
        name,
        AGENT,
        json!({
            "agent": {"version": "0.1.0", "lastHeartbeatTime": ago(0)},
            "initialSync": {"bytesTotal": 1_048_576, "bytesDone": 1_048_576, "percent": "100%"}
        }),
    )
    .await?;
    report(
        api,
        name,
        PROCESS_SERVER,
        json!({"latestRecoveryPoints": {
        "crashConsistent": {"id": "cc-1", "time": ago(1), "kind": "CrashConsistent"}}}),
    )
    .await
}

/// RFC 3339 time `secs` seconds ago.
pub fn ago(secs: i64) -> String {
    (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(secs)).to_string()
}

/// `(status, reason, message)` of condition `t`.
pub fn condition<T: KstatusConditions>(
    conds: &[siterecovery_api::Condition<T>],
    t: T,
) -> Option<(ConditionStatus, String, String)> {
    conds.iter().find(|c| c.type_ == t).map(|c| (c.status, c.reason.clone(), c.message.clone()))
}

/// `(reason, note)` of the events about object `name`.
pub async fn events_for(client: &Client, ns: &str, name: &str) -> anyhow::Result<Vec<(String, String)>> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    Ok(events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect())
}

/// Waits up to 30 s for an event `reason` about `name` whose note contains `note`.
pub async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str, note: &str) -> anyhow::Result<()> {
    for _ in 0..150 {
        if events_for(client, ns, name).await?.iter().any(|(r, n)| r == reason && n.contains(note)) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    anyhow::bail!("no {reason} event containing {note:?} on {name}: {:?}", events_for(client, ns, name).await?)
}
