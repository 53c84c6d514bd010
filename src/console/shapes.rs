//! The shapes page (contract §11): the payload shapes stored per source, with each sample, as
//! `GET /admin/shapes` lists them (newest last seen first).

use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;

use super::guard::Viewer;
use super::letters::{Choice, choices, configured_sources, unavailable};
use super::{Nav, format_time, render};
use crate::http::AppState;
use crate::shapes::StoredShape;

const PAGE: &str = "/console/shapes";

/// `?source=`: empty (the form's "any") is every source.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ShapeQuery {
    pub source: String,
}

/// One stored shape as the page shows it.
#[derive(Debug, Clone)]
pub struct ShapeRow {
    pub source: String,
    /// `none` when the decoder found none.
    pub kind: String,
    pub action: String,
    pub paths: Vec<String>,
    pub count: u64,
    pub first_seen: String,
    pub last_seen: String,
    /// Pretty JSON (redacted unless `capture.samples = "full"`), or `None` without a sample.
    pub sample: Option<String>,
}

impl From<StoredShape> for ShapeRow {
    fn from(shape: StoredShape) -> Self {
        let or_none = |value: Option<String>| value.unwrap_or_else(|| "none".to_owned());
        ShapeRow {
            sample: shape.sample.as_ref().map(|sample| {
                serde_json::to_string_pretty(sample).unwrap_or_else(|_| sample.to_string())
            }),
            source: shape.source,
            kind: or_none(shape.kind),
            action: or_none(shape.action),
            paths: shape.paths,
            count: shape.count,
            first_seen: format_time(shape.first_seen_ms),
            last_seen: format_time(shape.last_seen_ms),
        }
    }
}

#[derive(Template)]
#[template(path = "console/shapes.html")]
pub struct ShapesPage {
    pub nav: Option<Nav>,
    pub sources: Vec<Choice>,
    pub shapes: Vec<ShapeRow>,
    /// The source filtered on, if any.
    pub source: Option<String>,
}

/// `GET /console/shapes?source=`.
pub async fn page(
    State(state): State<Arc<AppState>>,
    viewer: Viewer,
    Query(query): Query<ShapeQuery>,
) -> Response {
    let nav = Nav::new(&viewer.session, "shapes");
    let source = Some(query.source.trim().to_owned()).filter(|s| !s.is_empty());
    let shapes = match state.queue.shapes(source.clone()).await {
        Ok(shapes) => shapes,
        Err(err) => return unavailable(Some(nav), &err, PAGE),
    };
    let page = ShapesPage {
        nav: Some(nav),
        sources: choices(configured_sources(&state), &query.source),
        shapes: shapes.into_iter().map(ShapeRow::from).collect(),
        source,
    };
    render(StatusCode::OK, &page)
}
