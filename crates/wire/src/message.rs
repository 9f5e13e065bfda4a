//! The messages of the replication protocol (docs/replication-protocol.md).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use siterecovery_store::{ChunkHash, PointKind};

use crate::WireError;
use crate::frame::Frame;

/// Version of the protocol; an agent and a process server speak only the same one.
pub const PROTOCOL_VERSION: u32 = 1;

/// One disk as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Disk id, unique within the server.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
}

/// Agent → process server, first frame of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol: u32,
    /// Namespace of the ProtectedServer (must match the client certificate).
    pub namespace: String,
    /// Name of the ProtectedServer (must match the client certificate).
    pub server: String,
    /// The disks protected now, in a stable order. Authoritative: the process server
    /// adopts this layout (new disks start empty, resized disks lose their last chunk).
    pub disks: Vec<DiskInfo>,
    /// Agent version, for logs.
    pub agent: String,
    /// Optional protocol features the agent implements (e.g. [`FEATURE_GROUP_POINTS`]);
    /// the process server uses no other.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

/// Feature: the agent takes part in consistency-group rounds ([`GroupPrepare`]).
pub const FEATURE_GROUP_POINTS: &str = "group-points";
/// Feature: the agent applies [`Settings`] during a session.
pub const FEATURE_SETTINGS: &str = "settings";

/// Process server → agent: the session is open. The body carries the [`Head`]: what
/// the process server holds durably for each disk of the hello, so the agent sends
/// only chunks that differ (initial copy resumes, resync sends differences).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// [`PROTOCOL_VERSION`] of the process server.
    pub protocol: u32,
    /// Chunk size the agent must use for this server.
    pub chunk_size: u32,
    /// Latest recovery point the process server has recorded, if any.
    pub latest_point: Option<String>,
    /// The policy's settings as the session starts (their fields, in the welcome's header).
    #[serde(flatten)]
    pub settings: Settings,
}

/// How a chunk body is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// The plaintext chunk.
    Raw,
    /// One zstd frame of the chunk.
    Zstd,
}

/// Agent → process server: the content of one chunk at the instant it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkData {
    /// Sequence number within the connection (acknowledged by [`Ack`]).
    pub seq: u64,
    /// Disk id.
    pub disk: String,
    /// Chunk index (offset / chunk size).
    pub index: u64,
    /// Plaintext length.
    pub len: u32,
    /// blake3 of the plaintext; `None` for an all-zero chunk (no body).
    pub hash: Option<String>,
    /// Body encoding.
    pub encoding: Encoding,
}

/// Agent → process server: a chunk given as the changed byte ranges of the chunk the
/// process server holds (`base`). The process server applies them to its copy of the
/// base and checks the result against `hash`: a few changed blocks of a large chunk
/// cross the wire instead of the whole chunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkDelta {
    /// Sequence number within the connection.
    pub seq: u64,
    /// Disk id.
    pub disk: String,
    /// Chunk index.
    pub index: u64,
    /// Plaintext length of the chunk.
    pub len: u32,
    /// blake3 of the chunk the ranges apply to (the process server's current slot), or
    /// `None` when that slot is all zeros.
    pub base: Option<String>,
    /// blake3 of the chunk after applying the ranges.
    pub hash: String,
    /// `[offset, length]` ranges inside the chunk, ascending and disjoint; the body is
    /// their bytes, concatenated (zstd-compressed as a whole when `encoding` says so).
    pub ranges: Vec<[u32; 2]>,
    /// Body encoding.
    pub encoding: Encoding,
}

impl ChunkDelta {
    /// Bytes the ranges cover (the decoded body length).
    pub fn covered(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r[1])).sum()
    }

    /// Checks the ranges lie inside the chunk, ascending and disjoint.
    pub fn check(&self) -> Result<(), WireError> {
        let mut end = 0u64;
        for &[off, len] in &self.ranges {
            let (off, len) = (u64::from(off), u64::from(len));
            if len == 0 || off < end || off + len > u64::from(self.len) {
                return Err(WireError::Malformed(format!(
                    "delta of chunk {} of disk {}: range [{off}, +{len}) is empty, overlaps or leaves the chunk",
                    self.index, self.disk
                )));
            }
            end = off + len;
        }
        for h in std::iter::once(&self.hash).chain(self.base.as_ref()) {
            ChunkHash::from_hex(h).ok_or_else(|| WireError::Malformed(format!("chunk hash {h:?}")))?;
        }
        Ok(())
    }
}

