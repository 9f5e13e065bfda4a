//! The durable cache of one protected server: an append-only journal of the frames its
//! agent sent, in segment files, plus a checkpoint of what was uploaded.
//!
//! ```text
//! <cache>/<namespace>/<server>/journal/<segment:016>.log   records: frame | crc32 (u32 BE)
//! <cache>/<namespace>/<server>/checkpoint                  head + position, atomically replaced
//! ```
//!
//! A frame is acknowledged to the agent only after [`Journal::sync`] returned a position
//! past it. On start, a torn record at the end of the last segment (a crash in the
//! middle of an append that was therefore never acknowledged) is cut off; a bad record
//! anywhere else is reported, never skipped.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use siterecovery_wire::Frame;
use siterecovery_wire::frame::check_length;

/// A segment is closed once it holds this much; the uploader frees whole segments.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// A place in the journal: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// Segment number.
    pub segment: u64,
    /// Offset in that segment.
    pub offset: u64,
}

/// A journal failure, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing a journal file failed (e.g. the cache volume is full).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A record inside the journal (not at its end) is damaged.
    #[error("journal {path} is corrupt at offset {offset}: {reason}")]
    Corrupt {
        /// The segment file.
        path: String,
        /// Where.
        offset: u64,
        /// What check failed.
        reason: String,
    },
}

impl JournalError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        JournalError::Io { op, path: path.display().to_string(), source }
    }

    /// Whether the disk is full (the agent should retry later; nothing was acknowledged).
    pub fn is_full(&self) -> bool {
        matches!(self, JournalError::Io { source, .. } if source.raw_os_error() == Some(28))
    }
}

type Result<T> = std::result::Result<T, JournalError>;

struct Writer {
    file: File,
    segment: u64,
    offset: u64,
    /// Segments closed since the last sync; they are synced before the current one.
    unsynced_closed: Vec<File>,
    durable: Position,
}

/// The journal of one server.
pub struct Journal {
    dir: PathBuf,
    writer: Mutex<Writer>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016}.log"))
}

/// Segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| JournalError::io("list", dir, e))? {
        let entry = entry.map_err(|e| JournalError::io("list", dir, e))?;
        let name = entry.file_name();
        if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse::<u64>().ok()) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads the record at the reader's position: `Ok(None)` at a clean end, `Err` with the
/// reason for a torn or damaged record.
fn read_record(r: &mut impl Read) -> std::result::Result<Option<(Frame, u64)>, String> {
    let mut len = [0u8; 4];
    match r.read(&mut len[..1]) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(e.to_string()),
    }
    r.read_exact(&mut len[1..]).map_err(|_| "record length is cut off".to_string())?;
    let n = u32::from_be_bytes(len) as usize;
    check_length(n).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4 + n + 4];
    buf[..4].copy_from_slice(&len);
    r.read_exact(&mut buf[4..]).map_err(|_| "record is cut off".to_string())?;
    let crc = u32::from_be_bytes(buf[4 + n..].try_into().expect("4 bytes"));
    if crc32fast::hash(&buf[..4 + n]) != crc {
        return Err("record checksum mismatch".into());
    }
    buf.truncate(4 + n);
    let frame = Frame::decode_payload(Bytes::from(buf).slice(4..)).map_err(|e| e.to_string())?;
    Ok(Some((frame, (4 + n + 4) as u64)))
}

