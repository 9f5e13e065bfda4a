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

/// One chunk slot of a disk: stored data, a run of zeros that was never stored, or a
/// chain of patches on a stored chunk (format 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkRef {
    /// All bytes of this chunk are zero; nothing is stored.
    Zero,
    /// The chunk stored whole under this content hash (`chunks/<hash>`).
    Data(ChunkHash),
    /// The chunk is its base (a stored chunk, or zeros) with patches applied in order.
    Chain(PatchChain),
}

impl ChunkRef {
    /// The content hash of the chunk this entry makes, `None` for a zero chunk.
    pub fn hash(&self) -> Option<ChunkHash> {
        match self {
            ChunkRef::Zero => None,
            ChunkRef::Data(h) => Some(*h),
            ChunkRef::Chain(c) => Some(c.hash),
        }
    }
}

/// `chunks/<base>` (or zeros) followed by `patches/<h_1>-<base>`, `patches/<h_2>-<h_1>`, …,
/// `patches/<h_n>-<h_n-1>`: the chunk whose content hash is `hash` (= `h_n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchChain {
    /// Content hash of the chunk the chain makes: the last patch's result.
    pub hash: ChunkHash,
    /// The whole chunk the first patch applies to; `None` for an all-zero chunk.
    pub base: Option<ChunkHash>,
    /// Result hash of each patch, in the order they apply; the last is `hash`.
    pub patches: Vec<ChunkHash>,
    /// Where each patch is when it was stored in a pack (format 3), in the order of
    /// `patches`; empty when every patch is an object of its own.
    pub packed: Vec<Option<PackedAt>>,
}

/// A patch stored in a pack (format 3): the pack's name (the blake3 of its bytes) and the
/// place of the patch's sealed bytes in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedAt {
    /// The pack, `disks/<disk>/packs/<pack>`.
    #[serde(with = "hex_hash")]
    pub pack: ChunkHash,
    /// First byte of the sealed patch in the pack.
    pub offset: u64,
    /// Length of the sealed patch.
    pub len: u64,
}

mod hex_hash {
    use super::ChunkHash;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(h: &ChunkHash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&h.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ChunkHash, D::Error> {
        super::parse_hash(&String::deserialize(d)?)
    }
}

impl PatchChain {
    /// The hash each patch applies to, paired with the patch's result hash, in order.
    pub fn steps(&self) -> impl Iterator<Item = (Option<ChunkHash>, ChunkHash)> + '_ {
        let before = std::iter::once(self.base).chain(self.patches.iter().map(|h| Some(*h)));
        before.zip(self.patches.iter().copied())
    }

    /// Where patch `i` is, if it was stored in a pack.
    pub fn packed_at(&self, i: usize) -> Option<&PackedAt> {
        self.packed.get(i).and_then(Option::as_ref)
    }

    fn check(&self) -> Result<(), String> {
        match self.patches.last() {
            None => Err(format!("chain of chunk {} lists no patch", self.hash)),
            Some(last) if *last != self.hash => {
                Err(format!("chain of chunk {} ends with patch {last}, not with the chunk", self.hash))
            }
            Some(_) if !self.packed.is_empty() && self.packed.len() != self.patches.len() => Err(format!(
                "chain of chunk {} places {} patches in packs, but lists {}",
                self.hash,
                self.packed.len(),
                self.patches.len()
            )),
            Some(_) => Ok(()),
        }
    }
}

/// The JSON form of a chain entry.
#[derive(Serialize, Deserialize)]
struct ChainJson {
    hash: String,
    base: String,
    patches: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    packed: Vec<Option<PackedAt>>,
}

/// Either JSON form of an entry: a string or a chain object.
#[derive(Deserialize)]
#[serde(untagged)]
enum EntryJson {
    Str(String),
    Chain(ChainJson),
}

fn parse_hash<E: serde::de::Error>(s: &str) -> Result<ChunkHash, E> {
    ChunkHash::from_hex(s).ok_or_else(|| E::custom(format!("chunk reference {s:?} is neither \"zero\" nor a hash")))
}

/// Serialized as the string `"zero"`, the 64-hex-character hash, or
/// `{"hash": h_n, "base": h_0 | "zero", "patches": [h_1, …, h_n]}`.
impl Serialize for ChunkRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ChunkRef::Zero => s.serialize_str("zero"),
            ChunkRef::Data(h) => s.serialize_str(&h.to_hex()),
            ChunkRef::Chain(c) => ChainJson {
                hash: c.hash.to_hex(),
                base: c.base.map_or_else(|| "zero".to_string(), |h| h.to_hex()),
                patches: c.patches.iter().map(ChunkHash::to_hex).collect(),
                packed: c.packed.clone(),
            }
            .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ChunkRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match EntryJson::deserialize(d)? {
            EntryJson::Str(s) if s == "zero" => Ok(ChunkRef::Zero),
            EntryJson::Str(s) => parse_hash(&s).map(ChunkRef::Data),
            EntryJson::Chain(c) => Ok(ChunkRef::Chain(PatchChain {
                hash: parse_hash(&c.hash)?,
                base: if c.base == "zero" { None } else { Some(parse_hash(&c.base)?) },
                patches: c.patches.iter().map(|p| parse_hash(p)).collect::<Result<_, _>>()?,
                packed: c.packed,
            })),
        }
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
    /// Layout/format version: `2` is written, `1` (no patch chains) is still read.
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
        if !(1..=crate::layout::FORMAT_VERSION).contains(&self.format) {
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
            for (i, c) in d.chunks.iter().enumerate() {
                if let ChunkRef::Chain(chain) = c {
                    if self.format < 2 {
                        return Err(format!(
                            "disk {} chunk {i} is a patch chain in a format {} manifest",
                            d.id, self.format
                        ));
                    }
                    chain.check().map_err(|why| format!("disk {} chunk {i}: {why}", d.id))?;
                }
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
