//! Reading the trail: `xgate audit verify` (chain and checkpoint signatures) and
//! `xgate audit search` (by consumer, dataset, time, status, decision and data subject).
//! Both walk the segments with the same layout checks and the same chunked line reader
//! (`lines`, which the index uses too), so they stay in one file.

use std::{io, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{
    head::{Head, HeadFile},
    store::{CheckpointLine, GENESIS, checkpoint_message, segments, split_hash},
};

/// A healthy trail, summarised.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub segments: u64,
    pub records: u64,
    pub checkpoints: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Records after the last checkpoint (written since; not yet signed).
    pub unsigned_tail: u64,
    /// Bytes after the last complete line of the newest segment (a write a crash cut short,
    /// or preallocated space): tolerated, and cut by the gateway's next start.
    pub torn_tail_bytes: u64,
    /// The head the trail was held to (`head.json`), if checked.
    pub head: Option<Head>,
    /// The auditor's saved head (`--expect-head`), if given: found in the trail.
    pub expected: Option<Head>,
}

/// The first damage found.
#[derive(Debug, Clone, Serialize)]
pub struct Damage {
    pub segment: String,
    pub line: u64,
    pub seq: Option<u64>,
    pub what: String,
}

impl Damage {
    pub(crate) fn at(
        segment: &str,
        line: u64,
        seq: Option<u64>,
        what: impl Into<String>,
    ) -> Damage {
        Damage {
            segment: segment.to_owned(),
            line,
            seq,
            what: what.into(),
        }
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.segment)?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if let Some(s) = self.seq {
            write!(f, " (record {s})")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// What [`walk`] hands its reader.
enum Event<'a> {
    /// A complete line (without its newline) that is not blank and holds no NUL byte.
    Line {
        segment: &'a str,
        line: u64,
        text: &'a [u8],
    },
    /// Damage in the files' layout itself (not in a line's content).
    Damage(Damage),
}

/// What [`walk`] found besides lines.
#[derive(Debug, Default)]
struct Layout {
    segments: u64,
    /// The newest segment's number (0: none).
    newest: u64,
    /// Bytes after the newest segment's last complete line.
    torn_tail: u64,
    /// Segments holding no line at all, by number.
    empty: Vec<u64>,
}

/// Read a segment from `from` in large reads and hand `each` every complete line (without
/// its newline) with its offset, split in place (no copy per line); `each` returns `Break` to
/// stop. Returns the bytes after the last complete line (a torn write, or a line still being
/// written).
pub(crate) fn lines(
    path: &Path,
    from: u64,
    mut each: impl FnMut(u64, &[u8]) -> std::ops::ControlFlow<()>,
) -> io::Result<u64> {
    let mut f = std::fs::File::open(path)?;
    io::Seek::seek(&mut f, io::SeekFrom::Start(from))?;
    let mut buf = vec![0u8; READ_CHUNK];
    // `base`: the file offset of buf[0].
    let (mut base, mut start, mut filled) = (from, 0usize, 0usize);
    loop {
        if filled == buf.len() {
            if start == 0 {
                // A line longer than the buffer: make room for it.
                buf.resize(buf.len() * 2, 0);
            } else {
                buf.copy_within(start..filled, 0);
                filled -= start;
                base += start as u64;
                start = 0;
            }
        }
        let n = io::Read::read(&mut f, &mut buf[filled..])?;
        if n == 0 {
            return Ok((filled - start) as u64);
        }
        filled += n;
        while let Some(i) = memchr::memchr(b'\n', &buf[start..filled]) {
            let off = base + start as u64;
            let text = &buf[start..start + i];
            start += i + 1;
            if each(off, text).is_break() {
                return Ok(0);
            }
        }
    }
}

/// Read every segment in order and hand each complete line to `each`, with the layout's
/// damage in between: a gap in the segment numbers, a segment that ends inside a line (only
/// the newest may: a torn last write, never handed over), an empty segment that is not the
/// newest, a blank line, NUL bytes. `each` returns `Break` to stop.
/// How much of a segment one read takes.
const READ_CHUNK: usize = 4 << 20;

fn walk(
    dir: &Path,
    mut each: impl FnMut(Event<'_>) -> std::ops::ControlFlow<()>,
) -> io::Result<Layout> {
    use std::ops::ControlFlow::Break;
    let segs = segments(dir)?;
    let mut layout = Layout {
        newest: segs.last().map_or(0, |s| s.0),
        ..Layout::default()
    };
    let mut expect_no: Option<u64> = None;
    for (no, path) in &segs {
        layout.segments += 1;
        let newest = *no == layout.newest;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(want) = expect_no
            && *no != want
        {
            let what = format!(
                "segment(s) {want}..{} are missing: deleted from the middle of the trail",
                no - 1
            );
            if each(Event::Damage(Damage::at(&name, 0, None, what))) == Break(()) {
                return Ok(layout);
            }
        }
        expect_no = Some(no + 1);
        let mut lineno = 0u64;
        let mut stopped = false;
        let tail = lines(path, 0, |_, text| {
            lineno += 1;
            let damage = if text.is_empty() {
                Some("a blank line: the writer never writes one (lines added or removed)")
            } else if memchr::memchr(0, text).is_some() {
                Some("NUL bytes inside the trail (zeroed or overwritten): not a record")
            } else {
                None
            };
            let ev = match damage {
                Some(what) => Event::Damage(Damage::at(&name, lineno, None, what)),
                None => Event::Line {
                    segment: &name,
                    line: lineno,
                    text,
                },
            };
            stopped = each(ev) == Break(());
            if stopped {
                Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        })?;
        if stopped {
            return Ok(layout);
        }
        if tail > 0 {
            // The segment ends inside a line.
            lineno += 1;
            if newest {
                layout.torn_tail = tail;
            } else {
                let what = "the segment ends inside a line: only the newest segment may end with a torn write";
                if each(Event::Damage(Damage::at(&name, lineno, None, what))) == Break(()) {
                    return Ok(layout);
                }
            }
        }
        if lineno == 0 || (lineno == 1 && layout.torn_tail > 0 && newest) {
            layout.empty.push(*no);
            if !newest {
                let what =
                    "an empty segment that is not the newest (added, or its records removed)";
                if each(Event::Damage(Damage::at(&name, 0, None, what))) == Break(()) {
                    return Ok(layout);
                }
            }
        }
    }
    Ok(layout)
}

/// What `verify` holds the trail's end to.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// Require `head.json` (the default; `--no-head` turns it off, for trails written before
    /// heads existed).
    pub head: bool,
    /// A head an auditor saved earlier: the trail must still contain its checkpoint.
    pub saved: Option<HeadFile>,
}

/// Check every segment in order: each record's hash, the chain (`prev`, consecutive `seq`),
/// every checkpoint's signature, position and its link to the one before, and the trail's
/// end against its signed head (and an auditor's saved head). Stops at the first damage.
pub fn verify(
    dir: &Path,
    public_key: &[u8],
    expect: &Expect,
) -> io::Result<Result<VerifyReport, Damage>> {
    use std::ops::ControlFlow::{Break, Continue};
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key);
    let mut rep = VerifyReport::default();
    let mut prev: Option<(u64, String)> = None;
    // Every checkpoint seen: seq -> hash.
    let mut checkpoints: std::collections::BTreeMap<u64, String> = Default::default();
    let mut first: Option<Damage> = None;
    let layout = walk(dir, |ev| {
        let r = match ev {
            Event::Damage(d) => Err(d),
            Event::Line {
                segment,
                line,
                text,
            } => verify_line(
                segment,
                line,
                text,
                &key,
                &mut prev,
                &mut checkpoints,
                &mut rep,
            ),
        };
        match r {
            Ok(()) => Continue(()),
            Err(d) => {
                first = Some(d);
                Break(())
            }
        }
    })?;
    if let Some(d) = first {
        return Ok(Err(d));
    }
    rep.segments = layout.segments;
    rep.torn_tail_bytes = layout.torn_tail;
    let trail = dir.display().to_string();
    let whole = |what: String| Ok(Err(Damage::at(&trail, 0, None, what)));
    // The end, held to the head.
    let own = super::head::read(&dir.join(super::head::HEAD_FILE))
        .map_err(|e| io::Error::new(e.kind(), format!("head.json: {e}")))?;
    match own {
        None if expect.head => {
            return whole(
                "no head.json: a cut at the end of the trail cannot be ruled out (the gateway writes it at start and at every checkpoint; --no-head for trails older than it)".into(),
            );
        }
        None => {}
        Some(f) => {
            let head = match super::head::check(&f, public_key) {
                Ok(h) => h,
                Err(e) => return whole(format!("head.json: {e}")),
            };
            if let Some(d) = end_damage(&head, &checkpoints, &layout, "the head (head.json)") {
                return whole(d);
            }
            rep.head = Some(head);
        }
    }
    if let Some(saved) = &expect.saved {
        let head = match super::head::check(saved, public_key) {
            Ok(h) => h,
            Err(e) => return whole(format!("the saved head: {e}")),
        };
        if let Some(d) = end_damage(&head, &checkpoints, &layout, "the saved head") {
            return whole(d);
        }
        rep.expected = Some(head);
    }
    Ok(Ok(rep))
}

/// Whether the trail still reaches `head`: its checkpoint present with its hash, no segment
/// it names deleted, and no empty segment added after it.
fn end_damage(
    head: &Head,
    checkpoints: &std::collections::BTreeMap<u64, String>,
    layout: &Layout,
    whose: &str,
) -> Option<String> {
    if layout.newest < head.segment {
        return Some(format!(
            "{whose} names segment {} but the newest segment is {}: segments were deleted from the end",
            head.segment, layout.newest
        ));
    }
    if let Some(extra) = layout.empty.iter().find(|n| **n > head.segment) {
        return Some(format!(
            "segment {extra} is empty and newer than the segment {whose} names ({}): added (or a crash right after a rotation: a restart rewrites the head)",
            head.segment
        ));
    }
    if head.checkpoint_seq == 0 {
        return None;
    }
    match checkpoints.get(&head.checkpoint_seq) {
        Some(h) if *h == head.checkpoint_hash => None,
        Some(_) => Some(format!(
            "the checkpoint at record {} does not sign what {whose} says: the trail was rewritten",
            head.checkpoint_seq
        )),
        None => {
            let last = checkpoints.keys().next_back().copied().unwrap_or(0);
            let older = checkpoints
                .keys()
                .next()
                .is_some_and(|s| *s > head.checkpoint_seq);
            Some(if older {
                format!(
                    "{whose} names the checkpoint at record {}, which is older than the trail's first: not this trail, or its start was removed",
                    head.checkpoint_seq
                )
            } else {
                format!(
                    "the trail ends before {whose}: its last checkpoint signs record {last}, the head's signs record {}; signed records were cut from the end",
                    head.checkpoint_seq
                )
            })
        }
    }
}

/// One line of the chain: a checkpoint or a record.
fn verify_line(
    segment: &str,
    line: u64,
    bytes: &[u8],
    key: &ring::signature::UnparsedPublicKey<&[u8]>,
    prev: &mut Option<(u64, String)>,
    checkpoints: &mut std::collections::BTreeMap<u64, String>,
    rep: &mut VerifyReport,
) -> Result<(), Damage> {
    let damage = |seq: Option<u64>, what: String| Damage::at(segment, line, seq, what);
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(damage(None, "not UTF-8 text".into()));
    };
    if text.starts_with("{\"checkpoint\"") {
        let Ok(c) = serde_json::from_str::<CheckpointLine>(text) else {
            return Err(damage(None, "unreadable checkpoint".into()));
        };
        let sig = B64.decode(&c.sig).unwrap_or_default();
        let msg = checkpoint_message(&c.checkpoint).map_err(|e| damage(None, e.to_string()))?;
        if key.verify(&msg, &sig).is_err() {
            return Err(damage(
                Some(c.checkpoint.seq),
                "checkpoint signature does not verify (forged or edited)".into(),
            ));
        }
        let cp = &c.checkpoint;
        if let Some((&last, _)) = checkpoints.iter().next_back()
            && cp.seq <= last
        {
            return Err(damage(
                Some(cp.seq),
                format!(
                    "checkpoint of record {} repeated or out of order (the last one signed record {last})",
                    cp.seq
                ),
            ));
        }
        match prev {
            Some((s, h)) if *s == cp.seq && *h == cp.hash => {}
            Some((s, _)) if *s == cp.seq => {
                return Err(damage(
                    Some(cp.seq),
                    format!(
                        "the checkpoint signs another version of record {s}: the record was replaced after it was signed"
                    ),
                ));
            }
            Some((s, _)) => {
                return Err(damage(
                    Some(cp.seq),
                    format!(
                        "checkpoint signs record {} but the chain is at record {s}: records were removed or inserted",
                        cp.seq
                    ),
                ));
            }
            None if cp.seq == 0 => {}
            // A trail whose older segments were removed by retention starts at a checkpoint.
            None => *prev = Some((cp.seq, cp.hash.clone())),
        }
        // Each checkpoint names the one before it: one removed from the middle shows.
        if let Some(p) = cp.prev {
            let before = checkpoints.keys().next_back().copied();
            let ok = match before {
                Some(b) => p == b,
                // The first checkpoint read: the first of a trail that starts at record 1.
                None => p == 0 || rep.first_seq != 1,
            };
            if !ok {
                return Err(damage(
                    Some(cp.seq),
                    format!(
                        "this checkpoint follows the one of record {p}, which is not the checkpoint before it ({}): a checkpoint was removed",
                        before.map_or("none".to_owned(), |b| format!("record {b}"))
                    ),
                ));
            }
        }
        checkpoints.insert(cp.seq, cp.hash.clone());
        rep.checkpoints += 1;
        rep.unsigned_tail = 0;
        return Ok(());
    }
    let Some((body, stated)) = split_hash(text) else {
        return Err(damage(
            None,
            "not an audit record line (truncated or edited)".into(),
        ));
    };
    #[derive(serde::Deserialize)]
    struct HeadFields {
        seq: u64,
        prev: String,
    }
    let Ok(head) = serde_json::from_str::<HeadFields>(text) else {
        return Err(damage(None, "record without seq/prev".into()));
    };
    let actual = hex::encode(Sha256::digest(body.as_bytes()));
    if actual != stated {
        return Err(damage(
            Some(head.seq),
            "content does not match its hash (edited)".into(),
        ));
    }
    match prev {
        None => {
            if head.seq == 1 && head.prev != GENESIS {
                return Err(damage(
                    Some(1),
                    "first record does not start the chain".into(),
                ));
            }
            rep.first_seq = head.seq;
        }
        Some((s, h)) => {
            if head.seq != *s + 1 {
                return Err(damage(
                    Some(head.seq),
                    format!(
                        "expected record {} here: {} record(s) missing or reordered",
                        *s + 1,
                        head.seq.abs_diff(*s + 1)
                    ),
                ));
            }
            if head.prev != *h {
                return Err(damage(
                    Some(head.seq),
                    "does not chain to the previous record".into(),
                ));
            }
            if rep.first_seq == 0 {
                rep.first_seq = head.seq;
            }
        }
    }
    *prev = Some((head.seq, stated.to_owned()));
    rep.records += 1;
    rep.unsigned_tail += 1;
    rep.last_seq = head.seq;
    Ok(())
}

