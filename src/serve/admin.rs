//! The admin endpoint (plain HTTP; bind it to loopback or a management network):
//!
//! | route | what |
//! |---|---|
//! | `GET /admin/policy` | version serving, when and how it was loaded, the last failed reload with every error |
//! | `POST /admin/policy/reload` | reload now: 200 with the version, or 422 with the errors (old policy keeps serving) |
//! | `GET /admin/audit/search?subject=&consumer=&dataset=&since=&until=` | records of the trail (the province database when shipping, else the local files), JSON; a search by subject is itself recorded |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /live` | the process is up |
//! | `GET /ready` | a policy is loaded and the audit trail takes records |
//!
//! Every `/admin` call is recorded on the audit trail (kind `admin`, action `admin.http`,
//! the caller's address), and so is every policy reload, whoever triggered it
//! (`policy.reload`, from which version to which, or refused with why).

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::IntoResponse,
    routing::{get, post},
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::{pipeline::WeakGateway, serve::reload::Reloader};

#[derive(Clone)]
struct AdminState {
    reloader: Arc<Reloader>,
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
    reloader: Arc<Reloader>,
    gateway: WeakGateway,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AdminState {
        reloader,
        gateway,
        metrics: metrics_handle(),
    };
    // Every /admin call is an administrator's action, and goes on the trail; the probes and
    // the metrics scrape are not.
    let admin = Router::new()
        .route("/admin/policy", get(policy_status))
        .route("/admin/policy/reload", post(policy_reload))
        .route("/admin/audit/search", get(audit_search))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_admin_call,
        ));
    let app = Router::new()
        .merge(admin)
        .route("/metrics", get(render_metrics))
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready))
        .with_state(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// Who called the admin endpoint, as its record says (the endpoint has no sign-in yet: the
/// peer address).
fn admin_actor(peer: SocketAddr) -> String {
    format!("admin endpoint from {peer}")
}

/// Record an /admin call (`admin.http`: method, path, status) after it is answered.
async fn record_admin_call(
    State(s): State<AdminState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let what = format!("{} {}", req.method(), req.uri().path());
    let resp = next.run(req).await;
    if let Some(gw) = s.gateway.upgrade() {
        let status = resp.status();
        gw.record_admin(crate::audit::admin_record(
            "admin.http",
            &admin_actor(peer),
            status.is_success(),
            Some(format!("{what} -> {}", status.as_u16())),
        ));
    }
    resp
}

/// Bind the admin address (port 0 for any).
pub async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}

async fn policy_status(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.reloader.status())
}

async fn policy_reload(
    State(s): State<AdminState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
) -> impl IntoResponse {
    let r = s.reloader.clone();
    let actor = admin_actor(peer);
    match tokio::task::spawn_blocking(move || r.reload(&actor)).await {
        Ok(Ok(version)) => (
            StatusCode::OK,
            Json(serde_json::json!({ "ok": true, "version": version })),
        ),
        Ok(Err(errors)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!({
                "ok": false,
                "version": s.reloader.status().version,
                "errors": errors,
            })),
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "ok": false, "errors": ["reload task failed"] })),
        ),
    }
}

/// `GET /admin/audit/search?subject=ID&consumer=&dataset=&since=&until=`: the records of the
/// trail FindUsage reads (the province database, or this gateway's files), as JSON. A search
/// by subject is itself recorded (`audit.search`, with the subject's keyed hash, never the id):
/// looking for who read a citizen's record is an access to account for.
async fn audit_search(
    State(s): State<AdminState>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    axum::extract::Query(p): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> axum::response::Response {
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let time = |k: &str| -> Result<Option<time::OffsetDateTime>, String> {
        p.get(k)
            .filter(|v| !v.is_empty())
            .map(|v| {
                time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| format!("`{k}` must be an RFC 3339 time"))
            })
            .transpose()
    };
    let (since, until) = match (time("since"), time("until")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": e })),
            )
                .into_response();
        }
    };
    let q = crate::audit::read::Query {
        consumer: p.get("consumer").cloned(),
        dataset: p.get("dataset").cloned(),
        since,
        until,
        ..Default::default()
    };
    let subject = p
        .get("subject")
        .map(String::as_str)
        .filter(|v| !v.is_empty());
    let result = gw.search_trail(q, subject).await;
    if let Some(id) = subject {
        let hash = gw.subject_hash(id).unwrap_or_default();
        let mut rec = crate::audit::admin_record(
            "audit.search",
            &admin_actor(peer),
            result.is_ok(),
            Some(format!("by subject {hash}")),
        );
        rec.subjects = vec![hash];
        gw.record_admin(rec);
    }
    match result {
        Ok(records) => Json(records).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": e })),
        )
            .into_response(),
    }
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
