//! `audit verify | search | head` and `report`: reading, checking and summarising an audit
//! trail (the sharing league table), in the province's zone.

use super::*;

#[derive(Args)]
pub(crate) struct ReportArgs {
    /// The audit trail directory (or `--db`: every replica's records).
    #[arg(required_unless_present = "db", conflicts_with = "db")]
    pub(crate) dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) db: DbArgs,
    /// The policy that says which department owns each dataset (default, with a warning:
    /// the demo's deploy/dev/policy.yaml).
    #[arg(long)]
    pub(crate) policy: Option<PathBuf>,
    /// day, week (ISO), month or all.
    #[arg(long, default_value = "day")]
    pub(crate) period: String,
    /// From this time (a date or RFC 3339, inclusive).
    #[arg(long)]
    pub(crate) from: Option<String>,
    /// Until this time (a date or RFC 3339, exclusive).
    #[arg(long)]
    pub(crate) to: Option<String>,
    #[command(flatten)]
    pub(crate) zone: ZoneArgs,
    /// table, csv, json or html.
    #[arg(long, default_value = "table")]
    pub(crate) format: String,
    /// The language of the table and the HTML page: zh-CN or en (CSV and JSON field names
    /// stay English).
    #[arg(long, default_value = "zh-CN")]
    pub(crate) lang: String,
    /// Write here instead of stdout.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// Exit 1 (after the report) if the trail has damaged lines; they are always counted on
    /// stderr.
    #[arg(long)]
    pub(crate) strict: bool,
}

/// The zone days are counted in: the province's, the one its quotas reset in.
#[derive(clap::Args)]
pub(crate) struct ZoneArgs {
    /// Zone that days, weeks, months and date-only bounds are in: Asia/Shanghai, UTC, +08:00.
    /// Default: `limits.quota_timezone` of --config, else Asia/Shanghai (the default of
    /// `limits.quota_timezone`, so a department's day is the same day everywhere).
    #[arg(long, visible_alias = "utc-offset", allow_hyphen_values = true)]
    pub(crate) zone: Option<String>,
    /// A gateway config to take the zone from (`limits.quota_timezone`).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
}

