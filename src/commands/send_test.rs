//! `send-test`: posts a signed sample of every event kind to a relay and reports each answer.

use std::process::ExitCode;
use std::time::Duration;

use userpilot_heap_relay::clock::{Clock, SystemClock};
use userpilot_heap_relay::{samples, userpilot};

/// The URL of `source` given the relay's webhook URL: `URL/NAME`, unless it names the source
/// already.
pub fn source_url(url: &str, source: Option<&str>) -> String {
    match source {
        Some(name) if !url.trim_end_matches('/').ends_with(&format!("/{name}")) => {
            format!("{}/{name}", url.trim_end_matches('/'))
        }
        _ => url.to_owned(),
    }
}

pub async fn run(url: &str, secret: &str, user_id: &str) -> anyhow::Result<ExitCode> {
    let client = userpilot_heap_relay::tls::http_client()
        .timeout(Duration::from_secs(10))
        .build()?;
    let now = SystemClock.now().timestamp();
    // Makes every run's bodies unique, so a second run is not answered `duplicate`.
    let nonce = uuid::Uuid::new_v4().to_string();
    let mut failures = 0;
    for (label, body) in samples::all(user_id, now, &nonce) {
        let body = serde_json::to_vec(&body)?;
        let signature = userpilot::sign(&body, secret, now);
        let result = client
            .post(url)
            .header("content-type", "application/json")
            .header("x-signature", signature)
            .body(body)
            .send()
            .await;
        match result {
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                if status.as_u16() != 202 {
                    failures += 1;
                }
                println!("{label:<26} {} {text}", status.as_u16());
            }
            Err(error) => {
                failures += 1;
                println!("{label:<26} error: {error}");
            }
        }
    }
    if failures > 0 {
        eprintln!("{failures} sample(s) were not accepted");
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("all samples accepted");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_appended_to_the_webhook_url_unless_it_is_there() {
        let base = "http://relay:8080/webhooks/userpilot";
        assert_eq!(source_url(base, None), base);
        assert_eq!(source_url(base, Some("staging")), format!("{base}/staging"));
        assert_eq!(
            source_url(&format!("{base}/"), Some("staging")),
            format!("{base}/staging")
        );
        assert_eq!(
            source_url(&format!("{base}/staging"), Some("staging")),
            format!("{base}/staging")
        );
    }
}
