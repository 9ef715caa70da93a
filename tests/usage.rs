//! "Who looked at my data": `Usage.FindUsage` for the citizen portal, answered from the
//! province trail in a real PostgreSQL that two gateway replicas ship to. A subject read
//! through two replicas is found by one call; a withholding rule hides an access until it is
//! released; the answer says nothing about anyone else nor who at a department called; a
//! system that is not the portal is refused; and every FindUsage is itself recorded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{db::Postgres, *};
use tonic::Code;
use xgate::pb::{self, usage_client::UsageClient};

const WITHHELD: &str = "  withhold:\n    - { consumer: xihu-civil-affairs, purpose: temporary-relief, reference: case 2026-113 }\n";

/// The dev policy with the citizen portal registered, limits out of the way, and `usage`.
fn with_usage(p: String) -> String {
    let p = p
        .replace(
            "  - { id: xihu-civil-affairs,",
            "  - { id: citizen-portal, name: Zhejiang Citizen Portal, level: province, region: \"330000\" }\n  - { id: xihu-civil-affairs,",
        )
        .replace(
            "rate_limit: { per_second: 5, burst: 10 }",
            "rate_limit: { per_second: 1000, burst: 1000 }",
        );
    format!("{p}\nusage:\n  portals: [{{ consumer: citizen-portal, system: portal }}]\n{WITHHELD}")
}

fn ship_hook(url: String, replica: &'static str) -> ConfigHook {
    Arc::new(move |c: &mut xgate::config::Config| {
        c.audit.ship = Some(xgate::config::Ship {
            url: url.clone(),
            password_file: None,
            replica_id: Some(replica.into()),
            batch_records: 200,
            interval_ms: 50,
        });
    })
}

/// A Usage client as `dept`/`system` (a certificate issued by the dev CA for the test).
async fn usage_as(h: &Harness, dept: &str, system: &str) -> UsageClient<tonic::transport::Channel> {
    let ca = xgate::dev::pki::DevCa::load_dir(&certs()).unwrap();
    let (cert, key) = ca
        .issue(&xgate::dev::pki::consumer_leaf(dept, system))
        .unwrap();
    UsageClient::new(channel_with(h, &cert, &key).await.unwrap())
}

async fn find(
    c: &mut UsageClient<tonic::transport::Channel>,
    dept: &str,
    id: &str,
) -> Result<Vec<pb::UsageAccess>, tonic::Status> {
    c.find_usage(req(
        pb::FindUsageRequest {
            subject_id: id.into(),
            ..Default::default()
        },
        &token(dept),
    ))
    .await
    .map(|r| r.into_inner().accesses)
}

