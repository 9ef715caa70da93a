//! The audit trail on disk: append-only segment files of hash-chained JSON lines, signed
//! checkpoints, rotation, retention, and recovery of a torn tail after a crash.
//!
//! A record line is the record's JSON with `seq` (1, 2, 3, ... across segments and restarts),
//! `prev` (the previous record's hash) and, last, `hash` = SHA-256 of the line's own bytes up
//! to (not including) `,"hash":`, closed with `}`. Editing any byte breaks that record's hash;
//! removing or reordering records breaks the chain. A checkpoint line
//! `{"checkpoint":{...},"sig":...}` signs (Ed25519) the sequence number and hash reached, so a
//! record cannot be cut from the middle or the end of a checkpointed stretch unnoticed.
//! Segments are plain JSON lines: any log shipper can tail them.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuditRecord;

/// The hash before the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Domain separation for checkpoint signatures.
pub const CHECKPOINT_CONTEXT: &[u8] = b"xgate-audit-checkpoint:v1\n";

/// Where a segment lives: `audit-<n>.jsonl`, numbered from 1.
pub fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("audit-{n:08}.jsonl"))
}

/// Every segment in `dir`, in order.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(n) = name
            .strip_prefix("audit-")
            .and_then(|r| r.strip_suffix(".jsonl"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, p));
        }
    }
    out.sort();
    Ok(out)
}

#[derive(Serialize)]
struct Envelope<'a> {
    seq: u64,
    prev: &'a str,
    #[serde(flatten)]
    rec: &'a AuditRecord,
}

/// Encode one record as a chained line (with the newline). Returns (line, its hash).
pub fn encode(rec: &AuditRecord, seq: u64, prev: &str) -> io::Result<(Vec<u8>, String)> {
    let mut body = serde_json::to_vec(&Envelope { seq, prev, rec }).map_err(io::Error::other)?;
    // body is `{...}`: hash everything before the closing brace, plus the brace.
    let hash = hex::encode(Sha256::digest(&body));
    body.pop();
    body.extend_from_slice(b",\"hash\":\"");
    body.extend_from_slice(hash.as_bytes());
    body.extend_from_slice(b"\"}\n");
    Ok((body, hash))
}

/// Split a record line into (hashed bytes, stated hash), or `None` if it is not one.
pub fn split_hash(line: &str) -> Option<(String, &str)> {
    const TAIL: usize = ",\"hash\":\"".len() + 64 + "\"}".len();
    if line.len() < TAIL + 2 || !line.ends_with("\"}") {
        return None;
    }
    let cut = line.len() - TAIL;
    let (body, tail) = line.split_at(cut);
    let hash = tail.strip_prefix(",\"hash\":\"")?.strip_suffix("\"}")?;
    if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((format!("{body}}}"), hash))
}

/// What a checkpoint signs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    /// The last record covered.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    pub time: String,
    pub segment: u64,
}

#[derive(Serialize, Deserialize)]
pub struct CheckpointLine {
    pub checkpoint: Checkpoint,
    /// base64 Ed25519 signature over `CHECKPOINT_CONTEXT` + the checkpoint's JSON.
    pub sig: String,
}

/// The bytes a checkpoint signature covers.
pub fn checkpoint_message(c: &Checkpoint) -> io::Result<Vec<u8>> {
    let mut m = CHECKPOINT_CONTEXT.to_vec();
    m.extend(serde_json::to_vec(c).map_err(io::Error::other)?);
    Ok(m)
}

/// Rotation, retention and checkpoint settings.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    pub segment_max_bytes: u64,
    pub segment_max_age: Duration,
    /// Delete segments older than this (by modification time); `None` keeps everything.
    pub retention: Option<Duration>,
    pub checkpoint_every_records: u64,
    pub checkpoint_interval: Duration,
}

/// The open trail: current segment and chain state.
pub struct Store {
    dir: PathBuf,
    settings: StoreSettings,
    signer: ring::signature::Ed25519KeyPair,
    file: File,
    seg_no: u64,
    seg_len: u64,
    opened: Instant,
    seq: u64,
    last_hash: String,
    since_checkpoint: u64,
    last_checkpoint: Instant,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("segment", &self.seg_no)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

/// What recovery found when opening a trail.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    pub segment: u64,
    pub last_seq: u64,
    /// Bytes of a torn last line cut from the newest segment.
    pub torn_bytes: u64,
}

