//! `policy check | diff | explain | …`: the data bureau's policy file, checked, compared
//! and explained offline (the pure evaluation the gateway runs).

use super::*;

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
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
    /// What a candidate policy would do to recorded traffic: the calls of the last days
    /// re-decided under the policy serving and under the candidate, per consumer and dataset
    /// (now refused and why, newly allowed, fields newly masked or shown). Exit 1 if the
    /// candidate does not pass `policy check`.
    Impact {
        /// The candidate policy file.
        candidate: PathBuf,
        /// The policy serving (default, with a warning: the demo's deploy/dev/policy.yaml).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// An audit trail directory (or `--db`).
        #[arg(long, required_unless_present = "db", conflicts_with = "db")]
        audit: Option<PathBuf>,
        #[command(flatten)]
        db: super::audit::DbArgs,
        /// From: `7d` (days back from now), a date (midnight in --zone) or RFC 3339.
        #[arg(long, default_value = "7d")]
        since: String,
        /// Until (exclusive), as `--since`; default: now.
        #[arg(long)]
        until: Option<String>,
        #[command(flatten)]
        zone: super::audit::ZoneArgs,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: String,
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

/// A protobuf enum value as the policy writes it: `SHARE_TYPE_CONDITIONAL` -> `conditional`.
pub(crate) fn shown(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

pub(crate) fn load_policy(file: &Path) -> Result<Policy, String> {
    Policy::load(file).map_err(|e| {
        let lines = xgate::policy::locate::render(file, &e);
        format!("{} error(s):\n{}", lines.len(), lines.join("\n"))
    })
}

pub(crate) fn policy_cmd(cmd: PolicyCmd) -> Result<(), String> {
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
        PolicyCmd::Impact {
            candidate,
            policy,
            audit,
            db,
            since,
            until,
            zone,
            format,
        } => {
            if format != "table" && format != "json" {
                return Err(format!("--format `{format}`: use table or json"));
            }
            let current = load_policy(&dev_default(policy, "--policy", "deploy/dev/policy.yaml"))?;
            let next = load_policy(&candidate)?;
            let bound = |v: &str| -> Result<Option<String>, String> {
                match v.strip_suffix('d').and_then(|n| n.parse::<i64>().ok()) {
                    Some(days) => Ok(Some(
                        (time::OffsetDateTime::now_utc() - time::Duration::days(days))
                            .format(&time::format_description::well_known::Rfc3339)
                            .map_err(|e| e.to_string())?,
                    )),
                    None => Ok(Some(v.to_owned())),
                }
            };
            let from = bound(&since)?;
            let to = until.as_deref().map(bound).transpose()?.flatten();
            let range = xgate::tools::report::Range::parse(
                from.as_deref(),
                to.as_deref(),
                &zone.resolve()?,
            )?;
            let impact = match (db.open()?, audit) {
                (Some((rt, pool)), _) => rt.block_on(xgate::policy::impact::over_db(
                    &pool, &current, &next, range.from, range.to,
                ))?,
                (None, Some(dir)) => {
                    if !dir.is_dir() {
                        return Err(format!("{}: not an audit trail directory", dir.display()));
                    }
                    xgate::policy::impact::over_dir(&dir, &current, &next, range.from, range.to)?
                }
                (None, None) => return Err("give --audit DIR or --db URL".into()),
            };
            if format == "json" {
                xgate::outln!(
                    "{}",
                    serde_json::to_string_pretty(&impact).map_err(|e| e.to_string())?
                );
            } else {
                xgate::out!("{}", xgate::policy::impact::render_table(&impact));
            }
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
