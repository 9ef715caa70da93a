//! Providers found by DNS (`providers[].dns`): the replicas are every address one name
//! resolves to (a Kubernetes headless Service answers with one per ready pod), re-resolved
//! every `every_secs`. A changed answer replaces the provider's replica set at once: new
//! addresses get replicas (connecting lazily, checked by the health checks like any other),
//! addresses still there keep theirs, and removed ones drain (calls holding them finish on
//! them). A failed or empty resolution keeps the set it had: a DNS outage does not take a
//! provider's replicas away.
//!
//! Resolution is the system's (`getaddrinfo`: `/etc/hosts`, then the cluster's resolver),
//! as every other client in the pod sees it. Not here: how calls pick among the replicas
//! ([`super::balance`]).

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{Slot, UpstreamTls, replicas};
use crate::policy::model::{DnsEndpoints, Provider};

/// What a DNS-found slot needs to build replicas for new addresses.
#[derive(Debug)]
pub struct Source {
    cfg: DnsEndpoints,
    provider: Provider,
    tls: UpstreamTls,
    next: Mutex<Instant>,
}

impl Source {
    pub(super) fn new(p: &Provider, d: &DnsEndpoints, tls: &UpstreamTls) -> Source {
        Source {
            cfg: d.clone(),
            provider: p.clone(),
            tls: tls.clone(),
            next: Mutex::new(Instant::now() + Duration::from_secs(d.every_secs)),
        }
    }

    /// Whether `slot` was found by the same name and port, checked with the same TLS: then
    /// it carries over a reload whole (with what it resolved since).
    pub(super) fn same(slot: &Slot, p: &Provider, d: &DnsEndpoints, tls: &UpstreamTls) -> bool {
        slot.dns.as_ref().is_some_and(|s| {
            s.cfg == *d && s.provider.tls_name == p.tls_name && s.tls.generation == tls.generation
        })
    }
}

/// The endpoints of an answer: each address once, in a stable order.
fn endpoints(d: &DnsEndpoints, mut ips: Vec<IpAddr>) -> Vec<String> {
    ips.sort();
    ips.dedup();
    ips.into_iter().map(|ip| d.endpoint(ip)).collect()
}

/// Resolve `d` now, blocking (at start and on a reload's thread). Failure: no endpoints yet
/// (calls get `PROVIDER_UNAVAILABLE` until the next resolution finds some), logged.
pub(super) fn resolve_now(p: &Provider, d: &DnsEndpoints) -> Vec<String> {
    use std::net::ToSocketAddrs;
    match (d.name.as_str(), d.port).to_socket_addrs() {
        Ok(addrs) => {
            let found = endpoints(d, addrs.map(|a| a.ip()).collect());
            metrics::gauge!("xgate_upstream_endpoints", "provider" => p.id.clone())
                .set(found.len() as f64);
            found
        }
        Err(e) => {
            tracing::warn!(provider = %p.id, name = %d.name, error = %e, "provider's DNS name does not resolve; no endpoints until it does");
            metrics::counter!("xgate_upstream_dns_resolutions_total", "provider" => p.id.clone(), "result" => "error").increment(1);
            Vec::new()
        }
    }
}

impl Slot {
    /// Resolve again if due: `Ok(true)` when the answer changed the replica set.
    pub async fn refresh(&self) -> Result<bool, String> {
        let Some(src) = &self.dns else {
            return Ok(false);
        };
        {
            let Ok(mut next) = src.next.lock() else {
                return Ok(false);
            };
            if Instant::now() < *next {
                return Ok(false);
            }
            *next = Instant::now() + Duration::from_secs(src.cfg.every_secs);
        }
        let result = |r: &'static str| {
            metrics::counter!("xgate_upstream_dns_resolutions_total", "provider" => self.provider.clone(), "result" => r).increment(1);
        };
        let ips: Vec<IpAddr> =
            match tokio::net::lookup_host((src.cfg.name.as_str(), src.cfg.port)).await {
                Ok(addrs) => addrs.map(|a| a.ip()).collect(),
                Err(e) => {
                    result("error");
                    return Err(format!("{}: {e}", src.cfg.name));
                }
            };
        if ips.is_empty() {
            result("error");
            return Err(format!("{}: no addresses", src.cfg.name));
        }
        let found = endpoints(&src.cfg, ips);
        let now = self.current();
        if now.list.iter().map(|r| &r.endpoint).eq(found.iter()) {
            result("unchanged");
            return Ok(false);
        }
        let next = replicas(&src.provider, &found, &src.tls, Some(&now))?;
        tracing::info!(provider = %self.provider, name = %src.cfg.name, before = ?now.list.iter().map(|r| &r.endpoint).collect::<Vec<_>>(), now = ?found, "provider's endpoints changed (DNS)");
        metrics::gauge!("xgate_upstream_endpoints", "provider" => self.provider.clone())
            .set(found.len() as f64);
        self.set.store(next);
        result("changed");
        Ok(true)
    }
}

/// Re-resolve every DNS-found provider when due, for as long as `slots` gives any (it
/// returns `None` once the gateway is gone). Checks once a second; each provider resolves at
/// its own `every_secs`.
pub async fn run(slots: impl Fn() -> Option<Vec<Arc<Slot>>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(slots) = slots() else { return };
        for slot in slots {
            if let Err(e) = slot.refresh().await {
                tracing::warn!(provider = %slot.provider, error = %e, "provider's DNS name did not resolve; keeping its endpoints");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_each_address_once_in_order() {
        let d = DnsEndpoints {
            name: "p.svc".into(),
            port: 7443,
            every_secs: 5,
        };
        let ips = ["10.0.0.9", "10.0.0.2", "10.0.0.9", "fd00::1"]
            .map(|s| s.parse().unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(
            endpoints(&d, ips.to_vec()),
            [
                "https://10.0.0.2:7443",
                "https://10.0.0.9:7443",
                "https://[fd00::1]:7443"
            ]
        );
    }
}
