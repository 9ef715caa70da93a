//! Wiring: build every part from the config, serve, and shut down without losing records.
//!
//! Shutdown order: stop accepting; let in-flight calls finish (bounded by the drain timeout);
//! drop the gateway so the audit channel closes; wait for the writer to drain, flush and fsync.
//!
//! Size: ~680 lines, `check` (everything that can be wrong, before anything binds), `start`
//! (its steps, each a function below it) and `stop_in_order`, kept together so the start and
//! the stop can be read against each other; the parts they wire are the submodules.

pub mod admin;
pub mod conn;
pub mod health;
pub mod reload;
pub mod routes;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{
    audit,
    config::Config,
    pb,
    pipeline::{Gateway, Snapshot},
    policy::{Policy, mask::MaskKey},
    tls,
    token::TokenVerifier,
    upstream::UpstreamTls,
};

use self::reload::Reloader;

/// Everything that can stop the gateway from starting, all reported at once.
#[derive(Debug, thiserror::Error)]
#[error("xgate cannot start:\n  - {}", .0.join("\n  - "))]
pub struct StartError(pub Vec<String>);

/// A running gateway.
#[derive(Debug)]
pub struct Running {
    /// The bound gRPC address (useful with port 0).
    pub addr: SocketAddr,
    /// The bound admin address, when the admin endpoint is on.
    pub admin_addr: Option<SocketAddr>,
    /// The bound console address (HTTPS), when the console is on.
    pub console_addr: Option<SocketAddr>,
    /// Reload the policy by hand (tests, embedding).
    pub reloader: Arc<Reloader>,
    pub policy_version: String,
    pub audit_path: std::path::PathBuf,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<u64, String>>,
}

impl Running {
    /// Graceful stop: drain in-flight calls, flush the audit trail. Returns records written.
    pub async fn shutdown(self) -> Result<u64, String> {
        let _ = self.shutdown.send(());
        self.task
            .await
            .map_err(|e| format!("gateway task failed: {e}"))?
    }

    /// Wait for the gateway to end by itself (it does not, unless it fails).
    pub async fn wait(self) -> Result<u64, String> {
        let Running { shutdown, task, .. } = self;
        let r = task
            .await
            .map_err(|e| format!("gateway task failed: {e}"))?;
        drop(shutdown);
        r
    }
}

/// Rebuild the server TLS config and the upstream TLS from their files; on any error keep
/// what is in use and say why.
fn rotate_tls(
    files: &tls::ServerTlsFiles,
    live: &tls::LiveServerConfig,
    revoked: &tls::Revocations,
    reloader: &Reloader,
    up: &crate::config::Upstream,
    max_msg: usize,
    upstream_digest: &std::sync::Mutex<[u8; 32]>,
) {
    match tls::server_config(files).and_then(|c| Ok((c, tls::revoked_serials(files)?))) {
        Ok((c, serials)) => {
            live.store(c);
            revoked.store(Arc::new(serials));
            metrics::counter!("xgate_tls_reloads_total", "side" => "server", "result" => "ok")
                .increment(1);
            tracing::info!("server certificates, client CA and CRLs reloaded");
        }
        Err(e) => {
            metrics::counter!("xgate_tls_reloads_total", "side" => "server", "result" => "error")
                .increment(1);
            tracing::error!(error = %e, "server TLS reload refused; the previous certificates stay in use");
        }
    }
    // Only when the upstream files changed: a CRL update must not drop provider connections.
    let digest = files_digest(&[&up.ca, &up.cert, &up.key]);
    if let Ok(mut last) = upstream_digest.lock() {
        if *last == digest {
            return;
        }
        *last = digest;
    }
    match UpstreamTls::load(up, max_msg).and_then(|u| reloader.rotate_upstream(u)) {
        Ok(()) => {
            metrics::counter!("xgate_tls_reloads_total", "side" => "upstream", "result" => "ok")
                .increment(1);
        }
        Err(e) => {
            metrics::counter!("xgate_tls_reloads_total", "side" => "upstream", "result" => "error")
                .increment(1);
            tracing::error!(error = %e, "upstream TLS reload refused; the previous certificate stays in use");
        }
    }
}

/// SHA-256 over the contents of `paths` (unreadable files count as empty).
fn files_digest(paths: &[&std::path::Path]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in paths {
        h.update(std::fs::read(p).unwrap_or_default());
        h.update([0u8]);
    }
    h.finalize().into()
}

