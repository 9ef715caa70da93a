//! A served dataset: the catalogue entry joined with its `provider.yaml` mapping (which
//! column or JSON member holds each field, the key that orders pages, the region column), and
//! a call's request read against it (fields → positions, conditions → typed tests).
//!
//! Everything here is checked without touching a source; what the live schema says is
//! [`super::check`]'s business.

use std::collections::BTreeSet;

use crate::{
    error::{Reason, Reject},
    pb::{self, condition::Test as PbTest, value::Kind},
    policy::{
        Policy,
        model::{Dataset, FieldType},
    },
};

use super::config::{DatasetMap, HttpDataset};

/// One catalogue field and where it is read from.
#[derive(Debug, Clone)]
pub struct FieldMap {
    /// The catalogue name (what the gateway asks for and receives).
    pub name: String,
    pub ty: FieldType,
    /// The column (SQL) or JSON member (HTTP).
    pub column: String,
}

/// A dataset as this provider serves it.
#[derive(Debug, Clone)]
pub struct Binding {
    pub id: String,
    /// Every catalogue field, in catalogue order.
    pub fields: Vec<FieldMap>,
    /// Position in `fields` of the key that orders pages.
    pub key: usize,
    /// Position in `fields` of the region field, where the dataset has one.
    pub region: Option<usize>,
    pub source: String,
    /// SQL: `[schema, ]table`.
    pub table: Vec<String>,
    pub http: Option<HttpDataset>,
}

impl Binding {
    /// Join the mapping with its catalogue entry; every problem named.
    pub fn new(
        provider: &str,
        map: &DatasetMap,
        catalogue: &Policy,
    ) -> Result<Binding, Vec<String>> {
        let id = &map.id;
        let Some(ds) = catalogue.dataset(id) else {
            return Err(vec![format!(
                "datasets.{id}: not in the catalogue (ask the data bureau to register it first)"
            )]);
        };
        let mut errs = Vec::new();
        if ds.provider != provider {
            errs.push(format!(
                "datasets.{id}: the catalogue says provider `{}` serves it, not `{provider}`",
                ds.provider
            ));
        }
        let names: BTreeSet<&str> = ds.fields.iter().map(|f| f.name.as_str()).collect();
        for f in map.columns.keys() {
            if !names.contains(f.as_str()) {
                errs.push(format!(
                    "datasets.{id}.columns.{f}: `{f}` is not a field of {id} in the catalogue"
                ));
            }
        }
        let fields: Vec<FieldMap> = ds
            .fields
            .iter()
            .map(|f| FieldMap {
                name: f.name.clone(),
                ty: f.ty,
                column: map.columns.get(&f.name).unwrap_or(&f.name).clone(),
            })
            .collect();
        if map.table.is_some() {
            for f in &fields {
                if let Err(e) = identifier(&f.column) {
                    errs.push(format!("datasets.{id}.columns.{}: {e}", f.name));
                }
            }
        }
        let key_name = map.key.as_deref().unwrap_or(&ds.subject_key);
        let key = fields.iter().position(|f| f.name == key_name);
        match key.map(|k| fields[k].ty) {
            None => errs.push(format!(
                "datasets.{id}.key: `{key_name}` is not a field of {id} in the catalogue"
            )),
            Some(FieldType::String | FieldType::Int64) => {}
            Some(t) => errs.push(format!(
                "datasets.{id}.key: `{key_name}` is a {t:?} field; the key that orders pages must be a string or int64 field (unique, never null)"
            )),
        }
        let region = region_position(ds, &fields);
        let table: Vec<String> = match &map.table {
            Some(t) => {
                let parts: Vec<String> = t.split('.').map(str::to_owned).collect();
                if parts.len() > 2 {
                    errs.push(format!(
                        "datasets.{id}.table: `{t}`: use `table` or `schema.table`"
                    ));
                }
                for p in &parts {
                    if let Err(e) = identifier(p) {
                        errs.push(format!("datasets.{id}.table: {e}"));
                    }
                }
                parts
            }
            None => Vec::new(),
        };
        if let Some(h) = &map.http {
            errs.extend(check_http(id, h, &fields, region));
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Binding {
            id: id.clone(),
            key: key.unwrap_or(0),
            region,
            fields,
            source: map.source.clone(),
            table,
            http: map.http.clone(),
        })
    }

    pub fn field(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }
}

fn region_position(ds: &Dataset, fields: &[FieldMap]) -> Option<usize> {
    let r = ds.region_field.as_deref()?;
    fields.iter().position(|f| f.name == r)
}

/// What an HTTP mapping can express, checked against what the gateway may send: a dataset
/// with row scope needs `prefix` on its region field (grants narrow rows by region prefix).
fn check_http(
    id: &str,
    h: &HttpDataset,
    fields: &[FieldMap],
    region: Option<usize>,
) -> Vec<String> {
    let mut errs = Vec::new();
    for f in h.filters.keys() {
        if !fields.iter().any(|m| &m.name == f) {
            errs.push(format!(
                "datasets.{id}.http.filters.{f}: `{f}` is not a field of {id} in the catalogue"
            ));
        }
    }
    for name in placeholders(&h.path) {
        if !fields.iter().any(|m| m.name == name) {
            errs.push(format!(
                "datasets.{id}.http.path: `{{{name}}}` is not a field of {id} in the catalogue"
            ));
        }
    }
    if !h.path.starts_with('/') {
        errs.push(format!(
            "datasets.{id}.http.path: `{}` must start with `/`",
            h.path
        ));
    }
    if let Some(r) = region {
        let name = &fields[r].name;
        if h.filters
            .get(name)
            .and_then(|f| f.prefix.as_ref())
            .is_none()
        {
            errs.push(format!(
                "datasets.{id}.http.filters.{name}: the dataset has row scope on `{name}`, so the service must take a `prefix` condition on it (add `prefix: <parameter>`); without it every row-scoped call would be refused"
            ));
        }
    }
    errs
}

