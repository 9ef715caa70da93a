//! What differs between PostgreSQL, MySQL/MariaDB and SQLite once the SQL is written: how a
//! parameter is bound, how a cell is read, and what an error means. Everything else in
//! [`super`] is generic over [`Engine`].

use sqlx::{MySql, Postgres, Row as _, Sqlite, query::Query};

use super::{build::Dialect, types::Decoder};
use crate::{
    error::Reason,
    pb::{Value, value::Kind},
    provider::dataset::Param,
};

/// One SQL engine (a `sqlx` database).
pub trait Engine: sqlx::Database {
    const DIALECT: Dialect;

    fn bind<'q>(
        q: Query<'q, Self, <Self as sqlx::Database>::Arguments<'q>>,
        p: Param,
        d: Decoder,
    ) -> Query<'q, Self, <Self as sqlx::Database>::Arguments<'q>>;

    fn cell(row: &Self::Row, i: usize, d: Decoder) -> Result<Value, sqlx::Error>;
}

fn ts(secs: i64, nanos: i32) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .replace_nanosecond(nanos.clamp(0, 999_999_999) as u32)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

fn naive(secs: i64, nanos: i32) -> time::PrimitiveDateTime {
    let t = ts(secs, nanos);
    time::PrimitiveDateTime::new(t.date(), t.time())
}

fn timestamp(t: time::OffsetDateTime) -> Value {
    Value {
        kind: Some(Kind::TimestampValue(prost_types::Timestamp {
            seconds: t.unix_timestamp(),
            nanos: t.nanosecond() as i32,
        })),
    }
}

fn or_null<T>(v: Option<T>, f: impl FnOnce(T) -> Kind) -> Value {
    Value {
        kind: Some(match v {
            Some(v) => f(v),
            None => Kind::NullValue(0),
        }),
    }
}

/// Bind a parameter as the column's type (shared: every engine takes these Rust types).
macro_rules! bind_as {
    ($q:expr, $p:expr, $d:expr) => {
        match ($p, $d) {
            (Param::Str(s), _) => $q.bind(s),
            (Param::I64(n), _) => $q.bind(n),
            (Param::F64(x), _) => $q.bind(x),
            (Param::Bool(b), _) => $q.bind(b),
            (Param::Bytes(b), _) => $q.bind(b),
            (Param::Ts(s, n), Decoder::TsNaive) => $q.bind(naive(s, n)),
            (Param::Ts(s, n), _) => $q.bind(ts(s, n)),
        }
    };
}

/// Read a cell as its decoder says (shared arms; `U32` only where the engine has it).
/// Unchecked: [`super::columns_fit`] has checked the statement's column types once, on its
/// first row (they are the same for every row), instead of once per cell.
macro_rules! cell_as {
    ($row:expr, $i:expr, $d:expr, $u32:expr) => {{
        let (row, i) = ($row, $i);
        Ok(match $d {
            Decoder::Text => or_null(
                row.try_get_unchecked::<Option<String>, _>(i)?,
                Kind::StringValue,
            ),
            Decoder::I16 => or_null(row.try_get_unchecked::<Option<i16>, _>(i)?, |n| {
                Kind::Int64Value(n.into())
            }),
            Decoder::I32 => or_null(row.try_get_unchecked::<Option<i32>, _>(i)?, |n| {
                Kind::Int64Value(n.into())
            }),
            Decoder::I64 => or_null(
                row.try_get_unchecked::<Option<i64>, _>(i)?,
                Kind::Int64Value,
            ),
            Decoder::U32 => $u32(row, i)?,
            Decoder::F32 => or_null(row.try_get_unchecked::<Option<f32>, _>(i)?, |x| {
                Kind::DoubleValue(x.into())
            }),
            Decoder::F64 => or_null(
                row.try_get_unchecked::<Option<f64>, _>(i)?,
                Kind::DoubleValue,
            ),
            Decoder::Bool => or_null(
                row.try_get_unchecked::<Option<bool>, _>(i)?,
                Kind::BoolValue,
            ),
            Decoder::Bytes => or_null(row.try_get_unchecked::<Option<Vec<u8>>, _>(i)?, |b| {
                Kind::BytesValue(b.into())
            }),
            Decoder::TsTz => match row.try_get_unchecked::<Option<time::OffsetDateTime>, _>(i)? {
                Some(t) => timestamp(t),
                None => or_null(None::<()>, |_| Kind::NullValue(0)),
            },
            Decoder::TsNaive => {
                match row.try_get_unchecked::<Option<time::PrimitiveDateTime>, _>(i)? {
                    Some(t) => timestamp(t.assume_utc()),
                    None => or_null(None::<()>, |_| Kind::NullValue(0)),
                }
            }
        })
    }};
}

