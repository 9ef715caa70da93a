//! The league table: `xgate report`'s HTML over this gateway's trail.

use super::*;

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
    let (s2, lang) = (s.clone(), session.lang);
    let html = tokio::task::spawn_blocking(move || {
        build_report(&s2, &p, period).map(|r| crate::tools::report::render_html_body(&r, lang))
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
