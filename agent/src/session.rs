//! One replication session (docs/replication-protocol.md "A session"): connect, hello and
//! welcome, the first comparison with the process server's head, then a point each
//! interval, taking part in group rounds and following policy changes in between.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use siterecovery_store::{PointKind, generate_point_id};
use siterecovery_wire::{
    DiskInfo, Hello, Message, PROTOCOL_VERSION, PointMarker, Resync, Slot, Welcome, WireError, read_message,
};
use tokio::io::{AsyncWriteExt as _, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

use crate::changes::{Blocks, Dirty};
use crate::disk::Disk;
use crate::link::{Link, spawn_ack_reader};
use crate::pass::{DiskSize, pass_message};
use crate::send::Wire;
use crate::{Agent, SessionError, app, err, group};

/// The target of this module's events: the crate's, as before the session moved out of
/// `lib.rs` (log readers see the same lines).
const LOG: &str = "siterecovery_agent";

/// Refusals that say the server is not protected (any more): its ProtectedServer does not
/// exist or is being deleted.
const NOT_PROTECTED: [&str; 2] = ["UnknownServer", "ServerDeleting"];

/// The sending half of a session's connection.
type Conn = WriteHalf<TlsStream<TcpStream>>;

impl Agent {
    /// Runs one session until it fails, or until `shutdown` (then `Ok`).
    pub(crate) async fn session(
        &mut self,
        tls: TlsConnector,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let (mut wire, welcome, mut control) = self.connect(tls).await?;
        let mut control_closed = false;
        // The policy's settings, as the process server hands them, win over local config.
        let (mut interval, mut app_interval) = self.follow(&welcome.settings);
        self.first_comparison(&mut wire).await?;
        loop {
            if self.interval_point(&mut wire, app_interval, &mut shutdown).await?.is_break() {
                // The link may end in a partial frame: nothing more is sent on it.
                wire.link.close().await;
                return Ok(());
            }
            // Until the next point is due, take part in the group rounds the process
            // server starts; a group point counts as this interval's point.
            let mut due = tokio::time::Instant::now() + interval;
            loop {
                let prepare = tokio::select! {
                    Some(new) = async { self.pending_settings.take() } => {
                        tracing::info!(target: LOG, settings = ?new, "the policy changed");
                        (interval, app_interval) = self.follow(&new);
                        wire.link.set_rate(new.bandwidth_bytes_per_second);
                        due = due.min(tokio::time::Instant::now() + interval);
                        continue;
                    }
                    _ = tokio::time::sleep_until(due) => break,
                    m = control.recv(), if !control_closed => match m {
                        Some(Message::GroupPrepare(p)) => p,
                        Some(Message::Settings(new)) => {
                            self.pending_settings = Some(new);
                            continue;
                        }
                        Some(_) => continue, // the decision of a round given up on
                        None => { control_closed = true; continue }
                    },
                    _ = stopping(&mut shutdown) => {
                        let r = tokio::time::timeout(Duration::from_secs(10), wire.link.drain()).await;
                        wire.link.close().await;
                        return match r {
                            Ok(Ok(())) => Ok(()),
                            Ok(Err(e)) => Err(err(e)),
                            Err(_) => Err(err("shutting down with unacknowledged data (it is resent on restart)")),
                        };
                    }
                };
                self.believed = None;
                let outcome = self.group_round(&mut wire, &mut control, prepare).await?;
                self.believed = Some(wire.sent.clone());
                let (id, grouped) = match outcome {
                    group::GroupOutcome::Point(id) => (id, true),
                    group::GroupOutcome::CrashPoint(id) => (id, false),
                    group::GroupOutcome::Nothing => continue,
                };
                if grouped {
                    tracing::info!(target: LOG, point = %id, "group recovery point acknowledged");
                    due = tokio::time::Instant::now() + interval;
                }
                self.update(|s| {
                    s.points += 1;
                    s.group_points += u64::from(grouped);
                    s.last_point = Some(id);
                });
            }
        }
    }

    /// The server is not protected (any more): its tracking is unpinned, so nothing stays
    /// attached in the kernel once this agent ends, and no restart state is left for the
    /// next. Tracking goes on in this process: if the server is protected again, replication
    /// continues without a gap. Once per process.
    fn forget_tracking(&mut self, reason: &str) {
        let Some(restart) = self.config.restart.clone() else { return };
        if std::mem::replace(&mut self.forgotten, true) {
            return;
        }
        match restart.forget() {
            Ok(_) => {
                tracing::warn!(target: LOG, reason, pin_dir = %restart.pin_dir.display(), "this server is not protected: its change tracking is no longer pinned and ends with this agent (a later restart compares every chunk)")
            }
            Err(e) => {
                tracing::warn!(target: LOG, reason, error = %e, "this server is not protected, but its pinned change tracking could not be removed; run `siterecovery-agent untrack`")
            }
        }
    }

    /// Opens the disks, connects to the process server and exchanges the hello and the
    /// welcome; the session's [`Wire`] starts from the welcome's head.
    async fn connect(
        &mut self,
        tls: TlsConnector,
    ) -> Result<(Wire<Conn>, Welcome, mpsc::UnboundedReceiver<Message>), SessionError> {
        let c = &self.config;
        let disks: Vec<Disk> =
            c.disks.iter().map(|d| Disk::open(&d.id, &d.path)).collect::<Result<_, _>>().map_err(err)?;
        let sizes: Vec<u64> = disks.iter().map(Disk::size).collect::<Result<_, _>>().map_err(err)?;
        let assigned = self.status.lock().unwrap_or_else(|p| p.into_inner()).assigned_process_server.clone();
        let address = process_server_address(&c.process_server, assigned.as_deref());
        let host = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h);
        let name = c.tls_server_name.clone().unwrap_or_else(|| host.trim_matches(['[', ']']).to_string());
        let name = ServerName::try_from(name).map_err(|e| err(format!("process server name: {e}")))?;
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&address))
            .await
            .map_err(|_| err(format!("connecting to {address} timed out")))?
            .map_err(|e| err(format!("connecting to {address}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let stream = tls.connect(name, tcp).await.map_err(|e| err(format!("TLS with {}: {e}", c.process_server)))?;
        let (mut rd, mut wr) = tokio::io::split(stream);

        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            namespace: c.namespace.clone(),
            server: c.server.clone(),
            disks: disks.iter().zip(&sizes).map(|(d, &size)| DiskInfo { id: d.id.clone(), size }).collect(),
            agent: env!("CARGO_PKG_VERSION").to_string(),
            features: [siterecovery_wire::FEATURE_GROUP_POINTS, siterecovery_wire::FEATURE_SETTINGS]
                .map(String::from)
                .to_vec(),
        };
        siterecovery_wire::write_message(&mut wr, &Message::Hello(hello)).await.map_err(err)?;
        wr.flush().await.map_err(err)?;
        let welcome = tokio::time::timeout(Duration::from_secs(60), read_message(&mut rd))
            .await
            .map_err(|_| err("no welcome from the process server within 60 s"))?;
        let welcome = match welcome {
            Err(WireError::Refused { reason, message }) => {
                if NOT_PROTECTED.contains(&reason.as_str()) {
                    self.forget_tracking(&reason);
                }
                return Err(err(format!("the process server refused the session ({reason}): {message}")));
            }
            other => other.map_err(err)?,
        };
        let Some(Message::Welcome(welcome, head)) = welcome else {
            return Err(err("the process server did not answer the hello with a welcome"));
        };
        if head.disks.len() != disks.len()
            || head.disks.iter().zip(&disks).zip(&sizes).any(|((h, d), &s)| h.id != d.id || h.size != s)
        {
            return Err(err("the process server's head does not match the disks sent in the hello"));
        }
        let chunk_size = welcome.chunk_size;
        if self.chunk_size.replace(chunk_size).is_some_and(|before| before != chunk_size) {
            // What this agent believed was counted in other chunks.
            self.believed = None;
        }
        tracing::info!(
            target: LOG,
            process_server = %c.process_server, chunk_size, latest_point = ?welcome.latest_point,
            tracker = self.tracker.name(), "connected to the process server"
        );
        self.update(|s| {
            s.connected = true;
            s.last_error = None;
            s.disks = disks.iter().zip(&sizes).map(|(d, &size)| DiskSize { id: d.id.clone(), size }).collect();
        });
        let (acks, control) = spawn_ack_reader(rd);
        let link = Link::new(wr, acks, welcome.settings.bandwidth_bytes_per_second);
        let sent = head.disks.iter().map(|d| d.slots.clone()).collect();
        Ok((Wire { link, disks, sizes, chunk_size, sent }, welcome, control))
    }

    /// Compares first: everything on a first look (initial copy, agent restart, lost
    /// tracking); otherwise what changed plus what the process server lacks of what this
    /// process sent before (unacknowledged when the connection dropped).
    async fn first_comparison(&mut self, wire: &mut Wire<Conn>) -> Result<(), SessionError> {
        // `sent` is still the head: what the process server holds.
        let held = &wire.sent;
        let first = self.tracker.take(&wire.disks, wire.chunk_size).map_err(err)?;
        let believed = self.believed.take();
        let compare: Dirty = match (&first, &believed) {
            (Dirty::Chunks(sets), Some(b)) if b.len() == held.len() => Dirty::Chunks(
                sets.iter()
                    .zip(b.iter().zip(held))
                    .map(|(set, (b, h))| {
                        // What the process server lacks is sent whole: no base to patch.
                        let mut s = set.clone();
                        s.extend((0..h.len()).filter(|&i| b.get(i) != Some(&h[i])).map(|i| (i as u64, Blocks::Whole)));
                        s
                    })
                    .collect(),
            ),
            _ => Dirty::All,
        };
        let resized = self.resized.clone();
        let counted = compare == Dirty::All || resized.is_some();
        let (sizes, chunk_size) = (&wire.sizes, wire.chunk_size);
        if compare == Dirty::All {
            let reason = if wire.sent.iter().all(|d| d.iter().all(|s| *s == Slot::Missing)) {
                "InitialCopy"
            } else if believed.is_none() {
                "AgentStarted"
            } else {
                "TrackingLost"
            };
            tracing::info!(target: LOG, reason, "comparing every chunk with the process server's copy");
            self.update(|s| s.last_resync_reason = Some(reason.into()));
            let seq = wire.link.next_seq();
            wire.link.send(seq, &Message::Resync(Resync { seq, reason: reason.into() })).await.map_err(err)?;
            match resized {
                Some(message) => self.begin_pass("DiskResized", message, &compare, sizes, chunk_size),
                None => self.begin_pass(reason, pass_message(reason), &compare, sizes, chunk_size),
            }
        } else if let Some(message) = resized {
            self.begin_pass("DiskResized", message, &compare, sizes, chunk_size);
        }
        self.send_pass(wire, &compare, counted).await?;
        if counted {
            // A pass is complete when the process server holds all of it durably.
            wire.link.drain().await.map_err(err)?;
            self.end_pass();
            self.resized = None;
        }
        self.update(|s| s.initial_copy_done = true);
        Ok(())
    }

    /// This interval's point: a requested full comparison first, then an app-consistent
    /// point when one is due, else a crash-consistent one (pre-copy, then a convergence
    /// freeze if writes never paused). `Break` when the agent is shutting down.
    async fn interval_point(
        &mut self,
        wire: &mut Wire<Conn>,
        app_interval: Option<Duration>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<ControlFlow<()>, SessionError> {
        // Until this cycle's pass is sent, what the tracker hands out exists only here:
        // a failure now must make the next session compare everything.
        self.believed = None;
        // Pre-copy: send what changed until a look finds nothing written since the
        // previous one; everything sent then reflects that instant.
        self.requested_pass(wire).await?;
        let mut app = None;
        if let Some(every) = app_interval
            && self.next_app.is_none_or(|t| Instant::now() >= t)
        {
            self.next_app = Some(Instant::now() + every);
            let r = self.app_point(wire, shutdown).await?;
            if r == app::AppOutcome::Shutdown {
                return Ok(ControlFlow::Break(()));
            }
            app = Some(r);
        }
        // An app-consistent point is this cycle's point (every point is at least
        // crash-consistent).
        let mut point = match app {
            Some(app::AppOutcome::Point) => None,
            _ => self.precopy(wire, &|| false).await?,
        };
        // Writes never paused: a short freeze of the configured filesystems forces
        // convergence (docs/replication-protocol.md).
        if point.is_none() && app != Some(app::AppOutcome::Point) {
            point = self.converge_frozen(wire).await?;
        }
        match point {
            Some(time) => {
                let id = generate_point_id(time, PointKind::Crash);
                let seq = wire.link.next_seq();
                let marker =
                    PointMarker { seq, id: id.clone(), kind: PointKind::Crash, time, group: None, members: vec![] };
                wire.link.send(seq, &Message::Point(marker)).await.map_err(err)?;
                wire.link.drain().await.map_err(err)?;
                tracing::info!(target: LOG, point = %id, "crash-consistent recovery point acknowledged");
                self.update(|s| {
                    s.points += 1;
                    s.last_point = Some(id);
                });
            }
            None if app == Some(app::AppOutcome::Point) => {}
            None => {
                tracing::warn!(
                    target: LOG,
                    passes = self.config.max_passes,
                    "writes never paused; no recovery point this interval"
                );
                self.update(|s| s.points_skipped += 1);
            }
        }
        let bytes = wire.link.bytes_sent;
        self.update(|s| s.bytes_sent = bytes);
        self.believed = Some(wire.sent.clone());
        Ok(ControlFlow::Continue(()))
    }

    /// The full comparison asked for from outside (a manual resync), if any.
    async fn requested_pass(&mut self, wire: &mut Wire<Conn>) -> Result<(), SessionError> {
        let Some((reason, message)) = self.requests.take() else { return Ok(()) };
        tracing::info!(target: LOG, reason, message, "comparing every chunk with the process server's copy");
        self.begin_pass(&reason, message.clone(), &Dirty::All, &wire.sizes, wire.chunk_size);
        let seq = wire.link.next_seq();
        let mut pass = wire.link.send(seq, &Message::Resync(Resync { seq, reason: reason.clone() })).await.map_err(err);
        if pass.is_ok() {
            pass = self.send_pass(wire, &Dirty::All, true).await;
        }
        if pass.is_ok() {
            pass = wire.link.drain().await.map_err(err);
        }
        if pass.is_err() {
            // Asked for once, done once: the next session runs it again.
            self.requests.request(&reason, &message);
        }
        pass?;
        self.end_pass();
        Ok(())
    }

    /// Follows the policy's settings as the process server hands them (where one is
    /// `None`, unknown, the agent's own configuration applies): takes their compression
    /// level, and gives the crash- and app-consistent intervals. The bandwidth limit is
    /// the link's.
    fn follow(&mut self, s: &siterecovery_wire::Settings) -> (Duration, Option<Duration>) {
        self.level = s.compression_level.map_or(self.config.compression_level, i32::from);
        let (crash_ms, app_ms) = (s.crash_interval_ms, s.app_interval_ms);
        let crash = crash_ms
            .map(Duration::from_millis)
            .unwrap_or_else(|| Duration::from_secs_f64(self.config.interval_seconds))
            .max(Duration::from_millis(100));
        let app = match app_ms {
            Some(ms) => Some(Duration::from_millis(ms)).filter(|d| !d.is_zero()),
            None => self.config.app_consistency.as_ref().and_then(app::AppConsistency::interval),
        }
        .map(|d| d.max(Duration::from_secs(1)));
        (crash, app)
    }
}

/// Returns once `shutdown` is true (at once if it already is).
pub(crate) async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // The borrow `wait_for` returns must not live across an await (it is not Send).
    let _ = shutdown.wait_for(|v| *v).await;
}

