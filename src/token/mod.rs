//! The caller's JWT: verified against the identity provider's keys (JWKS from a file or an
//! HTTPS URL), with an algorithm allow-list, time checks, a lifetime cap, a size cap, and an
//! optional certificate binding (RFC 8705 `cnf.x5t#S256`, checked by the gateway per call).
//!
//! Keys are refreshed on an interval and when a token names an unknown `kid` (at most once per
//! `unknown_kid_refresh_secs`, so a flood of bogus `kid`s cannot hammer the identity
//! provider). When the provider is down, the last good keys keep working for
//! `keys_max_age_secs` after they were fetched; with no usable keys at all the answer is
//! `UNAVAILABLE`/`TOKEN_KEYS_UNAVAILABLE`, never `UNAUTHENTICATED`: "the identity provider is
//! unreachable" is not "your token is bad".
//!
//! Verified tokens are cached (keyed by the SHA-256 of the token, bounded, honouring `exp`,
//! dropped when their signing key leaves the key set), so a busy system does not pay a
//! signature check per call.
//!
//! Size: ~750 lines of code and 140 of tests, kept in one file because they are one state
//! machine over one key set: the verifier, its cache and the refusal it gives share the key
//! set's generation and must change together; the key fetch (`jwks_fetch`) and the
//! signature back end (`ring`) are already apart.

pub mod jwks_fetch;
pub mod ring;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwapOption;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet},
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Reason, Reject};

/// Claims xgate reads from a token.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Claims {
    #[serde(default)]
    pub sub: String,
    #[serde(default)]
    pub dept: String,
    /// Required: a token without it is refused `TOKEN_CLAIM_MISSING` (the validation's
    /// required claims), not taken to never expire.
    #[serde(default)]
    pub exp: u64,
    #[serde(default)]
    pub nbf: Option<u64>,
    #[serde(default)]
    pub iat: Option<u64>,
    /// Purposes the token was issued for; absent: any purpose the grant allows.
    #[serde(default)]
    pub purposes: Option<Vec<String>>,
    /// RFC 8705 confirmation: the certificate the token is bound to.
    #[serde(default)]
    pub cnf: Option<Confirmation>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Confirmation {
    /// base64url(SHA-256(certificate DER)).
    #[serde(rename = "x5t#S256", default)]
    pub x5t_s256: Option<String>,
}

impl Claims {
    /// The certificate thumbprint the token is bound to, if it is bound.
    pub fn bound_thumbprint(&self) -> Option<&str> {
        self.cnf.as_ref().and_then(|c| c.x5t_s256.as_deref())
    }
}

/// Settings for token verification.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    /// Clock skew tolerated on `exp`/`nbf`/`iat`, seconds.
    pub leeway_secs: u64,
    /// Verified tokens kept in the cache.
    pub cache_capacity: usize,
    /// Accepted algorithms. `none` is never accepted; HMAC ones only with `hmac_secret`.
    pub algorithms: Vec<Algorithm>,
    /// Longest accepted lifetime (`exp - iat`, or `exp - now` without `iat`), seconds.
    pub max_lifetime_secs: u64,
    /// Largest accepted `authorization` header, bytes; checked before any parsing.
    pub max_token_bytes: usize,
    /// Shared secret for HS256/384/512 (only if those are in `algorithms`).
    pub hmac_secret: Option<Vec<u8>>,
    /// How long the last good keys stay usable after they were fetched.
    pub keys_max_age_secs: u64,
    /// How often keys are re-fetched.
    pub refresh_interval_secs: u64,
    /// At most one on-demand refresh (unknown `kid`) per this many seconds.
    pub unknown_kid_refresh_secs: u64,
}

impl TokenSettings {
    /// Defaults for everything but issuer and audience.
    pub fn new(issuer: &str, audience: &str) -> Self {
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway_secs: 30,
            cache_capacity: 10_000,
            algorithms: vec![Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA],
            max_lifetime_secs: 24 * 3600,
            max_token_bytes: 8 * 1024,
            hmac_secret: None,
            keys_max_age_secs: 24 * 3600,
            refresh_interval_secs: 300,
            unknown_kid_refresh_secs: 30,
        }
    }
}

