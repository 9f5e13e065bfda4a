//! The writes the data-plane benchmark makes to the disk image: a one-off churn of
//! random 64 KiB blocks, and a sustained paced writer; plus whole-file hashing.
//!
//! Block content is half random and half repetitive (per 4 KiB: 2 KiB of random bytes,
//! then 2 KiB of one repeated byte), so it compresses about 2:1 like ordinary data rather
//! than being all noise or all zeros. The generator is a xorshift, written here because a
//! benchmark needs speed and a fixed seed, not a cryptographic source.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Size of one write.
pub const BLOCK: usize = 64 * 1024;

/// A small fast pseudo-random generator (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (a zero seed is replaced: xorshift would stay at zero).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with the half-random, half-repetitive block content.
    pub fn fill_block(&mut self, buf: &mut [u8]) {
        for page in buf.chunks_mut(4096) {
            let (noise, rest) = page.split_at_mut(page.len().min(2048));
            for word in noise.chunks_mut(8) {
                let v = self.next_u64().to_le_bytes();
                word.copy_from_slice(&v[..word.len()]);
            }
            rest.fill(self.next_u64() as u8);
        }
    }
}

/// What a churn wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct Churn {
    /// Blocks written.
    pub blocks: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Sum of each block's zstd-compressed size (level 3, zstd's default).
    pub zstd_bytes: u64,
    /// 4 MiB-aligned regions touched (what a 4 MiB-chunk replicator must resend).
    pub regions_4mib: u64,
}

/// Writes `fraction` of the image or block device at `path` in distinct random 64 KiB-aligned
/// blocks, then fsyncs (on a block device that writes the page cache back to the device,
/// where a block tracker sees it). The same seed on the same size writes the same bytes
/// at the same offsets.
pub fn churn(path: &Path, fraction: f64, seed: u64) -> std::io::Result<Churn> {
    let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
    let size = byte_len(&mut file)?;
    let slots = size / BLOCK as u64;
    let count = ((size as f64 * fraction) / BLOCK as f64).ceil() as u64;
    let mut rng = Rng::new(seed);
    let mut chosen = BTreeSet::new();
    while (chosen.len() as u64) < count.min(slots) {
        chosen.insert(rng.below(slots));
    }
    let mut out = Churn::default();
    let mut regions = BTreeSet::new();
    let mut buf = vec![0u8; BLOCK];
    for &slot in &chosen {
        rng.fill_block(&mut buf);
        file.write_all_at(&buf, slot * BLOCK as u64)?;
        out.blocks += 1;
        out.bytes += BLOCK as u64;
        out.zstd_bytes += zstd::bulk::compress(&buf, 3)?.len() as u64;
        regions.insert(slot * BLOCK as u64 / (4 << 20));
    }
    file.sync_all()?;
    out.regions_4mib = regions.len() as u64;
    Ok(out)
}

/// Size of a file or a block device (whose metadata says 0), from the end of it.
pub fn byte_len(file: &mut std::fs::File) -> std::io::Result<u64> {
    use std::io::Seek as _;
    let len = file.seek(std::io::SeekFrom::End(0))?;
    file.seek(std::io::SeekFrom::Start(0))?;
    Ok(len)
}

/// A thread writing random 64 KiB blocks at a steady rate until stopped.
#[derive(Debug)]
pub struct PacedWriter {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<std::io::Result<u64>>,
}

impl PacedWriter {
    /// Starts writing `bytes_per_second` to random aligned blocks of the image at `path`
    /// (buffered writes, no fsync: what most applications do).
    pub fn start(path: &Path, bytes_per_second: f64, seed: u64) -> std::io::Result<Self> {
        Self::over(&[path.to_path_buf()], bytes_per_second, seed, false)
    }

    /// Like [`Self::start`], spread over `paths`: each write goes to a random block of a
    /// random one of them (files on a mounted filesystem, or one image). With `sync`, each
    /// write is followed by `fdatasync`, as a database would do: every write reaches the
    /// disk at once instead of with the kernel's writeback.
    pub fn over(paths: &[PathBuf], bytes_per_second: f64, seed: u64, sync: bool) -> std::io::Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let file = std::fs::OpenOptions::new().write(true).open(p)?;
            let slots = file.metadata()?.len() / BLOCK as u64;
            if slots == 0 {
                return Err(std::io::Error::other(format!("{} is smaller than one block", p.display())));
            }
            files.push((file, slots));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut buf = vec![0u8; BLOCK];
            let start = Instant::now();
            let mut written = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let due = (start.elapsed().as_secs_f64() * bytes_per_second) as u64;
                while written + BLOCK as u64 <= due {
                    rng.fill_block(&mut buf);
                    let (file, slots) = &files[rng.below(files.len() as u64) as usize];
                    file.write_all_at(&buf, rng.below(*slots) * BLOCK as u64)?;
                    if sync {
                        file.sync_data()?;
                    }
                    written += BLOCK as u64;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(written)
        });
        Ok(Self { stop, handle })
    }

    /// Stops and returns the bytes written.
    pub fn stop(self) -> std::io::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().map_err(|_| std::io::Error::other("writer thread panicked"))?
    }
}

/// Creates `count` files of `bytes` each in `dir` (`data-<i>.bin`, the half-random block
/// content), fsynced: the data a filesystem benchmark then rewrites.
pub fn fill_files(dir: &Path, count: usize, bytes: u64, seed: u64) -> std::io::Result<Vec<PathBuf>> {
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; BLOCK];
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let path = dir.join(format!("data-{i}.bin"));
        let file = std::fs::File::create(&path)?;
        for slot in 0..bytes / BLOCK as u64 {
            rng.fill_block(&mut buf);
            file.write_all_at(&buf, slot * BLOCK as u64)?;
        }
        file.sync_all()?;
        out.push(path);
    }
    Ok(out)
}

/// BLAKE3 of a whole file.
pub fn hash_file(path: &Path) -> std::io::Result<blake3::Hash> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_writes_distinct_blocks_that_compress_about_half() {
        let dir = std::env::temp_dir().join(format!("sr-bench-churn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("img");
        std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let before = hash_file(&img).unwrap();
        let c = churn(&img, 0.01, 7).unwrap();
        assert_eq!(c.blocks, 11, "1% of 64 MiB in 64 KiB blocks, rounded up");
        assert_eq!(c.bytes, 11 * BLOCK as u64);
        let ratio = c.zstd_bytes as f64 / c.bytes as f64;
        assert!((0.4..0.6).contains(&ratio), "compresses about 2:1, got {ratio}");
        assert_ne!(hash_file(&img).unwrap(), before);
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20, "size unchanged");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
