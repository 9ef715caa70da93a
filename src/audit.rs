//! The audit trail: one JSON-lines record per call, allowed or denied.
//!
//! Calls hand records to a bounded channel; a single writer thread owns the file and does all
//! the I/O (batching whatever is queued into one write + flush). When the queue is full, calls
//! wait: a slow disk slows callers down rather than losing records. When the writer is gone,
//! new calls are refused (`AUDIT_UNAVAILABLE`) before anything is asked of a provider.
//!
//! A [`Pending`] record is created when a call starts; if the call's future is dropped before
//! it finishes (client cancelled, drain timeout), the record is still written, with status
//! `CANCELLED`. Shutdown closes the channel; the writer drains it, flushes and fsyncs.
//!
//! Not yet here (see the durability issue): hash chaining, signed checkpoints, segment
//! rotation, fsync per response (`sync` mode), fail-closed on I/O errors with recovery.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::Instant,
};

use serde::Serialize;
use tokio::sync::mpsc;

/// The file records are appended to, inside the audit directory.
pub const AUDIT_FILE: &str = "audit.jsonl";

/// One call, as the audit trail records it.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct AuditRecord {
    /// RFC 3339 UTC, millisecond precision: when the call arrived.
    pub time: String,
    /// 32 hex digits; also returned to the caller as `x-xgate-trace-id`.
    pub trace_id: String,
    /// `/xgate.v1.DataExchange/Query`, ...
    pub method: String,
    pub consumer_dept: Option<String>,
    pub consumer_system: Option<String>,
    pub cert_fingerprint: Option<String>,
    pub remote_addr: Option<String>,
    pub token_subject: Option<String>,
    pub purpose: Option<String>,
    pub dataset: Option<String>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The rule that decided (grant id, share type, negative-list entry, ...).
    pub rule: Option<String>,
    /// `ErrorInfo.reason` when the call failed.
    pub reason: Option<String>,
    pub approval_ref: Option<String>,
    /// Extra detail for refusals outside a call (e.g. why a TLS handshake failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub fields_returned: Vec<String>,
    pub fields_masked: Vec<String>,
    pub rows: u64,
    /// Rows the provider sent outside the caller's row scope, withheld by the gateway.
    #[serde(skip_serializing_if = "is_zero")]
    pub rows_withheld: u64,
    /// gRPC status code name (`OK`, `PERMISSION_DENIED`, ...).
    pub grpc_status: &'static str,
    pub grpc_code: i32,
    pub latency_us: u64,
    pub policy_version: String,
}

/// Handle calls use to submit records. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<AuditRecord>,
}

/// The writer thread; [`AuditWriter::join`] waits for it to drain and sync.
#[derive(Debug)]
pub struct AuditWriter {
    handle: JoinHandle<io::Result<u64>>,
    pub path: PathBuf,
}

impl AuditWriter {
    /// Wait until every record submitted before the last [`AuditLog`] was dropped is written
    /// and synced. Returns how many records this writer wrote.
    pub fn join(self) -> io::Result<u64> {
        self.handle
            .join()
            .map_err(|_| io::Error::other("audit writer thread panicked"))?
    }
}

/// Open (append) `dir/audit.jsonl` and start the writer.
pub fn start(dir: &Path, queue_capacity: usize) -> io::Result<(AuditLog, AuditWriter)> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(AUDIT_FILE);
    let file = OpenOptions::new().create(true).append(true).open(&path)?;
    let (tx, rx) = mpsc::channel(queue_capacity.max(1));
    let handle = std::thread::Builder::new()
        .name("xgate-audit".into())
        .spawn(move || write_loop(file, rx))?;
    Ok((AuditLog { tx }, AuditWriter { handle, path }))
}

fn write_loop(file: File, mut rx: mpsc::Receiver<AuditRecord>) -> io::Result<u64> {
    let mut out = io::BufWriter::with_capacity(256 * 1024, file);
    let mut written = 0u64;
    let mut buf = Vec::with_capacity(64);
    // Block for one record, then take whatever else is queued: one write per batch.
    while let Some(first) = rx.blocking_recv() {
        buf.push(first);
        while buf.len() < 1024 {
            match rx.try_recv() {
                Ok(r) => buf.push(r),
                Err(_) => break,
            }
        }
        for r in buf.drain(..) {
            if let Err(e) = serde_json::to_writer(&mut out, &r) {
                tracing::error!(error = %e, trace_id = %r.trace_id, "audit record could not be serialized");
                continue;
            }
            out.write_all(b"\n")?;
            written += 1;
        }
        if let Err(e) = out.flush() {
            // Keep the records in the buffer and retry on the next batch; surfaced loudly.
            tracing::error!(error = %e, "audit write failed");
        }
    }
    out.flush()?;
    out.get_ref().sync_all()?;
    Ok(written)
}

impl AuditLog {
    /// Whether the writer can still take records.
    pub fn is_open(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Submit a record, waiting for room in the queue.
    pub async fn submit(&self, rec: AuditRecord) {
        if let Err(mpsc::error::SendError(rec)) = self.tx.send(rec).await {
            tracing::error!(trace_id = %rec.trace_id, "audit writer is gone; record lost");
        }
    }

    /// Submit from a synchronous context (a `Drop`): queue if there is room, else hand the
    /// wait to a task.
    fn submit_detached(&self, rec: AuditRecord) {
        match self.tx.try_send(rec) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(rec)) => {
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        let log = self.clone();
                        h.spawn(async move { log.submit(rec).await });
                    }
                    Err(_) => {
                        tracing::error!(trace_id = %rec.trace_id, "audit queue full outside the runtime; record lost")
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(rec)) => {
                tracing::error!(trace_id = %rec.trace_id, "audit writer is gone; record lost");
            }
        }
    }
}

/// A call's record in the making. Commit it with [`Pending::commit`]; if it is dropped
/// uncommitted, it is written anyway with status `CANCELLED`.
#[derive(Debug)]
pub struct Pending {
    log: AuditLog,
    started: Instant,
    pub rec: Option<AuditRecord>,
}

impl Pending {
    pub fn new(log: AuditLog, rec: AuditRecord) -> Self {
        Self {
            log,
            started: Instant::now(),
            rec: Some(rec),
        }
    }

    /// Mutable access to the record being built.
    pub fn rec(&mut self) -> &mut AuditRecord {
        self.rec.get_or_insert_with(AuditRecord::default)
    }

    /// Finish with the call's final status and submit.
    pub async fn commit(mut self, code: tonic::Code) {
        if let Some(mut rec) = self.rec.take() {
            finish(&mut rec, code, self.started);
            self.log.submit(rec).await;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            finish(&mut rec, tonic::Code::Cancelled, self.started);
            if rec.reason.is_none() {
                rec.reason = Some("CANCELLED".into());
            }
            self.log.submit_detached(rec);
        }
    }
}

fn finish(rec: &mut AuditRecord, code: tonic::Code, started: Instant) {
    rec.grpc_code = code as i32;
    rec.grpc_status = code_name(code);
    rec.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    if code != tonic::Code::Ok && rec.decision.is_empty() {
        rec.decision = "deny";
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&fmt)
        .unwrap_or_default()
}

/// A fresh W3C-format trace id (32 lowercase hex digits).
pub fn new_trace_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The canonical upper-case name of a gRPC code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Read every record of an audit directory (for tests and tools).
pub fn read_all(dir: &Path) -> io::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(dir.join(AUDIT_FILE))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(io::Error::other))
        .collect()
}
