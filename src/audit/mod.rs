//! The audit trail: one record per call, allowed or denied, that loses nothing and cannot be
//! quietly changed.
//!
//! Calls hand records to a bounded channel; a single writer owns the files ([`store`]:
//! hash-chained segments with signed checkpoints) and batches whatever is queued into one
//! write — and, in `sync` mode (the default), one fsync — before it answers the batch's
//! callers (group commit). A call's response leaves only after its record is on disk. The
//! writer runs on a thread of its own, or (`audit.writer: inline`) as a task of the serving
//! runtime ([`Placement`]).
//! In `async` mode records are written without waiting, within a bounded loss window.
//!
//! Fail-closed: when a write fails (disk full, I/O error), the trail is marked unhealthy, new
//! calls are refused (`AUDIT_UNAVAILABLE`), calls waiting on the failed batch are answered
//! `UNAVAILABLE` instead of their data (and recorded so), and the writer retries — in a new
//! segment — until writing works again, then resumes by itself.
//!
//! A [`Pending`] record is created when a call starts; if the call's future is dropped before
//! it finishes (client cancelled, drain timeout), the record is still written, with status
//! `CANCELLED`. Shutdown closes the channel; the writer drains it, checkpoints and fsyncs.
//!
//! Size: ~1,130 lines, kept together because the record, the handle calls submit to, the
//! held refusals and the writer loop share one protocol (submit ▸ batch ▸ write ▸ fsync ▸
//! acknowledge, or hand the record back): splitting them would spread one invariant — no
//! acknowledged record is lost — over several files. The disk format is in `store`, reading
//! and verifying in `read`, the signed head in `head`.

pub mod db;
pub mod head;
pub mod index;
pub mod read;
pub mod recent;
pub mod ship;
pub mod store;
pub mod subjects;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use store::StoreSettings;

/// One call, as the audit trail records it.
/// What the policy decided for a call, as its record says it.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Not decided yet: a call that ends so is recorded `deny` (`finish` and the record's
    /// drop see to it); only a record written before any decision (none today) keeps it.
    #[default]
    #[serde(rename = "")]
    Undecided,
    Allow,
    Deny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Undecided => "",
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct AuditRecord {
    /// RFC 3339 UTC, millisecond precision: when the call arrived.
    pub time: String,
    /// 32 hex digits; also returned to the caller as `x-xgate-trace-id`.
    pub trace_id: String,
    /// `/xgate.v1.DataExchange/Query`, ...
    pub method: String,
    pub consumer_dept: Option<Arc<str>>,
    pub consumer_system: Option<Arc<str>>,
    pub cert_fingerprint: Option<Arc<str>>,
    pub remote_addr: Option<Arc<str>>,
    pub token_subject: Option<String>,
    pub purpose: Option<String>,
    pub dataset: Option<String>,
    /// `allow` or `deny`.
    pub decision: Decision,
    /// The rule that decided (grant id, share type, negative-list entry, ...).
    pub rule: Option<Arc<str>>,
    /// `ErrorInfo.reason` when the call failed.
    pub reason: Option<String>,
    pub approval_ref: Option<Arc<str>>,
    /// Keyed hashes of the data subjects the call asked about (ids from the filter on the
    /// dataset's subject key), so "who looked at this person" is answerable without ids here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    /// Keyed hashes of the subject key of every row the call returned ([`subjects`]): whose
    /// data actually left, whatever the filter named. (A long stream writes them in chunks,
    /// records of kind `returned_subjects` with its trace id, and the rest here.)
    #[serde(skip_serializing_if = "subjects::Returned::is_empty")]
    pub returned_subjects: subjects::Returned,
    /// What the record is: a call (the default, not written) or [`Kind`]'s others.
    #[serde(skip_serializing_if = "Kind::is_call")]
    pub kind: Kind,
    /// An admin record's action (`policy.reload`, `admin.http`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Who or what did it: an admin caller, `sighup`, `file-watch`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// A policy reload's version before (`policy_version` is the one after).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    /// Extra detail for refusals outside a call (e.g. why a TLS handshake failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The fields the caller asked for (none: every field it may read), as asked: what
    /// `xgate policy impact` re-decides the call with.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields_requested: Vec<Arc<str>>,
    /// The shape of the caller's filter, one `field test` per condition (`eq`, `in`,
    /// `prefix`), with the values only for the dataset's region field (`region_code in
    /// 330106,330108`): enough to re-decide the call, nothing about a person.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<String>,
    /// Names shared with the policy snapshot that decided the call (no copy per call).
    pub fields_returned: Vec<Arc<str>>,
    pub fields_masked: Vec<Arc<str>>,
    pub rows: u64,
    /// Rows the provider sent outside the caller's row scope, withheld by the gateway.
    #[serde(skip_serializing_if = "is_zero")]
    pub rows_withheld: u64,
    /// A summary record: it stands for this many calls of one consumer refused with one
    /// reason between `time` and `until`, counted instead of recorded one by one (the trail
    /// could not be written and the memory for held records was full).
    #[serde(skip_serializing_if = "is_zero")]
    pub calls: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    /// For a call the caller cancelled or whose deadline passed: the last pipeline stage it
    /// reached (`authenticate`, `decide`, `limit`, `forward`, `shape`, `commit`, `relay`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reached: Option<&'static str>,
    /// The stage the call is in (kept current by the pipeline, recorded as `reached`).
    #[serde(skip)]
    pub stage: &'static str,
    /// The provider endpoint that answered (or the last one tried), for forwarded calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_endpoint: Option<String>,
    /// How many tries the provider call took (2: retried once on another endpoint).
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub upstream_tries: u32,
    /// gRPC status code name (`OK`, `PERMISSION_DENIED`, ...).
    pub grpc_status: &'static str,
    pub grpc_code: i32,
    pub latency_us: u64,
    /// The caller's `grpc-timeout`, when it sent one: a `latency_us` close to it means the
    /// answer reached the caller at the very end of its time, or after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_us: Option<u64>,
    pub policy_version: Arc<str>,
}

