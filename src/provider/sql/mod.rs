//! A SQL source: PostgreSQL, MySQL/MariaDB or SQLite through `sqlx`, read-only by
//! construction.
//!
//! - **Read-only**: PostgreSQL sessions start with `default_transaction_read_only=on`, MySQL
//!   sessions run `SET SESSION TRANSACTION READ ONLY`, SQLite files are opened read-only with
//!   `query_only`. The DBA's `GRANT SELECT` (docs/providers.md) is the second lock.
//! - **Timeouts**: the database enforces them (`statement_timeout`, `max_statement_time` /
//!   `max_execution_time`) and so does the provider (SQLite has no server to enforce one).
//!   `Query` and `QueryStream` use separate pools with their own timeouts, so a stream of
//!   10 M rows neither needs a long `Query` timeout nor takes the connections point queries use.
//! - **Bounded pools**, connected lazily: the provider starts with its database down, and
//!   reconnects by itself when it is back.
//! - **Paging** is keyset on the key column (`key > last ORDER BY key LIMIT n+1`), never
//!   `OFFSET`; **streams** read one statement incrementally, batch by batch, as the gateway
//!   takes them (a bounded channel: the database's socket is not read faster than the gateway
//!   reads ours).
//!
//! Not here: which statement a call becomes ([`build`]) or what the engines differ in
//! ([`engine`]).

pub mod build;
pub mod engine;
pub mod types;

use std::{str::FromStr, time::Duration};

use futures_util::TryStreamExt;
use sqlx::{
    Column as _, ConnectOptions as _, Executor, MySql, Pool, Postgres, Sqlite, Statement as _,
    TypeInfo as _,
    mysql::{MySqlConnectOptions, MySqlPoolOptions},
    pool::PoolOptions,
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqlitePoolOptions},
};
use tokio::sync::mpsc;

use self::{
    build::{Dialect, Select, Statement},
    engine::{Engine, Fault, classify},
    types::Decoder,
};
use super::{
    config,
    dataset::{Asked, Binding, Param},
};
use crate::pb::{self, Row, value::Kind};

/// Why a dataset is not served after a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckError {
    /// The source cannot be reached (checked again later).
    Unavailable(String),
    /// The live schema does not fit the catalogue: each line names field and column.
    Mismatch(Vec<String>),
}

/// A failed read.
#[derive(Debug)]
pub struct SourceError {
    pub fault: Fault,
    /// For the log and the provider's own metrics; callers get a sentence without it.
    pub detail: String,
}

impl SourceError {
    fn from_sqlx(e: &sqlx::Error) -> Self {
        SourceError {
            fault: classify(e),
            detail: e.to_string(),
        }
    }

    fn timeout(after: Duration) -> Self {
        SourceError {
            fault: Fault::Timeout,
            detail: format!("no answer within {} ms", after.as_millis()),
        }
    }
}

/// One engine's two pools: point queries, and streams.
#[derive(Debug)]
struct Pair<E: sqlx::Database> {
    query: Pool<E>,
    stream: Pool<E>,
}

impl<E: sqlx::Database> Pair<E> {
    fn pool_use(&self) -> [(u32, usize); 2] {
        [
            (self.query.size(), self.query.num_idle()),
            (self.stream.size(), self.stream.num_idle()),
        ]
    }

    async fn close(&self) {
        tokio::join!(self.query.close(), self.stream.close());
    }
}

#[derive(Debug)]
enum Pools {
    Pg(Pair<Postgres>),
    My(Pair<MySql>),
    Lite(Pair<Sqlite>),
}

/// One configured database.
pub struct SqlSource {
    pub name: String,
    pools: arc_swap::ArcSwap<Pools>,
    /// New pools with the same settings (see [`SqlSource::refresh`]).
    make: Box<dyn Fn() -> Pools + Send + Sync>,
    dialect: Dialect,
    statement_timeout: Duration,
    stream_timeout: Duration,
}

impl std::fmt::Debug for SqlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlSource")
            .field("name", &self.name)
            .field("dialect", &self.dialect)
            .finish_non_exhaustive()
    }
}