/// What a config builds before anything is bound or written: every file it names read and
/// checked, every error reported at once. `xgate config check` stops here.
pub struct Checked {
    tls_files: tls::ServerTlsFiles,
    server_tls: Arc<rustls::ServerConfig>,
    tokens: Arc<TokenVerifier>,
    pub snap: Snapshot,
    up: UpstreamTls,
    mask_key: MaskKey,
    page_seal: crate::pipeline::paging::PageSeal,
    keys: audit::AuditKeys,
}

impl std::fmt::Debug for Checked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checked")
            .field("policy_version", &self.snap.policy.version)
            .finish_non_exhaustive()
    }
}

/// Validate `cfg` and load everything it points to (certificates, keys, the JWKS, the policy),
/// without binding a port or touching the audit trail.
pub async fn check(cfg: &Config) -> Result<Checked, StartError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut errs = Vec::new();
    if let Err(e) = cfg.validate() {
        errs.extend(e);
        return Err(StartError(errs));
    }
    let tls_files = cfg.tls.files();
    let server_tls = tls::server_config(&tls_files)
        .map_err(|e| errs.push(format!("tls: {e}")))
        .ok();
    let tokens = match (cfg.jwt.source(), cfg.jwt.settings()) {
        (Ok(src), Ok(settings)) => TokenVerifier::new(src, settings)
            .await
            .map_err(|e| errs.push(format!("jwt: {e}")))
            .ok()
            .map(Arc::new),
        (a, b) => {
            errs.extend(a.err().into_iter().chain(b.err()));
            None
        }
    };
    let policy = Policy::load(&cfg.policy)
        .map_err(|e| {
            for pe in e.0 {
                errs.push(format!("policy {}: {pe}", cfg.policy.display()));
            }
        })
        .ok();
    let up = UpstreamTls::load(&cfg.upstream, cfg.limits.max_message_bytes)
        .map_err(|e| errs.push(format!("upstream: {e}")))
        .ok();
    if let Some(c) = &cfg.console
        && let Err(e) = crate::console::tls_config(
            c.cert.as_deref().unwrap_or(&cfg.tls.cert),
            c.key.as_deref().unwrap_or(&cfg.tls.key),
            c.officer_ca.as_deref().unwrap_or(&cfg.tls.client_ca),
        )
    {
        errs.push(format!("console: {e}"));
    }
    let mask_key = match &cfg.pseudonym_key_file {
        None => MaskKey::none(),
        Some(p) => MaskKey::load(p).unwrap_or_else(|e| {
            errs.push(format!("pseudonym_key_file: {e}"));
            MaskKey::none()
        }),
    };
    let page_seal = match &cfg.page_token_key_file {
        None => crate::pipeline::paging::PageSeal::random(),
        Some(p) => std::fs::read(p)
            .map_err(|e| e.to_string())
            .and_then(|b| crate::pipeline::paging::PageSeal::from_key(&b))
            .unwrap_or_else(|e| {
                errs.push(format!("page_token_key_file {}: {e}", p.display()));
                crate::pipeline::paging::PageSeal::random()
            }),
    };
    if policy.as_ref().is_some_and(|p| p.uses_hash_mask()) && !mask_key.is_set() {
        errs.push(
            "the policy uses `hash` masks: set `pseudonym_key_file` to the bureau's key".into(),
        );
    }
    let (Some(server_tls), Some(tokens), Some(policy), Some(up)) = (server_tls, tokens, policy, up)
    else {
        return Err(StartError(errs));
    };
    if !errs.is_empty() {
        return Err(StartError(errs));
    }
    let keys = audit::AuditKeys::load(
        &cfg.audit.signing_key_file,
        cfg.audit.subject_key_file.as_deref(),
    )
    .map_err(|e| StartError(vec![format!("audit: {e}")]))?;
    let snap = Snapshot::build(Arc::new(policy), &up, None).map_err(|e| StartError(vec![e]))?;
    Ok(Checked {
        tls_files,
        server_tls,
        tokens,
        snap,
        up,
        mask_key,
        page_seal,
        keys,
    })
}

