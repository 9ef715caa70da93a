//! The data-sharing model over the wire: row scopes, pseudonyms, validity windows, and live
//! policy changes (reload under load, invalid reloads, streams cut by a revoked grant).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use sha2::{Digest, Sha256};
use tonic::Code;
use xgate::{dev::provider::Behaviour, pb};

fn version_of(text: &str) -> String {
    format!(
        "sha256:{}",
        &hex::encode(Sha256::digest(text.as_bytes()))[..16]
    )
}

#[tokio::test]
async fn row_scope_narrows_the_filter_refuses_outside_and_drops_stray_rows() {
    // A provider that ignores the filter and sends every column: the gateway must still
    // deliver only the county's rows.
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            leaky: true,
            ignore_filter: true,
            ..Behaviour::default()
        },
        ..Opts::default()
    })
    .await;
    let t = token("xihu-civil-affairs");
    let mut c = h.data("xihu-civil-affairs").await;
    let r = c
        .query(req(
            query("hukou.person_basic", "temporary-relief", &[], 200),
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    let region = r
        .columns
        .iter()
        .position(|c| c.name == "region_code")
        .unwrap();
    // The provider ignored the filter and sent its first 200 rows: exactly the county's
    // among them are delivered.
    assert_eq!(
        r.rows.len(),
        county_rows(0..200),
        "out-of-scope rows were dropped"
    );
    for row in &r.rows {
        assert_eq!(text(&row.values[region]), "330106");
    }
    let st = c
        .query(req(
            query(
                "hukou.person_basic",
                "temporary-relief",
                &["region_code=330108"],
                5,
            ),
            &t,
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "ROW_SCOPE_VIOLATION");
    assert!(
        st.message().contains("own-region 330106"),
        "{}",
        st.message()
    );
    let recs = h.stop().await;
    assert_eq!(recs.len(), 2);
}

#[tokio::test]
async fn a_narrowed_filter_is_what_the_provider_sees() {
    let mut h = Harness::start(Opts::default()).await;
    let t = token("xihu-civil-affairs");
    let mut c = h.data("xihu-civil-affairs").await;
    // Asking for the whole province is narrowed to the district, not refused.
    let r = c
        .query(req(
            query(
                "hukou.person_basic",
                "temporary-relief",
                &["region_code^=33"],
                500,
            ),
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    // What the provider received is the narrowed filter itself, not the caller's.
    let seen = h.ps.stats.last_request.lock().unwrap().clone().unwrap();
    assert_eq!(
        seen.filter.map(|f| f.conditions),
        Some(vec![pb::Condition {
            field: "region_code".into(),
            test: Some(pb::condition::Test::Prefix("330106".into())),
        }])
    );
    // And it answered from the county only: every county row (fewer than the page).
    assert_eq!(r.rows.len(), county_rows(0..2_000));
    let region = r
        .columns
        .iter()
        .position(|c| c.name == "region_code")
        .unwrap();
    assert!(
        r.rows
            .iter()
            .all(|row| text(&row.values[region]) == "330106")
    );
    h.stop().await;
}

/// Rows of the sample person table in `range` whose region is Xihu (330106), counted from the
/// table itself rather than through the gateway.
fn county_rows(range: std::ops::Range<usize>) -> usize {
    let t = xgate::dev::provider::person_table(2_000);
    let region = t
        .columns
        .iter()
        .position(|c| c.name == "region_code")
        .unwrap();
    t.rows[range]
        .iter()
        .filter(|r| text(&r.values[region]) == "330106")
        .count()
}

#[tokio::test]
async fn hash_masks_are_stable_pseudonyms() {
    let mut h = Harness::start(Opts::default()).await;
    let t = token("health");
    let mut c = h.data("health").await;
    let mut q = query(
        "market.company_registry",
        "medical-institution-licensing",
        &[],
        20,
    );
    q.fields = vec!["credit_code".into(), "legal_rep_id_number".into()];
    let a = c.query(req(q.clone(), &t)).await.unwrap().into_inner();
    let b = c.query(req(q, &t)).await.unwrap().into_inner();
    assert_eq!(a.masked_columns, ["legal_rep_id_number"]);
    assert_eq!((a.rows.len(), b.rows.len()), (20, 20));
    for (ra, rb) in a.rows.iter().zip(&b.rows) {
        let p = text(&ra.values[1]);
        assert!(p.starts_with("p:") && p.len() == 34, "{p}");
        assert_eq!(p, text(&rb.values[1]), "stable across calls");
    }
    // Distinct people get distinct pseudonyms: as many as there are distinct ids among the
    // provider's first 20 companies (counted from the table itself), and none is the id.
    let table = xgate::dev::provider::company_table(500);
    let col = table
        .columns
        .iter()
        .position(|c| c.name == "legal_rep_id_number")
        .unwrap();
    let ids: HashSet<String> = table.rows[..20]
        .iter()
        .map(|r| text(&r.values[col]))
        .collect();
    let pseudonyms: HashSet<String> = a.rows.iter().map(|r| text(&r.values[1])).collect();
    assert_eq!(pseudonyms.len(), ids.len());
    assert!(pseudonyms.is_disjoint(&ids));
    h.stop().await;
}

#[tokio::test]
async fn expired_and_future_grants_deny_with_their_own_reason() {
    let mut h = Harness::start(Opts {
        edit_policy: Some(|p| {
            p.replace("valid_from: 2026-01-01", "valid_from: 2020-01-01")
                .replace("expires: 2030-12-31", "expires: 2021-01-01")
                .replace(
                    "  - id: xihu-hukou-relief\n",
                    "  - id: xihu-hukou-relief\n    valid_from: 2099-01-01\n",
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
    assert_reject(&st, Code::PermissionDenied, "GRANT_EXPIRED");
    let st = h
        .data("xihu-civil-affairs")
        .await
        .query(req(
            query("hukou.person_basic", "temporary-relief", &[], 1),
            &token("xihu-civil-affairs"),
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "GRANT_NOT_YET_VALID");
    h.stop().await;
    assert_eq!(h.provider_calls(), 0);
}

#[tokio::test]
async fn invalid_reload_keeps_the_old_policy_and_shows_every_error() {
    let mut h = Harness::start(Opts {
        admin: true,
        ..Opts::default()
    })
    .await;
    let admin = h.admin.unwrap();
    let before = std::fs::read_to_string(&h.policy_path).unwrap();
    let v0 = version_of(&before);
    // Two errors at once: an unknown dataset and a negative-listed field in a grant.
    let broken = before
        .replace(
            "dataset: market.company_registry\n    fields: [legal_rep_id_number]",
            "dataset: market.company_registy\n    fields: [legal_rep_id_number]",
        )
        .replace(
            "fields: [id_number, name, gender, birth_date, region_code, household_head]",
            "fields: [id_number, name, phone]",
        );
    std::fs::write(&h.policy_path, &broken).unwrap();
    let r = h
        .officer(Some("officer-bureau"))
        .send(
            "POST",
            "/admin/policy/reload",
            &[("x-requested-by", "test")],
            None,
        )
        .await;
    let (code, body) = (r.status, r.body);
    assert_eq!(code, 422, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], v0.as_str(), "old policy still serving");
    let errors = v["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors.iter().any(|e| e
            .as_str()
            .unwrap()
            .contains("did you mean `market.company_registry`")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .all(|e| e.as_str().unwrap().contains("policy.yaml:")),
        "located: {errors:?}"
    );
    let status = h
        .officer(Some("officer-bureau"))
        .get("/admin/policy")
        .await
        .body;
    let s: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(s["reloads_failed"], 1);
    assert_eq!(s["last_error"]["errors"].as_array().unwrap().len(), 2);
    let (_, metrics) = http(admin, "GET", "/metrics").await;
    assert!(
        metrics.contains("xgate_policy_reloads_total{result=\"error\"}"),
        "{metrics}"
    );
    // Calls still work under the old policy.
    let r = h
        .data("civil-affairs")
        .await
        .query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &token("civil-affairs"),
        ))
        .await
        .unwrap();
    assert_eq!(r.into_inner().rows.len(), 1);
    // A fixed file is picked up by the file watcher, no admin call needed.
    let fixed = before.replace(
        "rate_limit: { per_second: 5, burst: 10 }",
        "rate_limit: { per_second: 6, burst: 10 }",
    );
    replace_file(&h.policy_path, &fixed);
    let v1 = version_of(&fixed);
    let t0 = Instant::now();
    while h.reloader.status().version != v1 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "file change not picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = h
        .officer(Some("officer-bureau"))
        .get("/admin/policy")
        .await
        .body;
    let s: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(s["loaded_by"], "file-change");
    assert!(s["last_error"].is_null());
    let recs = h.stop().await;
    assert_eq!(recs[0]["policy_version"], v0.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_fails_no_call_and_versions_match_files() {
    // A generous rate, so only a reload could fail a call here.
    let mut h = Harness::start(Opts {
        edit_policy: Some(|p| {
            p.replace(
                "{ per_second: 50, burst: 100 }",
                "{ per_second: 100000, burst: 100000 }",
            )
        }),
        ..Opts::default()
    })
    .await;
    let base = std::fs::read_to_string(&h.policy_path).unwrap();
    let mut versions = HashSet::from([version_of(&base)]);
    let stop = Arc::new(AtomicBool::new(false));
    let c = h.data("civil-affairs").await;
    let t = token("civil-affairs");
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (mut c, t, stop) = (c.clone(), t.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .query(req(
                        query(
                            "hukou.person_basic",
                            "subsidy-eligibility",
                            &["region_code=330106"],
                            2,
                        ),
                        &t,
                    ))
                    .await;
                if let Err(st) = r {
                    panic!("a call failed during reloads: {st:?}");
                }
                n += 1;
            }
            n
        }));
    }
    // Rewrite the file many times (each a different, valid policy), reloading each.
    for i in 0..25 {
        let text = format!("{base}\n# revision {i}\n");
        replace_file(&h.policy_path, &text);
        versions.insert(version_of(&text));
        let _ = h.reloader.reload("test");
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut calls = 0;
    for w in workers {
        calls += w.await.unwrap();
    }
    assert!(calls > 20, "enough calls overlapped the reloads: {calls}");
    let recs = h.stop().await;
    assert_eq!(recs.len() as u32, calls);
    let seen: HashSet<String> = recs
        .iter()
        .map(|r| r["policy_version"].as_str().unwrap().to_owned())
        .collect();
    assert!(seen.len() > 1, "calls were decided under several versions");
    for v in &seen {
        assert!(
            versions.contains(v),
            "record under {v}, a version no file had"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_grant_ends_an_open_stream_within_a_second() {
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            delay: Duration::from_millis(100),
            ..Behaviour::default()
        },
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let mut c = h.data("civil-affairs").await;
    let mut s = c
        .query_stream(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 10),
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    // Two batches arrive under the grant.
    let mut rows = 0;
    for _ in 0..2 {
        rows += s.message().await.unwrap().unwrap().rows.len() as u64;
    }
    // The bureau revokes the grant (the file loses it; the watcher reloads).
    let text = std::fs::read_to_string(&h.policy_path).unwrap();
    let start = text.find("  - id: ca-hukou-subsidy").unwrap();
    let end = text.find("  - id: xihu-hukou-relief").unwrap();
    let revoked = format!("{}{}", &text[..start], &text[end..]);
    replace_file(&h.policy_path, &revoked);
    // When the new version took over (the watcher's debounce is not the stream's to answer
    // for): the moment the reloader reports it.
    let (reloader, want) = (h.reloader.clone(), version_of(&revoked));
    let swapped = tokio::spawn(async move {
        let t0 = Instant::now();
        while reloader.status().version != want {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "the watcher never reloaded"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Instant::now()
    });
    let err = loop {
        match s.message().await {
            Ok(Some(m)) => rows += m.rows.len() as u64,
            Ok(None) => panic!("stream ended OK after revocation"),
            Err(st) => break st,
        }
    };
    let ended = Instant::now();
    assert_reject(&err, Code::PermissionDenied, "GRANT_MISSING");
    let swapped = swapped.await.unwrap();
    // The stream re-decides as soon as the policy swaps, not at its next batch: well within
    // the second the docs promise (one provider batch takes 100 ms here).
    let after = ended.saturating_duration_since(swapped);
    assert!(
        after < Duration::from_secs(1),
        "ended {after:?} after the new policy took over"
    );
    let recs = h.stop().await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["grpc_status"], "PERMISSION_DENIED");
    assert_eq!(recs[0]["reason"], "GRANT_MISSING");
    assert_eq!(
        recs[0]["policy_version"],
        version_of(&revoked),
        "recorded under the version that decided"
    );
    // The record counts exactly the rows the caller received before the cut.
    assert_eq!(recs[0]["rows"].as_u64().unwrap(), rows);
}

#[tokio::test]
async fn describe_reports_row_scope_consistently() {
    let mut h = Harness::start(Opts::default()).await;
    let d = h
        .catalog("xihu-civil-affairs")
        .await
        .describe_dataset(req(
            pb::DescribeDatasetRequest {
                dataset: "hukou.person_basic".into(),
                purpose: "temporary-relief".into(),
            },
            &token("xihu-civil-affairs"),
        ))
        .await
        .unwrap()
        .into_inner();
    let a = d.access.unwrap();
    assert!(a.allowed);
    assert_eq!(a.row_scope, "own-region 330106");
    h.stop().await;
}

/// A reload keeps each unchanged grant's rate-limiter state (neither reset nor double
/// counted); a grant whose rate changed starts a fresh bucket.
#[tokio::test]
async fn rate_limiter_state_survives_a_reload_that_leaves_the_grant_alone() {
    let mut h = Harness::start(Opts {
        // Three calls, then one per 100 s.
        edit_policy: Some(|p| {
            p.replace(
                "rate_limit: { per_second: 50, burst: 100 }\n    valid_from: 2026-01-01          # dates are 00:00 China Standard Time\n    expires: 2030-12-31\n    approval_ref: ZJ-DSB-2026-014",
                "rate_limit: { per_second: 0.01, burst: 3 }\n    valid_from: 2026-01-01\n    expires: 2030-12-31\n    approval_ref: ZJ-DSB-2026-014",
            )
        }),
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let mut c = h.data("civil-affairs").await;
    let ask = || {
        req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        )
    };
    for _ in 0..3 {
        c.query(ask()).await.unwrap();
    }
    let st = c.query(ask()).await.unwrap_err();
    assert_reject(&st, Code::ResourceExhausted, "RATE_LIMITED");
    // Another grant changes: this one's spent bucket is kept.
    let text = std::fs::read_to_string(&h.policy_path).unwrap();
    assert!(text.contains("rate_limit: { per_second: 0.01, burst: 3 }"));
    let other = text.replacen(
        "approval_ref: ZJ-DSB-2026-0",
        "approval_ref: ZJ-DSB-2027-0",
        2,
    );
    assert_ne!(other, text);
    std::fs::write(&h.policy_path, &other).unwrap();
    let v = h.reloader.reload("test").unwrap();
    assert_eq!(v, version_of(&other));
    let st = c.query(ask()).await.unwrap_err();
    assert_reject(&st, Code::ResourceExhausted, "RATE_LIMITED");
    // This grant's rate changes: a new bucket, full.
    let raised = other.replace(
        "rate_limit: { per_second: 0.01, burst: 3 }",
        "rate_limit: { per_second: 0.01, burst: 2 }",
    );
    std::fs::write(&h.policy_path, &raised).unwrap();
    h.reloader.reload("test").unwrap();
    for _ in 0..2 {
        c.query(ask()).await.unwrap();
    }
    let st = c.query(ask()).await.unwrap_err();
    assert_reject(&st, Code::ResourceExhausted, "RATE_LIMITED");
    h.stop().await;
    assert_eq!(h.provider_calls(), 5);
}

/// An open stream whose grant changes but still allows it goes on, each batch after the
/// change shaped under the new permit (here: one field fewer), and ends OK under the new
/// version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_stream_is_reshaped_under_a_changed_grant_that_still_allows_it() {
    let mut h = Harness::start(Opts {
        behaviour: Behaviour {
            delay: Duration::from_millis(30),
            ..Behaviour::default()
        },
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let mut c = h.data("civil-affairs").await;
    let mut s = c
        .query_stream(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 100),
            &t,
        ))
        .await
        .unwrap()
        .into_inner();
    let names = |m: &pb::QueryResponse| -> Vec<String> {
        m.columns.iter().map(|c| c.name.clone()).collect()
    };
    let first = s.message().await.unwrap().unwrap();
    assert!(names(&first).contains(&"household_head".to_string()));
    let text = std::fs::read_to_string(&h.policy_path).unwrap();
    let narrowed = text.replace(
        "fields: [id_number, name, gender, birth_date, region_code, household_head]",
        "fields: [id_number, name, gender, birth_date, region_code]",
    );
    assert_ne!(narrowed, text);
    std::fs::write(&h.policy_path, &narrowed).unwrap();
    h.reloader.reload("test").unwrap();
    // Batches already on their way may still have the old shape; once one has the new
    // shape, every later one does.
    let mut reshaped = 0;
    let mut rows = first.rows.len();
    while let Some(m) = s.message().await.unwrap() {
        rows += m.rows.len();
        let n = names(&m);
        if n.contains(&"household_head".to_string()) {
            assert_eq!(reshaped, 0, "an old-shape batch after a new one");
        } else {
            assert_eq!(
                n,
                ["id_number", "name", "gender", "birth_date", "region_code"]
            );
            reshaped += 1;
        }
    }
    assert!(reshaped > 0, "no batch was shaped under the new permit");
    assert_eq!(rows, 2_000, "the whole table, to the end");
    let recs = h.stop().await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["grpc_status"], "OK");
    assert_eq!(recs[0]["rows"], 2_000);
    assert_eq!(recs[0]["policy_version"], version_of(&narrowed));
}
