//! Limits shared by replicas through a real Redis (`redis-server`, started by these tests on
//! a free port; `.ci/run` installs it): two real gateway processes hold one combined rate,
//! daily quotas count across replicas and reset with the day, Redis dying mid-run follows the
//! configured failure mode and recovery needs no restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use tonic::Code;
use tonic_types::StatusExt;
use xgate::{
    dev::provider::Behaviour,
    limits::shared::{
        Bucket, BucketKind, DayQuota, OnUnavailable, SharedConfig, SharedLimits, Verdict,
    },
    policy::RateLimit,
};

/// A real `redis-server` on a free loopback port, killed on drop.
struct Redis {
    port: u16,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
            _dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        r
    }

    /// (Re)start on the same port, with an empty data set.
    fn restart(&mut self) {
        let bin = std::env::var("XGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = Command::new(&bin)
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(self._dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `{bin}` ({e}): these tests need redis-server; `.ci/run` installs it (apt-get install redis-server)")
            });
        self.child = Some(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn config(&self, on_unavailable: OnUnavailable) -> SharedConfig {
        SharedConfig {
            redis_url: self.url(),
            password_file: None,
            key_prefix: "xgate-test".into(),
            on_unavailable,
            timeout_ms: 200,
        }
    }

    /// A harness config hook that shares the limits through this Redis.
    fn hook(&self, on_unavailable: OnUnavailable) -> ConfigHook {
        let shared = self.config(on_unavailable);
        Arc::new(move |cfg| cfg.limits.shared = Some(shared.clone()))
    }

    /// Whether Redis holds `key` (read with a plain RESP request, no xgate code involved).
    fn exists(&self, key: &str) -> bool {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "*2\r\n$6\r\nEXISTS\r\n${}\r\n{key}\r\n", key.len()).unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).unwrap();
        &buf[..n] == b":1\r\n"
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Start `xgate serve` with `config` (YAML) in `dir`; returns once it listens.
fn serve(dir: &Path, name: &str, config: &str) -> Served {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).unwrap();
    let served = Served::spawn(&path, &[]);
    served.wait_for("xgate listening");
    served
}

fn gateway_config(port: u16, audit: &Path, redis_url: &str) -> String {
    serve_yaml(
        port,
        &audit.display().to_string(),
        &format!(
            r#"limits:
  default_page_size: 10
  max_page_size: 100
  max_message_bytes: 4194304
  max_filter_terms: 100
  shared: {{ redis_url: "{redis_url}", key_prefix: xgate-e2e }}
log: {{ format: json, level: info }}"#
        ),
    )
}

