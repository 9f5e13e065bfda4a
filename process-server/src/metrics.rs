//! Prometheus metrics of the process server, served on `/metrics` with `/healthz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Agent sessions accepted.
    pub sessions: Counter,
    /// Sessions refused (identity, protocol, target).
    pub sessions_refused: Counter,
    /// Plaintext bytes received: whole chunks, and the ranges deltas change.
    pub bytes_received: Counter,
    /// Bytes uploaded (sealed).
    pub bytes_uploaded: Counter,
    /// Whole chunks uploaded.
    pub chunks_uploaded: Counter,
    /// Patches uploaded (deltas stored as patch objects).
    pub patches_uploaded: Counter,
    /// Packs of patches uploaded (one request each, format 3).
    pub packs_uploaded: Counter,
    /// Recovery points written.
    pub points_written: Counter,
    /// Upload attempts that failed (retried).
    pub upload_errors: Counter,
    /// Journal bytes acknowledged and not yet uploaded.
    pub backlog_bytes: Gauge,
    /// Times a session waited for cache room.
    pub backpressure_waits: Counter,
    /// Consistency-group rounds, by result (`Committed`, `MemberNotConnected`, …).
    pub group_rounds: Family<GroupRoundLabels, Counter>,
    /// Chunks read back because they were not in memory (a clone of
    /// `RecentChunks::downloads`), from a local copy or the store.
    pub base_downloads: Counter,
    /// Reads answered from local copies (clones of `LocalCopies`' metrics).
    pub copy_hits: Counter,
    /// Local copies not written (no room).
    pub copies_skipped: Counter,
    /// Local copies dropped because they did not open.
    pub copies_dropped: Counter,
    /// Bytes held in local copies.
    pub copy_bytes: Gauge,
}

/// Labels of [`Metrics::group_rounds`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupRoundLabels {
    /// `<namespace>/<group>`.
    pub group: String,
    /// How the round ended.
    pub result: String,
}

impl Metrics {
    /// Reports the metrics of `copies`.
    pub fn copies(&mut self, copies: &siterecovery_store::LocalCopies) {
        self.copy_hits = copies.hits.clone();
        self.copies_skipped = copies.skipped.clone();
        self.copies_dropped = copies.dropped.clone();
        self.copy_bytes = copies.held_bytes.clone();
    }

    /// Registers every metric.
    pub fn register(self: &Arc<Self>, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("siterecovery_process_server");
        r.register("sessions", "Agent sessions accepted", self.sessions.clone());
        r.register("sessions_refused", "Agent sessions refused", self.sessions_refused.clone());
        r.register(
            "received_bytes",
            "Plaintext bytes received from agents: whole chunks, and the changed ranges of deltas",
            self.bytes_received.clone(),
        );
        r.register("uploaded_bytes", "Bytes uploaded to Blob storage", self.bytes_uploaded.clone());
        r.register("uploaded_chunks", "Whole chunks uploaded to Blob storage", self.chunks_uploaded.clone());
        r.register("uploaded_patches", "Patches uploaded to Blob storage", self.patches_uploaded.clone());
        r.register("uploaded_packs", "Packs of patches uploaded to Blob storage", self.packs_uploaded.clone());
        r.register("recovery_points", "Recovery points written", self.points_written.clone());
        r.register("upload_errors", "Failed upload attempts (retried)", self.upload_errors.clone());
        r.register("backlog_bytes", "Bytes acknowledged to agents and not yet uploaded", self.backlog_bytes.clone());
        r.register("backpressure_waits", "Times a session paused for cache room", self.backpressure_waits.clone());
        r.register("group_rounds", "Consistency-group rounds, by result", self.group_rounds.clone());
        r.register(
            "base_downloads",
            "Chunks read back because they were not in memory, from a local copy or Blob storage: bases of deltas, to check one or to store its chunk whole",
            self.base_downloads.clone(),
        );
        r.register("local_copy_hits", "Objects read from local copies instead of Blob storage", self.copy_hits.clone());
        r.register(
            "local_copies_skipped",
            "Local copies not written: larger than the budget, or the cache volume short of room beyond the journal's",
            self.copies_skipped.clone(),
        );
        r.register(
            "local_copies_dropped",
            "Local copies that did not open (damaged) and were read from Blob storage instead",
            self.copies_dropped.clone(),
        );
        r.register("local_copy_bytes", "Bytes held in local copies on the cache volume", self.copy_bytes.clone());
    }
}

/// Serves `/metrics` and `/healthz` on `addr`; returns the bound address.
pub async fn serve(addr: SocketAddr, registry: Registry) -> std::io::Result<SocketAddr> {
    let registry = Arc::new(registry);
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    let _ = encode(&mut out, &registry);
                    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], out)
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(local)
}
