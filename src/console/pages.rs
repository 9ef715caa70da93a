//! The console's pages: each handler gathers what its page shows (a department
//! administrator's view cut to its own department) and renders its template.
//!
//! Not here: who may open a page (the guard, [`super::auth::may`]), the decisions shown
//! (Explain and the change preview call [`crate::policy::eval`], the gateway's own).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use axum::{
    Extension, Form,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use minijinja::{Value, context};
use serde::Deserialize;

use super::{
    Actor, ConsoleState,
    auth::{Role, Session},
    i18n::{self, Lang},
};
use crate::policy::{
    Policy,
    model::{Dataset, Grant},
};

/// A rendered page (or, if the template fails — a defect — a plain 500 that says so).
pub(super) fn render(s: &ConsoleState, name: &str, lang: Lang, ctx: Value) -> Response {
    match s.templates.get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(e) => {
            tracing::error!(template = name, error = %e, "console page failed to render");
            let msg = if lang == Lang::Zh {
                "页面渲染失败（已记录）\n"
            } else {
                "the page could not be rendered (logged)\n"
            };
            (StatusCode::INTERNAL_SERVER_ERROR, msg).into_response()
        }
    }
}

/// The navigation a role sees.
fn nav(session: &Session, current: &str) -> Vec<Value> {
    let own = session
        .officer
        .department
        .as_deref()
        .map(|d| format!("/departments/{d}"));
    let items: Vec<(String, &str)> = match session.officer.role {
        Role::Bureau => vec![
            ("/overview".into(), "overview"),
            ("/catalogue".into(), "catalogue"),
            ("/explain".into(), "explain"),
            ("/preview".into(), "preview"),
            ("/audit".into(), "audit"),
            ("/league".into(), "league"),
        ],
        Role::DeptAdmin => vec![
            (own.unwrap_or_default(), "department"),
            ("/catalogue".into(), "catalogue"),
            ("/explain".into(), "explain"),
            ("/audit".into(), "audit"),
        ],
        Role::Auditor => vec![("/audit".into(), "audit")],
    };
    items
        .into_iter()
        .map(|(href, key)| context! { current => href == current, href, key })
        .collect()
}

/// The context every page has: words, who is signed in, the CSRF token, the navigation.
pub(super) fn base(s: &ConsoleState, session: &Session, current: &str) -> Value {
    let policy_version = s
        .gateway
        .upgrade()
        .map(|g| g.snapshot().policy.version.clone());
    let mut nav = nav(session, current);
    if s.policy_managed && session.officer.role == Role::Bureau {
        nav.push(context! { current => current == "/proposals", href => "/proposals", key => "proposals" });
    }
    context! {
        lang => session.lang.tag(),
        other_lang => if session.lang == Lang::Zh { "en" } else { "zh-CN" },
        t => i18n::words(session.lang),
        me => context! {
            name => session.officer.name,
            role => session.officer.role.as_str(),
            department => session.officer.department,
        },
        csrf => session.csrf,
        nav => nav,
        zone => zone_label(s),
        policy_version,
    }
}

fn zone_label(s: &ConsoleState) -> String {
    let (h, m, _) = s.zone.as_hms();
    format!(
        "UTC{}{:02}:{:02}",
        if h < 0 || m < 0 { '-' } else { '+' },
        h.abs(),
        m.abs()
    )
}

/// A refusal page (401, 403) in `lang`, with the reason the guard found.
pub fn refusal(s: &ConsoleState, lang: Lang, status: StatusCode, why: &str) -> Response {
    let t = i18n::words(lang);
    let heading = match status {
        StatusCode::UNAUTHORIZED => t["unauthenticated"],
        StatusCode::FORBIDDEN if why == "not_officer" => t["not_officer"],
        StatusCode::FORBIDDEN if why == "session_expired" => t["bad_request"],
        StatusCode::FORBIDDEN => t["forbidden"],
        _ => t["bad_request"],
    };
    let why_text = match why {
        "not_officer" => t["unauthenticated_why"],
        w => t.get(w).copied().unwrap_or(w),
    };
    let ctx = context! {
        lang => lang.tag(), t => t, me => Value::from(()), nav => Vec::<Value>::new(),
        csrf => "", zone => zone_label(s), policy_version => Value::from(()),
        other_lang => "", status => status.as_u16(), heading, why => why_text,
    };
    let mut r = render(s, "refusal.html", lang, ctx);
    *r.status_mut() = status;
    r
}

