//! Restore to Azure: materialise a disk of a recovery point as a fixed-VHD page blob in
//! the store's own container, which is what an Azure managed disk is imported from
//! (`docs/storage-format.md`, "Recovered disks"). Only data is uploaded: zero chunks are
//! skipped, and so is every all-zero 64 KiB block of a data chunk (page blobs are sparse:
//! pages never written read as zeros and are not billed); several chunks at a time.
//! Every chunk is verified before a byte of it is written, and the footer goes last, so
//! a blob that has one is a complete image.

use std::ops::Range;

use azure_core::http::Url;
use azure_storage_blob::PageBlobClient;
use azure_storage_blob::models::HttpRange;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::backend::AzureBlobBackend;
use crate::backend::azure::{failed, is_not_found};
use crate::error::{Result, StoreError};
use crate::layout::{ServerRef, validate_segment};
use crate::manifest::{ChunkRef, DiskManifest, Manifest};
use crate::store::Store;
use crate::vhd::{FOOTER_LEN, MAX_PAGE_BLOB, fixed_footer, vhd_data_size};

/// Page blobs are written in whole 512-byte pages.
const PAGE: usize = 512;
/// Largest body one Put Page accepts (a multiple of [`ZERO_BLOCK`]).
const MAX_PUT_PAGE: usize = 4 * 1024 * 1024;
/// Granularity at which zeros inside a data chunk are left unwritten: fine enough to keep
/// a partly used chunk sparse, coarse enough not to split writes into tiny requests.
const ZERO_BLOCK: usize = 64 * 1024;

/// Why a disk is recovered: the two never share blobs, so cleaning up a test failover
/// cannot touch the disks of a real one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhdPurpose {
    /// Planned or unplanned failover (and change of recovery point).
    Failover,
    /// Test failover; removed by its cleanup.
    TestFailover,
}

impl VhdPurpose {
    fn segment(self) -> &'static str {
        match self {
            VhdPurpose::Failover => "failover",
            VhdPurpose::TestFailover => "test-failover",
        }
    }
}

/// `recovered/<namespace>/<server>/<failover|test-failover>/`: every VHD recovered for
/// `server` for `purpose` is under it.
pub fn recovered_prefix(server: &ServerRef, purpose: VhdPurpose) -> String {
    format!("recovered/{}/{}/{}/", server.namespace(), server.name(), purpose.segment())
}

/// The blob a disk of a point is recovered to:
/// `recovered/<namespace>/<server>/<failover|test-failover>/<point-id>/<disk-id>.vhd`.
pub fn recovered_vhd_name(server: &ServerRef, purpose: VhdPurpose, point_id: &str, disk_id: &str) -> Result<String> {
    validate_segment("point id", point_id)?;
    validate_segment("disk id", disk_id)?;
    Ok(format!("{}{point_id}/{disk_id}.vhd", recovered_prefix(server, purpose)))
}

/// What a restore to a page blob did.
#[derive(Debug, Clone, Default)]
pub struct VhdReport {
    /// Disk id.
    pub disk: String,
    /// Blob name in the container.
    pub blob: String,
    /// Blob URL without its query (no SAS), for status and for importing the disk.
    pub url: String,
    /// Logical bytes of the disk.
    pub disk_size: u64,
    /// Virtual size of the VHD: the disk size rounded up to a whole MiB.
    pub vhd_size: u64,
    /// Chunks downloaded, verified and written.
    pub chunks_written: u64,
    /// Zero chunks (never written: they read as zeros).
    pub chunks_zero: u64,
    /// Encoded bytes downloaded.
    pub bytes_downloaded: u64,
    /// Bytes written to the page blob (pages of data plus the footer).
    pub bytes_uploaded: u64,
}

impl Store {
    /// The Azure container of this store, or why there is none.
    fn azure(&self) -> Result<&AzureBlobBackend> {
        self.backend.as_azure().ok_or_else(|| {
            StoreError::InvalidArgument(
                "restoring to a page blob needs a store in Azure Blob Storage (the policy's target)".into(),
            )
        })
    }

    /// URL of blob `name` in the store's container, without the query (no SAS).
    pub fn blob_url(&self, name: &str) -> Result<String> {
        Ok(display_url(self.azure()?.blob_client(name).url()))
    }

    /// Restores every disk of `point` to its [`recovered_vhd_name`], one disk after the
    /// other (each one's chunks in parallel).
    pub async fn restore_point_to_vhds(
        &self,
        server: &ServerRef,
        point: &Manifest,
        purpose: VhdPurpose,
    ) -> Result<Vec<VhdReport>> {
        let mut reports = Vec::with_capacity(point.disks.len());
        for d in &point.disks {
            let blob = recovered_vhd_name(server, purpose, &point.id, &d.id)?;
            reports.push(self.restore_disk_to_vhd(server, point, &d.id, &blob).await?);
        }
        Ok(reports)
    }

