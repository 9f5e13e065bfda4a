//! The agent's `/metrics` (Prometheus text format) and `/healthz`, from its status and
//! that of certificate renewal.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::get;

use crate::AgentStatus;
use crate::renew::RenewalStatus;

/// Renders the status as Prometheus metrics.
pub fn render(s: &AgentStatus, renewal: &RenewalStatus) -> String {
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
    metric("group_points_total", "counter", "Consistency-group points acknowledged", s.group_points);
    metric("chunks_sent_total", "counter", "Chunks sent, whole or as deltas", s.chunks_sent);
    metric("deltas_sent_total", "counter", "Chunks sent as deltas", s.deltas_sent);
    metric("payload_bytes_total", "counter", "Plaintext bytes sent (before compression)", s.payload_bytes);
    metric("sent_bytes_total", "counter", "Bytes written to the connection", s.bytes_sent);
    metric("chunks_compared_total", "counter", "Chunks read and compared", s.chunks_compared);
    metric(
        "chunks_read_partly_total",
        "counter",
        "Chunks read by their dirty 64 KiB blocks alone",
        s.chunks_read_partly,
    );
    metric("read_bytes_total", "counter", "Bytes read from the protected disks", s.bytes_read);
    metric("block_cache_bytes", "gauge", "Memory held by cached 64 KiB block hashes", s.block_cache_bytes);
    render_renewal(&mut out, renewal);
    out.push_str("# EOF\n");
    out
}

/// Certificate expiry and renewal: alert on an expiry close at hand, on `refused` (the
/// agent must be registered again), and on failures that keep growing.
fn render_renewal(out: &mut String, r: &RenewalStatus) {
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        out.push_str(&format!("# HELP siterecovery_agent_{name} {help}\n# TYPE siterecovery_agent_{name} {kind}\n"));
        for (labels, value) in samples {
            out.push_str(&format!("siterecovery_agent_{name}{labels} {value}\n"));
        }
    };
    let time = |t: Option<jiff::Timestamp>| {
        t.map(|t| (String::new(), t.as_second().max(0) as u64)).into_iter().collect::<Vec<_>>()
    };
    family(
        "certificate_expiry_timestamp_seconds",
        "gauge",
        "When the client certificate on disk expires (Unix time)",
        &time(r.not_after),
    );
    family(
        "certificate_renewal_due_timestamp_seconds",
        "gauge",
        "When the client certificate is due for renewal (Unix time)",
        &time(r.renew_at),
    );
    family("certificate_renewals_total", "counter", "Client certificates renewed", &[(String::new(), r.renewals)]);
    let failures: Vec<(String, u64)> =
        r.failures.iter().map(|(reason, n)| (format!("{{reason=\"{reason}\"}}"), *n)).collect();
    family(
        "certificate_renewal_failures_total",
        "counter",
        "Failed renewal attempts, by the endpoint's reason (Unreachable, Local otherwise)",
        &failures,
    );
    family(
        "certificate_renewal_refused",
        "gauge",
        "1 when the last renewal was refused: register the server again before the certificate expires",
        &[(String::new(), u64::from(r.refused))],
    );
}

/// Serves `/metrics` and `/healthz` on `addr`.
pub async fn serve(
    addr: SocketAddr,
    status: Arc<Mutex<AgentStatus>>,
    renewal: Arc<Mutex<RenewalStatus>>,
) -> std::io::Result<SocketAddr> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let text = render(&s, &renewal.lock().unwrap_or_else(|p| p.into_inner()));
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
        let text = super::render(&s, &Default::default());
        assert!(text.contains("siterecovery_agent_recovery_points_total 3\n"));
        assert!(text.contains("siterecovery_agent_connected 1\n"));
        assert!(text.contains("siterecovery_agent_certificate_renewals_total 0\n"));
        assert!(!text.contains("\nsiterecovery_agent_certificate_expiry_timestamp_seconds "), "unknown yet: {text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn metrics_render_certificate_expiry_and_renewal_failures_by_reason() {
        let mut r = crate::renew::RenewalStatus {
            not_after: Some(jiff::Timestamp::from_second(1_800_000_000).unwrap()),
            renewals: 2,
            refused: true,
            ..Default::default()
        };
        r.failures.insert("CertificateSuperseded".into(), 1);
        r.failures.insert("Unreachable".into(), 3);
        let text = super::render(&Default::default(), &r);
        assert!(text.contains("siterecovery_agent_certificate_expiry_timestamp_seconds 1800000000\n"), "{text}");
        assert!(text.contains("siterecovery_agent_certificate_renewals_total 2\n"));
        assert!(
            text.contains(
                "siterecovery_agent_certificate_renewal_failures_total{reason=\"CertificateSuperseded\"} 1\n"
            )
        );
        assert!(text.contains("siterecovery_agent_certificate_renewal_failures_total{reason=\"Unreachable\"} 3\n"));
        assert!(text.contains("siterecovery_agent_certificate_renewal_refused 1\n"));
        assert!(text.ends_with("# EOF\n"));
    }
}
