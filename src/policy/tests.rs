//! Table tests of the pure evaluation: no sockets, no clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::error::{Reason, Reject};

const POLICY: &str = r#"
defaults: { rate_limit: { per_second: 7, burst: 3 } }
departments:
  - { id: ps,   name: PS,   level: province, region: "330000" }
  - { id: ca,   name: CA,   level: province, region: "330000" }
  - { id: hz,   name: HZ,   level: city,     region: "330100" }
  - { id: xh,   name: XH,   level: county,   region: "330106" }
providers:
  - { id: ps, endpoint: "https://127.0.0.1:1" }
datasets:
  - id: people
    title: People
    owner: ps
    provider: ps
    share_type: conditional
    subject_key: id
    fields:
      - { name: id,    type: string, sensitivity: sensitive, mask: { keep: { first: 2, last: 2 } } }
      - { name: name,  type: string, sensitivity: personal }
      - { name: phone, type: string, sensitivity: sensitive }
      - { name: note,  type: string, sensitivity: internal, mask: redact }
  - id: firms
    title: Firms
    owner: ps
    provider: ps
    share_type: unconditional
    subject_key: code
    fields:
      - { name: code,   type: string, sensitivity: public }
      - { name: rep_id, type: string, sensitivity: sensitive, mask: { keep: { first: 1, last: 1 } } }
  - id: secrets
    title: Secrets
    owner: ps
    provider: ps
    share_type: none
    subject_key: k
    fields: [ { name: k, type: string, sensitivity: sensitive } ]
  - id: banned
    title: Banned
    owner: ps
    provider: ps
    share_type: unconditional
    subject_key: k
    fields: [ { name: k, type: string, sensitivity: public } ]
grants:
  - { id: g-ca, consumer: ca, dataset: people, fields: [id, name, note], purposes: [subsidy, pension], rate_limit: { per_second: 50, burst: 9 }, approval_ref: DOC-1 }
  - { id: g-ca-audit, consumer: ca, system: audit, dataset: people, fields: ["*"], purposes: [inspection], masks: { id: none } }
  - { id: g-hz, consumer: hz, dataset: firms, fields: [rep_id], purposes: [licensing] }
  - { id: g-secret, consumer: ca, dataset: secrets, fields: [k], purposes: [subsidy] }
negative_list:
  - { dataset: banned }
  - { dataset: people, field: phone, reason: policing only }
"#;

/// 2026-06-01T00:00:00Z: "now" for every decision here (evaluation takes time as an input).
const NOW: i64 = 1_780_272_000;

fn policy() -> Policy {
    Policy::from_yaml(POLICY.as_bytes()).unwrap()
}

/// (dept, system, dataset, purpose, fields, filter, reason, rule)
type DenyCase = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    Reason,
    Option<&'static str>,
);

fn decide(
    p: &Policy,
    dept: &str,
    sys: &str,
    dataset: &str,
    purpose: &str,
    fields: &[&str],
    filter: &[&str],
) -> Result<Permit, Reject> {
    let fields: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
    let conds: Vec<crate::pb::Condition> = filter
        .iter()
        .map(|f| crate::pb::Condition {
            field: f.to_string(),
            test: Some(crate::pb::condition::Test::Eq(crate::pb::Value::string(
                "x",
            ))),
        })
        .collect();
    evaluate(
        p,
        Caller {
            dept,
            system: sys,
            token_purposes: None,
        },
        Request {
            dataset,
            fields: &fields,
            filter: &conds,
            purpose,
            now: Some(NOW),
        },
    )
}

fn names(p: &Permit) -> Vec<(&str, Mask)> {
    p.fields.iter().map(|f| (f.name.as_str(), f.mask)).collect()
}

