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
//!
//! Size: ~700 lines and 60 of tests: one append-only file format (segments, checkpoints, rotation,
//! retention, torn-tail recovery) whose parts must agree byte for byte; its reader is `read`.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufRead, BufReader, Seek, SeekFrom},
    os::unix::fs::FileExt,
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

/// Encode one record as a chained line (with the newline). Returns (line, its hash).
pub fn encode(rec: &AuditRecord, seq: u64, prev: &str) -> io::Result<(Vec<u8>, String)> {
    let mut body = Vec::with_capacity(768);
    let hash = encode_into(&mut body, rec, seq, prev)?;
    Ok((body, hash))
}

/// Append one record's chained line to `out`; returns its hash.
///
/// The line is `{"seq":..,"prev":"..",<the record's own fields>,"hash":".."}`: the record is
/// serialised straight into `out` and its opening brace replaced by the chain fields (what
/// `#[serde(flatten)]` would write, without the intermediate map it builds).
fn encode_into(out: &mut Vec<u8>, rec: &AuditRecord, seq: u64, prev: &str) -> io::Result<String> {
    let start = out.len();
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.extend_from_slice(b",\"prev\":");
    serde_json::to_writer(&mut *out, prev).map_err(io::Error::other)?;
    let fields = out.len();
    serde_json::to_writer(&mut *out, rec).map_err(io::Error::other)?;
    // `{...}` -> `,...}` (or nothing more for a record with no fields: `{}` -> `}`).
    if out.len() - fields == 2 {
        out.remove(fields);
    } else {
        out[fields] = b',';
    }
    // The hash covers everything up to and including the closing brace.
    let hash = hex::encode(Sha256::digest(&out[start..]));
    out.pop();
    out.extend_from_slice(b",\"hash\":\"");
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\"}\n");
    Ok(hash)
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
    /// The `seq` of the checkpoint before this one (0 for the first), so that a checkpoint
    /// removed from the middle of the trail shows. Absent in trails written before it was
    /// added (their signatures cover the checkpoint without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<u64>,
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
    /// Zero-fill the live segment this many bytes ahead of its end (0: off). Closed
    /// segments are trimmed; a crash leaves NUL bytes after the last record, which
    /// recovery cuts like a torn tail.
    pub preallocate: u64,
    /// With shipping on (`audit.ship`): the last record the province database holds.
    /// Retention never deletes a segment with a record past it.
    pub shipped: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

/// The name of the lock file in an audit directory (`flock`ed by the one writer).
pub const LOCK_FILE: &str = "xgate.lock";

/// The exclusive claim on an audit directory: one writer per trail.
///
/// An `flock` on `<dir>/xgate.lock`, holding the writer's pid for whoever is refused. The
/// kernel drops the lock when its process ends, however it ends (`kill -9` included), so a
/// lock left by a dead process is recovered by the next start without any guessing about
/// pids; the stale pid in the file is simply overwritten.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Take the lock, or say which process holds it.
    pub fn take(dir: &Path) -> io::Result<DirLock> {
        use std::io::Write;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                let who = if holder.is_empty() {
                    "another process".to_owned()
                } else {
                    format!("another xgate (pid {holder})")
                };
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "in use by {who}: one gateway writes one audit trail; give this one its own `audit.dir`"
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        file.set_len(0)?;
        file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)?;
        file.flush()?;
        Ok(DirLock { _file: file })
    }
}

