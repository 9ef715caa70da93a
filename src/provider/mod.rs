//! `xgate provider`: a department shares a table (or an HTTP/JSON service) without writing a
//! server. It runs inside the owning department, next to its database (the department's
//! credentials never leave it), and serves the standard `xgate.v1.DataExchange` over mTLS to
//! the gateway, and only to the gateway.
//!
//! ```text
//!  gateway ──mTLS──▶ service (only the gateway ▸ dataset state ▸ request ▸ token ▸ source)
//!                       │
//!                       ├─ sql   build (one SELECT, bound values) ▸ engine (pg / mysql / sqlite)
//!                       └─ http  the GET, rows checked against the conditions
//!  check    every dataset against its live schema: at start, on reload, on an interval
//!  config   provider.yaml;  dataset  catalogue entry × mapping, and the typed request
//!  token    sealed keyset / page positions
//! ```
//!
//! Not here: who may see what (the gateway decides and narrows the request before it
//! arrives; a provider answers what the gateway asks, within its catalogue entry).

pub mod check;
pub mod config;
pub mod dataset;
pub mod http;
pub mod service;
pub mod sql;
pub mod token;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

pub use self::config::ProviderConfig;
use self::{
    check::{Catalogue, Live},
    service::Service,
    token::PageKey,
};
use crate::pb;

/// A running provider.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    live: Arc<Live>,
    path: Option<PathBuf>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), String>>,
    background: Vec<JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

fn read(p: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()))
}

/// `xgate provider check`: the config, the catalogue and every dataset against its source.
/// The datasets' states, or the config errors.
pub async fn check(cfg: &ProviderConfig) -> Result<Catalogue, Vec<String>> {
    let cat = Catalogue::build(cfg)?;
    cat.check_all().await;
    Ok(cat)
}

/// Start serving `cfg` (read from `path`, watched for changes when given). Returns once the
/// first check of every dataset is done and the listeners are bound.
pub async fn start(cfg: &ProviderConfig, path: Option<PathBuf>) -> Result<Running, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = crate::serve::admin::metrics_handle();
    let cert = read(&cfg.tls.cert, "tls.cert (the provider's certificate)")?;
    let key = read(&cfg.tls.key, "tls.key (the provider's private key)")?;
    let ca = read(
        &cfg.tls.client_ca,
        "tls.client_ca (the CA the gateway's client certificate chains to)",
    )?;
    let page_key = match &cfg.page_token_key_file {
        Some(p) => PageKey::new(&read(p, "page_token_key_file")?)?,
        None => PageKey::random(),
    };
    let cat = Catalogue::build(cfg)
        .map_err(|e| format!("invalid provider config:\n  - {}", e.join("\n  - ")))?;
    // Counters a dashboard alerts on exist from the start.
    for d in cat.datasets.keys() {
        metrics::gauge!("xgate_source_dataset_serving", "dataset" => d.clone()).set(0.0);
    }
    cat.check_all().await;
    let (health, health_service) = tonic_health::server::health_reporter();
    let live = Arc::new(Live {
        current: ArcSwap::from_pointee(cat),
        recheck: tokio::sync::Notify::new(),
        page_key,
        health,
    });
    live.publish_health().await;
    let svc = Service {
        live: live.clone(),
        gateway_ids: Arc::new(cfg.gateway.identities.clone()),
        limits: cfg.limits,
    };
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| format!("listen {}: {e}", cfg.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (admin_stop_tx, admin_stop_rx) = tokio::sync::watch::channel(false);
    let server = Server::builder()
        .tls_config(tls)
        .map_err(|e| format!("tls: {e}"))?
        .add_service(health_service)
        .add_service(pb::data_exchange_server::DataExchangeServer::new(svc));
    let incoming = TcpListenerStream::new(listener).map(|s| {
        s.inspect(|t| {
            let _ = t.set_nodelay(true);
        })
    });
    let mut background = vec![
        tokio::spawn(
            live.clone()
                .run_checks(Duration::from_secs(cfg.check_interval_secs)),
        ),
        tokio::spawn(live.clone().sample_pools()),
    ];
    let admin_addr = match cfg.admin_listen {
        Some(a) => {
            let l = TcpListener::bind(a)
                .await
                .map_err(|e| format!("admin_listen {a}: {e}"))?;
            let bound = l.local_addr().map_err(|e| e.to_string())?;
            let app = Router::new()
                .route("/live", get(|| async { "live\n" }))
                .route("/ready", get(ready))
                .route("/metrics", get(metrics_text))
                .with_state(live.clone());
            let mut rx = admin_stop_rx;
            background.push(tokio::spawn(async move {
                let _ = axum::serve(l, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.changed().await;
                    })
                    .await;
            }));
            Some(bound)
        }
        None => None,
    };
    let task = tokio::spawn(async move {
        let r = server
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            })
            .await
            .map_err(|e| e.to_string());
        let _ = admin_stop_tx.send(true);
        r
    });
    tracing::info!(%addr, provider = %cfg.id, "provider listening");
    let mut running = Running {
        addr,
        admin_addr,
        live,
        path: path.clone(),
        shutdown: stop_tx,
        task,
        background,
        _watcher: None,
    };
    if let Some(p) = path {
        let watched = vec![p.clone(), cfg.catalogue.clone()];
        let live = running.live.clone();
        let handle = tokio::runtime::Handle::current();
        running._watcher = Some(
            crate::serve::reload::watch_paths(watched, "provider", move || {
                let (live, p) = (live.clone(), p.clone());
                handle.spawn(async move { reload_from(&live, &p, "file-change").await });
            })
            .map_err(|e| format!("watching the config: {e}"))?,
        );
    }
    Ok(running)
}

