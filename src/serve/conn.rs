//! The HTTP/2 server on the gRPC port: one task per accepted TLS connection, hyper's HTTP/2
//! server with xgate's limits, the connection's peer on every request, a graceful drain.
//!
//! xgate serves its connections itself rather than through `tonic::transport::Server`, because
//! that server decides two things out of reach of any layer:
//! - it enforces `grpc-timeout` by dropping the call's future and answering
//!   `CANCELLED "Timeout expired"`, without a trace id — even while the call's record is being
//!   made durable, so the record could say `OK` while the caller got nothing. Here the
//!   pipeline owns the caller's deadline (`gateway`), and what it answers is what it records;
//! - HTTP/2 refuses a header block over its limit before any layer runs (HTTP 431, or GOAWAY
//!   when the block spans too many frames). Here the limit a call meets first is xgate's own
//!   (`limits.max_metadata_bytes`, answered by the edge with a gRPC status); the HTTP/2
//!   layer's limit is a hard cap far above it (`limits.max_metadata_hard_bytes`), and a
//!   [`FrameWatch`] on the connection's bytes sees the blocks over that cap, so that even those
//!   refusals are counted and recorded, once per connection.
//!
//! Not here: TLS and the peer's identity (`tls`), what a request means (`edge`, `gateway`).

use std::{
    convert::Infallible,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
    task::JoinSet,
};
use tokio_stream::{Stream, StreamExt};

use crate::{audit::Refusals, error::Reason, tls::TlsConn, tls::identity::Peer};

/// The HTTP/2 limits of the gRPC port.
#[derive(Debug, Clone)]
pub struct Settings {
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Streams in flight per connection.
    pub max_concurrent_streams: u32,
    /// h2's rapid-reset defence: a client that opens and cancels streams faster than this is
    /// sent GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// The HTTP/2 layer's header list limit (the hard cap; xgate's own limit is below it).
    pub max_metadata_hard_bytes: usize,
    /// A connection that has not sent the HTTP/2 preface this long after its TLS handshake
    /// is closed.
    pub preface_timeout: Duration,
    /// A connection that has started no call this long is sent GOAWAY (calls in flight
    /// finish first); clients reconnect when they next need to.
    pub idle_timeout: Duration,
}

/// The service every connection clones: the gateway's layered routes.
pub trait GrpcService<B>:
    tower::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<B>,
        Error = Infallible,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> GrpcService<B> for S where
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static
{
}

/// What the connection's frame watch saw, read when it closes.
#[derive(Debug)]
struct HeaderStats {
    /// Header blocks over the hard cap on the wire.
    over_cap: AtomicU64,
    /// The client's preface has arrived.
    preface_seen: std::sync::atomic::AtomicBool,
    /// Header blocks begun (a call starts with one): the idle timer restarts when it moves.
    blocks: AtomicU64,
    /// RST_STREAM frames from the client (a cancelled call sends one).
    resets: AtomicU64,
    /// Tells the connection's task that the preface or a new call arrived.
    activity: tokio::sync::Notify,
}

impl Default for HeaderStats {
    fn default() -> Self {
        Self {
            over_cap: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            preface_seen: std::sync::atomic::AtomicBool::new(false),
            blocks: AtomicU64::new(0),
            activity: tokio::sync::Notify::new(),
        }
    }
}

