//! Formats 2 and 3 against a local directory: chunks stored as a base plus a chain of
//! patches (objects of their own, or in packs) restore bit-exact, a damaged patch is named
//! and nothing of it is written, format 1 manifests still restore, and GC keeps exactly
//! what chains need.

mod common;

use std::sync::Arc;

use common::*;
use siterecovery_store::{
    BlobBackend, ChunkHash, ChunkRef, LocalBackend, LocalCopies, Manifest, PatchBytes, PatchChain, PatchData,
    ServerRef, Store, StoreError,
};

const K: u32 = 64 * 1024;

struct Fixture {
    dir: tempfile::TempDir,
    backend: Arc<LocalBackend>,
    server: ServerRef,
    store: Store,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(LocalBackend::new(dir.path().join("store")).unwrap());
    let store = store(backend.clone(), keyring("k1", &["k1"]), K);
    Fixture { dir, backend, server: ServerRef::new("prod", "db-1").unwrap(), store }
}

/// Writes `data[ranges]` into `chunk`; the patch from `base` to the result.
fn patch(chunk: &mut [u8], base: Option<ChunkHash>, ranges: &[[u32; 2]], seed: u64) -> PatchData {
    let mut data = Vec::new();
    for (i, [off, len]) in ranges.iter().enumerate() {
        let bytes = noise(seed + i as u64, *len as usize);
        chunk[*off as usize..(*off + *len) as usize].copy_from_slice(&bytes);
        data.extend_from_slice(&bytes);
    }
    PatchData { result: ChunkHash::of(chunk), base, ranges: ranges.to_vec(), data: PatchBytes::Plain(data.into()) }
}

fn plain(p: &PatchData) -> &[u8] {
    let PatchBytes::Plain(data) = &p.data else { panic!("patch bytes as they are") };
    data
}

/// A point of disk `sda` (three chunks: data, a chain on data, a chain on zeros) written
/// with `write_point`, then a manifest of the patched state, its patches uploaded as
/// objects of their own or (`packed`) in one pack; returns both manifests and the
/// expected image.
async fn chained_point(f: &Fixture, packed: bool) -> (Manifest, Manifest, Vec<u8>) {
    let src = f.dir.path().join("sda.img");
    make_image(&src, 3 * u64::from(K), &[(0, 2 * K as usize, 1)]);
    let p1 = f.store.write_point(&f.server, crash_point(0), &[disk("sda", &src)]).await.unwrap().manifest;
    let mut image = std::fs::read(&src).unwrap();
    let h1 = p1.disks[0].chunks[1].hash().unwrap();
    let (c1, c2) = image.split_at_mut(2 * K as usize);
    let c1 = &mut c1[K as usize..];
    let a = patch(c1, Some(h1), &[[0, 100], [5000, 4096]], 10);
    let b = patch(c1, Some(a.result), &[[60_000, 5536]], 20);
    let z = patch(c2, None, &[[4096, 4096]], 30);
    let mut p2 = p1.clone();
    p2.id = "p2".into();
    let mut ch1 = PatchChain { hash: b.result, base: Some(h1), patches: vec![a.result, b.result], packed: vec![] };
    let mut ch2 = PatchChain { hash: z.result, base: None, patches: vec![z.result], packed: vec![] };
    if packed {
        // One patch as an agent sends it, compressed: stored as it came.
        let b = PatchData { data: PatchBytes::Zstd(zstd::bulk::compress(plain(&b), 1).unwrap().into()), ..b };
        let (places, _) = f.store.put_patch_pack(&f.server, "sda", vec![a, b, z]).await.unwrap();
        ch1.packed = vec![Some(places[0]), Some(places[1])];
        ch2.packed = vec![Some(places[2])];
    } else {
        for p in [a, b, z] {
            f.store.put_patch(&f.server, "sda", &p.result, p.base.as_ref(), &p.ranges, plain(&p)).await.unwrap();
        }
    }
    p2.disks[0].chunks[1] = ChunkRef::Chain(ch1);
    p2.disks[0].chunks[2] = ChunkRef::Chain(ch2);
    f.store.put_manifest(&f.server, &p2).await.unwrap();
    (p1, p2, image)
}

#[tokio::test]
async fn a_chain_of_patches_restores_bit_exact() {
    let f = fixture();
    let (_, p2, image) = chained_point(&f, false).await;
    let loaded = f.store.load_point(&f.server, "p2").await.unwrap();
    assert_eq!(loaded, p2, "the chain survives the manifest's JSON");
    assert_eq!(loaded.format, siterecovery_store::FORMAT_VERSION);
    let out = f.dir.path().join("out.img");
    let r = f.store.restore_disk(&f.server, &loaded, "sda", &out).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), image);
    assert_eq!(r.chunks_written, 3);
    // Patches are small: the chained chunks cost their base and a few KiB.
    let patch_bytes: u64 = {
        let prefix = f.server.patches_prefix("sda");
        let mut n = 0;
        for k in f.backend.list(&prefix).await.unwrap() {
            n += f.backend.get(&k).await.unwrap().len() as u64;
        }
        n
    };
    assert!(patch_bytes < 20_000, "three patches of 14 KiB of noise take {patch_bytes} bytes");
}

