//! `xgate bench`: a gRPC load generator for the standard interface (and raw payloads for any
//! other method), with mTLS and a bearer token, so users can measure a gateway — this one or
//! another — the way the project's own comparisons do.
//!
//! Two shapes of load:
//! - **closed loop**: N calls in flight; each caller sends its next call when the last ends;
//! - **open loop**: a fixed rate; each call's latency is measured from its *scheduled* send
//!   time, so a server that falls behind shows it in the latency (no coordinated omission).
//!
//! It reports requests, OK, errors by gRPC code, achieved rate, rows received, latency p50 /
//! p90 / p99 / p99.9 / max, and optionally the CPU time and peak RSS of given processes over
//! the run (read from `/proc`).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tonic::{Status, transport::Channel};

use crate::{
    dev::client,
    pb::{
        self, QueryRequest, catalog_client::CatalogClient, data_exchange_client::DataExchangeClient,
    },
};

/// What each call does.
#[derive(Debug, Clone)]
pub enum Call {
    Query(QueryRequest),
    /// Read the whole stream; rows are counted.
    QueryStream(QueryRequest),
    List,
    Describe(pb::DescribeDatasetRequest),
    /// Any unary method: `/package.Service/Method` and the encoded request message.
    Raw {
        path: String,
        body: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// This many calls in flight.
    Closed(usize),
    /// This many calls per second.
    Open(f64),
}

/// One benchmark run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub call: Call,
    pub load: Load,
    pub duration: Duration,
    /// Calls before measuring (not counted).
    pub warmup: Duration,
    /// Bearer tokens, sent in turn, one per call (none: no `authorization` header; one: the
    /// same token every call; many: a different one each call, e.g. a flood of forged ones).
    pub tokens: Vec<String>,
    /// Processes whose CPU time and peak RSS are reported.
    pub watch: Vec<u32>,
    /// Each call's deadline (sent as `grpc-timeout`, and enforced here: a call still
    /// unanswered past it counts as `DEADLINE_EXCEEDED`). `None`: no deadline.
    pub timeout: Option<Duration>,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub load: String,
    pub seconds: f64,
    pub requests: u64,
    pub ok: u64,
    /// gRPC code name -> count (client-side failures to send count as `CLIENT_*`).
    pub errors: BTreeMap<String, u64>,
    /// `CODE REASON` -> count, for refusals that carry an xgate `ErrorInfo` reason.
    pub reasons: BTreeMap<String, u64>,
    pub rate: f64,
    pub rows: u64,
    pub rows_per_second: f64,
    pub latency_us: Percentiles,
    pub processes: Vec<ProcessUse>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessUse {
    pub pid: u32,
    /// utime + stime over the run.
    pub cpu_us: u64,
    /// CPU microseconds per completed request (all requests, OK or not).
    pub cpu_us_per_request: f64,
    /// Peak resident set (VmHWM) at the end of the run.
    pub peak_rss_kib: u64,
}

/// Counters shared by the callers.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    rows: AtomicU64,
    errors: std::sync::Mutex<BTreeMap<String, u64>>,
    reasons: std::sync::Mutex<BTreeMap<String, u64>>,
    latencies: std::sync::Mutex<Vec<u32>>,
}

impl Tally {
    fn record(&self, outcome: Result<u64, Status>, latency: Duration) {
        match outcome {
            Ok(rows) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
                self.rows.fetch_add(rows, Ordering::Relaxed);
            }
            Err(st) => {
                // By code and, for the gateway's refusals, by reason: a bench that measures a
                // rate limit says so (`RESOURCE_EXHAUSTED RATE_LIMITED`).
                use tonic_types::StatusExt;
                let code = crate::audit::code_name(st.code());
                if let Ok(mut e) = self.errors.lock() {
                    *e.entry(code.to_owned()).or_default() += 1;
                }
                if let Some(i) = st.get_error_details().error_info()
                    && let Ok(mut r) = self.reasons.lock()
                {
                    *r.entry(format!("{code} {}", i.reason)).or_default() += 1;
                }
            }
        }
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        if let Ok(mut l) = self.latencies.lock() {
            l.push(us);
        }
    }
}

