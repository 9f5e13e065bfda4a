//! The store: recovery points of protected servers on a [`BlobBackend`].

use std::collections::HashSet;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};

use crate::backend::{BackendError, BlobBackend};
use crate::codec::Codec;
use crate::copies::LocalCopies;
use crate::error::{Result, StoreError};
use crate::keys::Keyring;
use crate::layout::{ChunkHash, DEFAULT_CHUNK_SIZE, FORMAT_VERSION, ServerRef, validate_segment};
use crate::manifest::{ChunkRef, DiskManifest, Manifest, PointKind};

/// Tuning of a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Chunk size for new points (existing points keep the size in their manifest).
    pub chunk_size: u32,
    /// Chunks in flight at once, for upload and for restore.
    pub parallelism: usize,
    /// zstd level for the objects this store compresses itself (a frame put as it came
    /// keeps its own level).
    pub zstd_level: i32,
}

/// The zstd level when none is set: zstd's fastest, what agents send by default.
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

impl Default for StoreOptions {
    fn default() -> Self {
        Self { chunk_size: DEFAULT_CHUNK_SIZE, parallelism: 8, zstd_level: DEFAULT_ZSTD_LEVEL }
    }
}

/// A disk image (file or block device) to capture into a recovery point.
#[derive(Debug, Clone)]
pub struct DiskSource {
    /// Disk id, unique within the server (e.g. `sda`, or a stable disk serial).
    pub id: String,
    /// Path of the image file or block device.
    pub path: PathBuf,
}

/// What to record about a new recovery point.
#[derive(Debug, Clone)]
pub struct NewPoint {
    /// Crash, app or group consistent.
    pub kind: PointKind,
    /// Consistency-group name for group points.
    pub group: Option<String>,
    /// Every server of the group, for group points.
    pub members: Vec<String>,
    /// The instant the point represents.
    pub time: jiff::Timestamp,
    /// Point id; generated from the time and kind when `None`.
    pub id: Option<String>,
}

/// What a [`Store::write_point`] did.
#[derive(Debug, Clone)]
pub struct WriteReport {
    /// The manifest that was stored.
    pub manifest: Manifest,
    /// Chunk slots over all disks.
    pub chunks_total: u64,
    /// All-zero chunks (not stored).
    pub chunks_zero: u64,
    /// Chunks already in the store, or repeated within this point (not uploaded).
    pub chunks_deduplicated: u64,
    /// Chunks uploaded.
    pub chunks_uploaded: u64,
    /// Bytes uploaded (encoded size, chunks and manifest).
    pub bytes_uploaded: u64,
}

/// Recovery points of protected servers, stored compressed and encrypted.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) backend: Arc<dyn BlobBackend>,
    pub(crate) codec: Arc<Codec>,
    pub(crate) options: StoreOptions,
    /// Local copies of the data objects written, read before the backend.
    pub(crate) copies: Option<Arc<LocalCopies>>,
}

impl Store {
    /// A store on `backend`, sealing new objects with the keyring's active key.
    pub fn new(backend: Arc<dyn BlobBackend>, keyring: Keyring, options: StoreOptions) -> Result<Self> {
        if options.chunk_size == 0 || options.chunk_size > 64 * 1024 * 1024 {
            return Err(StoreError::InvalidArgument("chunk_size must be 1 byte to 64 MiB".into()));
        }
        if options.parallelism == 0 {
            return Err(StoreError::InvalidArgument("parallelism must be at least 1".into()));
        }
        let codec = Arc::new(Codec::new(keyring, options.zstd_level));
        Ok(Self { backend, codec, options, copies: None })
    }

    /// This store, keeping local copies of the data objects it writes in `copies` and
    /// reading them from there (`crate::copies`).
    pub fn with_copies(self, copies: Arc<LocalCopies>) -> Self {
        Self { copies: Some(copies), ..self }
    }

