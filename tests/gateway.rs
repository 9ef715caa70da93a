//! The spine end to end over real TLS and real sockets: allowed, masked, stripped and denied
//! calls; each leaves exactly one audit record, and denials never reach the provider.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use tonic_types::StatusExt;
use xgate::{
    dev::pki::{self as devpki, DevCa},
    dev::provider::Behaviour,
    pb,
};

fn one_record<'a>(recs: &'a [serde_json::Value], trace_id: &str) -> &'a serde_json::Value {
    let m: Vec<_> = recs.iter().filter(|r| r["trace_id"] == trace_id).collect();
    assert_eq!(
        m.len(),
        1,
        "expected exactly one record for {trace_id}: {recs:#?}"
    );
    m[0]
}

fn trace_of(st: &tonic::Status) -> String {
    st.get_error_details().error_info().unwrap().metadata["trace_id"].clone()
}

#[tokio::test]
async fn allowed_query_masks_and_passes_identity_not_token() {
    let mut h = Harness::start(Opts::default()).await;
    let mut c = h.data("civil-affairs").await;
    let resp = c
        .query(req(
            query(
                "hukou.person_basic",
                "subsidy-eligibility",
                &["region_code=330106"],
                5,
            ),
            &token("civil-affairs"),
        ))
        .await
        .unwrap();
    let trace = trace_id(resp.metadata());
    let r = resp.into_inner();
    let cols: Vec<_> = r.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        cols,
        [
            "id_number",
            "name",
            "gender",
            "birth_date",
            "region_code",
            "household_head"
        ]
    );
    assert_eq!(r.masked_columns, ["id_number"]);
    assert_eq!(r.rows.len(), 5);
    assert!(!r.next_page_token.is_empty());
    for row in &r.rows {
        let id = text(&row.values[0]);
        assert_eq!(id.len(), 18);
        assert_eq!(&id[..6], "330106");
        assert_eq!(&id[6..14], "********", "{id}");
        assert_eq!(text(&row.values[4]), "330106");
    }
    // The provider saw the verified identity and purpose, never the token.
    let md = h.ps.stats.last_metadata.lock().unwrap().clone().unwrap();
    assert_eq!(md.get("x-xgate-consumer-dept").unwrap(), "civil-affairs");
    assert_eq!(md.get("x-xgate-consumer-system").unwrap(), "subsidy");
    assert_eq!(md.get("x-xgate-purpose").unwrap(), "subsidy-eligibility");
    assert!(md.get("authorization").is_none());
    assert!(md.get("grpc-timeout").is_some(), "deadline propagated");

    let recs = h.stop().await;
    assert_eq!(recs.len(), 1);
    let rec = one_record(&recs, &trace);
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["rule"], "grant:ca-hukou-subsidy");
    assert_eq!(rec["approval_ref"], "ZJ-DSB-2026-014");
    assert_eq!(rec["consumer_dept"], "civil-affairs");
    assert_eq!(rec["consumer_system"], "subsidy");
    assert_eq!(rec["token_subject"], "tester@civil-affairs");
    assert_eq!(rec["purpose"], "subsidy-eligibility");
    assert_eq!(rec["dataset"], "hukou.person_basic");
    assert_eq!(rec["method"], "/xgate.v1.DataExchange/Query");
    assert_eq!(rec["fields_masked"], serde_json::json!(["id_number"]));
    assert_eq!(rec["rows"], 5);
    assert_eq!(rec["grpc_status"], "OK");
    assert!(
        rec["cert_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(
        rec["policy_version"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
}

#[tokio::test]
async fn fields_not_granted_are_stripped_even_when_the_provider_sends_them() {
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            leaky: true,
            ..Behaviour::default()
        },
        ..Opts::default()
    })
    .await;
    let mut c = h.data("civil-affairs").await;
    let mut q = query("hukou.person_basic", "subsidy-eligibility", &[], 10);
    q.fields = vec!["name".into(), "id_number".into()];
    let r = c
        .query(req(q, &token("civil-affairs")))
        .await
        .unwrap()
        .into_inner();
    let cols: Vec<_> = r.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        cols,
        ["name", "id_number"],
        "only requested+permitted columns, in the requested order"
    );
    for row in &r.rows {
        assert_eq!(row.values.len(), 2);
        assert!(
            text(&row.values[1]).contains("********"),
            "masked although the provider sent it clear"
        );
    }
    // With no field list the leaky provider sends address and phone: both must go.
    let r = c
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 3),
            &token("civil-affairs"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.columns
            .iter()
            .all(|c| c.name != "address" && c.name != "phone")
    );
    let recs = h.stop().await;
    assert_eq!(recs.len(), 2);
    assert_eq!(
        recs[0]["fields_returned"],
        serde_json::json!(["name", "id_number"])
    );
}

