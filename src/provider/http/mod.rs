//! An HTTP/JSON source: an existing REST service the department already runs.
//!
//! A call becomes one GET (a page) or a run of GETs (a stream): the path template filled from
//! `eq` conditions (`/persons/{id_number}`), each other condition as the query parameter
//! `filters` maps it to, paging as `paging` says. A condition with no parameter is refused
//! (`FILTER_UNSUPPORTED`), never dropped; and since a service may ignore a parameter it does
//! not know, every returned row is checked against the conditions before it leaves (only the
//! rows of the page: the filtering itself is the service's).
//!
//! Cells are read as the catalogue types them: a JSON string for a string field, an integer for
//! int64, a number for double, `true`/`false`, RFC 3339 text (or epoch seconds) for a
//! timestamp, base64 for bytes; a missing member or `null` is null. Anything else is
//! `SOURCE_SCHEMA_CHANGED` naming the field.

use std::time::Duration;

use base64::Engine as _;
use serde_json::Value as Json;
use tokio::sync::mpsc;

mod request;

pub use self::request::{Get, request};

use super::{
    config::{self, HttpDataset, HttpPaging},
    dataset::{Asked, Binding, Param, Test, placeholders},
    sql::{CheckError, SourceError, engine::Fault},
    token::Position,
};
use crate::{
    error::Reject,
    pb::{self, Row, Value, value::Kind},
    policy::model::FieldType,
};

#[derive(Debug, Clone)]
pub struct HttpSource {
    pub name: String,
    client: reqwest::Client,
    base: String,
    bearer: Option<String>,
    max_rows: usize,
}

fn fault(e: &reqwest::Error) -> SourceError {
    let fault = if e.is_timeout() {
        Fault::Timeout
    } else if e.is_connect() || e.is_request() {
        Fault::Unavailable
    } else if e.is_decode() {
        Fault::Schema
    } else {
        Fault::Other
    };
    SourceError {
        fault,
        detail: e.to_string(),
    }
}

fn schema(detail: String) -> SourceError {
    SourceError {
        fault: Fault::Schema,
        detail,
    }
}

