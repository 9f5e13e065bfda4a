//! Object names of layout `v2` (see `docs/storage-format.md`). All keys are built here so
//! the layout is defined in exactly one place.

use crate::error::{Result, StoreError};

/// Version of the layout and object encoding written by this crate. Version 1 (whole
/// chunks only) is still read.
pub const FORMAT_VERSION: u32 = 3;

/// Default chunk size: disks are cut into fixed 4 MiB chunks (the last one may be shorter).
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024 * 1024;

/// Checks a single path segment: 1–128 chars of `[A-Za-z0-9._-]`, not starting with `.`.
/// Kubernetes names and disk ids fit; nothing can escape its directory or collide with `/`.
pub fn validate_segment(what: &'static str, value: &str) -> Result<()> {
    let invalid = |reason| Err(StoreError::InvalidName { what, value: value.to_string(), reason });
    if value.is_empty() || value.len() > 128 {
        return invalid("must be 1 to 128 characters");
    }
    if value.starts_with('.') {
        return invalid("must not start with '.'");
    }
    if !value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return invalid("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

/// A protected server: its Kubernetes namespace and name. All of its objects live under
/// `servers/<namespace>/<server>/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerRef {
    namespace: String,
    name: String,
}

impl ServerRef {
    /// Validates both names.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Result<Self> {
        let (namespace, name) = (namespace.into(), name.into());
        validate_segment("namespace", &namespace)?;
        validate_segment("server name", &name)?;
        Ok(Self { namespace, name })
    }

    /// Kubernetes namespace of the ProtectedServer.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Name of the ProtectedServer.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `servers/<namespace>/<server>/`.
    pub fn prefix(&self) -> String {
        format!("servers/{}/{}/", self.namespace, self.name)
    }

    /// Prefix of every chunk of one disk: `servers/<ns>/<server>/disks/<disk>/chunks/`.
    pub fn chunks_prefix(&self, disk: &str) -> String {
        format!("{}disks/{disk}/chunks/", self.prefix())
    }

    /// Key of one chunk, named by the hex blake3 of its plaintext.
    pub fn chunk_key(&self, disk: &str, hash: &ChunkHash) -> String {
        format!("{}{}", self.chunks_prefix(disk), hash.to_hex())
    }

    /// Prefix of every patch of one disk: `servers/<ns>/<server>/disks/<disk>/patches/`.
    pub fn patches_prefix(&self, disk: &str) -> String {
        format!("{}disks/{disk}/patches/", self.prefix())
    }

    /// Key of the patch that turns chunk `base` (or zeros) into chunk `result`:
    /// `…/patches/<result>-<base|zero>`.
    pub fn patch_key(&self, disk: &str, result: &ChunkHash, base: Option<&ChunkHash>) -> String {
        let base = base.map_or_else(|| "zero".to_string(), ChunkHash::to_hex);
        format!("{}{}-{base}", self.patches_prefix(disk), result.to_hex())
    }

    /// Prefix of every pack of patches of one disk (format 3):
    /// `servers/<ns>/<server>/disks/<disk>/packs/`.
    pub fn packs_prefix(&self, disk: &str) -> String {
        format!("{}disks/{disk}/packs/", self.prefix())
    }

    /// Key of a pack of patches, named by the hex blake3 of its bytes.
    pub fn pack_key(&self, disk: &str, name: &ChunkHash) -> String {
        format!("{}{}", self.packs_prefix(disk), name.to_hex())
    }

    /// Prefix of the recovery-point manifests: `servers/<ns>/<server>/points/`.
    pub fn points_prefix(&self) -> String {
        format!("{}points/", self.prefix())
    }

    /// Key of one recovery-point manifest.
    pub fn point_key(&self, point: &str) -> String {
        format!("{}{point}.json", self.points_prefix())
    }
}

impl std::fmt::Display for ServerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// blake3 hash of a chunk's plaintext; the chunk's name in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes plaintext.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        blake3::Hash::from_hex(s).ok().map(|h| Self(*h.as_bytes()))
    }
}

impl std::fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_documented_layout() {
        let s = ServerRef::new("prod", "db-1").unwrap();
        let h = ChunkHash::of(b"x");
        assert_eq!(s.chunk_key("sda", &h), format!("servers/prod/db-1/disks/sda/chunks/{h}"));
        assert_eq!(s.point_key("p1"), "servers/prod/db-1/points/p1.json");
        let b = ChunkHash::of(b"y");
        assert_eq!(s.patch_key("sda", &h, Some(&b)), format!("servers/prod/db-1/disks/sda/patches/{h}-{b}"));
        assert_eq!(s.patch_key("sda", &h, None), format!("servers/prod/db-1/disks/sda/patches/{h}-zero"));
        assert_eq!(ChunkHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(ChunkHash::from_hex("zz"), None);
    }

    #[test]
    fn names_that_could_escape_are_rejected() {
        for bad in ["", "..", ".hidden", "a/b", "a b", "é"] {
            assert!(ServerRef::new("ns", bad).is_err(), "{bad:?} accepted");
        }
    }
}
