//! The replication protocol between agents and process servers
//! (docs/replication-protocol.md): length-prefixed frames with a JSON header and a raw
//! body, over TLS 1.3 with client certificates from the operator CA.

pub mod frame;
pub mod message;
pub mod tls;

pub use frame::{Frame, MAX_FRAME, read_frame, write_frame};
pub use message::{
    Ack, ChunkData, ChunkDelta, DiskHead, DiskInfo, Encoding, FEATURE_GROUP_POINTS, FEATURE_SETTINGS, GroupAbort,
    GroupCommit, GroupPrepare, GroupReady, Head, Hello, Layout, Message, PROTOCOL_VERSION, PointMarker, Refusal,
    Resync, Settings, Slot, Welcome,
};

/// A protocol or transport failure.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// A frame that does not follow the protocol (garbage, wrong kind, bad header).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Certificates, keys or TLS configuration.
    #[error("TLS: {0}")]
    Tls(String),
    /// The peer ended the session with a reason.
    #[error("refused by peer: {reason}: {message}")]
    Refused {
        /// CamelCase reason.
        reason: String,
        /// Explanation.
        message: String,
    },
}

/// Reads the next message; `Ok(None)` at a clean end of stream. A [`Refusal`] from the
/// peer becomes [`WireError::Refused`].
pub async fn read_message<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>, WireError> {
    let Some(frame) = read_frame(r).await? else { return Ok(None) };
    match Message::from_frame(&frame)? {
        Message::Refused(Refusal { reason, message }) => Err(WireError::Refused { reason, message }),
        m => Ok(Some(m)),
    }
}

/// Writes one message (not flushed).
pub async fn write_message<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, m: &Message) -> Result<(), WireError> {
    write_frame(w, &m.to_frame()).await
}
