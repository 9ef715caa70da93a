//! What a candidate policy would do to recorded traffic: each recorded call re-decided under
//! the policy serving and under the candidate, by the gateway's own evaluation, and the
//! differences counted per consumer and dataset (`xgate policy impact`, the console's change
//! preview).
//!
//! A call is replayed from what its record keeps: consumer department and system, dataset,
//! purpose, the fields asked for, and the filter's shape (each condition's field and test,
//! with the region field's values). Not replayed, and so not part of the figures: a token's
//! own `purposes` claim and whether it was bound (the replay takes it as bound), rate limits
//! and quotas (they are not the policy's sharing rules), and calls whose records predate the
//! request shape (counted as `skipped`).
//!
//! One file for one replay read three ways: from the files (`over_dir`, the CLI), from the
//! trail's index (`over_index`, the console) and from the province database (`over_db`).
//! Each feeds the same `Replay`, which decides each distinct call shape once; its tests make up
//! about a fifth of the file.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap},
};

use serde::{Deserialize, Serialize};

use super::{Caller, Policy, Request, eval, scope};
use crate::pb::{Condition, Value, ValueList, condition::Test, value::Kind};

/// Per consumer and dataset: how the candidate changes its recorded calls.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ImpactRow {
    pub consumer: String,
    pub dataset: String,
    /// Calls replayed for this pair.
    pub calls: u64,
    /// Allowed under the policy serving, refused under the candidate.
    pub now_refused: u64,
    /// The candidate's reasons for those refusals.
    pub new_reasons: BTreeMap<String, u64>,
    /// Refused under the policy serving, allowed under the candidate.
    pub newly_allowed: u64,
    /// Fields returned in clear today and masked (or no longer returned) under the candidate,
    /// or masked another way: `name (mask)`, `name (old → new)`, `name (withheld)`.
    pub newly_masked: BTreeSet<String>,
    /// Fields masked (or not returned) today and in clear under the candidate.
    pub newly_shown: BTreeSet<String>,
}

impl ImpactRow {
    fn changed(&self) -> bool {
        self.now_refused > 0
            || self.newly_allowed > 0
            || !self.newly_masked.is_empty()
            || !self.newly_shown.is_empty()
    }
}

/// The whole replay.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Impact {
    pub replayed: u64,
    /// Call records that could not be replayed (no dataset, or written before records kept
    /// the request's shape).
    pub skipped: u64,
    /// The first and last replayed record's time.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Only pairs with a change, by consumer then dataset.
    pub rows: Vec<ImpactRow>,
}

/// A replayed call's filter, rebuilt from its record's shape: the region field with its
/// values, every other field with a typeless value (enough for the checks the evaluation
/// makes: the field exists, is readable, and the test suits a masked field).
fn conditions(shape: &[Cow<'_, str>]) -> Vec<Condition> {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    };
    shape
        .iter()
        .filter_map(|c| {
            let mut parts = c.splitn(3, ' ');
            let field = parts.next()?.to_owned();
            let test = parts.next()?;
            let values = parts.next();
            let test = match (test, values) {
                ("eq", Some(v)) => Test::Eq(s(v)),
                ("eq", None) => Test::Eq(Value { kind: None }),
                ("in", Some(v)) => Test::In(ValueList {
                    values: v.split(',').map(s).collect(),
                }),
                ("in", None) => Test::In(ValueList::default()),
                ("prefix", v) => Test::Prefix(v.unwrap_or_default().to_owned()),
                _ => return None,
            };
            Some(Condition {
                field,
                test: Some(test),
            })
        })
        .collect()
}

/// A call's decision under `p`: the permitted fields with their masks, or the refusal's
/// reason.
#[allow(clippy::too_many_arguments)]
fn decide(
    p: &Policy,
    dept: &str,
    system: &str,
    dataset: &str,
    purpose: &str,
    fields: &[String],
    filter: &[Condition],
    now: i64,
) -> Result<BTreeMap<String, Option<String>>, String> {
    let permit = eval::evaluate(
        p,
        Caller {
            dept,
            system,
            token_purposes: None,
            token_bound: true,
        },
        Request {
            dataset,
            fields,
            filter,
            purpose,
            now: Some(now),
        },
    )
    .map_err(|r| r.reason.to_string())?;
    if let Some(sc) = &permit.scope {
        let mut conds = filter.to_vec();
        scope::narrow(&mut conds, sc, &permit.rule).map_err(|r| r.reason.to_string())?;
    }
    // field -> its mask (`None`: in clear).
    Ok(permit
        .fields
        .iter()
        .map(|f| {
            (
                f.name.to_string(),
                (!f.mask.is_none()).then(|| f.mask.describe()),
            )
        })
        .collect())
}

/// Re-decide every call record of `records` under `current` and `candidate`.
pub fn replay<'a>(
    records: impl IntoIterator<Item = &'a serde_json::Value>,
    current: &Policy,
    candidate: &Policy,
) -> Impact {
    let mut r = Replay::new(current, candidate, None, None);
    for rec in records {
        r.push(rec);
    }
    r.finish()
}