/// Build everything from `cfg`, bind, and start serving in the background: check ▸ bind ▸
/// build the gateway ▸ spawn its helpers (probes, watchers, admin) ▸ serve. [`Running::stop`]
/// undoes it in shutdown order ([`stop_in_order`]).
pub async fn start(cfg: &Config) -> Result<Running, StartError> {
    // Idempotent: tests and the binary may both call this.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The metrics recorder must exist before anything counts.
    let _ = admin::metrics_handle();
    // 1. Everything that can be wrong with the config, all at once, before anything binds.
    let Checked {
        tls_files,
        server_tls,
        tokens,
        snap,
        up,
        mask_key,
        page_seal,
        keys,
    } = check(cfg).await?;
    let policy_version = snap.policy.version.to_string();
    // 2. The port, then the audit trail (its lock says who else writes it).
    let listener = bind(cfg.listen, cfg.listen_reuse_port)
        .map_err(|e| StartError(vec![format!("listen {}: {e}", cfg.listen)]))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError(vec![format!("listen: {e}")]))?;
    let shipped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut settings = cfg.audit.settings();
    if cfg.audit.ship.is_some() {
        settings.store.shipped = Some(shipped.clone());
    }
    let (audit_log, writer) = audit::start(settings, keys)
        .map_err(|e| StartError(vec![format!("audit.dir {}: {e}", cfg.audit.dir.display())]))?;
    let audit_path = writer.dir.clone();
    // 2b. Shipping to the province trail, behind the writer.
    let shipping = match &cfg.audit.ship {
        None => None,
        Some(sh) => {
            let password = sh.password().map_err(|e| StartError(vec![e]))?;
            let settings = audit::ship::ShipSettings {
                url: sh.url.clone(),
                password,
                replica: sh.replica(),
                batch_records: sh.batch_records.max(1),
                interval: Duration::from_millis(sh.interval_ms.max(10)),
            };
            let state = Arc::new(audit::ship::ShipState {
                durable: writer.durable.clone(),
                shipped: shipped.clone(),
                replica: settings.replica.clone(),
                ..Default::default()
            });
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(audit::ship::run(
                audit_path.clone(),
                settings,
                state.clone(),
                stopped,
            ));
            Some((state, stop, task))
        }
    };
    // 3. The gateway.
    let revocations: tls::Revocations = Arc::new(arc_swap::ArcSwap::from_pointee(
        tls::revoked_serials(&tls_files).map_err(|e| StartError(vec![format!("tls.crls: {e}")]))?,
    ));
    let jwks_refresher = tokens.spawn_refresher();
    let gateway = build_gateway(
        cfg,
        snap,
        tokens,
        (audit_log.clone(), shipping.as_ref().map(|s| s.0.clone())),
        &mask_key,
        page_seal,
        revocations.clone(),
    )
    .await?;
    // 4. What runs beside it: limiter sweeps, provider probes, live reload, the admin port.
    let sweeper = spawn_sweeper(gateway.clone());
    // Counters a dashboard alerts on exist from the start (at zero), not from their first event.
    for result in ["ok", "error"] {
        metrics::counter!("xgate_policy_reloads_total", "result" => result).increment(0);
    }
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for s in std::iter::once("").chain(crate::serve::health::SERVICES) {
        health_reporter
            .set_service_status(s, tonic_health::ServingStatus::NotServing)
            .await;
    }
    let prober = crate::serve::health::spawn_prober(
        gateway.downgrade(),
        health_reporter,
        cfg.upstream.health_check,
    );
    // Providers found by DNS: re-resolved while the gateway lives.
    let resolver = {
        let weak = gateway.downgrade();
        tokio::spawn(crate::upstream::dns::run(move || {
            weak.upgrade().map(|g| g.snapshot().upstreams.by_dns())
        }))
    };
    let reloader = Arc::new(Reloader::new(&cfg.policy, gateway.clone(), up, &mask_key));
    let live_tls: tls::LiveServerConfig = Arc::new(arc_swap::ArcSwap::new(server_tls));
    let watchers = spawn_watchers(cfg, &tls_files, &live_tls, &revocations, &reloader)?;
    let (admin_addr, admin_stop) = spawn_admin(cfg, &gateway).await?;
    let (console_addr, console_stop) = spawn_console(cfg, &reloader, &gateway).await?;
    // 5. Serve: TLS ▸ HTTP/2 ▸ edge ▸ the gRPC services.
    // Refusals anyone on the network can cause (handshakes, oversized metadata): one
    // rate-limited recorder.
    let refusals = Arc::new(audit::Refusals::new(audit_log.clone()));
    let edge = crate::pipeline::edge::EdgeLayer::new(
        audit_log,
        gateway.downgrade(),
        refusals.clone(),
        cfg.limits.max_metadata_bytes,
    );
    // Outermost: the metadata limit, and refusals tonic makes before the pipeline runs get
    // xgate's reasons and an audit record.
    let svc = tower::ServiceBuilder::new()
        .layer(edge)
        .service(grpc_routes(cfg, &gateway, health_service)?);
    let incoming = tls::incoming(
        listener,
        live_tls,
        Arc::from(cfg.trust_domain.as_str()),
        Arc::new(cfg.tls.identity_map()),
        Duration::from_millis(cfg.tls.handshake_timeout_ms),
        refusals.clone(),
        Arc::new(cfg.tls.proxy_protocol_from.clone()),
    );
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (drain_tx, drain_rx) = oneshot::channel::<()>();
    let serve =
        crate::serve::conn::serve(incoming, svc, conn_settings(cfg), refusals, async move {
            let _ = stop_rx.await;
            let _ = drain_tx.send(());
            tracing::info!("shutting down: no new connections; draining in-flight calls");
        });
    let task = tokio::spawn(stop_in_order(
        serve,
        drain_rx,
        cfg.drain_timeout(),
        Background {
            gateway,
            jwks_refresher,
            admin_stop,
            console_stop,
            watchers,
            sweeper,
            prober,
            resolver,
            writer,
            shipper: shipping.map(|(_, stop, task)| (stop, task)),
        },
    ));
    tracing::info!(%addr, %policy_version, "xgate listening");
    Ok(Running {
        addr,
        admin_addr,
        console_addr,
        reloader,
        policy_version,
        audit_path,
        shutdown: stop_tx,
        task,
    })
}

