//! The per-call metrics (`xgate_calls_total`, `xgate_call_duration_seconds`), with their
//! handles kept per label set.
//!
//! `metrics::counter!` with label values known only at run time builds a key on every use:
//! a vector of labels, an owned copy of each value, a hash, and a look-up in the recorder's
//! registry. A call's labels come from a small set (method × consumer × dataset × code, all
//! bounded by the policy), so the handles are looked up once per set and kept: a call then
//! hashes four strings it already holds and increments.
//!
//! Not here: which label values a call may use (`settle` bounds them by the policy), and the
//! rarer series (denials, rate limits), which keep the macros.

use std::{hash::BuildHasher, sync::RwLock};

use rustc_hash::{FxBuildHasher, FxHashMap};

/// One label set's handles, with the labels they were made for (hashes can collide).
#[derive(Debug)]
struct Series {
    method: Box<str>,
    consumer: Box<str>,
    dataset: Box<str>,
    code: &'static str,
    calls: metrics::Counter,
    duration: metrics::Histogram,
}

/// Handles of the per-call series, by label set. Grows with the label sets seen (bounded by
/// the policy's departments and datasets); a set no longer in the policy keeps its handles,
/// as the recorder keeps its series.
#[derive(Debug, Default)]
pub(crate) struct CallMetrics {
    series: RwLock<FxHashMap<u64, Vec<Series>>>,
}

impl CallMetrics {
    /// Count one call and its duration under these labels.
    pub(crate) fn record(
        &self,
        method: &str,
        consumer: &str,
        dataset: &str,
        code: &'static str,
        seconds: f64,
    ) {
        let key = FxBuildHasher.hash_one((method, consumer, dataset, code));
        let is = |s: &Series| {
            s.code == code
                && *s.method == *method
                && *s.consumer == *consumer
                && *s.dataset == *dataset
        };
        // A poisoned lock only means a panic elsewhere while it was held: the map is intact.
        {
            let map = self.series.read().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = map.get(&key).and_then(|v| v.iter().find(|s| is(s))) {
                s.calls.increment(1);
                s.duration.record(seconds);
                return;
            }
        }
        let mut map = self.series.write().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(key).or_default();
        let s = match list.iter().position(is) {
            Some(i) => &list[i],
            None => {
                list.push(Series {
                    method: method.into(),
                    consumer: consumer.into(),
                    dataset: dataset.into(),
                    code,
                    calls: metrics::counter!("xgate_calls_total", "method" => method.to_owned(), "consumer" => consumer.to_owned(), "dataset" => dataset.to_owned(), "code" => code),
                    duration: metrics::histogram!("xgate_call_duration_seconds", "method" => method.to_owned(), "code" => code),
                });
                &list[list.len() - 1]
            }
        };
        s.calls.increment(1);
        s.duration.record(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached handles count into the same series the macros would: rendered by a real
    /// Prometheus recorder, two label sets, one of them twice.
    #[test]
    fn cached_handles_count_into_the_recorders_series() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let m = CallMetrics::default();
        metrics::with_local_recorder(&recorder, || {
            m.record("/q", "civil-affairs", "hukou.person_basic", "OK", 0.001);
            m.record("/q", "civil-affairs", "hukou.person_basic", "OK", 0.002);
            m.record(
                "/q",
                "health",
                "hukou.person_basic",
                "PERMISSION_DENIED",
                0.001,
            );
        });
        let text = handle.render();
        assert!(
            text.contains(r#"xgate_calls_total{method="/q",consumer="civil-affairs",dataset="hukou.person_basic",code="OK"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"xgate_calls_total{method="/q",consumer="health",dataset="hukou.person_basic",code="PERMISSION_DENIED"} 1"#),
            "{text}"
        );
        assert_eq!(
            m.series
                .read()
                .unwrap()
                .values()
                .map(Vec::len)
                .sum::<usize>(),
            2
        );
    }
}
