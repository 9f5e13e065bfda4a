//! One agent connection: authenticate, hand out the head, journal every frame, and
//! acknowledge in groups after each fsync (docs/replication-protocol.md).

use std::net::SocketAddr;

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blake3::hazmat::ChainingValue;
use siterecovery_store::{ChunkHash, ServerRef, tree};
use siterecovery_wire::tls::agent_from_certificate;
use siterecovery_wire::{
    Ack, ChunkData, ChunkDelta, Encoding, FEATURE_GROUP_POINTS, FEATURE_SETTINGS, Frame, Hello, Message,
    PROTOCOL_VERSION, Refusal, Settings, Slot, Welcome, WireError, read_frame, write_message,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::Shared;
use crate::ahead::{Ahead, Checked};
use crate::group::Member;
use crate::state::{ServerState, apply};

const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a session ended early: a reason for the agent and the log.
#[derive(Debug)]
struct Refuse(String, String);

fn refuse(reason: &str, message: impl Into<String>) -> Refuse {
    Refuse(reason.to_string(), message.into())
}

/// Serves one TLS connection whose handshake (and client-certificate check) succeeded.
pub async fn serve<S>(shared: Arc<Shared>, stream: tokio_rustls::server::TlsStream<S>, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let identity =
        stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).and_then(|c| agent_from_certificate(c));
    let (rd, mut wr) = tokio::io::split(stream);
    let result = match identity {
        None => Err(refuse("NotAnAgentCertificate", "the client certificate names no agent (no siterecovery URI SAN)")),
        Some(identity) => session(&shared, rd, &mut wr, identity).await,
    };
    if let Err(Refuse(reason, message)) = result {
        shared.metrics.sessions_refused.inc();
        tracing::warn!(%peer, %reason, %message, "agent session ended");
        let m = Message::Refused(Refusal { reason, message });
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = write_message(&mut wr, &m).await;
            let _ = wr.flush().await;
            let _ = wr.shutdown().await;
        })
        .await;
    }
}

fn check_hello(h: &Hello, identity: &(String, String)) -> Result<ServerRef, Refuse> {
    if h.protocol != PROTOCOL_VERSION {
        return Err(refuse(
            "ProtocolVersion",
            format!(
                "agent speaks protocol {}, this process server {PROTOCOL_VERSION}; upgrade the older side",
                h.protocol
            ),
        ));
    }
    if (h.namespace.as_str(), h.server.as_str()) != (identity.0.as_str(), identity.1.as_str()) {
        return Err(refuse(
            "IdentityMismatch",
            format!(
                "the certificate was issued to {}/{} but the agent says it is {}/{}",
                identity.0, identity.1, h.namespace, h.server
            ),
        ));
    }
    let server = ServerRef::new(&h.namespace, &h.server).map_err(|e| refuse("InvalidName", e.to_string()))?;
    let mut seen = std::collections::HashSet::new();
    for d in &h.disks {
        siterecovery_store::validate_segment("disk id", &d.id).map_err(|e| refuse("InvalidDisk", e.to_string()))?;
        if !seen.insert(&d.id) {
            return Err(refuse("InvalidDisk", format!("disk {} is listed twice", d.id)));
        }
        if d.size == 0 {
            return Err(refuse("InvalidDisk", format!("disk {} has size 0", d.id)));
        }
    }
    if h.disks.is_empty() {
        return Err(refuse("InvalidDisk", "the agent protects no disk"));
    }
    Ok(server)
}