/// Agent → process server: every chunk sent before this marker reflects one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointMarker {
    /// Sequence number within the connection.
    pub seq: u64,
    /// Point id (`generate_point_id`), chosen by the agent so a resend is idempotent.
    pub id: String,
    /// Crash, app or group consistent.
    pub kind: PointKind,
    /// The instant.
    pub time: jiff::Timestamp,
    /// Consistency group, for group points.
    #[serde(default)]
    pub group: Option<String>,
    /// Every server of the group when the point was taken (group points only): a group
    /// point is whole when each of them has a point with this id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
}

/// The policy's settings an agent follows, in the [`Welcome`] and, when they change during
/// a session, on their own: these values then replace the welcome's (sent only when one of
/// them changed). Each one the process server knows takes precedence over the agent's own
/// setting; one it does not know is omitted, and agents that predate a field ignore it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// Bytes per second the agent may send (0: unlimited).
    #[serde(default)]
    pub bandwidth_bytes_per_second: u64,
    /// The policy's crash-consistent interval in milliseconds, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_interval_ms: Option<u64>,
    /// The policy's app-consistent interval in milliseconds (0: off), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_interval_ms: Option<u64>,
    /// The policy's zstd level for what the agent sends, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression_level: Option<u8>,
}

/// Process server → agent: take part in group round `round`: bring the copy at the process
/// server to one instant and hold it (no write since), then answer [`GroupReady`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPrepare {
    /// Consistency group.
    pub group: String,
    /// Round number, increasing per group.
    pub round: u64,
}

/// Agent → process server: the answer to a [`GroupPrepare`]. Sent after every chunk of
/// the instant was acknowledged; not numbered (nothing is journaled for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReady {
    /// The round answered.
    pub round: u64,
    /// Whether the agent reached and holds an instant.
    pub ready: bool,
    /// Why not, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Process server → agent: every member was ready; record the group point `id` if
/// nothing was written since the instant the agent holds, else a crash point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCommit {
    /// The round.
    pub round: u64,
    /// Point id, the same for every member.
    pub id: String,
    /// The instant: when the last member became ready (every member held its copy then).
    pub time: jiff::Timestamp,
    /// Every server of the group.
    pub members: Vec<String>,
}

/// Process server → agent: round `round` ends without a group point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupAbort {
    /// The round.
    pub round: u64,
    /// Why (a member not connected, not ready in time, …).
    pub reason: String,
}

/// Agent → process server: the disk layout changed (a disk grew, was added or removed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Sequence number within the connection.
    pub seq: u64,
    /// The disks from now on.
    pub disks: Vec<DiskInfo>,
}

/// Agent → process server: the agent is resending by checksum comparison, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resync {
    /// Sequence number within the connection.
    pub seq: u64,
    /// `TrackingLost`, `DiskResized`, `ChecksumMismatch`, `Manual`, `InitialCopy`.
    pub reason: String,
}

/// Process server → agent: every message up to `seq` is durable in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Highest durable sequence number.
    pub seq: u64,
}

/// Either side: the session ends, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// A CamelCase reason, e.g. `IdentityMismatch`.
    pub reason: String,
    /// What happened and what to do.
    pub message: String,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Opens a session.
    Hello(Hello),
    /// Accepts a session; with the head.
    Welcome(Welcome, Head),
    /// One chunk; with its (possibly compressed) body.
    Chunk(ChunkData, Bytes),
    /// Changed ranges of one chunk; with their (possibly compressed) bytes.
    Delta(ChunkDelta, Bytes),
    /// A recovery point.
    Point(PointMarker),
    /// Durable up to here.
    Ack(Ack),
    /// Ends a session.
    Refused(Refusal),
    /// New disk layout.
    Layout(Layout),
    /// A resync starts.
    Resync(Resync),
    /// A consistency-group round starts.
    GroupPrepare(GroupPrepare),
    /// An agent's answer to a group round.
    GroupReady(GroupReady),
    /// A group round succeeded.
    GroupCommit(GroupCommit),
    /// A group round failed.
    GroupAbort(GroupAbort),
    /// New settings from the policy.
    Settings(Settings),
}

