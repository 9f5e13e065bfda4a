//! Bootstrap tokens: random, single-use, expiring; only a hash is kept as state.
//!
//! A token carries 256 random bits, so a plain SHA-256 is enough to store it (nothing
//! to brute-force, unlike a password; a slow KDF would only slow registration). The
//! hash also covers the server it was issued for, so a state Secret copied onto
//! another server does not make the token valid there.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;

/// Prefix of every token, so secret scanners and people recognise one.
pub const TOKEN_PREFIX: &str = "srbt_";

/// Domain separation of the hash from any other SHA-256 use.
const HASH_CONTEXT: &str = "siterecovery-bootstrap-token-v1";

/// A plaintext bootstrap token. Its `Debug` never shows it, so it cannot leak through a
/// `?token` in a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken(String);

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapToken(<redacted>)")
    }
}

impl BootstrapToken {
    /// A fresh token from the system CSPRNG.
    pub fn generate() -> Self {
        use base64::Engine as _;
        let mut bytes = [0u8; 32];
        // aws-lc's RNG fails only when the OS has no entropy source at all.
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random number generator works");
        Self(format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// Wraps a token received from an agent.
    pub fn from_plaintext(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The plaintext, for the one place it is written (the admin's Secret).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// `sha256:<hex>` of the token, bound to the server it was issued for.
pub fn hash_token(namespace: &str, server: &str, token: &BootstrapToken) -> String {
    let input = format!("{HASH_CONTEXT}\n{namespace}\n{server}\n{}", token.0);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, input.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Whether `token` hashes to `stored`, compared in constant time.
pub fn verify_token(namespace: &str, server: &str, token: &BootstrapToken, stored: &str) -> bool {
    let computed = hash_token(namespace, server, token);
    aws_lc_rs::constant_time::verify_slices_are_equal(computed.as_bytes(), stored.as_bytes()).is_ok()
}

/// The state of one server's bootstrap token, as kept in the `sr-bootstrap-<server>`
/// Secret: the hash, the expiry, and whether (and by whom) it was used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapState {
    /// [`hash_token`] of the token.
    pub token_hash: String,
    /// When it was issued.
    pub created_at: Timestamp,
    /// After this, registration with it is refused (410).
    pub expires_at: Timestamp,
    /// Set once, by the registration that consumed it.
    pub used: Option<Usage>,
}

/// Who used a token, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    /// When.
    pub at: Timestamp,
    /// Host name the agent presented.
    pub hostname: String,
    /// `/etc/machine-id` the agent presented, if any.
    pub machine_id: Option<String>,
}

/// Keys of the state Secret.
mod key {
    pub const HASH: &str = "tokenHash";
    pub const CREATED: &str = "createdAt";
    pub const EXPIRES: &str = "expiresAt";
    pub const USED: &str = "used";
    pub const USED_AT: &str = "usedAt";
    pub const USED_BY: &str = "usedByHostname";
    pub const USED_MACHINE: &str = "usedByMachineId";
}

impl BootstrapState {
    /// A new unused token's state.
    pub fn new(token_hash: String, now: Timestamp, ttl: std::time::Duration) -> Self {
        let expires_at = now.saturating_add(jiff::SignedDuration::from_secs(ttl.as_secs() as i64)).unwrap_or(now);
        Self { token_hash, created_at: now, expires_at, used: None }
    }

    /// Whether the token can no longer be used because time ran out.
    pub fn expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }

    /// The Secret's `data`.
    pub fn to_data(&self) -> BTreeMap<String, ByteString> {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            data.insert(k.to_owned(), ByteString(v.into_bytes()));
        };
        put(key::HASH, self.token_hash.clone());
        put(key::CREATED, self.created_at.to_string());
        put(key::EXPIRES, self.expires_at.to_string());
        put(key::USED, self.used.is_some().to_string());
        if let Some(u) = &self.used {
            put(key::USED_AT, u.at.to_string());
            put(key::USED_BY, u.hostname.clone());
            if let Some(m) = &u.machine_id {
                put(key::USED_MACHINE, m.clone());
            }
        }
        data
    }

    /// Reads the Secret's `data`; the error names the key that is missing or malformed.
    pub fn from_data(data: &BTreeMap<String, ByteString>) -> Result<Self, String> {
        let text = |k: &str| -> Result<Option<String>, String> {
            data.get(k).map(|v| String::from_utf8(v.0.clone()).map_err(|_| format!("{k} is not UTF-8"))).transpose()
        };
        let required = |k: &str| text(k)?.ok_or_else(|| format!("{k} missing"));
        let time = |k: &str, v: String| v.parse::<Timestamp>().map_err(|e| format!("{k}: {e}"));
        let token_hash = required(key::HASH)?;
        if !token_hash.starts_with("sha256:") {
            return Err(format!("{} has an unknown format", key::HASH));
        }
        let used = match required(key::USED)?.as_str() {
            "false" => None,
            "true" => Some(Usage {
                at: time(key::USED_AT, required(key::USED_AT)?)?,
                hostname: required(key::USED_BY)?,
                machine_id: text(key::USED_MACHINE)?,
            }),
            other => return Err(format!("{} is {other:?}, not true or false", key::USED)),
        };
        Ok(Self {
            token_hash,
            created_at: time(key::CREATED, required(key::CREATED)?)?,
            expires_at: time(key::EXPIRES, required(key::EXPIRES)?)?,
            used,
        })
    }
}