/// What to look for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub consumer: Option<String>,
    pub dataset: Option<String>,
    /// Time bounds (inclusive since, exclusive until), compared as times: a record's `time`
    /// is UTC, a bound may carry any offset.
    pub since: Option<time::OffsetDateTime>,
    pub until: Option<time::OffsetDateTime>,
    /// gRPC status name (`OK`, `PERMISSION_DENIED`, ...).
    pub status: Option<String>,
    pub decision: Option<String>,
    /// A data subject: the calls that asked about them or returned their rows.
    pub subject: Option<Subject>,
}

impl Query {
    /// Byte strings a record's line must hold to match: per filter, any one of its strings
    /// (records are written compactly by serde_json, so `"consumer_dept":"x"` is exact). A
    /// line that holds them all may still not match ([`Query::matches`] decides); one that
    /// does not, cannot.
    fn needles(&self) -> Vec<Vec<Vec<u8>>> {
        let json = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let mut out = Vec::new();
        if let Some(c) = &self.consumer {
            out.push(vec![format!("\"consumer_dept\":{}", json(c)).into_bytes()]);
        }
        if let Some(d) = &self.dataset {
            out.push(vec![format!("\"dataset\":{}", json(d)).into_bytes()]);
        }
        if let Some(s) = &self.subject {
            out.push(vec![
                json(&s.asked).into_bytes(),
                format!("{:016x}", s.returned).into_bytes(),
            ]);
        }
        out
    }
}