/// A refusal inside a page the role may open (another department's page): recorded.
fn refuse_here(s: &ConsoleState, session: &Session, actor: &Actor, what: &str) -> Response {
    s.record(
        "console.denied",
        &actor.0,
        false,
        format!(
            "{what} -> 403: outside department {}",
            session.officer.department.as_deref().unwrap_or("")
        ),
    );
    refusal(s, session.lang, StatusCode::FORBIDDEN, "forbidden_why")
}

/// Where each role starts.
pub async fn home(Extension(session): Extension<Session>) -> Redirect {
    match session.officer.role {
        Role::Bureau => Redirect::to("/overview"),
        Role::DeptAdmin => Redirect::to(&format!(
            "/departments/{}",
            form_urlencoded::byte_serialize(
                session
                    .officer
                    .department
                    .as_deref()
                    .unwrap_or("")
                    .as_bytes()
            )
            .collect::<String>()
        )),
        Role::Auditor => Redirect::to("/audit"),
    }
}

/// Any path the console does not have (outside the guard: the same 404 for everyone).
pub async fn not_found(State(s): State<ConsoleState>) -> Response {
    refusal(&s, s.default_lang, StatusCode::NOT_FOUND, "not_found")
}

pub async fn set_lang(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    axum::extract::RawForm(body): axum::extract::RawForm,
) -> Response {
    let lang = form_urlencoded::parse(&body)
        .find(|(k, _)| k == "lang")
        .and_then(|(_, v)| Lang::parse(&v));
    if let Some(l) = lang {
        s.sessions.set_lang(&session.id, l);
    }
    Redirect::to("/").into_response()
}

pub async fn signout(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
) -> Response {
    s.sessions.close(&session.id);
    let mut r = refusal(&s, session.lang, StatusCode::OK, "signout");
    if let Ok(v) = super::auth::expired_cookie().parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// A protobuf-style enum as the policy file writes it (`ShareType::Conditional` →
/// `conditional`).
fn named<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

// ---------------------------------------------------------------- overview

pub async fn overview(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
) -> Response {
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let st = s.reloader.status();
    let snap = gw.snapshot();
    let ready = crate::serve::health::readiness(&gw);
    let hour = gw.audit_recent();
    let most = hour.reasons.first().map_or(1, |r| r.1.max(1));
    let providers: Vec<Value> = snap
        .policy
        .file
        .providers
        .iter()
        .map(|p| {
            let mut eps: Vec<String> = p.endpoints.clone();
            eps.extend(p.endpoint.clone());
            if let Some(d) = &p.dns {
                eps.push(format!("dns:{}:{}", d.name, d.port));
            }
            context! {
                id => p.id,
                up => ready.providers.get(&p.id).copied().unwrap_or(false),
                endpoints => eps.into_iter().map(|a| context! { addr => a, state => "" }).collect::<Vec<_>>(),
            }
        })
        .collect();
    let shipping = gw.shipping().map(|sh| sh.status());
    let ctx = context! {
        ..base(&s, &session, "/overview"),
        ..context! {
            policy => context! {
                version => st.version,
                loaded_at => local_time(&s, &st.loaded_at),
                trigger => st.loaded_by,
                failed => st.last_error.map(|f| context! { at => local_time(&s, &f.at), errors => f.errors }),
            },
            trail => context! {
                writable => gw.audit_open(),
                queue => gw.audit_queue_depth(),
                shipping => shipping.map(|sh| context! {
                    replica => sh.replica, connected => sh.connected,
                    lag_records => sh.lag_records, lag_seconds => sh.lag_seconds,
                    error => sh.error,
                }),
            },
            hour => context! {
                calls => hour.calls, allowed => hour.allowed, denied => hour.denied,
                rate_limited => hour.rate_limited,
                reasons => hour.reasons.iter().map(|(r, n)| context! {
                    reason => r, count => n, share => format!("{:.3}", *n as f64 / most as f64),
                }).collect::<Vec<_>>(),
            },
            providers,
        }
    };
    render(&s, "overview.html", session.lang, ctx)
}

/// An RFC 3339 time shown in the province's zone (`2026-12-01 20:41:55`).
pub(super) fn local_time(s: &ConsoleState, t: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    match time::OffsetDateTime::parse(t, &Rfc3339) {
        Ok(x) => {
            let l = x.to_offset(s.zone);
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                l.year(),
                l.month() as u8,
                l.day(),
                l.hour(),
                l.minute(),
                l.second()
            )
        }
        Err(_) => t.to_owned(),
    }
}

