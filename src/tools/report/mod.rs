//! The sharing league table (`xgate report`): how much each department provides and consumes,
//! how often calls are refused and why, how fast and how available its datasets are, and a
//! ranking — per day, ISO week or month — computed from the audit trail.
//!
//! [`build`] is pure aggregation: records (as [`crate::audit::read_all`] returns them) plus the
//! policy (which says who owns each dataset) in, a [`Report`] out. The `render_*` functions
//! only lay that report out: a terminal table, CSV, JSON, or one self-contained HTML page with
//! inline CSS and SVG charts (no scripts, fonts or links), every string from the trail escaped.
//!
//! Definitions (also in `docs/audit.md` and on the HTML page):
//! - a call is **provided** by the owner of its dataset (per the policy; datasets the policy does
//!   not know go to [`UNKNOWN`]) and **consumed** by its `consumer_dept`. Catalogue calls
//!   (`ListDatasets`, `DescribeDataset`) are answered by the gateway: consumed, never provided;
//! - a call is **denied** when the gateway refused it: `decision: deny`, or a permitted call
//!   refused by a rate limit or quota ([`LIMIT_REFUSALS`]); every other call is **allowed**;
//! - **availability**: the share of allowed calls that did not fail with a provider error
//!   ([`PROVIDER_FAILURES`]);
//! - latency percentiles (nearest rank) are over allowed calls only;
//! - **score** = 100 × (0.4 × allowed calls provided ÷ the period's highest + 0.3 × datasets
//!   provided ÷ the period's highest + 0.3 × availability); see [`score`].
//!
//! What it does not do: check that the trail is intact (that is `xgate audit verify`), or judge
//! whether refusals were right (a denial may be the policy working as intended). Records with
//! no consumer department (refused TLS handshakes) are summarised as unattributed and counted
//! nowhere else.
//!
//! Size: ~1,250 lines of code and 400 of tests (its words in two languages are `words.rs`):
//! one pass over the trail and its renderings (text, JSON, CSV, HTML), for `xgate report`
//! and the console's league page. The aggregation and the HTML page would be the first two
//! files to split off.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    str::FromStr,
};

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};

pub use crate::console::i18n::Lang;
use crate::policy::Policy;

mod words;
pub use words::width;
use words::{Words, fill, pad, words};

/// The provider of records whose dataset the policy does not know.
pub const UNKNOWN: &str = "(unknown)";
/// How a refusal without a reason is counted.
const NO_REASON: &str = "(no reason)";
/// Reasons that count against the provider's availability.
pub const PROVIDER_FAILURES: [&str; 4] = [
    "PROVIDER_UNAVAILABLE",
    "PROVIDER_TIMEOUT",
    "PROVIDER_SATURATED",
    "PROVIDER_ERROR",
];
/// Refusals of an already permitted call that count as denials.
pub const LIMIT_REFUSALS: [&str; 2] = ["RATE_LIMITED", "QUOTA_EXHAUSTED"];
/// Score weights: allowed calls provided, datasets provided, availability.
pub const WEIGHTS: (f64, f64, f64) = (0.4, 0.3, 0.3);

/// How records are grouped in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    /// ISO 8601 week (Monday to Sunday), e.g. `2026-W48`.
    Week,
    Month,
    /// One period for the whole range.
    All,
}

impl FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "day" => Ok(Period::Day),
            "week" => Ok(Period::Week),
            "month" => Ok(Period::Month),
            "all" => Ok(Period::All),
            _ => Err(format!("--period `{s}`: use day, week, month or all")),
        }
    }
}

impl Period {
    /// The label of the period `t` falls in (in `t`'s offset).
    pub fn label(self, t: OffsetDateTime) -> String {
        let d = t.date();
        match self {
            Period::Day => format!("{:04}-{:02}-{:02}", d.year(), d.month() as u8, d.day()),
            Period::Week => {
                let (y, w, _) = d.to_iso_week_date();
                format!("{y:04}-W{w:02}")
            }
            Period::Month => format!("{:04}-{:02}", d.year(), d.month() as u8),
            Period::All => "all".into(),
        }
    }
}

/// Which records count (`from` inclusive, `to` exclusive) and the offset periods use.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub from: Option<OffsetDateTime>,
    pub to: Option<OffsetDateTime>,
    pub offset: UtcOffset,
}

impl Default for Range {
    fn default() -> Self {
        Range {
            from: None,
            to: None,
            offset: UtcOffset::UTC,
        }
    }
}

impl Range {
    /// From the command line: bounds as RFC 3339 (`2026-11-27T08:00:00+08:00`) or a date
    /// (`2026-11-27`, midnight in `zone`); `zone` as `Asia/Shanghai`, `UTC`, `+08:00`, `Z`.
    pub fn parse(from: Option<&str>, to: Option<&str>, zone: &str) -> Result<Range, String> {
        Self::parse_flags(from, to, zone, ["--from", "--to"])
    }

    /// [`Range::parse`], naming the command's own flags in its errors.
    pub fn parse_flags(
        from: Option<&str>,
        to: Option<&str>,
        zone: &str,
        flags: [&str; 2],
    ) -> Result<Range, String> {
        let offset = parse_zone(zone)?;
        let bound = |flag: &str, s: &str| -> Result<OffsetDateTime, String> {
            if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
                return Ok(t);
            }
            let date_fmt = time::macros::format_description!("[year]-[month]-[day]");
            time::Date::parse(s, &date_fmt)
                .map(|d| d.midnight().assume_offset(offset))
                .map_err(|_| {
                    format!("{flag} `{s}`: use a date (2026-11-27) or RFC 3339 (2026-11-27T08:00:00+08:00)")
                })
        };
        let r = Range {
            from: from.map(|s| bound(flags[0], s)).transpose()?,
            to: to.map(|s| bound(flags[1], s)).transpose()?,
            offset,
        };
        if let (Some(f), Some(t)) = (r.from, r.to)
            && f >= t
        {
            return Err(format!("{} must be before {}", flags[0], flags[1]));
        }
        Ok(r)
    }

    fn contains(&self, t: OffsetDateTime) -> bool {
        self.from.is_none_or(|f| t >= f) && self.to.is_none_or(|u| t < u)
    }
}

/// The province's zone (`Asia/Shanghai`, `UTC`, `+08:00`, `Z`), the same names
/// `limits.quota_timezone` takes: days here are the days quotas reset on.
pub fn parse_zone(s: &str) -> Result<UtcOffset, String> {
    let z = if s.eq_ignore_ascii_case("z") {
        "UTC"
    } else {
        s
    };
    crate::limits::zone_offset(z)
        .ok()
        .and_then(|secs| i32::try_from(secs).ok())
        .and_then(|secs| UtcOffset::from_whole_seconds(secs).ok())
        .ok_or_else(|| format!("--zone `{s}`: use Asia/Shanghai, UTC, or an offset like +08:00"))
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub period: Period,
    /// RFC 3339 bounds used (inclusive, exclusive), if any.
    pub from: Option<String>,
    pub to: Option<String>,
    pub utc_offset: String,
    /// The policy that said who owns each dataset.
    pub policy_version: String,
    /// Records in range.
    pub records: u64,
    /// Records skipped because their time could not be read.
    pub unreadable: u64,
    /// Oldest first.
    pub periods: Vec<PeriodReport>,
}