async fn session<R, W>(shared: &Arc<Shared>, mut rd: R, wr: &mut W, identity: (String, String)) -> Result<(), Refuse>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let first = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut rd))
        .await
        .map_err(|_| refuse("Timeout", "no hello within 30 s"))?
        .map_err(|e| refuse("ProtocolError", e.to_string()))?
        .ok_or_else(|| refuse("ProtocolError", "connection closed before hello"))?;
    let Message::Hello(hello) = Message::from_frame(&first).map_err(|e| refuse("ProtocolError", e.to_string()))? else {
        return Err(refuse("ProtocolError", "the first frame must be a hello"));
    };
    let server = check_hello(&hello, &identity)?;
    let target = shared
        .targets
        .resolve(server.namespace(), server.name())
        .await
        .map_err(|(reason, message)| Refuse(reason, message))?;
    let state = shared.open(server, target.clone()).await.map_err(|e| refuse("CacheUnavailable", e.to_string()))?;

    // One session per server: a reconnecting agent replaces its stale connection.
    let (cancel_tx, mut cancel_rx) = oneshot::channel();
    if let Some(old) = state.cancel_session.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = old.send(());
    }
    let _guard = tokio::time::timeout(Duration::from_secs(30), state.session.lock())
        .await
        .map_err(|_| refuse("Busy", "the previous session of this server did not end within 30 s; retry"))?;
    *state.cancel_session.lock().unwrap_or_else(|p| p.into_inner()) = Some(cancel_tx);
    shared.metrics.sessions.inc();
    tracing::info!(server = %state.server, disks = hello.disks.len(), agent = %hello.agent, "agent session opened");

    // Adopt the agent's disk layout through the journal, so a restart replays it too.
    let layout = {
        let received = state.received();
        let mut head = received.head.clone();
        head.adopt(&hello.disks, state.chunk_size)
            .then(|| Message::Layout(siterecovery_wire::Layout { seq: 0, disks: hello.disks.clone() }))
    };
    if let Some(m) = layout {
        journal(&state, &m.to_frame(), &m).await?;
    }
    let st = state.clone();
    tokio::task::spawn_blocking(move || st.journal.sync())
        .await
        .map_err(|e| refuse("CacheUnavailable", e.to_string()))?
        .map_err(|e| refuse("CacheUnavailable", e.to_string()))?;
    let (head, latest_point) = {
        let r = state.received();
        (r.head.clone(), r.latest_point.clone())
    };
    let now = settings_of(&target);
    let welcome =
        Welcome { protocol: PROTOCOL_VERSION, chunk_size: state.chunk_size, latest_point, settings: now.clone() };
    write_message(wr, &Message::Welcome(welcome, head)).await.map_err(|e| refuse("ConnectionLost", e.to_string()))?;
    wr.flush().await.map_err(|e| refuse("ConnectionLost", e.to_string()))?;
    let mut member = join_group(shared, &state, &hello).await;
    // Policy changes reach the agent within a minute (targets are re-read after their TTL).
    let follows_settings = hello.features.iter().any(|f| f == FEATURE_SETTINGS);
    let mut settings = now;
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + SETTINGS_CHECK, SETTINGS_CHECK);

    // Group commit: the syncer fsyncs whatever was appended since its last round and
    // acknowledges the highest sequence number covered.
    let (appended_tx, appended_rx) = watch::channel(0u64);
    let (ack_tx, mut ack_rx) = mpsc::channel::<Result<u64, String>>(16);
    let syncer = tokio::spawn(sync_loop(state.clone(), appended_rx, ack_tx));
    // Frames are read by their own task: a read interrupted by an ack in the select!
    // below would lose a half-read frame (reads are not cancel-safe; channels are). The
    // reader stays at most a chunk's worth of frames ahead (one whole chunk, or many
    // deltas, whose bases it starts downloading: `ahead.rs`); past that it stops reading
    // the socket: backpressure (docs/process-servers.md, "Memory").
    let (frame_tx, mut frames) = mpsc::unbounded_channel();
    let reader = {
        let (state, recent) = (state.clone(), shared.recent.clone());
        // Two chunks: the one being handled and one queued, as with a channel of one frame.
        let ahead = Ahead::new(state.chunk_size.saturating_mul(2));
        tokio::spawn(async move {
            loop {
                let r = match read_frame(&mut rd).await {
                    Ok(Some(f)) => Ok(Some(ahead.admit(&state, &recent, f).await)),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                };
                let end = !matches!(r, Ok(Some(_)));
                if frame_tx.send(r).is_err() || end {
                    return;
                }
            }
        })
    };
    let mut last_seq = 0u64;
    let outcome: Result<(), Refuse> = loop {
        tokio::select! {
            biased;
            _ = &mut cancel_rx => break Err(refuse("Superseded", "a newer connection of this agent took over")),
            ack = ack_rx.recv() => match ack {
                Some(Ok(seq)) => {
                    if let Err(e) = write_message(wr, &Message::Ack(Ack { seq })).await {
                        break Err(refuse("ConnectionLost", e.to_string()));
                    }
                    let _ = wr.flush().await;
                }
                Some(Err(e)) => break Err(refuse("CacheUnavailable", e)),
                None => break Err(refuse("CacheUnavailable", "the journal syncer stopped")),
            },
            Some(m) = async {
                match member.as_mut() {
                    Some(mb) => mb.outbox.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Err(e) = write_message(wr, &m).await {
                    break Err(refuse("ConnectionLost", e.to_string()));
                }
                let _ = wr.flush().await;
            },
            _ = recheck.tick(), if follows_settings => {
                let Ok(target) = shared.targets.resolve(state.server.namespace(), state.server.name()).await else {
                    continue;
                };
                let now = settings_of(&target);
                if now != settings {
                    tracing::info!(server = %state.server, ?now, "policy settings changed; telling the agent");
                    if let Err(e) = write_message(wr, &Message::Settings(now.clone())).await {
                        break Err(refuse("ConnectionLost", e.to_string()));
                    }
                    let _ = wr.flush().await;
                    settings = now;
                }
            },
            frame = frames.recv() => {
                let queued = match frame {
                    Some(Ok(Some(q))) => q,
                    Some(Ok(None)) | None => break Ok(()),
                    Some(Err(WireError::Truncated)) => break Err(refuse("ProtocolError", "connection closed in the middle of a frame")),
                    Some(Err(e)) => break Err(refuse("ProtocolError", e.to_string())),
                };
                match receive(shared, &state, member.as_ref(), &queued.frame, queued.message, queued.checked, &mut last_seq).await {
                    Ok(()) => { let _ = appended_tx.send(last_seq); }
                    Err(r) => break Err(r),
                }
            }
        }
    };
    reader.abort();
    // Acknowledge what is durable before leaving, whatever the reason.
    drop(appended_tx);
    let _ = syncer.await;
    while let Ok(Ok(seq)) = ack_rx.try_recv() {
        let _ = write_message(wr, &Message::Ack(Ack { seq })).await;
    }
    let _ = wr.flush().await;
    tracing::info!(server = %state.server, ?outcome, "agent session closed");
    outcome
}

