//! The `xgate` command: the CLI and its dispatch. One file per command family:
//!
//! ```text
//! run.rs     serve, demo, config check (and the runtime and signals they share)
//! call.rs    call (list, describe, query), token
//! policy.rs  policy check, diff, explain, …
//! audit.rs   audit verify, search, head; report (the sharing league table)
//! bench.rs   bench (the load generator)
//! provider.rs  provider (serve a department's database or HTTP service; --check)
//! ```
//!
//! `dev-certs` is one call into [`xgate::dev::pki`]. The gateway itself is the library
//! (`xgate::serve::start`); nothing here is on its request path.

mod audit;
mod bench;
mod call;
mod policy;
mod provider;
mod run;

use self::{audit::*, bench::*, call::*, policy::*, provider::*, run::*};

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use xgate::{
    config::Config,
    dev::{client, pki as devpki, seed},
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
    /// Serve catalogue datasets from a department's database (PostgreSQL, MySQL/MariaDB,
    /// SQLite) or HTTP/JSON service to the gateway, over mTLS (docs/providers.md).
    Provider(ProviderArgs),
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

/// Who a command calls as, from the connection arguments (PEM bytes).
struct Identity {
    cert: Vec<u8>,
    key: Vec<u8>,
    /// The CA the gateway's certificate chains to.
    ca: Vec<u8>,
    token: Option<String>,
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
        Cmd::Provider(p) => provider_cmd(p),
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
