//! Table tests of the pure evaluation (no sockets, no clock: "now" is an input), and a
//! property test of `policy diff`.
//!
//! Size: the evaluation's table tests, one table per concern; long because the model has many
//! cases, each written out so a failing row names its case.

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
  - { id: nb,   name: NB,   level: city,     region: "330200" }
providers:
  - { id: ps, endpoint: "https://127.0.0.1:1" }
datasets:
  - id: people
    title: People
    owner: ps
    provider: ps
    share_type: conditional
    subject_key: id
    region_field: region
    fields:
      - { name: id,    type: string, sensitivity: sensitive, mask: { keep: { first: 2, last: 2 } } }
      - { name: name,  type: string, sensitivity: personal }
      - { name: phone, type: string, sensitivity: sensitive }
      - { name: note,  type: string, sensitivity: internal, mask: redact }
      - { name: region, type: string, sensitivity: internal }
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
  - { id: g-xh, consumer: xh, dataset: people, fields: [id, name, region], purposes: [relief], row_scope: own-region }
  - { id: g-hz-census, consumer: hz, dataset: people, fields: [name, region], purposes: [census], row_scope: { regions: ["330106", "330108"] } }
  - { id: g-hz-old, consumer: hz, dataset: people, fields: [name], purposes: [old], valid_from: 2020-01-01, expires: 2021-01-01 }
  - { id: g-hz-future, consumer: hz, dataset: people, fields: [name], purposes: [future], valid_from: "2099-01-01T00:00:00Z" }
  - { id: g-hz-firms-old, consumer: hz, dataset: firms, fields: [rep_id], purposes: [history], expires: 2021-01-01 }
  - { id: g-ca-link, consumer: ca, dataset: firms, fields: [rep_id], purposes: [audit-link], masks: { rep_id: hash } }
  - { id: g-ps-window, consumer: ps, dataset: people, fields: [name], purposes: [window], valid_from: 2026-06-01, expires: 2026-06-02 }
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
            token_bound: false,
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
    p.fields.iter().map(|f| (&*f.name, f.mask)).collect()
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
            "nb",
            "s",
            "people",
            "subsidy",
            &[],
            &[],
            Reason::GrantMissing,
            Some("share-type:conditional"),
        ),
        (
            "xh",
            "s",
            "people",
            "subsidy",
            &[],
            &[],
            Reason::PurposeNotAllowed,
            Some("grant:g-xh"),
        ),
        // Validity windows: their own reasons, naming the grant.
        (
            "hz",
            "s",
            "people",
            "old",
            &[],
            &[],
            Reason::GrantExpired,
            Some("grant:g-hz-old"),
        ),
        (
            "hz",
            "s",
            "people",
            "future",
            &[],
            &[],
            Reason::GrantNotYetValid,
            Some("grant:g-hz-future"),
        ),
        // Inside a grant, but not this field.
        (
            "hz",
            "s",
            "people",
            "census",
            &["id"],
            &[],
            Reason::FieldDenied,
            Some("grant:g-hz-census"),
        ),
        (
            "xh",
            "s",
            "people",
            "relief",
            &["note"],
            &[],
            Reason::FieldDenied,
            Some("grant:g-xh"),
        ),
        (
            "xh",
            "s",
            "people",
            "relief",
            &[],
            &["note"],
            Reason::FieldDenied,
            Some("grant:g-xh"),
        ),
        // An expired grant on open data falls back to open access: no sensitive fields.
        (
            "hz",
            "s",
            "firms",
            "history",
            &["rep_id"],
            &[],
            Reason::FieldDenied,
            Some("share-type:unconditional"),
        ),
        // The negative list beats `*` and the system-specific grant.
        (
            "ca",
            "audit",
            "people",
            "inspection",
            &[],
            &["phone"],
            Reason::NegativeList,
            Some("negative-list:people.phone"),
        ),
        // Nothing opens share type `none`, not even the system-specific path.
        (
            "ca",
            "audit",
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
            "banned",
            "relief",
            &[],
            &[],
            Reason::NegativeList,
            Some("negative-list:banned"),
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
    assert_eq!(&*permit.rule, "grant:g-ca");
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
    assert_eq!(&*permit.rule, "grant:g-ca-audit");
    assert_eq!(permit.approval_ref, None);
    // "*" is every field except the negative-listed phone; `id` unmasked by the grant.
    assert_eq!(
        names(&permit),
        [
            ("id", Mask::None),
            ("name", Mask::None),
            ("note", Mask::Redact),
            ("region", Mask::None)
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
    assert_eq!(&*permit.rule, "grant:g-ca");
}

#[test]
fn unconditional_data_is_open_except_sensitive_fields() {
    let p = policy();
    let permit = decide(&p, "xh", "s", "firms", "anything", &[], &[]).unwrap();
    assert_eq!(&*permit.rule, "share-type:unconditional");
    assert_eq!(names(&permit), [("code", Mask::None)]);
    assert!(permit.purposes.is_empty());
    // With a grant for the purpose, the sensitive field comes too (masked by default).
    let permit = decide(&p, "hz", "s", "firms", "licensing", &[], &[]).unwrap();
    assert_eq!(&*permit.rule, "grant:g-hz");
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
        token_bound: false,
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

/// Among grants equally specific, the first in file order decides (docs/policy.md, "Several
/// grants"): written the other way round, the other one does. Where one grant applies, the
/// order changes nothing, refusals' messages included.
#[test]
fn the_first_grant_in_file_order_decides_among_equals() {
    let with = |grants: &[&str]| {
        let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(POLICY).unwrap();
        let list = doc["grants"].as_sequence_mut().unwrap();
        for g in grants {
            list.push(serde_yaml_ng::from_str(g).unwrap());
        }
        doc
    };
    let wide =
        "{ id: g-nb-wide, consumer: nb, dataset: people, fields: [id, name], purposes: [survey] }";
    let narrow =
        "{ id: g-nb-narrow, consumer: nb, dataset: people, fields: [name], purposes: [survey] }";
    let load = |doc: &serde_yaml_ng::Value| {
        Policy::from_yaml(serde_yaml_ng::to_string(doc).unwrap().as_bytes()).unwrap()
    };
    let decided = |p: &Policy| {
        let permit = decide(p, "nb", "s", "people", "survey", &[], &[]).unwrap();
        let fields: Vec<String> = permit.fields.iter().map(|f| f.name.to_string()).collect();
        (permit.rule.to_string(), fields)
    };
    let a = load(&with(&[wide, narrow]));
    let b = load(&with(&[narrow, wide]));
    assert_eq!(
        decided(&a),
        (
            "grant:g-nb-wide".to_owned(),
            vec!["id".to_owned(), "name".to_owned()]
        )
    );
    assert_eq!(
        decided(&b),
        ("grant:g-nb-narrow".to_owned(), vec!["name".to_owned()])
    );

    // Every grant reversed: each case that one grant (or none) decides is decided alike.
    let mut reversed = with(&[]);
    reversed["grants"].as_sequence_mut().unwrap().reverse();
    let reversed = load(&reversed);
    let p = policy();
    let mut allowed = 0;
    for (dept, sys) in [
        ("ca", "s"),
        ("ca", "audit"),
        ("hz", "s"),
        ("xh", "s"),
        ("ps", "s"),
    ] {
        for dataset in ["people", "firms", "secrets", "banned"] {
            for purpose in [
                "subsidy",
                "inspection",
                "licensing",
                "relief",
                "census",
                "audit-link",
            ] {
                let x = decide(&p, dept, sys, dataset, purpose, &[], &[]);
                let y = decide(&reversed, dept, sys, dataset, purpose, &[], &[]);
                allowed += usize::from(x.is_ok());
                match (&x, &y) {
                    // A refusal naming one of several grants names the first written.
                    (Err(e), Err(f)) if e.reason == Reason::PurposeNotAllowed => {
                        assert_eq!((e.reason, &e.message), (f.reason, &f.message));
                    }
                    _ => assert_eq!(x, y, "{dept}/{sys} {dataset} {purpose}"),
                }
            }
        }
    }
    assert!(
        allowed >= 6,
        "the matrix covers allowed cases too: {allowed}"
    );
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
                token_bound: false,
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

/// (dept, system, dataset, purpose, fields, rule, expected fields with masks, scope prefixes)
type AllowCase = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static str,
    &'static [(&'static str, Mask)],
    Option<&'static [&'static str]>,
);