impl HttpSource {
    pub fn open(
        name: &str,
        cfg: &config::HttpSource,
        max_rows: usize,
    ) -> Result<HttpSource, String> {
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms.min(3_000)))
            .user_agent("xgate-provider")
            .pool_max_idle_per_host(16);
        if let Some(ca) = &cfg.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("sources.{name}.ca {}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("sources.{name}.ca {}: {e}", ca.display()))?;
            b = b.add_root_certificate(cert);
        }
        let bearer = match &cfg.bearer_token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| format!("sources.{name}.bearer_token_file {}: {e}", p.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(HttpSource {
            name: name.to_owned(),
            client: b.build().map_err(|e| format!("sources.{name}: {e}"))?,
            base: cfg.base_url.trim_end_matches('/').to_owned(),
            bearer,
            max_rows,
        })
    }

    async fn get(&self, g: &Get) -> Result<Option<Json>, SourceError> {
        let mut rq = self.client.get(&g.url).header("accept", "application/json");
        if let Some(t) = &self.bearer {
            rq = rq.bearer_auth(t);
        }
        let resp = rq.send().await.map_err(|e| fault(&e))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND && g.not_found_is_empty {
            return Ok(None);
        }
        if !status.is_success() {
            let fault = if status.is_server_error() || status.as_u16() == 429 {
                Fault::Unavailable
            } else {
                Fault::Other
            };
            return Err(SourceError {
                fault,
                detail: format!("HTTP {status} from the service"),
            });
        }
        resp.json::<Json>().await.map(Some).map_err(|e| fault(&e))
    }

    /// Probe with a one-row request (unless the path needs a key): reachable, and the first
    /// row (if any) has the catalogue's types.
    pub async fn check(&self, b: &Binding) -> Result<(), CheckError> {
        let Some(h) = &b.http else {
            return Err(CheckError::Mismatch(vec!["no `http` mapping".into()]));
        };
        if !placeholders(&h.path).is_empty() {
            return Ok(());
        }
        let all: Vec<usize> = (0..b.fields.len()).collect();
        let asked = Asked {
            fields: all,
            conds: vec![],
        };
        let g = request(&self.base, b, h, &asked, None, 1)
            .map_err(|e| CheckError::Mismatch(vec![e.message]))?;
        match self.get(&g).await {
            Ok(body) => {
                let rows =
                    rows_of(body.as_ref(), h).map_err(|e| CheckError::Mismatch(vec![e.detail]))?;
                if let Some(first) = rows.first() {
                    read_row(b, &asked.fields, first)
                        .map_err(|e| CheckError::Mismatch(vec![e.detail]))?;
                }
                Ok(())
            }
            Err(e) if e.fault == Fault::Unavailable || e.fault == Fault::Timeout => {
                Err(CheckError::Unavailable(e.detail))
            }
            Err(e) => Err(CheckError::Mismatch(vec![e.detail])),
        }
    }

    /// One page and where the next one starts.
    pub async fn page(
        &self,
        b: &Binding,
        asked: &Asked,
        pos: Option<&Position>,
        size: u32,
    ) -> Result<Result<(Vec<Row>, Option<Position>), Reject>, SourceError> {
        let Some(h) = &b.http else {
            return Err(schema("no `http` mapping".into()));
        };
        let g = match request(&self.base, b, h, asked, pos, size) {
            Ok(g) => g,
            Err(r) => return Ok(Err(r)),
        };
        let body = self.get(&g).await?;
        let items = rows_of(body.as_ref(), h)?;
        let next_cursor = match (&h.paging, &body) {
            (HttpPaging::Cursor { next, .. }, Some(body)) => at_path(body, next)
                .and_then(Json::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            _ => None,
        };
        let size = size as usize;
        let (items, next) = match &h.paging {
            HttpPaging::None => {
                if items.len() > self.max_rows {
                    return Err(SourceError {
                        fault: Fault::Other,
                        detail: format!(
                            "the service answered {} rows at once; without paging at most {}",
                            items.len(),
                            self.max_rows
                        ),
                    });
                }
                let from = match pos {
                    Some(Position::Number(n)) => *n as usize,
                    _ => 0,
                };
                let end = (from + size).min(items.len());
                let next = (end < items.len()).then_some(Position::Number(end as u64));
                (items.get(from..end).unwrap_or_default().to_vec(), next)
            }
            HttpPaging::Page { first, .. } => {
                let page = match pos {
                    Some(Position::Number(n)) => *n,
                    _ => *first,
                };
                let next = (items.len() >= size).then_some(Position::Number(page + 1));
                (items, next)
            }
            HttpPaging::Offset { .. } => {
                let off = match pos {
                    Some(Position::Number(n)) => *n,
                    _ => 0,
                };
                let more = items.len() > size;
                let mut items = items;
                items.truncate(size);
                (items, more.then_some(Position::Number(off + size as u64)))
            }
            HttpPaging::Cursor { .. } => (items, next_cursor.map(Position::Cursor)),
        };
        let mut rows = Vec::with_capacity(items.len());
        for item in &items {
            let values = read_row(b, &asked.fields, item)?;
            if !matches_all(b, asked, &values, item)? {
                return Err(SourceError {
                    fault: Fault::Other,
                    detail: "the service returned a row that does not match the conditions sent (does it really take every mapped parameter?)".into(),
                });
            }
            rows.push(Row { values });
        }
        Ok(Ok((rows, next)))
    }

    /// Every page, in batches, into `tx`.
    pub async fn stream(
        &self,
        b: &Binding,
        asked: &Asked,
        batch: u32,
        columns: Vec<pb::Column>,
        tx: mpsc::Sender<Result<pb::QueryResponse, tonic::Status>>,
    ) -> Result<Result<u64, Reject>, SourceError> {
        let mut pos = None;
        let mut sent = 0u64;
        loop {
            let (rows, next) = match self.page(b, asked, pos.as_ref(), batch).await? {
                Ok(p) => p,
                Err(r) => return Ok(Err(r)),
            };
            sent += rows.len() as u64;
            if !rows.is_empty() {
                let msg = pb::QueryResponse {
                    columns: columns.clone(),
                    rows,
                    masked_columns: vec![],
                    next_page_token: String::new(),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return Ok(Ok(sent));
                }
            }
            match next {
                Some(n) => pos = Some(n),
                None => return Ok(Ok(sent)),
            }
        }
    }
}

