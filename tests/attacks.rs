//! The attack suite: hostile callers against the real gateway over real TLS. Every case
//! asserts the exact gRPC code and `ErrorInfo` reason, that the refusal was audited, and that
//! the provider received nothing. Add new cases here as new attacks are met.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_types::StatusExt;
use xgate::{
    dev::pki::{self as devpki, DevCa, Leaf},
    pb,
};

fn trace_of(st: &tonic::Status) -> String {
    st.get_error_details()
        .error_info()
        .and_then(|i| i.metadata.get("trace_id").cloned())
        .unwrap_or_default()
}

/// Every refusal in `traces` has exactly one audit record, a denial with its reason.
fn assert_audited(recs: &[serde_json::Value], traces: &[(String, &str)]) {
    for (t, reason) in traces {
        let m: Vec<_> = recs
            .iter()
            .filter(|r| r["trace_id"] == t.as_str())
            .collect();
        assert_eq!(m.len(), 1, "one record for {t} ({reason}): {recs:#?}");
        assert_eq!(m[0]["decision"], "deny", "{t}");
        assert_eq!(m[0]["reason"], *reason, "{t}");
    }
}

fn jwt(header: serde_json::Value, claims: serde_json::Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(sig)
    )
}

fn claims(dept: &str) -> serde_json::Value {
    devpki::dev_claims(dept, "attacker", None, 600)
}

fn with(mut c: serde_json::Value, k: &str, v: serde_json::Value) -> serde_json::Value {
    c[k] = v;
    c
}

fn without(mut c: serde_json::Value, k: &str) -> serde_json::Value {
    c.as_object_mut().unwrap().remove(k);
    c
}

fn hs256(secret: &[u8], header: serde_json::Value, claims: serde_json::Value) -> String {
    let signing_input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let sig = ring::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", B64.encode(sig.as_ref()))
}

#[tokio::test]
async fn hostile_tokens() {
    let mut h = Harness::start(Opts::default()).await;
    let mut c = h.data("civil-affairs").await;
    let now = xgate::token::now_secs();
    let (other_key, _) = devpki::jwt_keypair(devpki::KID).unwrap();
    let jwks = std::fs::read(certs().join("jwks.json")).unwrap();
    let ca = claims("civil-affairs");
    let es = |c: serde_json::Value| token_with(c);
    // (case, authorization header, code, reason)
    let cases: Vec<(&str, Option<String>, Code, &str)> = vec![
        ("no token", None, Code::Unauthenticated, "TOKEN_MISSING"),
        (
            "not a bearer token",
            Some("Basic YWxhZGRpbjpvcGVuc2VzYW1l".into()),
            Code::Unauthenticated,
            "TOKEN_MALFORMED",
        ),
        (
            "alg none",
            Some(jwt(
                serde_json::json!({"alg": "none", "typ": "JWT"}),
                ca.clone(),
                b"",
            )),
            Code::Unauthenticated,
            "TOKEN_ALGORITHM_NOT_ALLOWED",
        ),
        (
            "HS256 signed with the public key's bytes",
            Some(hs256(
                &jwks,
                serde_json::json!({"alg": "HS256", "kid": devpki::KID}),
                ca.clone(),
            )),
            Code::Unauthenticated,
            "TOKEN_ALGORITHM_NOT_ALLOWED",
        ),
        (
            "RS256 header on the EC key",
            Some(jwt(
                serde_json::json!({"alg": "RS256", "kid": devpki::KID}),
                ca.clone(),
                &[7; 256],
            )),
            Code::Unauthenticated,
            "TOKEN_SIGNATURE_INVALID",
        ),
        (
            "forged signature under the trusted kid",
            Some(devpki::mint_token(&other_key, devpki::KID, &ca).unwrap()),
            Code::Unauthenticated,
            "TOKEN_SIGNATURE_INVALID",
        ),
        (
            "unknown kid",
            Some(devpki::mint_token(&other_key, "rotated-away", &ca).unwrap()),
            Code::Unauthenticated,
            "TOKEN_KEY_UNKNOWN",
        ),
        (
            "path-traversal kid",
            Some(jwt(
                serde_json::json!({"alg": "ES256", "kid": "../../../../etc/passwd"}),
                ca.clone(),
                &[1; 64],
            )),
            Code::Unauthenticated,
            "TOKEN_KEY_UNKNOWN",
        ),
        (
            "huge kid",
            Some(jwt(
                serde_json::json!({"alg": "ES256", "kid": "k".repeat(400)}),
                ca.clone(),
                &[1; 64],
            )),
            Code::Unauthenticated,
            "TOKEN_MALFORMED",
        ),
        (
            "malformed base64",
            Some("@@@.###.$$$".into()),
            Code::Unauthenticated,
            "TOKEN_MALFORMED",
        ),
        (
            "malformed JSON",
            Some(format!(
                "{}.{}.{}",
                B64.encode("{not json"),
                B64.encode("{}"),
                B64.encode("x")
            )),
            Code::Unauthenticated,
            "TOKEN_MALFORMED",
        ),
        (
            "oversized token",
            Some("a".repeat(10_000)),
            Code::Unauthenticated,
            "TOKEN_TOO_LARGE",
        ),
        (
            "expired",
            Some(es(with(
                with(ca.clone(), "exp", (now - 3600).into()),
                "iat",
                (now - 7200).into(),
            ))),
            Code::Unauthenticated,
            "TOKEN_EXPIRED",
        ),
        (
            "not yet valid",
            Some(es(with(ca.clone(), "nbf", (now + 3600).into()))),
            Code::Unauthenticated,
            "TOKEN_NOT_YET_VALID",
        ),
        (
            "issued in the future",
            Some(es(with(
                with(ca.clone(), "iat", (now + 3600).into()),
                "exp",
                (now + 4000).into(),
            ))),
            Code::Unauthenticated,
            "TOKEN_NOT_YET_VALID",
        ),
        (
            "wrong audience",
            Some(es(with(ca.clone(), "aud", "another-gateway".into()))),
            Code::Unauthenticated,
            "TOKEN_AUDIENCE_INVALID",
        ),
        (
            "wrong issuer",
            Some(es(with(
                ca.clone(),
                "iss",
                "https://idp.evil.example".into(),
            ))),
            Code::Unauthenticated,
            "TOKEN_ISSUER_INVALID",
        ),
        (
            "thirty-day lifetime",
            Some(es(with(ca.clone(), "exp", (now + 30 * 86_400).into()))),
            Code::Unauthenticated,
            "TOKEN_LIFETIME_TOO_LONG",
        ),
        (
            "no dept claim",
            Some(es(without(ca.clone(), "dept"))),
            Code::Unauthenticated,
            "TOKEN_CLAIM_MISSING",
        ),
        (
            "no sub claim",
            Some(es(without(ca.clone(), "sub"))),
            Code::Unauthenticated,
            "TOKEN_CLAIM_MISSING",
        ),
        (
            "token of another department",
            Some(token("health")),
            Code::PermissionDenied,
            "TOKEN_DEPT_MISMATCH",
        ),
        (
            "no exp claim",
            Some(es(without(ca.clone(), "exp"))),
            Code::Unauthenticated,
            "TOKEN_CLAIM_MISSING",
        ),
        (
            "a crit extension the gateway does not implement",
            Some(jwt(
                serde_json::json!({"alg": "ES256", "kid": devpki::KID, "crit": ["x-policy"], "x-policy": 1}),
                ca.clone(),
                b"sig",
            )),
            Code::Unauthenticated,
            "TOKEN_MALFORMED",
        ),
        (
            "two authorization headers",
            Some(token("civil-affairs")),
            Code::Unauthenticated,
            "TOKEN_MALFORMED",
        ),
    ];
    let mut traces = Vec::new();
    for (name, header, code, reason) in &cases {
        let mut r = tonic::Request::new(query("hukou.person_basic", "subsidy-eligibility", &[], 1));
        if let Some(hv) = header {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {hv}").parse().unwrap());
            if name == &"not a bearer token" {
                r.metadata_mut()
                    .insert("authorization", hv.parse().unwrap());
            }
            if name == &"two authorization headers" {
                r.metadata_mut().append(
                    "authorization",
                    format!("Bearer {}", token("health")).parse().unwrap(),
                );
            }
        }
        let st = c.query(r).await.expect_err(name);
        assert_eq!(st.code(), *code, "{name}: {st:?}");
        let info = st
            .get_error_details()
            .error_info()
            .cloned()
            .unwrap_or_else(|| panic!("{name}: no ErrorInfo"));
        assert_eq!(info.reason, *reason, "{name}: {st:?}");
        traces.push((trace_of(&st), *reason));
    }
    let recs = h.stop().await;
    assert_eq!(
        h.provider_calls(),
        0,
        "no hostile token reached the provider"
    );
    assert_eq!(recs.len(), cases.len());
    assert_audited(&recs, &traces);
}