#[test]
fn permits_give_exactly_the_rule_fields_masks_and_rows() {
    const KEEP22: Mask = Mask::Keep { first: 2, last: 2 };
    const KEEP11: Mask = Mask::Keep { first: 1, last: 1 };
    let cases: &[AllowCase] = &[
        (
            "ca",
            "s",
            "people",
            "subsidy",
            &[],
            "grant:g-ca",
            &[("id", KEEP22), ("name", Mask::None), ("note", Mask::Redact)],
            None,
        ),
        (
            "ca",
            "s",
            "people",
            "pension",
            &["note"],
            "grant:g-ca",
            &[("note", Mask::Redact)],
            None,
        ),
        (
            "ca",
            "audit",
            "people",
            "inspection",
            &["id"],
            "grant:g-ca-audit",
            &[("id", Mask::None)],
            None,
        ),
        (
            "ca",
            "audit",
            "people",
            "pension",
            &["id"],
            "grant:g-ca",
            &[("id", KEEP22)],
            None,
        ),
        (
            "xh",
            "s",
            "people",
            "relief",
            &[],
            "grant:g-xh",
            &[("id", KEEP22), ("name", Mask::None), ("region", Mask::None)],
            Some(&["330106"]),
        ),
        (
            "hz",
            "s",
            "people",
            "census",
            &[],
            "grant:g-hz-census",
            &[("name", Mask::None), ("region", Mask::None)],
            Some(&["330106", "330108"]),
        ),
        (
            "hz",
            "s",
            "firms",
            "licensing",
            &[],
            "grant:g-hz",
            &[("code", Mask::None), ("rep_id", KEEP11)],
            None,
        ),
        (
            "hz",
            "s",
            "firms",
            "history",
            &[],
            "share-type:unconditional",
            &[("code", Mask::None)],
            None,
        ),
        (
            "hz",
            "s",
            "firms",
            "anything",
            &["code"],
            "share-type:unconditional",
            &[("code", Mask::None)],
            None,
        ),
        (
            "ca",
            "s",
            "firms",
            "audit-link",
            &["rep_id"],
            "grant:g-ca-link",
            &[("rep_id", Mask::Hash)],
            None,
        ),
        (
            "ca",
            "s",
            "firms",
            "subsidy",
            &[],
            "share-type:unconditional",
            &[("code", Mask::None)],
            None,
        ),
        (
            "xh",
            "s",
            "firms",
            "relief",
            &[],
            "share-type:unconditional",
            &[("code", Mask::None)],
            None,
        ),
        // A grant valid for one day: `now` is its first second.
        (
            "ps",
            "s",
            "people",
            "window",
            &[],
            "grant:g-ps-window",
            &[("name", Mask::None)],
            None,
        ),
        (
            "ca",
            "any-system",
            "people",
            "subsidy",
            &["name", "id"],
            "grant:g-ca",
            &[("name", Mask::None), ("id", KEEP22)],
            None,
        ),
    ];
    let p = policy();
    for (i, (dept, sys, ds, purpose, fields, rule, want, scope)) in cases.iter().enumerate() {
        let permit = decide(&p, dept, sys, ds, purpose, fields, &[])
            .unwrap_or_else(|r| panic!("case {i} denied: {r}"));
        assert_eq!(&*permit.rule, *rule, "case {i}");
        assert_eq!(names(&permit), *want, "case {i}");
        let prefixes = permit
            .scope
            .as_ref()
            .map(|s| s.prefixes.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(prefixes.as_deref(), *scope, "case {i}");
    }
}

#[test]
fn validity_is_ignored_without_a_clock_and_checked_at_the_edges() {
    let p = policy();
    let at = |now| {
        evaluate(
            &p,
            Caller {
                dept: "ps",
                system: "s",
                token_purposes: None,
                token_bound: false,
            },
            Request {
                dataset: "people",
                fields: &[],
                filter: &[],
                purpose: "window",
                now,
            },
        )
        .map(|p| p.rule)
        .map_err(|r| r.reason)
    };
    // 2026-06-01 00:00 CST = 2026-05-31T16:00:00Z.
    let start = 1_780_243_200;
    assert_eq!(at(Some(start - 1)), Err(Reason::GrantNotYetValid));
    assert_eq!(at(Some(start)), Ok("grant:g-ps-window".into()));
    assert_eq!(at(Some(start + 86_399)), Ok("grant:g-ps-window".into()));
    assert_eq!(at(Some(start + 86_400)), Err(Reason::GrantExpired));
    assert_eq!(at(None), Ok("grant:g-ps-window".into()));
}

#[test]
fn policy_load_checks_the_new_rules() {
    let cases = [
        (
            "region_field: region",
            "region_field: nowhere",
            "datasets[0].region_field",
        ),
        ("row_scope: own-region }", "row_scope: everywhere }", "yaml"),
        (
            "regions: [\"330106\", \"330108\"]",
            "regions: [\"3301\"]",
            "grants[5].row_scope.regions[0]",
        ),
        (
            "valid_from: 2020-01-01, expires: 2021-01-01",
            "valid_from: 2021-01-01, expires: 2020-01-01",
            "grants[6].expires",
        ),
        (
            "purposes: [history], expires: 2021-01-01 }",
            "purposes: [history], expires: yesterday }",
            "grants[8].expires",
        ),
        (
            "endpoint: \"https://127.0.0.1:1\" }",
            "endpoint: \"https://127.0.0.1:1\", max_in_flight: 0 }",
            "providers[0].max_in_flight",
        ),
    ];
    for (from, to, path) in cases {
        assert!(POLICY.contains(from), "{from}");
        let e = Policy::from_yaml(POLICY.replacen(from, to, 1).as_bytes()).unwrap_err();
        assert!(e.0.iter().any(|e| e.path.starts_with(path)), "{path}: {e}");
        assert!(e.0.iter().all(|e| e.line.is_some()), "located: {e}");
    }
    // A row scope on a dataset without a region field.
    let e =
        Policy::from_yaml(POLICY.replace("    region_field: region\n", "").as_bytes()).unwrap_err();
    assert!(
        e.0.iter()
            .any(|e| e.path == "grants[4].row_scope" && e.message.contains("region_field")),
        "{e}"
    );
    // `hash` needs no key to load; the gateway refuses it without one (see server tests).
    assert!(policy().uses_hash_mask());
}

#[test]
fn errors_are_located_and_hinted() {
    let bad = POLICY.replace(
        "{ id: g-hz, consumer: hz, dataset: firms,",
        "{ id: g-hz, consumer: hz, dataset: frims,",
    );
    let e = Policy::from_yaml(bad.as_bytes()).unwrap_err();
    let err = e.0.iter().find(|e| e.path == "grants[2].dataset").unwrap();
    let line = bad
        .lines()
        .position(|l| l.contains("dataset: frims"))
        .unwrap()
        + 1;
    assert_eq!(err.line, Some(line));
    assert_eq!(err.hint.as_deref(), Some("did you mean `firms`?"));
    let bad = POLICY.replace(
        "consumer: ca, dataset: secrets",
        "consumer: martians, dataset: secrets",
    );
    let e = Policy::from_yaml(bad.as_bytes()).unwrap_err();
    assert!(
        e.0[0]
            .hint
            .as_deref()
            .unwrap_or("")
            .contains("add it under `departments:`"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// `policy diff` must report every loosening.

mod diff_property {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::policy::{
        diff::{Direction, diff},
        model::{PolicyFile, RateLimit, RowScope, ShareType},
    };

    const MASKS: [Mask; 5] = [
        Mask::None,
        Mask::Keep { first: 2, last: 2 },
        Mask::Keep { first: 4, last: 1 },
        Mask::Hash,
        Mask::Redact,
    ];

    /// One random edit of the kind the bureau makes.
    fn mutate(f: &mut PolicyFile, rng: &mut StdRng) {
        let ng = f.grants.len();
        let g = rng.random_range(0..ng);
        let field_names = |f: &PolicyFile, ds: &str| -> Vec<String> {
            f.datasets
                .iter()
                .find(|d| d.id == ds)
                .map(|d| d.fields.iter().map(|x| x.name.clone()).collect())
                .unwrap_or_default()
        };
        match rng.random_range(0..12) {
            0 => {
                let names = field_names(f, &f.grants[g].dataset);
                let n = names[rng.random_range(0..names.len())].clone();
                f.grants[g].fields.push(n);
            }
            1 => {
                if f.grants[g].fields.len() > 1 {
                    let i = rng.random_range(0..f.grants[g].fields.len());
                    f.grants[g].fields.remove(i);
                }
            }
            2 => {
                let names = field_names(f, &f.grants[g].dataset);
                let n = names[rng.random_range(0..names.len())].clone();
                f.grants[g]
                    .masks
                    .insert(n, MASKS[rng.random_range(0..MASKS.len())]);
            }
            3 => {
                let d = rng.random_range(0..f.datasets.len());
                let k = rng.random_range(0..f.datasets[d].fields.len());
                if f.datasets[d].fields[k].ty == model::FieldType::String {
                    f.datasets[d].fields[k].mask = MASKS[rng.random_range(0..MASKS.len())];
                }
            }
            4 => {
                f.grants[g].rate_limit = Some(RateLimit {
                    per_second: rng.random_range(1..100) as f64,
                    burst: rng.random_range(1..50),
                })
            }
            5 => f.grants[g].purposes.push(
                ["subsidy", "pension", "relief", "census", "new"][rng.random_range(0..5)].into(),
            ),
            6 => {
                f.grants.remove(g);
            }
            7 => {
                let mut copy = f.grants[g].clone();
                copy.id = format!("{}-copy{}", copy.id, rng.random_range(0..1000));
                copy.consumer = ["ps", "ca", "hz", "xh"][rng.random_range(0..4)].into();
                copy.system = None;
                f.grants.push(copy);
            }
            8 => {
                let d = rng.random_range(0..f.datasets.len());
                f.datasets[d].share_type = [
                    ShareType::Unconditional,
                    ShareType::Conditional,
                    ShareType::None,
                ][rng.random_range(0..3)];
            }
            9 => {
                if f.negative_list.is_empty() || rng.random_bool(0.5) {
                    f.negative_list.push(model::NegativeEntry {
                        dataset: "people".into(),
                        field: Some("note".into()),
                        reason: String::new(),
                    });
                } else {
                    f.negative_list
                        .remove(rng.random_range(0..f.negative_list.len()));
                }
            }
            10 => {
                if f.grants[g].dataset == "people" {
                    f.grants[g].row_scope = match rng.random_range(0..4) {
                        0 => RowScope::All,
                        1 => RowScope::OwnRegion,
                        2 => RowScope::Regions(vec!["330106".into()]),
                        _ => RowScope::Regions(vec!["330100".into(), "330200".into()]),
                    };
                }
            }
            _ => {
                f.grants[g].expires =
                    Some(["2021-01-01", "2030-01-01", "2040-06-01"][rng.random_range(0..3)].into());
                f.grants[g].valid_from = None;
            }
        }
    }

    fn access(
        p: &Policy,
        dept: &str,
        sys: &str,
        ds: &str,
        purpose: &str,
        fields: &[String],
    ) -> Option<Permit> {
        evaluate(
            p,
            Caller {
                dept,
                system: sys,
                token_purposes: None,
                token_bound: false,
            },
            Request {
                dataset: ds,
                fields,
                filter: &[],
                purpose,
                now: None,
            },
        )
        .ok()
    }

    fn scope_covers(
        outer: Option<&crate::policy::scope::Scope>,
        inner: Option<&crate::policy::scope::Scope>,
    ) -> bool {
        match (outer, inner) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(o), Some(i)) => i
                .prefixes
                .iter()
                .all(|p| o.prefixes.iter().any(|q| p.starts_with(q.as_str()))),
        }
    }

    #[test]
    fn diff_reports_every_loosening() {
        let base = policy();
        let mut rng = StdRng::seed_from_u64(0x5eed_2026);
        let purposes = [
            "subsidy",
            "pension",
            "inspection",
            "relief",
            "census",
            "licensing",
            "history",
            "audit-link",
            "window",
            "new",
            "unlisted",
        ];
        let mut checked = 0;
        let mut loosenings = 0;
        for round in 0..400 {
            let mut file = base.file.clone();
            for _ in 0..rng.random_range(1..4) {
                mutate(&mut file, &mut rng);
            }
            let Ok(new) = Policy::build(file, format!("v{round}")) else {
                continue;
            };
            let changes = diff(&base, &new);
            let reported = |dept: &str, sys: Option<&str>, ds: &str, purpose: &str| {
                // A system no grant of the pair names is covered by "any other system".
                let named = base.file.grants.iter().chain(&new.file.grants).any(|g| {
                    g.consumer == dept
                        && g.dataset == ds
                        && g.system.as_deref() == sys
                        && sys.is_some()
                });
                let sys = if named { sys } else { None };
                changes.iter().any(|c| {
                    c.direction == Direction::Loosens
                        && c.consumer == dept
                        && c.dataset == ds
                        && c.system.as_deref() == sys
                        && (c.purpose.as_deref() == Some(purpose) || c.purpose.is_none())
                })
            };
            for dept in ["ps", "ca", "hz", "xh"] {
                for sys in [None, Some("audit")] {
                    for ds in ["people", "firms", "secrets", "banned"] {
                        for purpose in purposes {
                            let s = sys.unwrap_or("\u{0}other");
                            // Field by field: anything newly readable, or readable with a weaker mask.
                            let names: Vec<String> = base
                                .dataset(ds)
                                .map(|d| d.fields.iter().map(|f| f.name.clone()).collect())
                                .unwrap_or_default();
                            for f in names {
                                let one = [f.clone()];
                                let (a, b) = (
                                    access(&base, dept, s, ds, purpose, &one),
                                    access(&new, dept, s, ds, purpose, &one),
                                );
                                let looser = match (&a, &b) {
                                    (None, Some(_)) => true,
                                    (Some(a), Some(b)) => {
                                        b.fields[0].mask.strength() < a.fields[0].mask.strength()
                                            || !scope_covers(a.scope.as_deref(), b.scope.as_deref())
                                            || b.rate_limit.per_second > a.rate_limit.per_second
                                            || b.rate_limit.burst > a.rate_limit.burst
                                    }
                                    _ => false,
                                };
                                checked += 1;
                                if looser {
                                    loosenings += 1;
                                    // A purpose no grant names is reported as "any other purpose".
                                    let listed = new
                                        .file
                                        .grants
                                        .iter()
                                        .chain(&base.file.grants)
                                        .any(|g| g.purposes.iter().any(|p| p == purpose));
                                    let key_purpose = if listed { purpose } else { "" };
                                    assert!(
                                        reported(dept, sys, ds, key_purpose),
                                        "round {round}: {dept}/{sys:?} × {ds} for `{purpose}`, field `{f}` got looser ({a:?} -> {b:?}) but diff said: {changes:#?}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(
            checked > 10_000 && loosenings > 100,
            "the property was exercised: {checked} checks, {loosenings} loosenings"
        );
    }
}

/// Deep nesting is refused before the YAML loader (whose cost grows with its square) sees it:
/// flow brackets (100,000 levels, 200 KB) and block indentation alike, with the place.
#[test]
fn deeply_nested_policies_are_refused_before_parsing() {
    let flow = format!(
        "departments: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let t0 = std::time::Instant::now();
    let e = Policy::from_yaml(flow.as_bytes()).unwrap_err();
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t0.elapsed()
    );
    assert!(e.0[0].message.contains("nested more than"), "{e}");
    assert_eq!(e.0[0].line, Some(1));
    let block: String = (0..200)
        .map(|i| format!("{}a:\n", "  ".repeat(i)))
        .collect();
    let e = Policy::from_yaml(block.as_bytes()).unwrap_err();
    assert!(e.0[0].message.contains("nested more than 32"), "{e}");
    assert_eq!(e.0[0].line, Some(33));
    let huge = vec![b' '; super::MAX_POLICY_BYTES + 1];
    let e = Policy::from_yaml(&huge).unwrap_err();
    assert!(e.0[0].message.contains("at most"), "{e}");
}

/// What `serve` would refuse, `policy check` refuses: a default rate limit that is not
/// positive, and a provider name no certificate can be checked against.
#[test]
fn default_rate_limits_and_tls_names_are_validated() {
    let base = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/dev/policy.yaml"
    ))
    .unwrap();
    assert!(Policy::from_yaml(base.as_bytes()).is_ok());
    let with_default = |r: &str| {
        base.replace(
            "rate_limit: { per_second: 20, burst: 40 }",
            &format!("rate_limit: {r}"),
        )
    };
    for bad in ["0", "-1", ".nan", ".inf"] {
        let text = with_default(&format!("{{ per_second: {bad}, burst: 10 }}"));
        let e = Policy::from_yaml(text.as_bytes()).unwrap_err();
        assert!(
            e.0.iter()
                .any(|e| e.path == "defaults.rate_limit" && e.line.is_some()),
            "per_second {bad}: {e}"
        );
    }
    let text = with_default("{ per_second: 5, burst: 0 }");
    assert!(Policy::from_yaml(text.as_bytes()).is_err());
    let text = base.replacen(
        "tls_name: public-security.provider.xgate.internal",
        "tls_name: \"🙂\"",
        1,
    );
    assert_ne!(text, base, "the fixture names the endpoint");
    let e = Policy::from_yaml(text.as_bytes()).unwrap_err();
    assert!(
        e.0.iter()
            .any(|e| e.path.ends_with(".tls_name") && e.message.contains("not a DNS name")),
        "{e}"
    );
}
