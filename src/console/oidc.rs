//! Sign-in against the province's identity provider (OpenID Connect), where `console.oidc`
//! is configured: the authorization-code flow with PKCE (S256), `state` and `nonce`, for
//! officers who sign in with the IdP rather than a certificate.
//!
//! 1. [`Oidc::begin`] (`GET /signin/oidc`): reads the IdP's discovery document, keeps a
//!    pending sign-in (nonce, PKCE verifier) under a random `state`, and sends the browser to
//!    the IdP. The `state` also goes into a short-lived cookie (`__Host-xgate_oidc`,
//!    `SameSite=Lax`, 10 minutes), so a callback another site makes the officer's browser
//!    open does not sign them in as someone else (login CSRF).
//! 2. [`Oidc::finish`] (`GET /signin/oidc/callback`): the cookie's state must be the
//!    callback's and still pending (one use); the `iss` parameter, when the IdP sends one
//!    (RFC 9207), must be the issuer; the code is exchanged at the token endpoint (client
//!    secret, PKCE verifier); the ID token's signature is checked against the IdP's JWKS
//!    (asymmetric algorithms only), and its `iss`, `aud`, `exp` and `nonce`. The value of
//!    `console.oidc.claim` (default `sub`) is the identity [`super::auth::Officers`] maps to
//!    an officer (`officers[].oidc`).
//!
//! One file over 600 lines: the flow is one concern (its two halves share the pending
//! sign-ins and the IdP's metadata), and a fifth of it is its tests.
//!
//! Roles come from the console's config, never from the IdP's claims: the IdP says who,
//! the bureau's config says what they may do. Not here: the session that follows
//! ([`super::auth::Sessions`], bound to [`OIDC_BINDING`] rather than a certificate).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// `console.oidc` in the config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The IdP's issuer URL (`https://`; plain `http://` only on loopback). Its discovery
    /// document is `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    /// A file holding the client secret (a mounted Secret).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Or the environment variable holding it.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// Where the IdP sends the officer back: this console's `/signin/oidc/callback`, as the
    /// officers' browsers reach it (registered with the IdP as the client's redirect URI).
    pub redirect_url: String,
    /// Which ID-token claim names the officer (`sub`, `preferred_username`, `email`…),
    /// matched against `officers[].oidc`.
    #[serde(default = "default_claim")]
    pub claim: String,
    /// A CA bundle for the IdP's HTTPS (default: the public web roots).
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn default_claim() -> String {
    "sub".into()
}

/// What an OIDC session is bound to, where a certificate session is bound to the
/// certificate's fingerprint (`sha256:…`, so the two never collide). A cookie of one kind is
/// worthless on a connection of the other.
pub const OIDC_BINDING: &str = "oidc";

/// The cookie carrying a pending sign-in's `state` from the IdP's redirect back to us.
pub const STATE_COOKIE: &str = "__Host-xgate_oidc";

/// How long a sign-in may take at the IdP.
const PENDING_FOR: Duration = Duration::from_secs(600);
/// Pending sign-ins kept at most (anyone can start one); past it the oldest goes.
const MAX_PENDING: usize = 10_000;
/// How long a discovery document and key set are used before they are read again.
const META_FOR: Duration = Duration::from_secs(3600);
/// An unknown `kid` reads the key set again, at most this often (key rotation, not a flood).
const JWKS_REFETCH: Duration = Duration::from_secs(30);

/// Why a sign-in failed: what the officer is told (without the IdP's internals) and what the
/// trail records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OidcError {
    /// No pending sign-in for this state, or the cookie's state is not the callback's.
    State(&'static str),
    /// The IdP said no (`error=access_denied`…), or answered the token request with an error.
    Refused(String),
    /// The IdP could not be reached or answered something unusable.
    Idp(String),
    /// The ID token failed a check.
    Token(String),
}