/// Serve HTTP/2 on every connection `incoming` yields, each request through a clone of
/// `svc` with the connection's [`Peer`] in its extensions, until `shutdown` completes; then
/// stop accepting, let every connection finish its calls (GOAWAY, then wait) and return.
/// Dropping the returned future aborts every connection still open.
pub async fn serve<I, S, B>(
    mut incoming: I,
    svc: S,
    settings: Settings,
    refusals: Arc<Refusals>,
    shutdown: impl std::future::Future<Output = ()>,
) where
    I: Stream<Item = Result<TlsConn, io::Error>> + Unpin,
    S: GrpcService<B>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_pending_accept_reset_streams(settings.max_pending_accept_reset_streams)
        .max_header_list_size(u32::try_from(settings.max_metadata_hard_bytes).unwrap_or(u32::MAX));
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            next = incoming.next() => match next {
                None => break,
                Some(Err(e)) => tracing::debug!(error = %e, "connection not accepted"),
                Some(Ok(conn)) => {
                    conns.spawn(connection(
                        conn,
                        svc.clone(),
                        builder.clone(),
                        settings.clone(),
                        refusals.clone(),
                        drain_rx.clone(),
                    ));
                }
            },
            // Reap finished connections as they end.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    // Stop accepting (the accept loop ends with the stream), then drain.
    drop(incoming);
    let _ = drain_tx.send(true);
    while conns.join_next().await.is_some() {}
}

/// One connection, from its first byte to its close.
async fn connection<S, B>(
    conn: TlsConn,
    svc: S,
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    settings: Settings,
    refusals: Arc<Refusals>,
    mut drain: watch::Receiver<bool>,
) where
    S: GrpcService<B>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let hard_cap = settings.max_metadata_hard_bytes;
    let peer = conn.peer().clone();
    let stats = Arc::new(HeaderStats::default());
    let io = TokioIo::new(Watched {
        inner: conn,
        watch: FrameWatch::new(stats.clone(), hard_cap),
    });
    let p = peer.clone();
    let svc = tower::ServiceBuilder::new()
        .map_request(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(p.clone());
            req
        })
        .service(svc);
    let served = builder.serve_connection(io, TowerToHyperService::new(svc));
    tokio::pin!(served);
    let mut draining = false;
    // Until the preface: the preface timeout; then the idle timeout, restarted by every call.
    let timer = tokio::time::sleep(settings.preface_timeout);
    tokio::pin!(timer);
    let mut seen_blocks = 0;
    let result = loop {
        tokio::select! {
            r = &mut served => break r,
            _ = drain.wait_for(|d| *d), if !draining => {
                draining = true;
                served.as_mut().graceful_shutdown();
            }
            _ = stats.activity.notified() => {
                seen_blocks = stats.blocks.load(Ordering::Relaxed);
                timer.as_mut().reset(tokio::time::Instant::now() + settings.idle_timeout);
            }
            _ = &mut timer, if !draining => {
                if !stats.preface_seen.load(Ordering::Relaxed) {
                    // Nothing of HTTP/2 was ever said: there is nothing to drain.
                    metrics::counter!("xgate_connections_closed_total", "why" => "preface-timeout").increment(1);
                    tracing::info!(remote = %peer.remote, timeout = ?settings.preface_timeout, "no HTTP/2 preface after the TLS handshake; connection closed");
                    return;
                }
                let blocks = stats.blocks.load(Ordering::Relaxed);
                if blocks != seen_blocks {
                    // A call began just as the timer ran out.
                    seen_blocks = blocks;
                    timer.as_mut().reset(tokio::time::Instant::now() + settings.idle_timeout);
                    continue;
                }
                metrics::counter!("xgate_connections_closed_total", "why" => "idle").increment(1);
                tracing::debug!(remote = %peer.remote, "connection idle; GOAWAY");
                draining = true;
                served.as_mut().graceful_shutdown();
            }
        }
    };
    let resets = stats.resets.load(Ordering::Relaxed);
    if resets > 0 {
        metrics::counter!("xgate_http2_resets_total").increment(resets);
    }
    if let Err(e) = &result {
        tracing::debug!(remote = %peer.remote, error = %e, "connection ended with an error");
        // h2 says ENHANCE_YOUR_CALM for other floods too (CONTINUATION frames past the header
        // cap): it was the resets only if more of them came than may wait to be accepted.
        if closed_for_resets(e) && resets > settings.max_pending_accept_reset_streams as u64 {
            reset_flood(
                &refusals,
                &peer,
                resets,
                settings.max_pending_accept_reset_streams,
            );
        }
    }
    let over = stats.over_cap.load(Ordering::Relaxed);
    if over > 0 {
        over_cap_refused(&refusals, &peer, over, hard_cap, result.is_err());
    }
}

