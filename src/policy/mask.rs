//! Masks applied by the gateway to provider responses. The gateway never trusts a provider to
//! mask: whatever the provider sends, a masked column leaves here masked.

use super::model::Mask;
use crate::pb::{Value, value::Kind};

/// The bureau's pseudonym key (HMAC-SHA256), loaded from a secret file.
#[derive(Clone)]
pub struct MaskKey(Option<ring::hmac::Key>);

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "MaskKey(set)"
        } else {
            "MaskKey(none)"
        })
    }
}

impl MaskKey {
    /// No key: `hash` masks then redact (fail closed). A policy using `hash` is refused at
    /// start-up without a key, so this only matters in tests.
    pub fn none() -> Self {
        MaskKey(None)
    }

    pub fn new(secret: &[u8]) -> Self {
        MaskKey(Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)))
    }

    /// Read a key file (at least 32 bytes of secret; surrounding whitespace ignored).
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < 32 {
            return Err(format!(
                "{}: a pseudonym key needs at least 32 bytes",
                path.display()
            ));
        }
        Ok(Self::new(trimmed))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// `p:` + 32 hex digits of HMAC-SHA256(key, text).
    pub fn pseudonym(&self, text: &str) -> Option<String> {
        let key = self.0.as_ref()?;
        let tag = ring::hmac::sign(key, text.as_bytes());
        Some(format!("p:{}", hex::encode(&tag.as_ref()[..16])))
    }
}

/// Apply `mask` to one value in place. Returns whether the value was changed.
pub fn apply(mask: Mask, v: &mut Value, key: &MaskKey) -> bool {
    match mask {
        Mask::None => false,
        Mask::Hash => {
            let p = match v.kind.as_ref() {
                None | Some(Kind::NullValue(_)) => return false,
                Some(Kind::BytesValue(b)) => key.pseudonym(&hex::encode(b)),
                Some(_) => v.as_text().and_then(|t| key.pseudonym(&t)),
            };
            *v = p.map_or_else(Value::null, Value::string);
            true
        }
        Mask::Redact => {
            *v = Value::null();
            true
        }
        Mask::Keep { first, last } => {
            let masked = match v.kind.as_ref() {
                None | Some(Kind::NullValue(_)) => return false,
                Some(Kind::StringValue(s)) => keep(s, first.into(), last.into()),
                Some(_) => match v.as_text() {
                    Some(t) => keep(&t, first.into(), last.into()),
                    // bytes cannot be partially shown: redact.
                    None => {
                        *v = Value::null();
                        return true;
                    }
                },
            };
            *v = Value::string(masked);
            true
        }
    }
}

/// Keep the first `first` and last `last` characters; every other character becomes `*`.
/// A value too short to hide anything is starred out entirely.
pub fn keep(s: &str, first: usize, last: usize) -> String {
    let (head, stars, tail) = kept_parts(s, first, last);
    let mut out = String::with_capacity(head + stars + tail);
    out.push_str(&s[..head]);
    out.extend(std::iter::repeat_n('*', stars));
    out.push_str(&s[s.len() - tail..]);
    out
}

/// The rule of [`keep`] as (bytes shown at the start, stars, bytes shown at the end), for
/// writers that produce the masked text without building it (`wire::RowWriter`).
pub fn kept_parts(s: &str, first: usize, last: usize) -> (usize, usize, usize) {
    let chars = if s.is_ascii() {
        s.len()
    } else {
        s.chars().count()
    };
    if chars <= first + last {
        return (0, chars, 0);
    }
    let stars = chars - first - last;
    if chars == s.len() {
        return (first, stars, last);
    }
    let byte_at = |n: usize| s.char_indices().nth(n).map_or(s.len(), |(i, _)| i);
    (byte_at(first), stars, s.len() - byte_at(chars - last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_first_and_last() {
        assert_eq!(keep("330106199001011234", 6, 4), "330106********1234");
        assert_eq!(keep("13800138000", 3, 4), "138****8000");
        assert_eq!(keep("张三丰", 1, 0), "张**");
        assert_eq!(keep("abc", 2, 2), "***");
        assert_eq!(keep("", 1, 1), "");
    }

    #[test]
    fn masks_non_strings_as_text_and_redacts() {
        let k = MaskKey::none();
        let mut v = Value::int64(13800138000);
        assert!(apply(Mask::Keep { first: 3, last: 4 }, &mut v, &k));
        assert_eq!(v, Value::string("138****8000"));
        let mut v = Value::string("secret");
        assert!(apply(Mask::Redact, &mut v, &k));
        assert_eq!(v, Value::null());
        let mut v = Value::null();
        assert!(!apply(Mask::Keep { first: 1, last: 1 }, &mut v, &k));
        let mut v = Value::string("x");
        assert!(!apply(Mask::None, &mut v, &k));
    }

    #[test]
    fn pseudonyms_are_stable_keyed_and_fail_closed_without_a_key() {
        let k1 = MaskKey::new(b"0123456789abcdef0123456789abcdef");
        let k2 = MaskKey::new(b"another key, another pseudonym!!");
        let run = |k: &MaskKey, s: &str| {
            let mut v = Value::string(s);
            apply(Mask::Hash, &mut v, k);
            v
        };
        let a = run(&k1, "330106199001011234");
        assert_eq!(a, run(&k1, "330106199001011234"), "stable across calls");
        assert_ne!(a, run(&k1, "330106199001011235"));
        assert_ne!(a, run(&k2, "330106199001011234"), "depends on the key");
        let text = a.as_text().unwrap_or_default().into_owned();
        assert!(text.starts_with("p:") && text.len() == 34 && !text.contains("3301061990"));
        assert_eq!(
            run(&MaskKey::none(), "x"),
            Value::null(),
            "no key: redacted"
        );
    }
}
