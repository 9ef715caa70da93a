//! The caller's JWT: verified against a JWKS (signature, `iss`, `aud`, `exp`, `nbf`) and bound
//! to the certificate's department.
//!
//! Verified tokens are cached (keyed by the SHA-256 of the token, bounded, honouring `exp`), so
//! a busy system does not pay a signature check on every call. The cache holds only tokens
//! that verified; every hit re-checks time validity.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Reason, Reject};

/// Claims xgate reads from a token.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Claims {
    pub sub: String,
    pub dept: String,
    pub exp: u64,
    #[serde(default)]
    pub nbf: Option<u64>,
    /// Purposes the token was issued for; absent: any purpose the grant allows.
    #[serde(default)]
    pub purposes: Option<Vec<String>>,
}

/// Settings for token verification.
#[derive(Debug, Clone)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    /// Clock skew tolerated on `exp`/`nbf`, seconds.
    pub leeway_secs: u64,
    /// Verified tokens kept in the cache.
    pub cache_capacity: usize,
}

struct Key {
    key: DecodingKey,
    validation: Validation,
}

/// Verifies bearer tokens.
pub struct TokenVerifier {
    keys: HashMap<String, Key>,
    /// The only key, when the JWKS has exactly one (tokens may then omit `kid`).
    single: Option<String>,
    settings: TokenSettings,
    cache: Mutex<HashMap<[u8; 32], Arc<Claims>>>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// Load a JWKS file (`{"keys": [...]}`).
    pub fn from_jwks_file(path: &Path, settings: TokenSettings) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_jwks(&bytes, settings).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_jwks(json: &[u8], settings: TokenSettings) -> Result<Self, String> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = HashMap::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| format!("keys[{i}] has no `kid`"))?;
            let alg = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(a), _) => Algorithm::from_str_opt(&a.to_string()),
                (None, jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec)) => match ec.curve
                {
                    jsonwebtoken::jwk::EllipticCurve::P256 => Some(Algorithm::ES256),
                    jsonwebtoken::jwk::EllipticCurve::P384 => Some(Algorithm::ES384),
                    jsonwebtoken::jwk::EllipticCurve::Ed25519 => Some(Algorithm::EdDSA),
                    _ => None,
                },
                (None, jsonwebtoken::jwk::AlgorithmParameters::RSA(_)) => Some(Algorithm::RS256),
                _ => None,
            }
            .ok_or_else(|| format!("keys[{i}] (`{kid}`): unsupported or missing `alg`"))?;
            if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                return Err(format!("keys[{i}] (`{kid}`): HMAC keys are not accepted"));
            }
            let key =
                DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}] (`{kid}`): {e}"))?;
            let mut v = Validation::new(alg);
            v.set_issuer(&[&settings.issuer]);
            v.set_audience(&[&settings.audience]);
            v.leeway = settings.leeway_secs;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            keys.insert(kid, Key { key, validation: v });
        }
        if keys.is_empty() {
            return Err("the JWKS has no keys".into());
        }
        let single = (keys.len() == 1)
            .then(|| keys.keys().next().cloned())
            .flatten();
        Ok(Self {
            keys,
            single,
            settings,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Verify a token from an `authorization` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Arc<Claims>, Reject> {
        let Some(h) = header else {
            return Err(Reject::new(
                Reason::TokenMissing,
                "send `authorization: Bearer <JWT>` issued by the province's identity provider",
            ));
        };
        let token = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Reject::new(
                    Reason::TokenMalformed,
                    "the authorization header is not `Bearer <JWT>`",
                )
            })?;
        self.verify(token)
    }

    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, Reject> {
        let now = now_secs();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self.cache.lock().ok().and_then(|m| m.get(&digest).cloned()) {
            // Re-check time on every hit: a cached token expires like any other.
            self.check_times(&c, now)?;
            return Ok(c);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            Reject::new(
                Reason::TokenMalformed,
                "the bearer token is not a well-formed JWT",
            )
        })?;
        let kid = header.kid.as_deref().or(self.single.as_deref());
        let Some(key) = kid.and_then(|k| self.keys.get(k)) else {
            return Err(Reject::new(
                Reason::TokenKeyUnknown,
                "the token's signing key (`kid`) is not one the gateway trusts",
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
        let claims = Arc::new(data.claims);
        if claims.dept.is_empty() || claims.sub.is_empty() {
            return Err(Reject::new(
                Reason::TokenClaimMissing,
                "the token needs non-empty `sub` and `dept` claims",
            ));
        }
        if let Ok(mut m) = self.cache.lock() {
            if m.len() >= self.settings.cache_capacity {
                // Cheap bound: drop the expired, then everything if still full.
                m.retain(|_, c| c.exp + self.settings.leeway_secs > now);
                if m.len() >= self.settings.cache_capacity {
                    m.clear();
                }
            }
            m.insert(digest, claims.clone());
        }
        Ok(claims)
    }

    fn check_times(&self, c: &Claims, now: u64) -> Result<(), Reject> {
        let leeway = self.settings.leeway_secs;
        if c.exp + leeway <= now {
            return Err(Reject::new(
                Reason::TokenExpired,
                "the token has expired; get a new one",
            ));
        }
        if c.nbf.is_some_and(|nbf| nbf > now + leeway) {
            return Err(Reject::new(
                Reason::TokenNotYetValid,
                "the token is not valid yet (`nbf`)",
            ));
        }
        Ok(())
    }
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

trait FromStrOpt {
    fn from_str_opt(s: &str) -> Option<Algorithm>;
}

impl FromStrOpt for Algorithm {
    fn from_str_opt(s: &str) -> Option<Algorithm> {
        s.parse().ok()
    }
}
