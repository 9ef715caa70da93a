//! The `xgate` command: `serve`, `demo`, `dev-certs`, `token`, `call`, `policy check`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use xgate::{
    config::Config,
    dev::{client, pki as devpki, provider},
    pb,
    policy::Policy,
    serve, telemetry,
};

#[derive(Parser)]
#[command(
    name = "xgate",
    version,
    about = "gRPC data-exchange gateway between departmental systems"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct DemoArgs {
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    #[arg(long, default_value = "demo-audit")]
    audit_dir: PathBuf,
    /// Policy file (its providers' endpoints say where the sample providers listen).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Dev PKI directory.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Log as JSON.
    #[arg(long)]
    json_logs: bool,
    /// Also serve the admin endpoint (policy status/reload, metrics) here, e.g. 127.0.0.1:9443.
    #[arg(long, visible_alias = "admin-listen")]
    admin: Option<SocketAddr>,
    /// Audit durability: sync (record fsync'd before each response) or async.
    #[arg(long, default_value = "sync")]
    audit_mode: String,
    /// Run only the sample department backends (for gateways started with `serve`).
    #[arg(long)]
    providers_only: bool,
    /// Put the sample providers on PORT, PORT+1, ... (0: any free ports) instead of where the
    /// policy says; the demo then serves a copy of the policy with those endpoints.
    #[arg(long, value_name = "PORT")]
    providers_port_base: Option<u16>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway from a config file.
    Serve {
        #[arg(long, short, default_value = "deploy/dev/xgate.yaml")]
        config: PathBuf,
        /// Override `listen` (one config file for several replicas).
        #[arg(long, env = "XGATE_LISTEN")]
        listen: Option<SocketAddr>,
        /// Override `admin_listen`.
        #[arg(long, env = "XGATE_ADMIN_LISTEN")]
        admin_listen: Option<SocketAddr>,
        /// Override `audit.dir` (each replica keeps its own trail).
        #[arg(long, env = "XGATE_AUDIT_DIR")]
        audit_dir: Option<PathBuf>,
    },
    /// Run the demo: the gateway on the dev PKI plus sample department backends.
    Demo(DemoArgs),
    /// Write a fresh development PKI (CA, gateway, providers, consumers, JWT key + JWKS).
    DevCerts {
        #[arg(long, default_value = "certs-dev")]
        out: PathBuf,
    },
    /// Print a dev JWT signed with the dev key.
    Token(TokenArgs),
    /// Call the gateway: list / describe / query / stream.
    Call(CallArgs),
    /// Load-test a gateway (or any server of the interface): closed or open loop, latency
    /// percentiles, errors by code, CPU and peak RSS of given processes.
    Bench(BenchArgs),
    /// Check a gateway config and everything it points to (certificates, keys, the JWKS,
    /// the policy) without serving; every error at once; exit 1 if any.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Tools for the data bureau's policy file.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Read the audit trail: verify it, search it.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// The sharing league table from the audit trail (see docs/audit.md).
    Report(ReportArgs),
}

#[derive(Args)]
struct ReportArgs {
    /// The audit trail directory.
    dir: PathBuf,
    /// The policy that says which department owns each dataset (default, with a warning:
    /// the demo's deploy/dev/policy.yaml).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// day, week (ISO), month or all.
    #[arg(long, default_value = "day")]
    period: String,
    /// From this time (a date or RFC 3339, inclusive).
    #[arg(long)]
    from: Option<String>,
    /// Until this time (a date or RFC 3339, exclusive).
    #[arg(long)]
    to: Option<String>,
    #[command(flatten)]
    zone: ZoneArgs,
    /// table, csv, json or html.
    #[arg(long, default_value = "table")]
    format: String,
    /// Write here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Exit 1 (after the report) if the trail has damaged lines; they are always counted on
    /// stderr.
    #[arg(long)]
    strict: bool,
}

