//! Patch objects (format 2): the changed ranges of a chunk, stored instead of the whole
//! chunk when little of it changed, and the one function that makes a chunk from any
//! manifest entry (a whole chunk, zeros, or a base with a chain of patches).
//!
//! Plaintext of a patch (before zstd and AES-256-GCM, like every object):
//!
//! ```text
//! count u32 BE | count × (offset u32 BE | length u32 BE) | the ranges' bytes, concatenated
//! ```
//!
//! Ranges are non-empty, ascending, disjoint and inside the chunk.

use bytes::Bytes;

use crate::error::{Result, StoreError};
use crate::layout::{ChunkHash, ServerRef, validate_segment};
use crate::manifest::{ChunkRef, PackedAt, PatchChain};
use crate::store::Store;

/// A writer puts a patch on a chain only while the chain has fewer patches than this;
/// otherwise it stores the whole chunk and the chain starts again. A restore of a chunk
/// then reads at most this many patches besides its base.
pub const MAX_CHAIN_PATCHES: usize = 8;

/// Whether a writer may add a patch of `new_bytes` changed bytes to a chain that has
/// `patches` patches covering `patch_bytes` bytes, on a chunk of `chunk_len` bytes: the
/// chain stays under [`MAX_CHAIN_PATCHES`] patches and its patches under half the chunk
/// (beyond that the whole chunk costs less to store and to restore).
pub fn chain_may_grow(patches: usize, patch_bytes: u64, new_bytes: u64, chunk_len: u64) -> bool {
    patches < MAX_CHAIN_PATCHES && patch_bytes + new_bytes <= chunk_len / 2
}