/// A department administrator's cut of the trail: its own calls, and the calls to its
/// datasets.
#[derive(Debug, Clone, Default)]
pub struct Cut {
    pub dept: String,
    pub owned: std::collections::HashSet<String>,
}

impl Cut {
    /// Whether record `r` is in the cut.
    pub fn keeps(&self, r: &serde_json::Value) -> bool {
        r.get("consumer_dept").and_then(|v| v.as_str()) == Some(self.dept.as_str())
            || r.get("dataset")
                .and_then(|v| v.as_str())
                .is_some_and(|d| self.owned.contains(d))
    }
}

/// A data subject as the trail knows them, without their id: the keyed hash a filter on them
/// is recorded as, and the hash their returned rows are ([`super::subjects`]).
#[derive(Debug, Clone)]
pub struct Subject {
    pub asked: String,
    pub returned: u64,
}

impl Subject {
    /// The hashes of `id` under the trail's subject key.
    pub fn of(key: &ring::hmac::Key, id: &str) -> Subject {
        Subject {
            asked: super::subject_hash(key, id),
            returned: super::subjects::ReturnedKey::derive(key).hash(id),
        }
    }

    /// Whether record `r` asked about this subject or returned their rows.
    pub fn in_record(&self, r: &serde_json::Value) -> bool {
        r.get("subjects")
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(self.asked.as_str())))
            || r.get("returned_subjects")
                .and_then(|v| v.as_str())
                .is_some_and(|t| super::subjects::holds(t, self.returned))
    }
}

