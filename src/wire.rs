//! The gateway's own view of `DataExchange`: rows stay in their encoded form.
//!
//! A provider's response is decoded only as far as the gateway needs: its columns (to plan
//! the shaping) and, per row, the row's encoded body, sliced out of the receive buffer
//! without copying ([`Rows::Received`]). Shaping ([`RowWriter`]) walks each row's cells: a
//! permitted, unmasked cell is checked (a well-formed `Value`, text valid UTF-8, only known
//! fields) and copied as the bytes the provider sent; a masked cell, or the cell a row scope
//! reads, is decoded, and a masked one re-encoded. The shaped rows are written straight into
//! one buffer in their final encoding ([`Rows::Encoded`]). The bytes on the wire are exactly
//! what decoding everything and re-encoding it would give (`wire::tests` compare), without a
//! `Value` (and its `String`) per cell.
//!
//! The service and client here are generated from the same protos as [`crate::pb`] (build.rs)
//! with this module's [`QueryResponse`]; every other type is `crate::pb`'s.

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{self, DecodeContext, WireType},
};

use crate::{
    pb,
    policy::{Mask, mask::MaskKey},
};

#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/wire/xgate.v1.rs"));
}
pub use generated::*;

/// `xgate.v1.QueryResponse` with its rows left encoded.
#[derive(Clone, PartialEq, Default, Debug)]
pub struct QueryResponse {
    pub columns: Vec<pb::Column>,
    pub rows: Rows,
    pub masked_columns: Vec<String>,
    pub next_page_token: String,
}

/// A response's rows, never decoded into values.
#[derive(Clone, PartialEq, Debug)]
pub enum Rows {
    /// As received: each row's encoded body (its `values` fields), sharing the receive buffer.
    Received(Vec<Bytes>),
    /// As shaped: `count` rows already encoded as `QueryResponse.rows` fields.
    Encoded { count: usize, bytes: Vec<u8> },
}

impl Default for Rows {
    fn default() -> Self {
        Rows::Received(Vec::new())
    }
}

