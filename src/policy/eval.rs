//! The decision: a pure function of the policy snapshot, the verified caller and what it asks.
//!
//! No I/O, no clock, no globals: the same inputs always give the same decision, which is what
//! makes it table-testable and lets `DescribeDataset` and `Query` agree by construction.
//!
//! Order of checks (the first that fails decides, and names its rule):
//! 1. the consumer department is registered;
//! 2. the dataset is in the catalogue;
//! 3. the dataset is not on the negative list;
//! 4. the share type is not `none`;
//! 5. a purpose is declared, and the token (if it lists purposes) allows it;
//! 6. a grant of this consumer (system-specific first) covers the purpose — or the dataset is
//!    `unconditional`, which gives its non-sensitive fields to any registered department;
//! 7. every requested or filtered field exists and is readable under that rule, and every
//!    filter fits its field's type (and, on masked fields, is an exact match: a prefix search
//!    would reveal the hidden characters one by one).

use std::sync::Arc;

use super::{
    GrantNames, Policy,
    model::{Department, Grant, Mask, RateLimit, RowScope, Sensitivity, ShareType},
    scope::Scope,
};
use crate::{
    error::{Reason, Reject},
    pb::{Condition, condition::Test, value::Kind},
};

/// The verified caller: department and system from the certificate, purposes from the token.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub dept: &'a str,
    pub system: &'a str,
    /// The token's `purposes` claim, if it has one.
    pub token_purposes: Option<&'a [String]>,
    /// The token is bound to the presenting certificate (RFC 8705 `cnf`).
    pub token_bound: bool,
}

/// What the caller asks for.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub dataset: &'a str,
    /// Fields wanted; empty means every field the caller may read.
    pub fields: &'a [String],
    /// The request's filter conditions (AND-ed).
    pub filter: &'a [Condition],
    pub purpose: &'a str,
    /// Now, in seconds since the Unix epoch, for grant validity windows. `None` ignores the
    /// windows (used by `policy diff`, which compares windows separately).
    pub now: Option<i64>,
}

/// The caller may proceed, receiving exactly these fields with these masks.
#[derive(Debug, Clone, PartialEq)]
pub struct Permit {
    /// The rule that allowed the call: `grant:<id>` or `share-type:unconditional`. This and
    /// the other names are shared with the policy snapshot (no copy per call).
    pub rule: Arc<str>,
    pub grant_id: Option<Arc<str>>,
    pub approval_ref: Option<Arc<str>>,
    /// Output columns, in the order they will be returned.
    pub fields: Vec<PermittedField>,
    /// The rate limit that applies to this caller on this dataset.
    pub rate_limit: RateLimit,
    /// Purposes the rule allows (empty: any declared purpose).
    pub purposes: Arc<[String]>,
    /// Which rows the caller may receive; `None`: every row.
    pub scope: Option<Arc<Scope>>,
    /// The grant's daily quota, if it has one.
    pub daily_quota: Option<super::model::DailyQuota>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PermittedField {
    /// Shared with the policy snapshot (no copy per call).
    pub name: Arc<str>,
    pub mask: Mask,
}

/// The access rule chosen for a caller on a dataset, before fields are checked.
enum Basis<'p> {
    Grant(&'p Grant, &'p GrantNames),
    Unconditional,
}

/// Receives the chain of checks a decision passed, for `xgate policy explain`. The notes are
/// closures, so the no-op tracer used on the request path formats nothing.
pub trait Trace {
    fn step(&mut self, rule: impl std::fmt::Display, note: impl FnOnce() -> String);
}

impl Trace for () {
    #[inline]
    fn step(&mut self, _: impl std::fmt::Display, _: impl FnOnce() -> String) {}
}

/// Collects the steps as (rule, note).
#[derive(Debug, Default)]
pub struct Steps(pub Vec<(String, String)>);

impl Trace for Steps {
    fn step(&mut self, rule: impl std::fmt::Display, note: impl FnOnce() -> String) {
        self.0.push((rule.to_string(), note()));
    }
}

/// Decide one call.
pub fn evaluate(policy: &Policy, caller: Caller<'_>, req: Request<'_>) -> Result<Permit, Reject> {
    evaluate_traced(policy, caller, req, &mut ())
}

/// The calling department, if the data-sharing model registers it. Closed by default: a
/// department that is not (never registered, or removed) is refused every method, the
/// catalogue included.
pub fn registered<'p>(policy: &'p Policy, dept: &str) -> Result<&'p Department, Reject> {
    policy.department(dept).ok_or_else(|| {
        Reject::new(
            Reason::ConsumerUnknown,
            format!(
                "department `{dept}` is not registered in the data-sharing model; ask the data bureau to register it"
            ),
        )
        .with_rule("department-registry")
    })
}

