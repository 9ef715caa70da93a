//! Keys from the identity provider over HTTPS: rotation picked up on an unknown `kid`, a flood
//! of bogus `kid`s that does not hammer the provider, last good keys while it is down, and
//! `UNAVAILABLE` (not `UNAUTHENTICATED`) when no usable keys are left.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::*;
use http_body_util::Full;
use hyper::{Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tonic::Code;
use xgate::dev::pki as devpki;

/// A tiny HTTPS identity provider publishing a JWKS.
struct Idp {
    addr: SocketAddr,
    jwks: Arc<Mutex<String>>,
    up: Arc<AtomicBool>,
    fetches: Arc<AtomicU64>,
}

impl Idp {
    async fn start(jwks: String) -> Idp {
        let c = certs();
        let cert = std::fs::read(c.join("provider-public-security.pem")).unwrap();
        let key = std::fs::read(c.join("provider-public-security.key")).unwrap();
        let cfg = {
            use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
            let chain = CertificateDer::pem_slice_iter(&cert)
                .map(|c| c.unwrap())
                .collect();
            let mut cfg = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(chain, PrivateKeyDer::from_pem_slice(&key).unwrap())
                .unwrap();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(cfg)
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let idp = Idp {
            addr,
            jwks: Arc::new(Mutex::new(jwks)),
            up: Arc::new(AtomicBool::new(true)),
            fetches: Arc::new(AtomicU64::new(0)),
        };
        let (jwks, up, fetches) = (idp.jwks.clone(), idp.up.clone(), idp.fetches.clone());
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, jwks, up, fetches) =
                    (acceptor.clone(), jwks.clone(), up.clone(), fetches.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |_req| {
                        let (jwks, up, fetches) = (jwks.clone(), up.clone(), fetches.clone());
                        async move {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            let (status, body) = if up.load(Ordering::SeqCst) {
                                (200, jwks.lock().unwrap().clone())
                            } else {
                                (503, "down for maintenance".to_owned())
                            };
                            Ok::<_, std::convert::Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        idp
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn merged(a: &str, b: &str) -> String {
    let mut x: serde_json::Value = serde_json::from_str(a).unwrap();
    let y: serde_json::Value = serde_json::from_str(b).unwrap();
    x["keys"]
        .as_array_mut()
        .unwrap()
        .extend(y["keys"].as_array().unwrap().iter().cloned());
    x.to_string()
}

async fn harness(idp: &Idp, keys_max_age: u64) -> Harness {
    let url = format!(
        "https://localhost:{}/.well-known/jwks.json",
        idp.addr.port()
    );
    Harness::start(Opts {
        config: Some(Arc::new(move |c| {
            c.jwt.jwks = None;
            c.jwt.jwks_url = Some(url.clone());
            c.jwt.jwks_ca = Some(certs().join("ca.pem"));
            c.jwt.keys_max_age_secs = keys_max_age;
            c.jwt.unknown_kid_refresh_secs = 1;
            c.jwt.refresh_interval_secs = 3600;
        })),
        ..Opts::default()
    })
    .await
}

async fn list(h: &Harness, tok: &str) -> Result<(), tonic::Status> {
    h.catalog("civil-affairs")
        .await
        .list_datasets(req(xgate::pb::ListDatasetsRequest {}, tok))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_floods_and_outages() {
    let dev_jwks = std::fs::read_to_string(certs().join("jwks.json")).unwrap();
    let idp = Idp::start(dev_jwks.clone()).await;
    let mut h = harness(&idp, 5).await;
    assert_eq!(idp.fetches(), 1, "fetched once at start-up");
    list(&h, &token("civil-affairs")).await.unwrap();

    // The identity provider rotates in a new key; a token signed with it works at once.
    let (new_key, new_jwks) = devpki::jwt_keypair("idp-2027-01").unwrap();
    *idp.jwks.lock().unwrap() = merged(&dev_jwks, &new_jwks);
    let rotated = devpki::mint_token(
        &new_key,
        "idp-2027-01",
        &devpki::dev_claims("civil-affairs", "u", None, 600),
    )
    .unwrap();
    list(&h, &rotated).await.unwrap();
    assert_eq!(idp.fetches(), 2, "one fetch for the unknown kid");

    // A flood of bogus kids: each refused, the provider asked at most once more.
    let (junk, _) = devpki::jwt_keypair("x").unwrap();
    for i in 0..50 {
        let t = devpki::mint_token(
            &junk,
            &format!("bogus-{i}"),
            &devpki::dev_claims("civil-affairs", "u", None, 600),
        )
        .unwrap();
        let st = list(&h, &t).await.unwrap_err();
        assert_reject(&st, Code::Unauthenticated, "TOKEN_KEY_UNKNOWN");
    }
    assert!(
        idp.fetches() <= 4,
        "the flood hammered the provider: {} fetches",
        idp.fetches()
    );

    // The provider goes down: the last good keys keep working for their lifetime ...
    idp.up.store(false, Ordering::SeqCst);
    list(&h, &token("civil-affairs")).await.unwrap();
    // A token under a key we cannot look up now: the provider's fault, not the token's.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (k3, _) = devpki::jwt_keypair("idp-2027-02").unwrap();
    let t3 = devpki::mint_token(
        &k3,
        "idp-2027-02",
        &devpki::dev_claims("civil-affairs", "u", None, 600),
    )
    .unwrap();
    let st = list(&h, &t3).await.unwrap_err();
    assert_reject(&st, Code::Unavailable, "TOKEN_KEYS_UNAVAILABLE");
    // ... then the answer is UNAVAILABLE with its own reason, never UNAUTHENTICATED.
    tokio::time::sleep(Duration::from_millis(4_200)).await;
    let st = list(&h, &token("civil-affairs")).await.unwrap_err();
    assert_reject(&st, Code::Unavailable, "TOKEN_KEYS_UNAVAILABLE");
    // Back up: the next call after the refresh gap gets fresh keys.
    idp.up.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    list(&h, &token("civil-affairs")).await.unwrap();

    let recs = h.stop().await;
    assert!(
        recs.iter()
            .any(|r| r["reason"] == "TOKEN_KEYS_UNAVAILABLE" && r["grpc_status"] == "UNAVAILABLE")
    );
    assert_eq!(h.provider_calls(), 0);
}

#[tokio::test]
async fn identity_provider_down_at_start_up_means_unavailable() {
    let dev_jwks = std::fs::read_to_string(certs().join("jwks.json")).unwrap();
    let idp = Idp::start(dev_jwks).await;
    idp.up.store(false, Ordering::SeqCst);
    let mut h = harness(&idp, 3600).await;
    let st = list(&h, &token("civil-affairs")).await.unwrap_err();
    assert_reject(&st, Code::Unavailable, "TOKEN_KEYS_UNAVAILABLE");
    idp.up.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    list(&h, &token("civil-affairs")).await.unwrap();
    h.stop().await;
}
