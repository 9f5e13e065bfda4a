//! The restore worker: answers the `failover` and `testFailover` request blocks of the
//! servers assigned to this process server (docs/lifecycle.md) by materialising a
//! recovery point on the server's failover target, and reports with JSON merge patches
//! of the block it serves.
//!
//! Targets: `local` (each disk becomes `<directory>/<server>/<disk>.img`; a test failover
//! goes to `<directory>/test-failover/<server>/`) and `azure` (each disk becomes a
//! fixed-VHD page blob in the policy's container, `restore/azure.rs`; the managed disks
//! and the VM are not created). `kubevirt` is refused with a message until it exists.

mod azure;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};
use siterecovery_api::ProtectedServer;
use siterecovery_api::common::RecoveryPointSelector;
use siterecovery_api::failback::FailbackLocation;
use siterecovery_api::plan::RecoveryPointChoice;
use siterecovery_api::plan::{PlanOperationType as Op, RunState};
use siterecovery_api::server::{FailbackWork, FailoverStatus};
use siterecovery_store::{Manifest, PointKind, ServerRef};

use crate::Shared;
use crate::kube::{FIELD_MANAGER, KubeTargets};
use crate::target::Targets as _;

/// Which block of the status a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Block {
    Failover,
    TestFailover,
    ReverseReplication,
    Failback,
}

impl Block {
    fn field(self) -> &'static str {
        match self {
            Block::Failover => "failover",
            Block::TestFailover => "testFailover",
            Block::ReverseReplication => "reverseReplication",
            Block::Failback => "failback",
        }
    }
}

/// The (server, block) requests being served now.
type Busy = Mutex<HashSet<(String, Block)>>;

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

