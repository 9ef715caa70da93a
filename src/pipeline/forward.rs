//! Stage `forward`: the request as the provider will see it (after `check`, `decide`, `scope`
//! and `limit`: [`Gateway::prepare`]), the provider's place and channel, the deadline passed
//! on, and the verified identity and purpose as metadata (never the caller's token).

use super::*;

/// A data request ready for the provider (see [`Gateway::prepare`]).
pub(super) struct Prepared {
    /// The policy version it was decided under.
    pub(super) version: String,
    /// The request as the provider will see it (fields and filter narrowed).
    pub(super) body: QueryRequest,
    pub(super) permit: Permit,
    pub(super) provider: String,
    pub(super) client: wire::data_exchange_client::DataExchangeClient<tonic::transport::Channel>,
    /// This replica's place with the provider, and the shared lease (if any).
    pub(super) place: Place,
}

/// The span of a call to a provider (client kind: the provider's spans become its children).
pub(super) fn upstream_span(provider: &str) -> tracing::Span {
    tracing::info_span!(
        "xgate.upstream",
        otel.kind = "client",
        rpc.system = "grpc",
        xgate.provider = provider,
    )
}

impl Gateway {
    /// The upstream request: the checked query plus the verified identity, never the token.
    pub(super) fn upstream_request(
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
        put("x-xgate-consumer-dept", &who.id.dept);
        put("x-xgate-consumer-system", &who.id.system);
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
    pub(super) fn deadline<T>(&self, req: &Request<T>) -> Duration {
        caller_deadline(req).map_or(self.inner.max_timeout, |d| d.min(self.inner.max_timeout))
    }

    /// Stages `check` + `decide` + `limit` and the provider's admission, shared by `Query`
    /// and `QueryStream`: the request as the provider will see it, its permit, the provider's
    /// client and the call's place with it (held until the call ends).
    pub(super) async fn prepare(
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
}