#[tokio::test]
async fn handshake_fails_without_client_cert_and_with_a_foreign_ca() {
    let mut h = Harness::start(Opts::default()).await;
    // No client certificate at all.
    assert!(
        !call_goes_through(&h, None).await,
        "a call without a client certificate succeeded"
    );
    // A certificate from another CA, with a perfectly good SPIFFE identity.
    let other = DevCa::generate("rogue CA").unwrap();
    let (cert, key) = other
        .issue(&devpki::consumer_leaf("civil-affairs", "subsidy"))
        .unwrap();
    assert!(
        !call_goes_through(&h, Some((&cert, &key))).await,
        "a call with a foreign-CA certificate succeeded"
    );
    let recs = h.stop().await;
    assert_eq!(h.provider_calls(), 0);
    // Both refusals are in the audit trail as unknown callers knocking.
    assert_eq!(recs.len(), 2, "{recs:#?}");
    for r in &recs {
        assert_eq!(r["method"], "(tls-handshake)");
        assert_eq!(r["decision"], "deny");
        assert_eq!(r["reason"], "TLS_HANDSHAKE_FAILED");
    }
}

#[tokio::test]
async fn certificate_without_system_identity_is_refused() {
    let mut h = Harness::start(Opts::default()).await;
    let ca = DevCa::load_dir(&certs()).unwrap();
    let (cert, key) = ca
        .issue(&devpki::Leaf {
            common_name: "no identity".into(),
            client: true,
            ..Default::default()
        })
        .unwrap();
    let ca_pem = std::fs::read(certs().join("ca.pem")).unwrap();
    let ch = xgate::dev::client::connect(
        &h.url(),
        &ca_pem,
        cert.as_bytes(),
        key.as_bytes(),
        "localhost",
    )
    .await
    .unwrap();
    let st = pb::data_exchange_client::DataExchangeClient::new(ch)
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &token("civil-affairs"),
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::Unauthenticated, "CERT_IDENTITY_MISSING");
    let recs = h.stop().await;
    assert_eq!(h.provider_calls(), 0);
    let rec = one_record(&recs, &trace_of(&st));
    assert_eq!(rec["decision"], "deny");
    assert!(
        rec["cert_fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated_and_dept_mismatch_is_denied() {
    let mut h = Harness::start(Opts::default()).await;
    let mut c = h.data("civil-affairs").await;
    let q = || query("hukou.person_basic", "subsidy-eligibility", &[], 1);
    let now = xgate::token::now_secs();
    // (token, code, reason)
    let expired = token_with(serde_json::json!({
        "iss": devpki::ISSUER, "aud": devpki::AUDIENCE, "sub": "x", "dept": "civil-affairs",
        "iat": now - 7200, "exp": now - 3600,
    }));
    let not_yet = token_with(serde_json::json!({
        "iss": devpki::ISSUER, "aud": devpki::AUDIENCE, "sub": "x", "dept": "civil-affairs",
        "nbf": now + 3600, "exp": now + 7200,
    }));
    let wrong_aud = token_with(serde_json::json!({
        "iss": devpki::ISSUER, "aud": "someone-else", "sub": "x", "dept": "civil-affairs", "exp": now + 600,
    }));
    let wrong_iss = token_with(serde_json::json!({
        "iss": "https://evil.example", "aud": devpki::AUDIENCE, "sub": "x", "dept": "civil-affairs", "exp": now + 600,
    }));
    // Signed by a key the gateway does not trust, under the trusted kid.
    let (other_key, _) = devpki::jwt_keypair(devpki::KID).unwrap();
    let forged = devpki::mint_token(
        &other_key,
        devpki::KID,
        &devpki::dev_claims("civil-affairs", "x", None, 600),
    )
    .unwrap();
    let unknown_kid = devpki::mint_token(
        &other_key,
        "someone-elses-key",
        &devpki::dev_claims("civil-affairs", "x", None, 600),
    )
    .unwrap();
    let cases: Vec<(Option<String>, Code, &str)> = vec![
        (None, Code::Unauthenticated, "TOKEN_MISSING"),
        (
            Some("not-a-jwt".into()),
            Code::Unauthenticated,
            "TOKEN_MALFORMED",
        ),
        (Some(expired), Code::Unauthenticated, "TOKEN_EXPIRED"),
        (Some(not_yet), Code::Unauthenticated, "TOKEN_NOT_YET_VALID"),
        (
            Some(wrong_aud),
            Code::Unauthenticated,
            "TOKEN_AUDIENCE_INVALID",
        ),
        (
            Some(wrong_iss),
            Code::Unauthenticated,
            "TOKEN_ISSUER_INVALID",
        ),
        (
            Some(forged),
            Code::Unauthenticated,
            "TOKEN_SIGNATURE_INVALID",
        ),
        (
            Some(unknown_kid),
            Code::Unauthenticated,
            "TOKEN_KEY_UNKNOWN",
        ),
        (
            Some(token("health")),
            Code::PermissionDenied,
            "TOKEN_DEPT_MISMATCH",
        ),
    ];
    let mut traces = Vec::new();
    for (tok, code, reason) in &cases {
        let r = match tok {
            Some(t) => req(q(), t),
            None => tonic::Request::new(q()),
        };
        let st = c.query(r).await.unwrap_err();
        assert_reject(&st, *code, reason);
        traces.push((trace_of(&st), *reason));
    }
    let recs = h.stop().await;
    assert_eq!(
        h.provider_calls(),
        0,
        "denied calls must not reach the provider"
    );
    assert_eq!(recs.len(), cases.len());
    for (t, reason) in traces {
        let r = one_record(&recs, &t);
        assert_eq!(r["decision"], "deny");
        assert_eq!(r["reason"], reason);
    }
}

#[tokio::test]
async fn sharing_rules_deny_with_the_reason_and_rule() {
    let mut h = Harness::start(Opts {
        // A grant on a share-type-none dataset loads, but never allows anything.
        extra_grants: "  - { id: ca-criminal, consumer: civil-affairs, dataset: hukou.criminal_record, fields: [\"*\"], purposes: [subsidy-eligibility] }".into(),
        ..Opts::default()
    })
    .await;
    let ca = token("civil-affairs");
    let mut c = h.data("civil-affairs").await;
    let mut health = h.data("health").await;
    let mut cases = Vec::new();
    let st = health
        .query(req(
            query("hukou.person_basic", "medical-insurance", &[], 1),
            &token("health"),
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "GRANT_MISSING");
    cases.push((st, "share-type:conditional"));
    let st = c
        .query(req(
            query("hukou.criminal_record", "subsidy-eligibility", &[], 1),
            &ca,
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "SHARE_TYPE_NONE");
    cases.push((st, "share-type:none"));
    let st = c
        .query(req(query("hukou.person_basic", "marketing", &[], 1), &ca))
        .await
        .unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "PURPOSE_NOT_ALLOWED");
    assert!(
        st.message().contains("subsidy-eligibility"),
        "says which purposes are allowed: {}",
        st.message()
    );
    cases.push((st, "grant:ca-hukou-subsidy"));
    let st = c
        .query(req(query("hukou.person_basic", "", &[], 1), &ca))
        .await
        .unwrap_err();
    assert_reject(&st, Code::InvalidArgument, "PURPOSE_MISSING");
    cases.push((st, "purpose-required"));
    let mut q = query("hukou.person_basic", "subsidy-eligibility", &[], 1);
    q.fields = vec!["address".into()];
    let st = c.query(req(q, &ca)).await.unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "FIELD_DENIED");
    cases.push((st, "grant:ca-hukou-subsidy"));
    let st = c
        .query(req(
            query(
                "hukou.person_basic",
                "subsidy-eligibility",
                &["address^=1"],
                1,
            ),
            &ca,
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "FIELD_DENIED");
    cases.push((st, "grant:ca-hukou-subsidy"));
    let mut q = query("hukou.person_basic", "subsidy-eligibility", &[], 1);
    q.fields = vec!["phone".into()];
    let st = c.query(req(q, &ca)).await.unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "NEGATIVE_LIST");
    cases.push((st, "negative-list:hukou.person_basic.phone"));
    let st = c
        .query(req(
            query("no.such.dataset", "subsidy-eligibility", &[], 1),
            &ca,
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::NotFound, "DATASET_UNKNOWN");
    cases.push((st, "catalogue"));
    let mut q = query("hukou.person_basic", "subsidy-eligibility", &[], 1);
    q.fields = vec!["shoe_size".into()];
    let st = c.query(req(q, &ca)).await.unwrap_err();
    assert_reject(&st, Code::InvalidArgument, "FIELD_UNKNOWN");
    let mut q = query("hukou.person_basic", "subsidy-eligibility", &[], 1);
    q.filter = Some(pb::Filter {
        conditions: vec![pb::Condition {
            field: "name".into(),
            test: None,
        }],
    });
    let st = c.query(req(q, &ca)).await.unwrap_err();
    assert_reject(&st, Code::InvalidArgument, "REQUEST_INVALID");
    // Token purposes narrow the grant.
    let narrow = token_with(devpki::dev_claims(
        "civil-affairs",
        "x",
        Some(&["minimum-living-allowance".into()]),
        600,
    ));
    let st = c
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &narrow,
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "TOKEN_PURPOSE_NOT_ALLOWED");

    let recs = h.stop().await;
    assert_eq!(
        h.provider_calls(),
        0,
        "denied calls must not reach the provider"
    );
    assert_eq!(recs.len(), 11);
    for (st, rule) in &cases {
        let info = st.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.metadata["rule"], *rule);
        let rec = one_record(&recs, &trace_of(st));
        assert_eq!(rec["rule"], *rule);
        assert_eq!(rec["decision"], "deny");
    }
}

