//! The baseline for the provider's point-query benchmark (`benches/provider.py`): a minimal
//! tokio-postgres client running the same `SELECT … WHERE key = $1` the provider runs, with a
//! prepared statement, one call at a time, for a while. It prints calls, p50/p99 latency and its
//! own CPU per call as JSON, so the bench can report what gateway + provider add over it.
//!
//! ```text
//! cargo run --release --example pg_point -- "host=127.0.0.1 port=5432 user=postgres" \
//!     "SELECT pid, name FROM bench_people WHERE pid = $1" p0000123 10
//! ```

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc (clock ticks of 1/100 s on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (conn_str, sql, key, secs) = (
        &args[1],
        &args[2],
        &args[3],
        args[4].parse::<u64>().unwrap(),
    );
    let (client, conn) = tokio_postgres::connect(conn_str, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let st = client.prepare(sql).await.expect("prepare");
    // Warm up, then measure.
    for _ in 0..200 {
        client.query(&st, &[key]).await.expect("query");
    }
    let mut lat = Vec::new();
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        let rows = client.query(&st, &[key]).await.expect("query");
        assert!(!rows.is_empty());
        lat.push(t.elapsed());
    }
    let cpu = cpu_seconds() - cpu0;
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "{}",
        serde_json::json!({
            "calls": lat.len(),
            "p50_ms": p(0.50),
            "p99_ms": p(0.99),
            "cpu_us_per_call": cpu * 1e6 / lat.len() as f64,
        })
    );
}
