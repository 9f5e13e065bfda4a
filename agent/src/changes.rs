//! Change tracking: which chunks may have been written since the last look, and whether
//! nothing at all was written in between (the quiet window a crash-consistent point
//! needs, see docs/replication-protocol.md "Recovery points").

use std::collections::BTreeSet;

use crate::disk::Disk;

/// What may have changed since the previous [`ChangeTracker::take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dirty {
    /// Unknown: every chunk must be compared (first look, lost events, image rewritten).
    All,
    /// These chunks, per disk in order; all empty means nothing was written.
    Chunks(Vec<BTreeSet<u64>>),
}

impl Dirty {
    /// Whether nothing was written since the previous look.
    pub fn is_quiet(&self) -> bool {
        matches!(self, Dirty::Chunks(sets) if sets.iter().all(BTreeSet::is_empty))
    }
}

/// A source of change information.
pub trait ChangeTracker: Send + Sync {
    /// What may have changed since the previous call (the first call returns `All`).
    fn take(&mut self, disks: &[Disk], chunk_size: u32) -> std::io::Result<Dirty>;
    /// Whether a quiet [`Dirty`] is proof that nothing was written (else points cannot
    /// be taken without freezing).
    fn proves_quiet(&self) -> bool;
    /// Name for logs and status.
    fn name(&self) -> &'static str;
}

/// The portable tracker for image files: the file's modification time and size. Any
/// write changes them (the kernel records a fine-grained time once the previous one was
/// observed), so a changed stamp means "compare every chunk by checksum". The kernel
/// updates the stamp *before* it copies a write's data, so one stable look is not
/// enough: after a change, one more full comparison runs once the stamp is stable, and
/// only the look after that counts as quiet (a write in flight at the change has landed
/// by then unless it outlasts a whole pass). Block devices have no such stamp: every look
/// is `All` and nothing is proven quiet; use the eBPF tracker for them.
#[derive(Debug, Default)]
pub struct StampTracker {
    last: Option<Vec<Option<(i64, i64, u64)>>>,
    settling: bool,
    block_devices: bool,
}

impl StampTracker {
    /// A tracker for `disks`.
    pub fn new(disks: &[Disk]) -> Self {
        Self { last: None, settling: false, block_devices: disks.iter().any(Disk::is_block_device) }
    }
}

impl ChangeTracker for StampTracker {
    fn take(&mut self, disks: &[Disk], _chunk_size: u32) -> std::io::Result<Dirty> {
        if self.block_devices {
            return Ok(Dirty::All);
        }
        let now: Vec<_> = disks.iter().map(|d| d.change_stamp().ok()).collect();
        let changed = self.last.as_ref() != Some(&now) || now.iter().any(Option::is_none);
        self.last = Some(now);
        if changed {
            self.settling = true;
            return Ok(Dirty::All);
        }
        if std::mem::take(&mut self.settling) {
            return Ok(Dirty::All);
        }
        Ok(Dirty::Chunks(vec![BTreeSet::new(); disks.len()]))
    }

    fn proves_quiet(&self) -> bool {
        !self.block_devices
    }

    fn name(&self) -> &'static str {
        "checksum-scan"
    }
}
