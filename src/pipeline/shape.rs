//! Stage `shape`: what leaves for the caller is what the permit allows, whatever the
//! provider sent: permitted columns in the permit's order, masks applied, out-of-scope rows
//! dropped, malformed cells refused. Pure over the response bytes ([`wire`]).

use super::*;

/// A provider response after the gateway enforced the permit on it.
pub(super) struct Shaped {
    pub(super) response: wire::QueryResponse,
    /// Rows the provider sent outside the caller's row scope, dropped here.
    pub(super) withheld: u64,
    pub(super) returned: Vec<std::sync::Arc<str>>,
    pub(super) masked: Vec<std::sync::Arc<str>>,
    /// Returned-subject hashes of the rows kept ([`audit::subjects`]).
    pub(super) subjects: Vec<u64>,
}

/// Where the rows' subjects are read from, and the key they are hashed with: the dataset's
/// subject-key column (asked of the provider whether or not the caller reads it).
#[derive(Clone, Copy)]
pub(super) struct Tap<'a> {
    pub(super) field: &'a str,
    pub(super) key: audit::subjects::ReturnedKey,
}

/// Stage `shape`: keep only permitted columns, in the permit's order, and apply masks.
///
/// Works on encoded cells ([`wire`]): a permitted, unmasked cell leaves as the bytes the
/// provider sent once checked to be a well-formed `Value`; masked cells and the cell a row
/// scope reads are decoded. A cell that is not a valid `Value` fails the call. Rows are
/// written in their final encoding, in one buffer.
pub(super) fn shape(
    resp: wire::QueryResponse,
    permit: &Permit,
    key: &MaskKey,
    provider: &str,
    tap: Option<Tap<'_>>,
) -> Result<Shaped, Reject> {
    let wire::QueryResponse {
        mut columns,
        rows,
        next_page_token,
        ..
    } = resp;
    let malformed = || {
        Reject::new(
            Reason::ProviderResponseInvalid,
            format!(
                "the provider `{provider}` returned a malformed response; the operators have been told"
            ),
        )
    };
    let width = columns.len();
    // Row scope: the region column must be there to check every row against the scope.
    let scope = match &permit.scope {
        None => None,
        Some(sc) => match columns.iter().position(|c| c.name == sc.field) {
            Some(i) => Some((i, sc)),
            None => {
                tracing::warn!(%provider, field = %sc.field, "provider omitted the region field needed for a row scope");
                return Err(malformed());
            }
        },
    };
    // Whose rows these are: the subject-key column must be there too.
    let tap = match tap {
        None => None,
        Some(t) => match columns.iter().position(|c| c.name == t.field) {
            Some(i) => Some((i, t.key)),
            None => {
                tracing::warn!(%provider, field = %t.field, "provider omitted the subject-key field the audit trail records");
                return Err(malformed());
            }
        },
    };
    // (output position) -> (provider column index, mask). The provider's column descriptors
    // move into the response (each is named once in `permit.fields`); the names the record
    // keeps are the policy's own, shared.
    let mut plan: Vec<(usize, Mask)> = Vec::with_capacity(permit.fields.len());
    let mut out_cols = Vec::with_capacity(permit.fields.len());
    let mut returned = Vec::with_capacity(permit.fields.len());
    let mut masked = Vec::new();
    for f in &permit.fields {
        if let Some(i) = columns.iter().position(|c| *c.name == *f.name) {
            let mut col = std::mem::take(&mut columns[i]);
            if let Mask::Keep { .. } | Mask::Hash = f.mask {
                col.r#type = pb::FieldType::String as i32;
            }
            plan.push((i, f.mask));
            out_cols.push(col);
            returned.push(f.name.clone());
            if !f.mask.is_none() {
                masked.push(f.name.clone());
            }
        }
    }
    let rows = match rows {
        wire::Rows::Received(rows) => rows,
        // Only responses decoded from a provider reach here.
        wire::Rows::Encoded { .. } => return Err(malformed()),
    };
    let mut out = wire::RowWriter::with_capacity(rows.iter().map(|r| r.len() + 4).sum());
    let mut subjects = Vec::with_capacity(if tap.is_some() { rows.len() } else { 0 });
    let mut dropped = 0usize;
    let mut cells = Vec::with_capacity(width);
    for (r, row) in rows.iter().enumerate() {
        if !wire::cells(row, &mut cells) || cells.len() != width {
            tracing::warn!(%provider, row = r, got = cells.len(), want = width, "provider row malformed or of the wrong width");
            return Err(malformed());
        }
        if let Some((i, sc)) = scope {
            let Some(v) = wire::decode_cell(&row[cells[i].clone()]) else {
                tracing::warn!(%provider, row = r, "provider sent a cell that is not a Value");
                return Err(malformed());
            };
            if !sc.admits(&v) {
                dropped += 1;
                continue;
            }
        }
        if let Some((i, k)) = tap {
            let Some(v) = wire::decode_cell(&row[cells[i].clone()]) else {
                tracing::warn!(%provider, row = r, "provider sent a cell that is not a Value");
                return Err(malformed());
            };
            if let Some(id) = v.as_text() {
                subjects.push(k.hash(&id));
            }
        }
        for &(i, mask) in &plan {
            if !out.cell(&row[cells[i].clone()], mask, key) {
                tracing::warn!(%provider, row = r, "provider sent a cell that is not a Value");
                return Err(malformed());
            }
        }
        out.end_row();
    }
    if dropped > 0 {
        // The provider ignored the (narrowed) filter: worth an operator's attention.
        tracing::warn!(%provider, dropped, scope = %permit.scope.as_ref().map(|s| s.label.as_str()).unwrap_or(""), "dropped out-of-scope rows");
    }
    Ok(Shaped {
        response: wire::QueryResponse {
            columns: out_cols,
            rows: out.finish(),
            masked_columns: masked.iter().map(|m| m.to_string()).collect(),
            next_page_token,
        },
        returned,
        masked,
        subjects,
        withheld: dropped as u64,
    })
}

