//! What the demo, the tests and the benches stand on, and what a department uses to try
//! xgate before it has its own PKI: the dev PKI ([`pki`]), the sample department backends
//! ([`provider`]), the command-line client ([`client`]) and the fuzz entry points
//! ([`fuzzing`]). Nothing here is on the gateway's request path.

pub mod client;
pub mod fuzzing;
pub mod pki;
pub mod provider;
pub mod seed;
