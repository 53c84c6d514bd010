//! `POST /webhooks/userpilot/{source}` (and `/webhooks/userpilot` for the default source):
//! raw bytes -> verified bytes -> transform + mapping ([`prepare`]) -> committed -> 202.
//! Nothing is answered 2xx before the queue has committed it, except a webhook the source's
//! transform filters out (202 `filtered`: there is nothing to keep). The source is looked up once, before the body is read,
//! and its snapshot serves the whole request (a reload meanwhile does not change it): its
//! secrets verify the signature, its mapper maps, its app id is the lane the records join. The body must arrive within
//! [`BODY_READ_TIMEOUT`] (else 408) and is paid for from the shared body byte budget; a
//! webhook permit is taken only once the signature is verified. Each request records a
//! `webhook` span with `verify`, `map` and `commit` children ([`crate::traces`]; off by default).

use std::sync::Arc;
use std::time::Duration;

use axum::body::HttpBody;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::error::ApiError;
use super::{AppState, BODY_READ_TIMEOUT};
use crate::clock::{self, Stopwatch};
use crate::config::DEFAULT_SOURCE;
use crate::console::activity::Activity;
use crate::ingest::{PrepareError, Prepared, prepare};
use crate::queue::{Content, Enqueued, NewWebhook};
use crate::sources::{Source, Sources, UNKNOWN_SOURCE_LABEL};
use crate::traces::WebhookSpan;
use crate::userpilot::verify;

/// `POST /webhooks/userpilot`: the default source.
pub async fn receive_default(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(&state, DEFAULT_SOURCE, &headers, body).await
}

/// `POST /webhooks/userpilot/{source}`.
pub async fn receive(
    State(state): State<Arc<AppState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(&state, &source, &headers, body).await
}

async fn answer(state: &AppState, name: &str, headers: &HeaderMap, body: Body) -> Response {
    let started = Stopwatch::start();
    let request_id = headers.get("x-request-id").and_then(|v| v.to_str().ok());
    let mut span = state.traces.webhook(request_id.unwrap_or(""));
    let sources = state.sources.current();
    let source = sources.get(name);
    let label = source.map_or(UNKNOWN_SOURCE_LABEL, |source| source.name.as_str());
    let source_label = label.to_owned();
    let result = match source {
        Some(source) => handle(state, &sources, source, headers, body, &mut span).await,
        None => Err(ApiError::UnknownSource(name.chars().take(64).collect())),
    };
    let outcome = match &result {
        Ok(Handled::Filtered) => {
            tracing::info!(
                source = label,
                "webhook filtered out by the source's transform"
            );
            "filtered"
        }
        Ok(Handled::Queued(Enqueued::Accepted { events })) => {
            tracing::info!(source = label, events, "webhook accepted");
            "accepted"
        }
        Ok(Handled::Queued(Enqueued::Duplicate)) => {
            tracing::info!(source = label, "webhook already stored; duplicate");
            "duplicate"
        }
        Ok(Handled::Queued(Enqueued::Quarantined)) => "quarantined",
        Err(error @ ApiError::Unavailable(_)) => {
            // The one refusal that is the relay's fault: the queue could not commit, or no
            // transform worker could start.
            tracing::error!(source = label, %error, "webhook refused");
            "unavailable"
        }
        Err(error @ (ApiError::Draining | ApiError::Overloaded)) => {
            tracing::info!(source = label, %error, "webhook refused");
            "unavailable"
        }
        Err(ApiError::Signature(reason)) => {
            metrics::counter!(
                "relay_signature_failures_total",
                "reason" => reason.reason(),
                "source" => source_label.clone()
            )
            .increment(1);
            tracing::warn!(
                source = label,
                reason = reason.reason(),
                "webhook refused: {reason}"
            );
            "invalid_signature"
        }
        Err(error) => {
            tracing::warn!(source = label, %error, "webhook refused");
            error.code()
        }
    };
    metrics::counter!(
        "relay_webhooks_total",
        "outcome" => outcome,
        "source" => source_label.clone()
    )
    .increment(1);
    state.console.activity.webhook(&source_label, outcome);
    metrics::histogram!(
        "relay_webhook_duration_seconds",
        "outcome" => outcome,
        "source" => source_label
    )
    .record(started.elapsed().as_secs_f64());
    let response = match result {
        Ok(Handled::Filtered) => {
            (StatusCode::ACCEPTED, Json(json!({ "status": "filtered" }))).into_response()
        }
        Ok(Handled::Queued(Enqueued::Accepted { events })) => (
            StatusCode::ACCEPTED,
            Json(json!({ "status": "accepted", "events": events })),
        )
            .into_response(),
        Ok(Handled::Queued(Enqueued::Duplicate)) => {
            (StatusCode::ACCEPTED, Json(json!({ "status": "duplicate" }))).into_response()
        }
        Ok(Handled::Queued(Enqueued::Quarantined)) => (
            StatusCode::ACCEPTED,
            Json(json!({ "status": "quarantined" })),
        )
            .into_response(),
        Err(error) => error.into_response(),
    };
    span.finish(outcome, response.status().as_u16());
    response
}