#[test]
fn denials_name_their_reason_and_rule() {
    let p = policy();
    // (dept, system, dataset, purpose, fields, filter, reason, rule)
    let cases: &[DenyCase] = &[
        (
            "nobody",
            "s",
            "people",
            "subsidy",
            &[],
            &[],
            Reason::ConsumerUnknown,
            Some("department-registry"),
        ),
        (
            "ca",
            "s",
            "nope",
            "subsidy",
            &[],
            &[],
            Reason::DatasetUnknown,
            Some("catalogue"),
        ),
        (
            "ca",
            "s",
            "",
            "subsidy",
            &[],
            &[],
            Reason::RequestInvalid,
            None,
        ),
        (
            "ca",
            "s",
            "banned",
            "subsidy",
            &[],
            &[],
            Reason::NegativeList,
            Some("negative-list:banned"),
        ),
        (
            "ca",
            "s",
            "secrets",
            "subsidy",
            &[],
            &[],
            Reason::ShareTypeNone,
            Some("share-type:none"),
        ),
        (
            "xh",
            "s",
            "people",
            "subsidy",
            &[],
            &[],
            Reason::GrantMissing,
            Some("share-type:conditional"),
        ),
        (
            "ca",
            "s",
            "people",
            "",
            &[],
            &[],
            Reason::PurposeMissing,
            Some("purpose-required"),
        ),
        (
            "ca",
            "s",
            "people",
            "  ",
            &[],
            &[],
            Reason::PurposeMissing,
            Some("purpose-required"),
        ),
        (
            "ca",
            "s",
            "people",
            "marketing",
            &[],
            &[],
            Reason::PurposeNotAllowed,
            Some("grant:g-ca"),
        ),
        // The system-specific grant's purpose is not available to other systems.
        (
            "ca",
            "other",
            "people",
            "inspection",
            &[],
            &[],
            Reason::PurposeNotAllowed,
            Some("grant:g-ca"),
        ),
        (
            "ca",
            "s",
            "people",
            "subsidy",
            &["phone"],
            &[],
            Reason::NegativeList,
            Some("negative-list:people.phone"),
        ),
        (
            "ca",
            "audit",
            "people",
            "inspection",
            &["phone"],
            &[],
            Reason::NegativeList,
            Some("negative-list:people.phone"),
        ),
        (
            "ca",
            "s",
            "people",
            "subsidy",
            &["shoe"],
            &[],
            Reason::FieldUnknown,
            Some("catalogue:schema"),
        ),
        (
            "ca",
            "s",
            "people",
            "subsidy",
            &[],
            &["shoe"],
            Reason::FieldUnknown,
            Some("catalogue:schema"),
        ),
        (
            "ca",
            "s",
            "people",
            "subsidy",
            &[],
            &["phone"],
            Reason::NegativeList,
            Some("negative-list:people.phone"),
        ),
        // Unconditional data: sensitive fields need a grant.
        (
            "xh",
            "s",
            "firms",
            "anything",
            &["rep_id"],
            &[],
            Reason::FieldDenied,
            Some("share-type:unconditional"),
        ),
        (
            "xh",
            "s",
            "firms",
            "anything",
            &[],
            &["rep_id"],
            Reason::FieldDenied,
            Some("share-type:unconditional"),
        ),
        // A grant for another purpose gives no sensitive fields.
        (
            "hz",
            "s",
            "firms",
            "other",
            &["rep_id"],
            &[],
            Reason::FieldDenied,
            Some("share-type:unconditional"),
        ),
    ];
    for (i, (dept, sys, ds, purpose, fields, filter, reason, rule)) in cases.iter().enumerate() {
        let r = decide(&p, dept, sys, ds, purpose, fields, filter)
            .expect_err(&format!("case {i} allowed"));
        assert_eq!(r.reason, *reason, "case {i}: {r}");
        assert_eq!(r.rule.as_deref(), *rule, "case {i}: {r}");
        assert!(!r.message.is_empty());
    }
}

