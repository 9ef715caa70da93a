//! An index of this gateway's own trail, held in memory, for the pages that read it: audit
//! search and "who looked at my data" (`FindUsage`), the league table, the change preview.
//!
//! Each segment is read once. Every line is parsed for the fields those pages filter and
//! count by, and kept as a fixed-size [`Row`] (strings interned once for the whole trail),
//! with where the line is in its file. A later read takes only the bytes appended since:
//! the trail is append-only, so a segment whose file is replaced or shrinks (the torn tail cut
//! at start) is read again from its start, and one that is gone (retention) is dropped.
//! Data subjects are found by a Bloom filter per block of [`BLOCK_ROWS`] rows, so a look-up
//! reads only the few blocks that may hold the subject, and confirms each candidate line
//! against the record itself.
//!
//! The index reports the same damage a full read does ([`super::read::scan`]): lines that are
//! not records, layout damage (a gap in the segment numbers, a segment other than the newest
//! that is empty or ends inside a line), and the torn tail of the newest segment.
//!
//! Cost: 72 bytes of memory per record (and each distinct string once), plus 10 bits per
//! data subject a record names.
//!
//! One file: the rows, how they are read and kept current, and the searches over them are one
//! structure whose invariants (offsets, blocks, damage) hold only together.
//!
//! Not here: checking hashes and signatures (`verify`: the index trusts the bytes it read,
//! as a search always has), and the province database ([`super::db`]), which has its own
//! indexes.

use std::{
    borrow::Cow,
    collections::HashMap,
    hash::{BuildHasher, Hasher},
    io,
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
};

use serde::Deserialize;

use super::{
    read::{Damage, Query, Searched},
    store::{CheckpointLine, segments},
};

/// An interned string: an index into [`View::name`]. `0` is the empty string (a field the
/// record does not have).
pub type Sym = u32;

/// The shape of a record made before the request's shape was kept (see [`Row::shape`]).
pub const NO_SHAPE: Sym = Sym::MAX;

/// Rows per Bloom filter of data subjects.
pub const BLOCK_ROWS: usize = 4096;

/// One record line, as the pages read it.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// Where the line starts in its segment, and its length (without the newline).
    pub off: u64,
    pub len: u32,
    /// The record's time, ns since the epoch ([`NO_TIME`] when it does not parse: see
    /// [`Row::time_ns`]).
    time: i64,
    pub kind: Sym,
    pub method: Sym,
    pub consumer: Sym,
    pub system: Sym,
    pub dataset: Sym,
    pub decision: Sym,
    pub reason: Sym,
    pub status: Sym,
    /// What a re-decision reads besides the consumer and dataset: [`shape_key`] of the
    /// purpose, the fields asked for and the filter's shape; [`NO_SHAPE`] when the record
    /// has none of them.
    pub shape: Sym,
    pub latency_us: u64,
    /// A summary record's `calls` (0 for one call).
    pub calls: u32,
}

/// A time that did not parse.
const NO_TIME: i64 = i64::MIN;

impl Row {
    /// The record's time, ns since the epoch; `None` when it does not parse.
    pub fn time_ns(&self) -> Option<i64> {
        (self.time != NO_TIME).then_some(self.time)
    }
}

