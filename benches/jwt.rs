//! What one JWT signature check costs: `jsonwebtoken`'s `rust_crypto` back end against the
//! ring-backed verifier xgate installs (`src/jwt_ring.rs`), same token, same key, one run.
//!
//! `cargo bench --bench jwt` prints µs per ES256 verification for both and their ratio.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{hint::black_box, time::Instant};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, encode, jwk::JwkSet};

fn main() {
    // Without `--bench` (`cargo test --all-targets`): a quick pass, its checks included.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (pem, jwks) = xgate::dev::pki::jwt_keypair("k").unwrap();
    let jwks: JwkSet = serde_json::from_str(&jwks).unwrap();
    let key = DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
    let token = encode(
        &Header::new(Algorithm::ES256),
        &serde_json::json!({"sub": "s", "dept": "civil-affairs", "exp": 4_000_000_000u64}),
        &EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let (msg, sig) = token.rsplit_once('.').unwrap();
    let sig =
        base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, sig).unwrap();
    // Both back ends accept the token and refuse it with one bit of its signature flipped:
    // what is timed is a real verification.
    let mut forged = sig.clone();
    forged[10] ^= 1;
    for provider in [
        &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
        xgate::token::ring::provider(),
    ] {
        let v = (provider.verifier_factory)(&Algorithm::ES256, &key).unwrap();
        assert!(v.verify(msg.as_bytes(), &sig).is_ok());
        assert!(v.verify(msg.as_bytes(), &forged).is_err());
    }
    let time = |provider: &jsonwebtoken::crypto::CryptoProvider| {
        let n = if quick { 20 } else { 2_000 };
        let t = Instant::now();
        for _ in 0..n {
            let v = (provider.verifier_factory)(&Algorithm::ES256, &key).unwrap();
            v.verify(black_box(msg.as_bytes()), black_box(&sig))
                .unwrap();
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(n)
    };
    let (mut rc, mut ring) = (f64::MAX, f64::MAX);
    for _ in 0..3 {
        rc = rc.min(time(&jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER));
        ring = ring.min(time(xgate::token::ring::provider()));
    }
    println!("ES256 verify, rust_crypto: {rc:.1} µs");
    println!("ES256 verify, ring:        {ring:.1} µs");
    println!("ratio ring / rust_crypto:  {:.2}", ring / rc);
}
