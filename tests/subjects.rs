//! "Who looked at my data" from what actually left: the record of every call keeps the keyed
//! hashes of the subject key of each row it returned (not only the ids its filter named), for
//! `Query` and `QueryStream` alike, and `xgate audit search --subject` finds them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

/// `xgate audit search --subject ID --format jsonl` over `dir`: the trace ids it lists.
fn search_subject(dir: &std::path::Path, id: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(["audit", "search"])
        .arg(dir)
        .args(["--subject", id, "--subject-key"])
        .arg(certs().join("audit-subject.key"))
        .args(["--format", "jsonl"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["trace_id"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whose_rows_left_is_recorded_and_found_by_subject() {
    let mut h = Harness::start(Opts {
        edit_policy: Some(|p| {
            p.replace(
                "rate_limit: { per_second: 50, burst: 100 }",
                "rate_limit: { per_second: 100000, burst: 100000 }",
            )
        }),
        ..Opts::default()
    })
    .await;

    // The reproduction: a county office reads its district by region (no id in the
    // filter), and gets people's ids in clear.
    let mut x = h.data("xihu-civil-affairs").await;
    let resp = x
        .query(req(
            query("hukou.person_basic", "temporary-relief", &[], 20),
            &token("xihu-civil-affairs"),
        ))
        .await
        .unwrap();
    let xihu_trace = trace_id(resp.metadata());
    let resp = resp.into_inner();
    let id_col = resp
        .columns
        .iter()
        .position(|c| c.name == "id_number")
        .unwrap();
    let read_by_xihu: Vec<String> = resp.rows.iter().map(|r| text(&r.values[id_col])).collect();
    assert!(!read_by_xihu.is_empty());

    // A stream of every row with only names: no id asked for, none returned, and every
    // person's data left all the same (2,000 subjects: one chunk record, then the rest in the
    // call's own record).
    let mut ca = h.data("civil-affairs").await;
    let mut q = query("hukou.person_basic", "subsidy-eligibility", &[], 500);
    q.fields = vec!["name".into()];
    let resp = ca
        .query_stream(req(q, &token("civil-affairs")))
        .await
        .unwrap();
    let stream_trace = trace_id(resp.metadata());
    let mut s = resp.into_inner();
    let mut rows = 0;
    while let Some(b) = s.message().await.unwrap() {
        assert_eq!(b.columns.len(), 1, "only the name leaves");
        rows += b.rows.len();
    }
    assert_eq!(rows, 2000);

    let records = h.stop_all().await;
    let chunks: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "returned_subjects")
        .collect();
    // Batches of 500: the chunk is written once 1,024 are held (after the third batch).
    assert_eq!(chunks.len(), 1, "2,000 subjects: one chunk");
    assert_eq!(chunks[0]["trace_id"], stream_trace.as_str());
    assert_eq!(chunks[0]["dataset"], "hukou.person_basic");
    assert_eq!(chunks[0]["consumer_dept"], "civil-affairs");
    let in_chunk = chunks[0]["returned_subjects"].as_str().unwrap().len() / 16;
    assert_eq!(in_chunk, 1500);
    let call = records
        .iter()
        .find(|r| r["trace_id"] == stream_trace.as_str() && r.get("kind").is_none())
        .unwrap();
    assert_eq!(
        call["returned_subjects"].as_str().unwrap().len() / 16,
        2000 - in_chunk,
        "the rest in the stream's own record"
    );
    // No id appears anywhere in clear.
    let everyone = xgate::dev::provider::person_table(2000);
    let trail = serde_json::to_string(&records).unwrap();
    assert!(
        everyone
            .rows
            .iter()
            .all(|r| !trail.contains(&text(&r.values[0]))),
        "an id in clear in the trail"
    );

    let dir = h.audit_dir.path().join("audit");
    // Found: the person the county office read, though its filter never named them.
    let found = search_subject(&dir, &read_by_xihu[0]);
    assert!(found.contains(&xihu_trace), "{found:?}");
    // Found by the stream's chunk and by its own record, each call listed once.
    for row in [&everyone.rows[0], &everyone.rows[1999]] {
        let found = search_subject(&dir, &text(&row.values[0]));
        assert_eq!(
            found.iter().filter(|t| **t == stream_trace).count(),
            1,
            "{found:?}"
        );
    }
    // Someone who was never returned: nothing.
    assert!(search_subject(&dir, "110101199001010000").is_empty());
    // The trail still verifies with the new records in it.
    let out = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(["audit", "verify"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
