//! `serve` (the default): runs the relay until SIGTERM or Ctrl-C, then drains; SIGHUP
//! reloads the configuration from the same file and environment (contract §10).

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use userpilot_heap_relay::config::Settings;
use userpilot_heap_relay::{app, telemetry};

pub async fn run(settings: Settings, config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    telemetry::init_tracing(&settings.log);
    for warning in settings.warnings() {
        tracing::warn!(key = warning.key, "{warning}");
    }
    let app = match app::App::build(settings).await {
        Ok(app) => app.reload_from(Box::new(move || Settings::load(config.as_deref()))),
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return Ok(ExitCode::FAILURE);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    tokio::spawn(reload_on_hangup(app.reload_trigger()));
    match app.run(shutdown).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(error) => {
            tracing::error!(%error, "relay failed");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Reloads the configuration on every SIGHUP.
async fn reload_on_hangup(trigger: app::ReloadTrigger) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/reload");
        return;
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading the configuration");
        trigger.reload().await;
    }
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
    shutdown.cancel();
}