fn at_path<'a>(v: &'a Json, path: &str) -> Option<&'a Json> {
    if path.is_empty() {
        return Some(v);
    }
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn rows_of(body: Option<&Json>, h: &HttpDataset) -> Result<Vec<Json>, SourceError> {
    let Some(body) = body else {
        return Ok(vec![]);
    };
    match at_path(body, &h.rows) {
        Some(Json::Array(a)) => Ok(a.clone()),
        Some(o @ Json::Object(_)) => Ok(vec![o.clone()]),
        Some(Json::Null) | None if !h.rows.is_empty() => Ok(vec![]),
        _ => Err(schema(format!(
            "the answer has no row array at `{}`",
            if h.rows.is_empty() {
                "(the top)"
            } else {
                &h.rows
            }
        ))),
    }
}

fn cell(f: &super::dataset::FieldMap, v: Option<&Json>) -> Result<Value, SourceError> {
    let bad = |what: &str| {
        schema(format!(
            "field `{}`: member `{}` is {what}; the catalogue says {:?}",
            f.name, f.column, f.ty
        ))
    };
    let kind = match (f.ty, v) {
        (_, None | Some(Json::Null)) => Kind::NullValue(0),
        (FieldType::String, Some(Json::String(s))) => Kind::StringValue(s.clone()),
        (FieldType::Int64, Some(Json::Number(n))) => {
            Kind::Int64Value(n.as_i64().ok_or_else(|| bad("not an integer"))?)
        }
        (FieldType::Double, Some(Json::Number(n))) => {
            Kind::DoubleValue(n.as_f64().ok_or_else(|| bad("not a number"))?)
        }
        (FieldType::Bool, Some(Json::Bool(b))) => Kind::BoolValue(*b),
        (FieldType::Bytes, Some(Json::String(s))) => Kind::BytesValue(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|_| bad("not base64"))?,
        ),
        (FieldType::Timestamp, Some(Json::String(s))) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| bad("not RFC 3339 time"))?;
            Kind::TimestampValue(prost_types::Timestamp {
                seconds: t.unix_timestamp(),
                nanos: t.nanosecond() as i32,
            })
        }
        (FieldType::Timestamp, Some(Json::Number(n))) => {
            Kind::TimestampValue(prost_types::Timestamp {
                seconds: n.as_i64().ok_or_else(|| bad("not whole seconds"))?,
                nanos: 0,
            })
        }
        (_, Some(Json::String(_))) => return Err(bad("a string")),
        (_, Some(Json::Number(_))) => return Err(bad("a number")),
        (_, Some(Json::Bool(_))) => return Err(bad("a boolean")),
        (_, Some(_)) => return Err(bad("an array or object")),
    };
    Ok(Value { kind: Some(kind) })
}

fn read_row(b: &Binding, fields: &[usize], item: &Json) -> Result<Vec<Value>, SourceError> {
    if !item.is_object() {
        return Err(schema("a row is not a JSON object".into()));
    }
    fields
        .iter()
        .map(|&i| {
            let f = &b.fields[i];
            cell(f, item.get(&f.column))
        })
        .collect()
}

/// Whether a returned row satisfies every condition (on the fields it was asked for, or
/// read from the row for the others).
fn matches_all(
    b: &Binding,
    asked: &Asked,
    _values: &[Value],
    item: &Json,
) -> Result<bool, SourceError> {
    for c in &asked.conds {
        let f = &b.fields[c.field];
        let v = cell(f, item.get(&f.column))?;
        let same = |p: &Option<Param>| match (p, &v.kind) {
            (None, Some(Kind::NullValue(_))) => true,
            (Some(Param::Str(a)), Some(Kind::StringValue(x))) => a == x,
            (Some(Param::I64(a)), Some(Kind::Int64Value(x))) => a == x,
            (Some(Param::F64(a)), Some(Kind::DoubleValue(x))) => a == x,
            (Some(Param::Bool(a)), Some(Kind::BoolValue(x))) => a == x,
            (Some(Param::Ts(s, n)), Some(Kind::TimestampValue(t))) => {
                *s == t.seconds && *n == t.nanos
            }
            (Some(Param::Bytes(a)), Some(Kind::BytesValue(x))) => {
                a.as_slice() == x.as_ref() as &[u8]
            }
            _ => false,
        };
        let ok = match &c.test {
            Test::Eq(p) => same(p),
            Test::In(ps) => ps.iter().any(same),
            Test::Prefix(p) => {
                matches!(&v.kind, Some(Kind::StringValue(s)) if s.starts_with(p.as_str()))
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}
