//! Group commit with a linger (`audit.group_commit_us`): calls that arrive while the writer
//! waits share one write and one fsync, and each still gets its answer only once its record
//! is durable. In a test binary of its own: it reads the process-wide metrics recorder.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;

/// Group commits so far (`xgate_audit_commit_seconds_count`): the metric must be there.
async fn commits(admin: std::net::SocketAddr) -> u64 {
    let (code, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(code, 200);
    body.lines()
        .find(|l| l.starts_with("xgate_audit_commit_seconds_count"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no xgate_audit_commit_seconds_count in /metrics:\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_arriving_during_the_linger_share_one_fsync_and_lose_nothing() {
    let hook: ConfigHook = Arc::new(|c| c.audit.group_commit_us = 100_000);
    let mut h = Harness::start(Opts {
        admin: true,
        config: Some(hook),
        ..Opts::default()
    })
    .await;
    let admin = h.admin.expect("admin endpoint");
    let t = token("civil-affairs");
    let ask = || query("hukou.person_basic", "subsidy-eligibility", &[], 1);
    // Eight connected callers (their first calls, together, also warm the connections).
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(h.data("civil-affairs").await);
    }
    let mut warm = Vec::new();
    for mut c in clients {
        let (t, q) = (t.clone(), ask());
        warm.push(tokio::spawn(async move {
            c.query(req(q, &t)).await.unwrap();
            c
        }));
    }
    let mut clients = Vec::new();
    for w in warm {
        clients.push(w.await.unwrap());
    }
    // Now eight calls 4 ms apart: without a linger each would find the writer idle and get
    // an fsync of its own; the first record opens a 0.1 s window the other seven fall into.
    let before = commits(admin).await;
    let mut calls = Vec::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let (t, q) = (t.clone(), ask());
        calls.push(tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(4 * i as u64)).await;
            let t0 = std::time::Instant::now();
            let r = c.query(req(q, &t)).await.unwrap();
            (trace_id(r.metadata()), t0.elapsed())
        }));
    }
    let mut traces = Vec::new();
    for (i, c) in calls.into_iter().enumerate() {
        let (trace, took) = c.await.unwrap();
        // The first call's record opened the window: its answer waited for the whole linger
        // and the fsync after it (an answer sent before its commit would be back in ~1 ms).
        if i == 0 {
            assert!(
                took >= std::time::Duration::from_millis(100),
                "the first call was answered after {took:?}, before its group committed"
            );
        }
        traces.push(trace);
    }
    let after = commits(admin).await;
    assert!(
        (1..=3).contains(&(after - before)),
        "8 calls in {} group commits (a 0.1 s linger should gather them in one or two)",
        after - before
    );
    let recs = h.stop().await;
    assert_eq!(recs.len(), 16);
    for t in &traces {
        assert_eq!(
            recs.iter().filter(|r| r["trace_id"] == t.as_str()).count(),
            1,
            "the answered call {t} has its record"
        );
    }
}
