//! What the audit trail costs a call: the real gateway (`xgate demo`, bench/release build) driven
//! open-loop at a fixed rate with audit `async` and then `sync` (fsync before every response,
//! group commit), in one run. Prints achieved rate, latency and the gateway's CPU per call.
//!
//! `cargo bench --bench audit` (rate and duration: XGATE_BENCH_RATE, XGATE_BENCH_SECS).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// utime + stime of a process, in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks * 1_000_000 / 100
}

struct Run {
    mode: &'static str,
    sent: u64,
    ok: u64,
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_call_us: f64,
}

async fn run(mode: &'static str, rate: u64, secs: u64, repo: &Path) -> Run {
    let work = tempfile::tempdir().unwrap();
    let (ps, ms) = (free_port(), free_port());
    let policy = std::fs::read_to_string(repo.join("deploy/dev/policy.yaml"))
        .unwrap()
        .replace("127.0.0.1:8444", &format!("127.0.0.1:{ps}"))
        .replace("127.0.0.1:8445", &format!("127.0.0.1:{ms}"))
        .replace(
            "{ per_second: 50, burst: 100 }",
            "{ per_second: 1000000, burst: 1000000 }",
        );
    std::fs::write(work.path().join("policy.yaml"), policy).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--audit-mode",
            mode,
            "--certs",
        ])
        .arg(repo.join("certs-dev"))
        .arg("--policy")
        .arg(work.path().join("policy.yaml"))
        .arg("--audit-dir")
        .arg(work.path().join("audit"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the xgate binary built for this bench");
    let pid = child.id();
    // Keep reading the demo's stdout (it prints a banner after the address line).
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("xgate demo listening on ") {
                let _ = tx.send(a.to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the demo did not start");
    let c = repo.join("certs-dev");
    let (cert, key, token) = xgate::dev::client::dev_identity(&c, "civil-affairs", None).unwrap();
    let ca = std::fs::read(c.join("ca.pem")).unwrap();
    let mut clients = Vec::new();
    for _ in 0..8 {
        let ch =
            xgate::dev::client::connect(&format!("https://{addr}"), &ca, &cert, &key, "localhost")
                .await
                .unwrap();
        clients.push(xgate::pb::data_exchange_client::DataExchangeClient::new(ch));
    }
    let req = xgate::dev::client::query_request(
        "hukou.person_basic",
        &[],
        &["region_code=330106".to_owned()],
        "subsidy-eligibility",
        5,
        "",
        &Default::default(),
    )
    .unwrap();
    // Warm up, then measure.
    for c in &mut clients {
        c.query(xgate::dev::client::with_token(req.clone(), &token))
            .await
            .unwrap();
    }
    let lat = Arc::new(Mutex::new(Vec::with_capacity((rate * secs) as usize)));
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cpu0 = cpu_us(pid);
    let start = Instant::now();
    let period = Duration::from_nanos(1_000_000_000 / rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    let total = rate * secs;
    for i in 0..total {
        tick.tick().await;
        // Latency from the scheduled send time: queueing is not hidden.
        let scheduled = start + period * (i as u32);
        let mut c = clients[(i % 8) as usize].clone();
        let (r, t, lat, ok) = (req.clone(), token.clone(), lat.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            if c.query(xgate::dev::client::with_token(r, &t)).await.is_ok() {
                ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                lat.lock().unwrap().push(scheduled.elapsed());
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    let cpu = cpu_us(pid) - cpu0;
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();
    // What was measured is what was meant: every call answered, and recorded (the warm-up
    // calls too) in a trail that verifies.
    let ok_n = ok.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(ok_n, total, "{mode}: every call answered OK");
    let recs = xgate::audit::read_all(&work.path().join("audit")).unwrap();
    assert_eq!(recs.len() as u64, total + 8, "{mode}: one record per call");
    let mut l = lat.lock().unwrap().clone();
    l.sort();
    let ok = ok.load(std::sync::atomic::Ordering::Relaxed);
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Run {
        mode,
        sent: total,
        ok,
        rate: ok as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        cpu_per_call_us: cpu as f64 / ok.max(1) as f64,
    }
}

fn main() {
    // Without `--bench` (`cargo test --all-targets`): a quick pass (100 calls/s for 1 s), its
    // checks included.
    let quick = !std::env::args().any(|a| a == "--bench");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rate: u64 = std::env::var("XGATE_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 100 } else { 2000 });
    let secs: u64 = std::env::var("XGATE_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 10 });
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs: Vec<Run> = ["async", "sync"]
        .iter()
        .map(|m| rt.block_on(run(m, rate, secs, repo)))
        .collect();
    println!(
        "audit cost at {rate} calls/s for {secs} s (gateway + sample providers in one process):"
    );
    println!(
        "{:<6} {:>8} {:>8} {:>10} {:>10} {:>10} {:>16}",
        "mode", "sent", "ok", "calls/s", "p50 ms", "p99 ms", "CPU µs/call"
    );
    for r in &runs {
        println!(
            "{:<6} {:>8} {:>8} {:>10.0} {:>10.2} {:>10.2} {:>16.0}",
            r.mode,
            r.sent,
            r.ok,
            r.rate,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.cpu_per_call_us
        );
    }
    println!(
        "sync / async CPU per call: {:.2}",
        runs[1].cpu_per_call_us / runs[0].cpu_per_call_us
    );
}