/// Where to connect: the configured `host:port`, except that a process-server Service
/// name (`siterecovery-process-server.<ns>.svc…`, as the registration bundle gives) is
/// narrowed to the pod the server is assigned to (`<pod>.siterecovery-process-server…`,
/// a name its serving certificate carries), so the agent follows reassignments.
pub fn process_server_address(configured: &str, assigned: Option<&str>) -> String {
    let (host, port) = configured.rsplit_once(':').unwrap_or((configured, "9443"));
    let valid_pod = |p: &str| {
        !p.is_empty() && p.len() <= 63 && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    match assigned {
        Some(pod) if host.starts_with("siterecovery-process-server.") && valid_pod(pod) => {
            format!("{pod}.{host}:{port}")
        }
        _ => configured.to_string(),
    }
}

#[cfg(test)]
mod address_tests {
    use super::process_server_address as addr;

    #[test]
    fn a_service_name_narrows_to_the_assigned_pod() {
        let svc = "siterecovery-process-server.prod.svc:9443";
        assert_eq!(
            addr(svc, Some("siterecovery-process-server-1")),
            "siterecovery-process-server-1.siterecovery-process-server.prod.svc:9443"
        );
        assert_eq!(addr(svc, None), svc);
        assert_eq!(addr("localhost:4000", Some("siterecovery-process-server-1")), "localhost:4000");
        assert_eq!(addr(svc, Some("Bad.Name")), svc);
    }
}
