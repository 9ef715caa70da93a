//! Signing in with the province's IdP ([`crate::console::oidc`]): the two routes outside the
//! guard. `begin` sends the browser to the IdP; `callback` checks what comes back, maps the
//! identity to an officer and opens a session bound to no certificate.
//!
//! After the callback the browser is sent on by a page (a `meta` refresh), not a redirect:
//! a redirect chain that began at the IdP is cross-site, and the browser would withhold the
//! new `SameSite=Strict` session cookie from its next hop.

use super::*;
use crate::console::oidc::{self, Callback, OidcError};

pub async fn begin(State(s): State<ConsoleState>) -> Response {
    let lang = s.default_lang;
    let Some(idp) = s.oidc.clone() else {
        return refusal(&s, lang, StatusCode::NOT_FOUND, "not_found");
    };
    match idp.begin().await {
        Ok((url, state)) => {
            let mut r = Redirect::to(&url).into_response();
            if let Ok(v) = oidc::state_cookie(&state).parse() {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => {
            tracing::warn!(error = %e, "console sign-in: the IdP cannot be used");
            refusal(&s, lang, StatusCode::BAD_GATEWAY, "idp_unavailable")
        }
    }
}

pub async fn callback(
    State(s): State<ConsoleState>,
    headers: axum::http::HeaderMap,
    Query(cb): Query<Callback>,
) -> Response {
    let lang = s.default_lang;
    let Some(idp) = s.oidc.clone() else {
        return refusal(&s, lang, StatusCode::NOT_FOUND, "not_found");
    };
    let with_state_cleared = |mut r: Response| {
        if let Ok(v) = oidc::expired_state_cookie().parse() {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
        r
    };
    let cookie = oidc::state_from(&headers);
    let id = match idp.finish(cookie.as_deref(), &cb).await {
        Ok(id) => id,
        Err(e) => {
            s.record_refusal(
                &format!("IdP sign-in at {}", idp.issuer()),
                format!("GET /signin/oidc/callback -> refused: {e}"),
            );
            let (status, why) = match e {
                OidcError::State(_) => (StatusCode::FORBIDDEN, "signin_state"),
                OidcError::Refused(_) => (StatusCode::FORBIDDEN, "signin_refused"),
                OidcError::Idp(_) => (StatusCode::BAD_GATEWAY, "idp_unavailable"),
                OidcError::Token(_) => (StatusCode::FORBIDDEN, "signin_token"),
            };
            return with_state_cleared(refusal(&s, lang, status, why));
        }
    };
    let Some(officer) = s.officers.by_oidc(&id).cloned() else {
        s.record_refusal(
            &format!("IdP {} identity {}", idp.issuer(), truncate_id(&id)),
            "GET /signin/oidc/callback -> 403: not a console officer".into(),
        );
        return with_state_cleared(refusal(&s, lang, StatusCode::FORBIDDEN, "not_officer_idp"));
    };
    let session = s
        .sessions
        .open(officer, oidc::OIDC_BINDING.to_owned(), s.default_lang);
    s.record(
        "console.signin",
        &super::super::actor(&session, ""),
        true,
        format!(
            "signed in as {} with the IdP {} ({} = {})",
            session.officer.role.as_str(),
            idp.issuer(),
            idp.claim(),
            truncate_id(&id)
        ),
    );
    let t = i18n::words(session.lang);
    let ctx = context! {
        lang => session.lang.tag(), t => t, me => Value::from(()), nav => Vec::<Value>::new(),
        csrf => "", zone => zone_label(&s), policy_version => Value::from(()),
        other_lang => "", status => 200, heading => t["signed_in"], why => t["continue_why"],
        refresh => "/", continue_to => "/",
    };
    let mut r = render(&s, "refusal.html", session.lang, ctx);
    if let Ok(v) = crate::console::auth::cookie(&session.id).parse() {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    with_state_cleared(r)
}

/// An IdP identity as the trail shows it (the IdP's value, bounded).
fn truncate_id(id: &str) -> String {
    id.chars().take(128).collect()
}
