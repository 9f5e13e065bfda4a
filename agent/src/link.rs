//! The agent's side of a connection: sends numbered messages within a window of
//! unacknowledged bytes, at a bandwidth limit, and follows the process server's acks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use siterecovery_wire::{Message, WireError, read_message, write_message};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::sync::{mpsc, watch};

/// Bytes in flight before the agent waits for acks.
pub const WINDOW_BYTES: usize = 64 * 1024 * 1024;

/// What the ack reader saw last.
#[derive(Debug, Clone)]
pub enum AckState {
    /// Everything up to this sequence number is durable at the process server.
    Acked(u64),
    /// The connection ended or the process server refused.
    Failed(String),
}

/// A token bucket of bytes per second (0: unlimited).
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    /// A bucket of `rate` bytes per second holding at most one second's worth.
    pub fn new(rate: u64) -> Self {
        Self { rate, tokens: rate as f64, last: Instant::now() }
    }

    /// Waits until `n` bytes may be sent.
    pub async fn take(&mut self, n: usize) {
        if self.rate == 0 {
            return;
        }
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate as f64).min(self.rate as f64);
        self.last = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.rate as f64)).await;
        }
    }
}

/// The sending half of a session.
pub struct Link<W> {
    wr: W,
    seq: u64,
    unacked: VecDeque<(u64, usize)>,
    unacked_bytes: usize,
    acks: watch::Receiver<AckState>,
    acked: u64,
    pacer: Pacer,
    /// Bytes written to the connection.
    pub bytes_sent: u64,
}

/// Follows the acks of `rd` until the connection ends; control messages (group prepare,
/// commit, abort; settings) go to the returned channel, in order.
pub fn spawn_ack_reader<R: AsyncRead + Unpin + Send + 'static>(
    mut rd: R,
) -> (watch::Receiver<AckState>, mpsc::UnboundedReceiver<Message>) {
    let (tx, rx) = watch::channel(AckState::Acked(0));
    let (control_tx, control) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let state = match read_message(&mut rd).await {
                Ok(Some(Message::Ack(a))) => AckState::Acked(a.seq),
                Ok(Some(
                    m @ (Message::GroupPrepare(_)
                    | Message::GroupCommit(_)
                    | Message::GroupAbort(_)
                    | Message::Settings(_)),
                )) => {
                    let _ = control_tx.send(m);
                    continue;
                }
                Ok(Some(other)) => AckState::Failed(format!("unexpected message from the process server: {other:?}")),
                Ok(None) => AckState::Failed("the process server closed the connection".into()),
                Err(WireError::Refused { reason, message }) => AckState::Failed(format!("{reason}: {message}")),
                Err(e) => AckState::Failed(e.to_string()),
            };
            let failed = matches!(state, AckState::Failed(_));
            if tx.send(state).is_err() || failed {
                return;
            }
        }
    });
    (rx, control)
}

impl<W: AsyncWrite + Unpin> Link<W> {
    /// A link writing to `wr`, following `acks`, paced at `rate` bytes per second.
    pub fn new(wr: W, acks: watch::Receiver<AckState>, rate: u64) -> Self {
        Self {
            wr,
            seq: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            acks,
            acked: 0,
            pacer: Pacer::new(rate),
            bytes_sent: 0,
        }
    }

    /// Changes the bandwidth limit (bytes per second, 0: unlimited).
    pub fn set_rate(&mut self, rate: u64) {
        self.pacer = Pacer::new(rate);
    }

    /// The next sequence number.
    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn absorb(&mut self) -> Result<(), String> {
        match &*self.acks.borrow_and_update() {
            AckState::Acked(seq) => self.acked = self.acked.max(*seq),
            AckState::Failed(e) => return Err(e.clone()),
        }
        while let Some(&(seq, n)) = self.unacked.front() {
            if seq > self.acked {
                break;
            }
            self.unacked.pop_front();
            self.unacked_bytes -= n;
        }
        Ok(())
    }

    /// Sends a message carrying sequence number `seq` (from [`Link::next_seq`]).
    pub async fn send(&mut self, seq: u64, m: &Message) -> Result<(), String> {
        self.absorb()?;
        while self.unacked_bytes > WINDOW_BYTES {
            if self.acks.changed().await.is_err() {
                return Err("the connection to the process server ended".into());
            }
            self.absorb()?;
        }
        let frame = m.to_frame();
        let n = frame.encoded_len();
        self.pacer.take(n).await;
        siterecovery_wire::write_frame(&mut self.wr, &frame).await.map_err(|e| e.to_string())?;
        self.wr.flush().await.map_err(|e| e.to_string())?;
        self.bytes_sent += n as u64;
        self.unacked.push_back((seq, n));
        self.unacked_bytes += n;
        Ok(())
    }

    /// Writes a message that needs no ack (the hello).
    pub async fn send_unnumbered(&mut self, m: &Message) -> Result<(), String> {
        write_message(&mut self.wr, m).await.map_err(|e| e.to_string())?;
        self.wr.flush().await.map_err(|e| e.to_string())
    }

    /// Waits until everything sent is durable at the process server.
    pub async fn drain(&mut self) -> Result<(), String> {
        self.absorb()?;
        while self.acked < self.seq {
            if self.acks.changed().await.is_err() {
                return Err("the connection to the process server ended".into());
            }
            self.absorb()?;
        }
        Ok(())
    }

    /// Highest acknowledged sequence number.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Closes the sending side.
    pub async fn close(mut self) {
        let _ = self.wr.shutdown().await;
    }
}
