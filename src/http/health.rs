//! `/healthz` (liveness: the process serves; no dependencies) and `/readyz` (the queue accepts
//! writes — a real write round trip with a short timeout, cached briefly — and the relay is not
//! draining).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::sync::Mutex;

use super::{AppState, READINESS_CACHE};

/// The longest a readiness write may take before the queue counts as unavailable.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The last readiness check's time (the clock's monotonic time) and result.
#[derive(Debug, Default)]
pub struct Readiness(Mutex<Option<(Duration, bool)>>);

impl Readiness {
    /// Whether the queue accepts writes, from cache when fresh.
    pub async fn queue_ready(&self, state: &AppState) -> bool {
        // Held across the ping on purpose: concurrent probes share one round trip.
        let mut last = self.0.lock().await;
        if let Some((at, ready)) = *last
            && state.clock.monotonic().saturating_sub(at) < READINESS_CACHE
        {
            return ready;
        }
        let ready = matches!(
            tokio::time::timeout(PING_TIMEOUT, state.queue.ping()).await,
            Ok(Ok(()))
        );
        *last = Some((state.clock.monotonic(), ready));
        ready
    }
}

pub async fn healthz() -> Response {
    (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response()
}

pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (status, word) = if state.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if state.readiness.queue_ready(&state).await {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "queue_unavailable")
    };
    (status, Json(json!({ "status": word }))).into_response()
}