impl Query {
    fn in_time(&self, time: &str) -> bool {
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        // A record whose time does not parse matches no time-bounded search.
        let Ok(t) =
            time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
        else {
            return false;
        };
        self.since.is_none_or(|s| t >= s) && self.until.is_none_or(|u| t < u)
    }

    pub fn matches(&self, r: &serde_json::Value) -> bool {
        let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let time = s("time");
        self.consumer
            .as_deref()
            .is_none_or(|c| s("consumer_dept") == c)
            && self.dataset.as_deref().is_none_or(|d| s("dataset") == d)
            && self.in_time(time)
            && self
                .status
                .as_deref()
                .is_none_or(|st| s("grpc_status").eq_ignore_ascii_case(st))
            && self.decision.as_deref().is_none_or(|d| s("decision") == d)
            && self.subject.as_ref().is_none_or(|h| h.in_record(r))
    }
}

/// A search by subject shows each call once: a long stream's chunk records (kind
/// `returned_subjects`) and its own record share its trace id, and the first one found
/// stands for the call.
fn first_of_call(
    seen: &mut std::collections::HashSet<String>,
    q: &Query,
    r: &serde_json::Value,
) -> bool {
    if q.subject.is_none() {
        return true;
    }
    match r.get("trace_id").and_then(|v| v.as_str()) {
        Some(t) if !t.is_empty() => seen.insert(t.to_owned()),
        _ => true,
    }
}