/// Handshake-level refusals: (what, certificate or none) — the client cannot even call.
#[tokio::test]
async fn hostile_certificates_fail_the_handshake_and_are_audited() {
    let mut h = Harness::start(Opts::default()).await;
    let dev = DevCa::load_dir(&certs()).unwrap();
    let rogue = DevCa::generate("rogue CA").unwrap();
    let leaf = devpki::consumer_leaf("civil-affairs", "subsidy");
    // (what, certificate and key or none, what the audit record's detail says)
    type CertCase = (&'static str, Option<(String, String)>, &'static str);
    let cases: Vec<CertCase> = vec![
        ("no client certificate", None, "no certificates"),
        (
            "another CA",
            Some(rogue.issue(&leaf).unwrap()),
            "UnknownIssuer",
        ),
        (
            "expired",
            Some(
                dev.issue(&Leaf {
                    years: Some((2020, 2021)),
                    ..leaf.clone()
                })
                .unwrap(),
            ),
            "certificate expired",
        ),
        (
            "not yet valid",
            Some(
                dev.issue(&Leaf {
                    years: Some((2040, 2045)),
                    ..leaf.clone()
                })
                .unwrap(),
            ),
            "not valid yet",
        ),
    ];
    for (name, cert, _) in &cases {
        let cert = cert.as_ref().map(|(c, k)| (c.as_str(), k.as_str()));
        assert!(
            !call_goes_through(&h, cert).await,
            "{name}: the call went through"
        );
    }
    // HTTP/1.1 instead of HTTP/2: refused at ALPN.
    let (c, k) = (
        std::fs::read_to_string(certs().join("civil-affairs.pem")).unwrap(),
        std::fs::read_to_string(certs().join("civil-affairs.key")).unwrap(),
    );
    let err = tls_handshake(&h, &c, &k, vec![b"http/1.1".to_vec()])
        .await
        .unwrap_err();
    assert!(
        err.contains("NoApplicationProtocol")
            || err.contains("no_application_protocol")
            || err.contains("alert"),
        "{err}"
    );
    let recs = h.stop().await;
    assert_eq!(h.provider_calls(), 0);
    assert_eq!(recs.len(), cases.len() + 1, "{recs:#?}");
    for r in &recs {
        assert_eq!(r["method"], "(tls-handshake)");
        assert_eq!(r["reason"], "TLS_HANDSHAKE_FAILED");
    }
    for (name, _, detail) in &cases {
        assert!(
            recs.iter()
                .any(|r| r["detail"].as_str().unwrap_or("").contains(detail)),
            "{name}: no record mentioning `{detail}`: {recs:#?}"
        );
    }
}

/// A raw TLS handshake with the given client certificate and ALPN offer.
async fn tls_handshake(
    h: &Harness,
    cert: &str,
    key: &str,
    alpn: Vec<Vec<u8>>,
) -> Result<Vec<u8>, String> {
    let mut tls = tls_connect(h, cert, key, alpn, b"").await?;
    // TLS 1.3: the server's verdict on the client certificate arrives after the client's
    // handshake completes; a read surfaces it.
    let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(2), tls.read(&mut buf)).await {
        Ok(Err(e)) => return Err(format!("{e:?}")),
        Ok(Ok(0)) => return Err("closed".into()),
        _ => {}
    }
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    Ok(peer)
}

/// A TLS connection to the gateway with `cert`, offering `alpn`, after `prefix` (raw bytes
/// before the handshake: a PROXY header); nothing sent on it yet.
async fn tls_connect(
    h: &Harness,
    cert: &str,
    key: &str,
    alpn: Vec<Vec<u8>>,
    prefix: &[u8],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs().join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
        .map(|c| c.unwrap())
        .collect();
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            chain,
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    cfg.alpn_protocols = alpn;
    let mut tcp = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    tcp.write_all(prefix).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("{e:?}"))
}

/// Read until the peer closes (or `within` passes): the bytes read, and whether it closed.
async fn read_to_close(
    tls: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    within: Duration,
) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

