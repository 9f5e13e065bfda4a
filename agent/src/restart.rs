//! What a stopping agent hands to the next one, so a clean restart (an upgrade, a
//! DaemonSet rollout) needs no comparison of every chunk: what it believes the process
//! server holds, and the blocks written since it last sent everything. Together with the
//! eBPF tracker pinned in a bpf filesystem (docs/change-tracking.md "Across restarts"),
//! which records the writes made while no agent runs, the next agent's first pass reads
//! only what changed. See docs/replication-protocol.md "Agent restarts".
//!
//! File: `"SRAS" | version u8 = 1 | header length u32 BE | header (JSON) | head
//! (`Head::encode`: the believed slots) | blake3 of everything before (32 bytes)`.
//! Written atomically (temporary file, fsync, rename, fsync of the directory) and removed
//! as soon as it is read: an agent that crashes later must not resume from it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use siterecovery_wire::{DiskHead, Head, Slot};

const MAGIC: &[u8; 4] = b"SRAS";
const VERSION: u8 = 1;

/// The identity of what was protected: a state saved for other disks, another server
/// or another chunk size is not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Protected {
    /// Namespace of the ProtectedServer.
    pub namespace: String,
    /// Its name.
    pub server: String,
    /// The process server's chunk size.
    pub chunk_size: u32,
    /// Disks in order: id, path and size.
    pub disks: Vec<(String, PathBuf, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Header {
    protected: Protected,
    /// When the state was saved.
    saved: jiff::Timestamp,
    /// Per disk, the 64 KiB-granularity blocks written since the last complete pass.
    dirty_blocks: Vec<Vec<u64>>,
    /// Their granularity in bytes.
    granularity: u64,
}

/// What one agent leaves to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// What was protected.
    pub protected: Protected,
    /// Per disk and chunk, what the agent believed the process server holds.
    pub believed: Vec<Vec<Slot>>,
    /// Per disk, the blocks written since everything before was sent.
    pub dirty_blocks: Vec<Vec<u64>>,
    /// The blocks' size in bytes.
    pub granularity: u64,
    /// When it was saved.
    pub saved: jiff::Timestamp,
}

/// Why a saved state was not used.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Reading, writing or removing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The file is not a state this agent wrote (truncated, corrupt, another version).
    #[error("{path} is not a usable agent state: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Handover {
    /// Writes the state to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), HandoverError> {
        let io = |source| HandoverError::Io { path: path.to_owned(), source };
        let header = Header {
            protected: self.protected.clone(),
            saved: self.saved,
            dirty_blocks: self.dirty_blocks.clone(),
            granularity: self.granularity,
        };
        let header = serde_json::to_vec(&header).map_err(|e| io(std::io::Error::other(e)))?;
        let head = Head {
            disks: self
                .protected
                .disks
                .iter()
                .zip(&self.believed)
                .map(|((id, _, size), slots)| DiskHead { id: id.clone(), size: *size, slots: slots.clone() })
                .collect(),
        };
        let mut out = Vec::with_capacity(header.len() + 64);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(header.len() as u32).to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&head.encode());
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());

        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&out).and_then(|()| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
    }

    /// Reads and removes the state at `path`; `Ok(None)` when there is none. A state that
    /// does not verify is removed too, and reported.
    pub fn take(path: &Path) -> Result<Option<Self>, HandoverError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(HandoverError::Io { path: path.to_owned(), source }),
        };
        // Removed before it is used: whatever happens next, it is never used twice.
        std::fs::remove_file(path).map_err(|source| HandoverError::Io { path: path.to_owned(), source })?;
        Self::parse(&bytes).map(Some).map_err(|reason| HandoverError::Invalid { path: path.to_owned(), reason })
    }

    fn parse(bytes: &[u8]) -> Result<Self, String> {
        let (body, sum) = bytes.split_at_checked(bytes.len().wrapping_sub(32)).ok_or("truncated")?;
        if blake3::hash(body).as_bytes() != sum {
            return Err("checksum mismatch".into());
        }
        let rest = body.strip_prefix(MAGIC.as_slice()).ok_or("not an agent state")?;
        let (&version, rest) = rest.split_first().ok_or("truncated")?;
        if version != VERSION {
            return Err(format!("version {version}, this agent reads {VERSION}"));
        }
        let (len, rest) = rest.split_first_chunk::<4>().ok_or("truncated")?;
        let (header, head) = rest.split_at_checked(u32::from_be_bytes(*len) as usize).ok_or("truncated")?;
        let header: Header = serde_json::from_slice(header).map_err(|e| e.to_string())?;
        let head = Head::decode(Bytes::copy_from_slice(head)).map_err(|e| e.to_string())?;
        let p = &header.protected;
        let consistent = head.disks.len() == p.disks.len()
            && header.dirty_blocks.len() == p.disks.len()
            && head.disks.iter().zip(&p.disks).all(|(h, (id, _, size))| {
                h.id == *id && h.size == *size && h.slots.len() as u64 == size.div_ceil(u64::from(p.chunk_size))
            });
        if !consistent {
            return Err("the believed slots do not match the disks".into());
        }
        Ok(Self {
            believed: head.disks.into_iter().map(|d| d.slots).collect(),
            protected: header.protected,
            dirty_blocks: header.dirty_blocks,
            granularity: header.granularity,
            saved: header.saved,
        })
    }
}

#[cfg(test)]
mod tests {
    use siterecovery_store::ChunkHash;

    use super::*;

    fn sample() -> Handover {
        Handover {
            protected: Protected {
                namespace: "dr".into(),
                server: "db".into(),
                chunk_size: 4 << 20,
                disks: vec![("sda".into(), "/dev/sda".into(), 10 << 20), ("sdb".into(), "/dev/sdb".into(), 1)],
            },
            believed: vec![vec![Slot::Data(ChunkHash([7; 32])), Slot::Zero, Slot::Missing], vec![Slot::Zero]],
            dirty_blocks: vec![vec![1, 64, 65], vec![]],
            granularity: 65536,
            saved: jiff::Timestamp::from_second(1_800_000_000).unwrap(),
        }
    }

    #[test]
    fn round_trips_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        sample().save(&path).unwrap();
        assert_eq!(Handover::take(&path).unwrap(), Some(sample()));
        assert_eq!(Handover::take(&path).unwrap(), None, "a state is used at most once");
    }

    #[test]
    fn a_damaged_state_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        sample().save(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = Handover::take(&path).unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        assert!(!path.exists());
        std::fs::write(&path, &bytes[..10]).unwrap();
        assert!(Handover::take(&path).is_err());
    }
}