#[tokio::test]
async fn over_the_rate_is_resource_exhausted_with_retry_info() {
    let mut h = Harness::start(Opts::default()).await;
    // xihu-hukou-relief: 5/s, burst 10.
    let mut c = h.data("xihu-civil-affairs").await;
    let t = token("xihu-civil-affairs");
    let mut ok = 0;
    let mut limited = None;
    let t0 = Instant::now();
    for _ in 0..30 {
        match c
            .query(req(
                query("hukou.person_basic", "temporary-relief", &[], 1),
                &t,
            ))
            .await
        {
            Ok(_) => ok += 1,
            Err(st) => {
                limited = Some(st);
                break;
            }
        }
    }
    let st = limited.expect("never rate limited");
    assert_reject(&st, Code::ResourceExhausted, "RATE_LIMITED");
    let retry = st
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        retry > Duration::ZERO && retry <= Duration::from_millis(200),
        "{retry:?}"
    );
    // The burst of 10, plus what 5/s refilled while the calls ran (measured, not assumed:
    // a loaded machine makes the calls slower, never the bucket larger).
    let refill = (5.0 * t0.elapsed().as_secs_f64()).floor() as usize;
    assert!(
        (10..=10 + refill).contains(&ok),
        "burst of 10 plus {refill} refilled admitted, got {ok}"
    );
    let calls_before = h.provider_calls();
    let recs = h.stop().await;
    assert_eq!(
        calls_before, ok as u64,
        "the limited call did not reach the provider"
    );
    assert_eq!(recs.len(), ok + 1);
    assert_eq!(one_record(&recs, &trace_of(&st))["reason"], "RATE_LIMITED");
}

