//! Limits shared by every replica, kept in Redis.
//!
//! Each call's limits — the consumer's overall rate, the grant's (or default) rate, the
//! provider's protection rate and the grant's daily quota — are decided in **one atomic round
//! trip**: a Lua script (`limits.lua`) running GCRA on the Redis server's clock and the quota
//! counters of the local day. Calls share one multiplexed connection, so concurrent decisions
//! are pipelined on it and the gateway never queues behind a single Redis request.
//!
//! A provider's `max_in_flight` is shared the same way: each call to the provider holds a lease
//! in a Redis sorted set (taken atomically by `inflight.lua`, released when the call ends,
//! expiring by itself if a replica dies), so N replicas together never have more than
//! `max_in_flight` calls with it.
//!
//! When Redis cannot be reached (connect error, broken connection, no answer within
//! `timeout_ms`), the call is decided by the configured [`OnUnavailable`]: `fail-open` falls
//! back to this replica's local limiters (the default: data keeps flowing, each replica holds
//! the limits on its own), `fail-closed` refuses with `UNAVAILABLE LIMITS_UNAVAILABLE`. Either
//! way the transition is logged once, `xgate_limits_redis_up` drops to 0, every fallback is
//! counted, and a background task reconnects with backoff; the next call after it succeeds is
//! decided by Redis again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use serde::Deserialize;

use crate::{
    error::{Reason, Reject},
    policy::RateLimit,
};

/// What to do with a call when Redis cannot decide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnUnavailable {
    /// Decide with this replica's local limiters (each replica then admits up to the full
    /// rate on its own).
    #[default]
    FailOpen,
    /// Refuse the call with `UNAVAILABLE LIMITS_UNAVAILABLE`.
    FailClosed,
}

/// `limits.shared` in the gateway config.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SharedConfig {
    /// `redis://[:password@]host:port[/db]`.
    pub redis_url: String,
    /// File holding the Redis password (kept out of the config file); optional.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// Prefix of every key xgate writes (several gateways' sets can share one Redis).
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
    /// Longest a decision waits for Redis before the call is decided by `on_unavailable`.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_prefix() -> String {
    "xgate".into()
}
fn default_timeout_ms() -> u64 {
    50
}

/// One rate bucket of a decision.
#[derive(Debug, Clone)]
pub struct Bucket {
    pub kind: BucketKind,
    /// Key suffix (after the prefix), e.g. `g:ca-hukou-subsidy`.
    pub key: String,
    pub rate: RateLimit,
    /// Longest a call may wait for this bucket (provider protection); zero elsewhere.
    pub longest_wait: Duration,
}

/// Which limit a bucket stands for (so a refusal names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketKind {
    /// A department's overall rate.
    Consumer(String),
    /// A grant's rate (or the default rate of a dataset without a grant), named by `rule`.
    Grant { rule: String, dataset: String },
    /// A provider's protection rate.
    Provider(String),
}

/// A grant's daily quota to count against.
#[derive(Debug, Clone)]
pub struct DayQuota {
    pub grant: String,
    pub calls: Option<u64>,
    pub rows: Option<u64>,
    /// The local day number (days since the epoch in the quota time zone).
    pub day: i64,
    /// Until the next local midnight.
    pub left: Duration,
}

/// What Redis said about a call.
#[derive(Debug)]
pub enum Verdict {
    /// Go ahead, after waiting this long (provider protection's bounded queue).
    Admit(Duration),
    Refuse(Reject),
}

/// Redis could not decide (unreachable, broken, too slow): the caller applies `on_unavailable`.
#[derive(Debug, Clone, Copy)]
pub struct Unreachable;