#[tokio::test]
async fn local_copies_answer_reads_and_a_damaged_one_is_read_from_the_store_instead() {
    let mut f = fixture();
    let copies = Arc::new(LocalCopies::open(&f.dir.path().join("copies"), 1 << 30, 0).unwrap());
    f.store = f.store.clone().with_copies(copies.clone());
    let (_, p2, image) = chained_point(&f, true).await;
    assert!(copies.bytes() > 0, "what the store wrote has copies");
    let out = f.dir.path().join("out.img");
    let r = f.store.restore_disk(&f.server, &p2, "sda", &out).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), image);
    // Chunk 0 whole, chunk 1 its base and two patches, chunk 2 one patch: all copies.
    assert_eq!((copies.hits.get(), r.bytes_downloaded), (5, 0), "nothing downloaded");

    // Every copy damaged: each is dropped, the objects read from the store, same bytes.
    for entry in std::fs::read_dir(f.dir.path().join("copies")).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    }
    std::fs::remove_file(&out).unwrap();
    let r = f.store.restore_disk(&f.server, &p2, "sda", &out).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), image, "bit-exact from the store");
    assert!(r.bytes_downloaded > 0);
    assert!(copies.dropped.get() >= 3, "the damaged copies were dropped: {}", copies.dropped.get());
}

#[tokio::test]
async fn a_damaged_patch_is_named_and_nothing_of_it_is_written() {
    let f = fixture();
    let (_, p2, _) = chained_point(&f, false).await;
    let ChunkRef::Chain(chain) = &p2.disks[0].chunks[2] else { panic!("chunk 2 is a chain") };
    let key = f.server.patch_key("sda", &chain.hash, None);
    let mut sealed = f.backend.get(&key).await.unwrap().to_vec();
    let at = sealed.len() - 20;
    sealed[at] ^= 1;
    f.backend.put(&key, sealed.into()).await.unwrap();
    // One disk of that chunk only, so "nothing written" is checkable: the target stays zeros.
    let mut one = p2.clone();
    one.id = "one".into();
    one.disks[0].size = 3 * u64::from(K);
    one.disks[0].chunks = vec![ChunkRef::Zero, ChunkRef::Zero, p2.disks[0].chunks[2].clone()];
    let out = f.dir.path().join("out.img");
    let err = f.store.restore_disk(&f.server, &one, "sda", &out).await.unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt { object, .. } if *object == key), "{err}");
    assert!(std::fs::read(&out).unwrap().iter().all(|&b| b == 0), "no byte of the bad chunk was written");

    // A patch renamed as another fails too (the AEAD covers its name).
    let ChunkRef::Chain(chain1) = &p2.disks[0].chunks[1] else { panic!("chunk 1 is a chain") };
    let (a, b) = (chain1.patches[0], chain1.patches[1]);
    let key_a = f.server.patch_key("sda", &a, chain1.base.as_ref());
    let key_b = f.server.patch_key("sda", &b, Some(&a));
    // Chunk 1 alone: chunk 2's patch is still damaged, and chunks are restored in parallel.
    let mut only1 = p2.clone();
    only1.disks[0].chunks[2] = ChunkRef::Zero;
    let sealed_b = f.backend.get(&key_b).await.unwrap();
    f.backend.put(&key_b, f.backend.get(&key_a).await.unwrap()).await.unwrap();
    let err = f.store.restore_disk(&f.server, &only1, "sda", &out).await.unwrap_err();
    assert!(matches!(&err, StoreError::Corrupt { object, .. } if *object == key_b), "{err}");
    f.backend.put(&key_b, sealed_b).await.unwrap();

    // A patch sealed under its name with other bytes (a writer's bug, not damage): the
    // chain's result is wrong, and the step that goes wrong is the one named.
    f.store.put_patch(&f.server, "sda", &a, chain1.base.as_ref(), &[[0, 100]], &[7; 100]).await.unwrap();
    let err = f.store.restore_disk(&f.server, &only1, "sda", &out).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { object, reason } if *object == key_a && reason.contains("gives chunk")),
        "{err}"
    );
}