#[test]
fn grant_gives_its_fields_with_masks_in_schema_order() {
    let p = policy();
    let permit = decide(&p, "ca", "s", "people", "subsidy", &[], &[]).unwrap();
    assert_eq!(permit.rule, "grant:g-ca");
    assert_eq!(permit.approval_ref.as_deref(), Some("DOC-1"));
    assert_eq!(
        names(&permit),
        [
            ("id", Mask::Keep { first: 2, last: 2 }),
            ("name", Mask::None),
            ("note", Mask::Redact)
        ]
    );
    assert_eq!(
        permit.rate_limit,
        RateLimit {
            per_second: 50.0,
            burst: 9
        }
    );
    // Requested order wins, duplicates collapse; filters on masked fields are fine.
    let permit = decide(
        &p,
        "ca",
        "s",
        "people",
        "pension",
        &["name", "id", "name"],
        &["id"],
    )
    .unwrap();
    assert_eq!(
        names(&permit),
        [
            ("name", Mask::None),
            ("id", Mask::Keep { first: 2, last: 2 })
        ]
    );
}

#[test]
fn system_specific_grant_wins_and_overrides_masks_but_not_the_negative_list() {
    let p = policy();
    let permit = decide(&p, "ca", "audit", "people", "inspection", &[], &[]).unwrap();
    assert_eq!(permit.rule, "grant:g-ca-audit");
    assert_eq!(permit.approval_ref, None);
    // "*" is every field except the negative-listed phone; `id` unmasked by the grant.
    assert_eq!(
        names(&permit),
        [
            ("id", Mask::None),
            ("name", Mask::None),
            ("note", Mask::Redact)
        ]
    );
    assert_eq!(
        permit.rate_limit,
        RateLimit {
            per_second: 7.0,
            burst: 3
        },
        "policy default"
    );
    // The same system may still use the department-wide grant for its purposes.
    let permit = decide(&p, "ca", "audit", "people", "subsidy", &[], &[]).unwrap();
    assert_eq!(permit.rule, "grant:g-ca");
}

#[test]
fn unconditional_data_is_open_except_sensitive_fields() {
    let p = policy();
    let permit = decide(&p, "xh", "s", "firms", "anything", &[], &[]).unwrap();
    assert_eq!(permit.rule, "share-type:unconditional");
    assert_eq!(names(&permit), [("code", Mask::None)]);
    assert!(permit.purposes.is_empty());
    // With a grant for the purpose, the sensitive field comes too (masked by default).
    let permit = decide(&p, "hz", "s", "firms", "licensing", &[], &[]).unwrap();
    assert_eq!(permit.rule, "grant:g-hz");
    assert_eq!(
        names(&permit),
        [
            ("code", Mask::None),
            ("rep_id", Mask::Keep { first: 1, last: 1 })
        ]
    );
}

#[test]
fn token_purposes_narrow_what_a_grant_allows() {
    let p = policy();
    let tp = vec!["pension".to_owned()];
    let caller = Caller {
        dept: "ca",
        system: "s",
        token_purposes: Some(&tp),
    };
    let ask = |purpose| Request {
        dataset: "people",
        fields: &[],
        filter: &[],
        purpose,
        now: Some(NOW),
    };
    assert!(evaluate(&p, caller, ask("pension")).is_ok());
    let r = evaluate(&p, caller, ask("subsidy")).unwrap_err();
    assert_eq!(r.reason, Reason::TokenPurposeNotAllowed);
}

#[test]
fn evaluation_is_deterministic() {
    let p = policy();
    let a = decide(&p, "ca", "s", "people", "subsidy", &[], &[]);
    let b = decide(&p, "ca", "s", "people", "subsidy", &[], &[]);
    assert_eq!(a, b);
}

#[test]
fn invalid_policies_report_every_error_with_its_path() {
    let bad = POLICY
        .replace("region: \"330106\"", "region: \"33010\"")
        .replace(
            "owner: ps\n    provider: ps\n    share_type: none",
            "owner: nobody\n    provider: ghost\n    share_type: none",
        )
        .replace(
            "fields: [rep_id], purposes: [licensing]",
            "fields: [rep_id, shoe], purposes: []",
        )
        .replace(
            "{ id: g-secret, consumer: ca",
            "{ id: g-secret, consumer: martians",
        );
    let errs = Policy::from_yaml(bad.as_bytes()).unwrap_err().0;
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "departments[3].region",
        "datasets[2].owner",
        "datasets[2].provider",
        "grants[2].purposes",
        "grants[2].fields[1]",
        "grants[3].consumer",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
}

