//! The preview page (contract §11): paste a payload, pick a source, see the Heap requests
//! the relay would send (the same preview as `POST /admin/preview`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::guard::{Action, Viewer};
use crate::http::AppState;

pub async fn form(State(_state): State<Arc<AppState>>, _viewer: Viewer) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}

pub async fn run(
    State(_state): State<Arc<AppState>>,
    _action: Action<serde::de::IgnoredAny>,
) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}