/// The plaintext of a patch: its header, then `data`, the ranges' bytes in order.
pub fn encode_patch(ranges: &[[u32; 2]], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * ranges.len() + data.len());
    out.extend_from_slice(&(ranges.len() as u32).to_be_bytes());
    for [off, len] in ranges {
        out.extend_from_slice(&off.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

/// Applies a patch's plaintext to `chunk` in place. A header that does not add up
/// (ranges outside the chunk, out of order, or not matching the data) is an error.
pub fn apply_patch(chunk: &mut [u8], patch: &[u8]) -> std::result::Result<(), String> {
    let u32_at = |at: usize| -> std::result::Result<u32, String> {
        patch
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
            .ok_or_else(|| "patch header is cut off".to_string())
    };
    let count = u32_at(0)? as usize;
    let header = 4usize.checked_add(count.checked_mul(8).ok_or("range count overflows")?).ok_or("overflow")?;
    if header > patch.len() {
        return Err(format!("patch header lists {count} ranges but the patch is {} bytes", patch.len()));
    }
    let mut data = header;
    let mut end = 0usize;
    for i in 0..count {
        let (off, len) = (u32_at(4 + 8 * i)? as usize, u32_at(8 + 8 * i)? as usize);
        if len == 0 || off < end || off + len > chunk.len() {
            return Err(format!("range [{off}, +{len}) is empty, out of order or outside the chunk"));
        }
        let bytes = patch.get(data..data + len).ok_or("the ranges cover more bytes than the patch holds")?;
        chunk[off..off + len].copy_from_slice(bytes);
        data += len;
        end = off + len;
    }
    if data != patch.len() {
        return Err(format!("{} bytes after the last range", patch.len() - data));
    }
    Ok(())
}

/// The key of the pack a patch is in, and its place there; `None`: an object of its own.
type InPack = Option<(String, PackedAt)>;

/// One patch to store: the ranges of chunk `base` (`None`: zeros) that make chunk
/// `result`, and their bytes concatenated.
#[derive(Debug, Clone)]
pub struct PatchData {
    /// The chunk the patch makes.
    pub result: ChunkHash,
    /// The chunk it applies to; `None` for zeros.
    pub base: Option<ChunkHash>,
    /// `[offset, length]` of each changed range, in order.
    pub ranges: Vec<[u32; 2]>,
    /// The ranges' bytes.
    pub data: PatchBytes,
}

/// The bytes of a patch's ranges, concatenated.
#[derive(Debug, Clone)]
pub enum PatchBytes {
    /// As they are.
    Plain(Bytes),
    /// zstd frames that the caller checked decompress to them (as an agent sent them):
    /// stored without decompressing and compressing them again.
    Zstd(Bytes),
}

impl Store {
    /// Seals and uploads the patch that turns chunk `base` (`None`: zeros) into chunk
    /// `result`: `ranges` of the chunk, `data` their bytes concatenated. Returns the bytes
    /// uploaded. The caller must have checked that applying it to the base gives `result`.
    pub async fn put_patch(
        &self,
        server: &ServerRef,
        disk: &str,
        result: &ChunkHash,
        base: Option<&ChunkHash>,
        ranges: &[[u32; 2]],
        data: &[u8],
    ) -> Result<u64> {
        validate_segment("disk id", disk)?;
        let key = server.patch_key(disk, result, base);
        let sealed = self.seal_blocking(key.clone(), encode_patch(ranges, data)).await?;
        self.put_data(&key, sealed).await
    }

    /// Seals each of `patches` (of one disk) as [`Store::put_patch`] would, its own key as
    /// associated data, and uploads them together as one pack (format 3): one request
    /// instead of one per patch. Returns where each patch is, in order, and the bytes
    /// uploaded. The caller must have checked each patch as for [`Store::put_patch`].
    pub async fn put_patch_pack(
        &self,
        server: &ServerRef,
        disk: &str,
        patches: Vec<PatchData>,
    ) -> Result<(Vec<PackedAt>, u64)> {
        validate_segment("disk id", disk)?;
        let keys: Vec<String> = patches.iter().map(|p| server.patch_key(disk, &p.result, p.base.as_ref())).collect();
        let codec = self.codec.clone();
        let (pack, spans) = blocking(move || {
            let mut pack = Vec::new();
            let mut spans = Vec::with_capacity(keys.len());
            for (key, p) in keys.iter().zip(&patches) {
                let sealed = match &p.data {
                    PatchBytes::Plain(data) => codec.seal(key, &encode_patch(&p.ranges, data))?,
                    PatchBytes::Zstd(frame) => codec.seal_prefixed(key, &encode_patch(&p.ranges, &[]), frame)?,
                };
                spans.push((pack.len() as u64, sealed.len() as u64));
                pack.extend_from_slice(&sealed);
            }
            Ok((pack, spans))
        })
        .await?;
        let name = ChunkHash::of(&pack);
        let n = self.put_data(&server.pack_key(disk, &name), Bytes::from(pack)).await?;
        Ok((spans.into_iter().map(|(offset, len)| PackedAt { pack: name, offset, len }).collect(), n))
    }

    /// The plaintext of chunk `len` bytes long described by a manifest entry, and the
    /// encoded bytes downloaded: every way a chunk is read goes through here. A whole
    /// chunk is checked against its name and length; a chain's base and patches are
    /// fetched at once and applied in order, and the result checked against the chain's
    /// hash (when it differs, each step against the hash its patch is named for, to name
    /// the patch at fault). Any failure is an error naming the object at fault.
    pub async fn fetch_chunk(
        &self,
        server: &ServerRef,
        disk: &str,
        chunk: &ChunkRef,
        len: usize,
    ) -> Result<(Vec<u8>, u64)> {
        validate_segment("disk id", disk)?;
        match chunk {
            ChunkRef::Zero => Ok((vec![0u8; len], 0)),
            ChunkRef::Data(hash) => self.fetch_whole(server, disk, hash, len).await,
            ChunkRef::Chain(chain) => self.fetch_chain(server, disk, chain, len).await,
        }
    }

    async fn fetch_whole(
        &self,
        server: &ServerRef,
        disk: &str,
        hash: &ChunkHash,
        len: usize,
    ) -> Result<(Vec<u8>, u64)> {
        let key = server.chunk_key(disk, hash);
        let (plain, n) = self.get_plain(&key).await?;
        let hash = *hash;
        blocking(move || {
            crate::restore::verify_chunk(&key, &hash, len, &plain)?;
            Ok((plain, n))
        })
        .await
    }

    async fn fetch_chain(
        &self,
        server: &ServerRef,
        disk: &str,
        chain: &PatchChain,
        len: usize,
    ) -> Result<(Vec<u8>, u64)> {
        // Keys first: futures made by a closure over borrowed steps would not be `Send`
        // for every lifetime, which a spawned restore needs.
        let steps: Vec<(String, ChunkHash, InPack)> = chain
            .steps()
            .enumerate()
            .map(|(i, (before, after))| {
                let packed = chain.packed_at(i).map(|at| (server.pack_key(disk, &at.pack), *at));
                (server.patch_key(disk, &after, before.as_ref()), after, packed)
            })
            .collect();
        let patches = futures::future::try_join_all(
            steps.into_iter().map(|(key, after, packed)| self.get_patch(key, after, packed)),
        );
        let base = self.base_or_zeros(server, disk, chain.base.as_ref(), len);
        let ((base, base_bytes), patches) = futures::future::try_join(base, patches).await?;
        let downloaded = base_bytes + patches.iter().map(|p| p.3).sum::<u64>();
        // The result is checked once: it is right exactly when its hash is the chain's.
        let (right, patches) = blocking(move || {
            let mut chunk = base;
            for (key, _, patch, _) in &patches {
                apply_patch(&mut chunk, patch).map_err(|why| StoreError::corrupt(key, why))?;
            }
            let right = patches.last().is_some_and(|(_, after, _, _)| ChunkHash::of(&chunk) == *after);
            Ok((right.then_some(chunk), patches))
        })
        .await?;
        if let Some(chunk) = right {
            return Ok((chunk, downloaded));
        }
        // Wrong: the base again, and every step checked, to name the patch at fault.
        let (mut chunk, _) = self.base_or_zeros(server, disk, chain.base.as_ref(), len).await?;
        blocking(move || {
            for (key, after, patch, _) in &patches {
                apply_patch(&mut chunk, patch).map_err(|why| StoreError::corrupt(key, why))?;
                let actual = ChunkHash::of(&chunk);
                if actual != *after {
                    return Err(StoreError::corrupt(key, format!("applied to its base it gives chunk {actual}")));
                }
            }
            Ok((chunk, downloaded))
        })
        .await
    }

    /// The chunk a chain starts from: its base, or zeros (`None`).
    async fn base_or_zeros(
        &self,
        server: &ServerRef,
        disk: &str,
        base: Option<&ChunkHash>,
        len: usize,
    ) -> Result<(Vec<u8>, u64)> {
        match base {
            None => Ok((vec![0u8; len], 0)),
            Some(h) => self.fetch_whole(server, disk, h, len).await,
        }
    }

    /// A patch, from its own object or from its place in a pack (opened with its own key
    /// either way; an error names the pack too).
    async fn get_patch(
        &self,
        key: String,
        after: ChunkHash,
        packed: InPack,
    ) -> Result<(String, ChunkHash, Vec<u8>, u64)> {
        let (plain, n) = match packed {
            None => self.get_plain(&key).await?,
            Some((pack, at)) => {
                let named = format!("{key} (in pack {pack} at {}+{})", at.offset, at.len);
                self.get_open(&pack, Some((at.offset, at.len)), &key).await.map_err(|e| match e {
                    StoreError::Corrupt { reason, .. } => StoreError::corrupt(&named, reason),
                    e => e,
                })?
            }
        };
        Ok((key, after, plain, n))
    }

    /// Downloads and opens (authenticates, decompresses) one object.
    async fn get_plain(&self, key: &str) -> Result<(Vec<u8>, u64)> {
        self.get_open(key, None, key).await
    }

    /// Reads object `object` (or `range` of it: a patch in a pack) and opens it as `key`:
    /// from its local copy when there is one that opens, else from the backend. Gives the
    /// plaintext and the bytes downloaded (0 from a copy).
    async fn get_open(&self, object: &str, range: Option<(u64, u64)>, key: &str) -> Result<(Vec<u8>, u64)> {
        if let Some(copies) = self.copies.clone() {
            let (codec, object, key) = (self.codec.clone(), object.to_string(), key.to_string());
            let opened = blocking(move || {
                let Some(sealed) = copies.read(&object, range) else { return Ok(None) };
                match codec.open(&key, &sealed) {
                    Ok(plain) => Ok(Some(plain)),
                    Err(e) => {
                        tracing::warn!(object, error = %e, "local copy does not open; reading the object from the store");
                        copies.drop_damaged(&object);
                        Ok(None)
                    }
                }
            })
            .await?;
            if let Some(plain) = opened {
                return Ok((plain, 0));
            }
        }
        let sealed = match range {
            None => self.backend.get(object).await?,
            Some((offset, len)) => self.backend.get_range(object, offset, len).await?,
        };
        self.open_plain(key, sealed).await
    }

    /// Opens (authenticates, decompresses) the sealed bytes of object `key`.
    async fn open_plain(&self, key: &str, sealed: Bytes) -> Result<(Vec<u8>, u64)> {
        let n = sealed.len() as u64;
        let (codec, key) = (self.codec.clone(), key.to_string());
        blocking(move || Ok((codec.open(&key, &sealed)?, n))).await
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_rewrites_its_ranges_only() {
        let mut chunk = vec![1u8; 16];
        let patch = encode_patch(&[[2, 3], [10, 2]], b"abcxy");
        apply_patch(&mut chunk, &patch).unwrap();
        assert_eq!(&chunk, b"\x01\x01abc\x01\x01\x01\x01\x01xy\x01\x01\x01\x01");
    }

    #[test]
    fn a_patch_that_does_not_add_up_is_refused() {
        let mut chunk = vec![0u8; 16];
        for (bad, why) in [
            (encode_patch(&[[14, 4]], b"abcd"), "outside"),
            (encode_patch(&[[4, 2], [2, 2]], b"abcd"), "out of order"),
            (encode_patch(&[[4, 2]], b"abcd"), "after the last range"),
            (encode_patch(&[[4, 4]], b"ab"), "more bytes"),
            (vec![0, 0], "cut off"),
        ] {
            let err = apply_patch(&mut chunk, &bad).unwrap_err();
            assert!(err.contains(why), "{err} should say {why}");
        }
    }

    #[test]
    fn chains_stop_at_eight_patches_or_half_the_chunk() {
        let c = 4u64 << 20;
        assert!(chain_may_grow(0, 0, 64 << 10, c));
        assert!(chain_may_grow(7, 1 << 20, 64 << 10, c));
        assert!(!chain_may_grow(MAX_CHAIN_PATCHES, 1 << 20, 64 << 10, c), "eight patches at most");
        assert!(!chain_may_grow(1, 2 << 20, 64 << 10, c), "past half the chunk");
        assert!(chain_may_grow(1, (2 << 20) - (64 << 10), 64 << 10, c), "exactly half is allowed");
    }
}
