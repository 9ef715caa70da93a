//! The last hour of calls, counted per minute by the writer as it writes them: what the
//! console's overview shows (calls, denials by reason, rate-limit refusals) without reading
//! the trail back. Counted off the request path, after the records are on disk.
//!
//! Not a metric store: one process's last hour, gone at restart (Prometheus keeps history).

use std::{collections::BTreeMap, sync::Mutex};

use super::{AuditRecord, Decision, Kind};

const MINUTES: usize = 60;

#[derive(Debug, Default, Clone)]
struct Minute {
    /// Unix time / 60 this bucket counts, 0 for none yet.
    at: i64,
    calls: u64,
    allowed: u64,
    denied: u64,
    rate_limited: u64,
    reasons: BTreeMap<String, u64>,
}

/// Per-minute counts over the last hour.
#[derive(Debug, Default)]
pub struct Recent {
    minutes: Mutex<Vec<Minute>>,
}

/// What the last hour holds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Hour {
    pub calls: u64,
    pub allowed: u64,
    pub denied: u64,
    /// Refused by a rate limit or a quota.
    pub rate_limited: u64,
    /// Denials by reason, most first.
    pub reasons: Vec<(String, u64)>,
}

fn now_minute() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp() / 60
}

impl Recent {
    /// Count the call records among `recs` (as of now).
    pub fn add<'a>(&self, recs: impl IntoIterator<Item = &'a AuditRecord>) {
        self.add_at(now_minute(), recs)
    }

    fn add_at<'a>(&self, minute: i64, recs: impl IntoIterator<Item = &'a AuditRecord>) {
        let mut m = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        if m.is_empty() {
            m.resize(MINUTES, Minute::default());
        }
        let b = &mut m[minute.rem_euclid(MINUTES as i64) as usize];
        if b.at != minute {
            *b = Minute {
                at: minute,
                ..Minute::default()
            };
        }
        for r in recs {
            if r.kind != Kind::Call {
                continue;
            }
            // A summary record stands for `calls` refusals counted instead of recorded.
            let n = r.calls.max(1);
            b.calls += n;
            match r.decision {
                Decision::Allow => b.allowed += n,
                // Cut short before any decision (the caller went away, a shutdown).
                Decision::Undecided => {}
                Decision::Deny => {
                    b.denied += n;
                    let reason = r.reason.as_deref().unwrap_or("UNKNOWN");
                    if matches!(reason, "RATE_LIMITED" | "QUOTA_EXHAUSTED") {
                        b.rate_limited += n;
                    }
                    // Bounded: reasons are the error table's names, but a record's reason is
                    // not trusted to be one.
                    if b.reasons.len() < 200 || b.reasons.contains_key(reason) {
                        *b.reasons.entry(reason.to_owned()).or_default() += n;
                    }
                }
            }
        }
    }

    /// The last 60 minutes (this one included).
    pub fn last_hour(&self) -> Hour {
        self.hour_at(now_minute())
    }

    fn hour_at(&self, minute: i64) -> Hour {
        let m = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        let mut h = Hour::default();
        let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
        for b in m
            .iter()
            .filter(|b| b.at > minute - MINUTES as i64 && b.at <= minute)
        {
            h.calls += b.calls;
            h.allowed += b.allowed;
            h.denied += b.denied;
            h.rate_limited += b.rate_limited;
            for (k, v) in &b.reasons {
                *reasons.entry(k).or_default() += v;
            }
        }
        h.reasons = reasons
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        h.reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(decision: Decision, reason: Option<&str>) -> AuditRecord {
        AuditRecord {
            decision,
            reason: reason.map(str::to_owned),
            ..AuditRecord::default()
        }
    }

    #[test]
    fn counts_an_hour_and_forgets_older_minutes() {
        let r = Recent::default();
        let t = 1_000_000;
        r.add_at(t - 61, [&rec(Decision::Allow, None)]);
        r.add_at(
            t - 30,
            [
                &rec(Decision::Allow, None),
                &rec(Decision::Deny, Some("RATE_LIMITED")),
                &AuditRecord {
                    calls: 5,
                    ..rec(Decision::Deny, Some("NO_GRANT"))
                },
                &AuditRecord {
                    kind: Kind::Admin,
                    ..rec(Decision::Deny, Some("X"))
                },
            ],
        );
        r.add_at(t, [&rec(Decision::Deny, Some("RATE_LIMITED"))]);
        let h = r.hour_at(t);
        assert_eq!((h.calls, h.allowed, h.denied, h.rate_limited), (8, 1, 7, 2));
        assert_eq!(
            h.reasons,
            vec![("NO_GRANT".into(), 5), ("RATE_LIMITED".into(), 2)]
        );
        // An hour later, only the last minute's bucket is within reach.
        assert_eq!(r.hour_at(t + 59).calls, 1);
        assert_eq!(r.hour_at(t + 60).calls, 0);
    }
}
