//! xgate: a gRPC data-exchange gateway between a province's departmental systems.
//!
//! The crate map (docs/architecture.md has the stage diagram, where state lives and the
//! shutdown order):
//!
//! ```text
//!  consumer ──mTLS + JWT──▶ serve ▸ tls ▸ conn ▸ pipeline ──mTLS──▶ provider
//!
//!  serve      start (check ▸ build ▸ spawn) and stop; conn (HTTP/2 per connection),
//!             admin (status, reload, metrics), health (/ready, grpc.health.v1),
//!             reload (live policy and certificate changes)
//!  tls        handshake, CRLs, live rotation; identity (SPIFFE / fingerprint map);
//!             proxy_protocol (PROXY v2 from the load balancer)
//!  pipeline   one file per stage: call (begin/finish) ▸ authenticate ▸ admit (check,
//!             decide, scope) ▸ limit ▸ forward ▸ shape ▸ stream (relay); edge (refusals
//!             before the pipeline), paging (sealed page tokens), catalog
//!  token      JWT verification, JWKS (file or HTTPS: jwks_fetch), ring signatures (ring)
//!  policy     the data-sharing model and its pure evaluation (grants, scopes, masks)
//!  limits     rate and quota limiters, auth-failure limiter, provider protection (provider),
//!             shared in Redis (shared)
//!  upstream   provider channels and how their failures read
//!  audit      hash-chained, signed, fsync'd records; verify, search, head
//!  wire       responses kept encoded, shaped cell by cell
//!  error      the one table: Reason -> gRPC code, google.rpc.Status details
//!  config     the config file;  telemetry  logs, OTLP traces, W3C trace context
//!
//!  provider   `xgate provider`: a department's SQL database or HTTP service served as
//!             `DataExchange` (the other side of `upstream`; the gateway never imports it)
//!
//!  dev        not on the request path: dev PKI, sample providers and their SQLite seeds,
//!             CLI client, fuzz entries
//!  tools      not on the request path: the load generator (`xgate bench`), the report
//! ```
//!
//! The binary (`src/bin/xgate/`) is the CLI over these: `serve`, `demo`, `dev-certs`,
//! `token`, `call`, `config check`, `policy …`, `audit …`, `report`, `bench`.

pub mod audit;
pub mod config;
pub mod console;
pub mod dev;
pub mod error;
pub mod limits;
pub mod pb;
pub mod pipeline;
pub mod policy;
pub mod provider;
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