    /// Uploads a data object (a chunk, patch or pack) as sealed, and keeps a local copy,
    /// written while the upload runs (not after it: an incremental's pack would wait for
    /// both); the copy of an upload that failed is dropped.
    pub(crate) async fn put_data(&self, key: &str, sealed: Bytes) -> Result<u64> {
        let n = sealed.len() as u64;
        let copy = self.copies.clone().map(|copies| {
            let (key, sealed) = (key.to_string(), sealed.clone());
            tokio::task::spawn_blocking(move || {
                copies.keep(&key, &sealed);
                copies
            })
        });
        let put = self.backend.put(key, sealed).await;
        if let Some(copy) = copy {
            let copies = copy.await.map_err(|e| StoreError::Task(e.to_string()))?;
            if put.is_err() {
                copies.forget(key);
            }
        }
        put?;
        Ok(n)
    }

    /// The backend objects are kept on.
    pub fn backend(&self) -> &Arc<dyn BlobBackend> {
        &self.backend
    }

    /// Captures every disk of `server` into a new recovery point. Chunks are uploaded first
    /// (zero chunks skipped, chunks already stored reused); the manifest is written last,
    /// so a point exists only when all its data does.
    #[tracing::instrument(skip_all, fields(server = %server, kind = %point.kind))]
    pub async fn write_point(&self, server: &ServerRef, point: NewPoint, disks: &[DiskSource]) -> Result<WriteReport> {
        let id = point.id.clone().unwrap_or_else(|| generate_point_id(point.time, point.kind));
        validate_segment("point id", &id)?;
        if let Some(group) = &point.group {
            validate_segment("group", group)?;
        }
        for m in &point.members {
            validate_segment("group member", m)?;
        }
        let mut seen = HashSet::new();
        for d in disks {
            validate_segment("disk id", &d.id)?;
            if !seen.insert(&d.id) {
                return Err(StoreError::InvalidArgument(format!("disk {} is listed twice", d.id)));
            }
        }
        if self.backend.exists(&server.point_key(&id)).await? {
            return Err(StoreError::PointExists { server: server.to_string(), point: id });
        }
        let mut report = WriteReport {
            manifest: Manifest {
                format: FORMAT_VERSION,
                id,
                kind: point.kind,
                group: point.group,
                members: point.members,
                time: point.time,
                key_id: self.codec.keyring().active_id().to_string(),
                chunk_size: self.options.chunk_size,
                disks: Vec::new(),
            },
            chunks_total: 0,
            chunks_zero: 0,
            chunks_deduplicated: 0,
            chunks_uploaded: 0,
            bytes_uploaded: 0,
        };
        for disk in disks {
            let d = self.write_disk(server, disk, &mut report).await?;
            report.manifest.disks.push(d);
        }
        report.bytes_uploaded += self.put_manifest(server, &report.manifest).await?;
        tracing::info!(
            point = %report.manifest.id,
            uploaded = report.chunks_uploaded,
            dedup = report.chunks_deduplicated,
            zero = report.chunks_zero,
            "recovery point written"
        );
        Ok(report)
    }

