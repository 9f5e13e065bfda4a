//! What a session sends: comparison passes that read chunks and send those that differ
//! from what the process server holds (whole or as deltas), and the pre-copy that repeats
//! them until a look finds nothing written (docs/replication-protocol.md "A session",
//! "Recovery points").

use futures::StreamExt as _;
use siterecovery_wire::{ChunkData, Encoding, Message, Slot};
use tokio::io::AsyncWrite;

use crate::changes::Dirty;
use crate::disk::{self, Disk, ReadChunk};
use crate::link::Link;
use crate::pass::{PassStatus, pass_bytes};
use crate::{Agent, SessionError, err};

/// One session's connection and disks, and what it believes the process server holds:
/// what every step of a session (passes, points, group rounds) works on.
pub(crate) struct Wire<W> {
    /// The sending half of the connection.
    pub(crate) link: Link<W>,
    /// The protected disks, in configuration order.
    pub(crate) disks: Vec<Disk>,
    /// Their sizes, as the hello announced them.
    pub(crate) sizes: Vec<u64>,
    /// The process server's chunk size (from the welcome).
    pub(crate) chunk_size: u32,
    /// Per disk and chunk, what was sent: the welcome's head, then every chunk sent since.
    pub(crate) sent: Vec<Vec<Slot>>,
}

