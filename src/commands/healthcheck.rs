//! `healthcheck`: exit 0 when the relay's `/readyz` answers 200, for container health checks.
//! It needs no configuration beyond `server.listen` (and none with `--url`): a container's
//! health check runs with whatever environment the image has, secrets or not.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// `/readyz` on `server.listen`, through 127.0.0.1 when it listens on every address.
pub fn readiness_url(listen: SocketAddr) -> String {
    let target = if listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    };
    // SocketAddr prints an IPv6 address in brackets, as a URL needs it.
    format!("http://{target}/readyz")
}

pub async fn run(url: &str) -> anyhow::Result<ExitCode> {
    let client = userpilot_heap_relay::tls::http_client()
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
