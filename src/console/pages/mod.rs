//! The console's pages, a file per page: each handler gathers what its page shows (a department
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

mod audit;
mod catalogue;
mod department;
mod explain;
mod league;
mod overview;
mod preview;
pub mod signin;

pub use audit::*;
pub use catalogue::*;
pub use department::*;
pub use explain::*;
pub use league::*;
pub use overview::*;
pub use preview::*;

/// A rendered page (or, if the template fails — a defect — a plain 500 that says so).
pub(crate) fn render(s: &ConsoleState, name: &str, lang: Lang, ctx: Value) -> Response {
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
pub(crate) fn nav(session: &Session, current: &str) -> Vec<Value> {
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
pub(crate) fn base(s: &ConsoleState, session: &Session, current: &str) -> Value {
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

pub(crate) fn zone_label(s: &ConsoleState) -> String {
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
        StatusCode::FORBIDDEN if why == "not_officer_idp" => t["not_officer_idp"],
        StatusCode::FORBIDDEN if why.starts_with("signin_") => t["signin_failed"],
        StatusCode::BAD_GATEWAY => t["signin_failed"],
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
        signin_oidc => status == StatusCode::UNAUTHORIZED && s.oidc.is_some(),
    };
    let mut r = render(s, "refusal.html", lang, ctx);
    *r.status_mut() = status;
    r
}

/// A refusal inside a page the role may open (another department's page): recorded.
pub(crate) fn refuse_here(
    s: &ConsoleState,
    session: &Session,
    actor: &Actor,
    what: &str,
) -> Response {
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
pub(crate) fn named<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}
