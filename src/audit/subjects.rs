//! Whose data a call returned: the keyed hashes of the subject key of every row that left the
//! gateway, kept in the call's record so that "who looked at this person" is answered from
//! what was actually sent, not only from what was asked for (a region query returns people
//! it never named).
//!
//! The form is compact and exact for look-ups: each returned row's subject id is hashed to 64
//! bits with SipHash-1-3 under a key derived from the trail's subject key (so without that key
//! the hashes say nothing, and a look-up needs it too); a record holds its call's hashes
//! sorted and de-duplicated, written as 16 hex digits each, concatenated
//! (`returned_subjects`). A look-up hashes the id the same way and binary-searches: no false
//! negatives, and a false positive only if two of the province's ids collide in 64 bits
//! (about n² / 2⁶⁵: for 100 million ids, one chance in 3,700 that any pair does at all).
//!
//! Cost per returned row: decoding the subject cell, one SipHash of the id, 8
//! bytes while the call runs and 16 bytes in the record. A stream hands its hashes to the
//! trail in chunks of [`CHUNK`] distinct subjects (a record of kind `returned_subjects` with
//! the call's trace id), so neither its memory nor any one record grows with its length.
//!
//! Not here: the `s:` hashes of the subjects a filter *asked* for (`subjects`,
//! [`super::subject_hash`]), which stay as they were.

use serde::{Serialize, Serializer};
use siphasher::sip::SipHasher13;
use std::hash::Hasher;

/// Distinct subjects a stream's record holds before they are written out as a record of
/// their own (16 KiB of hex).
pub const CHUNK: usize = 1024;

/// The key returned-subject hashes are made with, derived from the trail's subject key.
#[derive(Clone, Copy)]
pub struct ReturnedKey([u8; 16]);

impl std::fmt::Debug for ReturnedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReturnedKey(..)")
    }
}

impl ReturnedKey {
    /// Derived from the subject key (`audit.subject_key_file`): HMAC-SHA256 of a fixed
    /// label, first 16 bytes.
    pub fn derive(subject_key: &ring::hmac::Key) -> ReturnedKey {
        let tag = ring::hmac::sign(subject_key, b"xgate returned-subjects v1");
        let mut k = [0u8; 16];
        k.copy_from_slice(&tag.as_ref()[..16]);
        ReturnedKey(k)
    }

    /// The 64-bit hash of one subject id.
    pub fn hash(&self, id: &str) -> u64 {
        let mut h = SipHasher13::new_with_key(&self.0);
        h.write(id.as_bytes());
        h.finish()
    }
}

/// The returned subjects of one record: hashes, sorted and de-duplicated when written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Returned(Vec<u64>);

impl Returned {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn extend(&mut self, hashes: impl IntoIterator<Item = u64>) {
        self.0.extend(hashes);
    }

    /// Sort and de-duplicate; whether there are at least [`CHUNK`] distinct subjects now.
    pub fn settle(&mut self) -> bool {
        self.0.sort_unstable();
        self.0.dedup();
        self.0.len() >= CHUNK
    }

    /// Take the hashes out (for a chunk record), leaving none.
    pub fn take(&mut self) -> Returned {
        Returned(std::mem::take(&mut self.0))
    }

    /// The record's text: sorted, distinct, 16 hex digits each.
    pub fn text(&self) -> String {
        let mut v = self.0.clone();
        v.sort_unstable();
        v.dedup();
        let mut s = String::with_capacity(v.len() * 16);
        for h in v {
            use std::fmt::Write;
            let _ = write!(s, "{h:016x}");
        }
        s
    }
}

impl Serialize for Returned {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text())
    }
}

/// Whether a record's `returned_subjects` text holds `hash` (binary search over its 16-digit
/// entries; a text that is not such a list holds nothing).
pub fn holds(text: &str, hash: u64) -> bool {
    let b = text.as_bytes();
    if !b.len().is_multiple_of(16) {
        return false;
    }
    let n = b.len() / 16;
    let at = |i: usize| {
        std::str::from_utf8(&b[i * 16..i * 16 + 16])
            .ok()
            .and_then(|h| u64::from_str_radix(h, 16).ok())
    };
    let (mut lo, mut hi) = (0usize, n);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match at(mid) {
            None => return false,
            Some(v) if v == hash => return true,
            Some(v) if v < hash => lo = mid + 1,
            Some(_) => hi = mid,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ReturnedKey {
        ReturnedKey::derive(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k"))
    }

    #[test]
    fn every_returned_id_is_found_and_others_are_not() {
        let k = key();
        let ids: Vec<String> = (0..5000).map(|i| format!("3301061990{i:08}")).collect();
        let mut r = Returned::default();
        r.extend(ids.iter().map(|i| k.hash(i)));
        r.extend(ids.iter().take(10).map(|i| k.hash(i))); // duplicates
        let text = r.text();
        assert_eq!(text.len(), 5000 * 16);
        assert!(ids.iter().all(|i| holds(&text, k.hash(i))));
        assert!((0..5000).all(|i| !holds(&text, k.hash(&format!("4401061990{i:08}")))));
        assert!(!holds("not hex at all!!", 1));
        assert!(!holds("abc", 0xabc));
    }

    #[test]
    fn the_hash_depends_on_the_key() {
        let other = ReturnedKey::derive(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"j"));
        assert_ne!(
            key().hash("330106199001010011"),
            other.hash("330106199001010011")
        );
    }

    #[test]
    fn settle_reports_a_full_chunk() {
        let mut r = Returned::default();
        r.extend((0..CHUNK as u64).chain(0..10));
        assert!(r.settle());
        assert_eq!(r.len(), CHUNK);
        let taken = r.take();
        assert!(r.is_empty() && taken.len() == CHUNK);
    }
}