/// What a search read besides the matches.
#[derive(Debug, Default)]
pub struct Searched {
    pub matched: u64,
    /// Damaged lines and layout damage (see `verify` for what counts), skipped.
    pub damaged: u64,
    pub first_damage: Option<Damage>,
    /// Bytes of a torn last write at the end of the newest segment, skipped silently.
    pub torn_tail_bytes: u64,
}

/// Every record (not checkpoint) in the trail that matches, oldest first. Only a torn last
/// write of the newest segment is skipped silently; every other line that is not a record is
/// counted as damage (the first one named), so a reader never takes a damaged trail for a
/// whole one. A line a filter rules out (by a byte search for the consumer, dataset or
/// subject) is not parsed: only its record frame is checked ([`record_shaped`]). It does not
/// check hashes: that is `verify`.
pub fn search(
    dir: &Path,
    q: &Query,
    mut each: impl FnMut(serde_json::Value),
) -> io::Result<Searched> {
    let mut out = Searched::default();
    let mut calls = std::collections::HashSet::new();
    let needles: Vec<Vec<memchr::memmem::Finder<'_>>> = q
        .needles()
        .iter()
        .map(|group| {
            group
                .iter()
                .map(|n| memchr::memmem::Finder::new(n).into_owned())
                .collect()
        })
        .collect();
    let damaged = |out: &mut Searched, d: Damage| {
        out.damaged += 1;
        out.first_damage.get_or_insert(d);
    };
    let layout = walk(dir, |ev| {
        match ev {
            Event::Damage(d) => damaged(&mut out, d),
            Event::Line {
                segment,
                line,
                text,
            } => {
                if text.starts_with(b"{\"checkpoint\"") {
                    if serde_json::from_slice::<CheckpointLine>(text).is_err() {
                        damaged(
                            &mut out,
                            Damage::at(segment, line, None, "unreadable checkpoint"),
                        );
                    }
                } else if !needles
                    .iter()
                    .all(|g| g.iter().any(|f| f.find(text).is_some()))
                {
                    // Cannot match: only checked to be shaped as a record line (damage is
                    // still counted), without parsing it (`verify` checks every byte).
                    if !record_shaped(text) {
                        damaged(
                            &mut out,
                            Damage::at(segment, line, None, "not an audit record line"),
                        );
                    }
                } else {
                    match serde_json::from_slice::<serde_json::Value>(text) {
                        Ok(v) if v.get("seq").is_some() => {
                            if q.matches(&v) && first_of_call(&mut calls, q, &v) {
                                out.matched += 1;
                                each(v);
                            }
                        }
                        _ => damaged(
                            &mut out,
                            Damage::at(segment, line, None, "not an audit record line"),
                        ),
                    }
                }
            }
        }
        std::ops::ControlFlow::Continue(())
    })?;
    out.torn_tail_bytes = layout.torn_tail;
    Ok(out)
}