impl Store {
    /// Open the trail in `dir`: continue the newest segment after cutting a torn tail, or
    /// start the first.
    pub fn open(
        dir: &Path,
        settings: StoreSettings,
        signer: ring::signature::Ed25519KeyPair,
    ) -> io::Result<(Store, Recovered)> {
        std::fs::create_dir_all(dir)?;
        let segs = segments(dir)?;
        let mut rec = Recovered::default();
        let (seg_no, mut seq, mut last_hash) =
            (segs.last().map_or(1, |s| s.0), 0u64, GENESIS.to_owned());
        // The chain state is the newest record (or checkpoint) found, newest segment first.
        for (n, path) in segs.iter().rev() {
            let (state, torn) = scan_tail(path)?;
            if *n == seg_no && torn > 0 {
                let f = OpenOptions::new().write(true).open(path)?;
                let len = f.metadata()?.len();
                f.set_len(len - torn)?;
                f.sync_all()?;
                rec.torn_bytes = torn;
            }
            if let Some((s, h)) = state {
                seq = s;
                last_hash = h;
                break;
            }
        }
        let path = segment_path(dir, seg_no);
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        let seg_len = file.seek(SeekFrom::End(0))?;
        rec.segment = seg_no;
        rec.last_seq = seq;
        let store = Store {
            dir: dir.to_owned(),
            settings,
            signer,
            file,
            seg_no,
            seg_len,
            opened: Instant::now(),
            seq,
            last_hash,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
        };
        Ok((store, rec))
    }

    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// Append records as one write (and one fsync when `sync`). All or nothing: on error the
    /// segment is cut back and the chain state is unchanged, so the caller may retry.
    pub fn append(&mut self, recs: &[AuditRecord], sync: bool) -> io::Result<()> {
        let mut buf = Vec::with_capacity(recs.len() * 640);
        let (mut seq, mut hash) = (self.seq, self.last_hash.clone());
        for r in recs {
            seq += 1;
            let (line, h) = encode(r, seq, &hash)?;
            buf.extend_from_slice(&line);
            hash = h;
        }
        self.write_all(&buf, sync)?;
        self.since_checkpoint += seq - self.seq;
        self.seq = seq;
        self.last_hash = hash;
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8], sync: bool) -> io::Result<()> {
        let res = self
            .file
            .write_all(buf)
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        match res {
            Ok(()) => {
                self.seg_len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Cut whatever part of the batch reached the file.
                let _ = self.file.set_len(self.seg_len);
                Err(e)
            }
        }
    }

    /// Write a signed checkpoint if enough records or time passed (or `force`).
    pub fn maybe_checkpoint(&mut self, force: bool, sync: bool) -> io::Result<()> {
        let due = self.since_checkpoint >= self.settings.checkpoint_every_records
            || (self.since_checkpoint > 0
                && self.last_checkpoint.elapsed() >= self.settings.checkpoint_interval);
        if !(due || (force && self.since_checkpoint > 0)) {
            return Ok(());
        }
        let c = Checkpoint {
            seq: self.seq,
            hash: self.last_hash.clone(),
            time: super::now_rfc3339(),
            segment: self.seg_no,
        };
        let sig = self.signer.sign(&checkpoint_message(&c)?);
        let mut line = serde_json::to_vec(&CheckpointLine {
            checkpoint: c,
            sig: B64.encode(sig.as_ref()),
        })
        .map_err(io::Error::other)?;
        line.push(b'\n');
        self.write_all(&line, sync)?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Start a new segment if the current one is too big or too old (checkpointing first).
    pub fn maybe_rotate(&mut self) -> io::Result<bool> {
        if self.seg_len < self.settings.segment_max_bytes
            && self.opened.elapsed() < self.settings.segment_max_age
        {
            return Ok(false);
        }
        if self.seg_len == 0 {
            self.opened = Instant::now();
            return Ok(false);
        }
        self.rotate()?;
        Ok(true)
    }

    /// Close the current segment (checkpointed, synced) and open the next.
    pub fn rotate(&mut self) -> io::Result<()> {
        self.maybe_checkpoint(true, true)?;
        self.file.sync_all()?;
        let next = segment_path(&self.dir, self.seg_no + 1);
        self.file = OpenOptions::new().create(true).append(true).open(&next)?;
        self.seg_no += 1;
        self.seg_len = 0;
        self.opened = Instant::now();
        self.apply_retention();
        Ok(())
    }

    fn apply_retention(&self) {
        let Some(keep) = self.settings.retention else {
            return;
        };
        let Ok(segs) = segments(&self.dir) else {
            return;
        };
        for (n, p) in segs {
            if n >= self.seg_no {
                continue;
            }
            let old = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > keep);
            if old && std::fs::remove_file(&p).is_ok() {
                tracing::info!(segment = %p.display(), "audit segment past retention removed");
            }
        }
    }

    /// After a failed write: start a new segment without a checkpoint (the old file may be
    /// full or broken); the chain continues across it.
    pub fn rotate_after_failure(&mut self) -> io::Result<()> {
        let _ = self.file.sync_all();
        let next = segment_path(&self.dir, self.seg_no + 1);
        let file = OpenOptions::new().create(true).append(true).open(&next)?;
        self.file = file;
        self.seg_no += 1;
        self.seg_len = 0;
        self.opened = Instant::now();
        Ok(())
    }

    /// fsync the current segment.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Final checkpoint and fsync.
    pub fn close(mut self) -> io::Result<()> {
        self.maybe_checkpoint(true, true)?;
        self.file.sync_all()
    }
}

/// The last (seq, hash) in a segment, from its last good record or checkpoint line, and how
/// many bytes at its end are a torn last line (incomplete or unparsable). Only the very last
/// line is ever treated as torn: damage in the middle is left for `audit verify` to report.
fn scan_tail(path: &Path) -> io::Result<(Option<(u64, String)>, u64)> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut r = BufReader::new(f);
    let mut state = None;
    let mut pos = 0u64;
    let mut last_start = 0u64;
    let mut last_ok = true;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)? as u64;
        if n == 0 {
            break;
        }
        last_start = pos;
        pos += n;
        let complete = line.last() == Some(&b'\n');
        let parsed = std::str::from_utf8(&line)
            .ok()
            .map(str::trim_end)
            .and_then(parse_state);
        last_ok = complete && parsed.is_some();
        if let (true, Some(s)) = (complete, parsed) {
            state = Some(s);
        }
    }
    let torn = if last_ok || pos == 0 {
        0
    } else {
        len - last_start
    };
    Ok((state, torn))
}

/// (seq, hash) stated by a record or checkpoint line.
fn parse_state(line: &str) -> Option<(u64, String)> {
    if line.starts_with("{\"checkpoint\"") {
        let c: CheckpointLine = serde_json::from_str(line).ok()?;
        return Some((c.checkpoint.seq, c.checkpoint.hash));
    }
    let (_, hash) = split_hash(line)?;
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    let s: Seq = serde_json::from_str(line).ok()?;
    Some((s.seq, hash.to_owned()))
}