#[tokio::test]
async fn provider_down_is_unavailable_quickly() {
    let mut h = Harness::start(Opts {
        provider_down: true,
        ..Opts::default()
    })
    .await;
    let mut c = h.data("civil-affairs").await;
    let t0 = Instant::now();
    let st = c
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &token("civil-affairs"),
        ))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert_reject(&st, Code::Unavailable, "PROVIDER_UNAVAILABLE");
    assert!(
        !st.message().contains("127.0.0.1"),
        "no internals leak: {}",
        st.message()
    );
    // Bounded by the 1 s connect timeout, not the 30 s call cap (generous for loaded CI).
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let recs = h.stop().await;
    let r = one_record(&recs, &trace_of(&st));
    assert_eq!(
        r["decision"], "allow",
        "the policy allowed it; the provider failed"
    );
    assert_eq!(r["grpc_status"], "UNAVAILABLE");
}

/// A provider host that never answers (its SYNs dropped): the call waits out
/// `upstream.connect_timeout_ms`, no less, then is `UNAVAILABLE`.
#[tokio::test]
async fn a_provider_that_never_answers_fails_at_the_connect_timeout() {
    let mut h = Harness::start(Opts {
        provider_silent: true,
        config: Some(std::sync::Arc::new(|c| c.upstream.connect_timeout_ms = 700)),
        ..Opts::default()
    })
    .await;
    let mut c = h.data("civil-affairs").await;
    let t0 = Instant::now();
    let st = c
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &token("civil-affairs"),
        ))
        .await
        .unwrap_err();
    let took = t0.elapsed();
    assert_reject(&st, Code::Unavailable, "PROVIDER_UNAVAILABLE");
    assert!(took >= Duration::from_millis(700), "gave up after {took:?}");
    // Well before the 30 s call cap (generous for a loaded machine).
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let recs = h.stop().await;
    let r = one_record(&recs, &trace_of(&st));
    assert_eq!(r["grpc_status"], "UNAVAILABLE");
    assert_eq!(r["reason"], "PROVIDER_UNAVAILABLE");
}