/// Awaits `$f::<E>(pool, …)` with the pool of the right engine.
macro_rules! on_pool {
    ($self:expr, $which:ident, $f:ident ( $($arg:expr),* )) => {
        match &**$self.pools.load() {
            Pools::Pg(p) => $f::<Postgres>(&p.$which, $($arg),*).await,
            Pools::My(p) => $f::<MySql>(&p.$which, $($arg),*).await,
            Pools::Lite(p) => $f::<Sqlite>(&p.$which, $($arg),*).await,
        }
    };
}

impl SqlSource {
    /// Pools for `cfg`, connecting lazily (nothing is dialled here).
    pub fn open(name: &str, cfg: &config::SqlSource) -> Result<SqlSource, String> {
        let password = match &cfg.password_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| format!("sources.{name}.password_file {}: {e}", p.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            None => None,
        };
        let bad = |e: sqlx::Error| format!("sources.{name}.url: {e}");
        let connect = Duration::from_millis(cfg.connect_timeout_ms);
        let statement = Duration::from_millis(cfg.statement_timeout_ms);
        let stream = Duration::from_millis(cfg.stream_timeout_ms);
        fn sized<DB: sqlx::Database>(n: u32, connect: Duration) -> PoolOptions<DB> {
            PoolOptions::<DB>::new()
                .max_connections(n)
                .acquire_timeout(connect)
                // A ping before every call would cost each point query a round trip; a dead
                // connection fails its call with `Unavailable` instead, and that read is
                // retried once on a fresh one (see `page`).
                .test_before_acquire(false)
                .idle_timeout(Some(Duration::from_secs(300)))
        }
        let (max, streams) = (cfg.max_connections, cfg.stream_connections);
        let (make, dialect): (Box<dyn Fn() -> Pools + Send + Sync>, Dialect) =
            if cfg.url.starts_with("postgres") {
                let base = PgConnectOptions::from_str(&cfg.url)
                    .map_err(bad)?
                    .application_name("xgate-provider")
                    .disable_statement_logging();
                let base = match &password {
                    Some(p) => base.password(p),
                    None => base,
                };
                let with = move |t: Duration| {
                    base.clone().options([
                        ("default_transaction_read_only", "on".to_owned()),
                        ("statement_timeout", t.as_millis().to_string()),
                    ])
                };
                let pg = move |n, t| {
                    let o: PgPoolOptions = sized(n, connect);
                    o.connect_lazy_with(with(t))
                };
                let make = move || {
                    Pools::Pg(Pair {
                        query: pg(max, statement),
                        stream: pg(streams, stream),
                    })
                };
                (Box::new(make), Dialect::Postgres)
            } else if cfg.url.starts_with("mysql") {
                let base = MySqlConnectOptions::from_str(&cfg.url)
                    .map_err(bad)?
                    .disable_statement_logging();
                let base = match &password {
                    Some(p) => base.password(p),
                    None => base,
                };
                let my = move |n, t: Duration| {
                    let opts: MySqlPoolOptions = sized(n, connect);
                    opts.after_connect(move |conn, _| {
                        Box::pin(async move {
                            let version: String = sqlx::query_scalar("SELECT VERSION()")
                                .fetch_one(&mut *conn)
                                .await?;
                            conn.execute("SET SESSION TRANSACTION READ ONLY").await?;
                            let limit = if version.contains("MariaDB") {
                                format!("SET SESSION max_statement_time = {}", t.as_secs_f64())
                            } else {
                                format!("SET SESSION max_execution_time = {}", t.as_millis())
                            };
                            conn.execute(limit.as_str()).await?;
                            Ok(())
                        })
                    })
                    .connect_lazy_with(base.clone())
                };
                let make = move || {
                    Pools::My(Pair {
                        query: my(max, statement),
                        stream: my(streams, stream),
                    })
                };
                (Box::new(make), Dialect::MySql)
            } else {
                let opts = SqliteConnectOptions::from_str(&cfg.url)
                    .map_err(bad)?
                    .read_only(true)
                    .create_if_missing(false)
                    .pragma("query_only", "ON")
                    .pragma("case_sensitive_like", "ON")
                    .disable_statement_logging();
                let lite = move |n| {
                    let o: SqlitePoolOptions = sized(n, connect);
                    o.connect_lazy_with(opts.clone())
                };
                let make = move || {
                    Pools::Lite(Pair {
                        query: lite(max),
                        stream: lite(streams),
                    })
                };
                (Box::new(make), Dialect::Sqlite)
            };
        Ok(SqlSource {
            name: name.to_owned(),
            pools: arc_swap::ArcSwap::from_pointee(make()),
            make,
            dialect,
            statement_timeout: statement,
            stream_timeout: stream,
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Fresh pools with the same settings, after the schema changed under the old ones: their
    /// connections hold prepared statements of the old shape (PostgreSQL would answer "cached
    /// plan must not change result type"). Calls in flight finish on the old pools.
    pub fn refresh(&self) {
        self.pools.store(std::sync::Arc::new((self.make)()));
    }

    /// Check the dataset's table and columns against the live schema: a decoder per field,
    /// or every misfit named.
    pub async fn check(&self, b: &Binding) -> Result<Vec<Decoder>, CheckError> {
        let t = self.statement_timeout + Duration::from_secs(1);
        match tokio::time::timeout(t, async { on_pool!(self, query, check_on(b)) }).await {
            Ok(r) => r,
            Err(_) => Err(CheckError::Unavailable(format!(
                "no answer within {} ms",
                t.as_millis()
            ))),
        }
    }

    /// One page: up to `size` rows with a key after `after`, and the key to continue from
    /// when more follow. A connection lost under the call is retried once (a read).
    pub async fn page(
        &self,
        b: &Binding,
        decoders: &[Decoder],
        asked: &Asked,
        after: Option<&Param>,
        size: u32,
    ) -> Result<(Vec<Row>, Option<Param>), SourceError> {
        let (columns, key_at) = with_key(b, &asked.fields);
        let st = Select {
            binding: b,
            decoders,
            columns: &columns,
            conds: &asked.conds,
            after,
            limit: Some(u64::from(size) + 1),
        }
        .build(self.dialect());
        let t = self.statement_timeout + Duration::from_millis(500);
        let mut tries = 0;
        loop {
            tries += 1;
            let run = async { on_pool!(self, query, fetch_rows(st.clone(), &columns, decoders)) };
            let rows = match tokio::time::timeout(t, run).await {
                Err(_) => return Err(SourceError::timeout(t)),
                Ok(Err(e)) if tries == 1 && retryable(&e) => continue,
                Ok(Err(e)) => return Err(SourceError::from_sqlx(&e)),
                Ok(Ok(rows)) => rows,
            };
            return Ok(split_page(rows, asked.fields.len(), key_at, size));
        }
    }

    /// Every matching row, in batches of `batch`, into `tx` (as `QueryResponse`s with
    /// `columns`); ends early when the receiver goes away. Runs until done or failed.
    pub async fn stream(
        &self,
        b: &Binding,
        decoders: &[Decoder],
        asked: &Asked,
        batch: u32,
        columns: Vec<pb::Column>,
        tx: mpsc::Sender<Result<pb::QueryResponse, tonic::Status>>,
    ) -> Result<u64, SourceError> {
        let st = Select {
            binding: b,
            decoders,
            columns: &asked.fields,
            conds: &asked.conds,
            after: None,
            limit: None,
        }
        .build(self.dialect());
        let run = async {
            on_pool!(
                self,
                stream,
                stream_rows(st, decoders, &asked.fields, batch as usize, columns, tx)
            )
        };
        let t = self.stream_timeout + Duration::from_secs(1);
        match tokio::time::timeout(t, run).await {
            Err(_) => Err(SourceError::timeout(t)),
            Ok(r) => r.map_err(|e| SourceError::from_sqlx(&e)),
        }
    }

    /// (connections open, idle) of the query pool and the stream pool.
    pub fn pool_use(&self) -> [(u32, usize); 2] {
        match &**self.pools.load() {
            Pools::Pg(p) => p.pool_use(),
            Pools::My(p) => p.pool_use(),
            Pools::Lite(p) => p.pool_use(),
        }
    }

    /// Close every connection (at shutdown).
    pub async fn close(&self) {
        match &**self.pools.load() {
            Pools::Pg(p) => p.close().await,
            Pools::My(p) => p.close().await,
            Pools::Lite(p) => p.close().await,
        }
    }
}

/// A lost connection (not a refused one, nor a timeout) is worth one more try.
fn retryable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(_) | sqlx::Error::Protocol(_))
        || matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| c == "57P01" || c.starts_with("08")))
}

