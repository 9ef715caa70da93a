//! One trail for the province: each gateway replica ships its own committed records (and
//! checkpoints) into PostgreSQL, where `xgate audit verify --db` checks every replica's chain
//! and `audit search --db` reads them all.
//!
//! The local trail stays the durability point: a call's record is on the replica's disk
//! before its answer leaves, whether or not the database is up. The shipper tails the
//! segments behind the writer, up to the last record known fsync'd (never a record a power
//! cut could still take back), and inserts them in batches, each in one transaction,
//! idempotently on (replica, seq): after a crash or restart it resumes from what the database
//! already holds, and a batch sent twice lands once. It checks the chain as it goes — each
//! record's hash over its own line and its link to the one before, starting from the last
//! record the database holds — and stops shipping (loudly: `/ready` details, metrics, log)
//! rather than send a chain that does not continue what the database has.
//!
//! With the database down the gateway keeps serving on its local trail; the shipper retries
//! with back-off and catches up when it returns. How far behind it is shows as
//! `xgate_audit_ship_lag_records` / `_seconds` and in `/ready`.
//!
//! Not here: what a record is ([`super::store`]), reading the database back (`verify --db`,
//! `search --db`: [`super::db`]).

use std::{
    collections::HashSet,
    io::{self, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use time::OffsetDateTime;

use super::{db, store};

/// `audit.ship` in the gateway config.
#[derive(Debug, Clone)]
pub struct ShipSettings {
    /// `postgres://user@host:port/db` (its password from `password`).
    pub url: String,
    pub password: Option<String>,
    /// This replica's stable id (config, or the StatefulSet pod name).
    pub replica: String,
    /// Records per transaction, at most.
    pub batch_records: usize,
    /// How often to look for new records when caught up.
    pub interval: Duration,
}

/// What the shipper has done, for `/ready` and the metrics.
#[derive(Debug, Default)]
pub struct ShipState {
    /// The last record the database holds for this replica (retention keeps every segment
    /// past it: `StoreSettings::shipped`).
    pub shipped: Arc<AtomicU64>,
    /// The last record on the local disk.
    pub durable: Arc<AtomicU64>,
    /// Seconds between the newest durable record and the last shipped one (0 when caught up).
    pub lag_seconds: AtomicU64,
    pub connected: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    pub replica: String,
}

/// `/ready`'s view of shipping.
#[derive(Debug, Clone, Serialize)]
pub struct ShipStatus {
    pub replica: String,
    pub connected: bool,
    pub shipped_seq: u64,
    pub lag_records: u64,
    pub lag_seconds: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ShipState {
    pub fn status(&self) -> ShipStatus {
        let shipped = self.shipped.load(Ordering::Relaxed);
        ShipStatus {
            replica: self.replica.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            shipped_seq: shipped,
            lag_records: self.durable.load(Ordering::Acquire).saturating_sub(shipped),
            lag_seconds: self.lag_seconds.load(Ordering::Relaxed),
            error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn failed(&self, e: &str) {
        metrics::counter!("xgate_audit_ship_errors_total").increment(1);
        if let Ok(mut last) = self.last_error.lock() {
            if last.as_deref() != Some(e) {
                tracing::warn!(error = %e, "audit shipping: will retry");
            }
            *last = Some(e.to_owned());
        }
    }

    fn ok(&self) {
        if let Ok(mut last) = self.last_error.lock()
            && last.take().is_some()
        {
            tracing::info!("audit shipping: resumed");
        }
    }

    fn export(&self) {
        let s = self.status();
        metrics::gauge!("xgate_audit_ship_lag_records").set(s.lag_records as f64);
        metrics::gauge!("xgate_audit_ship_lag_seconds").set(s.lag_seconds as f64);
        metrics::gauge!("xgate_audit_ship_connected").set(if s.connected { 1.0 } else { 0.0 });
    }
}

/// One line of the trail the shipper read.
#[derive(Debug, Clone)]
pub(crate) enum Line {
    Record(Box<db::Row>),
    Checkpoint { seq: u64, text: String },
}

/// Parse one trail line (without its newline) into what the database keeps.
pub(crate) fn parse_line(text: &str) -> Result<Line, String> {
    if text.starts_with("{\"checkpoint\"") {
        let c: store::CheckpointLine =
            serde_json::from_str(text).map_err(|e| format!("unreadable checkpoint: {e}"))?;
        return Ok(Line::Checkpoint {
            seq: c.checkpoint.seq,
            text: text.to_owned(),
        });
    }
    db::Row::from_line(text).map(|r| Line::Record(Box::new(r)))
}

/// Reads the trail's segments in order from a position, only whole lines.
struct Tail {
    dir: PathBuf,
    segment: u64,
    offset: u64,
    /// Bytes of an unfinished line at the end of what was read.
    partial: Vec<u8>,
}

impl Tail {
    /// Positioned at the start of the segment holding the record after `after`.
    fn open(dir: &Path, after: u64) -> io::Result<Tail> {
        let segs = store::segments(dir)?;
        let mut segment = segs.first().map_or(1, |s| s.0);
        // The last segment whose first record is at or before the one wanted.
        for (n, path) in &segs {
            match first_seq(path)? {
                Some(first) if first <= after + 1 => segment = *n,
                Some(_) => break,
                None => {}
            }
        }
        Ok(Tail {
            dir: dir.to_owned(),
            segment,
            offset: 0,
            partial: Vec::new(),
        })
    }

    /// Whole lines read since the last call (at most `max` bytes of them).
    fn read(&mut self, max: usize) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        loop {
            let path = store::segment_path(&self.dir, self.segment);
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e),
            };
            f.seek(SeekFrom::Start(self.offset))?;
            let mut buf = Vec::new();
            f.by_ref().take(max as u64).read_to_end(&mut buf)?;
            // A preallocated segment is zero-filled past its records.
            let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
            self.offset += end as u64;
            self.partial.extend_from_slice(&buf[..end]);
            // Whole lines out, the unfinished one kept: one pass, and one move of what is
            // left (draining line by line moved the rest of a 4 MiB read once per line: it
            // was three quarters of the shipper's CPU).
            let mut start = 0;
            while let Some(nl) = self.partial[start..].iter().position(|b| *b == b'\n') {
                let line = &self.partial[start..start + nl];
                out.push(String::from_utf8_lossy(line).into_owned());
                start += nl + 1;
            }
            self.partial.drain(..start);
            if !out.is_empty() || end == max {
                return Ok(out);
            }
            // At the end of this segment: go on only when a newer one exists (this one is
            // then complete).
            let next = store::segment_path(&self.dir, self.segment + 1);
            if !next.exists() || !self.partial.is_empty() {
                return Ok(out);
            }
            self.segment += 1;
            self.offset = 0;
        }
    }
}

/// The `seq` of a segment's first record, if it has one.
fn first_seq(path: &Path) -> io::Result<Option<u64>> {
    let f = std::fs::File::open(path)?;
    let mut r = io::BufReader::new(f);
    let mut line = String::new();
    loop {
        line.clear();
        if io::BufRead::read_line(&mut r, &mut line)? == 0 {
            return Ok(None);
        }
        if let Ok(Line::Record(row)) = parse_line(line.trim_end_matches('\n')) {
            return Ok(Some(row.seq));
        }
    }
}

/// Ship the trail in `dir` until `stop` turns true, then once more (what is durable then).
pub async fn run(
    dir: PathBuf,
    s: ShipSettings,
    state: Arc<ShipState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let stopping = *stop.borrow();
        match ship_session(&dir, &s, &state, &mut stop).await {
            Ok(()) => return,
            Err(e) => {
                state.connected.store(false, Ordering::Relaxed);
                state.failed(&e);
                state.export();
                if stopping {
                    return;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Connect, find where the database is for this replica, and ship until stopped (`Ok`) or
/// something fails (`Err`: retried by [`run`]).
async fn ship_session(
    dir: &Path,
    s: &ShipSettings,
    state: &ShipState,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), String> {
    let pool = db::connect(&s.url, s.password.as_deref(), 2).await?;
    db::ensure_schema(&pool).await?;
    state.connected.store(true, Ordering::Relaxed);
    let (mut seq, mut hash) = db::last_shipped(&pool, &s.replica).await?;
    state.shipped.store(seq, Ordering::Relaxed);
    let mut tail = Tail::open(dir, seq).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut months = HashSet::new();
    let mut lines: Vec<Line> = Vec::new();
    loop {
        let durable = state.durable.load(Ordering::Acquire);
        // Read up to the durable record, no further: keep what is past it for later.
        fill(&mut tail, &mut lines, s, seq, &hash)?;
        let upto = lines
            .iter()
            .position(|l| matches!(l, Line::Record(r) if r.seq > durable))
            .unwrap_or(lines.len());
        let batch: Vec<Line> = lines.drain(..upto.min(s.batch_records)).collect();
        // Check the chain before anything is sent.
        let mut rows = Vec::new();
        let mut checkpoints = Vec::new();
        let (mut next_seq, mut next_hash) = (seq, hash.clone());
        for l in batch {
            match l {
                Line::Record(r) => {
                    if r.seq != next_seq + 1 || (next_seq > 0 && r.prev != next_hash) {
                        return Err(stopped(format!(
                            "replica {}: the local trail does not continue at record {} (after {}); shipping stopped (run `xgate audit verify`)",
                            s.replica, r.seq, next_seq
                        )));
                    }
                    if !r.hash_ok {
                        return Err(stopped(format!(
                            "replica {}: record {}'s hash does not match its line; shipping stopped",
                            s.replica, r.seq
                        )));
                    }
                    next_seq = r.seq;
                    next_hash = r.hash.clone();
                    rows.push(*r);
                }
                Line::Checkpoint { seq, text } => checkpoints.push((seq, text)),
            }
        }
        let shipped_rows = rows.len();
        let mut last_time = None;
        if !rows.is_empty() || !checkpoints.is_empty() {
            last_time = rows.last().map(|r| r.time);
            // The database works on this batch while the next one is read and parsed here
            // (one batch in flight: a batch is sent only once the one before committed, so
            // the database never holds a record without every one before it).
            let insert = {
                let (pool, replica) = (pool.clone(), s.replica.clone());
                let mut m = std::mem::take(&mut months);
                tokio::spawn(async move {
                    let r = db::insert(&pool, &replica, &rows, &checkpoints, &mut m).await;
                    (r, m)
                })
            };
            let ahead = fill(&mut tail, &mut lines, s, next_seq, &next_hash);
            let (r, m) = insert.await.map_err(|e| format!("audit shipping: {e}"))?;
            months = m;
            r?;
            ahead?;
            metrics::counter!("xgate_audit_shipped_records_total").increment(shipped_rows as u64);
            seq = next_seq;
            hash = next_hash;
            state.shipped.store(seq, Ordering::Relaxed);
            state.ok();
        }
        // Behind by the time between the newest durable record read and the last shipped.
        let lag = match (lines.first(), last_time) {
            (Some(Line::Record(pending)), Some(done)) => {
                (pending.time - done).whole_seconds().max(0) as u64
            }
            (Some(Line::Record(pending)), None) => (OffsetDateTime::now_utc() - pending.time)
                .whole_seconds()
                .max(0) as u64,
            _ => 0,
        };
        state.lag_seconds.store(lag, Ordering::Relaxed);
        state.export();
        let caught_up = lines.is_empty() && seq >= state.durable.load(Ordering::Acquire);
        if *stop.borrow() && caught_up {
            return Ok(());
        }
        if caught_up || lines.len() < s.batch_records && shipped_rows == 0 {
            tokio::select! {
                _ = tokio::time::sleep(s.interval) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

/// Read whole lines from `tail` into `lines` until a batch is there (or nothing more is),
/// skipping what the database already holds (up to `seq`, whose hash must be `hash`).
fn fill(
    tail: &mut Tail,
    lines: &mut Vec<Line>,
    s: &ShipSettings,
    seq: u64,
    hash: &str,
) -> Result<(), String> {
    while lines.len() < s.batch_records {
        let mut got = tail
            .read(4 << 20)
            .map_err(|e| format!("reading the trail: {e}"))?;
        if got.is_empty() {
            break;
        }
        for text in got.drain(..) {
            match parse_line(&text)? {
                Line::Record(r) if r.seq <= seq => {
                    // Already shipped: the first one after a restart must be the one the
                    // database ends with.
                    if r.seq == seq && r.hash != hash {
                        return Err(stopped(format!(
                            "replica {}: record {} in the database differs from the local trail; shipping stopped (run `xgate audit verify --db`)",
                            s.replica, r.seq
                        )));
                    }
                }
                l => lines.push(l),
            }
        }
    }
    Ok(())
}

/// A fault shipping must not paper over: said, and held until the operators look.
/// (`run` records it as the last error, shown in `/ready`.)
fn stopped(why: String) -> String {
    tracing::error!(error = %why, "audit shipping stopped");
    metrics::counter!("xgate_audit_ship_chain_errors_total").increment(1);
    why
}