/// A connection that completes mTLS but never speaks HTTP/2 is closed after the handshake
/// timeout; one that speaks it but starts no call is sent GOAWAY after the idle timeout.
#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let h = Harness::start(Opts {
        config: Some(Arc::new(|c| {
            c.tls.handshake_timeout_ms = 300;
            c.limits.connection_idle_secs = 1;
        })),
        admin: true,
        ..Opts::default()
    })
    .await;
    let (c, k) = (
        std::fs::read_to_string(certs().join("civil-affairs.pem")).unwrap(),
        std::fs::read_to_string(certs().join("civil-affairs.key")).unwrap(),
    );
    let h2 = || vec![b"h2".to_vec()];
    // Silent after the handshake.
    let mut silent = tls_connect(&h, &c, &k, h2(), b"").await.unwrap();
    let t0 = Instant::now();
    let (_, closed) = read_to_close(&mut silent, Duration::from_secs(5)).await;
    assert!(closed, "a silent connection stayed open");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // The preface and SETTINGS, then nothing: GOAWAY (frame type 7) once idle.
    let mut idle = tls_connect(&h, &c, &k, h2(), b"").await.unwrap();
    idle.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    // (The connection then closes once the client acknowledges the GOAWAY's PING; this one
    // never does.)
    let (got, _) = read_to_close(&mut idle, Duration::from_millis(2500)).await;
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= got.len() {
        let len = (usize::from(got[at]) << 16)
            | (usize::from(got[at + 1]) << 8)
            | usize::from(got[at + 2]);
        frames.push(got[at + 3]);
        at += 9 + len;
    }
    assert!(
        frames.contains(&7),
        "GOAWAY among the frames sent: {frames:?}"
    );
    // A working client is unaffected: its channel reconnects after a GOAWAY.
    let mut client = h.data("civil-affairs").await;
    let t = token("civil-affairs");
    for _ in 0..2 {
        client
            .query(req(
                query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                &t,
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let (_, metrics) = http(h.admin.unwrap(), "GET", "/metrics").await;
    assert!(
        metrics.contains("xgate_connections_closed_total{why=\"preface-timeout\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("xgate_connections_closed_total{why=\"idle\"}"),
        "{metrics}"
    );
}

/// Closed by default: a system whose certificate chains to the government CA but whose
/// department the model does not register is refused every method, the catalogue included,
/// and each refusal is audited. Registered departments keep the whole catalogue.
#[tokio::test]
async fn an_unregistered_department_is_refused_every_method_catalogue_included() {
    let mut h = Harness::start(Opts::default()).await;
    let dev = DevCa::load_dir(&certs()).unwrap();
    let (c, k) = dev
        .issue(&devpki::consumer_leaf("shadow-dept", "x"))
        .unwrap();
    let ch = channel_with(&h, &c, &k).await.unwrap();
    let tok = token("shadow-dept");
    let mut traces = Vec::new();
    let st = pb::catalog_client::CatalogClient::new(ch.clone())
        .list_datasets(req(pb::ListDatasetsRequest::default(), &tok))
        .await
        .expect_err("ListDatasets");
    assert_reject(&st, Code::PermissionDenied, "CONSUMER_UNKNOWN");
    assert!(st.message().contains("shadow-dept"), "{}", st.message());
    traces.push((trace_of(&st), "CONSUMER_UNKNOWN"));
    let st = pb::catalog_client::CatalogClient::new(ch.clone())
        .describe_dataset(req(
            pb::DescribeDatasetRequest {
                dataset: "hukou.person_basic".into(),
                purpose: String::new(),
            },
            &tok,
        ))
        .await
        .expect_err("DescribeDataset");
    assert_reject(&st, Code::PermissionDenied, "CONSUMER_UNKNOWN");
    traces.push((trace_of(&st), "CONSUMER_UNKNOWN"));
    let st = pb::data_exchange_client::DataExchangeClient::new(ch)
        .query(req(
            query(
                "market.company_registry",
                "medical-institution-licensing",
                &[],
                1,
            ),
            &tok,
        ))
        .await
        .expect_err("Query of an unconditional dataset");
    assert_reject(&st, Code::PermissionDenied, "CONSUMER_UNKNOWN");
    traces.push((trace_of(&st), "CONSUMER_UNKNOWN"));
    // A registered department sees every dataset.
    let all = h
        .catalog("health")
        .await
        .list_datasets(req(pb::ListDatasetsRequest::default(), &token("health")))
        .await
        .unwrap()
        .into_inner();
    assert!(all.datasets.len() >= 3, "{all:?}");
    let recs = h.stop().await;
    assert_audited(&recs, &traces);
    for (t, _) in &traces {
        let r = recs.iter().find(|r| r["trace_id"] == t.as_str()).unwrap();
        assert_eq!(r["rule"], "department-registry");
        assert_eq!(r["consumer_dept"], "shadow-dept");
    }
}

/// RFC 8705's `x5t#S256` of a certificate, computed by OpenSSL (not by xgate): the
/// base64url SHA-256 of the certificate's DER.
fn openssl_x5t(pem: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let run = |args: &[&str], input: &[u8]| {
        let mut child = Command::new("openssl")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "openssl {args:?}");
        out.stdout
    };
    let der = run(&["x509", "-outform", "DER"], pem.as_bytes());
    let digest = run(&["dgst", "-sha256", "-binary"], &der);
    assert_eq!(digest.len(), 32);
    B64.encode(digest)
}

/// `require_bound_tokens` on a dataset: every caller of it needs a token bound to its
/// certificate, whatever its department says; other datasets are unaffected.
#[tokio::test]
async fn a_dataset_that_requires_bound_tokens_refuses_unbound_ones() {
    let mut h = Harness::start(Opts {
        edit_policy: Some(|p| {
            p.replace(
                "  - id: hukou.person_basic\n",
                "  - id: hukou.person_basic\n    require_bound_tokens: true\n",
            )
        }),
        ..Opts::default()
    })
    .await;
    let q = || query("hukou.person_basic", "subsidy-eligibility", &[], 1);
    let mut c = h.data("civil-affairs").await;
    let st = c
        .query(req(q(), &token("civil-affairs")))
        .await
        .unwrap_err();
    assert_reject(&st, Code::Unauthenticated, "TOKEN_BINDING_REQUIRED");
    let pem = std::fs::read_to_string(certs().join("civil-affairs.pem")).unwrap();
    let bound = token_with(with(
        claims("civil-affairs"),
        "cnf",
        serde_json::json!({ "x5t#S256": openssl_x5t(&pem) }),
    ));
    let ok = c.query(req(q(), &bound)).await.unwrap();
    assert_eq!(ok.get_ref().rows.len(), 1);
    // Another dataset of the same caller takes an unbound token.
    let mut hc = h.data("health").await;
    hc.query(req(
        query(
            "market.company_registry",
            "medical-institution-licensing",
            &[],
            1,
        ),
        &token("health"),
    ))
    .await
    .unwrap();
    let recs = h.stop().await;
    let r: Vec<_> = recs
        .iter()
        .filter(|r| r["trace_id"] == trace_of(&st).as_str())
        .collect();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["rule"], "binding-required:dataset:hukou.person_basic");
    assert_eq!(
        h.ps.stats.calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the bound call reached public-security"
    );
}

#[tokio::test]
async fn hostile_identities_are_refused_per_call() {
    let mut h = Harness::start(Opts {
        edit_policy: Some(|p| {
            p.replace(
                "  - { id: xihu-civil-affairs,",
                "  - { id: bound-only, name: Bound Only, level: county, region: \"330108\", require_bound_tokens: true }\n  - { id: xihu-civil-affairs,",
            )
        }),
        ..Opts::default()
    })
    .await;
    let dev = DevCa::load_dir(&certs()).unwrap();
    let q = || query("hukou.person_basic", "subsidy-eligibility", &[], 1);
    let mut traces = Vec::new();
    let mut expect = async |ch: tonic::transport::Channel,
                            tok: String,
                            code: Code,
                            reason: &'static str,
                            name: &str| {
        let st = pb::data_exchange_client::DataExchangeClient::new(ch)
            .query(req(q(), &tok))
            .await
            .expect_err(name);
        assert_reject(&st, code, reason);
        traces.push((trace_of(&st), reason));
    };
    // A certificate without a system identity.
    let (c, k) = dev
        .issue(&Leaf {
            common_name: "anonymous".into(),
            client: true,
            ..Leaf::default()
        })
        .unwrap();
    expect(
        channel_with(&h, &c, &k).await.unwrap(),
        token("civil-affairs"),
        Code::Unauthenticated,
        "CERT_IDENTITY_MISSING",
        "no identity",
    )
    .await;
    // A SPIFFE identity from another trust domain.
    let (c, k) = dev
        .issue(&Leaf {
            uris: vec!["spiffe://other.example/dept/civil-affairs/sys/subsidy".into()],
            client: true,
            ..Leaf::default()
        })
        .unwrap();
    expect(
        channel_with(&h, &c, &k).await.unwrap(),
        token("civil-affairs"),
        Code::Unauthenticated,
        "CERT_IDENTITY_MISSING",
        "foreign trust domain",
    )
    .await;
    // A department the bureau never registered.
    let (c, k) = dev
        .issue(&devpki::consumer_leaf("shadow-dept", "x"))
        .unwrap();
    expect(
        channel_with(&h, &c, &k).await.unwrap(),
        token("shadow-dept"),
        Code::PermissionDenied,
        "CONSUMER_UNKNOWN",
        "unregistered department",
    )
    .await;
    // Certificate of department A with a token of department B.
    expect(
        h.channel("health").await,
        token("civil-affairs"),
        Code::PermissionDenied,
        "TOKEN_DEPT_MISMATCH",
        "A cert, B token",
    )
    .await;
    // A token bound to one system's certificate, replayed from another system of the same department.
    let subsidy_pem = std::fs::read_to_string(certs().join("civil-affairs.pem")).unwrap();
    let bound = token_with(with(
        claims("civil-affairs"),
        "cnf",
        serde_json::json!({ "x5t#S256": openssl_x5t(&subsidy_pem) }),
    ));
    let (c, k) = dev
        .issue(&devpki::consumer_leaf("civil-affairs", "another-system"))
        .unwrap();
    expect(
        channel_with(&h, &c, &k).await.unwrap(),
        bound.clone(),
        Code::Unauthenticated,
        "TOKEN_BINDING_MISMATCH",
        "replayed from another system",
    )
    .await;
    // The same bound token with a certificate of another department entirely.
    expect(
        h.channel("health").await,
        bound.clone(),
        Code::PermissionDenied,
        "TOKEN_DEPT_MISMATCH",
        "bound token, other dept",
    )
    .await;
    // A department that must use bound tokens, without one.
    let (c, k) = dev
        .issue(&devpki::consumer_leaf("bound-only", "s"))
        .unwrap();
    let ch = channel_with(&h, &c, &k).await.unwrap();
    expect(
        ch.clone(),
        token("bound-only"),
        Code::Unauthenticated,
        "TOKEN_BINDING_REQUIRED",
        "binding required",
    )
    .await;
    // ... and with one it gets past identity (to the sharing rules: no grant).
    let bound_ok = token_with(with(
        claims("bound-only"),
        "cnf",
        serde_json::json!({ "x5t#S256": openssl_x5t(&c) }),
    ));
    expect(
        ch,
        bound_ok,
        Code::PermissionDenied,
        "GRANT_MISSING",
        "bound, then the rules",
    )
    .await;
    // The legitimate bound token works.
    let ok = h.data("civil-affairs").await.query(req(q(), &bound)).await;
    assert!(ok.is_ok(), "{ok:?}");
    let recs = h.stop().await;
    assert_eq!(
        h.provider_calls(),
        1,
        "only the legitimate call reached the provider"
    );
    assert_audited(&recs, &traces);
}

#[tokio::test]
async fn hostile_requests() {
    let mut h = Harness::start(Opts {
        edit_policy: Some(|p| {
            p.replace(
                "negative_list:\n",
                "negative_list:\n  - { dataset: hukou.criminal_record, reason: never }\n",
            )
        }),
        config: Some(Arc::new(|c| c.limits.max_message_bytes = 64 * 1024)),
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let ch = h.channel("civil-affairs").await;
    let mut c = pb::data_exchange_client::DataExchangeClient::new(ch.clone());
    let mut traces = Vec::new();
    // (name, request, code, reason)
    let mut filtered = query(
        "hukou.person_basic",
        "subsidy-eligibility",
        &["address^=1"],
        1,
    );
    filtered.fields = vec!["name".into()];
    let mut huge = query("hukou.person_basic", "subsidy-eligibility", &[], 1);
    huge.fields = vec!["x".repeat(100 * 1024)];
    let cases = vec![
        (
            "missing purpose on a conditional dataset",
            query("hukou.person_basic", "", &[], 1),
            Code::InvalidArgument,
            "PURPOSE_MISSING",
        ),
        (
            "filter on a field it may not read",
            filtered,
            Code::PermissionDenied,
            "FIELD_DENIED",
        ),
        (
            "prefix probe of a masked field",
            query(
                "hukou.person_basic",
                "subsidy-eligibility",
                &["id_number^=3301061990"],
                1,
            ),
            Code::PermissionDenied,
            "FIELD_DENIED",
        ),
        (
            "a negative-listed dataset",
            query("hukou.criminal_record", "subsidy-eligibility", &[], 1),
            Code::PermissionDenied,
            "NEGATIVE_LIST",
        ),
        (
            "an oversized request message",
            huge,
            Code::ResourceExhausted,
            "MESSAGE_TOO_LARGE",
        ),
        (
            "a 1,000-byte purpose",
            query("hukou.person_basic", &"p".repeat(1000), &[], 1),
            Code::InvalidArgument,
            "REQUEST_INVALID",
        ),
    ];
    for (name, q, code, reason) in cases {
        let st = c.query(req(q, &t)).await.expect_err(name);
        assert_reject(&st, code, reason);
        traces.push((trace_of(&st), reason));
    }
    // Bytes that are not protobuf, and an unknown method path.
    let st = raw_unary(
        ch.clone(),
        "/xgate.v1.DataExchange/Query",
        vec![0xff; 32],
        &t,
    )
    .await
    .unwrap_err();
    assert_reject(&st, Code::InvalidArgument, "REQUEST_MALFORMED");
    traces.push((trace_of(&st), "REQUEST_MALFORMED"));
    let st = raw_unary(
        ch.clone(),
        "/xgate.v1.DataExchange/DeleteEverything",
        vec![],
        &t,
    )
    .await
    .unwrap_err();
    assert_reject(&st, Code::Unimplemented, "METHOD_UNKNOWN");
    traces.push((trace_of(&st), "METHOD_UNKNOWN"));
    let st = raw_unary(ch, "/grpc.channelz.v1.Channelz/GetTopChannels", vec![], &t)
        .await
        .unwrap_err();
    assert_reject(&st, Code::Unimplemented, "METHOD_UNKNOWN");
    traces.push((trace_of(&st), "METHOD_UNKNOWN"));
    let recs = h.stop().await;
    assert_eq!(h.provider_calls(), 0);
    assert_eq!(recs.len(), traces.len());
    assert_audited(&recs, &traces);
    let edge: Vec<_> = recs
        .iter()
        .filter(|r| r["reason"] == "METHOD_UNKNOWN")
        .collect();
    assert_eq!(
        edge[0]["consumer_dept"], "civil-affairs",
        "edge records still name the caller"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_flood_and_stalled_handshakes_do_not_starve_others() {
    let mut h = Harness::start(Opts {
        config: Some(Arc::new(|c| c.tls.handshake_timeout_ms = 300)),
        ..Opts::default()
    })
    .await;
    // Stalled TCP connections that never say a word.
    let mut stalled = Vec::new();
    for _ in 0..20 {
        stalled.push(tokio::net::TcpStream::connect(h.addr).await.unwrap());
    }
    // A rapid-reset flood written raw on one connection: 2,000 streams, each HEADERS (a real
    // call, with its own trace id) followed at once by RST_STREAM, all in one burst.
    let t = token("civil-affairs");
    // First, one such call not reset: the hand-written header block is a call the gateway
    // takes (answered, with its trace id in a record), so what follows is a flood of calls.
    let control_id = format!("{:032x}", 0xc0_17e0_u128 << 100);
    let mut control = raw_h2::connect(h.addr, "civil-affairs").await;
    let mut one = Vec::new();
    let block = raw_h2::Calls::default().headers("/xgate.v1.DataExchange/Query", &t, &control_id);
    raw_h2::frame(&mut one, raw_h2::HEADERS, raw_h2::END_HEADERS, 1, &block);
    let msg =
        prost::Message::encode_to_vec(&query("hukou.person_basic", "subsidy-eligibility", &[], 1));
    let mut body = vec![0];
    body.extend((msg.len() as u32).to_be_bytes());
    body.extend(msg);
    raw_h2::frame(&mut one, raw_h2::DATA, raw_h2::END_STREAM, 1, &body);
    control.write_all(&one).await.unwrap();
    assert!(
        raw_h2::answered(&mut control, 1, Duration::from_secs(10)).await,
        "the hand-written call was answered"
    );
    drop(control);
    let flood_ids: Vec<String> = (0..2_000u128)
        .map(|i| format!("{:032x}", 0xf100d << 100 | i))
        .collect();
    let (mut burst, mut calls) = (Vec::new(), raw_h2::Calls::default());
    for (i, id) in flood_ids.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let block = calls.headers("/xgate.v1.DataExchange/Query", &t, id);
        raw_h2::frame(
            &mut burst,
            raw_h2::HEADERS,
            raw_h2::END_HEADERS,
            stream,
            &block,
        );
        raw_h2::frame(
            &mut burst,
            raw_h2::RST_STREAM,
            0,
            stream,
            &raw_h2::CANCEL.to_be_bytes(),
        );
    }
    let (mut rd, mut wr) = tokio::io::split(raw_h2::connect(h.addr, "civil-affairs").await);
    // The server may close before the burst is all written: a write error is expected then.
    let writer = tokio::spawn(async move { wr.write_all(&burst).await.is_ok() });
    let flood =
        tokio::spawn(async move { raw_h2::until_goaway(&mut rd, Duration::from_secs(20)).await });
    // Meanwhile a well-behaved caller on its own connection.
    let mut good = h.data("health").await;
    let tg = token("health");
    let t0 = Instant::now();
    let mut traces = Vec::new();
    for _ in 0..30 {
        let r = good
            .query(req(
                query(
                    "market.company_registry",
                    "medical-institution-licensing",
                    &[],
                    2,
                ),
                &tg,
            ))
            .await
            .expect("a well-behaved caller was starved");
        traces.push(trace_id(r.metadata()));
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(20), "30 calls took {took:?}");
    // h2's rapid-reset defence closed the flood's connection.
    let (last_stream, code) = flood.await.unwrap().expect("no GOAWAY for the flood");
    assert_eq!(code, raw_h2::ENHANCE_YOUR_CALM, "GOAWAY error code");
    let _ = writer.await;
    // The stalled connections were closed by the server after the handshake timeout.
    for mut s in stalled {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "stalled connection still open: {r:?}"
        );
    }
    let recs = h.stop().await;
    for t in &traces {
        assert_eq!(
            recs.iter()
                .filter(|r| r["trace_id"] == t.as_str() && r["grpc_status"] == "OK")
                .count(),
            1
        );
    }
    let timeouts = recs
        .iter()
        .filter(|r| r["reason"] == "TLS_HANDSHAKE_TIMEOUT")
        .count();
    assert_eq!(timeouts, 20, "each stalled connection is audited");
    // The flood's connection has one record, counting the resets it sent: more than the
    // 64 the gateway lets wait, at most the 2,000 written.
    let flood: Vec<_> = recs
        .iter()
        .filter(|r| r["reason"] == "RESET_FLOOD")
        .collect();
    assert_eq!(flood.len(), 1, "one record for the flood's connection");
    assert_eq!(flood[0]["method"], "(http2)");
    assert_eq!(flood[0]["consumer_dept"], "civil-affairs");
    assert_eq!(flood[0]["grpc_status"], "RESOURCE_EXHAUSTED");
    let resets = flood[0]["calls"].as_u64().unwrap();
    assert!((65..=2_000).contains(&resets), "{resets} resets");
    let control: Vec<_> = recs
        .iter()
        .filter(|r| r["trace_id"] == control_id.as_str())
        .collect();
    assert_eq!(
        control.len(),
        1,
        "the control call's record {control_id}: {:?}",
        recs.iter()
            .filter(|r| r["consumer_dept"] == "civil-affairs")
            .map(|r| (
                r["trace_id"].clone(),
                r["grpc_status"].clone(),
                r["reason"].clone(),
                r["detail"].clone()
            ))
            .collect::<Vec<_>>()
    );
    assert_eq!(control[0]["consumer_dept"], "civil-affairs");
    assert_eq!(control[0]["grpc_status"], "OK");
    let seen = recs
        .iter()
        .filter(|r| flood_ids.iter().any(|id| r["trace_id"] == id.as_str()))
        .count();
    // The whole burst was read before the gateway accepted any of it: the 65th stream waiting
    // while reset is one too many (`max_pending_accept_reset_streams` 64), so the GOAWAY names
    // it as the last, and no stream of the flood reached the pipeline.
    assert_eq!(last_stream, 1 + 2 * 64, "GOAWAY's last stream");
    assert_eq!(seen, 0, "flood streams that reached the pipeline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_certificates_are_refused_after_a_crl_reload() {
    let dir = tempfile::tempdir().unwrap();
    let crl = dir.path().join("crl.pem");
    let dev = DevCa::load_dir(&certs()).unwrap();
    std::fs::write(&crl, dev.crl(&[], 1).unwrap()).unwrap();
    let crl_path = crl.clone();
    let mut h = Harness::start(Opts {
        config: Some(Arc::new(move |c| c.tls.crls = vec![crl_path.clone()])),
        ..Opts::default()
    })
    .await;
    let (c, k) = dev
        .issue(&Leaf {
            serial: Some(0x7e5_0001),
            ..devpki::consumer_leaf("civil-affairs", "laptop-lost")
        })
        .unwrap();
    let call = async |ch: tonic::transport::Channel| {
        pb::catalog_client::CatalogClient::new(ch)
            .list_datasets(req(pb::ListDatasetsRequest {}, &token("civil-affairs")))
            .await
    };
    let open_before = channel_with(&h, &c, &k).await.unwrap();
    assert!(
        call(open_before.clone()).await.is_ok(),
        "valid before revocation"
    );
    // The bureau revokes the lost laptop's certificate: no restart.
    replace_file(&crl, &dev.crl(&[0x7e5_0001], 2).unwrap());
    // The connection opened before the revocation is refused too, call by call.
    let t0 = Instant::now();
    let st = loop {
        if let Err(st) = call(open_before.clone()).await {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "revocation not applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_reject(&st, Code::Unauthenticated, "CERT_REVOKED");
    // New connections fail the handshake itself.
    let refused = match channel_with(&h, &c, &k).await {
        Err(_) => true,
        Ok(ch) => call(ch).await.is_err(),
    };
    assert!(
        refused,
        "a new connection with the revoked certificate went through"
    );
    // Other systems are unaffected.
    assert!(call(h.channel("civil-affairs").await).await.is_ok());
    let recs = h.stop().await;
    assert!(
        recs.iter().any(|r| r["reason"] == "TLS_HANDSHAKE_FAILED"
            && r["detail"].as_str().unwrap_or("").contains("Revoked")),
        "{recs:#?}"
    );
    assert_eq!(
        recs.iter()
            .filter(|r| r["reason"] == "CERT_REVOKED")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let dev = DevCa::load_dir(&certs()).unwrap();
    for f in [
        "gateway.pem",
        "gateway.key",
        "gateway-client.pem",
        "gateway-client.key",
    ] {
        std::fs::copy(certs().join(f), dir.path().join(f)).unwrap();
    }
    let d = dir.path().to_owned();
    let mut h = Harness::start(Opts {
        admin: true,
        config: Some(Arc::new(move |c| {
            c.tls.cert = d.join("gateway.pem");
            c.tls.key = d.join("gateway.key");
            c.upstream.cert = d.join("gateway-client.pem");
            c.upstream.key = d.join("gateway-client.key");
        })),
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let mut old = h.data("civil-affairs").await;
    old.query(req(
        query("hukou.person_basic", "subsidy-eligibility", &[], 1),
        &t,
    ))
    .await
    .unwrap();
    // New server and upstream-client certificates land on disk (as a secret rotation would).
    let (sc, sk) = dev
        .issue(&devpki::server_leaf("gateway-2027.xgate.internal"))
        .unwrap();
    let (uc, uk) = dev
        .issue(&Leaf {
            uris: vec![format!("spiffe://{}/gateway", devpki::TRUST_DOMAIN)],
            client: true,
            ..Leaf::default()
        })
        .unwrap();
    std::fs::write(dir.path().join("gateway.key"), &sk).unwrap();
    replace_file(&dir.path().join("gateway.pem"), &sc);
    std::fs::write(dir.path().join("gateway-client.key"), &uk).unwrap();
    replace_file(&dir.path().join("gateway-client.pem"), &uc);
    let (cc, ck) = (
        std::fs::read_to_string(certs().join("civil-affairs.pem")).unwrap(),
        std::fs::read_to_string(certs().join("civil-affairs.key")).unwrap(),
    );
    let t0 = Instant::now();
    loop {
        if let Ok(peer) = tls_handshake(&h, &cc, &ck, vec![b"h2".to_vec()]).await
            && peer == cert_der(&sc)
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "new server certificate not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = Instant::now();
    loop {
        let (_, m) = http(h.admin.unwrap(), "GET", "/metrics").await;
        if m.contains("xgate_tls_reloads_total{side=\"upstream\",result=\"ok\"}") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "upstream certificate not reloaded: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The established connection still works; new ones use the new certificates end to end.
    old.query(req(
        query("hukou.person_basic", "subsidy-eligibility", &[], 1),
        &t,
    ))
    .await
    .unwrap();
    h.data("civil-affairs")
        .await
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap();
    // The provider saw the new upstream certificate on the calls after the rotation.
    let seen = || h.ps.stats.last_peer_cert.lock().unwrap().clone();
    assert_eq!(
        seen(),
        Some(cert_der(&uc)),
        "the provider sees the rotated certificate"
    );
    // A bad file is refused and the certificate before it kept.
    let errors = async || {
        let (_, m) = http(h.admin.unwrap(), "GET", "/metrics").await;
        metric_value(
            &m,
            "xgate_tls_reloads_total{side=\"upstream\",result=\"error\"}",
        )
    };
    let before = errors().await;
    replace_file(
        &dir.path().join("gateway-client.pem"),
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    );
    let t0 = Instant::now();
    while errors().await <= before {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the bad upstream certificate was not seen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.data("civil-affairs")
        .await
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap();
    assert_eq!(
        seen(),
        Some(cert_der(&uc)),
        "the previous certificate stays in use"
    );
    let recs = h.stop().await;
    assert_eq!(recs.iter().filter(|r| r["grpc_status"] == "OK").count(), 4);
}

/// A Prometheus sample's value (0 when the series is absent).
fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// gzip-compressed requests are taken; another encoding is refused with its own reason, not
/// "not a method"; what is not gRPC at all (GET, a foreign content-type) gets HTTP 405 / 415.
#[tokio::test]
async fn encodings_methods_and_content_types() {
    use tower::ServiceExt;
    let mut h = Harness::start(Opts::default()).await;
    let t = token("civil-affairs");
    let ch = h.channel("civil-affairs").await;
    let mut gz = pb::data_exchange_client::DataExchangeClient::new(ch.clone())
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let r = gz
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 2),
            &t,
        ))
        .await
        .unwrap();
    assert_eq!(r.into_inner().rows.len(), 2);
    let raw = |method: http::Method, ct: &str, encoding: Option<&str>| {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("{}/xgate.v1.DataExchange/Query", h.url()))
            .header("content-type", ct)
            .header("te", "trailers")
            .header("authorization", format!("Bearer {t}"));
        if let Some(e) = encoding {
            b = b.header("grpc-encoding", e);
        }
        // One empty message, flagged compressed when an encoding is named.
        let flag = u8::from(encoding.is_some());
        b.body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from(vec![flag, 0, 0, 0, 0]),
        )))
        .unwrap()
    };
    let mut traces = Vec::new();
    for (method, ct, enc, http_status, reason) in [
        (
            http::Method::POST,
            "application/grpc",
            Some("br"),
            200,
            "ENCODING_UNSUPPORTED",
        ),
        (http::Method::GET, "application/grpc", None, 405, "NOT_GRPC"),
        (http::Method::POST, "text/plain", None, 415, "NOT_GRPC"),
        (
            http::Method::POST,
            "application/json",
            None,
            415,
            "NOT_GRPC",
        ),
    ] {
        let resp = ch
            .clone()
            .oneshot(raw(method.clone(), ct, enc))
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), http_status, "{method} {ct} {enc:?}");
        let st = tonic::Status::from_header_map(resp.headers()).expect("a grpc-status");
        let info = st.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.reason, reason, "{method} {ct} {enc:?}: {st:?}");
        assert!(resp.headers().contains_key(xgate::TRACE_ID_HEADER));
        traces.push((trace_of(&st), reason));
    }
    let recs = h.stop().await;
    assert_audited(&recs, &traces);
}

/// A flood of distinct forged tokens from one certificate: past its failure budget, that
/// certificate's calls are refused before any signature check; another caller is unaffected.
#[tokio::test]
async fn a_flood_of_distinct_bad_tokens_is_cut_off_per_certificate() {
    let mut h = Harness::start(Opts {
        config: Some(Arc::new(|c| {
            c.jwt.auth_failures_per_second = 1;
            c.jwt.auth_failures_burst = 5;
        })),
        ..Opts::default()
    })
    .await;
    let (other_key, _) = devpki::jwt_keypair(devpki::KID).unwrap();
    let mut c = h.data("civil-affairs").await;
    let mut reasons = Vec::new();
    let mut traces = Vec::new();
    for i in 0..12 {
        let forged = devpki::mint_token(
            &other_key,
            devpki::KID,
            &devpki::dev_claims("civil-affairs", &format!("forger-{i}"), None, 600),
        )
        .unwrap();
        let st = c
            .query(req(
                query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                &forged,
            ))
            .await
            .expect_err("forged");
        let reason = st.get_error_details().error_info().unwrap().reason.clone();
        if reason == "AUTH_FAILURES_LIMITED" {
            assert_eq!(st.code(), Code::ResourceExhausted);
            assert!(st.get_error_details().retry_info().is_some(), "says when");
        }
        traces.push((
            trace_of(&st),
            if reason == "AUTH_FAILURES_LIMITED" {
                "AUTH_FAILURES_LIMITED"
            } else {
                "TOKEN_SIGNATURE_INVALID"
            },
        ));
        reasons.push(reason);
    }
    let checked = reasons
        .iter()
        .filter(|r| *r == "TOKEN_SIGNATURE_INVALID")
        .count();
    assert!(
        (5..=7).contains(&checked),
        "signature checks before the cut: {reasons:?}"
    );
    assert_eq!(
        reasons.last().unwrap(),
        "AUTH_FAILURES_LIMITED",
        "{reasons:?}"
    );
    // Another certificate's good call goes through meanwhile.
    h.data("health")
        .await
        .query(req(
            query(
                "market.company_registry",
                "medical-institution-licensing",
                &[],
                1,
            ),
            &token("health"),
        ))
        .await
        .unwrap();
    let recs = h.stop().await;
    assert_audited(&recs, &traces);
}

/// Behind a load balancer that speaks the PROXY protocol (v2): the caller's own address is
/// what the audit trail records, for refused handshakes and calls alike; a connection from
/// the balancer without the header is closed.
#[tokio::test]
async fn the_callers_address_comes_from_the_load_balancers_proxy_header() {
    use http_body_util::BodyExt;
    let mut h = Harness::start(Opts {
        config: Some(Arc::new(|c| {
            c.tls.proxy_protocol_from = vec!["127.0.0.1".parse().unwrap()];
        })),
        ..Opts::default()
    })
    .await;
    let gw = h.addr;
    let header = |port: u16| {
        xgate::tls::proxy_protocol::header_v2(format!("203.0.113.7:{port}").parse().unwrap(), gw)
    };
    let (c, k) = (
        std::fs::read_to_string(certs().join("civil-affairs.pem")).unwrap(),
        std::fs::read_to_string(certs().join("civil-affairs.key")).unwrap(),
    );
    // A call through the balancer: hyper's HTTP/2 client on the TLS stream.
    let tls = tls_connect(&h, &c, &k, vec![b"h2".to_vec()], &header(4243))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("{}/xgate.v1.Catalog/ListDatasets", h.url()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(
            "authorization",
            format!("Bearer {}", token("civil-affairs")),
        )
        .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ])))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let trace = resp.headers()[xgate::TRACE_ID_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    let body = resp.into_body().collect().await.unwrap();
    assert_eq!(body.trailers().unwrap()["grpc-status"], "0");
    // A refused handshake through it.
    let rogue = DevCa::generate("rogue CA").unwrap();
    let (rc, rk) = rogue
        .issue(&devpki::consumer_leaf("civil-affairs", "subsidy"))
        .unwrap();
    let mut refused = tls_connect(&h, &rc, &rk, vec![b"h2".to_vec()], &header(4244))
        .await
        .unwrap();
    let _ = refused.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    let _ = read_to_close(&mut refused, Duration::from_secs(2)).await;
    // From the balancer without the header: closed, no call.
    assert!(
        !call_goes_through(&h, Some((&c, &k))).await,
        "went through without a PROXY header"
    );
    let recs = h.stop().await;
    let call = recs
        .iter()
        .find(|r| r["trace_id"] == trace.as_str())
        .unwrap();
    assert_eq!(call["remote_addr"], "203.0.113.7:4243", "{call}");
    assert!(
        recs.iter()
            .any(|r| r["method"] == "(tls-handshake)" && r["remote_addr"] == "203.0.113.7:4244"),
        "{recs:#?}"
    );
}

