//! Who is signed in to the console, and what they may do.
//!
//! - **Sign-in** is the officer's client certificate (from the government CA configured as
//!   `console.officer_ca`): the TLS layer verifies it, [`Officers`] maps its subject CN to an
//!   officer with a role. No certificate → 401, a certificate of no officer → 403.
//! - **Sessions** bind a random id (cookie `__Host-xgate_session`: `Secure; HttpOnly;
//!   SameSite=Strict; Path=/`) to the certificate's fingerprint: a cookie presented over a
//!   connection with another certificate is worthless. Idle sessions expire.
//! - **CSRF**: every state-changing request carries the session's token (a form's hidden
//!   `csrf` field, or the `x-csrf-token` header); an API client with no session sends
//!   `x-requested-by` instead (a header no cross-site form can set).
//! - **Roles** ([`may`]): one table of which role may use which route.
//!
//! Not here: what a page shows (each page filters what a department administrator sees).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// What an officer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The data bureau: everything.
    Bureau,
    /// A department's data administrator: its own datasets, the grants on them, its own
    /// grants, its calls.
    DeptAdmin,
    /// Audit search and subject look-ups.
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Bureau => "bureau",
            Role::DeptAdmin => "dept_admin",
            Role::Auditor => "auditor",
        }
    }
}

/// One officer of the console (`console.officers` in the config).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Officer {
    /// The name shown and written on the audit trail.
    pub name: String,
    /// The subject CN of the officer's certificate (empty: the officer signs in only with
    /// the IdP).
    #[serde(default)]
    pub subject: String,
    /// The officer's identity at the province's IdP (the value of `console.oidc.claim` in
    /// their ID token), when they may sign in there.
    #[serde(default)]
    pub oidc: Option<String>,
    pub role: Role,
    /// The department a `dept_admin` administers.
    #[serde(default)]
    pub department: Option<String>,
    /// `sha256:` + hex of the officer's certificate (DER): when set, only that certificate
    /// signs in as this officer, whatever else the CA issued with the same CN.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

impl Officer {
    /// What tells this officer apart from every other (a proposal's second approver must not
    /// be its first): the certificate subject, or the IdP identity for an officer with none.
    pub fn key(&self) -> String {
        match (&self.oidc, self.subject.is_empty()) {
            (Some(id), true) => format!("oidc:{id}"),
            _ => self.subject.clone(),
        }
    }
}

/// The configured officers, by certificate subject and by IdP identity.
#[derive(Debug, Default)]
pub struct Officers {
    by_subject: HashMap<String, Officer>,
    by_oidc: HashMap<String, Officer>,
}

impl Officers {
    /// Every problem with the list, or the map.
    pub fn new(list: &[Officer]) -> Result<Officers, Vec<String>> {
        let mut errs = Vec::new();
        let mut map = HashMap::new();
        let mut by_oidc = HashMap::new();
        let mut names = std::collections::HashSet::new();
        for (i, o) in list.iter().enumerate() {
            let at = format!("console.officers[{i}] ({})", o.key());
            match (o.role, &o.department) {
                (Role::DeptAdmin, None) => errs.push(format!(
                    "{at}: a dept_admin needs `department` (the one it administers)"
                )),
                (Role::Bureau | Role::Auditor, Some(_)) => {
                    errs.push(format!("{at}: only a dept_admin has a `department`"))
                }
                _ => {}
            }
            if !names.insert(o.name.trim()) || o.name.trim().is_empty() {
                errs.push(format!(
                    "{at}: `name` empty or given twice (the trail names officers by it)"
                ));
            }
            let oidc = o.oidc.as_deref().map(str::trim);
            match (o.subject.trim().is_empty(), oidc) {
                (true, None) => errs.push(format!(
                    "{at}: neither `subject` (the certificate's CN) nor `oidc` (the IdP identity)"
                )),
                (_, Some("")) => errs.push(format!("{at}: `oidc` is empty")),
                _ => {}
            }
            if !o.subject.is_empty() && map.insert(o.subject.clone(), o.clone()).is_some() {
                errs.push(format!("{at}: the same certificate subject twice"));
            }
            if let Some(id) = &o.oidc
                && by_oidc.insert(id.clone(), o.clone()).is_some()
            {
                errs.push(format!("{at}: the same IdP identity twice"));
            }
        }
        if errs.is_empty() {
            Ok(Officers {
                by_subject: map,
                by_oidc,
            })
        } else {
            Err(errs)
        }
    }

    /// The officer a certificate with this CN and fingerprint signs in as.
    pub fn get(&self, subject: &str, fingerprint: &str) -> Option<&Officer> {
        self.by_subject.get(subject).filter(|o| {
            o.fingerprint
                .as_deref()
                .is_none_or(|f| f.eq_ignore_ascii_case(fingerprint))
        })
    }

