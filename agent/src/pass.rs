//! Comparison passes (initial copy, resyncs) as the agent reports them to the status
//! reporter, and requests for one from outside.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::changes::Dirty;

/// A disk and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskSize {
    /// Disk id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
}

/// A pass that compares chunks with the process server's copy and sends what differs:
/// the initial copy, or a resync (its reason says why).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PassStatus {
    /// Counts passes of this process from 1 (tells a new pass from the previous one).
    pub id: u64,
    /// `InitialCopy`, `AgentStarted`, `TrackingLost`, `DiskResized` or `Manual`.
    pub reason: String,
    /// Detail (which disk, who asked).
    pub message: String,
    /// When it started.
    pub started: jiff::Timestamp,
    /// When every chunk of it was sent and acknowledged.
    pub completed: Option<jiff::Timestamp>,
    /// Bytes to compare, per disk in configuration order.
    pub bytes_total: Vec<u64>,
    /// Bytes compared so far, per disk.
    pub bytes_compared: Vec<u64>,
    /// Bytes found different and sent (whole chunks and delta ranges, before compression).
    pub bytes_resent: u64,
}

/// Asks a running agent for a comparison of every chunk (a manual resync), with the
/// reason and message its [`PassStatus`] will carry.
#[derive(Debug, Clone, Default)]
pub struct PassRequest(Arc<Mutex<Option<(String, String)>>>);

impl PassRequest {
    /// Requests a full comparison pass at the start of the agent's next cycle.
    pub fn request(&self, reason: &str, message: &str) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((reason.to_owned(), message.to_owned()));
    }

    /// Whether a request waits for the agent.
    pub fn is_pending(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    pub(crate) fn take(&self) -> Option<(String, String)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What a comparison pass for `reason` is doing, in a sentence.
pub(crate) fn pass_message(reason: &str) -> String {
    match reason {
        "InitialCopy" => "copying every disk".into(),
        "AgentStarted" => "the agent started: comparing every chunk with the process server's copy".into(),
        _ => "change tracking was lost: comparing every chunk with the process server's copy".into(),
    }
}

/// Bytes a pass over `which` reads, per disk.
pub fn pass_bytes(which: &Dirty, sizes: &[u64], chunk_size: u32) -> Vec<u64> {
    let chunk = u64::from(chunk_size);
    match which {
        Dirty::All => sizes.to_vec(),
        Dirty::Chunks(sets) => sizes
            .iter()
            .enumerate()
            .map(|(d, &size)| {
                let count = size.div_ceil(chunk);
                sets.get(d)
                    .map(|s| s.keys().filter(|&&i| i < count).map(|&i| (size - i * chunk).min(chunk)).sum())
                    .unwrap_or(0)
            })
            .collect(),
    }
}