mod kind {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const CHUNK: u8 = 3;
    pub const POINT: u8 = 4;
    pub const ACK: u8 = 5;
    pub const REFUSED: u8 = 6;
    pub const LAYOUT: u8 = 7;
    pub const RESYNC: u8 = 8;
    pub const DELTA: u8 = 9;
    pub const GROUP_PREPARE: u8 = 10;
    pub const GROUP_READY: u8 = 11;
    pub const GROUP_COMMIT: u8 = 12;
    pub const GROUP_ABORT: u8 = 13;
    pub const SETTINGS: u8 = 14;
}

fn frame<T: Serialize>(kind: u8, header: &T, body: Bytes) -> Frame {
    let header = serde_json::to_vec(header).expect("protocol headers always serialise");
    Frame { kind, header: Bytes::from(header), body }
}

fn header<'a, T: Deserialize<'a>>(f: &'a Frame, what: &str) -> Result<T, WireError> {
    serde_json::from_slice(&f.header).map_err(|e| WireError::Malformed(format!("{what} header: {e}")))
}

fn no_body(f: &Frame, what: &str) -> Result<(), WireError> {
    if f.body.is_empty() {
        Ok(())
    } else {
        Err(WireError::Malformed(format!("{what} frame carries an unexpected body of {} bytes", f.body.len())))
    }
}

impl Message {
    /// The frame for this message.
    pub fn to_frame(&self) -> Frame {
        match self {
            Message::Hello(h) => frame(kind::HELLO, h, Bytes::new()),
            Message::Welcome(w, head) => frame(kind::WELCOME, w, head.encode()),
            Message::Chunk(c, body) => frame(kind::CHUNK, c, body.clone()),
            Message::Delta(d, body) => frame(kind::DELTA, d, body.clone()),
            Message::Point(p) => frame(kind::POINT, p, Bytes::new()),
            Message::Ack(a) => frame(kind::ACK, a, Bytes::new()),
            Message::Refused(r) => frame(kind::REFUSED, r, Bytes::new()),
            Message::Layout(l) => frame(kind::LAYOUT, l, Bytes::new()),
            Message::Resync(r) => frame(kind::RESYNC, r, Bytes::new()),
            Message::GroupPrepare(g) => frame(kind::GROUP_PREPARE, g, Bytes::new()),
            Message::GroupReady(g) => frame(kind::GROUP_READY, g, Bytes::new()),
            Message::GroupCommit(g) => frame(kind::GROUP_COMMIT, g, Bytes::new()),
            Message::GroupAbort(g) => frame(kind::GROUP_ABORT, g, Bytes::new()),
            Message::Settings(g) => frame(kind::SETTINGS, g, Bytes::new()),
        }
    }

