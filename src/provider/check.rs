//! What is served: every configured dataset with its source and its state after the last
//! check against the live schema, and the loop that checks them (at start, on reload, every
//! `check_interval_secs`, and at once after a call met a schema change).
//!
//! A dataset serves only once its check passed. A mismatch refuses it (`DATASET_NOT_SERVED`)
//! and says why in `/ready`, the log and `xgate_source_dataset_serving`; a source that cannot
//! be reached makes its calls `SOURCE_UNAVAILABLE` until a check reaches it. Health
//! (`grpc.health.v1`) follows: `xgate.v1.DataExchange/<dataset>` per dataset, and the whole
//! service (`""`, `xgate.v1.DataExchange`) serving while any dataset does (what a gateway's
//! health check asks: can this endpoint take calls). `/ready` wants every dataset.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::Notify;

use super::{
    config::{ProviderConfig, Source},
    dataset::Binding,
    http::HttpSource,
    sql::{CheckError, SqlSource, types::Decoder},
    token::PageKey,
};
use crate::policy::Policy;

/// A configured source.
#[derive(Debug)]
pub enum Src {
    Sql(SqlSource),
    Http(HttpSource),
}

impl Src {
    pub fn name(&self) -> &str {
        match self {
            Src::Sql(s) => &s.name,
            Src::Http(h) => &h.name,
        }
    }
}

/// A dataset's state after its last check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Not checked yet.
    Unchecked,
    /// Checked and serving; SQL sources carry each field's column decoder.
    Serving {
        #[serde(skip)]
        decoders: Vec<Decoder>,
    },
    /// The live schema does not fit: refused until it does.
    Mismatch { errors: Vec<String> },
    /// The source could not be reached at the last check.
    Unavailable { error: String },
}

#[derive(Debug)]
pub struct Served {
    pub binding: Binding,
    pub source: Arc<Src>,
    pub state: ArcSwap<State>,
}

/// Everything built from one reading of provider.yaml and the catalogue.
#[derive(Debug)]
pub struct Catalogue {
    pub datasets: BTreeMap<String, Arc<Served>>,
    pub sources: Vec<Arc<Src>>,
    pub catalogue_version: String,
}