/// What a record stands for.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// One call (or a summary of refused calls): the default, not written.
    #[default]
    Call,
    /// A chunk of a long stream's returned subjects (`returned_subjects`), under its call's
    /// trace id, consumer and dataset; the call's own record follows it in the chain.
    ReturnedSubjects,
    /// An administrator's (or the deployment's) action on the gateway: `action` (what),
    /// `actor` (who or what triggered it), `decision` (`allow`: done, `deny`: refused) and
    /// `detail`; a policy reload also says `from_version` and `policy_version`.
    Admin,
}

impl Kind {
    pub fn is_call(&self) -> bool {
        *self == Kind::Call
    }
}

/// An admin record: `action` by `actor`, done (`allow`) or refused (`deny`), with `detail`.
pub fn admin_record(action: &str, actor: &str, done: bool, detail: Option<String>) -> AuditRecord {
    AuditRecord {
        time: now_rfc3339(),
        trace_id: hex::encode(rand::random::<[u8; 16]>()),
        method: format!("admin:{action}"),
        kind: Kind::Admin,
        action: Some(action.to_owned()),
        actor: Some(actor.to_owned()),
        decision: if done {
            Decision::Allow
        } else {
            Decision::Deny
        },
        detail,
        ..AuditRecord::default()
    }
}

/// `sync`: a call's record is fsync'd before its response; `async`: written without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    #[default]
    Sync,
    Async,
}

/// Where the writer's loop runs (`audit.writer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// A thread of its own (the default): the runtime never waits on the disk, and keeps
    /// serving while an fsync runs; each batch costs a wake-up of the writer and one back.
    #[default]
    Thread,
    /// A task on the serving runtime that writes and fsyncs in place, when the calls of the
    /// moment have handed in their records: no thread hand-offs (−15 to −25 % CPU per call on
    /// 2 vCPUs), but while an fsync runs nothing else on that runtime does. Each fsync's
    /// time then counts against the runtime's capacity (at 2,000 calls/s p99 rose 2–3× in
    /// one set of runs here, not in another), and a stalled disk stalls every connection
    /// and the admin endpoint.
    Inline,
}

/// How the trail is kept.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub dir: PathBuf,
    pub queue_capacity: usize,
    pub durability: Durability,
    pub store: StoreSettings,
    /// `async` mode: records reach the file at least this often, and are fsync'd at every
    /// checkpoint; this bounds what a crash can lose.
    pub async_flush: Duration,
    /// `sync` mode: after the first record of a batch, wait this long for more before the
    /// write and fsync (0: none, the default). A latency-for-CPU trade at moderate rates,
    /// where batches are otherwise one call each (PostgreSQL's `commit_delay`).
    pub group_commit: Duration,
    /// Where the writer runs.
    pub placement: Placement,
    /// Records held while the trail cannot be written; past this, refusals are tallied.
    pub held_records_max: usize,
}