/// Send one call on `ch` within `timeout`: rows received, or the status.
async fn one(
    ch: &Channel,
    call: &Call,
    token: Option<&str>,
    timeout: Option<Duration>,
) -> Result<u64, Status> {
    match timeout {
        None => send(ch, call, token, None).await,
        Some(d) => {
            let t0 = Instant::now();
            match tokio::time::timeout(d, send(ch, call, token, timeout)).await {
                Err(_) => Err(Status::deadline_exceeded("no answer within the deadline")),
                // tonic's own timer on `grpc-timeout` says CANCELLED ("Timeout expired"):
                // past the deadline, that is the deadline, as other gRPC clients report it.
                Ok(Err(s))
                    if s.code() == tonic::Code::Cancelled && t0.elapsed() >= d.mul_f32(0.9) =>
                {
                    Err(Status::deadline_exceeded("no answer within the deadline"))
                }
                Ok(r) => r,
            }
        }
    }
}

async fn send(
    ch: &Channel,
    call: &Call,
    token: Option<&str>,
    timeout: Option<Duration>,
) -> Result<u64, Status> {
    fn req<T>(body: T, token: Option<&str>, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut r = match token {
            Some(t) => client::with_token(body, t),
            None => tonic::Request::new(body),
        };
        if let Some(d) = timeout {
            r.set_timeout(d);
        }
        r
    }
    match call {
        Call::Query(q) => {
            let r = DataExchangeClient::new(ch.clone())
                .query(req(q.clone(), token, timeout))
                .await?;
            Ok(r.into_inner().rows.len() as u64)
        }
        Call::QueryStream(q) => {
            let mut s = DataExchangeClient::new(ch.clone())
                .query_stream(req(q.clone(), token, timeout))
                .await?
                .into_inner();
            let mut rows = 0;
            while let Some(batch) = s.message().await? {
                rows += batch.rows.len() as u64;
            }
            Ok(rows)
        }
        Call::List => {
            let r = CatalogClient::new(ch.clone())
                .list_datasets(req(pb::ListDatasetsRequest {}, token, timeout))
                .await?;
            Ok(r.into_inner().datasets.len() as u64)
        }
        Call::Describe(d) => {
            CatalogClient::new(ch.clone())
                .describe_dataset(req(d.clone(), token, timeout))
                .await?;
            Ok(1)
        }
        Call::Raw { path, body } => {
            let path = http::uri::PathAndQuery::try_from(path.as_str())
                .map_err(|e| Status::invalid_argument(format!("method path: {e}")))?;
            let mut g = tonic::client::Grpc::new(ch.clone());
            g.ready()
                .await
                .map_err(|e| Status::unavailable(e.to_string()))?;
            g.unary(req(body.clone(), token, timeout), path, client::RawCodec)
                .await?;
            Ok(0)
        }
    }
}

/// The tokens of a run, handed out in turn.
struct Tokens {
    all: Vec<String>,
    next: AtomicU64,
}

impl Tokens {
    fn next(&self) -> Option<&str> {
        match self.all.len() {
            0 => None,
            1 => Some(&self.all[0]),
            n => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % n;
                Some(&self.all[i])
            }
        }
    }
}