/// The `{field}` names in a path template.
pub fn placeholders(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        out.push(rest[open + 1..open + close].to_owned());
        rest = &rest[open + close + 1..];
    }
    out
}

/// A table, schema or column name from the config: quoted when used, so it may hold any
/// character but the quote characters and NUL (and no caller ever supplies one).
pub fn identifier(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("an empty name".into());
    }
    if s.len() > 63 {
        return Err(format!("`{s}` is longer than 63 bytes"));
    }
    if s.chars()
        .any(|c| matches!(c, '"' | '`' | '\0' | '[' | ']') || c.is_control())
    {
        return Err(format!(
            "`{s}`: a name may not contain quotes, brackets or control characters"
        ));
    }
    Ok(())
}

/// A typed value from a condition, as the catalogue types it.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Str(String),
    I64(i64),
    F64(f64),
    Bool(bool),
    Bytes(Vec<u8>),
    /// Seconds and nanoseconds since the epoch, UTC.
    Ts(i64, i32),
}

/// One condition, typed. `None` in `Eq`/`In` is SQL NULL ("the field has no value").
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Eq(Option<Param>),
    In(Vec<Option<Param>>),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cond {
    /// Position in [`Binding::fields`].
    pub field: usize,
    pub test: Test,
}

/// The request read against the binding: the fields to return and the typed conditions.
#[derive(Debug, Clone)]
pub struct Asked {
    pub fields: Vec<usize>,
    pub conds: Vec<Cond>,
}

impl Binding {
    /// Read `req`'s fields and filter; a field not in the dataset, a value of the wrong type
    /// or a prefix on a non-string field is `INVALID_ARGUMENT` naming it.
    pub fn read(&self, req: &pb::QueryRequest, max_in: usize) -> Result<Asked, Reject> {
        let fields = if req.fields.is_empty() {
            (0..self.fields.len()).collect()
        } else {
            let mut v = Vec::with_capacity(req.fields.len());
            for f in &req.fields {
                v.push(self.field(f).ok_or_else(|| unknown_field(&self.id, f))?);
            }
            v
        };
        let mut conds = Vec::new();
        for c in req.filter.iter().flat_map(|f| &f.conditions) {
            let i = self
                .field(&c.field)
                .ok_or_else(|| unknown_field(&self.id, &c.field))?;
            let f = &self.fields[i];
            let test = match &c.test {
                None => {
                    return Err(Reject::new(
                        Reason::RequestMalformed,
                        format!(
                            "the condition on `{}` has no test (eq, in or prefix)",
                            f.name
                        ),
                    ));
                }
                Some(PbTest::Eq(v)) => Test::Eq(param(f, v)?),
                Some(PbTest::In(list)) => {
                    if list.values.len() > max_in {
                        return Err(Reject::new(
                            Reason::RequestMalformed,
                            format!(
                                "the `in` list on `{}` has {} values; at most {max_in}",
                                f.name,
                                list.values.len()
                            ),
                        ));
                    }
                    Test::In(
                        list.values
                            .iter()
                            .map(|v| param(f, v))
                            .collect::<Result<_, _>>()?,
                    )
                }
                Some(PbTest::Prefix(p)) => {
                    if f.ty != FieldType::String {
                        return Err(Reject::new(
                            Reason::RequestMalformed,
                            format!("`prefix` needs a string field; `{}` is {:?}", f.name, f.ty),
                        ));
                    }
                    Test::Prefix(p.clone())
                }
            };
            conds.push(Cond { field: i, test });
        }
        Ok(Asked { fields, conds })
    }
}

fn unknown_field(dataset: &str, f: &str) -> Reject {
    Reject::new(
        Reason::FieldUnknown,
        format!("`{f}` is not a field of {dataset}"),
    )
}

/// A condition value as the field's catalogue type; `None` for null.
fn param(f: &FieldMap, v: &pb::Value) -> Result<Option<Param>, Reject> {
    let p = match (&v.kind, f.ty) {
        (None | Some(Kind::NullValue(_)), _) => return Ok(None),
        (Some(Kind::StringValue(s)), FieldType::String) => Param::Str(s.clone()),
        (Some(Kind::Int64Value(n)), FieldType::Int64) => Param::I64(*n),
        (Some(Kind::DoubleValue(x)), FieldType::Double) => Param::F64(*x),
        (Some(Kind::Int64Value(n)), FieldType::Double) => Param::F64(*n as f64),
        (Some(Kind::BoolValue(b)), FieldType::Bool) => Param::Bool(*b),
        (Some(Kind::BytesValue(b)), FieldType::Bytes) => Param::Bytes(b.to_vec()),
        (Some(Kind::TimestampValue(t)), FieldType::Timestamp) => Param::Ts(t.seconds, t.nanos),
        (Some(_), ty) => {
            return Err(Reject::new(
                Reason::RequestMalformed,
                format!(
                    "the value for `{}` must be a {} value",
                    f.name,
                    format!("{ty:?}").to_lowercase()
                ),
            ));
        }
    };
    Ok(Some(p))
}
