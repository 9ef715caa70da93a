//! Stage `forward`: the request as the provider will see it (after `check`, `decide`, `scope`
//! and `limit`: [`Gateway::prepare`]), the provider's place and channel, the deadline passed
//! on, and the verified identity and purpose as metadata (never the caller's token).

use super::*;

/// A data request ready for the provider (see [`Gateway::prepare`]).
pub(super) struct Prepared {
    /// The policy version it was decided under.
    pub(super) version: Arc<str>,
    /// The request as the provider will see it (fields and filter narrowed).
    pub(super) body: QueryRequest,
    pub(super) permit: Permit,
    pub(super) provider: String,
    /// The provider's replicas; each try picks one ([`Gateway::send`]).
    pub(super) replicas: Arc<upstream::Replicas>,
    /// This replica's place with the provider, and the shared lease (if any).
    pub(super) place: Place,
    /// The dataset's subject-key field, whose returned values the record keeps (hashed).
    pub(super) subject_field: String,
}

/// The span of one try of a call to a provider (client kind: the provider's spans become its
/// children).
pub(super) fn upstream_span(provider: &str, endpoint: &str, attempt: u32) -> tracing::Span {
    tracing::info_span!(
        "xgate.upstream",
        otel.kind = "client",
        rpc.system = "grpc",
        xgate.provider = provider,
        xgate.endpoint = endpoint,
        xgate.attempt = attempt,
    )
}

/// Where [`Gateway::send`] sends, and for how long.
pub(super) struct Target<'a> {
    pub(super) replicas: &'a Arc<upstream::Replicas>,
    pub(super) provider: &'a str,
    /// The longest the call may take, every try included.
    pub(super) wait: Duration,
    /// Pass what is left of `wait` on as the provider's deadline.
    pub(super) propagate_deadline: bool,
}

/// A provider's answer, and the hold on the replica that gave it.
pub(super) struct Sent<T> {
    pub(super) answer: T,
    pub(super) pick: upstream::Pick,
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
        // The version that decides (a reload since the call began changes it).
        call.pending.rec().policy_version = snap.policy.version.clone();
        call.at("decide");
        let permit = tracing::info_span!("xgate.policy")
            .in_scope(|| self.admit(call, who, &snap, &mut body))?;
        let provider = provider_of(&snap, &body.dataset)?;
        let subject_field = snap
            .policy
            .dataset(&body.dataset)
            .map(|d| d.subject_key.clone())
            .unwrap_or_default();
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
        let replicas = snap.upstreams.replicas(&provider).ok_or_else(|| {
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
            replicas,
            place: Place::new(here, lease),
            subject_field,
        })
    }

    /// Send `body` to one of the provider's replicas, within `wait`. A try that fails before
    /// the provider answered (connect failure, refused stream, `UNAVAILABLE`) or that runs
    /// past its own limit ([`upstream::Replicas::first_try_limit`]: an endpoint gone without
    /// a reset) goes once more to another replica when the retry budget allows: a read is
    /// safe to repeat, and nothing of the answer has reached the caller yet. Each try is its
    /// own span; the record says how many tries there were and which endpoint answered.
    pub(super) async fn send<T, F, Fut>(
        &self,
        call: &mut Call,
        who: &Authenticated,
        to: Target<'_>,
        body: QueryRequest,
        rpc: F,
    ) -> Result<Sent<T>, Reject>
    where
        F: Fn(
            wire::data_exchange_client::DataExchangeClient<tonic::transport::Channel>,
            Request<QueryRequest>,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let Target {
            replicas,
            provider,
            wait,
            propagate_deadline,
        } = to;
        replicas.deposit();
        // A second try needs the request again; only a provider with replicas can have one.
        let spare = (replicas.list.len() > 1).then(|| body.clone());
        let mut body = Some(body);
        let started = tokio::time::Instant::now();
        let mut avoid: Option<Arc<upstream::Replica>> = None;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(pick) = replicas.pick(avoid.as_ref()) else {
                // No endpoint at all (a DNS name that resolves to nothing yet).
                return Err(upstream::provider_failure(
                    &Status::unavailable("no endpoint"),
                    provider,
                ));
            };
            let Some(this) = body.take().or_else(|| spare.clone()) else {
                return Err(upstream::provider_failure(
                    &Status::unavailable("no request to retry"),
                    provider,
                ));
            };
            let left = wait.saturating_sub(started.elapsed());
            // The first try leaves time for a second on another endpoint.
            let limit = if attempt == 1 {
                replicas.first_try_limit(left)
            } else {
                left
            };
            let span = upstream_span(provider, &pick.replica.endpoint, attempt);
            let up =
                self.upstream_request(call, who, this, propagate_deadline.then_some(limit), &span);
            {
                let rec = call.pending.rec();
                rec.upstream_tries = attempt;
                rec.upstream_endpoint = Some(pick.replica.endpoint.clone());
            }
            let sent = tokio::time::Instant::now();
            // A try may go to another endpoint: it is the first, the set has another, there
            // is time left for it, and the budget allows.
            let may_retry = |started: tokio::time::Instant| {
                attempt == 1
                    && spare.is_some()
                    && wait.saturating_sub(started.elapsed()) > Duration::from_millis(5)
                    && replicas.may_retry()
            };
            let status = match self
                .bounded(limit, rpc(pick.client(), up).instrument(span))
                .await?
            {
                // The caller's time is up.
                Err(_) if limit >= left => {
                    pick.finish(upstream::Outcome::Abandoned);
                    return Err(upstream::provider_timeout(provider));
                }
                // This try's time is up, not the call's: the endpoint did not answer in time
                // (it may be gone without a reset), which counts against it.
                Err(_) => {
                    let failed = pick.replica.clone();
                    pick.finish(upstream::Outcome::Failed);
                    if may_retry(started) {
                        tracing::info!(%provider, endpoint = %failed.endpoint, "try timed out; retrying on another endpoint");
                        avoid = Some(failed);
                        continue;
                    }
                    return Err(upstream::provider_timeout(provider));
                }
                // The provider enforces the propagated deadline too, and may answer first
                // (tonic servers say CANCELLED): that is still a timeout.
                Ok(Err(status))
                    if status.code() == Code::Cancelled && sent.elapsed() >= limit.mul_f32(0.9) =>
                {
                    let timed_out = limit < left;
                    let failed = pick.replica.clone();
                    pick.finish(if timed_out {
                        upstream::Outcome::Failed
                    } else {
                        upstream::Outcome::Abandoned
                    });
                    if timed_out && may_retry(started) {
                        avoid = Some(failed);
                        continue;
                    }
                    return Err(upstream::provider_timeout(provider));
                }
                Ok(Err(status)) => status,
                Ok(Ok(r)) => {
                    return Ok(Sent {
                        answer: r.into_inner(),
                        pick,
                    });
                }
            };
            let retry = upstream::retryable(&status) && may_retry(started);
            let failed = pick.replica.clone();
            pick.finish(upstream::outcome_of(&status));
            if retry {
                tracing::info!(%provider, endpoint = %failed.endpoint, code = ?status.code(), "retrying on another endpoint");
                avoid = Some(failed);
                continue;
            }
            return Err(upstream::provider_failure(&status, provider));
        }
    }
}
