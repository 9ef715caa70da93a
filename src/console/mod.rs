//! The bureau's console and the authenticated admin API, served by the gateway itself over
//! HTTPS (`console.listen`).
//!
//! A request goes, top-down:
//! 1. TLS ([`serve`]): the officer's client certificate, verified against `console.officer_ca`,
//!    is put on the request ([`auth::PeerCert`]);
//!    (an officer without one signs in with the province's IdP first, [`oidc`]: that opens a
//!    session bound to no certificate);
//! 2. [`guard`]: the session, or certificate → officer → session (opened on first use) → the role may use
//!    this route ([`auth::may`]) → a state-changing request carries the CSRF token; every
//!    refusal is a page with the reason and an audit record;
//! 3. the page or API handler ([`pages`], [`api`]), server-side rendered from named `.html`
//!    templates (auto-escaped), no inline script;
//! 4. every answer is recorded on the audit trail (`console.http`: who, what, the status),
//!    and carries the security headers ([`security_headers`]).
//!
//! Not here: the probes and Prometheus (`/live`, `/ready`, `/metrics` stay on the plain
//! `admin_listen` port, [`crate::serve::admin`]); the evaluation itself (pages call
//! [`crate::policy::eval`], the gateway's own).

pub mod api;
pub mod auth;
pub mod i18n;
pub mod oidc;
pub mod pages;
pub mod proposals;
pub(crate) mod templates;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use time::UtcOffset;

use crate::{pipeline::WeakGateway, serve::reload::Reloader};
use auth::{Officers, PeerCert, Session, Sessions};
use i18n::Lang;

/// The league tables computed, by period: when, for which policy version, and whether a
/// newer one is being computed.
#[derive(Default)]
pub(crate) struct ReportCache {
    pub(crate) tables: std::collections::HashMap<
        String,
        (
            std::time::Instant,
            String,
            Arc<crate::tools::report::Report>,
        ),
    >,
    pub(crate) refreshing: std::collections::HashSet<String>,
}

/// What every console handler shares.
#[derive(Clone)]
pub struct ConsoleState {
    pub gateway: WeakGateway,
    pub reloader: Arc<Reloader>,
    pub officers: Arc<Officers>,
    pub sessions: Arc<Sessions>,
    /// Sign-in with the province's IdP, where `console.oidc` is configured.
    pub oidc: Option<Arc<oidc::Oidc>>,
    pub templates: Arc<minijinja::Environment<'static>>,
    /// The province's zone: every date shown is in it.
    pub zone: UtcOffset,
    pub default_lang: Lang,
    /// The local trail, indexed (the league table reads it; audit search and the preview do
    /// when there is no province database).
    pub trail: Arc<crate::audit::index::TrailIndex>,
    /// The policy file (the change preview compares the candidate with it).
    pub policy_path: std::path::PathBuf,
    /// Whether a proposal approved by a second bureau officer may replace the policy file.
    pub policy_managed: bool,
    pub proposals: Arc<proposals::Proposals>,
    /// The last league table computed (period, policy version), reused for a minute.
    pub(crate) reports: Arc<std::sync::Mutex<ReportCache>>,
    /// The rate of refusal records for callers not signed in, and the count past it.
    refusals: Arc<(
        governor::DefaultDirectRateLimiter,
        std::sync::atomic::AtomicU64,
    )>,
}

impl ConsoleState {
    pub fn new(
        gateway: WeakGateway,
        reloader: Arc<Reloader>,
        cfg: &crate::config::Config,
        console: &crate::config::Console,
    ) -> Result<ConsoleState, Vec<String>> {
        let officers = Officers::new(&console.officers)?;
        let oidc = console
            .oidc
            .as_ref()
            .map(oidc::Oidc::new)
            .transpose()?
            .map(Arc::new);
        let zone = crate::tools::report::parse_zone(&cfg.limits.quota_timezone)
            .map_err(|e| vec![format!("limits.quota_timezone: {e}")])?;
        let default_lang = Lang::parse(&console.lang)
            .ok_or_else(|| vec![format!("console.lang `{}`: zh-CN or en", console.lang)])?;
        let gateway_now = gateway.upgrade();
        Ok(ConsoleState {
            gateway,
            reloader,
            officers: Arc::new(officers),
            oidc,
            sessions: Arc::new(Sessions::new(Duration::from_secs(
                console.session_idle_minutes.max(1) * 60,
            ))),
            templates: Arc::new(templates::environment()),
            zone,
            default_lang,
            trail: gateway_now
                .map(|g| g.trail_index())
                .unwrap_or_else(|| Arc::new(crate::audit::index::TrailIndex::new(&cfg.audit.dir))),
            policy_path: cfg.policy.clone(),
            policy_managed: console.policy_managed,
            proposals: proposals::new(),
            reports: Arc::default(),
            refusals: Arc::new((
                governor::RateLimiter::direct(
                    governor::Quota::per_second(crate::limits::nonzero(20))
                        .allow_burst(crate::limits::nonzero(100)),
                ),
                std::sync::atomic::AtomicU64::new(0),
            )),
        })
    }
}

