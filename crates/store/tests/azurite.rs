//! The store against Azure Blob Storage, as emulated by Azurite on loopback.
//!
//! Needs `SR_AZURITE_ENDPOINT` (e.g. `http://127.0.0.1:10000/devstoreaccount1`), which
//! `hack/azurite.sh up` serves and `hack/azurite.sh env` prints. Fails without it: a test
//! that silently skips proves nothing.

mod common;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::*;
use siterecovery_store::backend::{DEVSTORE_ACCOUNT, DEVSTORE_KEY};
use siterecovery_store::{
    AccountSas, AzureBlobBackend, BackendError, BlobBackend, ChunkRef, ServerRef, StoreError, StoreOptions,
};

fn endpoint() -> String {
    std::env::var("SR_AZURITE_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "SR_AZURITE_ENDPOINT is not set: start Azurite with `hack/azurite.sh up` and \
             `eval \"$(hack/azurite.sh env)\"` (make test does both)"
        )
    })
}

fn sas() -> String {
    let expiry = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(2);
    AccountSas::full_access(DEVSTORE_ACCOUNT, expiry).sign(DEVSTORE_KEY).unwrap()
}

/// A fresh container per test, so parallel tests and earlier runs never interfere.
async fn container(test: &str) -> Arc<AzureBlobBackend> {
    let backend = AzureBlobBackend::with_sas(&endpoint(), &container_name(test), &sas()).unwrap();
    let backend = Arc::new(backend);
    backend.ensure_container().await.unwrap_or_else(|e| panic!("cannot create container at {}: {e}", endpoint()));
    backend.ensure_container().await.expect("ensure_container is idempotent");
    backend
}

fn container_name(test: &str) -> String {
    format!("sr-{test}-{}", std::process::id())
}

#[tokio::test]
async fn backend_operations_on_azurite() {
    let b = container("ops").await;
    b.put("servers/ns/s/points/p1.json", Bytes::from_static(b"one")).await.unwrap();
    b.put("servers/ns/s/points/p2.json", Bytes::from_static(b"two")).await.unwrap();
    b.put("servers/ns/s/disks/d/chunks/c", Bytes::from_static(b"three")).await.unwrap();
    b.put("servers/ns/s/points/p1.json", Bytes::from_static(b"uno")).await.unwrap();
    assert_eq!(b.get("servers/ns/s/points/p1.json").await.unwrap(), Bytes::from_static(b"uno"));
    assert_eq!(b.get_range("servers/ns/s/points/p1.json", 1, 2).await.unwrap(), Bytes::from_static(b"no"));
    assert_eq!(
        b.get_range("servers/ns/s/points/p1.json", 2, 10).await.unwrap(),
        Bytes::from_static(b"o"),
        "cut at the end"
    );
    assert_eq!(
        b.list("servers/ns/s/points/").await.unwrap(),
        ["servers/ns/s/points/p1.json", "servers/ns/s/points/p2.json"],
        "names with '/' are listed back as written"
    );
    assert_eq!(b.list("servers/").await.unwrap().len(), 3);
    assert!(b.exists("servers/ns/s/disks/d/chunks/c").await.unwrap());
    b.delete("servers/ns/s/disks/d/chunks/c").await.unwrap();
    b.delete("servers/ns/s/disks/d/chunks/c").await.unwrap();
    assert!(!b.exists("servers/ns/s/disks/d/chunks/c").await.unwrap());
    let err = b.get("servers/ns/s/disks/d/chunks/c").await.unwrap_err();
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
    assert!(b.create("servers/ns/s/points/p3.json", Bytes::from_static(b"tres")).await.unwrap());
    assert!(!b.create("servers/ns/s/points/p3.json", Bytes::from_static(b"drei")).await.unwrap(), "it exists");
    assert!(!b.create("servers/ns/s/points/p1.json", Bytes::from_static(b"eins")).await.unwrap(), "it exists");
    assert_eq!(b.get("servers/ns/s/points/p3.json").await.unwrap(), Bytes::from_static(b"tres"), "never replaced");
    assert_eq!(b.get("servers/ns/s/points/p1.json").await.unwrap(), Bytes::from_static(b"uno"));
    b.delete_container().await.unwrap();
}

