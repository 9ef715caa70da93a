//! The bureau's tools, run as the real binary: `policy check`, `policy diff`, `policy explain`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn xgate(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xgate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_accepts_the_dev_policy() {
    let (code, out) = xgate(&["policy", "check", "deploy/dev/policy.yaml"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("OK") && out.contains("version sha256:"),
        "{out}"
    );
}

#[test]
fn check_refuses_broken_files_with_located_errors_and_hints() {
    // (file, how many errors, text each must contain)
    let cases: &[(&str, usize, &[&str])] = &[
        ("broken-syntax.yaml", 1, &["broken-syntax.yaml:", "yaml"]),
        (
            "broken-unknown-key.yaml",
            1,
            &["unknown field `sharing`", "hint: check the key's spelling"],
        ),
        (
            "broken-references.yaml",
            2,
            &[
                "unknown department `helth`",
                "did you mean `health`?",
                "unknown dataset `hukou.persons`",
                "did you mean `hukou.person_basic`?",
            ],
        ),
        (
            "broken-negative-list.yaml",
            1,
            &[
                "`phone` is on the negative list",
                "hint: remove it from the grant",
            ],
        ),
        (
            "broken-providers.yaml",
            4,
            &[
                "providers[0]: give one of `endpoint` (one), `endpoints` (several) and `dns`",
                "providers[1].dns.name: `market supervision!` is not a DNS name",
                "providers[1].dns.port: must not be 0",
                "providers[1].dns.every_secs: must be at least 1",
            ],
        ),
        (
            "broken-values.yaml",
            3,
            &[
                "departments[4].region",
                "grants[1].row_scope.regions[0]",
                "grants[0].expires",
                "6-digit",
            ],
        ),
    ];
    for (file, n, wants) in cases {
        let path = format!("tests/policies/{file}");
        let (code, out) = xgate(&["policy", "check", &path]);
        assert_eq!(code, 1, "{file}: {out}");
        assert!(
            out.contains(&format!("{n} error(s)")),
            "{file}: want {n} errors: {out}"
        );
        for w in *wants {
            assert!(out.contains(w), "{file}: missing `{w}` in:\n{out}");
        }
        // Every error line names file:line:column.
        for line in out
            .lines()
            .filter(|l| l.contains(file) && !l.starts_with("error:"))
        {
            let loc = line.split(": ").next().unwrap();
            let parts: Vec<&str> = loc.rsplitn(3, ':').collect();
            assert!(
                parts.len() == 3
                    && parts[0].parse::<u32>().is_ok()
                    && parts[1].parse::<u32>().is_ok(),
                "{file}: not located: {line}"
            );
        }
    }
}

#[test]
fn diff_reports_loosenings_in_words_and_json() {
    let (code, out) = xgate(&[
        "policy",
        "diff",
        "deploy/dev/policy.yaml",
        "tests/policies/loosened.yaml",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("LOOSENS  civil-affairs × hukou.person_basic for purpose `subsidy-eligibility`: field `address` becomes readable (in clear)"), "{out}");
    assert!(out.contains("LOOSENS  xihu-civil-affairs system `relief` × hukou.person_basic for purpose `temporary-relief`: rows: all rows (was own-region 330106)"), "{out}");
    assert!(
        out.contains("rate 20/s burst 10 (was 5/s burst 10)"),
        "{out}"
    );
    assert!(!out.contains("TIGHTENS"), "{out}");
    let (code, json) = xgate(&[
        "policy",
        "diff",
        "--json",
        "tests/policies/loosened.yaml",
        "deploy/dev/policy.yaml",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let changes = v["changes"].as_array().unwrap();
    assert!(!changes.is_empty());
    assert!(
        changes.iter().all(|c| c["direction"] == "tightens"),
        "the reverse change only tightens: {json}"
    );
    let aspects: Vec<&str> = changes
        .iter()
        .map(|c| c["aspect"].as_str().unwrap())
        .collect();
    for a in ["field", "row_scope", "rate"] {
        assert!(aspects.contains(&a), "{a} in {aspects:?}");
    }
}

#[test]
fn explain_shows_the_chain_of_rules() {
    let (code, out) = xgate(&[
        "policy",
        "explain",
        "--consumer",
        "xihu-civil-affairs",
        "--system",
        "relief",
        "--dataset",
        "hukou.person_basic",
        "--purpose",
        "temporary-relief",
    ]);
    assert_eq!(code, 0, "{out}");
    for w in [
        "✓ department-registry",
        "✓ share-type:conditional",
        "✓ grant:xihu-hukou-relief: applies",
        "✓ row-scope: own-region 330106",
        "ALLOW under grant:xihu-hukou-relief",
    ] {
        assert!(out.contains(w), "missing `{w}`:\n{out}");
    }
    let (_, out) = xgate(&[
        "policy",
        "explain",
        "--consumer",
        "civil-affairs",
        "--dataset",
        "hukou.criminal_record",
        "--purpose",
        "x",
    ]);
    assert!(
        out.contains("✗ share-type:none") && out.contains("DENY SHARE_TYPE_NONE"),
        "{out}"
    );
}
