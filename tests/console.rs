//! The bureau's console over real HTTPS with the dev officers' certificates: sign-in by
//! certificate, what each role may open (403 elsewhere, recorded), cookie and header flags,
//! CSRF, Explain against `xgate policy explain`, and the change preview against `xgate policy
//! impact` on a trail the test makes. (The browser run is tests/e2e/test_console.py.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

async fn console() -> Harness {
    Harness::start(Opts {
        admin: true,
        ..Opts::default()
    })
    .await
}

fn admin_records(recs: &[serde_json::Value], action: &str) -> Vec<serde_json::Value> {
    recs.iter()
        .filter(|r| r["kind"] == "admin" && r["action"] == action)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_sees_what_it_may_and_is_refused_elsewhere_on_the_record() {
    let mut h = console().await;
    // No certificate: 401, and a certificate of nobody on the list: 403.
    let r = h.officer(None).get("/").await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.body.contains("需要官员证书"),
        "zh-CN by default: {}",
        r.body
    );
    let r = h.officer(Some("officer-visitor")).get("/").await;
    assert_eq!(r.status, 403, "{}", r.body);
    // A consumer system's certificate is no officer either.
    let r = h.officer(Some("civil-affairs")).get("/overview").await;
    assert_eq!(r.status, 403);
    // An unknown path is a 404 page for anyone (not an error naming internals).
    for who in [None, Some("officer-bureau")] {
        let r = h.officer(who).get("/no/such/page").await;
        assert_eq!(r.status, 404, "{}", r.body);
        assert!(r.body.contains("未找到"), "{}", r.body);
    }

    let cases: &[(&str, &[(&str, u16)])] = &[
        (
            "officer-bureau",
            &[
                ("/", 303),
                ("/overview", 200),
                ("/catalogue", 200),
                ("/departments/health", 200),
                ("/explain", 200),
                ("/preview", 200),
                ("/audit", 200),
                ("/league", 200),
                ("/admin/policy", 200),
            ],
        ),
        (
            "officer-civil-affairs",
            &[
                ("/", 303),
                ("/departments/civil-affairs", 200),
                ("/catalogue", 200),
                ("/explain", 200),
                ("/audit", 200),
                ("/overview", 403),
                ("/departments/health", 403),
                ("/preview", 403),
                ("/league", 403),
                ("/admin/policy", 403),
            ],
        ),
        (
            "officer-auditor",
            &[
                ("/", 303),
                ("/audit", 200),
                ("/overview", 403),
                ("/catalogue", 403),
                ("/explain", 403),
                ("/admin/policy", 403),
            ],
        ),
    ];
    for (stem, pages) in cases {
        let mut o = h.officer(Some(stem));
        for (path, want) in pages.iter() {
            let r = o.get(path).await;
            assert_eq!(r.status, *want, "{stem} {path}: {}", r.body);
            if *want == 200 && !path.starts_with("/admin") {
                assert!(r.body.contains("<html lang=\"zh-CN\">"), "{stem} {path}");
            }
        }
    }
    // What a department administrator's catalogue shows: its own datasets and those it holds
    // grants on, not the rest.
    let mut wang = h.officer(Some("officer-civil-affairs"));
    let cat = wang.get("/catalogue").await.body;
    assert!(cat.contains("hukou.person_basic"), "it holds a grant on it");
    let all = h
        .officer(Some("officer-bureau"))
        .get("/catalogue")
        .await
        .body;
    let count = |b: &str| b.matches("<article class=\"dataset\"").count();
    assert!(
        count(&cat) < count(&all),
        "{} of {}",
        count(&cat),
        count(&all)
    );

    let recs = h.stop_all().await;
    let denied = admin_records(&recs, "console.denied");
    let said: Vec<&str> = denied
        .iter()
        .map(|r| r["detail"].as_str().unwrap())
        .collect();
    assert!(
        said.iter()
            .any(|d| d.contains("GET / -> 401: no officer certificate")),
        "{said:#?}"
    );
    assert!(
        said.iter().any(|d| d.contains("not a console officer")),
        "{said:#?}"
    );
    assert!(
        said.contains(&"GET /overview -> 403: role dept_admin may not"),
        "{said:#?}"
    );
    assert!(
        said.iter()
            .any(|d| d.starts_with("GET /departments/health -> 403: outside department")),
        "{said:#?}"
    );
    assert!(denied.iter().all(|r| r["decision"] == "deny"));
    // Sign-ins and page views, with who.
    let signins = admin_records(&recs, "console.signin");
    assert!(signins.iter().any(|r| {
        r["actor"]
            .as_str()
            .unwrap()
            .starts_with("officer 王芳 (dept_admin, certificate civil-affairs-admin-wang)")
    }));
    let views = admin_records(&recs, "console.http");
    assert!(
        views.iter().any(|r| r["detail"] == "GET /catalogue -> 200"),
        "{views:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_headers_and_csrf() {
    let mut h = console().await;
    let mut li = h.officer(Some("officer-bureau"));
    let r = li.get("/overview").await;
    assert_eq!(r.status, 200);
    let cookie = r.header("set-cookie").unwrap().to_owned();
    assert!(cookie.starts_with("__Host-xgate_session="), "{cookie}");
    for flag in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    let csp = r.header("content-security-policy").unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
    assert!(csp.contains("frame-ancestors 'none'"));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(!r.body.contains("<script>"), "no inline script");
    assert!(!r.body.contains("style=\""), "no inline style");
    // The second request uses the session: no new cookie.
    let r2 = li.get("/catalogue").await;
    assert!(r2.header("set-cookie").is_none());
    let token = r2.csrf();

    // A form without the token, or with another's, is refused; with it, it works.
    let r = li.post_form("/lang", &[("lang", "en")]).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = li
        .post_form("/lang", &[("lang", "en"), ("csrf", "0000")])
        .await;
    assert_eq!(r.status, 403);
    let r = li
        .post_form("/lang", &[("lang", "en"), ("csrf", &token)])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let r = li.get("/overview").await;
    assert!(r.body.contains("<html lang=\"en\">") && r.body.contains("Overview"));
    // The admin API from a browser session: the cookie alone is not enough.
    let r = li.send("POST", "/admin/policy/reload", &[], None).await;
    assert_eq!(r.status, 403);
    let r = li
        .send(
            "POST",
            "/admin/policy/reload",
            &[("x-requested-by", "evil")],
            None,
        )
        .await;
    assert_eq!(r.status, 403, "a cookie-bearing request needs the token");
    let r = li
        .send(
            "POST",
            "/admin/policy/reload",
            &[("x-csrf-token", &token)],
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The session is bound to the certificate: the same cookie over another officer's
    // connection opens a new session for that officer, and the old token is worthless there.
    let mut chen = h.officer(Some("officer-bureau-2"));
    chen.cookie = li.cookie.clone();
    let r = chen
        .send(
            "POST",
            "/admin/policy/reload",
            &[("x-csrf-token", &token)],
            None,
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_ne!(chen.cookie, li.cookie, "a new session, not Li's");
    // An API client (no cookie, `x-requested-by`) keeps no session.
    let mut api = h.officer(Some("officer-bureau"));
    let r = api
        .send("GET", "/admin/policy", &[("x-requested-by", "ops")], None)
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("set-cookie").is_none(),
        "no session for an API call"
    );
    // Signing out ends the session.
    let r = li.post_form("/signout", &[("csrf", &token)]).await;
    assert_eq!(r.status, 200);
    assert!(li.cookie.is_none(), "the cookie is cleared");
    let recs = h.stop_all().await;
    let refused = admin_records(&recs, "console.denied");
    assert!(
        refused
            .iter()
            .filter(|r| r["detail"]
                .as_str()
                .unwrap()
                .ends_with("403: no valid CSRF token"))
            .count()
            >= 4
    );
}

/// What `xgate policy explain` prints as its verdict: ("allow", rule) or ("deny", reason).
fn cli_explain(policy: &std::path::Path, args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(["policy", "explain", "--policy"])
        .arg(policy)
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = text
        .lines()
        .find(|l| l.starts_with("ALLOW ") || l.starts_with("DENY "))
        .unwrap_or_else(|| panic!("no verdict: {text}"))
        .to_owned();
    match last.split_once(' ') {
        Some(("ALLOW", rest)) => ("allow".into(), rest.trim_start_matches("under ").into()),
        Some(("DENY", rest)) => ("deny".into(), rest.split(' ').next().unwrap().into()),
        _ => unreachable!(),
    }
}

fn between<'a>(body: &'a str, start: &str, end: &str) -> &'a str {
    let a = body
        .find(start)
        .unwrap_or_else(|| panic!("no {start} in {body}"))
        + start.len();
    let b = body[a..].find(end).unwrap() + a;
    &body[a..b]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_matches_the_cli_on_a_table_of_cases() {
    let h = console().await;
    let mut li = h.officer(Some("officer-bureau"));
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        (
            "civil-affairs",
            "subsidy",
            "hukou.person_basic",
            "subsidy-eligibility",
            "",
        ),
        (
            "civil-affairs",
            "subsidy",
            "hukou.person_basic",
            "marketing",
            "",
        ),
        (
            "civil-affairs",
            "subsidy",
            "hukou.person_basic",
            "subsidy-eligibility",
            "id_number,name",
        ),
        (
            "civil-affairs",
            "subsidy",
            "hukou.person_basic",
            "subsidy-eligibility",
            "phone",
        ),
        (
            "health",
            "his",
            "hukou.person_basic",
            "medical-insurance",
            "",
        ),
        (
            "civil-affairs",
            "subsidy",
            "hukou.criminal_record",
            "subsidy-eligibility",
            "",
        ),
        (
            "no-such-dept",
            "x",
            "hukou.person_basic",
            "subsidy-eligibility",
            "",
        ),
        (
            "civil-affairs",
            "subsidy",
            "no.such.dataset",
            "subsidy-eligibility",
            "",
        ),
        (
            "xihu-civil-affairs",
            "relief",
            "hukou.person_basic",
            "temporary-relief",
            "",
        ),
        (
            "market-supervision",
            "registry-portal",
            "market.company_registry",
            "",
            "",
        ),
    ];
    for (consumer, system, dataset, purpose, fields) in cases {
        let mut args = vec![
            "--consumer",
            consumer,
            "--system",
            system,
            "--dataset",
            dataset,
            "--purpose",
            purpose,
        ];
        if !fields.is_empty() {
            args.extend(["--fields", fields]);
        }
        let (verdict, detail) = cli_explain(&h.policy_path, &args);
        let q = form_urlencoded::Serializer::new(String::new())
            .extend_pairs([
                ("consumer", *consumer),
                ("system", system),
                ("dataset", dataset),
                ("purpose", purpose),
                ("fields", fields),
            ])
            .finish();
        let r = li.get(&format!("/explain?{q}")).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let page_verdict = if r.body.contains("<span id=\"decision\">允许</span>") {
            "allow"
        } else if r.body.contains("<span id=\"decision\">拒绝</span>") {
            "deny"
        } else {
            panic!("no decision on the page: {}", r.body)
        };
        assert_eq!(
            page_verdict, verdict,
            "{consumer} {dataset} {purpose} {fields}"
        );
        if verdict == "allow" {
            assert_eq!(between(&r.body, "<code id=\"rule\">", "</code>"), detail);
        } else {
            assert_eq!(between(&r.body, "<code id=\"reason\">", "</code>"), detail);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_preview_counts_a_tightening_on_recorded_traffic() {
    let mut h = console().await;
    // Traffic: 4 allowed calls by civil-affairs, 2 by xihu-civil-affairs.
    let mut ca = h.data("civil-affairs").await;
    for _ in 0..4 {
        ca.query(req(
            query(
                "hukou.person_basic",
                "subsidy-eligibility",
                &["region_code = 330106"],
                1,
            ),
            &token("civil-affairs"),
        ))
        .await
        .unwrap();
    }
    let mut xihu = h.data("xihu-civil-affairs").await;
    for _ in 0..2 {
        xihu.query(req(
            query("hukou.person_basic", "temporary-relief", &[], 1),
            &token("xihu-civil-affairs"),
        ))
        .await
        .unwrap();
    }
    // The candidate: civil-affairs' grant no longer names the purpose it used, and
    // xihu's `name` is masked.
    let current = std::fs::read_to_string(&h.policy_path).unwrap();
    assert!(current.contains("subsidy-eligibility"));
    let candidate = current.replacen(
        "purposes: [subsidy-eligibility",
        "purposes: [subsidy-review",
        1,
    );
    assert_ne!(
        candidate, current,
        "the dev policy's grant is where the test expects"
    );
    let mut li = h.officer(Some("officer-bureau"));
    let form = li.get("/preview").await;
    assert_eq!(form.status, 200);
    let token = form.csrf();
    let r = li
        .post_form(
            "/preview",
            &[("csrf", &token), ("candidate", &candidate), ("days", "1")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("策略检查通过"), "{}", r.body);
    assert!(
        r.body.contains("TIGHTENS civil-affairs"),
        "the diff in words"
    );
    let impact = between(&r.body, "<table class=\"list\" id=\"impact\">", "</table>");
    let row = impact
        .split("<tr>")
        .find(|row| row.contains("<td>civil-affairs</td>"))
        .unwrap_or_else(|| panic!("no civil-affairs row: {impact}"));
    assert!(row.contains("<td class=\"num refused\">4</td>"), "{row}");
    assert!(row.contains("PURPOSE_NOT_ALLOWED"), "{row}");
    // A broken candidate: the check's errors with their locations, no impact.
    let r = li
        .post_form(
            "/preview",
            &[
                ("csrf", &token),
                ("candidate", "grants: [oops"),
                ("days", "1"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("策略检查错误") && r.body.contains("id=\"errors\""));
    // The CLI gives the same counts over the same trail.
    let cand_path = h.audit_dir.path().join("candidate.yaml");
    std::fs::write(&cand_path, &candidate).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(["policy", "impact"])
        .arg(&cand_path)
        .arg("--policy")
        .arg(&h.policy_path)
        .arg("--audit")
        .arg(&h.audit_path)
        .args(["--since", "1d", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ca_row = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["consumer"] == "civil-affairs")
        .unwrap();
    assert_eq!(ca_row["now_refused"], 4, "{v}");
    assert_eq!(ca_row["new_reasons"]["PURPOSE_NOT_ALLOWED"], 4, "{v}");
    assert!(v["replayed"].as_u64().unwrap() >= 6, "{v}");
    h.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_search_by_subject_is_for_auditors_recorded_and_exports_csv() {
    let mut h = console().await;
    let id = "330106199001010011";
    h.data("civil-affairs")
        .await
        .query(req(
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
    let mut zhao = h.officer(Some("officer-auditor"));
    let r = zhao.get(&format!("/audit?subject={id}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(between(&r.body, "<span id=\"matched\">", "</span>"), "1");
    // The id is on the page only where the auditor typed it: the form and the export link.
    assert_eq!(r.body.matches(id).count(), 2, "{}", r.body);
    let csv = zhao.get(&format!("/audit/export.csv?subject={id}")).await;
    assert_eq!(csv.status, 200);
    assert_eq!(csv.header("content-type"), Some("text/csv; charset=utf-8"));
    assert!(csv.body.starts_with("time,trace_id,consumer_dept"));
    // The call, and the page's search a moment before: searching for a person is itself
    // an access to that person's trail.
    assert_eq!(csv.body.lines().count(), 3, "{}", csv.body);
    assert!(
        csv.body
            .lines()
            .nth(2)
            .unwrap()
            .contains(",admin:audit.search,"),
        "{}",
        csv.body
    );
    // A department administrator may not search by subject.
    let mut wang = h.officer(Some("officer-civil-affairs"));
    let r = wang.get(&format!("/audit?subject={id}")).await;
    assert!(r.body.contains("for auditors and the bureau"), "{}", r.body);
    let recs = h.stop_all().await;
    let searches = admin_records(&recs, "audit.search");
    assert_eq!(searches.len(), 2, "page and export: {searches:#?}");
    assert!(searches.iter().all(|s| {
        s["actor"]
            .as_str()
            .unwrap()
            .starts_with("officer 赵强 (auditor")
    }));
    assert!(!serde_json::to_string(&recs).unwrap().contains(id));
}

/// What the policy says is shown escaped: a title with markup is text, not markup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_text_is_escaped_on_the_page() {
    fn hostile(p: String) -> String {
        p.replacen(
            "title: ",
            "title: \"<script>alert('x')</script><b>bold</b>\" # ",
            1,
        )
    }
    let h = Harness::start(Opts {
        admin: true,
        edit_policy: Some(hostile),
        ..Opts::default()
    })
    .await;
    let r = h.officer(Some("officer-bureau")).get("/catalogue").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("<script>alert"), "{}", r.body);
    assert!(r.body.contains("&lt;script&gt;alert("), "{}", r.body);
    assert!(!r.body.contains("<b>bold</b>"));
}

/// Where the console manages the policy file: one bureau officer proposes, a second approves,
/// the file is replaced and reloaded, and both names are on the trail. The proposer cannot
/// approve; a proposal made against a policy no longer serving cannot be approved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_needs_a_second_bureau_officer() {
    let mut h = Harness::start(Opts {
        admin: true,
        config: Some(std::sync::Arc::new(|c: &mut xgate::config::Config| {
            c.watch_policy = false;
            if let Some(console) = c.console.as_mut() {
                console.policy_managed = true;
            }
        })),
        ..Opts::default()
    })
    .await;
    let current = std::fs::read_to_string(&h.policy_path).unwrap();
    let v0 = h.reloader.status().version;
    let tighter = current.replacen(
        "purposes: [subsidy-eligibility, minimum-living-allowance]",
        "purposes: [subsidy-eligibility]",
        1,
    );
    assert_ne!(tighter, current);
    let mut li = h.officer(Some("officer-bureau"));
    let token = li.get("/preview").await.csrf();
    // The preview offers the proposal; proposing lists it.
    let r = li
        .post_form(
            "/preview",
            &[("csrf", &token), ("candidate", &tighter), ("days", "1")],
        )
        .await;
    assert!(r.body.contains("id=\"propose\""), "{}", r.body);
    let r = li
        .post_form("/proposals", &[("csrf", &token), ("candidate", &tighter)])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let list = li.get("/proposals").await.body;
    let id = between(&list, "id=\"proposal-", "\"").to_owned();
    assert!(
        list.contains("minimum-living-allowance"),
        "the change in words: {list}"
    );
    // The proposer cannot approve it.
    let r = li
        .post_form(&format!("/proposals/{id}/approve"), &[("csrf", &token)])
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(std::fs::read_to_string(&h.policy_path).unwrap(), current);
    // A department administrator cannot even see the list.
    assert_eq!(
        h.officer(Some("officer-civil-affairs"))
            .get("/proposals")
            .await
            .status,
        403
    );
    // A second bureau officer approves: the file is the candidate, and it serves.
    let mut chen = h.officer(Some("officer-bureau-2"));
    let token2 = chen.get("/proposals").await.csrf();
    let r = chen
        .post_form(&format!("/proposals/{id}/approve"), &[("csrf", &token2)])
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(std::fs::read_to_string(&h.policy_path).unwrap(), tighter);
    let v1 = h.reloader.status().version;
    assert_ne!(v1, v0);
    // A proposal made against v0 before that: stale now, refused.
    let other = current.replacen(
        "approval_ref: ZJ-DSB-2026-014",
        "approval_ref: ZJ-DSB-2026-777",
        1,
    );
    let token = li.get("/proposals").await.csrf();
    li.post_form("/proposals", &[("csrf", &token), ("candidate", &other)])
        .await;
    // (Proposed against v1, which serves: make it stale by approving another first.)
    let third = tighter.replacen(
        "approval_ref: ZJ-DSB-2026-014",
        "approval_ref: ZJ-DSB-2026-888",
        1,
    );
    let mut chen_list = chen.get("/proposals").await.body;
    let stale_id = between(&chen_list, "id=\"proposal-", "\"").to_owned();
    chen.post_form("/proposals", &[("csrf", &token2), ("candidate", &third)])
        .await;
    chen_list = li.get("/proposals").await.body;
    let third_id = chen_list
        .split("id=\"proposal-")
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].to_owned())
        .find(|x| *x != stale_id)
        .unwrap();
    let r = li
        .post_form(
            &format!("/proposals/{third_id}/approve"),
            &[("csrf", &token)],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    let r = chen
        .post_form(
            &format!("/proposals/{stale_id}/approve"),
            &[("csrf", &token2)],
        )
        .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(std::fs::read_to_string(&h.policy_path).unwrap(), third);

    let recs = h.stop_all().await;
    let approved = admin_records(&recs, "policy.approved");
    assert_eq!(approved.len(), 2, "{approved:#?}");
    let d = approved[0]["detail"].as_str().unwrap();
    assert!(
        d.contains("by 李明 (certificate bureau-officer-li) approved by 陈静 (certificate bureau-officer-chen)"),
        "{d}"
    );
    assert_eq!(approved[0]["from_version"], v0.as_str());
    assert_eq!(approved[0]["policy_version"], v1.as_str());
    assert_eq!(admin_records(&recs, "policy.proposed").len(), 3);
    let reload = admin_records(&recs, "policy.reload");
    assert!(
        reload[0]["actor"]
            .as_str()
            .unwrap()
            .contains("approving proposal"),
        "{reload:#?}"
    );
    let denied = admin_records(&recs, "console.denied");
    assert!(denied.iter().any(|r| {
        r["detail"]
            .as_str()
            .unwrap()
            .contains("the proposer cannot approve their own proposal")
    }));
    assert!(denied.iter().any(|r| {
        r["detail"]
            .as_str()
            .unwrap()
            .contains("-> 409: proposed against")
    }));
}

/// Anyone can knock without a certificate: those refusals are recorded up to a rate, and the
/// rest counted into the next record, so the console cannot be used to flood the trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_strangers_are_rate_limited_on_the_trail() {
    let mut h = console().await;
    let t0 = std::time::Instant::now();
    let long = format!("/departments/{}", "x".repeat(5000));
    for _ in 0..250 {
        assert_eq!(h.officer(None).get(&long).await.status, 401);
    }
    let took = t0.elapsed();
    let recs = h.stop_all().await;
    let denied = admin_records(&recs, "console.denied");
    let counted: u64 = denied
        .iter()
        .filter_map(|r| {
            let d = r["detail"].as_str()?;
            let (_, rest) = d.split_once("(+")?;
            rest.split_once(' ')?.0.parse::<u64>().ok()
        })
        .sum();
    let cap = 100.0 + 20.0 * took.as_secs_f64() + 1.0;
    assert!(
        denied.len() as f64 <= cap,
        "{} records in {took:?}",
        denied.len()
    );
    assert!(denied.len() as u64 + counted <= 250);
    assert!(
        denied
            .iter()
            .all(|r| r["detail"].as_str().unwrap().len() < 400),
        "the caller's path is cut short"
    );
}