/// Read the trail into its index and compute this month's league table (the department
/// pages show its rows): what the console does when it starts, in the background, so the
/// first page that needs them does not wait for the whole trail. Blocking.
pub fn warm_up(state: &ConsoleState, policy: &Arc<crate::policy::Policy>) {
    let t0 = std::time::Instant::now();
    match state.trail.view() {
        Ok(v) => tracing::info!(
            records = v.len(),
            ms = t0.elapsed().as_millis() as u64,
            "console: trail indexed"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "console: the trail could not be indexed");
            return;
        }
    }
    let _ = pages::compute_report(state, policy, crate::tools::report::Period::Month);
}

/// The whole console as a router: pages, the admin API, the static files, behind the guard.
/// (The TLS layer is [`serve`]'s; tests call this with a [`PeerCert`] of their choosing.)
pub fn app(state: ConsoleState) -> Router {
    let guarded = Router::new()
        .route("/", get(pages::home))
        .route("/overview", get(pages::overview))
        .route("/catalogue", get(pages::catalogue))
        .route("/departments/{id}", get(pages::department))
        .route("/explain", get(pages::explain))
        .route("/preview", get(pages::preview_form).post(pages::preview))
        .route("/audit", get(pages::audit))
        .route("/audit/export.csv", get(pages::audit_csv))
        .route("/league", get(pages::league))
        .route("/proposals", get(proposals::list).post(proposals::propose))
        .route("/proposals/{id}/approve", post(proposals::approve))
        .route("/proposals/{id}/withdraw", post(proposals::withdraw))
        .route("/lang", post(pages::set_lang))
        .route("/signout", post(pages::signout))
        .route("/admin/policy", get(api::policy_status))
        .route("/admin/policy/reload", post(api::policy_reload))
        .route("/admin/audit/search", get(api::audit_search))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM));
    Router::new()
        .route("/static/console.css", get(templates::css))
        .route("/static/console.js", get(templates::js))
        // (Outside the guard: these are how an officer without a certificate signs in.)
        .route("/signin/oidc", get(pages::signin::begin))
        .route("/signin/oidc/callback", get(pages::signin::callback))
        .merge(guarded)
        // (Outside the guard: an unknown path says 404 to anyone, signed in or not.)
        .fallback(pages::not_found)
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

/// The most a form (a candidate policy) may be.
const MAX_FORM: usize = 4 << 20;

/// Who the request is from, and whether they may do this (see the module docs).
async fn guard(State(s): State<ConsoleState>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<PeerCert>()
        .cloned()
        .unwrap_or_default();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // (The path is the caller's: bounded before it goes anywhere.)
    let what = format!("{method} {}", truncate(&path, 200));
    let from = peer.addr.map(|a| format!(" from {a}")).unwrap_or_default();
    let lang = s.default_lang;
    // A session is bound to the connection's certificate, or (none) to the IdP sign-in.
    let binding = peer
        .fingerprint
        .clone()
        .unwrap_or_else(|| oidc::OIDC_BINDING.to_owned());
    let cookie_id = auth::session_id(req.headers());
    let had_cookie = cookie_id.is_some();
    let existing = cookie_id.and_then(|id| s.sessions.get(&id, &binding));
    // An API client (no cookie, `x-requested-by`) is signed in per request: no session kept.
    let api_client = !had_cookie && req.headers().contains_key("x-requested-by");
    let (session, opened) = match (existing, peer.fingerprint.clone(), peer.subject.clone()) {
        (Some(x), _, _) => (x, false),
        (None, Some(fingerprint), Some(subject)) => {
            let Some(officer) = s.officers.get(&subject, &fingerprint).cloned() else {
                s.record_refusal(
                    &format!("certificate {subject} ({fingerprint}){from}"),
                    format!("{what} -> 403: not a console officer"),
                );
                return pages::refusal(&s, lang, StatusCode::FORBIDDEN, "not_officer");
            };
            if api_client {
                let t = auth::Session::transient(officer, fingerprint, s.default_lang);
                (t, false)
            } else {
                (s.sessions.open(officer, fingerprint, s.default_lang), true)
            }
        }
        _ => {
            s.record_refusal(
                &format!("no certificate{from}"),
                format!("{what} -> 401: no officer certificate or session"),
            );
            return pages::refusal(&s, lang, StatusCode::UNAUTHORIZED, "unauthenticated_why");
        }
    };
    let actor = actor(&session, &from);
    if opened {
        s.record(
            "console.signin",
            &actor,
            true,
            format!("signed in as {}", session.officer.role.as_str()),
        );
    }
    let with_cookie = |mut r: Response| {
        if opened && let Ok(v) = HeaderValue::from_str(&auth::cookie(&session.id)) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
        r
    };
    if !auth::may(session.officer.role, &method, &path) {
        s.record(
            "console.denied",
            &actor,
            false,
            format!(
                "{what} -> 403: role {} may not",
                session.officer.role.as_str()
            ),
        );
        return with_cookie(pages::refusal(
            &s,
            session.lang,
            StatusCode::FORBIDDEN,
            "forbidden_why",
        ));
    }
    // A state-changing request must prove it came from the console's own page.
    let req = if method == Method::GET || method == Method::HEAD {
        req
    } else {
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
            s.record(
                "console.denied",
                &actor,
                false,
                format!("{what} -> 413: form too large"),
            );
            return with_cookie(
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the form is larger than 4 MiB\n",
                )
                    .into_response(),
            );
        };
        let token = form_field(&parts.headers, &bytes, "csrf");
        let live = if opened { None } else { Some(&session) };
        if !auth::csrf_ok(&parts.headers, live, token.as_deref(), had_cookie) {
            s.record(
                "console.denied",
                &actor,
                false,
                format!("{what} -> 403: no valid CSRF token"),
            );
            return with_cookie(pages::refusal(
                &s,
                session.lang,
                StatusCode::FORBIDDEN,
                "session_expired",
            ));
        }
        Request::from_parts(parts, axum::body::Body::from(bytes))
    };
    let mut req = req;
    req.extensions_mut().insert(session.clone());
    req.extensions_mut().insert(Actor(actor.clone()));
    let resp = next.run(req).await;
    let status = resp.status();
    s.record(
        "console.http",
        &actor,
        status.is_success() || status.is_redirection(),
        format!("{what} -> {}", status.as_u16()),
    );
    with_cookie(resp)
}

