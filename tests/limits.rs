//! Provider protection: whoever the callers are, a department backend gets at most its
//! configured rate and in-flight calls; past that, callers get a quick `UNAVAILABLE` with
//! `RetryInfo` after a bounded wait — never an unbounded queue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::*;
use tonic::Code;
use tonic_types::StatusExt;
use xgate::dev::provider::Behaviour;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_protection_caps_in_flight_calls_and_rate() {
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            delay: Duration::from_millis(1_500),
            ..Behaviour::default()
        },
        edit_policy: Some(|p| {
            p.replace(
                "tls_name: public-security.provider.xgate.internal }",
                "tls_name: public-security.provider.xgate.internal, max_in_flight: 2 }",
            )
            .replace(
                "tls_name: market-supervision.provider.xgate.internal }",
                "tls_name: market-supervision.provider.xgate.internal, max_rate: { per_second: 0.01, burst: 3 } }",
            )
        }),
        ..Opts::default()
    })
    .await;
    // Eight callers at once against a provider that takes two at a time, 1.5 s each: the six
    // others wait at most `upstream.queue_wait_ms` (100 ms) for a place, then are refused.
    let c = h.data("civil-affairs").await;
    let (ok, saturated) = saturate(
        vec![c; 8],
        &token("civil-affairs"),
        "hukou.person_basic",
        "subsidy-eligibility",
    )
    .await;
    assert_eq!(
        h.ps.stats.max_in_flight.load(Ordering::SeqCst),
        2,
        "never more than two at the provider"
    );
    assert_eq!((ok, saturated), (2, 6));
    assert_eq!(h.ps.stats.calls.load(Ordering::SeqCst), 2);
    // A rate cap on the other provider: a burst of 3, then one call per 100 s; eight callers
    // at once.
    let health = h.data("health").await;
    let (_, refused) = saturate(
        vec![health; 8],
        &token("health"),
        "market.company_registry",
        "medical-institution-licensing",
    )
    .await;
    assert_eq!(refused, 5, "the rate cap held: a burst of 3 of 8");
    assert_eq!(h.ms.stats.calls.load(Ordering::SeqCst), 3);
    let recs = h.stop().await;
    assert_eq!(
        recs.iter()
            .filter(|r| r["reason"] == "PROVIDER_SATURATED")
            .count(),
        saturated + refused
    );
}

#[tokio::test]
async fn daily_quotas_and_the_per_consumer_rate_say_which_limit() {
    let mut h = Harness::start(Opts {
        edit_policy: Some(|p| {
            p.replace(
                "    approval_ref: ZJ-DSB-2026-014",
                "    daily_quota: { calls: 3 }\n    approval_ref: ZJ-DSB-2026-014",
            )
            .replace(
                "defaults:\n  # Rate for access without a grant (unconditional datasets, non-sensitive fields).\n  rate_limit: { per_second: 20, burst: 40 }",
                "defaults:\n  rate_limit: { per_second: 20, burst: 40 }\n  per_consumer: { per_second: 1, burst: 4 }",
            )
        }),
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let mut c = h.data("civil-affairs").await;
    for _ in 0..3 {
        c.query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap();
    }
    let st = c
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::ResourceExhausted, "QUOTA_EXHAUSTED");
    let d = st.get_error_details();
    let retry = d.retry_info().and_then(|r| r.retry_delay).unwrap();
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_secs(86_400),
        "until local midnight: {retry:?}"
    );
    let v = &d.quota_failure().unwrap().violations[0];
    assert_eq!(
        (v.subject.as_str(), v.description.as_str()),
        ("grant:ca-hukou-subsidy", "3 calls per day")
    );
    // The department's overall rate (burst 4) is reached on another dataset.
    let st = c
        .query(req(query("market.company_registry", "any", &[], 1), &t))
        .await
        .unwrap_err();
    assert_reject(&st, Code::ResourceExhausted, "RATE_LIMITED");
    let d = st.get_error_details();
    assert_eq!(
        d.quota_failure().unwrap().violations[0].subject,
        "consumer:civil-affairs"
    );
    let recs = h.stop().await;
    assert_eq!(
        recs.iter()
            .filter(|r| r["reason"] == "QUOTA_EXHAUSTED")
            .count(),
        1
    );
    assert_eq!(h.provider_calls(), 3);
}
