//! The two HTTP faces of the relay (contract §4): the public router (webhook, health) and the
//! admin router (metrics, dead letters, forwarder control). Handlers are thin: they translate
//! HTTP to calls on [`AppState`]'s parts and back.

pub(crate) mod admin;
pub(crate) mod error;
pub(crate) mod health;
pub mod serve;
pub(crate) mod webhook;

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderName, Request};
use axum::routing::{get, post};
use axum::{Extension, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower::util::MapRequestLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::clock::Clock;
use crate::forwarder::lanes::Lanes;
use crate::queue::Queue;
use crate::reload::Reloader;
use crate::secret::Secret;
use crate::sources::LiveSources;

/// Everything the handlers share.
pub struct AppState {
    /// The sources in force (swapped by a reload).
    pub sources: LiveSources,
    /// One forwarder per app id: wake, pause, state.
    pub lanes: Arc<Lanes>,
    pub reloader: Reloader,
    pub queue: Arc<dyn Queue>,
    pub clock: Arc<dyn Clock>,
    /// Cancelled when the process is draining: readiness and webhooks answer 503.
    pub shutdown: CancellationToken,
    pub admin_token: Secret,
    pub readiness: health::Readiness,
    pub max_body_bytes: usize,
    /// [`MAX_WEBHOOKS_IN_FLIGHT`] permits.
    pub webhook_permits: tokio::sync::Semaphore,
    /// One permit per byte of webhook body held in memory: [`body_budget`].
    pub body_budget: tokio::sync::Semaphore,
    pub metrics: PrometheusHandle,
    /// The `webhook` spans (off unless `telemetry.otlp_endpoint` is set).
    pub traces: crate::traces::Traces,
    /// The index of payload shapes stored per source ([`crate::shapes`]).
    pub shapes: crate::shapes::Recorder,
    /// The console's sessions, sign-in budget and activity history (contract §11).
    pub console: crate::console::Console,
}

/// Verified webhooks handled at once (decoded, mapped, waiting for the commit). The permit is
/// taken after the signature check, so unauthenticated requests never hold one; more wait
/// briefly for a permit, then are shed with 503 + `Retry-After`.
pub const MAX_WEBHOOKS_IN_FLIGHT: usize = 128;

/// The whole body of a webhook must arrive within this long of its headers, else
/// `408 request_timeout`: a Userpilot webhook is a few KB, and a client trickling its body
/// must not hold a connection and memory for long.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of webhook bodies held in memory at once, across all connections (being received,
/// verified or committed): beyond it, bodies wait for room, then get 503. The budget is paid
/// for by buffer capacity as bodies arrive (not by what a client declares), so slow senders
/// hold only what they sent. Memory for bodies is bounded by this, not by connections × body
/// limit (512 × 1 MiB).
pub const BODY_BYTES_IN_TRANSIT: usize = 64 * 1024 * 1024;

/// The body budget for a relay whose body limit is `max_body_bytes`: never less than one
/// whole body, so a body at the limit can always be read.
pub fn body_budget(max_body_bytes: usize) -> tokio::sync::Semaphore {
    let bytes = BODY_BYTES_IN_TRANSIT
        .max(max_body_bytes)
        .min(tokio::sync::Semaphore::MAX_PERMITS);
    tokio::sync::Semaphore::new(bytes)
}

/// The longest a webhook may take, body upload included; then 503 + `Retry-After` (a client
/// that retries is deduplicated if the first attempt did commit).
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(15);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The public router: `POST /webhooks/userpilot` (the default source) and
/// `POST /webhooks/userpilot/{source}`, `GET /healthz`, `GET /readyz`.
pub fn public_router(state: Arc<AppState>) -> Router {
    let timeout = || {
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(webhook::timed_out))
            .timeout(WEBHOOK_TIMEOUT)
    };
    let router = Router::new()
        .route(
            "/webhooks/userpilot",
            post(webhook::receive_default).layer(timeout()),
        )
        .route(
            "/webhooks/userpilot/{source}",
            post(webhook::receive).layer(timeout()),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        // The timeout handler has no access to the state: it counts its answers for the
        // console through this.
        .layer(Extension(state.console.activity.clone()))
        .with_state(state);
    traced(router)
}

/// The admin router: `GET /metrics`, `/admin/...` and the console (`/console...`).
pub fn admin_router(state: Arc<AppState>) -> Router {
    traced(admin::router(state.clone()).merge(crate::console::router(state)))
}

/// Request ids and a span per request: every log line of a request carries its id. Layers
/// run outermost-last: an invalid client id is dropped first, then the id is set (a fresh
/// UUID when absent), then the span opens, then the id is echoed back.
fn traced(router: Router) -> Router {
    router
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    let id = request
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    tracing::info_span!(
                        "request",
                        request_id = %id,
                        method = %request.method(),
                        path = %request.uri().path(),
                    )
                })
                .on_request(())
                .on_response(())
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(MapRequestLayer::new(
            drop_invalid_request_id::<axum::body::Body>,
        ))
}