/// The request timeout: 503 + `Retry-After`, like every other "try again later". Only a
/// configured source's request can run this long (an unknown one is answered at once), so
/// the name in the path is a source's, not one a client made up.
pub async fn timed_out(
    Extension(activity): Extension<Arc<Activity>>,
    uri: Uri,
    _: tower::BoxError,
) -> Response {
    let source = match uri.path().strip_prefix("/webhooks/userpilot") {
        Some("" | "/") => DEFAULT_SOURCE.to_owned(),
        Some(rest) => rest.trim_start_matches('/').chars().take(32).collect(),
        None => UNKNOWN_SOURCE_LABEL.to_owned(),
    };
    tracing::warn!(source, "webhook timed out");
    activity.webhook(&source, "timed_out");
    metrics::counter!("relay_webhooks_total", "outcome" => "timed_out", "source" => source)
        .increment(1);
    ApiError::Unavailable("the webhook was not answered within its time limit".into())
        .into_response()
}

/// What became of a verified webhook.
enum Handled {
    Queued(Enqueued),
    /// The transform had no output: nothing stored.
    Filtered,
}

async fn handle(
    state: &AppState,
    sources: &Sources,
    source: &Source,
    headers: &HeaderMap,
    body: Body,
    span: &mut WebhookSpan,
) -> Result<Handled, ApiError> {
    if state.shutdown.is_cancelled() {
        return Err(ApiError::Draining);
    }
    if !is_json_or_absent(headers) {
        return Err(ApiError::UnsupportedMediaType);
    }
    // No webhook permit yet: an unauthenticated client trickling its body holds only the
    // budget bytes it has actually sent, and only until the body deadline.
    let (body, _budget) = read_body(
        body,
        state.max_body_bytes,
        &state.body_budget,
        clock::io_instant() + BODY_READ_TIMEOUT,
    )
    .await?;
    let received_at = state.clock.now();
    let signature = headers.get("x-signature").map(|v| v.as_bytes());
    let verified = span.step("verify", || {
        verify(
            body,
            signature,
            &source.secrets,
            source.tolerance_secs,
            received_at.timestamp(),
        )
    })?;
    let digest = verified.digest();
    span.identify(&digest, received_at.timestamp_millis());
    // Permits cover verified work only (decoding, mapping, the commit), so a flood of
    // unsigned requests cannot make signed ones wait.
    let _permit = tokio::time::timeout(PERMIT_WAIT, state.webhook_permits.acquire())
        .await
        .map_err(|_| ApiError::Overloaded)?
        .map_err(|_| ApiError::Draining)?;
    // The transform runs on a worker process of this configuration's generation (the one the
    // source came from), so a reload meanwhile does not mix programs and mappers.
    let prepared = span
        .step_async(
            "map",
            prepare(source, &verified, received_at, sources.transforms()),
        )
        .await
        .map_err(|error| match error {
            PrepareError::InvalidJson => ApiError::InvalidJson,
            PrepareError::Busy(_) => ApiError::Overloaded,
            PrepareError::Unavailable(why) => ApiError::Unavailable(why),
        })?;
    let content = match prepared {
        Prepared::Content(content) => content,
        Prepared::Filtered => return Ok(Handled::Filtered),
    };
    let quarantine_reason = match &content {
        Content::Quarantined { reason, .. } => Some(reason.clone()),
        Content::Records(_) => None,
    };
    // The shape of the payload as received (contract §10.4).
    let shape = state.shapes.observe(&source.name, &verified);
    let webhook = NewWebhook {
        shape,
        source: source.name.clone(),
        app_id: source.app_id.to_string(),
        digest,
        body: verified.into_bytes(),
        received_at_ms: received_at.timestamp_millis(),
        content,
    };
    let outcome = span
        .step_async("commit", state.queue.enqueue(webhook))
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    match (outcome, quarantine_reason) {
        (Enqueued::Accepted { .. }, _) => state.lanes.wake(source.app_id.as_str()),
        (Enqueued::Quarantined, Some(reason)) => {
            tracing::warn!(%reason, "webhook cannot be mapped to heap; quarantined as a dead letter");
            metrics::counter!(
                "relay_events_dead_lettered_total",
                "reason" => reason,
                "app_id" => source.app_id.to_string()
            )
            .increment(1);
        }
        _ => {}
    }
    Ok(Handled::Queued(outcome))
}