/// How the trail names the officer behind a request.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

fn actor(s: &Session, from: &str) -> String {
    let how = if s.fingerprint == oidc::OIDC_BINDING {
        format!("IdP {}", s.officer.oidc.as_deref().unwrap_or(""))
    } else {
        format!("certificate {}", s.officer.subject)
    };
    format!(
        "officer {} ({}, {how}){from}",
        s.officer.name,
        s.officer.role.as_str(),
    )
}

/// A field of an urlencoded form body.
fn form_field(headers: &axum::http::HeaderMap, body: &[u8], name: &str) -> Option<String> {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return None;
    }
    form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl ConsoleState {
    /// A refusal of someone not signed in (anyone on the network can cause one): recorded up
    /// to 20 a second (bursts of 100); past that counted, and the count added to the next one
    /// recorded. The trail cannot be flooded through the console.
    fn record_refusal(&self, actor: &str, detail: String) {
        use std::sync::atomic::Ordering;
        if self.refusals.0.check().is_err() {
            self.refusals.1.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let n = self.refusals.1.swap(0, Ordering::Relaxed);
        let detail = if n > 0 {
            format!(
                "{detail} (+{n} similar refusals since the last record, not recorded one by one)"
            )
        } else {
            detail
        };
        self.record("console.denied", actor, false, detail);
    }

    /// An admin record on the gateway's trail.
    fn record(&self, action: &str, actor: &str, done: bool, detail: String) {
        if let Some(gw) = self.gateway.upgrade() {
            gw.record_admin(crate::audit::admin_record(
                action,
                actor,
                done,
                Some(detail),
            ));
        }
    }
}

/// Headers on every answer: a Content-Security-Policy with no inline script, no framing,
/// no sniffing, no referrer, HTTPS only, and pages not cached.
async fn security_headers(req: Request, next: Next) -> Response {
    let is_static = req.uri().path().starts_with("/static/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-frame-options", "DENY");
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "no-referrer");
    set(h, "strict-transport-security", "max-age=31536000");
    set(h, "cross-origin-opener-policy", "same-origin");
    if !is_static {
        set(h, "cache-control", "no-store");
    }
    resp
}

/// Serve the console on `listener` with `tls` (officers' certificates requested, verified
/// when given) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: ConsoleState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use tower::ServiceExt;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let app = app(state);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "console accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let (acceptor, app, mut stop) = (acceptor.clone(), app.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    _ => return,
                };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|der| PeerCert::from_der(der, Some(addr)))
                .unwrap_or(PeerCert {
                    addr: Some(addr),
                    ..PeerCert::default()
                });
            let svc = app.map_request(move |mut r: Request<hyper::body::Incoming>| {
                r.extensions_mut().insert(peer.clone());
                r
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(
                    hyper_util::rt::TokioIo::new(tls),
                    hyper_util::service::TowerToHyperService::new(svc),
                );
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
}

/// The console's TLS: the server certificate, and officers' certificates requested and, when
/// given, verified against `officer_ca` (a browser without one gets the 401 page, not a
/// handshake error).
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
    officer_ca: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::tls::load_certs(officer_ca).map_err(|e| e.to_string())? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", officer_ca.display()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("{}: {e}", officer_ca.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_client_cert_verifier(verifier)
    .with_single_cert(
        crate::tls::load_certs(cert).map_err(|e| e.to_string())?,
        crate::tls::load_key(key).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", key.display()))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Bind the console's address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(addr).await?;
    let a = l.local_addr()?;
    Ok((l, a))
}