/// How often a session looks for changed policy settings.
const SETTINGS_CHECK: Duration = Duration::from_secs(20);

/// What the welcome and [`Settings`] tell an agent about its policy.
fn settings_of(t: &crate::target::Target) -> Settings {
    Settings {
        bandwidth_bytes_per_second: t.bandwidth_bytes_per_second,
        crash_interval_ms: t.crash_interval.map(|d| d.as_millis() as u64),
        app_interval_ms: t.app_interval.map(|d| d.as_millis() as u64),
        compression_level: t.compression_level,
    }
}

/// Joins the agent's consistency group, if it has one and the agent can take part.
async fn join_group(shared: &Arc<Shared>, state: &ServerState, hello: &Hello) -> Option<Member> {
    let (ns, name) = (state.server.namespace(), state.server.name());
    let spec = match shared.targets.group(ns, name).await {
        Ok(Some(spec)) => spec,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(server = %state.server, error = %e, "consistency group not read; no group points this session");
            return None;
        }
    };
    if !hello.features.iter().any(|f| f == FEATURE_GROUP_POINTS) {
        tracing::warn!(
            server = %state.server, group = %spec.name, agent = %hello.agent,
            "the agent predates consistency groups: upgrade it, the group gets no points until then"
        );
        return None;
    }
    tracing::info!(server = %state.server, group = %spec.name, members = spec.members.len(), "joined consistency group");
    Some(shared.groups.join(ns, spec, name, shared.targets.clone(), shared.metrics.clone()))
}

