//! `send-test`: posts a signed sample of every event kind to a relay and reports each answer.
//! Against production that writes test events into the customer's Heap; `--dry-run` posts
//! nothing and prints what each sample would become under the configuration ([`super::preview`]).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use userpilot_heap_relay::clock::{Clock, SystemClock};
use userpilot_heap_relay::config::{DEFAULT_SOURCE, Settings};
use userpilot_heap_relay::preview::Preview;
use userpilot_heap_relay::{samples, userpilot};

use super::preview::{Previewer, refuse};

/// Where the samples for `source` go: `/webhooks/userpilot/NAME` on the host of `url`, which
/// may be the relay's address or its webhook URL (a path prefix before `/webhooks/userpilot`,
/// as a proxy may add, is kept). Without a source, `url` as given.
pub fn source_url(url: &str, source: Option<&str>) -> anyhow::Result<String> {
    let Some(name) = source else {
        return Ok(url.to_owned());
    };
    let mut parsed = reqwest::Url::parse(url).with_context(|| format!("`{url}` is not a URL"))?;
    let path = parsed.path().to_owned();
    let prefix = match path.find(WEBHOOK_PATH) {
        Some(at) => &path[..at],
        None => "",
    };
    parsed.set_path(&format!("{prefix}{WEBHOOK_PATH}/{name}"));
    Ok(parsed.to_string())
}

const WEBHOOK_PATH: &str = "/webhooks/userpilot";

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

/// `--dry-run`: the preview of every sample as `source` (default: the default source) would
/// receive it, one line each (label, then the preview as JSON). No network. Exit code 1 when a
/// sample would not be accepted, 2 for an unknown source.
pub async fn dry_run(
    settings: &Settings,
    source: Option<&str>,
    user_id: &str,
) -> anyhow::Result<ExitCode> {
    let previewer = Previewer::new(settings)?;
    let source = match previewer.source(source.unwrap_or(DEFAULT_SOURCE)) {
        Ok(source) => source,
        Err(refused) => return Ok(refuse(&refused)),
    };
    let now = SystemClock.now().timestamp();
    let nonce = uuid::Uuid::new_v4().to_string();
    let mut failures = 0;
    for (label, body) in samples::all(user_id, now, &nonce) {
        let body = Bytes::from(serde_json::to_vec(&body)?);
        match previewer.preview(source, body).await {
            Ok(preview) => {
                if !matches!(preview, Preview::Accepted { .. }) {
                    failures += 1;
                }
                println!("{label:<26} {}", preview.to_json());
            }
            Err(refused) => {
                failures += 1;
                println!("{label:<26} error: {refused}");
            }
        }
    }
    if failures > 0 {
        eprintln!("{failures} sample(s) would not be accepted");
        return Ok(ExitCode::FAILURE);
    }
    eprintln!("dry run: nothing was sent; every sample would be accepted");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_posted_to_on_the_relays_host_whatever_url_is_given() {
        let url = |given: &str, source| source_url(given, source).unwrap();
        let expected = "http://relay:8080/webhooks/userpilot/staging";
        assert_eq!(url("http://relay:8080", Some("staging")), expected);
        assert_eq!(
            url("http://relay:8080/webhooks/userpilot", Some("staging")),
            expected
        );
        assert_eq!(
            url("http://relay:8080/webhooks/userpilot/", Some("staging")),
            expected
        );
        assert_eq!(
            url(
                "http://relay:8080/webhooks/userpilot/default",
                Some("staging")
            ),
            expected
        );
        assert_eq!(
            url("https://proxy/relay/webhooks/userpilot", Some("qa")),
            "https://proxy/relay/webhooks/userpilot/qa"
        );
        let base = "http://relay:8080/webhooks/userpilot";
        assert_eq!(url(base, None), base);
        assert!(source_url("not a url", Some("qa")).is_err());
    }
}