/// The longest client-supplied `X-Request-Id` kept.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Removes a client's `X-Request-Id` that is not a [valid](is_valid_request_id) id, so the
/// request gets a fresh UUID instead: the id goes into every log line of the request, and a
/// client must not be able to write long or misleading text there.
fn drop_invalid_request_id<B>(mut request: Request<B>) -> Request<B> {
    let headers = request.headers();
    let valid = headers.get_all(REQUEST_ID).iter().count() == 1
        && headers
            .get(REQUEST_ID)
            .is_some_and(|id| is_valid_request_id(id.as_bytes()));
    if !valid {
        request.headers_mut().remove(REQUEST_ID);
    }
    request
}

/// 1 to [`MAX_REQUEST_ID_LEN`] visible ASCII characters, without quotes or backslashes (the
/// characters a log line would have to escape).
fn is_valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&b| b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'\''))
}

/// How long a readiness answer is reused, so frequent probes do not each write to the queue.
pub const READINESS_CACHE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_only_when_short_and_plain() {
        let longest = "a".repeat(MAX_REQUEST_ID_LEN);
        let too_long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        let cases: &[(&[u8], bool)] = &[
            (b"9a9c9a49-0827-4dba-bb75-f78e97d54bf2", true),
            (b"req_01H:abc/def=+", true),
            (longest.as_bytes(), true),
            (too_long.as_bytes(), false),
            (b"", false),
            (b"two words", false),
            (b"say\"hi\"", false),
            (b"it's", false),
            (b"back\\slash", false),
            (b"tab\there", false),
            (b"new\nline", false),
            ("caf\u{e9}".as_bytes(), false),
            (b"\x7f", false),
        ];
        for (id, valid) in cases {
            assert_eq!(
                is_valid_request_id(id),
                *valid,
                "{:?}",
                String::from_utf8_lossy(id)
            );
        }
    }

    #[test]
    fn an_invalid_request_id_is_removed_and_a_valid_one_kept() {
        let with = |ids: &[&[u8]]| {
            let mut request = Request::new(());
            for id in ids {
                request
                    .headers_mut()
                    .append(REQUEST_ID, axum::http::HeaderValue::from_bytes(id).unwrap());
            }
            drop_invalid_request_id(request)
                .headers()
                .get_all(REQUEST_ID)
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect::<Vec<_>>()
        };
        assert_eq!(with(&[b"abc-123"]), vec![b"abc-123".to_vec()]);
        assert!(with(&[b"has space"]).is_empty());
        assert!(with(&["x".repeat(500).as_bytes()]).is_empty());
        // Two ids: which one would be logged is ambiguous, so neither is.
        assert!(with(&[b"one", b"two"]).is_empty());
        assert!(with(&[]).is_empty());
    }
}
