//! `xgate call`: a small mTLS + JWT client for the standard interface, so nobody needs grpcurl
//! to try the gateway. Also used by the tests as a typed client.

use std::{path::Path, time::Duration};

use tonic::{
    Request, Status,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_types::StatusExt;

use crate::pb::{self, Filter, QueryRequest, QueryResponse, Value, condition::Test};

/// Open an mTLS channel to the gateway.
pub async fn connect(
    gateway: &str,
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
    server_name: &str,
) -> Result<Channel, Box<dyn std::error::Error + Send + Sync>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem))
        .domain_name(server_name);
    Ok(Endpoint::from_shared(gateway.to_owned())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// Attach `authorization: Bearer <token>`.
pub fn with_token<T>(body: T, token: &str) -> Request<T> {
    let mut r = Request::new(body);
    if let Ok(v) = MetadataValue::try_from(format!("Bearer {token}")) {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// Parse `field=value`, `field^=prefix` or `field:in=a,b,c` into a filter condition (spaces
/// around names and values are not part of them: `region_code = 330106` works). `ty` gives
/// a field's catalogue type, so `42` becomes an int64 for an int64 field and stays text for a
/// string field.
pub fn parse_condition(
    s: &str,
    ty: impl Fn(&str) -> Option<pb::FieldType>,
) -> Result<pb::Condition, String> {
    let cond = |field: &str, test| pb::Condition {
        field: field.trim().to_owned(),
        test: Some(test),
    };
    if let Some((f, v)) = s.split_once(":in=") {
        let t = ty(f.trim());
        let values = v
            .split(',')
            .map(|x| typed_value(x.trim(), t))
            .collect::<Result<_, _>>()?;
        return Ok(cond(f, Test::In(pb::ValueList { values })));
    }
    if let Some((f, v)) = s.split_once("^=") {
        return Ok(cond(f, Test::Prefix(v.trim().to_owned())));
    }
    if let Some((f, v)) = s.split_once('=') {
        return Ok(cond(f, Test::Eq(typed_value(v.trim(), ty(f.trim()))?)));
    }
    Err(format!(
        "`{s}`: use field=value, field^=prefix or field:in=a,b,c"
    ))
}

/// A command-line literal as a value of the field's type (text when the type is unknown).
pub fn typed_value(v: &str, ty: Option<pb::FieldType>) -> Result<Value, String> {
    use pb::{FieldType as T, value::Kind};
    let kind = match ty {
        Some(T::Int64) => {
            Kind::Int64Value(v.parse().map_err(|_| format!("`{v}` is not an integer"))?)
        }
        Some(T::Double) => {
            Kind::DoubleValue(v.parse().map_err(|_| format!("`{v}` is not a number"))?)
        }
        Some(T::Bool) => {
            Kind::BoolValue(v.parse().map_err(|_| format!("`{v}` is not true/false"))?)
        }
        Some(T::Timestamp) => {
            let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                .map_err(|_| format!("`{v}` is not an RFC 3339 time"))?;
            Kind::TimestampValue(prost_types::Timestamp {
                seconds: t.unix_timestamp(),
                nanos: 0,
            })
        }
        _ => Kind::StringValue(v.to_owned()),
    };
    Ok(Value { kind: Some(kind) })
}

/// Build a query request; filter literals are typed with `types` (field name -> type).
pub fn query_request(
    dataset: &str,
    fields: &[String],
    conds: &[String],
    purpose: &str,
    page_size: u32,
    page_token: &str,
    types: &std::collections::HashMap<String, pb::FieldType>,
) -> Result<QueryRequest, String> {
    let conditions = conds
        .iter()
        .map(|c| parse_condition(c, |f| types.get(f).copied()))
        .collect::<Result<_, _>>()?;
    Ok(QueryRequest {
        dataset: dataset.to_owned(),
        fields: fields.to_vec(),
        filter: Some(Filter { conditions }),
        purpose: purpose.to_owned(),
        page_size,
        page_token: page_token.to_owned(),
    })
}

/// One line explaining a failed call: code, stable reason, message, rule, trace id.
pub fn explain(status: &Status) -> String {
    let details = status.get_error_details();
    let (reason, rule, trace) = match details.error_info() {
        Some(i) => (
            i.reason.clone(),
            i.metadata.get("rule").cloned().unwrap_or_default(),
            i.metadata.get("trace_id").cloned().unwrap_or_default(),
        ),
        None => (String::new(), String::new(), String::new()),
    };
    let mut s = format!("{:?}", status.code());
    if !reason.is_empty() {
        s.push_str(&format!(" {reason}"));
    }
    s.push_str(&format!(": {}", status.message()));
    if !rule.is_empty() {
        s.push_str(&format!(" [rule {rule}]"));
    }
    if let Some(r) = details.retry_info().and_then(|r| r.retry_delay) {
        s.push_str(&format!(" [retry after {} ms]", r.as_millis()));
    }
    if !trace.is_empty() {
        s.push_str(&format!(" [trace {trace}]"));
    }
    s
}

/// A failed call as JSON: `{"error": {code, reason, message, rule, trace_id, retry_after_ms}}`.
pub fn status_json(status: &Status) -> serde_json::Value {
    let details = status.get_error_details();
    let info = details.error_info();
    let meta = |k: &str| info.and_then(|i| i.metadata.get(k).cloned());
    serde_json::json!({
        "error": {
            "code": crate::audit::code_name(status.code()),
            "reason": info.map(|i| i.reason.clone()),
            "message": status.message(),
            "rule": meta("rule"),
            "trace_id": meta("trace_id"),
            "retry_after_ms": details.retry_info().and_then(|r| r.retry_delay).map(|d| d.as_millis() as u64),
        }
    })
}

/// Render a value for the terminal.
pub fn render(v: &Value) -> String {
    use pb::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => "∅".into(),
        Some(Kind::BytesValue(b)) => format!("<{} bytes>", b.len()),
        Some(Kind::TimestampValue(t)) => time::OffsetDateTime::from_unix_timestamp(t.seconds)
            .ok()
            .and_then(|d| {
                d.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_else(|| t.to_string()),
        Some(_) => v.as_text().map(|c| c.into_owned()).unwrap_or_default(),
    }
}

/// Print a response as an aligned table.
pub fn print_table(resp: &QueryResponse) {
    let headers: Vec<String> = resp
        .columns
        .iter()
        .map(|c| {
            if resp.masked_columns.contains(&c.name) {
                format!("{}*", c.name)
            } else {
                c.name.clone()
            }
        })
        .collect();
    let cells: Vec<Vec<String>> = resp
        .rows
        .iter()
        .map(|r| r.values.iter().map(render).collect())
        .collect();
    let width = crate::tools::report::width;
    let mut w: Vec<usize> = headers.iter().map(|h| width(h)).collect();
    for row in &cells {
        for (i, c) in row.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(width(c));
            }
        }
    }
    let line = |row: &[String]| {
        row.iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "{c}{}",
                    " ".repeat(w.get(i).copied().unwrap_or(0).saturating_sub(width(c)))
                )
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    crate::outln!("{}", line(&headers));
    for row in &cells {
        crate::outln!("{}", line(row));
    }
}

/// Load the cert, key and a dev token for department `dept` from a dev-certs directory.
pub fn dev_identity(
    certs: &Path,
    dept: &str,
    purposes: Option<&[String]>,
) -> Result<(Vec<u8>, Vec<u8>, String), String> {
    let read = |name: String| {
        std::fs::read(certs.join(&name)).map_err(|e| format!("{}: {e}", certs.join(name).display()))
    };
    let cert = read(format!("{dept}.pem"))?;
    let key = read(format!("{dept}.key"))?;
    let signing = String::from_utf8(read("jwt-signing.key".into())?).map_err(|e| e.to_string())?;
    let claims = crate::dev::pki::dev_claims(dept, &format!("demo-user@{dept}"), purposes, 3600);
    let token = crate::dev::pki::mint_token(&signing, crate::dev::pki::KID, &claims)
        .map_err(|e| e.to_string())?;
    Ok((cert, key, token))
}

/// A gRPC codec that sends and receives raw bytes (hostile payloads in tests, methods
/// outside the interface in `xgate bench`).
#[derive(Debug, Clone, Default)]
pub struct RawCodec;

#[derive(Debug)]
pub struct RawEnc;
#[derive(Debug)]
pub struct RawDec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

impl tonic::codec::Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use bytes::Buf;
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn spaces_around_names_and_values_are_not_part_of_them() {
        let none = |_: &str| None;
        for s in [
            "region_code=330106",
            "region_code = 330106",
            " region_code= 330106 ",
        ] {
            let c = parse_condition(s, none).unwrap();
            assert_eq!(c.field, "region_code");
            assert_eq!(c.test, Some(Test::Eq(Value::string("330106"))), "{s:?}");
        }
        let c = parse_condition("name ^= Zh ", none).unwrap();
        assert_eq!(
            (c.field.as_str(), c.test),
            ("name", Some(Test::Prefix("Zh".into())))
        );
    }
}