pub struct SharedLimits {
    client: redis::Client,
    conn: ArcSwapOption<MultiplexedConnection>,
    reconnecting: AtomicBool,
    script: redis::Script,
    inflight: redis::Script,
    prefix: String,
    timeout: Duration,
    pub on_unavailable: OnUnavailable,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("prefix", &self.prefix)
            .field("on_unavailable", &self.on_unavailable)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

const SCRIPT: &str = include_str!("limits.lua");
const INFLIGHT: &str = include_str!("inflight.lua");

impl SharedLimits {
    /// Set up the shared limits. Does not need Redis to be up: the first connection is made
    /// in the background, and calls before it are decided by `on_unavailable`.
    pub fn new(cfg: &SharedConfig) -> Result<Arc<Self>, String> {
        let mut info: redis::ConnectionInfo =
            redis::IntoConnectionInfo::into_connection_info(cfg.redis_url.as_str())
                .map_err(|e| format!("limits.shared.redis_url: {e}"))?;
        if let Some(p) = &cfg.password_file {
            let pw = std::fs::read_to_string(p)
                .map_err(|e| format!("limits.shared.password_file {}: {e}", p.display()))?;
            let settings = info.redis_settings().clone().set_password(pw.trim());
            info = info.set_redis_settings(settings);
        }
        let client =
            redis::Client::open(info).map_err(|e| format!("limits.shared.redis_url: {e}"))?;
        let me = Arc::new(Self {
            client,
            conn: ArcSwapOption::empty(),
            reconnecting: AtomicBool::new(false),
            script: redis::Script::new(SCRIPT),
            inflight: redis::Script::new(INFLIGHT),
            prefix: cfg.key_prefix.clone(),
            timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
            on_unavailable: cfg.on_unavailable,
        });
        metrics::gauge!("xgate_limits_redis_up").set(0.0);
        me.clone().reconnect();
        Ok(me)
    }

    /// Whether the last attempt to talk to Redis worked.
    pub fn is_up(&self) -> bool {
        self.conn.load().is_some()
    }

