//! `Usage.FindUsage`: a data subject's accesses, for the citizen portal — who read their data,
//! when, why and under which approval — answered from the province trail (the database the
//! replicas ship to, `audit.ship`) or, without one, this gateway's own trail. Only the
//! systems in `usage.portals` may ask; the answer leaves out what the policy withholds or
//! never discloses ([`policy::usage::disclosed`], pure), and never says who at the consuming
//! department made a call. The call is recorded like any other, with the subject it asked
//! about: searching for who read a person's record is itself an access to account for.

use super::*;

pub(super) const METHOD_FIND_USAGE: &str = "/xgate.v1.Usage/FindUsage";

/// Where the accesses are read from.
#[derive(Debug)]
pub enum UsageSource {
    /// This gateway's own trail, through its index (the embedded default).
    Local,
    /// The province database (`audit.ship`), connected at first use.
    Db {
        url: String,
        password: Option<String>,
        pool: tokio::sync::OnceCell<sqlx::PgPool>,
    },
}

impl UsageSource {
    /// The province database's pool, connected at first use.
    async fn pool(&self) -> Result<&sqlx::PgPool, String> {
        match self {
            UsageSource::Db {
                url,
                password,
                pool,
            } => {
                pool.get_or_try_init(|| audit::db::connect(url, password.as_deref(), 2))
                    .await
            }
            UsageSource::Local => Err("no province database (audit.ship)".into()),
        }
    }

    /// Whether this reads the province database (every replica's records).
    pub fn is_db(&self) -> bool {
        matches!(self, UsageSource::Db { .. })
    }
}

impl Gateway {
    /// This replica's own trail, indexed (the console's league table reads it whatever the
    /// usage source).
    pub fn trail_index(&self) -> Arc<audit::index::TrailIndex> {
        self.inner.trail.clone()
    }

    /// The records `q` finds where `FindUsage` reads, oldest first.
    async fn search_usage(&self, q: audit::read::Query) -> Result<Vec<serde_json::Value>, String> {
        self.search_limited(q, usize::MAX, None)
            .await
            .map(|(v, _)| v)
    }

    /// The first `limit` records `q` finds that `cut` keeps (all, without one), oldest
    /// first, and how many it kept in all (the rest are counted, not held).
    pub(crate) async fn search_limited(
        &self,
        q: audit::read::Query,
        limit: usize,
        cut: Option<audit::read::Cut>,
    ) -> Result<(Vec<serde_json::Value>, u64), String> {
        match &self.inner.usage {
            UsageSource::Local => {
                let trail = self.trail_index();
                tokio::task::spawn_blocking(move || {
                    let err = |e: std::io::Error| format!("{}: {e}", trail.dir().display());
                    let view = trail.view().map_err(err)?;
                    let (found, read) = view.search(&q, cut.as_ref(), limit).map_err(err)?;
                    Ok((found, read.matched))
                })
                .await
                .map_err(|e| e.to_string())?
            }
            db @ UsageSource::Db { .. } => {
                let (mut out, mut n) = (Vec::new(), 0u64);
                audit::db::search(db.pool().await?, &q, |v| {
                    if cut.as_ref().is_none_or(|c| c.keeps(&v)) {
                        n += 1;
                        if out.len() < limit {
                            out.push(v);
                        }
                    }
                })
                .await?;
                Ok((out, n))
            }
        }
    }

    /// The recorded calls since `since` re-decided under `candidate`, from the same trail a
    /// search reads: the province database where the replicas ship to one, else this
    /// gateway's own trail ([`crate::policy::impact`]).
    async fn impact(
        &self,
        current: Arc<Policy>,
        candidate: Arc<Policy>,
        since: time::OffsetDateTime,
    ) -> Result<crate::policy::impact::Impact, String> {
        match &self.inner.usage {
            UsageSource::Local => {
                let trail = self.trail_index();
                tokio::task::spawn_blocking(move || {
                    let view = trail
                        .view()
                        .map_err(|e| format!("{}: {e}", trail.dir().display()))?;
                    crate::policy::impact::over_index(
                        &view,
                        &current,
                        &candidate,
                        Some(since),
                        None,
                    )
                    .map_err(|e| format!("{}: {e}", trail.dir().display()))
                })
                .await
                .map_err(|e| e.to_string())?
            }
            db @ UsageSource::Db { .. } => {
                let pool = db.pool().await?;
                crate::policy::impact::over_db(pool, &current, &candidate, Some(since), None).await
            }
        }
    }
}

/// An RFC 3339 bound of the request, if given.
fn bound(v: &str, name: &str) -> Result<Option<time::OffsetDateTime>, Reject> {
    if v.is_empty() {
        return Ok(None);
    }
    time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        .map(Some)
        .map_err(|_| {
            Reject::new(
                Reason::RequestInvalid,
                format!("`{name}` must be an RFC 3339 time, e.g. 2026-12-01T00:00:00+08:00"),
            )
        })
}

impl Gateway {
    /// Search the trail `FindUsage` reads (the province database, or the local files), for
    /// the admin endpoint: `subject_id` (if any) becomes the query's subject.
    pub async fn search_trail(
        &self,
        mut q: audit::read::Query,
        subject_id: Option<&str>,
    ) -> Result<Vec<serde_json::Value>, String> {
        if let Some(id) = subject_id {
            q.subject = Some(
                self.inner
                    .audit
                    .subject_lookup(id)
                    .ok_or("the trail records no data subjects (audit.subject_key_file)")?,
            );
        }
        self.search_usage(q).await
    }

