//! Rate limits from the data-sharing model, enforced locally with governor's GCRA limiters.
//!
//! One limiter per grant (so per consumer department, dataset and — for system-specific
//! grants — system), built when a policy snapshot is built; plus one keyed limiter for access
//! without a grant (unconditional datasets), keyed by (department, dataset) at the policy's
//! default rate. Checks are lock-free on the grant path.
//!
//! Also here: each consumer's overall rate (`defaults.per_consumer`) and daily quotas per
//! grant ([`Quotas`]). Provider protection lives with the upstream channels
//! ([`crate::upstream`]). Where several replicas must share the limits, [`shared`] decides
//! the same limits in one Redis round trip, and falls back to these local limiters (or
//! refuses) when Redis is unreachable.

pub mod failures;
pub mod provider;
pub mod shared;

/// A rate constant, checked when the crate compiles: a zero (a typo) is a build error rather
/// than a rate quietly clamped to 1. For constants only; rates from the config are validated
/// when it loads.
pub const fn nonzero(n: u32) -> std::num::NonZeroU32 {
    match std::num::NonZeroU32::new(n) {
        Some(n) => n,
        None => panic!("a rate constant must not be zero"),
    }
}

use std::{collections::HashMap, num::NonZeroU32, sync::Arc, time::Duration};

use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

use crate::{
    error::{Reason, Reject},
    policy::{Permit, Policy, RateLimit, model::DailyQuota},
};

/// The limiters of one policy snapshot.
pub struct RateLimits {
    /// grant id -> (its rate, its limiter). Shared with the next snapshot when unchanged.
    grants: HashMap<String, (RateLimit, Arc<DefaultDirectRateLimiter>)>,
    default: (RateLimit, Arc<DefaultKeyedRateLimiter<(String, String)>>),
    /// Each consumer's overall rate (policy `defaults.per_consumer`), keyed by department.
    per_consumer: Option<(RateLimit, Arc<DefaultKeyedRateLimiter<String>>)>,
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

/// The refusal for a department over its overall rate.
pub(crate) fn consumer_over(dept: &str, rate: RateLimit, wait: Duration) -> Reject {
    Reject::new(
        Reason::RateLimited,
        format!(
            "department `{dept}` is over its overall rate of {}/s (burst {}); retry after {} ms",
            rate.per_second,
            rate.burst,
            wait.as_millis()
        ),
    )
    .with_rule("defaults:per_consumer")
    .with_retry_after(wait)
    .with_quota(
        format!("consumer:{dept}"),
        format!("{}/s, burst {}", rate.per_second, rate.burst),
    )
}

/// The refusal for a call over its grant's (or the default) rate.
pub(crate) fn grant_over(rule: &str, dataset: &str, r: RateLimit, wait: Duration) -> Reject {
    Reject::new(
        Reason::RateLimited,
        format!(
            "over the rate limit of {}/s (burst {}) on `{dataset}`; retry after {} ms",
            r.per_second,
            r.burst,
            wait.as_millis()
        ),
    )
    .with_rule(rule.to_owned())
    .with_retry_after(wait)
    .with_quota(
        rule.to_owned(),
        format!("{}/s, burst {}", r.per_second, r.burst),
    )
}

/// The refusal for a grant whose daily quota of `what` (calls, rows) is used up.
pub(crate) fn quota_exhausted(grant: &str, what: &str, limit: u64, left: Duration) -> Reject {
    Reject::new(
        Reason::QuotaExhausted,
        format!("the daily quota of {limit} {what} for grant `{grant}` is used up; it resets at midnight"),
    )
    .with_rule(format!("grant:{grant}"))
    .with_retry_after(left)
    .with_quota(format!("grant:{grant}"), format!("{limit} {what} per day"))
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
        let per_consumer = policy.file.defaults.per_consumer.map(|rate| {
            previous
                .and_then(|p| p.per_consumer.as_ref())
                .filter(|(r, _)| *r == rate)
                .map(|(r, l)| (*r, l.clone()))
                .unwrap_or_else(|| (rate, Arc::new(RateLimiter::keyed(quota(rate)))))
        });
        Self {
            grants,
            default,
            per_consumer,
            clock: DefaultClock::default(),
        }
    }

