//! What ops teams see, from the real binary: OTLP spans (received by a real OTLP/gRPC
//! collector endpoint in this test) with the caller's trace as parent and the provider's
//! request as child, JSON logs carrying the trace id, Prometheus metrics, `/ready` with
//! provider probes, and the gRPC health and reflection services on the gateway port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value as AnyValue,
    trace::v1::Span,
};
use tonic::{Code, metadata::MetadataValue};
use xgate::dev::provider::Behaviour;

/// A real OTLP/gRPC trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            AnyValue::BoolValue(b) => b.to_string(),
            AnyValue::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_metrics_logs_health_and_reflection_from_the_real_binary() {
    // The collector.
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_port = listener.local_addr().unwrap().port();
    let svc = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // Providers and the gateway (real binary, JSON logs, OTLP on, admin on).
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let (ports, provs) = start_providers(&Behaviour::default(), stop_rx).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.yaml"),
        policy_with_ports(ports["public-security"], ports["market-supervision"]),
    )
    .unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let cfg = serve_yaml(
        port,
        "audit",
        &format!(
            r#"admin_listen: 127.0.0.1:{admin_port}
log: {{ format: json, level: info }}
otlp: {{ endpoint: "http://127.0.0.1:{otlp_port}", service_name: xgate-test, sample_ratio: 1.0 }}"#
        ),
    );
    std::fs::write(dir.path().join("xgate.yaml"), cfg).unwrap();
    let served = Served::spawn(
        &dir.path().join("xgate.yaml"),
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let wait_log = |what: &str| served.wait_for(what);
    wait_log("xgate listening");

    let url = format!("https://127.0.0.1:{port}");
    let ch = dept_channel(&url, "civil-affairs").await;
    let mut data = xgate::pb::data_exchange_client::DataExchangeClient::new(ch.clone());

    // One allowed call inside the caller's own trace.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut r = req(
        query(
            "hukou.person_basic",
            "subsidy-eligibility",
            &["region_code = 330106"],
            2,
        ),
        &token("civil-affairs"),
    );
    r.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(format!("00-{caller_trace}-{caller_span}-01")).unwrap(),
    );
    r.metadata_mut()
        .insert("tracestate", MetadataValue::from_static("zjgov=dept-ca"));
    let resp = data.query(r).await.unwrap();
    assert_eq!(resp.get_ref().rows.len(), 2, "a page of 2 of Xihu's rows");
    assert_eq!(
        resp.metadata().get("x-xgate-trace-id").unwrap(),
        caller_trace,
        "the audit trace id is the caller's trace id"
    );
    // The provider got the same trace, with the gateway's upstream span as parent.
    let md = provs["public-security"]
        .stats
        .last_metadata
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    let tp = md.get("traceparent").unwrap().to_str().unwrap().to_owned();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], caller_trace, "{tp}");
    assert_ne!(parts[2], caller_span, "a new parent: the upstream span");
    assert_eq!(
        md.get("tracestate").unwrap().to_str().unwrap(),
        "zjgov=dept-ca"
    );

    // One refused call (health has no grant).
    let mut health = xgate::pb::data_exchange_client::DataExchangeClient::new(
        dept_channel(&url, "health").await,
    );
    let st = health
        .query(req(
            query("hukou.person_basic", "medical-insurance", &[], 1),
            &token("health"),
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied);

    // Spans arrive (batch exporter, 100 ms delay).
    let t0 = Instant::now();
    let spans = loop {
        let spans = collector.0.lock().unwrap().clone();
        let done = spans
            .iter()
            .filter(|s| s.name == "/xgate.v1.DataExchange/Query")
            .count()
            >= 2
            && spans.iter().any(|s| s.name == "xgate.upstream");
        if done {
            break spans;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "spans: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|s| hex::encode(&s.trace_id) == caller_trace)
        .collect();
    let call = ours
        .iter()
        .find(|s| attr(s, "rpc.method").is_some())
        .expect("the call span");
    assert_eq!(hex::encode(&call.parent_span_id), caller_span);
    assert_eq!(call.kind, 2, "server kind");
    assert_eq!(
        attr(call, "xgate.consumer").as_deref(),
        Some("civil-affairs")
    );
    assert_eq!(
        attr(call, "xgate.dataset").as_deref(),
        Some("hukou.person_basic")
    );
    assert_eq!(
        attr(call, "xgate.purpose").as_deref(),
        Some("subsidy-eligibility")
    );
    assert_eq!(attr(call, "xgate.decision").as_deref(), Some("allow"));
    assert_eq!(attr(call, "rpc.grpc.status_code").as_deref(), Some("0"));
    assert_eq!(
        attr(call, "xgate.rows").as_deref(),
        Some("2"),
        "the rows sent"
    );
    for child in [
        "xgate.authenticate",
        "xgate.policy",
        "xgate.limit",
        "xgate.upstream",
        "xgate.audit",
    ] {
        let c = ours
            .iter()
            .find(|s| s.name == child)
            .unwrap_or_else(|| panic!("no {child} span"));
        assert_eq!(
            c.parent_span_id, call.span_id,
            "{child} is a child of the call"
        );
    }
    let up = ours.iter().find(|s| s.name == "xgate.upstream").unwrap();
    assert_eq!(up.kind, 3, "client kind");
    assert_eq!(hex::encode(&up.span_id), parts[2], "the provider's parent");
    let refused = spans
        .iter()
        .find(|s| attr(s, "xgate.reason").as_deref() == Some("GRANT_MISSING"))
        .expect("the refused call's span");
    assert_eq!(attr(refused, "xgate.decision").as_deref(), Some("deny"));
    assert_eq!(attr(refused, "rpc.grpc.status_code").as_deref(), Some("7"));

    // JSON logs carry the trace id (the refusal's log line names its trace).
    let refused_trace = hex::encode(&refused.trace_id);
    wait_log(&refused_trace);

    // A handshake without a client certificate, for the TLS failure counter.
    assert!(!call_goes_through_at(&url, None).await);

    // Metrics.
    let admin = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let (code, m) = http(admin, "GET", "/metrics").await;
    assert_eq!(code, 200);
    for needle in [
        r#"xgate_calls_total{method="/xgate.v1.DataExchange/Query",consumer="civil-affairs",dataset="hukou.person_basic",code="OK"} 1"#,
        r#"xgate_denials_total{reason="GRANT_MISSING",consumer="health"} 1"#,
        r#"xgate_call_duration_seconds_bucket{method="/xgate.v1.DataExchange/Query",code="OK",le="+Inf"} 1"#,
        "xgate_audit_queue_depth ",
        "xgate_audit_commit_seconds_bucket",
        r#"xgate_provider_in_flight{provider="public-security"} 0"#,
        r#"xgate_policy_info{version="#,
        "xgate_tls_handshake_failures_total{",
        "xgate_policy_reloads_total",
    ] {
        assert!(m.contains(needle), "no `{needle}` in /metrics:\n{m}");
    }
    // Readiness lists each provider (probed every 5 s; the first probe runs at start).
    let t0 = Instant::now();
    loop {
        let (code, body) = http(admin, "GET", "/ready").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["providers"]["public-security"] == true {
            assert_eq!(code, 200, "{body}");
            assert_eq!(v["ready"], true);
            assert_eq!(v["audit_writable"], true);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, m) = http(admin, "GET", "/metrics").await;
    assert!(m.contains(r#"xgate_provider_up{provider="public-security"} 1"#));

    // The standard gRPC health service and reflection, on the gateway port (mTLS).
    let mut hc = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let st = hc
        .check(tonic_health::pb::HealthCheckRequest {
            service: "xgate.v1.DataExchange".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut rc = ServerReflectionClient::new(ch);
    let mut answers = rc
        .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .unwrap()
        .into_inner();
    let a = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = a.message_response else {
        panic!("{a:?}")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for s in [
        "xgate.v1.DataExchange",
        "xgate.v1.Catalog",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&s), "{names:?}");
    }
}

/// `/ready` and gRPC health: one provider down leaves the gateway ready (its calls get
/// PROVIDER_UNAVAILABLE) and says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_an_unreachable_provider() {
    let h = Harness::start(Opts {
        provider_down: true,
        admin: true,
        ..Opts::default()
    })
    .await;
    let admin = h.admin.unwrap();
    let t0 = Instant::now();
    loop {
        let (code, body) = http(admin, "GET", "/ready").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["providers"]["public-security"] == false {
            assert_eq!(code, 200, "{body}");
            assert_eq!(v["providers"]["market-supervision"], true, "{body}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
