//! Object envelope of format v1: zstd, then AES-256-GCM with a random 96-bit nonce.
//!
//! ```text
//! "SRBO" | version u8 = 1 | key-id length u8 | key id | nonce (12) | ciphertext + tag (16)
//! ```
//! The associated data is the header followed by the object key, so the version, the key
//! id and the object's name are all authenticated: an object copied under another name
//! fails to open.

use std::io::Read;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};

use crate::error::{Result, StoreError};
use crate::keys::Keyring;

const MAGIC: &[u8; 4] = b"SRBO";
const ENVELOPE_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Largest plaintext accepted on read (a manifest of a multi-TiB server still fits);
/// guards against a decompression bomb in a forged object.
pub const MAX_PLAINTEXT: u64 = 1 << 30;

/// Seals and opens objects with a keyring.
#[derive(Debug, Clone)]
pub struct Codec {
    keyring: Keyring,
    level: i32,
}

impl Codec {
    /// `level` is the zstd level (1 is fastest; 3 is zstd's default).
    pub fn new(keyring: Keyring, level: i32) -> Self {
        Self { keyring, level }
    }

    /// The keyring in use.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// Compresses and encrypts `plain` under the active key for storage at `object`.
    pub fn seal(&self, object: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let compressed = zstd::bulk::compress(plain, self.level)
            .map_err(|e| StoreError::Task(format!("zstd compression of {object} failed: {e}")))?;
        self.seal_compressed(object, &compressed)
    }

    /// Encrypts `compressed`, one zstd frame the caller has already checked decompresses
    /// to the object's plaintext, under the active key for storage at `object`.
    pub fn seal_compressed(&self, object: &str, compressed: &[u8]) -> Result<Vec<u8>> {
        let failed = || StoreError::Task(format!("encryption of {object} failed"));
        let (key_id, key) = self.keyring.active();
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| failed())?;
        let mut out = Vec::with_capacity(6 + key_id.len() + NONCE_LEN + compressed.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.push(ENVELOPE_VERSION);
        // Key ids are validated to at most 64 bytes when the keyring is built.
        out.push(key_id.len() as u8);
        out.extend_from_slice(key_id.as_bytes());
        out.extend_from_slice(&nonce);
        let header = out.len();
        let aad = [out.as_slice(), object.as_bytes()].concat();
        out.extend_from_slice(compressed);
        // Encrypted in place (AES-256-GCM of aws-lc, as the TLS of the same bytes).
        let tag = cipher(&key.0)
            .and_then(|c| {
                c.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut out[header..])
                    .ok()
            })
            .ok_or_else(failed)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Seals the object whose plaintext is `prefix` followed by what `frame` (zstd frames
    /// the caller has checked) decompresses to: `prefix` is compressed as a frame of its
    /// own and put before them (zstd decompresses concatenated frames one after the
    /// other), so `frame` is neither decompressed nor compressed again.
    pub fn seal_prefixed(&self, object: &str, prefix: &[u8], frame: &[u8]) -> Result<Vec<u8>> {
        let mut compressed = zstd::bulk::compress(prefix, self.level)
            .map_err(|e| StoreError::Task(format!("zstd compression of {object} failed: {e}")))?;
        compressed.extend_from_slice(frame);
        self.seal_compressed(object, &compressed)
    }

    /// Authenticates, decrypts and decompresses an object read from `object`.
    pub fn open(&self, object: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        let header = parse_header(object, sealed)?;
        let key = self
            .keyring
            .get(header.key_id)
            .ok_or_else(|| StoreError::UnknownKey { object: object.to_string(), key_id: header.key_id.to_string() })?;
        let aad = [&sealed[..header.len], object.as_bytes()].concat();
        let mut body = sealed[header.len..].to_vec();
        let nonce = <[u8; NONCE_LEN]>::try_from(header.nonce).map_err(|_| StoreError::corrupt(object, "truncated"))?;
        let compressed = cipher(&key.0)
            .and_then(|c| c.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut body).ok())
            .ok_or_else(|| {
                StoreError::corrupt(
                    object,
                    format!("authentication failed (tampered or damaged object, or wrong key {:?})", header.key_id),
                )
            })?;
        let mut plain = Vec::new();
        zstd::stream::read::Decoder::new(&compressed[..])
            .and_then(|d| d.take(MAX_PLAINTEXT + 1).read_to_end(&mut plain))
            .map_err(|e| StoreError::corrupt(object, format!("zstd: {e}")))?;
        if plain.len() as u64 > MAX_PLAINTEXT {
            return Err(StoreError::corrupt(object, "plaintext larger than 1 GiB"));
        }
        Ok(plain)
    }
}