/// One period: every department, best first.
#[derive(Debug, Clone, Serialize)]
pub struct PeriodReport {
    /// `2026-11-27`, `2026-W48`, `2026-11` or `all`.
    pub period: String,
    pub records: u64,
    /// Ranked departments first (best first), then [`UNKNOWN`] if any record needed it.
    pub departments: Vec<DeptRow>,
    pub unattributed: Unattributed,
}

/// Records without a consumer department: counted here only.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Unattributed {
    pub records: u64,
    pub by_reason: BTreeMap<String, u64>,
}

/// One department in one period.
#[derive(Debug, Clone, Serialize)]
pub struct DeptRow {
    /// `None` for [`UNKNOWN`] (not a department).
    pub rank: Option<u32>,
    pub department: String,
    /// The department's name from the policy.
    pub name: Option<String>,
    pub score: f64,
    /// 100 × the share of the calls it made that were let through, when it made any: what a
    /// department that only consumes is measured on (asking only for what its grants allow).
    /// Not part of the ranking.
    pub consumer_score: Option<f64>,
    /// Calls to its datasets.
    pub provided: Side,
    /// Calls it made.
    pub consumed: Side,
}

/// One side (provider or consumer) of a department's calls.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Side {
    pub calls: u64,
    pub allowed: u64,
    pub denied: u64,
    /// `denied / calls`; `None` without calls.
    pub denial_rate: Option<f64>,
    pub denials_by_reason: BTreeMap<String, u64>,
    /// Distinct datasets with at least one allowed call.
    pub datasets: u64,
    /// Allowed calls that failed with a provider error.
    pub provider_errors: u64,
    /// `1 - provider_errors / allowed`; `None` without allowed calls.
    pub availability: Option<f64>,
    /// Latency of allowed calls, microseconds (nearest rank).
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

/// The fields of a record the report reads.
struct Call<'a> {
    time: OffsetDateTime,
    consumer: Option<&'a str>,
    dataset: Option<&'a str>,
    catalog: bool,
    denied: bool,
    reason: Option<&'a str>,
    latency_us: u64,
    /// How many calls the record stands for (1, or a summary's `calls`).
    weight: u64,
}

/// What the league table reads of a record, borrowed from its line or JSON value (the rest
/// is skipped, not built).
#[derive(Debug, Default, serde::Deserialize)]
struct Line<'a> {
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    consumer_dept: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    dataset: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    decision: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reason: Option<Cow<'a, str>>,
    #[serde(default)]
    latency_us: Option<u64>,
    #[serde(default)]
    calls: Option<u64>,
}

/// A record as the league table counts it.
enum Read<'a> {
    Call(Call<'a>),
    /// A record that is not a call (a stream's chunk of returned subjects, an
    /// administrator's action: their `kind`): not counted, and not damage.
    Other,
    /// A call record without a readable time.
    Unreadable,
}

impl<'a> Call<'a> {
    fn from_line(l: &'a Line<'a>) -> Read<'a> {
        let s = |v: &'a Option<Cow<'a, str>>| v.as_deref().filter(|x| !x.is_empty());
        if s(&l.kind).is_some_and(|k| k != "call") {
            return Read::Other;
        }
        let Some(time) = s(&l.time).and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()) else {
            return Read::Unreadable;
        };
        let reason = s(&l.reason);
        Read::Call(Call {
            time,
            consumer: s(&l.consumer_dept),
            dataset: s(&l.dataset),
            catalog: s(&l.method).is_some_and(|m| m.starts_with("/xgate.v1.Catalog/")),
            denied: s(&l.decision) != Some("allow")
                || reason.is_some_and(|r| LIMIT_REFUSALS.contains(&r)),
            reason,
            latency_us: l.latency_us.unwrap_or(0),
            // A summary record (refusals counted while the trail could not be written)
            // stands for `calls` calls.
            weight: l.calls.filter(|n| *n > 0).unwrap_or(1),
        })
    }

    /// A row of the trail's index, read as [`Call::from_line`] reads a line.
    fn from_row(view: &'a crate::audit::index::View<'_>, r: &crate::audit::index::Row) -> Read<'a> {
        let s = |sym| Some(view.name(sym)).filter(|x| !x.is_empty());
        if s(r.kind).is_some_and(|k| k != "call") {
            return Read::Other;
        }
        let Some(time) = r
            .time_ns()
            .and_then(|t| OffsetDateTime::from_unix_timestamp_nanos(i128::from(t)).ok())
        else {
            return Read::Unreadable;
        };
        let reason = s(r.reason);
        Read::Call(Call {
            time,
            consumer: s(r.consumer),
            dataset: s(r.dataset),
            catalog: s(r.method).is_some_and(|m| m.starts_with("/xgate.v1.Catalog/")),
            denied: s(r.decision) != Some("allow")
                || reason.is_some_and(|r| LIMIT_REFUSALS.contains(&r)),
            reason,
            latency_us: r.latency_us,
            weight: Some(u64::from(r.calls)).filter(|n| *n > 0).unwrap_or(1),
        })
    }

    fn reason_label(&self) -> String {
        self.reason.unwrap_or(NO_REASON).to_owned()
    }
}

#[derive(Default)]
struct Acc {
    side: Side,
    datasets: BTreeSet<String>,
    latencies: Vec<u64>,
}

impl Acc {
    /// `n` records like `c`, standing for `weight` calls, with the latencies of the allowed.
    fn add(&mut self, c: &Call, n: u64, weight: u64, latencies: &[u64]) {
        let s = &mut self.side;
        s.calls += weight;
        if c.denied {
            s.denied += weight;
            match s.denials_by_reason.get_mut(c.reason.unwrap_or(NO_REASON)) {
                Some(x) => *x += weight,
                None => {
                    s.denials_by_reason.insert(c.reason_label(), weight);
                }
            }
            return;
        }
        s.allowed += n;
        if c.reason.is_some_and(|r| PROVIDER_FAILURES.contains(&r)) {
            s.provider_errors += n;
        }
        if let Some(d) = c.dataset
            && !self.datasets.contains(d)
        {
            self.datasets.insert(d.to_owned());
        }
        self.latencies.extend_from_slice(latencies);
    }

    fn finish(mut self) -> Side {
        let mut s = self.side;
        s.datasets = self.datasets.len() as u64;
        s.denial_rate = ratio(s.denied, s.calls);
        s.availability = ratio(s.allowed - s.provider_errors, s.allowed);
        s.p50_us = nth_percentile(&mut self.latencies, 50.0);
        s.p99_us = nth_percentile(&mut self.latencies, 99.0);
        s
    }
}

