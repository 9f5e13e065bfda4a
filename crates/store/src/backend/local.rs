//! A directory as object store: key `a/b/c` is the file `<root>/a/b/c`. For unit tests
//! and on-prem targets (an NFS share, a local disk).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{BackendError, BlobBackend};

/// Suffix of in-flight files; `list` skips them and a crash leaves them as litter only.
const TMP_SUFFIX: &str = ".tmp-upload";

/// Objects as files under one root directory.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
}

impl LocalBackend {
    /// Uses (and creates if needed) `root`.
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, op: &'static str, key: &str) -> Result<PathBuf, BackendError> {
        // Keys come from the layout module, but a backend must never write outside its root.
        if key.is_empty() || key.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(failed(op, key, "invalid key".into(), false));
        }
        Ok(self.root.join(key))
    }
}

fn failed(op: &'static str, key: &str, message: String, retryable: bool) -> BackendError {
    BackendError::Failed { op, key: key.to_string(), message, retryable }
}

fn io_failed(op: &'static str, key: &str, e: std::io::Error) -> BackendError {
    let retryable = matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::TimedOut | ErrorKind::WouldBlock);
    failed(op, key, e.to_string(), retryable)
}

#[async_trait::async_trait]
impl BlobBackend for LocalBackend {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), BackendError> {
        let path = self.path("put", key)?;
        let key = key.to_string();
        tokio::task::spawn_blocking(move || write_then(&path, &data, |tmp| std::fs::rename(tmp, &path)))
            .await
            .map_err(|e| failed("put", &key, e.to_string(), false))?
            .map_err(|e| io_failed("put", &key, e))
    }

    async fn create(&self, key: &str, data: Bytes) -> Result<bool, BackendError> {
        let path = self.path("create", key)?;
        let k = key.to_string();
        // A hard link fails where a name exists; the temporary name goes either way.
        let linked = move || {
            write_then(&path, &data, |tmp| {
                let linked = std::fs::hard_link(tmp, &path);
                std::fs::remove_file(tmp)?;
                linked
            })
        };
        match tokio::task::spawn_blocking(linked).await.map_err(|e| failed("create", key, e.to_string(), false))? {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_failed("create", &k, e)),
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, BackendError> {
        let path = self.path("get", key)?;
        match tokio::fs::read(&path).await {
            Ok(v) => Ok(Bytes::from(v)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(BackendError::NotFound { key: key.to_string() }),
            Err(e) => Err(io_failed("get", key, e)),
        }
    }

    async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Bytes, BackendError> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        let path = self.path("get", key)?;
        let k = key.to_string();
        let read = move || -> std::io::Result<Vec<u8>> {
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut out = Vec::new();
            f.take(len).read_to_end(&mut out)?;
            Ok(out)
        };
        match tokio::task::spawn_blocking(read).await.map_err(|e| io_failed("get", key, std::io::Error::other(e)))? {
            Ok(v) => Ok(Bytes::from(v)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(BackendError::NotFound { key: k }),
            Err(e) => Err(io_failed("get", &k, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let root = self.root.clone();
        let p = prefix.to_string();
        tokio::task::spawn_blocking(move || list_sync(&root, &p))
            .await
            .map_err(|e| failed("list", prefix, e.to_string(), false))?
            .map_err(|e| io_failed("list", prefix, e))
    }

    async fn delete(&self, key: &str) -> Result<(), BackendError> {
        let path = self.path("delete", key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_failed("delete", key, e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, BackendError> {
        let path = self.path("exists", key)?;
        tokio::fs::try_exists(&path).await.map_err(|e| io_failed("exists", key, e))
    }
}

/// Writes `data` to a fresh temporary file beside `path` and makes it durable (fsync),
/// then gives it to `finish` to move into place: atomic and durable.
fn write_then(path: &Path, data: &[u8], finish: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_file_name(format!(
        "{}.{:x}{TMP_SUFFIX}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("obj"),
        rand_suffix()
    ));
    std::fs::write(&tmp, data)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    finish(&tmp)
}

/// Walks only the directory that contains the prefix's last `/`, so listing one disk's
/// chunks does not scan the whole store.
fn list_sync(root: &Path, prefix: &str) -> std::io::Result<Vec<String>> {
    let base = match prefix.rfind('/') {
        Some(i) => &prefix[..i + 1],
        None => "",
    };
    let mut out = Vec::new();
    let mut stack = vec![root.join(base)];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let Ok(rel) = path.strip_prefix(root) else { continue };
            let Some(rel) = rel.to_str() else { continue };
            if entry.file_type()?.is_dir() {
                let as_dir = format!("{rel}/");
                if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                    stack.push(path);
                }
            } else if rel.starts_with(prefix) && !rel.ends_with(TMP_SUFFIX) {
                out.push(rel.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process and per instance: enough to keep
    // concurrent writers of the same key from sharing a temporary file.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path()).unwrap();
        b.put("a/b/one", Bytes::from_static(b"1")).await.unwrap();
        b.put("a/b/two", Bytes::from_static(b"2")).await.unwrap();
        b.put("a/c/three", Bytes::from_static(b"3")).await.unwrap();
        b.put("a/b/one", Bytes::from_static(b"1bis")).await.unwrap();
        assert_eq!(b.get("a/b/one").await.unwrap(), Bytes::from_static(b"1bis"));
        assert_eq!(b.list("a/b/").await.unwrap(), ["a/b/one", "a/b/two"]);
        assert_eq!(b.list("a/").await.unwrap(), ["a/b/one", "a/b/two", "a/c/three"]);
        assert_eq!(b.list("a/b/t").await.unwrap(), ["a/b/two"]);
        assert!(b.list("zzz/").await.unwrap().is_empty());
        assert!(b.exists("a/c/three").await.unwrap());
        b.delete("a/c/three").await.unwrap();
        b.delete("a/c/three").await.unwrap();
        assert!(!b.exists("a/c/three").await.unwrap());
        assert!(matches!(b.get("a/c/three").await, Err(BackendError::NotFound { .. })));
        assert!(b.put("../escape", Bytes::new()).await.is_err());
    }

    #[tokio::test]
    async fn create_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path()).unwrap();
        assert!(b.create("p/one", Bytes::from_static(b"first")).await.unwrap());
        assert!(!b.create("p/one", Bytes::from_static(b"second")).await.unwrap(), "the name exists");
        assert_eq!(b.get("p/one").await.unwrap(), Bytes::from_static(b"first"), "the first write stays");
        assert_eq!(b.list("p/").await.unwrap(), ["p/one"], "no temporary file is left");
        assert_eq!(std::fs::read_dir(dir.path().join("p")).unwrap().count(), 1);
    }
}
