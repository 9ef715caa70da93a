//! Forwarding to providers: one pooled HTTP/2 channel per provider endpoint over mTLS (the
//! gateway presents its own client certificate), balanced over a provider's replicas
//! ([`balance`]), and the mapping of upstream failures to what the caller is told. Not here:
//! how much a provider is sent ([`crate::limits::provider`]).
//!
//! Channels connect lazily and reconnect by themselves; a provider that is down fails the call
//! within the connect timeout with `UNAVAILABLE`/`PROVIDER_UNAVAILABLE`.

pub mod balance;
pub mod dns;

pub use self::balance::{Outcome, Pick, Replica, Replicas};

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use arc_swap::ArcSwap;

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
    pub(crate) generation: u64,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
    /// Longest a call waits for a saturated provider before `UNAVAILABLE`.
    pub queue_wait: Duration,
    /// Longest one try may take when the provider has another endpoint to retry on
    /// (`None`: half of what the call may wait).
    pub try_timeout: Option<Duration>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// The material and timeouts of `upstream` in the config, messages up to
    /// `max_message_bytes`.
    pub fn load(up: &crate::config::Upstream, max_message_bytes: usize) -> Result<Self, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(Self {
            ca: Certificate::from_pem(read(&up.ca)?),
            identity: Identity::from_pem(read(&up.cert)?, read(&up.key)?),
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            connect_timeout: Duration::from_millis(up.connect_timeout_ms),
            max_message_bytes,
            queue_wait: Duration::from_millis(up.queue_wait_ms),
            try_timeout: up.try_timeout_ms.map(Duration::from_millis),
        })
    }
}

/// What a replica's channel depends on: (endpoint, TLS name, upstream TLS generation).
pub type ChannelKey = (String, Option<String>, u64);

/// One provider's replicas now: fixed by the policy (`endpoint`, `endpoints`), or found by
/// DNS (`dns`) and replaced as its answer changes ([`Slot::refresh`]).
#[derive(Debug)]
pub struct Slot {
    pub provider: String,
    set: ArcSwap<Replicas>,
    /// Found by DNS: what building replicas for new addresses needs.
    dns: Option<dns::Source>,
}

impl Slot {
    /// The replicas calls go to now.
    pub fn current(&self) -> Arc<Replicas> {
        self.set.load_full()
    }
}

/// The replicas of every provider of one policy snapshot.
#[derive(Debug, Default)]
pub struct Upstreams {
    providers: HashMap<String, Arc<Slot>>,
}

impl Upstreams {
    /// Build (lazily connecting) channels for every provider endpoint in the policy. An
    /// endpoint whose address and TLS name are unchanged from `previous` keeps its replica
    /// (channel, connections, load and standing); a removed one drains: calls holding it
    /// finish on it. A provider found by DNS is resolved here the first time (blocking: this
    /// runs at start and on a reload's own thread), then every `dns.every_secs` by
    /// [`dns::run`]; with its name, port and TLS unchanged it carries over whole.
    pub fn for_policy(
        policy: &Policy,
        tls: &UpstreamTls,
        previous: Option<&Upstreams>,
    ) -> Result<Self, String> {
        let mut providers = HashMap::new();
        for p in &policy.file.providers {
            let before = previous.and_then(|prev| prev.providers.get(&p.id));
            let slot = match &p.dns {
                Some(d) => match before.filter(|b| dns::Source::same(b, p, d, tls)) {
                    Some(kept) => kept.clone(),
                    None => {
                        let endpoints = dns::resolve_now(p, d);
                        let old = before.map(|b| b.current());
                        let set = replicas(p, &endpoints, tls, old.as_ref())?;
                        Arc::new(Slot {
                            provider: p.id.clone(),
                            set: ArcSwap::new(set),
                            dns: Some(dns::Source::new(p, d, tls)),
                        })
                    }
                },
                None => {
                    let endpoints: Vec<String> = p
                        .endpoint_list()
                        .into_iter()
                        .map(|(_, e)| e.to_owned())
                        .collect();
                    let old = before.map(|b| b.current());
                    Arc::new(Slot {
                        provider: p.id.clone(),
                        set: ArcSwap::new(replicas(p, &endpoints, tls, old.as_ref())?),
                        dns: None,
                    })
                }
            };
            providers.insert(p.id.clone(), slot);
        }
        Ok(Self { providers })
    }

    /// The provider's replicas now.
    pub fn replicas(&self, provider: &str) -> Option<Arc<Replicas>> {
        self.providers.get(provider).map(|s| s.current())
    }

    /// Every provider's replicas now (for the health checks).
    pub fn all(&self) -> Vec<Arc<Replicas>> {
        self.providers.values().map(|s| s.current()).collect()
    }

    /// The providers found by DNS (for [`dns::run`]).
    pub fn by_dns(&self) -> Vec<Arc<Slot>> {
        self.providers
            .values()
            .filter(|s| s.dns.is_some())
            .cloned()
            .collect()
    }
}

/// The replica set for `endpoints`: a replica of `before` whose endpoint, TLS name and TLS
/// material are unchanged is kept (its connection, load and standing); others are new. With
/// nothing changed, `before` itself.
fn replicas(
    p: &crate::policy::model::Provider,
    endpoints: &[String],
    tls: &UpstreamTls,
    before: Option<&Arc<Replicas>>,
) -> Result<Arc<Replicas>, String> {
    let mut list = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let key = (endpoint.clone(), p.tls_name.clone(), tls.generation);
        let kept = before.and_then(|set| set.list.iter().find(|r| r.key == key).cloned());
        let replica = match kept {
            Some(r) => r,
            None => {
                let ch = channel(p, endpoint, tls)?;
                let client = DataExchangeClient::new(ch.clone())
                    .max_decoding_message_size(tls.max_message_bytes)
                    .max_encoding_message_size(tls.max_message_bytes);
                Arc::new(Replica::new(&p.id, key, ch, client))
            }
        };
        list.push(replica);
    }
    // (A changed `try_timeout` comes with new TLS material, so new keys: never `is`.)
    Ok(match before {
        Some(set) if set.is(&list) => set.clone(),
        Some(set) => Arc::new(set.successor(list, tls.try_timeout)),
        None => Arc::new(Replicas::new(&p.id, list, tls.try_timeout)),
    })
}

/// A lazily connecting mTLS channel to one endpoint.
fn channel(
    p: &crate::policy::model::Provider,
    endpoint: &str,
    tls: &UpstreamTls,
) -> Result<Channel, String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("provider `{}`: bad endpoint `{endpoint}`: {e}", p.id))?;
    let name = p
        .tls_name
        .clone()
        .or_else(|| p.dns.as_ref().map(|d| d.name.clone()))
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
    Ok(channel)
}

/// How a try's failure counts for the replica: connection-level trouble and the provider's
/// own "cannot serve" answers count towards ejection; its refusals do not.
pub fn outcome_of(status: &Status) -> balance::Outcome {
    match status.code() {
        Code::Unavailable | Code::Internal | Code::Unknown => balance::Outcome::Failed,
        Code::Cancelled | Code::DeadlineExceeded => balance::Outcome::Abandoned,
        _ => balance::Outcome::Answered,
    }
}

/// Whether a failed try may go to another replica: the connection failed or went away under
/// it (connect failure, refused stream, GOAWAY, a reset: `UNAVAILABLE`, and `UNKNOWN` /
/// `CANCELLED` from a transport that broke), or the provider said it cannot serve now. Only
/// reads are sent this way, so a repeat is safe. (A `CANCELLED` near the deadline is a
/// timeout, decided before this is asked.)
pub fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
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