/// The zone days are counted in: the province's, the one its quotas reset in.
#[derive(clap::Args)]
struct ZoneArgs {
    /// Zone that days, weeks, months and date-only bounds are in: Asia/Shanghai, UTC, +08:00.
    /// Default: `limits.quota_timezone` of --config, else Asia/Shanghai (the default of
    /// `limits.quota_timezone`, so a department's day is the same day everywhere).
    #[arg(long, visible_alias = "utc-offset", allow_hyphen_values = true)]
    zone: Option<String>,
    /// A gateway config to take the zone from (`limits.quota_timezone`).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl ZoneArgs {
    fn resolve(&self) -> Result<String, String> {
        if let Some(z) = &self.zone {
            return Ok(z.clone());
        }
        match &self.config {
            Some(p) => Config::load(p)
                .map(|c| c.limits.quota_timezone)
                .map_err(|errs| format!("{}: {}", p.display(), errs.join("; "))),
            None => Ok("Asia/Shanghai".into()),
        }
    }
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum AuditCmd {
    /// Check the hash chain, every checkpoint signature and the trail's end against its
    /// signed head; name the first damage; exit 1 if any (docs/audit.md: what is detected).
    Verify {
        dir: PathBuf,
        /// The checkpoint-signing public key (base64 Ed25519, as `xgate dev-certs` writes it;
        /// default, with a warning: the demo's certs-dev/audit-signing.pub).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// A head saved earlier (`xgate audit head DIR > saved.json`): the trail must still
        /// reach its checkpoint, even if the trail's own head.json was replaced.
        #[arg(long)]
        expect_head: Option<PathBuf>,
        /// Do not require head.json (trails written before xgate kept one).
        #[arg(long)]
        no_head: bool,
    },
    /// Print the trail's signed head (its last checkpoint), to save for a later
    /// `verify --expect-head`.
    Head { dir: PathBuf },
    /// Find records by consumer, dataset, time, status, decision or data subject.
    Search {
        dir: PathBuf,
        /// Calls made by this department (`consumer_dept`).
        #[arg(long)]
        consumer: Option<String>,
        /// Calls to this dataset.
        #[arg(long)]
        dataset: Option<String>,
        /// From this time (inclusive): RFC 3339 with an offset, or a date (midnight in --zone).
        #[arg(long)]
        since: Option<String>,
        /// Until this time (exclusive): RFC 3339 with an offset, or a date (midnight in --zone).
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        zone: ZoneArgs,
        /// gRPC status name, e.g. OK, PERMISSION_DENIED.
        #[arg(long)]
        status: Option<String>,
        /// allow or deny.
        #[arg(long)]
        decision: Option<String>,
        /// A data subject's id (e.g. an id number): which calls asked about this person.
        #[arg(long)]
        subject: Option<String>,
        /// The subject-hash key the gateway uses (`audit.subject_key_file`; default, with a
        /// warning: the demo's certs-dev/audit-subject.key).
        #[arg(long)]
        subject_key: Option<PathBuf>,
        /// table, jsonl or csv.
        #[arg(long, default_value = "table")]
        format: String,
        /// Exit 1 (after the matches) if the trail has damaged lines; they are always counted
        /// on stderr.
        #[arg(long)]
        strict: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate the config and load what it names, binding nothing and writing nothing.
    Check {
        #[arg(long, short, default_value = "deploy/dev/xgate.yaml")]
        config: PathBuf,
        /// Also print the effective config (defaults filled in, paths resolved, OTEL_*
        /// environment applied) as YAML.
        #[arg(long)]
        print: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy file; print every error with file:line:column and a hint; exit 1 if any.
    Check { file: PathBuf },
    /// What a change loosens or tightens, for each consumer × dataset.
    Diff {
        old: PathBuf,
        new: PathBuf,
        /// JSON instead of sentences.
        #[arg(long)]
        json: bool,
    },
    /// The decision for one consumer and dataset, and the chain of rules behind it.
    Explain {
        /// The policy (default, with a warning: the demo's deploy/dev/policy.yaml).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// The consumer department.
        #[arg(long)]
        consumer: String,
        /// The calling system (grants may name one).
        #[arg(long, default_value = "", hide_default_value = true)]
        system: String,
        /// The dataset.
        #[arg(long)]
        dataset: String,
        /// The declared purpose (a data call must declare one).
        #[arg(long, default_value = "", hide_default_value = true)]
        purpose: String,
        /// Fields asked for, comma-separated (omit: all).
        #[arg(long, value_delimiter = ',')]
        fields: Vec<String>,
    },
}

#[derive(Args)]
struct TokenArgs {
    /// The `dept` claim: the department the token speaks for (must match the certificate).
    #[arg(long)]
    dept: String,
    /// The `sub` claim: the person or service account acting.
    #[arg(long)]
    sub: String,
    /// Comma-separated purposes the token allows (omit: any purpose the grant allows).
    #[arg(long, value_delimiter = ',')]
    purposes: Option<Vec<String>>,
    /// Lifetime: 90s, 15m, 1h, 2d.
    #[arg(long, default_value = "1h")]
    ttl: String,
    #[arg(long, default_value = "certs-dev/jwt-signing.key")]
    key: PathBuf,
    #[arg(long, default_value = devpki::KID)]
    kid: String,
    #[arg(long, default_value = devpki::ISSUER)]
    issuer: String,
    #[arg(long, default_value = devpki::AUDIENCE)]
    audience: String,
}

#[derive(Args)]
struct CallArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    what: CallCmd,
}

/// Where the gateway is and who calls it (shared by `call` and `bench`).
#[derive(Args)]
struct ConnArgs {
    #[arg(long, default_value = "https://127.0.0.1:8443")]
    gateway: String,
    /// Act as this dev department: its certificate from the dev PKI and a fresh dev token.
    #[arg(long = "as")]
    as_dept: Option<String>,
    /// The dev PKI that --as takes certificates from.
    #[arg(long, default_value = "certs-dev")]
    certs: PathBuf,
    /// Client certificate (PEM) of the calling system (instead of --as).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// CA bundle (PEM) the gateway's certificate chains to (default: the dev CA).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Bearer token (default with --as: a fresh dev token).
    #[arg(long, env = "XGATE_TOKEN")]
    token: Option<String>,
    /// Name to verify in the gateway's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

/// (client cert, key, CA, token) from the connection arguments.
type Identity = (Vec<u8>, Vec<u8>, Vec<u8>, Option<String>);

impl ConnArgs {
    fn identity(&self) -> Result<Identity, String> {
        let (cert, key, dev_token) = match &self.as_dept {
            Some(d) => {
                let (cert, key, tok) = client::dev_identity(&self.certs, d, None)?;
                (cert, key, Some(tok))
            }
            None => {
                let read = |p: &Option<PathBuf>, what: &str| -> Result<Vec<u8>, String> {
                    let p = p
                        .as_ref()
                        .ok_or_else(|| format!("--{what} is required without --as"))?;
                    std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))
                };
                (read(&self.cert, "cert")?, read(&self.key, "key")?, None)
            }
        };
        let ca_path = self.ca.clone().unwrap_or_else(|| self.certs.join("ca.pem"));
        let ca = std::fs::read(&ca_path).map_err(|e| format!("{}: {e}", ca_path.display()))?;
        Ok((cert, key, ca, self.token.clone().or(dev_token)))
    }

    async fn connect(&self, id: &Identity) -> Result<tonic::transport::Channel, String> {
        client::connect(&self.gateway, &id.2, &id.0, &id.1, &self.server_name)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.gateway))
    }
}