/// Whether a line has a record's frame: `{"seq":` … `,"hash":"<64 hex digits>"}`. What a
/// search checks of a line it need not read (a torn, truncated, joined or foreign line fails
/// it); a line's content is `verify`'s to check.
fn record_shaped(text: &[u8]) -> bool {
    const TAIL: usize = ",\"hash\":\"".len() + 64 + 2;
    text.len() > TAIL + 7
        && text.starts_with(b"{\"seq\":")
        && text[text.len() - TAIL..].starts_with(b",\"hash\":\"")
        && text.ends_with(b"\"}")
        && text[text.len() - 66..text.len() - 2]
            .iter()
            .all(u8::is_ascii_hexdigit)
        // (two records whose newline was removed)
        && memchr::memmem::find(&text[1..], b"{\"seq\":").is_none()
}

/// Every record line (not checkpoint) of the trail, oldest first, for a reader that parses
/// only what it needs: `each` says whether the line was a readable record (if not, it counts
/// as damage, as in [`search`]). Checkpoint lines are checked here.
pub fn scan(dir: &Path, mut each: impl FnMut(&[u8]) -> bool) -> io::Result<Searched> {
    let mut out = Searched::default();
    let layout = walk(dir, |ev| {
        match ev {
            Event::Damage(d) => {
                out.damaged += 1;
                out.first_damage.get_or_insert(d);
            }
            Event::Line {
                segment,
                line,
                text,
            } => {
                let what = if text.starts_with(b"{\"checkpoint\"") {
                    serde_json::from_slice::<CheckpointLine>(text)
                        .is_err()
                        .then_some("unreadable checkpoint")
                } else if !text.starts_with(b"{\"seq\":") || !each(text) {
                    Some("not an audit record line")
                } else {
                    out.matched += 1;
                    None
                };
                if let Some(what) = what {
                    out.damaged += 1;
                    out.first_damage
                        .get_or_insert(Damage::at(segment, line, None, what));
                }
            }
        }
        std::ops::ControlFlow::Continue(())
    })?;
    out.torn_tail_bytes = layout.torn_tail;
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Lines a filter rules out are not built, but still checked: damage among them counts.
    #[test]
    fn a_filtered_search_still_counts_damage_in_lines_it_skips() {
        let dir = tempfile::tempdir().unwrap();
        let h = "0".repeat(64);
        let rec = |seq: u32, dept: &str| {
            format!("{{\"seq\":{seq},\"consumer_dept\":\"{dept}\",\"hash\":\"{h}\"}}")
        };
        let lines = [
            rec(1, "health"),
            rec(2, "civil-affairs"),
            "not a record".to_owned(),
            // Cut short (a hash of 10 digits), and two records joined (a newline lost).
            format!(
                "{{\"seq\":4,\"consumer_dept\":\"health\",\"hash\":\"{}\"}}",
                &h[..10]
            ),
            format!("{}{}", rec(5, "health"), rec(6, "health")),
            rec(7, "health"),
        ];
        std::fs::write(
            dir.path().join("audit-00000001.jsonl"),
            lines.join("\n") + "\n",
        )
        .unwrap();
        let q = Query {
            consumer: Some("civil-affairs".into()),
            ..Query::default()
        };
        let mut seen = Vec::new();
        let n = search(dir.path(), &q, |v| seen.push(v)).unwrap();
        assert_eq!((n.matched, n.damaged), (1, 3));
        assert_eq!(seen[0]["seq"], 2);
    }

    #[test]
    fn a_half_written_last_line_is_skipped_even_cut_inside_a_character() {
        let dir = tempfile::tempdir().unwrap();
        // A whole record, then one cut in the middle of a three-byte character (什 = e4 bb 80).
        let bytes = b"{\"seq\":1,\"trace_id\":\"a\"}\n{\"seq\":2,\"detail\":\"\xe4\xbb";
        std::fs::write(dir.path().join("audit-00000001.jsonl"), bytes).unwrap();
        let mut seen = Vec::new();
        let n = search(dir.path(), &Query::default(), |v| seen.push(v)).unwrap();
        assert_eq!((n.matched, n.damaged, n.torn_tail_bytes), (1, 0, 21));
        assert_eq!(seen[0]["trace_id"], "a");
    }
}