/// The selected columns: the caller's, plus the key (for the next page's token) when not
/// among them; and where the key is in that list.
fn with_key(b: &Binding, fields: &[usize]) -> (Vec<usize>, usize) {
    match fields.iter().position(|&f| f == b.key) {
        Some(at) => (fields.to_vec(), at),
        None => {
            let mut c = fields.to_vec();
            c.push(b.key);
            (c, fields.len())
        }
    }
}

/// Rows of `size + 1` → the page, and the key of its last row when one more followed.
fn split_page(
    mut rows: Vec<Vec<pb::Value>>,
    width: usize,
    key_at: usize,
    size: u32,
) -> (Vec<Row>, Option<Param>) {
    let more = rows.len() > size as usize;
    rows.truncate(size as usize);
    let next = if more {
        rows.last()
            .and_then(|r| r.get(key_at))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(Param::Str(s.clone())),
                Some(Kind::Int64Value(n)) => Some(Param::I64(*n)),
                _ => None,
            })
    } else {
        None
    };
    let rows = rows
        .into_iter()
        .map(|mut values| {
            values.truncate(width);
            Row { values }
        })
        .collect();
    (rows, next)
}

fn bound<'q, E: Engine>(st: &'q Statement) -> sqlx::query::Query<'q, E, E::Arguments<'q>> {
    let mut q = sqlx::query::<E>(&st.sql);
    for (p, d) in st.params.iter().cloned() {
        q = E::bind(q, p, d);
    }
    q
}

