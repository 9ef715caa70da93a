//! What administrators do is on the audit trail, in the calls' chain: every policy reload
//! (who or what triggered it, from which version to which, accepted or refused and why) and
//! every call to the admin API (on the console's HTTPS listener, signed in with an
//! officer's certificate); the probes and the metrics scrape are not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_and_admin_calls_are_recorded() {
    let mut h = Harness::start(Opts {
        admin: true,
        config: Some(std::sync::Arc::new(|c: &mut xgate::config::Config| {
            c.watch_policy = false
        })),
        ..Opts::default()
    })
    .await;
    let admin = h.admin.unwrap();
    // An API client: a certificate, no cookie, and `x-requested-by` on what changes things.
    let api = [("x-requested-by", "ops-script")];
    let mut officer = h.officer(Some("officer-bureau"));
    let before = std::fs::read_to_string(&h.policy_path).unwrap();
    let r = officer.send("GET", "/admin/policy", &api, None).await;
    let (code, body) = (r.status, r.body);
    assert_eq!(code, 200, "{body}");
    let v1: serde_json::Value = serde_json::from_str(&body).unwrap();
    let v1 = v1["version"].as_str().unwrap().to_owned();

    // A valid change, reloaded through the endpoint.
    replace_file(
        &h.policy_path,
        &before.replace(
            "approval_ref: ZJ-DSB-2026-014",
            "approval_ref: ZJ-DSB-2026-099",
        ),
    );
    // (A fresh client each time: no cookie, an API client's way.)
    let r = h
        .officer(Some("officer-bureau"))
        .send("POST", "/admin/policy/reload", &api, None)
        .await;
    let (code, body) = (r.status, r.body);
    assert_eq!(code, 200, "{body}");
    let v2: serde_json::Value = serde_json::from_str(&body).unwrap();
    let v2 = v2["version"].as_str().unwrap().to_owned();
    assert_ne!(v1, v2);
    // A broken one: refused, the old policy keeps serving.
    replace_file(&h.policy_path, &before.replace("grants:", "grants: [oops"));
    let r = h
        .officer(Some("officer-bureau"))
        .send("POST", "/admin/policy/reload", &api, None)
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    // Probes and scrapes are not administrators' actions.
    let _ = http(admin, "GET", "/metrics").await;
    let _ = http(admin, "GET", "/ready").await;

    let records = h.stop_all().await;
    let admin_recs: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["kind"] == "admin").collect();
    let reloads: Vec<_> = admin_recs
        .iter()
        .filter(|r| r["action"] == "policy.reload")
        .collect();
    assert_eq!(reloads.len(), 2, "{admin_recs:#?}");
    let ok = reloads[0];
    assert_eq!(ok["decision"], "allow");
    assert_eq!(ok["from_version"], v1.as_str());
    assert_eq!(ok["policy_version"], v2.as_str());
    assert!(
        ok["actor"]
            .as_str()
            .unwrap()
            .starts_with("officer 李明 (bureau, certificate bureau-officer-li) from 127.0.0.1:"),
        "{ok}"
    );
    let refused = reloads[1];
    assert_eq!(refused["decision"], "deny");
    assert_eq!(refused["reason"], "POLICY_INVALID");
    assert_eq!(refused["from_version"], v2.as_str());
    assert!(
        refused["detail"].as_str().unwrap().contains("policy.yaml:"),
        "the refusal says where: {refused}"
    );
    let calls: Vec<&str> = admin_recs
        .iter()
        .filter(|r| r["action"] == "console.http")
        .map(|r| r["detail"].as_str().unwrap())
        .collect();
    assert_eq!(
        calls,
        [
            "GET /admin/policy -> 200",
            "POST /admin/policy/reload -> 200",
            "POST /admin/policy/reload -> 422"
        ]
    );
    // In the same chain as the calls: the trail verifies.
    let dir = h.audit_dir.path().join("audit");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xgate"))
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

/// A reload by SIGHUP or a file change names its trigger as the actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_what_triggered_it() {
    let mut h = Harness::start(Opts::default()).await;
    let before = std::fs::read_to_string(&h.policy_path).unwrap();
    let v1 = h.reloader.status().version;
    replace_file(
        &h.policy_path,
        &before.replace(
            "approval_ref: ZJ-DSB-2026-014",
            "approval_ref: ZJ-DSB-2026-098",
        ),
    );
    let t0 = std::time::Instant::now();
    while h.reloader.status().version == v1 {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(10),
            "never reloaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let records = h.stop_all().await;
    let reload = records
        .iter()
        .find(|r| r["action"] == "policy.reload")
        .expect("a reload record");
    assert_eq!(reload["actor"], "file-change");
    assert_eq!(reload["decision"], "allow");
    assert_eq!(reload["from_version"], v1.as_str());
}

/// A search by data subject through the admin endpoint is itself on the trail: who searched,
/// when, and the subject's keyed hash (never the id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_by_subject_is_recorded() {
    let mut h = Harness::start(Opts {
        admin: true,
        ..Opts::default()
    })
    .await;
    let id = "330106199001010011";
    let mut c = h.data("civil-affairs").await;
    c.query(req(
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
    let mut auditor = h.officer(Some("officer-auditor"));
    let r = auditor
        .get(&format!("/admin/audit/search?subject={id}"))
        .await;
    let (code, body) = (r.status, r.body);
    assert_eq!(code, 200, "{body}");
    let found: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(found.len(), 1, "{body}");
    assert_eq!(found[0]["consumer_dept"], "civil-affairs");
    let r = auditor.get("/admin/audit/search?since=yesterday").await;
    assert_eq!(r.status, 400, "{}", r.body);
    let recs = h.stop_all().await;
    let hash = xgate::audit::subject_hash(
        &xgate::audit::load_subject_key(&certs().join("audit-subject.key")).unwrap(),
        id,
    );
    let search = recs
        .iter()
        .find(|r| r["action"] == "audit.search")
        .expect("the search is recorded");
    assert_eq!(search["kind"], "admin");
    assert_eq!(search["subjects"][0], hash.as_str());
    assert!(
        search["actor"]
            .as_str()
            .unwrap()
            .starts_with("officer 赵强 (auditor, certificate auditor-zhao) from 127.0.0.1:"),
        "{search}"
    );
    assert!(
        !serde_json::to_string(search).unwrap().contains(id),
        "never the id"
    );
}
