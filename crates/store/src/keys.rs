//! Encryption keys. The operator keeps them in a Secret with an `active` entry naming the
//! key id used for new objects and one `key-<id>` entry per key; old keys stay in the
//! Secret after a rotation so objects written under them remain readable.

use std::collections::BTreeMap;

use crate::error::{Result, StoreError};
use crate::layout::validate_segment;

/// Secret entry naming the active key id.
pub const SECRET_ACTIVE: &str = "active";
/// Prefix of the Secret entries holding keys (`key-<id>`).
pub const SECRET_KEY_PREFIX: &str = "key-";
/// Longest key id: it is stored in every object header with a one-byte length.
pub const MAX_KEY_ID_LEN: usize = 64;

/// A 256-bit AES key. Debug output never shows the key material.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub(crate) [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// The keys of one policy: the active one encrypts, all of them decrypt.
#[derive(Debug, Clone)]
pub struct Keyring {
    active: String,
    keys: BTreeMap<String, Key>,
}

impl Keyring {
    /// Builds a keyring from `(key_id, key)` pairs; `active` must be among them.
    pub fn new(active: impl Into<String>, keys: impl IntoIterator<Item = (String, [u8; 32])>) -> Result<Self> {
        let active = active.into();
        let mut map = BTreeMap::new();
        for (id, key) in keys {
            validate_key_id(&id)?;
            if map.insert(id.clone(), Key(key)).is_some() {
                return Err(StoreError::InvalidKeyring(format!("key id {id:?} appears twice")));
            }
        }
        if !map.contains_key(&active) {
            return Err(StoreError::InvalidKeyring(format!("active key {active:?} is not among the keys")));
        }
        Ok(Self { active, keys: map })
    }

    /// Builds a keyring from a Secret's `data` (values already base64-decoded by the
    /// client). A key is 32 raw bytes; entries other than `active` and `key-*` are ignored.
    pub fn from_secret_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self> {
        let active = data
            .get(SECRET_ACTIVE)
            .ok_or_else(|| StoreError::InvalidKeyring(format!("entry {SECRET_ACTIVE:?} is missing")))?;
        let active = std::str::from_utf8(active)
            .map_err(|_| StoreError::InvalidKeyring(format!("entry {SECRET_ACTIVE:?} is not UTF-8")))?
            .trim()
            .to_string();
        let mut keys = Vec::new();
        for (name, value) in data {
            let Some(id) = name.strip_prefix(SECRET_KEY_PREFIX) else { continue };
            keys.push((id.to_string(), parse_key(name, value)?));
        }
        Self::new(active, keys)
    }

    /// Id of the key that encrypts new objects.
    pub fn active_id(&self) -> &str {
        &self.active
    }

    pub(crate) fn active(&self) -> (&str, &Key) {
        (&self.active, &self.keys[&self.active])
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Key> {
        self.keys.get(id)
    }

    /// All key ids, sorted.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

fn validate_key_id(id: &str) -> Result<()> {
    validate_segment("key id", id)?;
    if id.len() > MAX_KEY_ID_LEN {
        return Err(StoreError::InvalidName {
            what: "key id",
            value: id.to_string(),
            reason: "must be at most 64 characters",
        });
    }
    Ok(())
}

fn parse_key(entry: &str, value: &[u8]) -> Result<[u8; 32]> {
    // Same rule as the operator's Secret check: exactly 32 raw bytes.
    <[u8; 32]>::try_from(value).map_err(|_| {
        StoreError::InvalidKeyring(format!("entry {entry:?} must hold 32 bytes (AES-256), it holds {}", value.len()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_with_two_keys_parses() {
        let mut data = BTreeMap::new();
        data.insert("active".into(), b"k2\n".to_vec());
        data.insert("key-k1".into(), vec![7u8; 32]);
        data.insert("key-k2".into(), vec![0xab; 32]);
        data.insert("unrelated".into(), b"x".to_vec());
        let ring = Keyring::from_secret_data(&data).unwrap();
        assert_eq!(ring.active_id(), "k2");
        assert_eq!(ring.get("k2").unwrap().0, [0xab; 32]);
        assert_eq!(ring.ids().collect::<Vec<_>>(), ["k1", "k2"]);
        assert!(!format!("{ring:?}").contains("171"), "key material must not be printed");
    }

    #[test]
    fn bad_secrets_are_explained() {
        let mut data = BTreeMap::new();
        data.insert("key-k1".into(), vec![1u8; 32]);
        let err = Keyring::from_secret_data(&data).unwrap_err().to_string();
        assert!(err.contains("\"active\" is missing"), "{err}");
        data.insert("active".into(), b"k9".to_vec());
        let err = Keyring::from_secret_data(&data).unwrap_err().to_string();
        assert!(err.contains("active key \"k9\""), "{err}");
        data.insert("key-k9".into(), vec![1u8; 31]);
        let err = Keyring::from_secret_data(&data).unwrap_err().to_string();
        assert!(err.contains("key-k9") && err.contains("holds 31"), "{err}");
    }
}