    async fn write_disk(
        &self,
        server: &ServerRef,
        disk: &DiskSource,
        report: &mut WriteReport,
    ) -> Result<DiskManifest> {
        let (file, size) = open_source(&disk.path).await?;
        let chunk_size = u64::from(self.options.chunk_size);
        let count = size.div_ceil(chunk_size);
        // One listing instead of one existence check per chunk.
        let known = Arc::new(Mutex::new(self.stored_chunks(server, &disk.id).await?));
        let file = Arc::new(file);
        let outcomes: Vec<ChunkOutcome> = futures::stream::iter(0..count)
            .map(|index| {
                let (file, known, path) = (file.clone(), known.clone(), disk.path.clone());
                async move {
                    let offset = index * chunk_size;
                    let len = (size - offset).min(chunk_size) as usize;
                    let (data, hash) = read_chunk(file, path, offset, len).await?;
                    let Some(hash) = hash else { return Ok(ChunkOutcome::Zero) };
                    // Insert before uploading so a chunk repeated within this point goes up once.
                    if !known.lock().unwrap_or_else(|p| p.into_inner()).insert(hash) {
                        return Ok(ChunkOutcome::Dedup(hash));
                    }
                    let n = self.put_chunk(server, &disk.id, &hash, data).await?;
                    Ok::<_, StoreError>(ChunkOutcome::Uploaded(hash, n))
                }
            })
            .buffered(self.options.parallelism)
            .try_collect()
            .await?;
        let mut chunks = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            report.chunks_total += 1;
            chunks.push(match o {
                ChunkOutcome::Zero => {
                    report.chunks_zero += 1;
                    ChunkRef::Zero
                }
                ChunkOutcome::Dedup(h) => {
                    report.chunks_deduplicated += 1;
                    ChunkRef::Data(h)
                }
                ChunkOutcome::Uploaded(h, n) => {
                    report.chunks_uploaded += 1;
                    report.bytes_uploaded += n;
                    ChunkRef::Data(h)
                }
            });
        }
        Ok(DiskManifest { id: disk.id.clone(), size, chunks })
    }

    /// Hashes of the chunks stored for one disk (one listing).
    pub async fn stored_chunks(&self, server: &ServerRef, disk: &str) -> Result<HashSet<ChunkHash>> {
        validate_segment("disk id", disk)?;
        let prefix = server.chunks_prefix(disk);
        Ok(self.backend.list(&prefix).await?.iter().filter_map(|k| ChunkHash::from_hex(&k[prefix.len()..])).collect())
    }

    /// Seals and uploads one chunk whose plaintext hashes to `hash`; returns the bytes
    /// uploaded. Idempotent: the name is the content hash, so a second upload of the
    /// same chunk rewrites the same content.
    pub async fn put_chunk(
        &self,
        server: &ServerRef,
        disk: &str,
        hash: &ChunkHash,
        plain: impl Into<Bytes>,
    ) -> Result<u64> {
        validate_segment("disk id", disk)?;
        let key = server.chunk_key(disk, hash);
        let sealed = self.seal_blocking(key.clone(), plain).await?;
        self.put_data(&key, sealed).await
    }

    /// Uploads one chunk given as a zstd frame of its plaintext (as an agent sent it),
    /// encrypting it without decompressing and compressing again. The caller must have
    /// checked that the frame decompresses to plaintext hashing to `hash`.
    pub async fn put_compressed_chunk(
        &self,
        server: &ServerRef,
        disk: &str,
        hash: &ChunkHash,
        frame: Bytes,
    ) -> Result<u64> {
        validate_segment("disk id", disk)?;
        let key = server.chunk_key(disk, hash);
        let codec = self.codec.clone();
        let k = key.clone();
        let sealed = tokio::task::spawn_blocking(move || codec.seal_compressed(&k, &frame).map(Bytes::from))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        self.put_data(&key, sealed).await
    }

    /// Seals and uploads a manifest after checking it adds up; returns the bytes
    /// uploaded. The caller uploads every chunk it names first. Manifests are never
    /// overwritten: writing an existing point id fails.
    pub async fn put_manifest(&self, server: &ServerRef, manifest: &Manifest) -> Result<u64> {
        validate_segment("point id", &manifest.id)?;
        manifest.check().map_err(StoreError::InvalidArgument)?;
        let key = server.point_key(&manifest.id);
        let json = serde_json::to_vec(manifest).map_err(|e| StoreError::Task(e.to_string()))?;
        let sealed = self.seal_blocking(key.clone(), json).await?;
        let n = sealed.len() as u64;
        if !self.backend.create(&key, sealed).await? {
            return Err(StoreError::PointExists { server: server.to_string(), point: manifest.id.clone() });
        }
        Ok(n)
    }

    /// The store's tuning.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// The key id new objects and points get.
    pub fn active_key_id(&self) -> &str {
        self.codec.keyring().active_id()
    }

    pub(crate) async fn seal_blocking(&self, key: String, plain: impl Into<Bytes>) -> Result<Bytes> {
        let plain = plain.into();
        let codec = self.codec.clone();
        tokio::task::spawn_blocking(move || codec.seal(&key, &plain).map(Bytes::from))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Ids of the recovery points of `server`, in lexicographic (for generated ids: time) order.
    pub async fn list_point_ids(&self, server: &ServerRef) -> Result<Vec<String>> {
        let prefix = server.points_prefix();
        let keys = self.backend.list(&prefix).await?;
        Ok(keys.iter().filter_map(|k| k[prefix.len()..].strip_suffix(".json")).map(str::to_string).collect())
    }

    /// Every recovery point of `server`, oldest first. Fails if any manifest is unreadable:
    /// a damaged point must be noticed, not hidden.
    pub async fn list_points(&self, server: &ServerRef) -> Result<Vec<Manifest>> {
        let ids = self.list_point_ids(server).await?;
        let mut points: Vec<Manifest> = futures::stream::iter(ids)
            .map(|id| async move { self.load_point(server, &id).await })
            .buffered(self.options.parallelism)
            .try_collect()
            .await?;
        points.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        Ok(points)
    }

    /// Reads and verifies one manifest.
    pub async fn load_point(&self, server: &ServerRef, id: &str) -> Result<Manifest> {
        validate_segment("point id", id)?;
        let key = server.point_key(id);
        let sealed = match self.backend.get(&key).await {
            Ok(b) => b,
            Err(BackendError::NotFound { .. }) => {
                return Err(StoreError::PointNotFound { server: server.to_string(), point: id.to_string() });
            }
            Err(e) => return Err(e.into()),
        };
        let codec = self.codec.clone();
        let k = key.clone();
        let plain = tokio::task::spawn_blocking(move || codec.open(&k, &sealed))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let manifest: Manifest =
            serde_json::from_slice(&plain).map_err(|e| StoreError::corrupt(&key, format!("manifest JSON: {e}")))?;
        manifest.check().map_err(|reason| StoreError::corrupt(&key, reason))?;
        if manifest.id != id {
            return Err(StoreError::corrupt(&key, format!("manifest names point {:?}", manifest.id)));
        }
        Ok(manifest)
    }
}

