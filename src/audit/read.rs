//! Reading the trail: `xgate audit verify` (chain and checkpoint signatures) and
//! `xgate audit search` (by consumer, dataset, time, status, decision and data subject).

use std::{
    io::{self, BufRead, BufReader},
    path::Path,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::store::{CheckpointLine, GENESIS, checkpoint_message, segments, split_hash};

/// A healthy trail, summarised.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    pub segments: u64,
    pub records: u64,
    pub checkpoints: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Records after the last checkpoint (written since; not yet signed).
    pub unsigned_tail: u64,
}

/// The first damage found.
#[derive(Debug, Clone, Serialize)]
pub struct Damage {
    pub segment: String,
    pub line: u64,
    pub seq: Option<u64>,
    pub what: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.segment, self.line)?;
        if let Some(s) = self.seq {
            write!(f, " (record {s})")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// Check every segment in order: each record's hash, the chain (`prev`, consecutive `seq`),
/// and every checkpoint's signature and position. Stops at the first damage.
pub fn verify(dir: &Path, public_key: &[u8]) -> io::Result<Result<VerifyReport, Damage>> {
    let key = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key);
    let mut rep = VerifyReport::default();
    let mut prev: Option<(u64, String)> = None;
    for (_, path) in segments(dir)? {
        rep.segments += 1;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let r = BufReader::new(std::fs::File::open(&path)?);
        for (i, line) in r.split(b'\n').enumerate() {
            let line = line?;
            // The live segment's preallocated space (`audit.preallocate_bytes`): no records.
            if !line.is_empty() && line.iter().all(|b| *b == 0) {
                break;
            }
            let lineno = i as u64 + 1;
            let damage = |seq: Option<u64>, what: String| Damage {
                segment: name.clone(),
                line: lineno,
                seq,
                what,
            };
            let Ok(text) = std::str::from_utf8(&line) else {
                return Ok(Err(damage(None, "not UTF-8 text".into())));
            };
            if text.is_empty() {
                continue;
            }
            if text.starts_with("{\"checkpoint\"") {
                let Ok(c) = serde_json::from_str::<CheckpointLine>(text) else {
                    return Ok(Err(damage(None, "unreadable checkpoint".into())));
                };
                let sig = B64.decode(&c.sig).unwrap_or_default();
                if key
                    .verify(&checkpoint_message(&c.checkpoint)?, &sig)
                    .is_err()
                {
                    return Ok(Err(damage(
                        Some(c.checkpoint.seq),
                        "checkpoint signature does not verify (forged or edited)".into(),
                    )));
                }
                match &prev {
                    Some((s, h)) if *s == c.checkpoint.seq && *h == c.checkpoint.hash => {}
                    Some((s, _)) => {
                        return Ok(Err(damage(
                            Some(c.checkpoint.seq),
                            format!(
                                "checkpoint signs record {} but the chain is at record {s}: records were removed or inserted",
                                c.checkpoint.seq
                            ),
                        )));
                    }
                    None if c.checkpoint.seq == 0 => {}
                    // A trail whose older segments were removed by retention starts at a checkpoint.
                    None => prev = Some((c.checkpoint.seq, c.checkpoint.hash.clone())),
                }
                rep.checkpoints += 1;
                rep.unsigned_tail = 0;
                continue;
            }
            let Some((body, stated)) = split_hash(text) else {
                return Ok(Err(damage(
                    None,
                    "not an audit record line (truncated or edited)".into(),
                )));
            };
            #[derive(serde::Deserialize)]
            struct Head {
                seq: u64,
                prev: String,
            }
            let Ok(head) = serde_json::from_str::<Head>(text) else {
                return Ok(Err(damage(None, "record without seq/prev".into())));
            };
            let actual = hex::encode(Sha256::digest(body.as_bytes()));
            if actual != stated {
                return Ok(Err(damage(
                    Some(head.seq),
                    "content does not match its hash (edited)".into(),
                )));
            }
            match &prev {
                None => {
                    if head.seq == 1 && head.prev != GENESIS {
                        return Ok(Err(damage(
                            Some(1),
                            "first record does not start the chain".into(),
                        )));
                    }
                    rep.first_seq = head.seq;
                }
                Some((s, h)) => {
                    if head.seq != s + 1 {
                        return Ok(Err(damage(
                            Some(head.seq),
                            format!(
                                "expected record {} here: {} record(s) missing or reordered",
                                s + 1,
                                head.seq.abs_diff(s + 1)
                            ),
                        )));
                    }
                    if head.prev != *h {
                        return Ok(Err(damage(
                            Some(head.seq),
                            "does not chain to the previous record".into(),
                        )));
                    }
                }
            }
            prev = Some((head.seq, stated.to_owned()));
            rep.records += 1;
            rep.unsigned_tail += 1;
            rep.last_seq = head.seq;
        }
    }
    Ok(Ok(rep))
}

/// What to look for.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub consumer: Option<String>,
    pub dataset: Option<String>,
    /// RFC 3339 bounds (inclusive since, exclusive until); compared as text (same format).
    pub since: Option<String>,
    pub until: Option<String>,
    /// gRPC status name (`OK`, `PERMISSION_DENIED`, ...).
    pub status: Option<String>,
    pub decision: Option<String>,
    /// Keyed hash of the data subject's id (see [`super::subject_hash`]).
    pub subject: Option<String>,
}

impl Query {
    pub fn matches(&self, r: &serde_json::Value) -> bool {
        let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let time = s("time");
        self.consumer
            .as_deref()
            .is_none_or(|c| s("consumer_dept") == c)
            && self.dataset.as_deref().is_none_or(|d| s("dataset") == d)
            && self.since.as_deref().is_none_or(|t| time >= t)
            && self.until.as_deref().is_none_or(|t| time < t)
            && self
                .status
                .as_deref()
                .is_none_or(|st| s("grpc_status").eq_ignore_ascii_case(st))
            && self.decision.as_deref().is_none_or(|d| s("decision") == d)
            && self.subject.as_deref().is_none_or(|h| {
                r.get("subjects")
                    .and_then(|v| v.as_array())
                    .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(h)))
            })
    }
}

/// Every record (not checkpoint) in the trail that matches, oldest first.
pub fn search(dir: &Path, q: &Query, mut each: impl FnMut(serde_json::Value)) -> io::Result<u64> {
    let mut n = 0;
    for (_, path) in segments(dir)? {
        // Bytes, not `lines()`: the live segment's last line may be half written (and cut
        // inside a multi-byte character); like any unparsable line it is skipped, not an error.
        for line in BufReader::new(std::fs::File::open(&path)?).split(b'\n') {
            let line = line?;
            if line.is_empty() || line.starts_with(b"{\"checkpoint\"") {
                continue;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            if q.matches(&v) {
                n += 1;
                each(v);
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_half_written_last_line_is_skipped_even_cut_inside_a_character() {
        let dir = tempfile::tempdir().unwrap();
        // A whole record, then one cut in the middle of a three-byte character (什 = e4 bb 80).
        let bytes = b"{\"seq\":1,\"trace_id\":\"a\"}\n{\"seq\":2,\"detail\":\"\xe4\xbb";
        std::fs::write(dir.path().join("audit-00000001.jsonl"), bytes).unwrap();
        let mut seen = Vec::new();
        let n = search(dir.path(), &Query::default(), |v| seen.push(v)).unwrap();
        assert_eq!(n, 1);
        assert_eq!(seen[0]["trace_id"], "a");
    }
}
