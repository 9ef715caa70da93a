//! Authentication failures per client certificate: a caller that keeps presenting bad tokens
//! is refused before any signature work.
//!
//! A remembered bad token costs nothing (the verifier caches refusals), but a *different* bad
//! token per call costs a signature check each, so one certificate could burn the gateway's
//! CPU. Each failure takes a cell from its certificate's GCRA bucket
//! (`jwt.auth_failures_per_second`, bursts of `jwt.auth_failures_burst`); once the bucket is
//! empty, that certificate's calls are refused `RESOURCE_EXHAUSTED AUTH_FAILURES_LIMITED`
//! until it refills, without looking at the token. Successes take nothing, and a good caller
//! on another certificate is unaffected. Only failures that cost a signature check count
//! (a bad signature, or claims refused after a good one): no token, a malformed one, a
//! refused algorithm or an unknown key are cheaper to refuse than to count.
//!
//! Not here: the per-grant and per-consumer rates (the parent module), which apply after
//! authentication.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

use crate::error::{Reason, Reject};

/// Most certificates tracked as limited at once (the rest are forgotten oldest-first).
const MAX_LIMITED: usize = 100_000;

#[derive(Debug)]
pub struct AuthFailures {
    buckets: DefaultKeyedRateLimiter<String>,
    /// Certificate fingerprint -> refused until then.
    limited: Mutex<HashMap<String, Instant>>,
    /// `limited.len()`, read without the lock on every call: zero for a healthy gateway.
    count: AtomicUsize,
}

impl AuthFailures {
    pub fn new(per_second: u32, burst: u32) -> Self {
        let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self {
            buckets: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            limited: Mutex::new(HashMap::new()),
            count: AtomicUsize::new(0),
        }
    }

    /// Refuse `cert`'s call now, before its token is looked at, if it failed too often.
    pub fn check(&self, cert: &str) -> Result<(), Reject> {
        if self.count.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let Ok(mut limited) = self.limited.lock() else {
            return Ok(());
        };
        let now = Instant::now();
        match limited.get(cert) {
            Some(until) if *until > now => {
                let wait = *until - now;
                Err(limited_reject(wait))
            }
            Some(_) => {
                limited.remove(cert);
                self.count.store(limited.len(), Ordering::Relaxed);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Count a failed authentication of `cert`; past its budget, it is limited.
    pub fn failed(&self, cert: &str) {
        let Err(not_until) = self.buckets.check_key(&cert.to_owned()) else {
            return;
        };
        let wait = not_until.wait_time_from(DefaultClock::default().now());
        // At least a tenth of a second: a flood is not let through cell by cell.
        let until = Instant::now() + wait.max(Duration::from_millis(100));
        metrics::counter!("xgate_auth_failures_limited_total").increment(1);
        if let Ok(mut limited) = self.limited.lock() {
            if limited.len() >= MAX_LIMITED {
                let now = Instant::now();
                limited.retain(|_, u| *u > now);
            }
            if limited.len() < MAX_LIMITED {
                limited.insert(cert.to_owned(), until);
            }
            self.count.store(limited.len(), Ordering::Relaxed);
        }
    }

    /// Forget idle buckets (called with the other limiters' upkeep).
    pub fn retain_recent(&self) {
        self.buckets.retain_recent();
    }
}

fn limited_reject(wait: Duration) -> Reject {
    Reject::new(
        Reason::AuthFailuresLimited,
        format!(
            "too many failed authentications from this client certificate; its calls are refused for {} ms without checking their tokens: fix the token",
            wait.as_millis().max(1)
        ),
    )
    .with_rule("identity:auth-failure-limit")
    .with_retry_after(wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_burst_limit_only_their_own_certificate() {
        let f = AuthFailures::new(1, 3);
        for _ in 0..3 {
            assert!(f.check("a").is_ok());
            f.failed("a");
        }
        assert!(f.check("a").is_ok(), "the burst itself is allowed");
        f.failed("a");
        let r = f.check("a").expect_err("limited");
        assert_eq!(r.reason, Reason::AuthFailuresLimited);
        assert_eq!(r.code(), tonic::Code::ResourceExhausted);
        assert!(f.check("b").is_ok(), "another certificate is unaffected");
    }
}
