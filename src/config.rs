//! The gateway's own configuration (listen address, TLS files, JWKS, policy, audit, upstream
//! TLS, telemetry), read from YAML and validated once at start-up with every error reported
//! together. Relative paths are resolved against the config file's directory.
//!
//! The data-sharing rules are not here: they live in the policy file the data bureau owns.
//!
//! Size: ~880 lines of code and 150 of tests: one struct per config section, each with its
//! defaults and its part of `validate`, so that a key, its default and its check sit together;
//! the sections have no behaviour beyond that.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC listen address (mTLS).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bind `listen` with `SO_REUSEPORT`: several gateway processes on one host share the
    /// port and the kernel spreads connections over them (one single-threaded process per
    /// core, or a new binary started beside the old one so a restart refuses no connection).
    /// Each process needs an audit directory of its own. Default off: a second process on
    /// the port is refused, as a mistake usually is.
    #[serde(default)]
    pub listen_reuse_port: bool,
    /// Admin HTTP endpoint (policy status and reload, metrics, health); absent: off.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// The bureau's console and the admin API (HTTPS, officers' certificates); absent: off.
    #[serde(default)]
    pub console: Option<Console>,
    /// Reload the policy when its file changes (SIGHUP and the admin endpoint always work).
    #[serde(default = "yes")]
    pub watch_policy: bool,
    /// SPIFFE trust domain of consumer identities.
    pub trust_domain: String,
    pub tls: ServerTls,
    pub jwt: Jwt,
    /// Policy file (YAML) of the data-sharing model.
    pub policy: PathBuf,
    /// Secret file with the bureau's pseudonym key (for `hash` masks; at least 32 bytes).
    #[serde(default)]
    pub pseudonym_key_file: Option<PathBuf>,
    /// Key (32+ bytes) that seals page tokens; replicas behind one load balancer share it.
    /// Absent: each process draws its own at start (tokens work only where they were issued).
    #[serde(default)]
    pub page_token_key_file: Option<PathBuf>,
    pub audit: Audit,
    pub upstream: Upstream,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log: Log,
    /// OTLP trace export; absent means off.
    #[serde(default)]
    pub otlp: Option<Otlp>,
    #[serde(default)]
    pub shutdown: Shutdown,
    #[serde(default)]
    pub runtime: Runtime,
}

fn yes() -> bool {
    true
}

/// The console (`src/console`): HTTPS on its own port, officers signed in by client
/// certificate, roles from this list.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Console {
    pub listen: SocketAddr,
    /// Server certificate and key (default: `tls.cert` / `tls.key`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The CA officers' certificates chain to (default: `tls.client_ca`).
    #[serde(default)]
    pub officer_ca: Option<PathBuf>,
    /// Who may sign in, by certificate subject CN, with which role.
    pub officers: Vec<crate::console::auth::Officer>,
    /// `zh-CN` (default) or `en`; each officer can switch.
    #[serde(default = "default_console_lang")]
    pub lang: String,
    /// A session idle this long ends.
    #[serde(default = "default_session_idle")]
    pub session_idle_minutes: u64,
    /// The console may replace the policy file: a change one bureau officer proposes and a
    /// second approves (docs/console.md). Off: the file's source of truth is elsewhere
    /// (GitOps, a ConfigMap) and the console only previews.
    #[serde(default)]
    pub policy_managed: bool,
    /// Sign-in with the province's identity provider (OpenID Connect), beside certificates.
    #[serde(default)]
    pub oidc: Option<crate::console::oidc::OidcConfig>,
}

impl Console {
    /// The demo's console: on `listen`, the dev PKI's officers (certs-dev/officer-*.pem).
    pub fn demo(listen: SocketAddr) -> Console {
        use crate::console::auth::{Officer, Role};
        // (name, certificate CN, name at an IdP for `xgate demo --console-oidc`, role…)
        let o = |name: &str, (subject, idp): (&str, &str), role: Role, department: Option<&str>| {
            Officer {
                name: name.into(),
                subject: subject.into(),
                role,
                department: department.map(str::to_owned),
                fingerprint: None,
                oidc: Some(idp.into()),
            }
        };
        Console {
            listen,
            cert: None,
            key: None,
            officer_ca: None,
            officers: vec![
                o("李明", ("bureau-officer-li", "li.ming"), Role::Bureau, None),
                o(
                    "陈静",
                    ("bureau-officer-chen", "chen.jing"),
                    Role::Bureau,
                    None,
                ),
                o(
                    "王芳",
                    ("civil-affairs-admin-wang", "wang.fang"),
                    Role::DeptAdmin,
                    Some("civil-affairs"),
                ),
                o("赵强", ("auditor-zhao", "zhao.qiang"), Role::Auditor, None),
            ],
            lang: default_console_lang(),
            session_idle_minutes: default_session_idle(),
            policy_managed: false,
            oidc: None,
        }
    }
}

fn default_console_lang() -> String {
    "zh-CN".into()
}

