//! The floor for the comparison in `benches/compare.py`: a bare mTLS + HTTP/2 pass-through on
//! the same stack as xgate (tokio, rustls/ring, hyper, tonic's channel), with no features —
//! no token check, no policy, no limits, no audit. What it costs per call is what the plumbing
//! alone costs; xgate's price over it is the price of its features.
//!
//! ```text
//! cargo run --release --example floor -- --listen 127.0.0.1:9443 \
//!     --upstream https://127.0.0.1:8444 --tls-name public-security.provider.xgate.internal
//! ```
//!
//! `--client hyper` replaces tonic's channel (an mpsc buffer to a worker task in front of
//! hyper's client) with one hyper HTTP/2 connection whose `SendRequest` each call clones: what
//! the channel's hop costs, measured (`compare.py --targets floor,floor-hyper`). It is a
//! measurement, not a client: one connection, made at start, never remade.

#![allow(clippy::expect_used)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tower::ServiceExt;

struct Args {
    listen: SocketAddr,
    upstream: String,
    tls_name: String,
    certs: PathBuf,
    workers: usize,
    current_thread: bool,
    hyper_client: bool,
}

fn args() -> Args {
    let mut a = Args {
        listen: "127.0.0.1:9443".parse().expect("address"),
        upstream: "https://127.0.0.1:8444".into(),
        tls_name: "public-security.provider.xgate.internal".into(),
        certs: "certs-dev".into(),
        workers: 0,
        current_thread: false,
        hyper_client: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().expect("a value after each flag");
        match k.as_str() {
            "--listen" => a.listen = v.parse().expect("--listen address"),
            "--upstream" => a.upstream = v,
            "--tls-name" => a.tls_name = v,
            "--certs" => a.certs = v.into(),
            "--workers" => a.workers = v.parse().expect("--workers number"),
            "--flavor" => a.current_thread = v == "current-thread",
            "--client" => a.hyper_client = v == "hyper",
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = args();
    let mut rt = if a.current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if a.workers > 0 && !a.current_thread {
        rt.worker_threads(a.workers);
    }
    rt.enable_all().build().expect("runtime").block_on(serve(a));
}

async fn serve(a: Args) {
    let read = |n: &str| std::fs::read(a.certs.join(n)).expect("dev PKI file");
    // Downstream: TLS 1.3, client certificate required (same CA as the gateway), h2.
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read("ca.pem")) {
        roots.add(c.expect("CA pem")).expect("CA cert");
    }
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .build()
        .expect("client verifier");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read("gateway.pem"))
        .map(|c| c.expect("cert pem"))
        .collect();
    let key = PrivateKeyDer::from_pem_slice(&read("gateway.key")).expect("key pem");
    let mut cfg = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    // Upstream: one pooled HTTP/2 mTLS channel, as xgate keeps per provider.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read("gateway-client.pem"),
            read("gateway-client.key"),
        ))
        .domain_name(a.tls_name.clone());
    let channel: Channel = Endpoint::from_shared(a.upstream.clone())
        .expect("upstream url")
        .tls_config(tls)
        .expect("upstream tls")
        .tcp_nodelay(true)
        .connect_lazy();
    let upstream = if a.hyper_client {
        let (tx, authority) = hyper_connection(&a, &read).await;
        Upstream::Hyper(tx, authority)
    } else {
        Upstream::Channel(channel)
    };
    let listener = tokio::net::TcpListener::bind(a.listen).await.expect("bind");
    println!(
        "floor listening on {}",
        listener.local_addr().expect("addr")
    );
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let up = upstream.clone();
                    async move {
                        let (mut parts, body) = req.into_parts();
                        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
                        let answer: Result<http::Response<tonic::body::Body>, std::io::Error> =
                            match up {
                                // The upstream's authority, not ours: the channel adds it.
                                Upstream::Channel(ch) => {
                                    parts.uri = http::Uri::builder()
                                        .path_and_query(path)
                                        .build()
                                        .unwrap_or_default();
                                    let req = http::Request::from_parts(
                                        parts,
                                        tonic::body::Body::new(body),
                                    );
                                    ch.oneshot(req).await.map_err(std::io::Error::other)
                                }
                                Upstream::Hyper(mut tx, authority) => {
                                    parts.uri = http::Uri::builder()
                                        .scheme("https")
                                        .authority(authority)
                                        .path_and_query(path)
                                        .build()
                                        .unwrap_or_default();
                                    let req = http::Request::from_parts(parts, body);
                                    tx.send_request(req)
                                        .await
                                        .map(|r| r.map(tonic::body::Body::new))
                                        .map_err(std::io::Error::other)
                                }
                            };
                        answer
                    }
                });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), svc)
                .await;
        });
    }
}

/// Where the floor forwards: tonic's channel, or one hyper connection.
#[derive(Clone)]
enum Upstream {
    Channel(Channel),
    Hyper(
        hyper::client::conn::http2::SendRequest<hyper::body::Incoming>,
        http::uri::Authority,
    ),
}

/// One HTTP/2 mTLS connection to the upstream, with hyper's client and no pool.
async fn hyper_connection(
    a: &Args,
    read: &dyn Fn(&str) -> Vec<u8>,
) -> (
    hyper::client::conn::http2::SendRequest<hyper::body::Incoming>,
    http::uri::Authority,
) {
    let uri: http::Uri = a.upstream.parse().expect("upstream url");
    let authority = uri.authority().expect("upstream authority").clone();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&read("ca.pem")) {
        roots.add(c.expect("CA pem")).expect("CA cert");
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("gateway-client.pem"))
            .map(|c| c.expect("cert pem"))
            .collect();
    let key = PrivateKeyDer::from_pem_slice(&read("gateway-client.key")).expect("key pem");
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client config");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(authority.as_str())
        .await
        .expect("upstream connect");
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(a.tls_name.clone()).expect("TLS name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .expect("upstream TLS");
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .expect("upstream HTTP/2");
    tokio::spawn(conn);
    (tx, authority)
}
