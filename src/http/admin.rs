//! The admin port: `GET /metrics` (Prometheus text) and the bearer-token guarded `/admin/...`
//! routes: dead letters (list, show one, replay, purge), status per source and lane, pausing
//! one lane or all for a Heap maintenance window, reloading the configuration, previewing what
//! a payload would become under it (`POST /admin/preview`), and the payload shapes that
//! arrived (`GET /admin/shapes`), and erasing a person (`POST /admin/erase`, `GET
//! /admin/erasures`, contract §12). With no `admin.token` configured every `/admin` route
//! answers 403.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::config::DEFAULT_SOURCE;
use crate::dead_letters::{self, FilterError, FilterParams, ReplaySummary};
use crate::erase::{self, EraseError, ListingParams};
use crate::forwarder::ForwarderState;
use crate::preview::{LivePreview, LivePreviewError};
use crate::queue::{DeadLetterFilter, QueueError, QueueStats};

pub fn router(state: Arc<AppState>) -> Router {
    let guarded = Router::new()
        .route("/admin/dead-letters", get(list))
        .route("/admin/dead-letters/{id}", get(show))
        .route("/admin/dead-letters/replay", post(replay))
        .route("/admin/dead-letters/purge", post(purge))
        .route("/admin/status", get(status))
        .route("/admin/forwarder/pause", post(pause))
        .route("/admin/forwarder/resume", post(resume))
        .route("/admin/reload", post(reload))
        .route("/admin/preview", post(preview))
        .route("/admin/shapes", get(shapes))
        .route("/admin/erase", post(erase_identity))
        .route("/admin/erasures", get(erasures))
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
    match replay_selected(&state, filter).await {
        Ok(summary) => Json(json!({ "replayed": summary })).into_response(),
        Err(err) => queue_error(err),
    }
}

/// Replays the selected dead letters under the sources in force, then wakes every lane to
/// send what was queued again. The admin API and the console both replay through here.
pub(crate) async fn replay_selected(
    state: &AppState,
    filter: DeadLetterFilter,
) -> Result<ReplaySummary, QueueError> {
    let sources = state.sources.current();
    let summary =
        dead_letters::replay(state.queue.as_ref(), &sources, filter, state.clock.now()).await?;
    for (_, lane) in state.lanes.all() {
        lane.wake();
    }
    Ok(summary)
}

async fn purge(State(state): State<Arc<AppState>>, Query(params): Query<FilterParams>) -> Response {
    let filter = match params.selection() {
        Ok(filter) => filter,
        Err(err) => return bad_filter(err),
    };
    match purge_selected(&state, filter).await {
        Ok(purged) => Json(json!({ "purged": purged })).into_response(),
        Err(err) => queue_error(err),
    }
}

/// Deletes the selected dead letters and logs how many; the admin API and the console both
/// purge through here.
pub(crate) async fn purge_selected(
    state: &AppState,
    filter: DeadLetterFilter,
) -> Result<u64, QueueError> {
    let purged = state.queue.purge(filter).await?;
    tracing::info!(purged, "dead letters purged");
    Ok(purged)
}

fn queue_json(stats: &QueueStats, now_ms: i64) -> Value {
    json!({
        "pending": stats.pending,
        "in_flight": stats.in_flight,
        "delivered": stats.delivered,
        "dead": stats.dead,
        "oldest_pending_received_at_ms": stats.oldest_pending_received_at_ms,
        "oldest_pending_age_seconds": stats.oldest_pending_age_seconds(now_ms),
    })
}

/// The forwarder as a whole: paused when every lane is, backing off when any lane is.
fn overall(states: &[ForwarderState]) -> ForwarderState {
    if !states.is_empty() && states.iter().all(|s| *s == ForwarderState::Paused) {
        ForwarderState::Paused
    } else if states.contains(&ForwarderState::BackingOff) {
        ForwarderState::BackingOff
    } else {
        ForwarderState::Running
    }
}

/// The queue's record counts (records, not webhooks or events: see [`crate::queue::QueueStats`])
/// in all and per lane, each lane's forwarder state (which shows a pause or resume at once),
/// and the sources in force.
async fn status(State(state): State<Arc<AppState>>) -> Response {
    let now = state.clock.now_ms();
    let status = match state.lanes.status(state.queue.as_ref(), now).await {
        Ok(status) => status,
        Err(err) => return queue_error(err),
    };
    let mut lanes_json = Map::new();
    for lane in &status.lanes {
        lanes_json.insert(
            lane.app_id.clone(),
            json!({
                "forwarder": lane.control.state().as_str(),
                "queue": queue_json(&lane.queue, now),
            }),
        );
    }
    let mut sources_json = Map::new();
    for source in state.sources.current().iter() {
        sources_json.insert(
            source.name.clone(),
            json!({
                "path": source.path,
                "app_id": source.app_id.as_str(),
                "secrets": source.secrets.len(),
            }),
        );
    }
    let states: Vec<ForwarderState> = status.lanes.iter().map(|l| l.control.state()).collect();
    Json(json!({
        "queue": queue_json(&status.queue, now),
        "forwarder": overall(&states).as_str(),
        "sources": sources_json,
        "lanes": lanes_json,
    }))
    .into_response()
}