fn no_u32<R>(_: &R, _: usize) -> Result<Value, sqlx::Error> {
    Err(sqlx::Error::Decode(
        "unsigned integers are a MySQL type".into(),
    ))
}

/// One engine's impl: the shared binding and reading, with how it reads unsigned integers.
/// (An int column compared with an int8 parameter is fine everywhere: PostgreSQL has the
/// cross-type operators, and a narrower parameter could not hold every caller value.)
macro_rules! engine {
    ($db:ty, $dialect:expr, $u32:expr) => {
        impl Engine for $db {
            const DIALECT: Dialect = $dialect;

            fn bind<'q>(
                q: Query<'q, Self, <Self as sqlx::Database>::Arguments<'q>>,
                p: Param,
                d: Decoder,
            ) -> Query<'q, Self, <Self as sqlx::Database>::Arguments<'q>> {
                bind_as!(q, p, d)
            }

            fn cell(row: &Self::Row, i: usize, d: Decoder) -> Result<Value, sqlx::Error> {
                cell_as!(row, i, d, $u32)
            }
        }
    };
}

engine!(Postgres, Dialect::Postgres, no_u32);
engine!(Sqlite, Dialect::Sqlite, no_u32);
engine!(MySql, Dialect::MySql, |row: &sqlx::mysql::MySqlRow, i| {
    row.try_get_unchecked::<Option<u32>, _>(i)
        .map(|v| or_null(v, |n| Kind::Int64Value(n.into())))
});

/// What a source error means for the call (and its metrics `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Cannot connect, connection lost, pool exhausted, database shutting down.
    Unavailable,
    /// The statement ran past its timeout (cancelled by the database or here).
    Timeout,
    /// A column or table is gone, changed type, or is no longer readable: the dataset goes
    /// back to being checked.
    Schema,
    /// Anything else.
    Other,
}

impl Fault {
    pub fn reason(self) -> Reason {
        match self {
            Fault::Unavailable => Reason::SourceUnavailable,
            Fault::Timeout => Reason::SourceTimeout,
            Fault::Schema => Reason::SourceSchemaChanged,
            Fault::Other => Reason::SourceError,
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Fault::Unavailable => "unavailable",
            Fault::Timeout => "timeout",
            Fault::Schema => "schema",
            Fault::Other => "other",
        }
    }
}

/// Read a `sqlx` error.
pub fn classify(e: &sqlx::Error) -> Fault {
    use sqlx::Error as E;
    match e {
        E::Io(_)
        | E::Tls(_)
        | E::Protocol(_)
        | E::PoolTimedOut
        | E::PoolClosed
        | E::WorkerCrashed => Fault::Unavailable,
        E::ColumnNotFound(_)
        | E::ColumnIndexOutOfBounds { .. }
        | E::ColumnDecode { .. }
        | E::Decode(_)
        | E::TypeNotFound { .. } => Fault::Schema,
        E::Database(db) => {
            if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                return match my.number() {
                    // ER_STATEMENT_TIMEOUT (MariaDB), ER_QUERY_TIMEOUT (MySQL), query interrupted
                    1969 | 3024 | 1317 => Fault::Timeout,
                    // unknown column, no such table, SELECT denied, column denied
                    1054 | 1146 | 1142 | 1143 => Fault::Schema,
                    // server shutdown, connection killed, too many connections
                    1053 | 1927 | 1040 | 2006 | 2013 => Fault::Unavailable,
                    _ => Fault::Other,
                };
            }
            let code = db.code().unwrap_or_default();
            let msg = db.message();
            match code.as_ref() {
                // PostgreSQL: query_canceled (statement_timeout)
                "57014" => Fault::Timeout,
                // undefined column / table, insufficient privilege, datatype mismatch
                "42703" | "42P01" | "42501" | "42804" => Fault::Schema,
                // cached plan must not change result type (a column changed type)
                "0A000" => Fault::Schema,
                // admin / crash shutdown, cannot connect now, too many connections
                "57P01" | "57P02" | "57P03" | "53300" => Fault::Unavailable,
                c if c.starts_with("08") => Fault::Unavailable,
                // SQLite: SQLITE_ERROR with a schema message, BUSY, LOCKED, CANTOPEN
                "1" if msg.starts_with("no such column") || msg.starts_with("no such table") => {
                    Fault::Schema
                }
                "5" | "6" | "14" | "261" | "517" => Fault::Unavailable,
                _ => Fault::Other,
            }
        }
        _ => Fault::Other,
    }
}
