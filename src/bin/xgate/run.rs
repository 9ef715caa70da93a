//! `serve`, `demo` and `config check`: running the gateway (and the demo's sample
//! departments), and checking a config without starting it. Also the runtime and signals
//! they share.

use super::*;

#[derive(clap::Args)]
pub(crate) struct DemoArgs {
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub(crate) listen: SocketAddr,
    #[arg(long, default_value = "demo-audit")]
    pub(crate) audit_dir: PathBuf,
    /// Policy file (its providers' endpoints say where the sample providers listen).
    #[arg(long)]
    pub(crate) policy: Option<PathBuf>,
    /// Dev PKI directory.
    #[arg(long)]
    pub(crate) certs: Option<PathBuf>,
    /// Log as JSON.
    #[arg(long)]
    pub(crate) json_logs: bool,
    /// Also serve the probes and metrics (`/live`, `/ready`, `/metrics`) here, e.g. 127.0.0.1:9443.
    #[arg(long, visible_alias = "admin-listen")]
    pub(crate) admin: Option<SocketAddr>,
    /// The bureau's console and admin API (HTTPS, the dev officers' certificates), or `off`.
    #[arg(long, default_value = "127.0.0.1:9444")]
    pub(crate) console: String,
    /// Also sign officers in with this OpenID Connect IdP (client `xgate-console`, secret in
    /// $XGATE_CONSOLE_OIDC_SECRET, redirect https://localhost:PORT/signin/oidc/callback); the
    /// demo officers are li.ming, chen.jing, wang.fang and zhao.qiang there.
    #[arg(long, value_name = "ISSUER")]
    pub(crate) console_oidc: Option<String>,
    /// Audit durability: sync (record fsync'd before each response) or async.
    #[arg(long, default_value = "sync")]
    pub(crate) audit_mode: String,
    /// Run only the sample department backends (for gateways started with `serve`).
    #[arg(long)]
    pub(crate) providers_only: bool,
    /// Put the sample providers on PORT, PORT+1, ... (0: any free ports) instead of where the
    /// policy says; the demo then serves a copy of the policy with those endpoints.
    #[arg(long, value_name = "PORT")]
    pub(crate) providers_port_base: Option<u16>,
    /// Where the sample departments' SQLite databases are (written on first start).
    #[arg(long, default_value = "demo-data")]
    pub(crate) data_dir: PathBuf,
}

