//! Audit search and its CSV export (by subject for auditors and the bureau, recorded; a
//! department administrator's results cut to its calls and stripped to the call itself).

use super::*;

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
pub(crate) const SHOWN: usize = 500;

/// Run a search for `session`: a department administrator's cut to its calls and calls to its
/// datasets; a search by subject only for the bureau and auditors, and recorded.
pub(crate) async fn search(
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
    let cut = (session.officer.role == Role::DeptAdmin).then(|| {
        let dept = session.officer.department.clone().unwrap_or_default();
        let snap = gw.snapshot();
        let owned = snap
            .policy
            .file
            .datasets
            .iter()
            .filter(|d| d.owner == dept)
            .map(|d| d.id.clone())
            .collect();
        crate::audit::read::Cut { dept, owned }
    });
    let result = gw
        .search_trail_limited(query, subject.as_deref(), limit, cut)
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
pub(crate) const DEPT_ADMIN_FIELDS: &[&str] = &[
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
pub(crate) const CSV_MAX: usize = 100_000;

pub(crate) fn zone_arg(s: &ConsoleState) -> String {
    zone_label(s).trim_start_matches("UTC").to_owned()
}

pub(crate) fn cell(v: &serde_json::Value, k: &str) -> String {
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
pub(crate) const CSV_COLS: [&str; 14] = [
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