/// Refused handshakes (anyone can cause them) are recorded up to a cap (bursts of 100, then
/// 20/s); past it they are counted into the next record written: every one accounted for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_are_recorded_to_the_cap_and_the_rest_counted() {
    let mut h = Harness::start(Opts::default()).await;
    let no_cert = raw_h2::client_config(None, rustls::ALL_VERSIONS);
    let knock = async || {
        // TLS 1.3: the refusal (no client certificate) arrives after the client's handshake.
        if let Ok(mut tls) = raw_h2::connect_with(h.addr, no_cert.clone()).await {
            let _ = raw_h2::until_goaway(&mut tls, Duration::from_secs(5)).await;
        }
    };
    let t0 = Instant::now();
    for _ in 0..150 {
        knock().await;
    }
    let flood = t0.elapsed();
    // The cap refills (one record per 50 ms): the next refusal is written, with the count.
    tokio::time::sleep(Duration::from_millis(200)).await;
    knock().await;
    let took = t0.elapsed();
    let recs = h.stop().await;
    let tls: Vec<_> = recs
        .iter()
        .filter(|r| r["method"] == "(tls-handshake)")
        .collect();
    let counted: u64 = tls
        .iter()
        .filter_map(|r| {
            let d = r["detail"].as_str()?;
            let (_, rest) = d.split_once("(+")?;
            rest.split_once(' ')?.0.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(
        tls.len() as u64 + counted,
        151,
        "every refusal recorded or counted"
    );
    for r in &tls {
        assert_eq!(r["reason"], "TLS_HANDSHAKE_FAILED", "{r}");
    }
    assert!(counted > 0, "the burst of 100 was passed");
    let cap = 100.0 + 20.0 * took.as_secs_f64() + 1.0;
    assert!(
        tls.len() as f64 <= cap,
        "{} records in {took:?} (flood {flood:?}), more than the cap allows ({cap:.0})",
        tls.len()
    );
    // The count goes into whichever record is written next: during a slow flood the cap
    // refills and a record in the flood may carry it, so no particular record is asserted.
    for r in tls
        .iter()
        .filter(|r| r["detail"].as_str().is_some_and(|d| d.contains("(+")))
    {
        assert!(
            r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("similar refusals since the last record")),
            "a record carrying a count says what it counts: {r}"
        );
    }
}

