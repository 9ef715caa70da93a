//! Masks applied by the gateway to provider responses. The gateway never trusts a provider to
//! mask: whatever the provider sends, a masked column leaves here masked.

use super::model::Mask;
use crate::pb::{Value, value::Kind};

/// Apply `mask` to one value in place. Returns whether the value was changed.
pub fn apply(mask: Mask, v: &mut Value) -> bool {
    match mask {
        Mask::None => false,
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
    let n = s.chars().count();
    if n <= first + last {
        return "*".repeat(n);
    }
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        if i < first || i >= n - last {
            out.push(c);
        } else {
            out.push('*');
        }
    }
    out
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
        let mut v = Value::int64(13800138000);
        assert!(apply(Mask::Keep { first: 3, last: 4 }, &mut v));
        assert_eq!(v, Value::string("138****8000"));
        let mut v = Value::string("secret");
        assert!(apply(Mask::Redact, &mut v));
        assert_eq!(v, Value::null());
        let mut v = Value::null();
        assert!(!apply(Mask::Keep { first: 1, last: 1 }, &mut v));
        let mut v = Value::string("x");
        assert!(!apply(Mask::None, &mut v));
    }
}
