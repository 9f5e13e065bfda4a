//! Retention and garbage collection. The rule: a chunk or patch is deleted only when no
//! retained manifest references it (a chain references its base and every one of its
//! patches). Manifests are deleted first, data after, so a crash in between leaves
//! unreferenced objects (collected next time), never a dangling point.

use std::collections::HashSet;

use futures::{StreamExt as _, TryStreamExt as _};

use crate::error::Result;
use crate::layout::{ChunkHash, ServerRef};
use crate::manifest::PatchChain;
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
    /// Patches still referenced by a chain of a retained point.
    pub patches_kept: u64,
    /// Patches deleted.
    pub patches_deleted: u64,
    /// Packs of patches (format 3) of which a retained point still needs a patch.
    pub packs_kept: u64,
    /// Packs deleted: no retained point needs any patch in them.
    pub packs_deleted: u64,
    /// Objects under the server's `disks/` that are neither chunks nor patches of this
    /// format; left alone.
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
        // Every object key a retained point needs.
        let mut referenced: HashSet<String> = HashSet::new();
        for p in &points {
            for d in &p.disks {
                for c in &d.chunks {
                    match c {
                        ChunkRef::Zero => {}
                        ChunkRef::Data(h) => drop(referenced.insert(server.chunk_key(&d.id, h))),
                        ChunkRef::Chain(chain) => referenced.extend(chain_keys(server, &d.id, chain)),
                    }
                }
            }
        }
        let mut report = GcReport { points_retained: points.len() as u64, ..Default::default() };
        let disks_prefix = format!("{}disks/", server.prefix());
        let mut doomed = Vec::new();
        for key in self.backend.list(&disks_prefix).await? {
            let Some(kind) = classify(&key[disks_prefix.len()..]) else {
                report.foreign_objects += 1;
                continue;
            };
            let keep = referenced.contains(&key);
            match (kind, keep) {
                (Kind::Chunk, true) => report.chunks_kept += 1,
                (Kind::Chunk, false) => report.chunks_deleted += 1,
                (Kind::Patch, true) => report.patches_kept += 1,
                (Kind::Patch, false) => report.patches_deleted += 1,
                (Kind::Pack, true) => report.packs_kept += 1,
                (Kind::Pack, false) => report.packs_deleted += 1,
            }
            if !keep {
                doomed.push(key);
            }
        }
        futures::stream::iter(doomed)
            .map(|key| async move {
                self.backend.delete(&key).await?;
                if let Some(copies) = &self.copies {
                    copies.forget(&key);
                }
                Ok::<_, crate::backend::BackendError>(())
            })
            .buffer_unordered(self.options.parallelism)
            .try_collect::<Vec<()>>()
            .await?;
        tracing::info!(
            deleted = report.chunks_deleted,
            kept = report.chunks_kept,
            patches_deleted = report.patches_deleted,
            patches_kept = report.patches_kept,
            packs_deleted = report.packs_deleted,
            packs_kept = report.packs_kept,
            "garbage collected"
        );
        Ok(report)
    }
}

/// The objects a chain is made of: its base chunk (unless zeros) and every patch, or the
/// pack a patch is in.
fn chain_keys<'a>(server: &'a ServerRef, disk: &'a str, chain: &'a PatchChain) -> impl Iterator<Item = String> + 'a {
    let base = chain.base.as_ref().map(|h| server.chunk_key(disk, h));
    base.into_iter().chain(chain.steps().enumerate().map(move |(i, (before, after))| match chain.packed_at(i) {
        Some(at) => server.pack_key(disk, &at.pack),
        None => server.patch_key(disk, &after, before.as_ref()),
    }))
}

/// What an object under `disks/` is.
enum Kind {
    Chunk,
    Patch,
    Pack,
}

/// `<disk>/chunks/<hash>` is a chunk, `<disk>/patches/<hash>-<hash|zero>` a patch,
/// `<disk>/packs/<hash>` a pack of patches; anything else is not an object of this format.
fn classify(rest: &str) -> Option<Kind> {
    let (disk, tail) = rest.split_once('/')?;
    if disk.is_empty() {
        return None;
    }
    if let Some(name) = tail.strip_prefix("chunks/") {
        return ChunkHash::from_hex(name).map(|_| Kind::Chunk);
    }
    if let Some(name) = tail.strip_prefix("packs/") {
        return ChunkHash::from_hex(name).map(|_| Kind::Pack);
    }
    let (result, base) = tail.strip_prefix("patches/")?.split_once('-')?;
    (ChunkHash::from_hex(result).is_some() && (base == "zero" || ChunkHash::from_hex(base).is_some()))
        .then_some(Kind::Patch)
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
