//! Fetching the identity provider's JWKS over HTTPS: one GET, verified against a configured
//! CA, bounded in time and size. (Only what the token verifier needs; not a general client.)

use std::{sync::Arc, time::Duration};

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest JWKS accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// GET `url` (https) and return the body.
pub async fn get(url: &http::Uri, ca_pem: &[u8]) -> Result<Vec<u8>, String> {
    tokio::time::timeout(Duration::from_secs(5), fetch(url, ca_pem))
        .await
        .map_err(|_| format!("{url}: timed out"))?
}

async fn fetch(url: &http::Uri, ca_pem: &[u8]) -> Result<Vec<u8>, String> {
    if url.scheme_str() != Some("https") {
        return Err(format!("{url}: only https:// JWKS URLs are accepted"));
    }
    let host = url
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .to_owned();
    let port = url.port_u16().unwrap_or(443);
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        let c = c.map_err(|e| format!("JWKS CA: {e}"))?;
        roots.add(c).map_err(|e| format!("JWKS CA: {e}"))?;
    }
    let mut cfg = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("{url}: {e}"))?;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let tls = TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{url}: TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(body.to_bytes().to_vec())
}
