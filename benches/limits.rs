//! What a limit decision costs: the local back end (governor, in process) and the shared one
//! (one Lua round trip to a real Redis on loopback), under concurrency.
//!
//! `cargo bench --bench limits` starts its own `redis-server` on a free port and prints:
//! - local: ns per `RateLimits::check` (consumer rate + grant rate, never refusing);
//! - Redis: decisions/s and p50/p99 latency at 1, 8, 64 and 256 concurrent callers on one
//!   multiplexed connection, beside a bare `PING` on the same connection at the same
//!   concurrency (the floor: what the round trip alone costs), and their ratio.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    hint::black_box,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use xgate::{
    limits::{
        RateLimits,
        shared::{Bucket, BucketKind, OnUnavailable, SharedConfig, SharedLimits},
    },
    policy::{Caller, Policy, RateLimit, Request, evaluate},
};

const POLICY: &str = "defaults: { rate_limit: { per_second: 1000000000, burst: 1000000 }, per_consumer: { per_second: 1000000000, burst: 1000000 } }
departments:
  - { id: a, name: A, level: province, region: \"330000\" }
  - { id: b, name: B, level: province, region: \"330000\" }
providers:
  - { id: p, endpoint: \"https://127.0.0.1:1\" }
datasets:
  - id: ds
    title: DS
    owner: b
    provider: p
    share_type: conditional
    subject_key: f
    fields:
      - { name: f, type: string, sensitivity: public }
grants:
  - { id: g, consumer: a, dataset: ds, fields: [f], purposes: [x] }
";

fn local_ns(n: u32) -> f64 {
    let policy = Policy::from_yaml(POLICY.as_bytes()).expect("valid policy");
    let limits = RateLimits::for_policy(&policy, None);
    let fields = vec!["f".to_owned()];
    let permit = evaluate(
        &policy,
        Caller {
            dept: "a",
            system: "s",
            token_purposes: None,
            token_bound: false,
        },
        Request {
            dataset: "ds",
            fields: &fields,
            filter: &[],
            purpose: "x",
            now: None,
        },
    )
    .expect("allowed");
    let mut best = f64::MAX;
    assert!(
        limits.check("a", "ds", &permit).is_ok(),
        "the decision timed is an admit"
    );
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..n {
            black_box(limits.check(black_box("a"), black_box("ds"), black_box(&permit))).ok();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(n));
    }
    best
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Run `op` from `conc` tasks for `secs`: (ops/s, p50, p99).
async fn load<F, Fut>(conc: usize, secs: f64, op: F) -> (f64, Duration, Duration)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let t0 = Instant::now();
    let until = Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while t0.elapsed() < until {
                let s = Instant::now();
                op().await;
                lat.push(s.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let el = t0.elapsed().as_secs_f64();
    all.sort();
    (all.len() as f64 / el, pct(&all, 0.5), pct(&all, 0.99))
}

fn main() {
    // Without `--bench` (`cargo test --all-targets`): a quick pass, its checks included.
    let quick = !std::env::args().any(|a| a == "--bench");
    let (n, secs, concs): (u32, f64, &[usize]) = if quick {
        (1_000, 0.2, &[1, 8])
    } else {
        (1_000_000, 3.0, &[1, 8, 64, 256])
    };
    println!(
        "local decision (consumer + grant rate, governor): {:.0} ns",
        local_ns(n)
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = Command::new("redis-server")
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = format!("redis://127.0.0.1:{port}/0");
        let t0 = Instant::now();
        let shared = loop {
            let s = SharedLimits::new(&SharedConfig {
                redis_url: url.clone(),
                password_file: None,
                key_prefix: "bench".into(),
                on_unavailable: OnUnavailable::FailOpen,
                timeout_ms: 1000,
            })
            .unwrap();
            if s.wait_up(Duration::from_secs(2)).await {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis did not start"
            );
        };
        let mut con = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let fast = RateLimit {
            per_second: 1e9,
            burst: 1_000_000,
        };
        let buckets = Arc::new(vec![
            Bucket {
                kind: BucketKind::Consumer("a".into()),
                key: "r:c:a".into(),
                rate: fast,
                longest_wait: Duration::ZERO,
            },
            Bucket {
                kind: BucketKind::Grant {
                    rule: "grant:g".into(),
                    dataset: "ds".into(),
                },
                key: "r:g:g".into(),
                rate: fast,
                longest_wait: Duration::ZERO,
            },
        ]);
        println!(
            "{:>5} | {:>12} {:>9} {:>9} | {:>12} {:>9} {:>9} | {:>5}",
            "conc", "decisions/s", "p50 µs", "p99 µs", "PING/s", "p50 µs", "p99 µs", "ratio"
        );
        for &conc in concs {
            let (s, b) = (shared.clone(), buckets.clone());
            let d = load(conc, secs, move || {
                let (s, b) = (s.clone(), b.clone());
                async move {
                    s.decide(&b, None).await.expect("redis answers");
                }
            })
            .await;
            let c = con.clone();
            let p = load(conc, secs, move || {
                let mut c = c.clone();
                async move {
                    let _: String = redis::cmd("PING").query_async(&mut c).await.unwrap();
                }
            })
            .await;
            println!(
                "{conc:>5} | {:>12.0} {:>9.0} {:>9.0} | {:>12.0} {:>9.0} {:>9.0} | {:>5.2}",
                d.0,
                d.1.as_micros(),
                d.2.as_micros(),
                p.0,
                p.1.as_micros(),
                p.2.as_micros(),
                d.0 / p.0
            );
        }
        // The decisions went to Redis: both buckets are there.
        let n: u32 = redis::cmd("EXISTS")
            .arg("bench:r:c:a")
            .arg("bench:r:g:g")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(n, 2, "the shared buckets exist in Redis");
        let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
    });
    let _ = redis.kill();
    let _ = redis.wait();
}
