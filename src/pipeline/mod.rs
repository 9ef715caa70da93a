//! The request pipeline: the gateway's `DataExchange` and `Catalog` services.
//!
//! Every call walks the same stages, in this order, and leaves exactly one audit record:
//!
//! ```text
//! begin        trace id, audit record opened (refuse if the audit trail is failing)
//! authenticate certificate identity (per connection; revocation and expiry per call)
//!              + JWT (cached), token dept == cert dept, RFC 8705 binding
//! check        request shape: names and filter bounded, page size capped
//! decide       policy::evaluate(snapshot, caller, request, now) -> Permit | Reject   (pure)
//! scope        a row-scoped permit narrows (or refuses) the filter
//! limit        consumer and permit rate limiters, the grant's daily quota
//! forward      provider protection (rate, in-flight), pooled mTLS channel, deadline
//!              propagated, verified identity + purpose as metadata (never the token)
//! shape        strip columns not permitted and rows out of scope, apply masks
//!              (never trusting the provider)
//! finish       audit record committed (fsync'd in sync mode) before the response leaves
//! ```
//!
//! Streams re-decide every batch under the newest policy and end with their token.
//!
//! Rejections at any stage become statuses through [`Reject::to_status`] (one table), and the
//! record carries the reason and the rule.

pub mod edge;
pub mod paging;

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, metadata::MetadataValue};
use tracing::Instrument;

use crate::{
    TRACE_ID_HEADER,
    audit::{self, AuditLog, AuditRecord, Pending},
    config::Limits,
    error::{Reason, Reject},
    limits::{
        Place, RateLimits,
        provider::{Limit, Protections, RateDecided, saturated},
        shared::{Lease, OnUnavailable, SharedLimits, Verdict},
    },
    pb::{self, QueryRequest},
    policy::{self, Caller, Mask, Permit, Policy, mask::MaskKey},
    tls::identity::{Peer, SystemId},
    token::{Claims, TokenVerifier},
    upstream::{self, Upstreams},
    wire,
};

pub const METHOD_QUERY: &str = "/xgate.v1.DataExchange/Query";
pub const METHOD_QUERY_STREAM: &str = "/xgate.v1.DataExchange/QueryStream";
pub const METHOD_LIST: &str = "/xgate.v1.Catalog/ListDatasets";
pub const METHOD_DESCRIBE: &str = "/xgate.v1.Catalog/DescribeDataset";

/// Everything derived from one policy file; swapped atomically as a whole.
#[derive(Debug)]
pub struct Snapshot {
    pub policy: Arc<Policy>,
    pub limits: RateLimits,
    /// Provider protection (rate, in-flight).
    pub protection: Protections,
    pub upstreams: Upstreams,
}

impl Snapshot {
    /// Derive a policy's snapshot (limiters, provider channels), reusing what `previous`
    /// had for unchanged grants and providers.
    pub fn build(
        policy: Arc<Policy>,
        up: &crate::upstream::UpstreamTls,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, String> {
        let limits = RateLimits::for_policy(&policy, previous.map(|p| &p.limits));
        let protection =
            Protections::for_policy(&policy, up.queue_wait, previous.map(|p| &p.protection));
        let upstreams = Upstreams::for_policy(&policy, up, previous.map(|p| &p.upstreams))?;
        Ok(Snapshot {
            policy,
            limits,
            protection,
            upstreams,
        })
    }
}

/// The gateway's shared state. Clones share it.
#[derive(Clone, Debug)]
pub struct Gateway {
    inner: Arc<Inner>,
}

/// A handle that does not keep the gateway (and its audit channel) alive: for the reloader
/// and the admin endpoint, which must not delay the audit trail's final flush.
#[derive(Clone, Debug)]
pub struct WeakGateway(std::sync::Weak<Inner>);

impl WeakGateway {
    pub fn upgrade(&self) -> Option<Gateway> {
        self.0.upgrade().map(|inner| Gateway { inner })
    }
}

#[derive(Debug)]
struct Inner {
    snapshot: ArcSwap<Snapshot>,
    tokens: Arc<TokenVerifier>,
    audit: AuditLog,
    limits: Limits,
    max_timeout: Duration,
    mask_key: MaskKey,
    /// Set when the drain timeout ran out: calls still waiting on providers end now.
    cut: tokio::sync::watch::Sender<bool>,
    /// Bumped on every policy swap, so open streams re-check at once.
    policy_changes: tokio::sync::watch::Sender<u64>,
    /// Serials revoked by the current CRLs.
    revocations: crate::tls::Revocations,
    /// Daily quota counters (kept across policy reloads).
    quotas: crate::limits::Quotas,
    /// Limits shared with other replicas in Redis; `None`: this process's limiters decide.
    shared: Option<Arc<SharedLimits>>,
    /// Provider id -> reachable at the last health probe.
    providers_up: ArcSwap<std::collections::HashMap<String, bool>>,
    /// Failed authentications per client certificate.
    auth_failures: crate::limits::failures::AuthFailures,
    /// Seals the page tokens callers see.
    pages: crate::pipeline::paging::PageSeal,
}

impl Authenticated {
    /// The caller as the policy sees it.
    fn caller(&self) -> Caller<'_> {
        Caller {
            dept: &self.system.dept,
            system: &self.system.system,
            token_purposes: self.claims.purposes.as_deref(),
            token_bound: self.bound,
        }
    }
}

/// An admitted stream: the provider's stream plus what is needed to re-decide it.
struct OpenStream {
    /// The stream's place with the provider (here, and among every replica's calls when the
    /// limits are shared).
    _place: Place,
    upstream: tonic::Streaming<wire::QueryResponse>,
    permit: Permit,
    /// The policy version `permit` was decided under.
    version: String,
    provider: String,
    caller_deadline: Option<Duration>,
    who: Authenticated,
    /// The request as the caller sent it (before the gateway narrowed it).
    asked: QueryRequest,
}

/// A data request ready for the provider (see [`Gateway::prepare`]).
struct Prepared {
    /// The policy version it was decided under.
    version: String,
    /// The request as the provider will see it (fields and filter narrowed).
    body: QueryRequest,
    permit: Permit,
    provider: String,
    client: wire::data_exchange_client::DataExchangeClient<tonic::transport::Channel>,
    /// This replica's place with the provider, and the shared lease (if any).
    place: Place,
}

/// A caller that passed authentication.
#[derive(Clone)]
struct Authenticated {
    system: SystemId,
    claims: Arc<Claims>,
    /// The token is bound to the presenting certificate (RFC 8705).
    bound: bool,
}

/// One call in progress: its trace id, its span and its audit record.
struct Call {
    trace_id: String,
    pending: Pending,
    /// `xgate.call`: the stages' spans are its children.
    span: tracing::Span,
    /// The caller's `traceparent`/`tracestate`, passed on unchanged when tracing is off.
    trace_headers: Vec<(&'static str, MetadataValue<tonic::metadata::Ascii>)>,
    /// When the caller's `grpc-timeout` runs out, counted from the call's arrival.
    deadline: Option<tokio::time::Instant>,
    /// The last moment a result may still be committed and sent: the deadline less the
    /// headroom the answer needs to be made durable and reach the caller (a fifth of the
    /// timeout, at most 100 ms — the caller's clock started before the request left it).
    answer_by: Option<tokio::time::Instant>,
}

impl Call {
    /// Note the stage the call enters (what its record says if it is cut short there).
    fn at(&mut self, stage: &'static str) {
        self.pending.rec().stage = stage;
    }

    /// Too late to send a result the caller would still take.
    fn too_late(&self) -> bool {
        self.answer_by
            .is_some_and(|d| tokio::time::Instant::now() >= d)
    }