/// AES-256-GCM with a 32-byte key (`None` never happens for a key of that length).
fn cipher(key: &[u8; 32]) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, key).ok().map(LessSafeKey::new)
}

struct Header<'a> {
    key_id: &'a str,
    nonce: &'a [u8],
    len: usize,
}

fn parse_header<'a>(object: &str, b: &'a [u8]) -> Result<Header<'a>> {
    if b.len() < 6 || &b[..4] != MAGIC {
        return Err(StoreError::corrupt(object, "not a siterecovery object (bad magic)"));
    }
    if b[4] != ENVELOPE_VERSION {
        return Err(StoreError::corrupt(object, format!("unsupported envelope version {}", b[4])));
    }
    let id_len = b[5] as usize;
    let len = 6 + id_len + NONCE_LEN;
    if b.len() < len + TAG_LEN {
        return Err(StoreError::corrupt(object, "truncated"));
    }
    let key_id =
        std::str::from_utf8(&b[6..6 + id_len]).map_err(|_| StoreError::corrupt(object, "key id is not UTF-8"))?;
    Ok(Header { key_id, nonce: &b[6 + id_len..len], len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec(active: &str) -> Codec {
        let ring = Keyring::new(active, [("a".to_string(), [1u8; 32]), ("b".to_string(), [2u8; 32])]).unwrap();
        Codec::new(ring, 3)
    }

    #[test]
    fn seal_open_round_trip_with_fresh_nonces() {
        let c = codec("a");
        let data = vec![42u8; 100_000];
        let s1 = c.seal("o", &data).unwrap();
        let s2 = c.seal("o", &data).unwrap();
        assert_ne!(s1, s2, "nonce must differ per object");
        assert!(s1.len() < 1000, "compressible data is compressed: {}", s1.len());
        assert_eq!(c.open("o", &s1).unwrap(), data);
    }

    #[test]
    fn a_frame_compressed_elsewhere_opens_like_a_sealed_plaintext() {
        let c = codec("a");
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 7) as u8).collect();
        let frame = zstd::bulk::compress(&data, 1).unwrap();
        assert_eq!(c.open("o", &c.seal_compressed("o", &frame).unwrap()).unwrap(), data);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let c = codec("a");
        let sealed = c.seal("obj", b"hello world").unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            let err = c.open("obj", &bad).unwrap_err();
            assert!(err.to_string().contains("obj"), "byte {i}: {err}");
        }
        assert!(c.open("obj", &sealed[..sealed.len() - 1]).is_err());
    }

    #[test]
    fn renamed_object_does_not_open() {
        let c = codec("a");
        let sealed = c.seal("points/p1.json", b"{}").unwrap();
        let err = c.open("points/p2.json", &sealed).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { ref object, .. } if object == "points/p2.json"), "{err}");
    }

    #[test]
    fn rotation_keeps_old_objects_readable_and_unknown_keys_are_named() {
        let old = codec("a").seal("o", b"data").unwrap();
        assert_eq!(codec("b").open("o", &old).unwrap(), b"data");
        let only_b = Codec::new(Keyring::new("b", [("b".to_string(), [2u8; 32])]).unwrap(), 3);
        let err = only_b.open("o", &old).unwrap_err();
        assert!(matches!(err, StoreError::UnknownKey { ref key_id, .. } if key_id == "a"), "{err}");
    }
}
