//! Restore: materialise a disk of a recovery point onto an image file or block device,
//! bit-exact, with bounded parallel chunk downloads. Every chunk is made by
//! [`Store::fetch_chunk`] (authenticated, decompressed, patches applied, checked against
//! its content hash) before a byte of it is written.

use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt as _, TryStreamExt as _};

use crate::error::{Result, StoreError};
use crate::layout::{ChunkHash, ServerRef};
use crate::manifest::{ChunkRef, DiskManifest, Manifest};
use crate::store::Store;

/// What a restore did.
#[derive(Debug, Clone, Default)]
pub struct RestoreReport {
    /// Logical bytes of the disk.
    pub size: u64,
    /// Chunks downloaded and written.
    pub chunks_written: u64,
    /// Zero chunks (left as holes in a fresh file, written as zeros on a device).
    pub chunks_zero: u64,
    /// Encoded bytes downloaded.
    pub bytes_downloaded: u64,
}

impl Store {
    /// Restores disk `disk_id` of `point` to `target`. A regular file is created or
    /// truncated and written sparse; a block device must be at least the disk's size and
    /// has zero chunks written explicitly. The target is fsynced before returning.
    #[tracing::instrument(skip_all, fields(server = %server, point = %point.id, disk = disk_id))]
    pub async fn restore_disk(
        &self,
        server: &ServerRef,
        point: &Manifest,
        disk_id: &str,
        target: &Path,
    ) -> Result<RestoreReport> {
        let disk =
            point.disks.iter().find(|d| d.id == disk_id).ok_or_else(|| {
                StoreError::InvalidArgument(format!("recovery point {} has no disk {disk_id}", point.id))
            })?;
        let (file, is_device) = open_target(target, disk.size).await?;
        let file = Arc::new(file);
        let chunk_size = point.chunk_size;
        let mut report = RestoreReport { size: disk.size, ..Default::default() };
        // Owned entries: futures over borrowed ones would not be `Send` for every lifetime.
        let work: Vec<(usize, ChunkRef)> =
            disk.chunks.iter().cloned().enumerate().filter(|(_, c)| is_device || *c != ChunkRef::Zero).collect();
        report.chunks_zero = disk.chunks.iter().filter(|c| **c == ChunkRef::Zero).count() as u64;
        let downloaded: Vec<u64> = futures::stream::iter(work)
            .map(|(index, chunk)| {
                let file = file.clone();
                async move { self.restore_chunk(server, disk, chunk_size, index, chunk, file, target).await }
            })
            .buffer_unordered(self.options.parallelism)
            .try_collect()
            .await?;
        report.chunks_written = disk.chunks.len() as u64 - report.chunks_zero;
        report.bytes_downloaded = downloaded.iter().sum();
        let path = target.to_path_buf();
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(|e| StoreError::io("fsync", &path, e))?;
        Ok(report)
    }

    /// Restores every disk of `point`: `targets` maps disk ids to target paths, and must
    /// name every disk (a partial failover is a caller decision, not an accident).
    pub async fn restore_point(
        &self,
        server: &ServerRef,
        point: &Manifest,
        targets: &[(String, PathBuf)],
    ) -> Result<Vec<RestoreReport>> {
        for d in &point.disks {
            if !targets.iter().any(|(id, _)| *id == d.id) {
                return Err(StoreError::InvalidArgument(format!("no restore target for disk {}", d.id)));
            }
        }
        let mut reports = Vec::new();
        for (id, path) in targets {
            reports.push(self.restore_disk(server, point, id, path).await?);
        }
        Ok(reports)
    }

    #[allow(clippy::too_many_arguments)]
    async fn restore_chunk(
        &self,
        server: &ServerRef,
        disk: &DiskManifest,
        chunk_size: u32,
        index: usize,
        chunk: ChunkRef,
        file: Arc<std::fs::File>,
        target: &Path,
    ) -> Result<u64> {
        let len = disk.chunk_len(index, chunk_size);
        let offset = index as u64 * u64::from(chunk_size);
        let path = target.to_path_buf();
        let (plain, n) = self.fetch_chunk(server, &disk.id, &chunk, len).await?;
        tokio::task::spawn_blocking(move || file.write_all_at(&plain, offset))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
            .map_err(|e| StoreError::io("write", &path, e))?;
        Ok(n)
    }
}

/// A chunk is good only if its plaintext hashes to its name and has the expected length.
pub(crate) fn verify_chunk(key: &str, hash: &ChunkHash, len: usize, plain: &[u8]) -> Result<()> {
    let actual = ChunkHash::of(plain);
    if actual != *hash {
        return Err(StoreError::corrupt(key, format!("content hash is {actual}")));
    }
    if plain.len() != len {
        return Err(StoreError::corrupt(key, format!("{} bytes, manifest expects {len}", plain.len())));
    }
    Ok(())
}

async fn open_target(path: &Path, size: u64) -> Result<(std::fs::File, bool)> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<(std::fs::File, bool)> {
        let is_device = std::fs::metadata(&p).map(|m| m.file_type().is_block_device()).unwrap_or(false);
        if is_device {
            use std::io::{Seek, SeekFrom};
            let mut f = std::fs::OpenOptions::new().write(true).open(&p)?;
            let dev_size = f.seek(SeekFrom::End(0))?;
            if dev_size < size {
                return Err(std::io::Error::other(format!(
                    "block device holds {dev_size} bytes, the disk needs {size}"
                )));
            }
            return Ok((f, true));
        }
        let f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&p)?;
        // Truncated then extended: every byte not written reads as zero, holes included.
        f.set_len(size)?;
        Ok((f, false))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
    .map_err(|e| StoreError::io("open restore target", path, e))
}