/// Decide one call, reporting each check passed to `t`.
pub fn evaluate_traced(
    policy: &Policy,
    caller: Caller<'_>,
    req: Request<'_>,
    t: &mut impl Trace,
) -> Result<Permit, Reject> {
    let d = registered(policy, caller.dept)?;
    t.step("department-registry", || {
        format!(
            "department `{}` is registered ({:?}, region {})",
            d.id, d.level, d.region
        )
        .to_lowercase()
    });
    if req.dataset.is_empty() {
        return Err(Reject::new(
            Reason::RequestInvalid,
            "the request names no dataset",
        ));
    }
    let Some(ds) = policy.dataset(req.dataset) else {
        return Err(Reject::new(
            Reason::DatasetUnknown,
            format!(
                "dataset `{}` is not in the catalogue; see Catalog.ListDatasets",
                req.dataset
            ),
        )
        .with_rule("catalogue"));
    };
    t.step("catalogue", || {
        format!(
            "dataset `{}` is in the catalogue (owner {}, provider {})",
            ds.id, ds.owner, ds.provider
        )
    });
    if let Some(n) = policy.negative_dataset(req.dataset) {
        return Err(Reject::new(
            Reason::NegativeList,
            format!(
                "dataset `{}` is on the negative list and is never shared",
                ds.id
            ),
        )
        .with_rule(format!("negative-list:{}", n.dataset)));
    }
    if ds.share_type == ShareType::None {
        return Err(Reject::new(
            Reason::ShareTypeNone,
            format!(
                "dataset `{}` has share type `none`: it is never shared, whatever any grant says",
                ds.id
            ),
        )
        .with_rule("share-type:none"));
    }
    t.step("negative-list", || {
        format!("dataset `{}` is not on the negative list", ds.id)
    });
    let dept = policy.department(caller.dept);
    let binding_rule = if dept.is_some_and(|d| d.require_bound_tokens) {
        Some(format!("binding-required:department:{}", caller.dept))
    } else if ds.require_bound_tokens {
        Some(format!("binding-required:dataset:{}", ds.id))
    } else {
        None
    };
    if let Some(rule) = binding_rule {
        if !caller.token_bound {
            return Err(Reject::new(
                Reason::TokenBindingRequired,
                "this call needs a token bound to your system certificate (RFC 8705 `cnf.x5t#S256`); ask the identity provider for one",
            )
            .with_rule(rule));
        }
        t.step(&rule, || {
            "the token is bound to the presenting certificate".into()
        });
    }
    t.step(
        format_args!("share-type:{}", ds.share_type.as_str()),
        || match ds.share_type {
            ShareType::Unconditional => {
                "open to every registered department; sensitive fields need a grant".into()
            }
            _ => "shared only under a grant".into(),
        },
    );
    if req.purpose.trim().is_empty() {
        return Err(Reject::new(
            Reason::PurposeMissing,
            "declare the purpose of the call in the request's `purpose` field",
        )
        .with_rule("purpose-required"));
    }
    if let Some(tp) = caller.token_purposes
        && !tp.iter().any(|p| p == req.purpose)
    {
        return Err(Reject::new(
            Reason::TokenPurposeNotAllowed,
            format!(
                "purpose `{}` is not among the purposes your token was issued for",
                req.purpose
            ),
        )
        .with_rule("token:purposes"));
    }
    t.step("purpose-required", || match caller.token_purposes {
        Some(_) => format!(
            "purpose `{}` declared, and the token allows it",
            req.purpose
        ),
        None => format!(
            "purpose `{}` declared (the token does not restrict purposes)",
            req.purpose
        ),
    });

    // Grants of this consumer that apply to this system, system-specific first; the first
    // that lists the purpose and is valid now decides.
    let applicable = || {
        policy
            .grants_for(req.dataset, caller.dept)
            .filter(|(g, _, _)| g.system.as_deref().is_none_or(|s| s == caller.system))
    };
    let mut chosen = None;
    let mut out_of_window = None;
    for (g, window, named) in policy.grants_for(req.dataset, caller.dept) {
        if let Some(sys) = g.system.as_deref().filter(|s| *s != caller.system) {
            t.step(format_args!("grant:{}", g.id), || {
                format!("skipped: only for system `{sys}`")
            });
            continue;
        }
        if !g.purposes.iter().any(|p| p == req.purpose) {
            t.step(format_args!("grant:{}", g.id), || {
                format!("skipped: purposes are {}", g.purposes.join(", "))
            });
            continue;
        }
        match req.now.map_or(Ok(()), |now| window.check(now)) {
            Ok(()) => {
                t.step(format_args!("grant:{}", g.id), || {
                    let approval = g
                        .approval_ref
                        .as_deref()
                        .map(|a| format!(", approval {a}"))
                        .unwrap_or_default();
                    format!(
                        "applies: lists purpose `{}` and is valid{approval}",
                        req.purpose
                    )
                });
                chosen = Some((g, named));
                break;
            }
            Err(reason) => {
                t.step(format_args!("grant:{}", g.id), || {
                    format!("skipped: {reason}")
                });
                out_of_window.get_or_insert((g, reason));
            }
        }
    }
    let basis = match (chosen, ds.share_type, out_of_window) {
        (Some((g, named)), _, _) => Basis::Grant(g, named),
        // Open data stays open to a consumer whose grant lapsed (without its sensitive fields).
        (None, ShareType::Unconditional, _) => Basis::Unconditional,
        (None, _, Some((g, reason))) => {
            let when = if reason == Reason::GrantExpired {
                "expired"
            } else {
                "is not valid yet"
            };
            return Err(Reject::new(
                reason,
                format!(
                    "grant `{}` for `{}` {when}; the data bureau can renew or bring it forward",
                    g.id, ds.id
                ),
            )
            .with_rule(format!("grant:{}", g.id)));
        }
        (None, _, None) => {
            if let Some((first, _, _)) = applicable().next() {
                let mut allowed: Vec<&str> = applicable()
                    .flat_map(|(g, _, _)| g.purposes.iter().map(String::as_str))
                    .collect();
                // Sorted: the message says the same whatever order the grants are written in.
                allowed.sort_unstable();
                allowed.dedup();
                return Err(Reject::new(
                    Reason::PurposeNotAllowed,
                    format!(
                        "purpose `{}` is not allowed on `{}`; your grant allows: {}",
                        req.purpose,
                        ds.id,
                        allowed.join(", ")
                    ),
                )
                .with_rule(format!("grant:{}", first.id)));
            }
            return Err(Reject::new(
                Reason::GrantMissing,
                format!(
                    "dataset `{}` is conditional and department `{}` (system `{}`) has no grant for it; apply to the data bureau for a sharing agreement",
                    ds.id, caller.dept, caller.system
                ),
            )
            .with_rule("share-type:conditional"));
        }
    };

    // Which fields the rule makes readable, in schema order, with their masks.
    let readable = |idx: usize| -> Option<Mask> {
        let f = &ds.fields[idx];
        if policy.negative_field(req.dataset, idx).is_some() {
            return None;
        }
        match basis {
            Basis::Grant(g, _) => {
                let listed = g.fields.iter().any(|x| x == "*" || x == &f.name);
                let open = ds.share_type == ShareType::Unconditional
                    && f.sensitivity < Sensitivity::Sensitive;
                (listed || open).then(|| g.masks.get(&f.name).copied().unwrap_or(f.mask))
            }
            Basis::Unconditional => (f.sensitivity < Sensitivity::Sensitive).then_some(f.mask),
        }
    };
    let rule = match basis {
        Basis::Grant(_, named) => named.rule.clone(),
        Basis::Unconditional => policy.unconditional_rule.clone(),
    };
    let field_reject = |name: &str, idx: Option<usize>, what: &str| -> Reject {
        match idx {
            None => Reject::new(
                Reason::FieldUnknown,
                format!("{what} `{name}` is not a field of `{}`; see Catalog.DescribeDataset", ds.id),
            )
            .with_rule("catalogue:schema"),
            Some(i) => match policy.negative_field(req.dataset, i) {
                Some(n) => Reject::new(
                    Reason::NegativeList,
                    format!("{what} `{name}` is on the negative list and is never shared"),
                )
                .with_rule(format!("negative-list:{}.{}", n.dataset, name)),
                None => Reject::new(
                    Reason::FieldDenied,
                    format!(
                        "{what} `{name}` of `{}` is not readable under {rule}; ask for it in your grant or leave it out",
                        ds.id
                    ),
                )
                .with_rule(rule.to_string()),
            },
        }
    };

    for c in req.filter {
        let idx = policy.field_index(req.dataset, &c.field);
        let Some((i, mask)) = idx.and_then(|i| readable(i).map(|m| (i, m))) else {
            return Err(field_reject(&c.field, idx, "filter field"));
        };
        check_condition(c, &ds.fields[i], mask, &rule)?;
    }
    let fields_trace = || {
        (0..ds.fields.len())
            .filter_map(|i| {
                readable(i).map(|m| match m {
                    Mask::None => ds.fields[i].name.clone(),
                    m => format!("{} ({})", ds.fields[i].name, m.describe()),
                })
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    t.step("fields", || {
        format!("readable under {rule}: {}", fields_trace())
    });
    let names = policy.field_names(req.dataset);
    let fields = if req.fields.is_empty() {
        (0..ds.fields.len())
            .filter_map(|i| {
                Some(PermittedField {
                    mask: readable(i)?,
                    name: names.get(i)?.clone(),
                })
            })
            .collect()
    } else {
        let mut out = Vec::with_capacity(req.fields.len());
        for name in req.fields {
            let idx = policy.field_index(req.dataset, name);
            match idx.and_then(|i| Some((names.get(i)?, readable(i)?))) {
                Some((shared, mask)) => {
                    if !out.iter().any(|f: &PermittedField| *f.name == **name) {
                        out.push(PermittedField {
                            name: shared.clone(),
                            mask,
                        });
                    }
                }
                None => return Err(field_reject(name, idx, "field")),
            }
        }
        out
    };

    Ok(match basis {
        Basis::Grant(g, named) => Permit {
            scope: named.scope.clone(),
            daily_quota: g.daily_quota,
            rule,
            grant_id: Some(named.id.clone()),
            approval_ref: named.approval_ref.clone(),
            fields,
            rate_limit: g.rate_limit.unwrap_or(policy.file.defaults.rate_limit),
            purposes: named.purposes.clone(),
        },
        Basis::Unconditional => Permit {
            rule,
            grant_id: None,
            approval_ref: None,
            fields,
            rate_limit: policy.file.defaults.rate_limit,
            purposes: Arc::from([]),
            scope: None,
            daily_quota: None,
        },
    })
}

/// The grant's row scope, resolved against the consumer's region.
pub(super) fn row_scope(
    policy: &Policy,
    ds: &super::model::Dataset,
    g: &Grant,
    dept: &str,
) -> Option<Scope> {
    let field = ds.region_field.as_deref()?;
    match &g.row_scope {
        RowScope::All => None,
        RowScope::OwnRegion => {
            let region = policy
                .department(dept)
                .map(|d| d.region.as_str())
                .unwrap_or("000000");
            Some(Scope::new(field, &[region], format!("own-region {region}")))
        }
        RowScope::Regions(rs) => {
            let regions: Vec<&str> = rs.iter().map(String::as_str).collect();
            Some(Scope::new(
                field,
                &regions,
                format!("regions {}", rs.join(", ")),
            ))
        }
    }
}

/// A filter condition must fit its field: values of the field's type (or null), `prefix` only
/// on string fields, and no `prefix` on a masked field.
fn check_condition(
    c: &Condition,
    f: &super::model::Field,
    mask: Mask,
    rule: &str,
) -> Result<(), Reject> {
    use super::model::FieldType as T;
    let invalid =
        |why: String| Reject::new(Reason::RequestInvalid, why).with_rule("catalogue:schema");
    let fits = |k: Option<&Kind>| {
        matches!(
            (f.ty, k),
            (_, None | Some(Kind::NullValue(_)))
                | (T::String, Some(Kind::StringValue(_)))
                | (T::Int64, Some(Kind::Int64Value(_)))
                | (T::Double, Some(Kind::DoubleValue(_) | Kind::Int64Value(_)))
                | (T::Bool, Some(Kind::BoolValue(_)))
                | (T::Bytes, Some(Kind::BytesValue(_)))
                | (T::Timestamp, Some(Kind::TimestampValue(_)))
        )
    };
    let type_name = format!("{:?}", f.ty).to_lowercase();
    match &c.test {
        None => Err(invalid(format!("filter on `{}` has no test (eq, in or prefix)", f.name))),
        Some(Test::Prefix(_)) if f.ty != T::String => Err(invalid(format!(
            "`prefix` applies to string fields; `{}` is {type_name}",
            f.name
        ))),
        Some(Test::Prefix(_)) if !mask.is_none() => Err(Reject::new(
            Reason::FieldDenied,
            format!(
                "`{}` is masked for you: filter it with `eq` or `in` on a whole value, not `prefix`",
                f.name
            ),
        )
        .with_rule(rule.to_owned())),
        Some(Test::Prefix(_)) => Ok(()),
        Some(Test::Eq(v)) if !fits(v.kind.as_ref()) => Err(invalid(format!(
            "filter value for `{}` must be {type_name}",
            f.name
        ))),
        Some(Test::In(list)) if list.values.iter().any(|v| !fits(v.kind.as_ref())) => Err(invalid(
            format!("filter values for `{}` must be {type_name}", f.name),
        )),
        Some(_) => Ok(()),
    }
}

/// The purposes a caller could declare on a dataset (union over its applicable grants).
pub fn granted_purposes(policy: &Policy, dept: &str, system: &str, dataset: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (g, _, _) in policy
        .grants_for(dataset, dept)
        .filter(|(g, _, _)| g.system.as_deref().is_none_or(|s| s == system))
    {
        for p in &g.purposes {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
    }
    out
}