#[tokio::test]
async fn slow_provider_hits_the_callers_deadline_or_the_cap() {
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            delay: Duration::from_secs(5),
            ..Behaviour::default()
        },
        max_timeout_ms: Some(600),
        ..Opts::default()
    })
    .await;
    let mut c = h.data("civil-affairs").await;
    // The caller's deadline (sent as the header only, so the gateway answers, not tonic's timer).
    let mut r = req(
        query("hukou.person_basic", "subsidy-eligibility", &[], 1),
        &token("civil-affairs"),
    );
    // 400 ms (under the 600 ms cap): the gateway answers 80 ms before it, which holds on a
    // loaded CI machine where a 40 ms margin (200 ms) did not always.
    r.metadata_mut()
        .insert("grpc-timeout", "400m".parse().unwrap());
    let t0 = Instant::now();
    let st = c.query(r).await.unwrap_err();
    // tonic's client keeps the same deadline itself: on a loaded machine its timer can fire
    // before the gateway's answer (80 ms earlier) arrives. Then the gateway's own answer is
    // still on its record (checked below), which is what this test is about.
    let client_gave_up = st.code() == Code::Cancelled && st.message() == "Timeout expired";
    if !client_gave_up {
        assert_reject(&st, Code::DeadlineExceeded, "PROVIDER_TIMEOUT");
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // No caller deadline: the configured cap applies.
    let st2 = c
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &token("civil-affairs"),
        ))
        .await
        .unwrap_err();
    assert_reject(&st2, Code::DeadlineExceeded, "PROVIDER_TIMEOUT");
    let recs = h.stop().await;
    assert_eq!(recs.len(), 2);
    // The first call's record (by trace id, or the one that is not the second's).
    let first = if client_gave_up {
        recs.iter()
            .find(|r| r["trace_id"] != trace_of(&st2).as_str())
            .unwrap()
    } else {
        one_record(&recs, &trace_of(&st))
    };
    assert_eq!(first["grpc_status"], "DEADLINE_EXCEEDED", "{first}");
    assert_eq!(first["reason"], "PROVIDER_TIMEOUT", "{first}");
    assert!(
        first["latency_us"].as_u64().unwrap() < 400_000,
        "answered before the caller's deadline: {first}"
    );
}

#[tokio::test]
async fn query_stream_arrives_whole_filtered_and_masked_like_query() {
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            leaky: true,
            ..Behaviour::default()
        },
        ..Opts::default()
    })
    .await;
    let mut c = h.data("civil-affairs").await;
    let t = token("civil-affairs");
    // Page through Query.
    let mut paged = Vec::new();
    let mut page_token = String::new();
    loop {
        let mut q = query(
            "hukou.person_basic",
            "subsidy-eligibility",
            &["region_code:in=330106,330108"],
            200,
        );
        q.page_token = page_token.clone();
        let r = c.query(req(q, &t)).await.unwrap().into_inner();
        paged.extend(r.rows);
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    // The same rows as a stream of small batches.
    let resp = c
        .query_stream(req(
            query(
                "hukou.person_basic",
                "subsidy-eligibility",
                &["region_code:in=330106,330108"],
                25,
            ),
            &t,
        ))
        .await
        .unwrap();
    let trace = trace_id(resp.metadata());
    let mut s = resp.into_inner();
    let mut streamed = Vec::new();
    let mut batches = 0;
    while let Some(b) = s.message().await.unwrap() {
        batches += 1;
        assert_eq!(b.masked_columns, ["id_number"]);
        assert_eq!(b.columns.len(), 6, "stripped like Query");
        streamed.extend(b.rows);
    }
    assert!(paged.len() > 300, "enough rows to matter: {}", paged.len());
    assert_eq!(batches, paged.len().div_ceil(25));
    assert_eq!(streamed, paged);
    let recs = h.stop().await;
    let r = one_record(&recs, &trace);
    assert_eq!(r["method"], "/xgate.v1.DataExchange/QueryStream");
    assert_eq!(r["rows"], paged.len() as u64);
    assert_eq!(r["grpc_status"], "OK");
}

