//! What a stopping agent hands to the next one, so a clean restart (an upgrade, a
//! DaemonSet rollout) needs no comparison of every chunk: what it believes the process
//! server holds, and the blocks written since it last sent everything. Together with the
//! eBPF tracker pinned in a bpf filesystem (docs/change-tracking.md "Across restarts"),
//! which records the writes made while no agent runs, the next agent's first pass reads
//! only what changed. See docs/replication-protocol.md "Agent restarts".
//!
//! It also hands over the block chaining values the agent held (its block cache, bounded),
//! so the first change of a chunk after the restart is read by its dirty blocks too.
//!
//! File: `"SRAS" | version u8 = 2 | header length u32 BE | header (JSON) | head length u32
//! BE | head (`Head::encode`: the believed slots) | cached chunks | blake3 of everything
//! before (32 bytes)`; a cached chunk is `disk u32 | index u64 | length u64 | hash (32) |
//! block count u32 | chaining values (32 each) | zero flags (1 each)`, least recently used
//! first.
//! Written atomically (temporary file, fsync, rename, fsync of the directory) and removed
//! as soon as it is read: an agent that crashes later must not resume from it.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use siterecovery_store::ChunkHash;
use siterecovery_wire::{DiskHead, Head, Slot};

use crate::tree::Blocks;

const MAGIC: &[u8; 4] = b"SRAS";
const VERSION: u8 = 2;

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
    /// Chunks whose blocks the agent held: disk, index, length, hash, blocks.
    pub cached: Vec<Cached>,
}

/// A chunk as the stopping agent last read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    /// Disk, in configuration order.
    pub disk: usize,
    /// Chunk index.
    pub index: u64,
    /// Length in bytes.
    pub len: u64,
    /// Its content hash.
    pub hash: ChunkHash,
    /// Its blocks.
    pub blocks: Blocks,
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
        let head = head.encode();
        let mut out = Vec::with_capacity(header.len() + head.len() + 64);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(header.len() as u32).to_be_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&(head.len() as u32).to_be_bytes());
        out.extend_from_slice(&head);
        for c in &self.cached {
            out.extend_from_slice(&(c.disk as u32).to_be_bytes());
            out.extend_from_slice(&c.index.to_be_bytes());
            out.extend_from_slice(&c.len.to_be_bytes());
            out.extend_from_slice(&c.hash.0);
            out.extend_from_slice(&(c.blocks.cvs.len() as u32).to_be_bytes());
            for cv in &c.blocks.cvs {
                out.extend_from_slice(cv);
            }
            out.extend(c.blocks.zero.iter().map(|&z| u8::from(z)));
        }
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
        let (header, rest) = rest.split_at_checked(u32::from_be_bytes(*len) as usize).ok_or("truncated")?;
        let header: Header = serde_json::from_slice(header).map_err(|e| e.to_string())?;
        let (len, rest) = rest.split_first_chunk::<4>().ok_or("truncated")?;
        let (head, mut rest) = rest.split_at_checked(u32::from_be_bytes(*len) as usize).ok_or("truncated")?;
        let head = Head::decode(Bytes::copy_from_slice(head)).map_err(|e| e.to_string())?;
        let mut cached = Vec::new();
        while !rest.is_empty() {
            let (c, after) = parse_cached(rest).ok_or("a cached chunk is truncated")?;
            cached.push(c);
            rest = after;
        }
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
            cached,
        })
    }
}

fn parse_cached(b: &[u8]) -> Option<(Cached, &[u8])> {
    let (disk, b) = b.split_first_chunk::<4>()?;
    let (index, b) = b.split_first_chunk::<8>()?;
    let (len, b) = b.split_first_chunk::<8>()?;
    let (hash, b) = b.split_first_chunk::<32>()?;
    let (n, b) = b.split_first_chunk::<4>()?;
    let n = u32::from_be_bytes(*n) as usize;
    let (cvs, b) = b.split_at_checked(n.checked_mul(32)?)?;
    let (zero, b) = b.split_at_checked(n)?;
    let blocks = Blocks {
        cvs: cvs.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect(),
        zero: zero.iter().map(|&z| z != 0).collect(),
    };
    let c = Cached {
        disk: u32::from_be_bytes(*disk) as usize,
        index: u64::from_be_bytes(*index),
        len: u64::from_be_bytes(*len),
        hash: ChunkHash(*hash),
        blocks,
    };
    Some((c, b))
}

#[cfg(test)]
mod tests {
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
            cached: vec![Cached {
                disk: 0,
                index: 0,
                len: 2 * 65536 + 10,
                hash: ChunkHash([7; 32]),
                blocks: Blocks { cvs: vec![[1; 32], [2; 32], [3; 32]], zero: vec![false, true, false] },
            }],
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
