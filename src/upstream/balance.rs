//! One provider's replicas, and which one a call goes to.
//!
//! - **Balancing**: power of two choices over each replica's load, its peak-EWMA round-trip
//!   time × (calls outstanding + 1), the cost linkerd and `tower::load::PeakEwma` use. Two
//!   replicas are drawn at random among those not ejected, and the cheaper takes the call.
//!   An RTT above the average replaces it at once (the peak); lower ones pull it down with a
//!   10 s decay.
//! - **Passive outlier detection**: consecutive connect failures, `UNAVAILABLE` or `INTERNAL`
//!   answers (5) eject a replica for 10 s × 2^(ejections so far), at most 5 min, never more
//!   than half of a provider's replicas at once. An ejected replica comes back when its time
//!   is up, and is ejected again sooner if it still fails.
//! - **Retry budget** (`tower::retry::budget::TpsBudget`): 20 % of the calls of the last 10 s
//!   plus 10 per second may be retried; past it, a failure is the caller's answer. An outage
//!   can then never multiply the load on the replicas left.
//!
//! - **Active health checks** (`serve::health`): `grpc.health.v1` over the replica's own mTLS
//!   connection every `upstream.health_check.interval_ms`; `unhealthy_threshold` failed
//!   checks in a row take it out of rotation, `healthy_threshold` passed ones bring it back
//!   (and end an ejection). A provider that does not implement the health service passes
//!   when it answers `UNIMPLEMENTED`: it answered.
//!
//! The balancer picks a replica per try; the pipeline (`forward`) decides whether a failed try
//! is retried (a `Query`, or a `QueryStream` before its first batch). Not here: how much a
//! provider is sent in all (`limits::provider`, which holds across its replicas).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::transport::Channel;
use tower::retry::budget::{Budget, TpsBudget};

use crate::wire::data_exchange_client::DataExchangeClient;

/// Failures in a row that eject a replica.
pub const CONSECUTIVE_FAILURES: u32 = 5;
/// The first ejection's length; each further one doubles it.
pub const BASE_EJECTION: Duration = Duration::from_secs(10);
pub const MAX_EJECTION: Duration = Duration::from_secs(300);
/// The largest share of a provider's replicas ejected at once.
pub const MAX_EJECTED_SHARE: f64 = 0.5;
/// Decay of the RTT average.
const DECAY: Duration = Duration::from_secs(10);
/// RTT assumed for a replica not measured yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// One endpoint of a provider: its channel, its load and its standing.
#[derive(Debug)]
pub struct Replica {
    pub endpoint: String,
    /// What its channel was built for: kept across reloads and DNS answers while unchanged.
    pub key: super::ChannelKey,
    pub client: DataExchangeClient<Channel>,
    /// The same connection, for `grpc.health.v1` checks.
    pub channel: Channel,
    /// Out of rotation after failed active checks (until they pass again).
    unhealthy: std::sync::atomic::AtomicBool,
    /// Active checks in a row that passed (positive) or failed (negative).
    streak: std::sync::atomic::AtomicI32,
    healthy_gauge: metrics::Gauge,
    outstanding: AtomicU32,
    /// (EWMA of the RTT in ns, when it was last updated).
    rtt: Mutex<(f64, Instant)>,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Ejected until this many ms after `epoch` (0: not ejected).
    ejected_until_ms: AtomicU64,
    epoch: Instant,
    requests: metrics::Counter,
    errors: metrics::Counter,
    latency: metrics::Histogram,
    ejected_gauge: metrics::Gauge,
}