#[tokio::test]
async fn describe_dataset_says_exactly_what_query_returns() {
    let mut h = Harness::start(Opts::default()).await;
    let t = token("civil-affairs");
    let mut cat = h.catalog("civil-affairs").await;
    let list = cat
        .list_datasets(req(pb::ListDatasetsRequest {}, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.datasets.len(), 3);
    let d = cat
        .describe_dataset(req(
            pb::DescribeDatasetRequest {
                dataset: "hukou.person_basic".into(),
                purpose: String::new(),
            },
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    let a = d.access.unwrap();
    assert!(a.allowed);
    assert_eq!(a.deciding_rule, "grant:ca-hukou-subsidy");
    let r = h
        .data("civil-affairs")
        .await
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    let returned: Vec<_> = r.columns.iter().map(|c| c.name.clone()).collect();
    let mut described: Vec<_> = a.readable_fields.clone();
    described.extend(a.masked_fields.iter().map(|m| m.field.clone()));
    let (mut x, mut y) = (returned.clone(), described);
    x.sort();
    y.sort();
    assert_eq!(x, y);
    assert_eq!(
        r.masked_columns,
        a.masked_fields
            .iter()
            .map(|m| m.field.clone())
            .collect::<Vec<_>>()
    );
    // A denied caller is told why, not refused.
    let d = h
        .catalog("health")
        .await
        .describe_dataset(req(
            pb::DescribeDatasetRequest {
                dataset: "hukou.person_basic".into(),
                purpose: String::new(),
            },
            &token("health"),
        ))
        .await
        .unwrap()
        .into_inner();
    let a = d.access.unwrap();
    assert!(!a.allowed);
    assert_eq!(a.denial_reason, "GRANT_MISSING");
    let recs = h.stop().await;
    assert_eq!(recs.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_calls_loses_no_audit_record() {
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            delay: SLOW,
            ..Behaviour::default()
        },
        drain_ms: Some(10_000),
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let c = h.data("civil-affairs").await;
    let mut calls = Vec::new();
    for _ in 0..20 {
        let mut c = c.clone();
        let t = t.clone();
        calls.push(tokio::spawn(async move {
            c.query(req(
                query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                &t,
            ))
            .await
        }));
    }
    // Wait until every call has reached the provider, then stop the gateway.
    while h.provider_calls() < 20 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let gw = h.take_gateway();
    let stopping = tokio::spawn(gw.shutdown());
    let mut traces = Vec::new();
    for c in calls {
        let r = c
            .await
            .unwrap()
            .expect("in-flight call finished during the drain");
        traces.push(trace_id(r.metadata()));
    }
    let written = stopping.await.unwrap().unwrap();
    assert_eq!(written, 20);
    let recs = h.stop().await;
    assert_eq!(recs.len(), 20);
    for t in traces {
        assert_eq!(one_record(&recs, &t)["grpc_status"], "OK");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_ends_stuck_calls_with_a_reason_and_still_records_them() {
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            delay: Duration::from_secs(20),
            ..Behaviour::default()
        },
        drain_ms: Some(300),
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let c = h.data("civil-affairs").await;
    let mut calls = Vec::new();
    for _ in 0..5 {
        let mut c = c.clone();
        let t = t.clone();
        calls.push(tokio::spawn(async move {
            c.query(req(
                query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                &t,
            ))
            .await
        }));
    }
    while h.provider_calls() < 5 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = Instant::now();
    let written = h.take_gateway().shutdown().await.unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "shutdown bounded by the drain timeout: {:?}",
        t0.elapsed()
    );
    assert_eq!(written, 5);
    let mut traces = Vec::new();
    for c in calls {
        let st = c.await.unwrap().unwrap_err();
        assert_reject(&st, Code::Unavailable, "GATEWAY_SHUTTING_DOWN");
        traces.push(trace_of(&st));
    }
    let recs = h.stop().await;
    assert_eq!(recs.len(), 5);
    for t in traces {
        assert_eq!(one_record(&recs, &t)["reason"], "GATEWAY_SHUTTING_DOWN");
    }
}

/// Page tokens are sealed: the next page opens only for the caller and the query that got
/// the token, under the same policy; an altered, replayed or raw provider token, another
/// filter, or a policy change since are `INVALID_ARGUMENT PAGE_TOKEN_INVALID`.
#[tokio::test]
async fn page_tokens_are_sealed_to_their_caller_and_query() {
    let mut h = Harness::start(Opts::default()).await;
    let t = token("civil-affairs");
    let mut c = h.data("civil-affairs").await;
    let q = || {
        query(
            "hukou.person_basic",
            "subsidy-eligibility",
            &["region_code=330106"],
            3,
        )
    };
    let first = c.query(req(q(), &t)).await.unwrap().into_inner();
    let sealed = first.next_page_token.clone();
    assert!(sealed.starts_with("p1."), "{sealed}");
    let mut second = q();
    second.page_token = sealed.clone();
    let page2 = c.query(req(second.clone(), &t)).await.unwrap().into_inner();
    assert_eq!(page2.rows.len(), 3);
    assert_ne!(page2.rows, first.rows, "the next page, not the first again");
    // A bigger page from the same position is the same query.
    let mut bigger = second.clone();
    bigger.page_size = 5;
    c.query(req(bigger, &t)).await.unwrap();
    let mut traces = Vec::new();
    let mut refused =
        async |c: &mut pb::data_exchange_client::DataExchangeClient<tonic::transport::Channel>,
               r: pb::QueryRequest,
               tok: &str,
               what: &str| {
            let st = c.query(req(r, tok)).await.expect_err(what);
            assert_reject(&st, Code::InvalidArgument, "PAGE_TOKEN_INVALID");
            traces.push(trace_id(st.metadata()));
        };
    // Another filter with the same token.
    let mut other = query(
        "hukou.person_basic",
        "subsidy-eligibility",
        &["region_code=330108"],
        3,
    );
    other.page_token = sealed.clone();
    refused(&mut c, other, &t, "another filter").await;
    // The provider's own token, unsealed; an altered one.
    let mut raw = q();
    raw.page_token = "3".into();
    refused(&mut c, raw, &t, "raw").await;
    let mut altered = q();
    altered.page_token = sealed.replacen("p1.", "p1.M", 1);
    refused(&mut c, altered, &t, "altered").await;
    // Another department with the same token (its own grant, the same query otherwise).
    let mut x = h.data("xihu-civil-affairs").await;
    let mut theirs = query(
        "hukou.person_basic",
        "temporary-relief",
        &["region_code=330106"],
        3,
    );
    let theirs_first = x
        .query(req(theirs.clone(), &token("xihu-civil-affairs")))
        .await
        .unwrap();
    assert!(!theirs_first.into_inner().next_page_token.is_empty());
    theirs.page_token = sealed.clone();
    refused(
        &mut x,
        theirs,
        &token("xihu-civil-affairs"),
        "another caller",
    )
    .await;
    // A policy change ends the paging.
    let text = std::fs::read_to_string(&h.policy_path).unwrap();
    replace_file(&h.policy_path, &format!("{text}\n# touched\n"));
    h.reloader.reload("test").unwrap();
    refused(&mut c, second, &t, "after a policy change").await;
    let recs = h.stop().await;
    for tr in &traces {
        let r = recs.iter().find(|r| r["trace_id"] == tr.as_str()).unwrap();
        assert_eq!(r["reason"], "PAGE_TOKEN_INVALID");
        assert_eq!(r["rule"], "paging:sealed-token");
    }
}

/// A provider's own refusal is passed through with its code and (bounded) message as
/// `PROVIDER_ERROR`: here market-supervision is named the provider of a dataset it does not
/// serve, and answers NOT_FOUND.
#[tokio::test]
async fn a_providers_own_error_is_passed_through_as_provider_error() {
    let mut h = Harness::start(Opts {
        edit_policy: Some(|p| {
            p.replace(
                "    provider: public-security\n",
                "    provider: market-supervision\n",
            )
        }),
        ..Opts::default()
    })
    .await;
    let st = h
        .data("civil-affairs")
        .await
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &token("civil-affairs"),
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::NotFound, "PROVIDER_ERROR");
    assert!(
        st.message().contains("market-supervision") && st.message().contains("is not served here"),
        "{}",
        st.message()
    );
    let recs = h.stop().await;
    let r = one_record(&recs, &trace_of(&st));
    assert_eq!(
        (r["grpc_status"].as_str(), r["reason"].as_str()),
        (Some("NOT_FOUND"), Some("PROVIDER_ERROR"))
    );
    assert_eq!(
        h.ms.stats.calls.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// A row-scoped grant needs the region column to check each row: a provider that leaves it
/// out has its answer refused (`INTERNAL PROVIDER_RESPONSE_INVALID`), no row delivered.
#[tokio::test]
async fn a_response_without_the_region_column_is_refused_under_a_row_scope() {
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            omit_column: Some("region_code"),
            ..Behaviour::default()
        },
        ..Opts::default()
    })
    .await;
    let st = h
        .data("xihu-civil-affairs")
        .await
        .query(req(
            query("hukou.person_basic", "temporary-relief", &[], 5),
            &token("xihu-civil-affairs"),
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::Internal, "PROVIDER_RESPONSE_INVALID");
    assert!(!st.message().contains("region_code"), "{}", st.message());
    let recs = h.stop().await;
    let r = one_record(&recs, &trace_of(&st));
    assert_eq!(r["rows"], 0);
    assert_eq!(r["reason"], "PROVIDER_RESPONSE_INVALID");
}

/// A call the client gives up on (RST_STREAM CANCEL, written raw) while the provider answers
/// still leaves its record: `CANCELLED`, at the stage it reached.
#[tokio::test]
async fn a_call_the_client_cancels_is_recorded_cancelled() {
    use tokio::io::AsyncWriteExt;
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            delay: Duration::from_secs(3),
            ..Behaviour::default()
        },
        ..Opts::default()
    })
    .await;
    let id = "0c0ffee0000000000000000000000001";
    let mut tls = raw_h2::connect(h.addr, "civil-affairs").await;
    let mut out = Vec::new();
    let block = raw_h2::Calls::default().headers(
        "/xgate.v1.DataExchange/Query",
        &token("civil-affairs"),
        id,
    );
    raw_h2::frame(&mut out, raw_h2::HEADERS, raw_h2::END_HEADERS, 1, &block);
    raw_h2::frame(
        &mut out,
        raw_h2::DATA,
        raw_h2::END_STREAM,
        1,
        &raw_h2::grpc_message(&query("hukou.person_basic", "subsidy-eligibility", &[], 1)),
    );
    tls.write_all(&out).await.unwrap();
    // Give up once the provider has the call.
    let t0 = Instant::now();
    while h
        .ps
        .stats
        .in_flight
        .load(std::sync::atomic::Ordering::SeqCst)
        == 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "never reached the provider"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut rst = Vec::new();
    raw_h2::frame(
        &mut rst,
        raw_h2::RST_STREAM,
        0,
        1,
        &raw_h2::CANCEL.to_be_bytes(),
    );
    tls.write_all(&rst).await.unwrap();
    // The provider's call is dropped with it (well before its 3 s delay).
    let t0 = Instant::now();
    while h
        .ps
        .stats
        .in_flight
        .load(std::sync::atomic::Ordering::SeqCst)
        != 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the provider call went on"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(tls);
    let recs = h.stop().await;
    let r = one_record(&recs, id);
    assert_eq!(r["grpc_status"], "CANCELLED");
    assert_eq!(r["reason"], "CANCELLED");
    assert_eq!(r["decision"], "allow", "the policy allowed it");
    assert_eq!(r["reached"], "forward");
}

/// A `QueryStream` holds its in-flight place with the provider for its whole life: with
/// `max_in_flight: 1`, a call during the stream is refused, and one after it goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_its_in_flight_place_until_it_ends() {
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            delay: Duration::from_millis(50),
            ..Behaviour::default()
        },
        edit_policy: Some(|p| {
            p.replace(
                "tls_name: public-security.provider.xgate.internal }",
                "tls_name: public-security.provider.xgate.internal, max_in_flight: 1 }",
            )
        }),
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let mut c = h.data("civil-affairs").await;
    let mut s = c
        .query_stream(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 50),
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    s.message().await.unwrap().unwrap();
    // Between batches the provider is idle, yet the place is the stream's.
    let st = c
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::Unavailable, "PROVIDER_SATURATED");
    while s.message().await.unwrap().is_some() {}
    // The stream's end gives the place back.
    let t0 = Instant::now();
    loop {
        match c
            .query(req(
                query("hukou.person_basic", "subsidy-eligibility", &[], 1),
                &t,
            ))
            .await
        {
            Ok(_) => break,
            Err(st) => assert_reject(&st, Code::Unavailable, "PROVIDER_SATURATED"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the place never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop().await;
}
