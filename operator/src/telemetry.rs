//! The operator's Prometheus metrics and its `/metrics`, `/healthz` and `/readyz`
//! endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Content type of the OpenMetrics text format that [`Metrics::render`] writes.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the reconcile duration buckets, in seconds: from a no-op reconcile
/// (milliseconds) to one that waits on Azure (a minute).
const DURATION_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 60.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    namespace: String,
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The operator's metric families, registered under the `siterecovery_` prefix.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabels, Counter>,
    reconcile_errors: Family<ErrorLabels, Counter>,
    reconcile_duration: Family<KindLabels, Histogram, fn() -> Histogram>,
    server_rpo: Family<ServerLabels, Gauge<f64, AtomicU64>>,
    servers: Family<PhaseLabels, Gauge>,
}

/// Records the duration of one reconcile when dropped; see [`Metrics::reconcile`].
#[must_use = "the duration is recorded when the timer is dropped"]
pub struct ReconcileTimer {
    histogram: Histogram,
    start: Instant,
}

impl Metrics {
    /// Registers every family, all empty.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("siterecovery");
        let reconciles = Family::default();
        registry.register("reconciles", "Reconciles started, by kind", reconciles.clone());
        let reconcile_errors = Family::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by kind and error reason",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register_with_unit(
            "reconcile_duration",
            "Time a reconcile took, by kind",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let server_rpo = Family::default();
        registry.register_with_unit(
            "server_rpo",
            "Age of the newest recovery point of a protected server",
            Unit::Seconds,
            server_rpo.clone(),
        );
        let servers = Family::default();
        registry.register("servers", "Protected servers, by lifecycle phase", servers.clone());
        Self { registry, reconciles, reconcile_errors, reconcile_duration, server_rpo, servers }
    }

    /// Call at the start of a reconcile; the returned guard records duration (histogram,
    /// label kind) on drop.
    pub fn reconcile(&self, kind: &'static str) -> ReconcileTimer {
        let labels = KindLabels { kind };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer { histogram: self.reconcile_duration.get_or_create_owned(&labels), start: Instant::now() }
    }

    /// Counts a failed reconcile. `reason` becomes a label, so keep it to a small fixed
    /// set (an error variant's name), never a message.
    pub fn reconcile_failed(&self, kind: &'static str, reason: &str) {
        self.reconcile_errors.get_or_create(&ErrorLabels { kind, reason: reason.to_owned() }).inc();
    }

    /// Sets the current RPO of one protected server.
    pub fn set_server_rpo(&self, namespace: &str, name: &str, seconds: f64) {
        self.server_rpo.get_or_create(&server_labels(namespace, name)).set(seconds);
    }

    /// Drops a server's series, for a server that was deleted or is no longer protected.
    pub fn forget_server(&self, namespace: &str, name: &str) {
        self.server_rpo.remove(&server_labels(namespace, name));
    }

    /// Sets how many servers are in `phase`.
    pub fn set_phase_count(&self, phase: &str, count: i64) {
        self.servers.get_or_create(&PhaseLabels { phase: phase.to_owned() }).set(count);
    }

    /// Every family in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn server_labels(namespace: &str, name: &str) -> ServerLabels {
    ServerLabels { namespace: namespace.to_owned(), server: name.to_owned() }
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// Liveness/readiness flags shared with main.
#[derive(Clone, Debug, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    /// Marks the process ready (it leads and its controllers run) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether `/readyz` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct Endpoints {
    metrics: Arc<Metrics>,
    health: Health,
}

/// Serves GET /metrics, /healthz (200 "ok" while the process runs), /readyz (200 when
/// ready, else 503) on addr until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    serve_on(listener, metrics, health, shutdown).await
}

async fn serve_on(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Endpoints { metrics, health });
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

async fn render_metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], endpoints.metrics.render())
}

async fn readyz(State(endpoints): State<Endpoints>) -> (StatusCode, &'static str) {
    if endpoints.health.is_ready() { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn render_lists_every_family_with_its_labels() {
        let metrics = Metrics::new();
        drop(metrics.reconcile("ProtectedServer"));
        metrics.reconcile_failed("ProtectedServer", "Azure");
        metrics.set_server_rpo("prod", "web-1", 42.5);
        metrics.set_server_rpo("prod", "web-2", 7.0);
        metrics.forget_server("prod", "web-2");
        metrics.set_phase_count("Protected", 3);

        let text = metrics.render();
        for expected in [
            r#"siterecovery_reconciles_total{kind="ProtectedServer"} 1"#,
            r#"siterecovery_reconcile_errors_total{kind="ProtectedServer",reason="Azure"} 1"#,
            r#"siterecovery_reconcile_duration_seconds_count{kind="ProtectedServer"} 1"#,
            r#"siterecovery_reconcile_duration_seconds_bucket{le="+Inf",kind="ProtectedServer"} 1"#,
            r#"siterecovery_server_rpo_seconds{namespace="prod",server="web-1"} 42.5"#,
            r#"siterecovery_servers{phase="Protected"} 3"#,
            "# TYPE siterecovery_reconcile_duration_seconds histogram",
            "# UNIT siterecovery_server_rpo_seconds seconds",
            "# EOF",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        assert!(!text.contains("web-2"), "a forgotten server is still exported:\n{text}");
    }

    /// A minimal HTTP/1.1 GET: (status, head, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connecting");
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("writing");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("reading");
        let (head, body) = response.split_once("\r\n\r\n").expect("a complete response");
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
        (status, head.to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn endpoints_answer_with_the_right_statuses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding loopback");
        let addr = listener.local_addr().expect("bound address");
        let metrics = Arc::new(Metrics::new());
        metrics.set_phase_count("Protected", 2);
        let health = Health::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, metrics, health.clone(), async {
            let _ = stopped.await;
        }));

        assert_eq!(get(addr, "/healthz").await.0, 200);
        assert_eq!(get(addr, "/healthz").await.2, "ok");
        assert_eq!(get(addr, "/readyz").await.0, 503);
        health.set_ready(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (status, head, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
        assert!(body.contains(r#"siterecovery_servers{phase="Protected"} 2"#), "{body}");
        assert_eq!(get(addr, "/nothing").await.0, 404);

        stop.send(()).expect("server still running");
        server.await.expect("server task").expect("server ends cleanly on shutdown");
    }

    #[tokio::test]
    async fn serve_binds_and_returns_on_shutdown() {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("loopback address");
        serve(addr, Arc::new(Metrics::new()), Health::default(), async {}).await.expect("serving until shutdown");
    }
}