impl AuditSettings {
    /// Defaults for everything but the directory.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            queue_capacity: 65_536,
            durability: Durability::Sync,
            store: StoreSettings {
                segment_max_bytes: 64 << 20,
                segment_max_age: Duration::from_secs(24 * 3600),
                retention: None,
                checkpoint_every_records: 1_000,
                checkpoint_interval: Duration::from_secs(10),
                preallocate: 0,
                shipped: None,
            },
            async_flush: Duration::from_millis(200),
            group_commit: Duration::ZERO,
            placement: Placement::Thread,
            held_records_max: 100_000,
        }
    }
}

/// The keys the trail uses.
pub struct AuditKeys {
    /// Signs checkpoints.
    pub signer: ring::signature::Ed25519KeyPair,
    /// Keys the data-subject hashes (optional: without it no subjects are recorded).
    pub subject: Option<ring::hmac::Key>,
}

impl std::fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditKeys").finish_non_exhaustive()
    }
}

impl AuditKeys {
    /// Load the Ed25519 signing key (PKCS#8 PEM) and the optional subject key file.
    pub fn load(signing_key: &Path, subject_key: Option<&Path>) -> Result<Self, String> {
        use rustls::pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
        let der = PrivatePkcs8KeyDer::from_pem_file(signing_key)
            .map_err(|e| format!("{}: not a PKCS#8 PEM key: {e}", signing_key.display()))?;
        let signer = ring::signature::Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| format!("{}: not an Ed25519 key: {e}", signing_key.display()))?;
        let subject = subject_key.map(load_subject_key).transpose()?;
        Ok(Self { signer, subject })
    }
}

/// The keyed hash recorded for a data subject's id: `s:` + 32 hex digits.
pub fn subject_hash(key: &ring::hmac::Key, id: &str) -> String {
    format!(
        "s:{}",
        hex::encode(&ring::hmac::sign(key, id.as_bytes()).as_ref()[..16])
    )
}

/// Load a subject key file for searching.
pub fn load_subject_key(p: &Path) -> Result<ring::hmac::Key, String> {
    let b = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        b.trim_ascii(),
    ))
}

type Ack = oneshot::Sender<Result<(), AuditRecord>>;

/// Handle calls use to submit records. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<(AuditRecord, Option<Ack>)>,
    /// Refusals counted rather than queued (the queue or the held records were full).
    tally: Arc<Tally>,
    healthy: Arc<AtomicBool>,
    durability: Durability,
    subject: Option<Arc<ring::hmac::Key>>,
    /// Keys the returned-subject hashes (derived from `subject`).
    returned: Option<subjects::ReturnedKey>,
    /// The last hour's calls, counted by the writer (the console's overview).
    recent: Arc<recent::Recent>,
}

/// The running writer (thread or task); [`AuditWriter::join`] waits for it to drain and sync.
#[derive(Debug)]
pub struct AuditWriter {
    handle: Writer,
    pub dir: PathBuf,
    /// The last record on disk (fsync'd): how far a shipper may read ([`ship`]).
    pub durable: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Debug)]
enum Writer {
    Thread(JoinHandle<std::io::Result<u64>>),
    Task(tokio::task::JoinHandle<std::io::Result<u64>>),
}

impl AuditWriter {
    /// Wait until every record submitted before the last [`AuditLog`] was dropped is written
    /// and synced. Returns how many records this writer wrote.
    pub async fn join(self) -> std::io::Result<u64> {
        match self.handle {
            Writer::Thread(h) => tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(std::io::Error::other)?
                .map_err(|_| std::io::Error::other("audit writer thread panicked"))?,
            Writer::Task(h) => h.await.map_err(std::io::Error::other)?,
        }
    }
}

