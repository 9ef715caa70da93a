//! `QueryStream` after admission: the relay of batches from the provider to the caller, each
//! re-decided under the newest policy (and at once when the policy changes), shaped, counted,
//! and bounded by the caller's deadline, its reading speed and shutdown.

use super::*;

/// An admitted stream: the provider's stream plus what is needed to re-decide it.
pub(super) struct OpenStream {
    /// The stream's place with the provider (here, and among every replica's calls when the
    /// limits are shared).
    pub(super) _place: Place,
    /// The replica the stream came from (counted outstanding while it runs).
    pub(super) _pick: upstream::Pick,
    pub(super) upstream: tonic::Streaming<wire::QueryResponse>,
    pub(super) permit: Permit,
    /// The policy version `permit` was decided under.
    pub(super) version: Arc<str>,
    pub(super) provider: String,
    pub(super) caller_deadline: Option<Duration>,
    pub(super) who: Authenticated,
    /// The request as the caller sent it (before the gateway narrowed it).
    pub(super) asked: QueryRequest,
    /// The dataset's subject-key field ([`Gateway::tap`]).
    pub(super) subject_field: String,
}

/// `finish` with an error never yields Ok; this keeps the types honest without a panic.
pub(super) fn unreachable_stream() -> Response<ReceiverStream<Result<wire::QueryResponse, Status>>>
{
    let (_tx, rx) = mpsc::channel(1);
    Response::new(ReceiverStream::new(rx))
}

impl Gateway {
    /// Re-decide an open stream under the current policy, if it changed since the last
    /// decision: a revoked or narrowed grant applies to the very next batch.
    pub(super) fn recheck(&self, call: &mut Call, open: &mut OpenStream) -> Result<(), Reject> {
        let snap = self.snapshot();
        if snap.policy.version == open.version {
            return Ok(());
        }
        let caller = open.who.caller();
        let ask = policy_request(&open.asked);
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

    /// Add a batch's returned subjects to the stream's record. Once [`audit::subjects::CHUNK`]
    /// distinct ones are held, they are written as a record of their own (kind
    /// `returned_subjects`, the call's trace id, consumer and dataset), waited for like any
    /// record in `sync` mode, before the batch leaves: a stream whose subjects the trail cannot
    /// keep ends, fail closed.
    pub(super) async fn keep_subjects(
        &self,
        call: &mut Call,
        hashes: Vec<u64>,
    ) -> Result<(), Reject> {
        if hashes.is_empty() {
            return Ok(());
        }
        let rec = call.pending.rec();
        rec.returned_subjects.extend(hashes);
        if !rec.returned_subjects.settle() {
            return Ok(());
        }
        let chunk = AuditRecord {
            time: audit::now_rfc3339(),
            trace_id: rec.trace_id.clone(),
            method: rec.method.clone(),
            consumer_dept: rec.consumer_dept.clone(),
            consumer_system: rec.consumer_system.clone(),
            purpose: rec.purpose.clone(),
            dataset: rec.dataset.clone(),
            decision: rec.decision,
            rule: rec.rule.clone(),
            approval_ref: rec.approval_ref.clone(),
            policy_version: rec.policy_version.clone(),
            kind: audit::Kind::ReturnedSubjects,
            returned_subjects: rec.returned_subjects.take(),
            ..AuditRecord::default()
        };
        call.pending
            .log()
            .submit(chunk)
            .await
            .map_err(|_| super::call::audit_failed())
    }

    /// Relay a provider stream batch by batch, shaping each; commit the record at the end.
    pub(super) async fn relay(
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
            let tap = self.tap(&call, &open.subject_field);
            let mut shaped = match shape(batch, permit, &self.inner.mask_key, &provider, tap) {
                Ok(s) => s,
                Err(r) => break Err(r),
            };
            // Whose rows these are, on the trail before they leave; a long stream's in
            // chunks (records of their own), so no record grows with the stream.
            if let Err(r) = self
                .keep_subjects(&mut call, std::mem::take(&mut shaped.subjects))
                .await
            {
                break Err(r);
            }
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
}