/// Note what a shaped response returns in the call's record; the response goes on.
pub(super) fn record_rows(rec: &mut AuditRecord, s: Shaped) -> wire::QueryResponse {
    rec.rows_withheld = s.withheld;
    rec.fields_returned = s.returned;
    rec.fields_masked = s.masked;
    rec.rows = s.response.rows.len() as u64;
    rec.returned_subjects.clear();
    rec.returned_subjects.extend(s.subjects);
    s.response
}

#[cfg(test)]
mod tests {
    //! `shape` on encoded rows: what the caller gets, and what a lying provider gets.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use prost::Message;

    use super::*;
    use crate::policy::{PermittedField, RateLimit, scope::Scope};

    fn permit(fields: &[(&str, Mask)], scope: Option<Scope>) -> Permit {
        Permit {
            rule: "grant:test".into(),
            grant_id: Some("test".into()),
            approval_ref: None,
            fields: fields
                .iter()
                .map(|(n, m)| PermittedField {
                    name: (*n).into(),
                    mask: *m,
                })
                .collect(),
            rate_limit: RateLimit {
                per_second: 1.0,
                burst: 1,
            },
            purposes: Arc::from([]),
            scope: scope.map(Arc::new),
            daily_quota: None,
        }
    }

    fn col(name: &str) -> pb::Column {
        pb::Column {
            name: name.into(),
            r#type: pb::FieldType::String as i32,
        }
    }

    /// A provider response as it arrives: encoded by the provider, decoded into wire types.
    fn arrives(resp: &pb::QueryResponse) -> wire::QueryResponse {
        wire::QueryResponse::decode(resp.encode_to_vec().as_slice()).unwrap()
    }

    fn delivered(s: Shaped) -> pb::QueryResponse {
        pb::QueryResponse::decode(s.response.encode_to_vec().as_slice()).unwrap()
    }

    fn provider_reply() -> pb::QueryResponse {
        let row = |id: &str, name: &str, region: &str| pb::Row {
            values: vec![
                pb::Value::string(id),
                pb::Value::string(name),
                pb::Value::string(region),
            ],
        };
        pb::QueryResponse {
            columns: vec![col("id_number"), col("name"), col("region_code")],
            rows: vec![
                row("330102199001011234", "张三", "330106"),
                row("330102199202022345", "李四", "330108"),
            ],
            masked_columns: vec![],
            next_page_token: "p2".into(),
        }
    }