/// Run the plan on these channels (one HTTP/2 connection each; calls are spread over them).
pub async fn run(channels: Vec<Channel>, plan: Plan) -> Result<Report, String> {
    if channels.is_empty() {
        return Err("no connections".into());
    }
    let channels = Arc::new(channels);
    let timeout = plan.timeout;
    let call = Arc::new(plan.call);
    let token = Arc::new(Tokens {
        all: plan.tokens,
        next: AtomicU64::new(0),
    });
    // Warm-up: connections, TLS sessions, the gateway's token cache.
    let until = Instant::now() + plan.warmup;
    for ch in channels.iter() {
        let _ = one(ch, &call, token.next(), timeout).await;
    }
    while Instant::now() < until {
        let _ = one(&channels[0], &call, token.next(), timeout).await;
    }

    let tally = Arc::new(Tally::default());
    let before: Vec<(u32, u64)> = plan.watch.iter().map(|p| (*p, cpu_us(*p))).collect();
    let start = Instant::now();
    let end = start + plan.duration;
    let sent = Arc::new(AtomicU64::new(0));
    match plan.load {
        Load::Closed(n) => {
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n.max(1) {
                let (channels, call, token, tally, sent) = (
                    channels.clone(),
                    call.clone(),
                    token.clone(),
                    tally.clone(),
                    sent.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let ch = &channels[i % channels.len()];
                    while Instant::now() < end {
                        let t = Instant::now();
                        sent.fetch_add(1, Ordering::Relaxed);
                        let r = one(ch, &call, token.next(), timeout).await;
                        tally.record(r, t.elapsed());
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        Load::Open(rate) => {
            if !(rate > 0.0 && rate.is_finite()) {
                return Err("--rate must be positive".into());
            }
            let period = Duration::from_secs_f64(1.0 / rate);
            // Bounded: past this many outstanding calls the server is not keeping up and
            // further sends are counted as CLIENT_OVERLOADED rather than queued without end.
            let outstanding = Arc::new(tokio::sync::Semaphore::new(50_000));
            let mut tasks = tokio::task::JoinSet::new();
            let mut i: u32 = 0;
            loop {
                let scheduled = start + period * i;
                if scheduled >= end {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                sent.fetch_add(1, Ordering::Relaxed);
                let Ok(permit) = outstanding.clone().try_acquire_owned() else {
                    tally.record(
                        Err(Status::resource_exhausted("client overloaded")),
                        scheduled.elapsed(),
                    );
                    i += 1;
                    continue;
                };
                let ch = channels[i as usize % channels.len()].clone();
                let (call, token, tally) = (call.clone(), token.clone(), tally.clone());
                tasks.spawn(async move {
                    let r = one(&ch, &call, token.next(), timeout).await;
                    // From the scheduled time: queueing on either side is not hidden.
                    tally.record(r, scheduled.elapsed());
                    drop(permit);
                });
                // Reap finished tasks as we go (bounded memory).
                while tasks.try_join_next().is_some() {}
                i += 1;
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let requests = sent.load(Ordering::Relaxed);
    let processes = before
        .into_iter()
        .map(|(pid, c0)| {
            let cpu = cpu_us(pid).saturating_sub(c0);
            ProcessUse {
                pid,
                cpu_us: cpu,
                cpu_us_per_request: cpu as f64 / requests.max(1) as f64,
                peak_rss_kib: peak_rss_kib(pid),
            }
        })
        .collect();
    let mut lat = tally
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    lat.sort_unstable();
    let pct = |p: f64| -> u64 {
        if lat.is_empty() {
            return 0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        u64::from(lat[i])
    };
    let ok = tally.ok.load(Ordering::Relaxed);
    let rows = tally.rows.load(Ordering::Relaxed);
    Ok(Report {
        load: match plan.load {
            Load::Closed(n) => format!("closed loop, {n} in flight"),
            Load::Open(r) => format!("open loop, {r} calls/s"),
        },
        seconds,
        requests,
        ok,
        errors: tally.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        reasons: tally.reasons.lock().map(|e| e.clone()).unwrap_or_default(),
        rate: requests as f64 / seconds,
        rows,
        rows_per_second: rows as f64 / seconds,
        latency_us: Percentiles {
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            p999: pct(0.999),
            max: lat.last().copied().map(u64::from).unwrap_or(0),
        },
        processes,
    })
}

impl Report {
    /// The report for a terminal.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let ms = |us: u64| us as f64 / 1000.0;
        let _ = writeln!(s, "load        {} for {:.1} s", self.load, self.seconds);
        let _ = writeln!(
            s,
            "requests    {} ({:.0}/s), ok {}, errors {}",
            self.requests,
            self.rate,
            self.ok,
            self.errors.values().sum::<u64>()
        );
        for (code, n) in &self.errors {
            let _ = writeln!(s, "  {code:<20} {n}");
            let prefix = format!("{code} ");
            for (reason, m) in self.reasons.iter().filter(|(r, _)| r.starts_with(&prefix)) {
                let _ = writeln!(s, "    {:<30} {m}", &reason[prefix.len()..]);
            }
        }
        if self.rows > 0 {
            let _ = writeln!(
                s,
                "rows        {} ({:.0}/s)",
                self.rows, self.rows_per_second
            );
        }
        let l = &self.latency_us;
        let _ = writeln!(
            s,
            "latency ms  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max)
        );
        for p in &self.processes {
            let _ = writeln!(
                s,
                "pid {:<7} CPU {:.0} µs/request ({:.2} s), peak RSS {:.1} MiB",
                p.pid,
                p.cpu_us_per_request,
                p.cpu_us as f64 / 1e6,
                p.peak_rss_kib as f64 / 1024.0
            );
        }
        s
    }
}

/// utime + stime of a process (and its finished children), in microseconds; 0 if unknown.
pub fn cpu_us(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(after) = stat.rfind(')').and_then(|i| stat.get(i + 2..)) else {
        return 0;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14, 15 (utime, stime) counted from `state` = index 0 here; clock ticks of 1/100 s.
    (tick(11) + tick(12)) * 10_000
}

/// Peak resident set size (VmHWM) in KiB; 0 if unknown.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