/// Header blocks the HTTP/2 layer refused for their size, before any gRPC status was
/// possible: counted, and one (rate-limited) record for the connection.
fn over_cap_refused(refusals: &Refusals, peer: &Peer, blocks: u64, hard_cap: usize, closed: bool) {
    metrics::counter!("xgate_metadata_refused_total", "layer" => "http2").increment(blocks);
    let how = if closed {
        "the connection was closed (GOAWAY)"
    } else {
        "each was answered HTTP 431"
    };
    let rej = crate::error::Reject::new(
        Reason::MetadataTooLarge,
        "a request header block was over the HTTP/2 layer's hard cap",
    )
    .with_rule("limits:max_metadata_hard_bytes");
    let mut rec = crate::pipeline::edge::refusal_record(
        Some(peer),
        "(http2)".into(),
        &rej,
        format!(
            "{blocks} request header block(s) over the hard cap of {hard_cap} bytes were refused by the HTTP/2 layer; {how}"
        ),
    );
    rec.calls = blocks;
    refusals.record(rec);
}

/// Whether h2 closed the connection with GOAWAY `ENHANCE_YOUR_CALM` sent by this side (its
/// rapid-reset defence, and its CONTINUATION-flood one).
fn closed_for_resets(e: &hyper::Error) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h2) = c.downcast_ref::<h2::Error>() {
            return h2.is_go_away()
                && !h2.is_remote()
                && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
        }
        cause = c.source();
    }
    false
}

/// A connection closed for a rapid-reset flood: counted, and one (rate-limited) record.
fn reset_flood(refusals: &Refusals, peer: &Peer, resets: u64, limit: usize) {
    metrics::counter!("xgate_connections_closed_total", "why" => "reset-flood").increment(1);
    tracing::warn!(remote = %peer.remote, resets, "connection closed: streams reset faster than they could be accepted (HTTP/2 rapid reset)");
    let rej = crate::error::Reject::new(
        Reason::ResetFlood,
        "streams were reset faster than the gateway could accept them",
    );
    let mut rec = crate::pipeline::edge::refusal_record(
        Some(peer),
        "(http2)".into(),
        &rej,
        format!(
            "{resets} stream reset(s) on the connection, over {limit} of them waiting to be accepted at once; the connection was closed (GOAWAY ENHANCE_YOUR_CALM)"
        ),
    );
    rec.calls = resets;
    refusals.record(rec);
}

