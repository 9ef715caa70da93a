//! What `audit verify`, `audit search` and `report` see in a damaged trail: NUL bytes, cuts at
//! the end (held to the signed head), removed or repeated checkpoints, added segments and
//! lines. Each case is an edit of a copy of a real gateway's trail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{path::Path, sync::Arc};

use common::{trail::*, *};

/// A real trail: 40 calls, a checkpoint every 4 records, segments of about 12 kB (several
/// segments, several checkpoints in each). Returns the directory and a copy of its head
/// taken after the first 20 calls.
async fn trail_with(segment_max_bytes: u64) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit");
    let a = audit.clone();
    let hook: ConfigHook = Arc::new(move |c| {
        c.audit.dir = a.clone();
        c.audit.segment_max_bytes = segment_max_bytes;
        c.audit.checkpoint_every_records = 4;
    });
    let mut h = Harness::start(Opts {
        config: Some(hook),
        ..Opts::default()
    })
    .await;
    let t = token("civil-affairs");
    let mut c = h.data("civil-affairs").await;
    let mut early_head = String::new();
    for i in 0..40 {
        c.query(req(
            query("hukou.person_basic", "subsidy-eligibility", &[], 1),
            &t,
        ))
        .await
        .unwrap();
        if i == 19 {
            early_head = std::fs::read_to_string(audit.join("head.json")).unwrap();
        }
    }
    h.stop().await;
    let (code, out) = verify(&audit);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the trail reaches its signed head"), "{out}");
    (dir, early_head)
}

/// [`trail_with`] 12 kB segments: several of them, each with several checkpoints.
async fn trail() -> (tempfile::TempDir, String) {
    let t = trail_with(12_000).await;
    assert!(segments(&audit_dir(&t.0)).len() >= 3, "rotated");
    t
}

fn lines(seg: &Path) -> Vec<String> {
    std::fs::read_to_string(seg)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(seg: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(seg, text).unwrap();
}

fn is_checkpoint(l: &str) -> bool {
    l.starts_with("{\"checkpoint\"")
}

/// (segment index, line index) of every checkpoint, oldest first.
fn checkpoints(d: &Path) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (s, seg) in segments(d).iter().enumerate() {
        for (i, l) in lines(seg).iter().enumerate() {
            if is_checkpoint(l) {
                out.push((s, i));
            }
        }
    }
    out
}

/// Keep the trail up to and including line `line` of segment `seg`; delete what follows.
fn cut_after(d: &Path, seg: usize, line: usize) {
    let segs = segments(d);
    let mut kept = lines(&segs[seg]);
    kept.truncate(line + 1);
    write_lines(&segs[seg], &kept);
    for later in &segs[seg + 1..] {
        std::fs::remove_file(later).unwrap();
    }
}

/// The newest segment that holds lines (the newest may be an empty, just rotated one).
fn newest_with_records(d: &Path) -> std::path::PathBuf {
    segments(d)
        .into_iter()
        .rev()
        .find(|s| !lines(s).is_empty())
        .unwrap()
}

fn audit_dir(d: &tempfile::TempDir) -> std::path::PathBuf {
    d.path().join("audit")
}

