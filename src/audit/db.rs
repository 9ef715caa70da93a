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
//! - `xgate_audit_searches`: every `xgate audit search --db --subject` (who, as which database
//!   user, the subject's keyed hash), written before the search runs.
//! - `xgate_audit_pruned`: where each replica's chain starts after `xgate audit prune` dropped
//!   old months (the last dropped record's seq and hash, when, by whom): `verify` holds the
//!   first remaining row to it, so a row deleted at the start is named like any other.

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
-- (No trace-id index: no search uses one, and each index costs every insert.)
DROP INDEX IF EXISTS xgate_audit_records_trace;
CREATE TABLE IF NOT EXISTS xgate_audit_checkpoints (
    replica text   NOT NULL,
    seq     bigint NOT NULL,
    line    text   NOT NULL,
    PRIMARY KEY (replica, seq)
);
CREATE TABLE IF NOT EXISTS xgate_audit_searches (
    at       timestamptz NOT NULL DEFAULT now(),
    by_user  text        NOT NULL,
    db_user  text        NOT NULL DEFAULT current_user,
    subject  text        NOT NULL
);
CREATE TABLE IF NOT EXISTS xgate_audit_pruned (
    replica      text        PRIMARY KEY,
    through_seq  bigint      NOT NULL,
    through_hash text        NOT NULL,
    before       timestamptz NOT NULL,
    pruned_at    timestamptz NOT NULL DEFAULT now(),
    pruned_by    text        NOT NULL
);
"#;

/// A record as the database keeps it.
#[derive(Debug, Clone)]
pub struct Row {
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

/// The monthly partition holding `t`: (name suffix, from, to), months in UTC (the bounds
/// are written with `+00`, whatever the server's `TimeZone`).
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
///
/// Rows go in by `COPY`, in pieces the server inserts while the next is formatted
/// (docs/benchmarks.md#shipping-the-trail-to-postgresql-issue-21). `COPY` has no `ON
/// CONFLICT`, so a batch holding a row already there (a second shipper under the same replica
/// id, or a commit whose acknowledgement was lost) fails on the key and is inserted again,
/// in a new transaction, by the `INSERT … ON CONFLICT DO NOTHING` path.
pub async fn insert(
    pool: &PgPool,
    replica: &str,
    rows: &[Row],
    checkpoints: &[(u64, String)],
    months: &mut HashSet<String>,
) -> Result<(), String> {
    let created = months.clone();
    match insert_with(pool, replica, rows, checkpoints, months, Rows::Copy).await {
        Err(e) if is_unique_violation(&e) => {
            *months = created;
            insert_with(pool, replica, rows, checkpoints, months, Rows::OnConflict)
                .await
                .map_err(db_err)
        }
        r => r.map_err(db_err),
    }
}

/// Rows per `COPY` data message.
const COPY_PIECE: usize = 200;

/// How a batch's rows go in.
#[derive(Clone, Copy, PartialEq)]
enum Rows {
    Copy,
    OnConflict,
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

async fn insert_with(
    pool: &PgPool,
    replica: &str,
    rows: &[Row],
    checkpoints: &[(u64, String)],
    months: &mut HashSet<String>,
    how: Rows,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for r in rows {
        let (name, from, to) = month_of(r.time);
        if months.contains(&name) {
            continue;
        }
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('xgate_audit_partitions'))")
            .execute(&mut *tx)
            .await?;
        let stmt = format!(
            "CREATE TABLE IF NOT EXISTS xgate_audit_records_{name} PARTITION OF xgate_audit_records FOR VALUES FROM ('{from} 00:00:00+00') TO ('{to} 00:00:00+00')"
        );
        sqlx::query(&stmt).execute(&mut *tx).await?;
        months.insert(name);
    }
    if !rows.is_empty() && how == Rows::Copy {
        let mut copy = tx
            .copy_in_raw(
                "COPY xgate_audit_records (replica, seq, time, kind, trace_id, consumer_dept, consumer_system, dataset, purpose, decision, grpc_status, prev, hash, line, subjects) FROM STDIN",
            )
            .await?;
        // In pieces: the server inserts one while the next is formatted here.
        for piece in rows.chunks(COPY_PIECE) {
            copy.send(copy_text(replica, piece)).await?;
        }
        copy.finish().await?;
    } else if !rows.is_empty() {
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
        .await?;
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
        .await?;
    }
    tx.commit().await
}

/// `rows` in `COPY … FROM STDIN`'s text format: a line per row, columns split by tabs, `\N`
/// for none, and backslash, tab, newline and carriage return escaped in every value.
fn copy_text(replica: &str, rows: &[Row]) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, v: &str) {
        for &b in v.as_bytes() {
            match b {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                _ => out.push(b),
            }
        }
    }
    fn opt(out: &mut Vec<u8>, v: &Option<String>) {
        out.push(b'\t');
        match v {
            Some(v) => put(out, v),
            None => out.extend_from_slice(b"\\N"),
        }
    }
    let mut out = Vec::with_capacity(rows.iter().map(|r| r.line.len() + 400).sum());
    for r in rows {
        put(&mut out, replica);
        out.push(b'\t');
        out.extend_from_slice(r.seq.to_string().as_bytes());
        out.push(b'\t');
        put(&mut out, &r.time.format(&Rfc3339).unwrap_or_default());
        out.push(b'\t');
        put(&mut out, &r.kind);
        for v in [
            &r.trace_id,
            &r.consumer_dept,
            &r.consumer_system,
            &r.dataset,
            &r.purpose,
            &r.decision,
            &r.grpc_status,
        ] {
            opt(&mut out, v);
        }
        for v in [&r.prev, &r.hash, &r.line] {
            out.push(b'\t');
            put(&mut out, v);
        }
        // An array literal, each element quoted (`"` and `\` escaped inside).
        out.push(b'\t');
        out.push(b'{');
        for (i, sub) in r.subjects.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let quoted = format!("\"{}\"", sub.replace('\\', "\\\\").replace('"', "\\\""));
            put(&mut out, &quoted);
        }
        out.push(b'}');
        out.push(b'\n');
    }
    out
}