impl Catalogue {
    /// Build (no source is contacted): every problem in the file named.
    pub fn build(cfg: &ProviderConfig) -> Result<Catalogue, Vec<String>> {
        let policy = Policy::load(&cfg.catalogue)
            .map_err(|e| vec![format!("catalogue {}: {e}", cfg.catalogue.display())])?;
        if policy.provider(&cfg.id).is_none() {
            return Err(vec![format!(
                "id: `{}` is not a provider in the catalogue {}",
                cfg.id,
                cfg.catalogue.display()
            )]);
        }
        let mut errs = Vec::new();
        let mut sources = BTreeMap::new();
        for (name, s) in &cfg.sources {
            let built = match s {
                Source::Sql(s) => SqlSource::open(name, s).map(Src::Sql),
                Source::Http(h) => {
                    HttpSource::open(name, h, cfg.limits.max_page_size as usize).map(Src::Http)
                }
            };
            match built {
                Ok(s) => {
                    sources.insert(name.clone(), Arc::new(s));
                }
                Err(e) => errs.push(e),
            }
        }
        let mut datasets = BTreeMap::new();
        for map in &cfg.datasets {
            match Binding::new(&cfg.id, map, &policy) {
                Ok(b) => {
                    if let Some(src) = sources.get(&map.source) {
                        let source = src.clone();
                        datasets.insert(
                            b.id.clone(),
                            Arc::new(Served {
                                binding: b,
                                source,
                                state: ArcSwap::from_pointee(State::Unchecked),
                            }),
                        );
                    }
                }
                Err(e) => errs.extend(e),
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Catalogue {
            datasets,
            sources: sources.into_values().collect(),
            catalogue_version: policy.version.to_string(),
        })
    }

    /// Check every dataset now (concurrently), and record the outcome.
    pub async fn check_all(&self) {
        let checks = self.datasets.values().map(|d| check_one(d.clone()));
        futures_util::future::join_all(checks).await;
    }

    /// Whether every dataset serves.
    pub fn all_serving(&self) -> bool {
        self.datasets
            .values()
            .all(|d| matches!(**d.state.load(), State::Serving { .. }))
    }

    pub async fn close(&self) {
        for s in &self.sources {
            if let Src::Sql(s) = &**s {
                s.close().await;
            }
        }
    }
}

async fn check_one(d: Arc<Served>) {
    let outcome = match &*d.source {
        Src::Sql(s) => s
            .check(&d.binding)
            .await
            .map(|decoders| State::Serving { decoders }),
        Src::Http(h) => h
            .check(&d.binding)
            .await
            .map(|()| State::Serving { decoders: vec![] }),
    };
    let next = match outcome {
        Ok(s) => s,
        Err(CheckError::Mismatch(errors)) => State::Mismatch { errors },
        Err(CheckError::Unavailable(error)) => State::Unavailable { error },
    };
    let prev = d.state.load_full();
    let recovered =
        matches!(*prev, State::Mismatch { .. }) && matches!(next, State::Serving { .. });
    if recovered && let Src::Sql(s) = &*d.source {
        // The schema changed since these connections prepared their statements.
        s.refresh();
    }
    if *prev != next {
        match &next {
            State::Serving { .. } => {
                tracing::info!(dataset = %d.binding.id, source = %d.source.name(), "dataset checked: serving")
            }
            State::Mismatch { errors } => {
                tracing::error!(dataset = %d.binding.id, source = %d.source.name(), errors = %errors.join("; "), "dataset refused: its columns do not fit the catalogue")
            }
            State::Unavailable { error } => {
                tracing::warn!(dataset = %d.binding.id, source = %d.source.name(), %error, "dataset's source cannot be reached")
            }
            State::Unchecked => {}
        }
    }
    let result = match &next {
        State::Serving { .. } => "serving",
        State::Mismatch { .. } => "mismatch",
        State::Unavailable { .. } => "unavailable",
        State::Unchecked => "unchecked",
    };
    metrics::counter!("xgate_source_checks_total", "dataset" => d.binding.id.clone(), "result" => result).increment(1);
    metrics::gauge!("xgate_source_dataset_serving", "dataset" => d.binding.id.clone())
        .set(if result == "serving" { 1.0 } else { 0.0 });
    d.state.store(Arc::new(next));
}

/// The live set of datasets, swapped whole on reload.
#[derive(Debug)]
pub struct Live {
    pub current: ArcSwap<Catalogue>,
    /// Wakes the checker early (a call met a schema change).
    pub recheck: Notify,
    pub page_key: PageKey,
    pub health: tonic_health::server::HealthReporter,
}

impl Live {
    /// Publish health for the current state.
    pub async fn publish_health(&self) {
        use tonic_health::ServingStatus::{NotServing, Serving};
        let cat = self.current.load_full();
        // The service as a whole serves while any dataset does (a gateway's health check
        // then keeps this endpoint in rotation for those); each dataset has its own name.
        let any = cat
            .datasets
            .values()
            .any(|d| matches!(**d.state.load(), State::Serving { .. }));
        let all = if any { Serving } else { NotServing };
        self.health.set_service_status("", all).await;
        self.health
            .set_service_status("xgate.v1.DataExchange", all)
            .await;
        for (id, d) in &cat.datasets {
            let s = if matches!(**d.state.load(), State::Serving { .. }) {
                Serving
            } else {
                NotServing
            };
            self.health
                .set_service_status(format!("xgate.v1.DataExchange/{id}"), s)
                .await;
        }
    }

    /// Check every `interval` (every second while a source cannot be reached, so a dataset
    /// serves again soon after its source is back), or at once when woken.
    pub async fn run_checks(self: Arc<Self>, interval: Duration) {
        let mut next = interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = self.recheck.notified() => {}
            }
            let cat = self.current.load_full();
            cat.check_all().await;
            self.publish_health().await;
            let down = cat
                .datasets
                .values()
                .any(|d| matches!(**d.state.load(), State::Unavailable { .. }));
            next = if down {
                interval.min(Duration::from_secs(1))
            } else {
                interval
            };
        }
    }

    /// Pool gauges, every second.
    pub async fn sample_pools(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let cat = self.current.load_full();
            for s in &cat.sources {
                if let Src::Sql(sql) = &**s {
                    for (pool, (open, idle)) in ["query", "stream"].into_iter().zip(sql.pool_use())
                    {
                        let busy = (open as usize).saturating_sub(idle);
                        metrics::gauge!("xgate_source_pool_connections", "source" => sql.name.clone(), "pool" => pool, "state" => "busy").set(busy as f64);
                        metrics::gauge!("xgate_source_pool_connections", "source" => sql.name.clone(), "pool" => pool, "state" => "idle").set(idle as f64);
                    }
                }
            }
        }
    }

    /// What `/ready` shows.
    pub fn readiness(&self) -> (bool, serde_json::Value) {
        let cat = self.current.load_full();
        let datasets: serde_json::Map<String, serde_json::Value> = cat
            .datasets
            .iter()
            .map(|(id, d)| {
                let mut v = serde_json::to_value(&**d.state.load()).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("source".into(), d.source.name().into());
                }
                (id.clone(), v)
            })
            .collect();
        let ok = cat.all_serving();
        (
            ok,
            serde_json::json!({ "ready": ok, "catalogue_version": cat.catalogue_version, "datasets": datasets }),
        )
    }
}
