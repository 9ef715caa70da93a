//! The gRPC port's routes: which service a request's path names.
//!
//! The three services that carry departments' calls (`DataExchange`, `Catalog`, `Usage`) are
//! matched here by their path prefix and called directly, their own future returned as it
//! is. Everything else (health, reflection, and a path no service serves, answered
//! `UNIMPLEMENTED`) goes to tonic's router. That router is an axum router: per request it
//! matches the path, stores the route's parameters in the request, clones a boxed service
//! and boxes its future and body, none of which a call to a known gRPC method needs.
//!
//! Not here: what happens before a request is routed (`pipeline::edge`: the metadata limit,
//! refusals tonic would make), or in a service (`pipeline`).

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use tonic::server::NamedService;
use tower::Service;

use crate::{
    pb::{catalog_server::CatalogServer, usage_server::UsageServer},
    pipeline::Gateway,
    wire::data_exchange_server::DataExchangeServer,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Answer = http::Response<tonic::body::Body>;
type Future = Pin<Box<dyn std::future::Future<Output = Result<Answer, Infallible>> + Send>>;

/// The gRPC port's services, by path.
#[derive(Clone)]
pub struct GrpcRoutes {
    data: DataExchangeServer<Gateway>,
    catalog: CatalogServer<Gateway>,
    usage: UsageServer<Gateway>,
    /// Health, reflection, and the `UNIMPLEMENTED` answer for any other path.
    rest: tonic::service::Routes,
}

impl std::fmt::Debug for GrpcRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcRoutes").finish_non_exhaustive()
    }
}

impl GrpcRoutes {
    pub fn new(
        data: DataExchangeServer<Gateway>,
        catalog: CatalogServer<Gateway>,
        usage: UsageServer<Gateway>,
        rest: tonic::service::Routes,
    ) -> Self {
        GrpcRoutes {
            data,
            catalog,
            usage,
            rest,
        }
    }
}

/// Which of the direct services `path` (`/package.Service/Method`) names.
fn service_of(path: &str) -> Option<&str> {
    let (service, _method) = path.strip_prefix('/')?.split_once('/')?;
    Some(service)
}

impl<B> Service<http::Request<B>> for GrpcRoutes
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send + 'static,
{
    type Response = Answer;
    type Error = Infallible;
    type Future = Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every service here is always ready (tonic's generated servers and its router are).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match service_of(req.uri().path()) {
            Some(DataExchangeServer::<Gateway>::NAME) => self.data.call(req),
            Some(CatalogServer::<Gateway>::NAME) => self.catalog.call(req),
            Some(UsageServer::<Gateway>::NAME) => self.usage.call(req),
            _ => {
                let fut = self.rest.call(req);
                Box::pin(fut)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_names_its_service() {
        assert_eq!(
            service_of("/xgate.v1.DataExchange/Query"),
            Some("xgate.v1.DataExchange")
        );
        assert_eq!(
            service_of("/grpc.health.v1.Health/Check"),
            Some("grpc.health.v1.Health")
        );
        // No method, no leading slash: not a gRPC path; tonic's router answers them.
        assert_eq!(service_of("/xgate.v1.DataExchange"), None);
        assert_eq!(service_of("xgate.v1.DataExchange/Query"), None);
        assert_eq!(service_of("/"), None);
    }
}