    /// Wait (bounded) until the connection is up; for start-up and tests.
    pub async fn wait_up(&self, within: Duration) -> bool {
        let t0 = tokio::time::Instant::now();
        while !self.is_up() {
            if t0.elapsed() >= within {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Decide one call: every bucket and the quota in one atomic round trip.
    pub async fn decide(
        &self,
        buckets: &[Bucket],
        quota: Option<&DayQuota>,
    ) -> Result<Verdict, Unreachable> {
        let Some(conn) = self.conn.load_full() else {
            return Err(self.fallback("down"));
        };
        let mut con = MultiplexedConnection::clone(&conn);
        let mut inv = self.script.prepare_invoke();
        for b in buckets {
            inv.key(format!("{}:{}", self.prefix, b.key));
        }
        let (ck, rk) = match quota {
            Some(q) => (
                format!("{}:q:{}:{}:calls", self.prefix, q.grant, q.day),
                format!("{}:q:{}:{}:rows", self.prefix, q.grant, q.day),
            ),
            None => (
                format!("{}:q:none", self.prefix),
                format!("{}:q:none", self.prefix),
            ),
        };
        inv.key(ck).key(rk);
        inv.arg(buckets.len());
        for b in buckets {
            let interval = 1e6 / b.rate.per_second.max(1e-6);
            let tolerance = interval * f64::from(b.rate.burst.max(1) - 1);
            inv.arg(interval.round() as i64)
                .arg(tolerance.round() as i64)
                .arg(i64::try_from(b.longest_wait.as_micros()).unwrap_or(i64::MAX));
        }
        let limit = |v: Option<u64>| v.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        inv.arg(limit(quota.and_then(|q| q.calls)))
            .arg(limit(quota.and_then(|q| q.rows)))
            .arg(quota.map_or(0, |q| q.left.as_secs() + 3600));
        let answer: Result<Result<(i64, i64, i64), redis::RedisError>, _> =
            tokio::time::timeout(self.timeout, inv.invoke_async(&mut con)).await;
        let (code, which, micros) = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(self.unanswered(&conn, Some(&e))),
            Err(_) => return Err(self.unanswered(&conn, None)),
        };
        let wait = Duration::from_micros(micros.max(0) as u64);
        Ok(match code {
            0 => Verdict::Admit(wait),
            1 => {
                let b = usize::try_from(which - 1)
                    .ok()
                    .and_then(|i| buckets.get(i))
                    .ok_or(Unreachable)?;
                Verdict::Refuse(over_rate(b, wait.max(Duration::from_millis(1))))
            }
            _ => {
                let q = quota.ok_or(Unreachable)?;
                let (what, n) = if which == 1 {
                    ("calls", q.calls)
                } else {
                    ("rows", q.rows)
                };
                Verdict::Refuse(super::quota_exhausted(
                    &q.grant,
                    what,
                    n.unwrap_or(0),
                    q.left,
                ))
            }
        })
    }

    /// Take a place with `provider` among `max` shared by every replica, waiting at most
    /// `wait` for one: `Ok(Some(lease))` (held until dropped), `Ok(None)` (still full),
    /// `Err(Unreachable)` (Redis cannot say: `on_unavailable` decides).
    pub async fn take_place(
        self: &Arc<Self>,
        provider: &str,
        max: u32,
        lease: Duration,
        wait: Duration,
        call: &str,
    ) -> Result<Option<Lease>, Unreachable> {
        let key = format!("{}:f:{provider}", self.prefix);
        let member = format!("{call}:{}", rand::random::<u64>());
        let until = tokio::time::Instant::now() + wait;
        loop {
            let Some(conn) = self.conn.load_full() else {
                return Err(self.fallback("down"));
            };
            let mut con = MultiplexedConnection::clone(&conn);
            let mut inv = self.inflight.prepare_invoke();
            inv.key(&key)
                .arg(max)
                .arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX))
                .arg(&member);
            let answer: Result<Result<i64, redis::RedisError>, _> =
                tokio::time::timeout(self.timeout, inv.invoke_async(&mut con)).await;
            match answer {
                Ok(Ok(1)) => {
                    return Ok(Some(Lease {
                        shared: self.clone(),
                        key,
                        member,
                    }));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(self.unanswered(&conn, Some(&e))),
                Err(_) => return Err(self.unanswered(&conn, None)),
            }
            if tokio::time::Instant::now() >= until {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(5).min(until - tokio::time::Instant::now()))
                .await;
        }
    }

    /// Count rows delivered under a grant today (after the call; not on the caller's path).
    pub fn add_rows(self: &Arc<Self>, grant: &str, day: i64, left: Duration, rows: u64) {
        let Some(conn) = self.conn.load_full() else {
            return;
        };
        let key = format!("{}:q:{grant}:{day}:rows", self.prefix);
        let me = self.clone();
        tokio::spawn(async move {
            let mut con = MultiplexedConnection::clone(&conn);
            let mut pipe = redis::pipe();
            pipe.atomic()
                .incr(&key, rows)
                .ignore()
                .expire(
                    &key,
                    i64::try_from(left.as_secs() + 3600).unwrap_or(i64::MAX),
                )
                .ignore();
            match tokio::time::timeout(me.timeout, pipe.query_async::<()>(&mut con)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => me.broken(&conn, &e.to_string()),
                Err(_) => me.broken(&conn, "no answer within limits.shared.timeout_ms"),
            }
        });
    }

    /// Count a decision Redis could not make, and say so.
    fn fallback(&self, why: &'static str) -> Unreachable {
        let mode = match self.on_unavailable {
            OnUnavailable::FailOpen => "fail-open",
            OnUnavailable::FailClosed => "fail-closed",
        };
        metrics::counter!("xgate_limits_redis_fallbacks_total", "why" => why, "mode" => mode)
            .increment(1);
        Unreachable
    }

    /// The connection `conn` failed: drop it (once) and reconnect in the background.
    /// Redis answered with an error (`Some`) or not within the timeout (`None`): drop the
    /// connection and fall back as configured.
    fn unanswered(
        &self,
        conn: &Arc<MultiplexedConnection>,
        error: Option<&redis::RedisError>,
    ) -> Unreachable {
        match error {
            Some(e) => {
                self.broken(conn, &e.to_string());
                self.fallback("error")
            }
            None => {
                self.broken(conn, "no answer within limits.shared.timeout_ms");
                self.fallback("timeout")
            }
        }
    }

    fn broken(&self, conn: &Arc<MultiplexedConnection>, why: &str) {
        let current = self.conn.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            self.conn.store(None);
            metrics::gauge!("xgate_limits_redis_up").set(0.0);
            tracing::warn!(
                error = %why,
                on_unavailable = ?self.on_unavailable,
                "shared limits: Redis unreachable; deciding calls by on_unavailable until it is back"
            );
        }
    }