/// The shape a re-decision reads, as one interned string: system, purpose, then the fields
/// and the filter conditions, separated by bytes no value holds.
pub fn shape_key(
    system: &str,
    purpose: &str,
    fields: &[Cow<'_, str>],
    filter: &[Cow<'_, str>],
) -> String {
    let mut k = String::with_capacity(64);
    for part in [system, purpose] {
        k.push_str(part);
        k.push('\0');
    }
    for f in fields {
        k.push_str(f);
        k.push('\x01');
    }
    k.push('\0');
    for c in filter {
        k.push_str(c);
        k.push('\x01');
    }
    k
}

/// [`shape_key`] taken apart: (system, purpose, fields, filter).
pub fn split_shape(key: &str) -> (&str, &str, Vec<&str>, Vec<&str>) {
    let mut parts = key.splitn(4, '\0');
    let mut next = || parts.next().unwrap_or_default();
    let (system, purpose, fields, filter) = (next(), next(), next(), next());
    fn list(s: &str) -> Vec<&str> {
        s.split_terminator('\x01').collect()
    }
    (system, purpose, list(fields), list(filter))
}

/// The fields of a record line the index keeps (the rest is skipped, not built).
#[derive(Deserialize)]
struct IndexLine<'a> {
    #[allow(dead_code)]
    seq: u64,
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    consumer_dept: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    consumer_system: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    dataset: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    purpose: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    decision: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    grpc_status: Option<Cow<'a, str>>,
    #[serde(default)]
    latency_us: Option<u64>,
    #[serde(default)]
    calls: Option<u64>,
    #[serde(borrow, default)]
    fields_requested: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    filter: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    policy_version: Option<serde::de::IgnoredAny>,
    #[serde(borrow, default)]
    subjects: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    returned_subjects: Option<Cow<'a, str>>,
}

#[derive(Default)]
struct Interner {
    /// (SipHash: the names come from callers, e.g. a dataset id asked for.)
    ids: HashMap<Box<str>, Sym>,
    names: Vec<Box<str>>,
}

impl Interner {
    fn new() -> Self {
        let mut i = Interner::default();
        i.intern("");
        i
    }

    fn intern(&mut self, s: &str) -> Sym {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let id = self.names.len() as Sym;
        self.names.push(s.into());
        self.ids.insert(s.into(), id);
        id
    }

    fn opt(&mut self, s: &Option<Cow<'_, str>>) -> Sym {
        self.intern(s.as_deref().unwrap_or_default())
    }
}

/// The key a subject is found by in the Bloom filters: an asked-for subject's `s:` hash
/// hashed again to 64 bits; a returned subject's 64-bit hash as it is.
fn asked_key(s: &str) -> u64 {
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    h.write(s.as_bytes());
    h.finish()
}

/// A Bloom filter over 64-bit hashes: ten bits and seven probes per item (about 1 % false
/// positives, never a false negative).
struct Bloom {
    bits: Vec<u64>,
}

impl Bloom {
    const PROBES: u64 = 7;

    fn of(items: &[u64]) -> Bloom {
        let want = (items.len() * 10).max(64).next_power_of_two() / 64;
        let mut b = Bloom {
            bits: vec![0; if items.is_empty() { 0 } else { want }],
        };
        for h in items {
            for i in b.probes(*h) {
                b.bits[i / 64] |= 1 << (i % 64);
            }
        }
        b
    }

    fn probes(&self, h: u64) -> impl Iterator<Item = usize> + use<> {
        let m = (self.bits.len() * 64).max(1) as u64;
        let (a, step) = (h, h.rotate_left(32) | 1);
        (0..Self::PROBES).map(move |i| (a.wrapping_add(i.wrapping_mul(step)) % m) as usize)
    }

    fn may_hold(&self, h: u64) -> bool {
        !self.bits.is_empty()
            && self
                .probes(h)
                .all(|i| self.bits[i / 64] & (1 << (i % 64)) != 0)
    }
}

/// One segment as far as it has been read.
struct Seg {
    no: u64,
    path: PathBuf,
    name: String,
    /// The file it was read from (a replaced file is read again).
    ino: u64,
    /// Offset after the last complete line read.
    read_to: u64,
    /// Bytes after it when last read (a torn write, or a line still being written).
    tail: u64,
    lines: u64,
    rows: Vec<Row>,
    /// Closed blocks of [`BLOCK_ROWS`] rows: (first row, its filter).
    blocks: Vec<(usize, Bloom)>,
    /// The subject keys of the rows after the last closed block.
    open: Vec<u64>,
    damaged: u64,
    first_damage: Option<Damage>,
}

impl Seg {
    fn new(no: u64, path: PathBuf, ino: u64) -> Seg {
        Seg {
            no,
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path,
            ino,
            read_to: 0,
            tail: 0,
            lines: 0,
            rows: Vec::new(),
            blocks: Vec::new(),
            open: Vec::new(),
            damaged: 0,
            first_damage: None,
        }
    }

    fn damage(&mut self, what: &str) {
        self.damaged += 1;
        if self.first_damage.is_none() {
            self.first_damage = Some(Damage::at(&self.name, self.lines, None, what));
        }
    }

    /// Read what was appended since the last read.
    fn extend(&mut self, names: &mut Interner) -> io::Result<()> {
        let mut read_to = self.read_to;
        self.tail = super::read::lines(&self.path.clone(), self.read_to, |off, text| {
            self.line(names, off, text);
            read_to = off + text.len() as u64 + 1;
            std::ops::ControlFlow::Continue(())
        })?;
        self.read_to = read_to;
        Ok(())
    }

    fn line(&mut self, names: &mut Interner, off: u64, text: &[u8]) {
        self.lines += 1;
        if text.is_empty() {
            return self
                .damage("a blank line: the writer never writes one (lines added or removed)");
        }
        if memchr::memchr(0, text).is_some() {
            return self.damage("NUL bytes inside the trail (zeroed or overwritten): not a record");
        }
        if text.starts_with(b"{\"checkpoint\"") {
            if serde_json::from_slice::<CheckpointLine>(text).is_err() {
                self.damage("unreadable checkpoint");
            }
            return;
        }
        let l = match text
            .starts_with(b"{\"seq\":")
            .then(|| serde_json::from_slice::<IndexLine<'_>>(text))
        {
            Some(Ok(l)) => l,
            _ => return self.damage("not an audit record line"),
        };
        let has_shape =
            l.fields_requested.is_some() || l.filter.is_some() || l.policy_version.is_some();
        let shape = if has_shape {
            let key = shape_key(
                l.consumer_system.as_deref().unwrap_or_default(),
                l.purpose.as_deref().unwrap_or_default(),
                l.fields_requested.as_deref().unwrap_or_default(),
                l.filter.as_deref().unwrap_or_default(),
            );
            names.intern(&key)
        } else {
            NO_SHAPE
        };
        let time_ns = l.time.as_deref().and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .ok()
                .and_then(|t| i64::try_from(t.unix_timestamp_nanos()).ok())
        });
        self.rows.push(Row {
            off,
            len: u32::try_from(text.len()).unwrap_or(u32::MAX),
            time: time_ns.unwrap_or(NO_TIME),
            kind: names.opt(&l.kind),
            method: names.opt(&l.method),
            consumer: names.opt(&l.consumer_dept),
            system: names.opt(&l.consumer_system),
            dataset: names.opt(&l.dataset),
            decision: names.opt(&l.decision),
            reason: names.opt(&l.reason),
            status: names.opt(&l.grpc_status),
            shape,
            latency_us: l.latency_us.unwrap_or(0),
            calls: l.calls.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        });
        for s in l.subjects.iter().flatten() {
            self.open.push(asked_key(s));
        }
        if let Some(t) = l.returned_subjects.as_deref() {
            let b = t.as_bytes();
            for i in 0..b.len() / 16 {
                if let Some(h) = std::str::from_utf8(&b[i * 16..i * 16 + 16])
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                {
                    self.open.push(h);
                }
            }
        }
        let first = self.blocks.last().map_or(0, |b| b.0 + BLOCK_ROWS);
        if self.rows.len() - first == BLOCK_ROWS {
            self.blocks.push((first, Bloom::of(&self.open)));
            self.open.clear();
        }
    }

    /// Ranges of rows that may hold a subject with one of `keys`.
    fn may_hold(&self, keys: &[u64]) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        for (first, bloom) in &self.blocks {
            if keys.iter().any(|k| bloom.may_hold(*k)) {
                out.push(*first..first + BLOCK_ROWS);
            }
        }
        let first = self.blocks.last().map_or(0, |b| b.0 + BLOCK_ROWS);
        if first < self.rows.len() && keys.iter().any(|k| self.open.contains(k)) {
            out.push(first..self.rows.len());
        }
        out
    }
}

