//! Rate limits from the data-sharing model, enforced locally with governor's GCRA limiters.
//!
//! One limiter per grant (so per consumer department, dataset and — for system-specific
//! grants — system), built when a policy snapshot is built; plus one keyed limiter for access
//! without a grant (unconditional datasets), keyed by (department, dataset) at the policy's
//! default rate. Checks are lock-free on the grant path.
//!
//! Not yet here (see the rate-limit issue): per-consumer and per-provider limits, daily
//! quotas, the Redis back end shared by replicas.

use std::{collections::HashMap, num::NonZeroU32, sync::Arc, time::Duration};

use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

use crate::{
    error::{Reason, Reject},
    policy::{Permit, Policy, RateLimit},
};

/// The limiters of one policy snapshot.
pub struct RateLimits {
    /// grant id -> (its rate, its limiter). Shared with the next snapshot when unchanged.
    grants: HashMap<String, (RateLimit, Arc<DefaultDirectRateLimiter>)>,
    default: (RateLimit, Arc<DefaultKeyedRateLimiter<(String, String)>>),
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("grants", &self.grants.len())
            .finish_non_exhaustive()
    }
}

/// governor's quota for a policy rate (fractional rates allowed: 0.5/s = one call per 2 s).
pub fn quota(r: RateLimit) -> Quota {
    let burst = NonZeroU32::new(r.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    let period = Duration::from_secs_f64(1.0 / r.per_second.max(1e-6));
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

impl RateLimits {
    /// Limiters for a policy. A grant whose id and rate are unchanged from `previous` keeps
    /// its limiter (and so its state): a reload neither resets nor double-counts anyone.
    pub fn for_policy(policy: &Policy, previous: Option<&RateLimits>) -> Self {
        let default_rate = policy.file.defaults.rate_limit;
        let grants = policy
            .file
            .grants
            .iter()
            .map(|g| {
                let rate = g.rate_limit.unwrap_or(default_rate);
                let limiter = previous
                    .and_then(|p| p.grants.get(&g.id))
                    .filter(|(r, _)| *r == rate)
                    .map(|(_, l)| l.clone())
                    .unwrap_or_else(|| Arc::new(RateLimiter::direct(quota(rate))));
                (g.id.clone(), (rate, limiter))
            })
            .collect();
        let default = previous
            .map(|p| &p.default)
            .filter(|(r, _)| *r == default_rate)
            .map(|(r, l)| (*r, l.clone()))
            .unwrap_or_else(|| {
                (
                    default_rate,
                    Arc::new(RateLimiter::keyed(quota(default_rate))),
                )
            });
        Self {
            grants,
            default,
            clock: DefaultClock::default(),
        }
    }

    /// Take one call from the permit's limiter, or say when to retry.
    pub fn check(&self, dept: &str, dataset: &str, permit: &Permit) -> Result<(), Reject> {
        let res = match permit.grant_id.as_deref().and_then(|g| self.grants.get(g)) {
            Some((_, l)) => l.check(),
            None => self
                .default
                .1
                .check_key(&(dept.to_owned(), dataset.to_owned())),
        };
        res.map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Reject::new(
                Reason::RateLimited,
                format!(
                    "over the rate limit of {}/s (burst {}) on `{dataset}`; retry after {} ms",
                    permit.rate_limit.per_second,
                    permit.rate_limit.burst,
                    wait.as_millis().max(1)
                ),
            )
            .with_rule(permit.rule.clone())
            .with_retry_after(wait.max(Duration::from_millis(1)))
        })
    }

    /// Forget idle keys of the keyed limiter (bounded memory); call periodically.
    pub fn retain_recent(&self) {
        self.default.1.retain_recent();
    }
}