    /// Decodes a frame, checking that its header and body fit its kind.
    pub fn from_frame(f: &Frame) -> Result<Self, WireError> {
        Ok(match f.kind {
            kind::HELLO => {
                no_body(f, "hello")?;
                Message::Hello(header(f, "hello")?)
            }
            kind::WELCOME => Message::Welcome(header(f, "welcome")?, Head::decode(f.body.clone())?),
            kind::CHUNK => {
                let c: ChunkData = header(f, "chunk")?;
                match (&c.hash, f.body.is_empty()) {
                    (None, false) => return Err(WireError::Malformed("zero chunk carries a body".into())),
                    (Some(_), true) => return Err(WireError::Malformed("data chunk has no body".into())),
                    _ => {}
                }
                if let Some(h) = &c.hash {
                    ChunkHash::from_hex(h).ok_or_else(|| WireError::Malformed(format!("chunk hash {h:?}")))?;
                }
                Message::Chunk(c, f.body.clone())
            }
            kind::DELTA => {
                let d: ChunkDelta = header(f, "delta")?;
                d.check()?;
                Message::Delta(d, f.body.clone())
            }
            kind::POINT => {
                no_body(f, "point")?;
                Message::Point(header(f, "point")?)
            }
            kind::ACK => {
                no_body(f, "ack")?;
                Message::Ack(header(f, "ack")?)
            }
            kind::REFUSED => Message::Refused(header(f, "refusal")?),
            kind::LAYOUT => {
                no_body(f, "layout")?;
                Message::Layout(header(f, "layout")?)
            }
            kind::RESYNC => {
                no_body(f, "resync")?;
                Message::Resync(header(f, "resync")?)
            }
            kind::GROUP_PREPARE => {
                no_body(f, "group prepare")?;
                Message::GroupPrepare(header(f, "group prepare")?)
            }
            kind::GROUP_READY => {
                no_body(f, "group ready")?;
                Message::GroupReady(header(f, "group ready")?)
            }
            kind::GROUP_COMMIT => {
                no_body(f, "group commit")?;
                Message::GroupCommit(header(f, "group commit")?)
            }
            kind::GROUP_ABORT => {
                no_body(f, "group abort")?;
                Message::GroupAbort(header(f, "group abort")?)
            }
            kind::SETTINGS => {
                no_body(f, "settings")?;
                Message::Settings(header(f, "settings")?)
            }
            other => return Err(WireError::Malformed(format!("unknown frame kind {other}"))),
        })
    }

    /// The sequence number of an agent message that must be acknowledged.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Message::Chunk(c, _) => Some(c.seq),
            Message::Delta(d, _) => Some(d.seq),
            Message::Point(p) => Some(p.seq),
            Message::Layout(l) => Some(l.seq),
            Message::Resync(r) => Some(r.seq),
            _ => None,
        }
    }
}

/// What is known of one chunk slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Never received (initial copy not there yet, or invalidated by a resize).
    Missing,
    /// All zeros.
    Zero,
    /// Content with this blake3 hash.
    Data(ChunkHash),
}

/// The chunks of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskHead {
    /// Disk id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// `ceil(size / chunk_size)` slots.
    pub slots: Vec<Slot>,
}

impl DiskHead {
    /// A disk of which nothing was received yet.
    pub fn empty(id: &str, size: u64, chunk_size: u32) -> Self {
        let n = size.div_ceil(u64::from(chunk_size)) as usize;
        Self { id: id.to_string(), size, slots: vec![Slot::Missing; n] }
    }

    /// Adopts a new size: whole chunks inside both sizes are kept; a chunk whose length
    /// changes (the old or new last chunk) and every new chunk become missing.
    pub fn resize(&mut self, size: u64, chunk_size: u32) {
        if size == self.size {
            return;
        }
        let cs = u64::from(chunk_size);
        let keep = (self.size.min(size) / cs) as usize;
        let n = size.div_ceil(cs) as usize;
        self.slots.truncate(keep);
        self.slots.resize(n, Slot::Missing);
        self.size = size;
    }

    /// Whether every chunk was received.
    pub fn complete(&self) -> bool {
        !self.slots.contains(&Slot::Missing)
    }
}

/// What a process server holds for every disk of a server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Head {
    /// Disks, in the agent's order.
    pub disks: Vec<DiskHead>,
}

impl Head {
    /// The disk named `id`.
    pub fn disk_mut(&mut self, id: &str) -> Option<&mut DiskHead> {
        self.disks.iter_mut().find(|d| d.id == id)
    }

    /// Adopts a disk layout: keeps known disks (resized as needed), adds new ones empty,
    /// drops disks no longer listed. Returns whether anything changed.
    pub fn adopt(&mut self, disks: &[DiskInfo], chunk_size: u32) -> bool {
        let before = self.clone();
        let mut old = std::mem::take(&mut self.disks);
        for d in disks {
            let head = match old.iter().position(|o| o.id == d.id) {
                Some(i) => {
                    let mut h = old.swap_remove(i);
                    h.resize(d.size, chunk_size);
                    h
                }
                None => DiskHead::empty(&d.id, d.size, chunk_size),
            };
            self.disks.push(head);
        }
        *self != before
    }

