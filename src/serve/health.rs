//! Is this gateway fit to take calls? One answer for the admin `/ready`, the standard gRPC
//! health service on the gateway port, and the metrics.
//!
//! Ready means: a policy is loaded, the audit trail takes records, and the providers can be
//! reached. Every provider endpoint is checked every `upstream.health_check.interval_ms`
//! (`grpc.health.v1` over mTLS; thresholds in and out); one department's backend being down
//! does not take the gateway out of
//! rotation — its calls get `PROVIDER_UNAVAILABLE` while every other department's data flows —
//! so the gateway is *not ready* only when every provider is unreachable. `/ready` lists each
//! provider either way, and `xgate_provider_up{provider}` carries it to dashboards.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::pipeline::{Gateway, WeakGateway};

/// What `/ready` says.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// The gateway's version (`xgate --version`).
    pub version: &'static str,
    pub policy_version: String,
    pub audit_writable: bool,
    /// provider id -> reachable at the last probe (absent before the first probe).
    pub providers: BTreeMap<String, bool>,
    /// Why not ready, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
    /// Shipping to the province trail (`audit.ship`): how far behind, and why if stuck.
    /// Never a reason for not ready: the local trail is the durability point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_shipping: Option<crate::audit::ship::ShipStatus>,
}

/// The gateway's readiness now.
pub fn readiness(gw: &Gateway) -> Readiness {
    let snap = gw.snapshot();
    let up = gw.providers_up();
    let providers: BTreeMap<String, bool> = snap
        .policy
        .file
        .providers
        .iter()
        .filter_map(|p| up.get(&p.id).map(|u| (p.id.clone(), *u)))
        .collect();
    let audit = gw.audit_open();
    let all_down = !providers.is_empty() && providers.values().all(|u| !u);
    let why_not = if !audit {
        Some("the audit trail does not take records".to_owned())
    } else if all_down {
        Some("no provider can be reached".to_owned())
    } else {
        None
    };
    Readiness {
        version: env!("CARGO_PKG_VERSION"),
        ready: why_not.is_none(),
        policy_version: snap.policy.version.to_string(),
        audit_writable: audit,
        providers,
        why_not,
        audit_shipping: gw.shipping().map(|s| s.status()),
    }
}

/// The gRPC services whose health is reported (plus `""`, the server as a whole).
pub const SERVICES: [&str; 2] = ["xgate.v1.DataExchange", "xgate.v1.Catalog"];

/// Check every provider endpoint (`grpc.health.v1` over its own mTLS connection) every
/// `upstream.health_check.interval_ms`, keep each endpoint in or out of rotation by the
/// thresholds, and keep `/ready`, the gRPC health service and the provider gauges current. A
/// provider is up while any of its endpoints is healthy. Ends when the gateway is gone.
pub fn spawn_prober(
    gateway: WeakGateway,
    reporter: HealthReporter,
    hc: crate::config::HealthCheck,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(hc.interval_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = Duration::from_millis(hc.timeout_ms.max(1));
        loop {
            tick.tick().await;
            let Some(gw) = gateway.upgrade() else { return };
            let sets = gw.snapshot().upstreams.all();
            drop(gw);
            let probes = sets.iter().map(|set| async move {
                let each = set.list.iter().map(|r| async move {
                    let passed = check(&r.channel, timeout).await;
                    if r.checked(passed, hc.healthy_threshold, hc.unhealthy_threshold) {
                        if r.healthy() {
                            tracing::info!(provider = %set.provider, endpoint = %r.endpoint, "provider endpoint healthy again (health check)");
                        } else {
                            tracing::warn!(provider = %set.provider, endpoint = %r.endpoint, "provider endpoint unhealthy (health check): out of rotation");
                        }
                    }
                    r.healthy()
                });
                let up = futures_util::future::join_all(each)
                    .await
                    .into_iter()
                    .any(|h| h);
                (set.provider.clone(), up)
            });
            let results = futures_util::future::join_all(probes).await;
            let Some(gw) = gateway.upgrade() else { return };
            let mut map = std::collections::HashMap::new();
            for (id, up) in results {
                metrics::gauge!("xgate_provider_up", "provider" => id.clone()).set(if up {
                    1.0
                } else {
                    0.0
                });
                if !up && gw.providers_up().get(&id).copied().unwrap_or(true) {
                    tracing::warn!(provider = %id, "provider unreachable (health checks)");
                }
                map.insert(id, up);
            }
            gw.set_providers_up(map);
            let status = if readiness(&gw).ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            drop(gw);
            reporter.set_service_status("", status).await;
            for s in SERVICES {
                reporter.set_service_status(s, status).await;
            }
        }
    })
}

/// One `grpc.health.v1` check of `xgate.v1.DataExchange` within `timeout`. A provider
/// without the health service (`UNIMPLEMENTED`) or without that name (`NOT_FOUND`) passes:
/// it answered over mTLS, which is what the TCP probe before it proved, and more.
async fn check(ch: &tonic::transport::Channel, timeout: Duration) -> bool {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus as S, health_client::HealthClient,
    };
    let mut c = HealthClient::new(ch.clone());
    let req = HealthCheckRequest {
        service: "xgate.v1.DataExchange".into(),
    };
    match tokio::time::timeout(timeout, c.check(req)).await {
        Ok(Ok(r)) => r.into_inner().status == S::Serving as i32,
        Ok(Err(s)) => matches!(s.code(), tonic::Code::Unimplemented | tonic::Code::NotFound),
        Err(_) => false,
    }
}

/// Refresh the gauges that are read, not counted (called when `/metrics` is scraped).
pub fn export_gauges(gw: &Gateway) {
    metrics::gauge!("xgate_audit_queue_depth").set(gw.audit_queue_depth() as f64);
    // `xgate_policy_info{version}`: 1 for the version serving, 0 for the one before.
    static LAST: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
    let version = gw.snapshot().policy.version.to_string();
    if let Ok(mut last) = LAST.lock()
        && *last != version
    {
        if !last.is_empty() {
            metrics::gauge!("xgate_policy_info", "version" => last.clone()).set(0.0);
        }
        last.clone_from(&version);
    }
    metrics::gauge!("xgate_policy_info", "version" => version).set(1.0);
}