#[derive(Subcommand)]
enum CallCmd {
    /// List the catalogue.
    List,
    /// Describe a dataset and your access to it.
    Describe {
        dataset: String,
        /// The purpose to describe access for (omit: the first the grants allow).
        #[arg(long, default_value = "", hide_default_value = true)]
        purpose: String,
    },
    /// Query one page.
    Query(QueryArgs),
    /// Stream every matching row in batches.
    Stream(QueryArgs),
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Send no `authorization` header (e.g. to measure the refusal path).
    #[arg(long)]
    no_token: bool,
    /// Send a different forged token on every call, from a pool of this many (signed by a
    /// key the identity provider never published): measures a flood of distinct bad tokens.
    #[arg(long, default_value_t = 0)]
    forged_tokens: usize,
    /// query | stream | list | describe | raw
    #[arg(long, default_value = "query")]
    method: String,
    #[arg(long, default_value = "hukou.person_basic")]
    dataset: String,
    #[arg(long, default_value = "subsidy-eligibility")]
    purpose: String,
    /// Comma-separated fields (default: all you may read).
    #[arg(long, value_delimiter = ',')]
    fields: Vec<String>,
    /// Condition: field=value, field^=prefix or field:in=a,b,c (repeatable, AND-ed).
    #[arg(long = "where")]
    conditions: Vec<String>,
    #[arg(long, default_value_t = 5)]
    page_size: u32,
    /// With `--method raw`: the method path, e.g. /pkg.Service/Method.
    #[arg(long)]
    raw_path: Option<String>,
    /// With `--method raw`: the request message, hex-encoded protobuf.
    #[arg(long, default_value = "", hide_default_value = true)]
    raw_body_hex: String,
    /// Closed loop: this many calls in flight (the default, 32).
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: this many calls per second, latency from each call's scheduled time.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of calls before measuring (not counted).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// HTTP/2 connections to spread the calls over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Report the CPU time and peak RSS of this process over the run (repeatable).
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// Runtime threads of the load generator (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct QueryArgs {
    dataset: String,
    /// The declared purpose of the call (required by the gateway).
    #[arg(long, default_value = "", hide_default_value = true)]
    purpose: String,
    /// Comma-separated fields (default: all you may read).
    #[arg(long, value_delimiter = ',')]
    fields: Vec<String>,
    /// Condition: field=value, field^=prefix or field:in=a,b,c (repeatable, AND-ed).
    #[arg(long = "where")]
    conditions: Vec<String>,
    /// Rows per page (0: the gateway's default).
    #[arg(long, default_value_t = 0)]
    page_size: u32,
    /// The page to continue from (the token a previous page returned).
    #[arg(long, default_value = "", hide_default_value = true)]
    page_token: String,
}

/// Turn off glibc malloc's fastbins before any thread starts.
///
/// Every call allocates a few buffers of 1 KiB and more (tonic's 8 KiB encode and decode
/// buffers, h2 and rustls records); in glibc each such allocation first consolidates the
/// fastbins, and `malloc_consolidate` showed up at ~2 % of the gateway's CPU. Small blocks
/// still come from the per-thread caches (tcache). Measured: −5 to −7 % CPU per call in
/// closed loop, peak RSS unchanged (docs/benchmarks.md).
#[allow(unsafe_code)]
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called first thing in
    // `main`, before any other thread exists, and its result (0 = not applied) is harmless.
    unsafe {
        libc::mallopt(libc::M_MXFAST, 0);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve {
            config,
            listen,
            admin_listen,
            audit_dir,
        } => serve(&config, listen, admin_listen, audit_dir),
        Cmd::Demo(d) => demo(d),
        Cmd::DevCerts { out } => devpki::generate(&out)
            .map(|files| {
                for f in files {
                    xgate::outln!("wrote {}", f.display());
                }
            })
            .map_err(|e| e.to_string()),
        Cmd::Token(t) => token(t),
        Cmd::Call(c) => runtime(0).and_then(|rt| rt.block_on(call(c))),
        // The load generator takes every core unless told otherwise.
        Cmd::Bench(b) => runtime(match b.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        })
        .and_then(|rt| rt.block_on(bench(b))),
        Cmd::Policy { cmd } => policy_cmd(cmd),
        Cmd::Config {
            cmd: ConfigCmd::Check { config, print },
        } => config_check(&config, print),
        Cmd::Audit { cmd } => return exit(audit_cmd(cmd)),
        Cmd::Report(r) => return exit(report(r)),
    };
    exit(result.map_err(CliError::Failed))
}