/// Where the identity provider's public keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    File(PathBuf),
    /// An HTTPS URL, verified against `ca_pem`.
    Url {
        url: http::Uri,
        ca_pem: Vec<u8>,
    },
    /// Fixed keys (tests, embedding).
    Static(Vec<u8>),
}

struct Key {
    key: DecodingKey,
    validation: Validation,
}

struct KeySet {
    /// Distinguishes fetches: cached tokens are only good against the set they were checked with.
    generation: u64,
    keys: HashMap<String, Key>,
    /// The only key, when the set has exactly one (tokens may then omit `kid`).
    single: Option<String>,
    fetched: Instant,
}

struct Cached {
    claims: Arc<Claims>,
    /// The key set generation it was verified against (`None` for HMAC): a hit counts only
    /// while that exact set is current and fresh, so a re-key — even under the same `kid` —
    /// or stale keys take cached tokens with them.
    generation: Option<u64>,
}

/// How long a definitively bad token is remembered, and how many at most.
const REFUSED_TTL: Duration = Duration::from_secs(30);
const REFUSED_MAX: usize = 10_000;

/// Refusals that time or a key refresh cannot change (so they may be remembered).
fn is_final(r: Reason) -> bool {
    matches!(
        r,
        Reason::TokenMalformed
            | Reason::TokenSignatureInvalid
            | Reason::TokenIssuerInvalid
            | Reason::TokenAudienceInvalid
            | Reason::TokenClaimMissing
            | Reason::TokenAlgorithmNotAllowed
            | Reason::TokenLifetimeTooLong
            | Reason::TokenExpired
    )
}

/// The outcome of looking for an unknown `kid`.
enum Lookup {
    /// Fresh keys, just fetched.
    Fetched(Arc<KeySet>),
    /// No new look (fixed keys, or looked recently and that look worked).
    NotNeeded,
    /// The identity provider could not be reached.
    Failed,
}