    /// Start the background reconnection loop, unless one runs already.
    fn reconnect(self: Arc<Self>) {
        if self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            let mut attempts = 0u32;
            loop {
                let Some(me) = weak.upgrade() else { return };
                if me.conn.load().is_none() {
                    let cfg = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(Duration::from_secs(1)))
                        .set_response_timeout(Some(Duration::from_secs(2)));
                    match me
                        .client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await
                    {
                        Ok(mut c) => {
                            // Load the script now, so the first decision is one EVALSHA.
                            let loaded: Result<String, _> =
                                me.script.prepare_invoke().load_async(&mut c).await;
                            match loaded {
                                Ok(_) => {
                                    me.conn.store(Some(Arc::new(c)));
                                    metrics::gauge!("xgate_limits_redis_up").set(1.0);
                                    tracing::info!(attempts, "shared limits: connected to Redis");
                                    backoff = Duration::from_millis(50);
                                    attempts = 0;
                                }
                                Err(e) => {
                                    attempts += 1;
                                    if attempts == 1 {
                                        tracing::warn!(error = %e, "shared limits: Redis refused the limits script");
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            attempts += 1;
                            if attempts == 1 || attempts.is_power_of_two() {
                                tracing::warn!(error = %e, attempts, "shared limits: cannot connect to Redis; retrying");
                            }
                        }
                    }
                }
                let pause = if me.conn.load().is_some() {
                    Duration::from_millis(100)
                } else {
                    backoff
                };
                drop(me);
                tokio::time::sleep(pause).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
    }
}

/// A place with a provider shared by every replica; given back when dropped.
pub struct Lease {
    shared: Arc<SharedLimits>,
    key: String,
    member: String,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (key, member) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.member),
        );
        let shared = self.shared.clone();
        // Outside a runtime (process exit) the lease simply expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let Some(conn) = shared.conn.load_full() else {
                    return;
                };
                let mut con = MultiplexedConnection::clone(&conn);
                let zrem = redis::cmd("ZREM").arg(&key).arg(&member).to_owned();
                let _ =
                    tokio::time::timeout(shared.timeout, zrem.query_async::<i64>(&mut con)).await;
            });
        }
    }
}

/// The refusal for a rate bucket that is full.
fn over_rate(b: &Bucket, wait: Duration) -> Reject {
    let r = b.rate;
    match &b.kind {
        BucketKind::Consumer(dept) => super::consumer_over(dept, r, wait),
        BucketKind::Grant { rule, dataset } => super::grant_over(rule, dataset, r, wait),
        BucketKind::Provider(p) => {
            super::provider::saturated(p, super::provider::Limit::Rate, wait)
        }
    }
}

/// The refusal when Redis is down and the gateway is `fail-closed`.
pub fn unavailable() -> Reject {
    Reject::new(
        Reason::LimitsUnavailable,
        "the gateway cannot check the shared rate limits right now; try again shortly",
    )
    .with_retry_after(Duration::from_secs(1))
}