/// At most 1,024 handshakes at once: connections past that are closed at accept, counted
/// (`xgate_tls_handshakes_shed_total`), and the ones holding places are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_concurrent_limit_are_shed_at_once() {
    let mut h = Harness::start(Opts {
        admin: true,
        config: Some(Arc::new(|c| c.tls.handshake_timeout_ms = 20_000)),
        ..Opts::default()
    })
    .await;
    let limit = xgate::tls::MAX_CONCURRENT_HANDSHAKES;
    let mut silent = Vec::new();
    for _ in 0..limit + 76 {
        silent.push(tokio::net::TcpStream::connect(h.addr).await.unwrap());
    }
    let shed = async || {
        let (_, m) = http(h.admin.unwrap(), "GET", "/metrics").await;
        metric_value(&m, "xgate_tls_handshakes_shed_total")
    };
    let t0 = Instant::now();
    while shed().await < 76.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "not shed: {}",
            shed().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The shed connections are closed at once; the others are still waiting.
    let mut closed = 0;
    for s in &mut silent {
        let mut b = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(2), s.read(&mut b)).await
        {
            closed += 1;
        }
    }
    assert_eq!(shed().await, 76.0, "exactly the connections past the limit");
    assert_eq!(closed, 76);
    drop(silent);
    // Places come back as the silent connections go: a caller is served again.
    let (cc, ck) = (
        std::fs::read_to_string(certs().join("civil-affairs.pem")).unwrap(),
        std::fs::read_to_string(certs().join("civil-affairs.key")).unwrap(),
    );
    let t0 = Instant::now();
    while !call_goes_through(&h, Some((&cc, &ck))).await {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no place freed: shed {}",
            shed().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.stop().await;
}

