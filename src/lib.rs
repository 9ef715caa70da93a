//! xgate: a gRPC data-exchange gateway between a province's departmental systems.
//!
//! ```text
//!  consumer system ──mTLS + JWT──▶ xgate ──mTLS──▶ provider (department backend)
//!
//!  tls        handshake; client cert must chain to the CA (CRLs, live rotation);
//!             identity from the SAN URI; refused handshakes audited (rate-limited)
//!  conn       HTTP/2 per connection (hyper), peer on every request, graceful drain;
//!             header blocks over the hard cap counted and recorded per connection
//!  edge       metadata limit; refusals tonic makes before the pipeline get xgate
//!             reasons + audit records
//!  gateway    begin ▸ authenticate ▸ check ▸ decide ▸ limit ▸ forward ▸ shape ▸ finish,
//!             all within the caller's deadline
//!    token      JWT verified against the JWKS (file or HTTPS), bound to the certificate;
//!               signatures checked with ring (jwt_ring)
//!    policy     pure evaluation of the data-sharing model (grants, scopes, masks)
//!    ratelimit  GCRA limiters per grant and per consumer, daily quotas; shared in Redis
//!    upstream   pooled HTTP/2 channel per provider, provider protection, deadlines
//!    audit      hash-chained, signed, fsync'd (group commit) records; fail-closed
//!  reload     live policy and certificate changes; admin: status, reload, metrics, health
//!  health     readiness (policy, audit, provider probes) for /ready and grpc.health.v1
//!  telemetry  logs, OTLP traces, W3C trace context in and out
//!  error      the one table: Reason -> gRPC code, rich google.rpc.Status details
//! ```
//!
//! The binary (`src/main.rs`) adds the CLI: `serve`, `demo`, `dev-certs`, `token`, `call`,
//! `policy check|diff|explain`, `audit verify|search`, `report` (the sharing league table),
//! `bench` (a gRPC load generator: [`loadgen`]).

pub mod audit;
pub mod config;
pub mod dev;
pub mod error;
pub mod limits;
pub mod pb;
pub mod pipeline;
pub mod policy;
pub mod serve;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod tools;
pub mod upstream;
pub mod wire;

/// Write to stdout for the CLI; when stdout is closed (`xgate audit search … | head`), end the
/// process quietly (exit 0) instead of panicking as `println!` does.
pub fn write_stdout(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let r = out
        .write_fmt(args)
        .and_then(|()| {
            if newline {
                out.write_all(b"\n")
            } else {
                Ok(())
            }
        })
        .and_then(|()| out.flush());
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` for the CLI's output: see [`write_stdout`].
#[macro_export]
macro_rules! outln {
    () => { $crate::write_stdout(format_args!(""), true) };
    ($($t:tt)*) => { $crate::write_stdout(format_args!($($t)*), true) };
}

/// `print!` for the CLI's output: see [`write_stdout`].
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::write_stdout(format_args!($($t)*), false) };
}

/// Response (and upstream request) metadata carrying the call's trace id.
pub const TRACE_ID_HEADER: &str = "x-xgate-trace-id";