/// Open the trail (recovering a torn tail) and start the writer.
pub fn start(settings: AuditSettings, keys: AuditKeys) -> std::io::Result<(AuditLog, AuditWriter)> {
    let (store, recovered) =
        store::Store::open(&settings.dir, settings.store.clone(), keys.signer)?;
    let durable = store.durable();
    if recovered.torn_bytes > 0 {
        tracing::warn!(
            segment = recovered.segment,
            bytes = recovered.torn_bytes,
            last_seq = recovered.last_seq,
            "audit trail: cut a torn last line left by a crash; the chain continues"
        );
    }
    let (tx, rx) = mpsc::channel(settings.queue_capacity.max(1));
    let healthy = Arc::new(AtomicBool::new(true));
    let tally = Arc::new(Tally::default());
    let h = healthy.clone();
    let s = settings.clone();
    let ta = tally.clone();
    let recent = Arc::new(recent::Recent::default());
    let re = recent.clone();
    let handle = match (settings.placement, tokio::runtime::Handle::try_current()) {
        (Placement::Thread, rt) => {
            let acker = rt.map_or(writer::Acker::Direct, |rt| writer::Acker::on(&rt));
            Writer::Thread(
                std::thread::Builder::new()
                    .name("xgate-audit".into())
                    .spawn(move || writer::run(store, rx, h, s, acker, ta, re))?,
            )
        }
        (Placement::Inline, Ok(rt)) => {
            tracing::info!("audit writer: inline on the serving runtime");
            Writer::Task(rt.spawn(writer::commit_loop(
                store,
                rx,
                h,
                s,
                writer::Acker::Direct,
                ta,
                re,
            )))
        }
        (Placement::Inline, Err(_)) => {
            return Err(std::io::Error::other(
                "audit.writer: inline needs a Tokio runtime to run on",
            ));
        }
    };
    metrics::gauge!("xgate_audit_healthy").set(1.0);
    Ok((
        AuditLog {
            tx,
            tally,
            healthy,
            recent,
            durability: settings.durability,
            returned: keys.subject.as_ref().map(subjects::ReturnedKey::derive),
            subject: keys.subject.map(Arc::new),
        },
        AuditWriter {
            handle,
            dir: settings.dir,
            durable,
        },
    ))
}

impl AuditLog {
    /// Whether the trail takes records now (fail-closed: calls are refused when not).
    pub fn is_open(&self) -> bool {
        !self.tx.is_closed() && self.healthy.load(Ordering::Relaxed)
    }

    /// The last hour's calls, as written.
    pub fn recent(&self) -> recent::Hour {
        self.recent.last_hour()
    }

    /// Records waiting for the writer.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// The keyed hash of a data subject's id, if the trail has a subject key.
    pub fn subject_hash(&self, id: &str) -> Option<String> {
        self.subject.as_deref().map(|k| subject_hash(k, id))
    }

    /// What a search for the subject `id` looks for, if the trail has a subject key.
    pub fn subject_lookup(&self, id: &str) -> Option<read::Subject> {
        self.subject.as_deref().map(|k| read::Subject::of(k, id))
    }

    /// The key of returned-subject hashes, if the trail has a subject key.
    pub fn returned_key(&self) -> Option<subjects::ReturnedKey> {
        self.returned
    }

    /// Submit a record. In `sync` mode, wait until it is on disk: `Err` gives the record back
    /// when it could not be written.
    pub async fn submit(&self, rec: AuditRecord) -> Result<(), AuditRecord> {
        match self.durability {
            Durability::Async => match self.tx.send((rec, None)).await {
                Ok(()) => Ok(()),
                Err(mpsc::error::SendError((rec, _))) => {
                    tracing::error!(trace_id = %rec.trace_id, "audit writer is gone; record lost");
                    Err(rec)
                }
            },
            Durability::Sync => {
                let trace_id = rec.trace_id.clone();
                let (ack, done) = oneshot::channel();
                if let Err(mpsc::error::SendError((rec, _))) = self.tx.send((rec, Some(ack))).await
                {
                    tracing::error!(trace_id = %rec.trace_id, "audit writer is gone; record lost");
                    return Err(rec);
                }
                match done.await {
                    Ok(r) => r,
                    // The writer dropped the record unanswered (it answers every record it
                    // takes, even at shutdown, so it died holding it): nothing says the record
                    // is on disk, so the call fails closed like any failed write.
                    Err(_) => {
                        tracing::error!(trace_id = %trace_id, "audit writer stopped without confirming the record; the call fails closed");
                        Err(AuditRecord {
                            trace_id,
                            ..AuditRecord::default()
                        })
                    }
                }
            }
        }
    }

    /// Queue a record only if there is room right now (records anyone can cause, which must
    /// never slow calls down). Returns whether it was queued.
    pub fn try_submit(&self, rec: AuditRecord) -> bool {
        self.tx.try_send((rec, None)).is_ok()
    }

