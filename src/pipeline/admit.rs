//! Stages `check`, `decide` and `scope`: is the request well-formed, does the data-sharing
//! model allow it (the pure [`policy::evaluate`]), and which rows may it reach (a row-scoped
//! permit narrows the filter). Also the subject hashes the record keeps. Nothing here waits.

use super::*;

pub(super) fn provider_of(snap: &Snapshot, dataset: &str) -> Result<String, Reject> {
    snap.policy
        .dataset(dataset)
        .map(|d| d.provider.clone())
        .ok_or_else(|| {
            Reject::new(
                Reason::DatasetUnknown,
                format!("dataset `{dataset}` is not in the catalogue"),
            )
        })
}

/// The filter's conditions (none when there is no filter).
pub(super) fn conditions(req: &QueryRequest) -> &[pb::Condition] {
    req.filter
        .as_ref()
        .map(|f| f.conditions.as_slice())
        .unwrap_or_default()
}

/// The question a data request asks the policy, now.
pub(super) fn policy_request(req: &QueryRequest) -> policy::Request<'_> {
    policy::Request {
        dataset: &req.dataset,
        fields: &req.fields,
        filter: conditions(req),
        purpose: &req.purpose,
        now: Some(now_unix()),
    }
}

/// The fields the caller asked for, as the record names them: a field of the dataset by the
/// snapshot's shared name (no copy), anything else (refused later) as sent.
fn requested_fields(policy: &policy::Policy, req: &QueryRequest) -> Vec<Arc<str>> {
    let names = policy.field_names(&req.dataset);
    (req.fields.iter())
        .map(|f| {
            match policy
                .field_index(&req.dataset, f)
                .and_then(|i| names.get(i))
            {
                Some(shared) => shared.clone(),
                None => Arc::from(f.as_str()),
            }
        })
        .collect()
}

/// The filter as the audit record keeps it ([`audit::AuditRecord::filter`]): each
/// condition's field and test, and the values of the dataset's region field only.
pub(super) fn filter_shape(policy: &policy::Policy, req: &QueryRequest) -> Vec<String> {
    use crate::pb::{condition::Test, value::Kind};
    let region = policy
        .dataset(&req.dataset)
        .and_then(|d| d.region_field.as_deref());
    conditions(req)
        .iter()
        .map(|c| {
            let test = match &c.test {
                Some(Test::Eq(_)) => "eq",
                Some(Test::In(_)) => "in",
                Some(Test::Prefix(_)) => "prefix",
                None => "none",
            };
            if Some(c.field.as_str()) != region {
                return format!("{} {test}", c.field);
            }
            let text = |v: &crate::pb::Value| match &v.kind {
                Some(Kind::StringValue(s)) => s.clone(),
                _ => String::new(),
            };
            let values = match &c.test {
                Some(Test::Eq(v)) => text(v),
                Some(Test::In(l)) => l.values.iter().map(text).collect::<Vec<_>>().join(","),
                Some(Test::Prefix(p)) => p.clone(),
                None => String::new(),
            };
            format!("{} {test} {values}", c.field)
        })
        .collect()
}

/// Longest dataset id, purpose or field name accepted.
pub(super) const MAX_NAME_BYTES: usize = 128;

/// Most fields one request may name.
pub(super) const MAX_FIELDS: usize = 512;

