//! The partial read path on a file: dirty blocks given explicitly, the chunk hash derived
//! from cached CVs checked against blake3 of the chunk as it is on disk.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt as _;

use siterecovery_store::ChunkHash;

use super::*;

const B: u64 = DELTA_BLOCK as u64;
const CHUNK: u32 = 1024 * 1024;

use siterecovery_store::tree::pseudo_random as pattern;

/// A file of `size` bytes of pattern, opened as a disk.
fn disk(dir: &std::path::Path, size: u64) -> (std::fs::File, Disk) {
    let path = dir.join("disk.img");
    std::fs::write(&path, pattern(size as usize, 1)).unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    (file, Disk::open("d", &path).unwrap())
}

fn chunk_bytes(file: &std::fs::File, index: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, index * u64::from(CHUNK)).unwrap();
    buf
}

fn some(b: &[u32]) -> changes::Blocks {
    changes::Blocks::Some(b.iter().copied().collect::<BTreeSet<_>>())
}

/// Applies `ranges` with `bytes` to `base`, as the process server does.
fn patch(base: &[u8], ranges: &[[u32; 2]], bytes: &[u8]) -> Vec<u8> {
    let mut out = base.to_vec();
    let mut at = 0;
    for &[off, n] in ranges {
        out[off as usize..(off + n) as usize].copy_from_slice(&bytes[at..at + n as usize]);
        at += n as usize;
    }
    out
}

#[test]
fn only_dirty_blocks_are_read_and_the_hash_is_that_of_the_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 2 * u64::from(CHUNK) + 3 * B + 100;
    let (file, disk) = disk(tmp.path(), size);
    for (index, len, dirty) in [(1, u64::from(CHUNK), vec![3u32, 4, 7, 9]), (2, 3 * B + 100, vec![0, 3])] {
        let first = read(&disk, index, CHUNK, size, Plan::Whole, 0, Slot::Missing).unwrap();
        let old = chunk_bytes(&file, index, len);
        assert_eq!(first.slot, Slot::Data(ChunkHash::of(&old)));
        assert_eq!(first.bytes_read, len);

        // New bytes in every dirty block but the first, which is rewritten unchanged.
        for &b in &dirty[1..] {
            let n = (len - u64::from(b) * B).min(B) as usize;
            file.write_all_at(&pattern(n, u64::from(b) + 100), index * u64::from(CHUNK) + u64::from(b) * B).unwrap();
        }
        let new = chunk_bytes(&file, index, len);
        let plan = Plan::for_chunk(&some(&dirty), len, || Some(first.blocks.clone()));
        assert!(matches!(plan, Plan::Blocks { .. }), "{plan:?}");
        let found = read(&disk, index, CHUNK, size, plan, 0, Slot::Missing).unwrap();
        assert_eq!(found.slot, Slot::Data(ChunkHash::of(&new)), "chunk {index}");
        assert_eq!(found.blocks, Blocks::of(&new));
        let dirty_bytes: u64 = dirty.iter().map(|&b| block_len(b, len)).sum();
        assert_eq!(found.bytes_read, dirty_bytes);
        let Body::Changed { ranges, bytes, .. } = found.body else { panic!("read whole") };
        assert!(ranges.iter().all(|r| u64::from(r[0]) != u64::from(dirty[0]) * B), "unchanged block sent");
        assert_eq!(patch(&old, &ranges, &bytes), new);
    }
}

#[test]
fn zero_chunks_gain_data_and_data_chunks_become_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sparse.img");
    let file = std::fs::File::create_new(&path).unwrap();
    drop(file);
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let size = 2 * u64::from(CHUNK);
    file.set_len(size).unwrap();
    let disk = Disk::open("d", &path).unwrap();
    let first = read(&disk, 1, CHUNK, size, Plan::Whole, 0, Slot::Missing).unwrap();
    assert_eq!(first.slot, Slot::Zero);

    file.write_all_at(&pattern(B as usize, 5), u64::from(CHUNK) + 2 * B).unwrap();
    let plan = Plan::for_chunk(&some(&[2]), u64::from(CHUNK), || Some(first.blocks.clone()));
    let found = read(&disk, 1, CHUNK, size, plan, 0, Slot::Missing).unwrap();
    let new = chunk_bytes(&file, 1, u64::from(CHUNK));
    assert_eq!(found.slot, Slot::Data(ChunkHash::of(&new)));
    assert_eq!(found.bytes_read, B);
    let Body::Changed { ranges, .. } = &found.body else { panic!("read whole") };
    assert_eq!(ranges, &vec![[2 * B as u32, B as u32]]);

    file.write_all_at(&vec![0; B as usize], u64::from(CHUNK) + 2 * B).unwrap();
    let plan = Plan::for_chunk(&some(&[2]), u64::from(CHUNK), || Some(found.blocks.clone()));
    let again = read(&disk, 1, CHUNK, size, plan, 0, Slot::Missing).unwrap();
    assert_eq!(again.slot, Slot::Zero);
    assert_eq!(again.blocks, first.blocks);
}