/// The gRPC port, as `TcpListener::bind` makes it (`SO_REUSEADDR`, a backlog of 1024), and
/// with `SO_REUSEPORT` when asked ([`Config::listen_reuse_port`]).
fn bind(addr: std::net::SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// The gateway with its optional parts from the config (and Redis given a moment, so the
/// first calls are decided by it; if it is down, `on_unavailable` decides until it is back).
async fn build_gateway(
    cfg: &Config,
    snap: Snapshot,
    tokens: Arc<TokenVerifier>,
    (audit_log, shipping): (audit::AuditLog, Option<Arc<audit::ship::ShipState>>),
    mask_key: &MaskKey,
    page_seal: crate::pipeline::paging::PageSeal,
    revocations: tls::Revocations,
) -> Result<Gateway, StartError> {
    let mut gateway = Gateway::builder(
        snap,
        tokens,
        audit_log,
        cfg.limits.clone(),
        Duration::from_millis(cfg.upstream.max_timeout_ms),
        mask_key.clone(),
    )
    .revocations(revocations)
    .auth_failures(
        cfg.jwt.auth_failures_per_second,
        cfg.jwt.auth_failures_burst,
    )
    .page_seal(page_seal)
    .quotas(crate::limits::Quotas::new(
        crate::limits::zone_offset(&cfg.limits.quota_timezone).unwrap_or(8 * 3600),
    ));
    if let Some(sh) = &cfg.limits.shared {
        let shared =
            crate::limits::shared::SharedLimits::new(sh).map_err(|e| StartError(vec![e]))?;
        if !shared.wait_up(Duration::from_secs(2)).await {
            tracing::warn!(on_unavailable = ?sh.on_unavailable, "shared limits: Redis not reachable at start");
        }
        gateway = gateway.shared_limits(shared);
    }
    if let Some(s) = shipping {
        gateway = gateway.shipping(s);
    }
    // "Who looked at my data" reads the province trail when there is one.
    gateway = gateway.trail(&cfg.audit.dir);
    gateway = gateway.usage_source(match &cfg.audit.ship {
        Some(sh) => crate::pipeline::usage::UsageSource::Db {
            url: sh.url.clone(),
            password: sh.password().map_err(|e| StartError(vec![e]))?,
            pool: tokio::sync::OnceCell::new(),
        },
        None => crate::pipeline::usage::UsageSource::Local,
    });
    Ok(gateway.build())
}

/// Idle keys of the default limiter are forgotten every minute to bound memory.
fn spawn_sweeper(gateway: Gateway) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(60));
        loop {
            t.tick().await;
            gateway.retain_recent();
        }
    })
}