fn ratio(n: u64, d: u64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

/// [`percentile`] of values in any order (reordered in linear time, not sorted).
fn nth_percentile(values: &mut [u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    let i = rank.clamp(1, values.len()) - 1;
    Some(*values.select_nth_unstable(i).1)
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `p`% of the
/// values at or below it.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// The ranking score, 0–100, rounded to one decimal: 40% allowed calls provided relative to
/// the period's most-used provider, 30% datasets provided relative to the provider with the
/// most, 30% availability (a department that served nothing scores 0 on it).
pub fn score(side: &Side, max_allowed: u64, max_datasets: u64) -> f64 {
    let rel = |n: u64, max: u64| ratio(n, max).unwrap_or(0.0);
    let (wc, wd, wa) = WEIGHTS;
    let s = wc * rel(side.allowed, max_allowed)
        + wd * rel(side.datasets, max_datasets)
        + wa * side.availability.unwrap_or(0.0);
    (s * 1000.0).round() / 10.0
}

/// The league table of `records` (JSON values: the database, tests).
pub fn build(
    records: &[serde_json::Value],
    policy: &Policy,
    period: Period,
    range: Range,
) -> Report {
    let mut b = Builder::new(policy, period, range);
    for v in records {
        match Line::deserialize(v) {
            Ok(l) => b.push(&l),
            Err(_) => b.unreadable += 1,
        }
    }
    b.finish()
}

/// The league table of a trail's index: what the console uses (the index is kept between
/// pages, so only what was appended since the last page is read). Also the trail's damage.
pub fn build_from_index(
    view: &crate::audit::index::View<'_>,
    policy: &Policy,
    period: Period,
    range: Range,
) -> (Report, crate::audit::read::Searched) {
    // Rows alike for the table (one local day, consumer, dataset, outcome) are counted as
    // one group: a million records are a few thousand groups.
    type Key = (time::Date, u32, u32, u32, bool, bool);
    let mut groups: rustc_hash::FxHashMap<Key, (OffsetDateTime, u64, u64, Vec<u64>)> =
        Default::default();
    let mut b = Builder::new(policy, period, range);
    for (_, r) in view.rows() {
        let c = match Call::from_row(view, r) {
            Read::Call(c) => c,
            other => {
                b.push_read(other);
                continue;
            }
        };
        if !range.contains(c.time) {
            continue;
        }
        let day = c.time.to_offset(range.offset).date();
        let key = (day, r.consumer, r.dataset, r.reason, c.catalog, c.denied);
        let g = groups
            .entry(key)
            .or_insert_with(|| (c.time, 0, 0, Vec::new()));
        g.1 += 1;
        g.2 += c.weight;
        if !c.denied {
            g.3.push(c.latency_us);
        }
    }
    for ((_, consumer, dataset, reason, catalog, denied), (time, n, weight, lats)) in groups {
        let s = |sym| Some(view.name(sym)).filter(|x| !x.is_empty());
        let c = Call {
            time,
            consumer: s(consumer),
            dataset: s(dataset),
            catalog,
            denied,
            reason: s(reason),
            latency_us: 0,
            weight,
        };
        b.add(&c, n, weight, &lats);
    }
    (b.finish(), view.searched())
}

/// The league table of an audit directory, read line by line for the fields it counts only
/// (no record is built or held): what the console and `xgate report DIR` use. Also what
/// the read found of damage.
pub fn build_from_dir(
    dir: &std::path::Path,
    policy: &Policy,
    period: Period,
    range: Range,
) -> std::io::Result<(Report, crate::audit::read::Searched)> {
    let mut b = Builder::new(policy, period, range);
    let read =
        crate::audit::read::scan(dir, |line| match serde_json::from_slice::<Line<'_>>(line) {
            Ok(l) => {
                b.push(&l);
                true
            }
            Err(_) => false,
        })?;
    Ok((b.finish(), read))
}

#[derive(Default)]
struct PeriodAcc {
    records: u64,
    depts: BTreeMap<String, (Acc, Acc)>,
    unattributed: Unattributed,
}

/// The league table being counted, a record at a time.
struct Builder<'p> {
    policy: &'p Policy,
    period: Period,
    range: Range,
    periods: BTreeMap<String, PeriodAcc>,
    total: u64,
    unreadable: u64,
    /// The last record's local date and its period's label.
    last_label: Option<(time::Date, String)>,
}

impl<'p> Builder<'p> {
    fn new(policy: &'p Policy, period: Period, range: Range) -> Self {
        Builder {
            policy,
            period,
            range,
            periods: BTreeMap::new(),
            total: 0,
            unreadable: 0,
            last_label: None,
        }
    }

    fn push(&mut self, l: &Line<'_>) {
        self.push_read(Call::from_line(l));
    }

    fn push_read(&mut self, read: Read<'_>) {
        let c = match read {
            Read::Call(c) => c,
            Read::Other => return,
            Read::Unreadable => {
                self.unreadable += 1;
                return;
            }
        };
        if !self.range.contains(c.time) {
            return;
        }
        self.add(&c, 1, c.weight, &[c.latency_us]);
    }

    /// `n` records like `c` (in range), standing for `weight` calls.
    fn add(&mut self, c: &Call<'_>, n: u64, weight: u64, latencies: &[u64]) {
        self.total += n;
        // Consecutive records mostly share a day: its label is made once.
        let date = c.time.to_offset(self.range.offset).date();
        if self.last_label.as_ref().is_none_or(|(d, _)| *d != date) {
            let label = self.period.label(c.time.to_offset(self.range.offset));
            self.last_label = Some((date, label));
        }
        let label = self.last_label.as_ref().map_or("", |(_, l)| l.as_str());
        let p = match self.periods.get_mut(label) {
            Some(p) => p,
            None => self.periods.entry(label.to_owned()).or_default(),
        };
        p.records += n;
        let Some(consumer) = c.consumer else {
            p.unattributed.records += weight;
            *p.unattributed
                .by_reason
                .entry(c.reason_label())
                .or_default() += weight;
            return;
        };
        match p.depts.get_mut(consumer) {
            Some(d) => d.1.add(c, n, weight, latencies),
            None => p
                .depts
                .entry(consumer.to_owned())
                .or_default()
                .1
                .add(c, n, weight, latencies),
        }
        if let Some(ds) = c.dataset.filter(|_| !c.catalog) {
            let owner = self
                .policy
                .dataset(ds)
                .map_or(UNKNOWN, |d| d.owner.as_str());
            match p.depts.get_mut(owner) {
                Some(d) => d.0.add(c, n, weight, latencies),
                None => p
                    .depts
                    .entry(owner.to_owned())
                    .or_default()
                    .0
                    .add(c, n, weight, latencies),
            }
        }
    }

    fn finish(self) -> Report {
        let Builder {
            policy,
            period,
            range,
            periods,
            total,
            unreadable,
            last_label: _,
        } = self;
        let periods = periods
            .into_iter()
            .map(|(label, mut p)| {
                for d in &policy.file.departments {
                    p.depts.entry(d.id.clone()).or_default();
                }
                let mut rows: Vec<DeptRow> = p
                    .depts
                    .into_iter()
                    .map(|(id, (prov, cons))| DeptRow {
                        rank: None,
                        name: policy.department(&id).map(|d| d.name.clone()),
                        department: id,
                        score: 0.0,
                        consumer_score: None,
                        provided: prov.finish(),
                        consumed: cons.finish(),
                    })
                    .collect();
                rank(&mut rows);
                PeriodReport {
                    period: label,
                    records: p.records,
                    departments: rows,
                    unattributed: p.unattributed,
                }
            })
            .collect();
        let fmt = |t: Option<OffsetDateTime>| t.and_then(|t| t.format(&Rfc3339).ok());
        Report {
            period,
            from: fmt(range.from),
            to: fmt(range.to),
            utc_offset: format!(
                "{}{:02}:{:02}",
                if range.offset.is_negative() { '-' } else { '+' },
                range.offset.whole_hours().unsigned_abs(),
                range.offset.minutes_past_hour().unsigned_abs()
            ),
            policy_version: policy.version.to_string(),
            records: total,
            unreadable,
            periods,
        }
    }
}

/// Score, sort (score, then allowed calls provided, then id) and rank; equal scores share a
/// rank. [`UNKNOWN`] goes last, unranked.
fn rank(rows: &mut [DeptRow]) {
    let ranked = |r: &DeptRow| r.department != UNKNOWN;
    let max_allowed = rows
        .iter()
        .filter(|r| ranked(r))
        .map(|r| r.provided.allowed)
        .max()
        .unwrap_or(0);
    let max_ds = rows
        .iter()
        .filter(|r| ranked(r))
        .map(|r| r.provided.datasets)
        .max()
        .unwrap_or(0);
    for r in rows.iter_mut().filter(|r| ranked(r)) {
        r.score = score(&r.provided, max_allowed, max_ds);
        r.consumer_score =
            ratio(r.consumed.allowed, r.consumed.calls).map(|x| (x * 1000.0).round() / 10.0);
    }
    rows.sort_by(|a, b| {
        ranked(b)
            .cmp(&ranked(a))
            .then(b.score.total_cmp(&a.score))
            .then(b.provided.allowed.cmp(&a.provided.allowed))
            .then(a.department.cmp(&b.department))
    });
    let mut prev: Option<(f64, u32)> = None;
    for (i, r) in rows.iter_mut().enumerate().filter(|(_, r)| ranked(r)) {
        let n = match prev {
            Some((s, n)) if s == r.score => n,
            _ => i as u32 + 1,
        };
        r.rank = Some(n);
        prev = Some((r.score, n));
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
}

fn ms(us: Option<u64>) -> String {
    us.map_or("-".into(), |us| format!("{:.1}", us as f64 / 1000.0))
}

fn reasons(m: &BTreeMap<String, u64>, sep: &str, eq: &str) -> String {
    let mut v: Vec<_> = m.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    v.iter()
        .map(|(r, n)| format!("{r}{eq}{n}"))
        .collect::<Vec<_>>()
        .join(sep)
}

/// Strings from the trail, made safe for a terminal: control characters become `?`.
fn term(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn rank_label(r: &DeptRow) -> String {
    r.rank.map_or("-".into(), |n| n.to_string())
}

fn range_line(rep: &Report, w: &Words) -> String {
    let period = serde_json::to_value(rep.period)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let period = w
        .periods
        .iter()
        .find(|(k, _)| *k == period)
        .map_or(period.clone(), |(_, v)| (*v).to_owned());
    let mut o = fill(w.range_records, &[&rep.records, &period]);
    if rep.from.is_some() || rep.to.is_some() {
        o += &fill(
            w.range_from_to,
            &[
                &rep.from.as_deref().unwrap_or(w.range_start),
                &rep.to.as_deref().unwrap_or(w.range_end),
            ],
        );
    }
    o += &fill(w.range_zone_policy, &[&rep.utc_offset, &rep.policy_version]);
    if rep.unreadable > 0 {
        o += &fill(w.range_unreadable, &[&rep.unreadable]);
    }
    if rep.periods.is_empty() {
        o += w.range_none;
    }
    o
}

/// A terminal table per period, denial reasons and the unattributed summary below each.
pub fn render_table(rep: &Report, lang: Lang) -> String {
    let w = words(lang);
    let mut o = String::new();
    let _ = writeln!(o, "{}", fill(w.table_title, &[&range_line(rep, w)]));
    // (column widths in terminal cells; the department column left-aligned)
    const WIDTHS: [usize; 15] = [4, 22, 5, 6, 8, 6, 7, 8, 8, 7, 8, 4, 8, 8, 7];
    let line = |cells: [String; 15]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i == 4 || i == 10 {
                l.push_str(" |");
            }
            l.push_str(if i == 0 { "" } else { " " });
            if i == 2 {
                l.push(' ');
            }
            l.push_str(&pad(c, WIDTHS[i], i == 1));
        }
        l
    };
    for p in &rep.periods {
        let _ = writeln!(o, "\n{}", fill(w.period_line, &[&p.period, &p.records]));
        let _ = writeln!(o, "{}", line(w.cols.map(str::to_owned)));
        for r in &p.departments {
            let _ = writeln!(
                o,
                "{}",
                line([
                    rank_label(r),
                    term(&r.department),
                    format!("{:.1}", r.score),
                    r.consumer_score
                        .map_or("-".to_owned(), |x| format!("{x:.1}")),
                    r.provided.calls.to_string(),
                    r.provided.datasets.to_string(),
                    pct(r.provided.availability),
                    ms(r.provided.p50_us),
                    ms(r.provided.p99_us),
                    pct(r.provided.denial_rate),
                    r.consumed.calls.to_string(),
                    r.consumed.datasets.to_string(),
                    ms(r.consumed.p50_us),
                    ms(r.consumed.p99_us),
                    pct(r.consumed.denial_rate),
                ])
            );
        }
        let mut lines = Vec::new();
        for r in &p.departments {
            for (side, s) in [(w.its_calls, &r.consumed), (w.calls_to_it, &r.provided)] {
                if !s.denials_by_reason.is_empty() {
                    lines.push(format!(
                        "  {} {} {}",
                        pad(&term(&r.department), 22, true),
                        pad(side, 12, true),
                        term(&reasons(&s.denials_by_reason, ", ", " "))
                    ));
                }
            }
        }
        if !lines.is_empty() {
            let _ = writeln!(o, "{}", w.denials_by_reason);
            for l in lines {
                let _ = writeln!(o, "{l}");
            }
        }
        if p.unattributed.records > 0 {
            let _ = writeln!(
                o,
                "{}",
                fill(
                    w.unattributed_text,
                    &[
                        &p.unattributed.records,
                        &term(&reasons(&p.unattributed.by_reason, ", ", " "))
                    ]
                )
            );
        }
    }
    o
}

/// The CSV columns, in order.
pub const CSV_COLUMNS: [&str; 26] = [
    "period",
    "rank",
    "department",
    "score",
    "provided_calls",
    "provided_allowed",
    "provided_denied",
    "provided_denial_rate",
    "provided_denials_by_reason",
    "datasets_provided",
    "provider_errors",
    "availability",
    "provided_p50_us",
    "provided_p99_us",
    "consumed_calls",
    "consumed_allowed",
    "consumed_denied",
    "consumed_denial_rate",
    "consumed_denials_by_reason",
    "datasets_used",
    "consumed_provider_errors",
    "consumed_p50_us",
    "consumed_p99_us",
    "name",
    "policy_version",
    "consumer_score",
];

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// One row per period and department (plus `(unattributed)` rows: their records counted as
/// consumed calls, all denied). Rates are fractions; reasons are `REASON=n;REASON=n`.
pub fn render_csv(rep: &Report) -> String {
    let opt = |x: Option<u64>| x.map_or(String::new(), |x| x.to_string());
    let rate = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x:.4}"));
    let mut o = CSV_COLUMNS.join(",") + "\n";
    for p in &rep.periods {
        for r in &p.departments {
            let (pv, c) = (&r.provided, &r.consumed);
            let cells = [
                p.period.clone(),
                r.rank.map_or(String::new(), |n| n.to_string()),
                r.department.clone(),
                format!("{:.1}", r.score),
                pv.calls.to_string(),
                pv.allowed.to_string(),
                pv.denied.to_string(),
                rate(pv.denial_rate),
                reasons(&pv.denials_by_reason, ";", "="),
                pv.datasets.to_string(),
                pv.provider_errors.to_string(),
                rate(pv.availability),
                opt(pv.p50_us),
                opt(pv.p99_us),
                c.calls.to_string(),
                c.allowed.to_string(),
                c.denied.to_string(),
                rate(c.denial_rate),
                reasons(&c.denials_by_reason, ";", "="),
                c.datasets.to_string(),
                c.provider_errors.to_string(),
                opt(c.p50_us),
                opt(c.p99_us),
                r.name.clone().unwrap_or_default(),
                rep.policy_version.clone(),
                r.consumer_score
                    .map_or(String::new(), |x| format!("{x:.1}")),
            ];
            o += &cells
                .iter()
                .map(|c| csv_cell(c))
                .collect::<Vec<_>>()
                .join(",");
            o.push('\n');
        }
        let u = &p.unattributed;
        if u.records > 0 {
            let n = u.records.to_string();
            let mut cells = vec![String::new(); CSV_COLUMNS.len()];
            cells[0] = p.period.clone();
            cells[2] = "(unattributed)".into();
            cells[14] = n.clone();
            cells[16] = n;
            cells[17] = "1.0000".into();
            cells[18] = reasons(&u.by_reason, ";", "=");
            cells[24] = rep.policy_version.clone();
            o += &cells
                .iter()
                .map(|c| csv_cell(c))
                .collect::<Vec<_>>()
                .join(",");
            o.push('\n');
        }
    }
    o
}

