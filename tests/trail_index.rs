//! The console's index of the local trail (`audit::index`) answers exactly as a full read of
//! the files does: searches (every filter, a department's cut, a limit, by data subject), the
//! league table and the change preview's replay, on a trail a real gateway wrote; after
//! more calls are appended (read incrementally); after a segment goes (retention); and with
//! damage in the files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::*;
use xgate::{
    audit::{
        index::TrailIndex,
        read::{Cut, Query, Subject, search},
    },
    policy::{Policy, impact},
    tools::report::{self, Period, Range},
};

/// Calls of every kind the pages count: allowed (with rows, so returned subjects), refused
/// for several reasons, by subject id, by region.
async fn calls(h: &Harness, round: usize) -> String {
    let ca_t = token("civil-affairs");
    let mut ca = h.data("civil-affairs").await;
    // The county office sees its district's ids in clear (civil affairs sees them masked).
    let mut x = h.data("xihu-civil-affairs").await;
    let resp = x
        .query(req(
            query("hukou.person_basic", "temporary-relief", &[], 3),
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
    let id = text(&resp.rows[round % resp.rows.len()].values[col]);
    ca.query(req(
        query(
            "hukou.person_basic",
            "subsidy-eligibility",
            &[&format!("id_number = {id}")],
            1,
        ),
        &ca_t,
    ))
    .await
    .unwrap();
    ca.query(req(query("hukou.person_basic", "marketing", &[], 1), &ca_t))
        .await
        .unwrap_err();
    let health_t = token("health");
    let mut health = h.data("health").await;
    health
        .query(req(
            query("hukou.person_basic", "medical-insurance", &[], 1),
            &health_t,
        ))
        .await
        .unwrap_err();
    health
        .query(req(
            query(
                "market.company_registry",
                "medical-institution-licensing",
                &[],
                2,
            ),
            &health_t,
        ))
        .await
        .unwrap();
    id
}

fn queries(subject: Subject) -> Vec<Query> {
    let at = |s: &str| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    };
    let q = Query::default;
    vec![
        q(),
        Query {
            consumer: Some("civil-affairs".into()),
            ..q()
        },
        Query {
            consumer: Some("nobody".into()),
            ..q()
        },
        Query {
            dataset: Some("hukou.person_basic".into()),
            decision: Some("deny".into()),
            ..q()
        },
        Query {
            status: Some("permission_denied".into()),
            ..q()
        },
        Query {
            since: Some(at("2000-01-01T00:00:00Z")),
            until: Some(at("2999-01-01T00:00:00+08:00")),
            consumer: Some("health".into()),
            ..q()
        },
        Query {
            until: Some(at("2000-01-01T00:00:00Z")),
            ..q()
        },
        Query {
            subject: Some(subject.clone()),
            ..q()
        },
        Query {
            subject: Some(subject),
            consumer: Some("health".into()),
            ..q()
        },
    ]
}

/// Every query, the league table and the replay: the index and the files agree.
fn agree(index: &TrailIndex, policy: &Policy, candidate: &Policy, subject: &Subject) {
    let dir = index.dir().to_owned();
    let view = index.view().unwrap();
    let cut = Cut {
        dept: "public-security".into(),
        owned: HashSet::from(["hukou.person_basic".to_owned()]),
    };
    for q in queries(subject.clone()) {
        let mut files = Vec::new();
        let read = search(&dir, &q, |v| files.push(v)).unwrap();
        let (found, idx) = view.search(&q, None, usize::MAX).unwrap();
        assert_eq!(found, files, "{q:?}");
        if q.subject.is_some() && q.consumer.is_none() {
            // Asked for by id, and returned to the county office.
            assert!(files.len() >= 2, "{files:#?}");
        }
        assert_eq!(
            (idx.matched, idx.damaged, idx.torn_tail_bytes),
            (read.matched, read.damaged, read.torn_tail_bytes),
            "{q:?}"
        );
        assert_eq!(
            idx.first_damage.map(|d| d.to_string()),
            read.first_damage.map(|d| d.to_string())
        );
        // A limit builds the first records only, and still counts them all.
        let (two, idx) = view.search(&q, None, 2).unwrap();
        assert_eq!(two[..], files[..files.len().min(2)], "{q:?}");
        assert_eq!(idx.matched, read.matched, "{q:?}");
        // A department administrator's cut.
        let kept: Vec<_> = files.iter().filter(|v| cut.keeps(v)).cloned().collect();
        let (found, idx) = view.search(&q, Some(&cut), usize::MAX).unwrap();
        assert_eq!(found, kept, "{q:?}");
        assert_eq!(idx.matched, kept.len() as u64);
    }
    let range = Range::default();
    for period in [Period::Day, Period::Month, Period::All] {
        let (from_files, read) = report::build_from_dir(&dir, policy, period, range).unwrap();
        let (from_index, idx) = report::build_from_index(&view, policy, period, range);
        assert_eq!(
            serde_json::to_value(&from_index).unwrap(),
            serde_json::to_value(&from_files).unwrap()
        );
        assert_eq!((idx.matched, idx.damaged), (read.matched, read.damaged));
    }
    let since = Some(time::OffsetDateTime::now_utc() - time::Duration::days(1));
    let from_files = impact::over_dir(&dir, policy, candidate, since, None).unwrap();
    let from_index = impact::over_index(&view, policy, candidate, since, None).unwrap();
    assert_eq!(from_index, from_files);
    assert!(
        from_files.replayed > 0 && !from_files.rows.is_empty(),
        "{from_files:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_answers_as_the_files_do() {
    // Small segments, so the trail has several and one is dropped below.
    let mut h = Harness::start(Opts {
        config: Some(std::sync::Arc::new(|c: &mut xgate::config::Config| {
            c.audit.segment_max_bytes = 4096
        })),
        ..Opts::default()
    })
    .await;
    let text = std::fs::read_to_string(&h.policy_path).unwrap();
    let policy = Policy::load(&h.policy_path).unwrap();
    let tightened = h.policy_path.with_file_name("candidate.yaml");
    std::fs::write(
        &tightened,
        text.replacen(
            "purposes: [subsidy-eligibility",
            "purposes: [subsidy-review",
            1,
        ),
    )
    .unwrap();
    let candidate = Policy::load(&tightened).unwrap();
    let key = xgate::audit::load_subject_key(&certs().join("audit-subject.key")).unwrap();

    let index = TrailIndex::new(&h.audit_path);
    let id = calls(&h, 0).await;
    let subject = Subject::of(&key, &id);
    agree(&index, &policy, &candidate, &subject);
    let before = index.view().unwrap().len();

    // Appended since: read from where the index stopped, and the same as a fresh index.
    for round in 1..6 {
        calls(&h, round).await;
    }
    agree(&index, &policy, &candidate, &subject);
    let after = index.view().unwrap().len();
    assert!(after > before, "{before} → {after}");
    let fresh = TrailIndex::new(&h.audit_path);
    assert_eq!(fresh.view().unwrap().len(), after);
    h.stop_all().await;
    let segs = xgate::audit::store::segments(&h.audit_path).unwrap();
    assert!(segs.len() >= 5, "{segs:?}");

    // Retention removes the oldest segment: its rows go with it.
    std::fs::remove_file(&segs[0].1).unwrap();
    agree(&index, &policy, &candidate, &subject);
    assert!(index.view().unwrap().len() < after);

    // Damage: a segment in the middle replaced by one with a foreign line (a new file, read
    // again), and a gap.
    let mid = &segs[2].1;
    let mut bytes = std::fs::read(mid).unwrap();
    bytes.extend_from_slice(b"not a record\n");
    let tmp = mid.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, mid).unwrap();
    std::fs::remove_file(&segs[3].1).unwrap();
    agree(&index, &policy, &candidate, &subject);
    let s = index.view().unwrap().searched();
    assert_eq!(s.damaged, 2, "{:?}", s.first_damage);
}
