//! A department's page: what it provides, grants in and out with today's quota use, and its
//! league-table row (the league table, reused for a minute, is built here).

use super::*;

pub(crate) fn grant_row(gw: &crate::pipeline::Gateway, g: &Grant) -> Value {
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
pub(crate) fn league_row(s: &ConsoleState, p: &std::sync::Arc<Policy>, id: &str) -> Vec<Value> {
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

/// How long a league table is served before a newer one is computed (in the background: the
/// page that finds it older is served the one computed, so no page waits for the trail).
pub(crate) const REPORT_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// This period's league table for the policy serving: the one computed last for it, if any
/// (computing a newer one in the background once it is older than [`REPORT_TTL`]); else
/// computed now. Blocking: call it off the async runtime.
pub(crate) fn build_report(
    s: &ConsoleState,
    p: &std::sync::Arc<Policy>,
    period: crate::tools::report::Period,
) -> Result<std::sync::Arc<crate::tools::report::Report>, String> {
    let key = format!("{period:?}");
    let cached = s.reports.lock().ok().and_then(|mut cache| {
        let (at, version, rep) = cache.tables.get(&key)?.clone();
        if *version != *p.version {
            return None;
        }
        if at.elapsed() >= REPORT_TTL && cache.refreshing.insert(key.clone()) {
            let (s2, p2, key2) = (s.clone(), p.clone(), key.clone());
            let spawned = std::thread::Builder::new()
                .name("xgate-league".into())
                .spawn(move || {
                    let _ = compute_report(&s2, &p2, period);
                    if let Ok(mut c) = s2.reports.lock() {
                        c.refreshing.remove(&key2);
                    }
                });
            if spawned.is_err() {
                cache.refreshing.remove(&key);
            }
        }
        Some(rep)
    });
    match cached {
        Some(rep) => Ok(rep),
        None => compute_report(s, p, period),
    }
}

/// Compute this period's league table from the trail's index, and keep it.
pub(crate) fn compute_report(
    s: &ConsoleState,
    p: &Policy,
    period: crate::tools::report::Period,
) -> Result<std::sync::Arc<crate::tools::report::Report>, String> {
    let range = crate::tools::report::Range {
        offset: s.zone,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let view = s
        .trail
        .view()
        .map_err(|e| format!("{}: {e}", s.trail.dir().display()))?;
    let read_ms = t0.elapsed().as_millis() as u64;
    let (rep, _) = crate::tools::report::build_from_index(&view, p, period, range);
    drop(view);
    tracing::info!(
        read_ms,
        ms = t0.elapsed().as_millis() as u64,
        records = rep.records,
        "console: league table built"
    );
    let rep = std::sync::Arc::new(rep);
    if let Ok(mut cache) = s.reports.lock() {
        cache.tables.insert(
            format!("{period:?}"),
            (
                std::time::Instant::now(),
                p.version.to_string(),
                rep.clone(),
            ),
        );
    }
    Ok(rep)
}