#[tokio::test]
async fn nul_bytes_in_the_live_segment_are_damage_not_the_end() {
    // One segment: the live one, with 40 records and their checkpoints.
    let (d, _) = trail_with(1 << 20).await;
    let copy = copy_dir(&audit_dir(&d));
    let newest = newest_with_records(copy.path());
    let mut ls = lines(&newest);
    assert_eq!(segments(copy.path()).len(), 1);
    // A few NULs at the start of the second line, and a forged record after them.
    ls[1] = format!("\0\0\0\0{}", ls[1]);
    let forged = (ls.len() / 2..ls.len())
        .find(|i| !is_checkpoint(&ls[*i]) && !is_checkpoint(&ls[*i + 1]))
        .expect("a record followed by a record");
    ls[forged] = rehash(&ls[forged].replace(
        "\"consumer_dept\":\"civil-affairs\"",
        "\"consumer_dept\":\"health\"",
    ));
    write_lines(&newest, &ls);
    let (code, out) = verify(copy.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("NUL bytes") && out.contains(":2"), "{out}");
    // search names it too, and fails with --strict.
    let dir = copy.path().to_str().unwrap();
    let (code, out) = xgate(&["audit", "search", dir, "--format", "jsonl"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1 damaged line(s) skipped") && out.contains("NUL bytes"),
        "{out}"
    );
    let (code, out) = xgate(&["audit", "search", dir, "--strict", "--format", "jsonl"]);
    assert_eq!(code, 1, "{out}");
    // Without the NULs, the forged record itself is what verify reports.
    let mut ls = lines(&newest);
    ls[1] = ls[1].trim_start_matches('\0').to_owned();
    write_lines(&newest, &ls);
    let (code, out) = verify(copy.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not chain"), "{out}");
}

#[tokio::test]
async fn cuts_at_the_end_are_held_to_the_signed_head() {
    let (d, early_head) = trail().await;
    let dir = audit_dir(&d);
    type Cut = (&'static str, Box<dyn Fn(&Path)>, &'static str);
    let cases: Vec<Cut> = vec![
        (
            "cut right after each checkpoint but the last",
            Box::new(|p| {
                let cps = checkpoints(p);
                let (s, l) = cps[cps.len() - 2];
                cut_after(p, s, l);
            }),
            "from the end",
        ),
        (
            "cut right after the first checkpoint",
            Box::new(|p| {
                let (s, l) = checkpoints(p)[0];
                cut_after(p, s, l);
            }),
            "from the end",
        ),
        (
            "the newest segment deleted",
            Box::new(|p| std::fs::remove_file(segments(p).last().unwrap()).unwrap()),
            "segments were deleted from the end",
        ),
        (
            "the newest segment emptied",
            Box::new(|p| std::fs::write(newest_with_records(p), "").unwrap()),
            "signed records were cut from the end",
        ),
        (
            "a non-final checkpoint repeated",
            Box::new(|p| {
                let (s, l) = checkpoints(p)[1];
                let seg = &segments(p)[s];
                let mut ls = lines(seg);
                let dup = ls[l].clone();
                ls.insert(l + 1, dup);
                write_lines(seg, &ls);
            }),
            "repeated or out of order",
        ),
        (
            "a non-final checkpoint deleted",
            Box::new(|p| {
                let (s, l) = checkpoints(p)[1];
                let seg = &segments(p)[s];
                let mut ls = lines(seg);
                ls.remove(l);
                write_lines(seg, &ls);
            }),
            "a checkpoint was removed",
        ),
        (
            "an empty segment added",
            Box::new(|p| {
                let n = segments(p).len() as u64 + 1;
                std::fs::write(p.join(format!("audit-{n:08}.jsonl")), "").unwrap();
            }),
            "is empty and newer",
        ),
        (
            "an empty segment in the middle",
            Box::new(|p| std::fs::write(&segments(p)[1], "").unwrap()),
            "empty segment that is not the newest",
        ),
        (
            "a segment deleted from the middle",
            Box::new(|p| std::fs::remove_file(&segments(p)[1]).unwrap()),
            "missing: deleted from the middle",
        ),
        (
            "a trailing blank line",
            Box::new(|p| {
                let seg = segments(p).last().unwrap().clone();
                let mut text = std::fs::read_to_string(&seg).unwrap();
                text.push('\n');
                std::fs::write(&seg, text).unwrap();
            }),
            "a blank line",
        ),
        (
            "the head deleted",
            Box::new(|p| std::fs::remove_file(p.join("head.json")).unwrap()),
            "no head.json",
        ),
        (
            "the head edited",
            Box::new(|p| {
                let h = std::fs::read_to_string(p.join("head.json")).unwrap();
                let h = h.replace("\"checkpoint_seq\":", "\"checkpoint_seq\":1");
                std::fs::write(p.join("head.json"), h).unwrap();
            }),
            "signature does not verify",
        ),
    ];
    for (what, cut, says) in cases {
        let copy = copy_dir(&dir);
        cut(copy.path());
        let (code, out) = verify(copy.path());
        assert_eq!(code, 1, "{what}: {out}");
        assert!(out.contains(says), "{what}: expected `{says}` in: {out}");
    }

    // A cut back to an older head, with that older head put back: the trail's own head cannot
    // see it; the head an auditor saved later can.
    let saved_late = d.path().join("saved-head.json");
    let (code, out) = xgate(&["audit", "head", dir.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    std::fs::write(&saved_late, out).unwrap();
    let copy = copy_dir(&dir);
    let early: serde_json::Value = serde_json::from_str(&early_head).unwrap();
    let early_seq = early["head"]["checkpoint_seq"].as_u64().unwrap();
    let cps = checkpoints(copy.path());
    let (s, l) = *cps
        .iter()
        .find(|(s, l)| {
            let line = &lines(&segments(copy.path())[*s])[*l];
            line.contains(&format!("\"seq\":{early_seq},"))
        })
        .expect("the early head's checkpoint");
    cut_after(copy.path(), s, l);
    std::fs::write(copy.path().join("head.json"), &early_head).unwrap();
    let segs = segments(copy.path());
    let early_segment = early["head"]["segment"].as_u64().unwrap() as usize;
    for n in segs.len() + 1..=early_segment {
        std::fs::write(copy.path().join(format!("audit-{n:08}.jsonl")), "").unwrap();
    }
    let (code, out) = verify(copy.path());
    assert_eq!(code, 0, "the rolled-back head matches the cut trail: {out}");
    let (code, out) = xgate(&[
        "audit",
        "verify",
        copy.path().to_str().unwrap(),
        "--expect-head",
        saved_late.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the saved head"), "{out}");
    // The whole trail reaches the saved head.
    let (code, out) = xgate(&[
        "audit",
        "verify",
        dir.to_str().unwrap(),
        "--expect-head",
        saved_late.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("saved head: the trail still reaches it"),
        "{out}"
    );

    // A gateway does not write on over a cut trail (it would rewrite the head and hide it).
    let copy = copy_dir(&dir);
    let (s, l) = checkpoints(copy.path())[0];
    cut_after(copy.path(), s, l);
    std::fs::remove_file(copy.path().join("xgate.lock")).ok();
    let cfg = xgate::config::Config::demo(
        &certs(),
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/dev/policy.yaml"),
        "127.0.0.1:0".parse().unwrap(),
        copy.path().to_owned(),
    );
    let err = xgate::serve::start(&cfg)
        .await
        .expect_err("refused to start");
    let msg = err.to_string();
    assert!(msg.contains("keep it as evidence"), "{msg}");
}

#[tokio::test]
async fn search_and_report_name_damaged_lines_and_fail_when_strict() {
    let (d, _) = trail().await;
    let copy = copy_dir(&audit_dir(&d));
    let seg = segments(copy.path())[0].clone();
    let mut ls = lines(&seg);
    ls[2] = "not json at all".into();
    write_lines(&seg, &ls);
    let dir = copy.path().to_str().unwrap();
    let (code, out) = xgate(&["audit", "search", dir, "--format", "jsonl"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("1 damaged line(s) skipped, the first at audit-00000001.jsonl:3"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| l.starts_with('{')).count(),
        39,
        "{out}"
    );
    let (code, _) = xgate(&["audit", "search", dir, "--strict"]);
    assert_eq!(code, 1);
    let (code, out) = xgate(&["report", dir, "--period", "all"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 damaged line(s) skipped"), "{out}");
    let (code, out) = xgate(&["report", dir, "--period", "all", "--strict"]);
    assert_eq!(code, 1, "{out}");
    // A torn last write is the one thing skipped without a word.
    let copy = copy_dir(&audit_dir(&d));
    let newest = segments(copy.path()).last().unwrap().clone();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&newest)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":41,\"prev\":\"ab").unwrap();
    drop(f);
    let (code, out) = xgate(&[
        "audit",
        "search",
        copy.path().to_str().unwrap(),
        "--strict",
        "--format",
        "jsonl",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("damaged"), "{out}");
    let (code, out) = verify(copy.path());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("torn last write: 20 byte(s)"), "{out}");
}

/// `audit search --since/--until` compare times, not text: the same instant written with
/// offsets on either side of midnight finds the same records; garbage is a usage error.
#[tokio::test]
async fn search_time_bounds_are_times_whatever_their_offset() {
    use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};
    let (d, _) = trail_with(1 << 20).await;
    let dir = audit_dir(&d);
    let dir = dir.to_str().unwrap();
    let recs = xgate::audit::read_all(Path::new(dir)).unwrap();
    let t = |r: &serde_json::Value| {
        OffsetDateTime::parse(r["time"].as_str().unwrap(), &Rfc3339).unwrap()
    };
    let first = t(&recs[0]);
    let last = t(recs.last().unwrap());
    let count = |args: &[&str]| {
        let mut a = vec!["audit", "search", dir, "--format", "jsonl"];
        a.extend_from_slice(args);
        let (code, out) = xgate(&a);
        assert_eq!(code, 0, "{args:?}: {out}");
        out.lines().filter(|l| l.starts_with('{')).count()
    };
    // Offsets 14 hours ahead of and 12 behind UTC: one of them is on another date.
    for off in [(14, 0), (-12, 0), (8, 0), (0, 0), (5, 30)] {
        let o = UtcOffset::from_hms(off.0, off.1, 0).unwrap();
        let at = |t: OffsetDateTime| t.to_offset(o).format(&Rfc3339).unwrap();
        assert_eq!(count(&["--since", &at(first)]), recs.len(), "{off:?}");
        assert_eq!(count(&["--until", &at(first)]), 0, "{off:?}");
        assert_eq!(
            count(&["--since", &at(first), "--until", &at(last)]),
            recs.len() - recs.iter().filter(|r| t(r) == last).count(),
            "{off:?}"
        );
    }
    // A date is midnight in the zone: today in Asia/Shanghai covers what now is.
    let today = OffsetDateTime::now_utc()
        .to_offset(UtcOffset::from_hms(8, 0, 0).unwrap())
        .date()
        .to_string();
    let since_today = count(&["--since", &today, "--zone", "Asia/Shanghai"]);
    assert_eq!(since_today, recs.len());
    for bad in [
        ["--since", "zzz"],
        ["--until", "2026-13-45"],
        ["--zone", "Mars/Base"],
    ] {
        let mut a = vec!["audit", "search", dir];
        a.extend_from_slice(&bad);
        let (code, out) = xgate(&a);
        assert_eq!(code, 2, "{bad:?}: {out}");
        assert!(out.contains(bad[0]), "{bad:?} names the flag: {out}");
    }
}
