//! `xgate policy diff`: what a policy change loosens or tightens, per consumer × dataset.
//!
//! For every consumer department, every dataset, every system named by a grant (plus "any
//! other system") and every purpose named by a grant (plus "any other purpose"), the access
//! each policy gives is computed with the same pure evaluation the gateway uses, then
//! compared aspect by aspect: allowed at all, fields, masks, row scope, rate, validity.

use std::collections::{BTreeSet, HashSet};

use serde::Serialize;

use super::{Caller, Permit, Policy, Request, evaluate, model::Mask, scope::Scope};

/// Whether a change gives more or less.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Loosens,
    Tightens,
}

/// One difference in what a consumer may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub direction: Direction,
    pub consumer: String,
    /// `None`: any system of the department without a grant of its own.
    pub system: Option<String>,
    pub dataset: String,
    /// `None`: a purpose no grant names (access that needs no grant).
    pub purpose: Option<String>,
    /// `access`, `field`, `mask`, `row_scope`, `rate`, `validity`.
    pub aspect: &'static str,
    /// The change in words.
    pub detail: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = match self.direction {
            Direction::Loosens => "LOOSENS ",
            Direction::Tightens => "TIGHTENS",
        };
        let sys = self
            .system
            .as_deref()
            .map(|s| format!(" system `{s}`"))
            .unwrap_or_default();
        let purpose = match &self.purpose {
            Some(p) => format!("for purpose `{p}`"),
            None => "for any other purpose".to_owned(),
        };
        write!(
            f,
            "{dir} {}{sys} × {} {purpose}: {}",
            self.consumer, self.dataset, self.detail
        )
    }
}

/// A purpose no grant can name: stands for "any purpose not listed in a grant".
const OTHER_PURPOSE: &str = "\u{0}other";
/// A system no grant can name: stands for "any other system".
const OTHER_SYSTEM: &str = "\u{0}other";

/// What one policy's decisions for a (consumer, dataset) pair read, as text: the
/// consumer's department, the dataset with its negative-list entries, the defaults, and the
/// consumer's grants on the dataset with their windows (all `evaluate` reads). Where the
/// two policies' texts are equal, every system and purpose decides the same, so the pair
/// holds no change and is not evaluated: with 1,000 datasets and 50 departments, a change
/// to one grant is 50,000 pairs of which a few differ.
struct Inputs<'p> {
    old: &'p Policy,
    new: &'p Policy,
    defaults: bool,
    departments: HashSet<&'p str>,
    datasets: HashSet<&'p str>,
}

impl<'p> Inputs<'p> {
    fn of(old: &'p Policy, new: &'p Policy) -> Self {
        fn json<T: Serialize>(v: &T) -> Option<String> {
            serde_json::to_string(v).ok()
        }
        let same = |a: Option<String>, b: Option<String>| a.is_some() && a == b;
        let dataset = |p: &Policy, id: &str| {
            p.dataset(id).and_then(|d| {
                let negative: Vec<_> = std::iter::once(p.negative_dataset(id))
                    .chain((0..d.fields.len()).map(|i| p.negative_field(id, i)))
                    .collect();
                json(&(d, negative))
            })
        };
        Inputs {
            old,
            new,
            defaults: same(json(&old.file.defaults), json(&new.file.defaults)),
            departments: old
                .file
                .departments
                .iter()
                .filter(|d| same(json(d), new.department(&d.id).and_then(json)))
                .map(|d| d.id.as_str())
                .collect(),
            datasets: old
                .file
                .datasets
                .iter()
                .filter(|d| same(dataset(old, &d.id), dataset(new, &d.id)))
                .map(|d| d.id.as_str())
                .collect(),
        }
    }