/// Runs the worker for the servers of `namespace` assigned to `pod`: follows the
/// ProtectedServers with a watch (one list, then changes), serves every pending block it
/// sees, and looks through what it holds every 30 s for a block it could not take up.
pub async fn run(
    client: Client,
    namespace: String,
    pod: Option<String>,
    targets: Arc<KubeTargets>,
    shared: Arc<Shared>,
) {
    let servers: Api<ProtectedServer> = Api::namespaced(client, &namespace);
    let busy: Arc<Busy> = Arc::default();
    let (store, writer) = reflector::store();
    let changes =
        reflector(writer, watcher(servers.clone(), watcher::Config::default())).default_backoff().touched_objects();
    let mut changes = std::pin::pin!(changes);
    let mut sweep = tokio::time::interval(Duration::from_secs(30));
    let consider = |s: &ProtectedServer| {
        let status = s.status.clone().unwrap_or_default();
        if pod.is_some() && status.process_server != pod {
            return;
        }
        // One task per pending block; a block already being served is skipped.
        let claim = |block: Block, pending: bool| {
            let key = (s.name_any(), block);
            (pending && busy.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone())).then(|| (key, busy.clone()))
        };
        let release = |(key, busy): ((String, Block), Arc<Busy>)| {
            busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        };
        for (block, w) in
            [(Block::ReverseReplication, &status.reverse_replication), (Block::Failback, &status.failback)]
        {
            let Some(w) = w.clone() else { continue };
            let Some(claimed) = claim(block, w.state == RunState::Pending) else { continue };
            let (api, server) = (servers.clone(), s.clone());
            tokio::spawn(async move {
                serve_failback(&api, &server, block, w).await;
                release(claimed);
            });
        }
        for (block, b) in [(Block::Failover, &status.failover), (Block::TestFailover, &status.test_failover)] {
            let Some(b) = b.clone() else { continue };
            let Some(claimed) = claim(block, b.state == RunState::Pending) else { continue };
            let (api, targets, shared, server) = (servers.clone(), targets.clone(), shared.clone(), s.clone());
            tokio::spawn(async move {
                serve(&api, &targets, &shared, &server, block, b).await;
                release(claimed);
            });
        }
    };
    loop {
        tokio::select! {
            change = changes.next() => match change {
                Some(Ok(s)) => consider(&s),
                Some(Err(e)) => tracing::warn!(error = %e, "watching ProtectedServers for restore requests failed; retrying"),
                None => return,
            },
            _ = sweep.tick() => {
                for s in store.state() {
                    consider(&s);
                }
            }
        }
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
        if s.spec.failover_target.azure.is_some() || b.recovered_disks.iter().any(|d| azure::is_blob_url(d)) {
            let target = targets.resolve(&ns, &name).await.map_err(|(r, m)| format!("{r}: {m}"))?;
            let server = ServerRef::new(&ns, &name).map_err(|e| e.to_string())?;
            return azure::cleanup_test(&target.store, &server).await.map(Done);
        }
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
    // `None`: the azure target (page blobs in the policy's container).
    let dir = match (&s.spec.failover_target.local, s.spec.failover_target.azure.is_some()) {
        (Some(local), _) => {
            let mut dir = PathBuf::from(&local.directory);
            if b.operation == Op::TestFailover {
                dir.push("test-failover");
            }
            dir.push(&name);
            Some(dir)
        }
        (None, true) => None,
        (None, false) => return Err("the kubevirt failover target is not implemented yet; use local or azure".into()),
    };
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
    if b.recovery_point_choice.as_ref().is_some_and(|c| c.selector == RecoveryPointSelector::LatestGroupConsistent) {
        crate::group::drop_partial_group_points(&target.store, &server, &mut points).await?;
    }
    let point = choose(&points, b.recovery_point_choice.as_ref()).map_err(|e| {
        if skipped.is_empty() {
            e
        } else {
            format!("{e} ({} unreadable point(s) skipped: {})", skipped.len(), skipped.join(", "))
        }
    })?;
    let kind = match point.kind {
        PointKind::Crash => "CrashConsistent",
        PointKind::App => "AppConsistent",
        PointKind::Group => "GroupConsistent",
    };
    let recovery_point = json!({"recoveryPoint": {"id": point.id, "time": Time(point.time), "kind": kind}});
    let Some(dir) = dir else {
        let done = azure::materialise(&target.store, &server, point, b.operation, &skipped).await?;
        return Ok(Done(Done(done).merge(recovery_point)));
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let disks: Vec<(String, PathBuf)> =
        point.disks.iter().map(|d| (d.id.clone(), dir.join(format!("{}.img", d.id)))).collect();
    let started = std::time::Instant::now();
    let reports = target.store.restore_point(&server, point, &disks).await.map_err(|e| e.to_string())?;
    let total: u64 = point.total_size();
    tracing::info!(server = %server, point = %point.id, disks = disks.len(), bytes = total, seconds = started.elapsed().as_secs_f64(), "recovery point restored");
    let downloaded: u64 = reports.iter().map(|r| r.bytes_downloaded).sum();
    Ok(Done(json!({
        "message": if skipped.is_empty() {
            format!("restored {} to {} ({} downloaded)", point.id, dir.display(), downloaded)
        } else {
            format!("restored {} to {} ({} downloaded); skipped {} unreadable point(s): {}", point.id, dir.display(), downloaded, skipped.len(), skipped.join(", "))
        },
        "recoveryPoint": recovery_point["recoveryPoint"],
        "recoveredDisks": disks.iter().map(|(_, p)| p.display().to_string()).collect::<Vec<_>>(),
        "progress": {"bytesTotal": total, "bytesDone": total, "percent": "100%"},
    })))
}

/// Serves a failback step on the `local` target: copies what differs from the
/// failed-over copy (`status.failover.recoveredDisks`) onto the on-prem disks (the
/// original ones, or the alternate target's), block by block, so only differing blocks
/// move. Reprotect makes them equal once; the cut-over repeats it for what changed since
/// and checks equality. In a real deployment the failed-over copy runs in Azure and the
/// on-prem agent (master-target role) receives the blocks; on the embedded default both
/// sides are files on this host.
async fn serve_failback(api: &Api<ProtectedServer>, s: &ProtectedServer, block: Block, w: FailbackWork) {
    let name = s.name_any();
    let running = json!({"state": RunState::Running, "message": "comparing blocks"});
    if let Err(e) = patch_block(api, &name, block, running).await {
        tracing::warn!(server = %name, error = %e, "cannot mark the failback step running; retrying later");
        return;
    }
    let now = Time(Timestamp::now());
    let fields = match failback_sync(s, &w).await {
        Ok((compared, sent)) => json!({
            "state": RunState::Succeeded,
            "completionTime": now,
            "bytesSent": sent,
            "progress": {"bytesTotal": compared, "bytesDone": compared, "percent": "100%"},
            "message": format!("on-prem disks equal the failed-over copy; {sent} of {compared} bytes differed and were sent"),
        }),
        Err(message) => {
            tracing::warn!(server = %name, step = block.field(), %message, "failback step failed");
            json!({"state": RunState::Failed, "message": message, "completionTime": now})
        }
    };
    if let Err(e) = patch_block(api, &name, block, fields).await {
        tracing::warn!(server = %name, error = %e, "cannot report the failback step");
    }
}

async fn failback_sync(s: &ProtectedServer, w: &FailbackWork) -> Result<(u64, u64), String> {
    if s.spec.failover_target.azure.is_some() {
        return Err("failback from the azure target is not implemented: the failed-over disks are VHD page blobs \
                    and no Azure VM runs from them (status.failover.message)"
            .into());
    }
    let status = s.status.clone().unwrap_or_default();
    let recovered = status
        .failover
        .map(|f| f.recovered_disks)
        .filter(|d| !d.is_empty())
        .ok_or("no failed-over disks to fail back from (status.failover.recoveredDisks is empty)")?;
    let destinations: Vec<String> = match w.location {
        FailbackLocation::OriginalLocation => s.spec.disks.iter().map(|d| d.path.clone()).collect(),
        FailbackLocation::AlternateLocation => w
            .alternate
            .as_ref()
            .ok_or("AlternateLocation without an alternate target")?
            .disks
            .iter()
            .map(|d| d.path.clone())
            .collect(),
    };
    if destinations.len() != recovered.len() {
        return Err(format!("{} failed-over disk(s) but {} on-prem disk(s)", recovered.len(), destinations.len()));
    }
    let mut compared = 0;
    let mut sent = 0;
    for (from, to) in recovered.iter().zip(&destinations) {
        let (from, to) = (PathBuf::from(from), PathBuf::from(to));
        let (c, n) = tokio::task::spawn_blocking(move || sync_disk(&from, &to)).await.map_err(|e| e.to_string())??;
        compared += c;
        sent += n;
    }
    Ok((compared, sent))
}

/// Makes `to` equal `from`, writing only the 64 KiB blocks that differ; returns (bytes
/// compared, bytes written). A file target grows or shrinks to the source's size; a
/// block device must be large enough. Written blocks are synced and read back.
pub fn sync_disk(from: &std::path::Path, to: &std::path::Path) -> Result<(u64, u64), String> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 64 * 1024;
    let io = |what: &str, p: &std::path::Path, e: std::io::Error| format!("{what} {}: {e}", p.display());
    let mut src = std::fs::File::open(from).map_err(|e| io("opening", from, e))?;
    let size = src.seek(SeekFrom::End(0)).map_err(|e| io("sizing", from, e))?;
    let mut dst = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(to)
        .map_err(|e| io("opening", to, e))?;
    let is_device =
        dst.metadata().map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type())).unwrap_or(false);
    let dst_size = dst.seek(SeekFrom::End(0)).map_err(|e| io("sizing", to, e))?;
    if is_device && dst_size < size {
        return Err(format!("{} holds {dst_size} bytes, the disk needs {size}", to.display()));
    }
    if !is_device && dst_size != size {
        dst.set_len(size).map_err(|e| io("resizing", to, e))?;
    }
    let (mut a, mut b) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    // One pass: equal blocks are verified as they are compared; a written block is read
    // back once it is durable. No second read of the whole disks.
    let mut written = Vec::new();
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(BLOCK);
        src.read_exact_at(&mut a[..n], off).map_err(|e| io("reading", from, e))?;
        dst.read_exact_at(&mut b[..n], off).map_err(|e| io("reading", to, e))?;
        if a[..n] != b[..n] {
            dst.write_all_at(&a[..n], off).map_err(|e| io("writing", to, e))?;
            written.push((off, blake3::hash(&a[..n])));
        }
        off += n as u64;
    }
    dst.sync_all().map_err(|e| io("syncing", to, e))?;
    let mut sent = 0u64;
    for (off, hash) in written {
        let n = ((size - off) as usize).min(BLOCK);
        dst.read_exact_at(&mut b[..n], off).map_err(|e| io("reading", to, e))?;
        if blake3::hash(&b[..n]) != hash {
            return Err(format!("{} does not read back what was written at byte {off}", to.display()));
        }
        sent += n as u64;
    }
    Ok((size, sent))
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
            members: vec![],
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

#[cfg(test)]
mod sync_tests {
    use super::sync_disk;

    #[test]
    fn only_differing_blocks_are_written_and_the_target_ends_equal() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut data: Vec<u8> = (0..(1 << 20) + 777).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&a, &data).unwrap();
        let (compared, _) = sync_disk(&a, &b).unwrap();
        assert_eq!(compared, data.len() as u64);
        assert_eq!(std::fs::read(&b).unwrap(), data);
        data[300_000] ^= 1;
        std::fs::write(&a, &data).unwrap();
        let (_, sent) = sync_disk(&a, &b).unwrap();
        assert_eq!(sent, 64 * 1024, "one block differed");
        assert_eq!(std::fs::read(&b).unwrap(), data);
    }
}
