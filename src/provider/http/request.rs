//! The GET a call becomes: the path template filled from `eq` conditions, every other
//! condition as the parameter its mapping names (or refused: `FILTER_UNSUPPORTED`), and the
//! paging parameters. A pure function of the binding and the typed request, tested without a
//! service.

use crate::{
    error::{Reason, Reject},
    provider::{
        config::{HttpDataset, HttpPaging, InStyle},
        dataset::{Asked, Binding, Param, Test, placeholders},
        token::Position,
    },
};

/// A request: the URL (with its query) and whether a 404 means "no such row".
#[derive(Debug, Clone, PartialEq)]
pub struct Get {
    pub url: String,
    pub not_found_is_empty: bool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        policy::model::FieldType,
        provider::{
            config::HttpFilter,
            dataset::{Cond, FieldMap},
        },
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
