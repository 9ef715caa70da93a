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

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

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
fn conditions(shape: &[serde_json::Value]) -> Vec<Condition> {
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    };
    shape
        .iter()
        .filter_map(|c| c.as_str())
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
fn decide(
    p: &Policy,
    rec: &serde_json::Value,
    fields: &[String],
    filter: &[Condition],
    now: i64,
) -> Result<BTreeMap<String, Option<String>>, String> {
    let text = |k: &str| rec[k].as_str().unwrap_or_default();
    let permit = eval::evaluate(
        p,
        Caller {
            dept: text("consumer_dept"),
            system: text("consumer_system"),
            token_purposes: None,
            token_bound: true,
        },
        Request {
            dataset: text("dataset"),
            fields,
            filter,
            purpose: text("purpose"),
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
                f.name.clone(),
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
    let mut r = Replay::new(current, candidate);
    for rec in records {
        r.push(rec);
    }
    r.finish()
}

impl Impact {
    fn observe(
        &mut self,
        rec: &serde_json::Value,
        current: &Policy,
        candidate: &Policy,
        rows: &mut BTreeMap<(String, String), ImpactRow>,
    ) {
        let is_call = rec.get("kind").is_none_or(|k| k == "call");
        let method = rec["method"].as_str().unwrap_or_default();
        if !is_call || !(method.ends_with("/Query") || method.ends_with("/QueryStream")) {
            return;
        }
        let (Some(consumer), Some(dataset)) =
            (rec["consumer_dept"].as_str(), rec["dataset"].as_str())
        else {
            self.skipped += 1;
            return;
        };
        // Records written before the request's shape was kept: an allowed one names its
        // fields in `fields_returned`, but a refused one cannot be replayed faithfully.
        if rec.get("fields_requested").is_none()
            && rec.get("filter").is_none()
            && rec.get("policy_version").is_none()
        {
            self.skipped += 1;
            return;
        }
        let fields: Vec<String> = rec["fields_requested"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let filter = conditions(rec["filter"].as_array().map_or(&[][..], |a| a));
        let time = rec["time"].as_str().unwrap_or_default();
        let now = time::OffsetDateTime::parse(time, &time::format_description::well_known::Rfc3339)
            .map(|t| t.unix_timestamp())
            .unwrap_or(0);
        let before = decide(current, rec, &fields, &filter, now);
        let after = decide(candidate, rec, &fields, &filter, now);
        self.replayed += 1;
        if self.since.is_none() {
            self.since = Some(time.to_owned());
        }
        self.until = Some(time.to_owned());
        let row = rows
            .entry((consumer.to_owned(), dataset.to_owned()))
            .or_insert_with(|| ImpactRow {
                consumer: consumer.to_owned(),
                dataset: dataset.to_owned(),
                ..ImpactRow::default()
            });
        row.calls += 1;
        match (before, after) {
            (Ok(_), Err(reason)) => {
                row.now_refused += 1;
                *row.new_reasons.entry(reason).or_default() += 1;
            }
            (Err(_), Ok(_)) => row.newly_allowed += 1,
            (Ok(old), Ok(new)) => {
                for (f, was) in &old {
                    match (was, new.get(f)) {
                        // In clear, now masked; or masked another way.
                        (None, Some(Some(m))) => {
                            row.newly_masked.insert(format!("{f} ({m})"));
                        }
                        (Some(a), Some(Some(b))) if a != b => {
                            row.newly_masked.insert(format!("{f} ({a} → {b})"));
                        }
                        // In clear, now not returned.
                        (None, None) => {
                            row.newly_masked.insert(format!("{f} (withheld)"));
                        }
                        _ => {}
                    }
                }
                for (f, now) in &new {
                    if now.is_none() && old.get(f).is_none_or(|m| m.is_some()) {
                        row.newly_shown.insert(f.clone());
                    }
                }
            }
            (Err(_), Err(_)) => {}
        }
    }
}

/// A replay in progress: the totals, and the rows by (consumer, dataset).
struct Replay<'p> {
    out: Impact,
    rows: BTreeMap<(String, String), ImpactRow>,
    current: &'p Policy,
    candidate: &'p Policy,
}

impl<'p> Replay<'p> {
    fn new(current: &'p Policy, candidate: &'p Policy) -> Self {
        Replay {
            out: Impact::default(),
            rows: BTreeMap::new(),
            current,
            candidate,
        }
    }

    fn push(&mut self, rec: &serde_json::Value) {
        self.out
            .observe(rec, self.current, self.candidate, &mut self.rows);
    }

    /// The totals, with only the pairs that changed.
    fn finish(mut self) -> Impact {
        self.out.rows = self.rows.into_values().filter(ImpactRow::changed).collect();
        self.out
    }
}

fn window(
    since: Option<time::OffsetDateTime>,
    until: Option<time::OffsetDateTime>,
) -> crate::audit::read::Query {
    crate::audit::read::Query {
        since,
        until,
        ..Default::default()
    }
}

/// Replay the calls of an audit directory between `since` and `until`.
pub fn over_dir(
    dir: &std::path::Path,
    current: &Policy,
    candidate: &Policy,
    since: Option<time::OffsetDateTime>,
    until: Option<time::OffsetDateTime>,
) -> Result<Impact, String> {
    let mut r = Replay::new(current, candidate);
    crate::audit::read::search(dir, &window(since, until), |v| r.push(&v))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
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
    let mut r = Replay::new(current, candidate);
    crate::audit::db::search(pool, &window(since, until), |v| r.push(&v)).await?;
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