/// What a record keeps of its call, borrowed from the line (or the JSON value) it came from:
/// only the fields a re-decision reads (the rest of the line is skipped, not built).
#[derive(Debug, Default, Deserialize)]
struct Shape<'a> {
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
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
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    fields_requested: Option<Vec<Cow<'a, str>>>,
    #[serde(borrow, default)]
    filter: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    policy_version: Option<serde::de::IgnoredAny>,
}

/// How a candidate changes one shape of call: decided once per distinct shape (and stretch
/// of time between the policies' validity bounds), applied to every call of that shape.
#[derive(Debug, Clone)]
enum Change {
    Same,
    NowRefused(String),
    NewlyAllowed,
    Fields {
        masked: Vec<String>,
        shown: Vec<String>,
    },
}

fn change(
    before: Result<BTreeMap<String, Option<String>>, String>,
    after: Result<BTreeMap<String, Option<String>>, String>,
) -> Change {
    match (before, after) {
        (Ok(_), Err(reason)) => Change::NowRefused(reason),
        (Err(_), Ok(_)) => Change::NewlyAllowed,
        (Err(_), Err(_)) => Change::Same,
        (Ok(old), Ok(new)) => {
            let mut masked = Vec::new();
            for (f, was) in &old {
                match (was, new.get(f)) {
                    // In clear, now masked; or masked another way.
                    (None, Some(Some(m))) => masked.push(format!("{f} ({m})")),
                    (Some(a), Some(Some(b))) if a != b => masked.push(format!("{f} ({a} → {b})")),
                    // In clear, now not returned.
                    (None, None) => masked.push(format!("{f} (withheld)")),
                    _ => {}
                }
            }
            let shown: Vec<String> = new
                .iter()
                .filter(|(f, now)| now.is_none() && old.get(*f).is_none_or(|m| m.is_some()))
                .map(|(f, _)| f.clone())
                .collect();
            if masked.is_empty() && shown.is_empty() {
                Change::Same
            } else {
                Change::Fields { masked, shown }
            }
        }
    }
}

/// A replay in progress: the totals, the rows by (consumer, dataset), and the change each
/// distinct call shape makes.
struct Replay<'p> {
    out: Impact,
    rows: Vec<ImpactRow>,
    /// (consumer, dataset) → index in `rows`.
    row_of: HashMap<(String, String), usize>,
    /// Each distinct shape's change, and its row.
    changes: Vec<(Change, usize)>,
    /// shape key → its index in `changes`.
    decided: HashMap<Vec<u8>, usize>,
    key: Vec<u8>,
    /// Every validity bound of both policies, sorted: a shape's decision is the same
    /// between two of them.
    bounds: Vec<i64>,
    current: &'p Policy,
    candidate: &'p Policy,
    /// The window, in µs since the epoch.
    since: Option<i64>,
    until: Option<i64>,
}

