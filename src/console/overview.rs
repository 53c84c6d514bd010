//! The overview page (contract §11): per source and app id, what arrives and what leaves,
//! the queue, the forwarder's state and Heap's last error; pause and resume.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::guard::{Action, Viewer};
use crate::http::AppState;

pub async fn page(State(_state): State<Arc<AppState>>, _viewer: Viewer) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}

pub async fn live(State(_state): State<Arc<AppState>>, _viewer: Viewer) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}

pub async fn pause(
    State(_state): State<Arc<AppState>>,
    _action: Action<serde::de::IgnoredAny>,
) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}

pub async fn resume(
    State(_state): State<Arc<AppState>>,
    _action: Action<serde::de::IgnoredAny>,
) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}
