//! The admin API (JSON), on the console's listener and behind the same sign-in: policy
//! status and reload (the bureau), the audit search (every role; a department administrator's
//! cut to its own calls, a search by subject recorded).
//!
//! For scripts: `curl --cert officer.pem --key officer.key -H 'x-requested-by: ops' -X POST
//! https://console:9443/admin/policy/reload` (a state-changing call without a session sends
//! `x-requested-by`, which no cross-site form can).

use axum::{
    Extension, Json,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};

use super::{Actor, ConsoleState, auth::Session};

/// Records one answer holds at most (`x-xgate-truncated: N of M` says when there were more).
const API_MAX: usize = 10_000;

pub async fn policy_status(State(s): State<ConsoleState>) -> Response {
    Json(s.reloader.status()).into_response()
}

pub async fn policy_reload(
    State(s): State<ConsoleState>,
    Extension(actor): Extension<Actor>,
) -> Response {
    let r = s.reloader.clone();
    let who = actor.0.clone();
    match tokio::task::spawn_blocking(move || r.reload(&who)).await {
        Ok(Ok(version)) => (
            StatusCode::OK,
            Json(serde_json::json!({ "ok": true, "version": version })),
        )
            .into_response(),
        Ok(Err(errors)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!({
                "ok": false,
                "version": s.reloader.status().version,
                "errors": errors,
            })),
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "ok": false, "errors": ["reload task failed"] })),
        )
            .into_response(),
    }
}

/// `GET /admin/audit/search?subject=ID&consumer=&dataset=&since=&until=&status=&decision=`:
/// the records of the trail (the province database when shipping, else this gateway's files),
/// as JSON; `since`/`until` as RFC 3339 or a date in the province's zone.
pub async fn audit_search(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<super::pages::AuditQuery>,
) -> Response {
    match super::pages::search(&s, &session, &actor, &q, API_MAX).await {
        Ok((records, matched)) => {
            let mut r = Json(&records).into_response();
            if matched > records.len() as u64
                && let Ok(v) = format!("{} of {matched}", records.len()).parse()
            {
                r.headers_mut().insert("x-xgate-truncated", v);
            }
            r
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": e })),
        )
            .into_response(),
    }
}
