//! The agent's `/metrics` (Prometheus text format) and `/healthz`, from its status.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;

use crate::AgentStatus;

/// Renders the status as Prometheus metrics.
pub fn render(s: &AgentStatus) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP siterecovery_agent_{name} {help}\n# TYPE siterecovery_agent_{name} {kind}\nsiterecovery_agent_{name} {value}\n"
        ));
    };
    metric("connected", "gauge", "1 while connected to the process server", u64::from(s.connected));
    metric("initial_copy_done", "gauge", "1 once every disk was copied once", u64::from(s.initial_copy_done));
    metric("recovery_points_total", "counter", "Recovery points acknowledged", s.points);
    metric(
        "recovery_points_skipped_total",
        "counter",
        "Intervals without a point (writes never paused)",
        s.points_skipped,
    );
    metric("app_points_total", "counter", "App-consistent points acknowledged", s.app_points);
    metric("app_points_failed_total", "counter", "App-consistent attempts without a point", s.app_points_failed);
    metric("chunks_sent_total", "counter", "Chunks sent, whole or as deltas", s.chunks_sent);
    metric("deltas_sent_total", "counter", "Chunks sent as deltas", s.deltas_sent);
    metric("group_points_total", "counter", "Consistency-group points acknowledged", s.group_points);
    metric("payload_bytes_total", "counter", "Plaintext bytes sent (before compression)", s.payload_bytes);
    metric("sent_bytes_total", "counter", "Bytes written to the connection", s.bytes_sent);
    metric("chunks_compared_total", "counter", "Chunks read and compared", s.chunks_compared);
    out.push_str("# EOF\n");
    out
}

/// Serves `/metrics` and `/healthz` on `addr`.
pub async fn serve(addr: SocketAddr, status: Arc<Mutex<AgentStatus>>) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = render(&status.lock().unwrap_or_else(|p| p.into_inner()));
                async move { ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], text) }
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

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_render_every_counter() {
        let s = crate::AgentStatus { points: 3, chunks_sent: 7, connected: true, ..Default::default() };
        let text = super::render(&s);
        assert!(text.contains("siterecovery_agent_recovery_points_total 3\n"));
        assert!(text.contains("siterecovery_agent_connected 1\n"));
        assert!(text.ends_with("# EOF\n"));
    }
}
