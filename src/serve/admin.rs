//! The probe and metrics port (plain HTTP; bind it to loopback or a management network):
//!
//! | route | what |
//! |---|---|
//! | `GET /metrics` | Prometheus text format |
//! | `GET /live` | the process is up |
//! | `GET /ready` | a policy is loaded and the audit trail takes records |
//!
//! Nothing here changes anything or shows a record: the admin API (policy status and
//! reload, audit search) is on the console's HTTPS listener, behind an officer's sign-in
//! ([`crate::console`]).

use std::net::SocketAddr;

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::pipeline::WeakGateway;

#[derive(Clone)]
struct AdminState {
    gateway: WeakGateway,
    metrics: Option<PrometheusHandle>,
}

/// Install the process-wide Prometheus recorder once; later calls reuse it.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Real histograms (not summaries) for every `*_seconds` metric.
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &buckets,
                )
                .ok()?
                // Group-commit sizes, in records.
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("xgate_audit_batch_records".into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0],
                )
                .ok()?
                .install_recorder()
                .ok()
                .map(start_upkeep)
        })
        .clone()
}

/// Histogram samples wait in the recorder until an upkeep (or a scrape) folds them into
/// their buckets; with `install_recorder` the upkeep is ours to run. Without it a gateway
/// nobody scrapes keeps every call's samples: its heap grew ~1.5 KiB per call.
fn start_upkeep(handle: PrometheusHandle) -> PrometheusHandle {
    let h = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("xgate-metrics".into())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
                h.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep thread not started; histograms drain only when scraped");
    }
    handle
}

/// Serve the admin endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    gateway: WeakGateway,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AdminState {
        gateway,
        metrics: metrics_handle(),
    };
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Bind the admin address (port 0 for any).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

async fn render_metrics(State(s): State<AdminState>) -> impl IntoResponse {
    if let Some(gw) = s.gateway.upgrade() {
        crate::serve::health::export_gauges(&gw);
    }
    match &s.metrics {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n".to_owned(),
        ),
    }
}

async fn ready(State(s): State<AdminState>) -> axum::response::Response {
    let Some(gw) = s.gateway.upgrade() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "why_not": "shutting down"})),
        )
            .into_response();
    };
    let r = crate::serve::health::readiness(&gw);
    let code = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(r)).into_response()
}
