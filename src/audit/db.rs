//! The province's trail in PostgreSQL: its schema, the shipper's inserts ([`super::ship`]),
//! and reading it back — `xgate audit verify --db` (every replica's chain, its links and its
//! signed checkpoints; an edited, deleted or moved row named) and `audit search --db` (the
//! same filters and output as over a directory, across replicas).
//!
//! Schema (created if missing, by the first shipper that connects; docs/audit.md):
//! - `xgate_audit_records`: one row per record, `(replica, seq)` unique, its exact `line`
//!   (what `verify` re-hashes) and the columns searches filter on; partitioned by month on
//!   `time`, so retention is dropping a partition.
//!   Its `subjects` column holds every subject the record asked about (`s:…`) or returned
//!   (`r:<16 hex>`), under a GIN index: "who looked at this person" is an index look-up.
//! - `xgate_audit_checkpoints`: each replica's signed checkpoint lines.

use std::collections::{BTreeMap, HashSet};

use sha2::{Digest, Sha256};
use sqlx::{
    Row as _,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::store;

pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS xgate_audit_records (
    replica         text        NOT NULL,
    seq             bigint      NOT NULL,
    time            timestamptz NOT NULL,
    kind            text        NOT NULL,
    trace_id        text,
    consumer_dept   text,
    consumer_system text,
    dataset         text,
    purpose         text,
    decision        text,
    grpc_status     text,
    prev            text        NOT NULL,
    hash            text        NOT NULL,
    line            text        NOT NULL,
    subjects        text[]      NOT NULL DEFAULT '{}',
    PRIMARY KEY (replica, seq, time)
) PARTITION BY RANGE (time);
CREATE INDEX IF NOT EXISTS xgate_audit_records_subjects ON xgate_audit_records USING gin (subjects);
CREATE INDEX IF NOT EXISTS xgate_audit_records_consumer ON xgate_audit_records (consumer_dept, time);
CREATE INDEX IF NOT EXISTS xgate_audit_records_dataset ON xgate_audit_records (dataset, time);
CREATE INDEX IF NOT EXISTS xgate_audit_records_trace ON xgate_audit_records (trace_id);
CREATE TABLE IF NOT EXISTS xgate_audit_checkpoints (
    replica text   NOT NULL,
    seq     bigint NOT NULL,
    line    text   NOT NULL,
    PRIMARY KEY (replica, seq)
);
"#;

/// A record as the database keeps it.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub seq: u64,
    pub time: OffsetDateTime,
    pub kind: String,
    pub trace_id: Option<String>,
    pub consumer_dept: Option<String>,
    pub consumer_system: Option<String>,
    pub dataset: Option<String>,
    pub purpose: Option<String>,
    pub decision: Option<String>,
    pub grpc_status: Option<String>,
    pub prev: String,
    pub hash: String,
    /// Whether `hash` is the SHA-256 of the line it closes.
    pub hash_ok: bool,
    /// `s:…` (asked) and `r:…` (returned) subject hashes.
    pub subjects: Vec<String>,
    pub line: String,
}

/// The fields of a record line the database keeps (the rest stays in `line`), read without
/// building the whole JSON tree.
#[derive(serde::Deserialize)]
struct Fields<'a> {
    seq: u64,
    #[serde(borrow)]
    time: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    prev: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    trace_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    consumer_dept: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    consumer_system: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    dataset: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    purpose: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    decision: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    grpc_status: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    subjects: Vec<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    returned_subjects: Option<std::borrow::Cow<'a, str>>,
}

