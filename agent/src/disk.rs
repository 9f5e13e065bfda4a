//! Protected disks: image files or block devices, read chunk by chunk.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use siterecovery_wire::Slot;

use crate::tree::Blocks;

/// One protected disk, open for reading.
#[derive(Debug, Clone)]
pub struct Disk {
    /// Disk id, unique within the server.
    pub id: String,
    /// Path of the image file or block device.
    pub path: PathBuf,
    file: Arc<File>,
    /// A block device opened again with O_DIRECT, which chunks are read from. A
    /// filesystem mounted on the device writes file data to it without going through the
    /// device's page cache, so buffered reads can return data the filesystem has since
    /// overwritten (stale pages cached by an earlier read): points would hold old file
    /// contents under new metadata. Direct reads go to the device, after writing back
    /// whatever was written through the cache.
    direct: Option<Arc<File>>,
    /// A block device; otherwise an image file, whose holes read as zeros without being
    /// read.
    block: bool,
}

/// Memory alignment of direct reads (a multiple of every logical block size).
const DIRECT_ALIGN: usize = 4096;

/// Read buffers (a read's bytes plus the alignment slack of direct reads), reused: a read
/// costs one copy at most, and none for a chunk of zeros. Shared rather than one per
/// reading thread, so that what is kept is bounded ([`SPARE_BUFFERS`]) however many
/// threads read at once.
static BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Read buffers kept between reads: as many as whole chunks are read at once
/// (`send.rs`).
const SPARE_BUFFERS: usize = 2;

/// Size of the blocks deltas are made of.
pub const DELTA_BLOCK: usize = crate::tree::BLOCK;

/// A chunk as read: its slot (hash or zero) and, for data, the bytes.
#[derive(Debug)]
pub struct ReadChunk {
    /// Chunk index.
    pub index: u64,
    /// What it holds.
    pub slot: Slot,
    /// What the reader kept of the plaintext (nothing for zero chunks).
    pub data: Vec<u8>,
    /// The plaintext compressed, if the reader did.
    pub packed: Option<Vec<u8>>,
    /// Bytes read from the disk: none for a hole.
    pub bytes_read: u64,
    /// The chaining value of every [`DELTA_BLOCK`] of the chunk and whether it is all
    /// zeros, to find what changed next time and to hash it again from the blocks that did.
    pub blocks: Blocks,
}

