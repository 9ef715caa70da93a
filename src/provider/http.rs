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

use super::{
    config::{self, HttpDataset, HttpPaging, InStyle},
    dataset::{Asked, Binding, Param, Test, placeholders},
    sql::{CheckError, SourceError, engine::Fault},
    token::Position,
};
use crate::{
    error::{Reason, Reject},
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

/// A request: the URL (with its query) and whether a 404 means "no such row".
#[derive(Debug, Clone, PartialEq)]
pub struct Get {
    pub url: String,
    pub not_found_is_empty: bool,
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

fn unsupported(b: &Binding, field: usize, what: &str) -> Reject {
    Reject::new(
        Reason::FilterUnsupported,
        format!(
            "this provider's service cannot filter {} by `{}` with {what}",
            b.id, b.fields[field].name
        ),
    )
}

fn text(p: &Param) -> Option<String> {
    Some(match p {
        Param::Str(s) => s.clone(),
        Param::I64(n) => n.to_string(),
        Param::F64(x) => x.to_string(),
        Param::Bool(b) => b.to_string(),
        Param::Ts(s, n) => time::OffsetDateTime::from_unix_timestamp(*s)
            .ok()?
            .replace_nanosecond((*n).clamp(0, 999_999_999) as u32)
            .ok()?
            .format(&time::format_description::well_known::Rfc3339)
            .ok()?,
        Param::Bytes(_) => return None,
    })
}

/// The GET a call becomes (pure: tested without a service).
pub fn request(
    base: &str,
    b: &Binding,
    h: &HttpDataset,
    asked: &Asked,
    pos: Option<&Position>,
    size: u32,
) -> Result<Get, Reject> {
    let mut path = h.path.clone();
    let mut used = vec![false; asked.conds.len()];
    let holes = placeholders(&h.path);
    for name in &holes {
        let found =
            asked.conds.iter().enumerate().find(|(_, c)| {
                b.fields[c.field].name == *name && matches!(c.test, Test::Eq(Some(_)))
            });
        let Some((i, c)) = found else {
            return Err(Reject::new(
                Reason::FilterUnsupported,
                format!(
                    "this provider's service is looked up by `{name}`: the call needs an `eq` condition on it"
                ),
            ));
        };
        let Test::Eq(Some(v)) = &c.test else { continue };
        let v = text(v).ok_or_else(|| unsupported(b, c.field, "a bytes value"))?;
        let enc: String = url_escape(&v);
        path = path.replace(&format!("{{{name}}}"), &enc);
        used[i] = true;
    }
    let mut url = reqwest::Url::parse(&format!("{base}{path}")).map_err(|e| {
        Reject::new(
            Reason::SourceError,
            format!("the service URL is not valid: {e}"),
        )
    })?;
    {
        let mut q = url.query_pairs_mut();
        let mut params_used = std::collections::BTreeSet::new();
        for (i, c) in asked.conds.iter().enumerate() {
            if used[i] {
                continue;
            }
            let map = h.filters.get(&b.fields[c.field].name);
            let (param, values): (&String, Vec<String>) = match &c.test {
                Test::Eq(None) => return Err(unsupported(b, c.field, "a null test")),
                Test::Eq(Some(v)) => (
                    map.and_then(|m| m.eq.as_ref())
                        .ok_or_else(|| unsupported(b, c.field, "eq"))?,
                    vec![text(v).ok_or_else(|| unsupported(b, c.field, "a bytes value"))?],
                ),
                Test::In(vs) => {
                    let m = map.and_then(|m| m.in_.as_ref().map(|p| (p, m.in_style)));
                    let (p, style) = m.ok_or_else(|| unsupported(b, c.field, "in"))?;
                    let mut out = Vec::with_capacity(vs.len());
                    for v in vs {
                        let v = v
                            .as_ref()
                            .ok_or_else(|| unsupported(b, c.field, "a null in an in list"))?;
                        let t = text(v).ok_or_else(|| unsupported(b, c.field, "a bytes value"))?;
                        if style == InStyle::Comma && t.contains(',') {
                            return Err(unsupported(
                                b,
                                c.field,
                                "a value containing a comma (the service takes comma-separated lists)",
                            ));
                        }
                        out.push(t);
                    }
                    if out.is_empty() {
                        // Nothing can match an empty list: say so without asking.
                        return Err(Reject::new(
                            Reason::RequestInvalid,
                            "an empty `in` list matches nothing",
                        ));
                    }
                    let out = if style == InStyle::Comma {
                        vec![out.join(",")]
                    } else {
                        out
                    };
                    (p, out)
                }
                Test::Prefix(p) => (
                    map.and_then(|m| m.prefix.as_ref())
                        .ok_or_else(|| unsupported(b, c.field, "prefix"))?,
                    vec![p.clone()],
                ),
            };
            if !params_used.insert(param.clone()) {
                return Err(unsupported(
                    b,
                    c.field,
                    "two conditions of one kind (the service takes one)",
                ));
            }
            for v in values {
                q.append_pair(param, &v);
            }
        }
        let n = |p: Option<&Position>| match p {
            Some(Position::Number(n)) => Some(*n),
            _ => None,
        };
        match &h.paging {
            HttpPaging::None => {}
            HttpPaging::Page {
                page_param,
                size_param,
                first,
            } => {
                q.append_pair(page_param, &n(pos).unwrap_or(*first).to_string());
                q.append_pair(size_param, &size.to_string());
            }
            HttpPaging::Offset {
                offset_param,
                limit_param,
            } => {
                q.append_pair(offset_param, &n(pos).unwrap_or(0).to_string());
                q.append_pair(limit_param, &(u64::from(size) + 1).to_string());
            }
            HttpPaging::Cursor {
                cursor_param,
                size_param,
                ..
            } => {
                if let Some(Position::Cursor(c)) = pos {
                    q.append_pair(cursor_param, c);
                }
                q.append_pair(size_param, &size.to_string());
            }
        }
    }
    let mut s = url.to_string();
    if s.ends_with('?') {
        s.pop();
    }
    Ok(Get {
        url: s,
        not_found_is_empty: !holes.is_empty(),
    })
}

fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{
        config::HttpFilter,
        dataset::{Cond, FieldMap},
    };

    fn binding(path: &str, paging: HttpPaging) -> Binding {
        let f = |n: &str, c: &str, ty| FieldMap {
            name: n.into(),
            ty,
            column: c.into(),
        };
        let filters = [
            (
                "credit_code".to_owned(),
                HttpFilter {
                    eq: Some("code".into()),
                    in_: Some("code".into()),
                    in_style: InStyle::Comma,
                    prefix: None,
                },
            ),
            (
                "region_code".to_owned(),
                HttpFilter {
                    prefix: Some("region_prefix".into()),
                    ..Default::default()
                },
            ),
        ]
        .into_iter()
        .collect();
        Binding {
            id: "market.company_registry".into(),
            fields: vec![
                f("credit_code", "creditCode", FieldType::String),
                f("region_code", "region", FieldType::String),
                f("status", "status", FieldType::String),
            ],
            key: 0,
            region: Some(1),
            source: "api".into(),
            table: vec![],
            http: Some(HttpDataset {
                path: path.into(),
                rows: "data.items".into(),
                filters,
                paging,
            }),
        }
    }

    fn asked(conds: Vec<Cond>) -> Asked {
        Asked {
            fields: vec![0, 1],
            conds,
        }
    }

    #[test]
    fn conditions_become_parameters_and_unmapped_ones_are_refused() {
        let b = binding(
            "/api/companies",
            HttpPaging::Page {
                page_param: "page".into(),
                size_param: "size".into(),
                first: 1,
            },
        );
        let h = b.http.clone().unwrap_or_else(|| unreachable!());
        let a = asked(vec![
            Cond {
                field: 0,
                test: Test::In(vec![
                    Some(Param::Str("A&B".into())),
                    Some(Param::Str("C".into())),
                ]),
            },
            Cond {
                field: 1,
                test: Test::Prefix("3301".into()),
            },
        ]);
        let g = request(
            "http://127.0.0.1:1",
            &b,
            &h,
            &a,
            Some(&Position::Number(3)),
            50,
        );
        assert_eq!(
            g.map(|g| g.url),
            Ok(
                "http://127.0.0.1:1/api/companies?code=A%26B%2CC&region_prefix=3301&page=3&size=50"
                    .to_owned()
            )
        );
        let status = asked(vec![Cond {
            field: 2,
            test: Test::Eq(Some(Param::Str("active".into()))),
        }]);
        let e = request("http://x", &b, &h, &status, None, 10)
            .err()
            .map(|r| r.reason);
        assert_eq!(e, Some(Reason::FilterUnsupported));
    }

    #[test]
    fn a_path_key_is_filled_escaped_and_required() {
        let b = binding("/api/companies/{credit_code}", HttpPaging::None);
        let h = b.http.clone().unwrap_or_else(|| unreachable!());
        let a = asked(vec![Cond {
            field: 0,
            test: Test::Eq(Some(Param::Str("../x y".into()))),
        }]);
        let g = request("http://h", &b, &h, &a, None, 10);
        assert_eq!(
            g,
            Ok(Get {
                url: "http://h/api/companies/..%2Fx%20y".into(),
                not_found_is_empty: true
            })
        );
        let e = request("http://h", &b, &h, &asked(vec![]), None, 10)
            .err()
            .map(|r| r.reason);
        assert_eq!(e, Some(Reason::FilterUnsupported));
    }
}
