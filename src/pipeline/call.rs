//! Stages `begin` and `finish`: a call's trace id, span and audit record from its first
//! moment, the caller's deadline, and the commit that comes before any answer.
//!
//! Every path out of the pipeline goes through [`Gateway::finish`] (or the record's drop,
//! which writes `CANCELLED`): one record per call. Not here: what is decided (the stages in
//! between).

use super::*;

/// Set by the pipeline when it takes a request (it writes the audit record itself), so the
/// edge ([`super::edge`]) records only the refusals made before it.
#[derive(Clone, Debug, Default)]
pub struct Handled(Arc<std::sync::atomic::AtomicBool>);

impl Handled {
    pub fn mark(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_marked(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A record begun now for a call to `method` on a connection from `peer` (its system
/// identity, certificate fingerprint and address, when known), with this trace id.
pub(crate) fn record_from_peer(
    peer: Option<&Peer>,
    method: String,
    trace_id: String,
) -> AuditRecord {
    let system = peer.and_then(|p| p.identity.as_ref().ok());
    AuditRecord {
        time: audit::now_rfc3339(),
        trace_id,
        method,
        consumer_dept: system.map(|s| s.dept.clone()),
        consumer_system: system.map(|s| s.system.clone()),
        cert_fingerprint: peer.map(|p| p.fingerprint.clone()),
        remote_addr: peer.map(|p| p.remote_text.clone()),
        ..AuditRecord::default()
    }
}

/// One call in progress: its trace id, its span and its audit record.
pub(super) struct Call {
    pub(super) trace_id: String,
    pub(super) pending: Pending,
    /// `xgate.call`: the stages' spans are its children.
    pub(super) span: tracing::Span,
    /// The caller's `traceparent`/`tracestate`, passed on unchanged when tracing is off.
    pub(super) trace_headers: Vec<(&'static str, MetadataValue<tonic::metadata::Ascii>)>,
    /// When the caller's `grpc-timeout` runs out, counted from the call's arrival.
    pub(super) deadline: Option<tokio::time::Instant>,
    /// The last moment a result may still be committed and sent: the deadline less the
    /// headroom the answer needs to be made durable and reach the caller (a fifth of the
    /// timeout, at most 100 ms — the caller's clock started before the request left it).
    pub(super) answer_by: Option<tokio::time::Instant>,
}

impl Call {
    /// Note the stage the call enters (what its record says if it is cut short there).
    pub(super) fn at(&mut self, stage: &'static str) {
        self.pending.rec().stage = stage;
    }

    /// Too late to send a result the caller would still take.
    pub(super) fn too_late(&self) -> bool {
        self.answer_by
            .is_some_and(|d| tokio::time::Instant::now() >= d)
    }

    /// The caller's deadline passed: what the caller is answered, and what its record says
    /// (the stage reached; no rows sent).
    pub(super) fn deadline_passed(&mut self) -> Reject {
        let rec = self.pending.rec();
        let stage = if rec.stage.is_empty() {
            "begin"
        } else {
            rec.stage
        };
        rec.reached = Some(stage);
        rec.rows = 0;
        rec.fields_returned.clear();
        rec.returned_subjects.clear();
        rec.fields_masked.clear();
        Reject::new(
            Reason::DeadlineExceeded,
            format!(
                "your deadline (grpc-timeout) passed while the gateway was at `{stage}`; no rows were sent: allow more time"
            ),
        )
        .with_rule("caller:grpc-timeout")
    }
}

/// Run `fut` until `deadline` (if any): `None` when the deadline came first (`fut` is dropped;
/// it has committed nothing, since records are committed after it, by `finish`).
pub(super) async fn within<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    fut: F,
) -> Option<F::Output> {
    match deadline {
        None => Some(fut.await),
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
    }
}

pub(super) fn now_unix() -> i64 {
    i64::try_from(crate::token::now_secs()).unwrap_or(i64::MAX)
}

/// The caller's `grpc-timeout`, less headroom (a fifth, at most 100 ms) for the answer to be
/// audited (fsync) and travel back.
pub(super) fn caller_deadline<T>(req: &Request<T>) -> Option<Duration> {
    let d = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(upstream::parse_grpc_timeout)?;
    Some(d - headroom(d))
}

/// What an answer needs of a caller's timeout `d` to be recorded and travel back: a fifth,
/// at most 100 ms.
pub(super) fn headroom(d: Duration) -> Duration {
    (d / 5).min(Duration::from_millis(100))
}

pub(super) fn shutting_down() -> Reject {
    Reject::new(
        Reason::GatewayShuttingDown,
        "the gateway is shutting down; retry (another replica will answer)",
    )
}

pub(super) fn audit_failed() -> Reject {
    Reject::new(
        Reason::AuditUnavailable,
        "the audit trail could not record this call, so its result is withheld; retry shortly",
    )
    .with_rule("audit:fail-closed")
}

/// The record of a call answered `AUDIT_UNAVAILABLE` because its own record could not be
/// written: what the caller actually got. (`withheld`: no data reached the caller.)
pub(super) fn refused_for_audit(mut rec: AuditRecord, rej: &Reject, withheld: bool) -> AuditRecord {
    rec.grpc_status = audit::code_name(rej.code());
    rec.grpc_code = rej.code() as i32;
    rec.reason = Some(rej.reason.as_str().to_owned());
    if withheld {
        rec.rows = 0;
        rec.fields_returned.clear();
        rec.returned_subjects.clear();
        rec.fields_masked.clear();
    }
    rec
}

pub(super) fn record_reject(rec: &mut AuditRecord, rej: &Reject) {
    rec.reason = Some(rej.reason.as_str().to_owned());
    if rej.rule.is_some() {
        rec.rule = rej.rule.as_deref().map(Arc::from);
    }
    if rec.decision == audit::Decision::Undecided {
        rec.decision = audit::Decision::Deny;
    }
}

/// The call's trace id: the caller's W3C `traceparent` trace id if it sent one, else fresh.
pub(crate) fn trace_id_from(traceparent: Option<&http::HeaderValue>) -> String {
    if let Some(tp) = traceparent.and_then(|v| v.to_str().ok()) {
        let mut parts = tp.split('-');
        if let (Some(_ver), Some(tid)) = (parts.next(), parts.next())
            && tid.len() == 32
            && tid.bytes().all(|b| b.is_ascii_hexdigit())
            && tid.bytes().any(|b| b != b'0')
        {
            return tid.to_ascii_lowercase();
        }
    }
    audit::new_trace_id()
}

impl Gateway {
    /// Stage `begin`: open the audit record. Refuses when the audit trail cannot take records.
    pub(super) fn begin<T>(&self, method: &'static str, req: &Request<T>) -> Result<Call, Status> {
        let arrived = tokio::time::Instant::now();
        if let Some(h) = req.extensions().get::<Handled>() {
            h.mark();
        }
        let span = tracing::info_span!(
            "xgate.call",
            otel.name = method,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = method,
            trace_id = tracing::field::Empty,
            xgate.consumer = tracing::field::Empty,
            xgate.dataset = tracing::field::Empty,
            xgate.purpose = tracing::field::Empty,
            xgate.decision = tracing::field::Empty,
            xgate.reason = tracing::field::Empty,
            xgate.rows = tracing::field::Empty,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        // With tracing on, the audit trace id is the trace's id (the caller's, if it sent a
        // traceparent): one id finds both the record and the spans.
        let trace_id = crate::telemetry::adopt_parent(&span, req.metadata())
            .unwrap_or_else(|| trace_id_from(req.metadata().as_ref().get("traceparent")));
        span.record("trace_id", trace_id.as_str());
        let trace_headers = ["traceparent", "tracestate"]
            .into_iter()
            .filter_map(|k| req.metadata().get(k).map(|v| (k, v.clone())))
            .collect();
        let peer = req.extensions().get::<Peer>();
        let mut rec = AuditRecord {
            policy_version: self.inner.snapshot.load().policy.version.clone(),
            ..record_from_peer(peer, method.to_owned(), trace_id.clone())
        };
        if !self.inner.audit.is_open() {
            tracing::error!(%trace_id, method, "audit trail unavailable: refusing call");
            let rej = Reject::new(
                Reason::AuditUnavailable,
                "the audit trail cannot record calls right now; try again shortly",
            )
            .with_rule("audit:fail-closed");
            // The refusal is a call too: its record waits (in memory, bounded) until the
            // trail can be written again.
            record_reject(&mut rec, &rej);
            rec.grpc_status = audit::code_name(rej.code());
            rec.grpc_code = rej.code() as i32;
            self.inner.audit.keep(rec);
            return Err(rej.to_status(&trace_id));
        }
        rec.stage = "begin";
        // The pipeline owns the caller's deadline: it answers DEADLINE_EXCEEDED and records
        // how far the call got (nothing else cuts a call short: see `conn`).
        let timeout = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(upstream::parse_grpc_timeout);
        rec.timeout_us = timeout.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        Ok(Call {
            trace_id,
            pending: Pending::new(self.inner.audit.clone(), rec),
            span,
            trace_headers,
            // (A timeout too far off to represent is no deadline at all.)
            deadline: timeout.and_then(|d| arrived.checked_add(d)),
            answer_by: timeout.and_then(|d| arrived.checked_add(d - headroom(d))),
        })
    }

    /// Stage `finish`: commit the record with the outcome and build the reply.
    pub(super) async fn finish<T>(
        &self,
        mut call: Call,
        result: Result<T, Reject>,
    ) -> Result<Response<T>, Status> {
        let log = call.pending.log().clone();
        let audit_span = tracing::info_span!(parent: &call.span, "xgate.audit");
        // A result ready after the caller's deadline is not sent: the caller has given up.
        let result = match result {
            Ok(_) if call.too_late() => Err(call.deadline_passed()),
            r => r,
        };
        call.at("commit");
        match result {
            Ok(body) => {
                self.settle(&mut call, Code::Ok, None);
                // The response leaves only once its record is durable (sync mode).
                if let Err(rec) = call.pending.commit(Code::Ok).instrument(audit_span).await {
                    let rej = audit_failed();
                    log.submit_detached(refused_for_audit(rec, &rej, true));
                    return Err(rej.to_status(&call.trace_id));
                }
                let mut resp = Response::new(body);
                if let Ok(v) = MetadataValue::try_from(call.trace_id.as_str()) {
                    resp.metadata_mut().insert(TRACE_ID_HEADER, v);
                }
                Ok(resp)
            }
            Err(rej) => {
                let status = rej.to_status(&call.trace_id);
                record_reject(call.pending.rec(), &rej);
                self.settle(&mut call, rej.code(), Some(rej.reason));
                tracing::info!(parent: &call.span, trace_id = %call.trace_id, reason = %rej.reason, rule = ?rej.rule, "call refused");
                if let Err(rec) = call.pending.commit(rej.code()).instrument(audit_span).await {
                    // The refusal stands; its record waits for the trail to recover.
                    log.submit_detached(rec);
                }
                Err(status)
            }
        }
    }

    /// The call's outcome into the metrics and onto its span (before its record is committed).
    pub(super) fn settle(&self, call: &mut Call, code: Code, reason: Option<Reason>) {
        let snap = self.inner.snapshot.load();
        let elapsed = call.pending.elapsed();
        let rec = call.pending.rec();
        // Label values come from the policy (bounded), never straight from the caller.
        let consumer = rec
            .consumer_dept
            .as_deref()
            .filter(|d| snap.policy.department(d).is_some())
            .unwrap_or("(unknown)");
        let dataset = match rec.dataset.as_deref() {
            None => "",
            Some(d) if snap.policy.dataset(d).is_some() => d,
            Some(_) => "(unknown)",
        };
        let code_name = audit::code_name(code);
        self.inner.call_metrics.record(
            &rec.method,
            consumer,
            dataset,
            code_name,
            elapsed.as_secs_f64(),
        );
        if let Some(r) = reason {
            metrics::counter!("xgate_denials_total", "reason" => r.as_str(), "consumer" => consumer.to_owned()).increment(1);
            if matches!(
                r,
                Reason::RateLimited | Reason::QuotaExhausted | Reason::LimitsUnavailable
            ) {
                metrics::counter!("xgate_rate_limited_total", "reason" => r.as_str(), "consumer" => consumer.to_owned(), "dataset" => dataset.to_owned()).increment(1);
            }
        }
        let span = &call.span;
        span.record("xgate.consumer", consumer);
        if !dataset.is_empty() {
            span.record("xgate.dataset", dataset);
        }
        if let Some(p) = &rec.purpose {
            span.record("xgate.purpose", p.as_str());
        }
        span.record("xgate.decision", rec.decision.as_str());
        if let Some(r) = reason {
            span.record("xgate.reason", r.as_str());
        }
        span.record("xgate.rows", rec.rows);
        span.record("rpc.grpc.status_code", code as i64);
    }
}