/// The open trail: current segment and chain state.
pub struct Store {
    /// Held for as long as the store is open.
    _lock: DirLock,
    dir: PathBuf,
    settings: StoreSettings,
    signer: ring::signature::Ed25519KeyPair,
    file: File,
    seg_no: u64,
    /// Where the next record goes: the end of the records (the file may be longer, zeros).
    seg_len: u64,
    /// The file's length: `seg_len` plus the zero-filled space ahead.
    file_len: u64,
    opened: Instant,
    seq: u64,
    last_hash: String,
    /// The last checkpoint written: (seq, hash), (0, GENESIS) before the first.
    checkpoint: (u64, String),
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// The encoding buffer, reused from batch to batch.
    buf: Vec<u8>,
    /// The last record known to be on disk (fsync'd): what a shipper may send on.
    durable: std::sync::Arc<std::sync::atomic::AtomicU64>,
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
        // Before anything is read or cut: a second writer would cut the first one's live
        // tail as torn and overwrite its records.
        let lock = DirLock::take(dir)?;
        let segs = segments(dir)?;
        let mut rec = Recovered::default();
        let seg_no = segs.last().map_or(1, |s| s.0);
        let (mut state, mut checkpoint) = (None, None);
        // The chain state is the newest record (or checkpoint) found, newest segment first;
        // the last checkpoint may sit a segment further back (an empty live segment).
        for (n, path) in segs.iter().rev() {
            let tail = scan_tail(path)?;
            if *n == seg_no && tail.tail_bytes > 0 {
                // Only bytes after the last complete line: a write the crash cut short, or
                // preallocated space never written. Anything before it stays, damaged or not,
                // for `audit verify` to report.
                let f = OpenOptions::new().write(true).open(path)?;
                let len = f.metadata()?.len();
                f.set_len(len - tail.tail_bytes)?;
                f.sync_all()?;
                rec.torn_bytes = tail.torn_bytes;
            }
            state = state.or(tail.state);
            checkpoint = checkpoint.or(tail.checkpoint);
            if state.is_some() && checkpoint.is_some() {
                break;
            }
        }
        let (seq, last_hash) = state.unwrap_or((0, GENESIS.to_owned()));
        let checkpoint = checkpoint.unwrap_or((0, GENESIS.to_owned()));
        check_head(dir, &signer, seg_no, &checkpoint)?;
        let path = segment_path(dir, seg_no);
        let mut file = open_segment(&path)?;
        let seg_len = file.seek(SeekFrom::End(0))?;
        rec.segment = seg_no;
        rec.last_seq = seq;
        let mut store = Store {
            _lock: lock,
            dir: dir.to_owned(),
            settings,
            signer,
            file,
            seg_no,
            seg_len,
            file_len: seg_len,
            opened: Instant::now(),
            seq,
            last_hash,
            checkpoint,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            buf: Vec::new(),
            // What survived to this start is what there is.
            durable: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(seq)),
        };
        store.write_head()?;
        Ok((store, rec))
    }

    /// Sign and store the head: the last checkpoint and the live segment.
    fn write_head(&mut self) -> io::Result<()> {
        let head = super::head::Head {
            checkpoint_seq: self.checkpoint.0,
            checkpoint_hash: self.checkpoint.1.clone(),
            segment: self.seg_no,
            time: super::now_rfc3339(),
        };
        super::head::write(&self.dir, head, &self.signer)
    }

    /// After a checkpoint or rotation: a head that cannot be written leaves the previous one,
    /// which still holds the trail to everything before it; the next checkpoint tries again.
    fn update_head(&mut self) {
        if let Err(e) = self.write_head() {
            metrics::counter!("xgate_audit_write_errors_total").increment(1);
            tracing::warn!(error = %e, "audit head not updated; will retry at the next checkpoint");
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.seq
    }

    /// The last record on disk (fsync'd), kept current as the trail is written.
    pub fn durable(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.durable.clone()
    }

    fn synced(&self) {
        self.durable
            .store(self.seq, std::sync::atomic::Ordering::Release);
    }

    /// Append records as one write (and one fsync when `sync`). All or nothing: on error the
    /// segment is cut back and the chain state is unchanged, so the caller may retry.
    pub fn append<'r>(
        &mut self,
        recs: impl ExactSizeIterator<Item = &'r AuditRecord>,
        sync: bool,
    ) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.reserve(recs.len() * 768);
        let (mut seq, mut hash) = (self.seq, self.last_hash.clone());
        for r in recs {
            seq += 1;
            hash = encode_into(&mut buf, r, seq, &hash)?;
        }
        let written = self.write_all(&buf, sync);
        // Keep the buffer for the next batch unless a burst made it large.
        if buf.capacity() <= 256 * 1024 {
            self.buf = buf;
        }
        written?;
        self.since_checkpoint += seq - self.seq;
        self.seq = seq;
        self.last_hash = hash;
        if sync {
            self.synced();
        }
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8], sync: bool) -> io::Result<()> {
        let end = self.seg_len + buf.len() as u64;
        let res = self
            .reserve(end)
            .and_then(|()| self.file.write_all_at(buf, self.seg_len))
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        match res {
            Ok(()) => {
                self.seg_len = end;
                self.file_len = self.file_len.max(end);
                Ok(())
            }
            Err(e) => {
                // Cut whatever part of the batch reached the file (and the space ahead).
                let _ = self.file.set_len(self.seg_len);
                self.file_len = self.seg_len;
                Err(e)
            }
        }
    }

    /// With preallocation on: make sure the file is zero-filled up to at least `end`, a
    /// whole chunk ahead. The next `sync_data` flushes the zeros and the new length once;
    /// the syncs after it only flush the records written over the zeros.
    fn reserve(&mut self, end: u64) -> io::Result<()> {
        let chunk = self.settings.preallocate;
        if chunk == 0 || end <= self.file_len {
            return Ok(());
        }
        let target = end + chunk;
        let zeros = [0u8; 64 * 1024];
        let mut at = self.file_len.max(self.seg_len);
        while at < target {
            let n = (target - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.file_len = target;
        Ok(())
    }

    /// Cut the zero-filled space after the records (before a segment is closed).
    fn trim(&mut self) -> io::Result<()> {
        if self.file_len > self.seg_len {
            self.file.set_len(self.seg_len)?;
            self.file_len = self.seg_len;
        }
        Ok(())
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
            prev: Some(self.checkpoint.0),
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
        self.checkpoint = (self.seq, self.last_hash.clone());
        // The head names only a durable checkpoint.
        if sync {
            self.synced();
            self.update_head();
        }
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
        self.trim()?;
        self.file.sync_all()?;
        let next = segment_path(&self.dir, self.seg_no + 1);
        self.file = open_segment(&next)?;
        self.seg_no += 1;
        self.seg_len = 0;
        self.file_len = 0;
        self.opened = Instant::now();
        self.update_head();
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
        let shipped = self
            .settings
            .shipped
            .as_ref()
            .map(|s| s.load(std::sync::atomic::Ordering::Acquire));
        for (i, (n, p)) in segs.iter().enumerate() {
            let (n, p) = (*n, p.clone());
            if n >= self.seg_no {
                continue;
            }
            // Shipping on: only once every record in it is in the database (the next
            // segment's first record is at most one past what was shipped).
            if let Some(shipped) = shipped {
                // (Segments without records are skipped; past the last one, the next
                // record to be written.)
                let next_first = segs[i + 1..]
                    .iter()
                    .find_map(|(_, q)| first_record_seq(q))
                    .unwrap_or(self.seq + 1);
                if next_first.saturating_sub(1) > shipped {
                    continue;
                }
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
        let _ = self.trim();
        let _ = self.file.sync_all();
        let next = segment_path(&self.dir, self.seg_no + 1);
        let file = open_segment(&next)?;
        self.file = file;
        self.seg_no += 1;
        self.seg_len = 0;
        self.file_len = 0;
        self.opened = Instant::now();
        self.update_head();
        Ok(())
    }

    /// fsync the current segment.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.synced();
        Ok(())
    }

    /// Final checkpoint and fsync.
    pub fn close(mut self) -> io::Result<()> {
        self.maybe_checkpoint(true, true)?;
        self.trim()?;
        self.file.sync_all()
    }
}

/// The `seq` of a segment's first record, if it has one.
fn first_record_seq(path: &Path) -> Option<u64> {
    let mut r = BufReader::new(File::open(path).ok()?);
    let mut line = String::new();
    for _ in 0..4 {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line.starts_with("{\"checkpoint\"") {
            continue;
        }
        if let Some((seq, _)) = parse_state(line.trim_end()) {
            return Some(seq);
        }
    }
    None
}

/// Refuse to continue a trail that ends before its head: writing on would replace the head
/// with the cut trail's state and hide the cut.
fn check_head(
    dir: &Path,
    signer: &ring::signature::Ed25519KeyPair,
    newest_segment: u64,
    checkpoint: &(u64, String),
) -> io::Result<()> {
    use ring::signature::KeyPair;
    let refuse = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{why}; run `xgate audit verify` on it, keep it as evidence and start the gateway on a new `audit.dir`"
            ),
        )
    };
    let Some(file) = super::head::read(&dir.join(super::head::HEAD_FILE))
        .map_err(|e| refuse(format!("head.json is unreadable ({e})")))?
    else {
        // A trail from before heads existed, or a new one.
        return Ok(());
    };
    let head = super::head::check(&file, signer.public_key().as_ref()).map_err(refuse)?;
    if newest_segment < head.segment {
        return Err(refuse(format!(
            "the trail's newest segment is {newest_segment} but its head names segment {}: segments were deleted",
            head.segment
        )));
    }
    if checkpoint.0 < head.checkpoint_seq
        || (checkpoint.0 == head.checkpoint_seq && checkpoint.1 != head.checkpoint_hash)
    {
        return Err(refuse(format!(
            "the trail's last checkpoint is at record {} but its head names record {}: signed records were cut",
            checkpoint.0, head.checkpoint_seq
        )));
    }
    Ok(())
}