impl<'p> Replay<'p> {
    fn new(
        current: &'p Policy,
        candidate: &'p Policy,
        since: Option<time::OffsetDateTime>,
        until: Option<time::OffsetDateTime>,
    ) -> Self {
        let mut bounds: Vec<i64> = current
            .windows
            .iter()
            .chain(&candidate.windows)
            .flat_map(|w| [w.from, w.until])
            .flatten()
            .collect();
        bounds.sort_unstable();
        bounds.dedup();
        let micros = |t: time::OffsetDateTime| (t.unix_timestamp_nanos() / 1000) as i64;
        Replay {
            out: Impact::default(),
            rows: Vec::new(),
            row_of: HashMap::new(),
            changes: Vec::new(),
            decided: HashMap::new(),
            key: Vec::with_capacity(256),
            bounds,
            current,
            candidate,
            since: since.map(micros),
            until: until.map(micros),
        }
    }

    /// A record as a JSON value (the database, a slice).
    fn push(&mut self, rec: &serde_json::Value) {
        if let Ok(shape) = Shape::deserialize(rec) {
            self.observe(&shape);
        }
    }

    /// A record's line (the files): false when it is not a readable record.
    fn push_line(&mut self, line: &[u8]) -> bool {
        match serde_json::from_slice::<Shape<'_>>(line) {
            Ok(shape) => {
                self.observe(&shape);
                true
            }
            Err(_) => false,
        }
    }

    fn observe(&mut self, rec: &Shape<'_>) {
        let is_call = rec.kind.as_deref().is_none_or(|k| k == "call");
        let method = rec.method.as_deref().unwrap_or_default();
        if !is_call || !(method.ends_with("/Query") || method.ends_with("/QueryStream")) {
            return;
        }
        let time = rec.time.as_deref().unwrap_or_default();
        let at =
            time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339).ok();
        if let Some(us) = at.map(|t| (t.unix_timestamp_nanos() / 1000) as i64)
            && (self.since.is_some_and(|s| us < s) || self.until.is_some_and(|u| us >= u))
        {
            return;
        }
        let (Some(consumer), Some(dataset)) =
            (rec.consumer_dept.as_deref(), rec.dataset.as_deref())
        else {
            self.out.skipped += 1;
            return;
        };
        // Records written before the request's shape was kept: an allowed one names its
        // fields in `fields_returned`, but a refused one cannot be replayed faithfully.
        if rec.fields_requested.is_none() && rec.filter.is_none() && rec.policy_version.is_none() {
            self.out.skipped += 1;
            return;
        }
        let now = at.map_or(0, |t| t.unix_timestamp());
        let epoch = self.bounds.partition_point(|b| *b <= now);
        let system = rec.consumer_system.as_deref().unwrap_or_default();
        let purpose = rec.purpose.as_deref().unwrap_or_default();
        let fields = rec.fields_requested.as_deref().unwrap_or_default();
        let filter = rec.filter.as_deref().unwrap_or_default();
        // The shape's key: every input of the decision, separated by bytes no value holds.
        self.key.clear();
        self.key.extend_from_slice(&(epoch as u64).to_le_bytes());
        for part in [consumer, system, dataset, purpose] {
            self.key.extend_from_slice(part.as_bytes());
            self.key.push(0);
        }
        for f in fields {
            self.key.extend_from_slice(f.as_bytes());
            self.key.push(1);
        }
        self.key.push(0);
        for c in filter {
            self.key.extend_from_slice(c.as_bytes());
            self.key.push(1);
        }
        let d = match self.decided.get(&self.key) {
            Some(d) => *d,
            None => {
                let d = self.decide(consumer, system, dataset, purpose, fields, filter, now);
                self.decided.insert(self.key.clone(), d);
                d
            }
        };
        self.count(d);
        if self.out.since.is_none() {
            self.out.since = Some(time.to_owned());
        }
        let until = self.out.until.get_or_insert_with(String::new);
        until.clear();
        until.push_str(time);
    }

    /// Decide a new shape under both policies: its index in `changes`.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        consumer: &str,
        system: &str,
        dataset: &str,
        purpose: &str,
        fields: &[Cow<'_, str>],
        filter: &[Cow<'_, str>],
        now: i64,
    ) -> usize {
        let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        let filter = conditions(filter);
        let d = |p: &Policy| decide(p, consumer, system, dataset, purpose, &fields, &filter, now);
        let c = change(d(self.current), d(self.candidate));
        let rows = &mut self.rows;
        let row = *self
            .row_of
            .entry((consumer.to_owned(), dataset.to_owned()))
            .or_insert_with(|| {
                rows.push(ImpactRow {
                    consumer: consumer.to_owned(),
                    dataset: dataset.to_owned(),
                    ..ImpactRow::default()
                });
                rows.len() - 1
            });
        self.changes.push((c, row));
        self.changes.len() - 1
    }

    /// Count one replayed call of the shape `changes[d]`.
    fn count(&mut self, d: usize) {
        let Some((change, row)) = self.changes.get(d) else {
            return;
        };
        self.out.replayed += 1;
        let Some(row) = self.rows.get_mut(*row) else {
            return;
        };
        row.calls += 1;
        match change {
            Change::Same => {}
            Change::NowRefused(reason) => {
                row.now_refused += 1;
                match row.new_reasons.get_mut(reason) {
                    Some(n) => *n += 1,
                    None => {
                        row.new_reasons.insert(reason.clone(), 1);
                    }
                }
            }
            Change::NewlyAllowed => row.newly_allowed += 1,
            Change::Fields { masked, shown } => {
                for m in masked {
                    if !row.newly_masked.contains(m) {
                        row.newly_masked.insert(m.clone());
                    }
                }
                for f in shown {
                    if !row.newly_shown.contains(f) {
                        row.newly_shown.insert(f.clone());
                    }
                }
            }
        }
    }

    /// The totals, with only the pairs that changed, by consumer then dataset.
    fn finish(mut self) -> Impact {
        let mut rows: Vec<ImpactRow> = self.rows.into_iter().filter(ImpactRow::changed).collect();
        rows.sort_by(|a, b| (&a.consumer, &a.dataset).cmp(&(&b.consumer, &b.dataset)));
        self.out.rows = rows;
        self.out
    }
}