fn exit(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Failed(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        // Like clap's own usage errors.
        Err(CliError::Usage(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// A gateway config as `serve` runs it: the file (every error at once), then the standard
/// `OTEL_*` environment over its `otlp`.
fn gateway_config(path: &Path) -> Result<Config, String> {
    let mut cfg = Config::load(path).map_err(|errs| {
        format!(
            "invalid config {}:\n  - {}",
            path.display(),
            errs.join("\n  - ")
        )
    })?;
    cfg.otlp = xgate::config::Otlp::from_env(cfg.otlp.as_ref(), |k| std::env::var(k).ok())?;
    Ok(cfg)
}

/// `xgate config check`: what `serve` would build, short of binding and the audit trail.
fn config_check(path: &Path, print: bool) -> Result<(), String> {
    let cfg = gateway_config(path)?;
    let rt = runtime(1)?;
    let checked = rt
        .block_on(serve::check(&cfg))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let p = &checked.snap.policy;
    xgate::outln!(
        "{}: OK — listen {}, policy {} ({}; {} departments, {} datasets, {} grants), audit trail {} ({:?})",
        path.display(),
        cfg.listen,
        cfg.policy.display(),
        p.version,
        p.file.departments.len(),
        p.file.datasets.len(),
        p.file.grants.len(),
        cfg.audit.dir.display(),
        cfg.audit.mode
    );
    if print {
        xgate::out!(
            "{}",
            serde_yaml_ng::to_string(&cfg).map_err(|e| format!("printing the config: {e}"))?
        );
    }
    Ok(())
}

/// A protobuf enum value as the policy writes it: `SHARE_TYPE_CONDITIONAL` -> `conditional`.
fn shown(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// A flag left out that defaults to the demo's file: say so, since on a real trail or policy
/// the demo's answers would be quietly wrong (a subject key that matches nothing, another
/// policy's owners).
fn dev_default(given: Option<PathBuf>, flag: &str, dev: &str) -> PathBuf {
    given.unwrap_or_else(|| {
        eprintln!("note: no {flag} given: using the demo's {dev}; outside the demo, pass the gateway's own");
        PathBuf::from(dev)
    })
}

/// Why a command failed: it ran and failed (exit 1), or it was asked for something it cannot
/// understand (exit 2, as for clap's own usage errors).
enum CliError {
    Failed(String),
    Usage(String),
}

impl From<String> for CliError {
    fn from(e: String) -> Self {
        CliError::Failed(e)
    }
}

fn load_policy(file: &Path) -> Result<Policy, String> {
    Policy::load(file).map_err(|e| {
        let lines = xgate::policy::locate::render(file, &e);
        format!("{} error(s):\n{}", lines.len(), lines.join("\n"))
    })
}

fn policy_cmd(cmd: PolicyCmd) -> Result<(), String> {
    match cmd {
        PolicyCmd::Check { file } => {
            let p = load_policy(&file)?;
            xgate::outln!(
                "{}: OK ({} departments, {} datasets, {} grants, {} negative-list entries; version {})",
                file.display(),
                p.file.departments.len(),
                p.file.datasets.len(),
                p.file.grants.len(),
                p.file.negative_list.len(),
                p.version
            );
            Ok(())
        }
        PolicyCmd::Diff { old, new, json } => {
            let (a, b) = (load_policy(&old)?, load_policy(&new)?);
            let changes = xgate::policy::diff::diff(&a, &b);
            if json {
                let out = serde_json::json!({
                    "old": {"file": old.display().to_string(), "version": a.version},
                    "new": {"file": new.display().to_string(), "version": b.version},
                    "changes": changes,
                });
                xgate::outln!(
                    "{}",
                    serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?
                );
            } else {
                xgate::outln!(
                    "{} ({}) -> {} ({})",
                    old.display(),
                    a.version,
                    new.display(),
                    b.version
                );
                let loosen = changes
                    .iter()
                    .filter(|c| c.direction == xgate::policy::diff::Direction::Loosens)
                    .count();
                for c in &changes {
                    xgate::outln!("{c}");
                }
                xgate::outln!(
                    "{} change(s): {loosen} loosen, {} tighten",
                    changes.len(),
                    changes.len() - loosen
                );
            }
            Ok(())
        }
        PolicyCmd::Explain {
            policy,
            consumer,
            system,
            dataset,
            purpose,
            fields,
        } => {
            let policy = dev_default(policy, "--policy", "deploy/dev/policy.yaml");
            let p = load_policy(&policy)?;
            let mut steps = xgate::policy::eval::Steps::default();
            let now = i64::try_from(xgate::token::now_secs()).unwrap_or(i64::MAX);
            let decision = xgate::policy::eval::evaluate_traced(
                &p,
                xgate::policy::Caller {
                    dept: &consumer,
                    system: &system,
                    token_purposes: None,
                    token_bound: false,
                },
                xgate::policy::Request {
                    dataset: &dataset,
                    fields: &fields,
                    filter: &[],
                    purpose: &purpose,
                    now: Some(now),
                },
                &mut steps,
            );
            xgate::outln!("policy {} ({})", policy.display(), p.version);
            xgate::outln!(
                "consumer {consumer} system {} dataset {dataset} purpose {}",
                if system.is_empty() {
                    "(none given: system-specific grants do not apply)"
                } else {
                    &system
                },
                if purpose.is_empty() {
                    "(none)"
                } else {
                    &purpose
                }
            );
            for (i, (rule, note)) in steps.0.iter().enumerate() {
                let mark = if note.starts_with("skipped") {
                    "·"
                } else {
                    "✓"
                };
                xgate::outln!("  {}. {mark} {rule}: {note}", i + 1);
            }
            match decision {
                Ok(permit) => {
                    if let Some(sc) = &permit.scope {
                        xgate::outln!(
                            "  {}. ✓ row-scope: {} (field `{}`)",
                            steps.0.len() + 1,
                            sc.label,
                            sc.field
                        );
                    }
                    xgate::outln!("ALLOW under {}", permit.rule);
                    for f in &permit.fields {
                        xgate::outln!(
                            "  {:<24} {}",
                            f.name,
                            if f.mask.is_none() {
                                "in clear".to_owned()
                            } else {
                                f.mask.describe()
                            }
                        );
                    }
                    xgate::outln!(
                        "  rate {}/s burst {}",
                        permit.rate_limit.per_second,
                        permit.rate_limit.burst
                    );
                }
                Err(r) => {
                    xgate::outln!(
                        "  {}. ✗ {}: {}",
                        steps.0.len() + 1,
                        r.rule.as_deref().unwrap_or("request"),
                        r.message
                    );
                    xgate::outln!("DENY {} ({:?})", r.reason, r.code());
                }
            }
            Ok(())
        }
    }
}

fn report(a: ReportArgs) -> Result<(), CliError> {
    // Bounds the command cannot understand are a usage error (exit 2), before any work.
    xgate::tools::report::Range::parse(a.from.as_deref(), a.to.as_deref(), &a.zone.resolve()?)
        .map_err(CliError::Usage)?;
    report_run(a).map_err(CliError::Failed)
}

fn report_run(a: ReportArgs) -> Result<(), String> {
    use xgate::tools::report;
    let period: report::Period = a.period.parse()?;
    let range = report::Range::parse(a.from.as_deref(), a.to.as_deref(), &a.zone.resolve()?)?;
    let render = match a.format.as_str() {
        "table" => report::render_table,
        "csv" => report::render_csv,
        "json" => report::render_json,
        "html" => report::render_html,
        f => return Err(format!("--format `{f}`: use table, csv, json or html")),
    };
    let policy = load_policy(&dev_default(
        a.policy.clone(),
        "--policy",
        "deploy/dev/policy.yaml",
    ))?;
    if !a.dir.is_dir() {
        return Err(format!("{}: not an audit trail directory", a.dir.display()));
    }
    let mut records = Vec::new();
    let read = xgate::audit::read::search(&a.dir, &Default::default(), |v| records.push(v))
        .map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let text = render(&report::build(&records, &policy, period, range));
    match a.out {
        Some(p) => std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?,
        None => {
            use std::io::Write;
            std::io::stdout()
                .write_all(text.as_bytes())
                .map_err(|e| format!("stdout: {e}"))?
        }
    }
    damaged_lines(&read, a.strict)
}

/// Tell the reader of `search`/`report` about damaged lines (they were skipped); with
/// `strict`, fail.
fn damaged_lines(read: &xgate::audit::read::Searched, strict: bool) -> Result<(), String> {
    let Some(first) = &read.first_damage else {
        return Ok(());
    };
    let msg = format!(
        "{} damaged line(s) skipped, the first at {first}; run `xgate audit verify`",
        read.damaged
    );
    if strict {
        return Err(msg);
    }
    eprintln!("warning: {msg}");
    Ok(())
}

fn audit_cmd(cmd: AuditCmd) -> Result<(), CliError> {
    if let AuditCmd::Search {
        since, until, zone, ..
    } = &cmd
    {
        search_range(since, until, zone)?;
    }
    audit_run(cmd).map_err(CliError::Failed)
}

/// `audit search`'s time bounds: a bound that is not a time is a usage error (exit 2).
fn search_range(
    since: &Option<String>,
    until: &Option<String>,
    zone: &ZoneArgs,
) -> Result<xgate::tools::report::Range, CliError> {
    xgate::tools::report::Range::parse_flags(
        since.as_deref(),
        until.as_deref(),
        &zone.resolve()?,
        ["--since", "--until"],
    )
    .map_err(CliError::Usage)
}

fn audit_run(cmd: AuditCmd) -> Result<(), String> {
    use base64::Engine;
    match cmd {
        AuditCmd::Head { dir } => {
            let path = dir.join(xgate::audit::head::HEAD_FILE);
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            xgate::out!("{text}");
            Ok(())
        }
        AuditCmd::Verify {
            dir,
            public_key,
            expect_head,
            no_head,
        } => {
            let public_key = dev_default(public_key, "--public-key", "certs-dev/audit-signing.pub");
            let text = std::fs::read_to_string(&public_key)
                .map_err(|e| format!("{}: {e}", public_key.display()))?;
            let key = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| {
                    format!(
                        "{}: not a base64 Ed25519 public key: {e}",
                        public_key.display()
                    )
                })?;
            if !dir.is_dir() {
                return Err(format!("{}: not an audit trail directory", dir.display()));
            }
            let saved = match &expect_head {
                None => None,
                Some(p) => Some(
                    xgate::audit::head::read(p)
                        .map_err(|e| format!("{}: {e}", p.display()))?
                        .ok_or_else(|| format!("{}: no such file", p.display()))?,
                ),
            };
            let expect = xgate::audit::read::Expect {
                head: !no_head,
                saved,
            };
            match xgate::audit::read::verify(&dir, &key, &expect)
                .map_err(|e| format!("{}: {e}", dir.display()))?
            {
                Ok(r) => {
                    xgate::outln!(
                        "{}: OK — {} records (seq {}..{}) in {} segment(s), {} signed checkpoint(s); {} record(s) after the last checkpoint",
                        dir.display(),
                        r.records,
                        r.first_seq,
                        r.last_seq,
                        r.segments,
                        r.checkpoints,
                        r.unsigned_tail
                    );
                    match &r.head {
                        Some(h) if h.checkpoint_seq == 0 => xgate::outln!(
                            "head: no checkpoint signed yet (segment {}); the records so far are not covered by a signature",
                            h.segment
                        ),
                        Some(h) => xgate::outln!(
                            "head: the trail reaches its signed head (checkpoint of record {}, segment {})",
                            h.checkpoint_seq,
                            h.segment
                        ),
                        None => xgate::outln!(
                            "head: not checked (--no-head): a cut at the end would not show"
                        ),
                    }
                    if let Some(h) = &r.expected {
                        xgate::outln!(
                            "saved head: the trail still reaches it (checkpoint of record {})",
                            h.checkpoint_seq
                        );
                    }
                    if r.torn_tail_bytes > 0 {
                        xgate::outln!(
                            "torn last write: {} byte(s) after the last complete line of the newest segment (a crash; the gateway cuts them at its next start)",
                            r.torn_tail_bytes
                        );
                    }
                    Ok(())
                }
                Err(d) => Err(format!("audit trail damaged: {d}")),
            }
        }
        AuditCmd::Search {
            dir,
            consumer,
            dataset,
            since,
            until,
            status,
            decision,
            subject,
            subject_key,
            format,
            strict,
            zone,
        } => {
            if !dir.is_dir() {
                return Err(format!("{}: not an audit trail directory", dir.display()));
            }
            let range = match search_range(&since, &until, &zone) {
                Ok(r) => r,
                Err(CliError::Usage(e) | CliError::Failed(e)) => return Err(e),
            };
            let subject = match subject {
                None => None,
                Some(id) => Some(xgate::audit::subject_hash(
                    &xgate::audit::load_subject_key(&dev_default(
                        subject_key,
                        "--subject-key",
                        "certs-dev/audit-subject.key",
                    ))?,
                    &id,
                )),
            };
            let q = xgate::audit::read::Query {
                consumer,
                dataset,
                since: range.from,
                until: range.to,
                status,
                decision,
                subject,
            };
            const COLS: [&str; 11] = [
                "time",
                "trace_id",
                "consumer_dept",
                "consumer_system",
                "method",
                "dataset",
                "purpose",
                "decision",
                "rule",
                "grpc_status",
                "rows",
            ];
            let cell = |v: &serde_json::Value, k: &str| match &v[k] {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if format == "table" {
                xgate::outln!(
                    "{:<24} {:<20} {:<16} {:<38} {:<24} {:<6} {:<20} rule",
                    "time",
                    "consumer",
                    "system",
                    "method",
                    "dataset",
                    "dec.",
                    "status"
                );
            } else if format == "csv" {
                xgate::outln!("{}", COLS.join(","));
            } else if format != "jsonl" {
                return Err(format!("--format `{format}`: use table, jsonl or csv"));
            }
            let read = xgate::audit::read::search(&dir, &q, |v| match format.as_str() {
                "jsonl" => xgate::outln!("{v}"),
                "csv" => xgate::outln!(
                    "{}",
                    COLS.iter()
                        .map(|k| {
                            let c = cell(&v, k);
                            if c.contains([',', '"', '\n']) {
                                format!("\"{}\"", c.replace('"', "\"\""))
                            } else {
                                c
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                _ => xgate::outln!(
                    "{:<24} {:<20} {:<16} {:<38} {:<24} {:<6} {:<20} {}",
                    cell(&v, "time"),
                    cell(&v, "consumer_dept"),
                    cell(&v, "consumer_system"),
                    cell(&v, "method"),
                    cell(&v, "dataset"),
                    cell(&v, "decision"),
                    cell(&v, "grpc_status"),
                    cell(&v, "rule")
                ),
            })
            .map_err(|e| format!("{}: {e}", dir.display()))?;
            if format == "table" {
                xgate::outln!("({} records)", read.matched);
            }
            damaged_lines(&read, strict)
        }
    }
}

/// The multi-threaded runtime. `workers == 0`: one worker per core less one, at least one —
/// the audit writer and the kernel's network work need a core too, and on 2 cores a single
/// worker spent 11–20 % less CPU per call than two (docs/benchmarks.md).
/// The runtime for `workers` threads (0: one per core less one).
///
/// One thread gets tokio's current-thread scheduler: every task, the accept loop and the
/// provider connections on the one thread that also runs `block_on`, with no work-stealing
/// queues, no cross-thread wake-ups and no idle worker to unpark. Measured on the bare
/// pass-through (`examples/floor.rs --flavor current-thread`): 10–20 % less CPU per call than
/// the multi-thread scheduler with one worker (docs/benchmarks.md).
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, String> {
    let workers = match workers {
        0 => std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .max(1),
        n => n,
    };
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    b.enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A file-size limit (`ulimit -f`) must surface as a write error the audit trail can fail
/// closed on and recover from, not kill the process: take SIGXFSZ over.
#[cfg(unix)]
fn ignore_sigxfsz() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    const SIGXFSZ: i32 = 25;
    signal(SignalKind::from_raw(SIGXFSZ)).ok()
}

fn serve(
    path: &Path,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    audit_dir: Option<PathBuf>,
) -> Result<(), String> {
    let mut cfg = gateway_config(path)?;
    if let Some(l) = listen {
        cfg.listen = l;
    }
    if admin_listen.is_some() {
        cfg.admin_listen = admin_listen;
    }
    if let Some(d) = audit_dir {
        cfg.audit.dir = d;
    }
    let rt = runtime(cfg.runtime.worker_threads)?;
    rt.block_on(async move {
        let tel = telemetry::init(&cfg.log, cfg.otlp.as_ref())?;
        #[cfg(unix)]
        let _sigxfsz = ignore_sigxfsz();
        let running = serve::start(&cfg).await.map_err(|e| e.to_string())?;
        let result = tokio::select! {
            _ = shutdown_signal() => {
                let addr = running.addr;
                tracing::info!(%addr, "signal received");
                running.shutdown().await
            }
        };
        tel.shutdown().await;
        result.map(|n| tracing::info!(records = n, "stopped"))
    })
}

/// Find a repo-relative path from the current directory or the source checkout.
fn locate(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if src.exists() { src } else { here }
}

fn demo(d: DemoArgs) -> Result<(), String> {
    let DemoArgs {
        listen,
        audit_dir,
        policy,
        certs,
        json_logs,
        admin,
        audit_mode,
        providers_only,
        providers_port_base,
    } = d;
    let certs = certs.unwrap_or_else(|| locate("certs-dev"));
    let policy_path = policy.unwrap_or_else(|| locate("deploy/dev/policy.yaml"));
    let mut cfg = Config::demo(&certs, policy_path.clone(), listen, audit_dir);
    cfg.admin_listen = admin;
    cfg.audit.mode = match audit_mode.as_str() {
        "sync" => xgate::audit::Durability::Sync,
        "async" => xgate::audit::Durability::Async,
        other => return Err(format!("--audit-mode `{other}`: use sync or async")),
    };
    if json_logs {
        cfg.log.format = xgate::config::LogFormat::Json;
    }
    let rt = runtime(0)?;
    rt.block_on(async move {
        let otlp = xgate::config::Otlp::from_env(None, |k| std::env::var(k).ok())?;
        let tel = telemetry::init(&cfg.log, otlp.as_ref())?;
        let policy = Policy::load(&policy_path).map_err(|e| format!("{}: {e}", policy_path.display()))?;
        // Start the sample providers where the policy says they are.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut providers = Vec::new();
        let mut moved = Vec::new();
        for (i, (id, tables)) in provider::demo_providers().into_iter().enumerate() {
            let Some(p) = policy.provider(id) else { continue };
            let uri: http::Uri = p.endpoint.parse().map_err(|e| format!("provider {id}: {e}"))?;
            let port = match providers_port_base {
                Some(0) => 0,
                Some(base) => base
                    .checked_add(i as u16)
                    .ok_or("--providers-port-base: too high for every provider")?,
                None => uri.port_u16().unwrap_or(443),
            };
            let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
            let sp = provider::SampleProvider::new(id, tables, provider::Behaviour::default());
            let mut rx = stop_rx.clone();
            let (bound, h) = provider::spawn_dev(sp, id, addr, &certs, async move {
                let _ = rx.changed().await;
            })
            .await
            .map_err(|e| format!("sample provider `{id}` on {addr}: {e}"))?;
            xgate::outln!("sample provider {id:<20} https://{bound}");
            moved.push((p.endpoint.clone(), format!("https://127.0.0.1:{}", bound.port())));
            providers.push(h);
        }
        if providers_port_base.is_some() {
            // The gateway must find them where they are: a copy of the policy that says so.
            let mut text = std::fs::read_to_string(&policy_path)
                .map_err(|e| format!("{}: {e}", policy_path.display()))?;
            for (from, to) in &moved {
                text = text.replace(from.as_str(), to);
            }
            let copy = std::env::temp_dir().join(format!("xgate-demo-policy-{}.yaml", std::process::id()));
            std::fs::write(&copy, text).map_err(|e| format!("{}: {e}", copy.display()))?;
            xgate::outln!(
                "policy copy {} ({} with the providers' new endpoints; edit the copy to reload)",
                copy.display(),
                policy_path.display()
            );
            cfg.policy = copy;
        }
        if providers_only {
            xgate::outln!("Ctrl-C stops the sample providers.");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            shutdown_signal().await;
            let _ = stop_tx.send(true);
            for h in providers {
                let _ = h.await;
            }
            tel.shutdown().await;
            return Ok(());
        }
        let running = serve::start(&cfg).await.map_err(|e| e.to_string())?;
        let addr = running.addr;
        xgate::outln!("xgate demo listening on {addr}");
        xgate::outln!("policy {} ({})", policy_path.display(), running.policy_version);
        xgate::outln!("audit trail {}", running.audit_path.display());
        match running.admin_addr {
            Some(a) => xgate::outln!("admin endpoint http://{a}/admin/policy (reload: POST /admin/policy/reload)"),
            None => xgate::outln!("policy reloads when {} changes (admin endpoint: --admin 127.0.0.1:9443)", policy_path.display()),
        }
        xgate::outln!();
        xgate::outln!("Try it (another terminal, from the repository root):");
        let gw = if addr.port() == 8443 { String::new() } else { format!(" --gateway https://{addr}") };
        xgate::outln!("  cargo run --release -- call{gw} --as civil-affairs list");
        xgate::outln!("  cargo run --release -- call{gw} --as civil-affairs describe hukou.person_basic");
        xgate::outln!(
            "  cargo run --release -- call{gw} --as civil-affairs query hukou.person_basic --purpose subsidy-eligibility --where region_code=330106 --page-size 5"
        );
        xgate::outln!(
            "  cargo run --release -- call{gw} --as health query hukou.person_basic --purpose medical-insurance   # denied: no grant"
        );
        xgate::outln!(
            "  cargo run --release -- call{gw} --as civil-affairs query hukou.criminal_record --purpose subsidy-eligibility   # denied: share type none"
        );
        xgate::outln!("Ctrl-C stops the demo.");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        shutdown_signal().await;
        let written = running.shutdown().await?;
        let _ = stop_tx.send(true);
        for h in providers {
            let _ = h.await;
        }
        xgate::outln!("stopped; {written} audit records written");
        tel.shutdown().await;
        Ok(())
    })
}

fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|_| format!("--ttl `{s}`: use e.g. 90s, 15m, 1h, 2d"))
}

fn token(t: TokenArgs) -> Result<(), String> {
    let ttl = parse_ttl(&t.ttl)?;
    let key = std::fs::read_to_string(&t.key).map_err(|e| format!("{}: {e}", t.key.display()))?;
    let mut claims = devpki::dev_claims(&t.dept, &t.sub, t.purposes.as_deref(), ttl);
    claims["iss"] = t.issuer.into();
    claims["aud"] = t.audience.into();
    let tok = devpki::mint_token(&key, &t.kid, &claims).map_err(|e| e.to_string())?;
    xgate::outln!("{tok}");
    Ok(())
}

async fn call(c: CallArgs) -> Result<(), String> {
    let id = c.conn.identity()?;
    let token =
        id.3.clone()
            .ok_or("a token is required: --token, XGATE_TOKEN, or --as DEPT for a dev token")?;
    let channel = c.conn.connect(&id).await?;
    let json = c.json;
    // With --json, a refusal is JSON on stdout too (code, reason, rule, trace id), so a
    // script reads failures the way it reads answers.
    let fail = |s: tonic::Status| {
        if json {
            xgate::outln!("{}", client::status_json(&s));
        }
        client::explain(&s)
    };
    match c.what {
        CallCmd::List => {
            let mut cat = pb::catalog_client::CatalogClient::new(channel);
            let r = cat
                .list_datasets(client::with_token(pb::ListDatasetsRequest {}, &token))
                .await
                .map_err(fail)?
                .into_inner();
            if c.json {
                xgate::outln!("{}", json_datasets(&r.datasets));
            } else {
                for d in &r.datasets {
                    let share = pb::ShareType::try_from(d.share_type)
                        .map(|s| shown(s.as_str_name(), "SHARE_TYPE_"))
                        .unwrap_or("?".into());
                    xgate::outln!(
                        "{:<28} {:<20} {:<26} {}",
                        d.id,
                        d.owner_department,
                        share,
                        d.title
                    );
                }
                xgate::outln!(
                    "({} datasets; policy {})",
                    r.datasets.len(),
                    r.policy_version
                );
            }
        }
        CallCmd::Describe { dataset, purpose } => {
            let mut cat = pb::catalog_client::CatalogClient::new(channel);
            let r = cat
                .describe_dataset(client::with_token(
                    pb::DescribeDatasetRequest { dataset, purpose },
                    &token,
                ))
                .await
                .map_err(fail)?
                .into_inner();
            let a = r.access.unwrap_or_default();
            if c.json {
                xgate::outln!(
                    "{}",
                    serde_json::json!({
                        "dataset": r.dataset.as_ref().map(|d| d.id.clone()),
                        "allowed": a.allowed, "readable_fields": a.readable_fields,
                        "masked_fields": a.masked_fields.iter().map(|m| serde_json::json!({"field": m.field, "mask": m.mask})).collect::<Vec<_>>(),
                        "allowed_purposes": a.allowed_purposes, "deciding_rule": a.deciding_rule,
                        "evaluated_purpose": a.evaluated_purpose, "row_scope": a.row_scope,
                        "denial_reason": a.denial_reason, "denial_message": a.denial_message,
                        "rate_limit": a.rate_limit.map(|r| serde_json::json!({"per_second": r.per_second, "burst": r.burst})),
                    })
                );
            } else {
                if let Some(d) = &r.dataset {
                    xgate::outln!(
                        "{} — {} (owner {}, subject key {})",
                        d.id,
                        d.title,
                        d.owner_department,
                        d.subject_key
                    );
                    for f in &d.fields {
                        let t = pb::FieldType::try_from(f.r#type)
                            .map(|t| shown(t.as_str_name(), "FIELD_TYPE_"))
                            .unwrap_or("?".into());
                        let s = pb::Sensitivity::try_from(f.sensitivity)
                            .map(|t| shown(t.as_str_name(), "SENSITIVITY_"))
                            .unwrap_or("?".into());
                        xgate::outln!("  {:<22} {:<22} {}", f.name, t, s);
                    }
                }
                if a.allowed {
                    xgate::outln!(
                        "your access for purpose `{}`: ALLOWED under {}",
                        a.evaluated_purpose,
                        a.deciding_rule
                    );
                    xgate::outln!("  readable: {}", a.readable_fields.join(", "));
                    for m in &a.masked_fields {
                        xgate::outln!("  masked:   {} ({})", m.field, m.mask);
                    }
                    xgate::outln!(
                        "  purposes: {}",
                        if a.allowed_purposes.is_empty() {
                            "any (no grant needed)".into()
                        } else {
                            a.allowed_purposes.join(", ")
                        }
                    );
                    xgate::outln!("  rows:     {}", a.row_scope);
                    if let Some(rl) = a.rate_limit {
                        xgate::outln!("  rate:     {}/s, burst {}", rl.per_second, rl.burst);
                    }
                } else {
                    xgate::outln!(
                        "your access for purpose `{}`: DENIED {} — {} [rule {}]",
                        a.evaluated_purpose,
                        a.denial_reason,
                        a.denial_message,
                        a.deciding_rule
                    );
                }
            }
        }
        CallCmd::Query(q) => {
            let types = field_types(&channel, &token, &q).await?;
            let req = client::query_request(
                &q.dataset,
                &q.fields,
                &q.conditions,
                &q.purpose,
                q.page_size,
                &q.page_token,
                &types,
            )?;
            let mut dx = pb::data_exchange_client::DataExchangeClient::new(channel);
            let r = dx
                .query(client::with_token(req, &token))
                .await
                .map_err(fail)?;
            let trace = r
                .metadata()
                .get(xgate::TRACE_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let r = r.into_inner();
            if c.json {
                xgate::outln!("{}", json_response(&r));
            } else {
                client::print_table(&r);
                xgate::outln!(
                    "({} rows; masked: {}; next page: {}; trace {trace})",
                    r.rows.len(),
                    if r.masked_columns.is_empty() {
                        "none".into()
                    } else {
                        r.masked_columns.join(", ")
                    },
                    if r.next_page_token.is_empty() {
                        "none"
                    } else {
                        &r.next_page_token
                    }
                );
            }
        }
        CallCmd::Stream(q) => {
            let types = field_types(&channel, &token, &q).await?;
            let req = client::query_request(
                &q.dataset,
                &q.fields,
                &q.conditions,
                &q.purpose,
                q.page_size,
                "",
                &types,
            )?;
            let mut dx = pb::data_exchange_client::DataExchangeClient::new(channel);
            let resp = dx
                .query_stream(client::with_token(req, &token))
                .await
                .map_err(fail)?;
            let trace = resp
                .metadata()
                .get(xgate::TRACE_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let mut s = resp.into_inner();
            let (mut batches, mut rows) = (0u64, 0u64);
            while let Some(b) = s.message().await.map_err(fail)? {
                batches += 1;
                rows += b.rows.len() as u64;
                if c.json {
                    xgate::outln!("{}", json_response(&b));
                } else {
                    client::print_table(&b);
                }
            }
            if c.json {
                xgate::outln!("{}", serde_json::json!({"batches": batches, "rows": rows}));
            } else {
                xgate::outln!(
                    "({batches} batches, {rows} rows{})",
                    if trace.is_empty() {
                        String::new()
                    } else {
                        format!("; trace {trace}")
                    }
                );
            }
        }
    }
    Ok(())
}

/// The catalogue's field types, to type `--where` literals (only fetched when there are any).
async fn field_types(
    channel: &tonic::transport::Channel,
    token: &str,
    q: &QueryArgs,
) -> Result<std::collections::HashMap<String, pb::FieldType>, String> {
    if q.conditions.is_empty() {
        return Ok(Default::default());
    }
    let mut cat = pb::catalog_client::CatalogClient::new(channel.clone());
    let d = cat
        .describe_dataset(client::with_token(
            pb::DescribeDatasetRequest {
                dataset: q.dataset.clone(),
                purpose: q.purpose.clone(),
            },
            token,
        ))
        .await
        .map_err(|s| client::explain(&s))?
        .into_inner();
    Ok(d.dataset
        .map(|d| {
            d.fields
                .into_iter()
                .filter_map(|f| pb::FieldType::try_from(f.r#type).ok().map(|t| (f.name, t)))
                .collect()
        })
        .unwrap_or_default())
}

fn json_value(v: &pb::Value) -> serde_json::Value {
    use pb::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::Int64Value(i)) => (*i).into(),
        Some(Kind::DoubleValue(d)) => (*d).into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(_) => client::render(v).into(),
    }
}

fn json_response(r: &pb::QueryResponse) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = r
        .rows
        .iter()
        .map(|row| {
            let obj: serde_json::Map<String, serde_json::Value> = r
                .columns
                .iter()
                .zip(&row.values)
                .map(|(c, v)| (c.name.clone(), json_value(v)))
                .collect();
            serde_json::Value::Object(obj)
        })
        .collect();
    serde_json::json!({"rows": rows, "masked_columns": r.masked_columns, "next_page_token": r.next_page_token})
}

fn json_datasets(ds: &[pb::Dataset]) -> serde_json::Value {
    ds.iter()
        .map(|d| {
            serde_json::json!({
                "id": d.id, "title": d.title, "owner": d.owner_department,
                "share_type": pb::ShareType::try_from(d.share_type).map(|s| s.as_str_name()).unwrap_or("?"),
                "fields": d.fields.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
            })
        })
        .collect()
}

async fn bench(b: BenchArgs) -> Result<(), String> {
    use xgate::tools::loadgen::{Call, Load, Plan};
    let id = b.conn.identity()?;
    let query = || {
        client::query_request(
            &b.dataset,
            &b.fields,
            &b.conditions,
            &b.purpose,
            b.page_size,
            "",
            &Default::default(),
        )
    };
    let call = match b.method.as_str() {
        "query" => Call::Query(query()?),
        "stream" => Call::QueryStream(query()?),
        "list" => Call::List,
        "describe" => Call::Describe(pb::DescribeDatasetRequest {
            dataset: b.dataset.clone(),
            purpose: b.purpose.clone(),
        }),
        "raw" => Call::Raw {
            path: b
                .raw_path
                .clone()
                .ok_or("--method raw needs --raw-path /pkg.Service/Method")?,
            body: hex::decode(&b.raw_body_hex).map_err(|e| format!("--raw-body-hex: {e}"))?,
        },
        other => {
            return Err(format!(
                "--method `{other}`: use query, stream, list, describe or raw"
            ));
        }
    };
    let tokens = if b.no_token {
        Vec::new()
    } else if b.forged_tokens > 0 {
        // A different forged token per call (a key the identity provider never published,
        // under its kid): what a flood of distinct bad tokens costs the gateway.
        let dept = b
            .conn
            .as_dept
            .clone()
            .unwrap_or_else(|| "civil-affairs".into());
        let (key, _) = devpki::jwt_keypair(devpki::KID).map_err(|e| e.to_string())?;
        (0..b.forged_tokens)
            .map(|i| {
                devpki::mint_token(
                    &key,
                    devpki::KID,
                    &devpki::dev_claims(&dept, &format!("forger-{i}"), None, 3600),
                )
                .map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![id.3.clone().ok_or(
            "a token is required: --token, XGATE_TOKEN, --as DEPT for a dev token, or --no-token",
        )?]
    };
    if !(b.duration > 0.0 && b.duration.is_finite() && b.warmup >= 0.0 && b.warmup.is_finite()) {
        return Err("--duration must be positive and --warmup not negative".into());
    }
    let mut channels = Vec::new();
    for _ in 0..b.connections.max(1) {
        channels.push(b.conn.connect(&id).await?);
    }
    let plan = Plan {
        call,
        load: match b.rate {
            Some(r) => Load::Open(r),
            None => Load::Closed(b.concurrency.unwrap_or(32)),
        },
        duration: std::time::Duration::from_secs_f64(b.duration),
        warmup: std::time::Duration::from_secs_f64(b.warmup),
        tokens,
        watch: b.pids.clone(),
    };
    let report = xgate::tools::loadgen::run(channels, plan).await?;
    if b.json {
        xgate::outln!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        xgate::out!("{}", report.render());
    }
    Ok(())
}