#[test]
fn chunks_are_read_whole_when_the_blocks_cannot_tell() {
    let len = u64::from(CHUNK);
    let blocks = Blocks::of(&pattern(len as usize, 3));
    let cached = || Some(blocks.clone());
    assert_eq!(Plan::for_chunk(&changes::Blocks::Whole, len, cached), Plan::Whole);
    assert_eq!(Plan::for_chunk(&some(&[1]), len, || None), Plan::Whole, "not cached");
    let nine: Vec<u32> = (0..9).collect();
    assert_eq!(Plan::for_chunk(&some(&nine), len, cached), Plan::Whole, "more than half");
    assert!(matches!(Plan::for_chunk(&some(&nine[..8]), len, cached), Plan::Blocks { .. }), "half");
    assert_eq!(Plan::for_chunk(&some(&[16]), len, cached), Plan::Whole, "past the end");
    let other = Blocks::of(&pattern(len as usize / 2, 3));
    assert_eq!(Plan::for_chunk(&some(&[1]), len, || Some(other)), Plan::Whole, "another length");
    // A chunk of one block has no CVs to merge: its dirty block is all of it.
    let small = Blocks::of(&pattern(1000, 3));
    assert_eq!(Plan::for_chunk(&some(&[0]), 1000, || Some(small)), Plan::Whole);
}

#[test]
fn ranges_merge_adjacent_blocks_and_end_with_the_chunk() {
    assert_eq!(ranges([0, 1, 3], 4 * B as u32), vec![[0, 2 * B as u32], [3 * B as u32, B as u32]]);
    assert_eq!(ranges([2], 2 * B as u32 + 10), vec![[2 * B as u32, 10]]);
    assert_eq!(changed_ranges(&[1, 2, 3], &[1, 5, 3], 3 * B as u32), vec![[B as u32, B as u32]]);
}

#[test]
fn a_chunk_read_whole_is_compressed_only_when_it_will_be_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("disk.img");
    let size = u64::from(CHUNK);
    std::fs::write(&path, vec![7u8; size as usize]).unwrap();
    let disk = Disk::open("d", &path).unwrap();
    let first = read(&disk, 0, CHUNK, size, Plan::Whole, 3, Slot::Missing).unwrap();
    let Body::Whole { data, packed } = &first.body else { panic!("read whole") };
    assert!(packed.is_some(), "the process server lacks it: compressed to be sent");
    assert!(data.is_empty(), "nothing to make a delta against: the plaintext is not kept");
    let again = read(&disk, 0, CHUNK, size, Plan::Whole, 3, first.slot).unwrap();
    let Body::Whole { data, packed } = &again.body else { panic!("read whole") };
    assert!(packed.is_none(), "the process server holds it: nothing to send, nothing to compress");
    assert!(data.is_empty(), "nor to keep");
    for (level, held, why) in [(3, Slot::Zero, "a delta against zeros"), (0, Slot::Missing, "sent uncompressed")] {
        let found = read(&disk, 0, CHUNK, size, Plan::Whole, level, held).unwrap();
        let Body::Whole { data, .. } = &found.body else { panic!("read whole") };
        assert_eq!(data, &vec![7u8; size as usize], "the plaintext is kept for {why}");
    }
}

#[test]
fn holes_of_an_image_file_are_zero_chunks_without_a_read() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sparse.img");
    let size = 4 * u64::from(CHUNK);
    let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    file.set_len(size).unwrap();
    // Chunk 1 holds data; chunk 2 one block of data at its end, the rest a hole; chunk 3
    // zeros written out (stored, so read, and still a zero chunk).
    let data = pattern(CHUNK as usize, 9);
    file.write_all_at(&data, u64::from(CHUNK)).unwrap();
    file.write_all_at(&pattern(B as usize, 10), 3 * u64::from(CHUNK) - B).unwrap();
    file.write_all_at(&vec![0u8; CHUNK as usize], 3 * u64::from(CHUNK)).unwrap();
    let disk = Disk::open("d", &path).unwrap();
    let read = |index| read(&disk, index, CHUNK, size, Plan::Whole, 0, Slot::Missing).unwrap();

    let hole = read(0);
    assert_eq!(hole.slot, Slot::Zero);
    assert_eq!(hole.bytes_read, 0, "a hole is not read");
    assert_eq!(hole.blocks, Blocks::of(&vec![0u8; CHUNK as usize]), "the blocks of a chunk of zeros");

    let full = read(1);
    assert_eq!((full.slot, full.bytes_read), (Slot::Data(ChunkHash::of(&data)), u64::from(CHUNK)));

    let mut partly = vec![0u8; CHUNK as usize];
    partly[CHUNK as usize - B as usize..].copy_from_slice(&pattern(B as usize, 10));
    let part = read(2);
    assert_eq!((part.slot, part.bytes_read), (Slot::Data(ChunkHash::of(&partly)), u64::from(CHUNK)), "part hole: read");

    let zeros = read(3);
    assert_eq!((zeros.slot, zeros.bytes_read), (Slot::Zero, u64::from(CHUNK)), "written zeros are read");
}