impl Store {
    /// The last checkpoint written: (seq, hash).
    pub fn last_checkpoint(&self) -> (u64, &str) {
        (self.checkpoint.0, &self.checkpoint.1)
    }
}

/// Open (or create) a segment for writing. Records are written at the store's own offset
/// (`pwrite`), not in append mode, so that preallocated zeros can be written over.
fn open_segment(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

/// What the end of a segment holds.
struct Tail {
    /// The last (seq, hash) stated by a complete record or checkpoint line.
    state: Option<(u64, String)>,
    /// The last checkpoint's (seq, hash).
    checkpoint: Option<(u64, String)>,
    /// Bytes after the last complete line: a write a crash cut short, or preallocated space
    /// never written (NUL bytes). Only these are ever cut, and only in the newest segment.
    tail_bytes: u64,
    /// How many of those are not NUL (a torn record rather than unused space).
    torn_bytes: u64,
}

fn scan_tail(path: &Path) -> io::Result<Tail> {
    let mut r = BufReader::new(File::open(path)?);
    let mut t = Tail {
        state: None,
        checkpoint: None,
        tail_bytes: 0,
        torn_bytes: 0,
    };
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r.read_until(b'\n', &mut line)? as u64;
        if n == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            t.tail_bytes = n;
            t.torn_bytes = if line.iter().all(|b| *b == 0) { 0 } else { n };
            break;
        }
        let Some(text) = std::str::from_utf8(&line).ok().map(str::trim_end) else {
            continue;
        };
        if let Some(s) = parse_state(text) {
            if text.starts_with("{\"checkpoint\"") {
                t.checkpoint = Some(s.clone());
            }
            t.state = Some(s);
        }
    }
    Ok(t)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::{Arc, atomic::AtomicU64};

    fn signer() -> ring::signature::Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    /// Retention never deletes a segment the province database does not hold yet.
    #[test]
    fn retention_waits_for_shipping() {
        let dir = tempfile::tempdir().unwrap();
        let shipped = Arc::new(AtomicU64::new(0));
        let settings = StoreSettings {
            segment_max_bytes: 1 << 20,
            segment_max_age: Duration::from_secs(3600),
            retention: Some(Duration::ZERO),
            checkpoint_every_records: 1000,
            checkpoint_interval: Duration::from_secs(3600),
            preallocate: 0,
            shipped: Some(shipped.clone()),
        };
        let (mut store, _) = Store::open(dir.path(), settings, signer()).unwrap();
        let rec = AuditRecord {
            time: "2026-12-01T00:00:00.000Z".into(),
            ..AuditRecord::default()
        };
        for _ in 0..3 {
            store.append([&rec, &rec].into_iter(), true).unwrap();
            std::thread::sleep(Duration::from_millis(5));
            store.rotate().unwrap();
        }
        // Six records in three closed segments, none shipped: all kept.
        assert_eq!(segments(dir.path()).unwrap().len(), 4);
        // The first segment's records (1, 2) shipped: only it may go.
        shipped.store(2, std::sync::atomic::Ordering::Release);
        store.append([&rec].into_iter(), true).unwrap();
        store.rotate().unwrap();
        let left: Vec<u64> = segments(dir.path()).unwrap().iter().map(|s| s.0).collect();
        assert_eq!(left, [2, 3, 4, 5], "{left:?}");
        // Everything shipped: every closed segment past retention goes.
        shipped.store(7, std::sync::atomic::Ordering::Release);
        store.rotate().unwrap();
        let left: Vec<u64> = segments(dir.path()).unwrap().iter().map(|s| s.0).collect();
        assert_eq!(left, [6], "only the live segment: {left:?}");
        store.close().unwrap();
    }
}
