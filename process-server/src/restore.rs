//! The restore worker: answers the `failover` and `testFailover` request blocks of the
//! servers assigned to this process server (docs/lifecycle.md) by materialising a
//! recovery point on the server's failover target, and reports with JSON merge patches
//! of the block it serves.
//!
//! Targets: `local` (each disk becomes `<directory>/<server>/<disk>.img`; a test failover
//! goes to `<directory>/test-failover/<server>/`). `kubevirt` and `azure` are refused with
//! a message until they exist.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};
use siterecovery_api::ProtectedServer;
use siterecovery_api::common::RecoveryPointSelector;
use siterecovery_api::plan::RecoveryPointChoice;
use siterecovery_api::plan::{PlanOperationType as Op, RunState};
use siterecovery_api::server::FailoverStatus;
use siterecovery_store::{Manifest, PointKind, ServerRef};

use crate::Shared;
use crate::kube::{FIELD_MANAGER, KubeTargets};
use crate::target::Targets as _;

/// Which block of the status a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Block {
    Failover,
    TestFailover,
}

impl Block {
    fn field(self) -> &'static str {
        match self {
            Block::Failover => "failover",
            Block::TestFailover => "testFailover",
        }
    }
}

/// Picks the recovery point a choice names among `points` (oldest first). Pure.
pub fn choose<'a>(points: &'a [Manifest], choice: Option<&RecoveryPointChoice>) -> Result<&'a Manifest, String> {
    let selector = choice.map(|c| c.selector).unwrap_or_default();
    let latest_of = |kind: PointKind| points.iter().rev().find(|p| p.kind == kind);
    let found = match selector {
        RecoveryPointSelector::Latest | RecoveryPointSelector::LatestProcessed => points.last(),
        RecoveryPointSelector::LatestAppConsistent => latest_of(PointKind::App),
        RecoveryPointSelector::LatestGroupConsistent => latest_of(PointKind::Group),
        RecoveryPointSelector::Named => {
            let name = choice.and_then(|c| c.point_name.as_deref()).unwrap_or_default();
            points.iter().find(|p| p.id == name)
        }
        RecoveryPointSelector::PointInTime => {
            let at = choice.and_then(|c| c.point_in_time.as_ref()).map(|t| t.0);
            at.and_then(|at| points.iter().rev().find(|p| p.time <= at))
        }
    };
    found.ok_or_else(|| match selector {
        RecoveryPointSelector::Named => {
            "no recovery point with that name (kubectl siterecovery points lists them)".into()
        }
        s => format!("no recovery point matches {s:?}"),
    })
}