impl ZoneArgs {
    pub(crate) fn resolve(&self) -> Result<String, String> {
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

/// The province trail in PostgreSQL, instead of one replica's directory.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct DbArgs {
    /// `postgres://USER@HOST:PORT/DB`: every replica's records, shipped there (`audit.ship`).
    #[arg(long)]
    pub(crate) db: Option<String>,
    /// The database password, read from this file.
    #[arg(long, requires = "db")]
    pub(crate) db_password_file: Option<PathBuf>,
}

impl DbArgs {
    /// A runtime and a pool, for one command.
    pub(crate) fn open(&self) -> Result<Option<(tokio::runtime::Runtime, sqlx::PgPool)>, String> {
        let Some(url) = &self.db else {
            return Ok(None);
        };
        let password = match &self.db_password_file {
            None => None,
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| format!("{}: {e}", p.display()))?
                    .trim()
                    .to_owned(),
            ),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let pool = rt.block_on(xgate::audit::db::connect(url, password.as_deref(), 2))?;
        Ok(Some((rt, pool)))
    }
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub(crate) enum AuditCmd {
    /// Check the hash chain, every checkpoint signature and the trail's end against its
    /// signed head; name the first damage; exit 1 if any (docs/audit.md: what is detected).
    Verify {
        /// The trail's directory (or `--db`).
        #[arg(required_unless_present = "db", conflicts_with = "db")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
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
    /// Drop the province trail's monthly partitions before a month, once every replica has
    /// shipped past it (docs/audit.md#retention); each replica's chain then starts after the
    /// last record dropped, and `verify --db` holds it to that.
    Prune {
        #[command(flatten)]
        db: DbArgs,
        /// The first month kept, `YYYY-MM` (UTC): every month before it is dropped.
        #[arg(long)]
        before: String,
        /// A replica taken out of service, whose last records are older than `--before`:
        /// without it, such a replica stops the prune (it could still ship into those months).
        #[arg(long)]
        retired: Vec<String>,
        /// Who prunes, kept with the new chain starts (default: $USER).
        #[arg(long)]
        by: Option<String>,
        /// Say what would be dropped; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the trail's signed head (its last checkpoint), to save for a later
    /// `verify --expect-head`.
    Head { dir: PathBuf },
    /// Find records by consumer, dataset, time, status, decision or data subject.
    Search {
        /// The trail's directory (or `--db`).
        #[arg(required_unless_present = "db", conflicts_with = "db")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
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
        /// A data subject's id (e.g. an id number): which calls asked about this person or
        /// returned their rows.
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

pub(crate) fn report(a: ReportArgs) -> Result<(), CliError> {
    // Bounds the command cannot understand are a usage error (exit 2), before any work.
    xgate::tools::report::Range::parse(a.from.as_deref(), a.to.as_deref(), &a.zone.resolve()?)
        .map_err(CliError::Usage)?;
    xgate::tools::report::Lang::parse(&a.lang)
        .ok_or_else(|| CliError::Usage(format!("--lang `{}`: zh-CN or en", a.lang)))?;
    report_run(a).map_err(CliError::Failed)
}

pub(crate) fn report_run(a: ReportArgs) -> Result<(), String> {
    use xgate::tools::report;
    let period: report::Period = a.period.parse()?;
    let range = report::Range::parse(a.from.as_deref(), a.to.as_deref(), &a.zone.resolve()?)?;
    let lang =
        report::Lang::parse(&a.lang).ok_or_else(|| format!("--lang `{}`: zh-CN or en", a.lang))?;
    let render: Box<dyn Fn(&report::Report) -> String> = match a.format.as_str() {
        "table" => Box::new(move |r| report::render_table(r, lang)),
        "csv" => Box::new(report::render_csv),
        "json" => Box::new(report::render_json),
        "html" => Box::new(move |r| report::render_html(r, lang)),
        f => return Err(format!("--format `{f}`: use table, csv, json or html")),
    };
    let policy = load_policy(&dev_default(
        a.policy.clone(),
        "--policy",
        "deploy/dev/policy.yaml",
    ))?;
    let (built, read) = match (a.db.open()?, &a.dir) {
        (Some((rt, pool)), _) => {
            // The same records, every replica's: the database narrows by time first.
            let q = xgate::audit::read::Query {
                since: range.from,
                until: range.to,
                ..Default::default()
            };
            let mut records = Vec::new();
            rt.block_on(xgate::audit::db::search(&pool, &q, |v| records.push(v)))?;
            (
                report::build(&records, &policy, period, range),
                xgate::audit::read::Searched::default(),
            )
        }
        (None, Some(dir)) => {
            if !dir.is_dir() {
                return Err(format!("{}: not an audit trail directory", dir.display()));
            }
            report::build_from_dir(dir, &policy, period, range)
                .map_err(|e| format!("{}: {e}", dir.display()))?
        }
        (None, None) => return Err("give the trail's directory, or --db".into()),
    };
    let text = render(&built);
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
pub(crate) fn damaged_lines(
    read: &xgate::audit::read::Searched,
    strict: bool,
) -> Result<(), String> {
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

pub(crate) fn audit_cmd(cmd: AuditCmd) -> Result<(), CliError> {
    if let AuditCmd::Search {
        since, until, zone, ..
    } = &cmd
    {
        search_range(since, until, zone)?;
    }
    audit_run(cmd).map_err(CliError::Failed)
}

/// `audit search`'s time bounds: a bound that is not a time is a usage error (exit 2).
pub(crate) fn search_range(
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

pub(crate) fn audit_run(cmd: AuditCmd) -> Result<(), String> {
    use base64::Engine;
    match cmd {
        AuditCmd::Head { dir } => {
            let path = dir.join(xgate::audit::head::HEAD_FILE);
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            xgate::out!("{text}");
            Ok(())
        }
        AuditCmd::Prune {
            db,
            before,
            retired,
            by,
            dry_run,
        } => {
            let start = time::Date::parse(
                &format!("{before}-01"),
                time::macros::format_description!("[year]-[month]-[day]"),
            )
            .map_err(|_| format!("--before {before:?}: expected a month, YYYY-MM"))?
            .midnight()
            .assume_utc();
            let by = by
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "unknown".into());
            let Some((rt, pool)) = db.open()? else {
                return Err("audit prune needs --db".into());
            };
            let p = rt.block_on(xgate::audit::db::prune(
                &pool, start, &retired, &by, dry_run,
            ))?;
            let verb = if dry_run { "would drop" } else { "dropped" };
            if p.months.is_empty() {
                xgate::outln!("nothing before {before}: no partition dropped");
            } else {
                xgate::outln!(
                    "{verb} {} partition(s), {} record(s): {}",
                    p.months.len(),
                    p.records,
                    p.months.join(", ")
                );
                for (replica, seq) in &p.through {
                    xgate::outln!("replica {replica}: chain now starts at record {}", seq + 1);
                }
            }
            Ok(())
        }
        AuditCmd::Verify {
            dir,
            db,
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
            if let Some((rt, pool)) = db.open()? {
                return verify_db(&rt, &pool, &key);
            }
            let dir = dir.ok_or("give the trail's directory, or --db")?;
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
            db,
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
            let source = match db.open()? {
                Some(open) => Source::Db(open),
                None => {
                    let dir = dir.ok_or("give the trail's directory, or --db")?;
                    if !dir.is_dir() {
                        return Err(format!("{}: not an audit trail directory", dir.display()));
                    }
                    Source::Dir(dir)
                }
            };
            let range = match search_range(&since, &until, &zone) {
                Ok(r) => r,
                Err(CliError::Usage(e) | CliError::Failed(e)) => return Err(e),
            };
            let subject = match subject {
                None => None,
                Some(id) => Some(xgate::audit::read::Subject::of(
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
            let show = |v: serde_json::Value| match format.as_str() {
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
            };
            match source {
                Source::Dir(dir) => {
                    if q.subject.is_some() {
                        eprintln!(
                            "note: a search by subject over the files is recorded nowhere (whoever can read them can read them); the console, the admin API and `--db` record theirs"
                        );
                    }
                    let read = xgate::audit::read::search(&dir, &q, show)
                        .map_err(|e| format!("{}: {e}", dir.display()))?;
                    if format == "table" {
                        xgate::outln!("({} records)", read.matched);
                    }
                    damaged_lines(&read, strict)
                }
                Source::Db((rt, pool)) => {
                    if let Some(sub) = &q.subject {
                        let by = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
                        rt.block_on(xgate::audit::db::note_subject_search(
                            &pool, &by, &sub.asked,
                        ))
                        .map_err(|e| {
                            format!(
                                "a search by subject is noted before it runs, and could not be: {e}"
                            )
                        })?;
                    }
                    let n = rt.block_on(xgate::audit::db::search(&pool, &q, show))?;
                    if format == "table" {
                        xgate::outln!("({n} records, every replica)");
                    }
                    Ok(())
                }
            }
        }
    }
}

/// Where a search reads.
enum Source {
    Dir(PathBuf),
    Db((tokio::runtime::Runtime, sqlx::PgPool)),
}

/// `audit verify --db`: every replica's chain in the database.
fn verify_db(rt: &tokio::runtime::Runtime, pool: &sqlx::PgPool, key: &[u8]) -> Result<(), String> {
    let reps = rt.block_on(xgate::audit::db::verify(pool, key))?;
    if reps.is_empty() {
        return Err("the database holds no audit records".into());
    }
    let mut damage = 0;
    for r in &reps {
        if r.damage.is_empty() {
            xgate::outln!(
                "replica {}: OK — {} records (seq {}..{}), {} signed checkpoint(s); {} record(s) after the last checkpoint",
                r.replica,
                r.records,
                r.first_seq,
                r.last_seq,
                r.checkpoints,
                r.unsigned_tail
            );
        } else {
            for d in &r.damage {
                xgate::outln!("DAMAGE {d}");
            }
            damage += r.damage.len();
        }
    }
    if damage > 0 {
        return Err(format!(
            "the province trail is damaged: {damage} finding(s) above"
        ));
    }
    Ok(())
}
