//! Logs and traces: `tracing` to stderr (text or JSON), and OTLP/gRPC trace export when the
//! config asks for it (off by default).
//!
//! Every call is one `xgate.call` span (server kind) with children for authentication, the
//! policy decision, the rate limit, the upstream call (client kind) and the audit write. The
//! caller's W3C `traceparent`/`tracestate` is the parent of the call span, and the upstream
//! span's context is sent on to the provider, so one trace crosses both departments. The log
//! filter (`log.level`) applies to the logs only; spans go to the exporter at INFO whatever the
//! log level.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::config::{Log, LogFormat, Otlp};

/// Keeps the trace exporter alive; shut it down at exit to flush spans.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flush and stop the exporter (blocking work runs off the async threads).
    pub async fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = tokio::task::spawn_blocking(move || p.shutdown()).await;
        }
    }
}

/// Install the global subscriber. Must run inside the tokio runtime when OTLP is on.
pub fn init(log: &Log, otlp: Option<&Otlp>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .map_err(|e| format!("log.level: {e}"))?;
    let fmt = match log.format {
        // Colour only for a person at a terminal: not in files, pipes or journald.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stderr())
                    && std::env::var_os("NO_COLOR").is_none(),
            )
            .with_writer(std::io::stderr)
            .boxed(),
        // JSON lines carry the call span's fields (its `trace_id` among them).
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);
    let (otel_layer, provider) = match otlp {
        None => (None, None),
        Some(o) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(o.endpoint.clone())
                .build()
                .map_err(|e| format!("otlp: {e}"))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    o.sample_ratio,
                ))))
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(o.service_name.clone())
                        .build(),
                )
                .build();
            let tracer = provider.tracer("xgate");
            (
                Some(
                    tracing_opentelemetry::layer()
                        .with_tracer(tracer)
                        .with_filter(LevelFilter::INFO),
                ),
                Some(provider),
            )
        }
    };
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init()
        .map_err(|e| format!("logging: {e}"))?;
    Ok(Telemetry { provider })
}

/// The caller's W3C trace context (`traceparent`, `tracestate`), as the parent of `span`.
/// Returns the trace id `span` belongs to (32 hex digits) when tracing is on.
pub fn adopt_parent(span: &tracing::Span, md: &MetadataMap) -> Option<String> {
    if md.contains_key("traceparent") {
        let cx = TraceContextPropagator::new().extract(&Extract(md));
        let _ = span.set_parent(cx);
    }
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Send `span`'s trace context on in `md`; `false` when tracing is off (nothing written).
pub fn inject(span: &tracing::Span, md: &mut MetadataMap) -> bool {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return false;
    }
    TraceContextPropagator::new().inject_context(&cx, &mut Inject(md));
    true
}

struct Extract<'a>(&'a MetadataMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct Inject<'a>(&'a mut MetadataMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}