    /// [`Gateway::search_trail`], holding at most `limit` of the records `cut` keeps (a
    /// department administrator's): (those, how many it kept in all).
    pub async fn search_trail_limited(
        &self,
        mut q: audit::read::Query,
        subject_id: Option<&str>,
        limit: usize,
        cut: Option<audit::read::Cut>,
    ) -> Result<(Vec<serde_json::Value>, u64), String> {
        if let Some(id) = subject_id {
            q.subject = Some(
                self.inner
                    .audit
                    .subject_lookup(id)
                    .ok_or("the trail records no data subjects (audit.subject_key_file)")?,
            );
        }
        self.search_limited(q, limit, cut).await
    }

    /// A candidate policy's impact on the recorded calls since `since` (the change preview),
    /// read from where searches read (see [`UsageSource::impact`]); and whether that was the
    /// province database.
    pub async fn impact_of(
        &self,
        candidate: Arc<Policy>,
        since: time::OffsetDateTime,
    ) -> (Result<crate::policy::impact::Impact, String>, bool) {
        let current = self.snapshot().policy.clone();
        (
            self.impact(current, candidate, since).await,
            self.inner.usage.is_db(),
        )
    }

    /// The keyed hash a subject's id is recorded as (for an admin record of a search).
    pub fn subject_hash(&self, id: &str) -> Option<String> {
        self.inner.audit.subject_hash(id)
    }

    pub(super) async fn find_usage_inner(
        &self,
        call: &mut Call,
        req: &Request<pb::FindUsageRequest>,
    ) -> Result<pb::FindUsageResponse, Reject> {
        let who = self.authenticate(call, req).await?;
        let snap = self.snapshot();
        call.pending.rec().policy_version = snap.policy.version.clone();
        if !policy::usage::is_portal(&snap.policy, &who.id.dept, &who.id.system) {
            return Err(Reject::new(
                Reason::UsageNotPortal,
                "only the systems the policy names in `usage.portals` (the citizen portal) may ask who read a person's data",
            )
            .with_rule("usage:portals"));
        }
        let body = req.get_ref();
        let id = body.subject_id.trim();
        if id.is_empty() || id.len() > 64 || id.chars().any(char::is_control) {
            return Err(Reject::new(
                Reason::RequestInvalid,
                "`subject_id` must be the data subject's id: 1 to 64 printable characters",
            ));
        }
        let (since, until) = (bound(&body.since, "since")?, bound(&body.until, "until")?);
        let Some(subject) = call.pending.log().subject_lookup(id) else {
            return Err(Reject::new(
                Reason::UsageNotRecorded,
                "this gateway's trail records no data subjects; ask the operators (audit.subject_key_file)",
            ));
        };
        {
            let rec = call.pending.rec();
            rec.subjects = vec![subject.asked.clone()];
            rec.decision = audit::Decision::Allow;
            rec.rule = Some("usage:portal".into());
        }
        let q = audit::read::Query {
            since,
            until,
            subject: Some(subject),
            ..Default::default()
        };
        let found = self.search_usage(q).await.map_err(|e| {
            tracing::warn!(error = %e, "FindUsage: the trail could not be read");
            Reject::new(
                Reason::UsageUnavailable,
                "the audit trail cannot be read right now; try again shortly",
            )
        })?;
        let now = now_unix();
        let s = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_owned()
        };
        let accesses: Vec<pb::UsageAccess> = found
            .iter()
            .filter(|v| {
                // Data that left: an allowed Query or QueryStream (or a stream's chunk of
                // returned subjects); not refusals, not admin records, not earlier look-ups.
                let method = s(v, "method");
                let data = method == METHOD_QUERY || method == METHOD_QUERY_STREAM;
                let kind = s(v, "kind");
                let ok = s(v, "grpc_status") == "OK" || kind == "returned_subjects";
                data && ok
                    && s(v, "decision") == "allow"
                    && (kind.is_empty() || kind == "returned_subjects")
            })
            .filter(|v| {
                let a = policy::usage::Access {
                    consumer: v
                        .get("consumer_dept")
                        .and_then(|x| x.as_str())
                        .unwrap_or(""),
                    purpose: v.get("purpose").and_then(|x| x.as_str()).unwrap_or(""),
                    dataset: v.get("dataset").and_then(|x| x.as_str()).unwrap_or(""),
                };
                policy::usage::disclosed(&snap.policy, &a, now)
            })
            .map(|v| pb::UsageAccess {
                time: s(v, "time"),
                consumer_dept: s(v, "consumer_dept"),
                consumer_system: s(v, "consumer_system"),
                dataset: s(v, "dataset"),
                purpose: s(v, "purpose"),
                approval_ref: s(v, "approval_ref"),
                action: if s(v, "method") == METHOD_QUERY_STREAM {
                    "bulk read".into()
                } else {
                    "read".into()
                },
            })
            .collect();
        call.pending.rec().rows = accesses.len() as u64;
        Ok(pb::FindUsageResponse { accesses })
    }
}

#[tonic::async_trait]
impl pb::usage_server::Usage for Gateway {
    async fn find_usage(
        &self,
        req: Request<pb::FindUsageRequest>,
    ) -> Result<Response<pb::FindUsageResponse>, Status> {
        let mut call = self.begin(METHOD_FIND_USAGE, &req)?;
        let span = call.span.clone();
        let result = within(
            call.deadline,
            self.find_usage_inner(&mut call, &req).instrument(span),
        )
        .await
        .unwrap_or_else(|| Err(call.deadline_passed()));
        self.finish(call, result).await
    }
}
