//! `healthcheck`: exit 0 when the relay's `/readyz` answers 200, for container health checks.

use std::process::ExitCode;
use std::time::Duration;

use userpilot_heap_relay::config::Settings;

/// `/readyz` on `server.listen`, through 127.0.0.1 when it listens on every address.
pub fn readiness_url(settings: &Settings) -> String {
    let listen = settings.server.listen;
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        listen.ip().to_string()
    };
    format!("http://{host}:{}/readyz", listen.port())
}

pub async fn run(url: &str) -> anyhow::Result<ExitCode> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    match client.get(url).send().await {
        Ok(response) if response.status().as_u16() == 200 => Ok(ExitCode::SUCCESS),
        Ok(response) => {
            eprintln!("not ready: {} answered {}", url, response.status());
            Ok(ExitCode::FAILURE)
        }
        Err(error) => {
            eprintln!("not ready: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}