    /// Restores disk `disk_id` of `point` into page blob `blob` of the store's container
    /// as a fixed VHD: the disk's bytes, zeros up to the next whole MiB, the footer. The
    /// blob is created afresh (a retry never keeps pages of an earlier attempt). Chunks
    /// are downloaded and written [`crate::StoreOptions::parallelism`] at a time; a chunk
    /// that fails verification is an error naming the object and none of it is written.
    /// On any failure the partial blob is deleted, so no incomplete image is left to be
    /// imported by mistake.
    #[tracing::instrument(skip_all, fields(server = %server, point = %point.id, disk = disk_id, blob = blob))]
    pub async fn restore_disk_to_vhd(
        &self,
        server: &ServerRef,
        point: &Manifest,
        disk_id: &str,
        blob: &str,
    ) -> Result<VhdReport> {
        let azure = self.azure()?;
        let disk =
            point.disks.iter().find(|d| d.id == disk_id).ok_or_else(|| {
                StoreError::InvalidArgument(format!("recovery point {} has no disk {disk_id}", point.id))
            })?;
        if disk.size == 0 {
            return Err(StoreError::InvalidArgument(format!("disk {disk_id} is empty; a VHD needs at least 1 MiB")));
        }
        if !(point.chunk_size as usize).is_multiple_of(PAGE) {
            return Err(StoreError::InvalidArgument(format!(
                "recovery point {} has {}-byte chunks; page blobs take whole 512-byte pages",
                point.id, point.chunk_size
            )));
        }
        let data_size = vhd_data_size(disk.size);
        let blob_size = data_size + FOOTER_LEN as u64;
        if blob_size > MAX_PAGE_BLOB {
            return Err(StoreError::InvalidArgument(format!(
                "disk {disk_id} is {} bytes; a VHD page blob holds at most {} bytes",
                disk.size,
                MAX_PAGE_BLOB - FOOTER_LEN as u64
            )));
        }
        let pages = azure.blob_client(blob).page_blob_client();
        let url = display_url(pages.url());
        pages.create(blob_size, None).await.map_err(|e| failed("create page blob", blob, &e))?;
        let mut report = VhdReport {
            disk: disk_id.to_string(),
            blob: blob.to_string(),
            url,
            disk_size: disk.size,
            vhd_size: data_size,
            ..Default::default()
        };
        match self.fill_vhd(server, point, disk, blob, &pages, data_size, &mut report).await {
            Ok(()) => Ok(report),
            Err(e) => {
                if let Err(d) = self.backend.delete(blob).await {
                    tracing::warn!(blob, error = %d, "partial VHD not deleted");
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fill_vhd(
        &self,
        server: &ServerRef,
        point: &Manifest,
        disk: &DiskManifest,
        blob: &str,
        pages: &PageBlobClient,
        data_size: u64,
        report: &mut VhdReport,
    ) -> Result<()> {
        let chunk_size = point.chunk_size;
        // Owned entries: futures over borrowed ones would not be `Send` for every lifetime.
        let work: Vec<(usize, ChunkRef)> =
            disk.chunks.iter().cloned().enumerate().filter(|(_, c)| *c != ChunkRef::Zero).collect();
        report.chunks_zero = (disk.chunks.len() - work.len()) as u64;
        let done: Vec<(u64, u64)> = futures::stream::iter(work)
            .map(|(index, chunk)| async move {
                let len = disk.chunk_len(index, chunk_size);
                let (mut plain, downloaded) = self.fetch_chunk(server, &disk.id, &chunk, len).await?;
                // The last chunk of an odd-sized disk ends mid-page; the rest of the page is
                // past the disk's end and reads as zeros.
                plain.resize(len.next_multiple_of(PAGE), 0);
                let offset = index as u64 * u64::from(chunk_size);
                let uploaded = put_pages(pages, blob, offset, Bytes::from(plain)).await?;
                Ok::<_, StoreError>((downloaded, uploaded))
            })
            .buffer_unordered(self.options.parallelism.max(1))
            .try_collect()
            .await?;
        report.chunks_written = done.len() as u64;
        report.bytes_downloaded = done.iter().map(|d| d.0).sum();
        report.bytes_uploaded = done.iter().map(|d| d.1).sum();
        // The footer last: its presence says every data page is in place.
        let footer = fixed_footer(data_size, point.time, unique_id(&report.url));
        let footer = Bytes::copy_from_slice(&footer);
        pages
            .upload_pages(footer.into(), FOOTER_LEN as u64, HttpRange::new(data_size, FOOTER_LEN as u64), None)
            .await
            .map_err(|e| failed("write VHD footer", blob, &e))?;
        report.bytes_uploaded += FOOTER_LEN as u64;
        tracing::info!(
            blob,
            written = report.chunks_written,
            zero = report.chunks_zero,
            uploaded = report.bytes_uploaded,
            "disk restored as a fixed VHD page blob"
        );
        Ok(())
    }

    /// Page ranges of blob `name` that hold written pages, merged and in order
    /// (`start..end`, end exclusive). Shows what a sparse restore wrote.
    pub async fn page_ranges(&self, name: &str) -> Result<Vec<Range<u64>>> {
        let pages = self.azure()?.blob_client(name).page_blob_client();
        let mut pager = pages.list_page_ranges(None).map_err(|e| failed("list page ranges", name, &e))?;
        let mut out: Vec<Range<u64>> = Vec::new();
        while let Some(page) = pager.try_next().await.map_err(|e| failed("list page ranges", name, &e))? {
            let list = page.into_model().map_err(|e| failed("list page ranges", name, &e))?;
            for r in list.page_ranges {
                let (Some(start), Some(end)) = (r.start, r.end) else { continue };
                let (start, end) = (start as u64, end as u64 + 1);
                match out.last_mut() {
                    Some(last) if last.end == start => last.end = end,
                    _ => out.push(start..end),
                }
            }
        }
        Ok(out)
    }

    /// Deletes every VHD recovered for `server` for `purpose`, except those of point
    /// `keep`; returns the names deleted. Test-failover cleanup passes no `keep`; a
    /// failover passes the point it just restored, so disks it superseded (an earlier
    /// failover, a change of recovery point) do not linger.
    pub async fn delete_recovered_vhds(
        &self,
        server: &ServerRef,
        purpose: VhdPurpose,
        keep: Option<&str>,
    ) -> Result<Vec<String>> {
        self.azure()?;
        let prefix = recovered_prefix(server, purpose);
        let kept = keep.map(|p| format!("{prefix}{p}/"));
        let mut deleted = Vec::new();
        for name in self.backend.list(&prefix).await? {
            if kept.as_deref().is_some_and(|k| name.starts_with(k)) {
                continue;
            }
            self.backend.delete(&name).await?;
            deleted.push(name);
        }
        Ok(deleted)
    }

    /// Whether blob `name` exists in the store's container.
    pub async fn blob_exists(&self, name: &str) -> Result<bool> {
        match self.azure()?.blob_client(name).exists().await {
            Ok(b) => Ok(b),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(failed("exists", name, &e).into()),
        }
    }
}

/// Writes `data` (a whole number of pages) at `offset`, skipping every all-zero 64 KiB
/// block (it reads as zeros already and is not billed): the runs of non-zero blocks go up
/// in Put Page calls of at most 4 MiB. Returns the bytes written.
async fn put_pages(pages: &PageBlobClient, blob: &str, offset: u64, data: Bytes) -> Result<u64> {
    let block_end = |at: usize| (at + ZERO_BLOCK).min(data.len());
    let mut written = 0;
    let mut at = 0;
    while at < data.len() {
        if crate::tree::is_zero(&data[at..block_end(at)]) {
            at = block_end(at);
            continue;
        }
        let start = at;
        let mut end = block_end(at);
        while end < data.len() && end - start < MAX_PUT_PAGE && !crate::tree::is_zero(&data[end..block_end(end)]) {
            end = block_end(end);
        }
        let n = (end - start) as u64;
        pages
            .upload_pages(data.slice(start..end).into(), n, HttpRange::new(offset + start as u64, n), None)
            .await
            .map_err(|e| failed("write pages", blob, &e))?;
        written += n;
        at = end;
    }
    Ok(written)
}

/// The URL without its query (no SAS), with the blob name's `/` as written: the SDK
/// sends them as `%2F`, which the service reads the same, but people and ARM's
/// `sourceUri` expect the plain form.
fn display_url(url: &Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    let path = u.path().replace("%2F", "/");
    u.set_path(&path);
    u.to_string()
}

/// The footer's unique id: derived from the blob's URL, so a retried restore writes the
/// same footer, and images in different places differ. Marked as an RFC 9562 version-8
/// (custom) UUID.
fn unique_id(url: &str) -> [u8; 16] {
    let digest = blake3::derive_key("siterecovery.io fixed VHD unique id", url.as_bytes());
    let mut id: [u8; 16] = digest[..16].try_into().expect("16 bytes");
    id[6] = (id[6] & 0x0f) | 0x80;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_separate_servers_points_and_purposes() {
        let s = ServerRef::new("prod", "db-1").unwrap();
        assert_eq!(
            recovered_vhd_name(&s, VhdPurpose::Failover, "20261127T101500123Z-crash", "sda").unwrap(),
            "recovered/prod/db-1/failover/20261127T101500123Z-crash/sda.vhd"
        );
        let test = recovered_vhd_name(&s, VhdPurpose::TestFailover, "p", "sda").unwrap();
        assert!(test.starts_with(&recovered_prefix(&s, VhdPurpose::TestFailover)));
        assert!(!test.starts_with(&recovered_prefix(&s, VhdPurpose::Failover)));
        assert!(recovered_vhd_name(&s, VhdPurpose::Failover, "../x", "sda").is_err());
        assert!(recovered_vhd_name(&s, VhdPurpose::Failover, "p", "a/b").is_err());
    }

    #[test]
    fn unique_ids_are_stable_per_blob() {
        let a = unique_id("http://127.0.0.1:10000/devstoreaccount1/c/recovered/a.vhd");
        assert_eq!(a, unique_id("http://127.0.0.1:10000/devstoreaccount1/c/recovered/a.vhd"));
        assert_ne!(a, unique_id("http://127.0.0.1:10000/devstoreaccount1/c/recovered/b.vhd"));
        assert_eq!(a[6] >> 4, 8, "version 8");
    }
}
