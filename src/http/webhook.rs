//! `POST /webhooks/userpilot`: raw bytes -> verified bytes -> queue content -> committed -> 202.
//! Nothing is answered 2xx before the queue has committed it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use crate::ingest::{self, InvalidJson};
use crate::queue::{Content, Enqueued, NewWebhook};
use crate::userpilot::verify;

pub async fn receive(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = handle(&state, &headers, body).await;
    let outcome = match &result {
        Ok(Enqueued::Accepted { events }) => {
            tracing::info!(events, "webhook accepted");
            "accepted"
        }
        Ok(Enqueued::Duplicate) => {
            tracing::info!("webhook already stored; duplicate");
            "duplicate"
        }
        Ok(Enqueued::Quarantined) => "quarantined",
        Err(error @ ApiError::Unavailable(_)) => {
            // The one refusal that is the relay's fault: the queue could not commit.
            tracing::error!(%error, "webhook refused");
            "unavailable"
        }
        Err(error @ (ApiError::Draining | ApiError::Overloaded)) => {
            tracing::info!(%error, "webhook refused");
            "unavailable"
        }
        Err(ApiError::Signature(reason)) => {
            metrics::counter!("relay_signature_failures_total", "reason" => reason.reason())
                .increment(1);
            tracing::warn!(reason = reason.reason(), "webhook refused: {reason}");
            "invalid_signature"
        }
        Err(error) => {
            tracing::warn!(%error, "webhook refused");
            error.code()
        }
    };
    metrics::counter!("relay_webhooks_total", "outcome" => outcome).increment(1);
    metrics::histogram!("relay_webhook_duration_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(Enqueued::Accepted { events }) => (
            StatusCode::ACCEPTED,
            Json(json!({ "status": "accepted", "events": events })),
        )
            .into_response(),
        Ok(Enqueued::Duplicate) => {
            (StatusCode::ACCEPTED, Json(json!({ "status": "duplicate" }))).into_response()
        }
        Ok(Enqueued::Quarantined) => (
            StatusCode::ACCEPTED,
            Json(json!({ "status": "quarantined" })),
        )
            .into_response(),
        Err(error) => error.into_response(),
    }
}

/// The request timeout: 503 + `Retry-After`, like every other "try again later".
pub async fn timed_out(_: tower::BoxError) -> Response {
    tracing::warn!("webhook timed out");
    metrics::counter!("relay_webhooks_total", "outcome" => "timed_out").increment(1);
    ApiError::Unavailable("timed out".into()).into_response()
}

async fn handle(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Enqueued, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Draining);
    }
    if !is_json_or_absent(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    // A permit before the body is read: waiting requests hold a connection but no body, so
    // memory stays bounded by permits × `server.max_body_bytes` however many clients pile up.
    let _permit = tokio::time::timeout(PERMIT_WAIT, state.webhook_permits.acquire())
        .await
        .map_err(|_| ApiError::Overloaded)?
        .map_err(|_| ApiError::Draining)?;
    let body = read_body(body, state.max_body_bytes).await?;
    let received_at = state.clock.now();
    let signature = headers.get("x-signature").map(|v| v.as_bytes());
    let verified = verify(
        body,
        signature,
        &state.secrets,
        state.tolerance_secs,
        received_at.timestamp(),
    )?;
    let content = ingest::prepare(&state.mapper, &verified, received_at)
        .map_err(|InvalidJson| ApiError::InvalidJson)?;
    let quarantine_reason = match &content {
        Content::Quarantined { reason, .. } => Some(reason.clone()),
        Content::Records(_) => None,
    };
    let webhook = NewWebhook {
        digest: verified.digest(),
        body: verified.into_bytes(),
        received_at_ms: received_at.timestamp_millis(),
        content,
    };
    let outcome = state
        .queue
        .enqueue(webhook)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    match (outcome, quarantine_reason) {
        (Enqueued::Accepted { .. }, _) => state.control.wake(),
        (Enqueued::Quarantined, Some(reason)) => {
            tracing::warn!(%reason, "webhook cannot be mapped to heap; quarantined as a dead letter");
            metrics::counter!("relay_events_dead_lettered_total", "reason" => reason).increment(1);
        }
        _ => {}
    }
    Ok(outcome)
}

/// How long a webhook may wait for a permit before it is shed with 503 + `Retry-After`.
const PERMIT_WAIT: Duration = Duration::from_secs(5);

/// Reads the whole body, refusing it with 413 as soon as it passes `limit` bytes.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(ApiError::PayloadTooLarge),
        Err(_) => Err(ApiError::BadBody),
    }
}

/// SPEC §4: a content type, when present, must be JSON (`application/json` or `*/*+json`).
fn is_json_or_absent(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types_are_recognised() {
        let check = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
            }
            is_json_or_absent(&headers)
        };
        assert!(check(None));
        assert!(check(Some("application/json")));
        assert!(check(Some("Application/JSON; charset=utf-8")));
        assert!(check(Some("application/vnd.userpilot+json")));
        assert!(!check(Some("text/plain")));
        assert!(!check(Some("application/x-www-form-urlencoded")));
        assert!(!check(Some("multipart/form-data; boundary=x")));
    }
}
