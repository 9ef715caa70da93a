//! Which column types may hold which catalogue type, per engine, and how each is read: the
//! table the start-up check uses to accept a column or name why not.

use super::build::Dialect;
use crate::policy::model::FieldType;

/// How one column is read (and how a value compared with it is bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoder {
    Text,
    I16,
    I32,
    I64,
    /// MySQL unsigned integers up to 32 bits.
    U32,
    F32,
    F64,
    Bool,
    Bytes,
    /// A timestamp with a time zone (PostgreSQL `timestamptz`, MySQL `TIMESTAMP`).
    TsTz,
    /// A timestamp without one, read as UTC (PostgreSQL `timestamp`, MySQL `DATETIME`,
    /// SQLite `DATETIME` text).
    TsNaive,
}

impl Decoder {
    /// The catalogue type it reads into.
    pub fn field_type(self) -> FieldType {
        use Decoder::*;
        match self {
            Text => FieldType::String,
            I16 | I32 | I64 | U32 => FieldType::Int64,
            F32 | F64 => FieldType::Double,
            Bool => FieldType::Bool,
            Bytes => FieldType::Bytes,
            TsTz | TsNaive => FieldType::Timestamp,
        }
    }
}

/// The decoder for a column of type `sql_type` (as the driver names it) holding a catalogue
/// `ty` field, or why the two do not fit.
pub fn decoder(dialect: Dialect, sql_type: &str, ty: FieldType) -> Result<Decoder, String> {
    use Decoder::*;
    let t = sql_type.to_ascii_uppercase();
    let d = match dialect {
        Dialect::Postgres => match t.as_str() {
            "TEXT" | "VARCHAR" | "BPCHAR" | "CHAR" | "NAME" | "CITEXT" => Some(Text),
            "INT2" => Some(I16),
            "INT4" => Some(I32),
            "INT8" => Some(I64),
            "FLOAT4" => Some(F32),
            "FLOAT8" => Some(F64),
            "BOOL" => Some(Bool),
            "BYTEA" => Some(Bytes),
            "TIMESTAMPTZ" => Some(TsTz),
            "TIMESTAMP" => Some(TsNaive),
            _ => None,
        },
        Dialect::MySql => match t.as_str() {
            "VARCHAR" | "CHAR" | "TEXT" | "TINYTEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM" => {
                Some(Text)
            }
            "TINYINT" | "SMALLINT" => Some(I16),
            "INT" | "MEDIUMINT" | "TINYINT UNSIGNED" | "SMALLINT UNSIGNED"
            | "MEDIUMINT UNSIGNED" => Some(I32),
            "INT UNSIGNED" => Some(U32),
            "BIGINT" => Some(I64),
            "FLOAT" => Some(F32),
            "DOUBLE" => Some(F64),
            "BOOLEAN" => Some(Bool),
            "BLOB" | "TINYBLOB" | "MEDIUMBLOB" | "LONGBLOB" | "VARBINARY" | "BINARY" => Some(Bytes),
            "TIMESTAMP" => Some(TsTz),
            "DATETIME" => Some(TsNaive),
            _ => None,
        },
        Dialect::Sqlite => match t.as_str() {
            "TEXT" => Some(Text),
            "INTEGER" => Some(I64),
            "REAL" => Some(F64),
            "BOOLEAN" => Some(Bool),
            "BLOB" => Some(Bytes),
            "DATETIME" => Some(TsNaive),
            _ => None,
        },
    };
    let fits = |d: Decoder| match ty {
        FieldType::String => d == Text,
        FieldType::Int64 => matches!(d, I16 | I32 | I64 | U32),
        FieldType::Double => matches!(d, F32 | F64),
        FieldType::Bool => d == Bool,
        FieldType::Bytes => d == Bytes,
        FieldType::Timestamp => matches!(d, TsTz | TsNaive),
    };
    let want = format!("{ty:?}").to_lowercase();
    match d {
        Some(d) if fits(d) => Ok(d),
        Some(_) => Err(format!(
            "is {sql_type}, which cannot hold a catalogue {want} field ({})",
            accepted(dialect, ty)
        )),
        None => Err(format!(
            "is {sql_type}, a type the provider does not read ({}; convert it in a view, e.g. NUMERIC → CAST(x AS {}))",
            accepted(dialect, ty),
            if dialect == Dialect::MySql {
                "DOUBLE"
            } else {
                "double precision"
            }
        )),
    }
}

/// The column types accepted for a catalogue type, in words.
fn accepted(dialect: Dialect, ty: FieldType) -> &'static str {
    match (dialect, ty) {
        (Dialect::Postgres, FieldType::String) => "a string field needs text, varchar or char",
        (Dialect::Postgres, FieldType::Int64) => "an int64 field needs smallint, integer or bigint",
        (Dialect::Postgres, FieldType::Double) => "a double field needs real or double precision",
        (Dialect::Postgres, FieldType::Bool) => "a bool field needs boolean",
        (Dialect::Postgres, FieldType::Bytes) => "a bytes field needs bytea",
        (Dialect::Postgres, FieldType::Timestamp) => {
            "a timestamp field needs timestamptz or timestamp"
        }
        (Dialect::MySql, FieldType::String) => "a string field needs VARCHAR, CHAR or TEXT",
        (Dialect::MySql, FieldType::Int64) => "an int64 field needs TINYINT … BIGINT",
        (Dialect::MySql, FieldType::Double) => "a double field needs FLOAT or DOUBLE",
        (Dialect::MySql, FieldType::Bool) => "a bool field needs BOOLEAN (TINYINT(1))",
        (Dialect::MySql, FieldType::Bytes) => "a bytes field needs BLOB or VARBINARY",
        (Dialect::MySql, FieldType::Timestamp) => "a timestamp field needs TIMESTAMP or DATETIME",
        (Dialect::Sqlite, FieldType::String) => "a string field needs TEXT (or VARCHAR/CHAR)",
        (Dialect::Sqlite, FieldType::Int64) => "an int64 field needs INTEGER",
        (Dialect::Sqlite, FieldType::Double) => "a double field needs REAL",
        (Dialect::Sqlite, FieldType::Bool) => "a bool field needs BOOLEAN",
        (Dialect::Sqlite, FieldType::Bytes) => "a bytes field needs BLOB",
        (Dialect::Sqlite, FieldType::Timestamp) => "a timestamp field needs DATETIME",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_catalogue_types_or_say_why_not() {
        assert_eq!(
            decoder(Dialect::Postgres, "INT4", FieldType::Int64),
            Ok(Decoder::I32)
        );
        assert_eq!(
            decoder(Dialect::MySql, "BOOLEAN", FieldType::Bool),
            Ok(Decoder::Bool)
        );
        let e = decoder(Dialect::Postgres, "INT8", FieldType::String).unwrap_err();
        assert!(e.contains("is INT8") && e.contains("text, varchar"), "{e}");
        let e = decoder(Dialect::Postgres, "NUMERIC", FieldType::Double).unwrap_err();
        assert!(e.contains("does not read"), "{e}");
    }
}
