//! xgate: a gRPC data-exchange gateway between a province's departmental systems.
//!
//! ```text
//!  consumer system ──mTLS + JWT──▶ xgate ──mTLS──▶ provider (department backend)
//!
//!  tls        handshake; client cert must chain to the CA; identity from the SAN URI
//!  gateway    begin ▸ authenticate ▸ check ▸ decide ▸ limit ▸ forward ▸ shape ▸ finish
//!    token      JWT verified against the JWKS, dept bound to the certificate
//!    policy     pure evaluation of the data-sharing model (grants, share types, masks)
//!    ratelimit  GCRA limiters per grant
//!    upstream   pooled HTTP/2 channel per provider, deadline propagated
//!    audit      one JSON-lines record per call, single writer thread
//!  error      the one table: Reason -> gRPC code, rich google.rpc.Status details
//! ```
//!
//! The binary (`src/main.rs`) adds the CLI: `serve`, `demo`, `dev-certs`, `token`, `call`.

pub mod admin;
pub mod audit;
pub mod client;
pub mod config;
pub mod devpki;
pub mod edge;
pub mod error;
pub mod gateway;
pub mod identity;
pub mod jwks_fetch;
pub mod pb;
pub mod policy;
pub mod provider;
pub mod ratelimit;
pub mod reload;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod upstream;

/// Response (and upstream request) metadata carrying the call's trace id.
pub const TRACE_ID_HEADER: &str = "x-xgate-trace-id";
