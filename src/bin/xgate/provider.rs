//! `provider`: serve catalogue datasets from a department's own database or HTTP service
//! (`xgate::provider`), or check that config against the live sources and exit.

use super::*;

#[derive(clap::Args)]
pub(crate) struct ProviderArgs {
    /// The provider config (docs/providers.md).
    #[arg(long, short)]
    pub(crate) config: PathBuf,
    /// Check the config, the catalogue and every dataset against its source, print each
    /// dataset's state, and exit (1 when any dataset would not be served).
    #[arg(long)]
    pub(crate) check: bool,
}

pub(crate) fn provider_cmd(a: ProviderArgs) -> Result<(), String> {
    let cfg = xgate::provider::ProviderConfig::load(&a.config).map_err(|e| {
        format!(
            "invalid provider config {}:\n  - {}",
            a.config.display(),
            e.join("\n  - ")
        )
    })?;
    let rt = runtime(0)?;
    if a.check {
        return rt.block_on(async {
            let cat = xgate::provider::check(&cfg)
                .await
                .map_err(|e| format!("{}:\n  - {}", a.config.display(), e.join("\n  - ")))?;
            let mut bad = 0;
            for (id, d) in &cat.datasets {
                use xgate::provider::check::State;
                match &**d.state.load() {
                    State::Serving { .. } => xgate::outln!("{id}: OK (source {})", d.source.name()),
                    State::Mismatch { errors } => {
                        bad += 1;
                        xgate::outln!("{id}: REFUSED (source {}):", d.source.name());
                        for e in errors {
                            xgate::outln!("  - {e}");
                        }
                    }
                    State::Unavailable { error } => {
                        bad += 1;
                        xgate::outln!(
                            "{id}: SOURCE UNREACHABLE (source {}): {error}",
                            d.source.name()
                        );
                    }
                    State::Unchecked => {}
                }
            }
            cat.close().await;
            if bad > 0 {
                Err(format!(
                    "{bad} of {} datasets would not be served",
                    cat.datasets.len()
                ))
            } else {
                Ok(())
            }
        });
    }
    rt.block_on(async move {
        let otlp = xgate::config::Otlp::from_env(cfg.otlp.as_ref(), |k| std::env::var(k).ok())?;
        let tel = telemetry::init(&cfg.log, otlp.as_ref())?;
        let running = xgate::provider::start(&cfg, Some(a.config.clone())).await?;
        xgate::outln!("xgate provider {} listening on {}", cfg.id, running.addr);
        if let Some(a) = running.admin_addr {
            xgate::outln!("admin http://{a}/ready");
        }
        {
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("SIGHUP: {e}"))?;
            loop {
                tokio::select! {
                    _ = shutdown_signal() => break,
                    _ = hup.recv() => { let _ = running.reload().await; }
                }
            }
        }
        #[cfg(not(unix))]
        shutdown_signal().await;
        tracing::info!("signal received");
        let r = running.shutdown().await;
        tel.shutdown().await;
        r
    })
}