async fn fetch_rows<E: Engine>(
    pool: &Pool<E>,
    st: Statement,
    columns: &[usize],
    decoders: &[Decoder],
) -> Result<Vec<Vec<pb::Value>>, sqlx::Error>
where
    for<'c> &'c mut E::Connection: Executor<'c, Database = E>,
    for<'q> E::Arguments<'q>: sqlx::IntoArguments<'q, E>,
{
    let rows = bound::<E>(&st).fetch_all(pool).await?;
    if let Some(first) = rows.first() {
        columns_fit::<E>(first, columns, decoders)?;
    }
    rows.iter()
        .map(|r| {
            columns
                .iter()
                .enumerate()
                .map(|(i, &f)| E::cell(r, i, decoders[f]))
                .collect()
        })
        .collect()
}

async fn stream_rows<E: Engine>(
    pool: &Pool<E>,
    st: Statement,
    decoders: &[Decoder],
    fields: &[usize],
    batch: usize,
    columns: Vec<pb::Column>,
    tx: mpsc::Sender<Result<pb::QueryResponse, tonic::Status>>,
) -> Result<u64, sqlx::Error>
where
    for<'c> &'c mut E::Connection: Executor<'c, Database = E>,
    for<'q> E::Arguments<'q>: sqlx::IntoArguments<'q, E>,
{
    let mut rows = bound::<E>(&st).fetch(pool);
    let mut out = Vec::with_capacity(batch);
    let mut sent = 0u64;
    let send = |rows: Vec<Row>| pb::QueryResponse {
        columns: columns.clone(),
        rows,
        masked_columns: vec![],
        next_page_token: String::new(),
    };
    let mut checked = false;
    while let Some(r) = rows.try_next().await? {
        if !checked {
            columns_fit::<E>(&r, fields, decoders)?;
            checked = true;
        }
        let values = fields
            .iter()
            .enumerate()
            .map(|(i, &f)| E::cell(&r, i, decoders[f]))
            .collect::<Result<Vec<_>, _>>()?;
        out.push(Row { values });
        if out.len() == batch {
            sent += out.len() as u64;
            let full = std::mem::replace(&mut out, Vec::with_capacity(batch));
            if tx.send(Ok(send(full))).await.is_err() {
                return Ok(sent);
            }
        }
    }
    if !out.is_empty() {
        sent += out.len() as u64;
        let _ = tx.send(Ok(send(out))).await;
    }
    Ok(sent)
}