/// Verifies bearer tokens.
pub struct TokenVerifier {
    settings: TokenSettings,
    source: JwksSource,
    keys: ArcSwapOption<KeySet>,
    hmac: Option<(DecodingKey, Vec<Algorithm>)>,
    last_on_demand: Mutex<Option<Instant>>,
    last_on_demand_failed: std::sync::atomic::AtomicBool,
    refreshing: tokio::sync::Mutex<()>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    /// Tokens that failed for good, briefly remembered: replaying a bad token does not buy
    /// a signature check each time.
    refused: Mutex<HashMap<[u8; 32], (Instant, Reject)>>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<String> = self
            .keys
            .load()
            .as_ref()
            .map(|k| k.keys.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("TokenVerifier")
            .field("kids", &kids)
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// Build a verifier and load its keys once. A file or static source must load; a URL that
    /// cannot be reached leaves the verifier without keys (calls get `UNAVAILABLE`) until a
    /// refresh succeeds.
    pub async fn new(source: JwksSource, settings: TokenSettings) -> Result<Self, String> {
        crate::token::ring::install();
        if settings.algorithms.is_empty() {
            return Err("jwt.algorithms: allow at least one algorithm".into());
        }
        let hmac_algs: Vec<Algorithm> = settings
            .algorithms
            .iter()
            .copied()
            .filter(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
            .collect();
        let hmac = match (&settings.hmac_secret, hmac_algs.is_empty()) {
            (Some(secret), false) => {
                if secret.len() < 32 {
                    return Err(
                        "jwt.hmac_secret_file: an HMAC secret needs at least 32 bytes".into(),
                    );
                }
                Some((DecodingKey::from_secret(secret), hmac_algs))
            }
            (None, false) => {
                return Err("jwt.algorithms: HMAC algorithms need `hmac_secret_file`".into());
            }
            _ => None,
        };
        let v = Self {
            settings,
            source,
            keys: ArcSwapOption::empty(),
            hmac,
            last_on_demand: Mutex::new(None),
            last_on_demand_failed: std::sync::atomic::AtomicBool::new(false),
            refreshing: tokio::sync::Mutex::new(()),
            cache: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
        };
        match (&v.source, v.refresh().await) {
            (_, Ok(_)) => {}
            (JwksSource::Url { url, .. }, Err(e)) => {
                tracing::error!(%url, error = %e, "JWKS unavailable at start-up; calls get UNAVAILABLE until it loads");
            }
            (_, Err(e)) => return Err(e),
        }
        Ok(v)
    }

    /// Fixed keys from JWKS JSON (tests, embedding).
    pub async fn from_jwks(json: &[u8], settings: TokenSettings) -> Result<Self, String> {
        Self::new(JwksSource::Static(json.to_vec()), settings).await
    }

    /// Fetch the key set now and install it if it parses. Returns how many keys it has.
    pub async fn refresh(&self) -> Result<usize, String> {
        let _one_at_a_time = self.refreshing.lock().await;
        let bytes = match &self.source {
            JwksSource::File(p) => tokio::fs::read(p)
                .await
                .map_err(|e| format!("{}: {e}", p.display()))?,
            JwksSource::Url { url, ca_pem } => crate::token::jwks_fetch::get(url, ca_pem).await?,
            JwksSource::Static(b) => b.clone(),
        };
        let set = self.parse(&bytes)?;
        let n = set.keys.len();
        self.keys.store(Some(Arc::new(set)));
        metrics::counter!("xgate_jwks_refresh_total", "result" => "ok").increment(1);
        Ok(n)
    }

    /// Re-fetch the keys every `refresh_interval_secs` (failures keep the last good keys).
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        let every = Duration::from_secs(self.settings.refresh_interval_secs.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(v) = me.upgrade() else { return };
                if let Err(e) = v.refresh().await {
                    metrics::counter!("xgate_jwks_refresh_total", "result" => "error").increment(1);
                    tracing::warn!(error = %e, "JWKS refresh failed; keeping the last good keys");
                }
            }
        })
    }

    fn parse(&self, json: &[u8]) -> Result<KeySet, String> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            match self.parse_key(jwk) {
                Ok((kid, key)) => {
                    keys.insert(kid, key);
                }
                Err(e) => tracing::warn!(key = i, error = %e, "JWKS key skipped"),
            }
        }
        if keys.is_empty() {
            return Err("the JWKS has no usable keys for the allowed algorithms".into());
        }
        let single = (keys.len() == 1)
            .then(|| keys.keys().next().cloned())
            .flatten();
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(KeySet {
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            keys,
            single,
            fetched: Instant::now(),
        })
    }

    fn parse_key(&self, jwk: &Jwk) -> Result<(String, Key), String> {
        let kid = jwk.common.key_id.clone().ok_or("no `kid`")?;
        // The algorithm the key's type allows; a stated `alg` must agree with it.
        let by_type = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => vec![],
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                vec![Algorithm::EdDSA]
            }
            AlgorithmParameters::RSA(_) => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            _ => vec![],
        };
        let alg = match &jwk.common.key_algorithm {
            Some(a) => {
                let a: Algorithm = a
                    .to_string()
                    .parse()
                    .map_err(|_| format!("`{kid}`: unsupported alg {a:?}"))?;
                if !by_type.contains(&a) {
                    return Err(format!("`{kid}`: alg {a:?} does not match the key type"));
                }
                a
            }
            None => *by_type
                .first()
                .ok_or(format!("`{kid}`: unsupported key type"))?,
        };
        if !self.settings.algorithms.contains(&alg) {
            return Err(format!("`{kid}`: {alg:?} is not an allowed algorithm"));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("`{kid}`: {e}"))?;
        let mut v = Validation::new(alg);
        v.set_issuer(&[&self.settings.issuer]);
        v.set_audience(&[&self.settings.audience]);
        v.leeway = self.settings.leeway_secs;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Ok((kid, Key { key, validation: v }))
    }

    /// Verify a token from an `authorization` header value.
    pub async fn verify_header(&self, header: Option<&str>) -> Result<Arc<Claims>, Reject> {
        let Some(h) = header else {
            return Err(Reject::new(
                Reason::TokenMissing,
                "send `authorization: Bearer <JWT>` issued by the province's identity provider",
            ));
        };
        if h.len() > self.settings.max_token_bytes {
            return Err(Reject::new(
                Reason::TokenTooLarge,
                format!(
                    "the authorization header exceeds {} bytes",
                    self.settings.max_token_bytes
                ),
            ));
        }
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let token = h
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Reject::new(
                    Reason::TokenMalformed,
                    "the authorization header is not `Bearer <JWT>`",
                )
            })?;
        self.verify(token).await
    }

    pub async fn verify(&self, token: &str) -> Result<Arc<Claims>, Reject> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(r) = self.refused.lock().ok().and_then(|m| {
            m.get(&digest)
                .filter(|(at, _)| at.elapsed() < REFUSED_TTL)
                .map(|(_, r)| r.clone())
        }) {
            return Err(r);
        }
        let result = self.verify_uncached_failure(token, digest).await;
        if let Err(r) = &result
            && is_final(r.reason)
            && let Ok(mut m) = self.refused.lock()
        {
            if m.len() >= REFUSED_MAX {
                m.retain(|_, (at, _)| at.elapsed() < REFUSED_TTL);
                if m.len() >= REFUSED_MAX {
                    m.clear();
                }
            }
            m.insert(digest, (Instant::now(), r.clone()));
        }
        result
    }

    async fn verify_uncached_failure(
        &self,
        token: &str,
        digest: [u8; 32],
    ) -> Result<Arc<Claims>, Reject> {
        let now = now_secs();
        let hit = self
            .cache
            .lock()
            .ok()
            .and_then(|m| m.get(&digest).map(|c| (c.claims.clone(), c.generation)));
        if let Some((claims, generation)) = hit {
            let current = match generation {
                None => true,
                Some(g) => {
                    let max_age = Duration::from_secs(self.settings.keys_max_age_secs);
                    self.keys
                        .load()
                        .as_ref()
                        .is_some_and(|s| s.generation == g && s.fetched.elapsed() <= max_age)
                }
            };
            if current {
                // Re-check time on every hit: a cached token expires like any other.
                self.check_times(&claims, now)?;
                return Ok(claims);
            }
        }
        let header = parse_header(token)?;
        if !self.settings.algorithms.contains(&header.alg) {
            return Err(Reject::new(
                Reason::TokenAlgorithmNotAllowed,
                format!("tokens signed with {:?} are not accepted", header.alg),
            ));
        }
        let (claims, kid) = if let Some((key, algs)) =
            self.hmac.as_ref().filter(|(_, a)| a.contains(&header.alg))
        {
            let mut v = Validation::new(header.alg);
            v.algorithms = algs.clone();
            v.set_issuer(&[&self.settings.issuer]);
            v.set_audience(&[&self.settings.audience]);
            v.leeway = self.settings.leeway_secs;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(map_jwt_error)?;
            (data.claims, None::<u64>)
        } else if matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        ) {
            return Err(Reject::new(
                Reason::TokenAlgorithmNotAllowed,
                format!("tokens signed with {:?} are not accepted", header.alg),
            ));
        } else {
            let set = self.usable_keys().await?;
            let kid = header.kid.clone().or_else(|| set.single.clone());
            let set = match kid.as_deref().map(|k| set.keys.contains_key(k)) {
                Some(true) => set,
                // Unknown kid: perhaps the provider rotated keys; look (rate-limited).
                _ => match self.refresh_for_unknown_kid().await {
                    Lookup::Fetched(s) => s,
                    Lookup::NotNeeded => set,
                    // We could not look: that is not the caller's fault.
                    Lookup::Failed => {
                        return Err(Reject::new(
                            Reason::TokenKeysUnavailable,
                            "the token names a key the gateway cannot fetch from the identity provider right now; retry later",
                        )
                        .with_retry_after(Duration::from_secs(self.settings.unknown_kid_refresh_secs.max(1))));
                    }
                },
            };
            let Some(key) = kid.as_deref().and_then(|k| set.keys.get(k)) else {
                return Err(Reject::new(
                    Reason::TokenKeyUnknown,
                    "the token's signing key (`kid`) is not one the identity provider publishes",
                ));
            };
            if header.alg != key.validation.algorithms[0] {
                return Err(Reject::new(
                    Reason::TokenSignatureInvalid,
                    "the token's algorithm does not match its signing key",
                ));
            }
            let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
                .map_err(map_jwt_error)?;
            (data.claims, Some(set.generation))
        };
        if claims.dept.is_empty() || claims.sub.is_empty() {
            return Err(Reject::new(
                Reason::TokenClaimMissing,
                "the token needs non-empty `sub` and `dept` claims",
            ));
        }
        self.check_times(&claims, now)?;
        let start = claims.iat.unwrap_or(now).min(now);
        if claims.exp.saturating_sub(start) > self.settings.max_lifetime_secs {
            return Err(Reject::new(
                Reason::TokenLifetimeTooLong,
                format!(
                    "the token lives longer than the {} s the gateway accepts; ask for a shorter-lived token",
                    self.settings.max_lifetime_secs
                ),
            ));
        }
        let claims = Arc::new(claims);
        if let Ok(mut m) = self.cache.lock() {
            if m.len() >= self.settings.cache_capacity {
                // Cheap bound: drop the expired, then everything if still full.
                m.retain(|_, c| c.claims.exp.saturating_add(self.settings.leeway_secs) > now);
                if m.len() >= self.settings.cache_capacity {
                    m.clear();
                }
            }
            m.insert(
                digest,
                Cached {
                    claims: claims.clone(),
                    generation: kid,
                },
            );
        }
        Ok(claims)
    }

    /// The current keys if still within their lifetime; otherwise try to fetch, and say
    /// `UNAVAILABLE` if there are none.
    async fn usable_keys(&self) -> Result<Arc<KeySet>, Reject> {
        let max_age = Duration::from_secs(self.settings.keys_max_age_secs);
        let fresh = |k: &Option<Arc<KeySet>>| {
            k.as_ref()
                .filter(|s| s.fetched.elapsed() <= max_age)
                .cloned()
        };
        if let Some(k) = fresh(&self.keys.load_full()) {
            return Ok(k);
        }
        if self.take_on_demand_slot() {
            let _ = tokio::time::timeout(Duration::from_secs(3), self.refresh()).await;
        }
        fresh(&self.keys.load_full()).ok_or_else(|| {
            Reject::new(
                Reason::TokenKeysUnavailable,
                "the gateway cannot reach the identity provider's keys to check your token; retry later",
            )
        })
    }

    /// Look for an unknown `kid` by fetching the keys again, at most once per
    /// `unknown_kid_refresh_secs`. Within that window the previous look stands: if it
    /// succeeded the kid is simply unknown; if it failed the keys are unavailable.
    async fn refresh_for_unknown_kid(&self) -> Lookup {
        if matches!(self.source, JwksSource::Static(_)) {
            return Lookup::NotNeeded;
        }
        if !self.take_on_demand_slot() {
            return if self
                .last_on_demand_failed
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                Lookup::Failed
            } else {
                Lookup::NotNeeded
            };
        }
        let ok = match tokio::time::timeout(Duration::from_secs(6), self.refresh()).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "JWKS refresh for an unknown kid failed");
                false
            }
            Err(_) => false,
        };
        self.last_on_demand_failed
            .store(!ok, std::sync::atomic::Ordering::Relaxed);
        match (ok, self.keys.load_full()) {
            (true, Some(s)) => Lookup::Fetched(s),
            _ => Lookup::Failed,
        }
    }

    /// At most one on-demand refresh per `unknown_kid_refresh_secs`.
    fn take_on_demand_slot(&self) -> bool {
        let Ok(mut last) = self.last_on_demand.lock() else {
            return false;
        };
        let gap = Duration::from_secs(self.settings.unknown_kid_refresh_secs);
        if last.is_some_and(|t| t.elapsed() < gap) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    fn check_times(&self, c: &Claims, now: u64) -> Result<(), Reject> {
        let leeway = self.settings.leeway_secs;
        if c.exp.saturating_add(leeway) <= now {
            return Err(Reject::new(
                Reason::TokenExpired,
                "the token has expired; get a new one",
            ));
        }
        if c.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(Reject::new(
                Reason::TokenNotYetValid,
                "the token is not valid yet (`nbf`)",
            ));
        }
        if c.iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
            return Err(Reject::new(
                Reason::TokenNotYetValid,
                "the token was issued in the future (`iat`)",
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// RFC 7515 §4.1.11: extensions the recipient must understand. xgate implements none.
    #[serde(default)]
    crit: Option<serde_json::Value>,
    /// RFC 7797 unencoded payloads: not supported (and only valid when listed in `crit`).
    #[serde(default)]
    b64: Option<serde_json::Value>,
}

struct Header {
    alg: Algorithm,
    kid: Option<String>,
}

/// Read the JOSE header ourselves, so `alg: none` and friends get a precise refusal.
fn parse_header(token: &str) -> Result<Header, Reject> {
    let malformed = || {
        Reject::new(
            Reason::TokenMalformed,
            "the bearer token is not a well-formed JWT",
        )
    };
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed());
    };
    let bytes = URL_SAFE_NO_PAD.decode(h).map_err(|_| malformed())?;
    let raw: RawHeader = serde_json::from_slice(&bytes).map_err(|_| malformed())?;
    if raw.kid.as_ref().is_some_and(|k| k.len() > 256) {
        return Err(malformed());
    }
    if raw.crit.is_some() || raw.b64.is_some() {
        return Err(Reject::new(
            Reason::TokenMalformed,
            "the token's header uses extensions the gateway does not implement (`crit`, `b64`): issue a plain JWS",
        ));
    }
    let alg = raw.alg.parse::<Algorithm>().map_err(|_| {
        Reject::new(
            Reason::TokenAlgorithmNotAllowed,
            format!(
                "tokens signed with `{}` are not accepted",
                raw.alg.chars().take(16).collect::<String>()
            ),
        )
    })?;
    Ok(Header { alg, kid: raw.kid })
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> Reject {
    match e.kind() {
        ErrorKind::ExpiredSignature => {
            Reject::new(Reason::TokenExpired, "the token has expired; get a new one")
        }
        ErrorKind::ImmatureSignature => Reject::new(
            Reason::TokenNotYetValid,
            "the token is not valid yet (`nbf`)",
        ),
        ErrorKind::InvalidIssuer => Reject::new(
            Reason::TokenIssuerInvalid,
            "the token was not issued by the trusted issuer",
        ),
        ErrorKind::InvalidAudience => Reject::new(
            Reason::TokenAudienceInvalid,
            "the token is not meant for this gateway (`aud`)",
        ),
        ErrorKind::MissingRequiredClaim(c) => Reject::new(
            Reason::TokenClaimMissing,
            format!("the token lacks the `{c}` claim"),
        ),
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName => Reject::new(
            Reason::TokenSignatureInvalid,
            "the token's signature does not verify",
        ),
        _ => Reject::new(
            Reason::TokenMalformed,
            "the bearer token is not a well-formed JWT",
        ),
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// base64url(SHA-256(der)): the RFC 8705 thumbprint of a certificate.
pub fn x5t_s256(der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev_jwks() -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-dev/jwks.json"))
            .unwrap()
    }

    #[tokio::test]
    async fn bad_tokens_are_remembered_good_and_transient_ones_are_not() {
        let v = TokenVerifier::from_jwks(
            &dev_jwks(),
            TokenSettings::new(crate::dev::pki::ISSUER, crate::dev::pki::AUDIENCE),
        )
        .await
        .unwrap();
        let (other, _) = crate::dev::pki::jwt_keypair(crate::dev::pki::KID).unwrap();
        let forged = crate::dev::pki::mint_token(
            &other,
            crate::dev::pki::KID,
            &crate::dev::pki::dev_claims("health", "x", None, 600),
        )
        .unwrap();
        for _ in 0..3 {
            assert_eq!(
                v.verify(&forged).await.unwrap_err().reason,
                Reason::TokenSignatureInvalid
            );
        }
        assert_eq!(
            v.refused.lock().unwrap().len(),
            1,
            "one signature check, then remembered"
        );
        // Not yet valid can become valid: not remembered.
        let now = now_secs();
        let mut c = crate::dev::pki::dev_claims("health", "x", None, 600);
        c["nbf"] = (now + 3600).into();
        let key = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-dev/jwt-signing.key"),
        )
        .unwrap();
        let early = crate::dev::pki::mint_token(&key, crate::dev::pki::KID, &c).unwrap();
        assert_eq!(
            v.verify(&early).await.unwrap_err().reason,
            Reason::TokenNotYetValid
        );
        assert_eq!(v.refused.lock().unwrap().len(), 1);
        // A good token verifies (and is cached positively).
        let good = crate::dev::pki::mint_token(
            &key,
            crate::dev::pki::KID,
            &crate::dev::pki::dev_claims("health", "x", None, 600),
        )
        .unwrap();
        assert_eq!(v.verify(&good).await.unwrap().dept, "health");
        assert_eq!(v.cache.lock().unwrap().len(), 1);
    }

    fn dev_key() -> String {
        std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs-dev/jwt-signing.key"),
        )
        .unwrap()
    }

    async fn dev_verifier() -> TokenVerifier {
        TokenVerifier::from_jwks(
            &dev_jwks(),
            TokenSettings::new(crate::dev::pki::ISSUER, crate::dev::pki::AUDIENCE),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn crit_and_b64_headers_are_refused_before_any_signature_work() {
        let v = dev_verifier().await;
        let good = crate::dev::pki::mint_token(
            &dev_key(),
            crate::dev::pki::KID,
            &crate::dev::pki::dev_claims("health", "x", None, 600),
        )
        .unwrap();
        let (_, payload_sig) = good.split_once('.').unwrap();
        let with_header = |h: serde_json::Value| {
            format!("{}.{payload_sig}", URL_SAFE_NO_PAD.encode(h.to_string()))
        };
        let kid = crate::dev::pki::KID;
        for h in [
            serde_json::json!({"alg": "ES256", "kid": kid, "crit": ["exp"]}),
            serde_json::json!({"alg": "ES256", "kid": kid, "crit": ["x-unknown"], "x-unknown": 1}),
            serde_json::json!({"alg": "ES256", "kid": kid, "b64": false, "crit": ["b64"]}),
            serde_json::json!({"alg": "ES256", "kid": kid, "b64": false}),
        ] {
            let r = v.verify(&with_header(h.clone())).await.unwrap_err();
            assert_eq!(r.reason, Reason::TokenMalformed, "{h}");
            assert!(r.message.contains("crit"), "{h}: {}", r.message);
        }
        // Without them the header passes, and the signature (over other header bytes) is what
        // refuses the token.
        let plain = with_header(serde_json::json!({"alg": "ES256", "kid": kid, "x-other": 1}));
        assert_eq!(
            v.verify(&plain).await.unwrap_err().reason,
            Reason::TokenSignatureInvalid
        );
    }

    #[tokio::test]
    async fn a_token_without_exp_lacks_a_claim_and_the_scheme_is_case_insensitive() {
        let v = dev_verifier().await;
        let mut c = crate::dev::pki::dev_claims("health", "x", None, 600);
        c.as_object_mut().unwrap().remove("exp");
        let t = crate::dev::pki::mint_token(&dev_key(), crate::dev::pki::KID, &c).unwrap();
        let r = v.verify(&t).await.unwrap_err();
        assert_eq!(r.reason, Reason::TokenClaimMissing, "{}", r.message);
        assert!(r.message.contains("exp"), "{}", r.message);
        let good = crate::dev::pki::mint_token(
            &dev_key(),
            crate::dev::pki::KID,
            &crate::dev::pki::dev_claims("health", "x", None, 600),
        )
        .unwrap();
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let claims = v.verify_header(Some(&format!("{scheme} {good}"))).await;
            assert_eq!(claims.unwrap().dept, "health", "{scheme}");
        }
        for bad in [
            format!("Basic {good}"),
            format!("Bearer{good}"),
            "Bearer ".into(),
        ] {
            let r = v.verify_header(Some(&bad)).await.unwrap_err();
            assert_eq!(r.reason, Reason::TokenMalformed, "{bad}");
        }
    }
}