/// Runs the worker for the servers of `namespace` assigned to `pod`.
pub async fn run(
    client: Client,
    namespace: String,
    pod: Option<String>,
    targets: Arc<KubeTargets>,
    shared: Arc<Shared>,
) {
    let servers: Api<ProtectedServer> = Api::namespaced(client, &namespace);
    let busy: Arc<Mutex<HashSet<(String, Block)>>> = Arc::default();
    loop {
        match servers.list(&ListParams::default()).await {
            Ok(list) => {
                for s in list.items {
                    let status = s.status.clone().unwrap_or_default();
                    if pod.is_some() && status.process_server != pod {
                        continue;
                    }
                    for (block, b) in
                        [(Block::Failover, &status.failover), (Block::TestFailover, &status.test_failover)]
                    {
                        let Some(b) = b.clone() else { continue };
                        if b.state != RunState::Pending {
                            continue;
                        }
                        let key = (s.name_any(), block);
                        if !busy.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone()) {
                            continue;
                        }
                        let (api, targets, shared, busy, server) =
                            (servers.clone(), targets.clone(), shared.clone(), busy.clone(), s.clone());
                        tokio::spawn(async move {
                            serve(&api, &targets, &shared, &server, block, b).await;
                            busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                        });
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing ProtectedServers for restore requests failed"),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn patch_block(api: &Api<ProtectedServer>, server: &str, block: Block, fields: Value) -> Result<(), kube::Error> {
    let pp = PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    api.patch_status(server, &pp, &Patch::Merge(&json!({"status": {block.field(): fields}}))).await.map(drop)
}

async fn serve(
    api: &Api<ProtectedServer>,
    targets: &KubeTargets,
    shared: &Shared,
    s: &ProtectedServer,
    block: Block,
    b: FailoverStatus,
) {
    let name = s.name_any();
    if let Err(e) = patch_block(api, &name, block, json!({"state": RunState::Running, "message": "restoring"})).await {
        tracing::warn!(server = %name, error = %e, "cannot mark the request running; retrying later");
        return;
    }
    let outcome = work(targets, shared, s, &b).await;
    let now = Time(Timestamp::now());
    let fields = match outcome {
        Ok(done) => done.merge(json!({"state": RunState::Succeeded, "completionTime": now})),
        Err(message) => {
            tracing::warn!(server = %name, operation = ?b.operation, %message, "restore request failed");
            json!({"state": RunState::Failed, "message": message, "completionTime": now})
        }
    };
    if let Err(e) = patch_block(api, &name, block, fields).await {
        tracing::warn!(server = %name, error = %e, "cannot report the restore outcome");
    }
}

struct Done(Value);

impl Done {
    fn merge(self, mut extra: Value) -> Value {
        if let (Value::Object(a), Value::Object(b)) = (&mut extra, self.0) {
            a.extend(b);
        }
        extra
    }
}

async fn work(targets: &KubeTargets, shared: &Shared, s: &ProtectedServer, b: &FailoverStatus) -> Result<Done, String> {
    let name = s.name_any();
    let ns = s.namespace().unwrap_or_default();
    if b.operation == Op::TestFailoverCleanup {
        let mut removed = 0;
        for path in &b.recovered_disks {
            match std::fs::remove_file(path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("removing {path}: {e}")),
            }
            if let Some(dir) = std::path::Path::new(path).parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
        return Ok(Done(json!({"message": format!("removed {removed} test disk(s)"), "recoveredDisks": []})));
    }
    let Some(local) = s.spec.failover_target.local.as_ref() else {
        return Err("only the local failover target is implemented; kubevirt and azure targets are not yet".into());
    };
    let mut dir = PathBuf::from(&local.directory);
    if b.operation == Op::TestFailover {
        dir.push("test-failover");
    }
    dir.push(&name);
    let target = targets.resolve(&ns, &name).await.map_err(|(r, m)| format!("{r}: {m}"))?;
    let server = ServerRef::new(&ns, &name).map_err(|e| e.to_string())?;
    // `Latest` processes what is still in the cache first: wait for the upload backlog.
    let latest = b.recovery_point_choice.as_ref().is_none_or(|c| c.selector == RecoveryPointSelector::Latest);
    if latest && let Some(state) = shared.servers().await.into_iter().find(|st| st.server == server) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        while state.backlog.load(std::sync::atomic::Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Every point that reads; an unreadable one (damaged, or under a key that is gone)
    // is skipped and named in the outcome, never restored, and never a reason to refuse
    // a failover to the points that are good.
    let ids = target.store.list_point_ids(&server).await.map_err(|e| e.to_string())?;
    let mut points = Vec::new();
    let mut skipped = Vec::new();
    for id in &ids {
        match target.store.load_point(&server, id).await {
            Ok(m) => points.push(m),
            Err(e) => {
                tracing::warn!(server = %server, point = %id, error = %e, "recovery point unreadable; skipped");
                skipped.push(id.clone());
            }
        }
    }
    points.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
    let point = choose(&points, b.recovery_point_choice.as_ref()).map_err(|e| {
        if skipped.is_empty() {
            e
        } else {
            format!("{e} ({} unreadable point(s) skipped: {})", skipped.len(), skipped.join(", "))
        }
    })?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let disks: Vec<(String, PathBuf)> =
        point.disks.iter().map(|d| (d.id.clone(), dir.join(format!("{}.img", d.id)))).collect();
    let started = std::time::Instant::now();
    let reports = target.store.restore_point(&server, point, &disks).await.map_err(|e| e.to_string())?;
    let total: u64 = point.total_size();
    tracing::info!(server = %server, point = %point.id, disks = disks.len(), bytes = total, seconds = started.elapsed().as_secs_f64(), "recovery point restored");
    let downloaded: u64 = reports.iter().map(|r| r.bytes_downloaded).sum();
    let kind = match point.kind {
        PointKind::Crash => "CrashConsistent",
        PointKind::App => "AppConsistent",
        PointKind::Group => "GroupConsistent",
    };
    Ok(Done(json!({
        "message": if skipped.is_empty() {
            format!("restored {} to {} ({} downloaded)", point.id, dir.display(), downloaded)
        } else {
            format!("restored {} to {} ({} downloaded); skipped {} unreadable point(s): {}", point.id, dir.display(), downloaded, skipped.len(), skipped.join(", "))
        },
        "recoveryPoint": {"id": point.id, "time": Time(point.time), "kind": kind},
        "recoveredDisks": disks.iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>(),
        "progress": {"bytesTotal": total, "bytesDone": total, "percent": "100%"},
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: &str, time: &str, kind: PointKind) -> Manifest {
        Manifest {
            format: siterecovery_store::FORMAT_VERSION,
            id: id.into(),
            kind,
            group: None,
            time: time.parse().unwrap(),
            key_id: "k".into(),
            chunk_size: 4096,
            disks: vec![],
        }
    }

    #[test]
    fn choices_pick_the_right_point() {
        let points = [
            point("a", "2026-11-27T10:00:00Z", PointKind::Crash),
            point("b", "2026-11-27T10:05:00Z", PointKind::App),
            point("c", "2026-11-27T10:10:00Z", PointKind::Crash),
        ];
        let c = |json: Value| serde_json::from_value::<RecoveryPointChoice>(json).unwrap();
        assert_eq!(choose(&points, None).unwrap().id, "c");
        assert_eq!(choose(&points, Some(&c(json!({"selector": "LatestAppConsistent"})))).unwrap().id, "b");
        assert_eq!(choose(&points, Some(&c(json!({"selector": "Named", "pointName": "a"})))).unwrap().id, "a");
        let at = c(json!({"selector": "PointInTime", "pointInTime": "2026-11-27T10:07:00Z"}));
        assert_eq!(choose(&points, Some(&at)).unwrap().id, "b");
        assert!(choose(&points, Some(&c(json!({"selector": "LatestGroupConsistent"})))).is_err());
        assert!(
            choose(&points, Some(&c(json!({"selector": "Named", "pointName": "zz"}))))
                .unwrap_err()
                .contains("no recovery point")
        );
    }
}
