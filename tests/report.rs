//! `xgate report` on an audit trail made by a real run: a real gateway with real TLS in front
//! of the sample providers, allowed and denied calls from four departments, a refused TLS
//! handshake, and public security's backend going away mid-run. Then the real binary reports
//! on that trail in every format, and the numbers are checked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{collections::HashMap, path::Path, process::Command};

use common::*;
use tonic::Code;

/// The trail and policy of one real run (kept alive by the harness's temporary directory).
struct Run {
    h: Harness,
    records: Vec<serde_json::Value>,
}

async fn real_run() -> Run {
    let mut h = Harness::start(Opts::default()).await;
    let ca_t = token("civil-affairs");
    let mut ca = h.data("civil-affairs").await;
    for _ in 0..3 {
        ca.query(req(
            query(
                "hukou.person_basic",
                "subsidy-eligibility",
                &["region_code=330106"],
                2,
            ),
            &ca_t,
        ))
        .await
        .unwrap();
    }
    let st = ca
        .query(req(query("hukou.person_basic", "marketing", &[], 1), &ca_t))
        .await
        .unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "PURPOSE_NOT_ALLOWED");
    let st = ca
        .query(req(
            query("hukou.criminal_record", "subsidy-eligibility", &[], 1),
            &ca_t,
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "SHARE_TYPE_NONE");

    let health_t = token("health");
    let mut health = h.data("health").await;
    for _ in 0..2 {
        let st = health
            .query(req(
                query("hukou.person_basic", "medical-insurance", &[], 1),
                &health_t,
            ))
            .await
            .unwrap_err();
        assert_reject(&st, Code::PermissionDenied, "GRANT_MISSING");
        health
            .query(req(
                query(
                    "market.company_registry",
                    "medical-institution-licensing",
                    &[],
                    1,
                ),
                &health_t,
            ))
            .await
            .unwrap();
    }

    let mut xihu = h.data("xihu-civil-affairs").await;
    xihu.query(req(
        query("hukou.person_basic", "temporary-relief", &[], 1),
        &token("xihu-civil-affairs"),
    ))
    .await
    .unwrap();

    let ms_t = token("market-supervision");
    let mut ms = h.data("market-supervision").await;
    let st = ms
        .query(req(
            query("hukou.criminal_record", "market-inspection", &[], 1),
            &ms_t,
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::PermissionDenied, "SHARE_TYPE_NONE");
    ms.query(req(
        query("market.company_registry", "market-inspection", &[], 1),
        &ms_t,
    ))
    .await
    .unwrap();

    // Someone without a client certificate knocks: unattributed.
    assert!(!call_goes_through(&h, None).await);

    // Public security's backend goes away (the policy now points at a port nobody serves).
    let dead = free_port();
    let text = std::fs::read_to_string(&h.policy_path).unwrap();
    let moved: Vec<String> = text
        .lines()
        .map(|l| {
            if l.contains("id: public-security,") && l.contains("endpoint:") {
                let start = l.find("https://127.0.0.1:").unwrap() + "https://127.0.0.1:".len();
                let end = start + l[start..].find('"').unwrap();
                format!("{}{dead}{}", &l[..start], &l[end..])
            } else {
                l.to_owned()
            }
        })
        .collect();
    replace_file(&h.policy_path, &(moved.join("\n") + "\n"));
    h.reloader.reload("test").unwrap();
    let st = ca
        .query(req(
            query(
                "hukou.person_basic",
                "subsidy-eligibility",
                &["region_code=330106"],
                1,
            ),
            &ca_t,
        ))
        .await
        .unwrap_err();
    assert_reject(&st, Code::Unavailable, "PROVIDER_UNAVAILABLE");

    let records = h.stop().await;
    assert_eq!(records.len(), 14, "{records:#?}");
    Run { h, records }
}

fn xgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn report(run: &Run, extra: &[&str]) -> String {
    let dir = run.h.audit_path.to_str().unwrap();
    let policy = run.h.policy_path.to_str().unwrap();
    let mut args = vec!["report", dir, "--policy", policy];
    args.extend_from_slice(extra);
    let out = xgate(&args);
    assert!(
        out.status.success(),
        "xgate {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A minimal RFC 4180 reader (quoted cells, doubled quotes).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let mut cells = vec![String::new()];
        let mut quoted = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, quoted) {
                ('"', true) if chars.peek() == Some(&'"') => {
                    chars.next();
                    cells.last_mut().unwrap().push('"');
                }
                ('"', _) => quoted = !quoted,
                (',', false) => cells.push(String::new()),
                (c, _) => cells.last_mut().unwrap().push(c),
            }
        }
        rows.push(cells);
    }
    rows
}