impl Agent {
    /// Pre-copy: sends what changed until a look finds nothing written since the previous
    /// one, and returns that look's time (everything sent reflects that instant); `None`
    /// after `maxPasses` passes without such a look, or once `stop` holds.
    pub(crate) async fn precopy<W: AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<W>,
        stop: &(impl Fn() -> bool + Sync),
    ) -> Result<Option<jiff::Timestamp>, SessionError> {
        for _ in 0..self.config.max_passes.max(1) {
            if stop() {
                return Ok(None);
            }
            let now_sizes: Vec<u64> = wire.disks.iter().map(Disk::size).collect::<Result<_, _>>().map_err(err)?;
            if now_sizes != wire.sizes {
                let changed: Vec<String> = wire
                    .disks
                    .iter()
                    .zip(wire.sizes.iter().zip(&now_sizes))
                    .filter(|(_, (a, b))| a != b)
                    .map(|(d, (a, b))| format!("disk {} changed size from {a} to {b} bytes", d.id))
                    .collect();
                self.resized = Some(changed.join("; "));
                self.believed = Some(std::mem::take(&mut wire.sent));
                wire.link.drain().await.map_err(err)?;
                return Err(err("a disk changed size; reconnecting to send the new layout"));
            }
            let at = jiff::Timestamp::now();
            let dirty = self.tracker.take(&wire.disks, wire.chunk_size).map_err(err)?;
            if dirty.is_quiet() && self.tracker.proves_quiet() {
                return Ok(Some(at));
            }
            self.send_pass(wire, &dirty, false).await?;
        }
        Ok(None)
    }

    /// Starts reporting a comparison pass over the chunks `which` names.
    pub(crate) fn begin_pass(&self, reason: &str, message: String, which: &Dirty, sizes: &[u64], chunk_size: u32) {
        let bytes_total = pass_bytes(which, sizes, chunk_size);
        self.update(|s| {
            let id = s.pass.as_ref().map_or(1, |p| p.id + 1);
            s.pass = Some(PassStatus {
                id,
                reason: reason.to_owned(),
                message,
                started: jiff::Timestamp::now(),
                completed: None,
                bytes_compared: vec![0; bytes_total.len()],
                bytes_total,
                bytes_resent: 0,
            });
        });
    }

    /// Marks the current comparison pass complete.
    pub(crate) fn end_pass(&self) {
        self.update(|s| {
            if let Some(p) = &mut s.pass {
                p.completed = Some(jiff::Timestamp::now());
            }
        });
    }

    /// Reads the chunks `which` names, and sends those that differ from `sent`; `counted`
    /// adds them to the current [`PassStatus`].
    pub(crate) async fn send_pass<W: AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<W>,
        which: &Dirty,
        counted: bool,
    ) -> Result<(), SessionError> {
        let level = self.config.compression_level;
        let chunk_size = wire.chunk_size;
        for (d, disk) in wire.disks.iter().enumerate() {
            let size = wire.sizes[d];
            let count = size.div_ceil(u64::from(chunk_size));
            let indexes: Vec<u64> = match which {
                Dirty::All => (0..count).collect(),
                Dirty::Chunks(sets) => {
                    sets.get(d).map(|s| s.iter().copied().filter(|&i| i < count).collect()).unwrap_or_default()
                }
            };
            let mut reads = futures::stream::iter(indexes)
                .map(|index| {
                    let disk = disk.clone();
                    tokio::task::spawn_blocking(move || -> std::io::Result<(ReadChunk, Option<Vec<u8>>)> {
                        let chunk = disk.read_chunk(index, chunk_size, size)?;
                        let packed = match (&chunk.slot, level) {
                            (Slot::Data(_), l) if l > 0 => {
                                zstd::bulk::compress(&chunk.data, l).ok().filter(|z| z.len() < chunk.data.len())
                            }
                            _ => None,
                        };
                        Ok((chunk, packed))
                    })
                })
                .buffered(2);
            while let Some(r) = reads.next().await {
                let (chunk, packed) = r.map_err(err)?.map_err(err)?;
                let len = ((size - chunk.index * u64::from(chunk_size)).min(u64::from(chunk_size))) as u32;
                self.update(|s| {
                    s.chunks_compared += 1;
                    if let Some(p) = s.pass.as_mut().filter(|_| counted)
                        && let Some(b) = p.bytes_compared.get_mut(d)
                    {
                        *b += u64::from(len);
                    }
                });
                let i = chunk.index as usize;
                let previous = match chunk.slot {
                    Slot::Data(h) => self.blocks.insert((d, chunk.index), (h, chunk.blocks.clone())),
                    _ => self.blocks.remove(&(d, chunk.index)),
                };
                if wire.sent[d][i] == chunk.slot {
                    continue;
                }
                let seq = wire.link.next_seq();
                let delta = match (wire.sent[d][i], chunk.slot) {
                    (Slot::Data(old), Slot::Data(_)) => previous
                        .filter(|(h, b)| *h == old && b.len() == chunk.blocks.len())
                        .map(|(_, b)| (Some(old), b)),
                    (Slot::Zero, Slot::Data(_)) => Some((None, vec![0; chunk.blocks.len()])),
                    _ => None,
                }
                .map(|(base, before)| (base, changed_ranges(&before, &chunk.blocks, len)))
                .filter(|(_, ranges)| ranges.iter().map(|r| u64::from(r[1])).sum::<u64>() * 2 <= u64::from(len));
                let payload;
                let message = match (chunk.slot, delta) {
                    (Slot::Data(h), Some((base, ranges))) => {
                        let mut bytes = Vec::new();
                        for &[off, n] in &ranges {
                            bytes.extend_from_slice(&chunk.data[off as usize..(off + n) as usize]);
                        }
                        payload = bytes.len() as u64;
                        let (encoding, body) = pack(bytes, level);
                        self.update(|s| s.deltas_sent += 1);
                        Message::Delta(
                            siterecovery_wire::ChunkDelta {
                                seq,
                                disk: disk.id.clone(),
                                index: chunk.index,
                                len,
                                base: base.map(|b| b.to_hex()),
                                hash: h.to_hex(),
                                ranges,
                                encoding,
                            },
                            body,
                        )
                    }
                    (slot, _) => {
                        let (hash, encoding, body) = match (slot, packed) {
                            (Slot::Data(h), Some(z)) => (Some(h.to_hex()), Encoding::Zstd, bytes::Bytes::from(z)),
                            (Slot::Data(h), None) => (Some(h.to_hex()), Encoding::Raw, bytes::Bytes::from(chunk.data)),
                            _ => (None, Encoding::Raw, bytes::Bytes::new()),
                        };
                        payload = if hash.is_some() { u64::from(len) } else { 0 };
                        Message::Chunk(
                            ChunkData { seq, disk: disk.id.clone(), index: chunk.index, len, hash, encoding },
                            body,
                        )
                    }
                };
                wire.link.send(seq, &message).await.map_err(err)?;
                wire.sent[d][i] = chunk.slot;
                self.update(|s| {
                    s.chunks_sent += 1;
                    s.payload_bytes += payload;
                    if let Some(p) = s.pass.as_mut().filter(|_| counted) {
                        p.bytes_resent += payload;
                    }
                });
            }
        }
        Ok(())
    }
}
/// The `[offset, length]` ranges of a chunk of `len` bytes whose delta blocks differ,
/// adjacent blocks merged.
pub fn changed_ranges(before: &[u64], after: &[u64], len: u32) -> Vec<[u32; 2]> {
    let block = disk::DELTA_BLOCK as u32;
    let mut out: Vec<[u32; 2]> = Vec::new();
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        if a == b {
            continue;
        }
        let off = i as u32 * block;
        let n = block.min(len - off);
        match out.last_mut() {
            Some(last) if last[0] + last[1] == off => last[1] += n,
            _ => out.push([off, n]),
        }
    }
    out
}

/// zstd-compresses a body when that makes it smaller.
fn pack(bytes: Vec<u8>, level: i32) -> (Encoding, bytes::Bytes) {
    if level > 0
        && let Ok(z) = zstd::bulk::compress(&bytes, level)
        && z.len() < bytes.len()
    {
        return (Encoding::Zstd, bytes::Bytes::from(z));
    }
    (Encoding::Raw, bytes::Bytes::from(bytes))
}
