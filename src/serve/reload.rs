//! Live policy changes: reload on file change, on SIGHUP and through the admin endpoint.
//!
//! A reload reads and fully validates the new file first. An invalid file changes nothing:
//! the old policy keeps serving, every error is logged with its location, the failure is
//! counted (`xgate_policy_reloads_total{result="error"}`) and shown on `GET /admin/policy`.
//! A valid one is swapped in atomically ([`Gateway::swap`]), keeping the limiter state of
//! unchanged grants and the connections of unchanged providers.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;

use crate::{
    pipeline::{Gateway, Snapshot, WeakGateway},
    policy::{Policy, mask::MaskKey},
    upstream::UpstreamTls,
};

/// What the admin endpoint shows about the policy.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PolicyStatus {
    pub path: String,
    pub version: String,
    pub loaded_at: String,
    pub loaded_by: String,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// The most recent failed attempt, cleared by the next success.
    pub last_error: Option<FailedReload>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FailedReload {
    pub at: String,
    pub trigger: String,
    pub errors: Vec<String>,
}

/// Reloads one policy file into one gateway.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    gateway: WeakGateway,
    upstream: Mutex<UpstreamTls>,
    mask_key_set: bool,
    /// Serialises reloads and holds the status.
    status: Mutex<PolicyStatus>,
}

impl Reloader {
    pub fn new(path: &Path, gateway: Gateway, upstream: UpstreamTls, mask_key: &MaskKey) -> Self {
        let version = gateway.snapshot().policy.version.to_string();
        metrics::gauge!("xgate_policy_loaded_timestamp_seconds")
            .set(crate::token::now_secs() as f64);
        Self {
            path: path.to_owned(),
            gateway: gateway.downgrade(),
            upstream: Mutex::new(upstream),
            mask_key_set: mask_key.is_set(),
            status: Mutex::new(PolicyStatus {
                path: path.display().to_string(),
                version,
                loaded_at: crate::audit::now_rfc3339(),
                loaded_by: "start-up".into(),
                ..PolicyStatus::default()
            }),
        }
    }

    pub fn status(&self) -> PolicyStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Read, validate and (if valid and different) install the policy file.
    /// Returns the version now serving, or every error found.
    pub fn reload(&self, trigger: &str) -> Result<String, Vec<String>> {
        let mut status = match self.status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let result = Policy::load(&self.path)
            .map_err(|e| crate::policy::locate::render(&self.path, &e))
            .and_then(|p| {
                if p.uses_hash_mask() && !self.mask_key_set {
                    return Err(vec![format!(
                        "{}: the policy uses `hash` masks but the gateway has no `pseudonym_key_file`",
                        self.path.display()
                    )]);
                }
                Ok(p)
            });
        match result {
            Ok(policy) => {
                let version = policy.version.to_string();
                if version == status.version {
                    // Valid again (e.g. a broken edit was undone): nothing to swap, but the
                    // last error no longer describes the file.
                    tracing::debug!(%version, trigger, "policy unchanged");
                    status.last_error = None;
                    return Ok(version);
                }
                let Some(gateway) = self.gateway.upgrade() else {
                    return Err(vec!["the gateway is shutting down".into()]);
                };
                let old = gateway.snapshot();
                let from = old.policy.version.to_string();
                let up = self
                    .upstream
                    .lock()
                    .map_err(|_| vec!["upstream TLS state poisoned".to_owned()])?
                    .clone();
                let snap =
                    Snapshot::build(Arc::new(policy), &up, Some(&old)).map_err(|e| vec![e])?;
                drop(old);
                retire(gateway.swap(snap));
                tracing::info!(from = %status.version, to = %version, trigger, "policy reloaded");
                let mut rec = crate::audit::admin_record("policy.reload", trigger, true, None);
                rec.from_version = Some(from);
                rec.policy_version = version.as_str().into();
                gateway.record_admin(rec);
                metrics::counter!("xgate_policy_reloads_total", "result" => "ok").increment(1);
                metrics::gauge!("xgate_policy_loaded_timestamp_seconds")
                    .set(crate::token::now_secs() as f64);
                status.version = version.clone();
                status.loaded_at = crate::audit::now_rfc3339();
                status.loaded_by = trigger.to_owned();
                status.reloads_ok += 1;
                status.last_error = None;
                Ok(version)
            }
            Err(errors) => {
                for e in &errors {
                    tracing::error!(trigger, error = %e, "policy reload refused; the previous policy keeps serving");
                }
                metrics::counter!("xgate_policy_reloads_total", "result" => "error").increment(1);
                if let Some(gateway) = self.gateway.upgrade() {
                    // The first errors, bounded: the record says why, the file says the rest.
                    let shown: Vec<&str> = errors.iter().take(5).map(String::as_str).collect();
                    let mut detail = shown.join("; ");
                    if errors.len() > shown.len() {
                        detail.push_str(&format!("; and {} more", errors.len() - shown.len()));
                    }
                    let mut rec = crate::audit::admin_record(
                        "policy.reload",
                        trigger,
                        false,
                        Some(detail.chars().take(2000).collect()),
                    );
                    rec.reason = Some("POLICY_INVALID".into());
                    rec.from_version = Some(status.version.clone());
                    rec.policy_version = status.version.as_str().into();
                    gateway.record_admin(rec);
                }
                status.reloads_failed += 1;
                status.last_error = Some(FailedReload {
                    at: crate::audit::now_rfc3339(),
                    trigger: trigger.to_owned(),
                    errors: errors.clone(),
                });
                Err(errors)
            }
        }
    }
}