/// Replay the calls of an audit directory between `since` and `until`. Each line is read
/// for the fields the replay needs only ([`Shape`]); a line that is not a readable record
/// counts as damage, as in a search.
pub fn over_dir(
    dir: &std::path::Path,
    current: &Policy,
    candidate: &Policy,
    since: Option<time::OffsetDateTime>,
    until: Option<time::OffsetDateTime>,
) -> Result<Impact, String> {
    let mut r = Replay::new(current, candidate, since, until);
    crate::audit::read::scan(dir, |line| r.push_line(line))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(r.finish())
}

/// The same over the trail's index (the console: only what was appended since its last
/// page is read). Each row's shape is interned, so a call is counted by a look-up of four
/// numbers; the first and last calls' times are read from their lines.
pub fn over_index(
    view: &crate::audit::index::View<'_>,
    current: &Policy,
    candidate: &Policy,
    since: Option<time::OffsetDateTime>,
    until: Option<time::OffsetDateTime>,
) -> std::io::Result<Impact> {
    use crate::audit::index::{NO_SHAPE, split_shape};
    let mut r = Replay::new(current, candidate, since, until);
    let mut by_sym: rustc_hash::FxHashMap<(u32, u32, u32, usize), usize> = Default::default();
    // Which names are replayable methods, and the call kind: compared as numbers per row.
    let replayable: Vec<bool> = (0..view.names())
        .map(|s| {
            let m = view.name(s as u32);
            m.ends_with("/Query") || m.ends_with("/QueryStream")
        })
        .collect();
    let call = view.sym("call");
    let (mut first, mut last) = (None, None);
    for (at, row) in view.rows() {
        if !(row.kind == 0 || Some(row.kind) == call)
            || !replayable
                .get(row.method as usize)
                .copied()
                .unwrap_or(false)
        {
            continue;
        }
        let us = row.time_ns().map(|t| t / 1000);
        if let Some(us) = us
            && (r.since.is_some_and(|s| us < s) || r.until.is_some_and(|u| us >= u))
        {
            continue;
        }
        // (An empty name is no name.)
        if row.consumer == 0 || row.dataset == 0 || row.shape == NO_SHAPE {
            r.out.skipped += 1;
            continue;
        }
        let now = us.map_or(0, |us| us.div_euclid(1_000_000));
        let epoch = r.bounds.partition_point(|b| *b <= now);
        let key = (row.consumer, row.dataset, row.shape, epoch);
        let d = match by_sym.get(&key) {
            Some(d) => *d,
            None => {
                let (system, purpose, fields, filter) = split_shape(view.name(row.shape));
                fn cow(v: Vec<&str>) -> Vec<Cow<'_, str>> {
                    v.into_iter().map(Cow::Borrowed).collect()
                }
                let d = r.decide(
                    view.name(row.consumer),
                    system,
                    view.name(row.dataset),
                    purpose,
                    &cow(fields),
                    &cow(filter),
                    now,
                );
                by_sym.insert(key, d);
                d
            }
        };
        r.count(d);
        first.get_or_insert(at);
        last = Some(at);
    }
    let time_of = |at| -> std::io::Result<Option<String>> {
        let line = view.line(at)?;
        let v: serde_json::Value = serde_json::from_slice(&line).map_err(std::io::Error::other)?;
        Ok(v.get("time").and_then(|t| t.as_str()).map(str::to_owned))
    };
    if let Some(at) = first {
        r.out.since = time_of(at)?;
    }
    if let Some(at) = last {
        r.out.until = time_of(at)?;
    }
    Ok(r.finish())
}