impl Row {
    pub fn from_line(line: &str) -> Result<Row, String> {
        let f: Fields<'_> =
            serde_json::from_str(line).map_err(|e| format!("not an audit record line: {e}"))?;
        let own = |v: Option<std::borrow::Cow<'_, str>>| v.map(std::borrow::Cow::into_owned);
        let seq = f.seq;
        let time = f
            .time
            .as_deref()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .ok_or_else(|| format!("record {seq}: no readable `time`"))?;
        let (hash_ok, hash) = match store::split_hash(line) {
            Some((body, stated)) => (
                hex::encode(Sha256::digest(body.as_bytes())) == stated,
                stated.to_owned(),
            ),
            None => (false, String::new()),
        };
        let mut subjects: Vec<String> = f.subjects.into_iter().map(|x| x.into_owned()).collect();
        if let Some(t) = f.returned_subjects.as_deref() {
            subjects.extend(
                t.as_bytes()
                    .chunks(16)
                    .filter(|c| c.len() == 16)
                    .map(|c| format!("r:{}", String::from_utf8_lossy(c))),
            );
        }
        Ok(Row {
            seq,
            time,
            kind: own(f.kind).unwrap_or_else(|| "call".into()),
            trace_id: own(f.trace_id),
            consumer_dept: own(f.consumer_dept),
            consumer_system: own(f.consumer_system),
            dataset: own(f.dataset),
            purpose: own(f.purpose),
            decision: own(f.decision),
            grpc_status: own(f.grpc_status),
            prev: own(f.prev).unwrap_or_default(),
            hash,
            hash_ok,
            subjects,
            line: line.to_owned(),
        })
    }
}

/// A pool to `url` (the password, if not in the URL, from `password`).
pub async fn connect(url: &str, password: Option<&str>, max: u32) -> Result<PgPool, String> {
    let mut opts: PgConnectOptions = url
        .parse()
        .map_err(|e| format!("audit database URL: {e}"))?;
    if let Some(p) = password {
        opts = opts.password(p);
    }
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(std::time::Duration::from_secs(3))
        .connect_with(opts)
        .await
        .map_err(|e| format!("audit database: {e}"))
}

/// Create the tables if missing (one shipper at a time: an advisory lock).
pub async fn ensure_schema(pool: &PgPool) -> Result<(), String> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('xgate_audit_schema'))")
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    // One statement at a time (`raw_sql(..).execute` is not `Send` enough to spawn: sqlx
    // issue 3150).
    for stmt in SCHEMA.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        sqlx::query(stmt).execute(&mut *tx).await.map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)
}

fn db_err(e: sqlx::Error) -> String {
    format!("audit database: {e}")
}

/// The last record the database holds for `replica`: (seq, hash), (0, "") for none.
pub async fn last_shipped(pool: &PgPool, replica: &str) -> Result<(u64, String), String> {
    let row = sqlx::query(
        "SELECT seq, hash FROM xgate_audit_records WHERE replica = $1 ORDER BY seq DESC LIMIT 1",
    )
    .bind(replica)
    .fetch_optional(pool)
    .await
    .map_err(db_err)?;
    Ok(match row {
        Some(r) => (
            r.try_get::<i64, _>(0).map_err(db_err)? as u64,
            r.try_get::<String, _>(1).map_err(db_err)?,
        ),
        None => (0, String::new()),
    })
}

/// The monthly partition holding `t`: (name suffix, from, to).
fn month_of(t: OffsetDateTime) -> (String, String, String) {
    let (y, m) = (t.year(), t.month() as u8);
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (
        format!("y{y:04}m{m:02}"),
        format!("{y:04}-{m:02}-01"),
        format!("{ny:04}-{nm:02}-01"),
    )
}