/// The gRPC services: data and catalogue (gzip requests taken; answers uncompressed: that
/// would cost more CPU than the links between departments save), the standard health
/// service and server reflection (so `grpcurl` needs no proto files), all behind the same
/// mTLS.
fn grpc_routes(
    cfg: &Config,
    gateway: &Gateway,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> Result<routes::GrpcRoutes, StartError> {
    let max_msg = cfg.limits.max_message_bytes;
    let gzip = tonic::codec::CompressionEncoding::Gzip;
    let data = crate::wire::data_exchange_server::DataExchangeServer::new(gateway.clone())
        .accept_compressed(gzip)
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let catalog = pb::catalog_server::CatalogServer::new(gateway.clone())
        .accept_compressed(gzip)
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    let reflection_err =
        |e: tonic_reflection::server::Error| StartError(vec![format!("reflection: {e}")]);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(reflection_err)?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(reflection_err)?;
    let usage = pb::usage_server::UsageServer::new(gateway.clone())
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(max_msg);
    // Health and reflection through tonic's router; the departments' services directly.
    let rest = tonic::service::Routes::new(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .prepare();
    Ok(routes::GrpcRoutes::new(data, catalog, usage, rest))
}

/// The HTTP/2 limits of the gRPC port.
fn conn_settings(cfg: &Config) -> crate::serve::conn::Settings {
    crate::serve::conn::Settings {
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
        // Bounded per-connection concurrency, and h2's rapid-reset defence made explicit.
        max_concurrent_streams: 256,
        max_pending_accept_reset_streams: 64,
        max_metadata_hard_bytes: cfg.limits.max_metadata_hard_bytes,
        preface_timeout: Duration::from_millis(cfg.tls.handshake_timeout_ms),
        idle_timeout: Duration::from_secs(cfg.limits.connection_idle_secs),
    }
}

/// Live changes: the policy file (watched), SIGHUP, and certificate rotation (server
/// certificate and key, client CA, CRLs and the upstream client certificate reload when
/// their files change; established connections keep theirs).
/// Held for their `Drop`: a watcher stops when dropped.
struct Watchers {
    _policy: Option<notify::RecommendedWatcher>,
    _tls: Option<notify::RecommendedWatcher>,
    #[cfg(unix)]
    sighup: Option<JoinHandle<()>>,
}

fn spawn_watchers(
    cfg: &Config,
    tls_files: &tls::ServerTlsFiles,
    live_tls: &tls::LiveServerConfig,
    revocations: &tls::Revocations,
    reloader: &Arc<Reloader>,
) -> Result<Watchers, StartError> {
    let tls = if cfg.tls.watch {
        let (files, live, r) = (tls_files.clone(), live_tls.clone(), reloader.clone());
        let revoked = revocations.clone();
        let up_cfg = cfg.upstream.clone();
        let max_msg = cfg.limits.max_message_bytes;
        let mut paths = files.paths();
        paths.extend([up_cfg.ca.clone(), up_cfg.cert.clone(), up_cfg.key.clone()]);
        let upstream_digest =
            std::sync::Mutex::new(files_digest(&[&up_cfg.ca, &up_cfg.cert, &up_cfg.key]));
        Some(
            reload::watch_paths(paths, "certificates", move || {
                rotate_tls(
                    &files,
                    &live,
                    &revoked,
                    &r,
                    &up_cfg,
                    max_msg,
                    &upstream_digest,
                );
            })
            .map_err(|e| StartError(vec![e]))?,
        )
    } else {
        None
    };
    let policy = if cfg.watch_policy {
        Some(reload::watch_file(reloader.clone()).map_err(|e| StartError(vec![e]))?)
    } else {
        None
    };
    Ok(Watchers {
        _policy: policy,
        _tls: tls,
        #[cfg(unix)]
        sighup: reload::on_sighup(reloader.clone()).ok(),
    })
}

/// The admin endpoint (`admin_listen`), if configured: its address, and what stops it.
async fn spawn_admin(
    cfg: &Config,
    gateway: &Gateway,
) -> Result<(Option<SocketAddr>, oneshot::Sender<()>), StartError> {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let Some(a) = cfg.admin_listen else {
        return Ok((None, stop_tx));
    };
    let (l, bound) = admin::bind(a)
        .await
        .map_err(|e| StartError(vec![format!("admin_listen {a}: {e}")]))?;
    let g = gateway.downgrade();
    tokio::spawn(async move {
        let stop = async move {
            let _ = stop_rx.await;
        };
        if let Err(e) = admin::serve(l, g, stop).await {
            tracing::error!(error = %e, "admin endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "admin endpoint listening");
    Ok((Some(bound), stop_tx))
}

/// The console (`console.listen`, HTTPS), if configured: its address, and what stops it.
async fn spawn_console(
    cfg: &Config,
    reloader: &Arc<Reloader>,
    gateway: &Gateway,
) -> Result<(Option<SocketAddr>, oneshot::Sender<()>), StartError> {
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let Some(c) = &cfg.console else {
        return Ok((None, stop_tx));
    };
    let tls = crate::console::tls_config(
        c.cert.as_deref().unwrap_or(&cfg.tls.cert),
        c.key.as_deref().unwrap_or(&cfg.tls.key),
        c.officer_ca.as_deref().unwrap_or(&cfg.tls.client_ca),
    )
    .map_err(|e| StartError(vec![format!("console: {e}")]))?;
    let state = crate::console::ConsoleState::new(gateway.downgrade(), reloader.clone(), cfg, c)
        .map_err(StartError)?;
    let (l, bound) = crate::console::bind(c.listen)
        .await
        .map_err(|e| StartError(vec![format!("console.listen {}: {e}", c.listen)]))?;
    let warm = (state.clone(), gateway.snapshot().policy.clone());
    tokio::spawn(crate::console::serve(l, tls, state, async move {
        let _ = stop_rx.await;
    }));
    tracing::info!(addr = %bound, "console listening (https)");
    // Index the trail and compute this month's league table now, in the background, so the
    // first page that needs them does not wait for the whole trail.
    tokio::task::spawn_blocking(move || crate::console::warm_up(&warm.0, &warm.1));
    Ok((Some(bound), stop_tx))
}

/// What runs beside the server, stopped after it.
struct Background {
    gateway: Gateway,
    jwks_refresher: JoinHandle<()>,
    admin_stop: oneshot::Sender<()>,
    console_stop: oneshot::Sender<()>,
    watchers: Watchers,
    sweeper: JoinHandle<()>,
    prober: JoinHandle<()>,
    resolver: JoinHandle<()>,
    writer: audit::AuditWriter,
    /// The shipper's stop signal and task (`audit.ship`).
    shipper: Option<(tokio::sync::watch::Sender<bool>, JoinHandle<()>)>,
}

/// Serve until stopped, then shut down in order: no new connections; in-flight calls get the
/// drain timeout (then are cut, and their replies a moment to leave); the helpers stop; the
/// server and its services are dropped, and with them the last audit senders; the audit
/// writer drains, checkpoints and fsyncs. Returns the records written.
async fn stop_in_order(
    serve: impl std::future::Future<Output = ()>,
    drain_rx: oneshot::Receiver<()>,
    drain: Duration,
    bg: Background,
) -> Result<u64, String> {
    // Boxed so that dropping it below really drops the services (and their audit senders).
    let mut serve = Box::pin(serve);
    let served = tokio::select! {
        r = &mut serve => Some(r),
        _ = drain_rx => None,
    };
    if served.is_none() && tokio::time::timeout(drain, &mut serve).await.is_err() {
        tracing::warn!(?drain, "drain timeout: ending the calls still in flight");
        bg.gateway.cut_in_flight();
        // The cut calls answer at once; give their replies a moment to leave.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut serve).await;
    }
    let Background {
        gateway,
        jwks_refresher,
        admin_stop,
        console_stop,
        watchers,
        sweeper,
        prober,
        resolver,
        writer,
        shipper,
    } = bg;
    drop(gateway);
    jwks_refresher.abort();
    let _ = admin_stop.send(());
    let _ = console_stop.send(());
    #[cfg(unix)]
    if let Some(h) = &watchers.sighup {
        h.abort();
    }
    drop(watchers);
    // Dropping the server drops its connections and services, and with them the audit
    // senders.
    drop(serve);
    sweeper.abort();
    let _ = sweeper.await;
    prober.abort();
    resolver.abort();
    let written = writer
        .join()
        .await
        .map_err(|e| format!("audit writer: {e}"))?;
    tracing::info!(records = written, "audit trail flushed and synced");
    // Ship what the last records made durable (bounded: the database may be down; the local
    // trail has them, and the next start ships them).
    if let Some((stop, task)) = shipper {
        let _ = stop.send(true);
        if tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .is_err()
        {
            tracing::warn!(
                "audit shipping did not catch up before exit; the next start resumes it"
            );
        }
    }
    Ok(written)
}