/// `tls.min_version`: TLS 1.3 only by default (a 1.2-only client fails the handshake);
/// `"1.2"` lets it in, and HTTP/2 is served over it.
#[tokio::test]
async fn tls_min_version_decides_whether_1_2_clients_get_in() {
    let tls12 = raw_h2::client_config(Some("civil-affairs"), &[&rustls::version::TLS12]);
    let mut h = Harness::start(Opts::default()).await;
    let refused = raw_h2::connect_with(h.addr, tls12.clone()).await;
    assert!(refused.is_err(), "a TLS 1.2 client got in by default");
    h.stop().await;
    let mut h = Harness::start(Opts {
        config: Some(Arc::new(|c| c.tls.min_version = "1.2".into())),
        ..Opts::default()
    })
    .await;
    let mut tls = raw_h2::connect_with(h.addr, tls12).await.unwrap();
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (kind, ..) = raw_h2::next_frame(&mut tls).await.expect("a frame");
    assert_eq!(
        kind,
        raw_h2::SETTINGS,
        "the server speaks HTTP/2 over TLS 1.2"
    );
    drop(tls);
    h.stop().await;
}

/// `tls.identity_map`: a legacy certificate without the SAN URI, known by its fingerprint,
/// calls as the department and system it is mapped to.
#[tokio::test]
async fn a_legacy_certificate_is_known_by_its_fingerprint() {
    use sha2::Digest;
    let dev = DevCa::load_dir(&certs()).unwrap();
    let (c, k) = dev
        .issue(&Leaf {
            common_name: "subsidy-legacy".into(),
            client: true,
            ..Leaf::default()
        })
        .unwrap();
    let fp = format!("sha256:{}", hex::encode(sha2::Sha256::digest(cert_der(&c))));
    let mut h = Harness::start(Opts {
        config: Some(Arc::new(move |cfg| {
            cfg.tls.identity_map.push(xgate::config::MappedIdentity {
                fingerprint: fp.clone(),
                dept: "civil-affairs".into(),
                system: "legacy".into(),
            })
        })),
        ..Opts::default()
    })
    .await;
    let ch = channel_with(&h, &c, &k).await.unwrap();
    let r = pb::data_exchange_client::DataExchangeClient::new(ch)
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &token("civil-affairs"),
        ))
        .await
        .unwrap();
    let id = trace_id(r.metadata());
    let recs = h.stop().await;
    let rec = recs.iter().find(|r| r["trace_id"] == id.as_str()).unwrap();
    assert_eq!(
        (
            rec["consumer_dept"].as_str(),
            rec["consumer_system"].as_str()
        ),
        (Some("civil-affairs"), Some("legacy"))
    );
}