/// `?app_id=`: one lane; none: every lane.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LaneParams {
    app_id: Option<String>,
}

async fn pause(State(state): State<Arc<AppState>>, Query(params): Query<LaneParams>) -> Response {
    set_paused(&state, &params, true)
}

async fn resume(State(state): State<Arc<AppState>>, Query(params): Query<LaneParams>) -> Response {
    set_paused(&state, &params, false)
}

/// Answers `{"forwarder": "paused"|"running", "app_ids": [...]}` ([`Lanes::switch`], as the
/// console's buttons do).
///
/// [`Lanes::switch`]: crate::forwarder::lanes::Lanes::switch
fn set_paused(state: &AppState, params: &LaneParams, paused: bool) -> Response {
    let Some(app_ids) = state.lanes.switch(params.app_id.as_deref(), paused) else {
        return error(StatusCode::NOT_FOUND, "unknown_app_id");
    };
    let forwarder = if paused { "paused" } else { "running" };
    Json(json!({ "forwarder": forwarder, "app_ids": app_ids })).into_response()
}

/// `POST /admin/reload` (contract §10): 200 with what changed, or 422 with the problems (the
/// running configuration stays).
async fn reload(State(state): State<Arc<AppState>>) -> Response {
    match state.reloader.reload(&state.sources, &state.lanes).await {
        Ok(changes) => Json(json!({
            "status": "reloaded",
            "applied": changes.applied,
            "ignored": changes.ignored,
        }))
        .into_response(),
        Err(err) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "error": "invalid_configuration", "problems": err.problems() })),
        )
            .into_response(),
    }
}

/// `?source=`: the source to preview as (default: the default source).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewParams {
    source: Option<String>,
}

/// `POST /admin/preview?source=NAME` (contract §10.3): the body is the payload; the answer
/// says what the relay would do with it under the sources in force now (after any reload),
/// received now. Nothing is verified, queued or sent. 404 `unknown_source`, 400
/// `invalid_json` for a body that is not a JSON object, 413 beyond `server.max_body_bytes`.
async fn preview(
    State(state): State<Arc<AppState>>,
    Query(params): Query<PreviewParams>,
    body: Body,
) -> Response {
    let name = params.source.as_deref().unwrap_or(DEFAULT_SOURCE);
    let Some(previewer) = live_preview(&state, name) else {
        return unknown_source(name, "configured");
    };
    let Ok(payload) = axum::body::to_bytes(body, state.max_body_bytes).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    };
    match previewer.run(payload, state.clock.now()).await {
        Ok(preview) => Json(preview.to_json()).into_response(),
        Err(LivePreviewError::InvalidJson) => error(StatusCode::BAD_REQUEST, "invalid_json"),
        Err(LivePreviewError::Unavailable) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    }
}

/// The preview as source `name` under the sources in force now and the Heap settings the
/// process started with; `None` for a source not configured. The admin API and the console
/// both preview through here.
pub(crate) fn live_preview(state: &AppState, name: &str) -> Option<LivePreview> {
    LivePreview::new(
        state.sources.current(),
        name,
        &state.reloader.started().heap,
    )
}

/// `?source=`: the shapes of one source only.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShapeParams {
    source: Option<String>,
}

/// `GET /admin/shapes?source=`: the payload shapes stored (contract §10.4), newest (last
/// seen) first, of one source when given.
async fn shapes(State(state): State<Arc<AppState>>, Query(params): Query<ShapeParams>) -> Response {
    match state.queue.shapes(params.source).await {
        Ok(shapes) => Json(json!({ "shapes": shapes })).into_response(),
        Err(err) => queue_error(err),
    }
}

/// 400 with a `detail` saying what is wrong.
fn bad_request(code: &str, detail: impl std::fmt::Display) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": code, "detail": detail.to_string() })),
    )
        .into_response()
}

/// 404 `unknown_source`, the name shown cut to 64 characters (it is the client's text).
fn unknown_source(name: &str, what: &str) -> Response {
    let shown: String = name.chars().take(64).collect();
    let detail = format!("no source `{shown}` is {what}");
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "unknown_source", "detail": detail })),
    )
        .into_response()
}