impl Replica {
    pub fn new(
        provider: &str,
        key: super::ChannelKey,
        channel: Channel,
        client: DataExchangeClient<Channel>,
    ) -> Replica {
        let endpoint = key.0.as_str();
        let labels = [
            ("provider", provider.to_owned()),
            ("endpoint", endpoint.to_owned()),
        ];
        let ejected_gauge = metrics::gauge!("xgate_upstream_endpoint_ejected", &labels);
        ejected_gauge.set(0.0);
        let healthy_gauge = metrics::gauge!("xgate_upstream_endpoint_healthy", &labels);
        healthy_gauge.set(1.0);
        Replica {
            endpoint: endpoint.to_owned(),
            key: key.clone(),
            client,
            channel,
            unhealthy: std::sync::atomic::AtomicBool::new(false),
            streak: std::sync::atomic::AtomicI32::new(0),
            healthy_gauge,
            outstanding: AtomicU32::new(0),
            rtt: Mutex::new((DEFAULT_RTT.as_nanos() as f64, Instant::now())),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            requests: metrics::counter!("xgate_upstream_requests_total", &labels),
            errors: metrics::counter!("xgate_upstream_errors_total", &labels),
            latency: metrics::histogram!("xgate_upstream_seconds", &labels),
            ejected_gauge,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Out of rotation: failed its active checks, or ejected.
    pub fn out(&self) -> bool {
        self.unhealthy.load(Ordering::Relaxed) || self.ejected()
    }

    pub fn healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }

    /// One active check's result, with the thresholds: whether the endpoint's standing
    /// changed. A pass that brings it back also ends an ejection (it answers again).
    pub fn checked(&self, passed: bool, healthy_after: u32, unhealthy_after: u32) -> bool {
        let streak = if passed {
            self.streak
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(s.max(0) + 1))
                .map_or(1, |s| s.max(0) + 1)
        } else {
            self.streak
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| Some(s.min(0) - 1))
                .map_or(-1, |s| s.min(0) - 1)
        };
        let was_unhealthy = self.unhealthy.load(Ordering::Relaxed);
        if passed && was_unhealthy && streak >= healthy_after as i32 {
            self.unhealthy.store(false, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.failures.store(0, Ordering::Relaxed);
            self.ejected_gauge.set(0.0);
            self.healthy_gauge.set(1.0);
            return true;
        }
        if !passed && !was_unhealthy && -streak >= unhealthy_after as i32 {
            self.unhealthy.store(true, Ordering::Relaxed);
            self.healthy_gauge.set(0.0);
            return true;
        }
        false
    }

    pub fn ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if self.now_ms() < until {
            return true;
        }
        // Its time is up: back in rotation (a failure now ejects it again quickly, and longer).
        if self
            .ejected_until_ms
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.ejected_gauge.set(0.0);
            self.failures
                .store(CONSECUTIVE_FAILURES.saturating_sub(1), Ordering::Relaxed);
        }
        false
    }

    /// The balancing cost: RTT estimate × (outstanding + 1).
    fn cost(&self) -> f64 {
        let rtt = self.rtt.lock().map(|g| g.0).unwrap_or(1.0);
        rtt * f64::from(self.outstanding.load(Ordering::Relaxed) + 1)
    }

    fn observe(&self, rtt: Duration) {
        let sample = rtt.as_nanos() as f64;
        if let Ok(mut g) = self.rtt.lock() {
            let (avg, at) = *g;
            let now = Instant::now();
            let next = if sample > avg {
                sample
            } else {
                let w = (-(now - at).as_secs_f64() / DECAY.as_secs_f64()).exp();
                avg * w + sample * (1.0 - w)
            };
            *g = (next, now);
        }
    }
}

/// How a try ended, for the replica's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered (any answer the provider chose to give, refusals included).
    Answered,
    /// Could not connect, or answered `UNAVAILABLE` / `INTERNAL`: counts towards ejection.
    Failed,
    /// Cancelled or timed out: says nothing about the replica.
    Abandoned,
}

/// A call's hold on one replica: outstanding until finished or dropped.
#[derive(Debug)]
pub struct Pick {
    pub replica: Arc<Replica>,
    started: Instant,
    set: Arc<Replicas>,
    done: bool,
}

