//! The blob store of Site Recovery for Kubernetes: layout `v2` of replicated disks and
//! recovery points (documented in `docs/storage-format.md`), object encoding (zstd then
//! AES-256-GCM, integrity-checked on every read), restore and garbage collection, on a
//! local directory or Azure Blob Storage.
//!
//! ```no_run
//! # async fn demo() -> siterecovery_store::Result<()> {
//! use std::sync::Arc;
//! use siterecovery_store::*;
//! let backend = Arc::new(LocalBackend::new("/var/lib/replica").unwrap());
//! let keys = Keyring::new("k1", [("k1".to_string(), [7u8; 32])])?;
//! let store = Store::new(backend, keys, StoreOptions::default())?;
//! let server = ServerRef::new("prod", "db-1")?;
//! let point = NewPoint { kind: PointKind::Crash, group: None, members: vec![], time: jiff::Timestamp::now(), id: None };
//! let written = store.write_point(&server, point, &[DiskSource { id: "sda".into(), path: "/dev/sda".into() }]).await?;
//! store.restore_disk(&server, &written.manifest, "sda", "/tmp/sda.img".as_ref()).await?;
//! # Ok(()) }
//! ```

pub mod backend;
mod codec;
mod copies;
mod error;
mod gc;
mod keys;
mod layout;
mod manifest;
mod page_blob;
mod patch;
mod restore;
mod store;
pub mod tree;
pub mod vhd;

pub use backend::{AccountSas, AzureBlobBackend, BackendError, BlobBackend, LocalBackend, SECRET_SAS_TOKEN, sas_token};
pub use codec::Codec;
pub use copies::LocalCopies;
pub use error::{Result, StoreError};
pub use gc::{GcReport, delete_server_data};
pub use keys::{Keyring, SECRET_ACTIVE, SECRET_KEY_PREFIX};
pub use layout::{ChunkHash, DEFAULT_CHUNK_SIZE, FORMAT_VERSION, ServerRef, validate_segment};
pub use manifest::{ChunkRef, DiskManifest, Manifest, PackedAt, PatchChain, PointKind};
pub use page_blob::{VhdPurpose, VhdReport, recovered_prefix, recovered_vhd_name};
pub use patch::{MAX_CHAIN_PATCHES, PatchBytes, PatchData, apply_patch, chain_may_grow, encode_patch};
pub use restore::RestoreReport;
pub use store::{DEFAULT_ZSTD_LEVEL, DiskSource, NewPoint, Store, StoreOptions, WriteReport, generate_point_id};