    /// Take one call from the consumer's overall limiter and the permit's limiter, or say
    /// which limit and when to retry.
    pub fn check(&self, dept: &str, dataset: &str, permit: &Permit) -> Result<(), Reject> {
        if let Some((rate, l)) = &self.per_consumer
            && let Err(not_until) = l.check_key(&dept.to_owned())
        {
            return Err(consumer_over(dept, *rate, self.wait(not_until)));
        }
        let res = match permit.grant_id.as_deref().and_then(|g| self.grants.get(g)) {
            Some((_, l)) => l.check(),
            None => self
                .default
                .1
                .check_key(&(dept.to_owned(), dataset.to_owned())),
        };
        res.map_err(|not_until| {
            grant_over(
                &permit.rule,
                dataset,
                permit.rate_limit,
                self.wait(not_until),
            )
        })
    }

    fn wait(&self, not_until: governor::NotUntil<governor::clock::QuantaInstant>) -> Duration {
        not_until
            .wait_time_from(self.clock.now())
            .max(Duration::from_millis(1))
    }

    /// The same limits as [`check`](Self::check), as buckets for the shared (Redis) back end.
    pub fn buckets(&self, dept: &str, dataset: &str, permit: &Permit) -> Vec<shared::Bucket> {
        let mut out = Vec::with_capacity(3);
        if let Some((rate, _)) = &self.per_consumer {
            out.push(shared::Bucket {
                kind: shared::BucketKind::Consumer(dept.to_owned()),
                key: format!("r:c:{dept}"),
                rate: *rate,
                longest_wait: Duration::ZERO,
            });
        }
        let key = match permit
            .grant_id
            .as_deref()
            .filter(|g| self.grants.contains_key(*g))
        {
            Some(g) => format!("r:g:{g}"),
            None => format!("r:d:{dept}:{dataset}"),
        };
        out.push(shared::Bucket {
            kind: shared::BucketKind::Grant {
                rule: permit.rule.to_string(),
                dataset: dataset.to_owned(),
            },
            key,
            rate: permit.rate_limit,
            longest_wait: Duration::ZERO,
        });
        out
    }

    /// Forget idle keys of the keyed limiter (bounded memory); call periodically.
    pub fn retain_recent(&self) {
        self.default.1.retain_recent();
        if let Some((_, l)) = &self.per_consumer {
            l.retain_recent();
        }
    }
}

/// Daily quotas per grant, in calls and rows, reset at local midnight. The clock is injected,
/// so the reset is testable; counters live with the gateway (not the policy snapshot), so a
/// reload does not hand anyone a fresh day.
pub struct Quotas {
    /// Seconds east of UTC of the zone whose midnight resets the quotas.
    offset_secs: i64,
    clock: Arc<dyn Fn() -> i64 + Send + Sync>,
    used: std::sync::Mutex<HashMap<String, Used>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Used {
    day: i64,
    calls: u64,
    rows: u64,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("offset_secs", &self.offset_secs)
            .finish_non_exhaustive()
    }
}

impl Quotas {
    /// Quotas on the system clock.
    pub fn new(offset_secs: i64) -> Self {
        Self::with_clock(
            offset_secs,
            Arc::new(|| i64::try_from(crate::token::now_secs()).unwrap_or(i64::MAX)),
        )
    }

