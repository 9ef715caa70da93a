//! Forwarding to providers: one pooled HTTP/2 channel per provider over mTLS (the gateway
//! presents its own client certificate), and the mapping of upstream failures to what the
//! caller is told. Not here: how much a provider is sent ([`crate::limits::provider`]).
//!
//! Channels connect lazily and reconnect by themselves; a provider that is down fails the call
//! within the connect timeout with `UNAVAILABLE`/`PROVIDER_UNAVAILABLE`.

use std::{collections::HashMap, path::Path, time::Duration};

use tonic::{
    Code, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::{
    error::{Reason, Reject},
    policy::Policy,
    wire::data_exchange_client::DataExchangeClient,
};

/// The gateway's TLS material towards providers.
#[derive(Clone)]
pub struct UpstreamTls {
    ca: Certificate,
    identity: Identity,
    /// Distinguishes loads: channels built from another load are never reused.
    generation: u64,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
    /// Longest a call waits for a saturated provider before `UNAVAILABLE`.
    pub queue_wait: Duration,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").finish_non_exhaustive()
    }
}

impl UpstreamTls {
    pub fn load(
        ca: &Path,
        cert: &Path,
        key: &Path,
        connect_timeout: Duration,
        max_message_bytes: usize,
        queue_wait: Duration,
    ) -> Result<Self, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(Self {
            ca: Certificate::from_pem(read(ca)?),
            identity: Identity::from_pem(read(cert)?, read(key)?),
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            connect_timeout,
            max_message_bytes,
            queue_wait,
        })
    }
}

/// What a provider's channel depends on: (endpoint, TLS name, upstream TLS generation).
type ChannelKey = (String, Option<String>, u64);

/// Clients for every provider of one policy snapshot.
#[derive(Debug, Default)]
pub struct Upstreams {
    /// provider id -> ((endpoint, tls name, generation), client)
    clients: HashMap<String, (ChannelKey, DataExchangeClient<Channel>)>,
}

impl Upstreams {
    /// Build (lazily connecting) channels for every provider in the policy. A provider whose
    /// endpoint and TLS name are unchanged from `previous` keeps its channel (and connections).
    pub fn for_policy(
        policy: &Policy,
        tls: &UpstreamTls,
        previous: Option<&Upstreams>,
    ) -> Result<Self, String> {
        let mut clients = HashMap::new();
        for p in &policy.file.providers {
            let key = (p.endpoint.clone(), p.tls_name.clone(), tls.generation);
            if let Some((_, c)) = previous
                .and_then(|prev| prev.clients.get(&p.id))
                .filter(|(k, _)| *k == key)
            {
                clients.insert(p.id.clone(), (key, c.clone()));
                continue;
            }
            let uri: http::Uri = p
                .endpoint
                .parse()
                .map_err(|e| format!("provider `{}`: bad endpoint: {e}", p.id))?;
            let name = p
                .tls_name
                .clone()
                .or_else(|| uri.host().map(str::to_owned))
                .unwrap_or_default();
            let tls_cfg = ClientTlsConfig::new()
                .ca_certificate(tls.ca.clone())
                .identity(tls.identity.clone())
                .domain_name(name);
            let channel = Endpoint::from(uri)
                .tls_config(tls_cfg)
                .map_err(|e| format!("provider `{}`: TLS: {e}", p.id))?
                .connect_timeout(tls.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true)
                .connect_lazy();
            let client = DataExchangeClient::new(channel)
                .max_decoding_message_size(tls.max_message_bytes)
                .max_encoding_message_size(tls.max_message_bytes);
            clients.insert(p.id.clone(), (key, client));
        }
        Ok(Self { clients })
    }

    pub fn client(&self, provider: &str) -> Option<DataExchangeClient<Channel>> {
        self.clients.get(provider).map(|(_, c)| c.clone())
    }
}

/// What the caller is told when the provider call failed with `status`.
pub fn provider_failure(status: &Status, provider: &str) -> Reject {
    tracing::warn!(%provider, code = ?status.code(), message = %status.message(), "provider call failed");
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled => Reject::new(
            Reason::ProviderUnavailable,
            format!("the provider `{provider}` cannot be reached; try again later"),
        ),
        Code::DeadlineExceeded => provider_timeout(provider),
        code => {
            // The provider refused for its own reasons: pass its code and (bounded) message.
            let msg: String = status.message().chars().take(200).collect();
            let mut r = Reject::new(
                Reason::ProviderError,
                format!("provider `{provider}`: {msg}"),
            );
            r.upstream_code = Some(code);
            r
        }
    }
}

pub fn provider_timeout(provider: &str) -> Reject {
    Reject::new(
        Reason::ProviderTimeout,
        format!("the provider `{provider}` did not answer within the deadline"),
    )
}

/// Parse a `grpc-timeout` header value (`<digits><H|M|S|m|u|n>`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5"), None);
        assert_eq!(parse_grpc_timeout("x5m"), None);
        assert_eq!(parse_grpc_timeout("1000000000S"), None);
    }
}
