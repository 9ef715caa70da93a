//! Sealed page tokens: a provider's paging position, handed to the caller only inside a MAC
//! that binds it to that caller and that query.
//!
//! Providers page with their own tokens (offsets, cursors). Passed through as they are, a
//! token could be replayed by another department, or against another query (another filter,
//! other fields) to read past what the first query was scoped to. The gateway seals each
//! `next_page_token` — `p1.` + base64url(provider token) + `.` + base64url(HMAC-SHA-256,
//! 128 bits) over the calling department and system, the policy version, and the query as the
//! caller asked it (dataset, purpose, fields, filter; not the page size) — and opens it on the
//! next call. A token that does not open is `INVALID_ARGUMENT PAGE_TOKEN_INVALID`: start again
//! from the first page. A policy change therefore ends every paging in progress.
//!
//! The key is `page_token_key_file` (32+ bytes), shared by replicas behind one load balancer;
//! without one, each process draws its own at start (tokens then only work on the replica that
//! issued them, and not across a restart).
//!
//! Not here: what a page holds (the provider decides; the gateway shapes it like any answer).

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use prost::Message;

use crate::{
    error::{Reason, Reject},
    pb::QueryRequest,
    tls::identity::SystemId,
};

const CONTEXT: &[u8] = b"xgate-page-token:v1\n";
const PREFIX: &str = "p1.";
const TAG_BYTES: usize = 16;
/// Longest page token accepted from a caller.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// The gateway's page-token key.
#[derive(Clone)]
pub struct PageSeal {
    key: ring::hmac::Key,
}

impl std::fmt::Debug for PageSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageSeal").finish_non_exhaustive()
    }
}

/// What a page token is bound to, besides the policy version: who asked, and what.
#[derive(Debug)]
pub struct Binding(Vec<u8>);

impl Binding {
    /// The query as the caller sent it, before the gateway narrowed it (its page token and
    /// page size are set aside while it is encoded, and put back: no copy of the request).
    pub fn of(who: &SystemId, asked: &mut QueryRequest) -> Binding {
        let token = std::mem::take(&mut asked.page_token);
        let size = std::mem::replace(&mut asked.page_size, 0);
        let mut b = Vec::with_capacity(64 + asked.encoded_len());
        for part in [who.dept.as_bytes(), who.system.as_bytes()] {
            b.extend_from_slice(&(part.len() as u32).to_be_bytes());
            b.extend_from_slice(part);
        }
        // Into a Vec, encoding cannot fail (it grows).
        let _ = asked.encode(&mut b);
        asked.page_token = token;
        asked.page_size = size;
        Binding(b)
    }
}

impl PageSeal {
    /// A key from the bytes of `page_token_key_file`.
    pub fn from_key(bytes: &[u8]) -> Result<PageSeal, String> {
        let k = bytes.trim_ascii();
        if k.len() < 32 {
            return Err(format!(
                "the page-token key is {} bytes; at least 32",
                k.len()
            ));
        }
        Ok(PageSeal {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k),
        })
    }

    /// A key of this process's own (single-replica use).
    pub fn random() -> PageSeal {
        let k: [u8; 32] = rand::random();
        PageSeal {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k),
        }
    }

    fn tag(&self, b: &Binding, policy_version: &str, provider_token: &[u8]) -> ring::hmac::Tag {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(CONTEXT);
        ctx.update(&(policy_version.len() as u32).to_be_bytes());
        ctx.update(policy_version.as_bytes());
        ctx.update(&(b.0.len() as u32).to_be_bytes());
        ctx.update(&b.0);
        ctx.update(provider_token);
        ctx.sign()
    }

    /// The caller's token for the provider's `next_page_token`.
    pub fn seal(&self, b: &Binding, policy_version: &str, provider_token: &str) -> String {
        let tag = self.tag(b, policy_version, provider_token.as_bytes());
        format!(
            "{PREFIX}{}.{}",
            B64.encode(provider_token),
            B64.encode(&tag.as_ref()[..TAG_BYTES])
        )
    }

    /// The provider's token inside a caller's token, if it was sealed for this caller, this
    /// query and this policy version.
    pub fn open(&self, b: &Binding, policy_version: &str, token: &str) -> Result<String, Reject> {
        let invalid = || {
            Reject::new(
                Reason::PageTokenInvalid,
                "the page token is not one the gateway issued for this query: it was altered, issued to another caller or for another query, or the policy changed since; start from the first page",
            )
            .with_rule("paging:sealed-token")
        };
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid());
        }
        let rest = token.strip_prefix(PREFIX).ok_or_else(invalid)?;
        let (inner, tag) = rest.split_once('.').ok_or_else(invalid)?;
        let inner = B64.decode(inner).map_err(|_| invalid())?;
        let tag = B64.decode(tag).map_err(|_| invalid())?;
        let want = self.tag(b, policy_version, &inner);
        // Compared in constant time: every byte, whatever differs first.
        let differ = want.as_ref()[..TAG_BYTES]
            .iter()
            .zip(&tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if tag.len() != TAG_BYTES || differ != 0 {
            return Err(invalid());
        }
        String::from_utf8(inner).map_err(|_| invalid())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn who(d: &str) -> SystemId {
        SystemId {
            dept: d.into(),
            system: "s".into(),
        }
    }

    #[test]
    fn a_token_opens_only_for_its_caller_query_and_policy() {
        let seal = PageSeal::random();
        let q = QueryRequest {
            dataset: "d".into(),
            purpose: "p".into(),
            page_size: 5,
            ..QueryRequest::default()
        };
        let b = Binding::of(&who("a"), &mut q.clone());
        let t = seal.seal(&b, "v1", "offset=5");
        assert_eq!(seal.open(&b, "v1", &t).unwrap(), "offset=5");
        // The page size may change between pages; nothing else may.
        let bigger = QueryRequest {
            page_size: 50,
            page_token: t.clone(),
            ..q.clone()
        };
        assert!(
            seal.open(&Binding::of(&who("a"), &mut bigger.clone()), "v1", &t)
                .is_ok()
        );
        let other_query = QueryRequest {
            purpose: "q".into(),
            ..q.clone()
        };
        for (b, v) in [
            (Binding::of(&who("b"), &mut q.clone()), "v1"),
            (Binding::of(&who("a"), &mut other_query.clone()), "v1"),
            (Binding::of(&who("a"), &mut q.clone()), "v2"),
        ] {
            assert_eq!(
                seal.open(&b, v, &t).unwrap_err().reason,
                Reason::PageTokenInvalid
            );
        }
        // Altered, forged, foreign, raw provider tokens.
        let altered = t.replacen("p1.", "p1.A", 1);
        for bad in [altered.as_str(), "offset=5", "p1.b2Zmc2V0PTk5.AAAA", ""] {
            assert!(seal.open(&b, "v1", bad).is_err(), "{bad}");
        }
        assert!(
            PageSeal::random().open(&b, "v1", &t).is_err(),
            "another key"
        );
    }

    #[test]
    fn replicas_sharing_the_key_open_each_others_tokens() {
        let key = b"0123456789abcdef0123456789abcdef\n";
        let (a, b) = (
            PageSeal::from_key(key).unwrap(),
            PageSeal::from_key(key).unwrap(),
        );
        let mut q = QueryRequest::default();
        let bind = Binding::of(&who("a"), &mut q);
        let t = a.seal(&bind, "v1", "cursor-9");
        assert_eq!(b.open(&bind, "v1", &t).unwrap(), "cursor-9");
        assert!(PageSeal::from_key(b"short").is_err());
    }
}