impl Rows {
    pub fn len(&self) -> usize {
        match self {
            Rows::Received(r) => r.len(),
            Rows::Encoded { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const ROWS: u32 = 2;
const VALUES: u32 = 1;

impl Message for QueryResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encoding::message::encode_repeated(1, &self.columns, buf);
        match &self.rows {
            Rows::Received(rows) => {
                for r in rows {
                    encoding::encode_key(ROWS, WireType::LengthDelimited, buf);
                    encoding::encode_varint(r.len() as u64, buf);
                    buf.put_slice(r);
                }
            }
            Rows::Encoded { bytes, .. } => buf.put_slice(bytes),
        }
        encoding::string::encode_repeated(3, &self.masked_columns, buf);
        if !self.next_page_token.is_empty() {
            encoding::string::encode(4, &self.next_page_token, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => encoding::message::merge_repeated(wire_type, &mut self.columns, buf, ctx),
            ROWS => {
                // Sliced out of the receive buffer (`copy_to_bytes` on tonic's buffer shares it).
                let mut row = Bytes::new();
                encoding::bytes::merge(wire_type, &mut row, buf, ctx)?;
                match &mut self.rows {
                    Rows::Received(rows) => rows.push(row),
                    Rows::Encoded { count, bytes } => {
                        put_field(bytes, ROWS, &row);
                        *count += 1;
                    }
                }
                Ok(())
            }
            3 => encoding::string::merge_repeated(wire_type, &mut self.masked_columns, buf, ctx),
            4 => encoding::string::merge(wire_type, &mut self.next_page_token, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let rows = match &self.rows {
            Rows::Received(rows) => rows.iter().map(|r| field_len(ROWS, r.len())).sum(),
            Rows::Encoded { bytes, .. } => bytes.len(),
        };
        encoding::message::encoded_len_repeated(1, &self.columns)
            + rows
            + encoding::string::encoded_len_repeated(3, &self.masked_columns)
            + if self.next_page_token.is_empty() {
                0
            } else {
                encoding::string::encoded_len(4, &self.next_page_token)
            }
    }

    fn clear(&mut self) {
        *self = QueryResponse::default();
    }
}

fn field_len(tag: u32, len: usize) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(len as u64) + len
}

fn put_field(out: &mut Vec<u8>, tag: u32, body: &[u8]) {
    encoding::encode_key(tag, WireType::LengthDelimited, out);
    encoding::encode_varint(body.len() as u64, out);
    out.extend_from_slice(body);
}

/// The cells of one encoded row, as ranges of its body, into `out`. `false`: not a
/// well-formed `Row` (a cell that is not length-delimited, a length past the end, a group).
/// Unknown fields are skipped, as a full decode drops them.
pub fn cells(body: &[u8], out: &mut Vec<std::ops::Range<usize>>) -> bool {
    out.clear();
    let mut b = body;
    while b.has_remaining() {
        let Ok((tag, wire_type)) = encoding::decode_key(&mut b) else {
            return false;
        };
        match (tag, wire_type) {
            (_, WireType::LengthDelimited) => {
                let Some(field) = take_delimited(&mut b) else {
                    return false;
                };
                if tag == VALUES {
                    let start = body.len() - b.len() - field.len();
                    out.push(start..start + field.len());
                }
            }
            (VALUES, _) => return false,
            (_, WireType::Varint) => {
                if encoding::decode_varint(&mut b).is_err() {
                    return false;
                }
            }
            (_, WireType::SixtyFourBit | WireType::ThirtyTwoBit) => {
                let n = if wire_type == WireType::SixtyFourBit {
                    8
                } else {
                    4
                };
                if b.len() < n {
                    return false;
                }
                b.advance(n);
            }
            _ => return false,
        }
    }
    true
}

/// A length-delimited field's bytes (its key already read), advancing `b` past them;
/// `None` if the length is unreadable or runs past the end.
fn take_delimited<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = encoding::decode_varint(b)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|n| *n <= b.len())?;
    let (field, rest) = b.split_at(n);
    *b = rest;
    Some(field)
}

/// A cell decoded (for a row scope's check, or to mask it).
pub fn decode_cell(cell: &[u8]) -> Option<pb::Value> {
    pb::Value::decode(cell).ok()
}

/// Whether an encoded `Value` can be passed on as it is: only fields `Value` defines, each
/// with its wire type, text valid UTF-8, a timestamp a valid `Timestamp`. Anything else
/// (unknown fields included) goes through a full decode and re-encode, which normalises or
/// refuses it exactly as decoding the whole response would have.
pub fn is_plain(mut b: &[u8]) -> bool {
    while b.has_remaining() {
        let Ok((tag, wire_type)) = encoding::decode_key(&mut b) else {
            return false;
        };
        let ok = match (tag, wire_type) {
            (1 | 3 | 5, WireType::Varint) => encoding::decode_varint(&mut b).is_ok(),
            (4, WireType::SixtyFourBit) => {
                let ok = b.len() >= 8;
                if ok {
                    b.advance(8);
                }
                ok
            }
            (2 | 6 | 7, WireType::LengthDelimited) => {
                let Some(field) = take_delimited(&mut b) else {
                    return false;
                };
                match tag {
                    2 => std::str::from_utf8(field).is_ok(),
                    7 => prost_types::Timestamp::decode(field).is_ok(),
                    _ => true,
                }
            }
            _ => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// The text of a cell that is exactly one `string_value` field of valid UTF-8.
fn plain_text(cell: &[u8]) -> Option<&str> {
    let (&key, mut rest) = cell.split_first()?;
    if key != STRING_VALUE {
        return None;
    }
    let text = take_delimited(&mut rest)?;
    if !rest.is_empty() {
        return None;
    }
    std::str::from_utf8(text).ok()
}

/// Key byte of `Value.string_value` (field 2, length-delimited).
const STRING_VALUE: u8 = 2 << 3 | 2;

/// Write `text` with `keep { first, last }` applied as a `Value` cell: the same bytes as
/// [`crate::policy::mask::keep`] then encoding `Value::string`, without either.
fn put_kept(row: &mut Vec<u8>, text: &str, first: usize, last: usize) {
    let (head, stars, tail) = crate::policy::mask::kept_parts(text, first, last);
    let len = head + stars + tail;
    let value_len = 1 + encoding::encoded_len_varint(len as u64) + len;
    encoding::encode_key(VALUES, WireType::LengthDelimited, row);
    encoding::encode_varint(value_len as u64, row);
    row.push(STRING_VALUE);
    encoding::encode_varint(len as u64, row);
    row.extend_from_slice(&text.as_bytes()[..head]);
    row.resize(row.len() + stars, b'*');
    row.extend_from_slice(&text.as_bytes()[text.len() - tail..]);
}

/// Writes shaped rows in their final encoding.
#[derive(Debug, Default)]
pub struct RowWriter {
    out: Vec<u8>,
    row: Vec<u8>,
    count: usize,
}

impl RowWriter {
    pub fn with_capacity(bytes: usize) -> Self {
        RowWriter {
            out: Vec::with_capacity(bytes),
            ..RowWriter::default()
        }
    }

    /// Add a cell to the current row: the same bytes when it is unmasked and plain, otherwise
    /// decoded, masked and re-encoded. `false`: not a valid `Value`.
    pub fn cell(&mut self, cell: &[u8], mask: Mask, key: &MaskKey) -> bool {
        match mask {
            Mask::None if is_plain(cell) => {
                put_field(&mut self.row, VALUES, cell);
                return true;
            }
            // The common masked cell: text shown in part, written without decoding.
            Mask::Keep { first, last } => {
                if let Some(text) = plain_text(cell) {
                    put_kept(&mut self.row, text, first.into(), last.into());
                    return true;
                }
            }
            _ => {}
        }
        let Some(mut v) = decode_cell(cell) else {
            return false;
        };
        crate::policy::mask::apply(mask, &mut v, key);
        encoding::message::encode(VALUES, &v, &mut self.row);
        true
    }

    /// Close the current row.
    pub fn end_row(&mut self) {
        put_field(&mut self.out, ROWS, &self.row);
        self.row.clear();
        self.count += 1;
    }

    pub fn finish(self) -> Rows {
        Rows::Encoded {
            count: self.count,
            bytes: self.out,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::pb::{Column, Value, value::Kind};

    fn sample() -> Vec<Value> {
        vec![
            Value::string("330102199001011234"),
            Value::int64(-42),
            Value::null(),
            Value {
                kind: Some(Kind::DoubleValue(2.5)),
            },
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
            Value {
                kind: Some(Kind::BytesValue(vec![0, 159, 146, 150])),
            },
            Value {
                kind: Some(Kind::TimestampValue(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5,
                })),
            },
            Value { kind: None },
            Value::string("张三"),
        ]
    }

    fn full() -> pb::QueryResponse {
        pb::QueryResponse {
            columns: vec![Column {
                name: "a".into(),
                r#type: 1,
            }],
            rows: vec![
                pb::Row { values: sample() },
                pb::Row { values: vec![] },
                pb::Row {
                    values: sample().into_iter().rev().collect(),
                },
            ],
            masked_columns: vec!["a".into()],
            next_page_token: "next".into(),
        }
    }

    #[test]
    fn a_response_reads_and_writes_the_same_bytes_as_the_full_decode() {
        let bytes = full().encode_to_vec();
        let raw = QueryResponse::decode(Bytes::from(bytes.clone())).unwrap();
        assert_eq!(raw.rows.len(), 3);
        assert_eq!(raw.encode_to_vec(), bytes);
        assert_eq!(raw.encoded_len(), bytes.len());
    }

    #[test]
    fn rows_rewritten_cell_by_cell_unmasked_are_the_same_bytes() {
        let key = MaskKey::new(&[7; 32]);
        let bytes = full().encode_to_vec();
        let raw = QueryResponse::decode(Bytes::from(bytes.clone())).unwrap();
        let Rows::Received(rows) = &raw.rows else {
            panic!("received rows")
        };
        let mut w = RowWriter::default();
        let mut ranges = Vec::new();
        for r in rows {
            assert!(cells(r, &mut ranges));
            for c in &ranges {
                assert!(w.cell(&r[c.clone()], Mask::None, &key));
            }
            w.end_row();
        }
        let again = QueryResponse {
            rows: w.finish(),
            ..raw.clone()
        };
        assert_eq!(again.encode_to_vec(), bytes);
        assert_eq!(again.encoded_len(), bytes.len());
        assert_eq!(pb::QueryResponse::decode(&bytes[..]).unwrap(), full());
    }

    #[test]
    fn masked_cells_are_what_masking_the_decoded_value_gives() {
        let key = MaskKey::new(&[7; 32]);
        for mask in [Mask::Hash, Mask::Redact, Mask::Keep { first: 3, last: 4 }] {
            let mut want = pb::Row { values: sample() };
            for v in &mut want.values {
                crate::policy::mask::apply(mask, v, &key);
            }
            let mut w = RowWriter::default();
            for v in sample() {
                assert!(w.cell(&v.encode_to_vec(), mask, &key));
            }
            w.end_row();
            let Rows::Encoded { bytes, count } = w.finish() else {
                panic!("encoded rows")
            };
            assert_eq!(count, 1);
            let got = pb::QueryResponse::decode(&bytes[..]).unwrap();
            assert_eq!(got.rows, vec![want], "{mask:?}");
        }
    }

    #[test]
    fn partly_shown_text_is_what_masking_the_decoded_value_gives() {
        let key = MaskKey::none();
        let texts = [
            "",
            "a",
            "ab",
            "abc",
            "abcdefg",
            "330102199001011234",
            "张",
            "张三",
            "张三丰",
            "张三丰李四",
            "a张b三c",
            "13800138000",
            "ünïcödé-ß",
            "🙂🙂🙂🙂🙂",
        ];
        for text in texts {
            for (first, last) in [(0, 0), (1, 0), (0, 1), (1, 1), (3, 4), (6, 4), (2, 9)] {
                let mask = Mask::Keep { first, last };
                let mut want = Value::string(text);
                crate::policy::mask::apply(mask, &mut want, &key);
                let mut want_row = Vec::new();
                encoding::message::encode(VALUES, &want, &mut want_row);
                let mut w = RowWriter::default();
                let cell = Value::string(text).encode_to_vec();
                assert!(plain_text(&cell).is_some());
                assert!(w.cell(&cell, mask, &key));
                assert_eq!(w.row, want_row, "{text:?} keep {first}/{last}");
            }
        }
        // Not a lone, valid string: the general path decides.
        assert!(plain_text(&[STRING_VALUE, 2, 0xff, 0xfe]).is_none());
        assert!(plain_text(&[STRING_VALUE, 1, b'a', 9 << 3, 1]).is_none());
        assert!(plain_text(&Value::int64(5).encode_to_vec()).is_none());
        assert!(!RowWriter::default().cell(
            &[STRING_VALUE, 2, 0xff, 0xfe],
            Mask::Keep { first: 1, last: 1 },
            &key
        ));
    }

    #[test]
    fn odd_cells_are_normalised_or_refused_like_a_full_decode_would() {
        let key = MaskKey::new(&[7; 32]);
        // An unknown field (tag 9, varint) after a string: dropped, as prost drops it.
        let mut odd = Value::string("x").encode_to_vec();
        odd.extend_from_slice(&[9 << 3, 1]);
        assert!(!is_plain(&odd));
        let mut w = RowWriter::default();
        assert!(w.cell(&odd, Mask::None, &key));
        assert_eq!(w.row, {
            let mut want = Vec::new();
            put_field(&mut want, VALUES, &Value::string("x").encode_to_vec());
            want
        });
        // Text that is not UTF-8, a truncated length, a wrong wire type: refused.
        for bad in [
            vec![2 << 3 | 2, 2, 0xff, 0xfe],
            vec![2 << 3 | 2, 9, b'a'],
            vec![3 << 3 | 2, 1, 1],
            vec![4 << 3 | 1, 1, 2],
        ] {
            assert!(!is_plain(&bad), "{bad:?}");
            assert!(
                !RowWriter::default().cell(&bad, Mask::None, &key),
                "{bad:?}"
            );
        }
        // Rows: a cell that is not length-delimited, a length past the end.
        let mut ranges = Vec::new();
        assert!(!cells(&[(VALUES as u8) << 3, 1], &mut ranges));
        assert!(!cells(&[(VALUES as u8) << 3 | 2, 5, 1], &mut ranges));
        // An unknown field in a row is skipped.
        assert!(cells(
            &[(7 << 3), 1, (VALUES as u8) << 3 | 2, 0],
            &mut ranges
        ));
        assert_eq!(ranges, vec![4..4]);
    }
}