impl Pick {
    pub fn client(&self) -> DataExchangeClient<Channel> {
        self.replica.client.clone()
    }

    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        let r = &self.replica;
        r.outstanding.fetch_sub(1, Ordering::Relaxed);
        r.requests.increment(1);
        let rtt = self.started.elapsed();
        r.latency.record(rtt.as_secs_f64());
        match outcome {
            Outcome::Answered => {
                r.observe(rtt);
                r.failures.store(0, Ordering::Relaxed);
            }
            Outcome::Failed => {
                r.errors.increment(1);
                // A failure is slow from the caller's side: weigh it as the RTT it cost.
                r.observe(rtt.max(Duration::from_millis(5)));
                let n = r.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= CONSECUTIVE_FAILURES {
                    self.set.eject(r);
                }
            }
            Outcome::Abandoned => {}
        }
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if !self.done {
            self.replica.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Every replica of one provider, and its retry budget.
#[derive(Debug)]
pub struct Replicas {
    pub provider: String,
    pub list: Vec<Arc<Replica>>,
    /// Shared with the sets that follow this one when its endpoints change.
    budget: Arc<TpsBudget>,
    /// `upstream.try_timeout_ms`.
    try_timeout: Option<Duration>,
    retries: metrics::Counter,
    budget_exhausted: metrics::Counter,
}

impl Replicas {
    pub fn new(provider: &str, list: Vec<Arc<Replica>>, try_timeout: Option<Duration>) -> Replicas {
        Replicas {
            provider: provider.to_owned(),
            list,
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
            try_timeout,
            retries: metrics::counter!("xgate_upstream_retries_total", "provider" => provider.to_owned(), "result" => "retried"),
            budget_exhausted: metrics::counter!("xgate_upstream_retries_total", "provider" => provider.to_owned(), "result" => "budget_exhausted"),
        }
    }

    /// The set that replaces this one when the endpoints change (a reload, a DNS answer):
    /// `list`, under the same retry budget, so a change never refills it.
    pub fn successor(&self, list: Vec<Arc<Replica>>, try_timeout: Option<Duration>) -> Replicas {
        Replicas {
            provider: self.provider.clone(),
            list,
            budget: self.budget.clone(),
            try_timeout,
            retries: self.retries.clone(),
            budget_exhausted: self.budget_exhausted.clone(),
        }
    }

    /// Whether this set is exactly `list` (the same replicas, in order).
    pub fn is(&self, list: &[Arc<Replica>]) -> bool {
        self.list.len() == list.len() && self.list.iter().zip(list).all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// A replica for a try, avoiding `avoid` (the one that just failed) when another exists.
    /// Replicas out of rotation (ejected, or failing their health checks) are passed over
    /// unless every other one is out too: then a try on one of them is still the caller's
    /// best chance.
    pub fn pick(self: &Arc<Self>, avoid: Option<&Arc<Replica>>) -> Option<Pick> {
        // One endpoint (the common case): no choice to make, nothing to allocate.
        if let [only] = self.list.as_slice() {
            only.outstanding.fetch_add(1, Ordering::Relaxed);
            return Some(Pick {
                replica: only.clone(),
                started: Instant::now(),
                set: self.clone(),
                done: false,
            });
        }
        let usable = |r: &&Arc<Replica>| avoid.is_none_or(|a| !Arc::ptr_eq(a, r));
        let mut live: Vec<&Arc<Replica>> = self
            .list
            .iter()
            .filter(usable)
            .filter(|r| !r.out())
            .collect();
        if live.is_empty() {
            live = self.list.iter().filter(usable).collect();
        }
        let chosen = match live.len() {
            0 => return None,
            1 => live[0],
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                if live[a].cost() <= live[b].cost() {
                    live[a]
                } else {
                    live[b]
                }
            }
        };
        chosen.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            replica: chosen.clone(),
            started: Instant::now(),
            set: self.clone(),
            done: false,
        })
    }

    /// How long the first try of a call that may wait `wait` may take: all of it with one
    /// endpoint (there is nowhere else to go), else `upstream.try_timeout_ms` or half of it,
    /// leaving the rest for a try on another endpoint.
    pub fn first_try_limit(&self, wait: Duration) -> Duration {
        if self.list.len() < 2 {
            return wait;
        }
        self.try_timeout.unwrap_or(wait / 2).min(wait)
    }

    /// Count a first try towards the retry budget.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Whether a retry fits the budget (and count it).
    pub fn may_retry(&self) -> bool {
        if self.list.len() < 2 {
            return false;
        }
        if self.budget.withdraw() {
            self.retries.increment(1);
            true
        } else {
            self.budget_exhausted.increment(1);
            false
        }
    }

