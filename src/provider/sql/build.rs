//! The one `SELECT` a call becomes, as text plus bound parameters: a pure function of the
//! binding, the checked column types and the typed request, so what reaches the database can
//! be read (and tested) without one.
//!
//! Caller input never enters the SQL text: every value is a bound parameter; the only names in
//! the text are the configured table and columns, quoted. Conditions keep their literal
//! meaning on every engine:
//! - `prefix` is `LIKE` with `!` escaping `%`, `_` and `!` (no backslash: MySQL's string
//!   literals treat it specially); SQLite connections run with `case_sensitive_like`.
//! - MySQL/MariaDB compare strings with the column's collation (usually case- and
//!   trailing-space-insensitive); an exact byte comparison (`BINARY`) is added beside the
//!   indexable one, so `eq "abc"` never returns `"ABC "`.
//! - PostgreSQL text cannot hold NUL: a value containing one matches nothing (it is not sent).
//! - `null` in `eq`/`in` means "has no value": `IS NULL`.

use std::fmt::Write;

use super::types::Decoder;
use crate::provider::dataset::{Binding, Cond, Param, Test};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    MySql,
    Sqlite,
}

impl Dialect {
    pub fn quote(self, ident: &str) -> String {
        match self {
            Dialect::MySql => format!("`{ident}`"),
            Dialect::Postgres | Dialect::Sqlite => format!("\"{ident}\""),
        }
    }

    pub fn table(self, parts: &[String]) -> String {
        parts
            .iter()
            .map(|p| self.quote(p))
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// SQL text and its parameters, each with the column type it is compared to.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<(Param, Decoder)>,
}

/// What one `SELECT` reads.
#[derive(Debug)]
pub struct Select<'a> {
    pub binding: &'a Binding,
    /// The checked type of each field's column, by field position.
    pub decoders: &'a [Decoder],
    /// Field positions to select, in order (the caller's fields, plus the key for paging).
    pub columns: &'a [usize],
    pub conds: &'a [Cond],
    /// Keyset paging: rows whose key is greater than this.
    pub after: Option<&'a Param>,
    pub limit: Option<u64>,
}

struct Writer {
    dialect: Dialect,
    sql: String,
    params: Vec<(Param, Decoder)>,
}

impl Writer {
    fn bind(&mut self, p: Param, d: Decoder) {
        self.params.push((p, d));
        match self.dialect {
            Dialect::Postgres => {
                let _ = write!(self.sql, "${}", self.params.len());
            }
            Dialect::MySql | Dialect::Sqlite => self.sql.push('?'),
        }
    }

    fn push(&mut self, s: &str) {
        self.sql.push_str(s);
    }
}