    /// Binary form: per disk, `id length u16 | id | size u64 | slot count u64 | slots`,
    /// a slot being `0` (missing), `1` (zero) or `2` followed by 32 hash bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_u32(self.disks.len() as u32);
        for d in &self.disks {
            out.put_u16(d.id.len() as u16);
            out.put_slice(d.id.as_bytes());
            out.put_u64(d.size);
            out.put_u64(d.slots.len() as u64);
            for s in &d.slots {
                match s {
                    Slot::Missing => out.put_u8(0),
                    Slot::Zero => out.put_u8(1),
                    Slot::Data(h) => {
                        out.put_u8(2);
                        out.put_slice(&h.0);
                    }
                }
            }
        }
        out.freeze()
    }

    /// Parses [`Head::encode`]'s form.
    pub fn decode(mut b: Bytes) -> Result<Self, WireError> {
        let short = || WireError::Malformed("head is truncated".into());
        if b.remaining() < 4 {
            return Err(short());
        }
        let n = b.get_u32() as usize;
        let mut disks = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            if b.remaining() < 2 {
                return Err(short());
            }
            let len = b.get_u16() as usize;
            if b.remaining() < len + 16 {
                return Err(short());
            }
            let id = String::from_utf8(b.split_to(len).to_vec())
                .map_err(|_| WireError::Malformed("disk id is not UTF-8".into()))?;
            let size = b.get_u64();
            let count = b.get_u64() as usize;
            if count > b.remaining() {
                return Err(short());
            }
            let mut slots = Vec::with_capacity(count);
            for _ in 0..count {
                if !b.has_remaining() {
                    return Err(short());
                }
                slots.push(match b.get_u8() {
                    0 => Slot::Missing,
                    1 => Slot::Zero,
                    2 => {
                        if b.remaining() < 32 {
                            return Err(short());
                        }
                        let mut h = [0u8; 32];
                        b.copy_to_slice(&mut h);
                        Slot::Data(ChunkHash(h))
                    }
                    t => return Err(WireError::Malformed(format!("unknown slot tag {t} in head"))),
                });
            }
            disks.push(DiskHead { id, size, slots });
        }
        if b.has_remaining() {
            return Err(WireError::Malformed(format!("{} bytes after the head", b.remaining())));
        }
        Ok(Self { disks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(b: u8) -> ChunkHash {
        ChunkHash([b; 32])
    }

    #[test]
    fn a_head_round_trips_and_truncation_is_refused() {
        let head = Head {
            disks: vec![
                DiskHead { id: "os".into(), size: 10, slots: vec![Slot::Data(hash(1)), Slot::Zero, Slot::Missing] },
                DiskHead { id: "data".into(), size: 0, slots: vec![] },
            ],
        };
        let bytes = head.encode();
        assert_eq!(Head::decode(bytes.clone()).unwrap(), head);
        for cut in [0, 3, 10, bytes.len() - 1] {
            assert!(Head::decode(bytes.slice(..cut)).is_err(), "a head cut at {cut} bytes must be refused");
        }
    }

    #[test]
    fn resizing_keeps_whole_chunks_and_forgets_the_changed_last_one() {
        let mut d = DiskHead { id: "os".into(), size: 10, slots: vec![Slot::Zero, Slot::Data(hash(2)), Slot::Zero] };
        d.resize(14, 4); // chunks of 4 bytes: 0-3, 4-7 kept; 8-9 (partial) becomes 8-11, plus 12-13
        assert_eq!(d.slots, vec![Slot::Zero, Slot::Data(hash(2)), Slot::Missing, Slot::Missing]);
        d.resize(6, 4);
        assert_eq!(d.slots, vec![Slot::Zero, Slot::Missing]);
        assert!(!d.complete());
    }

    #[test]
    fn messages_round_trip_and_bad_frames_name_the_problem() {
        let m = Message::Point(PointMarker {
            seq: 7,
            id: "20261127T101500123Z-crash".into(),
            kind: PointKind::Crash,
            time: "2026-11-27T10:15:00.123Z".parse().unwrap(),
            group: None,
            members: vec![],
        });
        let group = [
            Message::GroupPrepare(GroupPrepare { group: "erp".into(), round: 3 }),
            Message::GroupReady(GroupReady { round: 3, ready: false, reason: Some("writes never paused".into()) }),
            Message::GroupCommit(GroupCommit {
                round: 3,
                id: "20261127T101500123Z-group".into(),
                time: "2026-11-27T10:15:00.123Z".parse().unwrap(),
                members: vec!["db".into(), "web".into()],
            }),
            Message::GroupAbort(GroupAbort { round: 3, reason: "web is not connected".into() }),
            Message::Settings(Settings {
                bandwidth_bytes_per_second: 1 << 20,
                crash_interval_ms: Some(5000),
                app_interval_ms: Some(0),
                compression_level: Some(3),
            }),
        ];
        for m in std::iter::once(&m).chain(&group) {
            let f = m.to_frame();
            assert_eq!(&Message::from_frame(&Frame::decode_payload(f.encode().slice(4..)).unwrap()).unwrap(), m);
            assert_eq!(m.seq().is_some(), matches!(m, Message::Point(_)), "control messages are not journaled");
        }
        let unknown = Frame { kind: 99, header: Bytes::from_static(b"{}"), body: Bytes::new() };
        assert!(Message::from_frame(&unknown).unwrap_err().to_string().contains("unknown frame kind 99"));
        let zero_with_body = Frame {
            kind: 3,
            header: Bytes::from_static(br#"{"seq":1,"disk":"os","index":0,"len":4,"hash":null,"encoding":"raw"}"#),
            body: Bytes::from_static(b"abcd"),
        };
        assert!(Message::from_frame(&zero_with_body).unwrap_err().to_string().contains("zero chunk carries a body"));
        let overlapping = ChunkDelta {
            seq: 1,
            disk: "os".into(),
            index: 0,
            len: 100,
            base: None,
            hash: hash(3).to_hex(),
            ranges: vec![[0, 10], [5, 10]],
            encoding: Encoding::Raw,
        };
        assert!(overlapping.check().is_err());
        // Headers may grow within a protocol version: unknown fields are ignored.
        let newer = Frame { kind: 5, header: Bytes::from_static(br#"{"seq":3,"future":true}"#), body: Bytes::new() };
        assert_eq!(Message::from_frame(&newer).unwrap(), Message::Ack(Ack { seq: 3 }));
    }

    #[test]
    fn a_welcome_carries_the_settings_in_its_header_and_reads_as_older_process_servers_wrote_it() {
        let welcome = |header: &'static [u8]| {
            let f = Frame { kind: kind::WELCOME, header: Bytes::from_static(header), body: Head::default().encode() };
            match Message::from_frame(&f).unwrap() {
                Message::Welcome(w, _) => w,
                other => panic!("{other:?}"),
            }
        };
        let settings = Settings {
            bandwidth_bytes_per_second: 10,
            crash_interval_ms: Some(5000),
            app_interval_ms: None,
            compression_level: Some(3),
        };
        let w = Welcome { protocol: 1, chunk_size: 4096, latest_point: None, settings: settings.clone() };
        let header: serde_json::Value =
            serde_json::from_slice(&Message::Welcome(w.clone(), Head::default()).to_frame().header).unwrap();
        assert_eq!(header["compression_level"], 3, "flat in the header, where older agents read the other settings");
        assert_eq!(header["crash_interval_ms"], 5000);
        // Before the settings moved into their own struct (and before compression_level).
        let older = welcome(br#"{"protocol":1,"chunk_size":4096,"latest_point":null,"bandwidth_bytes_per_second":10,"crash_interval_ms":5000}"#);
        assert_eq!(older.settings, Settings { compression_level: None, ..settings });
        let oldest = welcome(br#"{"protocol":1,"chunk_size":4096,"latest_point":null}"#);
        assert_eq!(oldest.settings, Settings::default());
    }
}