fn default_session_idle() -> u64 {
    30
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle client certificates must chain to.
    pub client_ca: PathBuf,
    /// Certificate revocation lists (PEM or DER), reloaded when they change.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// Lowest TLS version accepted: `"1.3"` (default) or `"1.2"`.
    #[serde(default = "default_min_version")]
    pub min_version: String,
    #[serde(default = "default_handshake_ms")]
    pub handshake_timeout_ms: u64,
    /// Reload certificates, CA bundle and CRLs (server and upstream) when their files change.
    #[serde(default = "yes")]
    pub watch: bool,
    /// Identities for certificates without a SAN URI, by certificate fingerprint.
    #[serde(default)]
    pub identity_map: Vec<MappedIdentity>,
    /// Load balancers (exact addresses) whose connections begin with a PROXY protocol v2
    /// header carrying the caller's address; from anyone else, none is read.
    #[serde(default)]
    pub proxy_protocol_from: Vec<std::net::IpAddr>,
}

/// A legacy certificate's identity, by fingerprint.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MappedIdentity {
    /// `sha256:` + 64 hex digits of the certificate (DER).
    pub fingerprint: String,
    pub dept: String,
    pub system: String,
}

fn default_min_version() -> String {
    "1.3".into()
}

impl ServerTls {
    pub fn files(&self) -> crate::tls::ServerTlsFiles {
        crate::tls::ServerTlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: self.client_ca.clone(),
            crls: self.crls.clone(),
            allow_tls12: self.min_version == "1.2",
        }
    }

    pub fn identity_map(&self) -> crate::tls::identity::IdentityMap {
        self.identity_map
            .iter()
            .map(|m| {
                (
                    m.fingerprint.to_ascii_lowercase(),
                    crate::tls::identity::SystemId {
                        dept: m.dept.as_str().into(),
                        system: m.system.as_str().into(),
                    },
                )
            })
            .collect()
    }
}

fn default_handshake_ms() -> u64 {
    10_000
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Jwt {
    /// JWKS file with the identity provider's public keys (or `jwks_url`).
    #[serde(default)]
    pub jwks: Option<PathBuf>,
    /// HTTPS URL of the identity provider's JWKS (or `jwks`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// CA bundle the JWKS URL's certificate must chain to.
    #[serde(default)]
    pub jwks_ca: Option<PathBuf>,
    pub issuer: String,
    pub audience: String,
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    #[serde(default = "default_token_cache")]
    pub cache_capacity: usize,
    /// Accepted algorithms (default ES256, RS256, EdDSA). HMAC ones need `hmac_secret_file`.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Shared secret for HS256/384/512 (at least 32 bytes).
    #[serde(default)]
    pub hmac_secret_file: Option<PathBuf>,
    /// Longest token lifetime accepted (`exp - iat`), seconds.
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime_secs: u64,
    /// Largest `authorization` header accepted, bytes.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Failed authentications a client certificate may have per second (and in a burst)
    /// before its calls are refused `AUTH_FAILURES_LIMITED` without any signature check.
    #[serde(default = "default_auth_failures_per_second")]
    pub auth_failures_per_second: u32,
    #[serde(default = "default_auth_failures_burst")]
    pub auth_failures_burst: u32,
    /// How long the last good keys stay usable when the JWKS cannot be fetched, seconds.
    #[serde(default = "default_keys_max_age")]
    pub keys_max_age_secs: u64,
    /// How often the JWKS is re-fetched, seconds.
    #[serde(default = "default_refresh")]
    pub refresh_interval_secs: u64,
    /// At most one extra fetch per this many seconds for tokens with an unknown `kid`.
    #[serde(default = "default_unknown_kid")]
    pub unknown_kid_refresh_secs: u64,
}

fn default_algorithms() -> Vec<String> {
    vec!["ES256".into(), "RS256".into(), "EdDSA".into()]
}
fn default_max_lifetime() -> u64 {
    24 * 3600
}
fn default_auth_failures_per_second() -> u32 {
    10
}
fn default_auth_failures_burst() -> u32 {
    50
}
fn default_max_token_bytes() -> usize {
    8 * 1024
}
fn default_keys_max_age() -> u64 {
    24 * 3600
}
fn default_refresh() -> u64 {
    300
}
fn default_unknown_kid() -> u64 {
    30
}

impl Jwt {
    /// The verifier settings this section describes.
    pub fn settings(&self) -> Result<crate::token::TokenSettings, String> {
        let mut algorithms = Vec::new();
        for a in &self.algorithms {
            if a.eq_ignore_ascii_case("none") {
                return Err("jwt.algorithms: `none` is never accepted".into());
            }
            algorithms.push(
                a.parse::<jsonwebtoken::Algorithm>()
                    .map_err(|_| format!("jwt.algorithms: unknown algorithm `{a}`"))?,
            );
        }
        let hmac_secret = match &self.hmac_secret_file {
            None => None,
            Some(p) => Some(
                std::fs::read(p)
                    .map(|b| b.trim_ascii().to_vec())
                    .map_err(|e| format!("jwt.hmac_secret_file: {}: {e}", p.display()))?,
            ),
        };
        Ok(crate::token::TokenSettings {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            leeway_secs: self.leeway_secs,
            cache_capacity: self.cache_capacity,
            algorithms,
            max_lifetime_secs: self.max_lifetime_secs,
            max_token_bytes: self.max_token_bytes,
            hmac_secret,
            keys_max_age_secs: self.keys_max_age_secs,
            refresh_interval_secs: self.refresh_interval_secs,
            unknown_kid_refresh_secs: self.unknown_kid_refresh_secs,
        })
    }

    /// Where the keys come from.
    pub fn source(&self) -> Result<crate::token::JwksSource, String> {
        match (&self.jwks, &self.jwks_url) {
            (Some(p), None) => Ok(crate::token::JwksSource::File(p.clone())),
            (None, Some(u)) => {
                let url: http::Uri = u.parse().map_err(|e| format!("jwt.jwks_url: {e}"))?;
                let ca = self
                    .jwks_ca
                    .as_ref()
                    .ok_or("jwt.jwks_url needs `jwks_ca`")?;
                let ca_pem =
                    std::fs::read(ca).map_err(|e| format!("jwt.jwks_ca: {}: {e}", ca.display()))?;
                Ok(crate::token::JwksSource::Url { url, ca_pem })
            }
            _ => Err("jwt: set exactly one of `jwks` (a file) and `jwks_url`".into()),
        }
    }
}

fn default_leeway() -> u64 {
    30
}
fn default_token_cache() -> usize {
    10_000
}

/// `audit.ship`: where this replica's records go, and as whom.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ship {
    /// `postgres://USER@HOST:PORT/DB` (TLS options in the URL: `sslmode=verify-full&…`).
    pub url: String,
    /// The password, read from this file (never in the URL of a file in git).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// This replica's stable id in the province trail. Default: `XGATE_REPLICA_ID`, else the
    /// host name (a StatefulSet pod's name: `xgate-0`, `xgate-1`, …, stable across restarts).
    #[serde(default)]
    pub replica_id: Option<String>,
    /// Records per transaction, at most.
    #[serde(default = "default_ship_batch")]
    pub batch_records: usize,
    /// How often to look for new records when caught up.
    #[serde(default = "default_ship_interval")]
    pub interval_ms: u64,
}

