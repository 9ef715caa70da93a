//! Provider protection: the most the gateway sends one provider (its `max_rate` and
//! `max_in_flight` in the policy), whoever the callers are. Past it a call waits at most
//! `upstream.queue_wait_ms` (never an unbounded queue), then is refused
//! `UNAVAILABLE PROVIDER_SATURATED` with a retry hint.
//!
//! This process's limiters live here; with shared limits the provider's rate is one more
//! bucket of the Redis decision ([`super::shared`]) and its in-flight cap a Redis lease, held
//! with the local place in one [`super::Place`]. Not here: the channels to providers
//! ([`crate::upstream`]).

use std::{collections::HashMap, sync::Arc, time::Duration};

use crate::{
    error::{Reason, Reject},
    policy::{Policy, RateLimit},
};

/// Which protection refused a call: the `limit` label of `xgate_provider_saturated_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The provider's `max_rate` (here or in Redis).
    Rate,
    /// Its `max_in_flight`, on this replica.
    InFlight,
    /// Its `max_in_flight` among every replica's calls (a Redis lease).
    InFlightShared,
}

impl Limit {
    fn label(self) -> &'static str {
        match self {
            Limit::Rate => "rate",
            Limit::InFlight => "in_flight",
            Limit::InFlightShared => "in_flight_shared",
        }
    }
}

/// The refusal for a provider at a protection limit, counted in
/// `xgate_provider_saturated_total{provider, limit}` (the one place that metric is spelled).
pub fn saturated(provider: &str, limit: Limit, retry: Duration) -> Reject {
    metrics::counter!("xgate_provider_saturated_total", "provider" => provider.to_owned(), "limit" => limit.label())
        .increment(1);
    Reject::new(
        Reason::ProviderSaturated,
        format!("the provider `{provider}` is at its capacity limit; retry shortly"),
    )
    .with_rule(format!("provider-protection:{provider}"))
    .with_retry_after(retry.max(Duration::from_millis(10)))
}

/// Every provider's protection for one policy snapshot.
#[derive(Debug, Default)]
pub struct Protections {
    /// provider id -> its protection (shared with the next snapshot when unchanged).
    by_provider: HashMap<String, Arc<Protection>>,
    queue_wait: Duration,
}

/// One provider's limiters.
struct Protection {
    settings: (Option<RateLimit>, Option<u32>),
    rate: Option<governor::DefaultDirectRateLimiter>,
    in_flight: Option<Arc<tokio::sync::Semaphore>>,
}

impl std::fmt::Debug for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protection")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Whether the provider's rate was already decided (by the shared limits, in Redis) when
/// the call takes its place here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecided {
    Here,
    Shared,
}

/// This replica's seat with a provider (a place among its `max_in_flight`), not to be
/// confused with a policy [`crate::policy::Permit`].
#[derive(Debug)]
pub struct ProviderSeat {
    _seat: Option<tokio::sync::OwnedSemaphorePermit>,
    gauge: metrics::Gauge,
}

impl ProviderSeat {
    fn new(provider: &str, seat: Option<tokio::sync::OwnedSemaphorePermit>) -> Self {
        let gauge = metrics::gauge!("xgate_provider_in_flight", "provider" => provider.to_owned());
        gauge.increment(1.0);
        Self { _seat: seat, gauge }
    }
}

impl Drop for ProviderSeat {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

impl Protections {
    /// Limiters for every provider of `policy`; a provider whose limits are unchanged from
    /// `previous` keeps its state (its rate bucket and the seats of the calls in flight).
    pub fn for_policy(
        policy: &Policy,
        queue_wait: Duration,
        previous: Option<&Protections>,
    ) -> Self {
        let mut by_provider = HashMap::new();
        for p in &policy.file.providers {
            let settings = (p.max_rate, p.max_in_flight);
            let kept = previous
                .and_then(|prev| prev.by_provider.get(&p.id))
                .filter(|g| g.settings == settings)
                .cloned();
            let guard = kept.unwrap_or_else(|| {
                Arc::new(Protection {
                    settings,
                    rate: p
                        .max_rate
                        .map(|r| governor::RateLimiter::direct(super::quota(r))),
                    in_flight: p
                        .max_in_flight
                        .map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize))),
                })
            });
            by_provider.insert(p.id.clone(), guard);
        }
        Self {
            by_provider,
            queue_wait,
        }
    }

    /// Take a place with the provider: within its rate (unless decided already) and
    /// in-flight limits, waiting at most `queue_wait`, else `PROVIDER_SATURATED`.
    pub async fn admit(&self, provider: &str, rate: RateDecided) -> Result<ProviderSeat, Reject> {
        let Some(p) = self.by_provider.get(provider) else {
            return Ok(ProviderSeat::new(provider, None));
        };
        if let Some(l) = p.rate.as_ref().filter(|_| rate == RateDecided::Here)
            && let Err(not_until) = l.check()
        {
            use governor::clock::Clock;
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            if wait > self.queue_wait {
                return Err(saturated(provider, Limit::Rate, wait));
            }
            tokio::time::sleep(wait).await;
            if l.check().is_err() {
                return Err(saturated(provider, Limit::Rate, wait));
            }
        }
        match &p.in_flight {
            None => Ok(ProviderSeat::new(provider, None)),
            Some(sem) => {
                match tokio::time::timeout(self.queue_wait, sem.clone().acquire_owned()).await {
                    Ok(Ok(seat)) => Ok(ProviderSeat::new(provider, Some(seat))),
                    _ => Err(saturated(provider, Limit::InFlight, self.queue_wait)),
                }
            }
        }
    }

    /// The provider's protection rate, if it has one.
    pub fn rate(&self, provider: &str) -> Option<RateLimit> {
        self.by_provider.get(provider).and_then(|p| p.settings.0)
    }

    /// The provider's in-flight cap, if it has one.
    pub fn in_flight(&self, provider: &str) -> Option<u32> {
        self.by_provider.get(provider).and_then(|p| p.settings.1)
    }

    /// Longest a call waits for room with a provider.
    pub fn queue_wait(&self) -> Duration {
        self.queue_wait
    }
}
