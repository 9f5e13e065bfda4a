//! The store against a local directory: round trips, dedup, integrity, keys and GC.

mod common;

use std::sync::Arc;

use common::*;
use siterecovery_store::{BlobBackend, ChunkRef, LocalBackend, ServerRef, StoreError};

const K: u32 = 64 * 1024;

struct Fixture {
    dir: tempfile::TempDir,
    backend: Arc<LocalBackend>,
    server: ServerRef,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(LocalBackend::new(dir.path().join("store")).unwrap());
    Fixture { dir, backend, server: ServerRef::new("prod", "db-1").unwrap() }
}

/// An odd-sized sparse image: data, a hole, two identical extents, data up to the last byte.
fn odd_image(f: &Fixture, name: &str) -> std::path::PathBuf {
    let path = f.dir.path().join(name);
    let size = 40 * u64::from(K) + 12_345;
    make_image(
        &path,
        size,
        &[(0, 300_000, 1), (10 * 65536, 65536, 2), (12 * 65536, 65536, 2), (size - 70_000, 70_000, 3)],
    );
    path
}

#[tokio::test]
async fn round_trip_of_an_odd_sized_sparse_image_is_bit_exact() {
    let f = fixture();
    let src = odd_image(&f, "sda.img");
    let store = store(f.backend.clone(), keyring("k1", &["k1"]), K);
    let w = store.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    let d = &w.manifest.disks[0];
    assert_eq!(d.size, std::fs::metadata(&src).unwrap().len());
    assert_eq!(d.chunks.len(), 41);
    assert!(w.chunks_zero >= 25, "holes are not stored: {w:?}");
    assert_eq!(w.chunks_deduplicated, 1, "the repeated extent is uploaded once");
    assert_eq!(d.chunks[10], d.chunks[12]);

    let points = store.list_points(&f.server).await.unwrap();
    assert_eq!(points.len(), 1);
    assert_eq!(points[0], w.manifest);
    let out = f.dir.path().join("restored.img");
    std::fs::write(&out, vec![0xffu8; 10]).unwrap(); // stale content must not survive
    let r = store.restore_disk(&f.server, &points[0], "sda", &out).await.unwrap();
    assert_eq!(file_hash(&out), file_hash(&src));
    assert_eq!(r.size, d.size);
    assert_eq!(r.chunks_written + r.chunks_zero, 41);
}

#[tokio::test]
async fn default_chunk_size_round_trip_with_two_disks() {
    let f = fixture();
    let a = f.dir.path().join("a.img");
    let b = f.dir.path().join("b.img");
    make_image(&a, 9 * 1024 * 1024 + 1, &[(0, 1 << 20, 5), (9 * 1024 * 1024 - 10, 11, 6)]);
    make_image(&b, 3 * 1024 * 1024, &[]);
    let keys = keyring("k1", &["k1"]);
    let store = siterecovery_store::Store::new(f.backend.clone(), keys, Default::default()).unwrap();
    let w = store.write_point(&f.server, crash_point(0), &[disk("a", &a), disk("b", &b)]).await.unwrap();
    assert_eq!(w.manifest.disks[1].chunks, vec![ChunkRef::Zero]);
    let targets = vec![("a".to_string(), f.dir.path().join("ra")), ("b".to_string(), f.dir.path().join("rb"))];
    store.restore_point(&f.server, &w.manifest, &targets).await.unwrap();
    assert_eq!(file_hash(&targets[0].1), file_hash(&a));
    assert_eq!(file_hash(&targets[1].1), file_hash(&b));
}

#[tokio::test]
async fn second_point_uploads_only_changed_chunks_and_both_restore() {
    let f = fixture();
    let src = odd_image(&f, "sda.img");
    let store = store(f.backend.clone(), keyring("k1", &["k1"]), K);
    let first = store.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    let v1 = f.dir.path().join("v1.img");
    std::fs::copy(&src, &v1).unwrap();
    scribble(&src, 3 * u64::from(K) + 100, 10, 99); // one data chunk changes
    scribble(&src, 30 * u64::from(K), 1, 98); // a hole gets one byte
    let second = store.write_point(&f.server, crash_point(5), &[disk("sda", &src)]).await.unwrap();
    assert_eq!(second.chunks_uploaded, 2, "{second:?}");
    assert_eq!(second.chunks_deduplicated, first.chunks_uploaded + first.chunks_deduplicated - 1);

    let points = store.list_points(&f.server).await.unwrap();
    assert_eq!(points.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), [&first.manifest.id, &second.manifest.id]);
    for (point, want) in points.iter().zip([&v1, &src]) {
        let out = f.dir.path().join(format!("r-{}", point.id));
        store.restore_disk(&f.server, point, "sda", &out).await.unwrap();
        assert_eq!(file_hash(&out), file_hash(want), "point {}", point.id);
    }
}