/// The body of `POST /admin/erase`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EraseRequest {
    /// Default: the default source.
    #[serde(default)]
    source: Option<String>,
    identity: String,
}

/// `POST /admin/erase` with `{"source"?: NAME, "identity": ID}` (contract §12): erases every
/// trace of the identity the relay holds for the source (see [`erase::erase`]) under the
/// sources in force now, and answers the [`erase::ErasureReport`] once the queue's files are
/// scrubbed. 400 `invalid_request` for another body or an empty identity, 404
/// `unknown_source` for a source neither configured nor stored, 503 when the queue fails (the
/// erasure may then be partial: asking again finishes it).
async fn erase_identity(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let Ok(bytes) = axum::body::to_bytes(body, state.max_body_bytes).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    };
    // serde's message may quote the value sent (a number given as identity): not echoed.
    let Ok(request) = serde_json::from_slice::<EraseRequest>(&bytes) else {
        return bad_request(
            "invalid_request",
            "the body must be a JSON object {\"source\"?: name, \"identity\": string}",
        );
    };
    let source = request.source.unwrap_or_else(|| DEFAULT_SOURCE.to_owned());
    let sources = state.sources.current();
    let queue = state.queue.clone();
    let now = state.clock.now_ms();
    // On a task of its own: a client that gives up (a proxy's timeout on a long erasure)
    // must not cancel it halfway.
    let erasure = tokio::spawn(async move {
        erase::erase(
            queue.as_ref(),
            &sources,
            &source,
            &request.identity,
            now,
            &mut |_| {},
        )
        .await
    });
    let Ok(outcome) = erasure.await else {
        tracing::error!("erasure task failed");
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    };
    match outcome {
        Ok(report) => Json(report).into_response(),
        Err(err @ EraseError::EmptyIdentity) => bad_request("invalid_request", err),
        Err(EraseError::UnknownSource(name)) => unknown_source(&name, "configured or stored"),
        Err(EraseError::Queue(err)) => queue_error(err),
    }
}

/// `GET /admin/erasures?source=&state=&after=&limit=`: the erasures recorded, by id
/// ascending ([`erase::ErasureView`], never the identity), paged as dead letters are. 400
/// `invalid_filter` for an unknown state or a limit of 0.
async fn erasures(
    State(state): State<Arc<AppState>>,
    Query(params): Query<ListingParams>,
) -> Response {
    let filter = match params.filter() {
        Ok(filter) => filter,
        Err(err) => return bad_request("invalid_filter", err),
    };
    let limit = filter.limit;
    match erase::list(state.queue.as_ref(), filter).await {
        Ok(erasures) => {
            let next_after = (erasures.len() == limit)
                .then(|| erasures.last().map(|e| e.id))
                .flatten();
            Json(json!({ "erasures": erasures, "next_after": next_after })).into_response()
        }
        Err(err) => queue_error(err),
    }
}

/// Prometheus text. Queue gauges are read at scrape time, so they are never stale.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let now = state.clock.now_ms();
    let lanes = state.lanes.all();
    if let Ok(by_lane) = state.queue.lane_stats(now).await {
        for (app_id, _) in &lanes {
            let stats = by_lane.get(app_id).copied().unwrap_or_default();
            for (name, value) in [
                ("pending", stats.pending),
                ("in_flight", stats.in_flight),
                ("delivered", stats.delivered),
                ("dead", stats.dead),
            ] {
                metrics::gauge!("relay_queue_depth", "state" => name, "app_id" => app_id.clone())
                    .set(value as f64);
            }
            let age = stats.oldest_pending_age_seconds(now).unwrap_or(0.0);
            metrics::gauge!("relay_oldest_pending_age_seconds", "app_id" => app_id.clone())
                .set(age);
        }
    }
    for (app_id, control) in &lanes {
        let current = control.state();
        for candidate in [
            ForwarderState::Running,
            ForwarderState::BackingOff,
            ForwarderState::Paused,
        ] {
            metrics::gauge!(
                "relay_forwarder_state",
                "state" => candidate.as_str(),
                "app_id" => app_id.clone()
            )
            .set(if candidate == current { 1.0 } else { 0.0 });
        }
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
    fn the_forwarder_as_a_whole_is_paused_only_when_every_lane_is() {
        use ForwarderState::*;
        assert_eq!(overall(&[Paused, Paused]), Paused);
        assert_eq!(overall(&[Paused, Running]), Running);
        assert_eq!(overall(&[Running, BackingOff, Paused]), BackingOff);
        assert_eq!(overall(&[]), Running);
    }

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
