//! The overview: policy and reloads, providers, the last hour's calls, the audit trail.

use super::*;

pub async fn overview(
    State(s): State<ConsoleState>,
    Extension(session): Extension<Session>,
) -> Response {
    let Some(gw) = s.gateway.upgrade() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    let st = s.reloader.status();
    let snap = gw.snapshot();
    let ready = crate::serve::health::readiness(&gw);
    let hour = gw.audit_recent();
    let most = hour.reasons.first().map_or(1, |r| r.1.max(1));
    let providers: Vec<Value> = snap
        .policy
        .file
        .providers
        .iter()
        .map(|p| {
            let mut eps: Vec<String> = p.endpoints.clone();
            eps.extend(p.endpoint.clone());
            if let Some(d) = &p.dns {
                eps.push(format!("dns:{}:{}", d.name, d.port));
            }
            context! {
                id => p.id,
                up => ready.providers.get(&p.id).copied().unwrap_or(false),
                endpoints => eps.into_iter().map(|a| context! { addr => a, state => "" }).collect::<Vec<_>>(),
            }
        })
        .collect();
    let shipping = gw.shipping().map(|sh| sh.status());
    let ctx = context! {
        ..base(&s, &session, "/overview"),
        ..context! {
            policy => context! {
                version => st.version,
                loaded_at => local_time(&s, &st.loaded_at),
                trigger => st.loaded_by,
                failed => st.last_error.map(|f| context! { at => local_time(&s, &f.at), errors => f.errors }),
            },
            trail => context! {
                writable => gw.audit_open(),
                queue => gw.audit_queue_depth(),
                shipping => shipping.map(|sh| context! {
                    replica => sh.replica, connected => sh.connected,
                    lag_records => sh.lag_records, lag_seconds => sh.lag_seconds,
                    error => sh.error,
                }),
            },
            hour => context! {
                calls => hour.calls, allowed => hour.allowed, denied => hour.denied,
                rate_limited => hour.rate_limited,
                reasons => hour.reasons.iter().map(|(r, n)| context! {
                    reason => r, count => n, share => format!("{:.3}", *n as f64 / most as f64),
                }).collect::<Vec<_>>(),
            },
            providers,
        }
    };
    render(&s, "overview.html", session.lang, ctx)
}

/// An RFC 3339 time shown in the province's zone (`2026-12-01 20:41:55`).
pub(crate) fn local_time(s: &ConsoleState, t: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    match time::OffsetDateTime::parse(t, &Rfc3339) {
        Ok(x) => {
            let l = x.to_offset(s.zone);
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                l.year(),
                l.month() as u8,
                l.day(),
                l.hour(),
                l.minute(),
                l.second()
            )
        }
        Err(_) => t.to_owned(),
    }
}
