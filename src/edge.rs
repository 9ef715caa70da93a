//! The outermost layer on the gRPC port, for calls that never reach the pipeline.
//!
//! tonic refuses some requests before any xgate code runs: an unknown method path, a body
//! that is not a protobuf message, a message over the size limit. Those are hostile or broken
//! callers, so they are answered like every other refusal — a stable reason in
//! `google.rpc.ErrorInfo` and the right code (`UNIMPLEMENTED`, `INVALID_ARGUMENT`,
//! `RESOURCE_EXHAUSTED` rather than tonic's `INTERNAL`/`OUT_OF_RANGE`) — and audited.
//!
//! The pipeline marks each request it takes (`Gateway::begin` sets [`Handled`]); a response to
//! an unmarked request carrying a gRPC error in its headers (a trailers-only response) is one
//! of these.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use tonic::{Code, Status};
use tower::{Layer, Service};

use crate::{
    audit::{self, AuditLog, AuditRecord, Pending},
    error::{Reason, Reject},
    gateway::WeakGateway,
    identity::Peer,
};

/// Set by the pipeline when it takes a request (it writes the audit record itself).
#[derive(Clone, Debug, Default)]
pub struct Handled(Arc<AtomicBool>);

impl Handled {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug)]
pub struct EdgeLayer {
    audit: AuditLog,
    gateway: WeakGateway,
}

impl EdgeLayer {
    pub fn new(audit: AuditLog, gateway: WeakGateway) -> Self {
        Self { audit, gateway }
    }
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
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // Health checks and reflection carry no data: answered by their services, not audited.
        let path = req.uri().path();
        if path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") {
            return Box::pin(self.inner.call(req));
        }
        let handled = Handled::default();
        req.extensions_mut().insert(handled.clone());
        let peer = req.extensions().get::<Peer>().cloned();
        let path = req.uri().path().to_owned();
        let layer = self.layer.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            if handled.0.load(Ordering::Relaxed) {
                return Ok(resp);
            }
            let Some(status) = Status::from_header_map(resp.headers()) else {
                return Ok(resp);
            };
            if status.code() == Code::Ok {
                return Ok(resp);
            }
            let rej = classify(&status, &path);
            let trace_id = audit::new_trace_id();
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
                time: audit::now_rfc3339(),
                trace_id,
                method: path.chars().take(200).collect(),
                consumer_dept: peer
                    .as_ref()
                    .and_then(|p| p.identity.as_ref().ok())
                    .map(|s| s.dept.clone()),
                consumer_system: peer
                    .as_ref()
                    .and_then(|p| p.identity.as_ref().ok())
                    .map(|s| s.system.clone()),
                cert_fingerprint: peer.as_ref().map(|p| p.fingerprint.clone()),
                remote_addr: peer.as_ref().map(|p| p.remote.to_string()),
                decision: "deny",
                rule: rej.rule.clone(),
                reason: Some(rej.reason.as_str().to_owned()),
                detail: Some(status.message().chars().take(200).collect()),
                policy_version: layer
                    .gateway
                    .upgrade()
                    .map(|g| g.snapshot().policy.version.clone())
                    .unwrap_or_default(),
                ..AuditRecord::default()
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

/// What a pre-pipeline refusal was, in xgate's terms.
fn classify(status: &Status, path: &str) -> Reject {
    let shown: String = path.chars().take(100).collect();
    match status.code() {
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