/// Stage `check`: shape rules that do not depend on the policy (sizes, well-formed conditions).
pub(super) fn check_request(req: &QueryRequest, limits: &Limits) -> Result<(), Reject> {
    let invalid = |why: String| Reject::new(Reason::RequestInvalid, why).with_rule("request:shape");
    if req.dataset.len() > MAX_NAME_BYTES || req.purpose.len() > MAX_NAME_BYTES {
        return Err(invalid(format!(
            "dataset and purpose are at most {MAX_NAME_BYTES} bytes"
        )));
    }
    if req.fields.len() > MAX_FIELDS || req.fields.iter().any(|f| f.len() > MAX_NAME_BYTES) {
        return Err(invalid(format!(
            "at most {MAX_FIELDS} fields of at most {MAX_NAME_BYTES} bytes each"
        )));
    }
    let conds = conditions(req);
    if conds.len() > limits.max_filter_terms {
        return Err(invalid(format!(
            "the filter has {} conditions; at most {} are allowed",
            conds.len(),
            limits.max_filter_terms
        )));
    }
    for (i, c) in conds.iter().enumerate() {
        use pb::condition::Test;
        if c.field.is_empty() {
            return Err(invalid(format!("filter condition {i} names no field")));
        }
        match &c.test {
            None => {
                return Err(invalid(format!(
                    "filter condition {i} on `{}` has no test (eq, in or prefix)",
                    c.field
                )));
            }
            Some(Test::In(list))
                if list.values.is_empty() || list.values.len() > limits.max_filter_terms =>
            {
                return Err(invalid(format!(
                    "filter condition {i} on `{}`: IN needs 1 to {} values",
                    c.field, limits.max_filter_terms
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Keyed hashes of the data subjects a request names: the `eq`/`in` values of its filter on
/// the dataset's subject-key field.
pub(super) fn subject_hashes(log: &AuditLog, policy: &Policy, req: &QueryRequest) -> Vec<String> {
    use pb::condition::Test;
    let Some(key) = policy.dataset(&req.dataset).map(|d| d.subject_key.as_str()) else {
        return Vec::new();
    };
    let conds = conditions(req);
    let mut out = Vec::new();
    for c in conds.iter().filter(|c| c.field == key) {
        let values: &[pb::Value] = match &c.test {
            Some(Test::Eq(v)) => std::slice::from_ref(v),
            Some(Test::In(l)) => &l.values,
            _ => &[],
        };
        out.extend(
            values
                .iter()
                .filter_map(|v| v.as_text())
                .filter_map(|t| log.subject_hash(&t)),
        );
    }
    out
}

impl Gateway {
    /// Stages `check` + `decide` + `limit` for a data request.
    pub(super) fn admit(
        &self,
        call: &mut Call,
        who: &Authenticated,
        snap: &Snapshot,
        req: &mut QueryRequest,
    ) -> Result<Permit, Reject> {
        // Shape first: nothing caller-sized reaches the audit record or a message unchecked.
        check_request(req, &self.inner.request_limits)?;
        let rec = call.pending.rec();
        rec.dataset = Some(req.dataset.clone());
        rec.purpose = Some(req.purpose.clone()).filter(|p| !p.is_empty());
        rec.fields_requested = requested_fields(&snap.policy, req);
        rec.filter = filter_shape(&snap.policy, req);
        let caller = who.caller();
        let permit = policy::evaluate(&snap.policy, caller, policy_request(req))?;
        if let Some(scope) = &permit.scope {
            let conds = &mut req.filter.get_or_insert_with(Default::default).conditions;
            policy::scope::narrow(conds, scope, &permit.rule)?;
        }
        let subjects = subject_hashes(call.pending.log(), &snap.policy, req);
        let rec = call.pending.rec();
        rec.subjects = subjects;
        rec.decision = audit::Decision::Allow;
        rec.rule = Some(permit.rule.clone());
        rec.approval_ref = permit.approval_ref.clone();
        // What the provider is asked for: exactly the permitted columns, plus the dataset's
        // region column (stripped again on the way back) so a row scope can always be checked,
        // including one a policy change adds to an open stream, and its subject-key column
        // (stripped too) so the record says whose rows left. A request that already names
        // exactly the permitted columns, in order, is sent as it came.
        let as_permitted = req.fields.len() == permit.fields.len()
            && (req.fields.iter().zip(&permit.fields)).all(|(a, p)| **a == *p.name);
        if !as_permitted {
            req.fields = permit.fields.iter().map(|f| f.name.to_string()).collect();
        }
        if let Some(ds) = snap.policy.dataset(&req.dataset) {
            let subject = (call.pending.log().returned_key().is_some()
                && !ds.subject_key.is_empty())
            .then_some(&ds.subject_key);
            for extra in [ds.region_field.as_ref(), subject].into_iter().flatten() {
                if !req.fields.contains(extra) {
                    req.fields.push(extra.clone());
                }
            }
        }
        req.page_size = match req.page_size {
            0 => self.inner.request_limits.default_page_size,
            n => n.min(self.inner.request_limits.max_page_size),
        };
        Ok(permit)
    }
}