enum ChunkOutcome {
    Zero,
    Dedup(ChunkHash),
    Uploaded(ChunkHash, u64),
}

/// `<UTC time to the millisecond>-<kind>`, e.g. `20261127T101500123Z-crash`: sorts by time.
pub fn generate_point_id(time: jiff::Timestamp, kind: PointKind) -> String {
    format!("{}{:03}Z-{kind}", time.strftime("%Y%m%dT%H%M%S"), time.subsec_millisecond())
}

/// Opens an image file or block device and returns its size (seeking to the end works
/// for both, unlike the metadata length of a block device).
async fn open_source(path: &Path) -> Result<(std::fs::File, u64)> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&p)?;
        let size = f.seek(SeekFrom::End(0))?;
        Ok((f, size))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
    .map_err(|e| StoreError::io("open", path, e))
}

/// Reads one chunk; returns its hash, or `None` for an all-zero chunk.
async fn read_chunk(
    file: Arc<std::fs::File>,
    path: PathBuf,
    offset: u64,
    len: usize,
) -> Result<(Vec<u8>, Option<ChunkHash>)> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).map_err(|e| StoreError::io("read", &path, e))?;
        if crate::tree::is_zero(&buf) {
            return Ok((Vec::new(), None));
        }
        let hash = ChunkHash::of(&buf);
        Ok((buf, Some(hash)))
    })
    .await
    .map_err(|e| StoreError::Task(e.to_string()))?
}