/// The connection's bytes, read through a [`FrameWatch`].
struct Watched {
    inner: TlsConn,
    watch: FrameWatch,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let this = &mut *self;
            this.watch.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Reads the client's HTTP/2 frame headers as they pass (nine bytes per frame, payloads
/// skipped) and counts header blocks (HEADERS + CONTINUATION up to END_HEADERS) larger on the
/// wire than the hard cap. A well-behaved encoder never makes a block longer than what it
/// decodes to, so such a block is over the HTTP/2 layer's decoded limit too: it is refused
/// there (431 or GOAWAY) and never reaches the edge. (A block under the cap on the wire that
/// decodes to more than it — heavy HPACK compression — is refused by the HTTP/2 layer without
/// being seen here: docs/observability.md.)
struct FrameWatch {
    stats: Arc<HeaderStats>,
    cap: usize,
    /// Bytes of the client's connection preface still to skip.
    preface: usize,
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame still to skip.
    payload: usize,
    /// The current frame carries header block bytes, and ends its block.
    in_headers: bool,
    ends_block: bool,
    block: usize,
    counted: bool,
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`
const PREFACE_LEN: usize = 24;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const RST_STREAM: u8 = 0x3;
const END_HEADERS: u8 = 0x4;

impl FrameWatch {
    fn new(stats: Arc<HeaderStats>, cap: usize) -> Self {
        Self {
            stats,
            cap,
            preface: PREFACE_LEN,
            head: [0; 9],
            head_len: 0,
            payload: 0,
            in_headers: false,
            ends_block: false,
            block: 0,
            counted: false,
        }
    }

    fn feed(&mut self, mut b: &[u8]) {
        while !b.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(b.len());
                self.preface -= n;
                b = &b[n..];
                if self.preface == 0 {
                    self.stats.preface_seen.store(true, Ordering::Relaxed);
                    self.stats.activity.notify_one();
                }
                continue;
            }
            if self.payload > 0 {
                let n = self.payload.min(b.len());
                self.payload -= n;
                b = &b[n..];
                if self.in_headers {
                    self.grow(n);
                }
                if self.payload == 0 {
                    self.frame_done();
                }
                continue;
            }
            let n = (9 - self.head_len).min(b.len());
            self.head[self.head_len..self.head_len + n].copy_from_slice(&b[..n]);
            self.head_len += n;
            b = &b[n..];
            if self.head_len < 9 {
                break;
            }
            self.head_len = 0;
            let len = usize::from(self.head[0]) << 16
                | usize::from(self.head[1]) << 8
                | usize::from(self.head[2]);
            let kind = self.head[3];
            self.in_headers = kind == HEADERS || kind == CONTINUATION;
            self.ends_block = self.head[4] & END_HEADERS != 0;
            if kind == RST_STREAM {
                self.stats.resets.fetch_add(1, Ordering::Relaxed);
            }
            if kind == HEADERS {
                self.block = 0;
                self.counted = false;
                self.stats.blocks.fetch_add(1, Ordering::Relaxed);
                self.stats.activity.notify_one();
            }
            self.payload = len;
            if len == 0 {
                self.frame_done();
            }
        }
    }

    fn grow(&mut self, n: usize) {
        self.block += n;
        if !self.counted && self.block > self.cap {
            self.counted = true;
            self.stats.over_cap.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn frame_done(&mut self) {
        if self.in_headers && self.ends_block {
            self.block = 0;
            self.counted = false;
        }
        self.in_headers = false;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload_len: usize) -> Vec<u8> {
        let mut f = vec![
            (payload_len >> 16) as u8,
            (payload_len >> 8) as u8,
            payload_len as u8,
            kind,
            flags,
        ];
        f.extend(stream.to_be_bytes());
        f.extend(std::iter::repeat_n(0u8, payload_len));
        f
    }

    fn watched(bytes: &[u8], cap: usize, chunk: usize) -> u64 {
        let stats = Arc::new(HeaderStats::default());
        let mut w = FrameWatch::new(stats.clone(), cap);
        for c in bytes.chunks(chunk) {
            w.feed(c);
        }
        stats.over_cap.load(Ordering::Relaxed)
    }

    #[test]
    fn counts_each_header_block_over_the_cap_once_whatever_the_read_sizes() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(0x4, 0, 0, 6)); // SETTINGS
        // A small block in one frame.
        wire.extend(frame(HEADERS, END_HEADERS, 1, 100));
        wire.extend(frame(0x0, 0x1, 1, 5000)); // DATA: not headers, whatever its size
        // A block over the cap across three frames.
        wire.extend(frame(HEADERS, 0, 3, 400));
        wire.extend(frame(CONTINUATION, 0, 3, 400));
        wire.extend(frame(CONTINUATION, END_HEADERS, 3, 400));
        // Exactly at the cap: not over it.
        wire.extend(frame(HEADERS, END_HEADERS, 5, 1000));
        // Another over it.
        wire.extend(frame(HEADERS, END_HEADERS, 7, 1001));
        for chunk in [1, 7, 9, 100, 4096, wire.len()] {
            assert_eq!(watched(&wire, 1000, chunk), 2, "reads of {chunk} bytes");
        }
    }
}