    /// Whether the pair decides the same under both (a text that could not be made never
    /// counts as the same).
    fn same(&self, consumer: &str, dataset: &str) -> bool {
        if !(self.defaults
            && self.departments.contains(consumer)
            && self.datasets.contains(dataset))
        {
            return false;
        }
        type Held<'a> = Vec<(&'a super::model::Grant, Option<i64>, Option<i64>)>;
        fn grants<'a>(p: &'a Policy, dataset: &str, consumer: &str) -> (bool, Held<'a>) {
            let g: Held<'a> = p
                .grants_for(dataset, consumer)
                .map(|(g, w, _)| (g, w.from, w.until))
                .collect();
            (g.is_empty(), g)
        }
        let grants = |p: &'p Policy| grants(p, dataset, consumer);
        match (grants(self.old), grants(self.new)) {
            ((true, _), (true, _)) => true,
            ((_, a), (_, b)) => {
                let a = serde_json::to_string(&a).ok();
                a.is_some() && a == serde_json::to_string(&b).ok()
            }
        }
    }
}

/// Every loosening and tightening from `old` to `new`.
pub fn diff(old: &Policy, new: &Policy) -> Vec<Change> {
    diff_pairs(old, new, true)
}

/// [`diff`], skipping the pairs whose inputs are the same in both policies (`skip`), or
/// evaluating every one (what the tests hold the skipping to).
fn diff_pairs(old: &Policy, new: &Policy, skip: bool) -> Vec<Change> {
    let inputs = Inputs::of(old, new);
    let consumers: BTreeSet<&str> = old
        .file
        .departments
        .iter()
        .chain(&new.file.departments)
        .map(|d| d.id.as_str())
        .collect();
    let datasets: BTreeSet<&str> = old
        .file
        .datasets
        .iter()
        .chain(&new.file.datasets)
        .map(|d| d.id.as_str())
        .collect();
    let mut out = Vec::new();
    for &consumer in &consumers {
        for &dataset in &datasets {
            if skip && inputs.same(consumer, dataset) {
                continue;
            }
            let grants = || {
                old.grants_for(dataset, consumer)
                    .chain(new.grants_for(dataset, consumer))
                    .map(|(g, _, _)| g)
            };
            let mut systems: BTreeSet<Option<&str>> = grants()
                .filter_map(|g| g.system.as_deref())
                .map(Some)
                .collect();
            systems.insert(None);
            let mut purposes: BTreeSet<Option<&str>> = grants()
                .flat_map(|g| g.purposes.iter().map(|p| Some(p.as_str())))
                .collect();
            purposes.insert(None);
            for &system in &systems {
                for &purpose in &purposes {
                    let caller = Caller {
                        dept: consumer,
                        system: system.unwrap_or(OTHER_SYSTEM),
                        token_purposes: None,
                        token_bound: false,
                    };
                    let req = Request {
                        dataset,
                        fields: &[],
                        filter: &[],
                        purpose: purpose.unwrap_or(OTHER_PURPOSE),
                        now: None,
                    };
                    let mut push = |direction, aspect, detail: String| {
                        out.push(Change {
                            direction,
                            consumer: consumer.to_owned(),
                            system: system.map(str::to_owned),
                            dataset: dataset.to_owned(),
                            purpose: purpose.map(str::to_owned),
                            aspect,
                            detail,
                        })
                    };
                    match (evaluate(old, caller, req), evaluate(new, caller, req)) {
                        (Err(_), Err(_)) => {}
                        (Err(was), Ok(p)) => {
                            let w = window_of(new, &p);
                            let when = if w == super::Window::default() {
                                String::new()
                            } else {
                                format!(", valid {}", window_words(w))
                            };
                            push(
                                Direction::Loosens,
                                "access",
                                format!(
                                    "now allowed under {} (was refused: {}), reading {}{when}",
                                    p.rule,
                                    was.reason,
                                    field_list(&p)
                                ),
                            )
                        }
                        (Ok(p), Err(now)) => push(
                            Direction::Tightens,
                            "access",
                            format!(
                                "no longer allowed: {} under {} (was allowed under {})",
                                now.reason,
                                now.rule.as_deref().unwrap_or("-"),
                                p.rule
                            ),
                        ),
                        (Ok(a), Ok(b)) => compare(old, new, &a, &b, &mut push),
                    }
                }
            }
        }
    }
    out
}