impl std::fmt::Display for OidcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OidcError::State(w) => write!(f, "sign-in state: {w}"),
            OidcError::Refused(w) => write!(f, "the identity provider refused: {w}"),
            OidcError::Idp(w) => write!(f, "the identity provider: {w}"),
            OidcError::Token(w) => write!(f, "ID token: {w}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

#[derive(Debug, Clone)]
struct Meta {
    discovery: Discovery,
    keys: JwkSet,
    read_at: Instant,
    keys_at: Instant,
}

#[derive(Debug)]
struct Pending {
    nonce: String,
    verifier: String,
    at: Instant,
}

/// What the callback brings (the query string).
#[derive(Debug, Default, Deserialize)]
pub struct Callback {
    pub code: Option<String>,
    pub state: Option<String>,
    pub iss: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

/// A configured IdP, its metadata (read lazily, cached), and the sign-ins under way.
#[derive(Debug)]
pub struct Oidc {
    cfg: OidcConfig,
    secret: String,
    http: reqwest::Client,
    meta: tokio::sync::Mutex<Option<Meta>>,
    pending: Mutex<HashMap<String, Pending>>,
}

/// Whether `url` is `https://`, or `http://` to a loopback host (a test IdP, a sidecar).
fn acceptable_url(url: &str) -> bool {
    let Ok(u) = url::Url::parse(url) else {
        return false;
    };
    match u.scheme() {
        "https" => u.host().is_some(),
        "http" => match u.host() {
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        },
        _ => false,
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn random() -> String {
    b64(&rand::random::<[u8; 32]>())
}

/// RFC 7636 S256: `BASE64URL(SHA256(verifier))`.
pub fn pkce_challenge(verifier: &str) -> String {
    b64(&sha2::Sha256::digest(verifier.as_bytes()))
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The `Set-Cookie` value carrying a pending sign-in's state (`Lax`: it must come back on
/// the IdP's top-level redirect, which `Strict` would drop).
pub fn state_cookie(state: &str) -> String {
    format!("{STATE_COOKIE}={state}; Secure; HttpOnly; SameSite=Lax; Path=/; Max-Age=600")
}

/// The `Set-Cookie` value that ends it.
pub fn expired_state_cookie() -> String {
    format!("{STATE_COOKIE}=; Secure; HttpOnly; SameSite=Lax; Path=/; Max-Age=0")
}

/// The pending state in a `Cookie` header, if any.
pub fn state_from(headers: &axum::http::HeaderMap) -> Option<String> {
    super::auth::cookie_value(headers, STATE_COOKIE)
}

impl Oidc {
    /// Check `console.oidc` and read its secret; every problem at once.
    pub fn new(cfg: &OidcConfig) -> Result<Oidc, Vec<String>> {
        let mut errs = Vec::new();
        if !acceptable_url(&cfg.issuer) {
            errs.push(format!(
                "console.oidc.issuer `{}`: an https:// URL (http:// only to a loopback host)",
                cfg.issuer
            ));
        }
        if !acceptable_url(&cfg.redirect_url)
            || !cfg.redirect_url.ends_with("/signin/oidc/callback")
        {
            errs.push(format!(
                "console.oidc.redirect_url `{}`: this console's https://…/signin/oidc/callback",
                cfg.redirect_url
            ));
        }
        if cfg.client_id.trim().is_empty() {
            errs.push("console.oidc.client_id: empty".into());
        }
        if cfg.claim.trim().is_empty() {
            errs.push("console.oidc.claim: empty (default `sub`)".into());
        }
        let secret = match (&cfg.client_secret_file, &cfg.client_secret_env) {
            (Some(p), None) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .map_err(|e| format!("console.oidc.client_secret_file {}: {e}", p.display())),
            (None, Some(v)) => std::env::var(v)
                .map(|s| s.trim().to_owned())
                .map_err(|_| format!("console.oidc.client_secret_env: ${v} is not set")),
            _ => {
                Err("console.oidc: exactly one of client_secret_file and client_secret_env".into())
            }
        };
        let secret = match secret {
            Ok(s) if s.is_empty() => {
                errs.push("console.oidc: the client secret is empty".into());
                String::new()
            }
            Ok(s) => s,
            Err(e) => {
                errs.push(e);
                String::new()
            }
        };
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent("xgate-console");
        if let Some(ca) = &cfg.ca {
            match std::fs::read(ca)
                .map_err(|e| e.to_string())
                .and_then(|pem| reqwest::Certificate::from_pem(&pem).map_err(|e| e.to_string()))
            {
                Ok(c) => b = b.add_root_certificate(c),
                Err(e) => errs.push(format!("console.oidc.ca {}: {e}", ca.display())),
            }
        }
        let http = match b.build() {
            Ok(h) => h,
            Err(e) => {
                errs.push(format!("console.oidc: {e}"));
                return Err(errs);
            }
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Oidc {
            cfg: cfg.clone(),
            secret,
            http,
            meta: tokio::sync::Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
        })
    }

    pub fn claim(&self) -> &str {
        &self.cfg.claim
    }

    pub fn issuer(&self) -> &str {
        &self.cfg.issuer
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let r = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| OidcError::Idp(format!("{url}: {}", e.without_url())))?;
        if !r.status().is_success() {
            return Err(OidcError::Idp(format!("{url}: HTTP {}", r.status())));
        }
        r.json::<T>()
            .await
            .map_err(|e| OidcError::Idp(format!("{url}: {}", e.without_url())))
    }

    /// The discovery document and keys, read again once an hour, or when `kid` is unknown
    /// (at most every 30 s).
    async fn meta(&self, kid: Option<&str>) -> Result<Meta, OidcError> {
        let mut g = self.meta.lock().await;
        let fresh = g.as_ref().is_some_and(|m| m.read_at.elapsed() < META_FOR);
        if !fresh {
            let url = format!(
                "{}/.well-known/openid-configuration",
                self.cfg.issuer.trim_end_matches('/')
            );
            let d: Discovery = self.get_json(&url).await?;
            if d.issuer != self.cfg.issuer {
                return Err(OidcError::Idp(format!(
                    "its discovery document names issuer `{}`, not `{}`",
                    d.issuer, self.cfg.issuer
                )));
            }
            for (what, u) in [
                ("authorization_endpoint", &d.authorization_endpoint),
                ("token_endpoint", &d.token_endpoint),
                ("jwks_uri", &d.jwks_uri),
            ] {
                if !acceptable_url(u) {
                    return Err(OidcError::Idp(format!("{what} `{u}` is not https")));
                }
            }
            let keys: JwkSet = self.get_json(&d.jwks_uri).await?;
            let now = Instant::now();
            *g = Some(Meta {
                discovery: d,
                keys,
                read_at: now,
                keys_at: now,
            });
        } else if let (Some(kid), Some(m)) = (kid, g.as_mut())
            && m.keys.find(kid).is_none()
            && m.keys_at.elapsed() >= JWKS_REFETCH
        {
            let keys: JwkSet = self.get_json(&m.discovery.jwks_uri).await?;
            m.keys = keys;
            m.keys_at = Instant::now();
        }
        g.clone()
            .ok_or_else(|| OidcError::Idp("no metadata".into()))
    }

    /// Start a sign-in: the IdP URL to send the browser to, and the state for the cookie.
    pub async fn begin(&self) -> Result<(String, String), OidcError> {
        let meta = self.meta(None).await?;
        let (state, nonce, verifier) = (random(), random(), random());
        let mut url = url::Url::parse(&meta.discovery.authorization_endpoint)
            .map_err(|e| OidcError::Idp(format!("authorization_endpoint: {e}")))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("redirect_uri", &self.cfg.redirect_url)
            .append_pair("scope", "openid")
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &pkce_challenge(&verifier))
            .append_pair("code_challenge_method", "S256");
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|_, x| x.at.elapsed() < PENDING_FOR);
        if p.len() >= MAX_PENDING
            && let Some(oldest) = p.iter().min_by_key(|(_, x)| x.at).map(|(k, _)| k.clone())
        {
            p.remove(&oldest);
        }
        p.insert(
            state.clone(),
            Pending {
                nonce,
                verifier,
                at: Instant::now(),
            },
        );
        Ok((url.into(), state))
    }

    /// Finish a sign-in: the officer's identity (the configured claim's value).
    pub async fn finish(&self, cookie: Option<&str>, cb: &Callback) -> Result<String, OidcError> {
        let state = cb
            .state
            .as_deref()
            .ok_or(OidcError::State("the callback has no state"))?;
        let cookie = cookie.ok_or(OidcError::State(
            "no sign-in was started in this browser (or it took over 10 minutes)",
        ))?;
        if !constant_eq(cookie, state) {
            return Err(OidcError::State(
                "the callback is not for the sign-in started in this browser",
            ));
        }
        let pending = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.remove(state)
        }
        .filter(|x| x.at.elapsed() < PENDING_FOR)
        .ok_or(OidcError::State(
            "this sign-in was already used, or has expired",
        ))?;
        if let Some(err) = &cb.error {
            let why = cb.error_description.as_deref().unwrap_or("");
            return Err(OidcError::Refused(
                format!("{err} {why}").trim().chars().take(200).collect(),
            ));
        }
        if let Some(iss) = &cb.iss
            && iss != &self.cfg.issuer
        {
            return Err(OidcError::Idp(format!(
                "the answer came from issuer `{iss}`, not `{}`",
                self.cfg.issuer
            )));
        }
        let code = cb
            .code
            .as_deref()
            .ok_or(OidcError::Refused("no authorization code".into()))?;
        let meta = self.meta(None).await?;
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let resp = self
            .http
            .post(&meta.discovery.token_endpoint)
            .basic_auth(enc(&self.cfg.client_id), Some(enc(&self.secret)))
            .header("accept", "application/json")
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &self.cfg.redirect_url),
                ("code_verifier", &pending.verifier),
            ])
            .send()
            .await
            .map_err(|e| OidcError::Idp(format!("token endpoint: {}", e.without_url())))?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| OidcError::Idp(format!("token endpoint: {}", e.without_url())))?;
        if !status.is_success() {
            let err = body["error"].as_str().unwrap_or("error");
            return Err(OidcError::Refused(format!(
                "token endpoint HTTP {status}: {err}"
            )));
        }
        let id_token = body["id_token"]
            .as_str()
            .ok_or_else(|| OidcError::Idp("the token answer has no id_token".into()))?;
        self.identity(id_token, &pending.nonce).await
    }

    /// Check an ID token and return the configured claim's value.
    async fn identity(&self, id_token: &str, nonce: &str) -> Result<String, OidcError> {
        let header = jsonwebtoken::decode_header(id_token)
            .map_err(|e| OidcError::Token(format!("unreadable: {e}")))?;
        let alg = header.alg;
        if !matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(OidcError::Token(format!(
                "signed with {alg:?}; only the IdP's public-key algorithms are accepted"
            )));
        }
        let meta = self.meta(header.kid.as_deref()).await?;
        let jwk = match &header.kid {
            Some(kid) => meta.keys.find(kid),
            None if meta.keys.keys.len() == 1 => meta.keys.keys.first(),
            None => None,
        }
        .ok_or_else(|| OidcError::Token("signed with a key the IdP does not publish".into()))?;
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| OidcError::Token(format!("the IdP's key: {e}")))?;
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.client_id]);
        v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        v.leeway = 60;
        let claims = jsonwebtoken::decode::<serde_json::Value>(id_token, &key, &v)
            .map_err(|e| OidcError::Token(e.to_string()))?
            .claims;
        if claims["nonce"]
            .as_str()
            .is_none_or(|n| !constant_eq(n, nonce))
        {
            return Err(OidcError::Token("its nonce is not this sign-in's".into()));
        }
        // Several audiences: the token must have been issued to us (OIDC Core 3.1.3.7).
        if claims["aud"].is_array()
            && claims["aud"].as_array().is_some_and(|a| a.len() > 1)
            && claims["azp"].as_str() != Some(self.cfg.client_id.as_str())
        {
            return Err(OidcError::Token("issued to another client (azp)".into()));
        }
        match &claims[self.cfg.claim.as_str()] {
            serde_json::Value::String(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(OidcError::Token(format!(
                "no `{}` claim naming the officer",
                self.cfg.claim
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_is_rfc_7636s() {
        // RFC 7636, appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn the_idp_is_https_unless_on_loopback() {
        assert!(acceptable_url("https://idp.gov.example/realms/gov"));
        assert!(acceptable_url("http://127.0.0.1:8080"));
        assert!(acceptable_url("http://localhost:8080"));
        assert!(acceptable_url("http://[::1]:8080"));
        assert!(!acceptable_url("http://idp.gov.example"));
        assert!(!acceptable_url("http://10.0.0.1"));
        assert!(!acceptable_url("ftp://idp.gov.example"));
        assert!(!acceptable_url("not a url"));
    }

    fn cfg() -> OidcConfig {
        OidcConfig {
            issuer: "http://127.0.0.1:1".into(),
            client_id: "xgate-console".into(),
            client_secret_file: None,
            client_secret_env: Some("XGATE_TEST_OIDC_SECRET_UNSET".into()),
            redirect_url: "https://localhost:9444/signin/oidc/callback".into(),
            claim: "sub".into(),
            ca: None,
        }
    }

    #[test]
    fn a_bad_config_names_every_problem() {
        let mut c = cfg();
        c.issuer = "http://idp.example".into();
        c.redirect_url = "https://localhost:9444/elsewhere".into();
        let errs = Oidc::new(&c).unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("issuer"), "{errs:?}");
        assert!(errs[1].contains("redirect_url"), "{errs:?}");
        assert!(errs[2].contains("XGATE_TEST_OIDC_SECRET_UNSET"), "{errs:?}");
    }

    #[tokio::test]
    async fn a_callback_needs_the_state_this_browser_started() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let mut c = cfg();
        c.client_secret_env = None;
        c.client_secret_file = Some(secret);
        let o = Oidc::new(&c).unwrap();
        // A pending sign-in, as begin() leaves one (begin itself needs the IdP).
        o.pending.lock().unwrap().insert(
            "abc".into(),
            Pending {
                nonce: "n".into(),
                verifier: "v".into(),
                at: Instant::now(),
            },
        );
        let cb = |state: Option<&str>| Callback {
            code: Some("code".into()),
            state: state.map(str::to_owned),
            error: Some("access_denied".into()),
            ..Callback::default()
        };
        assert!(matches!(
            o.finish(Some("abc"), &cb(None)).await,
            Err(OidcError::State(_))
        ));
        assert!(matches!(
            o.finish(None, &cb(Some("abc"))).await,
            Err(OidcError::State(_))
        ));
        assert!(matches!(
            o.finish(Some("xyz"), &cb(Some("abc"))).await,
            Err(OidcError::State(_))
        ));
        // The right state: the IdP's refusal is what comes back, and the state is spent.
        assert!(matches!(
            o.finish(Some("abc"), &cb(Some("abc"))).await,
            Err(OidcError::Refused(w)) if w == "access_denied"
        ));
        assert!(matches!(
            o.finish(Some("abc"), &cb(Some("abc"))).await,
            Err(OidcError::State(w)) if w.contains("already used")
        ));
    }
}
