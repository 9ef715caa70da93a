//! Explain: one decision and its chain of rules, by the gateway's own evaluation.

use super::*;

#[derive(Deserialize, Default, Clone)]
pub struct ExplainQuery {
    #[serde(default)]
    pub consumer: String,
    #[serde(default)]
    pub system: String,
    #[serde(default)]
    pub dataset: String,
    #[serde(default)]
    pub purpose: String,
    #[serde(default)]
    pub fields: String,
}

/// The decision and its chain of rules, as the gateway computes them.
pub fn explain_decision(p: &Policy, q: &ExplainQuery, now: i64) -> Value {
    let fields: Vec<String> = q
        .fields
        .split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(str::to_owned)
        .collect();
    let mut steps = crate::policy::eval::Steps::default();
    let decision = crate::policy::eval::evaluate_traced(
        p,
        crate::policy::Caller {
            dept: &q.consumer,
            system: &q.system,
            token_purposes: None,
            token_bound: false,
        },
        crate::policy::Request {
            dataset: &q.dataset,
            fields: &fields,
            filter: &[],
            purpose: &q.purpose,
            now: Some(now),
        },
        &mut steps,
    );
    let mut shown: Vec<Value> = steps
        .0
        .iter()
        .map(|(rule, note)| context! { step => rule, result => note })
        .collect();
    match decision {
        Ok(permit) => {
            if let Some(sc) = &permit.scope {
                shown.push(context! { step => "row-scope", result => format!("{} (field `{}`)", sc.label, sc.field) });
            }
            context! {
                decision => "allow", reason => Value::from(()), message => Value::from(()),
                rule => permit.rule,
                fields => permit.fields.iter().map(|f| context! {
                    name => f.name,
                    mask => if f.mask.is_none() { "in clear".to_owned() } else { f.mask.describe() },
                }).collect::<Vec<_>>(),
                steps => shown,
            }
        }
        Err(r) => {
            shown.push(context! { step => r.rule.clone().unwrap_or_else(|| "request".into()), result => r.message.clone() });
            context! {
                decision => "deny", reason => r.reason.to_string(), message => r.message,
                rule => Value::from(()), fields => Vec::<Value>::new(), steps => shown,
            }
        }
    }
}

pub async fn explain(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<ExplainQuery>,
) -> Response {
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let snap = gw.snapshot();
    let p = &snap.policy;
    let own = session.officer.department.clone();
    let asked = !q.dataset.is_empty() && !q.consumer.is_empty();
    // A department administrator explains its own calls, or calls to its own datasets.
    // (For its own calls, only on datasets the catalogue shows it: an explanation names the
    // dataset's fields and masks.)
    if session.officer.role == Role::DeptAdmin && asked {
        let own = own.as_deref().unwrap_or("");
        let ds = p.dataset(&q.dataset);
        let owns = ds.is_some_and(|d| d.owner == own);
        let its_call = q.consumer == own && ds.is_none_or(|d| visible(p, &session, d));
        if !owns && !its_call {
            return refuse_here(&s, &session, &actor, "GET /explain");
        }
    }
    let consumers: Vec<String> = p.file.departments.iter().map(|d| d.id.clone()).collect();
    let datasets: Vec<String> = p
        .file
        .datasets
        .iter()
        .filter(|d| visible(p, &session, d))
        .map(|d| d.id.clone())
        .collect();
    let now = i64::try_from(crate::token::now_secs()).unwrap_or(i64::MAX);
    let result = asked.then(|| explain_decision(p, &q, now));
    let ctx = context! {
        ..base(&s, &session, "/explain"),
        ..context! {
            form => context! { consumer => q.consumer, system => q.system, dataset => q.dataset, purpose => q.purpose, fields => q.fields },
            consumers, datasets, result,
        }
    };
    render(&s, "explain.html", session.lang, ctx)
}
