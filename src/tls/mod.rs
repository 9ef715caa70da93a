//! TLS termination: the rustls server configuration (client certificates required, chaining to
//! the configured CA), and the accept loop that hands tonic authenticated connections.
//!
//! Handshakes run in their own tasks with a timeout, so a client that opens TCP and never
//! finishes the handshake holds nothing but its own socket. The leaf certificate is parsed
//! once per connection into a [`Peer`], which tonic attaches to every request on it
//! (see [`TlsConn`]'s `Connected` impl).

pub mod identity;
pub mod proxy_protocol;

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    audit::{self, AuditRecord},
    error::Reason,
    tls::identity::{IdentityMap, Peer, peer_info},
};

/// Errors building TLS configuration from files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCert { path: String },
    #[error("{path}: no PEM private key found")]
    NoKey { path: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: p.clone(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: p.clone(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { path: p });
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: p.clone(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::NoKey { path: p })
}

/// What the server's TLS is built from; rebuilt whenever one of these files changes.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// CA bundle client certificates must chain to.
    pub client_ca: std::path::PathBuf,
    /// Certificate revocation lists (PEM or DER); revoked client certificates fail the handshake.
    pub crls: Vec<std::path::PathBuf>,
    /// Also accept TLS 1.2 (default: TLS 1.3 only).
    pub allow_tls12: bool,
}

impl ServerTlsFiles {
    /// Every file the config depends on.
    pub fn paths(&self) -> Vec<std::path::PathBuf> {
        let mut v = vec![self.cert.clone(), self.key.clone(), self.client_ca.clone()];
        v.extend(self.crls.iter().cloned());
        v
    }
}

fn load_crls(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, TlsError> {
    use rustls::pki_types::CertificateRevocationListDer as Crl;
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: p.clone(),
        source,
    })?;
    let pem: Vec<Crl<'static>> = Crl::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            path: p.clone(),
            message: e.to_string(),
        })?;
    if pem.is_empty() {
        // Not PEM: a single DER CRL.
        return Ok(vec![Crl::from(bytes)]);
    }
    Ok(pem)
}