impl Journal {
    /// Opens (creating) the journal in `dir`, cutting a torn record off the end of the
    /// last segment.
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| JournalError::io("create", dir, e))?;
        let segs = segments(dir)?;
        let segment = segs.last().copied().unwrap_or(0);
        let path = segment_path(dir, segment);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(|e| JournalError::io("open", &path, e))?;
        // Find the end of the last whole record.
        let mut end = 0u64;
        {
            let mut r = BufReader::new(&file);
            loop {
                match read_record(&mut r) {
                    Ok(Some((_, n))) => end += n,
                    Ok(None) => break,
                    Err(reason) => {
                        tracing::warn!(path = %path.display(), offset = end, %reason, "cutting a torn record off the journal (it was never acknowledged)");
                        break;
                    }
                }
            }
        }
        file.set_len(end).map_err(|e| JournalError::io("truncate", &path, e))?;
        file.sync_all().map_err(|e| JournalError::io("sync", &path, e))?;
        file.seek(SeekFrom::End(0)).map_err(|e| JournalError::io("seek", &path, e))?;
        let durable = Position { segment, offset: end };
        Ok(Self {
            dir: dir.to_path_buf(),
            writer: Mutex::new(Writer { file, segment, offset: end, unsynced_closed: Vec::new(), durable }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one frame (not yet durable); returns the position after it.
    pub fn append(&self, frame: &Frame) -> Result<Position> {
        let mut w = self.lock();
        if w.offset >= SEGMENT_BYTES {
            let next = w.segment + 1;
            let path = segment_path(&self.dir, next);
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)
                .map_err(|e| JournalError::io("open", &path, e))?;
            let old = std::mem::replace(&mut w.file, file);
            w.unsynced_closed.push(old);
            w.segment = next;
            w.offset = 0;
        }
        // The record is written in three pieces rather than assembled: the body (a whole
        // chunk) is not copied, so an append costs no memory beyond the frame itself.
        let mut head = Vec::with_capacity(9 + frame.header.len());
        head.extend_from_slice(&((frame.encoded_len() - 4) as u32).to_be_bytes());
        head.push(frame.kind);
        head.extend_from_slice(&(frame.header.len() as u32).to_be_bytes());
        head.extend_from_slice(&frame.header);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        crc.update(&frame.body);
        let crc = crc.finalize().to_be_bytes();
        let path = segment_path(&self.dir, w.segment);
        let written =
            w.file.write_all(&head).and_then(|()| w.file.write_all(&frame.body)).and_then(|()| w.file.write_all(&crc));
        if let Err(e) = written {
            // Leave no partial record behind: the next append must start clean.
            let offset = w.offset;
            let _ = w.file.set_len(offset);
            return Err(JournalError::io("append to", &path, e));
        }
        w.offset += frame.encoded_len() as u64 + 4;
        Ok(Position { segment: w.segment, offset: w.offset })
    }

    /// Makes everything appended so far durable; returns the durable position.
    pub fn sync(&self) -> Result<Position> {
        // Clone handles under the lock, sync outside it so appends continue meanwhile.
        let (closed, current, upto) = {
            let mut w = self.lock();
            let closed = std::mem::take(&mut w.unsynced_closed);
            let current = w.file.try_clone().map_err(|e| JournalError::io("dup", &self.dir, e))?;
            (closed, current, Position { segment: w.segment, offset: w.offset })
        };
        for f in closed.iter().chain(std::iter::once(&current)) {
            f.sync_data().map_err(|e| JournalError::io("sync", &self.dir, e))?;
        }
        if upto.offset == 0 || !closed.is_empty() {
            // A new segment file: make its directory entry durable too.
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| JournalError::io("sync", &self.dir, e))?;
        }
        let mut w = self.lock();
        if upto > w.durable {
            w.durable = upto;
        }
        Ok(w.durable)
    }

    /// The durable end of the journal.
    pub fn durable(&self) -> Position {
        self.lock().durable
    }

    /// Reads the durable records from `from`, at most `max` of them or `max_bytes`;
    /// each with the position after it.
    pub fn read_from(&self, from: Position, max: usize, max_bytes: u64) -> Result<Vec<(Frame, Position)>> {
        let durable = self.durable();
        let mut out = Vec::new();
        let mut pos = from;
        let mut bytes = 0u64;
        while pos < durable && out.len() < max && bytes < max_bytes {
            let path = segment_path(&self.dir, pos.segment);
            let mut file = File::open(&path).map_err(|e| JournalError::io("open", &path, e))?;
            let len = file.metadata().map_err(|e| JournalError::io("stat", &path, e))?.len();
            if pos.offset >= len && pos.segment < durable.segment {
                pos = Position { segment: pos.segment + 1, offset: 0 };
                continue;
            }
            file.seek(SeekFrom::Start(pos.offset)).map_err(|e| JournalError::io("seek", &path, e))?;
            let mut r = BufReader::with_capacity(1 << 20, file);
            while pos < durable && out.len() < max && bytes < max_bytes {
                match read_record(&mut r) {
                    Ok(Some((frame, n))) => {
                        pos.offset += n;
                        bytes += n;
                        out.push((frame, pos));
                    }
                    Ok(None) => break,
                    Err(reason) => {
                        return Err(JournalError::Corrupt {
                            path: path.display().to_string(),
                            offset: pos.offset,
                            reason,
                        });
                    }
                }
            }
            if pos.segment < durable.segment && out.len() < max && bytes < max_bytes {
                pos = Position { segment: pos.segment + 1, offset: 0 };
            }
        }
        Ok(out)
    }

    /// Deletes segments wholly before `upto` (everything in them was uploaded).
    pub fn release(&self, upto: Position) -> Result<()> {
        for s in segments(&self.dir)? {
            if s < upto.segment {
                let path = segment_path(&self.dir, s);
                fs::remove_file(&path).map_err(|e| JournalError::io("remove", &path, e))?;
            }
        }
        Ok(())
    }

    /// Bytes in the journal from `from` to its end: the upload backlog.
    pub fn bytes_after(&self, from: Position) -> u64 {
        let w = self.lock();
        if from.segment == w.segment {
            return w.offset.saturating_sub(from.offset);
        }
        let mut total = 0;
        for s in from.segment..=w.segment {
            let len = if s == w.segment {
                w.offset
            } else {
                fs::metadata(segment_path(&self.dir, s)).map(|m| m.len()).unwrap_or(0)
            };
            total += if s == from.segment { len.saturating_sub(from.offset) } else { len };
        }
        total
    }
}