fn field_list(p: &Permit) -> String {
    p.fields
        .iter()
        .map(|f| match f.mask {
            Mask::None => f.name.to_string(),
            m => format!("{} ({})", f.name, m.describe()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn compare(
    old: &Policy,
    new: &Policy,
    a: &Permit,
    b: &Permit,
    push: &mut impl FnMut(Direction, &'static str, String),
) {
    use Direction::*;
    for f in &b.fields {
        match a.fields.iter().find(|x| x.name == f.name) {
            None => push(
                Loosens,
                "field",
                format!(
                    "field `{}` becomes readable ({})",
                    f.name,
                    mask_words(f.mask)
                ),
            ),
            Some(was)
                if f.mask.strength() < was.mask.strength()
                    || (f.mask != was.mask
                        && f.mask.strength() == was.mask.strength()
                        && reveals_more(f.mask, was.mask)) =>
            {
                push(
                    Loosens,
                    "mask",
                    format!(
                        "field `{}` is now {} (was {})",
                        f.name,
                        mask_words(f.mask),
                        mask_words(was.mask)
                    ),
                )
            }
            Some(was) if f.mask != was.mask => push(
                Tightens,
                "mask",
                format!(
                    "field `{}` is now {} (was {})",
                    f.name,
                    mask_words(f.mask),
                    mask_words(was.mask)
                ),
            ),
            Some(_) => {}
        }
    }
    for f in &a.fields {
        if !b.fields.iter().any(|x| x.name == f.name) {
            push(
                Tightens,
                "field",
                format!("field `{}` is no longer readable", f.name),
            );
        }
    }
    let (wider, narrower) = scope_change(a.scope.as_deref(), b.scope.as_deref());
    if wider {
        push(
            Loosens,
            "row_scope",
            format!(
                "rows: {} (was {})",
                scope_words(b.scope.as_deref()),
                scope_words(a.scope.as_deref())
            ),
        );
    }
    if narrower {
        push(
            Tightens,
            "row_scope",
            format!(
                "rows: {} (was {})",
                scope_words(b.scope.as_deref()),
                scope_words(a.scope.as_deref())
            ),
        );
    }
    let (ra, rb) = (a.rate_limit, b.rate_limit);
    if rb.per_second > ra.per_second || rb.burst > ra.burst {
        push(
            Loosens,
            "rate",
            format!(
                "rate {}/s burst {} (was {}/s burst {})",
                rb.per_second, rb.burst, ra.per_second, ra.burst
            ),
        );
    }
    if rb.per_second < ra.per_second || rb.burst < ra.burst {
        push(
            Tightens,
            "rate",
            format!(
                "rate {}/s burst {} (was {}/s burst {})",
                rb.per_second, rb.burst, ra.per_second, ra.burst
            ),
        );
    }
    let wa = window_of(old, a);
    let wb = window_of(new, b);
    let earlier_start = match (wa.from, wb.from) {
        (Some(x), Some(y)) => y < x,
        (Some(_), None) => true,
        _ => false,
    };
    let later_end = match (wa.until, wb.until) {
        (Some(x), Some(y)) => y > x,
        (Some(_), None) => true,
        _ => false,
    };
    let later_start = match (wa.from, wb.from) {
        (Some(x), Some(y)) => y > x,
        (None, Some(_)) => true,
        _ => false,
    };
    let earlier_end = match (wa.until, wb.until) {
        (Some(x), Some(y)) => y < x,
        (None, Some(_)) => true,
        _ => false,
    };
    if earlier_start || later_end {
        push(
            Loosens,
            "validity",
            format!("valid {} (was {})", window_words(wb), window_words(wa)),
        );
    }
    if later_start || earlier_end {
        push(
            Tightens,
            "validity",
            format!("valid {} (was {})", window_words(wb), window_words(wa)),
        );
    }
}

/// Two masks of the same strength: `keep` reveals more when it keeps more characters.
fn reveals_more(new: Mask, old: Mask) -> bool {
    match (new, old) {
        (
            Mask::Keep {
                first: f1,
                last: l1,
            },
            Mask::Keep {
                first: f0,
                last: l0,
            },
        ) => f1 > f0 || l1 > l0,
        _ => false,
    }
}

fn mask_words(m: Mask) -> String {
    match m {
        Mask::None => "in clear".into(),
        m => format!("masked: {}", m.describe()),
    }
}

/// (new covers rows old did not, old covered rows new does not)
fn scope_change(old: Option<&Scope>, new: Option<&Scope>) -> (bool, bool) {
    let covers = |s: &Scope, p: &str| s.prefixes.iter().any(|q| p.starts_with(q.as_str()));
    match (old, new) {
        (None, None) => (false, false),
        (Some(_), None) => (true, false),
        (None, Some(_)) => (false, true),
        (Some(o), Some(n)) => (
            n.prefixes.iter().any(|p| !covers(o, p)),
            o.prefixes.iter().any(|p| !covers(n, p)),
        ),
    }
}

fn scope_words(s: Option<&Scope>) -> String {
    s.map_or_else(|| "all rows".to_owned(), |s| s.label.clone())
}

fn window_of(p: &Policy, permit: &Permit) -> super::Window {
    permit
        .grant_id
        .as_deref()
        .and_then(|id| p.file.grants.iter().position(|g| g.id == id))
        .map(|i| p.windows[i])
        .unwrap_or_default()
}

fn window_words(w: super::Window) -> String {
    let t = |s: i64| {
        time::OffsetDateTime::from_unix_timestamp(s)
            .ok()
            .and_then(|d| {
                d.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| s.to_string())
    };
    match (w.from, w.until) {
        (None, None) => "always".into(),
        (Some(f), None) => format!("from {}", t(f)),
        (None, Some(u)) => format!("until {}", t(u)),
        (Some(f), Some(u)) => format!("from {} until {}", t(f), t(u)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Skipping the pairs whose inputs are equal changes nothing: every kind of edit, diffed
    /// both ways, gives what evaluating every pair gives.
    #[test]
    fn skipping_unchanged_pairs_finds_every_change() {
        let base = include_str!("../../deploy/dev/policy.yaml");
        let edits: &[(&str, &str)] = &[
            (
                "purposes: [temporary-relief]",
                "purposes: [temporary-relief, audit]",
            ),
            ("masks: { id_number: none }", "masks: { id_number: hash }"),
            (
                "rate_limit: { per_second: 20, burst: 40 }",
                "rate_limit: { per_second: 2, burst: 4 }",
            ),
            (
                "negative_list:\n",
                "negative_list:\n  - { dataset: hukou.criminal_record, reason: closed }\n",
            ),
            (
                "fields: [id_number, name, gender, birth_date, region_code, household_head]",
                "fields: [id_number, name, gender, birth_date, region_code, household_head, address]",
            ),
            (
                "level: county,   region: \"330106\"",
                "level: county,   region: \"330108\"",
            ),
            ("mask: { keep: { first: 3, last: 4 } }", "mask: none"),
        ];
        let old = Policy::from_yaml(base.as_bytes()).unwrap();
        let mut changed = 0;
        for (from, to) in edits {
            assert!(base.contains(from), "{from}");
            let new = Policy::from_yaml(base.replacen(from, to, 1).as_bytes()).unwrap();
            for (a, b) in [(&old, &new), (&new, &old)] {
                let text = |v: Vec<Change>| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
                let (fast, full) = (text(diff_pairs(a, b, true)), text(diff_pairs(a, b, false)));
                assert_eq!(fast, full, "{from} → {to}");
                changed += usize::from(!full.is_empty());
            }
        }
        assert!(changed >= 8, "{changed} of the diffs found changes");
    }
}
