//! The HTTP client that posts bulk requests to Heap. It reports what happened — a status with
//! its `Retry-After` and a capped body, or a transport failure — and leaves the verdict to
//! [`crate::forwarder::retry`].

use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};

use crate::clock::{Clock, Stopwatch};
use crate::config::AppId;
use crate::heap::wire::{RecordKind, bulk_body};

/// How much of Heap's response body is kept for a dead letter's detail.
pub const MAX_RESPONSE_TEXT: usize = 1024;

/// Heap answered.
#[derive(Debug, Clone, PartialEq)]
pub struct HeapResponse {
    pub status: u16,
    pub retry_after: Option<Duration>,
    /// The start of the body, for humans.
    pub text: String,
}

/// Heap did not answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransportError {
    #[error("timed out")]
    Timeout,
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Other(String),
}

#[derive(Clone)]
pub struct HeapClient {
    http: reqwest::Client,
    /// `heap.base_url` without its trailing `/`: endpoint paths are appended to it, so a base
    /// with a path (a proxy's prefix) keeps it.
    base_url: String,
    app_id: AppId,
    /// For `Retry-After` given as an HTTP date.
    clock: Arc<dyn Clock>,
}

impl HeapClient {
    pub fn new(
        base_url: &Url,
        app_id: &AppId,
        timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, reqwest::Error> {
        let http = crate::tls::http_client()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("userpilot-heap-relay/", env!("CARGO_PKG_VERSION")))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()?;
        Ok(Self {
            http,
            base_url: base_url.as_str().trim_end_matches('/').to_owned(),
            app_id: app_id.clone(),
            clock,
        })
    }

    /// The Heap app id the requests are for: the forwarder's lane.
    pub fn app_id(&self) -> &AppId {
        &self.app_id
    }

    /// Posts one bulk request of already-serialized records.
    pub async fn send(
        &self,
        kind: RecordKind,
        records: &[&str],
    ) -> Result<HeapResponse, TransportError> {
        let body = bulk_body(self.app_id.as_str(), kind, records);
        let started = Stopwatch::start();
        let result = self
            .http
            .post(format!("{}{}", self.base_url, kind.path()))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let outcome = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, self.clock.now()));
                let text = response.text().await.unwrap_or_default();
                Ok(HeapResponse {
                    status,
                    retry_after,
                    text: truncate(&text, MAX_RESPONSE_TEXT),
                })
            }
            Err(error) if error.is_timeout() => Err(TransportError::Timeout),
            Err(error) if error.is_connect() => Err(TransportError::Connect(error.to_string())),
            Err(error) => Err(TransportError::Other(error.to_string())),
        };
        let status = match &outcome {
            Ok(response) => response.status.to_string(),
            Err(TransportError::Timeout) => "timeout".to_owned(),
            Err(_) => "error".to_owned(),
        };
        let app_id = self.app_id.to_string();
        metrics::counter!(
            "relay_heap_requests_total",
            "endpoint" => kind.as_str(),
            "status" => status,
            "app_id" => app_id.clone()
        )
        .increment(1);
        metrics::histogram!(
            "relay_heap_request_duration_seconds",
            "endpoint" => kind.as_str(),
            "app_id" => app_id
        )
        .record(started.elapsed().as_secs_f64());
        outcome
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = at.with_timezone(&chrono::Utc) - now;
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// The first `max` characters of `text`.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => text[..end].to_owned(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn truncate_counts_characters_not_bytes() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
