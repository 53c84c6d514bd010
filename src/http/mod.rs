//! The two HTTP faces of the relay (SPEC §4): the public router (webhook, health) and the
//! admin router (metrics, dead letters, forwarder control). Handlers are thin: they translate
//! HTTP to calls on [`AppState`]'s parts and back.

pub mod admin;
pub mod error;
pub mod health;
pub mod serve;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::{HeaderName, Request};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::clock::Clock;
use crate::forwarder::Control;
use crate::heap::mapping::Mapper;
use crate::queue::Queue;
use crate::secret::Secret;

/// Everything the handlers share.
pub struct AppState {
    pub secrets: Vec<Secret>,
    pub tolerance_secs: u64,
    pub mapper: Mapper,
    pub queue: Arc<dyn Queue>,
    pub clock: Arc<dyn Clock>,
    pub control: Arc<Control>,
    /// Cancelled when the process is draining: readiness and webhooks answer 503.
    pub shutdown: CancellationToken,
    pub admin_token: Secret,
    pub readiness: health::Readiness,
    pub max_body_bytes: usize,
    /// [`MAX_WEBHOOKS_IN_FLIGHT`] permits.
    pub webhook_permits: tokio::sync::Semaphore,
    pub metrics: PrometheusHandle,
}

/// Webhooks handled at once (body read, verified, waiting for the commit). More wait briefly
/// for a permit, then are shed with 503 + `Retry-After`. Each holds its body (up to
/// `server.max_body_bytes`), so this also bounds the memory webhooks can take.
pub const MAX_WEBHOOKS_IN_FLIGHT: usize = 128;

/// The longest a webhook may take, body upload included; then 503 + `Retry-After` (a client
/// that retries is deduplicated if the first attempt did commit).
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(15);

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The public router: `POST /webhooks/userpilot`, `GET /healthz`, `GET /readyz`.
pub fn public_router(state: Arc<AppState>) -> Router {
    let router = Router::new()
        .route(
            "/webhooks/userpilot",
            post(webhook::receive).layer(
                ServiceBuilder::new()
                    .layer(HandleErrorLayer::new(webhook::timed_out))
                    .timeout(WEBHOOK_TIMEOUT),
            ),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .with_state(state);
    traced(router)
}

/// The admin router: `GET /metrics` and `/admin/...`.
pub fn admin_router(state: Arc<AppState>) -> Router {
    traced(admin::router(state))
}

/// Request ids and a span per request: every log line of a request carries its id. Layers
/// run outermost-last: the id is set first, then the span opens, then the id is echoed back.
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
}

/// How long a readiness answer is reused, so frequent probes do not each write to the queue.
pub const READINESS_CACHE: Duration = Duration::from_secs(1);