/// Re-read provider.yaml and the catalogue, check every dataset, then swap. An invalid file
/// changes nothing (the old set keeps serving). Listener and TLS changes need a restart.
async fn reload_from(
    live: &Live,
    path: &std::path::Path,
    trigger: &str,
) -> Result<(), Vec<String>> {
    let result = async {
        let cfg = ProviderConfig::load(path)?;
        let cat = Catalogue::build(&cfg)?;
        cat.check_all().await;
        Ok::<_, Vec<String>>(cat)
    }
    .await;
    match result {
        Ok(cat) => {
            let serving = cat
                .datasets
                .values()
                .filter(|d| matches!(**d.state.load(), check::State::Serving { .. }))
                .count();
            tracing::info!(trigger, datasets = cat.datasets.len(), serving, version = %cat.catalogue_version, "provider config reloaded");
            metrics::counter!("xgate_source_reloads_total", "result" => "ok").increment(1);
            live.current.store(Arc::new(cat));
            live.publish_health().await;
            Ok(())
        }
        Err(errors) => {
            tracing::error!(trigger, errors = %errors.join("; "), "provider config reload refused; the previous one keeps serving");
            metrics::counter!("xgate_source_reloads_total", "result" => "error").increment(1);
            Err(errors)
        }
    }
}

impl Running {
    /// Reload now (SIGHUP, tests).
    pub async fn reload(&self) -> Result<(), Vec<String>> {
        match &self.path {
            Some(p) => reload_from(&self.live, p, "signal").await,
            None => Err(vec!["started without a config path".into()]),
        }
    }

    /// The readiness document `/ready` serves.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        self.live.readiness()
    }

    /// Stop: no new calls, calls in flight finish, pools closed.
    pub async fn shutdown(self) -> Result<(), String> {
        let _ = self.shutdown.send(());
        let r = self.task.await.map_err(|e| e.to_string())?;
        for b in self.background {
            b.abort();
        }
        self.live.current.load_full().close().await;
        r
    }
}

async fn ready(State(live): State<Arc<Live>>) -> impl IntoResponse {
    let (ok, body) = live.readiness();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn metrics_text() -> impl IntoResponse {
    match crate::serve::admin::metrics_handle() {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n".to_owned(),
        ),
    }
}