/// The statement's columns still have the types the check found (once per statement: the
/// cells are then read unchecked). A column that changed type since is a decode error, which
/// reads as a schema change.
fn columns_fit<E: Engine>(
    row: &E::Row,
    fields: &[usize],
    decoders: &[Decoder],
) -> Result<(), sqlx::Error> {
    use sqlx::Row as _;
    for (i, (c, &f)) in row.columns().iter().zip(fields).enumerate() {
        let want = decoders[f];
        let name = c.type_info().name();
        if types::decoder(E::DIALECT, name, want.field_type()) != Ok(want) {
            return Err(sqlx::Error::ColumnDecode {
                index: i.to_string(),
                source: format!("the column is now {name}; it was checked as {want:?}").into(),
            });
        }
    }
    Ok(())
}

async fn check_on<E: Engine + sqlx::database::HasStatementCache>(
    pool: &Pool<E>,
    b: &Binding,
) -> Result<Vec<Decoder>, CheckError>
where
    for<'c> &'c mut E::Connection: Executor<'c, Database = E>,
    for<'q> E::Arguments<'q>: sqlx::IntoArguments<'q, E>,
{
    let dialect = E::DIALECT;
    let any = vec![Decoder::Text; b.fields.len()];
    let select = |columns: &[usize]| {
        Select {
            binding: b,
            decoders: &any,
            columns,
            conds: &[],
            after: None,
            limit: Some(0),
        }
        .build(dialect)
        .sql
    };
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| CheckError::Unavailable(format!("cannot connect to the database: {e}")))?;
    // The check must see the schema as it is now, not as a cached statement remembers it.
    let _ = sqlx::Connection::clear_cached_statements(&mut *conn).await;
    let all: Vec<usize> = (0..b.fields.len()).collect();
    let sql = select(&all);
    let types: Vec<String> = match (&mut *conn).prepare(sql.as_str()).await {
        Ok(st) => st
            .columns()
            .iter()
            .map(|c| c.type_info().name().to_owned())
            .collect(),
        Err(e) if classify(&e) == Fault::Unavailable => {
            return Err(CheckError::Unavailable(e.to_string()));
        }
        Err(_) => {
            return Err(CheckError::Mismatch(
                name_missing(&mut conn, b, &select).await,
            ));
        }
    };
    // Preparing proves the columns exist; running it (no rows) proves the grant.
    if let Err(e) = sqlx::query::<E>(&sql).fetch_all(&mut *conn).await {
        return Err(match classify(&e) {
            Fault::Unavailable => CheckError::Unavailable(e.to_string()),
            _ => CheckError::Mismatch(vec![format!(
                "table `{}`: cannot be read by this user: {e} (see the GRANT SELECT in docs/providers.md)",
                b.table.join(".")
            )]),
        });
    }
    let mut errs = Vec::new();
    let mut decoders = Vec::with_capacity(b.fields.len());
    for (f, t) in b.fields.iter().zip(&types) {
        match types::decoder(dialect, t, f.ty) {
            Ok(d) => decoders.push(d),
            Err(e) => {
                errs.push(format!("field `{}`: column `{}` {e}", f.name, f.column));
                decoders.push(Decoder::Text);
            }
        }
    }
    if errs.is_empty() {
        Ok(decoders)
    } else {
        Err(CheckError::Mismatch(errs))
    }
}

/// Which of the columns (or the table) the statement could not find.
async fn name_missing<E: Engine>(
    conn: &mut sqlx::pool::PoolConnection<E>,
    b: &Binding,
    select: &(dyn Fn(&[usize]) -> String + Sync),
) -> Vec<String>
where
    for<'c> &'c mut E::Connection: Executor<'c, Database = E>,
    for<'q> E::Arguments<'q>: sqlx::IntoArguments<'q, E>,
{
    let table = b.table.join(".");
    let probe = format!("SELECT 1 FROM {} WHERE 1=0", E::DIALECT.table(&b.table));
    if let Err(e) = (&mut **conn).prepare(probe.as_str()).await {
        return vec![format!(
            "table `{table}`: not found, or not visible to this user: {e}"
        )];
    }
    let mut errs = Vec::new();
    for (i, f) in b.fields.iter().enumerate() {
        if let Err(e) = (&mut **conn).prepare(select(&[i]).as_str()).await {
            errs.push(format!(
                "field `{}`: column `{}` not found in `{table}`: {e}",
                f.name, f.column
            ));
        }
    }
    if errs.is_empty() {
        errs.push(format!(
            "table `{table}`: the statement over its columns fails"
        ));
    }
    errs
}
