//! Recovery-point manifests: which chunks make up every disk of a server at one instant.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::layout::ChunkHash;

/// Kind of recovery point, as in Azure Site Recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    /// Crash-consistent: every disk reflects one instant.
    Crash,
    /// App-consistent: taken with the filesystems frozen around the user's hooks.
    App,
    /// One point across every server of a consistency group.
    Group,
}

impl std::fmt::Display for PointKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PointKind::Crash => "crash",
            PointKind::App => "app",
            PointKind::Group => "group",
        })
    }
}

/// One chunk slot of a disk: stored data, or a run of zeros that was never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef {
    /// All bytes of this chunk are zero; nothing is stored.
    Zero,
    /// The chunk stored under this content hash.
    Data(ChunkHash),
}

/// Serialized as the string `"zero"` or the 64-hex-character hash.
impl Serialize for ChunkRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ChunkRef::Zero => s.serialize_str("zero"),
            ChunkRef::Data(h) => s.serialize_str(&h.to_hex()),
        }
    }
}

impl<'de> Deserialize<'de> for ChunkRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if s == "zero" {
            return Ok(ChunkRef::Zero);
        }
        ChunkHash::from_hex(&s)
            .map(ChunkRef::Data)
            .ok_or_else(|| serde::de::Error::custom(format!("chunk reference {s:?} is neither \"zero\" nor a hash")))
    }
}

/// One disk of a recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskManifest {
    /// Disk id (unique within the server), also its folder under `disks/`.
    pub id: String,
    /// Size in bytes; the last chunk holds `size - (n-1) * chunk_size` bytes.
    pub size: u64,
    /// One entry per chunk, in disk order.
    pub chunks: Vec<ChunkRef>,
}

impl DiskManifest {
    /// Byte length of chunk `index` of this disk.
    pub fn chunk_len(&self, index: usize, chunk_size: u32) -> usize {
        let start = index as u64 * u64::from(chunk_size);
        (self.size - start).min(u64::from(chunk_size)) as usize
    }
}

/// A recovery point. It exists once this manifest is stored; chunks are written first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout/format version, `1`.
    pub format: u32,
    /// Point id, also the manifest's file name.
    pub id: String,
    /// Crash, app or group consistent.
    pub kind: PointKind,
    /// Consistency-group name for `group` points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// For `group` points: every server of the group when the point was taken. The group
    /// point is whole when each of them has a point with this id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// The instant the point represents (RFC 3339, UTC).
    pub time: jiff::Timestamp,
    /// Id of the key the chunks written for this point were encrypted with.
    pub key_id: String,
    /// Chunk size in bytes of every disk of this point.
    pub chunk_size: u32,
    /// Every disk of the server.
    pub disks: Vec<DiskManifest>,
}

impl Manifest {
    /// Total logical size of all disks.
    pub fn total_size(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }

    /// Checks internal consistency after decoding: the chunk count matches every disk size.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.format != crate::layout::FORMAT_VERSION {
            return Err(format!("unsupported format version {}", self.format));
        }
        if self.chunk_size == 0 {
            return Err("chunk_size is 0".into());
        }
        for d in &self.disks {
            let want = d.size.div_ceil(u64::from(self.chunk_size));
            if d.chunks.len() as u64 != want {
                return Err(format!(
                    "disk {} of {} bytes lists {} chunks, expected {want}",
                    d.id,
                    d.size,
                    d.chunks.len()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_json_is_readable() {
        let h = ChunkHash::of(b"abc");
        let m = Manifest {
            format: 1,
            id: "p".into(),
            kind: PointKind::App,
            group: None,
            members: vec![],
            time: "2026-11-27T10:00:00Z".parse().unwrap(),
            key_id: "k1".into(),
            chunk_size: 4,
            disks: vec![DiskManifest { id: "sda".into(), size: 6, chunks: vec![ChunkRef::Zero, ChunkRef::Data(h)] }],
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains(r#""kind":"app""#) && json.contains(r#"["zero",""#), "{json}");
        let back: Manifest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.disks[0].chunk_len(1, 4), 2);
        back.check().unwrap();
        let mut short = back;
        short.disks[0].size = 9;
        assert!(short.check().unwrap_err().contains("expected 3"));
    }
}
