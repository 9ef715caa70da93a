//! The outermost layer on the gRPC port, for calls that never reach the pipeline.
//!
//! tonic refuses some requests before any xgate code runs: an unknown method path, a body
//! that is not a protobuf message, a message over the size limit. Those are hostile or broken
//! callers, so they are answered like every other refusal — a stable reason in
//! `google.rpc.ErrorInfo` and the right code (`UNIMPLEMENTED`, `INVALID_ARGUMENT`,
//! `RESOURCE_EXHAUSTED` rather than tonic's `INTERNAL`/`OUT_OF_RANGE`) — and audited.
//!
//! The pipeline marks each request it takes (`Gateway::begin` sets `Handled`, in call.rs); a response to
//! an unmarked request carrying a gRPC error in its headers (a trailers-only response) is one
//! of these.
//!
//! It also holds the first limit a call meets: metadata over `limits.max_metadata_bytes` is
//! answered here, before anything reads it, with `RESOURCE_EXHAUSTED METADATA_TOO_LARGE`
//! and a (rate-limited: nothing is authenticated yet) audit record; the connection stays
//! open. The HTTP/2 layer's own limit is a hard cap far above it (see `conn`).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::{
    audit::{self, AuditLog, AuditRecord, Pending, Refusals},
    error::{Reason, Reject},
    pipeline::{
        WeakGateway,
        call::{Handled, record_from_peer, trace_id_from},
    },
    tls::identity::Peer,
};

#[derive(Clone, Debug)]
pub struct EdgeLayer {
    audit: AuditLog,
    gateway: WeakGateway,
    refusals: Arc<Refusals>,
    max_metadata: usize,
}

impl EdgeLayer {
    pub fn new(
        audit: AuditLog,
        gateway: WeakGateway,
        refusals: Arc<Refusals>,
        max_metadata: usize,
    ) -> Self {
        Self {
            audit,
            gateway,
            refusals,
            max_metadata,
        }
    }
}

/// A request's metadata size as HTTP/2 counts a header list (RFC 9113 §6.5.2): name + value
/// + 32 per field, the pseudo-headers included.
pub fn metadata_size<B>(req: &http::Request<B>) -> usize {
    let uri = req.uri();
    let pseudo = [
        (":method", req.method().as_str().len()),
        (":scheme", uri.scheme_str().map_or(0, str::len)),
        (
            ":authority",
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path",
            uri.path_and_query().map_or(0, |p| p.as_str().len()),
        ),
    ];
    pseudo.iter().map(|(n, v)| n.len() + v + 32).sum::<usize>()
        + req
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum::<usize>()
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Edge<S> {
    inner: S,
    layer: EdgeLayer,
}

impl<S, B, R> Service<http::Request<B>> for Edge<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let size = metadata_size(&req);
        if size > self.layer.max_metadata {
            let resp = self.metadata_too_large(&req, size);
            return Box::pin(async move { Ok(resp) });
        }
        if let Some(resp) = self.not_grpc(&req) {
            return Box::pin(async move { Ok(resp) });
        }
        // Health checks and reflection carry no data: answered by their services, not audited.
        let path = req.uri().path();
        if path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") {
            return Box::pin(self.inner.call(req));
        }
        let handled = Handled::default();
        req.extensions_mut().insert(handled.clone());
        let peer = req.extensions().get::<Peer>().cloned();
        // The request's URI shares its bytes with the request (a refcount, not a copy).
        let uri = req.uri().clone();
        // A refusal made here is recorded under the caller's trace id too (a refcount, not a
        // copy; parsed only if the call is refused).
        let traceparent = req.headers().get("traceparent").cloned();
        let layer = self.layer.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            if handled.is_marked() {
                return Ok(resp);
            }
            let Some(status) = Status::from_header_map(resp.headers()) else {
                return Ok(resp);
            };
            if status.code() == Code::Ok {
                return Ok(resp);
            }
            let path = uri.path();
            let rej = classify(&status, path);
            let trace_id = trace_id_from(traceparent.as_ref());
            // Replace tonic's status headers with ours (same response, trailers-only).
            let ours: http::Response<()> = rej.to_status(&trace_id).into_http();
            for name in [
                "grpc-status",
                "grpc-message",
                "grpc-status-details-bin",
                crate::TRACE_ID_HEADER,
            ] {
                resp.headers_mut().remove(name);
                if let Some(v) = ours.headers().get(name) {
                    resp.headers_mut().insert(name, v.clone());
                }
            }
            tracing::info!(%trace_id, %path, reason = %rej.reason, detail = %status.message(), "request refused before the pipeline");
            let rec = AuditRecord {
                decision: crate::audit::Decision::Deny,
                rule: rej.rule.as_deref().map(Arc::from),
                reason: Some(rej.reason.as_str().to_owned()),
                detail: Some(status.message().chars().take(200).collect()),
                policy_version: layer
                    .gateway
                    .upgrade()
                    .map(|g| g.snapshot().policy.version.clone())
                    .unwrap_or_default(),
                ..record_from_peer(peer.as_ref(), path.chars().take(200).collect(), trace_id)
            };
            if let Err(rec) = Pending::new(layer.audit.clone(), rec)
                .commit(rej.code())
                .await
            {
                layer.audit.submit_detached(rec);
            }
            Ok(resp)
        })
    }
}