/// What `prune` dropped, or would drop.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Pruned {
    /// The monthly partitions (`xgate_audit_records_y2026m01`, …).
    pub months: Vec<String>,
    /// Per replica: the last record dropped (seq), so its chain now starts one after.
    pub through: BTreeMap<String, u64>,
    pub records: u64,
}

/// Drop the monthly partitions wholly before `before` (the first of a month, UTC), in one
/// transaction, once every replica has shipped past it: a replica whose newest shipped
/// record is older than `before` could still ship into a dropped month, so it refuses
/// (naming it) unless the replica is listed in `retired` (taken out of service). Each
/// replica's new chain start is kept in `xgate_audit_pruned`, with `by`. With `dry_run`, says
/// what it would drop and changes nothing.
pub async fn prune(
    pool: &PgPool,
    before: OffsetDateTime,
    retired: &[String],
    by: &str,
    dry_run: bool,
) -> Result<Pruned, String> {
    if before.day() != 1 || before.time() != time::Time::MIDNIGHT {
        return Err("prune: --before must be the first of a month (partitions are months)".into());
    }
    let mut tx = pool.begin().await.map_err(db_err)?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('xgate_audit_partitions'))")
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
    let parts: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'xgate_audit_records' ORDER BY 1",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    let mut out = Pruned::default();
    // `yYYYYmMM` sorts as its month does: a partition is dropped when it ends by `before`.
    let (first_kept, _, _) = month_of(before);
    for name in parts {
        if let Some(month) = name.strip_prefix("xgate_audit_records_")
            && month < first_kept.as_str()
        {
            out.months.push(name);
        }
    }
    if out.months.is_empty() {
        return Ok(out);
    }
    // Every replica's newest record, its last before `before`, and its first from `before`.
    type Split = (
        String,
        OffsetDateTime,
        Option<i64>,
        Option<String>,
        Option<i64>,
    );
    let reps: Vec<Split> = sqlx::query_as(
        "SELECT r.replica, max(r.time), \
               max(r.seq) FILTER (WHERE r.time < $1), \
               (array_agg(r.hash ORDER BY r.seq DESC) FILTER (WHERE r.time < $1))[1], \
               min(r.seq) FILTER (WHERE r.time >= $1) \
             FROM xgate_audit_records r GROUP BY r.replica ORDER BY 1",
    )
    .bind(before)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_err)?;
    for (replica, newest, last_before, hash, first_after) in reps {
        if newest < before && !retired.contains(&replica) {
            return Err(format!(
                "prune: replica {replica} has shipped only up to {} (before {}): it could still ship into a month to be dropped; wait, or name it with --retired if it is out of service",
                newest.format(&Rfc3339).unwrap_or_default(),
                before.format(&Rfc3339).unwrap_or_default()
            ));
        }
        let (Some(last), Some(hash)) = (last_before, hash) else {
            continue;
        };
        if let Some(first) = first_after
            && first != last + 1
        {
            return Err(format!(
                "prune: replica {replica}'s records do not split at {} by seq (record {first} is the first after it, {last} the last before): its clock stepped back; nothing dropped",
                before.format(&Rfc3339).unwrap_or_default()
            ));
        }
        out.through.insert(replica.clone(), last as u64);
        if !dry_run {
            sqlx::query(
                "INSERT INTO xgate_audit_pruned (replica, through_seq, through_hash, before, pruned_by) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (replica) DO UPDATE SET \
                 through_seq = EXCLUDED.through_seq, through_hash = EXCLUDED.through_hash, \
                 before = EXCLUDED.before, pruned_at = now(), pruned_by = EXCLUDED.pruned_by",
            )
            .bind(&replica)
            .bind(last)
            .bind(&hash)
            .bind(before)
            .bind(by)
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
            sqlx::query("DELETE FROM xgate_audit_checkpoints WHERE replica = $1 AND seq <= $2")
                .bind(&replica)
                .bind(last)
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
    }
    for name in &out.months {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {name}"))
            .fetch_one(&mut *tx)
            .await
            .map_err(db_err)?;
        out.records += n as u64;
        if !dry_run {
            sqlx::query(&format!("DROP TABLE {name}"))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
        }
    }
    if !dry_run {
        tx.commit().await.map_err(db_err)?;
    }
    Ok(out)
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
    let pruned: BTreeMap<String, (i64, String)> = sqlx::query_as::<_, (String, i64, String)>(
        "SELECT replica, through_seq, through_hash FROM xgate_audit_pruned",
    )
    .fetch_all(pool)
    .await
    .map_err(db_err)?
    .into_iter()
    .map(|(r, s, h)| (r, (s, h)))
    .collect();
    let mut out = Vec::new();
    for replica in replicas {
        // Where the chain must start: record 1, or just after what `prune` dropped.
        let start = pruned.get(&replica).map(|(s, h)| (*s as u64, h.clone()));
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
                None => {
                    rep.first_seq = seq;
                    let (after, link) = start.clone().unwrap_or((0, String::new()));
                    if seq > after + 1 {
                        bad(format!(
                            "records {}..{} are missing (deleted, or never shipped)",
                            after + 1,
                            seq - 1
                        ));
                    } else if after > 0
                        && let Ok(row) = &parsed
                        && row.prev != link
                    {
                        bad("does not link to the last record `audit prune` dropped".into());
                    }
                }
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

/// Note a search by data subject in `xgate_audit_searches` before it runs (a search that
/// cannot be noted does not run): looking for who read a citizen's record is an access too.
/// The console and the admin API record theirs on the gateway's own chain instead.
pub async fn note_subject_search(pool: &PgPool, by: &str, subject: &str) -> Result<(), String> {
    ensure_schema(pool).await?;
    sqlx::query("INSERT INTO xgate_audit_searches (by_user, subject) VALUES ($1, $2)")
        .bind(by)
        .bind(subject)
        .execute(pool)
        .await
        .map_err(db_err)?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_reads_as_syntax() {
        let line = "{\"seq\":7,\"detail\":\"a\\\"b\\\\c\"}\tx\ny\rz";
        let row = Row {
            seq: 7,
            time: OffsetDateTime::UNIX_EPOCH,
            kind: "call".into(),
            trace_id: None,
            consumer_dept: Some("civil\taffairs".into()),
            consumer_system: None,
            dataset: None,
            purpose: None,
            decision: None,
            grpc_status: None,
            prev: "p".into(),
            hash: "h".into(),
            hash_ok: true,
            subjects: vec!["s:ab".into(), "r:odd\"one".into()],
            line: line.into(),
        };
        let text = String::from_utf8(copy_text("r\\1", &[row])).unwrap();
        let cols: Vec<&str> = text.strip_suffix('\n').unwrap().split('\t').collect();
        assert_eq!(cols.len(), 15, "{text}");
        assert_eq!(cols[0], "r\\\\1");
        assert_eq!(cols[1], "7");
        assert_eq!(cols[2], "1970-01-01T00:00:00Z");
        assert_eq!(cols[4], "\\N");
        assert_eq!(cols[5], "civil\\taffairs");
        assert_eq!(
            cols[13],
            "{\"seq\":7,\"detail\":\"a\\\\\"b\\\\\\\\c\"}\\tx\\ny\\rz"
        );
        assert_eq!(cols[14], "{\"s:ab\",\"r:odd\\\\\"one\"}");
    }
}