#[tokio::test]
async fn a_flipped_byte_in_a_chunk_is_reported_by_name_and_nothing_is_restored_from_it() {
    let f = fixture();
    let src = odd_image(&f, "sda.img");
    let store = store(f.backend.clone(), keyring("k1", &["k1"]), K);
    let w = store.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    let ChunkRef::Data(h) = w.manifest.disks[0].chunks[1] else { panic!("chunk 1 holds data") };
    let key = f.server.chunk_key("sda", &h);
    let path = f.backend.root().join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();

    let err = store.restore_disk(&f.server, &w.manifest, "sda", &f.dir.path().join("out")).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { ref object, .. } if *object == key), "{err}");
    assert!(err.to_string().contains(&key), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_chunk_swapped_for_another_is_caught_by_its_content_hash() {
    let f = fixture();
    let src = odd_image(&f, "sda.img");
    let store = store(f.backend.clone(), keyring("k1", &["k1"]), K);
    let w = store.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    let (ChunkRef::Data(a), ChunkRef::Data(b)) = (&w.manifest.disks[0].chunks[0], &w.manifest.disks[0].chunks[1])
    else {
        panic!("chunks 0 and 1 hold data")
    };
    // Re-seal chunk b's plaintext under chunk a's name with the right key: the AEAD check
    // passes, so only the content hash can notice.
    let codec = siterecovery_store::Codec::new(keyring("k1", &["k1"]), 3);
    let key_a = f.server.chunk_key("sda", a);
    let key_b = f.server.chunk_key("sda", b);
    let plain_b = codec.open(&key_b, &f.backend.get(&key_b).await.unwrap()).unwrap();
    f.backend.put(&key_a, codec.seal(&key_a, &plain_b).unwrap().into()).await.unwrap();
    let err = store.restore_disk(&f.server, &w.manifest, "sda", &f.dir.path().join("out")).await.unwrap_err();
    assert!(err.to_string().contains(&key_a) && err.to_string().contains("content hash"), "{err}");
}

#[tokio::test]
async fn a_tampered_manifest_is_reported_by_name() {
    let f = fixture();
    let src = odd_image(&f, "sda.img");
    let store = store(f.backend.clone(), keyring("k1", &["k1"]), K);
    let w = store.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    let key = f.server.point_key(&w.manifest.id);
    let path = f.backend.root().join(&key);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = store.list_points(&f.server).await.unwrap_err();
    assert!(err.to_string().contains(&key), "{err}");
    // GC must refuse to run when it cannot know what a point references.
    let err = store.gc(&f.server).await.unwrap_err();
    assert!(err.to_string().contains(&key), "{err}");
    assert!(f.backend.list(&f.server.chunks_prefix("sda")).await.unwrap().len() as u64 >= w.chunks_uploaded);
}

#[tokio::test]
async fn the_wrong_key_gives_an_error_never_data() {
    let f = fixture();
    let src = odd_image(&f, "sda.img");
    let writer = store(f.backend.clone(), keyring("k1", &["k1"]), K);
    let w = writer.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    // Same key id, different key material (e.g. a Secret replaced by mistake).
    let wrong = siterecovery_store::Keyring::new("k1", [("k1".to_string(), [9u8; 32])]).unwrap();
    let reader = store(f.backend.clone(), wrong, K);
    let key = f.server.point_key(&w.manifest.id);
    let err = reader.load_point(&f.server, &w.manifest.id).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { ref object, .. } if *object == key), "{err}");
    let out = f.dir.path().join("out");
    let err = reader.restore_disk(&f.server, &w.manifest, "sda", &out).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    // A keyring without the key id names the missing key.
    let other = store(f.backend.clone(), keyring("k2", &["k2"]), K);
    let err = other.load_point(&f.server, &w.manifest.id).await.unwrap_err();
    assert!(matches!(err, StoreError::UnknownKey { ref key_id, .. } if key_id == "k1"), "{err}");
}