fn default_ship_batch() -> usize {
    1000
}

fn default_ship_interval() -> u64 {
    200
}

impl Ship {
    /// The database password from `password_file`, if one is given.
    pub fn password(&self) -> Result<Option<String>, String> {
        self.password_file
            .as_ref()
            .map(|p| {
                std::fs::read_to_string(p)
                    .map(|t| t.trim().to_owned())
                    .map_err(|e| format!("audit.ship.password_file {}: {e}", p.display()))
            })
            .transpose()
    }

    /// The replica id: configured, `XGATE_REPLICA_ID`, or the host name.
    pub fn replica(&self) -> String {
        self.replica_id
            .clone()
            .or_else(|| std::env::var("XGATE_REPLICA_ID").ok())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "xgate".into())
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// Directory of the audit trail (segments `audit-<n>.jsonl`).
    pub dir: PathBuf,
    #[serde(default = "default_audit_queue")]
    pub queue_capacity: usize,
    /// `sync` (default): a call's record is fsync'd before its response. `async`: bounded loss.
    #[serde(default)]
    pub mode: crate::audit::Durability,
    /// Ed25519 key (PKCS#8 PEM) that signs checkpoints.
    pub signing_key_file: PathBuf,
    /// Key for the data-subject hashes (at least 32 bytes); absent: no subjects recorded.
    #[serde(default)]
    pub subject_key_file: Option<PathBuf>,
    /// Ship this replica's trail into the province's PostgreSQL (docs/audit.md); absent:
    /// local files only (the embedded default).
    #[serde(default)]
    pub ship: Option<Ship>,
    #[serde(default = "default_segment_bytes")]
    pub segment_max_bytes: u64,
    #[serde(default = "default_segment_age")]
    pub segment_max_age_secs: u64,
    /// Delete segments older than this many days; 0 keeps everything.
    #[serde(default)]
    pub retention_days: u64,
    #[serde(default = "default_ckpt_records")]
    pub checkpoint_every_records: u64,
    #[serde(default = "default_ckpt_secs")]
    pub checkpoint_interval_secs: u64,
    /// `async` mode: longest time a record waits before it is written.
    #[serde(default = "default_async_flush")]
    pub async_flush_ms: u64,
    /// Zero-fill the live segment this many bytes ahead of its records (0: off, the
    /// default). An fsync then flushes data only, not the file's size: ~40 % less CPU and
    /// ~30 % less time per fsync here (docs/benchmarks.md). The live segment's tail reads
    /// as NUL bytes until written, so a log shipper tailing it would skip records: ship
    /// closed segments (trimmed when closed) or use `xgate audit search` instead.
    #[serde(default)]
    pub preallocate_bytes: u64,
    /// `sync` mode: microseconds the writer waits after a batch's first record for more
    /// calls to share its fsync (0, the default: none; at most 100,000). Costs each call up
    /// to this much latency; saves CPU where calls would otherwise fsync one by one.
    #[serde(default)]
    pub group_commit_us: u64,
    /// Where the writer runs: `thread` (default) or `inline` (writes and fsyncs on the
    /// serving runtime: less CPU per call, longer tails at moderate rates, and a stalled disk
    /// stalls everything; docs/audit.md).
    #[serde(default)]
    pub writer: crate::audit::Placement,
    /// Records held in memory while the trail cannot be written (the refusals made
    /// meanwhile), written as soon as it can; past this many, refusals are counted per
    /// consumer and reason and written as one summary record each (docs/audit.md).
    #[serde(default = "default_held_records")]
    pub held_records_max: usize,
}