/// `LIKE` pattern for "starts with `p`", escaped with `!`.
pub fn like_prefix(p: &str) -> String {
    let mut out = String::with_capacity(p.len() + 1);
    for c in p.chars() {
        if matches!(c, '!' | '%' | '_') {
            out.push('!');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// Whether the engine can hold this value at all (PostgreSQL text cannot hold NUL).
fn storable(dialect: Dialect, p: &Param) -> bool {
    match (dialect, p) {
        (Dialect::Postgres, Param::Str(s)) => !s.contains('\0'),
        _ => true,
    }
}

impl Select<'_> {
    pub fn build(&self, dialect: Dialect) -> Statement {
        let b = self.binding;
        let mut w = Writer {
            dialect,
            sql: String::with_capacity(128),
            params: Vec::new(),
        };
        w.push("SELECT ");
        for (n, &i) in self.columns.iter().enumerate() {
            if n > 0 {
                w.push(", ");
            }
            w.push(&dialect.quote(&b.fields[i].column));
        }
        w.push(" FROM ");
        w.push(&dialect.table(&b.table));
        w.push(" WHERE 1=1");
        for c in self.conds {
            w.push(" AND ");
            self.condition(&mut w, c);
        }
        let key = dialect.quote(&b.fields[b.key].column);
        if let Some(after) = self.after {
            w.push(" AND ");
            w.push(&key);
            w.push(" > ");
            w.bind(after.clone(), self.decoders[b.key]);
        }
        w.push(" ORDER BY ");
        w.push(&key);
        if let Some(n) = self.limit {
            let _ = write!(w.sql, " LIMIT {n}");
        }
        Statement {
            sql: w.sql,
            params: w.params,
        }
    }

    fn condition(&self, w: &mut Writer, c: &Cond) {
        let d = self.decoders[c.field];
        let col = w.dialect.quote(&self.binding.fields[c.field].column);
        // MySQL: an exact comparison beside the collation's (see the module docs).
        let exact = w.dialect == Dialect::MySql && d == Decoder::Text;
        match &c.test {
            Test::Eq(None) => {
                w.push(&col);
                w.push(" IS NULL");
            }
            Test::Eq(Some(p)) if !storable(w.dialect, p) => w.push("1=0"),
            Test::Eq(Some(p)) => {
                if exact {
                    w.push("(");
                    w.push(&col);
                    w.push(" = ");
                    w.bind(p.clone(), d);
                    w.push(" AND ");
                    w.push(&col);
                    w.push(" = BINARY ");
                    w.bind(p.clone(), d);
                    w.push(")");
                } else {
                    w.push(&col);
                    w.push(" = ");
                    w.bind(p.clone(), d);
                }
            }
            Test::In(values) => {
                let null = values.iter().any(Option::is_none);
                let vals: Vec<&Param> = values
                    .iter()
                    .flatten()
                    .filter(|p| storable(w.dialect, p))
                    .collect();
                let list = |w: &mut Writer, lhs: &str| {
                    w.push(lhs);
                    w.push(" IN (");
                    for (n, p) in vals.iter().enumerate() {
                        if n > 0 {
                            w.push(", ");
                        }
                        w.bind((*p).clone(), d);
                    }
                    w.push(")");
                };
                match (null, vals.is_empty()) {
                    (false, true) => w.push("1=0"),
                    (true, true) => {
                        w.push(&col);
                        w.push(" IS NULL");
                    }
                    (null, false) => {
                        w.push("(");
                        if null {
                            w.push(&col);
                            w.push(" IS NULL OR (");
                        } else {
                            w.push("(");
                        }
                        list(w, &col);
                        if exact {
                            w.push(" AND ");
                            list(w, &format!("BINARY {col}"));
                        }
                        w.push("))");
                    }
                }
            }
            Test::Prefix(p) if !storable(w.dialect, &Param::Str(p.clone())) => w.push("1=0"),
            Test::Prefix(p) => {
                let pat = Param::Str(like_prefix(p));
                w.push("(");
                w.push(&col);
                w.push(" LIKE ");
                w.bind(pat.clone(), d);
                w.push(" ESCAPE '!'");
                if exact {
                    w.push(" AND BINARY ");
                    w.push(&col);
                    w.push(" LIKE ");
                    w.bind(pat, d);
                    w.push(" ESCAPE '!'");
                }
                w.push(")");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{policy::model::FieldType, provider::dataset::FieldMap};

    fn binding() -> Binding {
        let f = |n: &str, c: &str, ty| FieldMap {
            name: n.into(),
            ty,
            column: c.into(),
        };
        Binding {
            id: "hukou.person_basic".into(),
            fields: vec![
                f("id_number", "sfzh", FieldType::String),
                f("name", "xm", FieldType::String),
                f("age", "age", FieldType::Int64),
            ],
            key: 0,
            region: None,
            source: "db".into(),
            table: vec!["hukou".into(), "person".into()],
            http: None,
        }
    }

    const DEC: &[Decoder] = &[Decoder::Text, Decoder::Text, Decoder::I32];

    fn select(conds: &[Cond], after: Option<&Param>, d: Dialect) -> Statement {
        let b = binding();
        Select {
            binding: &b,
            decoders: DEC,
            columns: &[1, 0],
            conds,
            after,
            limit: Some(11),
        }
        .build(d)
    }

    #[test]
    fn values_are_bound_never_written_into_the_text() {
        let evil = "x'; DROP TABLE person; --";
        let conds = [
            Cond {
                field: 1,
                test: Test::Eq(Some(Param::Str(evil.into()))),
            },
            Cond {
                field: 0,
                test: Test::Prefix("33%_!".into()),
            },
        ];
        let s = select(&conds, Some(&Param::Str("330".into())), Dialect::Postgres);
        assert_eq!(
            s.sql,
            r#"SELECT "xm", "sfzh" FROM "hukou"."person" WHERE 1=1 AND "xm" = $1 AND ("sfzh" LIKE $2 ESCAPE '!') AND "sfzh" > $3 ORDER BY "sfzh" LIMIT 11"#
        );
        assert!(!s.sql.contains("DROP"));
        assert_eq!(s.params[0].0, Param::Str(evil.into()));
        assert_eq!(s.params[1].0, Param::Str("33!%!_!!%".into()));
    }

    #[test]
    fn mysql_adds_an_exact_comparison_and_uses_question_marks() {
        let conds = [
            Cond {
                field: 1,
                test: Test::Eq(Some(Param::Str("abc".into()))),
            },
            Cond {
                field: 2,
                test: Test::Eq(Some(Param::I64(3))),
            },
        ];
        let s = select(&conds, None, Dialect::MySql);
        assert_eq!(
            s.sql,
            "SELECT `xm`, `sfzh` FROM `hukou`.`person` WHERE 1=1 AND (`xm` = ? AND `xm` = BINARY ?) AND `age` = ? ORDER BY `sfzh` LIMIT 11"
        );
        assert_eq!(s.params.len(), 3);
    }

    #[test]
    fn null_and_in_lists_keep_their_meaning() {
        let conds = [Cond {
            field: 1,
            test: Test::In(vec![None, Some(Param::Str("a".into()))]),
        }];
        let s = select(&conds, None, Dialect::Sqlite);
        assert!(
            s.sql.contains(r#"("xm" IS NULL OR ("xm" IN (?)))"#),
            "{}",
            s.sql
        );
        let none = [Cond {
            field: 1,
            test: Test::In(vec![]),
        }];
        assert!(select(&none, None, Dialect::Sqlite).sql.contains("AND 1=0"));
    }

    #[test]
    fn postgres_never_receives_a_nul() {
        let conds = [
            Cond {
                field: 1,
                test: Test::Eq(Some(Param::Str("a\0b".into()))),
            },
            Cond {
                field: 0,
                test: Test::In(vec![
                    Some(Param::Str("\0".into())),
                    Some(Param::Str("x".into())),
                ]),
            },
        ];
        let s = select(&conds, None, Dialect::Postgres);
        assert!(s.sql.contains("AND 1=0 AND"), "{}", s.sql);
        assert_eq!(s.params, vec![(Param::Str("x".into()), Decoder::Text)]);
        // Elsewhere NUL is an ordinary character.
        assert_eq!(select(&conds, None, Dialect::Sqlite).params.len(), 3);
    }
}