#[tokio::test]
async fn after_key_rotation_old_and_new_points_restore() {
    let f = fixture();
    let src = odd_image(&f, "sda.img");
    let old = store(f.backend.clone(), keyring("k1", &["k1"]), K);
    let p1 = old.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    let v1 = f.dir.path().join("v1.img");
    std::fs::copy(&src, &v1).unwrap();
    scribble(&src, 0, 100, 77);
    // Rotate: k2 is active, k1 stays in the Secret for reading.
    let new = store(f.backend.clone(), keyring("k2", &["k1", "k2"]), K);
    let p2 = new.write_point(&f.server, crash_point(10), &[disk("sda", &src)]).await.unwrap();
    assert_eq!(p2.manifest.key_id, "k2");
    assert_eq!(p2.chunks_uploaded, 1, "unchanged chunks sealed with k1 are reused");
    for (p, want) in [(&p1.manifest, &v1), (&p2.manifest, &src)] {
        let out = f.dir.path().join(format!("r-{}", p.id));
        let loaded = new.load_point(&f.server, &p.id).await.unwrap();
        new.restore_disk(&f.server, &loaded, "sda", &out).await.unwrap();
        assert_eq!(file_hash(&out), file_hash(want));
    }
}

#[tokio::test]
async fn gc_keeps_every_chunk_of_retained_points() {
    let f = fixture();
    let src = odd_image(&f, "sda.img");
    let store = store(f.backend.clone(), keyring("k1", &["k1"]), K);
    let p1 = store.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    scribble(&src, 0, 70_000, 50); // chunks 0 and 1 change
    let p2 = store.write_point(&f.server, crash_point(5), &[disk("sda", &src)]).await.unwrap();
    scribble(&src, 0, 10, 51); // chunk 0 changes again
    let p3 = store.write_point(&f.server, crash_point(10), &[disk("sda", &src)]).await.unwrap();
    let v3 = f.dir.path().join("v3.img");
    std::fs::copy(&src, &v3).unwrap();

    // Nothing unreferenced yet.
    let r = store.gc(&f.server).await.unwrap();
    assert_eq!((r.chunks_deleted, r.points_retained), (0, 3), "{r:?}");

    // Retain only p1 and p3: p2's own chunk 0 goes, its chunk 1 (shared with p3) stays.
    let keep = [p1.manifest.id.clone(), p3.manifest.id.clone()];
    let r = store.prune(&f.server, |m| keep.contains(&m.id)).await.unwrap();
    assert_eq!((r.points_deleted, r.points_retained, r.chunks_deleted), (1, 2, 1), "{r:?}");
    let ChunkRef::Data(gone) = p2.manifest.disks[0].chunks[0] else { panic!() };
    assert!(!f.backend.exists(&f.server.chunk_key("sda", &gone)).await.unwrap());
    for p in store.list_points(&f.server).await.unwrap() {
        let out = f.dir.path().join(format!("r-{}", p.id));
        store.restore_disk(&f.server, &p, "sda", &out).await.unwrap();
    }
    assert_eq!(file_hash(&f.dir.path().join(format!("r-{}", p3.manifest.id))), file_hash(&v3));

    // Dropping every point empties the disk's chunk folder; foreign files are left alone.
    f.backend.put(&format!("{}disks/sda/chunks/README", f.server.prefix()), "x".into()).await.unwrap();
    let r = store.prune(&f.server, |_| false).await.unwrap();
    assert_eq!(r.chunks_kept, 0);
    assert_eq!(r.foreign_objects, 1);
    assert_eq!(f.backend.list(&f.server.chunks_prefix("sda")).await.unwrap().len(), 1);
    assert!(store.list_points(&f.server).await.unwrap().is_empty());
}

#[tokio::test]
async fn points_are_never_overwritten_and_missing_points_are_named() {
    let f = fixture();
    let src = odd_image(&f, "sda.img");
    let store = store(f.backend.clone(), keyring("k1", &["k1"]), K);
    store.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    let err = store.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let err = store.load_point(&f.server, "nope").await.unwrap_err();
    assert_eq!(err.to_string(), "recovery point nope of server prod/db-1 not found");
    let err = store.write_point(&f.server, crash_point(1), &[disk("sda", &src), disk("sda", &src)]).await.unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");
}
