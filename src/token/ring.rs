//! JWT signature verification on `ring`, plugged into `jsonwebtoken` as its crypto provider.
//!
//! `jsonwebtoken`'s `rust_crypto` back end verifies an ES256 signature in ~165 µs on this
//! class of machine; `ring` (already in the build for TLS) does it in ~40 µs. Every token the
//! gateway has not seen yet costs one verification, so this is the per-call price of a fresh
//! token. Signing (dev tokens only) and JWK key utilities stay with `rust_crypto`.

use std::sync::OnceLock;

use jsonwebtoken::{
    Algorithm, DecodingKey, DecodingKeyKind,
    crypto::{CryptoProvider, JwtVerifier},
    errors::{Error, ErrorKind},
    signature::{self, Verifier},
};
use ring::signature::{self as rs, UnparsedPublicKey, VerificationAlgorithm};

/// The ring-backed provider (verification on ring; signing and JWK utilities from
/// `rust_crypto`).
pub fn provider() -> &'static CryptoProvider {
    static PROVIDER: OnceLock<CryptoProvider> = OnceLock::new();
    PROVIDER.get_or_init(|| CryptoProvider {
        verifier_factory: new_verifier,
        ..jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.clone()
    })
}

/// Install the ring-backed provider for this process (idempotent; the first call wins).
pub fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        // Another provider installed first (a test, an embedding program) keeps working.
        let _ = provider().install_default();
    });
}

/// A public key and the ring algorithm that checks it.
struct RingVerifier {
    alg: Algorithm,
    check: Check,
}

enum Check {
    Public(&'static dyn VerificationAlgorithm, Vec<u8>),
    RsaComponents(&'static rs::RsaParameters, Vec<u8>, Vec<u8>),
    Hmac(ring::hmac::Key),
}

fn new_verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    let bytes = || match key.kind() {
        DecodingKeyKind::SecretOrDer(b) => Ok(b.clone()),
        DecodingKeyKind::RsaModulusExponent { .. } => Err(Error::from(ErrorKind::InvalidKeyFormat)),
    };
    let rsa = |params: &'static rs::RsaParameters| -> Result<Check, Error> {
        Ok(match key.kind() {
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                Check::RsaComponents(params, n.clone(), e.clone())
            }
            DecodingKeyKind::SecretOrDer(der) => Check::Public(params, der.clone()),
        })
    };
    let hmac = |a: ring::hmac::Algorithm| -> Result<Check, Error> {
        Ok(Check::Hmac(ring::hmac::Key::new(a, &bytes()?)))
    };
    let check = match alg {
        Algorithm::ES256 => Check::Public(&rs::ECDSA_P256_SHA256_FIXED, bytes()?),
        Algorithm::ES384 => Check::Public(&rs::ECDSA_P384_SHA384_FIXED, bytes()?),
        Algorithm::EdDSA => Check::Public(&rs::ED25519, bytes()?),
        Algorithm::RS256 => rsa(&rs::RSA_PKCS1_2048_8192_SHA256)?,
        Algorithm::RS384 => rsa(&rs::RSA_PKCS1_2048_8192_SHA384)?,
        Algorithm::RS512 => rsa(&rs::RSA_PKCS1_2048_8192_SHA512)?,
        Algorithm::PS256 => rsa(&rs::RSA_PSS_2048_8192_SHA256)?,
        Algorithm::PS384 => rsa(&rs::RSA_PSS_2048_8192_SHA384)?,
        Algorithm::PS512 => rsa(&rs::RSA_PSS_2048_8192_SHA512)?,
        Algorithm::HS256 => hmac(ring::hmac::HMAC_SHA256)?,
        Algorithm::HS384 => hmac(ring::hmac::HMAC_SHA384)?,
        Algorithm::HS512 => hmac(ring::hmac::HMAC_SHA512)?,
        _ => return Err(ErrorKind::InvalidAlgorithm.into()),
    };
    Ok(Box::new(RingVerifier { alg: *alg, check }))
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        let ok = match &self.check {
            Check::Public(alg, key) => UnparsedPublicKey::new(*alg, key).verify(msg, sig).is_ok(),
            Check::RsaComponents(params, n, e) => rs::RsaPublicKeyComponents { n, e }
                .verify(params, msg, sig)
                .is_ok(),
            Check::Hmac(k) => ring::hmac::verify(k, msg, sig).is_ok(),
        };
        if ok {
            Ok(())
        } else {
            Err(signature::Error::new())
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, Validation, decode, encode};

    use super::*;

    /// Tokens signed by `rust_crypto` verify under ring; a flipped signature bit does not.
    #[test]
    fn ring_verifies_what_rust_crypto_signs() {
        install();
        let (pem, jwks) = crate::dev::pki::jwt_keypair("k").unwrap();
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks).unwrap();
        let enc = &EncodingKey::from_ec_pem(pem.as_bytes()).unwrap();
        let dec = &DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
        let claims = serde_json::json!({"sub": "s", "exp": 4_000_000_000u64});
        let t = encode(&Header::new(Algorithm::ES256), &claims, enc).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.required_spec_claims.clear();
        decode::<serde_json::Value>(&t, dec, &v).unwrap();
        let mut bad = t.clone().into_bytes();
        let n = bad.len();
        bad[n - 5] = if bad[n - 5] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert!(decode::<serde_json::Value>(&bad, dec, &v).is_err());
        // HMAC.
        let t = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.required_spec_claims.clear();
        decode::<serde_json::Value>(
            &t,
            &DecodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
            &v,
        )
        .unwrap();
        assert!(
            decode::<serde_json::Value>(
                &t,
                &DecodingKey::from_secret(b"another secret, 32 bytes long..."),
                &v
            )
            .is_err()
        );
    }
}