    /// The officer the IdP identity `id` signs in as.
    pub fn by_oidc(&self, id: &str) -> Option<&Officer> {
        self.by_oidc.get(id)
    }
}

/// The client certificate of the connection a request came on (the TLS layer puts it in the
/// request's extensions).
#[derive(Debug, Clone, Default)]
pub struct PeerCert {
    /// `sha256:` + hex of the certificate (DER).
    pub fingerprint: Option<String>,
    /// Its subject CN.
    pub subject: Option<String>,
    pub addr: Option<std::net::SocketAddr>,
}

impl PeerCert {
    /// From a verified certificate chain's leaf.
    pub fn from_der(der: &[u8], addr: Option<std::net::SocketAddr>) -> PeerCert {
        use sha2::Digest;
        let subject = x509_parser::parse_x509_certificate(der)
            .ok()
            .and_then(|(_, c)| {
                c.subject()
                    .iter_common_name()
                    .next()
                    .and_then(|cn| cn.as_str().ok().map(str::to_owned))
            });
        PeerCert {
            fingerprint: Some(format!("sha256:{}", hex::encode(sha2::Sha256::digest(der)))),
            subject,
            addr,
        }
    }
}

/// A signed-in officer's session.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub officer: Officer,
    /// The certificate the session was opened with, or [`super::oidc::OIDC_BINDING`] for a
    /// session opened by signing in with the IdP.
    pub fingerprint: String,
    pub csrf: String,
    pub lang: super::i18n::Lang,
    last_seen: Instant,
}

/// Sessions in memory (a replica's own: a console is one process's admin surface; behind a
/// load balancer, pin the console to one replica or sign in again).
#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    idle: Duration,
}

/// The session cookie's name (`__Host-`: the browser keeps it only if `Secure`, `Path=/` and
/// no `Domain`).
pub const COOKIE: &str = "__Host-xgate_session";

fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

impl Session {
    /// A session for one request of an API client (no cookie): not kept, no CSRF token.
    pub fn transient(officer: Officer, fingerprint: String, lang: super::i18n::Lang) -> Session {
        Session {
            id: String::new(),
            officer,
            fingerprint,
            csrf: String::new(),
            lang,
            last_seen: Instant::now(),
        }
    }
}

/// Sessions kept at most; past it, the longest idle goes.
const MAX_SESSIONS: usize = 10_000;