#[tokio::test]
async fn a_tampered_sas_is_refused_and_not_retryable() {
    let good = container("sas").await;
    let bad_sas = sas().replace("sig=", "sig=AAAA");
    let bad = AzureBlobBackend::with_sas(&endpoint(), &container_name("sas"), &bad_sas).unwrap();
    let err = bad.put("x", Bytes::from_static(b"x")).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    assert!(!err.is_retryable());
    good.delete_container().await.unwrap();
}

#[tokio::test]
async fn recovery_points_round_trip_through_azurite() {
    let b = container("points").await;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerRef::new("prod", "web-1").unwrap();
    let src = dir.path().join("sda.img");
    // 24 MiB + 3 bytes: 16 MiB of incompressible data, a hole, a tail in the last chunk.
    let size = 24 * 1024 * 1024 + 3;
    make_image(&src, size, &[(0, 16 << 20, 11), (size - 1000, 1000, 12)]);
    let opts = StoreOptions { parallelism: 8, ..Default::default() };
    let store = siterecovery_store::Store::new(b.clone(), keyring("k1", &["k1"]), opts).unwrap();

    let t = Instant::now();
    let first = store.write_point(&server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    let write_s = t.elapsed().as_secs_f64();
    assert_eq!(first.chunks_total, 7);
    assert_eq!(first.chunks_uploaded, 6, "chunks 0-3, 5 (data ends 997 bytes before it) and 6");
    assert_eq!(first.chunks_zero, 1);

    scribble(&src, 5 << 20, 64 * 1024, 13);
    let t = Instant::now();
    let second = store.write_point(&server, crash_point(5), &[disk("sda", &src)]).await.unwrap();
    let incr_s = t.elapsed().as_secs_f64();
    assert_eq!((second.chunks_uploaded, second.chunks_deduplicated), (1, 5), "{second:?}");

    let points = store.list_points(&server).await.unwrap();
    assert_eq!(points.len(), 2);
    let out = dir.path().join("restored.img");
    let t = Instant::now();
    let r = store.restore_disk(&server, &points[1], "sda", &out).await.unwrap();
    let restore_s = t.elapsed().as_secs_f64();
    assert_eq!(file_hash(&out), file_hash(&src), "restore is bit-exact");
    let mib = size as f64 / (1024.0 * 1024.0);
    eprintln!(
        "azurite: full point {mib:.0} MiB in {write_s:.2}s ({:.0} MiB/s logical, {} MiB uploaded); \
         incremental in {incr_s:.2}s; restore in {restore_s:.2}s ({:.0} MiB/s logical, {} MiB downloaded)",
        mib / write_s,
        first.bytes_uploaded >> 20,
        mib / restore_s,
        r.bytes_downloaded >> 20
    );

    // A flipped byte in a stored chunk is reported by name.
    let ChunkRef::Data(h) = points[1].disks[0].chunks[2] else { panic!("chunk 2 holds data") };
    let key = server.chunk_key("sda", &h);
    let mut bytes = b.get(&key).await.unwrap().to_vec();
    bytes[100] ^= 0x01;
    b.put(&key, bytes.into()).await.unwrap();
    let err = store.restore_disk(&server, &points[1], "sda", &out).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { ref object, .. } if *object == key), "{err}");

    // Retention: keep the newest point; the chunk only the first point had goes.
    let newest = points[1].id.clone();
    let gc = store.prune(&server, |m| m.id == newest).await.unwrap();
    assert_eq!((gc.points_deleted, gc.chunks_deleted, gc.chunks_kept), (1, 1, 6), "{gc:?}");
    b.delete_container().await.unwrap();
}