/// Two real gateway processes sharing one Redis admit, together, what one grant allows:
/// its burst plus its rate over the window, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateway_processes_hold_one_combined_rate_through_redis() {
    let redis = Redis::start();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ports, _provs) = start_providers(&Behaviour::default(), stop_rx).await;
    let (rate, burst) = (40.0, 10u32);
    let policy = policy_with_ports(ports["public-security"], ports["market-supervision"]).replace(
        "rate_limit: { per_second: 50, burst: 100 }",
        &format!("rate_limit: {{ per_second: {rate}, burst: {burst} }}"),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), policy).unwrap();
    let (pa, pb) = (free_port(), free_port());
    // Redis decides every call here: on a loaded machine a round trip can pass the default
    // 50 ms, and the fail-open fallback would then admit on a replica's own bucket, which is
    // what the fallback tests below measure, not this one.
    let config = |port: u16, audit: &str| {
        gateway_config(port, &dir.path().join(audit), &redis.url()).replace(
            "key_prefix: xgate-e2e }",
            "key_prefix: xgate-e2e, timeout_ms: 5000 }",
        )
    };
    let _a = serve(dir.path(), "a", &config(pa, "audit-a"));
    let _b = serve(dir.path(), "b", &config(pb, "audit-b"));

    let t = token("civil-affairs");
    let mut clients = Vec::new();
    for port in [pa, pb] {
        let ch = dept_channel(&format!("https://127.0.0.1:{port}"), "civil-affairs").await;
        clients.push(xgate::pb::data_exchange_client::DataExchangeClient::new(ch));
    }
    // Warm both connections (TLS, token cache) with a call on another dataset, so the window
    // measures the limit, not start-up.
    for c in &mut clients {
        c.query(req(
            query("market.company_registry", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .ok();
    }

    let window = Duration::from_secs(4);
    let ok = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let limited = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let gw = i % 2;
        let mut c = clients[gw].clone();
        let (t, ok, limited) = (t.clone(), ok[gw].clone(), limited.clone());
        tasks.push(tokio::spawn(async move {
            while t0.elapsed() < window {
                match c
                    .query(req(
                        query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                        &t,
                    ))
                    .await
                {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(st) => {
                        assert_reject(&st, Code::ResourceExhausted, "RATE_LIMITED");
                        limited.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (a, b) = (ok[0].load(Ordering::Relaxed), ok[1].load(Ordering::Relaxed));
    let total = (a + b) as f64;
    let expected = f64::from(burst) + rate * elapsed;
    eprintln!(
        "admitted {total} (a {a}, b {b}), refused {}, expected {expected:.1} over {elapsed:.2} s",
        limited.load(Ordering::Relaxed)
    );
    assert!(a > 0 && b > 0, "both replicas admitted calls: a {a}, b {b}");
    assert!(
        limited.load(Ordering::Relaxed) as f64 > total,
        "the callers pushed well past the limit"
    );
    // The limiter never admits more than its burst plus its rate over the time it decided
    // in (+1 for the call in flight at each edge); and callers that pushed past it were
    // admitted at close to its rate (a loose floor: a loaded machine delays calls, never
    // admits extra).
    assert!(
        total <= expected + 1.0,
        "combined admitted {total}, more than the limit allows ({expected:.1})"
    );
    assert!(
        total >= 0.8 * expected,
        "combined admitted {total}, far below the limit ({expected:.1}): the callers were not limited by it"
    );
    let _ = stop_tx.send(true);
}

/// Redis killed mid-run: `fail-open` falls back to this replica's own limits, then Redis
/// decides again once it is back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dies_fail_open_uses_local_limits_and_recovers() {
    let mut redis = Redis::start();
    let shared = redis.hook(OnUnavailable::FailOpen);
    let h = Harness::start(Opts {
        // Three calls, then one per 100 s: a refusal in this test means "this bucket is spent".
        edit_policy: Some(|p| {
            p.replace(
                "rate_limit: { per_second: 50, burst: 100 }",
                "rate_limit: { per_second: 0.01, burst: 3 }",
            )
        }),
        config: Some(shared),
        ..Opts::default()
    })
    .await;
    let mut c = h.data("civil-affairs").await;
    let t = token("civil-affairs");
    let ask = || {
        req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        )
    };
    // Redis decides: three, then refused.
    for _ in 0..3 {
        c.query(ask()).await.unwrap();
    }
    let st = c.query(ask()).await.unwrap_err();
    assert_reject(&st, Code::ResourceExhausted, "RATE_LIMITED");
    assert!(redis.exists("xgate-test:r:g:ca-hukou-subsidy"));

    // Redis dies: the local limiter (untouched so far) decides: three more, then refused.
    redis.kill();
    for i in 0..3 {
        c.query(ask())
            .await
            .unwrap_or_else(|e| panic!("fail-open call {i}: {e:?}"));
    }
    let st = c.query(ask()).await.unwrap_err();
    assert_reject(&st, Code::ResourceExhausted, "RATE_LIMITED");

    // Redis is back (empty): within a few seconds the gateway reconnects by itself and
    // Redis's fresh bucket admits again, where the spent local one would refuse.
    redis.restart();
    let t0 = Instant::now();
    loop {
        match c.query(ask()).await {
            Ok(_) => break,
            Err(st) => assert_reject(&st, Code::ResourceExhausted, "RATE_LIMITED"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the gateway did not go back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(redis.exists("xgate-test:r:g:ca-hukou-subsidy"));
}

/// `fail-closed`: with Redis gone, calls are refused UNAVAILABLE with a reason and a retry
/// hint (and audited); they flow again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dies_fail_closed_refuses_then_recovers() {
    let mut redis = Redis::start();
    let shared = redis.hook(OnUnavailable::FailClosed);
    let mut h = Harness::start(Opts {
        config: Some(shared),
        ..Opts::default()
    })
    .await;
    let mut c = h.data("civil-affairs").await;
    let t = token("civil-affairs");
    let ask = || {
        req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        )
    };
    c.query(ask()).await.unwrap();
    let before = h.provider_calls();
    redis.kill();
    let st = c.query(ask()).await.unwrap_err();
    assert_reject(&st, Code::Unavailable, "LIMITS_UNAVAILABLE");
    assert!(st.get_error_details().retry_info().is_some());
    assert_eq!(h.provider_calls(), before, "nothing reached the provider");
    redis.restart();
    let t0 = Instant::now();
    while let Err(st) = c.query(ask()).await {
        assert_reject(&st, Code::Unavailable, "LIMITS_UNAVAILABLE");
        assert!(t0.elapsed() < Duration::from_secs(10), "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recs = h.stop().await;
    assert!(
        recs.iter()
            .any(|r| r["reason"] == "LIMITS_UNAVAILABLE" && r["grpc_status"] == "UNAVAILABLE"),
        "the refusal is in the audit trail"
    );
}

/// A daily quota counts calls made through either replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_quota_counts_calls_across_replicas() {
    let redis = Redis::start();
    let shared = redis.hook(OnUnavailable::FailOpen);
    let opts = Opts {
        edit_policy: Some(|p| {
            p.replace(
                "approval_ref: ZJ-DSB-2026-014",
                "approval_ref: ZJ-DSB-2026-014\n    daily_quota: { calls: 3 }",
            )
        }),
        config: Some(shared),
        ..Opts::default()
    };
    let a = Harness::start(opts.clone()).await;
    let b = Harness::start(opts).await;
    let t = token("civil-affairs");
    let ask = || {
        req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        )
    };
    let (mut ca, mut cb) = (a.data("civil-affairs").await, b.data("civil-affairs").await);
    ca.query(ask()).await.unwrap();
    cb.query(ask()).await.unwrap();
    ca.query(ask()).await.unwrap();
    let st = cb.query(ask()).await.unwrap_err();
    assert_reject(&st, Code::ResourceExhausted, "QUOTA_EXHAUSTED");
    let d = st.get_error_details();
    let qf = d.quota_failure().expect("QuotaFailure");
    assert_eq!(qf.violations[0].subject, "grant:ca-hukou-subsidy");
    assert!(d.retry_info().is_some(), "retry at midnight");
}

/// A provider's `max_in_flight` holds across replicas: two gateways in front of one slow
/// provider with `max_in_flight: 2` never have more than two calls with it together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_in_flight_cap_holds_across_replicas() {
    let redis = Redis::start();
    let shared = redis.hook(OnUnavailable::FailOpen);
    let opts = Opts {
        behaviour: Behaviour {
            delay: Duration::from_millis(1_500),
            ..Behaviour::default()
        },
        edit_policy: Some(|p| {
            p.replace(
                "tls_name: public-security.provider.xgate.internal }",
                "tls_name: public-security.provider.xgate.internal, max_in_flight: 2 }",
            )
        }),
        config: Some(shared),
        ..Opts::default()
    };
    let a = Harness::start(opts.clone()).await;
    let b = Harness::start(opts).await;
    // Both gateways in front of a's providers.
    std::fs::copy(&a.policy_path, &b.policy_path).unwrap();
    b.reloader.reload("test").unwrap();
    let t = token("civil-affairs");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(a.data("civil-affairs").await);
        clients.push(b.data("civil-affairs").await);
    }
    let (ok, saturated) = saturate(clients, &t, "hukou.person_basic", "subsidy-eligibility").await;
    let seen = a.ps.stats.max_in_flight.load(Ordering::SeqCst);
    assert_eq!(seen, 2, "the provider saw {seen} calls at once");
    // Two with the provider for 1.5 s; the six others wait at most 100 ms, then are refused.
    assert_eq!((ok, saturated), (2, 6));
    assert_eq!(a.ps.stats.calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        b.ps.stats.calls.load(Ordering::SeqCst),
        0,
        "b's own provider unused"
    );
    // Places are given back: a call later goes through.
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.data("civil-affairs")
        .await
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap();
}

fn bucket(kind: BucketKind, key: &str, per_second: f64, burst: u32, wait_ms: u64) -> Bucket {
    Bucket {
        kind,
        key: key.into(),
        rate: RateLimit { per_second, burst },
        longest_wait: Duration::from_millis(wait_ms),
    }
}

/// The decision itself against a real Redis: atomic (a refused call takes from no bucket),
/// names the limit that refused, waits (bounded) for a provider, and a quota day ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_decides_every_limit_atomically() {
    let redis = Redis::start();
    let s = SharedLimits::new(&redis.config(OnUnavailable::FailOpen)).unwrap();
    assert!(s.wait_up(Duration::from_secs(5)).await, "connects");
    let consumer = bucket(
        BucketKind::Consumer("health".into()),
        "r:c:health",
        0.01,
        5,
        0,
    );
    let grant = bucket(
        BucketKind::Grant {
            rule: "grant:g1".into(),
            dataset: "d".into(),
        },
        "r:g:g1",
        0.01,
        2,
        0,
    );
    let admit = |v: Verdict| match v {
        Verdict::Admit(w) => w,
        Verdict::Refuse(r) => panic!("refused: {r:?}"),
    };
    let refuse = |v: Verdict| match v {
        Verdict::Admit(_) => panic!("admitted"),
        Verdict::Refuse(r) => r,
    };
    let both = [consumer.clone(), grant.clone()];
    admit(s.decide(&both, None).await.unwrap());
    admit(s.decide(&both, None).await.unwrap());
    let r = refuse(s.decide(&both, None).await.unwrap());
    assert_eq!(r.reason, xgate::error::Reason::RateLimited);
    assert_eq!(r.rule.as_deref(), Some("grant:g1"), "the grant refused");
    assert!(r.retry_after.unwrap() > Duration::from_secs(50));
    // The refused call took nothing from the consumer bucket: three more fit there.
    for _ in 0..3 {
        admit(
            s.decide(std::slice::from_ref(&consumer), None)
                .await
                .unwrap(),
        );
    }
    let r = refuse(
        s.decide(std::slice::from_ref(&consumer), None)
            .await
            .unwrap(),
    );
    assert_eq!(r.rule.as_deref(), Some("defaults:per_consumer"));

    // A provider at 2/s with no burst and a 1 s queue: the second call in a row waits what
    // is left of 500 ms since the first (Redis's clock); the third ~1 s; one that would wait
    // past 1 s is refused UNAVAILABLE. (Spaced wide so a loaded machine cannot blur them.)
    let provider = bucket(BucketKind::Provider("p".into()), "r:p:p", 2.0, 1, 1_000);
    let p = std::slice::from_ref(&provider);
    let t0 = Instant::now();
    assert_eq!(admit(s.decide(p, None).await.unwrap()), Duration::ZERO);
    let w = admit(s.decide(p, None).await.unwrap());
    let gap = t0.elapsed();
    assert!(w <= Duration::from_millis(500), "{w:?}");
    assert!(
        w + gap + Duration::from_millis(1) >= Duration::from_millis(500),
        "waits {w:?} after a gap of {gap:?}: less than what is left of 500 ms"
    );
    admit(s.decide(p, None).await.unwrap());
    let r = refuse(s.decide(p, None).await.unwrap());
    assert_eq!(r.reason, xgate::error::Reason::ProviderSaturated);

    // Quotas: calls counted per local day; the next day starts afresh.
    let day = |day| DayQuota {
        grant: "g2".into(),
        calls: Some(2),
        rows: None,
        day,
        left: Duration::from_secs(60),
    };
    admit(s.decide(&[], Some(&day(20_000))).await.unwrap());
    admit(s.decide(&[], Some(&day(20_000))).await.unwrap());
    let r = refuse(s.decide(&[], Some(&day(20_000))).await.unwrap());
    assert_eq!(r.reason, xgate::error::Reason::QuotaExhausted);
    assert_eq!(r.retry_after, Some(Duration::from_secs(60)));
    admit(s.decide(&[], Some(&day(20_001))).await.unwrap());
    // Rows: counted after delivery; the quota refuses once they reach it.
    let rows = DayQuota {
        grant: "g3".into(),
        calls: None,
        rows: Some(100),
        day: 20_000,
        left: Duration::from_secs(60),
    };
    admit(s.decide(&[], Some(&rows)).await.unwrap());
    s.add_rows("g3", 20_000, Duration::from_secs(60), 100);
    let t0 = Instant::now();
    loop {
        match s.decide(&[], Some(&rows)).await.unwrap() {
            Verdict::Refuse(r) => {
                assert_eq!(r.reason, xgate::error::Reason::QuotaExhausted);
                break;
            }
            Verdict::Admit(_) => {
                assert!(t0.elapsed() < Duration::from_secs(2), "rows never counted");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Fail-open is visible to operators: with Redis gone, the real binary warns once, sets
/// `xgate_limits_redis_up` to 0 and counts each call decided locally in
/// `xgate_limits_redis_fallbacks_total{mode="fail-open"}`; back to 1 when Redis returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_is_counted_and_warned_by_the_real_binary() {
    let mut redis = Redis::start();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (ports, _provs) = start_providers(&Behaviour::default(), stop_rx).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        policy_with_ports(ports["public-security"], ports["market-supervision"]),
    )
    .unwrap();
    let (port, admin) = (free_port(), free_port());
    let cfg = gateway_config(port, &dir.path().join("audit"), &redis.url()).replace(
        "key_prefix: xgate-e2e }",
        "key_prefix: xgate-e2e, on_unavailable: fail-open }",
    ) + &format!("\nadmin_listen: 127.0.0.1:{admin}\n");
    let served = serve(dir.path(), "a", &cfg);
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let metrics = async || http(admin, "GET", "/metrics").await.1;
    let fallbacks = |m: &str| -> f64 {
        m.lines()
            .filter(|l| {
                l.starts_with("xgate_limits_redis_fallbacks_total{")
                    && l.contains("mode=\"fail-open\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let up = |m: &str| -> Option<f64> {
        m.lines().find_map(|l| {
            l.strip_prefix("xgate_limits_redis_up ")?
                .trim()
                .parse()
                .ok()
        })
    };
    let mut c = xgate::pb::data_exchange_client::DataExchangeClient::new(
        dept_channel(&format!("https://127.0.0.1:{port}"), "civil-affairs").await,
    );
    let t = token("civil-affairs");
    let ask = || {
        req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        )
    };
    c.query(ask()).await.unwrap();
    let m = metrics().await;
    assert_eq!((up(&m), fallbacks(&m)), (Some(1.0), 0.0), "{m}");
    redis.kill();
    for i in 0..3 {
        c.query(ask())
            .await
            .unwrap_or_else(|e| panic!("fail-open call {i}: {e:?}"));
    }
    let m = metrics().await;
    assert_eq!(up(&m), Some(0.0), "{m}");
    assert_eq!(
        fallbacks(&m),
        3.0,
        "each call decided locally is counted: {m}"
    );
    let warned = served
        .logs()
        .iter()
        .filter(|l| l.contains("Redis unreachable") && l.contains("WARN"))
        .count();
    assert_eq!(
        warned,
        1,
        "one warning when Redis went away:\n{}",
        served.logs().join("\n")
    );
    redis.restart();
    let t0 = Instant::now();
    while up(&metrics().await) != Some(1.0) {
        assert!(t0.elapsed() < Duration::from_secs(15), "never back up");
        let _ = c.query(ask()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(true);
}
