//! Retention and garbage collection. The rule: a chunk is deleted only when no retained
//! manifest references it. Manifests are deleted first, chunks after, so a crash in
//! between leaves unreferenced chunks (collected next time), never a dangling point.

use std::collections::{HashMap, HashSet};

use futures::{StreamExt as _, TryStreamExt as _};

use crate::error::Result;
use crate::layout::{ChunkHash, ServerRef};
use crate::manifest::{ChunkRef, Manifest};
use crate::store::Store;

/// What a garbage collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Recovery points (manifests) deleted by retention.
    pub points_deleted: u64,
    /// Recovery points kept.
    pub points_retained: u64,
    /// Chunks still referenced by a retained point.
    pub chunks_kept: u64,
    /// Chunks deleted.
    pub chunks_deleted: u64,
    /// Objects under the server's `disks/` that are not chunks of this format; left alone.
    pub foreign_objects: u64,
}

impl Store {
    /// Deletes one recovery point's manifest; its chunks go at the next [`Store::gc`].
    pub async fn delete_point(&self, server: &ServerRef, id: &str) -> Result<()> {
        crate::layout::validate_segment("point id", id)?;
        Ok(self.backend.delete(&server.point_key(id)).await?)
    }

    /// Applies a retention decision (e.g. the thinning computed by `siterecovery-core`):
    /// deletes every point for which `keep` is false, then collects garbage.
    pub async fn prune(&self, server: &ServerRef, keep: impl Fn(&Manifest) -> bool) -> Result<GcReport> {
        let points = self.list_points(server).await?;
        let mut deleted = 0;
        for p in points.iter().filter(|p| !keep(p)) {
            self.delete_point(server, &p.id).await?;
            deleted += 1;
        }
        let mut report = self.gc(server).await?;
        report.points_deleted = deleted;
        Ok(report)
    }

    /// Deletes every chunk of `server` that no remaining manifest references. Reads all
    /// manifests first and aborts on any unreadable one, since its references are unknown.
    ///
    /// Must not run while a point of the same server is being written: that point's
    /// chunks are not referenced until its manifest lands (see `docs/storage-format.md`).
    #[tracing::instrument(skip_all, fields(server = %server))]
    pub async fn gc(&self, server: &ServerRef) -> Result<GcReport> {
        let points = self.list_points(server).await?;
        let mut referenced: HashMap<&str, HashSet<ChunkHash>> = HashMap::new();
        for p in &points {
            for d in &p.disks {
                let set = referenced.entry(d.id.as_str()).or_default();
                set.extend(d.chunks.iter().filter_map(|c| match c {
                    ChunkRef::Data(h) => Some(*h),
                    ChunkRef::Zero => None,
                }));
            }
        }
        let mut report = GcReport { points_retained: points.len() as u64, ..Default::default() };
        let disks_prefix = format!("{}disks/", server.prefix());
        let mut doomed = Vec::new();
        for key in self.backend.list(&disks_prefix).await? {
            match parse_chunk_key(&key[disks_prefix.len()..]) {
                Some((disk, hash)) if referenced.get(disk).is_some_and(|s| s.contains(&hash)) => {
                    report.chunks_kept += 1
                }
                Some(_) => doomed.push(key),
                None => report.foreign_objects += 1,
            }
        }
        report.chunks_deleted = doomed.len() as u64;
        futures::stream::iter(doomed)
            .map(|key| async move { self.backend.delete(&key).await })
            .buffer_unordered(self.options.parallelism)
            .try_collect::<Vec<()>>()
            .await?;
        tracing::info!(deleted = report.chunks_deleted, kept = report.chunks_kept, "garbage collected");
        Ok(report)
    }
}

/// `<disk>/chunks/<hash>` → (disk, hash).
fn parse_chunk_key(rest: &str) -> Option<(&str, ChunkHash)> {
    let (disk, name) = rest.split_once("/chunks/")?;
    if disk.contains('/') {
        return None;
    }
    Some((disk, ChunkHash::from_hex(name)?))
}

/// Deletes everything stored for `server` (decommissioning): manifests first, so a crash
/// half-way leaves only unreferenced chunks, never a point whose chunks are gone. Needs
/// no keys. Returns the number of objects deleted.
pub async fn delete_server_data(
    backend: &dyn crate::backend::BlobBackend,
    server: &ServerRef,
) -> std::result::Result<u64, crate::backend::BackendError> {
    let mut deleted = 0;
    for prefix in [server.points_prefix(), server.prefix()] {
        for key in backend.list(&prefix).await? {
            backend.delete(&key).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}