/// A server config that requires a client certificate chaining to the client CA and not
/// revoked by any CRL, speaks h2, and TLS 1.3 (plus 1.2 when allowed).
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(&files.client_ca)? {
        roots.add(c).map_err(|e| TlsError::Invalid {
            path: files.client_ca.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let mut crls = Vec::new();
    for p in &files.crls {
        crls.extend(load_crls(p)?);
    }
    let mut builder = WebPkiClientVerifier::builder(Arc::new(roots)).with_crls(crls);
    if !files.crls.is_empty() {
        // A CRL past its nextUpdate means revocation news stopped: refuse rather than trust it.
        builder = builder.enforce_revocation_expiration();
    }
    let verifier = builder.build().map_err(|e| TlsError::Invalid {
        path: files.client_ca.display().to_string(),
        message: e.to_string(),
    })?;
    let versions: &[&rustls::SupportedProtocolVersion] = if files.allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut cfg = ServerConfig::builder_with_protocol_versions(versions)
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| TlsError::Invalid {
            path: files.key.display().to_string(),
            message: e.to_string(),
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serial numbers revoked by the configured CRLs: checked on every call too, so a connection
/// opened before a revocation cannot keep using the revoked certificate.
pub type Revocations = Arc<arc_swap::ArcSwap<std::collections::HashSet<Vec<u8>>>>;

/// The revoked serial numbers in the configured CRLs.
pub fn revoked_serials(
    files: &ServerTlsFiles,
) -> Result<std::collections::HashSet<Vec<u8>>, TlsError> {
    use x509_parser::prelude::FromDer;
    let mut out = std::collections::HashSet::new();
    for p in &files.crls {
        for crl in load_crls(p)? {
            let (_, parsed) =
                x509_parser::revocation_list::CertificateRevocationList::from_der(crl.as_ref())
                    .map_err(|e| TlsError::Invalid {
                        path: p.display().to_string(),
                        message: e.to_string(),
                    })?;
            out.extend(
                parsed
                    .iter_revoked_certificates()
                    .map(|r| r.raw_serial().to_vec()),
            );
        }
    }
    Ok(out)
}

/// The server config in use; swapped whole when certificates, CA or CRLs change.
pub type LiveServerConfig = Arc<arc_swap::ArcSwap<ServerConfig>>;

/// An accepted, authenticated TLS connection and its peer.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: Peer,
}

impl TlsConn {
    /// Who is on the other end.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl Connected for TlsConn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accept TCP connections, run TLS handshakes concurrently (each bounded by
/// `handshake_timeout`), and yield the connections that completed.
///
/// A handshake refused by TLS itself (no client certificate, an unknown issuer, an expired
/// certificate) is an unknown caller knocking: it is written to the audit trail. Connections
/// that close before saying anything (load-balancer probes) and timeouts are only logged.
///
/// The accept loop ends when the returned stream is dropped (the server stopped accepting).
pub fn incoming(
    listener: TcpListener,
    config: LiveServerConfig,
    trust_domain: Arc<str>,
    identity_map: Arc<IdentityMap>,
    handshake_timeout: Duration,
    refusals: Arc<audit::Refusals>,
    proxy_from: Arc<Vec<std::net::IpAddr>>,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    // At most this many handshakes at once: a flood of silent or garbage connections costs
    // a bounded number of tasks and sockets, and past it new connections are shed at once.
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                metrics::counter!("xgate_tls_handshakes_shed_total").increment(1);
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            // Each handshake uses the config current at accept time; established
            // connections keep theirs.
            let acceptor = TlsAcceptor::from(config.load_full());
            let identity_map = identity_map.clone();
            let tx = tx.clone();
            let td = trust_domain.clone();
            let refusals = refusals.clone();
            let behind_balancer = proxy_from.contains(&remote.ip());
            tokio::spawn(async move {
                let _permit = permit;
                let mut tcp = tcp;
                // Behind a load balancer: the caller's address is in its PROXY header, read
                // within the same time the handshake has.
                let remote = if behind_balancer {
                    match tokio::time::timeout(
                        handshake_timeout,
                        crate::tls::proxy_protocol::read_v2(&mut tcp),
                    )
                    .await
                    {
                        Ok(Ok(src)) => src.unwrap_or(remote),
                        Ok(Err(e)) => {
                            metrics::counter!("xgate_proxy_protocol_errors_total").increment(1);
                            tracing::warn!(%remote, error = %e, "connection from a load balancer without a valid PROXY v2 header; closed");
                            return;
                        }
                        Err(_) => {
                            metrics::counter!("xgate_proxy_protocol_errors_total").increment(1);
                            tracing::warn!(%remote, "no PROXY v2 header in time; closed");
                            return;
                        }
                    }
                } else {
                    remote
                };
                let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::info!(%remote, error = %e, "TLS handshake failed");
                        if let Some(tls_err) =
                            e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
                        {
                            handshake_refused(
                                &refusals,
                                remote,
                                Reason::TlsHandshakeFailed,
                                handshake_cause(tls_err),
                                tls_err.to_string(),
                            );
                        }
                        return;
                    }
                    Err(_) => {
                        tracing::info!(%remote, "TLS handshake timed out");
                        let why = format!("no completed handshake within {handshake_timeout:?}");
                        handshake_refused(
                            &refusals,
                            remote,
                            Reason::TlsHandshakeTimeout,
                            "timeout",
                            why,
                        );
                        return;
                    }
                };
                let Some(leaf) = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                else {
                    // Unreachable with a verifier that requires client certs; refuse anyway.
                    tracing::warn!(%remote, "TLS connection without a client certificate");
                    return;
                };
                let peer = Arc::new(peer_info(leaf.as_ref(), &td, &identity_map, remote));
                if let Err(why) = &peer.identity {
                    tracing::info!(%remote, fingerprint = %peer.fingerprint, %why, "client certificate without system identity");
                }
                drop(refusals);
                let _ = tx.send(Ok(TlsConn { stream, peer })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Handshakes in progress at once, at most.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 1024;

/// Count a refused handshake and record it (rate-limited: anyone on the network can cause
/// these).
fn handshake_refused(
    refusals: &audit::Refusals,
    remote: std::net::SocketAddr,
    reason: Reason,
    cause: &'static str,
    detail: String,
) {
    metrics::counter!("xgate_tls_handshake_failures_total", "reason" => reason.as_str(), "cause" => cause)
        .increment(1);
    refusals.record(AuditRecord {
        time: audit::now_rfc3339(),
        trace_id: audit::new_trace_id(),
        method: "(tls-handshake)".into(),
        remote_addr: Some(remote.to_string().into()),
        decision: crate::audit::Decision::Deny,
        rule: Some("tls:client-certificate".into()),
        reason: Some(reason.as_str().into()),
        detail: Some(detail),
        grpc_status: audit::code_name(reason.code()),
        grpc_code: reason.code() as i32,
        ..AuditRecord::default()
    });
}

/// A refused handshake's cause, as a bounded metric label.
fn handshake_cause(e: &rustls::Error) -> &'static str {
    use rustls::{CertificateError as C, Error as E};
    match e {
        E::NoCertificatesPresented => "no-client-cert",
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "cert-expired",
        E::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            "cert-not-yet-valid"
        }
        E::InvalidCertificate(C::Revoked) => "cert-revoked",
        E::InvalidCertificate(C::UnknownIssuer) => "unknown-ca",
        E::InvalidCertificate(_) => "bad-cert",
        E::PeerIncompatible(_) => "incompatible",
        E::AlertReceived(_) => "client-alert",
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => "protocol",
        _ => "other",
    }
}