impl Disk {
    /// Opens `path` read-only.
    pub fn open(id: &str, path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("opening disk {id} at {}: {e}", path.display())))?;
        let block = file.metadata().is_ok_and(|m| m.file_type().is_block_device());
        let direct = block
            .then(|| std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_DIRECT).open(path))
            .and_then(|r| r.inspect_err(|e| tracing::warn!(disk = id, error = %e, "no direct reads: reading through the page cache, which a mounted filesystem's writes bypass")).ok())
            .map(Arc::new);
        Ok(Self { id: id.to_string(), path: path.to_path_buf(), file: Arc::new(file), direct, block })
    }

    /// Reads `len` bytes at `offset` into a buffer of the pool and gives them to `f`;
    /// zeros past the end of the disk.
    fn read_with<T>(&self, len: usize, offset: u64, f: impl FnOnce(&[u8]) -> T) -> std::io::Result<T> {
        let spare = || BUFFERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut raw = spare().pop().unwrap_or_default();
        if raw.len() < len + DIRECT_ALIGN {
            raw = vec![0u8; len + DIRECT_ALIGN];
        }
        // O_DIRECT needs an aligned buffer; offsets and lengths are whole logical blocks
        // (chunks are, and so is a device's size).
        let skip = (DIRECT_ALIGN - raw.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN;
        let buf = &mut raw[skip..skip + len];
        let n = match &self.direct {
            Some(direct) => match read_full(direct, buf, offset) {
                // A device that refuses this alignment: the page cache is better than nothing.
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => read_full(&self.file, buf, offset)?,
                r => r?,
            },
            None => read_full(&self.file, buf, offset)?,
        };
        buf[n..].fill(0);
        let out = f(buf);
        let mut kept = spare();
        if kept.len() < SPARE_BUFFERS {
            kept.push(raw);
        }
        Ok(out)
    }

    /// Current size (seeking to the end works for block devices too).
    pub fn size(&self) -> std::io::Result<u64> {
        (&*self.file).seek(SeekFrom::End(0))
    }

    /// Whether this is a block device (no usable modification time).
    pub fn is_block_device(&self) -> bool {
        self.block
    }

    /// Modification time and size of an image file: a change tells that it was written.
    pub fn change_stamp(&self) -> std::io::Result<(i64, i64, u64)> {
        let m = std::fs::metadata(&self.path)?;
        Ok((m.mtime(), m.mtime_nsec(), m.len()))
    }

    /// Reads chunk `index` of a disk of `size` bytes and classifies it; `keep` gives, from
    /// the bytes of a data chunk and its slot, what to keep of them and their compression.
    pub fn read_chunk(
        &self,
        index: u64,
        chunk_size: u32,
        size: u64,
        keep: impl FnOnce(&[u8], Slot) -> (Vec<u8>, Option<Vec<u8>>),
    ) -> std::io::Result<ReadChunk> {
        let cs = u64::from(chunk_size);
        let offset = index * cs;
        let len = (size.saturating_sub(offset)).min(cs) as usize;
        if self.is_hole(offset, len as u64) {
            let blocks = Blocks::zeros(len as u64);
            return Ok(ReadChunk { index, slot: Slot::Zero, data: Vec::new(), packed: None, blocks, bytes_read: 0 });
        }
        // Short when the disk shrank under us: the rest reads as zeros; the next pass
        // notices the new size.
        self.read_with(len, offset, |bytes| {
            let blocks = Blocks::of(bytes);
            let slot = blocks.slot(len as u64, Some(bytes)).expect("the bytes are given");
            let (data, packed) = if slot == Slot::Zero { (Vec::new(), None) } else { keep(bytes, slot) };
            ReadChunk { index, slot, data, packed, blocks, bytes_read: len as u64 }
        })
    }

    /// Whether bytes `[offset, offset + len)` of an image file are all a hole (zeros the
    /// filesystem does not store): `SEEK_DATA` finds no data before their end. Filesystems
    /// count written data still in the page cache as data (ext4 and XFS their delayed
    /// allocations, tmpfs its pages); one without `SEEK_DATA` reports all of a file as
    /// data. `false` for a block device, and whenever the answer is not a clear hole.
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        use nix::unistd::{Whence, lseek};
        if self.block || len == 0 {
            return false;
        }
        let Ok(at) = i64::try_from(offset) else { return false };
        match lseek(&*self.file, at, Whence::SeekData) {
            Ok(data) => u64::try_from(data).is_ok_and(|d| d >= offset + len),
            // No data at or after `offset` (which is inside the file).
            Err(nix::errno::Errno::ENXIO) => true,
            Err(_) => false,
        }
    }

    /// Reads the delta blocks `which` (indexes within chunk `index`, sorted) of a disk of
    /// `size` bytes, adjacent blocks in one read, and gives each to `each` with its index,
    /// from the read buffer. Offsets are whole blocks and lengths whole blocks or the end
    /// of the disk, as direct reads need.
    pub fn read_blocks(
        &self,
        index: u64,
        chunk_size: u32,
        size: u64,
        which: &[u32],
        mut each: impl FnMut(u32, &[u8]),
    ) -> std::io::Result<()> {
        let start = index * u64::from(chunk_size);
        let end = size.min(start + u64::from(chunk_size));
        let block = DELTA_BLOCK as u64;
        let mut rest = which;
        while let Some(&first) = rest.first() {
            let run = rest.iter().zip(first..).take_while(|(b, i)| **b == *i).count();
            let offset = start + u64::from(first) * block;
            let len = (end.saturating_sub(offset)).min(run as u64 * block) as usize;
            self.read_with(len, offset, |buf| {
                (first..).zip(buf.chunks(DELTA_BLOCK)).for_each(|(b, data)| each(b, data))
            })?;
            rest = &rest[run..];
        }
        Ok(())
    }
}

/// Reads until `buf` is full or the end of the file.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}