/// Insert a batch in one transaction, idempotently (a row already there stays as it is),
/// creating the month partitions it needs.
pub(crate) async fn insert(
    pool: &PgPool,
    replica: &str,
    rows: &[Row],
    checkpoints: &[(u64, String)],
    months: &mut HashSet<String>,
) -> Result<(), String> {
    let mut tx = pool.begin().await.map_err(db_err)?;
    for r in rows {
        let (name, from, to) = month_of(r.time);
        if months.contains(&name) {
            continue;
        }
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('xgate_audit_partitions'))")
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        let stmt = format!(
            "CREATE TABLE IF NOT EXISTS xgate_audit_records_{name} PARTITION OF xgate_audit_records FOR VALUES FROM ('{from}') TO ('{to}')"
        );
        sqlx::query(&stmt).execute(&mut *tx).await.map_err(db_err)?;
        months.insert(name);
    }
    if !rows.is_empty() {
        let col = |f: fn(&Row) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO xgate_audit_records (replica, seq, time, kind, trace_id, consumer_dept, consumer_system, dataset, purpose, decision, grpc_status, prev, hash, line, subjects) \
             SELECT $1, q, t, k, tr, cd, cs, ds, pu, de, gs, pr, h, l, string_to_array(su, ' ') \
             FROM UNNEST($2::int8[], $3::timestamptz[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::text[]) \
               AS u(q, t, k, tr, cd, cs, ds, pu, de, gs, pr, h, l, su) \
             ON CONFLICT DO NOTHING",
        )
        .bind(replica)
        .bind(rows.iter().map(|r| r.seq as i64).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.time).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.kind.clone()).collect::<Vec<_>>())
        .bind(col(|r| r.trace_id.clone()))
        .bind(col(|r| r.consumer_dept.clone()))
        .bind(col(|r| r.consumer_system.clone()))
        .bind(col(|r| r.dataset.clone()))
        .bind(col(|r| r.purpose.clone()))
        .bind(col(|r| r.decision.clone()))
        .bind(col(|r| r.grpc_status.clone()))
        .bind(rows.iter().map(|r| r.prev.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.hash.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.line.clone()).collect::<Vec<_>>())
        // (Hashes hold no spaces: one string per record, split in the database.)
        .bind(rows.iter().map(|r| r.subjects.join(" ")).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    if !checkpoints.is_empty() {
        sqlx::query(
            "INSERT INTO xgate_audit_checkpoints (replica, seq, line) \
             SELECT $1, * FROM UNNEST($2::int8[], $3::text[]) ON CONFLICT DO NOTHING",
        )
        .bind(replica)
        .bind(checkpoints.iter().map(|c| c.0 as i64).collect::<Vec<_>>())
        .bind(checkpoints.iter().map(|c| c.1.clone()).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    }
    tx.commit().await.map_err(db_err)
}

/// One replica's chain in the database, as `verify --db` found it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplicaReport {
    pub replica: String,
    pub records: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub checkpoints: u64,
    /// Records after the last checkpoint (shipped, not yet signed).
    pub unsigned_tail: u64,
    /// Everything wrong, each named (replica, seq, what).
    pub damage: Vec<String>,
}

/// Check every replica's chain in the database: each row's line hashes to its `hash`, the
/// line's own `seq` is the row's, the chain links (`prev`) and counts (`seq`) without gaps,
/// and every checkpoint's signature verifies and names a record the database holds with
/// that hash. A chain may start after seq 1 (old partitions dropped by retention): its
/// first record's `prev` is then taken as given.
pub async fn verify(pool: &PgPool, public_key: &[u8]) -> Result<Vec<ReplicaReport>, String> {
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key);
    let replicas: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT replica FROM xgate_audit_records UNION SELECT DISTINCT replica FROM xgate_audit_checkpoints ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    let mut out = Vec::new();
    for replica in replicas {
        let mut rep = ReplicaReport {
            replica: replica.clone(),
            ..ReplicaReport::default()
        };
        let mut hashes: BTreeMap<u64, String> = BTreeMap::new();
        let mut rows = sqlx::query(
            "SELECT seq, hash, line FROM xgate_audit_records WHERE replica = $1 ORDER BY seq, time",
        )
        .bind(&replica)
        .fetch(pool);
        let mut prev: Option<(u64, String)> = None;
        use futures_util::TryStreamExt;
        while let Some(r) = rows.try_next().await.map_err(db_err)? {
            let seq = r.try_get::<i64, _>(0).map_err(db_err)? as u64;
            let stated: String = r.try_get(1).map_err(db_err)?;
            let line: String = r.try_get(2).map_err(db_err)?;
            rep.records += 1;
            let mut bad = |what: String| {
                rep.damage
                    .push(format!("replica {replica}: record {seq}: {what}"))
            };
            let parsed = Row::from_line(&line);
            match &parsed {
                Err(e) => bad(format!("its line is not a record ({e})")),
                Ok(row) if row.seq != seq => bad(format!(
                    "the row holds the line of record {} (rows moved or reordered)",
                    row.seq
                )),
                Ok(row) if !row.hash_ok || row.hash != stated => {
                    bad("edited: its line does not hash to its hash".into())
                }
                Ok(_) => {}
            }
            match &prev {
                None => rep.first_seq = seq,
                Some((p, _)) if seq == *p => bad("appears twice".into()),
                Some((p, _)) if seq != p + 1 => bad(format!(
                    "records {}..{} are missing (deleted)",
                    p + 1,
                    seq - 1
                )),
                Some((_, ph)) => {
                    if let Ok(row) = &parsed
                        && row.prev != *ph
                    {
                        bad("does not link to the record before it (`prev`)".into());
                    }
                }
            }
            rep.last_seq = seq;
            hashes.insert(seq, stated.clone());
            prev = Some((seq, stated));
        }
        drop(rows);
        let cps: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, line FROM xgate_audit_checkpoints WHERE replica = $1 ORDER BY seq",
        )
        .bind(&replica)
        .fetch_all(pool)
        .await
        .map_err(db_err)?;
        let mut last_signed = 0;
        for (seq, line) in cps {
            let seq = seq as u64;
            rep.checkpoints += 1;
            let mut bad = |what: String| {
                rep.damage
                    .push(format!("replica {replica}: checkpoint {seq}: {what}"))
            };
            let Ok(c) = serde_json::from_str::<store::CheckpointLine>(&line) else {
                bad("unreadable".into());
                continue;
            };
            let signed = store::checkpoint_message(&c.checkpoint)
                .ok()
                .and_then(|m| {
                    use base64::Engine;
                    let sig = base64::engine::general_purpose::STANDARD
                        .decode(&c.sig)
                        .ok()?;
                    key.verify(&m, &sig).ok()
                })
                .is_some();
            if !signed {
                bad("its signature does not verify".into());
                continue;
            }
            match hashes.get(&c.checkpoint.seq) {
                Some(h) if *h == c.checkpoint.hash => last_signed = last_signed.max(seq),
                Some(_) => bad(format!(
                    "signs record {} with another hash than the database holds",
                    c.checkpoint.seq
                )),
                None if c.checkpoint.seq >= rep.first_seq && c.checkpoint.seq <= rep.last_seq => {
                    bad(format!(
                        "signs record {}, which is missing",
                        c.checkpoint.seq
                    ))
                }
                None => {}
            }
        }
        rep.unsigned_tail = rep
            .last_seq
            .saturating_sub(last_signed.max(rep.first_seq.saturating_sub(1)));
        out.push(rep);
    }
    Ok(out)
}