    /// Keep a refusal's record without waiting: queued if there is room, else counted (per
    /// consumer and reason) into a summary record the writer writes as soon as it can. Memory
    /// stays bounded whatever the rate of refusals; only a trail that is shut down loses it.
    pub fn keep(&self, rec: AuditRecord) {
        match self.tx.try_send((rec, None)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full((rec, _))) => self.tally.add(&rec),
            Err(mpsc::error::TrySendError::Closed((rec, _))) => {
                metrics::counter!("xgate_audit_records_dropped_total").increment(1);
                tracing::error!(trace_id = %rec.trace_id, "audit writer is gone; record lost");
            }
        }
    }

    /// Submit without waiting (from a `Drop`, or a record the caller need not wait for):
    /// queue if there is room, else hand the wait to a task.
    pub fn submit_detached(&self, rec: AuditRecord) {
        match self.tx.try_send((rec, None)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full((rec, _))) => {
                match tokio::runtime::Handle::try_current() {
                    Ok(h) => {
                        let tx = self.tx.clone();
                        h.spawn(async move {
                            if tx.send((rec, None)).await.is_err() {
                                tracing::error!("audit writer is gone; record lost");
                            }
                        });
                    }
                    Err(_) => {
                        tracing::error!(trace_id = %rec.trace_id, "audit queue full outside the runtime; record lost")
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed((rec, _))) => {
                tracing::error!(trace_id = %rec.trace_id, "audit writer is gone; record lost");
            }
        }
    }
}

/// Records of refusals that anyone on the network can cause (refused TLS handshakes,
/// oversized metadata before any authentication): rate-limited (20/s, bursts of 100), the
/// rest counted into the next record written, and never waiting for room in the queue that
/// calls use.
#[derive(Debug)]
pub struct Refusals {
    audit: AuditLog,
    limiter: governor::DefaultDirectRateLimiter,
    suppressed: std::sync::atomic::AtomicU64,
}

/// Refusal records written per second, and at once, before the rest are counted instead.
const REFUSALS_PER_SECOND: std::num::NonZeroU32 = crate::limits::nonzero(20);
const REFUSALS_BURST: std::num::NonZeroU32 = crate::limits::nonzero(100);

