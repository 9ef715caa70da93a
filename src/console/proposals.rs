//! Four eyes on a policy change, where the deployment lets the console manage the policy
//! file (`console.policy_managed: true`; off by default, when the file's source of truth is
//! GitOps or a ConfigMap): one bureau officer proposes a candidate that passed the check, a
//! *second* bureau officer approves it, and only then is the file replaced, atomically, and
//! reloaded. Both names are on the audit trail (`policy.proposed`, `policy.approved`,
//! `policy.withdrawn`).
//!
//! Proposals live in the process: a restart drops the open ones (none is ever applied by a
//! restart). A proposal made against one policy version cannot be approved once another is
//! serving (409): it would silently undo that change.

use std::{
    collections::BTreeMap,
    io::Write,
    sync::{Arc, Mutex},
};

use axum::{
    Extension, Form,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use minijinja::{Value, context};

use super::{Actor, ConsoleState, auth::Session, pages};
use crate::policy::Policy;

/// One open proposal.
#[derive(Debug, Clone)]
pub struct Proposal {
    pub id: String,
    pub candidate: String,
    /// The candidate's version (what it will serve as).
    pub version: String,
    /// The version serving when it was proposed.
    pub base: String,
    /// Name and certificate subject of the proposer.
    pub by: String,
    pub by_subject: String,
    pub at: String,
    pub changes: Vec<String>,
}

/// The open proposals.
#[derive(Debug, Default)]
pub struct Proposals(Mutex<BTreeMap<String, Proposal>>);

impl Proposals {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Proposal>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// At most this many open proposals (each holds a whole policy file).
const MAX_OPEN: usize = 50;

fn managed(s: &ConsoleState) -> bool {
    s.policy_managed
}

/// `POST /proposals`: propose the candidate of the preview form.
pub async fn propose(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Extension(actor): Extension<Actor>,
    Form(form): Form<std::collections::HashMap<String, String>>,
) -> Response {
    if !managed(&s) {
        return pages::refusal(&s, session.lang, StatusCode::CONFLICT, "not_managed");
    }
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let candidate = form.get("candidate").cloned().unwrap_or_default();
    let next = match Policy::from_yaml(candidate.as_bytes()) {
        Ok(p) => p,
        Err(_) => {
            return pages::refusal(
                &s,
                session.lang,
                StatusCode::UNPROCESSABLE_ENTITY,
                "check_errors",
            );
        }
    };
    let current = gw.snapshot().policy.clone();
    let changes = crate::policy::diff::diff(&current, &next)
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>();
    let p = Proposal {
        id: hex::encode(rand::random::<[u8; 8]>()),
        version: next.version.to_string(),
        base: current.version.to_string(),
        candidate,
        by: session.officer.name.clone(),
        by_subject: session.officer.key(),
        at: crate::audit::now_rfc3339(),
        changes,
    };
    {
        let mut open = s.proposals.lock();
        if open.len() >= MAX_OPEN {
            return pages::refusal(&s, session.lang, StatusCode::CONFLICT, "too_many_proposals");
        }
        open.insert(p.id.clone(), p.clone());
    }
    let mut rec = crate::audit::admin_record(
        "policy.proposed",
        &actor.0,
        true,
        Some(format!(
            "proposal {}: {} -> {} ({} change(s))",
            p.id,
            p.base,
            p.version,
            p.changes.len()
        )),
    );
    rec.from_version = Some(p.base.clone());
    rec.policy_version = p.version.as_str().into();
    gw.record_admin(rec);
    Redirect::to("/proposals").into_response()
}

/// `GET /proposals`: the open proposals, each with its changes.
pub async fn list(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
) -> Response {
    let serving = s
        .gateway
        .upgrade()
        .map(|g| g.snapshot().policy.version.clone())
        .unwrap_or_default();
    let open: Vec<Value> = s
        .proposals
        .lock()
        .values()
        .map(|p| {
            context! {
                id => p.id, version => p.version, base => p.base, by => p.by,
                at => pages::local_time(&s, &p.at), changes => p.changes,
                stale => *p.base != *serving,
                own => p.by_subject == session.officer.key(),
            }
        })
        .collect();
    let ctx = context! {
        ..pages::base(&s, &session, "/proposals"),
        ..context! { managed => managed(&s), open }
    };
    pages::render(&s, "proposals.html", session.lang, ctx)
}

/// `POST /proposals/{id}/approve`: a second bureau officer applies it.
pub async fn approve(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Response {
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let Some(p) = s.proposals.lock().get(&id).cloned() else {
        return pages::refusal(&s, session.lang, StatusCode::NOT_FOUND, "not_found");
    };
    let refuse = |status: StatusCode, key: &str, why: &str| {
        s.record(
            "console.denied",
            &actor.0,
            false,
            format!("POST /proposals/{id}/approve -> {}: {why}", status.as_u16()),
        );
        pages::refusal(&s, session.lang, status, key)
    };
    if p.by_subject == session.officer.key() {
        return refuse(
            StatusCode::FORBIDDEN,
            "second_officer",
            "the proposer cannot approve their own proposal",
        );
    }
    let serving = gw.snapshot().policy.version.clone();
    if *p.base != *serving {
        return refuse(
            StatusCode::CONFLICT,
            "stale_proposal",
            &format!("proposed against {}, {serving} is serving now", p.base),
        );
    }
    if let Err(e) = replace_atomically(&s.policy_path, p.candidate.as_bytes()) {
        tracing::error!(error = %e, path = %s.policy_path.display(), "approved policy not written");
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "write_failed",
            "the policy file could not be written",
        );
    }
    s.proposals.lock().remove(&id);
    let trigger = format!("{} approving proposal {id} by {}", actor.0, p.by);
    let r = s.reloader.clone();
    let result = tokio::task::spawn_blocking(move || r.reload(&trigger)).await;
    let ok = matches!(result, Ok(Ok(_)));
    let mut rec = crate::audit::admin_record(
        "policy.approved",
        &actor.0,
        ok,
        Some(format!(
            "proposal {id} by {} (certificate {}) approved by {} (certificate {}); {} -> {}",
            p.by,
            p.by_subject,
            session.officer.name,
            session.officer.key(),
            p.base,
            p.version
        )),
    );
    rec.from_version = Some(p.base.clone());
    rec.policy_version = p.version.as_str().into();
    gw.record_admin(rec);
    Redirect::to("/overview").into_response()
}

/// `POST /proposals/{id}/withdraw`: dropped unapplied (by any bureau officer).
pub async fn withdraw(
    State(s): State<ConsoleState>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Response {
    if let Some(p) = s.proposals.lock().remove(&id) {
        s.record(
            "policy.withdrawn",
            &actor.0,
            true,
            format!("proposal {id} by {} withdrawn", p.by),
        );
    }
    Redirect::to("/proposals").into_response()
}

/// Write `bytes` to a temporary file beside `path`, sync it, and rename it over `path` (then
/// sync the directory): a reader sees the old file or the new one, never half of one.
fn replace_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "policy.yaml".into());
    let tmp = dir.join(format!(".{name}.xgate-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Shared by the console state.
pub fn new() -> Arc<Proposals> {
    Arc::new(Proposals::default())
}
