//! `xgate.v1.DataExchange` as the gateway calls it, top-down: only the gateway ▸ the dataset
//! and its state ▸ the request read against the catalogue ▸ the page token ▸ the source ▸ the
//! answer (and the next token). Every refusal is a [`Reject`] with a stable reason, so the
//! gateway passes on a sentence its caller can act on; source details stay in this log.

use std::{sync::Arc, time::Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{
    check::{Live, Served, Src, State},
    config::Limits,
    dataset::Asked,
    sql::SourceError,
    token::{self, Position},
};
use crate::{
    error::{Reason, Reject},
    pb::{self, QueryRequest, QueryResponse},
};

#[derive(Debug, Clone)]
pub struct Service {
    pub(super) live: Arc<Live>,
    pub(super) gateway_ids: Arc<Vec<String>>,
    pub(super) limits: Limits,
}

/// A call in progress: what the log, the span and the metrics say about it.
struct Call {
    trace_id: String,
    dataset: String,
    method: &'static str,
    started: Instant,
    span: tracing::Span,
}

impl Call {
    fn begin<T>(req: &Request<T>, dataset: &str, method: &'static str) -> Call {
        let md = req.metadata();
        let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).unwrap_or("-");
        let span = tracing::info_span!(
            "xgate.provider",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = method,
            xgate.dataset = dataset,
            xgate.consumer = get("x-xgate-consumer-dept"),
            xgate.system = get("x-xgate-consumer-system"),
            xgate.purpose = get("x-xgate-purpose"),
        );
        // The trace the gateway started; a fresh id for a call that brings none.
        let trace_id = crate::telemetry::adopt_parent(&span, md)
            .or_else(|| {
                md.get(crate::TRACE_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
        Call {
            trace_id,
            dataset: dataset.to_owned(),
            method,
            started: Instant::now(),
            span,
        }
    }

    fn refuse(&self, r: Reject) -> Status {
        self.count(r.reason.as_str());
        self.span.in_scope(|| {
            tracing::info!(trace_id = %self.trace_id, reason = %r.reason, message = %r.message, "call refused")
        });
        r.to_status(&self.trace_id)
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("xgate_source_queries_total", "dataset" => self.dataset.clone(), "method" => self.method, "outcome" => outcome).increment(1);
    }

    /// A source failure: logged with its detail, counted by kind, told without it.
    fn failed(&self, live: &Live, d: &Served, e: SourceError) -> Status {
        let kind = e.fault.kind();
        metrics::counter!("xgate_source_errors_total", "source" => d.source.name().to_owned(), "kind" => kind).increment(1);
        self.span.in_scope(|| {
            tracing::warn!(trace_id = %self.trace_id, source = %d.source.name(), kind, detail = %e.detail, "source failed")
        });
        if e.fault == super::sql::engine::Fault::Unavailable {
            // Every call would wait its connect timeout to learn the same: answer at once
            // until a check (every second while down) reaches the source again.
            d.state.store(Arc::new(State::Unavailable {
                error: "a call could not reach the source".into(),
            }));
            metrics::gauge!("xgate_source_dataset_serving", "dataset" => d.binding.id.clone())
                .set(0.0);
            live.recheck.notify_one();
        }
        if e.fault == super::sql::engine::Fault::Schema {
            // Refuse the dataset from now on, until a check passes again.
            d.state.store(Arc::new(State::Mismatch {
                errors: vec![format!("a call failed: {}", e.detail)],
            }));
            metrics::gauge!("xgate_source_dataset_serving", "dataset" => d.binding.id.clone())
                .set(0.0);
            live.recheck.notify_one();
        }
        let msg = match e.fault {
            super::sql::engine::Fault::Unavailable => format!(
                "the source of {} cannot be reached; try again later",
                d.binding.id
            ),
            super::sql::engine::Fault::Timeout => {
                format!("the source of {} did not answer in time", d.binding.id)
            }
            super::sql::engine::Fault::Schema => format!(
                "the source of {} changed (a column or table is missing or changed type); the dataset is refused until its check passes again",
                d.binding.id
            ),
            super::sql::engine::Fault::Other => format!(
                "the source of {} failed; the provider's log has the details under trace id {}",
                d.binding.id, self.trace_id
            ),
        };
        self.refuse(Reject::new(e.fault.reason(), msg))
    }

    fn source_time(&self, d: &Served) {
        metrics::histogram!("xgate_source_seconds", "source" => d.source.name().to_owned(), "method" => self.method)
            .record(self.started.elapsed().as_secs_f64());
    }
}

impl Service {
    /// Only the gateway: its client certificate's SAN URI must be configured.
    fn gateway_only<T>(&self, req: &Request<T>) -> Result<(), Reject> {
        let refused = |why: &str| {
            Reject::new(
                Reason::CallerNotGateway,
                format!("only the gateway may call this provider ({why})"),
            )
        };
        let certs = req
            .peer_certs()
            .ok_or_else(|| refused("no client certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| refused("no client certificate"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|_| refused("unreadable client certificate"))?;
        let ok = cert.subject_alternative_name().ok().flatten().is_some_and(|san| {
            san.value.general_names.iter().any(|n| {
                matches!(n, x509_parser::extensions::GeneralName::URI(u) if self.gateway_ids.iter().any(|g| g == u))
            })
        });
        if ok {
            Ok(())
        } else {
            Err(refused("this certificate is not the gateway's"))
        }
    }

    /// The dataset, serving, and the request read against it.
    fn admit(
        &self,
        call: &Call,
        req: &Request<QueryRequest>,
    ) -> Result<(Arc<Served>, Vec<super::sql::types::Decoder>, Asked), Status> {
        self.gateway_only(req).map_err(|r| call.refuse(r))?;
        let body = req.get_ref();
        let cat = self.live.current.load();
        let Some(d) = cat.datasets.get(&body.dataset).cloned() else {
            return Err(call.refuse(Reject::new(
                Reason::DatasetUnknown,
                format!("dataset `{}` is not served by this provider", body.dataset),
            )));
        };
        let decoders = match &**d.state.load() {
            State::Serving { decoders } => decoders.clone(),
            State::Unavailable { .. } => {
                return Err(call.refuse(Reject::new(
                    Reason::SourceUnavailable,
                    format!(
                        "the source of {} cannot be reached; try again later",
                        body.dataset
                    ),
                )));
            }
            State::Mismatch { .. } | State::Unchecked => {
                return Err(call.refuse(Reject::new(
                    Reason::DatasetNotServed,
                    format!("{} is not being served: its source failed the schema check (the provider's /ready says why)", body.dataset),
                )));
            }
        };
        let asked = d
            .binding
            .read(body, self.limits.max_in_values)
            .map_err(|r| call.refuse(r))?;
        Ok((d, decoders, asked))
    }

    fn page_size(&self, asked: u32) -> u32 {
        match asked {
            0 => self.limits.default_page_size,
            n => n.min(self.limits.max_page_size),
        }
    }

    fn columns(d: &Served, asked: &Asked) -> Vec<pb::Column> {
        asked
            .fields
            .iter()
            .map(|&i| {
                let f = &d.binding.fields[i];
                pb::Column {
                    name: f.name.clone(),
                    r#type: f.ty.to_pb() as i32,
                }
            })
            .collect()
    }
}

#[tonic::async_trait]
impl pb::data_exchange_server::DataExchange for Service {
    async fn query(&self, req: Request<QueryRequest>) -> Result<Response<QueryResponse>, Status> {
        let call = Call::begin(&req, &req.get_ref().dataset, "Query");
        let (d, decoders, asked) = self.admit(&call, &req)?;
        let body = req.into_inner();
        let bound = token::digest(&body);
        let pos = if body.page_token.is_empty() {
            None
        } else {
            Some(self.live.page_key.open(&bound, &body.page_token).ok_or_else(|| {
                call.refuse(Reject::new(
                    Reason::PageTokenInvalid,
                    "the page token was not issued by this provider for this query; start from the first page",
                ))
            })?)
        };
        let size = self.page_size(body.page_size);
        let result = match &*d.source {
            Src::Sql(s) => {
                let after = match &pos {
                    Some(Position::After(p)) => Some(p),
                    None => None,
                    Some(_) => {
                        return Err(call.refuse(Reject::new(
                            Reason::PageTokenInvalid,
                            "the page token is not for this dataset",
                        )));
                    }
                };
                s.page(&d.binding, &decoders, &asked, after, size)
                    .await
                    .map(|(rows, next)| Ok((rows, next.map(Position::After))))
            }
            Src::Http(h) => h.page(&d.binding, &asked, pos.as_ref(), size).await,
        };
        call.source_time(&d);
        let (rows, next) = match result {
            Ok(Ok(page)) => page,
            Ok(Err(r)) => return Err(call.refuse(r)),
            Err(e) => return Err(call.failed(&self.live, &d, e)),
        };
        metrics::counter!("xgate_source_rows_total", "dataset" => d.binding.id.clone())
            .increment(rows.len() as u64);
        call.count("ok");
        let next_page_token = next
            .map(|p| self.live.page_key.seal(&bound, &p))
            .unwrap_or_default();
        let mut resp = Response::new(QueryResponse {
            columns: Self::columns(&d, &asked),
            rows,
            masked_columns: vec![],
            next_page_token,
        });
        if let Ok(v) = call.trace_id.parse() {
            resp.metadata_mut().insert(crate::TRACE_ID_HEADER, v);
        }
        Ok(resp)
    }

    type QueryStreamStream = ReceiverStream<Result<QueryResponse, Status>>;

    async fn query_stream(
        &self,
        req: Request<QueryRequest>,
    ) -> Result<Response<Self::QueryStreamStream>, Status> {
        let call = Call::begin(&req, &req.get_ref().dataset, "QueryStream");
        let (d, decoders, asked) = self.admit(&call, &req)?;
        let batch = self.page_size(req.get_ref().page_size);
        let columns = Self::columns(&d, &asked);
        // Two batches in flight at most: the source is read as fast as the gateway reads.
        let (tx, rx) = mpsc::channel(2);
        let live = self.live.clone();
        let trace_header: Option<tonic::metadata::AsciiMetadataValue> = call.trace_id.parse().ok();
        tokio::spawn(async move {
            let err_tx = tx.clone();
            let result = match &*d.source {
                Src::Sql(s) => s
                    .stream(&d.binding, &decoders, &asked, batch, columns, tx)
                    .await
                    .map(Ok),
                Src::Http(h) => h.stream(&d.binding, &asked, batch, columns, tx).await,
            };
            call.source_time(&d);
            let status = match result {
                Ok(Ok(rows)) => {
                    metrics::counter!("xgate_source_rows_total", "dataset" => d.binding.id.clone())
                        .increment(rows);
                    call.count("ok");
                    return;
                }
                Ok(Err(r)) => call.refuse(r),
                Err(e) => call.failed(&live, &d, e),
            };
            let _ = err_tx.send(Err(status)).await;
        });
        let mut resp = Response::new(ReceiverStream::new(rx));
        if let Some(v) = trace_header {
            resp.metadata_mut().insert(crate::TRACE_ID_HEADER, v);
        }
        Ok(resp)
    }
}
