//! `points`: every retained recovery point of a server. Status only carries the newest
//! ones, so this reads the manifests from the policy's blob store with the policy's SAS
//! and keys (which needs `get` on those two Secrets).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use serde_json::{Value, json};
use siterecovery_api::{ProtectedServer, ReplicationPolicy};
use siterecovery_store::backend::{AzureConnector, BlobAuth};
use siterecovery_store::{Keyring, Manifest, ServerRef, Store, StoreOptions};

use crate::args::{Output, PointsArgs};
use crate::client::{Kube, explain};
use crate::status::print_doc;
use crate::table::{age_at, bytes, render};

/// Rows of the points table, newest first.
pub fn rows(points: &[Manifest], now: jiff::Timestamp) -> Vec<Vec<String>> {
    points
        .iter()
        .rev()
        .map(|m| {
            let kind = match &m.group {
                Some(g) => format!("{} ({g})", m.kind),
                None => m.kind.to_string(),
            };
            vec![m.id.clone(), kind, m.time.to_string(), age_at(m.time, now), bytes(m.total_size())]
        })
        .collect()
}

/// The JSON document of the points, newest first.
pub fn doc(points: &[Manifest]) -> Value {
    Value::Array(
        points
            .iter()
            .rev()
            .map(|m| {
                json!({
                    "id": m.id, "kind": m.kind, "group": m.group, "time": m.time.to_string(),
                    "sizeBytes": m.total_size(), "keyId": m.key_id,
                    "disks": m.disks.iter().map(|d| json!({"id": d.id, "sizeBytes": d.size})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

async fn secret_data(kube: &Kube, name: &str, purpose: &str) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let ns = &kube.namespace;
    let secret = Api::<Secret>::namespaced(kube.client.clone(), ns).get(name).await.map_err(|e| {
        explain(e, "get", &format!("Secret {name}"), ns)
            .context(format!("listing recovery points reads the blob store directly and needs the policy's {purpose}"))
    })?;
    Ok(secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// The store of the server's policy.
async fn open_store(kube: &Kube, server: &ProtectedServer) -> anyhow::Result<Store> {
    let ns = &kube.namespace;
    let policy_name = &server.spec.policy_ref.name;
    let policy = Api::<ReplicationPolicy>::namespaced(kube.client.clone(), ns)
        .get(policy_name)
        .await
        .map_err(|e| explain(e, "get", &format!("ReplicationPolicy {policy_name}"), ns))?;
    let target = &policy.spec.target;
    let Some(cred) = &target.credential.secret_ref else {
        return Err(anyhow!(
            "ReplicationPolicy {policy_name} uses workload identity, which only the process servers hold; \
             the newest points are in `kubectl siterecovery status {}`",
            kube::ResourceExt::name_any(server)
        ));
    };
    let cred_data = secret_data(kube, &cred.name, "storage credential").await?;
    let auth = BlobAuth::from_secret_data(&cred_data).map_err(|why| anyhow!("Secret {} {why}", cred.name))?;
    let key_name = policy.key_secret_name();
    let keys = Keyring::from_secret_data(&secret_data(kube, &key_name, "encryption keys").await?)
        .with_context(|| format!("reading the keys in Secret {key_name}"))?;
    let azure = AzureConnector::from_env().map_err(|e| anyhow!("storage client configuration: {e}"))?;
    let backend = azure
        .backend(&target.endpoint, &target.container, &auth)
        .with_context(|| format!("ReplicationPolicy {policy_name}: spec.target"))?;
    Ok(Store::new(Arc::new(backend), keys, StoreOptions::default())?)
}

/// Runs `points`.
pub async fn run(kube: &Kube, args: &PointsArgs) -> anyhow::Result<()> {
    let ns = &kube.namespace;
    let name = &args.server;
    let server = Api::<ProtectedServer>::namespaced(kube.client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| explain(e, "get", &format!("ProtectedServer {name}"), ns))?;
    let store = open_store(kube, &server).await?;
    let server_ref = ServerRef::new(ns.as_str(), name.as_str())?;
    let ids = store.list_point_ids(&server_ref).await.with_context(|| {
        format!(
            "listing the recovery points of {name} in the blob store (is the storage endpoint reachable from here?)"
        )
    })?;
    // A point that does not read (damaged, or under a key that is gone) is named on
    // stderr, not allowed to hide the good ones.
    let mut points = Vec::new();
    for id in &ids {
        match store.load_point(&server_ref, id).await {
            Ok(m) => points.push(m),
            Err(e) => eprintln!("warning: recovery point {id} is unreadable: {e}"),
        }
    }
    points.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
    match args.output {
        Output::Table if points.is_empty() => {
            eprintln!("No recovery points of {name} in the blob store yet.");
            Ok(())
        }
        Output::Table => {
            print!("{}", render(&["ID", "KIND", "TIME", "AGE", "SIZE"], &rows(&points, jiff::Timestamp::now())));
            Ok(())
        }
        out => print_doc(&doc(&points), out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, time: &str, kind: &str, size: u64) -> Manifest {
        serde_json::from_value(json!({
            "format": 1, "id": id, "kind": kind, "time": time, "key_id": "k1", "chunk_size": 1 << 30,
            "disks": [{"id": "os", "size": size, "chunks": if size > 0 { vec!["zero"] } else { vec![] }}],
        }))
        .unwrap()
    }

    #[test]
    fn newest_first_with_kind_age_and_size() {
        let points = [
            manifest("a-crash", "2026-03-01T09:00:00Z", "crash", 1 << 20),
            manifest("b-app", "2026-03-01T09:55:00Z", "app", 3 << 29),
        ];
        let now: jiff::Timestamp = "2026-03-01T10:00:00Z".parse().unwrap();
        assert_eq!(
            render(&["ID", "KIND", "TIME", "AGE", "SIZE"], &rows(&points, now)),
            "\
ID        KIND    TIME                   AGE    SIZE
b-app     app     2026-03-01T09:55:00Z   5m0s   1.5 GiB
a-crash   crash   2026-03-01T09:00:00Z   60m    1.0 MiB
"
        );
        assert_eq!(doc(&points)[0]["sizeBytes"], json!(3u64 << 29));
    }
}