#[test]
fn granting_a_negative_listed_thing_is_a_load_error_not_a_silent_allow() {
    let bad = POLICY.replace(
        "grants:\n",
        "grants:\n  - { id: g-bad, consumer: ca, dataset: people, fields: [phone], purposes: [x] }\n  - { id: g-bad2, consumer: ca, dataset: banned, fields: [k], purposes: [x] }\n",
    );
    let errs = Policy::from_yaml(bad.as_bytes()).unwrap_err().0;
    assert!(
        errs.iter()
            .any(|e| e.path == "grants[0].fields[0]" && e.message.contains("negative list")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.path == "grants[1].dataset" && e.message.contains("negative list")),
        "{errs:?}"
    );
}

#[test]
fn unknown_keys_and_bad_yaml_are_errors() {
    let e = Policy::from_yaml(
        POLICY
            .replace("share_type: none", "share_type: none\n    sharetype: x")
            .as_bytes(),
    )
    .unwrap_err();
    assert!(e.0[0].message.contains("unknown field"), "{e}");
    let e = Policy::from_yaml(b"departments: [").unwrap_err();
    assert!(e.0[0].path.starts_with("yaml"), "{e}");
    let e = Policy::from_yaml(POLICY.replace("mask: redact", "mask: blur").as_bytes()).unwrap_err();
    assert!(e.to_string().contains("unknown mask"), "{e}");
}

#[test]
fn version_is_the_content_hash() {
    let a = Policy::from_yaml(POLICY.as_bytes()).unwrap();
    let b = Policy::from_yaml(format!("{POLICY}\n# comment\n").as_bytes()).unwrap();
    assert!(a.version.starts_with("sha256:") && a.version.len() == 7 + 16);
    assert_ne!(a.version, b.version);
}

#[test]
fn filters_must_fit_the_field_and_not_probe_masked_values() {
    use crate::pb::{Condition, Value, ValueList, condition::Test};
    let p = policy();
    let run = |field: &str, test: Test| {
        let conds = vec![Condition {
            field: field.into(),
            test: Some(test),
        }];
        evaluate(
            &p,
            Caller {
                dept: "ca",
                system: "s",
                token_purposes: None,
            },
            Request {
                dataset: "people",
                fields: &[],
                filter: &conds,
                purpose: "subsidy",
                now: Some(NOW),
            },
        )
    };
    // Exact lookups on a masked field are the point of the service.
    assert!(run("id", Test::Eq(Value::string("330106199001011234"))).is_ok());
    assert!(
        run(
            "id",
            Test::In(ValueList {
                values: vec![Value::string("a"), Value::null()]
            })
        )
        .is_ok()
    );
    // A prefix on a masked field would reveal it character by character.
    let r = run("id", Test::Prefix("3301061990".into())).unwrap_err();
    assert_eq!(
        (r.reason, r.rule.as_deref()),
        (Reason::FieldDenied, Some("grant:g-ca"))
    );
    assert!(run("name", Test::Prefix("王".into())).is_ok());
    // Values must fit the field's type.
    let r = run("name", Test::Eq(Value::int64(7))).unwrap_err();
    assert_eq!(
        (r.reason, r.rule.as_deref()),
        (Reason::RequestInvalid, Some("catalogue:schema"))
    );
    let r = run(
        "name",
        Test::In(ValueList {
            values: vec![Value::string("a"), Value::int64(1)],
        }),
    )
    .unwrap_err();
    assert_eq!(r.reason, Reason::RequestInvalid);
    // Exact lookups on a redacted field are allowed too (the value never comes back).
    assert!(run("note", Test::Eq(Value::string("x"))).is_ok());
}
