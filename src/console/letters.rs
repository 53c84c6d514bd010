//! The dead-letter pages (contract §11): a filtered, paged list; one letter in full; replay
//! and purge of one or of the filtered set, each after a confirmation that shows the count.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::guard::{Action, Viewer};
use crate::http::AppState;

pub async fn list(State(_state): State<Arc<AppState>>, _viewer: Viewer) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}

pub async fn show(
    State(_state): State<Arc<AppState>>,
    _viewer: Viewer,
    Path(_id): Path<i64>,
) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}

pub async fn replay(
    State(_state): State<Arc<AppState>>,
    _action: Action<serde::de::IgnoredAny>,
) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}

pub async fn purge(
    State(_state): State<Arc<AppState>>,
    _action: Action<serde::de::IgnoredAny>,
) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}