/// Until both replicas have shipped everything they wrote.
async fn shipped(hs: &[&Harness]) {
    let t0 = Instant::now();
    for h in hs {
        loop {
            let (_, body) = http(h.admin.unwrap(), "GET", "/ready").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let s = &v["audit_shipping"];
            if s["connected"] == true && s["lag_records"] == 0 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "not shipped: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_finds_who_read_a_person_across_replicas_as_the_rules_allow() {
    if !Postgres::available() {
        eprintln!("skipped: PostgreSQL is not installed (bash .ci/deps)");
        return;
    }
    let pg = Postgres::start();
    let url = pg.url();
    let mut a = Harness::start(Opts {
        config: Some(ship_hook(url.clone(), "xgate-a")),
        edit_policy: Some(with_usage),
        admin: true,
        ..Opts::default()
    })
    .await;
    let mut b = Harness::start(Opts {
        config: Some(ship_hook(url.clone(), "xgate-b")),
        edit_policy: Some(with_usage),
        admin: true,
        ..Opts::default()
    })
    .await;

    // Through replica b, the county office reads its district (no id named); through
    // replica a, the province's civil affairs asks for one of those people by id.
    let mut x = b.data("xihu-civil-affairs").await;
    let resp = x
        .query(req(
            query("hukou.person_basic", "temporary-relief", &[], 20),
            &token("xihu-civil-affairs"),
        ))
        .await
        .unwrap()
        .into_inner();
    let col = resp
        .columns
        .iter()
        .position(|c| c.name == "id_number")
        .unwrap();
    let ids: Vec<String> = resp.rows.iter().map(|r| text(&r.values[col])).collect();
    let (p, other) = (ids[0].clone(), ids[1].clone());
    let mut ca = a.data("civil-affairs").await;
    ca.query(req(
        query(
            "hukou.person_basic",
            "subsidy-eligibility",
            &[&format!("id_number = {p}")],
            1,
        ),
        &token("civil-affairs"),
    ))
    .await
    .unwrap();
    shipped(&[&a, &b]).await;

    // The portal: the province's access is told; the county's is withheld (an open case).
    let mut portal = usage_as(&a, "citizen-portal", "portal").await;
    let seen = find(&mut portal, "citizen-portal", &p).await.unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].consumer_dept, "civil-affairs");
    assert_eq!(seen[0].dataset, "hukou.person_basic");
    assert_eq!(seen[0].purpose, "subsidy-eligibility");
    assert_eq!(seen[0].approval_ref, "ZJ-DSB-2026-014");
    assert_eq!(seen[0].action, "read");

    // Released: both accesses, through both replicas, in one answer.
    let text_now = std::fs::read_to_string(&a.policy_path).unwrap();
    replace_file(
        &a.policy_path,
        &text_now.replace(
            "reference: case 2026-113 }",
            "reference: case 2026-113, released: true }",
        ),
    );
    a.reloader.reload("test").unwrap();
    let seen = find(&mut portal, "citizen-portal", &p).await.unwrap();
    let by: Vec<&str> = seen.iter().map(|s| s.consumer_dept.as_str()).collect();
    assert_eq!(by, ["xihu-civil-affairs", "civil-affairs"], "{seen:?}");
    assert_eq!(seen[0].consumer_system, "relief");
    // Another person the county read: only that access; someone never read: nothing.
    let seen = find(&mut portal, "citizen-portal", &other).await.unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].consumer_dept, "xihu-civil-affairs");
    assert!(
        find(&mut portal, "citizen-portal", "110101199001010000")
            .await
            .unwrap()
            .is_empty()
    );

    // Not the portal: refused, with the reason; a bad id: refused.
    let mut not_portal = usage_as(&a, "civil-affairs", "subsidy").await;
    let e = find(&mut not_portal, "civil-affairs", &p)
        .await
        .unwrap_err();
    assert_reject(&e, Code::PermissionDenied, "USAGE_NOT_PORTAL");
    let e = find(&mut portal, "citizen-portal", "").await.unwrap_err();
    assert_reject(&e, Code::InvalidArgument, "REQUEST_INVALID");

    // Every FindUsage is on the trail, with the subject it asked about; the withheld access
    // is still there for auditors.
    let recs = a.stop_all().await;
    b.stop_all().await;
    let lookups: Vec<_> = recs
        .iter()
        .filter(|r| r["method"] == "/xgate.v1.Usage/FindUsage")
        .collect();
    assert_eq!(lookups.len(), 6, "{lookups:#?}");
    let p_hash = xgate::audit::subject_hash(
        &xgate::audit::load_subject_key(&certs().join("audit-subject.key")).unwrap(),
        &p,
    );
    assert!(
        lookups
            .iter()
            .any(|r| r["consumer_dept"] == "citizen-portal" && r["subjects"][0] == p_hash.as_str())
    );
    assert!(
        lookups
            .iter()
            .any(|r| r["reason"] == "USAGE_NOT_PORTAL" && r["decision"] == "deny")
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args([
            "audit",
            "search",
            "--db",
            &url,
            "--subject",
            &p,
            "--format",
            "jsonl",
        ])
        .args(["--subject-key"])
        .arg(certs().join("audit-subject.key"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("xihu-civil-affairs"),
        "the withheld access is in the trail: {text}"
    );
}

/// Without a province database, FindUsage answers from the gateway's own trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_database_the_local_trail_answers() {
    let mut h = Harness::start(Opts {
        edit_policy: Some(with_usage),
        ..Opts::default()
    })
    .await;
    let id = "330106199001010011";
    let mut ca = h.data("civil-affairs").await;
    ca.query(req(
        query(
            "hukou.person_basic",
            "subsidy-eligibility",
            &[&format!("id_number = {id}")],
            1,
        ),
        &token("civil-affairs"),
    ))
    .await
    .unwrap();
    let mut portal = usage_as(&h, "citizen-portal", "portal").await;
    // The record is on disk before the answer left (sync mode): found at once.
    let seen = find(&mut portal, "citizen-portal", id).await.unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].consumer_dept, "civil-affairs");
    h.stop().await;
}