fn default_held_records() -> usize {
    100_000
}

fn default_segment_bytes() -> u64 {
    64 << 20
}
fn default_segment_age() -> u64 {
    24 * 3600
}
fn default_ckpt_records() -> u64 {
    1000
}
fn default_ckpt_secs() -> u64 {
    10
}
fn default_async_flush() -> u64 {
    200
}

impl Audit {
    pub fn settings(&self) -> crate::audit::AuditSettings {
        crate::audit::AuditSettings {
            dir: self.dir.clone(),
            queue_capacity: self.queue_capacity,
            durability: self.mode,
            store: crate::audit::StoreSettings {
                segment_max_bytes: self.segment_max_bytes,
                segment_max_age: Duration::from_secs(self.segment_max_age_secs),
                retention: (self.retention_days > 0)
                    .then(|| Duration::from_secs(self.retention_days * 86_400)),
                checkpoint_every_records: self.checkpoint_every_records,
                checkpoint_interval: Duration::from_secs(self.checkpoint_interval_secs),
                preallocate: self.preallocate_bytes,
                shipped: None,
            },
            async_flush: Duration::from_millis(self.async_flush_ms),
            group_commit: Duration::from_micros(self.group_commit_us),
            placement: self.writer,
            held_records_max: self.held_records_max,
        }
    }
}

fn default_audit_queue() -> usize {
    65_536
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// CA bundle provider certificates must chain to.
    pub ca: PathBuf,
    /// The gateway's client certificate and key presented to providers.
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Cap on a call's deadline towards a provider (the caller's `grpc-timeout` may be shorter).
    #[serde(default = "default_max_timeout_ms")]
    pub max_timeout_ms: u64,
    /// Longest a call waits for a provider at its protection limit before `UNAVAILABLE`.
    #[serde(default = "default_queue_wait_ms")]
    pub queue_wait_ms: u64,
    /// Longest one try may take when the provider has another endpoint to retry on; a try
    /// past it counts as that endpoint's failure and the call goes once to another endpoint
    /// (within the caller's deadline and the retry budget). Default: half of what the call
    /// may wait, so a replica that stops answering without a reset costs a call half its
    /// deadline, not all of it.
    #[serde(default)]
    pub try_timeout_ms: Option<u64>,
    /// Active health checks of every provider endpoint (`grpc.health.v1` over mTLS).
    #[serde(default)]
    pub health_check: HealthCheck,
}

/// `upstream.health_check`: how each provider endpoint is checked.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Time between checks of one endpoint.
    #[serde(default = "default_hc_interval")]
    pub interval_ms: u64,
    /// A check not answered within this counts as failed.
    #[serde(default = "default_hc_timeout")]
    pub timeout_ms: u64,
    /// Passed checks in a row that bring an unhealthy endpoint back.
    #[serde(default = "one_u32")]
    pub healthy_threshold: u32,
    /// Failed checks in a row that take an endpoint out of rotation.
    #[serde(default = "two_u32")]
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval_ms: default_hc_interval(),
            timeout_ms: default_hc_timeout(),
            healthy_threshold: one_u32(),
            unhealthy_threshold: two_u32(),
        }
    }
}

fn default_hc_interval() -> u64 {
    2_000
}
fn default_hc_timeout() -> u64 {
    1_000
}
fn one_u32() -> u32 {
    1
}
fn two_u32() -> u32 {
    2
}

fn default_connect_ms() -> u64 {
    1_000
}
fn default_queue_wait_ms() -> u64 {
    100
}
fn default_max_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub default_page_size: u32,
    pub max_page_size: u32,
    /// Largest request or response message, bytes.
    pub max_message_bytes: usize,
    /// Most conditions in one filter, and values in one IN list.
    pub max_filter_terms: usize,
    /// Largest request metadata (header list, as HTTP/2 counts it: name + value + 32 per
    /// entry) a call may carry; over it, `RESOURCE_EXHAUSTED METADATA_TOO_LARGE`, audited, and
    /// the connection stays usable.
    #[serde(default = "default_max_metadata")]
    pub max_metadata_bytes: usize,
    /// The HTTP/2 layer's own limit: beyond it a header block is refused before any gRPC
    /// status is possible (HTTP 431, or GOAWAY for a block over ~1.25× this on the wire);
    /// such refusals are counted and recorded once per connection. Bounds the memory one
    /// request's headers can take.
    #[serde(default = "default_max_metadata_hard")]
    pub max_metadata_hard_bytes: usize,
    /// A connection that starts no call for this long is sent GOAWAY (calls in flight finish;
    /// clients reconnect when they need to). The HTTP/2 preface must arrive within
    /// `tls.handshake_timeout_ms` of the handshake.
    #[serde(default = "default_connection_idle")]
    pub connection_idle_secs: u64,
    /// Time zone whose midnight resets daily quotas: `Asia/Shanghai` or `+HH:MM`.
    #[serde(default = "default_quota_zone")]
    pub quota_timezone: String,
    /// Share rates and quotas between replicas in Redis; absent: each process decides alone.
    #[serde(default)]
    pub shared: Option<crate::limits::shared::SharedConfig>,
}