async fn sync_loop(
    state: Arc<ServerState>,
    mut appended: watch::Receiver<u64>,
    acks: mpsc::Sender<Result<u64, String>>,
) {
    while appended.changed().await.is_ok() {
        let seq = *appended.borrow_and_update();
        let st = state.clone();
        let r = tokio::task::spawn_blocking(move || st.journal.sync()).await;
        let msg = match r {
            Ok(Ok(_)) => Ok(seq),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let failed = msg.is_err();
        if acks.send(msg).await.is_err() || failed {
            return;
        }
        state.kick.notify_one();
    }
}

/// Validates one agent frame and journals it (not yet durable). A delta is checked by
/// applying it to its base and journaled as it came; the uploader stores it as a patch.
async fn receive(
    shared: &Shared,
    state: &Arc<ServerState>,
    member: Option<&Member>,
    frame: &Frame,
    message: Result<Message, WireError>,
    checked: Option<JoinHandle<Checked>>,
    last_seq: &mut u64,
) -> Result<(), Refuse> {
    let m = message.map_err(|e| refuse("ProtocolError", e.to_string()))?;
    if let Message::GroupReady(r) = m {
        let Some(member) = member else {
            return Err(refuse("ProtocolError", "a consistency-group answer from a server in no group"));
        };
        member.ready(r);
        return Ok(());
    }
    let seq = m.seq().ok_or_else(|| refuse("ProtocolError", "agents send chunks, points, layouts and resyncs only"))?;
    if seq <= *last_seq {
        return Err(refuse("ProtocolError", format!("sequence number {seq} after {}", *last_seq)));
    }
    match &m {
        Message::Delta(d, _) => {
            let checked = checked.ok_or_else(|| refuse("ProtocolError", "a delta that was not read ahead"))?;
            rebuild(shared, state, d, checked).await?;
        }
        Message::Chunk(c, body) => {
            // The plaintext is not kept: deltas against this chunk are checked from the
            // values of its blocks, and an uploader that rebuilds one reads it from its
            // local copy or the store (keeping every received chunk made each a fresh
            // 4 MiB of memory, a tenth of the process server's CPU in an initial copy).
            if let Some(cvs) = check_chunk(state, c, body).await? {
                let hash = ChunkHash::from_hex(c.hash.as_deref().unwrap_or_default()).expect("checked");
                shared.recent.insert_cvs(&state.server, &c.disk, hash, cvs);
            }
        }
        Message::Point(p) => {
            siterecovery_store::validate_segment("point id", &p.id)
                .map_err(|e| refuse("ProtocolError", e.to_string()))?;
            let r = state.received();
            if let Some(d) = r.head.disks.iter().find(|d| !d.complete()) {
                return Err(refuse(
                    "InitialCopyIncomplete",
                    format!("point {} before every chunk of disk {} was sent", p.id, d.id),
                ));
            }
        }
        Message::Layout(l) => {
            for d in &l.disks {
                siterecovery_store::validate_segment("disk id", &d.id)
                    .map_err(|e| refuse("InvalidDisk", e.to_string()))?;
            }
        }
        Message::Resync(r) => {
            tracing::info!(server = %state.server, reason = %r.reason, "agent resynchronising by checksums");
            *last_seq = seq;
            return Ok(());
        }
        _ => unreachable!("seq() is Some only for agent messages"),
    }
    if shared.budget.is_full() {
        // Counted when the wait begins: a session stalled for good shows up too.
        shared.metrics.backpressure_waits.inc();
        shared.budget.wait_for_room().await;
    }
    journal(state, frame, &m).await?;
    if let (Message::Point(p), Some(member)) = (&m, member)
        && p.kind == siterecovery_store::PointKind::Group
    {
        member.journaled(&p.id, &p.members);
    }
    // Changed bytes (the churn the status reports): a whole chunk, or a delta's ranges.
    let changed = match &m {
        Message::Chunk(c, _) => Some(u64::from(c.len)),
        Message::Delta(d, _) => Some(d.covered()),
        _ => None,
    };
    if let Some(n) = changed {
        state.progress.bytes_received.fetch_add(n, Ordering::Relaxed);
        shared.metrics.bytes_received.inc_by(n);
    }
    let n = frame.encoded_len() as u64 + 4;
    shared.budget.add(n);
    state.backlog.fetch_add(n, Ordering::Relaxed);
    *last_seq = seq;
    Ok(())
}

/// Appends a frame and applies it to the received head.
async fn journal(state: &Arc<ServerState>, frame: &Frame, m: &Message) -> Result<(), Refuse> {
    let st = state.clone();
    let f = frame.clone();
    tokio::task::spawn_blocking(move || st.journal.append(&f))
        .await
        .map_err(|e| refuse("CacheUnavailable", e.to_string()))?
        .map_err(|e| {
            if e.is_full() { refuse("CacheFull", e.to_string()) } else { refuse("CacheUnavailable", e.to_string()) }
        })?;
    let mut r = state.received();
    let r = &mut *r;
    apply(&mut r.head, &mut r.latest_point, state.chunk_size, m);
    Ok(())
}

/// A chunk must name a known disk and slot, have that slot's length, and hash to what
/// it claims: checked before anything is acknowledged. Gives the chaining values of its
/// blocks (computed by the same hashing).
async fn check_chunk(
    state: &ServerState,
    c: &ChunkData,
    body: &bytes::Bytes,
) -> Result<Option<Arc<[ChainingValue]>>, Refuse> {
    let expected = expected_len(state, &c.disk, c.index)?;
    if u64::from(c.len) != expected {
        return Err(refuse(
            "ProtocolError",
            format!("chunk {} of disk {} is {} bytes, expected {expected}", c.index, c.disk, c.len),
        ));
    }
    let Some(claimed) = &c.hash else { return Ok(None) };
    let claimed = ChunkHash::from_hex(claimed).expect("checked by from_frame");
    let (body, encoding, len) = (body.clone(), c.encoding, c.len as usize);
    let (actual, cvs) = tokio::task::spawn_blocking(move || with_plain(&body, encoding, len, hash_blocks))
        .await
        .map_err(|e| refuse("ProtocolError", e.to_string()))?
        .map_err(|e| refuse("ChecksumMismatch", format!("chunk {} of disk {}: {e}", c.index, c.disk)))?;
    if actual != claimed {
        return Err(refuse(
            "ChecksumMismatch",
            format!("chunk {} of disk {} does not hash to what the agent claims", c.index, c.disk),
        ));
    }
    Ok(Some(cvs))
}

/// A chunk's hash and the chaining values of its blocks, hashing its bytes once.
fn hash_blocks(plain: &[u8]) -> (ChunkHash, Arc<[ChainingValue]>) {
    let cvs = tree::block_cvs(plain);
    let hash = tree::chunk_hash(&cvs, plain.len() as u64).unwrap_or_else(|| ChunkHash::of(plain));
    (hash, cvs.into())
}

/// Checks a delta from the chaining values of its base's blocks, without the base: the
/// blocks its ranges cover are hashed, the others keep their values, and the chunk's hash
/// follows (`siterecovery_store::tree`). `None` when it cannot be checked so: ranges not
/// made of whole 64 KiB blocks, or a chunk of one block. Gives the hash the delta
/// produces and the new values.
pub(crate) fn check_by_blocks(
    before: &[ChainingValue],
    len: u64,
    ranges: &[[u32; 2]],
    bytes: &[u8],
) -> Option<(ChunkHash, Arc<[ChainingValue]>)> {
    let block = tree::BLOCK as u64;
    let whole = |&[off, n]: &[u32; 2]| {
        let (off, n) = (u64::from(off), u64::from(n));
        off.is_multiple_of(block) && (n.is_multiple_of(block) || off + n == len) && n > 0
    };
    if len <= block || before.len() as u64 != len.div_ceil(block) || !ranges.iter().all(whole) {
        return None;
    }
    let mut cvs = before.to_vec();
    let mut at = 0usize;
    for &[off, n] in ranges {
        let data = bytes.get(at..at + n as usize)?;
        for (i, b) in data.chunks(tree::BLOCK).enumerate() {
            let index = off as usize / tree::BLOCK + i;
            *cvs.get_mut(index)? = tree::block_cv(b, index);
        }
        at += n as usize;
    }
    Some((tree::chunk_hash(&cvs, len)?, cvs.into()))
}

/// `base` with `ranges` (checked to lie inside it) replaced by `bytes`, in order.
pub(crate) fn patched(base: &[u8], ranges: &[[u32; 2]], bytes: &[u8]) -> Vec<u8> {
    let mut chunk = base.to_vec();
    let mut at = 0usize;
    for &[off, n] in ranges {
        let (off, n) = (off as usize, n as usize);
        chunk[off..off + n].copy_from_slice(&bytes[at..at + n]);
        at += n;
    }
    chunk
}

thread_local! {
    /// Each blocking thread's decompression context: made once, not per body (an
    /// incremental is hundreds of small deltas).
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    /// Each blocking thread's buffer for plaintexts that are only looked at (a chunk's,
    /// to check its hash): reused, where a new one per chunk was fresh memory the kernel
    /// had to map and zero.
    static PLAIN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's decompression context.
fn with_decompressor<T>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<T>,
) -> Result<T, String> {
    DECOMPRESSOR.with_borrow_mut(|d| {
        let d = match d {
            Some(d) => d,
            None => d.insert(zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?),
        };
        f(d).map_err(|e| format!("zstd: {e}"))
    })
}

/// A body's plaintext must be exactly the `len` bytes its message names.
fn exact_len(n: usize, len: usize) -> Result<(), String> {
    if n != len {
        return Err(format!("body decodes to {n} bytes, expected {len}"));
    }
    Ok(())
}

/// Runs `f` on the `len` bytes of plaintext a body is: itself when raw, else what it
/// decompresses to, in this thread's buffer; an error when that is not `len` bytes.
fn with_plain<T>(body: &[u8], encoding: Encoding, len: usize, f: impl FnOnce(&[u8]) -> T) -> Result<T, String> {
    if let Encoding::Raw = encoding {
        exact_len(body.len(), len)?;
        return Ok(f(body));
    }
    PLAIN.with_borrow_mut(|buf| {
        buf.clear();
        // At most one chunk more than was asked for, so a frame too long is found out
        // without decompressing all of it.
        buf.reserve_exact(len + 1);
        let n = with_decompressor(|d| d.decompress_to_buffer(body, buf))?;
        exact_len(n, len)?;
        Ok(f(&buf[..n]))
    })
}

/// A body as plaintext of exactly `len` bytes.
pub(crate) fn decode(body: &Bytes, encoding: Encoding, len: usize) -> Result<Bytes, String> {
    let plain = match encoding {
        Encoding::Raw => body.clone(),
        Encoding::Zstd => Bytes::from(with_decompressor(|d| d.decompress(body, len))?),
    };
    exact_len(plain.len(), len)?;
    Ok(plain)
}

/// The length chunk `index` of `disk` must have, from the received head.
fn expected_len(state: &ServerState, disk: &str, index: u64) -> Result<u64, Refuse> {
    let r = state.received();
    let d = r
        .head
        .disks
        .iter()
        .find(|d| d.id == disk)
        .ok_or_else(|| refuse("ProtocolError", format!("chunk of unknown disk {disk}")))?;
    if index as usize >= d.slots.len() {
        return Err(refuse("ProtocolError", format!("chunk {index} is past the end of disk {disk}")));
    }
    let cs = u64::from(state.chunk_size);
    Ok((d.size - index * cs).min(cs))
}

/// Applies a delta to the process server's copy of its base chunk and checks the
/// result hashes to what the agent claims; the result goes to the recent chunks.
async fn rebuild(
    shared: &Shared,
    state: &ServerState,
    d: &ChunkDelta,
    early: JoinHandle<Checked>,
) -> Result<(), Refuse> {
    let len = expected_len(state, &d.disk, d.index)?;
    if u64::from(d.len) != len {
        return Err(refuse(
            "ProtocolError",
            format!("delta of chunk {} of disk {} says {} bytes, expected {len}", d.index, d.disk, d.len),
        ));
    }
    let slot = state.received().head.disks.iter().find(|x| x.id == d.disk).map(|x| x.slots[d.index as usize]);
    let base = match (&d.base, slot) {
        (None, Some(Slot::Zero)) => None,
        (Some(h), Some(Slot::Data(held))) if ChunkHash::from_hex(h) == Some(held) => Some(held),
        _ => {
            return Err(refuse(
                "BaseMismatch",
                format!(
                    "delta of chunk {} of disk {} applies to a chunk this process server does not hold; send it whole",
                    d.index, d.disk
                ),
            ));
        }
    };
    let claimed = ChunkHash::from_hex(&d.hash).expect("checked by from_frame");
    let mismatch = || {
        let why = format!("delta of chunk {} of disk {} does not produce the chunk the agent claims", d.index, d.disk);
        refuse("ChecksumMismatch", why)
    };
    let blocking = |e: tokio::task::JoinError| refuse("ProtocolError", e.to_string());
    // Decoded, and checked from the block values of the base it names when they were
    // known, as it was read ahead (`ahead.rs`); the base it names is the one held (above).
    let (bytes, mut checked) = early
        .await
        .map_err(blocking)?
        .map_err(|e| refuse("ProtocolError", format!("delta of chunk {} of disk {}: {e}", d.index, d.disk)))?;
    if checked.is_none()
        && let Some(before) = base.and_then(|h| shared.recent.cvs(&state.server, &d.disk, &h))
    {
        // Its base came in after it was read ahead (an earlier delta of the same chunk).
        let (ranges, b) = (d.ranges.clone(), bytes.clone());
        checked =
            tokio::task::spawn_blocking(move || check_by_blocks(&before, len, &ranges, &b)).await.map_err(blocking)?;
    }
    if let Some((actual, cvs)) = checked {
        if actual != claimed {
            return Err(mismatch());
        }
        shared.recent.insert_cvs(&state.server, &d.disk, claimed, cvs);
        return Ok(());
    }
    let base_plain = match base {
        None => Bytes::from(vec![0u8; len as usize]),
        Some(h) => match shared.recent.get(&state.server, &d.disk, &h) {
            Some(b) => b,
            None => {
                // Being read ahead: wait for that rather than download it a second time.
                if let Some(why) = shared.recent.wait_fetch(&state.server, &d.disk, &h).await {
                    let why = format!("base chunk of disk {}: {why}; send the chunk whole", d.disk);
                    return Err(refuse("BaseUnavailable", why));
                }
                match shared.recent.get(&state.server, &d.disk, &h) {
                    Some(b) => b,
                    None => {
                        shared.recent.downloads.inc();
                        fetch_base(state, &d.disk, d.index, &h, len as usize).await?
                    }
                }
            }
        },
    };
    let ranges = d.ranges.clone();
    let (plain, (actual, cvs)) = tokio::task::spawn_blocking(move || {
        let plain = Bytes::from(patched(&base_plain, &ranges, &bytes));
        let hashed = hash_blocks(&plain);
        (plain, hashed)
    })
    .await
    .map_err(blocking)?;
    if actual != claimed {
        return Err(mismatch());
    }
    shared.recent.insert(&state.server, &d.disk, claimed, plain);
    shared.recent.insert_cvs(&state.server, &d.disk, claimed, cvs);
    Ok(())
}

/// How long one read of a delta's base from the store may take. The store client retries
/// a store that does not answer for up to a minute, and the session (every ack of this
/// agent) waits meanwhile; refusing sooner costs only the whole chunk, which the agent
/// then sends.
pub(crate) const BASE_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A base chunk that is no longer in memory: from the store (as a whole chunk or the
/// chain of patches the uploader stored it as), waiting a while for the uploader if it
/// was received but not uploaded yet. Refused (the agent sends the chunk whole) when the
/// store fails or does not answer within [`BASE_FETCH_TIMEOUT`].
async fn fetch_base(
    state: &ServerState,
    disk: &str,
    index: u64,
    hash: &ChunkHash,
    len: usize,
) -> Result<Bytes, Refuse> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let unavailable =
        |why: String| refuse("BaseUnavailable", format!("base chunk of disk {disk}: {why}; send the chunk whole"));
    loop {
        let stored = state.stored_as(disk, index, *hash);
        let get = state.target.store.fetch_chunk(&state.server, disk, &stored, len);
        match tokio::time::timeout(BASE_FETCH_TIMEOUT, get).await {
            Ok(Ok((plain, _))) => return Ok(Bytes::from(plain)),
            Ok(Err(siterecovery_store::StoreError::Backend(siterecovery_store::BackendError::NotFound { .. })))
                if tokio::time::Instant::now() < deadline =>
            {
                state.kick.notify_one();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(e)) => return Err(unavailable(e.to_string())),
            Err(_) => return Err(unavailable(format!("the store did not answer within {BASE_FETCH_TIMEOUT:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use siterecovery_store::tree::pseudo_random as bytes;

    #[test]
    fn a_delta_of_whole_blocks_is_checked_from_its_base_block_values() {
        const B: usize = tree::BLOCK;
        let len = 64 * B - 1000; // the last block is short
        let base = bytes(len, 3);
        let (_, before) = hash_blocks(&base);
        let ranges = [[3 * B as u32, 2 * B as u32], [63 * B as u32, (len - 63 * B) as u32]];
        let new = bytes(len, 4);
        let changed: Vec<u8> = ranges.iter().flat_map(|&[o, n]| new[o as usize..(o + n) as usize].to_vec()).collect();
        let expected = patched(&base, &ranges, &changed);

        let (hash, cvs) = check_by_blocks(&before, len as u64, &ranges, &changed).expect("whole blocks");
        assert_eq!(hash, ChunkHash::of(&expected));
        assert_eq!(&*cvs, &*hash_blocks(&expected).1, "the values of the result, for the next delta");

        let mut wrong = changed.clone();
        wrong[5] ^= 1;
        assert_ne!(check_by_blocks(&before, len as u64, &ranges, &wrong).unwrap().0, hash);
        // Not whole blocks (the base's other bytes would be needed), or too few bytes.
        assert!(check_by_blocks(&before, len as u64, &[[B as u32 + 512, 512]], &changed[..512]).is_none());
        assert!(check_by_blocks(&before, len as u64, &[[0, B as u32 / 2]], &changed[..B / 2]).is_none());
        assert!(check_by_blocks(&before, len as u64, &ranges, &changed[..B]).is_none());
        // A chunk of one block is hashed whole.
        let one = bytes(B, 5);
        assert!(check_by_blocks(&hash_blocks(&one).1, B as u64, &[[0, B as u32]], &one).is_none());
    }

    #[test]
    fn a_chunk_body_is_checked_in_a_reused_buffer_and_must_decode_to_its_length() {
        let len = 4 * tree::BLOCK + 100;
        let plain = bytes(len, 7);
        let frame = zstd::bulk::compress(&plain, 1).unwrap();
        assert_eq!(with_plain(&frame, Encoding::Zstd, len, hash_blocks).unwrap().0, ChunkHash::of(&plain));
        let at = PLAIN.with_borrow(|b| b.as_ptr());
        assert_eq!(
            with_plain(&frame, Encoding::Zstd, len, |b| b.to_vec()).unwrap(),
            plain,
            "the plaintext, the second time"
        );
        assert_eq!(PLAIN.with_borrow(|b| b.as_ptr()), at, "in the same buffer");
        // A frame that makes more or fewer bytes than the chunk's length, or no frame.
        let longer = zstd::bulk::compress(&bytes(len + 1, 7), 1).unwrap();
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
        for (frame, why) in
            [(&longer, "one byte more"), (&bomb, "64 MiB"), (&frame[..frame.len() / 2].to_vec(), "cut off")]
        {
            assert!(with_plain(frame, Encoding::Zstd, len, |_| ()).is_err(), "{why}");
        }
        assert!(
            with_plain(&zstd::bulk::compress(&plain[..len - 1], 1).unwrap(), Encoding::Zstd, len, |_| ()).is_err(),
            "one byte fewer"
        );
        assert!(PLAIN.with_borrow(|b| b.capacity()) <= 2 * (len + 1), "a bomb is not decompressed into memory");
    }

    #[test]
    fn a_delta_to_a_slot_of_zeros_is_checked_without_a_chunk_of_zeros() {
        const B: usize = tree::BLOCK;
        let recent = crate::recent::RecentChunks::new(0, 1 << 20);
        let len = 64 * B - 1000;
        let zeros = recent.zero_cvs(len as u64).expect("block values are on");
        let ranges = [[7 * B as u32, B as u32]];
        let changed = bytes(B, 9);
        let (hash, _) = check_by_blocks(&zeros, len as u64, &ranges, &changed).expect("whole blocks");
        assert_eq!(hash, ChunkHash::of(&patched(&vec![0; len], &ranges, &changed)));
        assert!(Arc::ptr_eq(&zeros, &recent.zero_cvs(len as u64).unwrap()), "computed once per length");
        assert!(
            crate::recent::RecentChunks::new(0, 0).zero_cvs(len as u64).is_none(),
            "block values off: the chunk is built"
        );
    }
}
