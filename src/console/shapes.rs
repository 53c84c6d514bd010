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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::letters::tests::assert_escaped;

    fn stored(sample: Option<serde_json::Value>) -> StoredShape {
        StoredShape {
            key: "ab".into(),
            source: "shop".into(),
            kind: Some("nps".into()),
            action: None,
            paths: vec!["data.type:string".into(), "data.user.user_id:string".into()],
            count: 4,
            first_seen_ms: 1_700_000_000_000,
            last_seen_ms: 1_700_000_060_000,
            sample,
        }
    }

    fn page(shapes: Vec<StoredShape>) -> String {
        ShapesPage {
            nav: Some(Nav {
                csrf: "t".into(),
                current: "shapes",
            }),
            sources: choices(vec!["shop".into()], "shop"),
            shapes: shapes.into_iter().map(ShapeRow::from).collect(),
            source: Some("shop".into()),
        }
        .render()
        .unwrap()
    }

    #[test]
    fn a_shape_shows_its_paths_counts_and_sample_as_escaped_text() {
        let sample =
            serde_json::json!({"data": {"type": "nps", "note": "<script>alert(1)</script>"}});
        let html = page(vec![stored(Some(sample))]);
        assert_escaped(&html);
        assert!(html.contains(r#"<table id="shapes">"#));
        assert!(html.contains(r#"<tr class="shape">"#));
        assert!(html.contains("<li>data.user.user_id:string</li>"));
        assert!(html.contains(r#"<td class="num shape-count">4</td>"#));
        assert!(html.contains(r#"<td class="shape-action">none</td>"#));
        assert!(html.contains("2023-11-14 22:14:20 UTC"));
        assert!(html.contains(r#"<pre class="shape-sample">{"#));
        assert!(html.contains(r#"<option value="shop" selected>shop</option>"#));
        assert!(html.contains(r#"id="shape-filter""#) && html.contains(r#"id="shape-source""#));
    }

    #[test]
    fn a_shape_without_sample_says_none_and_no_shapes_says_so() {
        assert!(page(vec![stored(None)]).contains(r#"<pre class="shape-sample muted">none</pre>"#));
        let empty = page(Vec::new());
        assert!(empty.contains(r#"id="no-shapes""#) && !empty.contains(r#"id="shapes""#));
    }
}