/// Records across replicas that match `q`, oldest first, each with a `replica` field added:
/// filtered in the database by its indexed columns (and the subject index), then by the same
/// [`super::read::Query::matches`] as a directory search, each call once.
pub async fn search(
    pool: &PgPool,
    q: &super::read::Query,
    mut each: impl FnMut(serde_json::Value),
) -> Result<u64, String> {
    let since = q.since.unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let until = q
        .until
        .unwrap_or_else(|| OffsetDateTime::now_utc() + time::Duration::days(3650));
    let subjects: Vec<String> = q
        .subject
        .as_ref()
        .map(|s| vec![s.asked.clone(), format!("r:{:016x}", s.returned)])
        .unwrap_or_default();
    let sql = "SELECT r.replica, r.line FROM xgate_audit_records r \
         WHERE r.time >= $1 AND r.time < $2 \
           AND ($3::text IS NULL OR r.consumer_dept = $3) \
           AND ($4::text IS NULL OR r.dataset = $4) \
           AND (cardinality($5::text[]) = 0 OR r.subjects && $5::text[]) \
         ORDER BY r.time, r.replica, r.seq";
    let mut rows = sqlx::query_as::<_, (String, String)>(sql)
        .bind(since)
        .bind(until)
        .bind(q.consumer.clone())
        .bind(q.dataset.clone())
        .bind(subjects)
        .fetch(pool);
    let mut seen = HashSet::new();
    let mut n = 0;
    use futures_util::TryStreamExt;
    while let Some((replica, line)) = rows.try_next().await.map_err(db_err)? {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        // Which replica's trail it is from (not part of the record's line).
        if let Some(o) = v.as_object_mut() {
            o.insert("replica".into(), serde_json::Value::String(replica));
        }
        if !q.matches(&v) {
            continue;
        }
        if q.subject.is_some()
            && let Some(t) = v.get("trace_id").and_then(|x| x.as_str())
            && !seen.insert(t.to_owned())
        {
            continue;
        }
        n += 1;
        each(v);
    }
    Ok(n)
}
