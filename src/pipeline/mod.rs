//! The request pipeline: the gateway's `DataExchange` and `Catalog` services.
//!
//! Every call walks the same stages, in this order, and leaves exactly one audit record. One
//! file per stage; the drivers below (`query_inner`, `query_stream_inner`, and the catalog's
//! in [`catalog`]) call them top-down:
//!
//! ```text
//! stage        file              what it does
//! begin        call.rs           trace id, audit record opened (refuse if the trail is failing),
//!                                the caller's deadline
//! authenticate authenticate.rs   certificate identity (per connection; revocation and expiry
//!                                per call) + JWT (cached), token dept == cert dept, RFC 8705
//! check        admit.rs          request shape: names and filter bounded, page size capped
//! decide       admit.rs          policy::evaluate(snapshot, caller, request, now) -> Permit | Reject (pure)
//! scope        admit.rs          a row-scoped permit narrows (or refuses) the filter
//! limit        limit.rs          consumer and grant rate, daily quota, provider rate and places
//!                                (local, or one Redis round trip)
//! forward      forward.rs        provider protection place, pooled mTLS channel, deadline
//!                                propagated, verified identity + purpose as metadata (never the token)
//! shape        shape.rs          strip columns not permitted and rows out of scope, apply masks
//!                                (never trusting the provider)
//! relay        stream.rs         QueryStream: each batch re-decided under the newest policy, shaped
//! finish       call.rs           audit record committed (fsync'd in sync mode) before the answer
//! ```
//!
//! Before the pipeline, [`edge`] answers what tonic would refuse on its own (unknown method,
//! bad bytes, oversized metadata) with xgate's reasons and a record; [`paging`] seals page
//! tokens. Rejections at any stage become statuses through [`Reject::to_status`] (one
//! table), and the record carries the reason and the rule.
//!
//! State: a [`Snapshot`] (policy, limiters, provider protection, channels) is swapped whole on
//! reload; `Inner` holds what lives for the process (audit log, token verifier, quotas,
//! shared limits); a `Call` (call.rs) is per call.

mod admit;
mod authenticate;
mod call;
mod call_metrics;
mod catalog;
pub mod edge;
mod forward;
mod limit;
pub mod paging;
mod shape;
mod stream;
pub mod usage;

use self::{admit::*, authenticate::*, call::*, forward::*, shape::*, stream::*};

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
    /// Per-grant and per-consumer rate limiters.
    pub rates: RateLimits,
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
        let rates = RateLimits::for_policy(&policy, previous.map(|p| &p.rates));
        let protection =
            Protections::for_policy(&policy, up.queue_wait, previous.map(|p| &p.protection));
        let upstreams = Upstreams::for_policy(&policy, up, previous.map(|p| &p.upstreams))?;
        Ok(Snapshot {
            policy,
            rates,
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
    /// Bounds on requests (`limits:` in the config): page sizes, names, filter terms.
    request_limits: Limits,
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
    /// This replica's shipping to the province trail (`audit.ship`), for `/ready`.
    shipping: Option<Arc<audit::ship::ShipState>>,
    /// Where `Usage.FindUsage` reads accesses.
    usage: usage::UsageSource,
    /// This replica's own trail, indexed for the console (and for `FindUsage` without a
    /// province database).
    trail: Arc<audit::index::TrailIndex>,
    /// The per-call metrics' handles, by label set.
    call_metrics: call_metrics::CallMetrics,
}

/// Builds a [`Gateway`]: the parts every gateway needs, then the optional ones, then
/// [`GatewayBuilder::build`]. Nothing can be set on a gateway once built (and shared).
pub struct GatewayBuilder {
    inner: Inner,
}

impl std::fmt::Debug for GatewayBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayBuilder").finish_non_exhaustive()
    }
}

impl GatewayBuilder {
    /// Share the revocation list the TLS layer keeps current.
    pub fn revocations(mut self, r: crate::tls::Revocations) -> Self {
        self.inner.revocations = r;
        self
    }

    /// Count daily quotas in this zone (seconds east of UTC) and on this clock.
    pub fn quotas(mut self, q: crate::limits::Quotas) -> Self {
        self.inner.quotas = q;
        self
    }

    /// Limit failed authentications per client certificate to `per_second` (bursts of
    /// `burst`).
    pub fn auth_failures(mut self, per_second: u32, burst: u32) -> Self {
        self.inner.auth_failures = crate::limits::failures::AuthFailures::new(per_second, burst);
        self
    }

    /// Seal page tokens with this key (shared by the replicas of one gateway).
    pub fn page_seal(mut self, seal: crate::pipeline::paging::PageSeal) -> Self {
        self.inner.pages = seal;
        self
    }

    /// Decide rates and quotas in Redis, shared with the other replicas.
    pub fn shared_limits(mut self, shared: Arc<SharedLimits>) -> Self {
        self.inner.shared = Some(shared);
        self
    }

    /// Where `Usage.FindUsage` reads accesses (default: nowhere: every call unavailable).
    pub fn usage_source(mut self, source: usage::UsageSource) -> Self {
        self.inner.usage = source;
        self
    }

