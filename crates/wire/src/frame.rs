//! Frames: the unit on the wire and in the process server's cache journal.
//!
//! ```text
//! length u32 BE (of everything after it) | kind u8 | header length u32 BE | header (JSON) | body
//! ```
//!
//! The header is a small JSON object (typed by [`crate::Message`]); the body is raw
//! bytes (chunk data, a disk head). A reader refuses frames longer than
//! [`MAX_FRAME`], unknown kinds and headers that overrun the frame, so truncated or
//! garbage input is an error that says what was wrong, never a huge allocation.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::WireError;

/// Largest frame accepted: a 64 MiB chunk plus its header, with room to spare.
pub const MAX_FRAME: usize = 80 * 1024 * 1024;
/// Largest JSON header accepted.
pub const MAX_HEADER: usize = 64 * 1024;

/// One frame: a kind, a JSON header and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message kind (see [`crate::Message`]).
    pub kind: u8,
    /// JSON header.
    pub header: Bytes,
    /// Raw body, often empty.
    pub body: Bytes,
}

impl Frame {
    /// Bytes on the wire (length prefix included).
    pub fn encoded_len(&self) -> usize {
        4 + 1 + 4 + self.header.len() + self.body.len()
    }

    /// The frame with its length prefix, as written on the wire and in the journal.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        out.put_u32((self.encoded_len() - 4) as u32);
        out.put_u8(self.kind);
        out.put_u32(self.header.len() as u32);
        out.put_slice(&self.header);
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Parses the part after the length prefix.
    pub fn decode_payload(mut payload: Bytes) -> Result<Self, WireError> {
        if payload.len() < 5 {
            return Err(WireError::Malformed(format!(
                "frame of {} bytes is shorter than its fixed part",
                payload.len()
            )));
        }
        let kind = payload.get_u8();
        let header_len = payload.get_u32() as usize;
        if header_len > MAX_HEADER || header_len > payload.len() {
            return Err(WireError::Malformed(format!(
                "header length {header_len} overruns the frame ({} bytes left)",
                payload.len()
            )));
        }
        let header = payload.split_to(header_len);
        Ok(Self { kind, header, body: payload })
    }
}

/// Checks a length prefix before anything is allocated for it.
pub fn check_length(len: usize) -> Result<(), WireError> {
    if len > MAX_FRAME {
        return Err(WireError::Malformed(format!("frame length {len} exceeds the limit of {MAX_FRAME} bytes")));
    }
    if len < 5 {
        return Err(WireError::Malformed(format!("frame length {len} is shorter than its fixed part")));
    }
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, WireError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(WireError::Truncated) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    check_length(len)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
        _ => WireError::Io(e),
    })?;
    Frame::decode_payload(Bytes::from(payload)).map(Some)
}

/// Writes one frame (not flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), WireError> {
    // Small frames go out in one write; large bodies are not copied.
    let mut head = BytesMut::with_capacity(9 + frame.header.len());
    head.put_u32((frame.encoded_len() - 4) as u32);
    head.put_u8(frame.kind);
    head.put_u32(frame.header.len() as u32);
    head.put_slice(&frame.header);
    w.write_all(&head).await?;
    if !frame.body.is_empty() {
        w.write_all(&frame.body).await?;
    }
    Ok(())
}