#[derive(Subcommand)]
pub(crate) enum ConfigCmd {
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

/// A gateway config as `serve` runs it: the file (every error at once), then the standard
/// `OTEL_*` environment over its `otlp`.
pub(crate) fn gateway_config(path: &Path) -> Result<Config, String> {
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
pub(crate) fn config_check(path: &Path, print: bool) -> Result<(), String> {
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
pub(crate) fn runtime(workers: usize) -> Result<tokio::runtime::Runtime, String> {
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

pub(crate) async fn shutdown_signal() {
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
pub(crate) fn ignore_sigxfsz() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    const SIGXFSZ: i32 = 25;
    signal(SignalKind::from_raw(SIGXFSZ)).ok()
}

pub(crate) fn serve(
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
pub(crate) fn locate(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    if src.exists() { src } else { here }
}

pub(crate) fn demo(d: DemoArgs) -> Result<(), String> {
    let DemoArgs {
        listen,
        audit_dir,
        policy,
        certs,
        json_logs,
        admin,
        console,
        console_oidc,
        audit_mode,
        providers_only,
        providers_port_base,
        data_dir,
    } = d;
    let certs = certs.unwrap_or_else(|| locate("certs-dev"));
    let policy_path = policy.unwrap_or_else(|| locate("deploy/dev/policy.yaml"));
    let mut cfg = Config::demo(&certs, policy_path.clone(), listen, audit_dir);
    cfg.admin_listen = admin;
    cfg.console = match console.as_str() {
        "off" => None,
        a => Some(xgate::config::Console::demo(a.parse().map_err(|_| {
            format!("--console `{a}`: an address like 127.0.0.1:9444, or off")
        })?)),
    };
    if let Some(issuer) = console_oidc {
        let c = cfg
            .console
            .as_mut()
            .ok_or("--console-oidc needs the console (not --console off)")?;
        c.oidc = Some(xgate::console::oidc::OidcConfig {
            issuer,
            client_id: "xgate-console".into(),
            client_secret_file: None,
            client_secret_env: Some("XGATE_CONSOLE_OIDC_SECRET".into()),
            redirect_url: format!("https://localhost:{}/signin/oidc/callback", c.listen.port()),
            claim: "sub".into(),
            ca: None,
        });
    }
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
        // The sample departments: their databases (written on first start), each served by
        // `xgate provider` where the policy says it is.
        for (id, file, specs) in seed::demo_databases() {
            let db = data_dir.join(file);
            if seed::sqlite(&db, &specs).await? {
                xgate::outln!("wrote {} (the {id} department's sample database)", db.display());
            }
        }
        let mut providers = Vec::new();
        let mut moved = Vec::new();
        for (i, (id, file, _)) in seed::demo_databases().into_iter().enumerate() {
            let Some(p) = policy.provider(id) else { continue };
            let uri: http::Uri = p.first_endpoint().parse().map_err(|e| format!("provider {id}: {e}"))?;
            let port = match providers_port_base {
                Some(0) => 0,
                Some(base) => base
                    .checked_add(i as u16)
                    .ok_or("--providers-port-base: too high for every provider")?,
                None => uri.port_u16().unwrap_or(443),
            };
            let pcfg = demo_provider_config(id, &certs, &policy_path, &data_dir.join(file), port)?;
            let running = xgate::provider::start(&pcfg, None).await.map_err(|e| {
                let hint = if e.contains("in use") {
                    ": another demo may be running (stop it), or move this one's providers with `xgate demo --providers-port-base 0` (any free ports)"
                } else {
                    ""
                };
                format!("provider `{id}`: {e}{hint}")
            })?;
            let bound = running.addr;
            let (ready, _) = running.readiness();
            xgate::outln!(
                "provider {id:<20} https://{bound}  (xgate provider over {}{})",
                data_dir.join(file).display(),
                if ready { "" } else { "; NOT READY: see the log" }
            );
            moved.push((p.first_endpoint().to_owned(), format!("https://127.0.0.1:{}", bound.port())));
            providers.push(running);
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
            xgate::outln!("Ctrl-C stops the providers.");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            shutdown_signal().await;
            for p in providers {
                let _ = p.shutdown().await;
            }
            tel.shutdown().await;
            return Ok(());
        }
        let running = serve::start(&cfg).await.map_err(|e| e.to_string())?;
        let addr = running.addr;
        xgate::outln!("xgate demo listening on {addr}");
        xgate::outln!("policy {} ({})", policy_path.display(), running.policy_version);
        xgate::outln!("audit trail {}", running.audit_path.display());
        if let Some(a) = running.admin_addr {
            xgate::outln!("probes and metrics http://{a}/ready, http://{a}/metrics");
        }
        match running.console_addr {
            Some(a) => xgate::outln!(
                "console https://localhost:{}/ (sign in with certs-dev/officer-bureau.pem; docs/console.md)",
                a.port()
            ),
            None => xgate::outln!("policy reloads when {} changes", policy_path.display()),
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
        for p in providers {
            let _ = p.shutdown().await;
        }
        xgate::outln!("stopped; {written} audit records written");
        tel.shutdown().await;
        Ok(())
    })
}

/// A demo department's provider config: `deploy/dev/provider-<id>.yaml` with the demo's
/// certificates, catalogue, database and port.
fn demo_provider_config(
    id: &str,
    certs: &Path,
    catalogue: &Path,
    db: &Path,
    port: u16,
) -> Result<xgate::provider::ProviderConfig, String> {
    let path = locate(&format!("deploy/dev/provider-{id}.yaml"));
    let mut cfg = xgate::provider::ProviderConfig::load(&path)
        .map_err(|e| format!("{}:\n  - {}", path.display(), e.join("\n  - ")))?;
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
    // One demo per machine may use the ports in the file; a moved one must not collide.
    cfg.admin_listen = None;
    cfg.catalogue = catalogue.to_owned();
    cfg.tls.cert = certs.join(format!("provider-{id}.pem"));
    cfg.tls.key = certs.join(format!("provider-{id}.key"));
    cfg.tls.client_ca = certs.join("ca.pem");
    for s in cfg.sources.values_mut() {
        if let xgate::provider::config::Source::Sql(sql) = s {
            sql.url = format!("sqlite://{}", db.display());
        }
    }
    Ok(cfg)
}