    #[test]
    fn permitted_columns_in_the_permits_order_masked_and_scoped() {
        let scope = Scope {
            field: "region_code".into(),
            prefixes: vec!["330106".into()],
            label: "own-region 330106".into(),
        };
        let p = permit(
            &[
                ("name", Mask::None),
                ("id_number", Mask::Keep { first: 6, last: 4 }),
            ],
            Some(scope),
        );
        let s = shape(arrives(&provider_reply()), &p, &MaskKey::none(), "ps", None).unwrap();
        assert_eq!(s.withheld, 1);
        let names = |v: &[std::sync::Arc<str>]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&s.returned), ["name", "id_number"]);
        assert_eq!(names(&s.masked), ["id_number"]);
        let got = delivered(s);
        assert_eq!(got.next_page_token, "p2");
        assert_eq!(got.masked_columns, ["id_number"]);
        assert_eq!(
            got.columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>(),
            ["name", "id_number"]
        );
        assert_eq!(
            got.rows,
            [pb::Row {
                values: vec![
                    pb::Value::string("张三"),
                    pb::Value::string("330102********1234"),
                ]
            }]
        );
    }

    #[test]
    fn returned_subjects_are_the_rows_that_leave_even_unread_and_unscoped_out() {
        let key = audit::subjects::ReturnedKey::derive(&ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            b"subject key",
        ));
        let tap = Tap {
            field: "id_number",
            key,
        };
        let scope = Scope {
            field: "region_code".into(),
            prefixes: vec!["330106".into()],
            label: "own-region 330106".into(),
        };
        // The caller reads only names; the id column is there for the record only.
        let p = permit(&[("name", Mask::None)], Some(scope));
        let s = shape(
            arrives(&provider_reply()),
            &p,
            &MaskKey::none(),
            "ps",
            Some(tap),
        )
        .unwrap();
        // The row dropped by the scope never left: only the first person's hash.
        assert_eq!(s.subjects, [key.hash("330102199001011234")]);
        let got = delivered(s);
        assert_eq!(got.columns.len(), 1, "the id column is stripped");
        // A provider that leaves the subject column out fails the call: the trail must say
        // whose rows left.
        let mut no_id = provider_reply();
        no_id.columns[0].name = "other".into();
        let rej = shape(arrives(&no_id), &p, &MaskKey::none(), "ps", Some(tap))
            .err()
            .expect("refused");
        assert_eq!(rej.reason, Reason::ProviderResponseInvalid);
    }

    fn refused(resp: wire::QueryResponse) {
        let p = permit(&[("id_number", Mask::None), ("name", Mask::None)], None);
        let rej = shape(resp, &p, &MaskKey::none(), "ps", None)
            .err()
            .expect("refused");
        assert_eq!(rej.reason, Reason::ProviderResponseInvalid);
        assert_eq!(rej.code(), Code::Internal);
        assert!(
            !rej.message.contains("utf"),
            "no internals: {}",
            rej.message
        );
    }

    #[test]
    fn a_provider_that_sends_malformed_rows_fails_the_call() {
        // A row one cell short.
        let mut short = provider_reply();
        short.rows[1].values.pop();
        refused(arrives(&short));
        // A text cell that is not UTF-8 (bytes a full decode would refuse).
        let mut resp = arrives(&provider_reply());
        let wire::Rows::Received(rows) = &mut resp.rows else {
            panic!("received rows")
        };
        let mut body = Vec::new();
        for cell in [
            &[0x12u8, 2, 0xff, 0xfe][..],
            &[0x12, 1, b'a'],
            &[0x12, 1, b'b'],
        ] {
            prost::encoding::bytes::encode(1, &cell.to_vec(), &mut body);
        }
        rows[0] = bytes::Bytes::from(body);
        refused(resp);
        // A row whose cell length runs past its end.
        let mut resp = arrives(&provider_reply());
        let wire::Rows::Received(rows) = &mut resp.rows else {
            panic!("received rows")
        };
        rows[1] = bytes::Bytes::from_static(&[0x0a, 9, 0x12]);
        refused(resp);
    }
}
