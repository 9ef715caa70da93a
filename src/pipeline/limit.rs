//! Stage `limit`: the consumer's overall rate, the grant's rate and daily quota, and the
//! provider's rate and in-flight places, by this process's limiters or in Redis (one round
//! trip) when the limits are shared. The limiters themselves live in [`crate::limits`].

use super::*;

impl Gateway {
    /// Count rows delivered under a grant with a rows quota (locally, and in Redis when the
    /// limits are shared).
    pub(super) fn count_rows(&self, permit: &Permit, rows: u64) {
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

    /// Stage `limit`: the consumer's overall rate, the grant's rate, its daily quota and the
    /// provider's protection rate — in Redis when the limits are shared (one round trip,
    /// falling back by `on_unavailable`), else by this process's limiters. Returns whether the
    /// provider's rate was decided here (so the forward stage does not take it twice) and, when
    /// the limits are shared and the provider has a `max_in_flight`, the call's place among
    /// all replicas' calls to it (hold it until the call ends).
    pub(super) async fn limit(
        &self,
        who: &Authenticated,
        snap: &Snapshot,
        dataset: &str,
        permit: &Permit,
        provider: &str,
        call_id: &str,
    ) -> Result<(RateDecided, Option<Lease>), Reject> {
        let dept = &who.id.dept;
        if let Some(shared) = &self.inner.shared {
            let mut buckets = snap.rates.buckets(dept, dataset, permit);
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
                        grant: g.to_string(),
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
        snap.rates.check(dept, dataset, permit)?;
        if let (Some(g), Some(q)) = (&permit.grant_id, &permit.daily_quota) {
            self.inner.quotas.admit(g, q)?;
        }
        Ok((RateDecided::Here, None))
    }

    /// A place with the provider among every replica's calls (its `max_in_flight`, shared in
    /// Redis), waiting at most `upstream.queue_wait_ms`. Without a cap: none needed.
    pub(super) async fn take_place(
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
}