    /// Quotas on a given clock (seconds since the epoch).
    pub fn with_clock(offset_secs: i64, clock: Arc<dyn Fn() -> i64 + Send + Sync>) -> Self {
        Self {
            offset_secs,
            clock,
            used: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// (local day number, time until the next local midnight)
    pub fn today(&self) -> (i64, Duration) {
        let local = (self.clock)() + self.offset_secs;
        let day = local.div_euclid(86_400);
        let left = 86_400 - local.rem_euclid(86_400);
        (day, Duration::from_secs(left as u64))
    }

    /// Count one call against the grant's quota, or refuse it until midnight.
    pub fn admit(&self, grant: &str, q: &DailyQuota) -> Result<(), Reject> {
        let (day, left) = self.today();
        let Ok(mut used) = self.used.lock() else {
            return Ok(());
        };
        let u = used.entry(grant.to_owned()).or_default();
        if u.day != day {
            *u = Used {
                day,
                ..Used::default()
            };
        }
        let over = |what: &str, limit: u64| quota_exhausted(grant, what, limit, left);
        if let Some(limit) = q.calls
            && u.calls >= limit
        {
            return Err(over("calls", limit));
        }
        if let Some(limit) = q.rows
            && u.rows >= limit
        {
            return Err(over("rows", limit));
        }
        u.calls += 1;
        Ok(())
    }

    /// (calls, rows) counted today under `grant` by this process (the console's quota use).
    pub fn used_today(&self, grant: &str) -> (u64, u64) {
        let (day, _) = self.today();
        let Ok(used) = self.used.lock() else {
            return (0, 0);
        };
        used.get(grant)
            .filter(|u| u.day == day)
            .map_or((0, 0), |u| (u.calls, u.rows))
    }

    /// Count rows delivered under the grant today.
    pub fn add_rows(&self, grant: &str, rows: u64) {
        let (day, _) = self.today();
        if let Ok(mut used) = self.used.lock() {
            let u = used.entry(grant.to_owned()).or_default();
            if u.day != day {
                *u = Used {
                    day,
                    ..Used::default()
                };
            }
            u.rows += rows;
        }
    }
}

/// Seconds east of UTC for a quota time zone: `Asia/Shanghai` (and the other UTC+8 zones of
/// China) or a fixed offset like `+08:00` / `-05:30`.
pub fn zone_offset(zone: &str) -> Result<i64, String> {
    match zone {
        "Asia/Shanghai" | "Asia/Chongqing" | "Asia/Harbin" | "Asia/Urumqi" | "PRC" => {
            return Ok(8 * 3600);
        }
        "UTC" | "Etc/UTC" => return Ok(0),
        _ => {}
    }
    let (sign, rest) = match zone.as_bytes().first() {
        Some(b'+') => (1, &zone[1..]),
        Some(b'-') => (-1, &zone[1..]),
        _ => {
            return Err(format!(
                "`{zone}`: use Asia/Shanghai, UTC, or a fixed offset like +08:00"
            ));
        }
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let (h, m): (i64, i64) = (
        h.parse().map_err(|_| format!("`{zone}`: bad hours"))?,
        m.parse().map_err(|_| format!("`{zone}`: bad minutes"))?,
    );
    if h > 14 || m > 59 {
        return Err(format!("`{zone}`: offset out of range"));
    }
    Ok(sign * (h * 3600 + m * 60))
}

/// A call's places with its provider, held until the call (or stream) ends: this
/// replica's (counting against `max_in_flight` and in `xgate_provider_in_flight`), and its
/// lease among every replica's calls when the limits are shared.
#[derive(Debug)]
pub struct Place {
    _here: provider::ProviderSeat,
    _shared: Option<shared::Lease>,
}

impl Place {
    pub fn new(here: provider::ProviderSeat, shared: Option<shared::Lease>) -> Self {
        Self {
            _here: here,
            _shared: shared,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    #[test]
    fn a_daily_quota_runs_out_and_resets_at_local_midnight() {
        // 2026-06-01 23:59:00 China Standard Time.
        let now = Arc::new(AtomicI64::new(1_780_329_540));
        let n = now.clone();
        let q = Quotas::with_clock(
            zone_offset("Asia/Shanghai").unwrap(),
            Arc::new(move || n.load(Ordering::SeqCst)),
        );
        let calls = DailyQuota {
            calls: Some(3),
            rows: None,
        };
        for _ in 0..3 {
            q.admit("g", &calls).unwrap();
        }
        let r = q.admit("g", &calls).unwrap_err();
        assert_eq!(r.reason, Reason::QuotaExhausted);
        assert_eq!(
            r.retry_after,
            Some(Duration::from_secs(60)),
            "until midnight"
        );
        assert!(
            r.quota
                .as_ref()
                .is_some_and(|(s, d)| s == "grant:g" && d == "3 calls per day")
        );
        // Other grants are not affected.
        q.admit("other", &calls).unwrap();
        // Past local midnight the day starts afresh.
        now.fetch_add(61, Ordering::SeqCst);
        q.admit("g", &calls).unwrap();
        // Rows: refused once the rows delivered reach the quota.
        let rows = DailyQuota {
            calls: None,
            rows: Some(100),
        };
        q.admit("r", &rows).unwrap();
        q.add_rows("r", 100);
        assert_eq!(
            q.admit("r", &rows).unwrap_err().reason,
            Reason::QuotaExhausted
        );
    }

    #[test]
    fn zones() {
        assert_eq!(zone_offset("Asia/Shanghai"), Ok(28_800));
        assert_eq!(zone_offset("+05:30"), Ok(19_800));
        assert_eq!(zone_offset("-03:00"), Ok(-10_800));
        assert!(zone_offset("Europe/Paris").is_err());
    }
}
