//! The provider's own page tokens: where the next page starts (the last key, or the source's
//! page, offset or cursor), sealed with an HMAC over the dataset and the query, so a token is
//! opaque and cannot be altered or moved to another query. (The gateway seals them once more
//! for its caller: `pipeline::paging`.)
//!
//! Format: `k1.` + base64url(position) + `.` + base64url(first 16 bytes of HMAC-SHA-256).

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use prost::Message;

use super::dataset::Param;
use crate::pb::QueryRequest;

const PREFIX: &str = "k1.";
const CONTEXT: &[u8] = b"xgate-provider-page:v1\n";
const TAG: usize = 16;

/// Where a page starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Position {
    /// SQL keyset: rows with a key greater than this.
    After(Param),
    /// HTTP: the page number or offset to ask for.
    Number(u64),
    /// HTTP: the service's cursor.
    Cursor(String),
}

#[derive(Clone)]
pub struct PageKey(ring::hmac::Key);

impl std::fmt::Debug for PageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageKey")
    }
}

/// What a token is bound to: the query without its paging.
pub fn digest(req: &QueryRequest) -> Vec<u8> {
    let q = QueryRequest {
        dataset: req.dataset.clone(),
        fields: req.fields.clone(),
        filter: req.filter.clone(),
        purpose: String::new(),
        page_size: 0,
        page_token: String::new(),
    };
    q.encode_to_vec()
}

impl PageKey {
    pub fn new(bytes: &[u8]) -> Result<PageKey, String> {
        let k = bytes.trim_ascii();
        if k.len() < 32 {
            return Err(format!(
                "the page-token key is {} bytes; at least 32",
                k.len()
            ));
        }
        Ok(PageKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k)))
    }

    /// A key for this process only.
    pub fn random() -> PageKey {
        let k: [u8; 32] = rand::random();
        PageKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k))
    }

    fn tag(&self, bound: &[u8], pos: &[u8]) -> ring::hmac::Tag {
        let mut ctx = ring::hmac::Context::with_key(&self.0);
        ctx.update(CONTEXT);
        ctx.update(&(bound.len() as u64).to_be_bytes());
        ctx.update(bound);
        ctx.update(pos);
        ctx.sign()
    }

    pub fn seal(&self, bound: &[u8], pos: &Position) -> String {
        let p = encode(pos);
        let tag = self.tag(bound, &p);
        format!(
            "{PREFIX}{}.{}",
            B64.encode(&p),
            B64.encode(&tag.as_ref()[..TAG])
        )
    }

    /// The position, when the token was sealed here for this query.
    pub fn open(&self, bound: &[u8], token: &str) -> Option<Position> {
        let rest = token.strip_prefix(PREFIX)?;
        let (p, t) = rest.split_once('.')?;
        let p = B64.decode(p).ok()?;
        let t = B64.decode(t).ok()?;
        if t.len() != TAG || !constant_time_eq(&self.tag(bound, &p).as_ref()[..TAG], &t) {
            return None;
        }
        decode(&p)
    }
}

/// Equal bytes, in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn encode(pos: &Position) -> Vec<u8> {
    let mut out = Vec::new();
    match pos {
        Position::After(Param::Str(s)) => {
            out.push(b's');
            out.extend_from_slice(s.as_bytes());
        }
        Position::After(Param::I64(n)) => {
            out.push(b'i');
            out.extend_from_slice(&n.to_be_bytes());
        }
        // Keys are strings or int64 (checked at load); anything else never pages.
        Position::After(_) => out.push(b'x'),
        Position::Number(n) => {
            out.push(b'n');
            out.extend_from_slice(&n.to_be_bytes());
        }
        Position::Cursor(c) => {
            out.push(b'c');
            out.extend_from_slice(c.as_bytes());
        }
    }
    out
}

fn decode(p: &[u8]) -> Option<Position> {
    let (&kind, rest) = p.split_first()?;
    Some(match kind {
        b's' => Position::After(Param::Str(String::from_utf8(rest.to_vec()).ok()?)),
        b'i' => Position::After(Param::I64(i64::from_be_bytes(rest.try_into().ok()?))),
        b'n' => Position::Number(u64::from_be_bytes(rest.try_into().ok()?)),
        b'c' => Position::Cursor(String::from_utf8(rest.to_vec()).ok()?),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_opens_only_for_its_query_and_unaltered() {
        let k = PageKey::random();
        let q = b"query-a";
        let t = k.seal(q, &Position::After(Param::Str("330106x".into())));
        assert_eq!(
            k.open(q, &t),
            Some(Position::After(Param::Str("330106x".into())))
        );
        assert_eq!(k.open(b"query-b", &t), None);
        let mut bad = t.clone();
        bad.insert(5, 'A');
        assert_eq!(k.open(q, &bad), None);
        assert_eq!(PageKey::random().open(q, &t), None);
        let n = k.seal(q, &Position::Number(7));
        assert_eq!(k.open(q, &n), Some(Position::Number(7)));
    }
}