/// How long a verified webhook may wait for a permit, or any body for budget bytes, before it
/// is shed with 503 + `Retry-After`.
const PERMIT_WAIT: Duration = Duration::from_secs(5);

/// Reads the whole body by `deadline` (else 408), refusing it with 413 as soon as it passes
/// `limit` bytes (or declares more). The body is copied into one buffer whose capacity is
/// taken from `budget` as it grows, so the bytes of all bodies being read or handled stay
/// within the budget (hyper's own chunks are not kept: a body trickled a byte at a time
/// would otherwise pin one read buffer per byte). The permit returned holds those bytes
/// until the caller is done with the body. Waiting for budget longer than [`PERMIT_WAIT`],
/// or past the deadline, is the relay's doing, not the client's: 503.
async fn read_body(
    body: Body,
    limit: usize,
    budget: &Semaphore,
    deadline: tokio::time::Instant,
) -> Result<(Bytes, SemaphorePermit<'_>), ApiError> {
    let mut body = body;
    // A declared `Content-Length` over the limit is refused before anything is read.
    if u64::try_from(limit).is_ok_and(|limit| body.size_hint().lower() > limit) {
        return Err(ApiError::PayloadTooLarge);
    }
    let mut buffer: Vec<u8> = Vec::new();
    let mut held = take_budget(budget, 0, deadline).await?;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ApiError::RequestTimeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ApiError::BadBody),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let needed = buffer.len() + data.len();
        if needed > limit {
            return Err(ApiError::PayloadTooLarge);
        }
        if needed > buffer.capacity() {
            // Grow by doubling (at most to the limit), paying for the new capacity first.
            let capacity = needed.max(buffer.capacity().saturating_mul(2).min(limit));
            let more = take_budget(budget, capacity - held.num_permits(), deadline).await?;
            held.merge(more);
            buffer.reserve_exact(capacity - buffer.len());
        }
        buffer.extend_from_slice(&data);
    }
    Ok((Bytes::from(buffer), held))
}

/// `bytes` permits from the body budget, waiting at most [`PERMIT_WAIT`] and not past
/// `deadline`.
async fn take_budget(
    budget: &Semaphore,
    bytes: usize,
    deadline: tokio::time::Instant,
) -> Result<SemaphorePermit<'_>, ApiError> {
    let bytes = u32::try_from(bytes).map_err(|_| ApiError::PayloadTooLarge)?;
    let until = deadline.min(clock::io_instant() + PERMIT_WAIT);
    tokio::time::timeout_at(until, budget.acquire_many(bytes))
        .await
        .map_err(|_| ApiError::Overloaded)?
        .map_err(|_| ApiError::Draining)
}

/// Contract §4: a content type, when present, must be JSON (`application/json` or `*/*+json`).
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

    /// The timeout answer is 503, and the console counts it under the source: the handler
    /// finds the activity through the extension the public router adds around its routes
    /// (here with the same layers, and a deadline of 10 ms instead of 15 s).
    #[tokio::test]
    async fn a_webhook_that_times_out_is_503_and_counted_for_the_console() {
        use axum::error_handling::HandleErrorLayer;
        use axum::routing::post;
        use tower::{ServiceBuilder, ServiceExt};

        let activity = Arc::new(Activity::default());
        let never = || std::future::pending::<StatusCode>();
        let router = axum::Router::new()
            .route(
                "/webhooks/userpilot/{source}",
                post(never).layer(
                    ServiceBuilder::new()
                        .layer(HandleErrorLayer::new(timed_out))
                        .timeout(Duration::from_millis(10)),
                ),
            )
            .layer(Extension(activity.clone()));
        let request = axum::http::Request::post("/webhooks/userpilot/staging")
            .body(Body::empty())
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(activity.webhook_counts()["staging"]["timed_out"], 1);
    }
}