impl Sessions {
    pub fn new(idle: Duration) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            idle,
        }
    }

    /// The live session `id` opened with certificate `fingerprint`, its idle clock restarted.
    pub fn get(&self, id: &str, fingerprint: &str) -> Option<Session> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, s| now.duration_since(s.last_seen) < self.idle);
        let s = map.get_mut(id)?;
        if s.fingerprint != fingerprint {
            return None;
        }
        s.last_seen = now;
        Some(s.clone())
    }

    /// A new session for `officer` on certificate `fingerprint`.
    pub fn open(&self, officer: Officer, fingerprint: String, lang: super::i18n::Lang) -> Session {
        let s = Session {
            id: random_token(),
            officer,
            fingerprint,
            csrf: random_token(),
            lang,
            last_seen: Instant::now(),
        };
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        map.retain(|_, x| now.duration_since(x.last_seen) < self.idle);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, x)| x.last_seen)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(s.id.clone(), s.clone());
        s
    }

    pub fn set_lang(&self, id: &str, lang: super::i18n::Lang) {
        if let Some(s) = self
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(id)
        {
            s.lang = lang;
        }
    }

    pub fn close(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

/// The `Set-Cookie` value for a session.
pub fn cookie(id: &str) -> String {
    format!("{COOKIE}={id}; Secure; HttpOnly; SameSite=Strict; Path=/")
}

/// The `Set-Cookie` value that ends it in the browser.
pub fn expired_cookie() -> String {
    format!("{COOKIE}=; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

/// The session id in a `Cookie` header, if any.
pub fn session_id(headers: &axum::http::HeaderMap) -> Option<String> {
    cookie_value(headers, COOKIE)
}

/// The value of cookie `name` in the request's `Cookie` headers, if any.
pub fn cookie_value(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Whether `role` may use `path` (`method` for the admin API): the one table of the
/// console's permissions. A department administrator's pages then show only its own
/// department's part.
pub fn may(role: Role, method: &axum::http::Method, path: &str) -> bool {
    use Role::*;
    let is = |p: &str| path == p || path.starts_with(&format!("{p}/"));
    if is("/admin/policy") {
        return role == Bureau;
    }
    if is("/admin/audit") || is("/audit") {
        return true; // every role; a department administrator sees its own calls only
    }
    if path == "/" || path == "/signout" || path == "/lang" {
        return true;
    }
    if is("/preview") || is("/proposals") || is("/league") {
        return role == Bureau;
    }
    if is("/catalogue") || is("/departments") || is("/explain") {
        return matches!(role, Bureau | DeptAdmin);
    }
    if is("/overview") {
        return role == Bureau;
    }
    let _ = method;
    false
}

/// Whether a state-changing request carries what proves it came from the console's own page
/// (or from an API client, which no browser form can imitate).
pub fn csrf_ok(
    headers: &axum::http::HeaderMap,
    session: Option<&Session>,
    form_token: Option<&str>,
    had_cookie: bool,
) -> bool {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let Some(s) = session.filter(|s| !s.csrf.is_empty()) {
        let given = form_token.or_else(|| header("x-csrf-token"));
        if given.is_some_and(|g| constant_eq(g.as_bytes(), s.csrf.as_bytes())) {
            return true;
        }
    }
    // An API client (no cookie at all) that says so in a header a cross-site form cannot set.
    !had_cookie && header("x-requested-by").is_some_and(|v| !v.is_empty())
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn the_permission_table() {
        use Role::*;
        let get = Method::GET;
        for (role, path, ok) in [
            (Bureau, "/overview", true),
            (Bureau, "/preview", true),
            (Bureau, "/admin/policy/reload", true),
            (DeptAdmin, "/overview", false),
            (DeptAdmin, "/departments/civil-affairs", true),
            (DeptAdmin, "/preview", false),
            (DeptAdmin, "/admin/policy", false),
            (DeptAdmin, "/explain", true),
            (Auditor, "/audit", true),
            (Auditor, "/audit.csv", false),
            (Auditor, "/audit/export.csv", true),
            (Auditor, "/catalogue", false),
            (Auditor, "/explain", false),
            (Auditor, "/admin/policy", false),
            (Auditor, "/admin/audit/search", true),
            (Bureau, "/nowhere", false),
        ] {
            assert_eq!(may(role, &get, path), ok, "{role:?} {path}");
        }
    }

    #[test]
    fn sessions_are_bound_to_the_certificate() {
        let s = Sessions::new(Duration::from_secs(60));
        let o = Officer {
            name: "Li".into(),
            subject: "li".into(),
            role: Role::Bureau,
            department: None,
            fingerprint: None,
            oidc: None,
        };
        let open = s.open(o, "sha256:aa".into(), Default::default());
        assert!(s.get(&open.id, "sha256:aa").is_some());
        assert!(
            s.get(&open.id, "sha256:bb").is_none(),
            "another certificate"
        );
        assert!(s.get("forged", "sha256:aa").is_none());
        assert!(
            s.get(&open.id, crate::console::oidc::OIDC_BINDING)
                .is_none(),
            "a connection with no certificate"
        );
        s.close(&open.id);
        assert!(s.get(&open.id, "sha256:aa").is_none());
    }

    #[test]
    fn officers_sign_in_by_certificate_or_idp_and_are_told_apart() {
        let o = |name: &str, subject: &str, oidc: Option<&str>| Officer {
            name: name.into(),
            subject: subject.into(),
            role: Role::Bureau,
            department: None,
            fingerprint: None,
            oidc: oidc.map(str::to_owned),
        };
        let list = [
            o("Li", "li", Some("li.ming")),
            o("Chen", "", Some("chen.jing")),
            o("Wang", "", Some("wang.fang")),
        ];
        let os = Officers::new(&list).unwrap();
        assert_eq!(
            os.by_oidc("chen.jing").map(|x| x.name.as_str()),
            Some("Chen")
        );
        assert_eq!(
            os.get("li", "sha256:x").map(|x| x.name.as_str()),
            Some("Li")
        );
        assert!(os.get("", "sha256:x").is_none(), "no CN is no officer");
        assert_ne!(list[1].key(), list[2].key(), "two IdP-only officers");
        let errs = Officers::new(&[
            o("Li", "", None),
            o("Li", "x", Some("")),
            o("Z", "y", Some("z")),
            o("Y", "y", Some("z")),
        ])
        .unwrap_err();
        assert_eq!(errs.len(), 5, "{errs:?}");
    }

    #[test]
    fn csrf_needs_the_sessions_token_or_an_api_header() {
        let s = Sessions::new(Duration::from_secs(60)).open(
            Officer {
                name: "Li".into(),
                subject: "li".into(),
                role: Role::Bureau,
                department: None,
                fingerprint: None,
                oidc: None,
            },
            "sha256:aa".into(),
            Default::default(),
        );
        let mut h = axum::http::HeaderMap::new();
        assert!(!csrf_ok(&h, Some(&s), None, true));
        assert!(!csrf_ok(&h, Some(&s), Some("wrong"), true));
        assert!(csrf_ok(&h, Some(&s), Some(&s.csrf), true));
        h.insert("x-requested-by", "xgate-cli".parse().unwrap());
        assert!(
            !csrf_ok(&h, Some(&s), None, true),
            "a browser with a cookie"
        );
        assert!(csrf_ok(&h, None, None, false), "an API client");
    }
}