fn default_connection_idle() -> u64 {
    600
}
fn default_max_metadata() -> usize {
    32 * 1024
}
fn default_max_metadata_hard() -> usize {
    2 * 1024 * 1024
}

fn default_quota_zone() -> String {
    "Asia/Shanghai".into()
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            default_page_size: 100,
            max_page_size: 1_000,
            max_message_bytes: 4 * 1024 * 1024,
            max_filter_terms: 1_000,
            max_metadata_bytes: default_max_metadata(),
            max_metadata_hard_bytes: default_max_metadata_hard(),
            connection_idle_secs: default_connection_idle(),
            quota_timezone: default_quota_zone(),
            shared: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default)]
    pub format: LogFormat,
    /// `tracing` filter directive; `RUST_LOG` overrides it.
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: default_level(),
        }
    }
}

fn default_level() -> String {
    "info".into()
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Otlp {
    /// OTLP/gRPC collector endpoint, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    #[serde(default = "default_service")]
    pub service_name: String,
    /// Fraction of root traces sampled (parent-based), 0.0..=1.0.
    #[serde(default = "default_ratio")]
    pub sample_ratio: f64,
}

fn default_service() -> String {
    "xgate".into()
}

impl Otlp {
    /// The standard OpenTelemetry environment variables, over the config file's `otlp`:
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) switches
    /// exporting on (`OTEL_TRACES_EXPORTER=none` off), `OTEL_SERVICE_NAME` names the
    /// service, `OTEL_TRACES_SAMPLER_ARG` is the ratio. An unparsable ratio is an error.
    pub fn from_env(
        configured: Option<&Otlp>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Otlp>, String> {
        if env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none") {
            return Ok(None);
        }
        let endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .filter(|e| !e.trim().is_empty());
        let mut o = match (configured, endpoint) {
            (_, Some(e)) => Otlp {
                endpoint: e.trim().to_owned(),
                ..configured.cloned().unwrap_or(Otlp {
                    endpoint: String::new(),
                    service_name: default_service(),
                    sample_ratio: default_ratio(),
                })
            },
            (Some(c), None) => c.clone(),
            (None, None) => return Ok(None),
        };
        if let Some(n) = env("OTEL_SERVICE_NAME").filter(|n| !n.trim().is_empty()) {
            o.service_name = n.trim().to_owned();
        }
        if let Some(r) = env("OTEL_TRACES_SAMPLER_ARG") {
            o.sample_ratio = r
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| format!("OTEL_TRACES_SAMPLER_ARG `{r}`: a ratio from 0 to 1"))?;
        }
        Ok(Some(o))
    }
}
fn default_ratio() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    /// How long in-flight calls may run after SIGTERM before they are cut.
    pub drain_timeout_ms: u64,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, serde::Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// tokio worker threads; 0 = one per core less one (at least 1), leaving a core for the
    /// audit writer and the kernel's network work. With one, the runtime is tokio's
    /// single-threaded scheduler (no work-stealing machinery: ~10–20 % less CPU per call).
    #[serde(default)]
    pub worker_threads: usize,
}

