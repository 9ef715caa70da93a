//! HTTP/2 written by hand over the dev mTLS: frames exactly as an attacker puts them on the
//! wire, with no client library deciding when (or whether) a frame leaves. HPACK is the plain
//! subset (static-table names, literal values, no Huffman): what the gateway's decoder must
//! take from anyone.

use std::{net::SocketAddr, sync::Arc};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::certs;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
/// RST_STREAM / GOAWAY error codes.
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A TLS connection to the gateway as `dept`, with the client preface and an empty SETTINGS
/// frame already written.
pub async fn connect(addr: SocketAddr, dept: &str) -> TlsStream<tokio::net::TcpStream> {
    connect_with(addr, client_config(Some(dept), rustls::ALL_VERSIONS))
        .await
        .unwrap()
}

/// A client TLS config offering `h2`, trusting the dev CA, with `dept`'s dev certificate
/// (none when `None`), speaking only these TLS versions.
pub fn client_config(
    dept: Option<&str>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = certs();
    let mut roots = rustls::RootCertStore::empty();
    for c in xgate::tls::load_certs(&dir.join("ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots);
    let mut cfg = match dept {
        Some(d) => {
            let chain = xgate::tls::load_certs(&dir.join(format!("{d}.pem"))).unwrap();
            let key = xgate::tls::load_key(&dir.join(format!("{d}.key"))).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// Handshake with `cfg`, then write the client preface and an empty SETTINGS frame.
pub async fn connect_with(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = TlsConnector::from(cfg).connect(name, tcp).await?;
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut hello, SETTINGS, 0, 0, &[]);
    tls.write_all(&hello).await?;
    Ok(tls)
}

/// Append one frame.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let n = payload.len();
    out.extend([(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
}

/// An HPACK integer with an `n`-bit prefix, the first byte's high bits set to `flags`.
fn int(out: &mut Vec<u8>, flags: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
    int(out, 0, 7, s.len());
    out.extend(s.as_bytes());
}

/// Header blocks of gRPC calls to `path` with a bearer token, each with a W3C `traceparent`
/// carrying its own trace id (the gateway's record takes it as its trace id). The first block
/// adds the repeated headers to the connection's HPACK table; the ones after refer to them
/// by index, so a burst of calls is ~100 bytes each (as a real client's would be).
#[derive(Debug, Default)]
pub struct Calls {
    indexed: bool,
}

impl Calls {
    pub fn headers(&mut self, path: &str, token: &str, trace_id: &str) -> Vec<u8> {
        // Pseudo-headers first (HTTP/2 refuses a stream with one after a regular header).
        let mut b = vec![0x83, 0x87]; // :method POST, :scheme https (static table)
        // The dynamic table, newest first: authorization 62, te 63, content-type 64, :path 65.
        if self.indexed {
            b.push(0x80 | 65);
        } else {
            int(&mut b, 0x40, 6, 4);
            string(&mut b, path);
        }
        int(&mut b, 0x00, 4, 1); // :authority, literal without indexing
        string(&mut b, "localhost");
        if self.indexed {
            b.extend([0x80 | 64, 0x80 | 63, 0x80 | 62]);
        } else {
            // Literal with incremental indexing, name from the static table or new.
            int(&mut b, 0x40, 6, 31);
            string(&mut b, "application/grpc");
            b.push(0x40);
            string(&mut b, "te");
            string(&mut b, "trailers");
            int(&mut b, 0x40, 6, 23);
            string(&mut b, &format!("Bearer {token}"));
            self.indexed = true;
        }
        b.push(0x00); // literal without indexing, new name
        string(&mut b, "traceparent");
        string(&mut b, &format!("00-{trace_id}-00f067aa0ba902b7-01"));
        b
    }
}

/// A gRPC message as a DATA frame's payload: uncompressed flag, length, protobuf bytes.
pub fn grpc_message(m: &impl prost::Message) -> Vec<u8> {
    let bytes = m.encode_to_vec();
    let mut out = vec![0];
    out.extend((bytes.len() as u32).to_be_bytes());
    out.extend(bytes);
    out
}

/// The next frame the server sends: (type, flags, stream, payload); `None` once it closes.
pub async fn next_frame(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes(head[5..9].try_into().ok()?) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

/// Whether the server answered `stream` (its response HEADERS) within `within`.
pub async fn answered(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    stream: u32,
    within: std::time::Duration,
) -> bool {
    let read = async {
        while let Some((kind, _, s, _)) = next_frame(r).await {
            if kind == HEADERS && s == stream {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(within, read).await.unwrap_or(false)
}

/// Read frames until the server sends GOAWAY or closes: the GOAWAY's (last stream id, error
/// code) if one came.
pub async fn until_goaway(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    within: std::time::Duration,
) -> Option<(u32, u32)> {
    let read = async {
        loop {
            let (kind, _, _, p) = next_frame(r).await?;
            if kind == GOAWAY && p.len() >= 8 {
                let last = u32::from_be_bytes(p[0..4].try_into().ok()?) & 0x7fff_ffff;
                let code = u32::from_be_bytes(p[4..8].try_into().ok()?);
                return Some((last, code));
            }
        }
    };
    tokio::time::timeout(within, read).await.ok().flatten()
}