    fn eject(&self, r: &Replica) {
        if r.ejected() {
            return;
        }
        let ejected = self.list.iter().filter(|x| x.ejected()).count();
        if (ejected + 1) as f64 > MAX_EJECTED_SHARE * self.list.len() as f64 {
            return;
        }
        let n = r.ejections.fetch_add(1, Ordering::Relaxed);
        let time = BASE_EJECTION
            .saturating_mul(1u32 << n.min(5))
            .min(MAX_EJECTION);
        let until = r.now_ms() + time.as_millis() as u64;
        r.ejected_until_ms.store(until.max(1), Ordering::Relaxed);
        r.ejected_gauge.set(1.0);
        tracing::warn!(provider = %self.provider, endpoint = %r.endpoint, seconds = time.as_secs(), "provider endpoint ejected after {CONSECUTIVE_FAILURES} failures in a row");
    }

    /// (endpoint, ejected) for `/ready` and tests.
    pub fn standing(&self) -> Vec<(String, bool)> {
        self.list
            .iter()
            .map(|r| (r.endpoint.clone(), r.ejected()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize, try_timeout: Option<Duration>) -> Arc<Replicas> {
        let list = (0..n)
            .map(|i| {
                let ch =
                    tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", i + 1))
                        .map(|e| e.connect_lazy())
                        .unwrap_or_else(|e| panic!("{e}"));
                Arc::new(Replica::new(
                    "p",
                    (format!("e{i}"), None, 0),
                    ch.clone(),
                    DataExchangeClient::new(ch),
                ))
            })
            .collect();
        Arc::new(Replicas::new("p", list, try_timeout))
    }

    #[tokio::test]
    async fn an_unhealthy_replica_is_passed_over_unless_all_are() {
        let s = set(3, None);
        s.list[1].checked(false, 1, 1);
        for _ in 0..200 {
            let p = s.pick(None).map(|p| p.replica.endpoint.clone());
            assert_ne!(p.as_deref(), Some("e1"));
        }
        s.list[0].checked(false, 1, 1);
        s.list[2].checked(false, 1, 1);
        assert!(s.pick(None).is_some(), "all out: still a best chance");
        // Back after `healthy_threshold` passes.
        assert!(s.list[1].checked(true, 1, 1));
        for _ in 0..50 {
            assert_eq!(
                s.pick(None).map(|p| p.replica.endpoint.clone()).as_deref(),
                Some("e1")
            );
        }
    }

    #[tokio::test]
    async fn never_more_than_half_ejected() {
        let s = set(4, None);
        for r in &s.list {
            for _ in 0..CONSECUTIVE_FAILURES {
                let p = Pick {
                    replica: r.clone(),
                    started: Instant::now(),
                    set: s.clone(),
                    done: false,
                };
                r.outstanding.fetch_add(1, Ordering::Relaxed);
                p.finish(Outcome::Failed);
            }
        }
        assert_eq!(s.standing().iter().filter(|(_, e)| *e).count(), 2);
    }

    #[tokio::test]
    async fn the_first_try_leaves_room_for_a_second() {
        let wait = Duration::from_secs(2);
        assert_eq!(
            set(1, None).first_try_limit(wait),
            wait,
            "nowhere else to go"
        );
        assert_eq!(set(2, None).first_try_limit(wait), wait / 2);
        let t = Some(Duration::from_millis(300));
        assert_eq!(set(2, t).first_try_limit(wait), Duration::from_millis(300));
        assert_eq!(
            set(2, t).first_try_limit(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
    }

    #[tokio::test]
    async fn the_retry_budget_holds_retries_to_a_share_of_calls() {
        let s = set(2, None);
        let mut retried = 0;
        for _ in 0..1000 {
            s.deposit();
            if s.may_retry() {
                retried += 1;
            }
        }
        // 20 % of the calls plus the floor of 10/s over the 10 s window.
        assert!(retried <= 200 + 100, "{retried}");
        assert!(retried >= 200, "{retried}");
        assert!(
            !set(1, None).may_retry(),
            "one endpoint: nothing to retry on"
        );
    }
}