#[tokio::test]
async fn league_table_from_a_real_run_in_every_format() {
    let run = real_run().await;

    // JSON: the whole structure.
    let json: serde_json::Value =
        serde_json::from_str(&report(&run, &["--format", "json", "--period", "all"]))
            .expect("report --format json is JSON");
    assert_eq!(json["records"], 14);
    assert_eq!(json["period"], "all");
    let periods = json["periods"].as_array().unwrap();
    assert_eq!(periods.len(), 1, "--period all: one period");
    let p = &periods[0];
    let dept = |id: &str| {
        p["departments"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["department"] == id)
            .unwrap_or_else(|| panic!("{id} missing: {p:#}"))
            .clone()
    };
    let ca = dept("civil-affairs");
    assert_eq!(ca["consumed"]["calls"], 6);
    assert_eq!(ca["consumed"]["allowed"], 4);
    assert_eq!(ca["consumed"]["denied"], 2);
    assert_eq!(
        ca["consumed"]["denials_by_reason"]["PURPOSE_NOT_ALLOWED"],
        1
    );
    assert_eq!(ca["consumed"]["denials_by_reason"]["SHARE_TYPE_NONE"], 1);
    assert_eq!(ca["consumed"]["provider_errors"], 1);
    assert_eq!(ca["consumed"]["datasets"], 1);
    assert_eq!(ca["provided"]["calls"], 0);
    assert!(ca["consumed"]["p50_us"].as_u64().unwrap() > 0);

    let ps = dept("public-security");
    assert_eq!(ps["provided"]["calls"], 10);
    assert_eq!(ps["provided"]["allowed"], 5);
    assert_eq!(ps["provided"]["denied"], 5);
    assert_eq!(ps["provided"]["denial_rate"], 0.5);
    assert_eq!(
        ps["provided"]["denials_by_reason"],
        serde_json::json!({"GRANT_MISSING": 2, "SHARE_TYPE_NONE": 2, "PURPOSE_NOT_ALLOWED": 1})
    );
    assert_eq!(
        ps["provided"]["datasets"], 1,
        "criminal records were never served"
    );
    assert_eq!(ps["provided"]["provider_errors"], 1);
    assert_eq!(ps["provided"]["availability"], 0.8);
    let (p50, p99) = (
        ps["provided"]["p50_us"].as_u64().unwrap(),
        ps["provided"]["p99_us"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99, "{p50} {p99}");
    // Latencies of the five allowed calls to public security, straight from the trail.
    let mut lat: Vec<u64> = run
        .records
        .iter()
        .filter(|r| r["dataset"] == "hukou.person_basic" && r["decision"] == "allow")
        .map(|r| r["latency_us"].as_u64().unwrap())
        .collect();
    lat.sort();
    assert_eq!(lat.len(), 5);
    assert_eq!((p50, p99), (lat[2], lat[4]));

    let msup = dept("market-supervision");
    assert_eq!(msup["provided"]["calls"], 3);
    assert_eq!(msup["provided"]["availability"], 1.0);
    assert_eq!(msup["consumed"]["calls"], 2);
    assert_eq!(msup["consumed"]["denials_by_reason"]["SHARE_TYPE_NONE"], 1);
    let health = dept("health");
    assert_eq!(health["consumed"]["calls"], 4);
    assert_eq!(health["consumed"]["denials_by_reason"]["GRANT_MISSING"], 2);
    assert_eq!(health["consumed"]["denial_rate"], 0.5);
    assert_eq!(dept("xihu-civil-affairs")["consumed"]["calls"], 1);

    // Ranking: 0.4 × 5/5 + 0.3 × 1/1 + 0.3 × 0.8 = 94; 0.4 × 3/5 + 0.3 + 0.3 = 84.
    let ranked: Vec<_> = p["departments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["department"].as_str().unwrap().to_owned(),
                d["rank"].as_u64(),
                d["score"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ranked[0], ("public-security".into(), Some(1), 94.0));
    assert_eq!(ranked[1], ("market-supervision".into(), Some(2), 84.0));
    assert!(
        ranked[2..]
            .iter()
            .all(|(_, r, s)| *r == Some(3) && *s == 0.0)
    );
    assert_eq!(ranked.len(), 5, "no (unknown) provider in this run");

    assert_eq!(p["unattributed"]["records"], 1);
    assert_eq!(p["unattributed"]["by_reason"]["TLS_HANDSHAKE_FAILED"], 1);

    // CSV: header plus one row per department and one unattributed row.
    let csv = parse_csv(&report(&run, &["--format", "csv", "--period", "all"]));
    let header = &csv[0];
    assert_eq!(header[..3], ["period", "rank", "department"]);
    assert!(csv.iter().all(|r| r.len() == header.len()), "{csv:?}");
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let rows: HashMap<&str, &Vec<String>> = csv[1..]
        .iter()
        .map(|r| (r[col("department")].as_str(), r))
        .collect();
    assert_eq!(rows.len(), 6);
    let ps = rows["public-security"];
    assert_eq!(ps[col("rank")], "1");
    assert_eq!(ps[col("provided_calls")], "10");
    assert_eq!(ps[col("availability")], "0.8000");
    assert_eq!(
        ps[col("provided_denials_by_reason")],
        "GRANT_MISSING=2;SHARE_TYPE_NONE=2;PURPOSE_NOT_ALLOWED=1"
    );
    assert_eq!(rows["civil-affairs"][col("consumed_calls")], "6");
    assert_eq!(rows["health"][col("consumed_denial_rate")], "0.5000");
    assert_eq!(rows["(unattributed)"][col("consumed_calls")], "1");
    assert_eq!(rows["(unattributed)"][col("rank")], "");

    // Table (the default format), with the default --policy (deploy/dev/policy.yaml: the
    // same owners), the unattributed line and the reasons.
    let dir = run.h.audit_path.to_str().unwrap();
    let out = xgate(&["report", dir, "--period", "all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let ps_line = table
        .lines()
        .find(|l| l.trim_start().starts_with("1 ") && l.contains("public-security"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        ps_line.contains("94.0") && ps_line.contains("80.0%"),
        "{ps_line}"
    );
    assert!(table.contains("GRANT_MISSING 2"), "{table}");
    // In Chinese by default, the columns lined up in terminal cells (CJK takes two).
    assert!(table.starts_with("数据共享排行榜："), "{table}");
    assert!(
        table.contains("未归属任何部门（不参与排名）：1 条记录：TLS_HANDSHAKE_FAILED 1"),
        "{table}"
    );
    let head = table.lines().find(|l| l.contains("名次")).unwrap();
    let head_cells: usize = head
        .chars()
        .map(|c| if c as u32 >= 0x3000 { 2 } else { 1 })
        .sum();
    assert_eq!(head_cells, ps_line.chars().count(), "{head}\n{ps_line}");
    let en = xgate(&["report", dir, "--period", "all", "--lang", "en"]);
    let en = String::from_utf8(en.stdout).unwrap();
    assert!(
        en.contains(
            "unattributed (no consumer department, not ranked): 1 record(s): TLS_HANDSHAKE_FAILED 1"
        ),
        "{en}"
    );
    let bad_lang = xgate(&["report", dir, "--lang", "fr"]);
    assert_eq!(bad_lang.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_lang.stderr).contains("--lang `fr`: zh-CN or en"));

    // HTML to a file: self-contained, with charts and the ranking explained.
    let html_path = run.h.audit_dir.path().join("league.html");
    let out_arg = html_path.to_str().unwrap();
    assert_eq!(
        report(
            &run,
            &["--format", "html", "--period", "all", "--out", out_arg]
        ),
        ""
    );
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(html.matches("<svg").count(), 3, "three charts");
    assert!(!html.contains("<script"));
    assert!(!html.contains("https://"));
    assert!(!html.contains("<link"));
    assert!(!html.contains("@import") && !html.contains("url("));
    assert_eq!(
        html.matches("http://").count(),
        html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count(),
        "the only http:// is the SVG namespace name"
    );
    assert!(html.contains("Provincial Public Security Department"));
    assert!(html.contains("GRANT_MISSING"));
    assert!(html.contains("<html lang=\"zh-CN\">"), "Chinese by default");
    assert!(html.contains("<b>得分</b>（0 至 100）= 40 ×"));
    assert!(html.contains("<th>使用方得分</th>"));
    assert_eq!(
        report(
            &run,
            &[
                "--format", "html", "--period", "all", "--lang", "en", "--out", out_arg
            ]
        ),
        ""
    );
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert!(html.contains("Score</b> (0 to 100) = 40 ×"));
    assert!(html.contains("<th>Consumer score</th>"));

    // Filters and periods: nothing before the run; everything by month; a clear error.
    let none: serde_json::Value =
        serde_json::from_str(&report(&run, &["--format", "json", "--to", "2020-01-01"])).unwrap();
    assert_eq!(none["records"], 0);
    assert_eq!(none["periods"], serde_json::json!([]));
    let month: serde_json::Value = serde_json::from_str(&report(
        &run,
        &[
            "--format",
            "json",
            "--period",
            "month",
            "--from",
            "2020-01-01",
            "--utc-offset",
            "+08:00",
        ],
    ))
    .unwrap();
    assert_eq!(month["records"], 14);
    let label = month["periods"][0]["period"].as_str().unwrap();
    assert_eq!(label.len(), 7, "{label}");

    let bad = xgate(&["report", dir, "--period", "fortnight"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--period `fortnight`"));
    let missing = xgate(&["report", "/nonexistent/trail"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not an audit trail directory"));
    assert!(Path::new(&html_path).exists());
}