    /// The caller's deadline passed: what the caller is answered, and what its record says
    /// (the stage reached; no rows sent).
    fn deadline_passed(&mut self) -> Reject {
        let rec = self.pending.rec();
        let stage = if rec.stage.is_empty() {
            "begin"
        } else {
            rec.stage
        };
        rec.reached = Some(stage);
        rec.rows = 0;
        rec.fields_returned.clear();
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
async fn within<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    fut: F,
) -> Option<F::Output> {
    match deadline {
        None => Some(fut.await),
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
    }
}

impl Gateway {
    pub fn new(
        snapshot: Snapshot,
        tokens: Arc<TokenVerifier>,
        audit: AuditLog,
        limits: Limits,
        max_timeout: Duration,
        mask_key: MaskKey,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                snapshot: ArcSwap::from_pointee(snapshot),
                tokens,
                audit,
                limits,
                max_timeout,
                mask_key,
                cut: tokio::sync::watch::Sender::new(false),
                policy_changes: tokio::sync::watch::Sender::new(0),
                revocations: Arc::default(),
                quotas: crate::limits::Quotas::new(8 * 3600),
                shared: None,
                providers_up: ArcSwap::default(),
                auth_failures: crate::limits::failures::AuthFailures::new(10, 50),
                pages: crate::pipeline::paging::PageSeal::random(),
            }),
        }
    }

    /// End every call still waiting on a provider with `UNAVAILABLE` (the drain timeout ran
    /// out). Their audit records are written as usual.
    pub fn cut_in_flight(&self) {
        let _ = self.inner.cut.send(true);
    }

    /// Wait for `fut` at most `wait`, unless the gateway cuts in-flight calls first.
    async fn bounded<F: std::future::Future>(
        &self,
        wait: Duration,
        fut: F,
    ) -> Result<Result<F::Output, tokio::time::error::Elapsed>, Reject> {
        let mut cut = self.inner.cut.subscribe();
        tokio::select! {
            r = tokio::time::timeout(wait, fut) => Ok(r),
            _ = cut.wait_for(|c| *c) => Err(shutting_down()),
        }
    }

    /// Install a new policy snapshot. Atomic: every call is decided wholly under the old or
    /// the new one; calls in flight keep the snapshot they started with, except open streams,
    /// which re-check each batch against the newest.
    /// Returns the snapshot it replaced, for the caller to drop off the serving threads.
    pub fn swap(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        let old = self.inner.snapshot.swap(Arc::new(snapshot));
        self.inner.policy_changes.send_modify(|v| *v += 1);
        old
    }

    pub fn downgrade(&self) -> WeakGateway {
        WeakGateway(Arc::downgrade(&self.inner))
    }

    /// Share the revocation list the TLS layer keeps current.
    pub fn with_revocations(mut self, r: crate::tls::Revocations) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.revocations = r;
        }
        self
    }

    /// Count daily quotas in this zone (seconds east of UTC) and on this clock.
    pub fn with_quotas(mut self, q: crate::limits::Quotas) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.quotas = q;
        }
        self
    }

    /// Limit failed authentications per client certificate to `per_second` (bursts of
    /// `burst`).
    pub fn with_auth_failures(mut self, per_second: u32, burst: u32) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.auth_failures = crate::limits::failures::AuthFailures::new(per_second, burst);
        }
        self
    }

    /// Seal page tokens with this key (shared by the replicas of one gateway).
    pub fn with_page_seal(mut self, seal: crate::pipeline::paging::PageSeal) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.pages = seal;
        }
        self
    }

    /// Forget idle per-certificate failure buckets.
    pub fn retain_recent(&self) {
        self.snapshot().limits.retain_recent();
        self.inner.auth_failures.retain_recent();
    }

    /// Decide rates and quotas in Redis, shared with the other replicas.
    pub fn with_shared_limits(mut self, shared: Arc<SharedLimits>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.shared = Some(shared);
        }
        self
    }

    /// Count rows delivered under a grant with a rows quota (locally, and in Redis when the
    /// limits are shared).
    fn count_rows(&self, permit: &Permit, rows: u64) {
        if let (Some(g), Some(q)) = (&permit.grant_id, &permit.daily_quota)
            && q.rows.is_some()
        {
            self.inner.quotas.add_rows(g, rows);
            if let Some(shared) = &self.inner.shared {
                let (day, left) = self.inner.quotas.today();
                shared.add_rows(g, day, left, rows);
            }
        }
    }

    /// Provider reachability from the last health probe.
    pub fn providers_up(&self) -> Arc<std::collections::HashMap<String, bool>> {
        self.inner.providers_up.load_full()
    }

    pub fn set_providers_up(&self, up: std::collections::HashMap<String, bool>) {
        self.inner.providers_up.store(Arc::new(up));
    }

    /// Audit records waiting for the writer.
    pub fn audit_queue_depth(&self) -> usize {
        self.inner.audit.queue_depth()
    }

    /// Whether the audit trail still takes records.
    pub fn audit_open(&self) -> bool {
        self.inner.audit.is_open()
    }

    /// The policy snapshot calls are decided under now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    /// Stage `begin`: open the audit record. Refuses when the audit trail cannot take records.
    fn begin<T>(&self, method: &'static str, req: &Request<T>) -> Result<Call, Status> {
        let arrived = tokio::time::Instant::now();
        if let Some(h) = req.extensions().get::<crate::pipeline::edge::Handled>() {
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
            .unwrap_or_else(|| trace_id_from(req.metadata()));
        span.record("trace_id", trace_id.as_str());
        let trace_headers = ["traceparent", "tracestate"]
            .into_iter()
            .filter_map(|k| req.metadata().get(k).map(|v| (k, v.clone())))
            .collect();
        let peer = req.extensions().get::<Peer>();
        let mut rec = AuditRecord {
            time: audit::now_rfc3339(),
            trace_id: trace_id.clone(),
            method: method.to_owned(),
            consumer_dept: peer
                .and_then(|p| p.identity.as_ref().ok())
                .map(|s| s.dept.clone()),
            consumer_system: peer
                .and_then(|p| p.identity.as_ref().ok())
                .map(|s| s.system.clone()),
            cert_fingerprint: peer.map(|p| p.fingerprint.clone()),
            remote_addr: peer.map(|p| p.remote.to_string()),
            policy_version: self.inner.snapshot.load().policy.version.clone(),
            ..AuditRecord::default()
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

    /// Stage `authenticate`: certificate identity, then the token, then their agreement.
    async fn authenticate<T>(
        &self,
        call: &mut Call,
        req: &Request<T>,
    ) -> Result<Authenticated, Reject> {
        call.at("authenticate");
        let peer = req.extensions().get::<Peer>().ok_or_else(|| {
            // Only reachable if the server is wired without the TLS acceptor: a bug.
            tracing::error!(trace_id = %call.trace_id, "request without peer info");
            Reject::new(
                Reason::Internal,
                "internal error; quote the trace id to the operators",
            )
        })?;
        // The connection may be older than a revocation or outlive its certificate.
        if !peer.serial.is_empty() && self.inner.revocations.load().contains(&peer.serial) {
            return Err(Reject::new(
                Reason::CertRevoked,
                "your client certificate has been revoked; ask your CA for a new one",
            )
            .with_rule("tls:revocation-list"));
        }
        if peer.not_after < now_unix() {
            return Err(Reject::new(
                Reason::CertExpired,
                "your client certificate has expired; renew it",
            )
            .with_rule("tls:certificate-validity"));
        }
        let system = peer.identity.clone().map_err(|why| {
            Reject::new(Reason::CertIdentityMissing, why).with_rule("identity:certificate")
        })?;
        // One token per call: with two `authorization` headers, which one counts would be
        // up to whoever reads them.
        let mut all = req.metadata().get_all("authorization").iter();
        let header = all.next().and_then(|v| v.to_str().ok());
        if all.next().is_some() {
            return Err(Reject::new(
                Reason::TokenMalformed,
                "the call carries more than one `authorization` header; send exactly one",
            )
            .with_rule("identity:token"));
        }
        // A certificate that keeps failing is refused before any signature work.
        self.inner.auth_failures.check(&peer.fingerprint)?;
        let claims = self.inner.tokens.verify_header(header).await.map_err(|r| {
            // Failures that cost a signature check count; refusals cheaper than the count
            // itself (no token, not a JWT, a refused algorithm, an unknown key) and the
            // identity provider being unreachable (not the caller's doing) do not.
            if !matches!(
                r.reason,
                Reason::TokenMissing
                    | Reason::TokenMalformed
                    | Reason::TokenTooLarge
                    | Reason::TokenAlgorithmNotAllowed
                    | Reason::TokenKeyUnknown
                    | Reason::TokenKeysUnavailable
            ) {
                self.inner.auth_failures.failed(&peer.fingerprint);
            }
            r.with_rule("identity:token")
        })?;
        call.pending.rec().token_subject = Some(claims.sub.clone());
        if claims.dept != system.dept {
            return Err(Reject::new(
                Reason::TokenDeptMismatch,
                format!(
                    "the token was issued to department `{}` but the certificate belongs to `{}`",
                    claims.dept, system.dept
                ),
            )
            .with_rule("identity:token-department-binding"));
        }
        // RFC 8705: a bound token is only good with the certificate it was bound to.
        let bound = match claims.bound_thumbprint() {
            None => false,
            Some(t) if t == peer.x5t_s256 => true,
            Some(_) => {
                return Err(Reject::new(
                    Reason::TokenBindingMismatch,
                    "the token is bound to another certificate than the one presented",
                )
                .with_rule("identity:certificate-bound-token"));
            }
        };
        Ok(Authenticated {
            system,
            claims,
            bound,
        })
    }

    /// Stage `finish`: commit the record with the outcome and build the reply.
    async fn finish<T>(
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
    fn settle(&self, call: &mut Call, code: Code, reason: Option<Reason>) {
        let snap = self.inner.snapshot.load();
        let elapsed = call.pending.elapsed();
        let rec = call.pending.rec();
        // Label values come from the policy (bounded), never straight from the caller.
        let consumer = rec
            .consumer_dept
            .as_deref()
            .filter(|d| snap.policy.department(d).is_some())
            .unwrap_or("(unknown)")
            .to_owned();
        let dataset = match rec.dataset.as_deref() {
            None => "",
            Some(d) if snap.policy.dataset(d).is_some() => d,
            Some(_) => "(unknown)",
        }
        .to_owned();
        let method = rec.method.clone();
        let code_name = audit::code_name(code);
        metrics::counter!("xgate_calls_total", "method" => method.clone(), "consumer" => consumer.clone(), "dataset" => dataset.clone(), "code" => code_name).increment(1);
        metrics::histogram!("xgate_call_duration_seconds", "method" => method, "code" => code_name)
            .record(elapsed.as_secs_f64());
        if let Some(r) = reason {
            metrics::counter!("xgate_denials_total", "reason" => r.as_str(), "consumer" => consumer.clone()).increment(1);
            if matches!(
                r,
                Reason::RateLimited | Reason::QuotaExhausted | Reason::LimitsUnavailable
            ) {
                metrics::counter!("xgate_rate_limited_total", "reason" => r.as_str(), "consumer" => consumer.clone(), "dataset" => dataset.clone()).increment(1);
            }
        }
        let span = &call.span;
        span.record("xgate.consumer", consumer.as_str());
        if !dataset.is_empty() {
            span.record("xgate.dataset", dataset.as_str());
        }
        if let Some(p) = &rec.purpose {
            span.record("xgate.purpose", p.as_str());
        }
        span.record("xgate.decision", rec.decision);
        if let Some(r) = reason {
            span.record("xgate.reason", r.as_str());
        }
        span.record("xgate.rows", rec.rows);
        span.record("rpc.grpc.status_code", code as i64);
    }

    /// Stages `check` + `decide` + `limit` for a data request.
    fn admit(
        &self,
        call: &mut Call,
        who: &Authenticated,
        snap: &Snapshot,
        req: &mut QueryRequest,
    ) -> Result<Permit, Reject> {
        // Shape first: nothing caller-sized reaches the audit record or a message unchecked.
        check_request(req, &self.inner.limits)?;
        let rec = call.pending.rec();
        rec.dataset = Some(req.dataset.clone());
        rec.purpose = Some(req.purpose.clone()).filter(|p| !p.is_empty());
        let caller = who.caller();
        let ask = policy::Request {
            dataset: &req.dataset,
            fields: &req.fields,
            filter: req
                .filter
                .as_ref()
                .map(|f| f.conditions.as_slice())
                .unwrap_or_default(),
            purpose: &req.purpose,
            now: Some(now_unix()),
        };
        let permit = policy::evaluate(&snap.policy, caller, ask)?;
        if let Some(scope) = &permit.scope {
            let conds = &mut req.filter.get_or_insert_with(Default::default).conditions;
            policy::scope::narrow(conds, scope, &permit.rule)?;
        }
        let subjects = subject_hashes(call.pending.log(), &snap.policy, req);
        let rec = call.pending.rec();
        rec.subjects = subjects;
        rec.decision = "allow";
        rec.rule = Some(permit.rule.clone());
        rec.approval_ref = permit.approval_ref.clone();
        // What the provider is asked for: exactly the permitted columns, plus the dataset's
        // region column (stripped again on the way back) so a row scope can always be checked,
        // including one a policy change adds to an open stream.
        req.fields = permit.fields.iter().map(|f| f.name.clone()).collect();
        if let Some(region) = snap
            .policy
            .dataset(&req.dataset)
            .and_then(|d| d.region_field.as_ref())
            && !req.fields.contains(region)
        {
            req.fields.push(region.clone());
        }
        req.page_size = match req.page_size {
            0 => self.inner.limits.default_page_size,
            n => n.min(self.inner.limits.max_page_size),
        };
        Ok(permit)
    }

    /// Stage `limit`: the consumer's overall rate, the grant's rate, its daily quota and the
    /// provider's protection rate — in Redis when the limits are shared (one round trip,
    /// falling back by `on_unavailable`), else by this process's limiters. Returns whether the
    /// provider's rate was decided here (so the forward stage does not take it twice) and, when
    /// the limits are shared and the provider has a `max_in_flight`, the call's place among
    /// all replicas' calls to it (hold it until the call ends).
    async fn limit(
        &self,
        who: &Authenticated,
        snap: &Snapshot,
        dataset: &str,
        permit: &Permit,
        provider: &str,
        call_id: &str,
    ) -> Result<(RateDecided, Option<Lease>), Reject> {
        let dept = &who.system.dept;
        if let Some(shared) = &self.inner.shared {
            let mut buckets = snap.limits.buckets(dept, dataset, permit);
            if let Some(rate) = snap.protection.rate(provider) {
                buckets.push(crate::limits::shared::Bucket {
                    kind: crate::limits::shared::BucketKind::Provider(provider.to_owned()),
                    key: format!("r:p:{provider}"),
                    rate,
                    longest_wait: snap.protection.queue_wait(),
                });
            }
            let quota = match (&permit.grant_id, &permit.daily_quota) {
                (Some(g), Some(q)) => {
                    let (day, left) = self.inner.quotas.today();
                    Some(crate::limits::shared::DayQuota {
                        grant: g.clone(),
                        calls: q.calls,
                        rows: q.rows,
                        day,
                        left,
                    })
                }
                _ => None,
            };
            match shared.decide(&buckets, quota.as_ref()).await {
                Ok(Verdict::Admit(wait)) => {
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let lease = self.take_place(shared, snap, provider, call_id).await?;
                    return Ok((RateDecided::Shared, lease));
                }
                Ok(Verdict::Refuse(r)) => return Err(r),
                Err(_) if shared.on_unavailable == OnUnavailable::FailClosed => {
                    return Err(crate::limits::shared::unavailable());
                }
                // fail-open: this replica's own limiters decide.
                Err(_) => {}
            }
        }
        snap.limits.check(dept, dataset, permit)?;
        if let (Some(g), Some(q)) = (&permit.grant_id, &permit.daily_quota) {
            self.inner.quotas.admit(g, q)?;
        }
        Ok((RateDecided::Here, None))
    }

    /// A place with the provider among every replica's calls (its `max_in_flight`, shared in
    /// Redis), waiting at most `upstream.queue_wait_ms`. Without a cap: none needed.
    async fn take_place(
        &self,
        shared: &Arc<SharedLimits>,
        snap: &Snapshot,
        provider: &str,
        call_id: &str,
    ) -> Result<Option<Lease>, Reject> {
        let Some(max) = snap.protection.in_flight(provider) else {
            return Ok(None);
        };
        let wait = snap.protection.queue_wait();
        // A lease outlives the longest call, and expires by itself if this replica dies.
        let lease_for = self.inner.max_timeout + Duration::from_secs(5);
        match shared
            .take_place(provider, max, lease_for, wait, call_id)
            .await
        {
            Ok(Some(lease)) => Ok(Some(lease)),
            Ok(None) => Err(saturated(provider, Limit::InFlightShared, wait)),
            Err(_) if shared.on_unavailable == OnUnavailable::FailClosed => {
                Err(crate::limits::shared::unavailable())
            }
            // fail-open: the local semaphore (per replica) still holds.
            Err(_) => Ok(None),
        }
    }

    /// The upstream request: the checked query plus the verified identity, never the token.
    fn upstream_request(
        &self,
        call: &Call,
        who: &Authenticated,
        req: QueryRequest,
        deadline: Option<Duration>,
        span: &tracing::Span,
    ) -> Request<QueryRequest> {
        let purpose = req.purpose.clone();
        let mut up = Request::new(req);
        let md = up.metadata_mut();
        let mut put = |k: &'static str, v: &str| {
            if let Ok(v) = MetadataValue::try_from(v) {
                md.insert(k, v);
            }
        };
        put("x-xgate-consumer-dept", &who.system.dept);
        put("x-xgate-consumer-system", &who.system.system);
        put("x-xgate-purpose", &purpose);
        put(TRACE_ID_HEADER, &call.trace_id);
        // One trace across both departments: the upstream span's context, or (tracing off)
        // the caller's own trace headers, unchanged.
        if !crate::telemetry::inject(span, md) {
            for (k, v) in &call.trace_headers {
                md.insert(*k, v.clone());
            }
        }
        if let Some(d) = deadline {
            up.set_timeout(d);
        }
        up
    }

    /// The upstream deadline: the caller's `grpc-timeout` (less a little headroom, so the
    /// gateway answers `DEADLINE_EXCEEDED` with a reason before the caller's own timer fires),
    /// capped by the configured maximum.
    fn deadline<T>(&self, req: &Request<T>) -> Duration {
        caller_deadline(req).map_or(self.inner.max_timeout, |d| d.min(self.inner.max_timeout))
    }

    /// Stages `check` + `decide` + `limit` and the provider's admission, shared by `Query`
    /// and `QueryStream`: the request as the provider will see it, its permit, the provider's
    /// client and the call's place with it (held until the call ends).
    async fn prepare(
        &self,
        call: &mut Call,
        who: &Authenticated,
        mut body: QueryRequest,
    ) -> Result<Prepared, Reject> {
        let snap = self.snapshot();
        call.pending.rec().policy_version = snap.policy.version.clone();
        call.at("decide");
        let permit = tracing::info_span!("xgate.policy")
            .in_scope(|| self.admit(call, who, &snap, &mut body))?;
        let provider = provider_of(&snap, &body.dataset)?;
        call.at("limit");
        let (rate, lease) = self
            .limit(
                who,
                &snap,
                &body.dataset,
                &permit,
                &provider,
                &call.trace_id,
            )
            .instrument(tracing::info_span!("xgate.limit"))
            .await?;
        let client = snap.upstreams.client(&provider).ok_or_else(|| {
            Reject::new(
                Reason::Internal,
                "internal error; quote the trace id to the operators",
            )
        })?;
        // Provider protection: a place with the provider, or a quick UNAVAILABLE.
        let here = snap.protection.admit(&provider, rate).await?;
        Ok(Prepared {
            version: snap.policy.version.clone(),
            body,
            permit,
            provider,
            client,
            place: Place::new(here, lease),
        })
    }

    async fn query_inner(
        &self,
        call: &mut Call,
        req: Request<QueryRequest>,
    ) -> Result<wire::QueryResponse, Reject> {
        let who = self
            .authenticate(call, &req)
            .instrument(tracing::info_span!("xgate.authenticate"))
            .await?;
        let deadline = self.deadline(&req);
        let mut asked = req.into_inner();
        // The caller's page token is the gateway's seal around the provider's.
        let binding = crate::pipeline::paging::Binding::of(&who.system, &mut asked);
        let page_token = std::mem::take(&mut asked.page_token);
        let Prepared {
            version,
            mut body,
            permit,
            provider,
            mut client,
            place: _place,
        } = self.prepare(call, &who, asked).await?;
        if !page_token.is_empty() {
            body.page_token = self
                .inner
                .pages
                .open(&binding, &version, &page_token)
                .inspect_err(|_| call.pending.rec().decision = "deny")?;
        }
        call.at("forward");
        let span = upstream_span(&provider);
        let up = self.upstream_request(call, &who, body, Some(deadline), &span);
        let sent = tokio::time::Instant::now();
        let resp = match self
            .bounded(deadline, client.query(up).instrument(span.clone()))
            .await?
        {
            Err(_) => return Err(upstream::provider_timeout(&provider)),
            // The provider enforces the propagated deadline too, and may answer first
            // (tonic servers say CANCELLED): that is still a timeout.
            Ok(Err(status))
                if status.code() == Code::Cancelled && sent.elapsed() >= deadline.mul_f32(0.9) =>
            {
                return Err(upstream::provider_timeout(&provider));
            }
            Ok(Err(status)) => return Err(upstream::provider_failure(&status, &provider)),
            Ok(Ok(r)) => r.into_inner(),
        };
        call.at("shape");
        let mut shaped = shape(resp, &permit, &self.inner.mask_key, &provider)?;
        let next = &mut shaped.response.next_page_token;
        if !next.is_empty() {
            *next = self.inner.pages.seal(&binding, &version, next);
        }
        self.count_rows(&permit, shaped.response.rows.len() as u64);
        Ok(record_rows(call.pending.rec(), shaped))
    }

    async fn query_stream_inner(
        &self,
        call: &mut Call,
        req: Request<QueryRequest>,
    ) -> Result<OpenStream, Reject> {
        let who = self
            .authenticate(call, &req)
            .instrument(tracing::info_span!("xgate.authenticate"))
            .await?;
        // A bulk stream is bounded by the caller's deadline if it set one; otherwise each
        // batch must arrive within the configured maximum.
        let caller_deadline = caller_deadline(&req);
        let asked = req.get_ref().clone();
        // The place is held for the whole stream: a bulk transfer counts against the
        // provider's in-flight cap.
        let Prepared {
            version,
            body,
            permit,
            provider,
            mut client,
            place,
        } = self.prepare(call, &who, req.into_inner()).await?;
        call.at("forward");
        let span = upstream_span(&provider);
        let up = self.upstream_request(call, &who, body, caller_deadline, &span);
        let first_wait = caller_deadline
            .unwrap_or(self.inner.max_timeout)
            .min(self.inner.max_timeout);
        let stream = match self
            .bounded(first_wait, client.query_stream(up).instrument(span))
            .await?
        {
            Err(_) => return Err(upstream::provider_timeout(&provider)),
            Ok(Err(status)) => return Err(upstream::provider_failure(&status, &provider)),
            Ok(Ok(r)) => r.into_inner(),
        };
        Ok(OpenStream {
            _place: place,
            upstream: stream,
            permit,
            version,
            provider,
            caller_deadline,
            who,
            asked,
        })
    }

    /// Re-decide an open stream under the current policy, if it changed since the last
    /// decision: a revoked or narrowed grant applies to the very next batch.
    fn recheck(&self, call: &mut Call, open: &mut OpenStream) -> Result<(), Reject> {
        let snap = self.snapshot();
        if snap.policy.version == open.version {
            return Ok(());
        }
        let a = &open.asked;
        let caller = open.who.caller();
        let ask = policy::Request {
            dataset: &a.dataset,
            fields: &a.fields,
            filter: a
                .filter
                .as_ref()
                .map(|f| f.conditions.as_slice())
                .unwrap_or_default(),
            purpose: &a.purpose,
            now: Some(now_unix()),
        };
        let rec = call.pending.rec();
        rec.policy_version = snap.policy.version.clone();
        open.version = snap.policy.version.clone();
        let permit = policy::evaluate(&snap.policy, caller, ask).inspect_err(|r| {
            tracing::info!(trace_id = %call.trace_id, reason = %r.reason, "policy change ends an open stream");
        })?;
        rec.rule = Some(permit.rule.clone());
        open.permit = permit;
        Ok(())
    }

    /// Relay a provider stream batch by batch, shaping each; commit the record at the end.
    async fn relay(
        self,
        mut call: Call,
        mut open: OpenStream,
        tx: mpsc::Sender<Result<wire::QueryResponse, Status>>,
    ) {
        let idle = self.inner.max_timeout;
        let end = open
            .caller_deadline
            .and_then(|d| tokio::time::Instant::now().checked_add(d));
        let mut changes = self.inner.policy_changes.subscribe();
        let mut cut = self.inner.cut.subscribe();
        let lifetime = open.who.claims.exp.saturating_sub(crate::token::now_secs());
        let token_expiry = tokio::time::sleep(Duration::from_secs(lifetime));
        tokio::pin!(token_expiry);
        let mut rows = 0u64;
        let provider = open.provider.clone();
        call.at("relay");
        let outcome: Result<(), Reject> = loop {
            let wait = match end {
                Some(e) => e
                    .saturating_duration_since(tokio::time::Instant::now())
                    .min(idle),
                None => idle,
            };
            let next = tokio::select! {
                n = self.bounded(wait, open.upstream.message()) => n,
                // A stream ends with its token.
                _ = &mut token_expiry => break Err(Reject::new(
                    Reason::TokenExpired,
                    "your token expired during the stream; resume with a new token",
                )
                .with_rule("identity:token")),
                // The caller went away while we waited for the provider.
                _ = tx.closed() => return,
                // The policy changed while we waited: re-decide now, not at the next batch.
                _ = changes.changed() => match self.recheck(&mut call, &mut open) {
                    Ok(()) => continue,
                    Err(r) => break Err(r),
                },
            };
            let batch = match next {
                Err(r) => break Err(r),
                // The caller's deadline, not the provider's slowness, ended the wait.
                Ok(Err(_)) if end.is_some_and(|e| tokio::time::Instant::now() >= e) => {
                    let rec = call.pending.rec();
                    rec.reached = Some("relay");
                    break Err(Reject::new(
                        Reason::DeadlineExceeded,
                        format!(
                            "your deadline (grpc-timeout) passed during the stream, after {rows} row(s) were sent: allow more time, or page with Query"
                        ),
                    )
                    .with_rule("caller:grpc-timeout"));
                }
                Ok(Err(_)) => break Err(upstream::provider_timeout(&provider)),
                Ok(Ok(Err(status))) => break Err(upstream::provider_failure(&status, &provider)),
                Ok(Ok(Ok(None))) => break Ok(()),
                Ok(Ok(Ok(Some(b)))) => b,
            };
            if let Err(r) = self.recheck(&mut call, &mut open) {
                break Err(r);
            }
            let permit = &open.permit;
            let shaped = match shape(batch, permit, &self.inner.mask_key, &provider) {
                Ok(s) => s,
                Err(r) => break Err(r),
            };
            call.pending.rec().rows_withheld += shaped.withheld;
            if rows == 0 {
                // First batch: columns are the same in every batch.
                let rec = call.pending.rec();
                rec.fields_returned = shaped.returned;
                rec.fields_masked = shaped.masked;
            }
            let n = shaped.response.rows.len() as u64;
            // A caller that stops reading holds nothing for long: not past the idle timeout,
            // not past shutdown.
            let sent = tokio::select! {
                r = tx.send(Ok(shaped.response)) => r.is_ok(),
                _ = tokio::time::sleep(idle) => {
                    tracing::info!(trace_id = %call.trace_id, "stream caller stopped reading; ending the stream");
                    false
                }
                _ = cut.wait_for(|c| *c) => break Err(shutting_down()),
            };
            if !sent {
                // The caller went away: the record is written as CANCELLED when `call` drops,
                // counting the rows handed over before.
                tracing::info!(trace_id = %call.trace_id, "stream cancelled by the caller");
                return;
            }
            rows += n;
            call.pending.rec().rows = rows;
            self.count_rows(&open.permit, n);
        };
        let log = call.pending.log().clone();
        let audit_span = tracing::info_span!(parent: &call.span, "xgate.audit");
        match outcome {
            Ok(()) => {
                self.settle(&mut call, Code::Ok, None);
                // The stream's status is sent only once its record is durable (sync mode).
                if let Err(rec) = call.pending.commit(Code::Ok).instrument(audit_span).await {
                    let rej = audit_failed();
                    log.submit_detached(refused_for_audit(rec, &rej, false));
                    let _ = tokio::time::timeout(idle, tx.send(Err(rej.to_status(&call.trace_id))))
                        .await;
                }
            }
            Err(rej) => {
                let status = rej.to_status(&call.trace_id);
                record_reject(call.pending.rec(), &rej);
                self.settle(&mut call, rej.code(), Some(rej.reason));
                if let Err(rec) = call.pending.commit(rej.code()).instrument(audit_span).await {
                    log.submit_detached(rec);
                }
                let _ = tokio::time::timeout(idle, tx.send(Err(status))).await;
            }
        }
    }

    async fn list_inner(
        &self,
        call: &mut Call,
        req: &Request<pb::ListDatasetsRequest>,
    ) -> Result<pb::ListDatasetsResponse, Reject> {
        let who = self.authenticate(call, req).await?;
        let snap = self.snapshot();
        call.pending.rec().policy_version = snap.policy.version.clone();
        // The catalogue is public to every registered department, and to no one else.
        policy::eval::registered(&snap.policy, &who.system.dept)?;
        let rec = call.pending.rec();
        rec.decision = "allow";
        rec.rule = Some("catalogue:public".into());
        let datasets: Vec<_> = snap
            .policy
            .file
            .datasets
            .iter()
            .map(catalog_entry)
            .collect();
        rec.rows = datasets.len() as u64;
        Ok(pb::ListDatasetsResponse {
            datasets,
            policy_version: snap.policy.version.clone(),
        })
    }

    async fn describe_inner(
        &self,
        call: &mut Call,
        req: &Request<pb::DescribeDatasetRequest>,
    ) -> Result<pb::DescribeDatasetResponse, Reject> {
        let who = self.authenticate(call, req).await?;
        let snap = self.snapshot();
        let p = &snap.policy;
        call.pending.rec().policy_version = p.version.clone();
        policy::eval::registered(p, &who.system.dept)?;
        let body = req.get_ref();
        if body.dataset.len() > MAX_NAME_BYTES || body.purpose.len() > MAX_NAME_BYTES {
            return Err(Reject::new(
                Reason::RequestInvalid,
                format!("dataset and purpose are at most {MAX_NAME_BYTES} bytes"),
            )
            .with_rule("request:shape"));
        }
        let rec = call.pending.rec();
        rec.policy_version = p.version.clone();
        rec.dataset = Some(body.dataset.clone());
        let Some(ds) = p.dataset(&body.dataset) else {
            return Err(Reject::new(
                Reason::DatasetUnknown,
                format!(
                    "dataset `{}` is not in the catalogue; see Catalog.ListDatasets",
                    body.dataset
                ),
            )
            .with_rule("catalogue"));
        };
        let access = describe_access(p, &who, &body.dataset, &body.purpose);
        rec.decision = "allow";
        rec.rule = Some(access.deciding_rule.clone());
        rec.purpose = Some(body.purpose.clone()).filter(|s| !s.is_empty());
        Ok(pb::DescribeDatasetResponse {
            dataset: Some(catalog_entry(ds)),
            access: Some(access),
            policy_version: p.version.clone(),
        })
    }
}

/// `DescribeDataset`'s access section: the same evaluation `Query` uses, with all fields.
fn describe_access(
    p: &Policy,
    who_dept_sys: &Authenticated,
    dataset: &str,
    purpose: &str,
) -> pb::Access {
    let (dept, sys) = (&who_dept_sys.system.dept, &who_dept_sys.system.system);
    let token_purposes = who_dept_sys.claims.purposes.as_deref();
    let granted = policy::eval::granted_purposes(p, dept, sys, dataset);
    let purpose = if !purpose.is_empty() {
        purpose.to_owned()
    } else {
        granted
            .iter()
            .find(|g| token_purposes.is_none_or(|t| t.contains(g)))
            .or(granted.first())
            .cloned()
            .or_else(|| token_purposes.and_then(|t| t.first().cloned()))
            .unwrap_or_else(|| "unspecified".to_owned())
    };
    let caller = who_dept_sys.caller();
    let ask = policy::Request {
        dataset,
        fields: &[],
        filter: &[],
        purpose: &purpose,
        now: Some(now_unix()),
    };
    match policy::evaluate(p, caller, ask) {
        Ok(permit) => pb::Access {
            allowed: true,
            readable_fields: permit
                .fields
                .iter()
                .filter(|f| f.mask.is_none())
                .map(|f| f.name.clone())
                .collect(),
            masked_fields: permit
                .fields
                .iter()
                .filter(|f| !f.mask.is_none())
                .map(|f| pb::MaskedField {
                    field: f.name.clone(),
                    mask: f.mask.describe(),
                })
                .collect(),
            allowed_purposes: permit.purposes.clone(),
            evaluated_purpose: purpose,
            row_scope: permit
                .scope
                .as_ref()
                .map_or_else(|| "all rows".to_owned(), |s| s.label.clone()),
            rate_limit: Some(pb::RateLimit {
                per_second: permit.rate_limit.per_second,
                burst: permit.rate_limit.burst,
            }),
            denial_reason: String::new(),
            denial_message: String::new(),
            deciding_rule: permit.rule,
        },
        Err(rej) => pb::Access {
            allowed: false,
            allowed_purposes: granted,
            denial_reason: rej.reason.as_str().to_owned(),
            denial_message: rej.message,
            deciding_rule: rej.rule.unwrap_or_default(),
            evaluated_purpose: purpose,
            ..pb::Access::default()
        },
    }
}

fn now_unix() -> i64 {
    i64::try_from(crate::token::now_secs()).unwrap_or(i64::MAX)
}

/// The caller's `grpc-timeout`, less headroom (a fifth, at most 100 ms) for the answer to be
/// audited (fsync) and travel back.
fn caller_deadline<T>(req: &Request<T>) -> Option<Duration> {
    let d = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(upstream::parse_grpc_timeout)?;
    Some(d - headroom(d))
}

/// What an answer needs of a caller's timeout `d` to be recorded and travel back: a fifth,
/// at most 100 ms.
fn headroom(d: Duration) -> Duration {
    (d / 5).min(Duration::from_millis(100))
}

fn provider_of(snap: &Snapshot, dataset: &str) -> Result<String, Reject> {
    snap.policy
        .dataset(dataset)
        .map(|d| d.provider.clone())
        .ok_or_else(|| {
            Reject::new(
                Reason::DatasetUnknown,
                format!("dataset `{dataset}` is not in the catalogue"),
            )
        })
}

/// Stage `check`: shape rules that do not depend on the policy (sizes, well-formed conditions).
/// Longest dataset id, purpose or field name accepted.
const MAX_NAME_BYTES: usize = 128;
/// Most fields one request may name.
const MAX_FIELDS: usize = 512;

fn check_request(req: &QueryRequest, limits: &Limits) -> Result<(), Reject> {
    let invalid = |why: String| Reject::new(Reason::RequestInvalid, why).with_rule("request:shape");
    if req.dataset.len() > MAX_NAME_BYTES || req.purpose.len() > MAX_NAME_BYTES {
        return Err(invalid(format!(
            "dataset and purpose are at most {MAX_NAME_BYTES} bytes"
        )));
    }
    if req.fields.len() > MAX_FIELDS || req.fields.iter().any(|f| f.len() > MAX_NAME_BYTES) {
        return Err(invalid(format!(
            "at most {MAX_FIELDS} fields of at most {MAX_NAME_BYTES} bytes each"
        )));
    }
    let conds = req
        .filter
        .as_ref()
        .map(|f| f.conditions.as_slice())
        .unwrap_or_default();
    if conds.len() > limits.max_filter_terms {
        return Err(invalid(format!(
            "the filter has {} conditions; at most {} are allowed",
            conds.len(),
            limits.max_filter_terms
        )));
    }
    for (i, c) in conds.iter().enumerate() {
        use pb::condition::Test;
        if c.field.is_empty() {
            return Err(invalid(format!("filter condition {i} names no field")));
        }
        match &c.test {
            None => {
                return Err(invalid(format!(
                    "filter condition {i} on `{}` has no test (eq, in or prefix)",
                    c.field
                )));
            }
            Some(Test::In(list))
                if list.values.is_empty() || list.values.len() > limits.max_filter_terms =>
            {
                return Err(invalid(format!(
                    "filter condition {i} on `{}`: IN needs 1 to {} values",
                    c.field, limits.max_filter_terms
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A provider response after the gateway enforced the permit on it.
struct Shaped {
    response: wire::QueryResponse,
    /// Rows the provider sent outside the caller's row scope, dropped here.
    withheld: u64,
    returned: Vec<String>,
    masked: Vec<String>,
}

/// Stage `shape`: keep only permitted columns, in the permit's order, and apply masks.
///
/// Works on encoded cells ([`wire`]): a permitted, unmasked cell leaves as the bytes the
/// provider sent once checked to be a well-formed `Value`; masked cells and the cell a row
/// scope reads are decoded. A cell that is not a valid `Value` fails the call. Rows are
/// written in their final encoding, in one buffer.
fn shape(
    resp: wire::QueryResponse,
    permit: &Permit,
    key: &MaskKey,
    provider: &str,
) -> Result<Shaped, Reject> {
    let wire::QueryResponse {
        columns,
        rows,
        next_page_token,
        ..
    } = resp;
    let malformed = || {
        Reject::new(
            Reason::ProviderResponseInvalid,
            format!(
                "the provider `{provider}` returned a malformed response; the operators have been told"
            ),
        )
    };
    // (output position) -> (provider column index, mask)
    let mut plan: Vec<(usize, Mask)> = Vec::with_capacity(permit.fields.len());
    let mut out_cols = Vec::with_capacity(permit.fields.len());
    let mut returned = Vec::with_capacity(permit.fields.len());
    let mut masked = Vec::new();
    for f in &permit.fields {
        if let Some(i) = columns.iter().position(|c| c.name == f.name) {
            let mut col = columns[i].clone();
            if let Mask::Keep { .. } | Mask::Hash = f.mask {
                col.r#type = pb::FieldType::String as i32;
            }
            plan.push((i, f.mask));
            out_cols.push(col);
            returned.push(f.name.clone());
            if !f.mask.is_none() {
                masked.push(f.name.clone());
            }
        }
    }
    let width = columns.len();
    // Row scope: the region column must be there to check every row against the scope.
    let scope = match &permit.scope {
        None => None,
        Some(sc) => match columns.iter().position(|c| c.name == sc.field) {
            Some(i) => Some((i, sc)),
            None => {
                tracing::warn!(%provider, field = %sc.field, "provider omitted the region field needed for a row scope");
                return Err(malformed());
            }
        },
    };
    let rows = match rows {
        wire::Rows::Received(rows) => rows,
        // Only responses decoded from a provider reach here.
        wire::Rows::Encoded { .. } => return Err(malformed()),
    };
    let mut out = wire::RowWriter::with_capacity(rows.iter().map(|r| r.len() + 4).sum());
    let mut dropped = 0usize;
    let mut cells = Vec::with_capacity(width);
    for (r, row) in rows.iter().enumerate() {
        if !wire::cells(row, &mut cells) || cells.len() != width {
            tracing::warn!(%provider, row = r, got = cells.len(), want = width, "provider row malformed or of the wrong width");
            return Err(malformed());
        }
        if let Some((i, sc)) = scope {
            let Some(v) = wire::decode_cell(&row[cells[i].clone()]) else {
                tracing::warn!(%provider, row = r, "provider sent a cell that is not a Value");
                return Err(malformed());
            };
            if !sc.admits(&v) {
                dropped += 1;
                continue;
            }
        }
        for &(i, mask) in &plan {
            if !out.cell(&row[cells[i].clone()], mask, key) {
                tracing::warn!(%provider, row = r, "provider sent a cell that is not a Value");
                return Err(malformed());
            }
        }
        out.end_row();
    }
    if dropped > 0 {
        // The provider ignored the (narrowed) filter: worth an operator's attention.
        tracing::warn!(%provider, dropped, scope = %permit.scope.as_ref().map(|s| s.label.as_str()).unwrap_or(""), "dropped out-of-scope rows");
    }
    Ok(Shaped {
        response: wire::QueryResponse {
            columns: out_cols,
            rows: out.finish(),
            masked_columns: masked.clone(),
            next_page_token,
        },
        returned,
        masked,
        withheld: dropped as u64,
    })
}

/// Note what a shaped response returns in the call's record; the response goes on.
fn record_rows(rec: &mut AuditRecord, s: Shaped) -> wire::QueryResponse {
    rec.rows_withheld = s.withheld;
    rec.fields_returned = s.returned;
    rec.fields_masked = s.masked;
    rec.rows = s.response.rows.len() as u64;
    s.response
}

/// Keyed hashes of the data subjects a request names: the `eq`/`in` values of its filter on
/// the dataset's subject-key field.
fn subject_hashes(log: &AuditLog, policy: &Policy, req: &QueryRequest) -> Vec<String> {
    use pb::condition::Test;
    let Some(key) = policy.dataset(&req.dataset).map(|d| d.subject_key.as_str()) else {
        return Vec::new();
    };
    let conds = req
        .filter
        .as_ref()
        .map(|f| f.conditions.as_slice())
        .unwrap_or_default();
    let mut out = Vec::new();
    for c in conds.iter().filter(|c| c.field == key) {
        let values: &[pb::Value] = match &c.test {
            Some(Test::Eq(v)) => std::slice::from_ref(v),
            Some(Test::In(l)) => &l.values,
            _ => &[],
        };
        out.extend(
            values
                .iter()
                .filter_map(|v| v.as_text())
                .filter_map(|t| log.subject_hash(&t)),
        );
    }
    out
}

fn shutting_down() -> Reject {
    Reject::new(
        Reason::GatewayShuttingDown,
        "the gateway is shutting down; retry (another replica will answer)",
    )
}

fn audit_failed() -> Reject {
    Reject::new(
        Reason::AuditUnavailable,
        "the audit trail could not record this call, so its result is withheld; retry shortly",
    )
    .with_rule("audit:fail-closed")
}

/// The record of a call answered `AUDIT_UNAVAILABLE` because its own record could not be
/// written: what the caller actually got. (`withheld`: no data reached the caller.)
fn refused_for_audit(mut rec: AuditRecord, rej: &Reject, withheld: bool) -> AuditRecord {
    rec.grpc_status = audit::code_name(rej.code());
    rec.grpc_code = rej.code() as i32;
    rec.reason = Some(rej.reason.as_str().to_owned());
    if withheld {
        rec.rows = 0;
        rec.fields_returned.clear();
        rec.fields_masked.clear();
    }
    rec
}

fn record_reject(rec: &mut AuditRecord, rej: &Reject) {
    rec.reason = Some(rej.reason.as_str().to_owned());
    if rej.rule.is_some() {
        rec.rule = rej.rule.clone();
    }
    if rec.decision.is_empty() {
        rec.decision = "deny";
    }
}

fn catalog_entry(ds: &policy::model::Dataset) -> pb::Dataset {
    use policy::model::{FieldType as F, Sensitivity as S};
    pb::Dataset {
        id: ds.id.clone(),
        title: ds.title.clone(),
        owner_department: ds.owner.clone(),
        share_type: match ds.share_type {
            policy::ShareType::Unconditional => pb::ShareType::Unconditional,
            policy::ShareType::Conditional => pb::ShareType::Conditional,
            policy::ShareType::None => pb::ShareType::None,
        } as i32,
        fields: ds
            .fields
            .iter()
            .map(|f| pb::FieldInfo {
                name: f.name.clone(),
                r#type: match f.ty {
                    F::String => pb::FieldType::String,
                    F::Int64 => pb::FieldType::Int64,
                    F::Double => pb::FieldType::Double,
                    F::Bool => pb::FieldType::Bool,
                    F::Bytes => pb::FieldType::Bytes,
                    F::Timestamp => pb::FieldType::Timestamp,
                } as i32,
                sensitivity: match f.sensitivity {
                    S::Public => pb::Sensitivity::Public,
                    S::Internal => pb::Sensitivity::Internal,
                    S::Personal => pb::Sensitivity::Personal,
                    S::Sensitive => pb::Sensitivity::Sensitive,
                } as i32,
                description: f.description.clone(),
            })
            .collect(),
        subject_key: ds.subject_key.clone(),
        description: ds.description.clone(),
    }
}

/// The span of a call to a provider (client kind: the provider's spans become its children).
fn upstream_span(provider: &str) -> tracing::Span {
    tracing::info_span!(
        "xgate.upstream",
        otel.kind = "client",
        rpc.system = "grpc",
        xgate.provider = provider,
    )
}

/// The call's trace id: the caller's W3C `traceparent` trace id if it sent one, else fresh.
fn trace_id_from(md: &tonic::metadata::MetadataMap) -> String {
    if let Some(tp) = md.get("traceparent").and_then(|v| v.to_str().ok()) {
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

#[tonic::async_trait]
impl wire::data_exchange_server::DataExchange for Gateway {
    async fn query(
        &self,
        req: Request<QueryRequest>,
    ) -> Result<Response<wire::QueryResponse>, Status> {
        let mut call = self.begin(METHOD_QUERY, &req)?;
        let span = call.span.clone();
        let result = within(
            call.deadline,
            self.query_inner(&mut call, req).instrument(span),
        )
        .await
        .unwrap_or_else(|| Err(call.deadline_passed()));
        self.finish(call, result).await
    }

    type QueryStreamStream = ReceiverStream<Result<wire::QueryResponse, Status>>;

    async fn query_stream(
        &self,
        req: Request<QueryRequest>,
    ) -> Result<Response<Self::QueryStreamStream>, Status> {
        let mut call = self.begin(METHOD_QUERY_STREAM, &req)?;
        let span = call.span.clone();
        let opened = within(
            call.deadline,
            self.query_stream_inner(&mut call, req)
                .instrument(span.clone()),
        )
        .await
        .unwrap_or_else(|| Err(call.deadline_passed()));
        match opened {
            Ok(open) => {
                // One batch in the pipe: a policy change applies from the next batch on.
                let (tx, rx) = mpsc::channel(1);
                let trace_id = call.trace_id.clone();
                tokio::spawn(self.clone().relay(call, open, tx).instrument(span));
                let mut resp = Response::new(ReceiverStream::new(rx));
                if let Ok(v) = MetadataValue::try_from(trace_id.as_str()) {
                    resp.metadata_mut().insert(TRACE_ID_HEADER, v);
                }
                Ok(resp)
            }
            Err(rej) => self
                .finish::<()>(call, Err(rej))
                .await
                .map(|_| unreachable_stream()),
        }
    }
}

/// `finish` with an error never yields Ok; this keeps the types honest without a panic.
fn unreachable_stream() -> Response<ReceiverStream<Result<wire::QueryResponse, Status>>> {
    let (_tx, rx) = mpsc::channel(1);
    Response::new(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::catalog_server::Catalog for Gateway {
    async fn list_datasets(
        &self,
        req: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let mut call = self.begin(METHOD_LIST, &req)?;
        let span = call.span.clone();
        let result = within(
            call.deadline,
            self.list_inner(&mut call, &req).instrument(span),
        )
        .await
        .unwrap_or_else(|| Err(call.deadline_passed()));
        self.finish(call, result).await
    }

    async fn describe_dataset(
        &self,
        req: Request<pb::DescribeDatasetRequest>,
    ) -> Result<Response<pb::DescribeDatasetResponse>, Status> {
        let mut call = self.begin(METHOD_DESCRIBE, &req)?;
        let span = call.span.clone();
        let result = within(
            call.deadline,
            self.describe_inner(&mut call, &req).instrument(span),
        )
        .await
        .unwrap_or_else(|| Err(call.deadline_passed()));
        self.finish(call, result).await
    }
}

#[cfg(test)]
mod tests {
    //! `shape` on encoded rows: what the caller gets, and what a lying provider gets.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use prost::Message;

    use super::*;
    use crate::policy::{PermittedField, RateLimit, scope::Scope};

    fn permit(fields: &[(&str, Mask)], scope: Option<Scope>) -> Permit {
        Permit {
            rule: "grant:test".into(),
            grant_id: Some("test".into()),
            approval_ref: None,
            fields: fields
                .iter()
                .map(|(n, m)| PermittedField {
                    name: (*n).into(),
                    mask: *m,
                })
                .collect(),
            rate_limit: RateLimit {
                per_second: 1.0,
                burst: 1,
            },
            purposes: vec![],
            scope,
            daily_quota: None,
        }
    }

    fn col(name: &str) -> pb::Column {
        pb::Column {
            name: name.into(),
            r#type: pb::FieldType::String as i32,
        }
    }

    /// A provider response as it arrives: encoded by the provider, decoded into wire types.
    fn arrives(resp: &pb::QueryResponse) -> wire::QueryResponse {
        wire::QueryResponse::decode(resp.encode_to_vec().as_slice()).unwrap()
    }

    fn delivered(s: Shaped) -> pb::QueryResponse {
        pb::QueryResponse::decode(s.response.encode_to_vec().as_slice()).unwrap()
    }

    fn provider_reply() -> pb::QueryResponse {
        let row = |id: &str, name: &str, region: &str| pb::Row {
            values: vec![
                pb::Value::string(id),
                pb::Value::string(name),
                pb::Value::string(region),
            ],
        };
        pb::QueryResponse {
            columns: vec![col("id_number"), col("name"), col("region_code")],
            rows: vec![
                row("330102199001011234", "张三", "330106"),
                row("330102199202022345", "李四", "330108"),
            ],
            masked_columns: vec![],
            next_page_token: "p2".into(),
        }
    }

    #[test]
    fn permitted_columns_in_the_permits_order_masked_and_scoped() {
        let scope = Scope {
            field: "region_code".into(),
            prefixes: vec!["330106".into()],
            label: "own-region 330106".into(),
        };
        let p = permit(
            &[
                ("name", Mask::None),
                ("id_number", Mask::Keep { first: 6, last: 4 }),
            ],
            Some(scope),
        );
        let s = shape(arrives(&provider_reply()), &p, &MaskKey::none(), "ps").unwrap();
        assert_eq!(s.withheld, 1);
        assert_eq!(s.returned, ["name", "id_number"]);
        assert_eq!(s.masked, ["id_number"]);
        let got = delivered(s);
        assert_eq!(got.next_page_token, "p2");
        assert_eq!(got.masked_columns, ["id_number"]);
        assert_eq!(
            got.columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["name", "id_number"]
        );
        assert_eq!(
            got.rows,
            [pb::Row {
                values: vec![
                    pb::Value::string("张三"),
                    pb::Value::string("330102********1234"),
                ]
            }]
        );
    }

    fn refused(resp: wire::QueryResponse) {
        let p = permit(&[("id_number", Mask::None), ("name", Mask::None)], None);
        let rej = shape(resp, &p, &MaskKey::none(), "ps")
            .err()
            .expect("refused");
        assert_eq!(rej.reason, Reason::ProviderResponseInvalid);
        assert_eq!(rej.code(), Code::Internal);
        assert!(
            !rej.message.contains("utf"),
            "no internals: {}",
            rej.message
        );
    }

    #[test]
    fn a_provider_that_sends_malformed_rows_fails_the_call() {
        // A row one cell short.
        let mut short = provider_reply();
        short.rows[1].values.pop();
        refused(arrives(&short));
        // A text cell that is not UTF-8 (bytes a full decode would refuse).
        let mut resp = arrives(&provider_reply());
        let wire::Rows::Received(rows) = &mut resp.rows else {
            panic!("received rows")
        };
        let mut body = Vec::new();
        for cell in [
            &[0x12u8, 2, 0xff, 0xfe][..],
            &[0x12, 1, b'a'],
            &[0x12, 1, b'b'],
        ] {
            prost::encoding::bytes::encode(1, &cell.to_vec(), &mut body);
        }
        rows[0] = bytes::Bytes::from(body);
        refused(resp);
        // A row whose cell length runs past its end.
        let mut resp = arrives(&provider_reply());
        let wire::Rows::Received(rows) = &mut resp.rows else {
            panic!("received rows")
        };
        rows[1] = bytes::Bytes::from_static(&[0x0a, 9, 0x12]);
        refused(resp);
    }
}