    /// This replica's trail directory: the index the console and local searches read. Without
    /// a province database, `Usage.FindUsage` reads it too.
    pub fn trail(mut self, dir: &std::path::Path) -> Self {
        self.inner.trail = Arc::new(audit::index::TrailIndex::new(dir));
        self
    }

    pub fn shipping(mut self, state: Arc<audit::ship::ShipState>) -> Self {
        self.inner.shipping = Some(state);
        self
    }

    pub fn build(self) -> Gateway {
        Gateway {
            inner: Arc::new(self.inner),
        }
    }
}

impl Gateway {
    /// A gateway over `snapshot`, with defaults for the optional parts (no revocations,
    /// quotas in UTC+8, 10 failed authentications a second per certificate, a random page
    /// seal, local limits): set them on the builder.
    pub fn builder(
        snapshot: Snapshot,
        tokens: Arc<TokenVerifier>,
        audit: AuditLog,
        limits: Limits,
        max_timeout: Duration,
        mask_key: MaskKey,
    ) -> GatewayBuilder {
        GatewayBuilder {
            inner: Inner {
                snapshot: ArcSwap::from_pointee(snapshot),
                tokens,
                audit,
                request_limits: limits,
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
                shipping: None,
                usage: usage::UsageSource::Local,
                trail: Arc::new(audit::index::TrailIndex::new(std::path::PathBuf::new())),
                call_metrics: call_metrics::CallMetrics::default(),
            },
        }
    }

    /// How this replica's trail ships to the province database, if it does.
    pub fn shipping(&self) -> Option<&Arc<audit::ship::ShipState>> {
        self.inner.shipping.as_ref()
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

    /// Forget idle per-certificate failure buckets.
    pub fn retain_recent(&self) {
        self.snapshot().rates.retain_recent();
        self.inner.auth_failures.retain_recent();
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

    /// (calls, rows) counted today against `grant`'s daily quota (this process's count).
    pub fn quota_used(&self, grant: &str) -> (u64, u64) {
        self.inner.quotas.used_today(grant)
    }

    /// The last hour's calls, as the writer wrote them (the console's overview).
    pub fn audit_recent(&self) -> audit::recent::Hour {
        self.inner.audit.recent()
    }

    /// Whether the audit trail still takes records.
    pub fn audit_open(&self) -> bool {
        self.inner.audit.is_open()
    }

    /// Put an administrator's action on the trail, in the calls' chain, without waiting
    /// (queued, or handed to a task while the queue is full).
    pub fn record_admin(&self, rec: audit::AuditRecord) {
        self.inner.audit.submit_detached(rec);
    }

    /// The policy snapshot calls are decided under now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
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
        let binding = crate::pipeline::paging::Binding::of(&who.id, &mut asked);
        let page_token = std::mem::take(&mut asked.page_token);
        let Prepared {
            version,
            mut body,
            permit,
            provider,
            replicas,
            place: _place,
            subject_field,
        } = self.prepare(call, &who, asked).await?;
        if !page_token.is_empty() {
            body.page_token = self
                .inner
                .pages
                .open(&binding, &version, &page_token)
                .inspect_err(|_| call.pending.rec().decision = audit::Decision::Deny)?;
        }
        call.at("forward");
        let to = Target {
            replicas: &replicas,
            provider: &provider,
            wait: deadline,
            propagate_deadline: true,
        };
        let Sent { answer: resp, pick } = self
            .send(call, &who, to, body, |mut c, up| async move {
                c.query(up).await
            })
            .await?;
        pick.finish(upstream::Outcome::Answered);
        call.at("shape");
        let tap = self.tap(call, &subject_field);
        let mut shaped = shape(resp, &permit, &self.inner.mask_key, &provider, tap)?;
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
            replicas,
            place,
            subject_field,
        } = self.prepare(call, &who, req.into_inner()).await?;
        call.at("forward");
        let first_wait = caller_deadline
            .unwrap_or(self.inner.max_timeout)
            .min(self.inner.max_timeout);
        let to = Target {
            replicas: &replicas,
            provider: &provider,
            wait: first_wait,
            propagate_deadline: caller_deadline.is_some(),
        };
        // Retried (on another replica) only while opening: before the first batch.
        let Sent {
            answer: stream,
            pick,
        } = self
            .send(call, &who, to, body, |mut c, up| async move {
                c.query_stream(up).await
            })
            .await?;
        Ok(OpenStream {
            _place: place,
            _pick: pick,
            upstream: stream,
            permit,
            version,
            provider,
            caller_deadline,
            who,
            asked,
            subject_field,
        })
    }

    /// Where a call's returned subjects are read from, if the trail records them.
    fn tap<'a>(&self, call: &Call, subject_field: &'a str) -> Option<Tap<'a>> {
        let key = call.pending.log().returned_key()?;
        (!subject_field.is_empty()).then_some(Tap {
            field: subject_field,
            key,
        })
    }
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
