//! Tools beside the gateway, not on its request path: the gRPC load generator behind
//! `xgate bench` ([`loadgen`]) and the data bureau's sharing report over an audit trail
//! (`xgate report`, [`report`]).

pub mod loadgen;
pub mod report;