#[derive(Default)]
struct State {
    names: Interner,
    segs: Vec<Seg>,
}

/// The index of one audit directory (see the module docs).
pub struct TrailIndex {
    dir: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for TrailIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrailIndex")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl TrailIndex {
    pub fn new(dir: impl Into<PathBuf>) -> TrailIndex {
        TrailIndex {
            dir: dir.into(),
            state: Mutex::new(State {
                names: Interner::new(),
                ..State::default()
            }),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bring the index up to the files and hold it for reading (blocking: call it off the
    /// async runtime). One reader at a time; a read of what was appended since the last one
    /// is quick.
    pub fn view(&self) -> io::Result<View<'_>> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| io::Error::other("the trail index was poisoned by a panic"))?;
        let listed = segments(&self.dir)?;
        let st_ref = &mut *st;
        let mut old: HashMap<u64, Seg> = st_ref.segs.drain(..).map(|s| (s.no, s)).collect();
        for (no, path) in listed {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                // Removed between the listing and now (retention): as if not listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut seg = match old.remove(&no) {
                Some(s) if s.ino == meta.ino() && meta.len() >= s.read_to => s,
                _ => Seg::new(no, path, meta.ino()),
            };
            if meta.len() != seg.read_to + seg.tail || seg.read_to == 0 {
                seg.extend(&mut st_ref.names)?;
            }
            st_ref.segs.push(seg);
        }
        Ok(View { st })
    }
}

/// The index, up to date and held (see [`TrailIndex::view`]).
pub struct View<'a> {
    st: MutexGuard<'a, State>,
}