impl Config {
    /// Read, resolve relative paths, and validate. Every problem is reported at once.
    pub fn load(path: &Path) -> Result<Config, Vec<String>> {
        let text =
            std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let mut cfg: Config =
            serde_yaml_ng::from_str(&text).map_err(|e| vec![format!("{}: {e}", path.display())])?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Make every relative path relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        fix(&mut self.tls.client_ca);
        for p in &mut self.tls.crls {
            fix(p);
        }
        for p in [
            &mut self.jwt.jwks,
            &mut self.jwt.jwks_ca,
            &mut self.jwt.hmac_secret_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        fix(&mut self.policy);
        if let Some(c) = self.console.as_mut() {
            for p in [&mut c.cert, &mut c.key, &mut c.officer_ca]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
        if let Some(p) = self
            .limits
            .shared
            .as_mut()
            .and_then(|s| s.password_file.as_mut())
        {
            fix(p);
        }
        if let Some(p) = &mut self.page_token_key_file {
            fix(p);
        }
        if let Some(p) = &mut self.pseudonym_key_file {
            fix(p);
        }
        fix(&mut self.audit.dir);
        fix(&mut self.audit.signing_key_file);
        if let Some(p) = &mut self.audit.subject_key_file {
            fix(p);
        }
        if let Some(p) = self
            .audit
            .ship
            .as_mut()
            .and_then(|s| s.password_file.as_mut())
        {
            fix(p);
        }
        fix(&mut self.upstream.ca);
        fix(&mut self.upstream.cert);
        fix(&mut self.upstream.key);
    }

    /// Check everything that can be checked without starting: files readable, values sane.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errs = Vec::new();
        let files = [
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
            ("tls.client_ca", &self.tls.client_ca),
            ("policy", &self.policy),
            ("upstream.ca", &self.upstream.ca),
            ("upstream.cert", &self.upstream.cert),
            ("upstream.key", &self.upstream.key),
        ];
        for (name, p) in files.into_iter().chain(
            self.pseudonym_key_file
                .iter()
                .map(|p| ("pseudonym_key_file", p)),
        ) {
            if let Err(e) = std::fs::metadata(p) {
                errs.push(format!("{name}: {}: {e}", p.display()));
            }
        }
        if self.trust_domain.is_empty() || self.trust_domain.contains('/') {
            errs.push("trust_domain: must be a host-like name such as `zj.gov.example`".into());
        }
        if let Some(c) = &self.console {
            for (name, p) in [
                ("console.cert", &c.cert),
                ("console.key", &c.key),
                ("console.officer_ca", &c.officer_ca),
            ] {
                if let Some(p) = p
                    && let Err(e) = std::fs::metadata(p)
                {
                    errs.push(format!("{name}: {}: {e}", p.display()));
                }
            }
            if let Err(e) = crate::console::auth::Officers::new(&c.officers) {
                errs.extend(e);
            }
            if crate::console::i18n::Lang::parse(&c.lang).is_none() {
                errs.push(format!("console.lang `{}`: zh-CN or en", c.lang));
            }
        }
        if let Some(p) = &self.jwt.jwks
            && let Err(e) = std::fs::metadata(p)
        {
            errs.push(format!("jwt.jwks: {}: {e}", p.display()));
        }
        if let Err(e) = self.jwt.source() {
            errs.push(e);
        }
        if let Err(e) = self.jwt.settings() {
            errs.push(e);
        }
        if self.jwt.issuer.is_empty() {
            errs.push("jwt.issuer: must not be empty".into());
        }
        if self.jwt.audience.is_empty() {
            errs.push("jwt.audience: must not be empty".into());
        }
        if let Err(e) = std::fs::metadata(&self.audit.signing_key_file) {
            errs.push(format!(
                "audit.signing_key_file: {}: {e}",
                self.audit.signing_key_file.display()
            ));
        }
        if let Some(p) = &self.audit.subject_key_file
            && let Err(e) = std::fs::metadata(p)
        {
            errs.push(format!("audit.subject_key_file: {}: {e}", p.display()));
        }
        if self.audit.segment_max_bytes < 4096
            || self.audit.checkpoint_every_records == 0
            || self.audit.checkpoint_interval_secs == 0
        {
            errs.push("audit: segment_max_bytes >= 4096, checkpoint_every_records and checkpoint_interval_secs > 0".into());
        }
        if self.audit.group_commit_us > 100_000 {
            errs.push(format!(
                "audit.group_commit_us: {} is more than 100000 (0.1 s) of added latency per call",
                self.audit.group_commit_us
            ));
        }
        if self.audit.queue_capacity == 0 {
            errs.push("audit.queue_capacity: must be at least 1".into());
        }
        if self.upstream.connect_timeout_ms == 0 || self.upstream.max_timeout_ms == 0 {
            errs.push("upstream: connect_timeout_ms and max_timeout_ms must be positive".into());
        }
        if self.upstream.try_timeout_ms == Some(0) {
            errs.push("upstream: try_timeout_ms must be positive (or left out)".into());
        }
        for p in &self.tls.crls {
            if let Err(e) = std::fs::metadata(p) {
                errs.push(format!("tls.crls: {}: {e}", p.display()));
            }
        }
        if self.tls.min_version != "1.3" && self.tls.min_version != "1.2" {
            errs.push(format!(
                "tls.min_version: `{}`: use \"1.3\" or \"1.2\"",
                self.tls.min_version
            ));
        }
        for (i, m) in self.tls.identity_map.iter().enumerate() {
            let hexpart = m.fingerprint.strip_prefix("sha256:").unwrap_or("");
            if hexpart.len() != 64 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
                errs.push(format!(
                    "tls.identity_map[{i}].fingerprint: use `sha256:` + 64 hex digits"
                ));
            }
            if m.dept.is_empty() || m.system.is_empty() {
                errs.push(format!(
                    "tls.identity_map[{i}]: dept and system must not be empty"
                ));
            }
        }
        if self.tls.handshake_timeout_ms == 0 {
            errs.push("tls.handshake_timeout_ms: must be positive".into());
        }
        let l = &self.limits;
        if l.default_page_size == 0 || l.max_page_size < l.default_page_size {
            errs.push("limits: need 0 < default_page_size <= max_page_size".into());
        }
        if let Err(e) = crate::limits::zone_offset(&l.quota_timezone) {
            errs.push(format!("limits.quota_timezone: {e}"));
        }
        if let Some(sh) = &l.shared {
            if let Err(e) = redis::IntoConnectionInfo::into_connection_info(sh.redis_url.as_str()) {
                errs.push(format!("limits.shared.redis_url: {e}"));
            }
            if let Some(p) = &sh.password_file
                && !p.is_file()
            {
                errs.push(format!(
                    "limits.shared.password_file: {} is not a readable file",
                    p.display()
                ));
            }
            if sh.key_prefix.is_empty() || sh.key_prefix.contains(char::is_whitespace) {
                errs.push("limits.shared.key_prefix: must be a non-empty word".into());
            }
            if sh.timeout_ms == 0 || sh.timeout_ms > 5_000 {
                errs.push("limits.shared.timeout_ms: between 1 and 5000".into());
            }
        }
        if l.max_message_bytes < 1024 {
            errs.push("limits.max_message_bytes: at least 1024".into());
        }
        if l.max_metadata_bytes < 8 * 1024 || l.max_metadata_bytes < self.jwt.max_token_bytes + 1024
        {
            errs.push(format!(
                "limits.max_metadata_bytes: at least 8192, and 1024 more than jwt.max_token_bytes ({})",
                self.jwt.max_token_bytes
            ));
        }
        if self.jwt.auth_failures_per_second == 0 || self.jwt.auth_failures_burst == 0 {
            errs.push(
                "jwt.auth_failures_per_second and jwt.auth_failures_burst: at least 1".into(),
            );
        }
        if l.connection_idle_secs == 0 {
            errs.push("limits.connection_idle_secs: at least 1".into());
        }
        if l.max_metadata_hard_bytes < l.max_metadata_bytes
            || l.max_metadata_hard_bytes > 16 * 1024 * 1024
        {
            errs.push(
                "limits.max_metadata_hard_bytes: at least limits.max_metadata_bytes, at most 16 MiB"
                    .into(),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            errs.push(format!("log.level: {e}"));
        }
        if let Some(o) = &self.otlp {
            if o.endpoint
                .parse::<http::Uri>()
                .map(|u| u.scheme().is_none())
                .unwrap_or(true)
            {
                errs.push(format!(
                    "otlp.endpoint: `{}` is not a URL like http://127.0.0.1:4317",
                    o.endpoint
                ));
            }
            if !(0.0..=1.0).contains(&o.sample_ratio) {
                errs.push("otlp.sample_ratio: must be within 0.0..=1.0".into());
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown.drain_timeout_ms)
    }

    /// The configuration `xgate demo` runs with: the dev PKI in `certs` and `policy`.
    pub fn demo(certs: &Path, policy: PathBuf, listen: SocketAddr, audit_dir: PathBuf) -> Config {
        Config {
            listen,
            listen_reuse_port: false,
            admin_listen: None,
            console: None,
            watch_policy: true,
            trust_domain: crate::dev::pki::TRUST_DOMAIN.into(),
            tls: ServerTls {
                cert: certs.join("gateway.pem"),
                key: certs.join("gateway.key"),
                client_ca: certs.join("ca.pem"),
                crls: Vec::new(),
                min_version: default_min_version(),
                handshake_timeout_ms: default_handshake_ms(),
                watch: true,
                identity_map: Vec::new(),
                proxy_protocol_from: Vec::new(),
            },
            jwt: Jwt {
                jwks: Some(certs.join("jwks.json")),
                jwks_url: None,
                jwks_ca: None,
                issuer: crate::dev::pki::ISSUER.into(),
                audience: crate::dev::pki::AUDIENCE.into(),
                leeway_secs: default_leeway(),
                cache_capacity: default_token_cache(),
                algorithms: default_algorithms(),
                hmac_secret_file: None,
                max_lifetime_secs: default_max_lifetime(),
                max_token_bytes: default_max_token_bytes(),
                auth_failures_per_second: default_auth_failures_per_second(),
                auth_failures_burst: default_auth_failures_burst(),
                keys_max_age_secs: default_keys_max_age(),
                refresh_interval_secs: default_refresh(),
                unknown_kid_refresh_secs: default_unknown_kid(),
            },
            policy,
            pseudonym_key_file: Some(certs.join("pseudonym.key")),
            page_token_key_file: None,
            audit: Audit {
                dir: audit_dir,
                queue_capacity: default_audit_queue(),
                mode: crate::audit::Durability::Sync,
                signing_key_file: certs.join("audit-signing.key"),
                subject_key_file: Some(certs.join("audit-subject.key")),
                ship: None,
                segment_max_bytes: default_segment_bytes(),
                segment_max_age_secs: default_segment_age(),
                retention_days: 0,
                checkpoint_every_records: default_ckpt_records(),
                checkpoint_interval_secs: default_ckpt_secs(),
                async_flush_ms: default_async_flush(),
                preallocate_bytes: 0,
                group_commit_us: 0,
                writer: Default::default(),
                held_records_max: default_held_records(),
            },
            upstream: Upstream {
                ca: certs.join("ca.pem"),
                cert: certs.join("gateway-client.pem"),
                key: certs.join("gateway-client.key"),
                connect_timeout_ms: default_connect_ms(),
                max_timeout_ms: default_max_timeout_ms(),
                queue_wait_ms: default_queue_wait_ms(),
                try_timeout_ms: None,
                health_check: HealthCheck::default(),
            },
            limits: Limits::default(),
            log: Log::default(),
            otlp: None,
            shutdown: Shutdown::default(),
            runtime: Runtime::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_reported_at_once_with_paths_resolved_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xgate.yaml");
        std::fs::write(
            &path,
            r#"
listen: 127.0.0.1:0
trust_domain: ""
tls: { cert: missing.pem, key: missing.key, client_ca: ca.pem, handshake_timeout_ms: 0 }
jwt: { jwks: jwks.json, issuer: "", audience: xgate }
policy: policy.yaml
audit: { dir: audit, queue_capacity: 0, signing_key_file: audit.key, group_commit_us: 200000 }
upstream: { ca: ca.pem, cert: c.pem, key: c.key }
limits: { default_page_size: 10, max_page_size: 5, max_message_bytes: 10, max_filter_terms: 5 }
otlp: { endpoint: "not a url", sample_ratio: 2 }
"#,
        )
        .unwrap();
        let errs = Config::load(&path).unwrap_err();
        let all = errs.join("\n");
        for want in [
            "tls.cert",
            "tls.key",
            "jwt.jwks",
            "policy",
            "upstream.cert",
            "trust_domain",
            "jwt.issuer",
            "audit.queue_capacity",
            "audit.group_commit_us",
            "tls.handshake_timeout_ms",
            "limits: need",
            "limits.max_message_bytes",
            "otlp.endpoint",
            "otlp.sample_ratio",
        ] {
            assert!(all.contains(want), "missing `{want}` in:\n{all}");
        }
        // Relative paths were resolved against the config file's directory.
        assert!(
            all.contains(&dir.path().join("missing.pem").display().to_string()),
            "{all}"
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.yaml");
        std::fs::write(&path, "trust_domian: x\n").unwrap();
        let errs = Config::load(&path).unwrap_err();
        assert!(errs[0].contains("unknown field"), "{errs:?}");
    }

    #[test]
    fn the_checked_in_dev_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/dev/xgate.yaml");
        Config::load(&p).unwrap();
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/replicas/xgate.yaml");
        let cfg = Config::load(&p).unwrap();
        assert!(
            cfg.limits.shared.is_some(),
            "the replicas share their limits"
        );
    }

    /// The gateway config inside the Kubernetes example is well-formed: its only complaints,
    /// outside a cluster, are the files that the Secrets and ConfigMaps would mount.
    #[test]
    fn the_kubernetes_example_config_is_valid_but_for_mounted_files() {
        use serde::Deserialize as _;
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/replicas/kubernetes/xgate.yaml");
        let text = std::fs::read_to_string(p).unwrap();
        let mut found = false;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = serde_yaml_ng::Value::deserialize(doc).unwrap();
            if v["kind"] == "ConfigMap" && v["metadata"]["name"] == "xgate-config" {
                let cfg_text = v["data"]["xgate.yaml"].as_str().unwrap();
                let cfg: Config = serde_yaml_ng::from_str(cfg_text).unwrap();
                let errs = cfg.validate().err().unwrap_or_default();
                for e in &errs {
                    assert!(
                        e.contains("/etc/xgate/") || e.contains("/var/lib/xgate"),
                        "unexpected: {e}"
                    );
                }
                assert_eq!(
                    cfg.limits.shared.map(|s| s.redis_url),
                    Some("redis://xgate-redis:6379/0".to_owned())
                );
                found = true;
            }
        }
        assert!(found, "no xgate-config ConfigMap");
    }

    #[test]
    fn the_standard_otel_variables_switch_tracing_on_and_override_the_file() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(Otlp::from_env(None, env(&[])).unwrap().is_none());
        let o = Otlp::from_env(
            None,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_SERVICE_NAME", "xgate-zj"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (o.endpoint.as_str(), o.service_name.as_str(), o.sample_ratio),
            ("http://collector:4317", "xgate-zj", 0.25)
        );
        let file = Otlp {
            endpoint: "http://file:4317".into(),
            service_name: "from-file".into(),
            sample_ratio: 1.0,
        };
        let o = Otlp::from_env(
            Some(&file),
            env(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (o.endpoint.as_str(), o.service_name.as_str()),
            ("http://traces:4317", "from-file")
        );
        assert!(
            Otlp::from_env(Some(&file), env(&[("OTEL_TRACES_EXPORTER", "none")]))
                .unwrap()
                .is_none()
        );
        assert!(Otlp::from_env(Some(&file), env(&[("OTEL_TRACES_SAMPLER_ARG", "2")])).is_err());
    }
}