impl<S> Edge<S> {
    /// Refuse what is not a gRPC call: a method other than POST (HTTP 405), a content-type
    /// other than `application/grpc[+proto]` (HTTP 415), with a gRPC status too.
    fn not_grpc<B, R: Default>(&self, req: &http::Request<B>) -> Option<http::Response<R>> {
        let ct = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let grpc_ct = ct == "application/grpc"
            || ct.starts_with("application/grpc+")
            || ct.starts_with("application/grpc;");
        let (http_status, why) = if req.method() != http::Method::POST {
            (
                http::StatusCode::METHOD_NOT_ALLOWED,
                format!("gRPC calls are POST requests, not {}", req.method()),
            )
        } else if !grpc_ct {
            (
                http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "gRPC calls have content-type application/grpc".to_owned(),
            )
        } else {
            return None;
        };
        let rej = Reject::new(Reason::NotGrpc, why).with_rule("interface:xgate.v1");
        let detail = format!(
            "{} with content-type `{}`",
            req.method(),
            ct.chars().take(100).collect::<String>()
        );
        let mut resp: http::Response<R> = self.refuse_unread(req, &rej, detail);
        *resp.status_mut() = http_status;
        Some(resp)
    }

    /// A refusal made before anything of the call is read (nothing authenticated yet): a
    /// rate-limited record, and the trailers-only answer with the trace id.
    fn refuse_unread<B, R: Default>(
        &self,
        req: &http::Request<B>,
        rej: &Reject,
        detail: String,
    ) -> http::Response<R> {
        let mut rec = refusal_record(
            req.extensions().get::<Peer>(),
            req.uri().path().chars().take(200).collect(),
            rej,
            detail,
        );
        rec.policy_version = self
            .layer
            .gateway
            .upgrade()
            .map(|g| g.snapshot().policy.version.clone())
            .unwrap_or_default();
        let trace_id = rec.trace_id.clone();
        self.layer.refusals.record(rec);
        rej.to_status(&trace_id).into_http()
    }

    /// Refuse a call whose metadata is over the limit, without reading it (no token is
    /// checked, no header is parsed): the gRPC status, a metric, a rate-limited record.
    fn metadata_too_large<B, R: Default>(
        &self,
        req: &http::Request<B>,
        size: usize,
    ) -> http::Response<R> {
        let max = self.layer.max_metadata;
        let rej = Reject::new(
            Reason::MetadataTooLarge,
            format!(
                "the call's metadata is {size} bytes; the gateway accepts at most {max}: send less in headers"
            ),
        )
        .with_rule("limits:max_metadata_bytes");
        metrics::counter!("xgate_metadata_refused_total", "layer" => "edge").increment(1);
        tracing::info!(size, max, "call refused: metadata too large");
        self.refuse_unread(req, &rej, format!("{size} bytes of metadata, over {max}"))
    }
}

/// The record of a refusal that has only the connection's peer to go on: who (from the
/// certificate), what (the path), why (`rej`), with `detail`.
pub fn refusal_record(
    peer: Option<&Peer>,
    method: String,
    rej: &Reject,
    detail: String,
) -> AuditRecord {
    AuditRecord {
        decision: crate::audit::Decision::Deny,
        rule: rej.rule.as_deref().map(Arc::from),
        reason: Some(rej.reason.as_str().to_owned()),
        detail: Some(detail),
        grpc_status: audit::code_name(rej.code()),
        grpc_code: rej.code() as i32,
        ..record_from_peer(peer, method, audit::new_trace_id())
    }
}

/// What a pre-pipeline refusal was, in xgate's terms.
fn classify(status: &Status, path: &str) -> Reject {
    let shown: String = path.chars().take(100).collect();
    match status.code() {
        Code::Unimplemented if status.message().contains("compressed") => Reject::new(
            Reason::EncodingUnsupported,
            "the request's grpc-encoding is not one the gateway takes; send identity or gzip",
        )
        .with_rule("interface:xgate.v1"),
        Code::Unimplemented => Reject::new(
            Reason::MethodUnknown,
            format!("`{shown}` is not a method of the xgate.v1 interface"),
        )
        .with_rule("interface:xgate.v1"),
        Code::OutOfRange | Code::ResourceExhausted if status.message().contains("too large") => Reject::new(
            Reason::MessageTooLarge,
            "the request message is larger than the gateway accepts; ask for fewer values or page",
        )
        .with_rule("limits:max_message_bytes"),
        Code::Internal | Code::InvalidArgument => Reject::new(
            Reason::RequestMalformed,
            "the request body is not a valid protobuf message of the xgate.v1 interface",
        )
        .with_rule("interface:xgate.v1"),
        _ => Reject::new(Reason::RequestMalformed, "the request could not be read").with_rule("interface:xgate.v1"),
    }
}