/// The same over the province database.
pub async fn over_db(
    pool: &sqlx::PgPool,
    current: &Policy,
    candidate: &Policy,
    since: Option<time::OffsetDateTime>,
    until: Option<time::OffsetDateTime>,
) -> Result<Impact, String> {
    let mut r = Replay::new(current, candidate, since, until);
    let q = crate::audit::read::Query {
        since,
        until,
        ..Default::default()
    };
    crate::audit::db::search(pool, &q, |v| r.push(&v)).await?;
    Ok(r.finish())
}

/// The replay as a table for the terminal.
pub fn render_table(i: &Impact) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} call(s) replayed ({} – {}), {} skipped",
        i.replayed,
        i.since.as_deref().unwrap_or("-"),
        i.until.as_deref().unwrap_or("-"),
        i.skipped
    );
    if i.rows.is_empty() {
        o.push_str("no replayed call changes\n");
        return o;
    }
    let _ = writeln!(
        o,
        "{:<22} {:<28} {:>7} {:>11} {:>14}  details",
        "consumer", "dataset", "calls", "now refused", "newly allowed"
    );
    for r in &i.rows {
        let mut d = Vec::new();
        if !r.new_reasons.is_empty() {
            d.push(format!(
                "refused: {}",
                r.new_reasons
                    .iter()
                    .map(|(k, v)| format!("{k} × {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !r.newly_masked.is_empty() {
            d.push(format!(
                "newly masked: {}",
                r.newly_masked
                    .iter()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !r.newly_shown.is_empty() {
            d.push(format!(
                "newly shown: {}",
                r.newly_shown.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let _ = writeln!(
            o,
            "{:<22} {:<28} {:>7} {:>11} {:>14}  {}",
            r.consumer,
            r.dataset,
            r.calls,
            r.now_refused,
            r.newly_allowed,
            d.join("; ")
        );
    }
    o
}