// ---------------------------------------------------------------- catalogue

#[derive(Deserialize, Default)]
pub struct CatalogueQuery {
    #[serde(default)]
    q: String,
}

/// The datasets a session may see in the catalogue: all for the bureau; for a department
/// administrator, its own and those it holds grants on.
fn visible(policy: &Policy, session: &Session, d: &Dataset) -> bool {
    match (session.officer.role, session.officer.department.as_deref()) {
        (Role::Bureau, _) => true,
        (Role::DeptAdmin, Some(own)) => {
            d.owner == own
                || policy
                    .file
                    .grants
                    .iter()
                    .any(|g| g.dataset == d.id && g.consumer == own)
        }
        _ => false,
    }
}

pub async fn catalogue(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Query(q): Query<CatalogueQuery>,
) -> Response {
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let snap = gw.snapshot();
    let p = &snap.policy;
    let needle = q.q.trim().to_lowercase();
    let matches = |d: &Dataset| {
        needle.is_empty()
            || d.id.to_lowercase().contains(&needle)
            || d.title.to_lowercase().contains(&needle)
            || d.description.to_lowercase().contains(&needle)
            || d.owner.to_lowercase().contains(&needle)
            || d.fields
                .iter()
                .any(|f| f.name.to_lowercase().contains(&needle))
    };
    let mut by_owner: BTreeMap<&str, Vec<&Dataset>> = BTreeMap::new();
    for d in &p.file.datasets {
        if visible(p, &session, d) && matches(d) {
            by_owner.entry(&d.owner).or_default().push(d);
        }
    }
    let negative_for = |ds: &str| -> String {
        p.file
            .negative_list
            .iter()
            .filter(|n| n.dataset == ds)
            .map(|n| match &n.field {
                Some(f) => format!("{f}: {}", n.reason),
                None => n.reason.clone(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let owners: Vec<Value> = by_owner
        .into_iter()
        .map(|(owner, ds)| {
            context! {
                id => owner,
                name => p.department(owner).map_or(owner.to_owned(), |d| d.name.clone()),
                datasets => ds.iter().map(|d| {
                    // Who holds grants on a dataset is its owner's (and the bureau's) to see;
                    // a consumer sees its own.
                    let sees_all = session.officer.role == Role::Bureau
                        || session.officer.department.as_deref() == Some(d.owner.as_str());
                    let holders: BTreeSet<&str> = p.file.grants.iter()
                        .filter(|g| g.dataset == d.id)
                        .filter(|g| sees_all || session.officer.department.as_deref() == Some(g.consumer.as_str()))
                        .map(|g| g.consumer.as_str()).collect();
                    context! {
                        id => d.id, title => d.title, description => d.description,
                        share_type => named(&d.share_type),
                        negative => negative_for(&d.id),
                        fields => d.fields.iter().map(|f| context! {
                            name => f.name, sensitivity => named(&f.sensitivity),
                            mask => f.mask.describe(), note => f.description,
                        }).collect::<Vec<_>>(),
                        holders => holders.into_iter().collect::<Vec<_>>(),
                    }
                }).collect::<Vec<_>>(),
            }
        })
        .collect();
    let negative: Vec<Value> = p
        .file
        .negative_list
        .iter()
        .filter(|n| {
            p.dataset(&n.dataset)
                .is_none_or(|d| visible(p, &session, d))
        })
        .map(|n| context! { dataset => n.dataset, field => n.field, reason => n.reason })
        .collect();
    let ctx = context! {
        ..base(&s, &session, "/catalogue"),
        ..context! { q => q.q, owners, negative }
    };
    render(&s, "catalogue.html", session.lang, ctx)
}

// ---------------------------------------------------------------- department

fn grant_row(gw: &crate::pipeline::Gateway, g: &Grant) -> Value {
    let limits = [
        g.rate_limit
            .as_ref()
            .map(|r| format!("{}/s burst {}", r.per_second, r.burst)),
        g.daily_quota.as_ref().map(|q| {
            let mut v = Vec::new();
            if let Some(c) = q.calls {
                v.push(format!("{c} calls/day"));
            }
            if let Some(r) = q.rows {
                v.push(format!("{r} rows/day"));
            }
            v.join(", ")
        }),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join("; ");
    let quota = g.daily_quota.as_ref().map(|q| {
        let (calls, rows) = gw.quota_used(&g.id);
        let mut v = Vec::new();
        if let Some(c) = q.calls {
            v.push(format!("{calls} / {c} calls"));
        }
        if let Some(r) = q.rows {
            v.push(format!("{rows} / {r} rows"));
        }
        v.join(", ")
    });
    context! {
        id => g.id, consumer => g.consumer, system => g.system, dataset => g.dataset,
        purposes => g.purposes.join(", "),
        fields => if g.fields.is_empty() { "*".to_owned() } else { g.fields.join(", ") },
        masks => g.masks.iter().map(|(f, m)| format!("{f}: {}", m.describe())).collect::<Vec<_>>().join("; "),
        row_scope => named(&g.row_scope),
        validity => format!("{} – {}", g.valid_from.as_deref().unwrap_or(""), g.expires.as_deref().unwrap_or("")),
        approval_ref => g.approval_ref,
        limits => limits,
        quota => quota.unwrap_or_default(),
    }
}

pub async fn department(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Response {
    if session.officer.role == Role::DeptAdmin
        && session.officer.department.as_deref() != Some(id.as_str())
    {
        return refuse_here(&s, &session, &actor, &format!("GET /departments/{id}"));
    }
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let snap = gw.snapshot();
    let p = &snap.policy;
    let Some(dept) = p.department(&id) else {
        return refusal(&s, session.lang, StatusCode::NOT_FOUND, "not_found");
    };
    let provides: Vec<Value> = p
        .file
        .datasets
        .iter()
        .filter(|d| d.owner == id)
        .map(|d| context! { id => d.id, title => d.title, share_type => named(&d.share_type) })
        .collect();
    let owned: BTreeSet<&str> = p
        .file
        .datasets
        .iter()
        .filter(|d| d.owner == id)
        .map(|d| d.id.as_str())
        .collect();
    let grants_in: Vec<Value> = p
        .file
        .grants
        .iter()
        .filter(|g| owned.contains(g.dataset.as_str()))
        .map(|g| grant_row(&gw, g))
        .collect();
    let grants_out: Vec<Value> = p
        .file
        .grants
        .iter()
        .filter(|g| g.consumer == id)
        .map(|g| grant_row(&gw, g))
        .collect();
    let league = {
        let (s2, p2, id2) = (s.clone(), snap.policy.clone(), id.clone());
        tokio::task::spawn_blocking(move || league_row(&s2, &p2, &id2))
            .await
            .unwrap_or_default()
    };
    let ctx = context! {
        ..base(&s, &session, &format!("/departments/{id}")),
        ..context! {
            dept => context! { id => dept.id, name => dept.name, level => named(&dept.level), region => dept.region },
            provides, grants_in, grants_out, league,
        }
    };
    render(&s, "department.html", session.lang, ctx)
}

/// The department's row in this month's league table, from the local trail.
fn league_row(s: &ConsoleState, p: &Policy, id: &str) -> Vec<Value> {
    let Ok(rep) = build_report(s, p, crate::tools::report::Period::Month) else {
        return Vec::new();
    };
    let Some(period) = rep.periods.last() else {
        return Vec::new();
    };
    let Some(r) = period.departments.iter().find(|r| r.department == id) else {
        return Vec::new();
    };
    vec![
        context! { label => "period", value => period.period },
        context! { label => "rank", value => r.rank },
        context! { label => "score", value => format!("{:.1}", r.score) },
        context! { label => "calls provided (allowed)", value => r.provided.allowed },
        context! { label => "calls consumed", value => r.consumed.calls },
        context! { label => "consumed, refused", value => r.consumed.calls.saturating_sub(r.consumed.allowed) },
    ]
}

/// How long a league table is reused before it is computed again (it reads the whole trail).
const REPORT_TTL: std::time::Duration = std::time::Duration::from_secs(60);

fn build_report(
    s: &ConsoleState,
    p: &Policy,
    period: crate::tools::report::Period,
) -> Result<std::sync::Arc<crate::tools::report::Report>, String> {
    let key = (format!("{period:?}"), p.version.clone());
    if let Ok(cache) = s.reports.lock()
        && let Some((at, k, rep)) = cache.as_ref()
        && *k == key
        && at.elapsed() < REPORT_TTL
    {
        return Ok(rep.clone());
    }
    let range = crate::tools::report::Range {
        offset: s.zone,
        ..Default::default()
    };
    let mut records = Vec::new();
    crate::audit::read::search(&s.audit_dir, &Default::default(), |v| records.push(v))
        .map_err(|e| format!("{}: {e}", s.audit_dir.display()))?;
    let rep = std::sync::Arc::new(crate::tools::report::build(&records, p, period, range));
    if let Ok(mut cache) = s.reports.lock() {
        *cache = Some((std::time::Instant::now(), key, rep.clone()));
    }
    Ok(rep)
}

// ---------------------------------------------------------------- explain

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

// ---------------------------------------------------------------- change preview

pub async fn preview_form(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
) -> Response {
    let candidate = std::fs::read_to_string(&s.policy_path).unwrap_or_default();
    let ctx = context! {
        ..base(&s, &session, "/preview"),
        ..context! { candidate, days => 7, checked => false }
    };
    render(&s, "preview.html", session.lang, ctx)
}

pub async fn preview(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let candidate = form.get("candidate").cloned().unwrap_or_default();
    let days: i64 = form
        .get("days")
        .and_then(|d| d.parse().ok())
        .unwrap_or(7)
        .clamp(1, 90);
    let current = gw.snapshot().policy.clone();
    let (errors, changes, impact) = match Policy::from_yaml(candidate.as_bytes()) {
        Err(errs) => (
            errs.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            Vec::new(),
            Value::from(()),
        ),
        Ok(next) => {
            let changes: Vec<Value> = crate::policy::diff::diff(&current, &next)
                .iter()
                .map(|c| context! { direction => named(&c.direction), text => c.to_string() })
                .collect();
            let dir = s.audit_dir.clone();
            let since = time::OffsetDateTime::now_utc() - time::Duration::days(days);
            let (cur, nxt) = (current.clone(), std::sync::Arc::new(next));
            let impact = tokio::task::spawn_blocking(move || {
                crate::policy::impact::over_dir(&dir, &cur, &nxt, Some(since), None)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r);
            let impact = match impact {
                Ok(i) => impact_value(&s, &i),
                Err(e) => {
                    context! { error => e, replayed => 0, rows => Vec::<Value>::new(), since => "", until => "" }
                }
            };
            (Vec::new(), changes, impact)
        }
    };
    let ctx = context! {
        ..base(&s, &session, "/preview"),
        ..context! { candidate, days, checked => true, errors, changes, impact, managed => s.policy_managed }
    };
    render(&s, "preview.html", session.lang, ctx)
}

fn impact_value(s: &ConsoleState, i: &crate::policy::impact::Impact) -> Value {
    context! {
        replayed => i.replayed,
        since => i.since.as_deref().map(|t| local_time(s, t)).unwrap_or_default(),
        until => i.until.as_deref().map(|t| local_time(s, t)).unwrap_or_default(),
        rows => i.rows.iter().map(|r| context! {
            consumer => r.consumer, dataset => r.dataset,
            now_refused => r.now_refused, newly_allowed => r.newly_allowed,
            reasons => r.new_reasons.iter().map(|(k, v)| context! { reason => k, count => v }).collect::<Vec<_>>(),
            newly_masked => r.newly_masked.iter().cloned().collect::<Vec<_>>().join(", "),
            newly_shown => r.newly_shown.iter().cloned().collect::<Vec<_>>().join(", "),
        }).collect::<Vec<_>>(),
    }
}

// ---------------------------------------------------------------- audit search

#[derive(Deserialize, Default, Clone)]
pub struct AuditQuery {
    #[serde(default)]
    consumer: String,
    #[serde(default)]
    dataset: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    subject: String,
}

/// Records shown on the page at most (the CSV export has them all).
const SHOWN: usize = 500;

/// Run a search for `session`: a department administrator's cut to its calls and calls to its
/// datasets; a search by subject only for the bureau and auditors, and recorded.
pub(super) async fn search(
    s: &ConsoleState,
    session: &Session,
    actor: &Actor,
    q: &AuditQuery,
    limit: usize,
) -> Result<(Vec<serde_json::Value>, u64), String> {
    let gw = s.gateway.upgrade().ok_or("shutting down")?;
    let opt = |v: &str| (!v.trim().is_empty()).then(|| v.trim().to_owned());
    let range = crate::tools::report::Range::parse(
        opt(&q.since).as_deref(),
        opt(&q.until).as_deref(),
        &zone_arg(s),
    )?;
    let subject = opt(&q.subject);
    if subject.is_some() && session.officer.role == Role::DeptAdmin {
        return Err("a search by data subject is for auditors and the bureau".into());
    }
    let query = crate::audit::read::Query {
        consumer: opt(&q.consumer),
        dataset: opt(&q.dataset),
        since: range.from,
        until: range.to,
        status: opt(&q.status),
        decision: opt(&q.decision),
        ..Default::default()
    };
    // A department administrator's cut, while reading (never more held than is shown): its
    // calls, and calls to its datasets, with only the fields of the call itself.
    let dept = (session.officer.role == Role::DeptAdmin).then(|| {
        let own = session.officer.department.clone().unwrap_or_default();
        let snap = gw.snapshot();
        let owned: std::collections::HashSet<String> = snap
            .policy
            .file
            .datasets
            .iter()
            .filter(|d| d.owner == own)
            .map(|d| d.id.clone())
            .collect();
        (own, owned)
    });
    let keep = move |r: &serde_json::Value| match &dept {
        None => true,
        Some((own, owned)) => {
            r["consumer_dept"] == own.as_str()
                || r["dataset"].as_str().is_some_and(|d| owned.contains(d))
        }
    };
    let result = gw
        .search_trail_limited(query, subject.as_deref(), limit, keep)
        .await;
    if let Some(id) = &subject
        && let Some(hash) = gw.subject_hash(id)
    {
        let mut rec = crate::audit::admin_record(
            "audit.search",
            &actor.0,
            result.is_ok(),
            Some(format!("by subject {hash} (console)")),
        );
        rec.subjects = vec![hash];
        gw.record_admin(rec);
    }
    let (mut records, n) = result?;
    if session.officer.role == Role::DeptAdmin {
        for r in &mut records {
            if let Some(o) = r.as_object_mut() {
                o.retain(|k, _| DEPT_ADMIN_FIELDS.contains(&k.as_str()));
            }
        }
    }
    Ok((records, n))
}

/// What a department administrator sees of a record: the call, not whom it was about.
const DEPT_ADMIN_FIELDS: &[&str] = &[
    "time",
    "trace_id",
    "method",
    "consumer_dept",
    "consumer_system",
    "dataset",
    "purpose",
    "decision",
    "rule",
    "reason",
    "grpc_status",
    "rows",
    "latency_us",
    "replica",
];

/// Rows a CSV export holds at most (the answer says when there were more).
const CSV_MAX: usize = 100_000;

fn zone_arg(s: &ConsoleState) -> String {
    zone_label(s).trim_start_matches("UTC").to_owned()
}

fn cell(v: &serde_json::Value, k: &str) -> String {
    match &v[k] {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub async fn audit(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<AuditQuery>,
    uri: axum::http::Uri,
) -> Response {
    let searched = uri.query().is_some_and(|x| !x.is_empty());
    let (records, matched, error) = if searched {
        match search(&s, &session, &actor, &q, SHOWN).await {
            Ok((r, n)) => (r, n, None),
            Err(e) => (Vec::new(), 0, Some(e)),
        }
    } else {
        (Vec::new(), 0, None)
    };
    let source = if s.gateway.upgrade().is_some_and(|g| g.shipping().is_some()) {
        "source_db"
    } else {
        "source_dir"
    };
    let shown: Vec<Value> = records
        .iter()
        .take(SHOWN)
        .map(|r| {
            context! {
                time => local_time(&s, &cell(r, "time")),
                consumer => cell(r, "consumer_dept"), system => cell(r, "consumer_system"),
                dataset => cell(r, "dataset"), purpose => cell(r, "purpose"),
                decision => cell(r, "decision"), status => cell(r, "grpc_status"),
                reason => cell(r, "reason"), rows => cell(r, "rows"),
            }
        })
        .collect();
    let ctx = context! {
        ..base(&s, &session, "/audit"),
        ..context! {
            form => context! { consumer => q.consumer, dataset => q.dataset, since => q.since, until => q.until, status => q.status, decision => q.decision, subject => q.subject },
            may_subject => session.officer.role != Role::DeptAdmin,
            locked_consumer => false,
            searched => searched && error.is_none(),
            error, source,
            matched, truncated => matched > records.len() as u64,
            records => shown,
            query => uri.query().unwrap_or(""),
        }
    };
    render(&s, "audit.html", session.lang, ctx)
}

/// The columns of the CSV export.
const CSV_COLS: [&str; 14] = [
    "time",
    "trace_id",
    "consumer_dept",
    "consumer_system",
    "method",
    "dataset",
    "purpose",
    "decision",
    "rule",
    "reason",
    "grpc_status",
    "rows",
    "approval_ref",
    "replica",
];

pub async fn audit_csv(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<AuditQuery>,
) -> Response {
    let (records, matched) = match search(&s, &session, &actor, &q, CSV_MAX).await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let mut out = String::new();
    out.push_str(&CSV_COLS.join(","));
    out.push('\n');
    for r in &records {
        let row: Vec<String> = CSV_COLS
            .iter()
            .map(|k| {
                let c = cell(r, k);
                // Quoted when needed; a leading = + - @ is neutralised (spreadsheet formulas).
                let c = if c.starts_with(['=', '+', '-', '@', '\t', '\r']) {
                    format!("'{c}")
                } else {
                    c
                };
                if c.contains([',', '"', '\n', '\r']) {
                    format!("\"{}\"", c.replace('"', "\"\""))
                } else {
                    c
                }
            })
            .collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    let mut r = (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"xgate-audit.csv\"",
            ),
        ],
        out,
    )
        .into_response();
    // More matched than an export holds: said in a header (a CSV has no place for it).
    if matched > records.len() as u64
        && let Ok(v) = format!("{} of {matched}", records.len()).parse()
    {
        r.headers_mut().insert("x-xgate-truncated", v);
    }
    r
}

// ---------------------------------------------------------------- league table

#[derive(Deserialize, Default)]
pub struct LeagueQuery {
    #[serde(default)]
    period: String,
}

pub async fn league(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Query(q): Query<LeagueQuery>,
) -> Response {
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let period = match q.period.as_str() {
        "day" => crate::tools::report::Period::Day,
        "week" => crate::tools::report::Period::Week,
        _ => crate::tools::report::Period::Month,
    };
    let p = gw.snapshot().policy.clone();
    let s2 = s.clone();
    let html = tokio::task::spawn_blocking(move || {
        build_report(&s2, &p, period).map(|r| crate::tools::report::render_html_body(&r))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .unwrap_or_else(|e| format!("<p class=\"bad\">{}</p>", crate::tools::report::esc(&e)));
    let ctx = context! {
        ..base(&s, &session, "/league"),
        ..context! { period => named(&period), report_html => html }
    };
    render(&s, "league.html", session.lang, ctx)
}