#[tokio::test]
async fn a_format_1_manifest_still_restores_and_may_not_hold_chains() {
    let f = fixture();
    let (p1, p2, _) = chained_point(&f, false).await;
    let mut v1 = p1.clone();
    v1.format = 1;
    v1.id = "v1".into();
    f.store.put_manifest(&f.server, &v1).await.unwrap();
    let loaded = f.store.load_point(&f.server, "v1").await.unwrap();
    assert_eq!(loaded.format, 1);
    let (a, b) = (f.dir.path().join("a.img"), f.dir.path().join("b.img"));
    f.store.restore_disk(&f.server, &loaded, "sda", &a).await.unwrap();
    f.store.restore_disk(&f.server, &p1, "sda", &b).await.unwrap();
    assert_eq!(file_hash(&a), file_hash(&b));
    assert_eq!(file_hash(&a), file_hash(&f.dir.path().join("sda.img")));

    let mut bad = p2.clone();
    bad.format = 1;
    bad.id = "bad".into();
    let err = f.store.put_manifest(&f.server, &bad).await.unwrap_err();
    assert!(err.to_string().contains("patch chain in a format 1 manifest"), "{err}");
    let mut broken = p2.clone();
    broken.id = "broken".into();
    let ChunkRef::Chain(c) = &mut broken.disks[0].chunks[1] else { panic!() };
    c.patches.pop();
    let err = f.store.put_manifest(&f.server, &broken).await.unwrap_err();
    assert!(err.to_string().contains("not with the chunk"), "{err}");
}

#[tokio::test]
async fn gc_keeps_the_bases_and_patches_of_retained_chains_only() {
    let f = fixture();
    let (p1, p2, image) = chained_point(&f, false).await;
    // A patch nobody references (a writer died before its manifest) and a foreign file.
    let mut spare = image[..K as usize].to_vec();
    let orphan = patch(&mut spare, p1.disks[0].chunks[0].hash(), &[[0, 10]], 40);
    let orphan_key = f.server.patch_key("sda", &orphan.result, orphan.base.as_ref());
    f.store
        .put_patch(&f.server, "sda", &orphan.result, orphan.base.as_ref(), &orphan.ranges, plain(&orphan))
        .await
        .unwrap();
    f.backend.put(&format!("{}README", f.server.patches_prefix("sda")), "x".into()).await.unwrap();

    // p1 goes: chunk 1's base stays (p2's chain needs it) although p2 no longer names it whole.
    let r = f.store.prune(&f.server, |m| m.id == p2.id).await.unwrap();
    assert_eq!((r.points_deleted, r.chunks_deleted, r.chunks_kept), (1, 0, 2), "{r:?}");
    assert_eq!((r.patches_kept, r.patches_deleted, r.foreign_objects), (3, 1, 1), "{r:?}");
    assert!(!f.backend.exists(&orphan_key).await.unwrap());
    let out = f.dir.path().join("out.img");
    f.store.restore_disk(&f.server, &p2, "sda", &out).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), image);

    // No point left: every chunk and patch goes, the foreign file stays.
    let r = f.store.prune(&f.server, |_| false).await.unwrap();
    assert_eq!((r.chunks_deleted, r.patches_deleted, r.foreign_objects), (2, 3, 1), "{r:?}");
    assert_eq!(f.backend.list(&f.server.patches_prefix("sda")).await.unwrap().len(), 1);
}

/// Format 3: the three patches of `chained_point` in one pack (one upload) restore the
/// same image; a flipped byte in the pack is named with the patch and the pack; GC keeps
/// the pack while a retained point needs a patch in it, and deletes it after.
#[tokio::test]
async fn patches_in_one_pack_restore_bit_exact_and_gc_keeps_the_pack_while_needed() {
    let f = fixture();
    let (p1, p2, image) = chained_point(&f, true).await;
    assert!(f.backend.list(&f.server.patches_prefix("sda")).await.unwrap().is_empty(), "no patch objects");
    let ChunkRef::Chain(chain) = &p2.disks[0].chunks[1] else { panic!("chunk 1 is a chain") };
    let (first, second) = (*chain.packed_at(0).unwrap(), *chain.packed_at(1).unwrap());
    assert_eq!(first.offset + first.len, second.offset, "one after the other");
    let pack_key = f.server.pack_key("sda", &first.pack);

    let loaded = f.store.load_point(&f.server, "p2").await.unwrap();
    assert_eq!(loaded, p2, "the places survive the manifest's JSON");
    let out = f.dir.path().join("out.img");
    f.store.restore_disk(&f.server, &loaded, "sda", &out).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), image);
    let report = f.store.gc(&f.server).await.unwrap();
    assert_eq!((report.packs_kept, report.packs_deleted, report.patches_kept), (1, 0, 0), "{report:?}");

    // A flipped byte in the pack's second patch: named with its pack.
    let mut pack = f.backend.get(&pack_key).await.unwrap().to_vec();
    pack[(second.offset + second.len) as usize - 5] ^= 1;
    f.backend.put(&pack_key, pack.into()).await.unwrap();
    let err = f.store.restore_disk(&f.server, &loaded, "sda", &out).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { object, .. } if object.contains(&pack_key) && object.contains("/patches/")),
        "{err}"
    );

    f.store.delete_point(&f.server, "p2").await.unwrap();
    let report = f.store.gc(&f.server).await.unwrap();
    assert_eq!((report.packs_kept, report.packs_deleted), (0, 1), "{report:?}");
    assert!(!f.backend.exists(&pack_key).await.unwrap());
    assert!(f.store.load_point(&f.server, &p1.id).await.is_ok(), "the first point stays");
}