/// Where a row is: (segment, row) positions in the view.
pub type At = (usize, usize);

impl View<'_> {
    /// The string an interned symbol stands for.
    pub fn name(&self, s: Sym) -> &str {
        self.st.names.names.get(s as usize).map_or("", |n| n)
    }

    /// The symbol of `s`, if any record holds it.
    pub fn sym(&self, s: &str) -> Option<Sym> {
        self.st.names.ids.get(s).copied()
    }

    /// Every row, oldest first, with where it is.
    pub fn rows(&self) -> impl Iterator<Item = (At, &Row)> {
        self.st
            .segs
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.rows.iter().enumerate().map(move |(j, r)| ((i, j), r)))
    }

    /// How many names are interned (symbols run from 0 to this).
    pub fn names(&self) -> usize {
        self.st.names.names.len()
    }

    /// How many rows the index holds.
    pub fn len(&self) -> usize {
        self.st.segs.iter().map(|s| s.rows.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The line a row was read from.
    pub fn line(&self, at: At) -> io::Result<Vec<u8>> {
        let (seg, row) = self.seg_row(at)?;
        let mut buf = vec![0u8; row.len as usize];
        std::fs::File::open(&seg.path)?.read_exact_at(&mut buf, row.off)?;
        Ok(buf)
    }

    fn seg_row(&self, (i, j): At) -> io::Result<(&Seg, &Row)> {
        self.st
            .segs
            .get(i)
            .and_then(|s| Some((s, s.rows.get(j)?)))
            .ok_or_else(|| io::Error::other("no such row in the trail index"))
    }

    /// The damage a full read of the files finds (see [`super::read::scan`]): `matched` is
    /// the number of records.
    pub fn searched(&self) -> Searched {
        let mut out = Searched::default();
        let note = |out: &mut Searched, n: u64, d: Option<Damage>| {
            out.damaged += n;
            if out.first_damage.is_none() {
                out.first_damage = d;
            }
        };
        let newest = self.st.segs.last().map_or(0, |s| s.no);
        let mut expect: Option<u64> = None;
        for s in &self.st.segs {
            out.matched += s.rows.len() as u64;
            if let Some(want) = expect
                && s.no != want
            {
                let what = format!(
                    "segment(s) {want}..{} are missing: deleted from the middle of the trail",
                    s.no - 1
                );
                note(&mut out, 1, Some(Damage::at(&s.name, 0, None, what)));
            }
            expect = Some(s.no + 1);
            note(&mut out, s.damaged, s.first_damage.clone());
            let is_newest = s.no == newest;
            if s.tail > 0 {
                if is_newest {
                    out.torn_tail_bytes = s.tail;
                } else {
                    let what = "the segment ends inside a line: only the newest segment may end with a torn write";
                    note(
                        &mut out,
                        1,
                        Some(Damage::at(&s.name, s.lines + 1, None, what)),
                    );
                }
            }
            if s.lines == 0 && !is_newest {
                let what =
                    "an empty segment that is not the newest (added, or its records removed)";
                note(&mut out, 1, Some(Damage::at(&s.name, 0, None, what)));
            }
        }
        out
    }

    /// [`super::read::search`] over the index: the records `q` finds that `cut` keeps,
    /// oldest first, the first `limit` of them built; and how many matched in all, with the
    /// trail's damage.
    pub fn search(
        &self,
        q: &Query,
        cut: Option<&super::read::Cut>,
        limit: usize,
    ) -> io::Result<(Vec<serde_json::Value>, Searched)> {
        let mut out = self.searched();
        out.matched = 0;
        let mut found = Vec::new();
        // A name no record holds matches nothing.
        let want = |v: &Option<String>| -> Result<Option<Sym>, ()> {
            match v {
                None => Ok(None),
                Some(s) => self.sym(s).map(Some).ok_or(()),
            }
        };
        let (Ok(consumer), Ok(dataset), Ok(decision)) =
            (want(&q.consumer), want(&q.dataset), want(&q.decision))
        else {
            return Ok((found, out));
        };
        let status_ok: Option<Vec<bool>> = q.status.as_ref().map(|st| {
            self.st
                .names
                .names
                .iter()
                .map(|n| n.eq_ignore_ascii_case(st))
                .collect()
        });
        let cut = cut.map(|c| {
            let own = self.sym(&c.dept);
            let owned: std::collections::HashSet<Sym> =
                c.owned.iter().filter_map(|d| self.sym(d)).collect();
            (own, owned)
        });
        let ns = |t: Option<time::OffsetDateTime>| {
            t.map(|t| i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX))
        };
        let (since, until) = (ns(q.since), ns(q.until));
        let passes = |r: &Row| {
            consumer.is_none_or(|c| r.consumer == c)
                && dataset.is_none_or(|d| r.dataset == d)
                && decision.is_none_or(|d| r.decision == d)
                && status_ok
                    .as_ref()
                    .is_none_or(|ok| ok.get(r.status as usize).copied().unwrap_or(false))
                && ((since.is_none() && until.is_none())
                    || r.time_ns().is_some_and(|t| {
                        since.is_none_or(|s| t >= s) && until.is_none_or(|u| t < u)
                    }))
                && cut.as_ref().is_none_or(|(own, owned)| {
                    Some(r.consumer) == *own || owned.contains(&r.dataset)
                })
        };
        let Some(subject) = &q.subject else {
            let mut take = Vec::new();
            for (at, r) in self.rows() {
                if passes(r) {
                    out.matched += 1;
                    if take.len() < limit {
                        take.push(at);
                    }
                }
            }
            for at in take {
                match serde_json::from_slice(&self.line(at)?) {
                    Ok(v) => found.push(v),
                    // Changed under the index since it was read: not the record it was.
                    Err(_) => out.matched -= 1,
                }
            }
            return Ok((found, out));
        };
        // By subject: the blocks whose filter may hold them, each candidate line confirmed
        // by the record itself, and each call once (as in a full search).
        let keys = [asked_key(&subject.asked), subject.returned];
        let returned = format!("{:016x}", subject.returned);
        let needles = [
            memchr::memmem::Finder::new(subject.asked.as_bytes()),
            memchr::memmem::Finder::new(returned.as_bytes()),
        ];
        let mut calls = std::collections::HashSet::new();
        for seg in &self.st.segs {
            for block in seg.may_hold(&keys) {
                let rows = &seg.rows[block.start..block.end.min(seg.rows.len())];
                let Some((first, last)) = rows.first().zip(rows.last()) else {
                    continue;
                };
                // The block's lines in one read.
                let mut buf = vec![0u8; (last.off + u64::from(last.len) - first.off) as usize];
                std::fs::File::open(&seg.path)?.read_exact_at(&mut buf, first.off)?;
                for r in rows {
                    let at = (r.off - first.off) as usize;
                    let Some(text) = buf.get(at..at + r.len as usize) else {
                        continue;
                    };
                    if !passes(r) || !needles.iter().any(|n| n.find(text).is_some()) {
                        continue;
                    }
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(text) else {
                        continue;
                    };
                    if !subject.in_record(&v) {
                        continue;
                    }
                    let first_of_call = match v.get("trace_id").and_then(|t| t.as_str()) {
                        Some(t) if !t.is_empty() => calls.insert(t.to_owned()),
                        _ => true,
                    };
                    if first_of_call {
                        out.matched += 1;
                        if found.len() < limit {
                            found.push(v);
                        }
                    }
                }
            }
        }
        Ok((found, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the module docs say a record costs.
    #[test]
    fn a_row_is_72_bytes() {
        assert_eq!(std::mem::size_of::<Row>(), 72);
    }

    #[test]
    fn a_bloom_filter_never_misses_and_rarely_lies() {
        let items: Vec<u64> = (0..10_000u64)
            .map(|i| asked_key(&format!("s:{i}")))
            .collect();
        let b = Bloom::of(&items);
        assert!(items.iter().all(|h| b.may_hold(*h)));
        let lies = (10_000..20_000u64)
            .filter(|i| b.may_hold(asked_key(&format!("s:{i}"))))
            .count();
        assert!(lies < 300, "{lies} false positives in 10,000");
        assert!(!Bloom::of(&[]).may_hold(1));
    }

    #[test]
    fn a_shape_key_comes_apart_as_it_was_made() {
        let c = |v: &[&'static str]| -> Vec<Cow<'static, str>> {
            v.iter().map(|s| Cow::Borrowed(*s)).collect()
        };
        let k = shape_key("sys", "p", &c(&["a", "b"]), &c(&["region_code eq 1"]));
        assert_eq!(
            split_shape(&k),
            ("sys", "p", vec!["a", "b"], vec!["region_code eq 1"])
        );
        assert_eq!(
            split_shape(&shape_key("", "", &[], &[])),
            ("", "", vec![], vec![])
        );
    }
}
