//! The demo's departmental databases: SQLite files written once, on the demo's first start,
//! from the synthetic tables in [`super::provider`] — what `xgate provider` then serves, the
//! way a department's own database would be.
//!
//! The household registration table uses the column names a public-security database would
//! (`sfzh` for the id number, `xm` for the name, …): `deploy/dev/provider-public-security.yaml`
//! maps them onto the catalogue's field names.

use std::{path::Path, str::FromStr};

use sqlx::{Connection, Executor, sqlite::SqliteConnectOptions};

use super::provider::{Table, company_table, criminal_table, person_table};
use crate::pb::{FieldType, value::Kind};

/// One table to write: its name, its columns' names (in the [`Table`]'s column order), the
/// primary key column, and indexed columns.
pub struct Spec<'a> {
    pub table: &'a str,
    pub columns: &'a [&'a str],
    pub key: &'a str,
    pub indexes: &'a [&'a str],
    pub data: Table,
}

/// The household registration table's columns, as the department names them.
pub const PERSON_COLUMNS: &[&str] = &["sfzh", "xm", "xb", "csrq", "qhdm", "dz", "hz", "lxdh"];

/// Every demo database: (provider id, file name, its tables).
pub fn demo_databases() -> Vec<(&'static str, &'static str, Vec<Spec<'static>>)> {
    vec![
        (
            "public-security",
            "public-security.db",
            vec![
                Spec {
                    table: "person_basic",
                    columns: PERSON_COLUMNS,
                    key: "sfzh",
                    indexes: &["qhdm"],
                    data: person_table(2_000),
                },
                Spec {
                    table: "criminal_record",
                    columns: &["id_number", "record"],
                    key: "id_number",
                    indexes: &[],
                    data: criminal_table(),
                },
            ],
        ),
        (
            "market-supervision",
            "market-supervision.db",
            vec![Spec {
                table: "company_registry",
                columns: &[
                    "credit_code",
                    "company_name",
                    "legal_rep",
                    "legal_rep_id_number",
                    "registered_capital",
                    "status",
                    "established",
                    "region_code",
                ],
                key: "credit_code",
                indexes: &["region_code", "legal_rep_id_number"],
                data: company_table(500),
            }],
        ),
    ]
}

fn sql_type(t: i32) -> &'static str {
    match FieldType::try_from(t).unwrap_or(FieldType::String) {
        FieldType::Int64 => "INTEGER",
        FieldType::Double => "REAL",
        FieldType::Bool => "BOOLEAN",
        FieldType::Bytes => "BLOB",
        FieldType::Timestamp => "DATETIME",
        FieldType::String | FieldType::Unspecified => "TEXT",
    }
}

/// Write `path` with `specs` unless it exists. Returns whether it wrote it. Rows go in one
/// transaction through bound parameters (timestamps in the encoding the provider reads back).
pub async fn sqlite(path: &Path, specs: &[Spec<'_>]) -> Result<bool, String> {
    if path.exists() {
        return Ok(false);
    }
    let tmp = path.with_extension(format!("db-partial-{}", std::process::id()));
    let written = write(path, &tmp, specs).await;
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| true)
}

async fn write(path: &Path, tmp: &Path, specs: &[Spec<'_>]) -> Result<(), String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // Written beside, then renamed: a demo stopped half-way never leaves half a database, and
    // two demos starting at once (each its own partial file) both end with a whole one.
    let _ = std::fs::remove_file(tmp);
    let err = |e: sqlx::Error| format!("{}: {e}", tmp.display());
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", tmp.display()))
        .map_err(err)?
        .create_if_missing(true);
    let mut conn = sqlx::SqliteConnection::connect_with(&opts)
        .await
        .map_err(err)?;
    let mut tx = conn.begin().await.map_err(err)?;
    for s in specs {
        let cols: Vec<String> = s
            .columns
            .iter()
            .zip(&s.data.columns)
            .map(|(name, c)| {
                let pk = if *name == s.key {
                    " PRIMARY KEY NOT NULL"
                } else {
                    ""
                };
                format!("\"{name}\" {}{pk}", sql_type(c.r#type))
            })
            .collect();
        tx.execute(format!("CREATE TABLE \"{}\" ({})", s.table, cols.join(", ")).as_str())
            .await
            .map_err(err)?;
        for ix in s.indexes {
            tx.execute(
                format!("CREATE INDEX \"{0}_{ix}\" ON \"{0}\" (\"{ix}\")", s.table).as_str(),
            )
            .await
            .map_err(err)?;
        }
        let marks = vec!["?"; s.columns.len()].join(", ");
        let insert = format!("INSERT OR IGNORE INTO \"{}\" VALUES ({marks})", s.table);
        for row in &s.data.rows {
            let mut q = sqlx::query(&insert);
            for v in &row.values {
                q = match &v.kind {
                    Some(Kind::StringValue(x)) => q.bind(x.clone()),
                    Some(Kind::Int64Value(n)) => q.bind(*n),
                    Some(Kind::DoubleValue(x)) => q.bind(*x),
                    Some(Kind::BoolValue(b)) => q.bind(*b),
                    Some(Kind::BytesValue(b)) => q.bind(b.to_vec()),
                    Some(Kind::TimestampValue(t)) => {
                        let at = time::OffsetDateTime::from_unix_timestamp(t.seconds)
                            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
                        q.bind(time::PrimitiveDateTime::new(at.date(), at.time()))
                    }
                    Some(Kind::NullValue(_)) | None => q.bind(None::<String>),
                };
            }
            tx.execute(q).await.map_err(err)?;
        }
    }
    tx.commit().await.map_err(err)?;
    conn.close().await.map_err(err)?;
    std::fs::rename(tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}