impl Refusals {
    pub fn new(audit: AuditLog) -> Self {
        let quota = governor::Quota::per_second(REFUSALS_PER_SECOND).allow_burst(REFUSALS_BURST);
        Self {
            audit,
            limiter: governor::RateLimiter::direct(quota),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Record `rec`, unless over the rate: then it is counted, and the count is added to the
    /// `detail` of the next record that is written.
    pub fn record(&self, mut rec: AuditRecord) {
        if self.limiter.check().is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let n = self.suppressed.swap(0, Ordering::Relaxed);
        if n > 0 {
            let d = rec.detail.get_or_insert_with(String::new);
            d.push_str(&format!(
                " (+{n} similar refusals since the last record, not recorded one by one)"
            ));
        }
        if !self.audit.try_submit(rec) {
            metrics::counter!("xgate_audit_records_dropped_total").increment(1);
        }
    }
}

/// Refusals counted instead of recorded one by one, per (consumer, reason): what the
/// summary records say. Bounded: past [`Tally::MAX_KEYS`] distinct pairs, refusals are lost
/// and counted in `xgate_audit_records_dropped_total`.
#[derive(Debug, Default)]
struct Tally {
    counts: std::sync::Mutex<std::collections::BTreeMap<(String, String), Counted>>,
    /// Something to write (read without the lock on every turn of the writer).
    any: AtomicBool,
}

#[derive(Debug)]
struct Counted {
    calls: u64,
    /// When the first and the last counted call arrived.
    first: String,
    last: String,
    /// What the summary says besides the count (from the first call counted).
    sample: AuditRecord,
}

impl Tally {
    const MAX_KEYS: usize = 10_000;

    fn add(&self, rec: &AuditRecord) {
        let key = (
            rec.consumer_dept.as_deref().unwrap_or_default().to_owned(),
            rec.reason.clone().unwrap_or_default(),
        );
        let Ok(mut counts) = self.counts.lock() else {
            metrics::counter!("xgate_audit_records_dropped_total").increment(1);
            return;
        };
        let n = counts.len();
        match counts.entry(key) {
            std::collections::btree_map::Entry::Occupied(mut e) => {
                let c = e.get_mut();
                c.calls += 1;
                c.last.clone_from(&rec.time);
            }
            std::collections::btree_map::Entry::Vacant(_) if n >= Self::MAX_KEYS => {
                metrics::counter!("xgate_audit_records_dropped_total").increment(1);
                return;
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(Counted {
                    calls: 1,
                    first: rec.time.clone(),
                    last: rec.time.clone(),
                    sample: rec.clone(),
                });
            }
        }
        metrics::counter!("xgate_audit_refusals_summarized_total").increment(1);
        self.any.store(true, Ordering::Release);
    }

    /// Everything counted so far, as one summary record per (consumer, reason).
    fn drain(&self) -> Vec<AuditRecord> {
        if !self.any.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let Ok(mut counts) = self.counts.lock() else {
            return Vec::new();
        };
        std::mem::take(&mut *counts)
            .into_values()
            .map(|c| {
                let s = c.sample;
                let reason = s.reason.clone().unwrap_or_default();
                AuditRecord {
                    time: c.first.clone(),
                    until: Some(c.last.clone()),
                    trace_id: new_trace_id(),
                    method: "(refusals)".into(),
                    consumer_dept: s.consumer_dept,
                    decision: Decision::Deny,
                    rule: s.rule,
                    reason: s.reason,
                    detail: Some(format!(
                        "{} call(s) refused {reason} from {} to {}, counted instead of recorded one by one (the audit trail could not be written and its held records were full)",
                        c.calls, c.first, c.last
                    )),
                    calls: c.calls,
                    grpc_status: s.grpc_status,
                    grpc_code: s.grpc_code,
                    policy_version: s.policy_version,
                    ..AuditRecord::default()
                }
            })
            .collect()
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

    /// Finish with the call's final status and submit; in `sync` mode, wait until it is on
    /// disk. On failure the record comes back so the caller can answer (and record) the call
    /// as refused instead.
    pub async fn commit(mut self, code: tonic::Code) -> Result<(), AuditRecord> {
        match self.rec.take() {
            Some(mut rec) => {
                finish(&mut rec, code, self.started);
                self.log.submit(rec).await
            }
            None => Ok(()),
        }
    }

    /// Time since the call began.
    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The log this record goes to.
    pub fn log(&self) -> &AuditLog {
        &self.log
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            finish(&mut rec, tonic::Code::Cancelled, self.started);
            if rec.reason.is_none() {
                rec.reason = Some("CANCELLED".into());
            }
            if !rec.stage.is_empty() {
                rec.reached = Some(rec.stage);
            }
            self.log.submit_detached(rec);
        }
    }
}

fn finish(rec: &mut AuditRecord, code: tonic::Code, started: Instant) {
    rec.grpc_code = code as i32;
    rec.grpc_status = code_name(code);
    rec.latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    if code != tonic::Code::Ok && rec.decision == Decision::Undecided {
        rec.decision = Decision::Deny;
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
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

/// Read every record (not checkpoint) of an audit directory, oldest first (tests and tools).
/// Damaged lines are skipped: a reader that must know uses [`read::search`].
pub fn read_all(dir: &Path) -> std::io::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    read::search(dir, &read::Query::default(), |v| out.push(v))?;
    Ok(out)
}

mod writer {
    //! The writer thread: group commit, checkpoints, rotation, fail-closed with recovery.

    use super::*;

    pub(super) fn run(
        store: store::Store,
        rx: mpsc::Receiver<(AuditRecord, Option<Ack>)>,
        healthy: Arc<AtomicBool>,
        settings: AuditSettings,
        acker: Acker,
        tally: Arc<Tally>,
        recent: Arc<recent::Recent>,
    ) -> std::io::Result<u64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        rt.block_on(commit_loop(
            store, rx, healthy, settings, acker, tally, recent,
        ))
    }

    /// Who tells a durable batch's callers that their records are on disk.
    pub(super) enum Acker {
        /// The writer itself (inline: it runs on the callers' runtime anyway).
        Direct,
        /// A task on the serving runtime, handed each batch's acknowledgements at once. From
        /// the writer thread, each acknowledgement would be a wake-up from outside the runtime,
        /// and an idle runtime is unparked (a system call and a thread wake-up) for many of
        /// them; from a task inside it, the woken calls go on the local run queue and their
        /// responses leave together. One wake-up per batch instead of up to one per call; a batch
        /// of one is answered directly.
        Runtime(mpsc::UnboundedSender<Vec<Ack>>),
    }

    impl Acker {
        pub(super) fn on(rt: &tokio::runtime::Handle) -> Self {
            let (tx, mut rx) = mpsc::unbounded_channel::<Vec<Ack>>();
            rt.spawn(async move {
                while let Some(batch) = rx.recv().await {
                    for a in batch {
                        let _ = a.send(Ok(()));
                    }
                }
            });
            Acker::Runtime(tx)
        }

        fn durable(&self, acks: Vec<Ack>) {
            let acks = match self {
                // One call: one wake-up either way, without the extra hop.
                Acker::Runtime(tx) if acks.len() > 1 => match tx.send(acks) {
                    Ok(()) => return,
                    // The runtime is going away: answer from here.
                    Err(mpsc::error::SendError(acks)) => acks,
                },
                _ => acks,
            };
            for a in acks {
                let _ = a.send(Ok(()));
            }
        }
    }

    /// The writer's loop. Its store calls block: on the writer thread, or (`inline`) on the
    /// serving runtime itself.
    pub(super) async fn commit_loop(
        mut store: store::Store,
        mut rx: mpsc::Receiver<(AuditRecord, Option<Ack>)>,
        healthy: Arc<AtomicBool>,
        settings: AuditSettings,
        acker: Acker,
        tally: Arc<Tally>,
        recent: Arc<recent::Recent>,
    ) -> std::io::Result<u64> {
        let sync = settings.durability == Durability::Sync;
        let held = Held {
            max: settings.held_records_max,
            tally: &tally,
        };
        let mut written = 0u64;
        let mut backlog: Vec<AuditRecord> = Vec::new();
        let mut batch: Vec<(AuditRecord, Option<Ack>)> = Vec::with_capacity(1024);
        let mut last_sync = Instant::now();
        let mut open = true;
        // One new segment per failure episode, not one per retry.
        let mut rotated_for_failure = false;
        // While failing, the next attempt to write the held records: every 250 ms, however
        // many refusals arrive meanwhile.
        let mut retry_at = Instant::now();
        while open || !backlog.is_empty() {
            let failed = !healthy.load(Ordering::Relaxed);
            let wait = if failed {
                retry_at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            } else if sync {
                settings.store.checkpoint_interval
            } else {
                // Wake when the next fsync is due, not a whole interval after the last record.
                settings
                    .async_flush
                    .saturating_sub(last_sync.elapsed())
                    .max(Duration::from_millis(1))
            };
            if open {
                match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(Some(m)) => {
                        batch.push(m);
                        take_queued(&mut rx, &mut batch);
                        // The linger: calls arriving meanwhile share this write (and, in
                        // `sync` mode, its fsync). The writer sleeps rather than waiting on the
                        // channel, so those calls do not wake it one by one; whatever queued
                        // is taken after. (A closed channel shows at the next `recv`.)
                        let linger = if sync {
                            settings.group_commit
                        } else {
                            settings.async_flush.min(ASYNC_LINGER)
                        };
                        if !linger.is_zero() && batch.len() < BATCH_MAX {
                            tokio::time::sleep(linger).await;
                            take_queued(&mut rx, &mut batch);
                        }
                    }
                    Ok(None) => open = false,
                    Err(_) => {}
                }
            }
            // Refusals counted while the queue or the held records were full: their summaries
            // go out with the held records (or, healthy, on their own).
            backlog.extend(tally.drain());
            if !open && failed {
                // Draining at shutdown: one more attempt when it is due.
                tokio::time::sleep(retry_at.saturating_duration_since(Instant::now())).await;
            }
            // Retry what could not be written (new segment first: the old may be full).
            if !backlog.is_empty() && (!failed || Instant::now() >= retry_at) {
                if failed && !rotated_for_failure {
                    rotated_for_failure = store.rotate_after_failure().is_ok();
                }
                match store.append(backlog.iter(), true) {
                    Ok(()) => {
                        recent.add(backlog.iter());
                        written += backlog.len() as u64;
                        backlog.clear();
                        if failed {
                            rotated_for_failure = false;
                            healthy.store(true, Ordering::Relaxed);
                            metrics::gauge!("xgate_audit_healthy").set(1.0);
                            tracing::warn!("audit trail writable again; calls resume");
                        }
                    }
                    Err(e) => {
                        if !open {
                            metrics::counter!("xgate_audit_records_dropped_total")
                                .increment(backlog.len() as u64);
                            tracing::error!(error = %e, records = backlog.len(), "audit trail still failing at shutdown; records lost");
                            break;
                        }
                        if !failed {
                            metrics::counter!("xgate_audit_write_errors_total").increment(1);
                            metrics::gauge!("xgate_audit_healthy").set(0.0);
                            healthy.store(false, Ordering::Relaxed);
                        }
                        retry_at = Instant::now() + RETRY_EVERY;
                    }
                }
            }
            if !batch.is_empty() {
                let n = batch.len() as u64;
                // Records per write (and, in `sync` mode, per fsync): the group commit's size.
                metrics::histogram!("xgate_audit_batch_records").record(n as f64);
                let t0 = Instant::now();
                let ok = healthy.load(Ordering::Relaxed)
                    && backlog.is_empty()
                    && {
                        match store.append(batch.iter().map(|(r, _)| r), sync) {
                            Ok(()) => {
                                recent.add(batch.iter().map(|(r, _)| r));
                                true
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "audit write failed: refusing calls until it works again");
                                metrics::counter!("xgate_audit_write_errors_total").increment(1);
                                metrics::gauge!("xgate_audit_healthy").set(0.0);
                                healthy.store(false, Ordering::Relaxed);
                                retry_at = Instant::now() + RETRY_EVERY;
                                false
                            }
                        }
                    };
                metrics::histogram!("xgate_audit_commit_seconds")
                    .record(t0.elapsed().as_secs_f64());
                let mut durable = Vec::new();
                for (rec, ack) in batch.drain(..) {
                    match (ok, ack) {
                        (true, Some(a)) => durable.push(a),
                        (true, None) => {}
                        // The caller answers UNAVAILABLE and records that instead.
                        (false, Some(a)) => {
                            if let Err(Err(rec)) = a.send(Err(rec)) {
                                held.push(&mut backlog, rec);
                            }
                        }
                        (false, None) => held.push(&mut backlog, rec),
                    }
                }
                if !durable.is_empty() {
                    acker.durable(durable);
                }
                if ok {
                    written += n;
                }
            }
            if healthy.load(Ordering::Relaxed) {
                let r = store
                    .maybe_checkpoint(false, true)
                    .and_then(|()| store.maybe_rotate().map(|_| ()));
                if let Err(e) = r {
                    tracing::warn!(error = %e, "audit checkpoint/rotation failed; will retry");
                }
                if !sync && last_sync.elapsed() >= settings.async_flush {
                    let _ = store.sync();
                    last_sync = Instant::now();
                }
            }
        }
        store.close()?;
        Ok(written)
    }