/// The report as pretty JSON (the [`Report`] structure).
pub fn render_json(rep: &Report) -> String {
    serde_json::to_string_pretty(rep).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")) + "\n"
}

/// Escape text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if c.is_control() && c != '\n' => o.push('?'),
            c => o.push(c),
        }
    }
    o
}

const PALETTE: [&str; 8] = [
    "#d9534f", "#f0ad4e", "#5bc0de", "#9b59b6", "#8d6e63", "#e67e22", "#16a085", "#7f8c8d",
];
const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}\
h1{font-size:1.6rem}h2{margin-top:2.5rem;border-bottom:2px solid #ddd;padding-bottom:.3rem}h3{margin-top:1.8rem}\
table{border-collapse:collapse;width:100%;font-size:.92rem}th,td{padding:.35rem .5rem;border-bottom:1px solid #e3e3e3;text-align:right}\
th{background:#f4f6f8;vertical-align:bottom}td.l,th.l{text-align:left}tr.top td{background:#eef8ee}\
.note{color:#555;font-size:.9rem}.box{background:#f8f9fb;border:1px solid #e1e4e8;border-radius:6px;padding:.8rem 1rem}\
svg{max-width:100%;height:auto}svg text{font-family:inherit;font-size:12px}code{background:#f1f1f1;padding:0 .2rem}\
.wide{overflow-x:auto}table.league{font-size:.85rem}table.league th{font-size:.8rem}\
td.reasons{min-width:11rem;max-width:16rem;word-break:break-word;font-size:.8rem}";

/// One self-contained HTML page: explanation, then per period the ranking table and three
/// charts (calls provided/consumed, denial rate by reason, availability).
pub fn render_html(rep: &Report, lang: Lang) -> String {
    let w = words(lang);
    format!(
        "<!DOCTYPE html>\n<html lang=\"{}\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{}</title><style>{CSS}</style></head><body>\n\
<h1>{}</h1>\n{}</body></html>\n",
        w.html_lang,
        w.title,
        w.title,
        render_html_body(rep, lang)
    )
}

/// The page's content without the document around it and its style (the console embeds it
/// under its own stylesheet: no inline style there).
pub fn render_html_body(rep: &Report, lang: Lang) -> String {
    let w = words(lang);
    let mut o = String::new();
    let (wc, wd, wa) = WEIGHTS;
    let _ = writeln!(o, "<p class=\"note\">{}</p>", esc(&range_line(rep, w)));
    o.push_str(&fill(
        w.how,
        &[
            &format!("{:.0}", wc * 100.0),
            &format!("{:.0}", wd * 100.0),
            &format!("{:.0}", wa * 100.0),
        ],
    ));
    if rep.periods.is_empty() {
        let _ = writeln!(o, "<p>{}</p>", w.no_records);
    }
    for p in &rep.periods {
        let _ = writeln!(
            o,
            "<h2>{}</h2>",
            fill(w.period, &[&esc(&p.period), &p.records])
        );
        html_table(&mut o, p, w);
        let depts: Vec<&DeptRow> = p
            .departments
            .iter()
            .filter(|r| r.provided.calls + r.consumed.calls > 0)
            .collect();
        let _ = writeln!(o, "<h3>{}</h3>", w.h_calls);
        chart_calls(&mut o, &depts, w);
        let _ = writeln!(o, "<h3>{}</h3>", w.h_refused);
        chart_denials(&mut o, &depts, w);
        let _ = writeln!(o, "<h3>{}</h3>", w.h_avail);
        chart_availability(&mut o, &depts, w);
        if p.unattributed.records > 0 {
            let _ = writeln!(
                o,
                "<p class=\"note\">{}</p>",
                fill(
                    w.unattributed_html,
                    &[
                        &p.unattributed.records,
                        &esc(&reasons(&p.unattributed.by_reason, ", ", " × "))
                    ]
                )
            );
        }
    }
    o
}

fn html_table(o: &mut String, p: &PeriodReport, w: &Words) {
    o.push_str("<div class=\"wide\"><table class=\"league\"><thead><tr>");
    for (i, h) in w.th.iter().enumerate() {
        let class = if i == 1 || i == 13 {
            " class=\"l\""
        } else {
            ""
        };
        let _ = write!(o, "<th{class}>{h}</th>");
    }
    o.push_str("</tr></thead><tbody>\n");
    for r in &p.departments {
        let name = match &r.name {
            Some(n) => format!(
                "{}<br><span class=\"note\">{}</span>",
                esc(n),
                esc(&r.department)
            ),
            None => esc(&r.department),
        };
        let _ = writeln!(
            o,
            "<tr{}><td>{}</td><td class=\"l\">{}</td><td><b>{:.1}</b></td><td>{}</td><td>{}</td><td>{}</td>\
<td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td class=\"l reasons\">{}</td></tr>",
            if r.rank == Some(1) {
                " class=\"top\""
            } else {
                ""
            },
            esc(&rank_label(r)),
            name,
            r.score,
            r.consumer_score
                .map_or("–".to_owned(), |x| format!("{x:.1}")),
            r.provided.calls,
            r.provided.datasets,
            pct(r.provided.availability),
            pct(r.provided.denial_rate),
            ms(r.provided.p50_us),
            ms(r.provided.p99_us),
            r.consumed.calls,
            r.consumed.datasets,
            pct(r.consumed.denial_rate),
            ms(r.consumed.p50_us),
            ms(r.consumed.p99_us),
            // One reason per line: the column stays narrow (it ran off a 1,300 px page).
            reasons(&r.consumed.denials_by_reason, "\n", " × ")
                .lines()
                .map(esc)
                .collect::<Vec<_>>()
                .join("<br>"),
        );
    }
    o.push_str("</tbody></table></div>\n");
}

const LABEL_W: f64 = 190.0;
const BAR_W: f64 = 440.0;
const SVG_W: f64 = 820.0;

fn svg_open(o: &mut String, h: f64, label: &str) {
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{SVG_W}\" height=\"{h}\" viewBox=\"0 0 {SVG_W} {h}\" role=\"img\" aria-label=\"{}\">",
        esc(label)
    );
}

fn svg_label(o: &mut String, y: f64, text: &str) {
    let _ = writeln!(
        o,
        "<text x=\"{}\" y=\"{y}\" text-anchor=\"end\" dominant-baseline=\"middle\">{}</text>",
        LABEL_W - 8.0,
        esc(text)
    );
}

fn svg_bar(o: &mut String, x: f64, y: f64, w: f64, h: f64, fill: &str, title: &str) {
    let _ = writeln!(
        o,
        "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{fill}\"><title>{}</title></rect>",
        esc(title)
    );
}

fn svg_value(o: &mut String, x: f64, y: f64, text: &str) {
    let _ = writeln!(
        o,
        "<text x=\"{:.1}\" y=\"{y:.1}\" dominant-baseline=\"middle\" fill=\"#333\">{}</text>",
        x + 4.0,
        esc(text)
    );
}

fn legend(o: &mut String, y: f64, items: &[(&str, String)]) {
    let mut x = LABEL_W;
    for (color, text) in items {
        let _ = writeln!(
            o,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{y:.1}\" dominant-baseline=\"middle\">{}</text>",
            y - 6.0,
            x + 16.0,
            esc(text)
        );
        x += 40.0 + 7.0 * words::width(text) as f64;
    }
}

fn chart_calls(o: &mut String, depts: &[&DeptRow], w: &Words) {
    if depts.is_empty() {
        let _ = writeln!(o, "<p class=\"note\">{}</p>", w.no_calls);
        return;
    }
    let max = depts
        .iter()
        .map(|r| r.provided.calls.max(r.consumed.calls))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let row = 40.0;
    let h = 30.0 + row * depts.len() as f64;
    svg_open(o, h, w.chart_calls);
    legend(
        o,
        12.0,
        &[
            ("#2e7d32", w.legend_provided.into()),
            ("#1565c0", w.legend_consumed.into()),
        ],
    );
    for (i, r) in depts.iter().enumerate() {
        let y = 28.0 + row * i as f64;
        svg_label(o, y + row / 2.0 - 2.0, &r.department);
        for (k, (n, color, what)) in [
            (r.provided.calls, "#2e7d32", w.bar_provided),
            (r.consumed.calls, "#1565c0", w.bar_consumed),
        ]
        .into_iter()
        .enumerate()
        {
            let len = BAR_W * n as f64 / max;
            let by = y + 2.0 + 17.0 * k as f64;
            svg_bar(
                o,
                LABEL_W,
                by,
                len,
                15.0,
                color,
                &fill(what, &[&r.department, &n]),
            );
            svg_value(o, LABEL_W + len, by + 8.0, &n.to_string());
        }
    }
    o.push_str("</svg>\n");
}

fn chart_denials(o: &mut String, depts: &[&DeptRow], w: &Words) {
    let depts: Vec<_> = depts.iter().filter(|r| r.consumed.calls > 0).collect();
    let all: BTreeSet<&String> = depts
        .iter()
        .flat_map(|r| r.consumed.denials_by_reason.keys())
        .collect();
    if all.is_empty() {
        let _ = writeln!(o, "<p class=\"note\">{}</p>", w.no_refused);
        return;
    }
    let color = |reason: &String| {
        let i = all.iter().position(|r| *r == reason).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };
    let row = 26.0;
    let legend_rows = all.len().div_ceil(2);
    let top = 20.0 * legend_rows as f64 + 8.0;
    let h = top + row * depts.len() as f64 + 6.0;
    svg_open(o, h, w.chart_refused);
    let reasons_v: Vec<_> = all.iter().collect();
    for (li, chunk) in reasons_v.chunks(2).enumerate() {
        let items: Vec<(&str, String)> = chunk.iter().map(|r| (color(r), (**r).clone())).collect();
        legend(o, 12.0 + 20.0 * li as f64, &items);
    }
    for (i, r) in depts.iter().enumerate() {
        let y = top + row * i as f64;
        svg_label(o, y + row / 2.0 - 2.0, &r.department);
        svg_bar(
            o,
            LABEL_W,
            y + 3.0,
            BAR_W,
            row - 10.0,
            "#eceff1",
            w.all_its_calls,
        );
        let mut x = LABEL_W;
        for (reason, n) in &r.consumed.denials_by_reason {
            let share = *n as f64 / r.consumed.calls as f64;
            let len = BAR_W * share;
            svg_bar(
                o,
                x,
                y + 3.0,
                len,
                row - 10.0,
                color(reason),
                &fill(
                    w.bar_refused,
                    &[
                        &r.department,
                        &r.consumed.calls,
                        n,
                        reason,
                        &pct(Some(share)),
                    ],
                ),
            );
            x += len;
        }
        svg_value(
            o,
            LABEL_W + BAR_W,
            y + row / 2.0 - 2.0,
            &fill(
                w.refused_value,
                &[
                    &pct(r.consumed.denial_rate),
                    &r.consumed.denied,
                    &r.consumed.calls,
                ],
            ),
        );
    }
    o.push_str("</svg>\n");
}

fn chart_availability(o: &mut String, depts: &[&DeptRow], w: &Words) {
    let depts: Vec<_> = depts
        .iter()
        .filter(|r| r.provided.availability.is_some())
        .collect();
    if depts.is_empty() {
        let _ = writeln!(o, "<p class=\"note\">{}</p>", w.no_served);
        return;
    }
    let row = 26.0;
    let h = 30.0 + row * depts.len() as f64;
    svg_open(o, h, w.chart_avail);
    legend(
        o,
        12.0,
        &[
            ("#2e7d32", w.avail_legend[0].into()),
            ("#f0ad4e", w.avail_legend[1].into()),
            ("#d9534f", w.avail_legend[2].into()),
        ],
    );
    for (i, r) in depts.iter().enumerate() {
        let y = 26.0 + row * i as f64;
        let a = r.provided.availability.unwrap_or(0.0);
        let shade = if a >= 0.99 {
            "#2e7d32"
        } else if a >= 0.95 {
            "#f0ad4e"
        } else {
            "#d9534f"
        };
        svg_label(o, y + row / 2.0 - 2.0, &r.department);
        svg_bar(o, LABEL_W, y + 3.0, BAR_W, row - 10.0, "#eceff1", "100%");
        svg_bar(
            o,
            LABEL_W,
            y + 3.0,
            BAR_W * a,
            row - 10.0,
            shade,
            &fill(
                w.bar_avail,
                &[
                    &r.department as &dyn std::fmt::Display,
                    &r.provided.allowed,
                    &(r.provided.allowed - r.provided.provider_errors),
                ],
            ),
        );
        svg_value(
            o,
            LABEL_W + BAR_W,
            y + row / 2.0 - 2.0,
            &fill(
                w.avail_value,
                &[
                    &pct(Some(a)) as &dyn std::fmt::Display,
                    &r.provided.provider_errors,
                ],
            ),
        );
    }
    o.push_str("</svg>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy() -> Policy {
        let text = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/dev/policy.yaml"),
        )
        .unwrap();
        Policy::from_yaml(&text).unwrap()
    }

    fn rec(
        time: &str,
        consumer: Option<&str>,
        dataset: Option<&str>,
        decision: &str,
        reason: Option<&str>,
        latency_us: u64,
    ) -> serde_json::Value {
        json!({
            "time": time, "method": "/xgate.v1.DataExchange/Query",
            "consumer_dept": consumer, "dataset": dataset, "decision": decision,
            "reason": reason, "latency_us": latency_us, "grpc_status": "OK",
        })
    }

    fn row<'a>(p: &'a PeriodReport, d: &str) -> &'a DeptRow {
        p.departments.iter().find(|r| r.department == d).unwrap()
    }

    const T: &str = "2026-11-27T04:00:00.000Z";

    #[test]
    fn a_summary_record_counts_as_the_calls_it_stands_for() {
        let p = crate::policy::Policy::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/dev/policy.yaml"
        )))
        .unwrap();
        let mut summary = rec(
            T,
            Some("health"),
            None,
            "deny",
            Some("AUDIT_UNAVAILABLE"),
            0,
        );
        summary["method"] = json!("(refusals)");
        summary["calls"] = json!(40);
        let one = rec(
            T,
            Some("health"),
            None,
            "deny",
            Some("AUDIT_UNAVAILABLE"),
            0,
        );
        let r = build(&[summary, one], &p, Period::All, Range::default());
        let h = row(&r.periods[0], "health");
        assert_eq!((h.consumed.calls, h.consumed.denied), (41, 41));
        assert_eq!(h.consumed.denials_by_reason["AUDIT_UNAVAILABLE"], 41);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&[7], 50.0), Some(7));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 99.0), Some(4));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn provided_consumed_denials_latency_and_availability() {
        let hp = Some("hukou.person_basic");
        let recs = vec![
            rec(T, Some("civil-affairs"), hp, "allow", None, 1000),
            rec(T, Some("civil-affairs"), hp, "allow", None, 3000),
            rec(
                T,
                Some("civil-affairs"),
                hp,
                "allow",
                Some("PROVIDER_TIMEOUT"),
                9000,
            ),
            rec(
                T,
                Some("civil-affairs"),
                hp,
                "allow",
                Some("RATE_LIMITED"),
                5,
            ),
            rec(T, Some("health"), hp, "deny", Some("GRANT_MISSING"), 10),
            rec(T, Some("health"), hp, "deny", Some("GRANT_MISSING"), 10),
            rec(
                T,
                Some("health"),
                Some("hukou.criminal_record"),
                "deny",
                Some("SHARE_TYPE_NONE"),
                10,
            ),
            rec(
                T,
                Some("health"),
                Some("market.company_registry"),
                "allow",
                None,
                2000,
            ),
            rec(
                T,
                Some("health"),
                Some("no.such"),
                "deny",
                Some("DATASET_UNKNOWN"),
                10,
            ),
            rec(T, None, None, "deny", Some("TLS_HANDSHAKE_FAILED"), 0),
        ];
        let rep = build(&recs, &policy(), Period::Day, Range::default());
        assert_eq!(rep.records, 10);
        assert_eq!(rep.periods.len(), 1);
        let p = &rep.periods[0];
        assert_eq!(p.period, "2026-11-27");

        let ca = row(p, "civil-affairs");
        assert_eq!(
            (ca.consumed.calls, ca.consumed.allowed, ca.consumed.denied),
            (4, 3, 1)
        );
        assert_eq!(ca.consumed.denials_by_reason["RATE_LIMITED"], 1);
        assert_eq!(ca.consumed.denial_rate, Some(0.25));
        assert_eq!(ca.consumed.datasets, 1);
        assert_eq!(ca.provided.calls, 0);
        assert_eq!(ca.provided.availability, None);

        let ps = row(p, "public-security");
        assert_eq!(
            (ps.provided.calls, ps.provided.allowed, ps.provided.denied),
            (7, 3, 4)
        );
        assert_eq!(ps.provided.denials_by_reason["GRANT_MISSING"], 2);
        assert_eq!(ps.provided.denials_by_reason["SHARE_TYPE_NONE"], 1);
        assert_eq!(ps.provided.denials_by_reason["RATE_LIMITED"], 1);
        assert_eq!(ps.provided.datasets, 1, "criminal_record was never served");
        assert_eq!(ps.provided.provider_errors, 1);
        assert_eq!(ps.provided.availability, Some(2.0 / 3.0));
        assert_eq!(ps.provided.p50_us, Some(3000));
        assert_eq!(ps.provided.p99_us, Some(9000));

        let h = row(p, "health");
        assert_eq!((h.consumed.calls, h.consumed.denied), (5, 4));
        assert_eq!(h.consumed.denial_rate, Some(0.8));
        assert_eq!(h.consumed.datasets, 1);
        assert_eq!(h.consumed.p50_us, Some(2000));

        let unknown = row(p, UNKNOWN);
        assert_eq!(unknown.provided.calls, 1);
        assert_eq!(unknown.rank, None);
        assert_eq!(p.departments.last().unwrap().department, UNKNOWN);

        assert_eq!(p.unattributed.records, 1);
        assert_eq!(p.unattributed.by_reason["TLS_HANDSHAKE_FAILED"], 1);
        // Every policy department is listed, even with no calls.
        assert!(
            p.departments
                .iter()
                .any(|r| r.department == "xihu-civil-affairs")
        );
    }

    #[test]
    fn catalogue_calls_are_consumed_not_provided() {
        let mut r = rec(
            T,
            Some("health"),
            Some("hukou.person_basic"),
            "allow",
            None,
            10,
        );
        r["method"] = json!("/xgate.v1.Catalog/DescribeDataset");
        let rep = build(&[r], &policy(), Period::Day, Range::default());
        let p = &rep.periods[0];
        assert_eq!(row(p, "health").consumed.calls, 1);
        assert_eq!(row(p, "public-security").provided.calls, 0);
    }

    #[test]
    fn periods_and_range() {
        let ms = Some("market.company_registry");
        let recs = vec![
            rec(
                "2026-11-29T23:30:00.000Z",
                Some("health"),
                ms,
                "allow",
                None,
                1,
            ), // Sun, W48
            rec(
                "2026-11-30T01:00:00.000Z",
                Some("health"),
                ms,
                "allow",
                None,
                1,
            ), // Mon, W49
            rec(
                "2026-12-01T00:00:00.000Z",
                Some("health"),
                ms,
                "allow",
                None,
                1,
            ),
            rec("not a time", Some("health"), ms, "allow", None, 1),
        ];
        let pol = policy();
        let labels = |period, range| {
            let rep = build(&recs, &pol, period, range);
            rep.periods
                .iter()
                .map(|p| (p.period.clone(), p.records))
                .collect::<Vec<_>>()
        };
        let utc = Range::default();
        assert_eq!(
            labels(Period::Day, utc),
            [
                ("2026-11-29".into(), 1),
                ("2026-11-30".into(), 1),
                ("2026-12-01".into(), 1)
            ]
        );
        assert_eq!(
            labels(Period::Week, utc),
            [("2026-W48".into(), 1), ("2026-W49".into(), 2)]
        );
        assert_eq!(
            labels(Period::Month, utc),
            [("2026-11".into(), 2), ("2026-12".into(), 1)]
        );
        assert_eq!(labels(Period::All, utc), [("all".into(), 3)]);
        // China Standard Time moves the first record into Monday.
        let cst = Range::parse(None, None, "+08:00").unwrap();
        assert_eq!(
            labels(Period::Day, cst),
            [("2026-11-30".into(), 2), ("2026-12-01".into(), 1)]
        );
        let r = Range::parse(Some("2026-11-30"), Some("2026-12-01T00:00:00Z"), "Z").unwrap();
        assert_eq!(labels(Period::All, r), [("all".into(), 1)]);
        let rep = build(&recs, &pol, Period::Day, utc);
        assert_eq!(rep.unreadable, 1);

        assert!(Range::parse(Some("yesterday"), None, "Z").is_err());
        assert!(Range::parse(Some("2026-12-01"), Some("2026-11-01"), "Z").is_err());
        assert!(Range::parse(None, None, "8").is_err());
        assert!("fortnight".parse::<Period>().is_err());
        assert_eq!("week".parse::<Period>(), Ok(Period::Week));
    }

    #[test]
    fn ranking_weights_calls_datasets_and_availability() {
        let hp = Some("hukou.person_basic");
        let mc = Some("market.company_registry");
        let mut recs = Vec::new();
        for _ in 0..4 {
            recs.push(rec(T, Some("civil-affairs"), hp, "allow", None, 1));
        }
        recs.push(rec(
            T,
            Some("civil-affairs"),
            hp,
            "allow",
            Some("PROVIDER_UNAVAILABLE"),
            1,
        ));
        recs.push(rec(T, Some("health"), mc, "allow", None, 1));
        recs.push(rec(T, Some("health"), mc, "allow", None, 1));
        let rep = build(&recs, &policy(), Period::Day, Range::default());
        let p = &rep.periods[0];
        // public-security: 5 served (max), 1 dataset (max), availability 0.8.
        assert_eq!(row(p, "public-security").score, 94.0);
        // market-supervision: 2/5 served, 1 dataset (max), availability 1.
        assert_eq!(row(p, "market-supervision").score, 76.0);
        // civil-affairs only consumes: 0 on the ranking, but its calls all got through.
        assert_eq!(row(p, "civil-affairs").score, 0.0);
        assert_eq!(row(p, "civil-affairs").consumer_score, Some(100.0));
        assert_eq!(
            row(p, "public-security").consumer_score,
            None,
            "made no calls"
        );
        assert_eq!(p.departments[0].department, "public-security");
        assert_eq!(p.departments[0].rank, Some(1));
        assert_eq!(p.departments[1].rank, Some(2));
        // Consumers that provide nothing tie at 0 and share a rank.
        let zeros: Vec<_> = p.departments.iter().filter(|r| r.score == 0.0).collect();
        assert_eq!(zeros.len(), 3);
        assert!(zeros.iter().all(|r| r.rank == Some(3)));
        assert_eq!(score(&Side::default(), 0, 0), 0.0);
    }

    #[test]
    fn html_escapes_strings_from_the_trail_and_is_self_contained() {
        let evil = "<script>alert('x')</script>&\"";
        let recs = vec![
            rec(
                T,
                Some(evil),
                Some("hukou.person_basic"),
                "deny",
                Some(evil),
                1,
            ),
            rec(T, None, None, "deny", Some("<b>TLS</b>"), 0),
        ];
        let rep = build(&recs, &policy(), Period::Day, Range::default());
        let html = render_html(&rep, Lang::En);
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<b>TLS</b>"));
        assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"));
        assert!(html.contains("&lt;b&gt;TLS&lt;/b&gt;"));
        assert!(html.contains("<svg"));
        assert!(!html.contains("https://"));
        // The only http:// is the SVG namespace, which is a name, not a link.
        assert_eq!(
            html.matches("http://").count(),
            html.matches("xmlns=\"http://www.w3.org/2000/svg\"").count()
        );
        assert_eq!(esc("a<b>&'\""), "a&lt;b&gt;&amp;&#39;&quot;");

        let csv = render_csv(&rep);
        assert!(csv.contains(&format!("\"{}\"", evil.replace('"', "\"\""))));
        let table = render_table(&rep, Lang::En);
        assert!(table.contains("unattributed"));
    }

    #[test]
    fn empty_trail_renders_in_every_format() {
        let rep = build(&[], &policy(), Period::Month, Range::default());
        assert!(rep.periods.is_empty());
        assert!(render_table(&rep, Lang::En).contains("no records in range"));
        assert!(render_table(&rep, Lang::Zh).contains("范围内没有记录"));
        assert_eq!(render_csv(&rep).lines().count(), 1);
        assert!(render_html(&rep, Lang::En).contains("No records"));
        let zh = render_html(&rep, Lang::Zh);
        assert!(
            zh.contains("<html lang=\"zh-CN\">") && zh.contains("所选时间范围内没有记录"),
            "{zh}"
        );
        let v: serde_json::Value = serde_json::from_str(&render_json(&rep)).unwrap();
        assert_eq!(v["records"], 0);
    }

    /// The files, read line by line for the fields counted, give the table the records do;
    /// an administrator's record is not a call (and not unreadable), a call without a time is.
    #[test]
    fn the_files_read_by_line_count_as_the_records() {
        let mut recs = [
            rec(
                T,
                Some("civil-affairs"),
                Some("hukou.person_basic"),
                "allow",
                None,
                900,
            ),
            rec(
                T,
                Some("health"),
                Some("hukou.person_basic"),
                "deny",
                Some("GRANT_MISSING"),
                10,
            ),
            rec(T, None, None, "deny", Some("TLS_HANDSHAKE_FAILED"), 0),
            json!({"kind": "admin", "time": T, "action": "policy.reload"}),
            json!({"method": "/xgate.v1.DataExchange/Query", "consumer_dept": "health"}),
        ];
        // (As the writer writes them: `seq` first.)
        let lines: String = recs
            .iter()
            .enumerate()
            .map(|(i, r)| format!("{{\"seq\":{},{}\n", i + 1, &r.to_string()[1..]))
            .collect();
        for (i, r) in recs.iter_mut().enumerate() {
            r["seq"] = json!(i + 1);
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("audit-00000001.jsonl"), lines).unwrap();
        let (from_dir, read) =
            build_from_dir(dir.path(), &policy(), Period::Day, Range::default()).unwrap();
        let from_values = build(&recs, &policy(), Period::Day, Range::default());
        assert_eq!(render_json(&from_dir), render_json(&from_values));
        assert_eq!((from_dir.records, from_dir.unreadable), (3, 1));
        assert_eq!(read.damaged, 0);
    }
}
