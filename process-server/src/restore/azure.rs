//! The `azure` failover target, data stage: each disk of the chosen point becomes a
//! fixed-VHD page blob in the policy's container
//! (`recovered/<ns>/<server>/<failover|test-failover>/<point>/<disk>.vhd`,
//! docs/storage-format.md), which is what an Azure managed disk is imported from.
//!
//! Not done here: creating the managed disks and the VM through Azure Resource Manager.
//! The block's message says so and names the blobs, so an operator can import them by
//! hand (docs/lifecycle.md, "The azure target").

use serde_json::{Value, json};
use siterecovery_api::plan::PlanOperationType as Op;
use siterecovery_store::{Manifest, ServerRef, Store, VhdPurpose};

/// Whether a `recoveredDisks` entry is a blob URL (azure target) rather than a path.
pub(super) fn is_blob_url(entry: &str) -> bool {
    entry.starts_with("https://") || entry.starts_with("http://")
}

/// What the azure target says it does not do yet, in every outcome it reports.
const ARM_NOT_IMPLEMENTED: &str = "creating the managed disks and the VM through Azure Resource Manager is not \
     implemented: import each VHD as a managed disk (az disk create --source <url>) and create the VM from them";

/// Test-failover cleanup: deletes every test VHD of the server (those listed in the
/// block and any left by an attempt that failed before reporting them).
pub(super) async fn cleanup_test(store: &Store, server: &ServerRef) -> Result<Value, String> {
    let deleted =
        store.delete_recovered_vhds(server, VhdPurpose::TestFailover, None).await.map_err(|e| e.to_string())?;
    Ok(json!({"message": format!("deleted {} test VHD page blob(s)", deleted.len()), "recoveredDisks": []}))
}

/// Materialises every disk of `point` as a fixed-VHD page blob; returns the block's
/// `message`, `recoveredDisks` (blob URLs, no SAS) and `progress`. A failover also
/// deletes the VHDs of the points it supersedes (an earlier failover, or the point
/// before a change of recovery point).
pub(super) async fn materialise(
    store: &Store,
    server: &ServerRef,
    point: &Manifest,
    operation: Op,
    skipped: &[String],
) -> Result<Value, String> {
    let purpose = if operation == Op::TestFailover { VhdPurpose::TestFailover } else { VhdPurpose::Failover };
    let started = std::time::Instant::now();
    let reports = store.restore_point_to_vhds(server, point, purpose).await.map_err(|e| e.to_string())?;
    let total = point.total_size();
    let downloaded: u64 = reports.iter().map(|r| r.bytes_downloaded).sum();
    let written: u64 = reports.iter().map(|r| r.bytes_uploaded).sum();
    tracing::info!(
        server = %server, point = %point.id, disks = reports.len(), bytes = total, pages_written = written,
        seconds = started.elapsed().as_secs_f64(), "recovery point restored as fixed-VHD page blobs"
    );
    if purpose == VhdPurpose::Failover {
        match store.delete_recovered_vhds(server, purpose, Some(&point.id)).await {
            Ok(gone) if !gone.is_empty() => {
                tracing::info!(server = %server, deleted = ?gone, "VHDs of superseded recovery points deleted");
            }
            Ok(_) => {}
            // The new disks are complete; leftovers cost storage, not correctness.
            Err(e) => tracing::warn!(server = %server, error = %e, "VHDs of superseded points not deleted"),
        }
    }
    let urls: Vec<String> = reports.iter().map(|r| r.url.clone()).collect();
    let mut message = format!(
        "restored {} as {} fixed-VHD page blob(s) ({downloaded} bytes downloaded, {written} bytes of pages \
         written): {}; {ARM_NOT_IMPLEMENTED}",
        point.id,
        urls.len(),
        urls.join(", ")
    );
    if !skipped.is_empty() {
        message.push_str(&format!("; skipped {} unreadable point(s): {}", skipped.len(), skipped.join(", ")));
    }
    Ok(json!({
        "message": message,
        "recoveredDisks": urls,
        "progress": {"bytesTotal": total, "bytesDone": total, "percent": "100%"},
    }))
}

#[cfg(test)]
mod tests {
    use super::is_blob_url;

    #[test]
    fn blob_urls_are_told_from_paths() {
        assert!(is_blob_url("https://acct.blob.core.windows.net/dr/recovered/ns/s/failover/p/os.vhd"));
        assert!(is_blob_url("http://127.0.0.1:10000/devstoreaccount1/dr/recovered/x.vhd"));
        assert!(!is_blob_url("/srv/recovered/test-failover/s/os.img"));
    }
}
