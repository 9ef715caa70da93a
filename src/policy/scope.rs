//! Row scope: which rows a grant covers, by the dataset's region field.
//!
//! A 6-digit administrative division code contains every code sharing its non-zero prefix:
//! `330000` (a province) contains `3301xx` and `330106`; `330100` (a city) contains `330106`.
//! The gateway enforces a scope twice: before the call it rejects or narrows a filter that
//! reaches outside the scope ([`narrow`]), and after it drops any out-of-scope row the provider
//! returns anyway ([`Scope::admits`]). Both are pure.

use crate::{
    error::{Reason, Reject},
    pb::{Condition, Value, condition::Test},
};

/// The region prefixes a grant's rows must fall in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The dataset's region field.
    pub field: String,
    /// Non-zero prefixes of the allowed regions (`33`, `3301`, `330106`).
    pub prefixes: Vec<String>,
    /// For messages: `own-region 330106`, `regions 330106, 330108`.
    pub label: String,
}

/// The non-zero prefix of a region code: `330100` -> `3301`, `330000` -> `33`.
pub fn region_prefix(code: &str) -> &str {
    let mut p = code;
    while p.len() >= 2 && p.ends_with("00") {
        p = &p[..p.len() - 2];
    }
    p
}

impl Scope {
    pub fn new(field: &str, regions: &[&str], label: String) -> Self {
        let mut prefixes: Vec<String> = regions
            .iter()
            .map(|r| region_prefix(r).to_owned())
            .collect();
        prefixes.sort();
        prefixes.dedup();
        // A prefix inside another is redundant.
        let all = prefixes.clone();
        prefixes.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q.as_str())));
        Self {
            field: field.to_owned(),
            prefixes,
            label,
        }
    }

    /// Whether a row with this region value is inside the scope (null or non-text: no).
    pub fn admits(&self, v: &Value) -> bool {
        v.as_text().is_some_and(|t| {
            t.len() == 6 && self.prefixes.iter().any(|p| t.starts_with(p.as_str()))
        })
    }

    /// A whole prefix query `p` (a region or a stem of one) lies inside the scope.
    fn covers_prefix(&self, p: &str) -> bool {
        self.prefixes.iter().any(|s| p.starts_with(s.as_str()))
    }

    fn violation(&self, rule: &str, what: String) -> Reject {
        Reject::new(
            Reason::RowScopeViolation,
            format!(
                "{what} lies outside your row scope ({}); ask only for rows in it",
                self.label
            ),
        )
        .with_rule(rule.to_owned())
    }
}

/// Check the filter against the scope, narrowing it where it can: a condition on the region
/// field must lie inside the scope (a broader prefix is narrowed to the scope's); with no such
/// condition, one is added so the provider is only asked for rows in scope.
pub fn narrow(conds: &mut Vec<Condition>, scope: &Scope, rule: &str) -> Result<(), Reject> {
    let mut constrained = false;
    for c in conds.iter_mut().filter(|c| c.field == scope.field) {
        match &mut c.test {
            Some(Test::Eq(v)) => {
                if !scope.admits(v) {
                    let shown = v.as_text().map(|t| t.into_owned()).unwrap_or_default();
                    return Err(scope.violation(rule, format!("`{}` = `{shown}`", scope.field)));
                }
                constrained = true;
            }
            Some(Test::In(list)) => {
                if let Some(v) = list.values.iter().find(|v| !scope.admits(v)) {
                    let shown = v.as_text().map(|t| t.into_owned()).unwrap_or_default();
                    return Err(
                        scope.violation(rule, format!("`{}` in (... `{shown}` ...)", scope.field))
                    );
                }
                constrained = true;
            }
            Some(Test::Prefix(p)) => {
                if scope.covers_prefix(p) {
                    constrained = true;
                    continue;
                }
                let inside: Vec<&String> = scope
                    .prefixes
                    .iter()
                    .filter(|s| s.starts_with(p.as_str()))
                    .collect();
                match inside.as_slice() {
                    [] => {
                        return Err(
                            scope.violation(rule, format!("`{}` prefix `{p}`", scope.field))
                        );
                    }
                    [only] => {
                        *p = (*only).clone();
                        constrained = true;
                    }
                    // Several scope regions under the prefix: rows are filtered on return.
                    _ => {}
                }
            }
            None => {}
        }
    }
    if !constrained {
        match scope.prefixes.as_slice() {
            [only] => conds.push(Condition {
                field: scope.field.clone(),
                test: Some(Test::Prefix(only.clone())),
            }),
            many if many.iter().all(|p| p.len() == 6) => conds.push(Condition {
                field: scope.field.clone(),
                test: Some(Test::In(crate::pb::ValueList {
                    values: many.iter().map(|p| Value::string(p.as_str())).collect(),
                })),
            }),
            // Mixed levels cannot be one AND-ed condition: rows are filtered on return.
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eq(f: &str, v: &str) -> Condition {
        Condition {
            field: f.into(),
            test: Some(Test::Eq(Value::string(v))),
        }
    }
    fn prefix(f: &str, v: &str) -> Condition {
        Condition {
            field: f.into(),
            test: Some(Test::Prefix(v.into())),
        }
    }

    #[test]
    fn prefixes_and_containment() {
        assert_eq!(region_prefix("330000"), "33");
        assert_eq!(region_prefix("330100"), "3301");
        assert_eq!(region_prefix("330106"), "330106");
        let s = Scope::new("region", &["330100", "330106", "330200"], "x".into());
        assert_eq!(s.prefixes, ["3301", "3302"], "330106 is inside 3301");
        assert!(s.admits(&Value::string("330106")));
        assert!(s.admits(&Value::string("330212")));
        assert!(!s.admits(&Value::string("330382")));
        assert!(!s.admits(&Value::null()));
        assert!(!s.admits(&Value::string("3301")), "not a full code");
    }

    #[test]
    fn narrowing_rejecting_and_adding() {
        let county = Scope::new("region", &["330106"], "own-region 330106".into());
        // No condition: one is added.
        let mut c = vec![eq("name", "x")];
        narrow(&mut c, &county, "grant:g").unwrap();
        assert_eq!(c[1], prefix("region", "330106"));
        // Inside: kept as is.
        let mut c = vec![eq("region", "330106")];
        narrow(&mut c, &county, "grant:g").unwrap();
        assert_eq!(c.len(), 1);
        // Outside: refused with the rule.
        let mut c = vec![eq("region", "330108")];
        let r = narrow(&mut c, &county, "grant:g").unwrap_err();
        assert_eq!(
            (r.reason, r.rule.as_deref()),
            (Reason::RowScopeViolation, Some("grant:g"))
        );
        // A broader prefix is narrowed; a disjoint one refused.
        let mut c = vec![prefix("region", "33")];
        narrow(&mut c, &county, "grant:g").unwrap();
        assert_eq!(c, [prefix("region", "330106")]);
        let mut c = vec![prefix("region", "3302")];
        assert!(narrow(&mut c, &county, "grant:g").is_err());
        // Several full codes become an IN.
        let two = Scope::new("region", &["330106", "330108"], "regions".into());
        let mut c = vec![];
        narrow(&mut c, &two, "grant:g").unwrap();
        assert!(matches!(&c[0].test, Some(Test::In(l)) if l.values.len() == 2));
        let mut c = vec![Condition {
            field: "region".into(),
            test: Some(Test::In(crate::pb::ValueList {
                values: vec![Value::string("330106"), Value::string("330110")],
            })),
        }];
        assert!(narrow(&mut c, &two, "grant:g").is_err());
    }
}