    /// How often a failing trail is tried again.
    const RETRY_EVERY: Duration = Duration::from_millis(250);

    /// Largest batch written with one fsync.
    const BATCH_MAX: usize = 4096;

    /// `async` mode: how long the writer gathers records after the first before writing them
    /// (at most `async_flush`). Calls then hand records over without waking the writer each
    /// time; a crash of the process loses at most this much more of the queue than at once.
    const ASYNC_LINGER: Duration = Duration::from_millis(2);

    /// Add what is already queued to the batch, without waiting.
    fn take_queued(
        rx: &mut mpsc::Receiver<(AuditRecord, Option<Ack>)>,
        batch: &mut Vec<(AuditRecord, Option<Ack>)>,
    ) {
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
    }

    /// Where records that cannot be written now wait: held one by one up to `max`, then
    /// counted into summaries.
    struct Held<'a> {
        max: usize,
        tally: &'a Tally,
    }

    impl Held<'_> {
        fn push(&self, backlog: &mut Vec<AuditRecord>, rec: AuditRecord) {
            if backlog.len() >= self.max {
                self.tally.add(&rec);
            } else {
                backlog.push(rec);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_record_the_writer_drops_unanswered_fails_the_call_closed() {
        let (tx, mut rx) = mpsc::channel(4);
        let log = AuditLog {
            tx,
            tally: Arc::default(),
            recent: Arc::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            durability: Durability::Sync,
            subject: None,
            returned: None,
        };
        // A writer that takes the record and dies with it (its acknowledgement dropped).
        tokio::spawn(async move { drop(rx.recv().await) });
        let rec = AuditRecord {
            trace_id: "t-1".into(),
            ..AuditRecord::default()
        };
        let back = log.submit(rec).await;
        assert_eq!(back.map_err(|r| r.trace_id), Err("t-1".to_owned()));
    }

    #[test]
    fn the_writer_has_its_own_thread_unless_asked_otherwise() {
        let placement = |yaml: &str| {
            let yaml = format!("signing_key_file: k\n{yaml}");
            serde_yaml_ng::from_str::<crate::config::Audit>(&yaml).map(|a| a.writer)
        };
        assert_eq!(placement("dir: a").unwrap(), Placement::Thread);
        assert_eq!(
            placement("dir: a\nwriter: thread").unwrap(),
            Placement::Thread
        );
        assert_eq!(
            placement("dir: a\nwriter: inline").unwrap(),
            Placement::Inline
        );
        let e = placement("dir: a\nwriter: fibre").unwrap_err().to_string();
        assert!(e.contains("fibre") || e.contains("unknown variant"), "{e}");
        assert_eq!(
            AuditSettings::new(Path::new("a")).placement,
            Placement::Thread
        );
    }
}
