//! Generated protobuf and gRPC code for `xgate.v1`, kept in one place and re-exported.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("xgate.v1");

/// Encoded `FileDescriptorSet` of the `xgate.v1` protos (for server reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("xgate_descriptor");

impl Value {
    pub fn string(s: impl Into<String>) -> Self {
        Value {
            kind: Some(value::Kind::StringValue(s.into())),
        }
    }

    pub fn int64(v: i64) -> Self {
        Value {
            kind: Some(value::Kind::Int64Value(v)),
        }
    }

    pub fn null() -> Self {
        Value {
            kind: Some(value::Kind::NullValue(0)),
        }
    }

    /// The value as text, for display, prefix tests and masking.
    pub fn as_text(&self) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match self.kind.as_ref()? {
            value::Kind::StringValue(s) => Some(Cow::Borrowed(s)),
            value::Kind::Int64Value(v) => Some(Cow::Owned(v.to_string())),
            value::Kind::DoubleValue(v) => Some(Cow::Owned(v.to_string())),
            value::Kind::BoolValue(v) => Some(Cow::Owned(v.to_string())),
            value::Kind::TimestampValue(t) => Some(Cow::Owned(t.to_string())),
            value::Kind::BytesValue(_) | value::Kind::NullValue(_) => None,
        }
    }
}
