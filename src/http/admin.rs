//! The admin port: `GET /metrics` (Prometheus text) and the bearer-token guarded `/admin/...`
//! routes: dead letters (list, show one, replay, purge), status, and pausing the forwarder for a Heap
//! maintenance window. With no `admin.token` configured every `/admin` route answers 403.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use subtle::ConstantTimeEq;

use super::AppState;
use crate::dead_letters::{self, FilterError, FilterParams};
use crate::queue::QueueError;

pub fn router(state: Arc<AppState>) -> Router {
    let guarded = Router::new()
        .route("/admin/dead-letters", get(list))
        .route("/admin/dead-letters/{id}", get(show))
        .route("/admin/dead-letters/replay", post(replay))
        .route("/admin/dead-letters/purge", post(purge))
        .route("/admin/status", get(status))
        .route("/admin/forwarder/pause", post(pause))
        .route("/admin/forwarder/resume", post(resume))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/metrics", get(metrics))
        .merge(guarded)
        .with_state(state)
}

fn error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({ "error": code }))).into_response()
}

/// `Authorization: Bearer <admin.token>`, compared in constant time.
async fn require_token(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if state.admin_token.is_empty() {
        return error(StatusCode::FORBIDDEN, "admin_disabled");
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    let expected = state.admin_token.expose().as_bytes();
    if bool::from(presented.as_bytes().ct_eq(expected)) {
        next.run(request).await
    } else {
        tracing::warn!("admin request with a missing or wrong token");
        error(StatusCode::UNAUTHORIZED, "unauthorized")
    }
}

/// The credentials of an `Authorization: Bearer <token>` value. The scheme is
/// case-insensitive (RFC 9110 §11.1), and one or more spaces may separate it from the token.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

fn queue_error(err: QueueError) -> Response {
    tracing::error!(error = %err, "admin operation failed");
    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
}

/// 400: `no_scope` for a replay or purge that selects nothing, `invalid_filter` otherwise.
fn bad_filter(err: FilterError) -> Response {
    let code = match err {
        FilterError::NoScope => "no_scope",
        FilterError::BadTime(_) | FilterError::BadLimit | FilterError::UnknownReason(_) => {
            "invalid_filter"
        }
    };
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": code, "detail": err.to_string() })),
    )
        .into_response()
}

async fn list(State(state): State<Arc<AppState>>, Query(params): Query<FilterParams>) -> Response {
    let filter = match params.listing() {
        Ok(filter) => filter,
        Err(err) => return bad_filter(err),
    };
    let limit = filter.limit.unwrap_or(dead_letters::DEFAULT_PAGE);
    match state.queue.dead_letters(filter).await {
        Ok(letters) => {
            let next_after = (letters.len() == limit)
                .then(|| letters.last().map(|l| l.id))
                .flatten();
            Json(json!({ "dead_letters": letters, "next_after": next_after })).into_response()
        }
        Err(err) => queue_error(err),
    }
}

/// One dead letter in full ([`dead_letters::DeadLetterView`]); 404 `not_found` when there is
/// none with that id (never dead, replayed, purged or pruned).
async fn show(State(state): State<Arc<AppState>>, Path(id): Path<i64>) -> Response {
    match dead_letters::show(state.queue.as_ref(), id).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found"),
        Err(err) => queue_error(err),
    }
}

async fn replay(
    State(state): State<Arc<AppState>>,
    Query(params): Query<FilterParams>,
) -> Response {
    let filter = match params.selection() {
        Ok(filter) => filter,
        Err(err) => return bad_filter(err),
    };
    match dead_letters::replay(
        state.queue.as_ref(),
        &state.mapper,
        filter,
        state.clock.now(),
    )
    .await
    {
        Ok(summary) => {
            state.control.wake();
            Json(json!({ "replayed": summary })).into_response()
        }
        Err(err) => queue_error(err),
    }
}

async fn purge(State(state): State<Arc<AppState>>, Query(params): Query<FilterParams>) -> Response {
    let filter = match params.selection() {
        Ok(filter) => filter,
        Err(err) => return bad_filter(err),
    };
    match state.queue.purge(filter).await {
        Ok(purged) => {
            tracing::info!(purged, "dead letters purged");
            Json(json!({ "purged": purged })).into_response()
        }
        Err(err) => queue_error(err),
    }
}

/// The queue's record counts (records, not webhooks or events: see [`crate::queue::QueueStats`])
/// and the forwarder's state, which shows a pause or resume at once.
async fn status(State(state): State<Arc<AppState>>) -> Response {
    let now = state.clock.now_ms();
    match state.queue.stats(now).await {
        Ok(stats) => Json(json!({
            "queue": {
                "pending": stats.pending,
                "in_flight": stats.in_flight,
                "delivered": stats.delivered,
                "dead": stats.dead,
                "oldest_pending_received_at_ms": stats.oldest_pending_received_at_ms,
                "oldest_pending_age_seconds": stats.oldest_pending_age_seconds(now),
            },
            "forwarder": state.control.state().as_str(),
        }))
        .into_response(),
        Err(err) => queue_error(err),
    }
}

async fn pause(State(state): State<Arc<AppState>>) -> Response {
    state.control.set_paused(true);
    tracing::warn!("forwarding paused by an operator");
    Json(json!({ "forwarder": "paused" })).into_response()
}

async fn resume(State(state): State<Arc<AppState>>) -> Response {
    state.control.set_paused(false);
    tracing::info!("forwarding resumed by an operator");
    Json(json!({ "forwarder": "running" })).into_response()
}

/// Prometheus text. Queue gauges are read at scrape time, so they are never stale.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let now = state.clock.now_ms();
    if let Ok(stats) = state.queue.stats(now).await {
        for (name, value) in [
            ("pending", stats.pending),
            ("in_flight", stats.in_flight),
            ("delivered", stats.delivered),
            ("dead", stats.dead),
        ] {
            metrics::gauge!("relay_queue_depth", "state" => name).set(value as f64);
        }
        let age = stats.oldest_pending_age_seconds(now).unwrap_or(0.0);
        metrics::gauge!("relay_oldest_pending_age_seconds").set(age);
    }
    let current = state.control.state();
    for candidate in [
        crate::forwarder::ForwarderState::Running,
        crate::forwarder::ForwarderState::BackingOff,
        crate::forwarder::ForwarderState::Paused,
    ] {
        metrics::gauge!("relay_forwarder_state", "state" => candidate.as_str())
            .set(if candidate == current { 1.0 } else { 0.0 });
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token(""), None);
    }
}
