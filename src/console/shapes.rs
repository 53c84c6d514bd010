//! The shapes page (contract §11): the payload shapes stored per source, with each sample.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::guard::Viewer;
use crate::http::AppState;

pub async fn page(State(_state): State<Arc<AppState>>, _viewer: Viewer) -> Response {
    StatusCode::NOT_IMPLEMENTED.into_response()
}