impl Reloader {
    /// Install a new upstream client certificate / CA: the same policy with fresh provider
    /// channels. Calls in flight finish on the old channels.
    pub fn rotate_upstream(&self, up: UpstreamTls) -> Result<(), String> {
        let gateway = self
            .gateway
            .upgrade()
            .ok_or("the gateway is shutting down")?;
        // Same lock order as `reload` (status, then upstream): the two never interleave, so
        // neither can install a snapshot built from a state the other just replaced.
        let _serial = match self.status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let mut cur = self
            .upstream
            .lock()
            .map_err(|_| "upstream TLS state poisoned")?;
        let old = gateway.snapshot();
        let fresh = Snapshot::build(old.policy.clone(), &up, None)?;
        // Keep the limiter and provider-protection state (calls in flight hold their seats):
        // only the channels are new.
        let snap = Snapshot {
            rates: crate::limits::RateLimits::for_policy(&old.policy, Some(&old.rates)),
            protection: crate::limits::provider::Protections::for_policy(
                &old.policy,
                up.queue_wait,
                Some(&old.protection),
            ),
            ..fresh
        };
        drop(old);
        retire(gateway.swap(snap));
        *cur = up;
        tracing::info!("upstream client certificate and CA reloaded");
        Ok(())
    }
}

/// Watch the policy file's directory (editors replace files rather than write them) and
/// reload shortly after the file changes. Returns the watcher; dropping it stops watching.
/// Drop a replaced snapshot here (a reload's thread), not on a serving thread: the last
/// call to finish under it would otherwise free a whole policy's indexes (milliseconds for
/// 10,000 grants) in the middle of serving. Waits for those calls (at most 5 s; past that
/// it lets the last of them drop it).
fn retire(old: Arc<crate::pipeline::Snapshot>) {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(&old) > 1 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(old);
}

pub fn watch_file(reloader: Arc<Reloader>) -> Result<notify::RecommendedWatcher, String> {
    let path = reloader.path.clone();
    watch_paths(vec![path], "policy", move || {
        let _ = reloader.reload("file-change");
    })
}

/// Call `on_change` (on a blocking thread) shortly after any of `paths` changes. The
/// directories are watched, not the files, so editors' rename-over-the-file saves and
/// Kubernetes' symlink swaps of mounted secrets are seen.
pub fn watch_paths(
    paths: Vec<PathBuf>,
    what: &'static str,
    on_change: impl Fn() + Send + Sync + 'static,
) -> Result<notify::RecommendedWatcher, String> {
    use notify::{RecursiveMode, Watcher};
    let names: Vec<std::ffi::OsString> = paths
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_owned()))
        .collect();
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| {
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned()
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && !ev.kind.is_access()
            && ev.paths.iter().any(|p| {
                p.file_name()
                    .is_some_and(|n| names.iter().any(|m| m == n) || n == "..data")
            })
        {
            let _ = tx.try_send(());
        }
    })
    .map_err(|e| format!("cannot watch {what} files: {e}"))?;
    for d in &dirs {
        watcher
            .watch(d, RecursiveMode::NonRecursive)
            .map_err(|e| format!("cannot watch {}: {e}", d.display()))?;
    }
    let on_change = Arc::new(on_change);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Let the writer finish (several events arrive per save).
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            let f = on_change.clone();
            let _ = tokio::task::spawn_blocking(move || f()).await;
        }
    });
    Ok(watcher)
}

/// Reload on SIGHUP.
#[cfg(unix)]
pub fn on_sighup(reloader: Arc<Reloader>) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let r = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || r.reload("sighup")).await;
        }
    }))
}
