//! The change preview: a candidate's check errors, its diff in words, and its impact on
//! recorded traffic ([`crate::policy::impact`]).

use super::*;

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
    let t0 = std::time::Instant::now();
    let parsed = Policy::from_yaml(candidate.as_bytes());
    let parse_ms = t0.elapsed().as_millis() as u64;
    let (errors, changes, impact) = match parsed {
        Err(errs) => (
            errs.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            Vec::new(),
            Value::from(()),
        ),
        Ok(next) => {
            let t1 = std::time::Instant::now();
            let changes: Vec<Value> = crate::policy::diff::diff(&current, &next)
                .iter()
                .map(|c| context! { direction => named(&c.direction), text => c.to_string() })
                .collect();
            let diff_ms = t1.elapsed().as_millis() as u64;
            let t2 = std::time::Instant::now();
            let since = time::OffsetDateTime::now_utc() - time::Duration::days(days);
            // The same trail audit search reads: the province database when this replica
            // ships to one (every replica's calls), else its own files.
            let (impact, from_db) = gw.impact_of(std::sync::Arc::new(next), since).await;
            // What the preview's time went to (a candidate of 10,000 grants is a 2 MB parse).
            tracing::info!(
                parse_ms,
                diff_ms,
                impact_ms = t2.elapsed().as_millis() as u64,
                replayed = impact.as_ref().map_or(0, |i| i.replayed),
                "console: change preview"
            );
            let source = if from_db { "source_db" } else { "source_dir" };
            let impact = match impact {
                Ok(i) => context! { ..impact_value(&s, &i), ..context! { source } },
                Err(e) => {
                    context! { error => e, replayed => 0, rows => Vec::<Value>::new(), since => "", until => "", source }
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

pub(crate) fn impact_value(s: &ConsoleState, i: &crate::policy::impact::Impact) -> Value {
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