/// A certificate that expires while its connection is open: the next call on that
/// connection is refused `CERT_EXPIRED` (the handshake's check is not the last word).
#[tokio::test]
async fn a_certificate_expiring_on_an_open_connection_is_refused_per_call() {
    let dev = DevCa::load_dir(&certs()).unwrap();
    let (c, k) = dev
        .issue(&Leaf {
            valid_for: Some(Duration::from_secs(2)),
            ..devpki::consumer_leaf("civil-affairs", "subsidy")
        })
        .unwrap();
    let mut h = Harness::start(Opts::default()).await;
    let mut cl =
        pb::data_exchange_client::DataExchangeClient::new(channel_with(&h, &c, &k).await.unwrap());
    let q = || query("hukou.person_basic", "subsidy-eligibility", &[], 1);
    let t = token("civil-affairs");
    cl.query(req(q(), &t)).await.unwrap();
    // Past not_after (whole seconds in the certificate).
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let st = cl.query(req(q(), &t)).await.unwrap_err();
    assert_reject(&st, Code::Unauthenticated, "CERT_EXPIRED");
    let recs = h.stop().await;
    assert_audited(&recs, &[(trace_of(&st), "CERT_EXPIRED")]);
}

/// A refusal made before the pipeline (here: a call with no request message) is recorded under
/// the caller's W3C trace id, as the pipeline's own records are: one id finds it.
#[tokio::test]
async fn refusals_before_the_pipeline_keep_the_callers_trace_id() {
    let mut h = Harness::start(Opts::default()).await;
    let id = "0ed9e000000000000000000000000042";
    let mut tls = raw_h2::connect(h.addr, "civil-affairs").await;
    let mut out = Vec::new();
    let block = raw_h2::Calls::default().headers(
        "/xgate.v1.DataExchange/Query",
        &token("civil-affairs"),
        id,
    );
    raw_h2::frame(
        &mut out,
        raw_h2::HEADERS,
        raw_h2::END_HEADERS | raw_h2::END_STREAM,
        1,
        &block,
    );
    tls.write_all(&out).await.unwrap();
    assert!(
        raw_h2::answered(&mut tls, 1, Duration::from_secs(10)).await,
        "the call was answered"
    );
    drop(tls);
    let recs = h.stop().await;
    assert_audited(&recs, &[(id.to_owned(), "REQUEST_MALFORMED")]);
}
